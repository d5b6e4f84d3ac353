"""End to end: train, serve, call. The chart (its own release, with the API server), FineTuneJobs
applied with kubectl and trained for real, the operator starting a vLLM server (the real CPU
engine) with the real serving agent, and the official `openai` client calling the fine-tuned
models through the API server.

Checked: both adapters of the same base share one server; each answers as itself, greedy
decoding through vLLM equal to greedy decoding of the same base + adapter with transformers +
peft in float32 (both ways in float32, so equal text is the tolerance), and different from the
base model's; deleting one job unloads its adapter, and its model is then a 404 in OpenAI's
error shape.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import NotFoundError, OpenAI

from localenv.testing import Cluster, free_ports, wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import demo  # noqa: E402
from operator_harness import install_crds  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
RELEASE = "kubetune-serve"
RELEASE_NAMESPACE = "kubetune-serve-system"
NAMESPACE = "kubetune-serve-e2e"
OUT = "s3://kubetune/serving-e2e"
QUESTION = "What does the method lora do?"
JOBS = {"alpha": 0.003, "beta": 0.01}  # two adapters of one base: other learning rates
Obj = dict[str, Any]


def helm(cluster: Cluster, *args: str, check: bool = True) -> str:
    return demo.run(str(cluster.bin / "helm"), *args, "--kubeconfig", str(cluster.kubeconfig),
                    check=check)  # fmt: skip


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> Iterator[OpenAI]:
    """The chart with its API server and serving on the CPU; an OpenAI client for NAMESPACE."""
    env = cluster.s3_env
    demo.upload_assets(env)
    demo.assets.remove(f"{OUT}/", env)
    install_crds(cluster)
    cluster.kubectl("delete", "namespace", NAMESPACE, RELEASE_NAMESPACE, "--ignore-not-found",
                    "--wait=true", timeout=180)  # fmt: skip
    demo.create_secret(env, NAMESPACE)
    demo.create_secret(env, RELEASE_NAMESPACE)
    metrics, health, api, serving = free_ports(4)
    helm(
        cluster, "upgrade", "--install", RELEASE, str(ROOT / "charts/kubetune"),
        "--namespace", RELEASE_NAMESPACE, "--create-namespace",
        "--values", str(ROOT / "examples/quickstart/local-values.yaml"),
        "--set", "crds.enabled=false",
        "--set", f"trainer.storage.endpoint={env['AWS_ENDPOINT_URL']}",
        "--set", f"operator.watchNamespaces={{{NAMESPACE}}}",
        "--set", f"operator.metricsPort={metrics}", "--set", f"metrics.service.port={metrics}",
        "--set", f"operator.healthPort={health}", "--set", f"apiServer.port={api}",
        "--set", f"serving.ports={serving}-{serving + 3}",
        "--set-json", f"serving.command={json.dumps(demo.vllm_command())}",
        "--wait", "--timeout", "3m",
    )  # fmt: skip
    settings = demo.openai_key(NAMESPACE, f"{RELEASE}-user", api, path=None)
    yield OpenAI(base_url=settings["OPENAI_BASE_URL"], api_key=settings["OPENAI_API_KEY"])
    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", check=False)
    cluster.kubectl("delete", "namespace", NAMESPACE, RELEASE_NAMESPACE, "--wait=false",
                    check=False)  # fmt: skip
    demo.assets.remove(f"{OUT}/", env)


def quickstart(name: str, learning_rate: float) -> Obj:
    manifest: Obj = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    spec = manifest["spec"]
    manifest["metadata"] = {"name": name}
    spec["output"] = {"uri": f"{OUT}/{name}"}
    spec["hyperparameters"].update({"maxSteps": 40, "learningRate": learning_rate})
    spec["evaluation"] = {"enabled": False}
    spec["serving"] = {"enabled": True}
    return manifest


def serving_of(cluster: Cluster, name: str) -> Obj:
    status = cluster.get("ftj", name, NAMESPACE).get("status") or {}
    return dict(status.get("serving") or {})


def download(cluster: Cluster, uri: str, dest: Path) -> Path:
    """The files under an S3 prefix (not checkpoints, not the job's control files)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/"
    s3 = demo.assets.s3_client(cluster.s3_env)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel.split("/")[0] in ("checkpoints", ".kubetune"):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(dest / rel))
    return dest


def greedy_reference(cluster: Cluster, name: str, tmp: Path) -> str:
    """The adapter's greedy answer with transformers + peft in float32, from what it published."""
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    base_dir = download(cluster, f"{demo.PREFIX}/model/", tmp / "base")
    adapter_dir = download(cluster, f"{OUT}/{name}/", tmp / name)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def ask(client: OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    return reply.choices[0].message.content or ""


def test_two_adapters_are_served_by_one_server_each_as_itself(
    cluster: Cluster, client: OpenAI, tmp_path: Path
) -> None:
    for name, learning_rate in JOBS.items():
        cluster.apply(quickstart(name, learning_rate), NAMESPACE)

    def all_served() -> dict[str, Obj] | None:
        found = {name: serving_of(cluster, name) for name in JOBS}
        failed = [s for s in found.values() if s.get("phase") == "Failed"]
        assert not failed, failed
        return found if all(s.get("phase") == "Serving" for s in found.values()) else None

    served = wait_until(all_served, 900, "both jobs to be trained and served", interval=2)
    alpha, beta = served["alpha"], served["beta"]
    # Ready means usable: complete and served (the operator re-reads Ready when serving changes).
    for name in JOBS:

        def ready(name: str = name) -> bool:
            status = cluster.get("ftj", name, NAMESPACE)["status"]
            conditions = {c["type"]: c for c in status["conditions"]}
            assert conditions["Complete"]["status"] == "True" and status["phase"] == "Succeeded"
            return conditions["Ready"]["status"] == "True" and conditions["Ready"]["reason"] == (
                "Serving"
            )

        wait_until(ready, 60, f"{name} to be Ready (served)", interval=1)
    assert alpha["server"] == beta["server"] and alpha["endpoint"] == beta["endpoint"]
    assert (alpha["model"], beta["model"]) == ("alpha", "beta")
    deployment = cluster.get("deployment", alpha["server"], NAMESPACE)
    assert sorted(o["name"] for o in deployment["metadata"]["ownerReferences"]) == ["alpha", "beta"]

    ids = {m.id.rsplit(":", 1)[-1]: m.id for m in client.models.list() if m.id.startswith("ft:")}
    answers = {name: ask(client, ids[name]) for name in JOBS}
    for name in JOBS:  # each adapter answers as itself: as transformers + peft do with it
        assert answers[name] == greedy_reference(cluster, name, tmp_path), name
    base = ask(client, "tiny-llama")
    assert base not in answers.values()

    # Deleting a job unloads its adapter; its model is then gone from the API.
    cluster.kubectl("delete", "ftj", "alpha", "-n", NAMESPACE)

    def unloaded() -> bool:
        state = cluster.get("configmap", f"{alpha['server']}-state", NAMESPACE)
        return "alpha" not in json.loads(state["data"]["state.json"])["adapters"]

    wait_until(unloaded, 120, "the alpha adapter to be unloaded", interval=1)
    with pytest.raises(NotFoundError) as gone:
        ask(client, ids["alpha"])
    assert gone.value.status_code == 404 and "alpha" in gone.value.message
    assert ask(client, ids["beta"]) == answers["beta"]
    assert serving_of(cluster, "beta")["phase"] == "Serving"
