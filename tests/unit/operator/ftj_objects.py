"""Realistic API objects for the operator's unit tests: a FineTuneJob as the API server returns it
(defaults applied, metadata filled in), and its Job and pods in the states the Job controller,
scheduler and kubelet put them in (field names and messages as a v1.3x cluster writes them)."""

from __future__ import annotations

import copy
from typing import Any

from invalid_manifests import VALID_MANIFEST

from kubetune_operator import manifests
from kubetune_trainer.api import FineTuneSpec

Obj = dict[str, Any]

NAMESPACE = "team-a"
UID = "6f1c1f0e-6d0b-4a55-9c53-3d0f4d3d2a10"
JOB_UID = "0b7a7a39-9d0e-4f1f-8f7e-6b1b3f2a9c01"
T0 = "2026-01-01T10:00:00Z"
T1 = "2026-01-01T10:00:05Z"
T2 = "2026-01-01T10:30:00Z"


def served(
    manifest: Obj | None = None,
    *,
    name: str = "support-lora",
    generation: int = 1,
    status: Obj | None = None,
    **spec_patch: Any,
) -> Obj:
    """A FineTuneJob as read back from the API server: spec defaulted, metadata filled in."""
    ftj = copy.deepcopy(manifest or VALID_MANIFEST)
    spec = {**ftj["spec"], **spec_patch}
    ftj["spec"] = FineTuneSpec.model_validate(spec).model_dump(
        by_alias=True, exclude_none=True, mode="json"
    )
    ftj["metadata"] = {
        "name": name,
        "namespace": NAMESPACE,
        "uid": UID,
        "generation": generation,
        "creationTimestamp": T0,
        "resourceVersion": "1234",
    }
    if status is not None:
        ftj["status"] = status
    return ftj


def job(
    name: str = "support-lora-train",
    *,
    conditions: list[Obj] | None = None,
    suspend: bool = False,
    failed: int = 0,
    active: int = 1,
    completion_time: str | None = None,
) -> Obj:
    status: Obj = {"startTime": T0, "active": active, "failed": failed, "ready": 0}
    if conditions:
        status["conditions"] = conditions
    if completion_time:
        status["completionTime"] = completion_time
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": JOB_UID,
            "ownerReferences": [
                {
                    "apiVersion": "kubetune.dev/v1alpha1",
                    "kind": "FineTuneJob",
                    "name": "support-lora",
                    "uid": UID,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        # The operator's own pod failure policy, as the Job controller reads it.
        "spec": {
            "suspend": suspend,
            "backoffLimit": 2,
            "podFailurePolicy": manifests.pod_failure_policy(),
        },
        "status": status,
    }


def job_condition(kind: str, reason: str, message: str, at: str = T2) -> Obj:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": at,
        "lastTransitionTime": at,
    }


def complete_job() -> Obj:
    reached = "Reached expected number of succeeded pods"
    return job(
        conditions=[
            job_condition("SuccessCriteriaMet", "CompletionsReached", reached),
            job_condition("Complete", "CompletionsReached", reached),
        ],
        active=0,
        completion_time=T2,
    )


def failed_job(reason: str, message: str, failed: int = 1) -> Obj:
    return job(
        conditions=[
            job_condition("FailureTarget", reason, message),
            job_condition("Failed", reason, message),
        ],
        failed=failed,
        active=0,
    )


def pod(
    name: str = "support-lora-train-x7k2p",
    *,
    phase: str = "Pending",
    state: Obj | None = None,
    conditions: list[Obj] | None = None,
    created: str = T0,
    image: str = "ghcr.io/kubetune/trainer:0.1.0",
) -> Obj:
    status: Obj = {"phase": phase, "conditions": conditions or []}
    if state is not None:
        status["containerStatuses"] = [
            {
                "name": "trainer",
                "image": image,
                "imageID": "",
                "ready": "running" in state,
                "started": "running" in state,
                "restartCount": 0,
                "state": state,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "creationTimestamp": created,
            "labels": {"batch.kubernetes.io/controller-uid": JOB_UID},
        },
        "status": status,
    }


def unschedulable_pod() -> Obj:
    message = (
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are "
        "available: 3 No preemption victims found for incoming pod."
    )
    return pod(
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastProbeTime": None,
                "lastTransitionTime": T0,
            }
        ]
    )


def waiting_pod(reason: str, message: str) -> Obj:
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": T0}
    return pod(state={"waiting": {"reason": reason, "message": message}}, conditions=[scheduled])


def running_pod(started: str = T1, **kwargs: Any) -> Obj:
    return pod(phase="Running", state={"running": {"startedAt": started}}, **kwargs)


def terminated_pod(
    exit_code: int,
    *,
    reason: str = "Error",
    message: str | None = None,
    name: str = "support-lora-train-x7k2p",
    created: str = T0,
) -> Obj:
    terminated: Obj = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": T1,
        "finishedAt": T2,
        "containerID": "containerd://1",
    }
    if message is not None:
        terminated["message"] = message
    phase = "Succeeded" if exit_code == 0 else "Failed"
    return pod(name=name, phase=phase, state={"terminated": terminated}, created=created)
