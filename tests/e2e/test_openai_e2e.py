"""End to end through the OpenAI-compatible API: the chart's API server, the official client,
the real trainer.

The chart is installed as its own release (kubetune-openai in kubetune-openai-system, CRDs
left to the repository's, operator watching kubetune-openai-e2e only), so it runs beside the
e2e module's and the demo's releases. Its API server pod runs on the process node with no
Kubernetes credential; the caller is a ServiceAccount bound to the release's user ClusterRole.
The issue's script (examples/openai/finetune.py) uploads the quickstart's chat data and creates
the job; the test then follows it with the client while the tiny model trains.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from localenv.testing import Cluster, free_ports

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import demo  # noqa: E402
from operator_harness import install_crds  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
RELEASE = "kubetune-openai"
RELEASE_NAMESPACE = "kubetune-openai-system"
NAMESPACE = "kubetune-openai-e2e"
PREFIX = "openai-e2e"


def helm(cluster: Cluster, *args: str, check: bool = True) -> str:
    return demo.run(str(cluster.bin / "helm"), *args, "--kubeconfig", str(cluster.kubeconfig),
                    check=check)  # fmt: skip


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Iterator[int]:
    """The chart with its API server; yields the API server's port."""
    env = cluster.s3_env
    demo.upload_assets(env)
    demo.assets.remove(f"s3://kubetune/{PREFIX}/", env)
    install_crds(cluster)
    cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true",
                    timeout=180)  # fmt: skip
    demo.create_secret(env, NAMESPACE)
    demo.create_secret(env, RELEASE_NAMESPACE)  # the API server's own S3 keys
    metrics, health, api = free_ports(3)
    helm(
        cluster, "upgrade", "--install", RELEASE, str(ROOT / "charts/kubetune"),
        "--namespace", RELEASE_NAMESPACE,
        "--values", str(ROOT / "examples/quickstart/local-values.yaml"),
        "--set", "crds.enabled=false",
        "--set", f"trainer.storage.endpoint={env['AWS_ENDPOINT_URL']}",
        "--set", f"operator.watchNamespaces={{{NAMESPACE}}}",
        "--set", f"operator.metricsPort={metrics}", "--set", f"metrics.service.port={metrics}",
        "--set", f"operator.healthPort={health}", "--set", f"apiServer.port={api}",
        "--set", f"apiServer.storage.prefix={PREFIX}",
        # Its jobs are not served here (tests/e2e/test_serving_e2e.py serves): no vLLM server.
        "--set", "apiServer.models[0].spec.serving.enabled=false",
        "--wait", "--timeout", "3m",
    )  # fmt: skip
    yield api
    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", check=False)
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def test_the_api_server_runs_from_the_chart_without_a_kubernetes_credential(
    cluster: Cluster, installed: int
) -> None:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", RELEASE_NAMESPACE, "-l",
                                      "app.kubernetes.io/component=api", "-o", "json").stdout)  # fmt: skip
    (pod,) = [p for p in pods["items"] if p["status"]["phase"] == "Running"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-api"
    assert not [v for v in pod["spec"]["volumes"] if "projected" in v]  # no token mounted


def test_the_official_client_fine_tunes_end_to_end(
    cluster: Cluster, installed: int, tmp_path: Path
) -> None:
    settings = demo.openai_key(NAMESPACE, f"{RELEASE}-user", installed, path=None)
    job_id = demo.run_openai_quickstart(settings, tmp_path)
    client = OpenAI(base_url=settings["OPENAI_BASE_URL"], api_key=settings["OPENAI_API_KEY"])
    assert [m.id for m in client.models.list()] == ["tiny-llama"]

    # Events while it runs: the metrics history grows as the trainer reports.
    seen_running: list[int] = []
    deadline = time.monotonic() + 600
    job: Any = None
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        if job.status == "running":
            steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job_id, limit=100)
                     if e.type == "metrics" and "train_loss" in (e.data or {})]  # fmt: skip
            if steps:
                seen_running.append(steps[-1])
        time.sleep(1)
    assert job is not None and job.status == "succeeded", job and job.error
    assert seen_running, "no metrics event was listed while the job ran"

    assert job.fine_tuned_model == f"ft:tiny-llama:{NAMESPACE}::{job_id}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 3
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=50))  # every page
    metrics = [e for e in events if e.type == "metrics"]
    train = [e.data for e in metrics if "train_loss" in e.data]
    steps = [d["step"] for d in train]
    assert len(steps) > 10 and steps == sorted(steps) and steps[-1] == train[-1]["total_steps"]
    assert seen_running[0] < steps[-1]  # listed mid-training, not only at the end
    assert all(d["train_loss"] > 0 and "learning_rate" in d for d in train)
    assert train[-1]["train_loss"] < train[0]["train_loss"]  # it learned
    (evaluation,) = [e.data for e in metrics if "eval_loss" in e.data]
    assert evaluation["eval_loss"] < evaluation["base_eval_loss"]
    assert events[0].message == f"Created fine-tuning job: {job_id}"
    assert events[-1].message == f"New fine-tuned model created: {job.fine_tuned_model}"
    assert [e.created_at for e in events] == sorted(e.created_at for e in events)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id).data
    assert checkpoints and checkpoints[0].step_number == steps[-1]  # the final checkpoint
    assert checkpoints[0].metrics.full_valid_loss == pytest.approx(evaluation["eval_loss"])
    (results,) = job.result_files
    rows = client.files.content(results).text.splitlines()
    assert rows[0].startswith("step,epoch,train_loss") and len(rows) == len(train) + 1
    assert job.fine_tuned_model in [m.id for m in client.models.list()]

    # The FineTuneJob behind it, and its output in the API's prefix of the bucket.
    ftj = cluster.get("ftj", job_id, NAMESPACE)
    output = f"s3://kubetune/{PREFIX}/{NAMESPACE}/jobs/{job_id}/"
    assert ftj["spec"]["output"]["uri"] == output
    assert ftj["status"]["phase"] == "Succeeded"
    listing = demo.assets.s3_client(cluster.s3_env).list_objects_v2(
        Bucket="kubetune", Prefix=output.removeprefix("s3://kubetune/")
    )
    keys = {obj["Key"].rsplit("/", 1)[-1] for obj in listing.get("Contents", [])}
    assert {"adapter_model.safetensors", "SHA256SUMS", "metrics.jsonl"} <= keys


def test_uninstall_removes_the_api_server(cluster: Cluster, installed: int) -> None:
    # Runs last in this module.
    helm(cluster, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait")
    leftovers = cluster.kubectl(
        "get", "deploy,sa,svc,cm,clusterrole,clusterrolebinding,role,rolebinding", "-A", "-l",
        f"app.kubernetes.io/instance={RELEASE}", "-o", "name",
    ).stdout.split()  # fmt: skip
    assert leftovers == []
