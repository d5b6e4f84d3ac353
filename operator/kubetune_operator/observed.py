"""Pure: what the operator knows without asking the API server.

Kopf already streams every FineTuneJob and every Job and pod the operator made (handlers.py
indexes them in memory), so computing a status needs no GET or LIST: only the fields status.py
and reconcile.py read are kept (slim_*), which bounds memory per object to a few KB. The slim
copies share the nested parts (spec, status, labels) with the parsed watch event instead of
copying them: nothing here or in status.py modifies an observed object.

One gap remains: the status this replica has just written reaches its watch a little later. Until
then the streamed FineTuneJob is older than what the API server has, and comparing against it
would send the same patch again and post the same Event twice. `WrittenStatus` remembers the
owned status fields of the last successful status patch per FineTuneJob and lays them over the
streamed object until the stream has caught up (it delivers that resourceVersion, or the same
owned fields), or a minute has passed (a re-list may skip the exact version; by then the stream
is certain to have caught up). The operator is the only writer of its owned fields (peering keeps
one replica active), so this never hides someone else's change for longer than that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from kubetune_operator.manifests import FTJ_LABEL
from kubetune_operator.status import OWNED_FIELDS

Body = Mapping[str, Any]

# Pod labels that the Job controller sets to its Job's uid (the second one before Kubernetes 1.27).
JOB_UID_LABELS: Final = ("batch.kubernetes.io/controller-uid", "controller-uid")
CATCH_UP_SECONDS: Final = 60.0

_FTJ_META: Final = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
)
_CHILD_META: Final = (
    "name",
    "namespace",
    "uid",
    "labels",
    "annotations",
    "ownerReferences",
    "creationTimestamp",
    "deletionTimestamp",
)


def _meta(body: Body, keys: Iterable[str]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {key: meta[key] for key in keys if meta.get(key) is not None}


def slim_ftj(body: Body) -> dict[str, Any]:
    """A FineTuneJob with what status, validation and Events need (no managedFields, no
    annotations: Kopf's last-handled-configuration would double its size)."""
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": _meta(body, _FTJ_META),
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }


_JOB_SPEC: Final = ("suspend", "backoffLimit", "activeDeadlineSeconds", "podFailurePolicy")


def slim_job(body: Body) -> dict[str, Any]:
    """A Job without its pod template: status.py reads spec.suspend, the podFailurePolicy and
    the status; the operator's restart compares the mutable settings (manifests.settings_differ)."""
    spec = body.get("spec") or {}
    return {
        "apiVersion": body.get("apiVersion", "batch/v1"),
        "kind": body.get("kind", "Job"),
        "metadata": _meta(body, _CHILD_META),
        "spec": {key: spec[key] for key in _JOB_SPEC if key in spec},
        "status": body.get("status") or {},
    }


def slim_deployment(body: Body) -> dict[str, Any]:
    """A model server's Deployment: identity, owners, annotations (port, template hash),
    replicas and status; not the pod template."""
    spec = body.get("spec") or {}
    return {
        "metadata": _meta(body, _CHILD_META),
        "spec": {"replicas": spec.get("replicas")},
        "status": body.get("status") or {},
    }


def slim_pod(body: Body) -> dict[str, Any]:
    """A pod's identity, labels and status (phase, conditions, container states)."""
    return {"metadata": _meta(body, _CHILD_META), "status": body.get("status") or {}}


KUEUE_JOB_UID_LABEL: Final = "kueue.x-k8s.io/job-uid"


def workload_ftj_name(body: Body) -> str | None:
    """The FineTuneJob whose Job a Kueue Workload admits (None for other workloads): Kueue
    copies the Job's pod template into the Workload, and ours names the FineTuneJob."""
    for pod_set in (body.get("spec") or {}).get("podSets") or []:
        meta = (pod_set.get("template") or {}).get("metadata") or {}
        name = (meta.get("annotations") or {}).get(FTJ_LABEL)
        if name:
            return str(name)
    return None


def slim_workload(body: Body) -> dict[str, Any]:
    """A Kueue Workload's identity, spec.active and conditions (no pod templates)."""
    status = body.get("status") or {}
    return {
        "metadata": _meta(body, ("name", "namespace", "uid", "labels")),
        "spec": {"active": (body.get("spec") or {}).get("active", True)},
        "status": {"conditions": status.get("conditions") or []},
    }


def job_workload(workloads: Iterable[Body], job_uid: str) -> Body | None:
    """The Workload Kueue made for the Job `job_uid` (by Kueue's job-uid label)."""
    for workload in workloads:
        labels = (workload.get("metadata") or {}).get("labels") or {}
        if labels.get(KUEUE_JOB_UID_LABEL) == job_uid:
            return workload
    return None


def owned_by(obj: Body, uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def owned_job(jobs: Iterable[Body], uid: str) -> Body | None:
    """The Job among `jobs` whose controller is the FineTuneJob `uid` (None if none is)."""
    return next((job for job in jobs if owned_by(job, uid)), None)


def job_pods(pods: Iterable[Body], job_uid: str) -> list[Body]:
    """The pods the Job `job_uid` made (the same selection as a LIST by controller-uid)."""
    out: list[Body] = []
    for pod in pods:
        labels = (pod.get("metadata") or {}).get("labels") or {}
        if any(labels.get(key) == job_uid for key in JOB_UID_LABELS):
            out.append(pod)
    return out


def event_time(event: Body) -> str:
    """When an Event (core/v1) last happened, as a sortable RFC 3339 string."""
    meta = event.get("metadata") or {}
    series = event.get("series") or {}
    return str(
        series.get("lastObservedTime")
        or event.get("lastTimestamp")
        or event.get("eventTime")
        or meta.get("creationTimestamp")
        or ""
    )


def owned_status(status: Body | None) -> dict[str, Any]:
    return {key: (status or {})[key] for key in OWNED_FIELDS if key in (status or {})}


@dataclass(frozen=True)
class _Written:
    uid: str
    resource_version: str | None
    owned: dict[str, Any]
    at: float


@dataclass
class WrittenStatus:
    """The owned status fields of the last status patch per FineTuneJob, until the watch has
    delivered them (see the module docstring). Entries go as soon as the stream caught up, so
    the map holds only the FineTuneJobs written in the last moments."""

    catch_up_seconds: float = CATCH_UP_SECONDS
    _items: dict[tuple[str, str], _Written] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._items)

    def remember(self, response: Body, now: float) -> None:
        """Record a status patch's response (the object as the API server stored it)."""
        meta = response.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        self._items[key] = _Written(
            uid=str(meta.get("uid", "")),
            resource_version=meta.get("resourceVersion"),
            owned=owned_status(response.get("status")),
            at=now,
        )

    def forget(self, namespace: str, name: str) -> None:
        self._items.pop((namespace, name), None)

    def latest(self, ftj: Body, now: float) -> Body:
        """`ftj` as streamed, with this replica's last written status laid over it while the
        stream has not delivered it yet."""
        meta = ftj.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        written = self._items.get(key)
        if written is None:
            return ftj
        status = ftj.get("status") or {}
        caught_up = (
            written.uid != meta.get("uid")
            or (written.resource_version is not None
                and written.resource_version == meta.get("resourceVersion"))
            or owned_status(status) == written.owned
            or now - written.at > self.catch_up_seconds
        )  # fmt: skip
        if caught_up:
            del self._items[key]
            return ftj
        return {**ftj, "status": {**status, **written.owned}}
