"""Kopf handlers: a decorator and one call each into reconcile.py.

FineTuneJob lifecycle
- create / resume (operator start): ensure the children exist, report status;
- update of spec: carry mutable settings (maxRetries, timeout, queueName) into the Job and the
  trainer config; spec.suspend: suspend or resume the Job;
- delete: nothing to clean up. Every child has an owner reference to the FineTuneJob, so the
  garbage collector deletes the Job (and with it the pods) and the rest; the operator holds no
  external resources (no buckets, no cloud objects) that would need a finalizer, and a finalizer
  would block namespace deletion whenever the operator is down. The optional delete handler only
  marks the job Cancelled while a foreground deletion waits for the training pod to stop.

Status is level-based: every event of one of our Jobs or pods (server-side label filter, see
settings.configure_kopf) recomputes the owning FineTuneJob's status from the current objects, as
Kopf's in-memory indices hold them (no GET, no LIST: see reconcile.py). No timers, no polling.
Handlers are coroutines: Kopf runs plain functions in a thread pool, one hand-off per event.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import kopf

from kubetune_operator import metrics, observed, reconcile, serving_reconcile, status
from kubetune_operator.kube import Kube
from kubetune_operator.kube import login as kube_login
from kubetune_operator.manifests import ftj_name_of
from kubetune_operator.persistence import MemoryDiffBase
from kubetune_operator.settings import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    OperatorSettings,
    configure_kopf,
    load_settings,
)
from kubetune_trainer.api import GROUP, PLURAL, VERSION
from kubetune_trainer.serving import SERVER_LABEL

FTJ = (GROUP, VERSION, PLURAL)
OURS = {MANAGED_BY_LABEL: MANAGED_BY}
KUEUE_WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")
SERVERS = {SERVER_LABEL: kopf.PRESENT}
# A job waiting to be served is looked at this often (the agent's state is read with a GET).
SERVING_CHECK_INTERVAL = 5.0
# The Job controller tries to create the pod at once, and posts FailedCreate when it cannot.
POD_CHECK_DELAY = 3.0
POD_CHECK_INTERVAL = 15.0


def _ftj(body: kopf.Body) -> dict[str, Any]:
    """What the reconcile functions read of the FineTuneJob Kopf delivered: a slim copy that
    shares spec and status with the event (a full deep copy per waiting handler was the largest
    part of the operator's memory under a burst of FineTuneJobs)."""
    return observed.slim_ftj(body)


def _operator(memo: kopf.Memo) -> reconcile.Operator:
    op = memo.get("operator")
    if not isinstance(op, reconcile.Operator):
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return op


def identity() -> str:
    """This replica's name in Events: the pod name in a cluster, else the host name."""
    return os.environ.get("POD_ID") or os.environ.get("HOSTNAME") or socket.gethostname()


@kopf.on.login()
def log_in(settings: kopf.OperatorSettings, logger: Any, **_: Any) -> kopf.ConnectionInfo:
    """Kopf's credentials and the operator's own client's come from one place (kube.login)."""
    return kube_login(settings, logger)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    ours = memo.get("settings")
    if not isinstance(ours, OperatorSettings):
        ours = load_settings()
    configure_kopf(settings, ours, identity())
    memo["diffbase"] = settings.persistence.diffbase_storage
    kube = await Kube.connect(settings, logger)
    await reconcile.check_crd(kube)
    if ours.peering_name:
        await reconcile.ensure_peering(kube, ours)
    metrics.serve(ours.metrics_port)
    memo["operator"] = reconcile.Operator(settings=ours, kube=kube)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    op = memo.get("operator")
    if isinstance(op, reconcile.Operator):
        await op.kube.close()


# ------------------------------------------------------------------- in-memory indices
# Slim copies of what the watches deliver (observed.py), keyed by (namespace, FineTuneJob name):
# status is computed from these instead of GETs and LISTs. Kopf fills them before it calls any
# handler, also at start-up, so a handler never sees a half-listed cluster.


@kopf.index(*FTJ)
async def ftj_index(namespace: str | None, name: str | None, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, name): observed.slim_ftj(body)}


