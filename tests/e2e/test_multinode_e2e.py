"""Multi-node training as a user runs it: the chart installed, FineTuneJobs with resources.nodes
applied with kubectl, the real trainer on the process node (each pod's processes on gloo, the
pods finding each other through the headless Service's names), the local S3 server.

1. 2 pods x 2 processes train to Succeeded, the status says so, and the loss curve is a
   single process's with the same global batch; the same gang fine-tunes all weights with
   FSDP (sharded checkpoints from both pods, whole weights published);
2. a trainer process killed in one pod mid-training restarts the whole gang, which resumes from
   the last checkpoint at its step; only that pod uses up a retry.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.chart_release import chart_release

from localenv.testing import Cluster, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
import demo  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
NAMESPACE = "kubetune-multinode"
RELEASE = "kubetune-multinode"
RELEASE_NAMESPACE = "kubetune-multinode-system"
RUN = uuid.uuid4().hex[:8]
OUT = f"s3://kubetune/multinode-e2e/{RUN}"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Iterator[Cluster]:
    """The chart watching NAMESPACE, with a rendezvous port range of its own."""
    low = free_port()
    with chart_release(cluster, release=RELEASE, namespace=NAMESPACE,
                       release_namespace=RELEASE_NAMESPACE, output_prefix=OUT,
                       values=[f"trainer.rendezvousPorts={low}-{low}"]) as installed:  # fmt: skip
        yield installed


def quickstart(name: str, **spec: Any) -> Obj:
    """examples/quickstart.yaml without evaluation, its own output, a small CPU request (the
    process node has 2 CPUs to schedule, and a gang's pods must all fit at once)."""
    manifest: Obj = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    manifest["metadata"] = {"name": name}
    manifest["spec"]["resources"].update(cpu="100m", memory="3Gi")
    manifest["spec"]["output"] = {"uri": f"{OUT}/{name}"}
    manifest["spec"]["evaluation"] = {"enabled": False}
    manifest["spec"]["dataset"].pop("validationUri")
    for key, value in spec.items():
        current = manifest["spec"].get(key)
        manifest["spec"][key] = {**current, **value} if isinstance(current, dict) else value
    return manifest


def apply(cluster: Cluster, manifest: Obj) -> None:
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest))


def status_of(cluster: Cluster, name: str) -> Obj:
    return cluster.get("ftj", name, NAMESPACE).get("status") or {}


def wait_phase(cluster: Cluster, name: str, *phases: str, timeout: float = 600) -> Obj:
    def done() -> Obj | None:
        status = status_of(cluster, name)
        if status.get("phase") in ("Failed", "Cancelled") and status["phase"] not in phases:
            raise AssertionError(f"{name}: {status}")
        return status if status.get("phase") in phases else None

    return wait_until(done, timeout, f"{name} to reach {phases}", interval=2)


def losses(cluster: Cluster, name: str) -> dict[int, float]:
    """step -> training loss, from the run's training log (.kubetune/metrics.jsonl)."""
    bucket, _, prefix = f"{OUT}/{name}".removeprefix("s3://").partition("/")
    s3 = demo.assets.s3_client(cluster.s3_env)
    body = s3.get_object(Bucket=bucket, Key=f"{prefix}/.kubetune/metrics.jsonl")["Body"].read()
    records = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    return {r["step"]: r["train_loss"] for r in records if r.get("type") == "train"}


