"""End to end, as a platform team runs it: helm install, kubectl apply, kubectl wait.

The chart's operator Deployment runs on the process node with the chart's ServiceAccount token
(so the chart's RBAC is what is tested), and the real trainer trains a tiny model from the local
S3 server. These are the steps of `make demo` (examples/quickstart/demo.py), asserted.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localenv.kueue import KUEUE_NAMESPACE_LABEL, Kueue, running_kueue
from localenv.testing import Cluster, free_ports, wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
import demo  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
NAMESPACE = "kubetune-e2e"
RELEASE_NAMESPACE = demo.OPERATOR_NAMESPACE


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    """A real Kueue, installed before kubetune as on a platform team's cluster."""
    with running_kueue(cluster, tmp_path_factory.mktemp("kueue")) as running:
        yield running


@pytest.fixture(scope="module")
def installed(cluster: Cluster, kueue: Kueue) -> Iterator[Cluster]:
    """Assets in S3, the Secret, and the chart installed (then uninstalled at the end)."""
    env = cluster.s3_env
    demo.upload_assets(env)
    # Jobs resume from checkpoints under their output.uri: start from nothing left by a re-run.
    demo.assets.remove("s3://kubetune/e2e/", env)
    cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true",
                    timeout=180)  # fmt: skip
    demo.create_secret(env, NAMESPACE)
    cluster.kubectl("label", "namespace", NAMESPACE, f"{KUEUE_NAMESPACE_LABEL}=enabled")
    # Pods share the host network on the process node: free ports keep this operator clear of
    # anything else listening on the machine (another checkout's cluster, a demo).
    metrics, health, api = free_ports(3)
    demo.install_chart(env, f"operator.metricsPort={metrics}", f"operator.healthPort={health}",
                       f"metrics.service.port={metrics}", f"apiServer.port={api}",
                       f"operator.watchNamespaces={{{NAMESPACE}}}")  # fmt: skip
    yield cluster
    # Normally already done by the last test; this is the clean-up when a test failed.
    demo.run(str(cluster.bin / "helm"), "uninstall", "kubetune", "--namespace", RELEASE_NAMESPACE,
             "--kubeconfig", str(cluster.kubeconfig), "--wait", check=False)  # fmt: skip
    cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def s3_client(cluster: Cluster) -> Any:
    return demo.assets.s3_client(cluster.s3_env)


def apply_example(cluster: Cluster, example: str, **overrides: Any) -> dict[str, Any]:
    import yaml  # noqa: PLC0415

    manifest = yaml.safe_load((ROOT / "examples" / example).read_text())
    for path, value in overrides.items():
        node = manifest
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest))
    return dict(manifest)