@kopf.index("batch", "v1", "jobs", labels=OURS)
async def job_index(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    name = ftj_name_of(body)
    return {(namespace, name): observed.slim_job(body)} if name else None


@kopf.index("v1", "pods", labels=OURS)
async def pod_index(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    name = ftj_name_of(body)
    return {(namespace, name): observed.slim_pod(body)} if name else None


# Kueue's Workloads (spec.queueName): why a queued job waits. Workloads carry no labels of ours,
# so this watch sees every Workload in the watched namespaces and keeps only those of our Jobs.
# Where Kueue is not installed Kopf logs once that the resource is unresolved and serves the rest.
@kopf.index(*KUEUE_WORKLOADS)
async def workload_index(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    name = observed.workload_ftj_name(body)
    return {(namespace, name): observed.slim_workload(body)} if name else None


# vLLM servers (serving_reconcile.py): their Deployments and pods, keyed by (namespace, server).
@kopf.index("apps", "v1", "deployments", labels=SERVERS)
async def server_index(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    name = (body.metadata.labels or {}).get(SERVER_LABEL)
    return {(namespace, name): observed.slim_deployment(body)} if name else None


@kopf.index("v1", "pods", labels=SERVERS)
async def server_pod_index(namespace: str | None, body: kopf.Body, **_: Any) -> Any:
    name = (body.metadata.labels or {}).get(SERVER_LABEL)
    return {(namespace, name): observed.slim_pod(body)} if name else None


def _serving_seen(kwargs: Mapping[str, Any]) -> serving_reconcile.ServingSeen:
    return serving_reconcile.ServingSeen(
        ftjs=kwargs["ftj_index"],
        deployments=kwargs["server_index"],
        pods=kwargs["server_pod_index"],
    )


async def _serve(
    memo: kopf.Memo, namespace: str, kwargs: Mapping[str, Any], *, throttle: bool = False
) -> None:
    op = _operator(memo)
    async with metrics.timed("serving"):
        await serving_reconcile.reconcile_namespace(
            op.kube, op.settings, op.serving, namespace, _serving_seen(kwargs), throttle=throttle
        )


def _seen(kwargs: Mapping[str, Any]) -> reconcile.Observed:
    return reconcile.Observed(
        ftjs=kwargs["ftj_index"],
        jobs=kwargs["job_index"],
        pods=kwargs["pod_index"],
        workloads=kwargs["workload_index"],
    )


# -------------------------------------------------------------------------- FineTuneJobs


# Creation: a FineTuneJob never handled, or one whose handler awaits a retry. Resuming: one an
# operator handled before this process started. Both are level-based: whatever of the children
# is missing is created, and an existing Job follows the spec (persistence.py says why).
@kopf.on.create(*FTJ)
async def created(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    async with metrics.timed("create"):
        await _reconcile(_operator(memo), _ftj(body), _seen(kwargs))


@kopf.on.resume(*FTJ)
async def resumed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    async with metrics.timed("resume"):
        await _reconcile(_operator(memo), _ftj(body), _seen(kwargs))


async def _reconcile(op: reconcile.Operator, ftj: dict[str, Any], seen: reconcile.Observed) -> None:
    await reconcile.ensure_children(op, ftj, seen)
    await reconcile.follow_spec(op, ftj, seen)


@kopf.on.update(*FTJ, field="spec")
async def spec_changed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    async with metrics.timed("update"):
        await reconcile.apply_spec_change(_operator(memo), _ftj(body), _seen(kwargs))


# An update handler, not on.field: at creation the Job is created with the right suspend
# already, and a second creation handler would cost Kopf a second handling cycle (and patch).
@kopf.on.update(*FTJ, field="spec.suspend")
async def suspend_changed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    async with metrics.timed("suspend"):
        await reconcile.apply_suspend(_operator(memo), _ftj(body), _seen(kwargs))


# spec.cancel suspends the Job for good (the phase becomes Cancelled).
@kopf.on.update(*FTJ, field="spec.cancel")
async def cancel_changed(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    async with metrics.timed("cancel"):
        await reconcile.apply_suspend(_operator(memo), _ftj(body), _seen(kwargs))


def _waiting_for_pod(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == "Pending" and status.get("reason") == "WaitingForPod"


# Only while a job waits for its pod (a timer per such job, none otherwise): a Job whose pod
# cannot be created leaves no trace but a FailedCreate Event, which this puts into the status.
@kopf.timer(*FTJ, interval=POD_CHECK_INTERVAL, initial_delay=POD_CHECK_DELAY, when=_waiting_for_pod)
async def pod_creation_check(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    meta = body.metadata
    async with metrics.timed("pod-check"):
        await reconcile.check_pod_creation(
            _operator(memo), meta.namespace or "", meta.name or "", _seen(kwargs)
        )


@kopf.on.delete(*FTJ, optional=True)
async def deleting(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    async with metrics.timed("delete"):
        meta = body.metadata
        await reconcile.sync_status(
            _operator(memo),
            meta.namespace or "",
            meta.name or "",
            ftj=_ftj(body),
            seen=_seen(kwargs),
        )


@kopf.on.event(*FTJ)
async def ftj_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    metrics.TRACKER.observe(type, body)
    op = memo.get("operator")
    if type == "DELETED" and isinstance(op, reconcile.Operator):
        op.forget(body.metadata.namespace or "", body.metadata.name or "")
        diffbase = memo.get("diffbase")
        if isinstance(diffbase, MemoryDiffBase):
            diffbase.forget(body.metadata.uid or "")
    if isinstance(op, reconcile.Operator) and (
        serving_reconcile.relevant(body) or (type == "DELETED" and body.status.get("serving"))
    ):
        await _serve(memo, body.metadata.namespace or "", kwargs)
    if isinstance(op, reconcile.Operator) and type != "DELETED" and status.ready_stale(body):
        # status.serving changed (its writer is serving_reconcile): Ready follows, written by
        # the one writer of the conditions.
        namespace, name = body.metadata.namespace or "", body.metadata.name or ""
        await reconcile.sync_status(op, namespace, name, ftj=_ftj(body), seen=_seen(kwargs))


def _waiting_to_be_served(spec: kopf.Spec, status: kopf.Status, **_: Any) -> bool:
    phase = (status.get("serving") or {}).get("phase")
    wants = bool((spec.get("serving") or {}).get("enabled")) and status.get("phase") == "Succeeded"
    return wants and phase not in ("Serving", "NotServed")


# While a succeeded job waits to be served (server starting, adapter loading) or its serving
# failed: the agent reports through a ConfigMap the operator reads with a GET.
@kopf.timer(*FTJ, interval=SERVING_CHECK_INTERVAL, when=_waiting_to_be_served)
async def serving_check(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    await _serve(memo, body.metadata.namespace or "", kwargs, throttle=True)


@kopf.on.event("apps", "v1", "deployments", labels=SERVERS)
async def server_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    await _serve(memo, body.metadata.namespace or "", kwargs)


@kopf.on.event("v1", "pods", labels=SERVERS)
async def server_pod_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    await _serve(memo, body.metadata.namespace or "", kwargs)


# ------------------------------------------------------------------------ Jobs and pods


@kopf.on.event("batch", "v1", "jobs", labels=OURS)
async def job_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    await _child_event("job", body, memo, kwargs)


@kopf.on.event("v1", "pods", labels=OURS)
async def pod_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    await _child_event("pod", body, memo, kwargs)


@kopf.on.event(*KUEUE_WORKLOADS)
async def workload_event(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    name = observed.workload_ftj_name(body)
    if name and body.metadata.namespace:
        async with metrics.timed("workload-event"):
            await reconcile.sync_status(
                _operator(memo), body.metadata.namespace, name, seen=_seen(kwargs)
            )


async def _child_event(
    kind: str, body: kopf.Body, memo: kopf.Memo, kwargs: Mapping[str, Any]
) -> None:
    name = ftj_name_of(body)
    if name and body.metadata.namespace:
        async with metrics.timed(f"{kind}-event"):
            await reconcile.sync_status(
                _operator(memo), body.metadata.namespace, name, seen=_seen(kwargs)
            )
            if kind == "job":
                await reconcile.hold_kueue_suspension(
                    _operator(memo), body.metadata.namespace, name, _seen(kwargs)
                )
