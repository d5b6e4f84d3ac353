"""The FineTuneJob API and the operator against the real control plane.

The CRD is installed from crds/; the operator runs as a `kubetune-operator` subprocess with the
chart's RBAC (helm template), authenticated as the chart's ServiceAccount, never as admin. Pods
run on the process node, where the Job's real command `<trainer command> --config
/etc/kubetune/config.json` starts tests/integration/fake_trainer.py (KUBETUNE_TRAINER_COMMAND),
which reports status through its own projected ServiceAccount token, as the trainer does.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from operator_harness import (
    OperatorIdentity,
    OperatorProcess,
    PhaseLog,
    grant_operator,
    install_crds,
    install_operator_identity,
    operator_env,
)
from unit.operator.invalid_manifests import (
    ALLOWED_UPDATES_WITH_JOB,
    FORBIDDEN_UPDATES_WITH_JOB,
    INVALID_MANIFESTS,
    OUTPUTS_BESIDE_INPUTS,
    VALID_MANIFEST,
    WITH_JOB_STATUS,
    InvalidManifest,
)

from kubetune_trainer import exitcodes
from kubetune_trainer.config import TrainerConfig
from localenv.kueue import KUEUE_API, KUEUE_NAMESPACE_LABEL, Kueue, running_kueue
from localenv.testing import Cluster, free_port, wait_until

pytestmark = pytest.mark.cluster

Obj = dict[str, Any]
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# What a FineTuneJob's children may be (one, its Job; the rest must not exist per job).
CHILD_KINDS = ("job", "configmap", "serviceaccount", "role", "rolebinding")


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    install_crds(cluster)


@pytest.fixture(scope="session")
def operator_identity(
    cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorIdentity]:
    workdir = tmp_path_factory.mktemp("operator")
    with install_operator_identity(cluster, workdir, clusterwide=False) as identity:
        yield identity


@pytest.fixture
def restricted_namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace enforcing Pod Security "restricted": the trainer pod must be admitted."""
    with cluster.namespace(RESTRICTED) as name:
        yield name


@pytest.fixture
def start_operator(
    cluster: Cluster, operator_identity: OperatorIdentity, restricted_namespace: str, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """Start replicas of the operator watching the test's namespace, with the rights the chart
    gives it there (operator.watchNamespaces) and none elsewhere; all stopped afterwards."""
    grant_operator(cluster, operator_identity, restricted_namespace)
    started: list[OperatorProcess] = []

    def start(name: str = "a", env: dict[str, str] | None = None) -> OperatorProcess:
        metrics, health = free_port(), free_port()
        replica = OperatorProcess(
            name=name,
            env={
                **operator_env(operator_identity, restricted_namespace, metrics, health),
                **(env or {}),
            },
            log_path=tmp_path / f"operator-{name}-{len(started)}.log",
            metrics_port=metrics,
            health_port=health,
        )
        started.append(replica.start())
        return replica

    yield start
    for replica in started:
        replica.stop()


@pytest.fixture
def phase_log(cluster: Cluster, restricted_namespace: str) -> Iterator[PhaseLog]:
    log = PhaseLog(cluster, restricted_namespace).start()
    yield log
    log.stop()


@pytest.fixture(scope="module")
def shared_namespace(cluster: Cluster, crds: None) -> Iterator[str]:
    with cluster.namespace() as name:
        yield name


# ------------------------------------------------------------------------------------ helpers


def finetunejob(name: str, mode: str = "succeed-2", **spec: Any) -> Obj:
    """A FineTuneJob the stand-in trainer runs in `mode` (see fake_trainer.py)."""
    manifest = copy.deepcopy(VALID_MANIFEST)
    manifest["metadata"] = {"name": name}
    manifest["spec"]["baseModel"] = {"uri": f"s3://fake/{mode}"}
    manifest["spec"]["resources"] = {"gpus": 1}
    manifest["spec"].update(spec)
    return manifest


def get(cluster: Cluster, kind: str, name: str, namespace: str) -> Obj | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def items(cluster: Cluster, kind: str, namespace: str, selector: str | None = None) -> list[Obj]:
    args = ["get", kind, "-n", namespace, "-o", "json"]
    if selector:
        args += ["-l", selector]
    return list(json.loads(cluster.kubectl(*args).stdout)["items"])


def wait_phase(cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 60) -> Obj:
    def reached() -> Obj | None:
        ftj = get(cluster, "ftj", name, namespace)
        status = (ftj or {}).get("status") or {}
        return status if status.get("phase") == phase else None

    return wait_until(reached, timeout, f"FineTuneJob {name} to be {phase}")


def conditions(status: Obj) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions", [])}


def events(cluster: Cluster, namespace: str, name: str) -> list[Obj]:
    selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={name}"
    out = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", selector, "-o", "json"
    )
    return list(json.loads(out.stdout)["items"])


def wait_events(
    cluster: Cluster, namespace: str, name: str, *reasons: str, kind: str | None = None
) -> list[Obj]:
    """Until Events with these reasons exist (Kopf posts them in the background, after the
    status patch); all the FineTuneJob's Events then."""

    def posted() -> list[Obj] | None:
        found = events(cluster, namespace, name)
        seen = {e["reason"] for e in found if kind is None or e["type"] == kind}
        return found if set(reasons) <= seen else None

    return wait_until(posted, 20, f"events {reasons} on {name}")