def watch_steps(cluster: Cluster, name: str) -> tuple[Callable[[], None], list[int]]:
    """Record every status.progress.step the API server publishes while the job runs.

    A watch (not polling) sees each status update however fast the trainer is, so the
    assertion does not depend on the machine's speed. Call the returned function to stop it
    (it returns once everything the watch printed has been read).
    """
    watch = subprocess.Popen(
        [str(cluster.bin / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "get", "ftj",
         name, "-n", NAMESPACE, "--watch", "-o", "jsonpath={.status.progress.step}{\"\\n\"}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    seen: list[int] = []

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            if line.strip() and (not seen or seen[-1] != int(line)):
                seen.append(int(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def stop() -> None:
        watch.terminate()
        watch.wait(10)
        reader.join(10)

    return stop, seen


def wait_condition(cluster: Cluster, name: str, condition: str, timeout: int) -> None:
    cluster.kubectl(
        "wait", f"--for=condition={condition}", f"finetunejob/{name}", "-n", NAMESPACE,
        f"--timeout={timeout}s", timeout=timeout + 30,
    )  # fmt: skip


def verify_outputs(cluster: Cluster, output_uri: str) -> dict[str, str]:
    """SHA256SUMS lists every published file and every checksum matches the bytes in S3."""
    bucket, _, prefix = output_uri.removeprefix("s3://").partition("/")
    s3 = s3_client(cluster)
    manifest = s3.get_object(Bucket=bucket, Key=prefix + "SHA256SUMS")["Body"].read().decode()
    sums = dict(reversed(line.split(maxsplit=1)) for line in manifest.splitlines())
    assert sums, "empty SHA256SUMS"
    for path, digest in sums.items():
        body = s3.get_object(Bucket=bucket, Key=prefix + path.lstrip("*"))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, path
    return sums


def events(cluster: Cluster, name: str) -> list[str]:
    """The reasons of the FineTuneJob's Events, and JobCreated for the one that names its Job
    (the first phase's Event says it)."""
    out = cluster.kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                          f"involvedObject.name={name}", "-o", "json").stdout  # fmt: skip
    posted = json.loads(out)["items"]
    created = [
        "JobCreated" for e in posted if f"Created training Job {name}-train." in e["message"]
    ]
    return [e["reason"] for e in posted] + created


def test_operator_runs_from_the_chart_with_its_service_account(installed: Cluster) -> None:
    pods = json.loads(
        installed.kubectl("get", "pods", "-n", RELEASE_NAMESPACE, "-l",
                          "app.kubernetes.io/component=operator", "-o", "json").stdout
    )  # fmt: skip
    # Not one of a replaced release's pods still shutting down (a re-run after `make demo`).
    (pod,) = [p for p in pods["items"] if p["status"]["phase"] == "Running"
              and not p["metadata"].get("deletionTimestamp")]  # fmt: skip
    assert pod["spec"]["serviceAccountName"] == "kubetune"
    assert pod["spec"]["nodeName"] == "kubetune-node-0"


def test_lora_on_chat_data_succeeds_with_metrics_progress_and_outputs(installed: Cluster) -> None:
    manifest = apply_example(installed, "quickstart.yaml", **{
        "metadata.name": "e2e-lora-chat", "spec.output.uri": "s3://kubetune/e2e/lora-chat/",
    })  # fmt: skip
    stop_watch, steps = watch_steps(installed, "e2e-lora-chat")
    try:
        wait_condition(installed, "e2e-lora-chat", "Complete", 600)
    finally:
        stop_watch()
    status = installed.get("ftj", "e2e-lora-chat", NAMESPACE)["status"]
    assert status["phase"] == "Succeeded"
    assert status["observedGeneration"] == 1
    ready = {c["type"]: c["status"] for c in status["conditions"]}
    assert ready["Ready"] == "True"
    metrics = status["metrics"]
    assert metrics["evalLoss"] < metrics["baseEvalLoss"]  # fine-tuning helped
    assert metrics["trainLoss"] > 0 and metrics["tokensPerSecond"] > 0
    assert status["progress"]["step"] == status["progress"]["totalSteps"]
    # Live progress: the start (0/N) is published before the end, and never goes backwards.
    assert steps[0] < steps[-1] == status["progress"]["totalSteps"], steps
    assert steps == sorted(steps), steps
    assert status["parameters"]["trainable"] < status["parameters"]["total"]
    sums = verify_outputs(installed, manifest["spec"]["output"]["uri"])
    assert {"adapter_model.safetensors", "adapter_config.json", "eval_report.md"} <= set(sums)
    assert {"JobCreated", "Succeeded"} <= set(events(installed, "e2e-lora-chat"))


def test_full_fine_tuning_on_instruction_data_succeeds(installed: Cluster) -> None:
    manifest = apply_example(installed, "full-instruction.yaml", **{
        "metadata.name": "e2e-full", "spec.output.uri": "s3://kubetune/e2e/full-instruction/",
    })  # fmt: skip
    wait_condition(installed, "e2e-full", "Complete", 600)
    status = installed.get("ftj", "e2e-full", NAMESPACE)["status"]
    assert status["parameters"]["trainable"] == status["parameters"]["total"]
    sums = verify_outputs(installed, manifest["spec"]["output"]["uri"])
    assert "model.safetensors" in sums


def test_bad_dataset_fails_with_the_line_number_before_training(installed: Cluster) -> None:
    s3 = s3_client(installed)
    good = json.dumps({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"}]})  # fmt: skip
    bad = json.dumps({"messages": [{"role": "bot", "content": "hi"}]})
    s3.put_object(Bucket="kubetune", Key="e2e/bad/train.jsonl",
                  Body=("\n".join([good, good, bad, good]) + "\n").encode())  # fmt: skip
    apply_example(installed, "quickstart.yaml", **{
        "metadata.name": "e2e-bad-data",
        "spec.dataset.trainUri": "s3://kubetune/e2e/bad/train.jsonl",
        "spec.output.uri": "s3://kubetune/e2e/bad/output/",
    })  # fmt: skip
    wait_condition(installed, "e2e-bad-data", "Failed", 300)
    status = installed.get("ftj", "e2e-bad-data", NAMESPACE)["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == "DataError"
    assert "line 3" in status["message"]
    assert status.get("stage") in (None, "Fetching", "Preparing")  # never reached Training
    assert "progress" not in status or not status["progress"].get("step")


def test_deleting_a_running_job_leaves_no_pods(installed: Cluster) -> None:
    apply_example(installed, "quickstart.yaml", **{
        "metadata.name": "e2e-delete", "spec.output.uri": "s3://kubetune/e2e/delete/",
        "spec.hyperparameters.epochs": 50,
    })  # fmt: skip

    def pods() -> list[dict[str, Any]]:
        out = installed.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                "kubetune.dev/finetunejob=e2e-delete", "-o", "json").stdout  # fmt: skip
        return list(json.loads(out)["items"])

    wait_until(lambda: any(p["status"].get("phase") == "Running" for p in pods()), 120,
               "the training pod to run")  # fmt: skip
    installed.kubectl("delete", "ftj", "e2e-delete", "-n", NAMESPACE, "--wait=true", timeout=120)
    wait_until(lambda: not pods(), 120, "the training pods to go")
    jobs = installed.kubectl("get", "jobs", "-n", NAMESPACE, "-o", "name").stdout
    assert "e2e-delete" not in jobs


def test_two_gpu_job_trains_data_parallel_with_one_process_per_gpu(installed: Cluster) -> None:
    # The process node has no GPUs, so the two torchrun workers run DDP on CPU (gloo): the same
    # launch path a 2-GPU node uses with NCCL.
    apply_example(installed, "quickstart.yaml", **{
        "metadata.name": "e2e-ddp", "spec.output.uri": "s3://kubetune/e2e/ddp/",
        "spec.resources.gpus": 2, "spec.hyperparameters.epochs": 1,
        "spec.evaluation.enabled": False,
    })  # fmt: skip
    wait_condition(installed, "e2e-ddp", "Complete", 600)
    logs = installed.kubectl("logs", "-n", NAMESPACE, "job/e2e-ddp-train").stdout
    # Both processes plan (the line names them both), but only rank 0 logs progress.
    assert logs.count("x 2 process(es)") == 1, logs[-3000:]
    status = installed.get("ftj", "e2e-ddp", NAMESPACE)["status"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"]


def test_queued_job_waits_for_kueue_quota_with_the_reason_then_trains(installed: Cluster) -> None:
    import yaml  # noqa: PLC0415

    cluster = installed
    flavor, queue, local_queue = yaml.safe_load_all(
        (ROOT / "examples/kueue-queues.yaml").read_text()
    )

    def with_cpus(cpus: str) -> dict[str, Any]:
        # The example's ClusterQueue, limited to this test's namespace and to `cpus` CPUs.
        limited = json.loads(json.dumps(queue))
        limited["spec"]["namespaceSelector"] = {
            "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
        }
        for resource in limited["spec"]["resourceGroups"][0]["flavors"][0]["resources"]:
            if resource["name"] == "cpu":
                resource["nominalQuota"] = cpus
        return limited

    setup = {"apiVersion": "v1", "kind": "List", "items": [flavor, with_cpus("0"), local_queue]}
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(setup))
    try:
        apply_example(cluster, "quickstart.yaml", **{
            "metadata.name": "e2e-queued", "spec.output.uri": "s3://kubetune/e2e/queued/",
            "spec.queueName": local_queue["metadata"]["name"],
        })  # fmt: skip

        def waiting_with_reason() -> dict[str, Any] | None:
            status = cluster.get("ftj", "e2e-queued", NAMESPACE).get("status") or {}
            quoted = "cpu" in status.get("message", "") and status.get("phase") == "Queued"
            return status if quoted else None

        status = wait_until(waiting_with_reason, 60, "Kueue's reason in the Queued status")
        assert status["reason"] == "WaitingForAdmission"
        # The platform team makes room: Kueue admits the job, which trains as usual.
        cluster.kubectl("apply", "-f", "-", input=json.dumps(with_cpus("2")))
        wait_condition(cluster, "e2e-queued", "Complete", 600)
        reasons = set(events(cluster, "e2e-queued"))
        assert {"JobCreated", "WaitingForAdmission", "Succeeded"} <= reasons
        out = cluster.kubectl("get", "workloads.kueue.x-k8s.io", "-n", NAMESPACE, "-o", "json")
        finished = [
            c["status"]
            for w in json.loads(out.stdout)["items"]
            for c in w["status"]["conditions"]
            if c["type"] == "Finished"
        ]
        assert finished == ["True"]
    finally:
        # Kueue keeps finalizers on its objects while they are in use: clean up while it runs.
        for kind, name in (
            ("ftj", "e2e-queued"),
            ("workloads.kueue.x-k8s.io", "--all"),
            ("localqueue", local_queue["metadata"]["name"]),
            ("clusterqueue", queue["metadata"]["name"]),
            ("resourceflavor", flavor["metadata"]["name"]),
        ):
            cluster.kubectl("delete", kind, name, "-n", NAMESPACE, "--timeout=60s", check=False)


def watch_field(cluster: Cluster, name: str, jsonpath: str) -> tuple[Callable[[], None], list[str]]:
    """Record every distinct non-empty value of a status field while the job runs (a watch)."""
    watch = subprocess.Popen(
        [str(cluster.bin / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "get", "ftj",
         name, "-n", NAMESPACE, "--watch", "-o", f"jsonpath={{{jsonpath}}}{{\"\\n\"}}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    seen: list[str] = []

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            if line.strip() and (not seen or seen[-1] != line.strip()):
                seen.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def stop() -> None:
        watch.terminate()
        watch.wait(10)
        reader.join(10)

    return stop, seen


def test_qlora_sft_trains_on_the_cpu_cluster_and_publishes_only_the_adapter(
    installed: Cluster,
) -> None:
    manifest = apply_example(installed, "qlora.yaml", **{
        "metadata.name": "e2e-qlora", "spec.output.uri": "s3://kubetune/e2e/qlora/",
    })  # fmt: skip
    wait_condition(installed, "e2e-qlora", "Complete", 600)
    status = installed.get("ftj", "e2e-qlora", NAMESPACE)["status"]
    assert status["metrics"]["evalLoss"] < status["metrics"]["baseEvalLoss"]
    assert "qlora" in status["estimate"]["basis"] and "4-bit weights" in status["estimate"]["basis"]
    assert status["output"]["adapterUri"] == "s3://kubetune/e2e/qlora"
    sums = verify_outputs(installed, manifest["spec"]["output"]["uri"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(sums)
    assert "model.safetensors" not in sums  # the 4-bit base is never published


def test_dpo_job_reports_rewards_live_and_beats_the_base_models_preferences(
    installed: Cluster,
) -> None:
    manifest = apply_example(installed, "dpo.yaml", **{
        "metadata.name": "e2e-dpo", "spec.output.uri": "s3://kubetune/e2e/dpo/",
    })  # fmt: skip
    fields = ".status.stage},{.status.metrics.rewardMargin},{.status.metrics.preferenceAccuracy"
    stop_watch, seen = watch_field(installed, "e2e-dpo", fields)
    try:
        wait_condition(installed, "e2e-dpo", "Complete", 600)
    finally:
        stop_watch()
    status = installed.get("ftj", "e2e-dpo", NAMESPACE)["status"]
    metrics = status["metrics"]
    # Live: the training rewards were in the status before the final evaluation's results (the
    # reporter sends every 10 s and on each stage change, so a fast run may show them once).
    live = [line.split(",") for line in seen]
    assert any(margin and not accuracy for _, margin, accuracy in live), seen
    assert {"rewardChosen", "rewardRejected", "rewardMargin", "rewardAccuracy"} <= set(metrics)
    # At the end, on the held-out pairs: the fine-tuned adapter prefers the chosen answers more
    # often than the base model, and its DPO loss is below the reference's ln 2.
    assert metrics["preferenceAccuracy"] > metrics["basePreferenceAccuracy"], metrics
    assert metrics["evalLoss"] < metrics["baseEvalLoss"] == pytest.approx(0.6931, abs=1e-3)
    assert metrics["evalRewardAccuracy"] > 0.5 and metrics["evalRewardMargin"] > 0
    assert "perplexity" not in metrics  # exp(DPO loss) is no perplexity
    assert "dpo" in status["estimate"]["basis"]
    sums = verify_outputs(installed, manifest["spec"]["output"]["uri"])
    assert {"adapter_model.safetensors", "adapter_config.json", "eval_report.md"} <= set(sums)
    s3 = s3_client(installed)
    log = s3.get_object(Bucket="kubetune", Key="e2e/dpo/.kubetune/metrics.jsonl")["Body"].read()
    records = [json.loads(line) for line in log.decode().splitlines()]
    assert "reward_accuracy" in records[0] and records[-1]["type"] == "eval"
    assert records[-1]["preference_accuracy"] == metrics["preferenceAccuracy"]


def test_helm_uninstall_leaves_the_cluster_clean_but_keeps_crds(installed: Cluster) -> None:
    # Runs last in this module (pytest keeps file order).
    cluster = installed
    demo.run(str(cluster.bin / "helm"), "uninstall", "kubetune", "--namespace", RELEASE_NAMESPACE,
             "--kubeconfig", str(cluster.kubeconfig), "--wait")  # fmt: skip
    leftovers = cluster.kubectl(
        "get", "deploy,sa,svc,clusterrole,clusterrolebinding", "-A", "-l",
        "app.kubernetes.io/instance=kubetune", "-o", "name",
    ).stdout.split()  # fmt: skip
    assert leftovers == []
    crds = cluster.kubectl("get", "crd", "-o", "name").stdout
    assert "finetunejobs.kubetune.dev" in crds
