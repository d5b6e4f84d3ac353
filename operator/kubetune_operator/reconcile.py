"""The operator's actions: the I/O around the pure builders (manifests, status, validation).

handlers.py maps Kopf's events onto these functions; each is idempotent, so a handler that runs
twice (a retry, an operator restart, a second replica before peering paused it) converges on
the same objects: child names are deterministic and creates tolerate "already exists".
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from kubetune_operator import manifests, metrics, status, validation
from kubetune_operator.kube import ApiError, Kube, path
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.api import API_VERSION, PLURAL
from kubetune_trainer.config import CONFIG_KEY

Body = Mapping[str, Any]

PEERING_API = "kopf.dev/v1"
# A pvc:// claim that is missing is checked again after this long (the handler is retried).
CLAIM_RETRY_SECONDS = 30
# A child that belongs to an earlier FineTuneJob of the same name is being garbage-collected.
ADOPTION_RETRY_SECONDS = 5


@dataclass
class Operator:
    """Per-process state, kept in Kopf's memo by the startup handler."""

    settings: OperatorSettings
    kube: Kube
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """One status computation at a time per FineTuneJob: the last patch sent is always
        computed from the latest observations, whichever Job or pod event came first."""
        return self._locks.setdefault((namespace, name), asyncio.Lock())


def ftj_path(namespace: str, name: str, subresource: str | None = None) -> str:
    return path(API_VERSION, PLURAL, namespace, name, subresource)


def _owned_by(obj: Body, uid: str) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def _ftj_body(ftj: Body) -> kopf.Body:
    return kopf.Body(cast(kopf.RawBody, dict(ftj)))


# ------------------------------------------------------------------------------ start-up


async def check_crd(kube: Kube) -> None:
    """Fail at start, loudly, when the FineTuneJob CRD is not served (Kopf would idle)."""
    discovery = await kube.get(f"/apis/{API_VERSION}")
    served = {r.get("name") for r in (discovery or {}).get("resources", [])}
    if PLURAL not in served:
        raise kopf.PermanentError(
            f"the {PLURAL}.{API_VERSION.split('/')[0]} CRD is not installed: "
            "kubectl apply --server-side -f crds/"
        )


async def ensure_peering(kube: Kube, settings: OperatorSettings) -> None:
    """Create the (Cluster)KopfPeering object the replicas coordinate through, if missing.

    Kopf's mandatory peering keeps the operator paused until it sees that object, so the
    operator makes it itself rather than depend on an install step.
    """
    name = settings.peering_name
    if settings.clusterwide:
        targets: list[tuple[str, str | None]] = [("ClusterKopfPeering", None)]
    else:
        targets = [("KopfPeering", ns) for ns in settings.namespaces]
    for kind, namespace in targets:
        meta = {"name": name, **({"namespace": namespace} if namespace else {})}
        try:
            await kube.create({"apiVersion": PEERING_API, "kind": kind, "metadata": meta})
        except kopf.PermanentError as err:  # 404: the peering CRDs are not installed
            raise kopf.PermanentError(
                f"cannot create {kind} {name}: {err}. Install crds/kopf.dev_peerings.yaml, or "
                "set KUBETUNE_PEERING_NAME='' to run standalone (one replica only)."
            ) from err


# ---------------------------------------------------------------------------- the children


