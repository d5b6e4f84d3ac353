"""FineTuneJob status from realistic Job and pod states: the phase, a reason a user can act on,
kstatus conditions whose lastTransitionTime only moves on a real transition, and never a field
the trainer owns."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ftj_objects import (
    T0,
    T1,
    T2,
    complete_job,
    failed_job,
    job,
    pod,
    running_pod,
    served,
    terminated_pod,
    unschedulable_pod,
    waiting_pod,
)

from kubetune_operator import manifests, status
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer import exitcodes
from kubetune_trainer.api import FineTuneStatus

NOW = datetime(2026, 1, 1, 10, 0, 10, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
SETTINGS = OperatorSettings()
TRAINER_STATUS = {
    "stage": "Training",
    "progress": {"step": 10, "totalSteps": 100, "percent": 10.0},
    "metrics": {"trainLoss": 1.5},
    "parameters": {"trainable": 1, "total": 2},
    "estimate": {"gpuMemoryBytes": 3},
    "output": {"files": []},
}

Obj = dict[str, Any]


def evaluate(
    ftj: Obj, job_body: Obj | None, pods: list[Obj], now: datetime = NOW, **kwargs: Any
) -> tuple[status.Verdict, Obj]:
    spec = manifests.effective_spec(manifests.parse_spec(ftj), SETTINGS)
    return status.status_patch(ftj, job_body, pods, now, spec=spec, **kwargs)


def verdict(ftj: Obj, job_body: Obj | None, pods: list[Obj], **kwargs: Any) -> status.Verdict:
    return evaluate(ftj, job_body, pods, **kwargs)[0]


def applied(ftj: Obj, patch: Obj) -> Obj:
    """The FineTuneJob after the API server merged the status patch."""
    return {**ftj, "status": {**(ftj.get("status") or {}), **patch}}


def conditions(patch: Obj) -> dict[str, str]:
    return {c["type"]: c["status"] for c in patch["conditions"]}


# ---------------------------------------------------------------------------- happy path


def test_no_job_yet_is_pending() -> None:
    result, patch = evaluate(served(), None, [])
    assert (result.phase, result.reason) == ("Pending", "Creating")
    assert patch["phase"] == "Pending"
    # Pending: no state condition is True.
    assert conditions(patch) == {
        "Cancelled": "False",
        "Failed": "False",
        "Complete": "False",
        "Suspended": "False",
        "Running": "False",
        "Queued": "False",
        "Ready": "False",
        "Reconciling": "True",
        "Stalled": "False",
    }
    assert "jobName" not in patch and "startTime" not in patch


def test_job_without_pods_waits_for_its_pod() -> None:
    result, patch = evaluate(served(), job(), [])
    assert (result.phase, result.reason) == ("Pending", "WaitingForPod")
    assert patch["jobName"] == "support-lora-train"


def test_scheduled_pod_that_is_being_created_is_starting() -> None:
    result = verdict(served(), job(), [waiting_pod("ContainerCreating", "")])
    assert (result.phase, result.reason) == ("Pending", "PodStarting")


def test_running_pod_is_running_and_starts_the_clock() -> None:
    result, patch = evaluate(served(), job(), [running_pod(started=T1)])
    assert (result.phase, result.reason) == ("Running", "TrainerRunning")
    assert patch["startTime"] == T1  # when the trainer container started, not when seen
    assert conditions(patch)["Reconciling"] == "True"
    assert conditions(patch)["Running"] == "True"
    assert conditions(patch)["Ready"] == "False"


def test_succeeded() -> None:
    ftj = served(status={"phase": "Running", "startTime": T1, **TRAINER_STATUS})
    result, patch = evaluate(ftj, complete_job(), [terminated_pod(0, reason="Completed")])
    assert (result.phase, result.reason) == ("Succeeded", "Succeeded")
    assert "s3://outputs/support-lora" in result.message
    assert patch["completionTime"] == T2  # the Job's completionTime
    assert "startTime" not in patch  # unchanged
    assert conditions(patch) == {
        "Cancelled": "False",
        "Failed": "False",
        "Complete": "True",
        "Suspended": "False",
        "Running": "False",
        "Queued": "False",
        "Ready": "True",  # not served: complete is ready
        "Reconciling": "False",
        "Stalled": "False",
    }


def test_pod_done_before_the_job_notices_is_still_running() -> None:
    result = verdict(served(), job(), [terminated_pod(0, reason="Completed")])
    assert (result.phase, result.reason) == ("Running", "TrainerFinished")


# ---------------------------------------------------------------------------------- pending


def test_unschedulable_carries_the_schedulers_message() -> None:
    result = verdict(served(), job(), [unschedulable_pod()])
    assert (result.phase, result.reason) == ("Pending", "Unschedulable")
    assert "3 Insufficient nvidia.com/gpu" in result.message
    assert "gpus: 1 x nvidia.com/gpu" in result.message
    assert result.is_problem


@pytest.mark.parametrize(
    "kubelet_message",
    [
        'secret "s3-credentials" not found',
        "couldn't find key accessKey in Secret team-a/s3-credentials",
    ],
)
def test_missing_credentials_secret_names_the_secret_and_keys(kubelet_message: str) -> None:
    ftj = served(
        storage={
            "credentialsSecretRef": {
                "name": "s3-credentials",
                "accessKeyIdKey": "accessKey",
                "secretAccessKeyKey": "secretKey",
            }
        }
    )
    pods = [waiting_pod("CreateContainerConfigError", kubelet_message)]
    result = verdict(ftj, job(), pods)
    assert (result.phase, result.reason) == ("Pending", "CredentialsSecretMissing")
    assert kubelet_message in result.message
    assert "Create Secret s3-credentials in namespace team-a" in result.message
    assert "accessKey and secretKey" in result.message


def test_other_config_errors_are_reported_as_they_are() -> None:
    pods = [waiting_pod("CreateContainerConfigError", 'configmap "x" not found')]
    result = verdict(served(), job(), pods)
    assert (result.phase, result.reason) == ("Pending", "CreateContainerConfigError")
    assert 'configmap "x" not found' in result.message


@pytest.mark.parametrize("reason", ["ImagePullBackOff", "ErrImagePull"])
def test_image_pull_errors_name_the_image(reason: str) -> None:
    message = 'Back-off pulling image "registry.example/kubetune-trainer:v9"'
    pods = [waiting_pod(reason, message)]
    result = verdict(served(image="registry.example/kubetune-trainer:v9"), job(), pods)
    assert (result.phase, result.reason) == ("Pending", reason)
    assert "registry.example/kubetune-trainer:v9" in result.message
    assert "spec.image" in result.message


def test_a_failed_attempt_with_retries_left_is_retrying() -> None:
    first = terminated_pod(1, message="Traceback (most recent call last):\n  ...\nKeyError: 'x'")
    second = waiting_pod("ContainerCreating", "")
    second["metadata"]["creationTimestamp"] = T2
    second["metadata"]["name"] = "support-lora-train-second"
    result = verdict(served(), job(failed=1), [second, first])
    assert (result.phase, result.reason) == ("Pending", "PodStarting")  # the newest pod counts
    result = verdict(served(), job(failed=1, active=0), [first])
    assert (result.phase, result.reason) == ("Pending", "Retrying")
    assert "Attempt 1 of 3 failed (exit code 1: KeyError: 'x')" in result.message


def test_suspended_and_queued() -> None:
    result = verdict(served(suspend=True), job(suspend=True, active=0), [])
    assert (result.phase, result.reason) == ("Suspended", "Suspended")
    result = verdict(served(queueName="gpu-queue"), job(suspend=True, active=0), [])
    assert (result.phase, result.reason) == ("Queued", "WaitingForAdmission")
    assert "gpu-queue" in result.message
    # Kueue's reason, from the Workload, tells why it waits.
    waiting = {
        "type": "QuotaReserved",
        "status": "False",
        "reason": "Inadmissible",
        "message": "LocalQueue gpu-queue doesn't exist",
    }
    workload = {"status": {"conditions": [waiting]}}
    result = verdict(
        served(queueName="gpu-queue"), job(suspend=True, active=0), [], workload=workload
    )
    assert result.message == (
        "Waiting for Kueue to admit the job through LocalQueue gpu-queue: "
        "LocalQueue gpu-queue doesn't exist"
    )
    # Un-suspended in spec, the Job not yet: resuming.
    result = verdict(served(), job(suspend=True, active=0), [])
    assert (result.phase, result.reason) == ("Pending", "Resuming")


def test_suspended_job_is_neither_reconciling_nor_stalled() -> None:
    _, patch = evaluate(served(suspend=True), job(suspend=True, active=0), [])
    assert conditions(patch)["Reconciling"] == "False"
    assert conditions(patch)["Stalled"] == "False"


def test_missing_claim_blocks_the_job() -> None:
    blocker = status.Blocker("PVCNotFound", "PersistentVolumeClaim data does not exist")
    result, patch = evaluate(served(), None, [], blocker=blocker)
    assert (result.phase, result.reason) == ("Pending", "PVCNotFound")
    # Until the Job exists, another status computation keeps that reason.
    again = verdict(applied(served(), patch), None, [])
    assert (again.phase, again.reason) == ("Pending", "PVCNotFound")


# ----------------------------------------------------------------------------------- failed


def test_oom_killed_suggests_how_to_fit() -> None:
    ftj = served(resources={"memory": "16Gi"}, maxRetries=0)
    failed = failed_job("BackoffLimitExceeded", "Job has reached the specified backoff limit")
    oom = terminated_pod(137, reason="OOMKilled")
    result, patch = evaluate(ftj, failed, [oom])
    assert (result.phase, result.reason) == ("Failed", "OOMKilled")
    for hint in ("qlora", "batchSize", "maxSeqLength", "resources.memory", "16Gi"):
        assert hint in result.message
    assert conditions(patch)["Stalled"] == "True"
    assert conditions(patch)["Failed"] == "True"
    assert conditions(patch)["Reconciling"] == "False"
    assert patch["completionTime"] == T2


@pytest.mark.parametrize("code", sorted(exitcodes.REASONS))
def test_permanent_exit_code_reports_the_first_line_of_the_termination_message(code: int) -> None:
    message = "train.jsonl line 3: record has no 'messages' field\nsecond line\n"
    failed = failed_job(
        "PodFailurePolicy",
        "Container trainer for pod team-a/support-lora-train-x7k2p failed with exit code "
        f"{code} matching FailJob rule at index 1",
    )
    result = verdict(served(), failed, [terminated_pod(code, message=message)])
    assert (result.phase, result.reason) == ("Failed", exitcodes.REASONS[code])
    assert result.message == "train.jsonl line 3: record has no 'messages' field"


@pytest.mark.parametrize("code", sorted(exitcodes.PERMANENT))
def test_a_permanent_exit_is_failed_at_once_not_retrying_until_the_job_controller_says_so(
    code: int,
) -> None:
    # The trainer's pod has failed; the Job controller has not yet applied the Job's FailJob
    # rule (its Failed condition comes a moment later, seen on the real cluster: ~1 s).
    line = "data error: train.jsonl line 2: messages must contain at least one assistant message"
    pods = [terminated_pod(code, message=f"{line}\nmore")]
    result, patch = evaluate(served(), job(active=0), pods)
    assert (result.phase, result.reason) == ("Failed", exitcodes.REASONS[code])
    assert result.message == line
    assert patch["completionTime"] == T2  # when the trainer exited
    # Then the Job's own condition: the same status, nothing to patch, no second Event.
    condition = f"Container trainer for pod x failed with exit code {code} matching FailJob"
    later = failed_job("PodFailurePolicy", condition)
    again, patch_again = evaluate(applied(served(), patch), later, pods, now=LATER)
    assert (again.phase, again.reason, again.message) == (result.phase, result.reason, line)
    assert patch_again == {}


def test_a_disrupted_pod_is_retried_whatever_its_exit_code() -> None:
    # The Job's first rule ignores a pod with DisruptionTarget (preemption, eviction): the
    # controller replaces it without counting it, even when the trainer exited with a
    # permanent code, so the status must not call it failed.
    disrupted = terminated_pod(exitcodes.DATA_ERROR, message="data error: ...")
    disrupted["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
    ]
    result = verdict(served(), job(active=0), [disrupted])
    assert (result.phase, result.reason) == ("Pending", "Retrying")


@pytest.mark.parametrize(
    ("rule", "container", "code", "action"),
    [
        ({"operator": "In", "values": [65]}, "trainer", 65, "FailJob"),
        ({"operator": "In", "values": [65]}, "trainer", 1, None),
        ({"operator": "NotIn", "values": [65]}, "trainer", 1, "FailJob"),
        ({"operator": "NotIn", "values": [65]}, "trainer", 0, None),  # exit 0 never matches
        ({"operator": "In", "values": [65], "containerName": "trainer"}, "sidecar", 65, None),
        ({"operator": "In", "values": [65], "containerName": "trainer"}, "trainer", 65, "FailJob"),
    ],
)
def test_pod_failure_policy_rules_match_as_the_job_controller_matches_them(
    rule: Obj, container: str, code: int, action: str | None
) -> None:
    failed = terminated_pod(code)
    failed["status"]["containerStatuses"][0]["name"] = container
    policy = {"rules": [{"action": "FailJob", "onExitCodes": rule}]}
    assert status.pod_failure_action(policy, failed) == action
    # An init container's exit code is matched too; no policy matches nothing.
    init = {"status": {"initContainerStatuses": failed["status"]["containerStatuses"]}}
    assert status.pod_failure_action(policy, init) == action
    assert status.pod_failure_action(None, failed) is None


def test_permanent_exit_code_without_message_still_says_what_happened() -> None:
    failed = failed_job("PodFailurePolicy", "matching FailJob rule")
    result = verdict(served(), failed, [terminated_pod(exitcodes.CONFIG_ERROR)])
    assert (result.phase, result.reason) == ("Failed", "ConfigError")
    assert str(exitcodes.CONFIG_ERROR) in result.message


def test_deadline_exceeded_points_at_the_timeout() -> None:
    failed = failed_job("DeadlineExceeded", "Job was active longer than specified deadline")
    result = verdict(served(timeout="1h30m"), failed, [])
    assert (result.phase, result.reason) == ("Failed", "DeadlineExceeded")
    assert "spec.timeout (1h30m)" in result.message


def test_backoff_limit_exceeded_quotes_the_last_attempt() -> None:
    traceback = (
        'Traceback (most recent call last):\n  File "train.py", line 1\n'
        "RuntimeError: CUDA error: an illegal memory access was encountered\n"
    )
    pods = [
        terminated_pod(1, message="Traceback (most recent call last):\nValueError: first"),
        terminated_pod(1, message=traceback, name="support-lora-train-b", created=T1),
        terminated_pod(1, message=traceback, name="support-lora-train-c", created=T2),
    ]
    failed = failed_job("BackoffLimitExceeded", "Job has reached the specified backoff limit", 3)
    result = verdict(served(), failed, pods)
    assert (result.phase, result.reason) == ("Failed", "BackoffLimitExceeded")
    assert "failed 3 time(s), more than spec.maxRetries (2) allows" in result.message
    assert "exit code 1: RuntimeError: CUDA error: an illegal memory access" in result.message
    assert "kubectl logs job/support-lora-train" in result.message


def test_other_job_failures_keep_the_job_controllers_words() -> None:
    failed = failed_job("MaxFailedIndexesExceeded", "Job has exceeded maxFailedIndexes")
    result = verdict(served(), failed, [])
    assert (result.phase, result.reason) == ("Failed", "MaxFailedIndexesExceeded")
    assert result.message == "Job has exceeded maxFailedIndexes"


def test_invalid_spec_fails_for_good() -> None:
    ftj = served()
    result, patch = status.status_patch(ftj, None, [], NOW, spec=None, spec_error="spec.x: bad")
    assert (result.phase, result.reason) == ("Failed", "InvalidSpec")
    assert result.message == "Invalid spec: spec.x: bad"
    assert conditions(patch)["Stalled"] == "True"


# -------------------------------------------------------------------------------- cancelled


def test_foreground_deletion_is_cancelled() -> None:
    ftj = served(status={"phase": "Running"})
    ftj["metadata"]["deletionTimestamp"] = T2
    result, patch = evaluate(ftj, job(), [running_pod()])
    assert (result.phase, result.reason) == ("Cancelled", "Deleting")
    assert conditions(patch)["Reconciling"] == "False"
    assert "completionTime" in patch


def test_deleted_job_cancels_and_is_not_recreated() -> None:
    ftj = served(status={"phase": "Running", "jobName": "support-lora-train"})
    result = verdict(ftj, None, [])
    assert (result.phase, result.reason) == ("Cancelled", "JobDeleted")


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_terminal_phases_are_final(phase: str) -> None:
    # Deleted afterwards, with the Job gone: still what it was, not Cancelled.
    ftj = served(status={"phase": phase, "reason": "Because", "message": "done"})
    ftj["metadata"]["deletionTimestamp"] = T2
    result = verdict(ftj, None, [])
    assert (result.phase, result.reason, result.message) == (phase, "Because", "done")
    # And a running pod (say, a Job recreated by hand) does not revive it.
    result = verdict(ftj, job(), [running_pod()])
    assert (result.phase, result.reason) == (phase, "Because")


def test_cancelled_stays_cancelled() -> None:
    ftj = served(status={"phase": "Cancelled", "reason": "JobDeleted", "jobName": "x"})
    assert verdict(ftj, job(), [running_pod()]).phase == "Cancelled"


# --------------------------------------------------------------------- conditions and patches


def test_nothing_changed_means_no_patch() -> None:
    ftj = served()
    _, patch = evaluate(ftj, job(), [running_pod()])
    ftj = applied(ftj, patch)
    # Much later, the same observations: nothing to send, timestamps untouched.
    _, again = evaluate(ftj, job(), [running_pod()], now=LATER)
    assert again == {}


def test_last_transition_time_moves_only_with_the_status() -> None:
    ftj = applied(served(), evaluate(served(), job(), [running_pod()])[1])
    before = {c["type"]: c for c in ftj["status"]["conditions"]}
    _, patch = evaluate(ftj, complete_job(), [terminated_pod(0, reason="Completed")], now=LATER)
    after = {c["type"]: c for c in patch["conditions"]}
    stamp = status.rfc3339(LATER)
    assert after["Ready"]["lastTransitionTime"] == stamp  # False -> True
    assert after["Reconciling"]["lastTransitionTime"] == stamp  # True -> False
    for kind in ("Failed", "Stalled"):  # False -> False: reason changed, not the status
        assert after[kind]["lastTransitionTime"] == before[kind]["lastTransitionTime"]
        assert after[kind]["reason"] == "Succeeded"


def test_reason_change_within_a_phase_patches_only_what_changed() -> None:
    ftj = applied(served(), evaluate(served(), job(), [unschedulable_pod()])[1])
    _, patch = evaluate(ftj, job(), [waiting_pod("ContainerCreating", "")], now=LATER)
    assert set(patch) == {"reason", "message", "conditions"}
    assert patch["reason"] == "PodStarting"


def test_observed_generation_follows_the_spec() -> None:
    ftj = applied(served(), evaluate(served(), job(), [running_pod()])[1])
    ftj["metadata"]["generation"] = 2  # e.g. maxRetries changed
    _, patch = evaluate(ftj, job(), [running_pod()], now=LATER)
    assert set(patch) == {"observedGeneration", "conditions"}
    assert patch["observedGeneration"] == 2
    assert {c["observedGeneration"] for c in patch["conditions"]} == {2}
    times = {c["type"]: c["lastTransitionTime"] for c in ftj["status"]["conditions"]}
    assert {c["type"]: c["lastTransitionTime"] for c in patch["conditions"]} == times


def test_trainer_fields_are_never_written() -> None:
    ftj = served(status={"phase": "Running", **TRAINER_STATUS})
    for job_body, pods in [
        (job(), [running_pod()]),
        (complete_job(), [terminated_pod(0, reason="Completed")]),
        (failed_job("BackoffLimitExceeded", "x"), [terminated_pod(137, reason="OOMKilled")]),
    ]:
        _, patch = evaluate(ftj, job_body, pods)
        assert set(patch) <= set(status.OWNED_FIELDS)
        assert not set(patch) & set(TRAINER_STATUS)


def test_other_conditions_are_kept() -> None:
    foreign = {
        "type": "example.com/Audited",
        "status": "True",
        "lastTransitionTime": T1,
        "reason": "Seen",
        "message": "",
    }
    ftj = served(status={"conditions": [foreign]})
    _, patch = evaluate(ftj, job(), [running_pod()])
    assert patch["conditions"][-1] == foreign
    n = len(status.CONDITION_TYPES)
    assert [c["type"] for c in patch["conditions"][:n]] == list(status.CONDITION_TYPES)


def test_the_retired_succeeded_condition_is_replaced_by_complete() -> None:
    old = {"type": "Succeeded", "status": "True", "lastTransitionTime": T1, "reason": "Succeeded",
           "message": ""}  # fmt: skip
    ftj = served(status={"phase": "Running", "conditions": [old]})
    _, patch = evaluate(ftj, complete_job(), [terminated_pod(0, reason="Completed")])
    assert "Succeeded" not in conditions(patch) and conditions(patch)["Complete"] == "True"


# ----------------------------------------------------- phase derived, Ready means usable

PHASES: list[str] = ["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed",
                     "Cancelled"]  # fmt: skip


@pytest.mark.parametrize("phase", PHASES)
def test_the_phase_is_derived_from_the_conditions(phase: str) -> None:
    verdict = status.Verdict(phase, "Why", "what")  # type: ignore[arg-type]
    conds = status.conditions(verdict, 1, [], NOW)
    assert status.phase_of(conds) == phase
    true = [c["type"] for c in conds if c["status"] == "True"]
    states = [kind for kind, _ in status.STATE_CONDITIONS]
    assert len([t for t in true if t in states]) == (0 if phase == "Pending" else 1)


def _succeeded(serving: dict[str, Any] | None, enabled: bool = True) -> Obj:
    ftj = served(status={"phase": "Running", "startTime": T1, **TRAINER_STATUS})
    ftj["spec"]["serving"] = {"enabled": enabled}
    if serving is not None:
        ftj["status"]["serving"] = serving
    return ftj


def test_a_served_job_is_ready_only_once_its_adapter_is_served() -> None:
    done = (complete_job(), [terminated_pod(0, reason="Completed")])
    waiting, patch = evaluate(_succeeded({"phase": "Loading", "reason": "AdapterLoading",
                                          "message": "loading"}), *done)  # fmt: skip
    assert waiting.phase == "Succeeded" and patch["phase"] == "Succeeded"
    by_type = {c["type"]: c for c in patch["conditions"]}
    assert by_type["Complete"]["status"] == "True"
    assert by_type["Ready"]["status"] == "False" and by_type["Ready"]["reason"] == "AdapterLoading"
    assert by_type["Reconciling"]["status"] == "True"  # kstatus: still in progress
    _, patch = evaluate(_succeeded({"phase": "Serving", "message": "served as m"}), *done)
    by_type = {c["type"]: c for c in patch["conditions"]}
    assert by_type["Ready"]["status"] == "True" and by_type["Ready"]["message"] == "served as m"
    assert by_type["Reconciling"]["status"] == "False"
    # Serving impossible: Complete, not Ready, not progressing either.
    _, patch = evaluate(_succeeded({"phase": "NotServed", "reason": "NoServer"}), *done)
    assert (conditions(patch)["Ready"], conditions(patch)["Reconciling"]) == ("False", "False")


def test_ready_is_stale_when_serving_changed_after_the_status_was_written() -> None:
    done = (complete_job(), [terminated_pod(0, reason="Completed")])
    ftj = _succeeded({"phase": "Loading"})
    ftj = applied(ftj, evaluate(ftj, *done)[1])
    assert not status.ready_stale(ftj)
    ftj["status"]["serving"] = {"phase": "Serving", "message": "served"}
    assert status.ready_stale(ftj)
    ftj = applied(ftj, evaluate(ftj, *done, now=LATER)[1])
    assert not status.ready_stale(ftj)
    assert conditions(ftj["status"])["Ready"] == "True"
    assert not status.ready_stale(served(status={"phase": "Running"}))


def test_start_time_is_set_once() -> None:
    ftj = served(status={"startTime": T1})
    later_pod = running_pod(started=T2)
    _, patch = evaluate(ftj, job(failed=1), [later_pod])
    assert "startTime" not in patch


def test_status_fits_the_api_schema() -> None:
    for job_body, pods in [
        (None, []),
        (job(), [unschedulable_pod()]),
        (job(), [running_pod()]),
        (complete_job(), [terminated_pod(0, reason="Completed")]),
        (failed_job("BackoffLimitExceeded", "x"), [terminated_pod(137, reason="OOMKilled")]),
    ]:
        _, patch = evaluate(served(), job_body, pods)
        FineTuneStatus.model_validate(patch)
        assert len(patch["message"]) <= status.MESSAGE_LIMIT


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("bad data\nmore", "bad data"),
        ("\n\n  leading blank lines\n", "leading blank lines"),
        ("Traceback (most recent call last):\n  File x\nValueError: boom\n", "ValueError: boom"),
        ("step 10 loss 1.2\nTraceback (most recent call last):\nKeyError: 'x'", "KeyError: 'x'"),
        ("", ""),
        (None, ""),
    ],
)
def test_first_line(text: str | None, line: str) -> None:
    assert status.first_line(text) == line


def test_pod_without_container_status_is_starting() -> None:
    result = verdict(served(), job(), [pod()])
    assert (result.phase, result.reason) == ("Pending", "PodStarting")


def test_terminal_details_improve_within_the_same_phase() -> None:
    # The Job controller marks the Job failing before it counts the last failed pod.
    early = failed_job("BackoffLimitExceeded", "backoff", failed=1)
    pods = [
        terminated_pod(1, message="boom"),
        terminated_pod(1, message="boom", name="support-lora-train-b", created=T1),
    ]
    ftj = served(maxRetries=1)
    first, patch = evaluate(ftj, early, pods)
    assert "failed 2 time(s)" in first.message  # counted from the pods
    late = failed_job("BackoffLimitExceeded", "backoff", failed=2)
    second, again = evaluate(applied(ftj, patch), late, pods, now=LATER)
    assert second.phase == "Failed" and again == {}


def test_uncounted_failures_count() -> None:
    pending = job(failed=0, active=0)
    pending["status"]["uncountedTerminatedPods"] = {"failed": ["uid-1"]}
    result = verdict(served(), pending, [terminated_pod(1, message="boom")])
    assert "Attempt 1 of 3 failed (exit code 1: boom)" in result.message


def test_a_pod_being_deleted_is_neither_the_trainer_nor_a_failed_attempt() -> None:
    # Resumed after a suspend: the old pod (killed, exit 143) is still being deleted.
    stopping = terminated_pod(143, name="support-lora-train-old")
    stopping["metadata"]["deletionTimestamp"] = T2
    result = verdict(served(), job(active=0), [stopping])
    assert (result.phase, result.reason) == ("Pending", "PodStopping")
    assert "support-lora-train-old is stopping" in result.message
    # Its replacement runs: that one is the trainer.
    fresh = running_pod(name="support-lora-train-new", created=T1)
    result = verdict(served(), job(), [stopping, fresh])
    assert (result.phase, result.reason) == ("Running", "TrainerRunning")
    assert "support-lora-train-new" in result.message


# --------------------------------------------------------------------- cancel and refusals


def test_cancel_before_the_job_exists_is_cancelled_at_once() -> None:
    result, patch = evaluate(served(cancel=True), None, [])
    assert (result.phase, result.reason) == ("Cancelled", "CancelRequested")
    assert "s3://outputs/support-lora" in result.message
    assert patch["completionTime"]


def test_cancel_of_a_running_job_is_final_even_while_its_pod_stops() -> None:
    ftj = served(cancel=True, status={"phase": "Running", "startTime": T1})
    result, patch = evaluate(ftj, job(suspend=True, active=0), [running_pod()])
    assert (result.phase, result.reason) == ("Cancelled", "CancelRequested")
    # The stopping pod's exit (143, a retriable code) changes nothing afterwards.
    stopped = terminated_pod(143, message="preempted: stopped by SIGTERM")
    after = applied(ftj, patch)
    assert verdict(after, job(suspend=True, active=0), [stopped]).phase == "Cancelled"


def test_a_job_that_completed_before_the_cancel_stays_succeeded() -> None:
    result = verdict(served(cancel=True), complete_job(), [terminated_pod(0)])
    assert result.phase == "Succeeded"


@pytest.mark.parametrize(
    ("code", "detail", "phase", "reason"),
    [
        (422, 'Job.batch "x" is invalid: spec.template.spec.nodeSelector: Invalid value', "Failed",
         "InvalidSpec"),
        (403, 'jobs.batch "x" is forbidden: exceeded quota: jobs, requested: count/jobs.batch=1',
         "Pending", "QuotaExceeded"),
        (403, 'admission webhook "policy.example.com" denied the request: no GPUs on Fridays',
         "Pending", "Forbidden"),
        (500, "something odd", "Failed", "CreateFailed"),
    ],
)  # fmt: skip
def test_a_refused_child_is_explained_in_the_status(
    code: int, detail: str, phase: str, reason: str
) -> None:
    blocker = status.creation_blocker("Job", "support-lora-train", "team-a", code, detail)
    result, patch = evaluate(served(), None, [], blocker=blocker)
    assert (result.phase, result.reason) == (phase, reason)
    assert detail in result.message and "Job support-lora-train" in result.message
    assert result.is_problem  # a Warning Event, not only a log line
    assert conditions(patch)["Stalled"] == ("True" if phase == "Failed" else "False")


@pytest.mark.parametrize(
    ("detail", "reason", "hint"),
    [
        ('Error creating: pods "x" is forbidden: exceeded quota: gpu, requested: '
         "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=1, limited: "
         "requests.nvidia.com/gpu=1", "QuotaExceeded", "ResourceQuota"),
        ('Error creating: pods "x" is forbidden: no PriorityClass with name training-low was '
         "found", "PriorityClassNotFound", "priorityClassName"),
        ('Error creating: pods "x" is forbidden: violates PodSecurity "restricted:latest"',
         "PodSecurityViolation", "Pod Security"),
        ("Error creating: something else", "PodCreateFailed", "something else"),
    ],
)  # fmt: skip
def test_a_job_that_cannot_create_its_pod_says_why(detail: str, reason: str, hint: str) -> None:
    blocker = status.pod_creation_blocker("support-lora-train", "team-a", detail)
    result = verdict(served(), job(active=0), [], blocker=blocker)
    assert (result.phase, result.reason) == ("Pending", reason)
    assert hint in result.message and result.is_problem
    # Once a pod exists the pod's own state is the story again.
    assert verdict(served(), job(), [running_pod()], blocker=blocker).reason == "TrainerRunning"


def test_an_unreachable_store_fails_with_its_own_reason_after_the_retries() -> None:
    line = "storage unreachable: cannot reach the S3 endpoint http://minio:9 (connection refused)"
    failed = failed_job("BackoffLimitExceeded", "Job has reached the specified backoff limit", 3)
    pods = [terminated_pod(exitcodes.STORAGE_UNREACHABLE, message=line)]
    result = verdict(served(), failed, pods)
    assert (result.phase, result.reason) == ("Failed", "StorageUnreachable")
    assert result.message.startswith(line) and "3 time(s)" in result.message


def test_a_retried_storage_outage_is_named_while_retrying() -> None:
    line = "storage unreachable: cannot reach the S3 endpoint http://minio:9 (connection refused)"
    pods = [terminated_pod(exitcodes.STORAGE_UNREACHABLE, message=line)]
    result = verdict(served(), job(failed=1, active=0), pods)
    assert (result.phase, result.reason) == ("Pending", "Retrying")
    assert line in result.message


# ----------------------------------------------------------------------------- multi-node gangs


def gang_pod(index: int, base: Obj, suffix: str = "a", created: str = T0) -> Obj:
    """A pod of a multi-node job's Indexed Job: completion index annotation, name with index."""
    member = copy.deepcopy(base)
    member["metadata"]["name"] = f"support-lora-train-{index}-{suffix}{index}xyz"[:30]
    member["metadata"]["creationTimestamp"] = created
    member["metadata"]["annotations"] = {"batch.kubernetes.io/job-completion-index": str(index)}
    return member