def job_created(posted: list[Obj], name: str) -> list[Obj]:
    """The Events that say the FineTuneJob's Job was created (the first phase's Event, or a
    JobCreated Event when the phase did not change)."""
    return [e for e in posted if f"Created training Job {name}-train." in e.get("message", "")]


def wait_job_created(cluster: Cluster, namespace: str, name: str) -> list[Obj]:
    """Until the Event that names the created Job exists; all the FineTuneJob's Events then."""

    def posted() -> list[Obj] | None:
        found = events(cluster, namespace, name)
        return found if job_created(found, name) else None

    return wait_until(posted, 20, f"the Event that names {name}'s Job")


def trainer_pods(cluster: Cluster, namespace: str, name: str) -> list[Obj]:
    return items(cluster, "pods", namespace, f"kubetune.dev/finetunejob={name}")


def terminated(pod: Obj) -> Obj:
    return dict(pod["status"]["containerStatuses"][0]["state"].get("terminated") or {})


# ------------------------------------------------------------------------ the API (no operator)


@pytest.mark.parametrize("case", INVALID_MANIFESTS, ids=lambda c: c.id)
def test_api_server_rejects_invalid_manifest(
    cluster: Cluster, shared_namespace: str, case: InvalidManifest
) -> None:
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-n", shared_namespace, "-f", "-",
        input=json.dumps(case.manifest), check=False,
    )  # fmt: skip
    assert result.returncode != 0, f"{case.id} was accepted"
    assert case.expected in result.stderr, result.stderr


@pytest.mark.parametrize("manifest", OUTPUTS_BESIDE_INPUTS, ids=lambda m: m["metadata"]["name"])
def test_api_server_accepts_an_output_beside_its_inputs(
    cluster: Cluster, shared_namespace: str, manifest: dict[str, Any]
) -> None:
    cluster.kubectl(
        "apply", "--dry-run=server", "-n", shared_namespace, "-f", "-", input=json.dumps(manifest)
    )


def test_api_server_freezes_training_settings_once_started(
    cluster: Cluster, shared_namespace: str
) -> None:
    manifest = {**VALID_MANIFEST, "metadata": {"name": "started"}}
    cluster.apply(manifest, shared_namespace)
    cluster.kubectl(
        "patch", "ftj", "started", "-n", shared_namespace, "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": WITH_JOB_STATUS}),
    )  # fmt: skip
    for case in FORBIDDEN_UPDATES_WITH_JOB:
        update = {**case.manifest, "metadata": {"name": "started"}}
        result = cluster.kubectl(
            "apply", "--dry-run=server", "-n", shared_namespace, "-f", "-",
            input=json.dumps(update), check=False,
        )  # fmt: skip
        assert result.returncode != 0 and case.expected in result.stderr, (case.id, result.stderr)
    for allowed in ALLOWED_UPDATES_WITH_JOB:
        update = {**allowed, "metadata": {"name": "started"}}
        cluster.kubectl(
            "apply", "--dry-run=server", "-n", shared_namespace, "-f", "-", input=json.dumps(update)
        )


# ------------------------------------------------------------------------------- children


