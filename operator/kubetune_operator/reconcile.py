"""The operator's actions: the I/O around the pure builders (manifests, status, validation).

handlers.py maps Kopf's events onto these functions; each is idempotent, so a handler that runs
twice (a retry, an operator restart, a second replica before peering paused it) converges on
the same objects: child names are deterministic and creates tolerate "already exists".

Requests per FineTuneJob, the whole of what the operator sends while it is created: one create
(its Job; a GET only after a 409), one status patch and one Event (the first phase, which also
names the Job created); Kopf keeps its diff base in memory (persistence.py); plus, once per
namespace, the trainers' ServiceAccount, Role and RoleBinding. Everything else is read from
Kopf's in-memory indices of the FineTuneJobs, Jobs and pods it watches (`Observed`), not from
the API server; the one exception is a failed Job's pods (sync_status).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, cast

import kopf

from kubetune_operator import manifests, metrics, observed, status, validation
from kubetune_operator.kube import ApiError, Forbidden, Kube
from kubetune_operator.serving_reconcile import ServingMemory
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.api import API_VERSION, PLURAL, FineTuneSpec
from kubetune_trainer.kubeapi import path

Body = Mapping[str, Any]

PEERING_API = "kopf.dev/v1"
KUEUE_API = "kueue.x-k8s.io/v1beta2"
# A pvc:// claim that is missing is checked again after this long (the handler is retried).
CLAIM_RETRY_SECONDS = 30
# A child that belongs to an earlier FineTuneJob of the same name is being garbage-collected.
ADOPTION_RETRY_SECONDS = 5
# A child the API server refused with 403 (a quota, an admission policy) is tried again.
FORBIDDEN_RETRY_SECONDS = 30
# FineTuneJobs whose children are being created at the same time; the others wait their turn
# (first come, first served). A burst of FineTuneJobs then finishes in the order it came, each
# quickly, instead of all of them slowly; and only this many responses are held in memory.
CREATE_CONCURRENCY = 16


@dataclass
class Operator:
    """Per-process state, kept in Kopf's memo by the startup handler."""

    settings: OperatorSettings
    kube: Kube
    written: observed.WrittenStatus = field(default_factory=observed.WrittenStatus)
    creating: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(CREATE_CONCURRENCY)
    )
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    # Why the Job controller cannot create a job's pod (its FailedCreate Event), keyed by
    # FineTuneJob, with the Job's uid: found by check_pod_creation, dropped once a pod exists.
    pod_blockers: dict[tuple[str, str], tuple[str, status.Blocker]] = field(default_factory=dict)
    serving: ServingMemory = field(default_factory=ServingMemory)
    # Namespaces whose trainer identity exists (created once, by _ensure_identity).
    identities: set[str] = field(default_factory=set)
    # One creator per namespace: FineTuneJobs applied together would otherwise all race to
    # create the same three objects (3 creates + 3 GETs after the 409s, per FineTuneJob).
    identity_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """One status computation at a time per FineTuneJob: the last patch sent is always
        computed from the latest observations, whichever Job or pod event came first."""
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone: drop what is kept about it (keeps the maps bounded by the
        FineTuneJobs that exist)."""
        lock = self._locks.get((namespace, name))
        if lock is not None and not lock.locked():
            del self._locks[(namespace, name)]
        self.pod_blockers.pop((namespace, name), None)
        self.written.forget(namespace, name)


class _Unknown:
    """Marks an argument the caller did not observe (as opposed to observing None)."""


UNKNOWN: Final = _Unknown()


@dataclass(frozen=True)
class Observed:
    """Kopf's in-memory indices (handlers.py), keyed by (namespace, FineTuneJob name): the
    FineTuneJobs, and the Jobs and pods that carry a FineTuneJob's name, as slim copies
    (observed.slim_*). Kopf fills them from its watches before it calls any handler, so a
    FineTuneJob missing from them does not exist."""

    ftjs: Mapping[Any, Iterable[Body]]
    jobs: Mapping[Any, Iterable[Body]]
    pods: Mapping[Any, Iterable[Body]]
    # Kueue's Workloads of the Jobs (empty where Kueue is not installed).
    workloads: Mapping[Any, Iterable[Body]] = field(default_factory=dict)

    def ftj(self, namespace: str, name: str) -> Body | None:
        return next(iter(self.ftjs.get((namespace, name)) or ()), None)

    def job(self, namespace: str, name: str, uid: str) -> Body | None:
        return observed.owned_job(self.jobs.get((namespace, name)) or (), uid)

    def job_pods(self, namespace: str, name: str, job_uid: str) -> list[Body]:
        return observed.job_pods(self.pods.get((namespace, name)) or (), job_uid)

    def workload(self, namespace: str, name: str, job_uid: str) -> Body | None:
        return observed.job_workload(self.workloads.get((namespace, name)) or (), job_uid)


def _job_failed(job: Body) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Failed" and c.get("status") == "True" for c in conditions)


def ftj_path(namespace: str, name: str, subresource: str | None = None) -> str:
    return path(API_VERSION, PLURAL, namespace, name, subresource)


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


async def ensure_children(op: Operator, ftj: Body, seen: Observed) -> None:
    """Create whatever of the FineTuneJob's children is missing, then report status.

    Safe to re-run at any time: existing children are left as they are. `ftj` is the body Kopf
    delivered (no GET). At most CREATE_CONCURRENCY FineTuneJobs at a time.
    """
    async with op.creating:
        await _ensure_children(op, ftj, seen)


async def _ensure_children(op: Operator, ftj: Body, seen: Observed) -> None:
    meta = ftj["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    parsed, error = validation.checked_spec(ftj)
    if error is not None:
        await sync_status(op, namespace, name, ftj=ftj, seen=seen)
        raise kopf.PermanentError(f"invalid spec: {error}")
    current = (op.written.latest(ftj, time.monotonic()).get("status")) or {}
    assert parsed is not None  # error is None
    if current.get("phase") in status.TERMINAL or (parsed.cancel and not current.get("jobName")):
        await sync_status(op, namespace, name, ftj=ftj, seen=seen)
        return  # finished jobs never run again, even if a child was deleted since
    t = manifests.target(ftj, op.settings, parsed)
    missing = await validation.missing_claims(op.kube.get, namespace, t.spec)
    if missing:
        blocker = validation.claims_blocker(namespace, missing)
        await sync_status(op, namespace, name, ftj=ftj, seen=seen, blocker=blocker)
        raise kopf.TemporaryError(blocker.message, delay=CLAIM_RETRY_SECONDS)
    *before_job, job_manifest = manifests.children(t, op.settings)
    job: Body | _Unknown | None = UNKNOWN
    created_job: str | None = None
    try:
        await _ensure_identity(op, namespace)
        for child in before_job:  # a multi-node job's headless Service
            await _create(op, child, uid)
        if not current.get("jobName"):
            # Once the Job existed, its absence means it was deleted, which cancels the job
            # (status.py); recreating it would silently start training over.
            obj, created = await _create(op, job_manifest, uid)
            job = observed.slim_job(obj)
            if created:
                created_job = job_manifest["metadata"]["name"]
    except _Refused as refused:
        # Said in the status and a Warning Event at once, not only in the operator's log.
        blocker = refused.blocker(namespace)
        await sync_status(op, namespace, name, ftj=ftj, seen=seen, blocker=blocker)
        if blocker.phase == "Failed":
            raise kopf.PermanentError(blocker.message) from refused
        raise kopf.TemporaryError(blocker.message, delay=FORBIDDEN_RETRY_SECONDS) from refused
    await sync_status(op, namespace, name, ftj=ftj, job=job, seen=seen, created_job=created_job)


class _Refused(Exception):
    """The API server refused to create a child (see status.creation_blocker)."""

    def __init__(self, child: Body, error: ApiError | Forbidden) -> None:
        super().__init__(str(error))
        self.child = child
        self.error = error

    def blocker(self, namespace: str) -> status.Blocker:
        return status.creation_blocker(
            self.child["kind"],
            self.child["metadata"]["name"],
            namespace,
            self.error.status,
            self.error.detail,
        )


async def _ensure_identity(op: Operator, namespace: str) -> None:
    """The namespace's trainer ServiceAccount, Role and RoleBinding: created with its first
    FineTuneJob (three creates, the binding after its Role), then only remembered."""
    if namespace in op.identities:
        return
    async with op.identity_locks.setdefault(namespace, asyncio.Lock()):
        if namespace in op.identities:
            return  # another FineTuneJob's handler created it while this one waited
        account, role, binding = manifests.trainer_identity(namespace)
        for child in ((account, role), (binding,)):
            try:
                await asyncio.gather(*(op.kube.create(c) for c in child))
            except (ApiError, Forbidden) as err:
                raise _Refused(child[0], err) from err
        op.identities.add(namespace)


async def _create(op: Operator, child: Body, uid: str) -> tuple[Body, bool]:
    """Create a child (or find it), check it is ours; a refusal becomes _Refused."""
    try:
        obj, created = await op.kube.create(child)
    except (ApiError, Forbidden) as err:
        raise _Refused(child, err) from err
    _check_owner(child, obj, uid)
    return obj, created


def _check_owner(child: Body, obj: Body, uid: str) -> None:
    if not observed.owned_by(obj, uid):
        raise kopf.TemporaryError(
            f"{child['kind']} {child['metadata']['name']} exists but does not belong to this "
            "FineTuneJob (an earlier FineTuneJob of the same name is still being deleted, or "
            "someone else created it); retrying",
            delay=ADOPTION_RETRY_SECONDS,
        )


async def follow_spec(op: Operator, ftj: Body, seen: Observed) -> None:
    """Carry into an existing Job what changed in its FineTuneJob's spec while no operator
    watched (before a restart, a failover or an upgrade): its mutable settings and suspension,
    compared with the Job as observed, level-based. Kopf's update handlers see the changes
    made while this process runs; the last handled spec is not persisted (persistence.py)."""
    meta = ftj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current = (op.written.latest(ftj, time.monotonic()).get("status")) or {}
    if current.get("phase") in status.TERMINAL or validation.spec_error(ftj) is not None:
        return
    t = manifests.target(ftj, op.settings)
    job = seen.job(namespace, name, t.uid)
    if job is None:
        return  # just created, with the spec as it is
    workload = seen.workload(namespace, name, job["metadata"]["uid"])
    if manifests.suspension_differs(t.spec, job, workload):
        await apply_suspend(op, ftj, seen)
    if manifests.settings_differ(t, job):
        await apply_spec_change(op, ftj, seen)


async def apply_spec_change(op: Operator, ftj: Body, seen: Observed) -> None:
    """Carry a spec change into the Job: the settings that stay mutable (maxRetries, timeout,
    queueName). The trainer config in the Job is the spec at creation (manifests.render_config)."""
    meta = ftj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    error = validation.spec_error(ftj)
    if error is not None:
        await sync_status(op, namespace, name, ftj=ftj, seen=seen)
        raise kopf.PermanentError(f"invalid spec: {error}")
    t = manifests.target(ftj, op.settings)
    job = seen.job(namespace, name, t.uid)
    refused: ApiError | Forbidden | None = None
    patched: Body | None = None
    try:
        if job is not None:
            patched = await op.kube.merge_patch(
                path("batch/v1", "jobs", namespace, t.names.job), manifests.job_settings_patch(t)
            )
    except (ApiError, Forbidden) as err:
        # E.g. a policy that refuses the change, or a field the Job does not allow to change
        # in its current state: said in the status and an Event, not only in the log.
        refused = err
        kopf.warn(_ftj_body(ftj), reason="UpdateNotApplied", message=err.detail)
    applied = status.spec_applied(ftj, None if refused is None else refused.detail)
    # The patched Job is newer than the index's (which may not show an earlier patch yet).
    newest: Body | _Unknown = UNKNOWN if patched is None else observed.slim_job(patched)
    await sync_status(op, namespace, name, ftj=ftj, job=newest, seen=seen, condition=applied)
    if isinstance(refused, Forbidden):  # may clear (a policy fixed): try again later
        raise kopf.TemporaryError(refused.detail, delay=FORBIDDEN_RETRY_SECONDS) from refused


async def apply_suspend(op: Operator, ftj: Body, seen: Observed) -> None:
    """Make the Job follow spec.suspend: the Job controller then deletes or recreates the pod.
    A Job queued through Kueue is stopped and re-queued through its Workload instead."""
    meta = ftj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    job: Body | _Unknown | None = UNKNOWN
    if validation.spec_error(ftj) is None:
        t = manifests.target(ftj, op.settings)
        job = seen.job(namespace, name, t.uid)
        patch = manifests.suspend_patch(t.spec, job) if job is not None else None
        if job is not None and patch is not None:
            patched = await op.kube.merge_patch(
                path("batch/v1", "jobs", namespace, t.names.job), patch
            )
            job = observed.slim_job(patched) if patched is not None else None
        active = manifests.workload_active(t.spec, job) if job is not None else None
        if job is not None and active is not None:
            await set_workloads_active(op, namespace, job, active)
        if patch is not None or active is not None:
            kopf.info(
                _ftj_body(ftj),
                reason=_suspend_reason(t.spec),
                message=_suspend_message(t, kueue=active is not None),
            )
    await sync_status(op, namespace, name, ftj=ftj, job=job, seen=seen)


def _suspend_reason(spec: FineTuneSpec) -> str:
    return "Cancelling" if spec.cancel else "Suspending" if spec.suspend else "Resuming"


def _suspend_message(t: manifests.Target, *, kueue: bool) -> str:
    job = t.names.job
    halted = manifests.halted(t.spec)
    if not kueue:
        return f"{'Suspended' if halted else 'Resumed'} training Job {job}."
    if halted:
        return f"Deactivated the Kueue Workload of Job {job}: Kueue stops it and frees its quota."
    queue = t.spec.queue_name
    return f"Queued Job {job} in LocalQueue {queue}: Kueue starts it once it admits it."


async def set_workloads_active(op: Operator, namespace: str, job: Body, active: bool) -> None:
    """Set spec.active of the Kueue Workloads of `job` (found by Kueue's job-uid label): an
    inactive Workload is evicted, so Kueue suspends its Job and frees the quota; an active one
    is queued for admission again."""
    selector = f"{observed.KUEUE_JOB_UID_LABEL}={job['metadata']['uid']}"
    collection = path(KUEUE_API, "workloads", namespace)
    for workload in await op.kube.list(collection, label_selector=selector):
        if (workload.get("spec") or {}).get("active", True) != active:
            await op.kube.merge_patch(
                path(KUEUE_API, "workloads", namespace, workload["metadata"]["name"]),
                {"spec": {"active": active}},
            )


async def hold_kueue_suspension(op: Operator, namespace: str, name: str, seen: Observed) -> None:
    """Kueue may admit and start a queued Job whose FineTuneJob was suspended (or cancelled)
    before Kueue created its Workload (or before the deactivation reached it): deactivate it
    again."""
    # Runs on every Job event: read the fields from the indices, parse nothing.
    ftj = seen.ftj(namespace, name)
    spec = (ftj or {}).get("spec") or {}
    if ftj is None or not (spec.get("suspend") or spec.get("cancel")):
        return
    job = seen.job(namespace, name, ftj["metadata"]["uid"])
    if (
        job is not None
        and manifests.queued_by_kueue(job)
        and not (job.get("spec") or {}).get("suspend")
    ):
        await set_workloads_active(op, namespace, job, active=False)


# ------------------------------------------------------------------------------------ status


async def sync_status(
    op: Operator,
    namespace: str,
    name: str,
    *,
    seen: Observed,
    ftj: Body | None = None,
    job: Body | _Unknown | None = UNKNOWN,
    blocker: status.Blocker | None = None,
    condition: status.Body | None = None,
    created_job: str | None = None,
) -> status.Verdict | None:
    """Observe the FineTuneJob, its Job and pods; patch the owned status fields that changed.

    Observations come from the caller (`ftj`: the body Kopf delivered, `job`: a create or patch
    response), else from Kopf's indices (`seen`); a failed Job's pods are LISTed fresh. This
    replica's own last status write is laid over the FineTuneJob until the watch delivers it
    (observed.WrittenStatus), so concurrent triggers converge without re-reading. Posts an Event
    when the phase or reason changes. `condition`: one more condition to set (SpecApplied).
    `created_job`: the Job the caller just created, said in that Event (_announce).
    """
    async with op.lock(namespace, name):
        if ftj is None:
            ftj = seen.ftj(namespace, name)
            if ftj is None:
                return None  # deleted: the garbage collector removes the children
        ftj = op.written.latest(ftj, time.monotonic())
        parsed, error = validation.checked_spec(ftj)
        spec = None if parsed is None else manifests.effective_spec(parsed, op.settings)
        uid = ftj["metadata"]["uid"]
        if isinstance(job, _Unknown):
            job = seen.job(namespace, name, uid)
        if job is not None and not observed.owned_by(job, uid):
            job = None  # left over from an earlier FineTuneJob of the same name
        pods: Sequence[Body] = ()
        workload: Body | None = None
        if job is not None:
            job_uid = job["metadata"]["uid"]
            workload = seen.workload(namespace, name, job_uid)
            if not _job_failed(job):
                pods = seen.job_pods(namespace, name, job_uid)
            else:
                # A failed Job's verdict is final and its reason comes from the last pod's exit
                # (OOMKilled, the trainer's exit code): the pod watch may not have delivered that
                # pod's last state yet when the Job's event comes, so read the pods fresh (one
                # LIST per failed job).
                selector = f"batch.kubernetes.io/controller-uid={job_uid}"
                pods = await op.kube.list(path("v1", "pods", namespace), label_selector=selector)
            remembered = op.pod_blockers.get((namespace, name))
            if pods or (remembered is not None and remembered[0] != job_uid):
                op.pod_blockers.pop((namespace, name), None)  # a pod exists now
            elif remembered is not None and blocker is None:
                blocker = remembered[1]
        verdict, patch = status.status_patch(
            ftj,
            job,
            pods,
            datetime.now(UTC),
            spec=spec,
            spec_error=error,
            blocker=blocker,
            workload=workload,
            condition=condition,
        )
        if patch:
            response = await op.kube.merge_patch(
                ftj_path(namespace, name, "status"), {"status": patch}
            )
            if response is not None:
                op.written.remember(response, time.monotonic())
        _announce(ftj, verdict, created_job)
        return verdict


async def check_pod_creation(op: Operator, namespace: str, name: str, seen: Observed) -> None:
    """A Job that creates no pod says why only in a FailedCreate Event (a ResourceQuota, a
    missing PriorityClass, Pod Security admission): put that into the status (one LIST of the
    Job's Events; called by a timer while a job waits for its pod)."""
    ftj = seen.ftj(namespace, name)
    job = None if ftj is None else seen.job(namespace, name, ftj["metadata"]["uid"])
    if job is None or (job.get("spec") or {}).get("suspend"):
        return
    job_uid = job["metadata"]["uid"]
    if seen.job_pods(namespace, name, job_uid):
        return
    events = await op.kube.list(
        path("v1", "events", namespace),
        field_selector=f"involvedObject.uid={job_uid},reason=FailedCreate",
    )
    if not events:
        return
    latest = max(events, key=observed.event_time)
    blocker = status.pod_creation_blocker(
        job["metadata"]["name"], namespace, str(latest.get("message") or "").strip()
    )
    op.pod_blockers[(namespace, name)] = (job_uid, blocker)
    await sync_status(op, namespace, name, seen=seen)


def _announce(ftj: Body, verdict: status.Verdict, created_job: str | None = None) -> None:
    """An Event (and a metric) for every change of phase or reason.

    The Job's creation is said in the Event of the phase it brings (one Event instead of two
    per FineTuneJob: under a burst every Event is a write the API server pays for); in an Event
    of its own (JobCreated) only when the phase and reason stay as they were.
    """
    old = ftj.get("status") or {}
    created = f"Created training Job {created_job}." if created_job else ""
    if (old.get("phase"), old.get("reason")) == (verdict.phase, verdict.reason):
        if created:
            kopf.info(_ftj_body(ftj), reason="JobCreated", message=created)
        return
    if old.get("phase") != verdict.phase:
        metrics.TRANSITIONS.labels(verdict.phase).inc()
    message = f"{verdict.phase}: {verdict.message}" + (f" {created}" if created else "")
    if verdict.is_problem:
        kopf.warn(_ftj_body(ftj), reason=verdict.reason, message=message)
    else:
        kopf.info(_ftj_body(ftj), reason=verdict.reason, message=message)