def test_two_pods_of_two_processes_train_like_one_process_with_the_same_global_batch(
    installed: Cluster,
) -> None:
    """The global batch is 4 examples in both runs: 1 per process on 4 processes, 4 on one.

    Tolerance: the same examples make each step in both runs and both start from the same
    weights, so only float summation order differs (the gang's all-reduce against one
    process's batch sum): step 1 agreed to 8e-8 and step 8 to 4.4e-4 (relative) when measured,
    so 1e-5 for the first step and 0.5% for the rest. Another batch of examples (a wrong data
    split: every process on the same examples, or some never seen) moves a step's loss by more
    than that, and missing gradient averaging changes the curve from step 2 on.
    """
    cluster = installed
    steps = 8
    hp = {"maxSteps": steps, "batchSize": 1, "epochs": 1}
    apply(cluster, quickstart("gang", hyperparameters=hp,
                              resources={"nodes": 2, "processesPerNode": 2}))  # fmt: skip
    apply(cluster, quickstart("single", hyperparameters={**hp, "batchSize": 4}))
    gang = wait_phase(cluster, "gang", "Succeeded")
    single = wait_phase(cluster, "single", "Succeeded")
    reason = gang["distributed"].pop("reason")
    assert gang["distributed"] == {"nodes": 2, "processesPerNode": 2, "worldSize": 4,
                                   "strategy": "ddp"}  # fmt: skip
    assert reason.startswith("auto: "), reason  # no memory limit known on this CPU node
    assert single["distributed"]["worldSize"] == 1
    assert gang["progress"]["step"] == single["progress"]["step"] == steps
    job = cluster.get("job", gang["jobName"], NAMESPACE)
    assert job["spec"]["completionMode"] == "Indexed" and job["status"]["succeeded"] == 2
    service = cluster.get("service", "gang-workers", NAMESPACE)
    assert service["spec"]["clusterIP"] == "None"
    ours, theirs = losses(cluster, "gang"), losses(cluster, "single")
    assert sorted(ours) == sorted(theirs)
    first = min(ours)
    assert abs(ours[first] - theirs[first]) <= 1e-5 * theirs[first], (ours, theirs)
    for step in ours:
        assert abs(ours[step] - theirs[step]) <= 5e-3 * theirs[step], (step, ours, theirs)


def test_two_pods_of_two_processes_fine_tune_all_weights_with_fsdp(installed: Cluster) -> None:
    """spec.distributed.strategy fsdp on 2 pods x 2 processes, full fine-tuning: the gang
    shards the model over its 4 processes (gloo across pods), writes sharded checkpoints that
    every pod's processes contribute to, and publishes whole safetensors weights from rank 0."""
    cluster = installed
    apply(cluster, quickstart(
        "fsdp",
        method="full",
        hyperparameters={"maxSteps": 6, "batchSize": 1, "epochs": 1, "learningRate": 1e-4},
        checkpointing={"intervalSteps": 3},
        distributed={"strategy": "fsdp"},
        resources={"nodes": 2, "processesPerNode": 2},
    ))  # fmt: skip
    done = wait_phase(cluster, "fsdp", "Succeeded")
    assert done["distributed"] == {"nodes": 2, "processesPerNode": 2, "worldSize": 4,
                                   "strategy": "fsdp",
                                   "reason": "spec.distributed.strategy is fsdp"}  # fmt: skip
    assert "fsdp over 4 processes" in done["estimate"]["basis"], done["estimate"]
    assert done["progress"]["step"] == 6
    files = {f["path"] for f in done["output"]["files"]}
    assert {"model.safetensors", "config.json"} <= files, files
    bucket, _, prefix = f"{OUT}/fsdp".removeprefix("s3://").partition("/")
    s3 = demo.assets.s3_client(cluster.s3_env)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/checkpoints/step-000000003/")
    names = {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}
    # One shard per process, pods 0 and 1 (ranks 2 and 3 run in pod 1), and the marker.
    assert {f"__{rank}_0.distcp" for rank in range(4)} | {"_COMPLETE"} <= names, names