def test_each_method_gets_one_owned_job_and_the_namespace_one_trainer_identity(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    methods = {"lora": "ftj-lora", "qlora": "ftj-qlora", "full": "ftj-full"}
    # Suspended: the Jobs are created, no pod runs.
    cluster.apply(
        [finetunejob(name, method=method, suspend=True) for method, name in methods.items()], ns
    )
    for method, name in methods.items():
        status = wait_phase(cluster, ns, name, "Suspended")
        assert status["jobName"] == f"{name}-train"
        ftj = get(cluster, "ftj", name, ns)
        assert ftj is not None
        uid = ftj["metadata"]["uid"]
        for kind in CHILD_KINDS:
            children = items(cluster, kind, ns, f"kubetune.dev/finetunejob={name}")
            assert len(children) == (kind == "job"), (
                kind,
                [c["metadata"]["name"] for c in children],
            )
        job = get(cluster, "job", f"{name}-train", ns)
        assert job is not None and job["spec"]["suspend"] is True
        (owner,) = job["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("FineTuneJob", name, uid)
        assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
        # The trainer config travels in the Job (a pod annotation, read as a file).
        template = job["spec"]["template"]
        config = TrainerConfig.model_validate_json(
            template["metadata"]["annotations"]["kubetune.dev/trainer-config"]
        )
        assert config.spec.method == method
        assert config.job is not None and (config.job.name, config.job.uid) == (name, uid)
        assert config.spec.storage.endpoint == "http://127.0.0.1:9"  # the operator's default
        assert template["spec"]["serviceAccountName"] == "kubetune-trainer"
        assert not trainer_pods(cluster, ns, name)
    # One trainer identity for the whole namespace.
    (role,) = items(cluster, "role", ns, "app.kubernetes.io/name=kubetune-trainer")
    assert role["metadata"]["name"] == "kubetune-trainer"
    assert role["rules"] == [
        {"apiGroups": ["kubetune.dev"], "resources": ["finetunejobs/status"],
         "verbs": ["get", "patch"]}
    ]  # fmt: skip
    assert get(cluster, "serviceaccount", "kubetune-trainer", ns) is not None
    assert get(cluster, "rolebinding", "kubetune-trainer", ns) is not None


def test_missing_claim_keeps_the_job_pending_without_a_job(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("needs-pvc", output={"uri": "pvc://results/run-1"}), ns)
    status = wait_phase(cluster, ns, "needs-pvc", "Pending")
    wait_until(
        lambda: (
            (get(cluster, "ftj", "needs-pvc", ns) or {}).get("status", {}).get("reason")
            == "PVCNotFound"
        ),
        30,
        "reason PVCNotFound",
    )
    status = (get(cluster, "ftj", "needs-pvc", ns) or {})["status"]
    assert "PersistentVolumeClaim results" in status["message"]
    assert get(cluster, "job", "needs-pvc-train", ns) is None
    wait_events(cluster, ns, "needs-pvc", "PVCNotFound", kind="Warning")


# --------------------------------------------------------------------------------- status


def test_status_follows_the_pod_to_succeeded(
    cluster: Cluster,
    restricted_namespace: str,
    start_operator: Callable[[str], OperatorProcess],
    phase_log: PhaseLog,
) -> None:
    ns = restricted_namespace
    operator = start_operator("a").wait_active()
    # Another job of the namespace, whose status the stand-in tries to patch (and must not).
    cluster.apply(finetunejob("happy-other", suspend=True), ns)
    cluster.apply(finetunejob("happy", "succeed-3"), ns)
    status = wait_phase(cluster, ns, "happy", "Succeeded")
    assert phase_log.phases("happy")[-3:] == ["Pending", "Running", "Succeeded"]
    # The operator's fields...
    assert status["reason"] == "Succeeded"
    assert conditions(status) == {
        "Cancelled": "False",
        "Failed": "False",
        "Complete": "True",
        "Suspended": "False",
        "Running": "False",
        "Queued": "False",
        "Ready": "True",  # not asked to be served: complete is usable
        "Reconciling": "False",
        "Stalled": "False",
    }
    ftj = get(cluster, "ftj", "happy", ns)
    assert ftj is not None
    assert status["observedGeneration"] == ftj["metadata"]["generation"]
    assert status["startTime"] <= status["completionTime"]
    # ...next to the trainer's, which the operator never overwrote.
    assert status["progress"]["percent"] == 100.0
    assert status["metrics"]["trainLoss"] == pytest.approx(1.0)
    assert status["stage"] == "Publishing"
    # The stand-in's Role: its own status yes; another job's status, pods, spec: no.
    (pod,) = trainer_pods(cluster, ns, "happy")
    rbac = json.loads(terminated(pod)["message"])
    assert rbac == {"own": 200, "other": 403, "pods": 403, "spec": 403}
    posted = wait_events(cluster, ns, "happy", "TrainerRunning", "Succeeded")
    assert len(job_created(posted, "happy")) == 1
    sources = {e.get("reportingComponent") or e["source"].get("component") for e in posted}
    assert sources == {"kubetune-operator"}
    # Metrics and liveness.
    code, text = operator.http(operator.metrics_port, "/metrics")
    assert code == 200
    assert 'kubetune_finetunejobs{phase="Succeeded"} 1.0' in text
    assert "kubetune_reconcile_duration_seconds_count" in text
    assert operator.http(operator.health_port, "/healthz")[0] == 200


def test_data_error_fails_at_once_with_the_trainers_message(
    cluster: Cluster,
    restricted_namespace: str,
    start_operator: Callable[[str], OperatorProcess],
    phase_log: PhaseLog,
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("bad-data", "data-error", maxRetries=3), ns)
    status = wait_phase(cluster, ns, "bad-data", "Failed")
    assert status["reason"] == exitcodes.REASONS[exitcodes.DATA_ERROR]
    assert status["message"] == (
        "train.jsonl line 3: record has no 'messages' field (dataset.format chat)"
    )
    assert conditions(status)["Stalled"] == "True"
    assert conditions(status)["Ready"] == "False"
    # podFailurePolicy: no retry for a data error, although maxRetries is 3.
    (pod,) = trainer_pods(cluster, ns, "bad-data")
    assert terminated(pod)["exitCode"] == exitcodes.DATA_ERROR
    posted = wait_events(cluster, ns, "bad-data", "DataError", kind="Warning")
    # Never "retrying" on the way, not even while the Job controller catches up with the pod.
    assert "Retrying" not in [e["reason"] for e in posted]
    assert "Retrying" not in phase_log.reasons("bad-data")


def test_oom_killed_is_reported_with_a_hint(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    resources = {"gpus": 1, "memory": "256Mi"}
    cluster.apply(finetunejob("hungry", "oom", maxRetries=0, resources=resources), ns)
    status = wait_phase(cluster, ns, "hungry", "Failed")
    assert status["reason"] == "OOMKilled"
    assert "qlora" in status["message"] and "256Mi" in status["message"]
    (pod,) = trainer_pods(cluster, ns, "hungry")
    assert (terminated(pod)["reason"], terminated(pod)["exitCode"]) == ("OOMKilled", 137)


def test_missing_credentials_secret_is_explained_until_it_exists(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    storage = {"credentialsSecretRef": {"name": "s3-credentials"}}
    cluster.apply(finetunejob("no-secret", storage=storage), ns)

    def reason() -> str | None:
        status = (get(cluster, "ftj", "no-secret", ns) or {}).get("status") or {}
        return status.get("reason") if status.get("reason") == "CredentialsSecretMissing" else None

    wait_until(reason, 60, "reason CredentialsSecretMissing")
    status = (get(cluster, "ftj", "no-secret", ns) or {})["status"]
    assert status["phase"] == "Pending"
    assert "Create Secret s3-credentials" in status["message"]
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in status["message"]
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"},
    }
    cluster.apply(secret, ns)  # the pod starts by itself; the operator never reads the Secret
    wait_phase(cluster, ns, "no-secret", "Succeeded")


# ------------------------------------------------------------------- suspend, delete, restart


def test_suspend_stops_the_pod_and_resume_restarts_it(
    cluster: Cluster,
    restricted_namespace: str,
    start_operator: Callable[[str], OperatorProcess],
    phase_log: PhaseLog,
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("pausable", "sleep-120"), ns)
    wait_phase(cluster, ns, "pausable", "Running")
    first_pod = trainer_pods(cluster, ns, "pausable")[0]["metadata"]["name"]

    cluster.kubectl(
        "patch", "ftj", "pausable", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    wait_phase(cluster, ns, "pausable", "Suspended")
    job = get(cluster, "job", "pausable-train", ns)
    assert job is not None and job["spec"]["suspend"] is True
    # The pod goes once the Job controller has removed its tracking finalizer, which can lag
    # on a loaded machine: a generous bound (this is not a timing assertion).
    wait_until(lambda: not trainer_pods(cluster, ns, "pausable"), 120, "the pod to be deleted")

    cluster.kubectl(
        "patch", "ftj", "pausable", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    wait_phase(cluster, ns, "pausable", "Running")
    (second,) = trainer_pods(cluster, ns, "pausable")
    assert second["metadata"]["name"] != first_pod
    assert phase_log.phases("pausable")[-3:] == ["Running", "Suspended", "Running"] or (
        phase_log.phases("pausable")[-4:] == ["Running", "Suspended", "Pending", "Running"]
    )
    wait_events(cluster, ns, "pausable", "Suspending", "Resuming")


def test_delete_cascades_to_job_and_pods(
    cluster: Cluster,
    restricted_namespace: str,
    start_operator: Callable[[str], OperatorProcess],
    phase_log: PhaseLog,
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply([finetunejob("doomed", "sleep-120"), finetunejob("doomed-bg", "sleep-120")], ns)
    wait_phase(cluster, ns, "doomed", "Running")
    wait_phase(cluster, ns, "doomed-bg", "Running")

    # Foreground: the FineTuneJob waits for its Job and pod to go, and says it is Cancelled.
    cluster.kubectl("delete", "ftj", "doomed", "-n", ns, "--cascade=foreground", "--wait=false")
    # Background (kubectl's default): gone at once; the garbage collector follows.
    cluster.kubectl("delete", "ftj", "doomed-bg", "-n", ns, "--wait=false")

    def all_gone() -> bool:
        for name in ("doomed", "doomed-bg"):
            if get(cluster, "ftj", name, ns) is not None or trainer_pods(cluster, ns, name):
                return False
            for kind in CHILD_KINDS:
                if items(cluster, kind, ns, f"kubetune.dev/finetunejob={name}"):
                    return False
        return True

    wait_until(all_gone, 60, "the FineTuneJobs, their children and pods to be deleted")
    assert "Cancelled" in phase_log.phases("doomed")


def test_operator_restart_mid_flight_creates_no_second_job(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    first = start_operator("a").wait_active()
    cluster.apply(finetunejob("survivor", "succeed-8"), ns)
    wait_phase(cluster, ns, "survivor", "Running")
    first.kill()  # mid-flight: the trainer keeps running, nobody watches it

    second = start_operator("b").wait_active(timeout=60)
    status = wait_phase(cluster, ns, "survivor", "Succeeded")
    assert status["jobName"] == "survivor-train"
    assert len(items(cluster, "job", ns, "kubetune.dev/finetunejob=survivor")) == 1
    assert len(trainer_pods(cluster, ns, "survivor")) == 1
    posted = wait_events(cluster, ns, "survivor", "Succeeded")
    assert len(job_created(posted, "survivor")) == 1
    assert "Handler 'resumed' succeeded." in second.messages("survivor")


def test_a_spec_changed_while_no_operator_runs_reaches_the_job_after_a_restart(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    first = start_operator("a").wait_active()
    cluster.apply(finetunejob("sleeper", "sleep-120", suspend=True), ns)
    wait_phase(cluster, ns, "sleeper", "Suspended")
    ftj = get(cluster, "ftj", "sleeper", ns)
    assert ftj is not None
    # Kopf wrote nothing into the object: its diff base is kept in memory (one PATCH less per
    # FineTuneJob), and a handler done on its first try leaves no progress record or marker.
    annotations = ftj["metadata"].get("annotations") or {}
    assert not [key for key in annotations if key.startswith("kubetune.dev/")], annotations
    first.kill()

    patch = {"spec": {"suspend": False, "maxRetries": 4}}
    cluster.kubectl("patch", "ftj", "sleeper", "-n", ns, "--type=merge", "-p", json.dumps(patch))
    second = start_operator("b").wait_active(timeout=60)
    wait_phase(cluster, ns, "sleeper", "Running")
    job = get(cluster, "job", "sleeper-train", ns)
    assert job is not None
    assert (job["spec"]["suspend"], job["spec"]["backoffLimit"]) == (False, 4)
    assert "Handler 'resumed' succeeded." in second.messages("sleeper")


def test_two_replicas_never_both_handle_a_job(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    older = start_operator("a").wait_active()
    newer = start_operator("b")
    # The younger replica starts paused and stays so: it sees an older, live peer.
    newer.wait_for_peer_record(cluster, ns, 2)
    newer.wait_for_log("Activity 'start' succeeded.")
    cluster.apply(finetunejob("one", suspend=True), ns)
    wait_phase(cluster, ns, "one", "Suspended")
    assert len(items(cluster, "job", ns, "kubetune.dev/finetunejob=one")) == 1
    assert "Handler 'created' succeeded." in older.messages("one")
    assert not newer.messages("one")  # the paused replica never touched it
    assert len(job_created(wait_job_created(cluster, ns, "one"), "one")) == 1

    # The active replica dies without a goodbye: the other takes over once its record expires.
    older.kill()
    newer.wait_active(timeout=45)
    cluster.apply(finetunejob("two", suspend=True), ns)
    wait_phase(cluster, ns, "two", "Suspended")
    assert "Handler 'created' succeeded." in newer.messages("two")
    assert len(items(cluster, "job", ns, "kubetune.dev/finetunejob=two")) == 1
    assert len(items(cluster, "job", ns, "kubetune.dev/finetunejob=one")) == 1


def test_crash_is_retried_until_the_backoff_limit(
    cluster: Cluster,
    restricted_namespace: str,
    start_operator: Callable[[str], OperatorProcess],
    phase_log: PhaseLog,
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("flaky", "crash", maxRetries=1), ns)
    status = wait_phase(cluster, ns, "flaky", "Failed", timeout=90)
    assert status["reason"] == "BackoffLimitExceeded"
    assert "failed 2 time(s), more than spec.maxRetries (1)" in status["message"]
    assert "RuntimeError: CUDA error" in status["message"]  # the traceback's last line
    assert len(trainer_pods(cluster, ns, "flaky")) == 2
    assert "Retrying" in phase_log.reasons("flaky")


def test_mutable_settings_reach_the_running_job(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("stretch", "sleep-120"), ns)
    wait_phase(cluster, ns, "stretch", "Running")
    # Allowed after the start (the CRD rejects other changes): retries and a (short) timeout.
    patch = {"spec": {"maxRetries": 5, "timeout": "3s"}}
    cluster.kubectl("patch", "ftj", "stretch", "-n", ns, "--type=merge", "-p", json.dumps(patch))
    status = wait_phase(cluster, ns, "stretch", "Failed")
    assert status["reason"] == "DeadlineExceeded"
    assert "spec.timeout (3s)" in status["message"]
    assert status["observedGeneration"] == 2
    job = get(cluster, "job", "stretch-train", ns)
    assert job is not None
    assert (job["spec"]["backoffLimit"], job["spec"]["activeDeadlineSeconds"]) == (5, 3)


# ------------------------------------------------------------------------------ Kueue (real)


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    with running_kueue(cluster, tmp_path_factory.mktemp("kueue")) as running:
        yield running


@pytest.fixture
def gpu_queue(cluster: Cluster, kueue: Kueue, restricted_namespace: str) -> Iterator[str]:
    """LocalQueue "team-a" in the test's namespace, backed by a ClusterQueue with one GPU."""
    ns = restricted_namespace
    cluster.kubectl("label", "namespace", ns, f"{KUEUE_NAMESPACE_LABEL}=enabled")
    flavor, cluster_queue = f"{ns}-default", f"{ns}-gpus"
    quota = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "1"}
    cluster_scoped = [
        {"apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": flavor}},
        {
            "apiVersion": KUEUE_API,
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {
                                "name": flavor,
                                "resources": [
                                    {"name": k, "nominalQuota": v} for k, v in quota.items()
                                ],
                            }
                        ],
                    }
                ],
            },
        },
    ]
    cluster.apply(cluster_scoped, ns)
    local_queue = {
        "apiVersion": KUEUE_API,
        "kind": "LocalQueue",
        "metadata": {"name": "team-a"},
        "spec": {"clusterQueue": cluster_queue},
    }
    cluster.apply(local_queue, ns)
    yield "team-a"
    # Kueue keeps its finalizers on the queues and the flavor while Workloads use them: remove
    # the jobs and their Workloads, then the queues, while Kueue still runs to let them go.
    for kind in ("finetunejobs", "jobs", "workloads.kueue.x-k8s.io", "localqueues"):
        cluster.kubectl("delete", kind, "--all", "-n", ns, "--timeout=60s", check=False)
    for kind, name in (("clusterqueue", cluster_queue), ("resourceflavor", flavor)):
        cluster.kubectl("delete", kind, name, "--timeout=60s", check=False)


def workloads(cluster: Cluster, namespace: str) -> list[Obj]:
    return items(cluster, "workloads.kueue.x-k8s.io", namespace)


def test_kueue_admits_queued_jobs_one_at_a_time_within_quota(
    cluster: Cluster,
    restricted_namespace: str,
    gpu_queue: str,
    start_operator: Callable[[str], OperatorProcess],
    phase_log: PhaseLog,
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    # Two jobs of one GPU each against a quota of one: Kueue admits one, the other waits.
    cluster.apply(
        [
            finetunejob("first", "succeed-4", queueName=gpu_queue),
            finetunejob("second", "succeed-4", queueName=gpu_queue),
        ],
        ns,
    )

    def one_running_one_queued() -> Obj | None:
        jobs = {
            n: (get(cluster, "ftj", n, ns) or {}).get("status") or {} for n in ("first", "second")
        }
        phases = sorted(s.get("phase", "") for s in jobs.values())
        return jobs if phases == ["Queued", "Running"] else None

    seen = wait_until(one_running_one_queued, 60, "one job Running and one Queued")
    queued_name, queued = next((n, s) for n, s in seen.items() if s["phase"] == "Queued")
    assert queued["reason"] == "WaitingForAdmission"
    assert f"LocalQueue {gpu_queue}" in queued["message"]
    # Kueue's own reason, from the Workload, once Kueue has tried to admit it.
    wait_until(
        lambda: (
            "insufficient unused quota for nvidia.com/gpu"
            in ((get(cluster, "ftj", queued_name, ns) or {}).get("status") or {}).get("message", "")
        ),
        30,
        "Kueue's reason in the queued job's status",
    )
    running = next(n for n, s in seen.items() if s["phase"] == "Running")
    admitted = {
        w["metadata"]["ownerReferences"][0]["name"]: conditions(w.get("status") or {})
        for w in workloads(cluster, ns)
    }
    assert admitted[f"{running}-train"].get("Admitted") == "True"
    assert admitted[f"{queued_name}-train"].get("Admitted") != "True"

    wait_phase(cluster, ns, "first", "Succeeded", timeout=90)
    wait_phase(cluster, ns, "second", "Succeeded", timeout=90)
    # Never both running at once: replay the phase changes of both in the order they came.
    current: dict[str, str] = {}
    for name, phase, _ in phase_log.entries:
        current[name] = phase
        assert list(current.values()).count("Running") <= 1, phase_log.entries


def workload_of(cluster: Cluster, namespace: str, ftj: str) -> Obj | None:
    job = get(cluster, "job", f"{ftj}-train", namespace)
    uid = job["metadata"]["uid"] if job else None
    return next(
        (
            w
            for w in workloads(cluster, namespace)
            if w["metadata"]["labels"].get("kueue.x-k8s.io/job-uid") == uid
        ),
        None,
    )


def test_kueue_suspend_frees_the_quota_and_resume_queues_again(
    cluster: Cluster,
    restricted_namespace: str,
    gpu_queue: str,
    start_operator: Callable[[str], OperatorProcess],
    phase_log: PhaseLog,
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("long", "sleep-120", queueName=gpu_queue), ns)
    wait_phase(cluster, ns, "long", "Running")
    # Created suspended: Kueue does not see it yet (no Workload), so it cannot start it.
    cluster.apply(finetunejob("next", "succeed-3", queueName=gpu_queue, suspend=True), ns)
    wait_phase(cluster, ns, "next", "Suspended")
    assert workload_of(cluster, ns, "next") is None

    def patch_suspend(name: str, value: bool) -> None:
        body = json.dumps({"spec": {"suspend": value}})
        cluster.kubectl("patch", "ftj", name, "-n", ns, "--type=merge", "-p", body)

    patch_suspend("next", False)  # now queued behind "long", which holds the one GPU
    status = wait_phase(cluster, ns, "next", "Queued")
    assert status["reason"] == "WaitingForAdmission"

    # Suspending the running job stops it through Kueue and hands its GPU to the next one.
    patch_suspend("long", True)
    wait_phase(cluster, ns, "long", "Suspended")
    wait_until(lambda: not trainer_pods(cluster, ns, "long"), 120, "long's pod to be deleted")
    workload = workload_of(cluster, ns, "long")
    assert workload is not None and workload["spec"]["active"] is False
    wait_phase(cluster, ns, "next", "Succeeded", timeout=90)
    long_status = wait_phase(cluster, ns, "long", "Suspended")  # still: Kueue did not restart it
    assert "Retrying" not in phase_log.reasons("long")  # the stop cost no retry
    assert long_status["reason"] == "Suspended"

    patch_suspend("long", False)
    wait_phase(cluster, ns, "long", "Running", timeout=90)
    workload = workload_of(cluster, ns, "long")
    assert workload is not None and workload["spec"]["active"] is True
    assert len(items(cluster, "job", ns, "kubetune.dev/finetunejob=long")) == 1
    wait_events(cluster, ns, "long", "Suspending", "Resuming")


def test_kueue_reason_explains_a_job_sent_to_a_missing_local_queue(
    cluster: Cluster,
    restricted_namespace: str,
    gpu_queue: str,
    start_operator: Callable[[str], OperatorProcess],
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("lost", queueName="team-b"), ns)

    def explained() -> Obj | None:
        state = (get(cluster, "ftj", "lost", ns) or {}).get("status") or {}
        return state if "LocalQueue team-b doesn't exist" in state.get("message", "") else None

    state = wait_until(explained, 30, "the missing LocalQueue in the status")
    assert (state["phase"], state["reason"]) == ("Queued", "WaitingForAdmission")
    assert not trainer_pods(cluster, ns, "lost")


# --------------------------------------------------------- trust: nothing fails in silence


def _policy(
    name: str, namespace: str, reason: str, operations: tuple[str, ...] = ("CREATE",)
) -> list[Obj]:
    """A ValidatingAdmissionPolicy (and binding) refusing training Jobs in `namespace`, as a
    cluster admin's policy would, with the given reason (Invalid answers 422, Forbidden 403)."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {"apiGroups": ["batch"], "apiVersions": ["v1"],
                         "operations": list(operations), "resources": ["jobs"]}
                    ]
                },
                "validations": [
                    {"expression": "false", "reason": reason,
                     "message": "training Jobs need a cost-center label here"}
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": namespace}
                    }
                },
            },
        },
    ]  # fmt: skip


@contextmanager
def cluster_objects(cluster: Cluster, docs: list[Obj]) -> Iterator[None]:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                          "items": docs}))  # fmt: skip
    try:
        yield
    finally:
        for doc in docs:
            cluster.kubectl("delete", doc["kind"], doc["metadata"]["name"], "--ignore-not-found",
                            "--wait=false")  # fmt: skip


def wait_reason(cluster: Cluster, ns: str, name: str, reason: str, timeout: float = 30) -> Obj:
    def reached() -> Obj | None:
        status = (get(cluster, "ftj", name, ns) or {}).get("status") or {}
        return status if status.get("reason") == reason else None

    return wait_until(reached, timeout, f"FineTuneJob {name} to report {reason}")


@pytest.mark.parametrize(
    ("reason", "phase", "expected"), [("Invalid", "Failed", "InvalidSpec"),
                                      ("Forbidden", "Pending", "Forbidden")]
)  # fmt: skip
def test_a_job_an_admission_policy_refuses_is_explained_at_once(
    *,
    cluster: Cluster,
    restricted_namespace: str,
    start_operator: Callable[[str], OperatorProcess],
    reason: str,
    phase: str,
    expected: str,
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    with cluster_objects(cluster, _policy(f"deny-jobs-{ns}", ns, reason)):
        time.sleep(2)  # the policy reaches the API server's admission cache
        cluster.apply(finetunejob("refused"), ns)
        status = wait_reason(cluster, ns, "refused", expected)
    assert status["phase"] == phase
    assert "Job refused-train" in status["message"]
    assert "training Jobs need a cost-center label here" in status["message"]
    posted = wait_events(cluster, ns, "refused", expected, kind="Warning")
    assert any("cost-center" in e["message"] for e in posted)
    assert get(cluster, "job", "refused-train", ns) is None


def test_a_quota_that_refuses_the_job_is_named_and_the_job_starts_once_it_fits(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"},
             "spec": {"hard": {"count/jobs.batch": "0"}}}  # fmt: skip
    cluster.apply(quota, ns)
    time.sleep(2)  # the quota controller computes its status before the admission uses it
    start_operator("a").wait_active()
    cluster.apply(finetunejob("over-quota"), ns)
    status = wait_reason(cluster, ns, "over-quota", "QuotaExceeded")
    assert status["phase"] == "Pending" and "exceeded quota: no-jobs" in status["message"]
    wait_events(cluster, ns, "over-quota", "QuotaExceeded", kind="Warning")
    cluster.kubectl("delete", "resourcequota", "no-jobs", "-n", ns)
    wait_phase(cluster, ns, "over-quota", "Succeeded", timeout=150)  # retried every 30 s


def test_a_missing_priority_class_is_named_and_the_pod_starts_once_it_exists(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    priority = f"train-{ns}"
    start_operator("a").wait_active()
    cluster.apply(finetunejob("no-priority", resources={"gpus": 1, "priorityClassName": priority}),
                  ns)  # fmt: skip
    status = wait_reason(cluster, ns, "no-priority", "PriorityClassNotFound")
    assert status["phase"] == "Pending"
    assert f"no PriorityClass with name {priority}" in status["message"]
    wait_events(cluster, ns, "no-priority", "PriorityClassNotFound", kind="Warning")
    klass = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
             "metadata": {"name": priority}, "value": 1000}  # fmt: skip
    with cluster_objects(cluster, [klass]):
        wait_phase(cluster, ns, "no-priority", "Succeeded", timeout=150)


def test_cancel_stops_the_pod_and_is_final(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("cancelled", "sleep-120"), ns)
    wait_phase(cluster, ns, "cancelled", "Running")
    cluster.kubectl("patch", "ftj", "cancelled", "-n", ns, "--type=merge",
                    "-p", '{"spec":{"cancel":true}}')  # fmt: skip
    status = wait_phase(cluster, ns, "cancelled", "Cancelled")
    assert status["reason"] == "CancelRequested" and status["completionTime"]
    wait_until(lambda: not trainer_pods(cluster, ns, "cancelled"), 120, "the pod to be deleted")
    refused = cluster.kubectl("patch", "ftj", "cancelled", "-n", ns, "--type=merge",
                              "-p", '{"spec":{"cancel":false}}', check=False)  # fmt: skip
    assert refused.returncode != 0 and "cancel cannot be set back to false" in refused.stderr
    assert (get(cluster, "ftj", "cancelled", ns) or {})["status"]["phase"] == "Cancelled"


def test_a_refused_change_of_the_job_is_in_a_condition_and_an_event(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[[str], OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a").wait_active()
    cluster.apply(finetunejob("changed", "sleep-120"), ns)
    wait_phase(cluster, ns, "changed", "Running")
    with cluster_objects(cluster, _policy(f"freeze-jobs-{ns}", ns, "Forbidden", ("UPDATE",))):
        time.sleep(2)  # the policy reaches the API server's admission cache
        cluster.kubectl("patch", "ftj", "changed", "-n", ns, "--type=merge",
                        "-p", '{"spec":{"maxRetries":5}}')  # fmt: skip

        def refused() -> Obj | None:
            status = (get(cluster, "ftj", "changed", ns) or {}).get("status") or {}
            found = [c for c in status.get("conditions", []) if c["type"] == "SpecApplied"]
            return found[0] if found and found[0]["status"] == "False" else None

        applied = wait_until(refused, 30, "SpecApplied False")
    assert applied["reason"] == "UpdateNotApplied" and "cost-center" in applied["message"]
    wait_events(cluster, ns, "changed", "UpdateNotApplied", kind="Warning")
    job = get(cluster, "job", "changed-train", ns)
    assert job is not None and job["spec"]["backoffLimit"] == 2  # the previous setting


# -------------------------------------------------------------------------------- serving

FAKE_SERVING = Path(__file__).resolve().parent / "fake_serving.py"


def serving_env() -> dict[str, str]:
    """The operator's serving settings for the process node: stand-ins for vLLM and the agent
    (fake_serving.py), a port range of its own (pods share the host's network), pod address."""
    low = free_port()
    return {
        "KUBETUNE_SERVING_COMMAND": json.dumps(["python", str(FAKE_SERVING), "vllm"]),
        "KUBETUNE_SERVING_AGENT_COMMAND": json.dumps(["python", str(FAKE_SERVING)]),
        "KUBETUNE_SERVING_PORTS": f"{low}-{low + 3}",
        "KUBETUNE_SERVING_ADDRESS": "pod",
        "KUBETUNE_SERVING_RESOURCES": "{}",
    }


def serving_of(cluster: Cluster, ns: str, name: str) -> Obj:
    return dict(((get(cluster, "ftj", name, ns) or {}).get("status") or {}).get("serving") or {})


def wait_serving(cluster: Cluster, ns: str, name: str, phase: str, timeout: float = 90) -> Obj:
    def reached() -> Obj | None:
        current = serving_of(cluster, ns, name)
        return current if current.get("phase") == phase else None

    return wait_until(reached, timeout, f"{name} to be {phase} (serving)", interval=0.5)


def chat(endpoint: str, model: str) -> str:
    request = urllib.request.Request(
        f"{endpoint}/chat/completions",
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["choices"][0]["message"]["content"])


def test_succeeded_adapters_share_one_server_and_leave_it_when_deleted(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[..., OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a", serving_env()).wait_active()
    serve = {"enabled": True, "promotionGate": "evalLoss"}
    for name, mode in (("first", "succeed-1"), ("second", "succeed-1"), ("worse", "worse-1")):
        cluster.apply(finetunejob(name, mode, output={"uri": f"s3://outputs/{name}"},
                                  serving=serve), ns)  # fmt: skip
    first = wait_serving(cluster, ns, "first", "Serving")
    second = wait_serving(cluster, ns, "second", "Serving")
    assert first["server"] == second["server"] and first["endpoint"] == second["endpoint"]
    assert (first["model"], second["model"]) == ("first", "second")
    assert first["endpoint"].startswith("http://127.0.0.1:")
    assert chat(first["endpoint"], "second") == "second says hi"
    worse = wait_serving(cluster, ns, "worse", "NotServed")
    assert worse["reason"] == "PromotionGateRefused" and "3.0000 is not below" in worse["message"]

    server = first["server"]
    deployment = get(cluster, "deployment", server, ns)
    assert deployment is not None
    owners = sorted(o["name"] for o in deployment["metadata"]["ownerReferences"])
    assert owners == ["first", "second"]  # not the job the gate refused
    desired = json.loads(get(cluster, "configmap", f"{server}-desired", ns)["data"]["desired.json"])  # type: ignore[index]
    assert sorted(a["name"] for a in desired["adapters"]) == ["first", "second"]
    # The agent's rights: its two ConfigMaps, nothing else.
    me = f"system:serviceaccount:{ns}:{server}"
    for verb, what, allowed in [
        ("get", f"configmap/{server}-desired", "yes"),
        ("patch", f"configmap/{server}-state", "yes"),
        ("patch", f"configmap/{server}-desired", "no"),
        ("list", "configmaps", "no"),
        ("get", "finetunejobs", "no"),
        ("get", "secrets", "no"),
    ]:
        answer = cluster.kubectl("auth", "can-i", verb, what, "-n", ns, "--as", me, check=False)
        assert answer.stdout.strip() == allowed, (verb, what)

    # Deleting a job unloads its adapter; the other one stays served.
    cluster.kubectl("delete", "ftj", "first", "-n", ns)

    def unloaded() -> bool:
        cm = get(cluster, "configmap", f"{server}-desired", ns) or {"data": {"desired.json": "{}"}}
        names = [a["name"] for a in json.loads(cm["data"]["desired.json"]).get("adapters", [])]
        return names == ["second"]

    wait_until(unloaded, 30, "the first adapter to be unloaded")
    assert serving_of(cluster, ns, "second")["phase"] == "Serving"
    # Serving turned off: the server holds nothing and scales to zero; deleting the last job
    # it served removes it (garbage collection, no finalizer).
    cluster.kubectl("patch", "ftj", "second", "-n", ns, "--type=merge",
                    "-p", '{"spec":{"serving":{"enabled":false}}}')  # fmt: skip
    wait_until(lambda: not serving_of(cluster, ns, "second"), 30, "status.serving to clear")
    wait_until(lambda: (get(cluster, "deployment", server, ns) or {}).get("spec", {}).get(
        "replicas") == 0, 30, "the server to scale to zero")  # fmt: skip
    cluster.kubectl("delete", "ftj", "second", "worse", "-n", ns)
    wait_until(lambda: get(cluster, "deployment", server, ns) is None, 60, "the server to go")


def test_an_adapter_that_fails_to_load_says_why(
    cluster: Cluster, restricted_namespace: str, start_operator: Callable[..., OperatorProcess]
) -> None:
    ns = restricted_namespace
    start_operator("a", serving_env()).wait_active()
    cluster.apply(finetunejob("adapter-broken", "succeed-1", serving={"enabled": True}), ns)
    failed = wait_serving(cluster, ns, "adapter-broken", "Failed")
    assert failed["reason"] == "AdapterLoadFailed" and "SHA256SUMS" in failed["message"]