GANG = {"resources": {"gpus": 0, "nodes": 2, "processesPerNode": 2}}


def test_a_gang_runs_when_every_pod_runs_and_says_how_many_processes() -> None:
    ftj = served(**GANG)
    result = verdict(ftj, job(active=2), [gang_pod(0, running_pod()), gang_pod(1, waiting_pod(
        "ContainerCreating", ""))])  # fmt: skip
    assert (result.phase, result.reason) == ("Pending", "PodStarting")
    result = verdict(ftj, job(active=2), [gang_pod(0, running_pod()), gang_pod(1, running_pod())])
    assert (result.phase, result.reason) == ("Running", "TrainerRunning")
    assert "2 pods, 4 processes" in result.message
    assert "support-lora-train-0-" in result.message  # rank 0's pod reports the progress
    result = verdict(ftj, job(active=1), [gang_pod(0, running_pod())])
    assert (result.phase, result.reason) == ("Pending", "WaitingForPod")
    assert "1 of 2 training pods" in result.message


def test_a_gang_names_the_pod_that_failed_not_the_peers_that_lost_it() -> None:
    ftj = served(**GANG)
    line = "storage unreachable: cannot reach the S3 endpoint http://minio:9"
    down = gang_pod(1, terminated_pod(exitcodes.STORAGE_UNREACHABLE, message=line))
    lost = gang_pod(0, terminated_pod(exitcodes.PEER_LOST, message="a peer process is gone"),
                    created=T1)  # fmt: skip
    result = verdict(ftj, job(failed=1, active=0), [down, lost])
    assert (result.phase, result.reason) == ("Pending", "Retrying")
    assert down["metadata"]["name"] in result.message
    assert f"exit code 75: {line}" in result.message
    assert "the 2 pods restart together" in result.message
    # A permanent exit fails the gang at once, whatever its peers did.
    oom = gang_pod(1, terminated_pod(exitcodes.OUT_OF_MEMORY, message="out of host memory: ..."))
    result = verdict(ftj, job(failed=1, active=0), [oom, lost])
    assert (result.phase, result.reason) == ("Failed", "OutOfMemory")
    assert result.message == "out of host memory: ..."
    # Out of retries: the reason is the root failure's, not PeerLost's.
    crash = gang_pod(
        1, terminated_pod(1, message="Traceback (most recent call last):\nKeyError: 'x'")
    )
    failed = failed_job("BackoffLimitExceeded", "Job has reached the specified backoff limit", 3)
    result = verdict(ftj, failed, [crash, lost])
    assert (result.phase, result.reason) == ("Failed", "BackoffLimitExceeded")
    assert "KeyError: 'x'" in result.message
    data = gang_pod(1, terminated_pod(exitcodes.DATA_ERROR, message="data error: line 3"))
    failed = failed_job("PodFailurePolicy", "Container trainer for pod ... exit code 65")
    result = verdict(ftj, failed, [data, lost])
    assert (result.phase, result.reason) == ("Failed", "DataError")


def test_the_root_failure_is_the_newest_with_a_reason_of_its_own() -> None:
    lost = terminated_pod(exitcodes.PEER_LOST, name="b")
    own = terminated_pod(1, name="a")
    assert status.root_failed_pod([own, lost]) is own
    assert status.root_failed_pod([lost]) is lost
    assert status.root_failed_pod([]) is None
