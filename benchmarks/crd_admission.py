"""What admitting a FineTuneJob costs: creates against CRD variants, no operator running.

    make cluster-up
    .venv/bin/python benchmarks/crd_admission.py --before 7bd377d     # 1,000 creates x 3 rounds
    .venv/bin/python benchmarks/crd_admission.py --quick              # 50 creates, 1 round

operator_scale.py saw the 1,000 creates of its burst take 2-3x longer with this tree's CRD than
with an earlier one, on a machine the running operator kept saturated. This isolates the CRD:
the same creates (operator_scale.finetunejob, POSTs from 8 threads as admin) into a fresh
namespace, with two watch streams on all FineTuneJobs open (an operator's watch and a
second client's: every create is serialized for them), against

* current: this tree's CRD (crds/), as shipped;
* no_cel: the same schema without any x-kubernetes-validations rule (what the CEL rules cost);
* before (with --before REV): the CRD of an earlier commit (exclusive bounds dropped, as
  operator_scale.py does, for the same reason).

Variants alternate within each round; each gets a fresh namespace, deleted afterwards, and the
CRD is applied (and Established) before its creates. This tree's CRD is restored at the end.
Results: docs/benchmarks/crd_admission.json (per variant: seconds for all creates, p50/p99 of
one create, kube-apiserver CPU per create (its watch fan-out included), stored object size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

import benchlib  # noqa: E402
from kubeapi import Api  # noqa: E402
from operator_harness import CRDS, install_crds  # noqa: E402
from operator_scale import FTJ_API, control_plane_cpu, finetunejob  # noqa: E402

from localenv.testing import Cluster  # noqa: E402

CRD_FILE = "kubetune.dev_finetunejobs.yaml"


def without(node: Any, keys: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: without(v, keys) for k, v in node.items() if k not in keys}
    return [without(v, keys) for v in node] if isinstance(node, list) else node


def variants(before: str | None) -> dict[str, dict[str, Any]]:
    current = yaml.safe_load((CRDS / CRD_FILE).read_text())
    found = {
        "current": current,
        "no_cel": without(current, frozenset({"x-kubernetes-validations"})),
    }
    if before:
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{before}:crds/{CRD_FILE}"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        found["before"] = without(
            yaml.safe_load(text), frozenset({"exclusiveMaximum", "exclusiveMinimum"})
        )
    return found


def apply(cluster: Cluster, crd: dict[str, Any]) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(crd))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.kubetune.dev"
    )
    time.sleep(2)  # the API server swaps its handler for the resource after Established


def watch_all(api: Api, stop: threading.Event) -> None:
    with api.session.get(
        f"{api.server}{FTJ_API}/finetunejobs?watch=1", stream=True, timeout=(10, 600)
    ) as response:
        for _ in response.iter_lines():
            if stop.is_set():
                return


def create_batch(cluster: Cluster, api: Api, jobs: int) -> dict[str, Any]:
    namespace = f"crd-admission-{uuid.uuid4().hex[:6]}"
    api.json("POST", "/api/v1/namespaces", json={"metadata": {"name": namespace}})
    path = f"{FTJ_API}/namespaces/{namespace}/finetunejobs"
    try:
        for i in range(3):  # warm the resource's handler and the connections
            api.json("POST", path, json=finetunejob(f"warm-{i}"))
        stop = threading.Event()
        watchers = [threading.Thread(target=watch_all, args=(api, stop), daemon=True)]
        watchers.append(threading.Thread(target=watch_all, args=(api, stop), daemon=True))
        for watcher in watchers:
            watcher.start()
        time.sleep(1)
        latencies: list[float] = []

        def create(i: int) -> None:
            started = time.monotonic()
            api.json("POST", path, json=finetunejob(f"bench-{i:05d}"))
            latencies.append(time.monotonic() - started)

        started, cpu_0 = time.monotonic(), control_plane_cpu()["kube-apiserver"]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(jobs)))
        total = time.monotonic() - started
        cpu = control_plane_cpu()["kube-apiserver"] - cpu_0
        stop.set()
        size = len(api.call("GET", f"{path}/bench-00000").content)
    finally:
        api.call("DELETE", f"/api/v1/namespaces/{namespace}")
    latencies.sort()
    return {
        "all_creates_s": round(total, 3),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
        "apiserver_cpu_ms_per_create": round(1000 * cpu / jobs, 2),
        "object_bytes": size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="creates per run (default 1000)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="50 creates, one round")
    parser.add_argument("--before", help="git revision whose CRD is the 'before' variant")
    parser.add_argument("--out", type=Path, default=benchlib.DOCS_DIR / "crd_admission.json")
    args = parser.parse_args(argv)
    jobs = args.jobs or (50 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 3)

    cluster = Cluster.up()
    api = Api(cluster.kubeconfig)
    crds = variants(args.before)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in crds}
    try:
        for i in range(rounds):
            order = list(crds) if i % 2 == 0 else list(reversed(crds))
            for name in order:
                apply(cluster, crds[name])
                result = create_batch(cluster, api, jobs)
                runs[name].append(result)
                print(f"round {i + 1} {name}: {result}", flush=True)
    finally:
        install_crds(cluster)
    summary = {
        name: {
            "all_creates_s_median": benchlib.median([r["all_creates_s"] for r in results]),
            "p50_ms_median": benchlib.median([r["p50_ms"] for r in results]),
            "apiserver_cpu_ms_per_create_median": benchlib.median(
                [r["apiserver_cpu_ms_per_create"] for r in results]
            ),
            "object_bytes": results[-1]["object_bytes"],
        }
        for name, results in runs.items()
    }
    doc = {
        "benchmark": "crd_admission",
        "command": benchlib.command_line(),
        "date": benchlib.now(),
        "device": benchlib.device_info(with_torch=False),
        "jobs": jobs,
        "rounds": rounds,
        "before": args.before,
        "runs": runs,
        "summary": summary,
        "ratios_vs_current": {
            name: round(s["all_creates_s_median"] / summary["current"]["all_creates_s_median"], 2)
            for name, s in summary.items()
        },
    }
    benchlib.write_json(args.out, doc)
    print(json.dumps(doc["summary"], indent=1), json.dumps(doc["ratios_vs_current"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
