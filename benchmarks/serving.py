"""Serving: how soon a succeeded job answers, and one shared server against one server per
adapter, with the real vLLM CPU engine.

    make cluster-up
    .venv/bin/python benchmarks/serving.py                 # docs/benchmarks/serving.json
    .venv/bin/python benchmarks/serving.py --requests 16   # quicker

1. Succeeded -> first answer, through the operator (as the chart runs it, with the real serving
   agent and vLLM; the stand-in trainer of the operator tests "trains" in a second and the
   adapter is already published under the job's output with its SHA256SUMS, so only serving is
   timed): a first job (cold: the vLLM server starts, fetches the base model, the agent fetches,
   checks and loads the adapter) and a second one on the same base (warm: the adapter only).
   Timestamps are this process's monotonic clock when it saw the status change (polled every
   0.2 s) and when the first chat completion returned.
2. Requests per second of two adapters on one server (shared base, loaded at run time, as the
   operator deploys them) against the same two adapters on two servers (one base copy each),
   side by side in one run: the same requests (alternating adapters, greedy, max_tokens 16) from
   `--concurrency` client threads; and the servers' memory (RSS of their process trees).

Device: whatever runs it (the JSON records it); on 2 shared cores the two separate servers
compete for the same cores, which is the point of the comparison there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
for _extra in (ROOT / "tests", ROOT / "tests" / "integration"):
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))

import benchlib  # noqa: E402
from operator_harness import (  # noqa: E402
    OperatorProcess,
    install_crds,
    install_operator_identity,
    operator_env,
)
from vllm_support import VllmServer, build_adapter  # noqa: E402

from localenv.testing import Cluster, free_port, wait_until  # noqa: E402
from localenv.vllm_env import ensure  # noqa: E402

FAKE_TRAINER = ROOT / "tests" / "integration" / "fake_trainer.py"
QUESTION = [{"role": "user", "content": "What does the method lora do?"}]
CPU_ARGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.1", "--max-model-len", "512"]


def build_model(directory: Path) -> Path:
    """The quickstart's tiny Llama and tokenizer (examples/quickstart/assets.py)."""
    import assets  # noqa: PLC0415 - the quickstart's asset builder

    return Path(assets.write_assets(directory)) / "model"


def publish(local: Path, uri: str) -> None:
    """Upload a directory with a SHA256SUMS, as the trainer publishes its output."""
    from kubetune_trainer.publish import upload_outputs  # noqa: PLC0415
    from kubetune_trainer.storage import Storage  # noqa: PLC0415

    upload_outputs(Storage(env=benchlib.load_s3_env(), use_cache=False), local, uri)


def tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def chat(base_url: str, model: str, max_tokens: int = 16) -> float:
    """One greedy chat completion; its latency in seconds."""
    body = {"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(
        f"{base_url}/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=300) as response:
        json.load(response)
    return time.monotonic() - started


def load(targets: list[tuple[str, str]], concurrency: int) -> dict[str, float]:
    """The requests (base_url, model) from `concurrency` threads: req/s and latencies."""
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(lambda t: chat(*t), targets))
    wall = time.monotonic() - started
    latencies.sort()
    return {
        "requests": len(targets),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(targets) / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
    }


# ------------------------------------------------------------------ 2. one server vs two