async def ensure_children(op: Operator, ftj: Body) -> None:
    """Create whatever of the FineTuneJob's children is missing, then report status.

    Safe to re-run at any time: existing children are left as they are.
    """
    meta = ftj["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    error = validation.spec_error(ftj)
    if error is not None:
        await sync_status(op, namespace, name)
        raise kopf.PermanentError(f"invalid spec: {error}")
    current = ftj.get("status") or {}
    if current.get("phase") in status.TERMINAL:
        await sync_status(op, namespace, name)
        return  # finished jobs never run again, even if a child was deleted since
    t = manifests.target(ftj, op.settings)
    missing = await validation.missing_claims(op.kube.get, namespace, t.spec)
    if missing:
        blocker = validation.claims_blocker(namespace, missing)
        await sync_status(op, namespace, name, blocker=blocker)
        raise kopf.TemporaryError(blocker.message, delay=CLAIM_RETRY_SECONDS)
    for child in manifests.children(t, op.settings):
        kind, child_name = child["kind"], child["metadata"]["name"]
        if kind == "Job" and current.get("jobName"):
            # The Job existed before: if it is gone now it was deleted, which cancels the job
            # (status.py); recreating it would silently start training over.
            break
        obj, created = await op.kube.create(child)
        if not _owned_by(obj, uid):
            raise kopf.TemporaryError(
                f"{kind} {child_name} exists but does not belong to this FineTuneJob (an "
                "earlier FineTuneJob of the same name is still being deleted, or someone "
                "else created it); retrying",
                delay=ADOPTION_RETRY_SECONDS,
            )
        if created and kind == "Job":
            kopf.info(
                _ftj_body(ftj), reason="JobCreated", message=f"Created training Job {child_name}."
            )
    await sync_status(op, namespace, name)


async def _owned_job(op: Operator, t: manifests.Target) -> Body | None:
    job = await op.kube.get(path("batch/v1", "jobs", t.namespace, t.names.job))
    return job if job is not None and _owned_by(job, t.uid) else None


async def apply_spec_change(op: Operator, ftj: Body) -> None:
    """Carry a spec change into the children: the trainer config, and the Job settings that
    stay mutable (maxRetries, timeout, queueName)."""
    meta = ftj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    error = validation.spec_error(ftj)
    if error is not None:
        await sync_status(op, namespace, name)
        raise kopf.PermanentError(f"invalid spec: {error}")
    t = manifests.target(ftj, op.settings)
    config_path = path("v1", "configmaps", namespace, t.names.config_map)
    await op.kube.merge_patch(config_path, {"data": {CONFIG_KEY: manifests.render_config(t)}})
    job = await _owned_job(op, t)
    if job is not None:
        try:
            await op.kube.merge_patch(
                path("batch/v1", "jobs", namespace, t.names.job), manifests.job_settings_patch(t)
            )
        except ApiError as err:
            # E.g. a field the Job does not allow to change in its current state: tell the user
            # instead of retrying forever.
            kopf.warn(_ftj_body(ftj), reason="UpdateNotApplied", message=str(err))
    await sync_status(op, namespace, name)


async def apply_suspend(op: Operator, ftj: Body) -> None:
    """Make the Job follow spec.suspend: the Job controller then deletes or recreates the pod."""
    meta = ftj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if validation.spec_error(ftj) is None:
        t = manifests.target(ftj, op.settings)
        job = await _owned_job(op, t)
        patch = manifests.suspend_patch(t.spec, job) if job is not None else None
        if patch is not None:
            await op.kube.merge_patch(path("batch/v1", "jobs", namespace, t.names.job), patch)
            suspend = patch["spec"]["suspend"]
            kopf.info(
                _ftj_body(ftj),
                reason="Suspending" if suspend else "Resuming",
                message=f"{'Suspended' if suspend else 'Resumed'} training Job {t.names.job}.",
            )
    await sync_status(op, namespace, name)


# ------------------------------------------------------------------------------------ status


async def sync_status(
    op: Operator, namespace: str, name: str, *, blocker: status.Blocker | None = None
) -> status.Verdict | None:
    """Observe the FineTuneJob, its Job and pods; patch the owned status fields that changed.

    Reads fresh objects (not the event's body) so that concurrent triggers converge; posts an
    Event when the phase or reason changes.
    """
    async with op.lock(namespace, name):
        ftj = await op.kube.get(ftj_path(namespace, name))
        if ftj is None:
            return None  # deleted: the garbage collector removes the children
        error = validation.spec_error(ftj)
        spec = None if error else manifests.effective_spec(manifests.parse_spec(ftj), op.settings)
        uid = ftj["metadata"]["uid"]
        job = await op.kube.get(path("batch/v1", "jobs", namespace, manifests.Names.of(name).job))
        if job is not None and not _owned_by(job, uid):
            job = None  # left over from an earlier FineTuneJob of the same name
        pods: list[dict[str, Any]] = []
        if job is not None:
            selector = f"batch.kubernetes.io/controller-uid={job['metadata']['uid']}"
            pods = await op.kube.list(path("v1", "pods", namespace), label_selector=selector)
        verdict, patch = status.status_patch(
            ftj,
            job,
            pods,
            datetime.now(UTC),
            spec=spec,
            spec_error=error,
            blocker=blocker,
        )
        if patch:
            await op.kube.merge_patch(ftj_path(namespace, name, "status"), {"status": patch})
        _announce(ftj, verdict)
        return verdict


def _announce(ftj: Body, verdict: status.Verdict) -> None:
    """An Event (and a metric) for every change of phase or reason."""
    old = ftj.get("status") or {}
    if (old.get("phase"), old.get("reason")) == (verdict.phase, verdict.reason):
        return
    if old.get("phase") != verdict.phase:
        metrics.TRANSITIONS.labels(verdict.phase).inc()
    message = f"{verdict.phase}: {verdict.message}"
    if verdict.is_problem:
        kopf.warn(_ftj_body(ftj), reason=verdict.reason, message=message)
    else:
        kopf.info(_ftj_body(ftj), reason=verdict.reason, message=message)