def trainer_pids(pod_hostname: str) -> list[int]:
    """The trainer worker processes of one pod on the process node (its HOSTNAME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"HOSTNAME={pod_hostname}".encode() in environ and b"LOCAL_RANK=0" in environ \
                and b"kubetune-trainer" in cmdline:  # fmt: skip
            pids.append(int(entry.name))
    return pids


def test_a_killed_process_restarts_the_gang_from_the_last_checkpoint(installed: Cluster) -> None:
    cluster = installed
    apply(cluster, quickstart(
        "killed",
        hyperparameters={"maxSteps": 40, "batchSize": 2, "epochs": 3},
        checkpointing={"intervalSteps": 5},
        resources={"nodes": 2},
        maxRetries=2,
    ))  # fmt: skip

    def past_a_checkpoint() -> Obj | None:
        status = status_of(cluster, "killed")
        return status if (status.get("progress") or {}).get("step", 0) >= 12 else None

    wait_until(past_a_checkpoint, 600, "killed to pass step 12", interval=1)
    pids = trainer_pids("killed-train-1")
    assert pids, "no trainer process of pod index 1"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # a crash (the kernel's OOM killer, a segfault)

    def retrying() -> Obj | None:
        status = status_of(cluster, "killed")
        return status if status.get("reason") == "Retrying" else None

    retry = wait_until(retrying, 120, "killed to report the restart", interval=0.5)
    assert "the 2 pods restart together" in retry["message"]
    assert "killed-train-1-" in retry["message"]  # the pod that failed, not its peer
    done = wait_phase(cluster, "killed", "Succeeded")
    assert done["progress"]["step"] == 40
    job = cluster.get("job", done["jobName"], NAMESPACE)
    # One retry used: the killed pod; its peer stopped with PEER_LOST, which is ignored.
    assert job["status"].get("failed") == 1, job["status"]
    pods = json.loads(cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                      "job-name=killed-train", "-o", "json").stdout)["items"]  # fmt: skip
    codes = sorted(
        (p["status"]["containerStatuses"][0]["state"].get("terminated") or {}).get("exitCode", -1)
        for p in pods
    )
    assert 76 in codes, codes  # the peer
    resumed = [
        cluster.kubectl("logs", "-n", NAMESPACE, p["metadata"]["name"]).stdout
        for p in pods
        if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
    ]
    steps = [
        int(m)
        for log in resumed
        for m in re.findall(r"resuming from the checkpoint of step (\d+)/", log)
    ]
    assert steps and steps[0] % 5 == 0 and steps[0] >= 10, resumed


def test_a_deleted_pod_stops_the_gang_at_one_checkpointed_step(installed: Cluster) -> None:
    """SIGTERM reaches one pod only: every process agrees at the next step boundary, the gang
    checkpoints that one step and stops (the deleted pod 143, its peer 76, ignored), and the
    new gang resumes exactly there. No periodic checkpoints: the resumed step can only come
    from the SIGTERM."""
    cluster = installed
    apply(cluster, quickstart(
        "deleted",
        hyperparameters={"maxSteps": 40, "batchSize": 2, "epochs": 3},
        resources={"nodes": 2},
        maxRetries=2,
    ))  # fmt: skip

    def training() -> Obj | None:
        status = status_of(cluster, "deleted")
        return status if (status.get("progress") or {}).get("step", 0) >= 6 else None

    wait_until(training, 600, "deleted to pass step 6", interval=1)
    pods = json.loads(cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                      "job-name=deleted-train", "-o", "json").stdout)["items"]  # fmt: skip
    (victim,) = [p for p in pods if p["metadata"]["name"].startswith("deleted-train-1-")]
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, victim["metadata"]["name"], "--wait=false")
    done = wait_phase(cluster, "deleted", "Succeeded")
    assert done["progress"]["step"] == 40
    pods = json.loads(cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l",
                                      "job-name=deleted-train", "-o", "json").stdout)["items"]  # fmt: skip
    old_zero = [
        p for p in pods
        if p["metadata"]["name"].startswith("deleted-train-0-")
        and p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] != 0
    ]  # fmt: skip
    (stopped,) = [p["status"]["containerStatuses"][0]["state"]["terminated"] for p in old_zero]
    assert stopped["exitCode"] == 76, stopped
    # Its termination message (kubetune-launch copies the process's reason): the step saved.
    saved = re.findall(r"stopped by a peer process got SIGTERM; resumes from the checkpoint of "
                       r"step (\d+)", stopped.get("message", ""))  # fmt: skip
    logs = "".join(
        cluster.kubectl("logs", "-n", NAMESPACE, p["metadata"]["name"]).stdout
        for p in pods
        if p["metadata"]["name"].startswith("deleted-train-0-") and p not in old_zero
    )
    resumed = re.findall(r"resuming from the checkpoint of step (\d+)/", logs)
    assert saved and resumed == saved, (stopped, logs[-3000:])