def one_vs_two(work: Path, requests: int, concurrency: int) -> dict[str, Any]:
    model = build_model(work / "assets")
    adapters = {f"adapter-{i}": build_adapter(model, work / f"adapter-{i}", seed=i) for i in (0, 1)}
    names = list(adapters)
    results: dict[str, Any] = {}

    shared = VllmServer(model, "base", free_port(), work / "shared.log").start()
    try:
        loads = {}
        for name, path in adapters.items():
            started = time.monotonic()
            shared.load_adapter(name, path)
            loads[name] = round(time.monotonic() - started, 3)
        chat(shared.base_url, names[0])  # warm-up
        targets = [(shared.base_url, names[i % 2]) for i in range(requests)]
        results["one_server"] = {
            **load(targets, concurrency),
            "rss_mb": round(tree_rss(shared.process.pid) / 2**20),  # type: ignore[union-attr]
            "adapter_load_s": loads,
        }
    finally:
        shared.stop()

    servers = [VllmServer(model, "base", free_port(), work / f"own-{i}.log") for i in (0, 1)]
    threads = [threading.Thread(target=s.start) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        for server, (name, path) in zip(servers, adapters.items(), strict=True):
            server.load_adapter(name, path)
            chat(server.base_url, name)  # warm-up
        targets = [(servers[i % 2].base_url, names[i % 2]) for i in range(requests)]
        results["two_servers"] = {
            **load(targets, concurrency),
            "rss_mb": round(sum(tree_rss(s.process.pid) for s in servers if s.process) / 2**20),
        }
    finally:
        for server in servers:
            server.stop()
    one, two = results["one_server"], results["two_servers"]
    results["ratios"] = {
        "requests_per_s_one_over_two": round(one["requests_per_s"] / two["requests_per_s"], 2),
        "rss_one_over_two": round(one["rss_mb"] / two["rss_mb"], 2),
    }
    return results


# --------------------------------------------------------- 1. Succeeded -> first answer


@contextmanager
def operator_with_serving(cluster: Cluster, work: Path, namespace: str) -> Iterator[None]:
    env = cluster.s3_env
    with install_operator_identity(cluster, work) as identity:
        low = free_port()
        extra = {
            "KUBETUNE_TRAINER_COMMAND": json.dumps(["python", str(FAKE_TRAINER), "--config"]),
            "KUBETUNE_DEFAULT_STORAGE_ENDPOINT": env["AWS_ENDPOINT_URL"],
            "KUBETUNE_DEFAULT_CREDENTIALS_SECRET": "s3-credentials",
            "KUBETUNE_SERVING_COMMAND": json.dumps(
                [str(ensure()), "-m", "vllm.entrypoints.openai.api_server"]
            ),
            "KUBETUNE_SERVING_ARGS": json.dumps(CPU_ARGS),
            "KUBETUNE_SERVING_ENV": json.dumps([{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}]),
            "KUBETUNE_SERVING_PORTS": f"{low}-{low + 3}",
            "KUBETUNE_SERVING_ADDRESS": "pod",
            "KUBETUNE_SERVING_RESOURCES": "{}",
        }
        process = OperatorProcess(
            name="bench",
            env={**operator_env(identity, namespace, free_port(), free_port()), **extra},
            log_path=work / "operator.log",
            metrics_port=0,
            health_port=0,
        )
        process.start().wait_active()
        try:
            yield
        finally:
            process.stop()


def time_to_answer(
    cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]
) -> dict[str, float]:
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name}, "spec": spec,
    }  # fmt: skip
    created = time.monotonic()
    cluster.apply(manifest, namespace)
    marks: dict[str, float] = {}

    def status() -> dict[str, Any]:
        return dict(cluster.get("ftj", name, namespace).get("status") or {})

    def reached() -> dict[str, Any] | None:
        current = status()
        now = time.monotonic()
        if current.get("phase") == "Succeeded":
            marks.setdefault("succeeded", now)
        serving = current.get("serving") or {}
        if serving.get("phase") == "Failed":
            raise RuntimeError(f"{name}: serving failed: {serving}")
        return serving if serving.get("phase") == "Serving" else None

    serving = wait_until(reached, 900, f"{name} to be served", interval=0.2)
    marks["serving"] = time.monotonic()
    chat(serving["endpoint"], serving["model"])
    answered = time.monotonic()
    return {
        "created_to_succeeded_s": round(marks["succeeded"] - created, 2),
        "succeeded_to_serving_s": round(marks["serving"] - marks["succeeded"], 2),
        "succeeded_to_first_answer_s": round(answered - marks["succeeded"], 2),
    }


def succeeded_to_answer(cluster: Cluster, work: Path) -> dict[str, Any]:
    env = cluster.s3_env
    prefix = f"s3://{env['KUBETUNE_S3_BUCKET']}/bench-serving/{uuid.uuid4().hex[:8]}"
    model = build_model(work / "assets")
    from kubetune_trainer.storage import Storage  # noqa: PLC0415

    Storage(env=env, use_cache=False).upload_dir(model, f"{prefix}/model")
    for i in (0, 1):
        publish(build_adapter(model, work / f"adapter-{i}", seed=i), f"{prefix}/out-{i}")
    with cluster.namespace() as namespace, operator_with_serving(cluster, work, namespace):
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                  "stringData": {k: env[k] for k in ("AWS_ACCESS_KEY_ID",
                                                     "AWS_SECRET_ACCESS_KEY")}}  # fmt: skip
        cluster.apply(secret, namespace)

        def spec(i: int) -> dict[str, Any]:
            return {
                "baseModel": {"uri": f"{prefix}/model"},
                "dataset": {"trainUri": f"{prefix}/data.jsonl"},
                "output": {"uri": f"{prefix}/out-{i}"},
                "resources": {"gpus": 0},
                "serving": {"enabled": True},
            }

        cold = time_to_answer(cluster, namespace, "cold", spec(0))
        warm = time_to_answer(cluster, namespace, "warm", spec(1))
    return {"cold_server": cold, "warm_server": warm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=benchlib.DOCS_DIR / "serving.json")
    args = parser.parse_args(argv)
    cluster = Cluster.up()
    install_crds(cluster)
    results: dict[str, Any] = {"device": benchlib.device_info(), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results["succeeded_to_first_answer"] = succeeded_to_answer(cluster, work / "flow")
        results["one_server_vs_two"] = one_vs_two(work / "engine", args.requests, args.concurrency)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "device"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
