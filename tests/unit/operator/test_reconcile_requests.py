"""What the operator sends to the API server for a FineTuneJob, and what it reads from memory.

A FineTuneJob costs five creates (no GET before them), one status patch and its Events; Job and
pod events are answered from Kopf's in-memory indices (reconcile.Observed) with no request at
all; the operator's own status write is laid over the streamed FineTuneJob until the watch
delivers it (observed.WrittenStatus), so a late event neither repeats the patch nor the Event.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import kopf
import pytest
from ftj_objects import JOB_UID, NAMESPACE, UID, job, pod, running_pod, served
from invalid_manifests import merged

from kubetune_operator import manifests, observed, reconcile
from kubetune_operator.kube import ApiError, Forbidden
from kubetune_operator.settings import OperatorSettings

Obj = dict[str, Any]
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
WORKLOADS = f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{NAMESPACE}/workloads"


class FakeKube:
    """Records every request; creates succeed (or 409 for names in `existing`)."""

    def __init__(self, ftj: Obj, existing: Mapping[str, Obj] | None = None) -> None:
        self.ftj = copy.deepcopy(ftj)
        self.existing = dict(existing or {})
        self.calls: list[tuple[str, str]] = []
        self.version = 100
        self.workloads: list[Obj] = []  # Kueue's, for the Job JOB_UID
        self.events: list[Obj] = []  # core/v1 Events, returned for any field selector
        self.refuse: dict[str, Exception] = {}  # kind -> what its create raises
        self.patches: dict[str, Mapping[str, Any]] = {}

    async def get(self, api_path: str) -> Obj | None:
        self.calls.append(("GET", api_path))
        if api_path.endswith(f"/finetunejobs/{self.ftj['metadata']['name']}"):
            return copy.deepcopy(self.ftj)
        return copy.deepcopy(self.existing.get(api_path.rsplit("/", 1)[-1]))

    async def list(
        self,
        api_path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Obj]:
        self.calls.append(("LIST", api_path))
        if api_path.endswith("/events"):
            assert field_selector == f"involvedObject.uid={JOB_UID},reason=FailedCreate"
            return copy.deepcopy(self.events)
        if api_path.endswith("/workloads"):
            return [w for w in self.workloads if label_selector == f"{JOB_UID_LABEL}={JOB_UID}"]
        return []

    async def create(self, body: Mapping[str, Any]) -> tuple[Obj, bool]:
        name = body["metadata"]["name"]
        self.calls.append(("POST", f"{body['kind']}/{name}"))
        await asyncio.sleep(0)  # a request yields to other handlers, as a real one does
        if body["kind"] in self.refuse:
            raise self.refuse[body["kind"]]
        if name in self.existing:
            self.calls.append(("GET", f"{body['kind']}/{name}"))
            return copy.deepcopy(self.existing[name]), False
        obj = copy.deepcopy(dict(body))
        obj["metadata"]["uid"] = JOB_UID if body["kind"] == "Job" else f"uid-{name}"
        return obj, True

    async def merge_patch(self, api_path: str, patch: Mapping[str, Any]) -> Obj | None:
        self.calls.append(("PATCH", api_path))
        for kind, error in self.refuse.items():
            if f"/{kind}/" in api_path:
                raise error
        self.patches[api_path] = patch
        if api_path.endswith("/status"):
            self.version += 1
            self.ftj["status"] = {**(self.ftj.get("status") or {}), **patch["status"]}
            self.ftj["metadata"]["resourceVersion"] = str(self.version)
            return copy.deepcopy(self.ftj)
        name = api_path.rsplit("/", 1)[-1]
        if name in self.existing:  # the object as patched
            self.existing[name] = merged(self.existing[name], patch, delete=None)
            return copy.deepcopy(self.existing[name])
        return {"metadata": {"name": name}}


class Posted(list[str]):
    """The reasons of the Events posted, in order; their messages beside them."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[Posted]:
    """The Events the operator posts (Kopf's posting needs a running operator)."""
    posted = Posted()

    def record(_body: Any, *, reason: str, message: str = "", **_: Any) -> None:
        posted.append(reason)
        posted.messages.append(message)

    monkeypatch.setattr(kopf, "info", record)
    monkeypatch.setattr(kopf, "warn", record)
    yield posted


def _operator(kube: FakeKube) -> reconcile.Operator:
    return reconcile.Operator(settings=OperatorSettings(), kube=kube)  # type: ignore[arg-type]


def _seen(
    ftjs: list[Obj] | None = None,
    jobs: list[Obj] | None = None,
    pods: list[Obj] | None = None,
    workloads: list[Obj] | None = None,
) -> reconcile.Observed:
    def by_name(objs: list[Obj] | None, slim: Any) -> dict[tuple[str, str], list[Obj]]:
        index: dict[tuple[str, str], list[Obj]] = {}
        for obj in objs or []:
            meta = obj["metadata"]
            name = manifests.ftj_name_of(obj) or meta["name"]
            index.setdefault((meta["namespace"], name), []).append(slim(obj))
        return index

    return reconcile.Observed(
        ftjs=by_name(ftjs, observed.slim_ftj),
        jobs=by_name(jobs, observed.slim_job),
        pods=by_name(pods, observed.slim_pod),
        workloads={
            (NAMESPACE, observed.workload_ftj_name(w)): [observed.slim_workload(w)]
            for w in workloads or []
        },
    )


def _labelled(obj: Obj, ftj_name: str = "support-lora") -> Obj:
    obj = copy.deepcopy(obj)
    obj["metadata"].setdefault("annotations", {})[manifests.FTJ_LABEL] = ftj_name
    return obj


def test_creation_is_one_create_one_status_patch_and_one_event(events: Posted) -> None:
    ftj = served(suspend=True)
    kube = FakeKube(ftj)
    op = _operator(kube)
    asyncio.run(reconcile.ensure_children(op, ftj, _seen(ftjs=[ftj])))
    # The namespace's first FineTuneJob also makes the trainers' identity, once.
    created = [what for method, what in kube.calls if method == "POST"]
    identity = {"ServiceAccount/kubetune-trainer", "Role/kubetune-trainer"}
    assert set(created[:2]) == identity  # together, then the binding (after its Role)
    assert created[2] == "RoleBinding/kubetune-trainer"
    assert created[3:] == ["Job/support-lora-train"]
    assert kube.ftj["status"]["phase"] == "Suspended"
    assert kube.ftj["status"]["jobName"] == "support-lora-train"
    # One Event: the first phase, which names the Job it created.
    assert events == ["Suspended"]
    assert events.messages[0].endswith(" Created training Job support-lora-train.")

    # Every later FineTuneJob of the namespace: its Job, its status, nothing else.
    second = served(name="second", suspend=True)
    kube = FakeKube(second)
    op.kube = kube  # type: ignore[assignment]
    asyncio.run(reconcile.ensure_children(op, second, _seen(ftjs=[second])))
    methods = [method for method, _ in kube.calls]
    assert kube.calls[0] == ("POST", "Job/second-train")
    assert methods == ["POST", "PATCH"] and kube.calls[-1][1].endswith("/status")


def test_finetunejobs_applied_together_create_the_identity_once(events: list[str]) -> None:
    """Twenty FineTuneJobs applied at once in a new namespace: the identity's three creates
    once, not three creates and three GETs per FineTuneJob (operator_scale saw 3.4 each)."""
    ftjs = [served(name=f"job-{i}", suspend=True) for i in range(20)]
    kube = FakeKube(ftjs[0])
    op = _operator(kube)

    async def apply_all() -> None:
        await asyncio.gather(*(reconcile.ensure_children(op, f, _seen(ftjs=[f])) for f in ftjs))

    asyncio.run(apply_all())
    created = [what for method, what in kube.calls if method == "POST"]
    identity = [c for c in created if not c.startswith("Job/")]
    assert sorted(identity) == [
        "Role/kubetune-trainer",
        "RoleBinding/kubetune-trainer",
        "ServiceAccount/kubetune-trainer",
    ]
    assert len(created) == 3 + 20


def test_job_events_cost_no_request_and_repeat_nothing(events: list[str]) -> None:
    ftj = served(suspend=True)
    kube = FakeKube(ftj)
    op = _operator(kube)
    stale = _seen(ftjs=[ftj])  # the watch has not delivered the status patch yet
    asyncio.run(reconcile.ensure_children(op, ftj, stale))
    kube.calls.clear()
    events.clear()

    the_job = _labelled(job(suspend=True, active=0))
    seen = _seen(ftjs=[ftj], jobs=[the_job])
    verdict = asyncio.run(reconcile.sync_status(op, NAMESPACE, "support-lora", seen=seen))
    assert verdict is not None and verdict.phase == "Suspended"
    assert kube.calls == [] and events == []

    # Once the watch delivers the patched object, the overlay is dropped; still no request.
    seen = _seen(ftjs=[kube.ftj], jobs=[the_job])
    asyncio.run(reconcile.sync_status(op, NAMESPACE, "support-lora", seen=seen))
    assert kube.calls == [] and events == [] and len(op.written) == 0


def test_pods_come_from_the_index_filtered_by_the_jobs_uid(events: list[str]) -> None:
    ftj = served(status={"phase": "Pending", "reason": "WaitingForPod", "jobName": "x"})
    kube = FakeKube(ftj)
    op = _operator(kube)
    other = running_pod(name="someone-elses")
    other["metadata"]["labels"] = {"batch.kubernetes.io/controller-uid": "another-job"}
    seen = _seen(
        ftjs=[ftj],
        jobs=[_labelled(job())],
        pods=[_labelled(running_pod()), _labelled(other)],
    )
    verdict = asyncio.run(reconcile.sync_status(op, NAMESPACE, "support-lora", seen=seen))
    assert verdict is not None
    assert (verdict.phase, verdict.reason) == ("Running", "TrainerRunning")
    assert "support-lora-train-x7k2p" in verdict.message
    assert [method for method, _ in kube.calls] == ["PATCH"]
    assert events == ["TrainerRunning"]


def test_a_finetunejob_missing_from_the_index_is_gone() -> None:
    kube = FakeKube(served())
    verdict = asyncio.run(
        reconcile.sync_status(_operator(kube), NAMESPACE, "support-lora", seen=_seen())
    )
    assert verdict is None and kube.calls == []


def test_restart_with_existing_children_creates_no_second_job(events: list[str]) -> None:
    status = {"phase": "Suspended", "reason": "Suspended", "jobName": "support-lora-train"}
    ftj = served(suspend=True, status=status)
    t = manifests.target(ftj, OperatorSettings())
    existing = {}
    for child in manifests.children(t, OperatorSettings()):
        obj = copy.deepcopy(child)
        obj["metadata"]["uid"] = f"uid-{child['kind']}"
        existing[child["metadata"]["name"]] = obj
    kube = FakeKube(ftj, existing=existing)
    the_job = _labelled(job(suspend=True, active=0))
    asyncio.run(reconcile.ensure_children(_operator(kube), ftj, _seen(ftjs=[ftj], jobs=[the_job])))
    posted = [what for method, what in kube.calls if method == "POST"]
    assert not any(what.startswith("Job/") for what in posted)  # jobName set: never again
    assert len(posted) == 3  # the namespace's trainer identity (tolerating "already exists")


def test_forget_drops_what_is_kept_about_a_finetunejob() -> None:
    op = _operator(FakeKube(served()))
    op.lock(NAMESPACE, "a")
    op.written.remember({"metadata": {"namespace": NAMESPACE, "name": "a", "uid": UID}}, 0.0)
    op.forget(NAMESPACE, "a")
    assert op._locks == {} and len(op.written) == 0


# ----------------------------------------------------------------------------- observed.py


def test_slim_copies_keep_what_status_reads() -> None:
    full = _labelled(job(suspend=True))
    full["spec"]["template"] = {"spec": {"containers": [{"name": "trainer"}]}}
    full["metadata"]["managedFields"] = [{"manager": "kube-controller-manager"}]
    slim = observed.slim_job(full)
    assert slim["spec"] == {  # and activeDeadlineSeconds; not the pod template
        "suspend": True,
        "backoffLimit": 2,
        "podFailurePolicy": full["spec"]["podFailurePolicy"],  # status.py reads which fail it
    }
    assert "managedFields" not in slim["metadata"]
    assert slim["status"] == full["status"]
    assert observed.owned_by(slim, UID)

    ftj = served(status={"phase": "Running"})
    ftj["metadata"]["annotations"] = {"kubetune.dev/last-handled-configuration": "{}"}
    slim_ftj = observed.slim_ftj(ftj)
    assert "annotations" not in slim_ftj["metadata"]
    assert slim_ftj["spec"] == ftj["spec"] and slim_ftj["status"] == {"phase": "Running"}

    the_pod = pod()
    assert observed.slim_pod(the_pod)["status"] == the_pod["status"]
    assert observed.job_pods([observed.slim_pod(the_pod)], JOB_UID) == [observed.slim_pod(the_pod)]
    assert observed.job_pods([the_pod], "another-job") == []


def _response(rv: str, **status: Any) -> Obj:
    return {
        "metadata": {"namespace": NAMESPACE, "name": "a", "uid": UID, "resourceVersion": rv},
        "status": {"stage": "Training", **status},
    }


def _streamed(rv: str, **status: Any) -> Obj:
    return {
        "metadata": {"namespace": NAMESPACE, "name": "a", "uid": UID, "resourceVersion": rv},
        "status": status,
    }


def test_written_status_is_laid_over_an_older_streamed_object() -> None:
    written = observed.WrittenStatus()
    written.remember(_response("7", phase="Running", reason="TrainerRunning"), now=100.0)
    older = _streamed("6", phase="Pending", reason="PodStarting", progress={"step": 1})
    latest = written.latest(older, now=101.0)
    # Owned fields from the write, the trainer's fields as streamed (never the response's).
    assert latest["status"] == {
        "phase": "Running",
        "reason": "TrainerRunning",
        "progress": {"step": 1},
    }
    assert len(written) == 1


@pytest.mark.parametrize(
    ("streamed", "now"),
    [
        (_streamed("7", phase="Pending"), 101.0),  # the written version itself
        (_streamed("9", phase="Running", reason="TrainerRunning"), 101.0),  # same owned fields
        (_streamed("6", phase="Pending"), 161.0),  # a minute later: surely caught up
    ],
)
def test_written_status_is_dropped_once_the_stream_caught_up(streamed: Obj, now: float) -> None:
    written = observed.WrittenStatus()
    written.remember(_response("7", phase="Running", reason="TrainerRunning"), now=100.0)
    assert written.latest(streamed, now=now) is streamed
    assert len(written) == 0


def test_written_status_of_an_earlier_finetunejob_of_the_same_name_is_ignored() -> None:
    written = observed.WrittenStatus()
    written.remember(_response("7", phase="Failed"), now=100.0)
    recreated = _streamed("8")
    recreated["metadata"]["uid"] = "a-new-uid"
    assert written.latest(recreated, now=100.5) is recreated


# ------------------------------------------------------------------------------------ Kueue


def _queued_job(*, suspend: bool) -> Obj:
    the_job = _labelled(job(suspend=suspend))
    the_job["metadata"]["labels"] = {manifests.KUEUE_QUEUE_LABEL: "gpus"}
    return the_job


def _workload(active: bool) -> Obj:
    meta = {"name": "job-support-lora-train-1a2b3", "labels": {JOB_UID_LABEL: JOB_UID}}
    return {"metadata": meta, "spec": {"active": active}}


@pytest.mark.parametrize(
    ("ftj_suspend", "job_suspended", "active", "deactivated"),
    [
        (True, False, True, True),  # Kueue admitted (and started) a suspended FineTuneJob's Job
        (True, True, True, False),  # not started: nothing to undo
        (False, False, True, False),  # running as asked
        (True, False, False, False),  # already deactivated: Kueue is stopping it
    ],
)
def test_a_job_kueue_started_against_spec_suspend_is_deactivated_again(
    ftj_suspend: bool, job_suspended: bool, active: bool, deactivated: bool
) -> None:
    ftj = served(suspend=ftj_suspend, queueName="gpus")
    kube = FakeKube(ftj)
    kube.workloads = [_workload(active)]
    op = _operator(kube)
    seen = _seen(ftjs=[ftj], jobs=[_queued_job(suspend=job_suspended)])
    asyncio.run(reconcile.hold_kueue_suspension(op, NAMESPACE, "support-lora", seen))
    patch_path = f"{WORKLOADS}/job-support-lora-train-1a2b3"
    assert (patch_path in kube.patches) is deactivated
    if deactivated:
        assert kube.patches[patch_path] == {"spec": {"active": False}}
    # Only a started Job against spec.suspend costs a request (the LIST of its Workloads).
    assert bool(kube.calls) is (ftj_suspend and not job_suspended)


def test_suspending_a_queued_job_deactivates_its_workload_not_the_job(events: list[str]) -> None:
    ftj = served(suspend=True, queueName="gpus")
    kube = FakeKube(ftj)
    kube.workloads = [_workload(active=True)]
    seen = _seen(ftjs=[ftj], jobs=[_queued_job(suspend=False)])
    asyncio.run(reconcile.apply_suspend(_operator(kube), ftj, seen))
    assert kube.patches[f"{WORKLOADS}/job-support-lora-train-1a2b3"] == {"spec": {"active": False}}
    # The Job itself is left to Kueue, which would unsuspend it while the Workload is admitted.
    assert not [p for p in kube.patches if "/jobs/" in p]
    assert "Suspending" in events


def _served_workload(conditions: list[Obj]) -> Obj:
    """A Workload as Kueue writes it for the Job of "support-lora" (pod template copied)."""
    template = {"metadata": {"annotations": {manifests.FTJ_LABEL: "support-lora"}}, "spec": {}}
    return {
        "metadata": {
            "name": "job-support-lora-train-1a2b3",
            "namespace": NAMESPACE,
            "labels": {JOB_UID_LABEL: JOB_UID},
        },
        "spec": {"active": True, "podSets": [{"name": "main", "count": 1, "template": template}]},
        "status": {"conditions": conditions},
    }


def test_a_queued_job_says_why_kueue_has_not_admitted_it(events: list[str]) -> None:
    why = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu"
    pending = {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": why}
    workload = _served_workload([pending])
    assert observed.workload_ftj_name(workload) == "support-lora"
    assert observed.workload_ftj_name({"spec": {"podSets": [{"template": {}}]}}) is None
    slim = observed.slim_workload(workload)
    assert "podSets" not in slim["spec"] and slim["status"]["conditions"] == [pending]

    ftj = served(queueName="gpus")
    kube = FakeKube(ftj)
    seen = _seen(ftjs=[ftj], jobs=[_queued_job(suspend=True)], workloads=[workload])
    verdict = asyncio.run(
        reconcile.sync_status(_operator(kube), NAMESPACE, "support-lora", seen=seen)
    )
    assert verdict is not None and (verdict.phase, verdict.reason) == (
        "Queued",
        "WaitingForAdmission",
    )
    assert verdict.message.endswith(f"LocalQueue gpus: {why}")
    assert kube.calls == [("PATCH", f"{reconcile.ftj_path(NAMESPACE, 'support-lora')}/status")]


# ------------------------------------------------------------- refusals reach the status


def test_a_job_the_api_server_rejects_fails_the_finetunejob_at_once(events: list[str]) -> None:
    ftj = served()
    kube = FakeKube(ftj)
    detail = 'Job.batch "support-lora-train" is invalid: spec.template.spec.priorityClassName'
    kube.refuse["Job"] = ApiError(f"POST /apis/batch/v1/...: {detail}", 422, detail)
    with pytest.raises(kopf.PermanentError):
        asyncio.run(reconcile.ensure_children(_operator(kube), ftj, _seen(ftjs=[ftj])))
    assert (kube.ftj["status"]["phase"], kube.ftj["status"]["reason"]) == ("Failed", "InvalidSpec")
    assert detail in kube.ftj["status"]["message"]
    assert events == ["InvalidSpec"]


def test_a_quota_that_refuses_a_child_keeps_the_job_pending_and_retried(
    events: list[str],
) -> None:
    ftj = served()
    kube = FakeKube(ftj)
    detail = 'jobs.batch "support-lora-train" is forbidden: exceeded quota: q, used: 10/10'
    kube.refuse["Job"] = Forbidden(f"POST ...: {detail}", detail, delay=60)
    with pytest.raises(kopf.TemporaryError) as retried:
        asyncio.run(reconcile.ensure_children(_operator(kube), ftj, _seen(ftjs=[ftj])))
    assert not isinstance(retried.value, kopf.PermanentError)
    status = kube.ftj["status"]
    assert (status["phase"], status["reason"]) == ("Pending", "QuotaExceeded")
    assert "Job support-lora-train" in status["message"] and detail in status["message"]
    assert events == ["QuotaExceeded"]


def _failed_create(message: str, at: str) -> Obj:
    return {
        "metadata": {"name": f"e-{at}", "namespace": NAMESPACE},
        "involvedObject": {"kind": "Job", "uid": JOB_UID},
        "reason": "FailedCreate",
        "type": "Warning",
        "message": message,
        "lastTimestamp": at,
    }


def test_a_pod_the_job_cannot_create_is_explained_until_one_exists(events: list[str]) -> None:
    ftj = served(status={"phase": "Pending", "reason": "WaitingForPod", "jobName": "x"})
    kube = FakeKube(ftj)
    op = _operator(kube)
    waiting = _labelled(job(active=0))
    kube.events = [
        _failed_create("Error creating: quota", "2026-01-01T10:00:01Z"),
        _failed_create(
            'Error creating: pods "p" is forbidden: no PriorityClass with name gold was found',
            "2026-01-01T10:00:09Z",
        ),
    ]
    seen = _seen([ftj], [waiting])
    asyncio.run(reconcile.check_pod_creation(op, NAMESPACE, "support-lora", seen))
    status = kube.ftj["status"]
    assert (status["phase"], status["reason"]) == ("Pending", "PriorityClassNotFound")
    assert "gold" in status["message"] and events == ["PriorityClassNotFound"]
    # A later Job event does not forget it (no flapping back to WaitingForPod)...
    seen = _seen([kube.ftj], [waiting])
    asyncio.run(reconcile.sync_status(op, NAMESPACE, "support-lora", seen=seen))
    assert kube.ftj["status"]["reason"] == "PriorityClassNotFound"
    # ...until the pod exists.
    seen = _seen([kube.ftj], [waiting], [_labelled(running_pod())])
    asyncio.run(reconcile.sync_status(op, NAMESPACE, "support-lora", seen=seen))
    assert kube.ftj["status"]["reason"] == "TrainerRunning" and not op.pod_blockers


def test_the_pod_check_lists_nothing_once_the_pod_exists() -> None:
    ftj = served()
    kube = FakeKube(ftj)
    seen = _seen([ftj], [_labelled(job())], [_labelled(running_pod())])
    asyncio.run(reconcile.check_pod_creation(_operator(kube), NAMESPACE, "support-lora", seen))
    assert kube.calls == []


def test_a_refused_update_of_the_job_is_in_a_condition_and_an_event(events: list[str]) -> None:
    ftj = served(maxRetries=5, status={"phase": "Running", "jobName": "support-lora-train"})
    ftj["metadata"]["generation"] = 2
    kube = FakeKube(ftj)
    detail = 'jobs.batch "support-lora-train" is forbidden: ValidatingAdmissionPolicy says no'
    kube.refuse["jobs"] = Forbidden(f"PATCH ...: {detail}", detail, delay=60)
    seen = _seen([ftj], [_labelled(job())], [_labelled(running_pod())])
    with pytest.raises(kopf.TemporaryError):
        asyncio.run(reconcile.apply_spec_change(_operator(kube), ftj, seen))
    (applied,) = [c for c in kube.ftj["status"]["conditions"] if c["type"] == "SpecApplied"]
    assert (applied["status"], applied["reason"]) == ("False", "UpdateNotApplied")
    assert detail in applied["message"] and applied["observedGeneration"] == 2
    assert "UpdateNotApplied" in events
    # Once the change goes through, the condition says so.
    del kube.refuse["jobs"]
    later = {**kube.ftj, "spec": ftj["spec"]}
    asyncio.run(reconcile.apply_spec_change(_operator(kube), later, seen))
    (applied,) = [c for c in kube.ftj["status"]["conditions"] if c["type"] == "SpecApplied"]
    assert (applied["status"], applied["reason"]) == ("True", "Applied")


# ------------------------------------------------------- following the spec after a restart


def _created_job(ftj: Obj) -> Obj:
    """The Job as the operator created it for `ftj` (its manifest, with a uid)."""
    settings = OperatorSettings()
    body = copy.deepcopy(manifests.children(manifests.target(ftj, settings), settings)[-1])
    body["metadata"]["uid"] = JOB_UID
    return body


def test_after_a_restart_a_job_that_follows_the_spec_costs_no_request(events: Posted) -> None:
    ftj = served(suspend=True, status={"phase": "Suspended", "reason": "Suspended"})
    kube = FakeKube(ftj)
    asyncio.run(reconcile.follow_spec(_operator(kube), ftj, _seen([ftj], [_created_job(ftj)])))
    assert kube.calls == [] and events == []


def test_after_a_restart_a_spec_changed_meanwhile_reaches_the_job(events: Posted) -> None:
    """Changed while no operator watched (the diff base is not persisted: persistence.py): the
    operator compares the Job with the spec and patches what differs."""
    before = served(suspend=True, status={"phase": "Suspended", "reason": "Suspended"})
    job_body = _created_job(before)
    ftj = served(suspend=False, maxRetries=5, status=before["status"], generation=2)
    kube = FakeKube(ftj, existing={"support-lora-train": job_body})
    kube.version = 2000  # newer than the streamed FineTuneJob
    asyncio.run(reconcile.follow_spec(_operator(kube), ftj, _seen([ftj], [job_body])))
    job_path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/support-lora-train"
    assert [call for call in kube.calls if call[1] == job_path] == [("PATCH", job_path)] * 2
    assert job_body["spec"]["suspend"] is True and job_body["spec"]["backoffLimit"] == 2
    assert kube.patches[job_path]["spec"]["backoffLimit"] == 5  # the last of the two patches
    # Resumed (said once), then waiting for the pod; no flap back to Resuming in between.
    assert events == ["Resuming", "WaitingForPod"]
    assert kube.ftj["status"]["observedGeneration"] == 2


def test_after_a_restart_a_finished_job_is_left_alone(events: Posted) -> None:
    ftj = served(maxRetries=5, status={"phase": "Succeeded", "reason": "Succeeded"})
    kube = FakeKube(ftj)
    job_body = _created_job(served())
    asyncio.run(reconcile.follow_spec(_operator(kube), ftj, _seen([ftj], [job_body])))
    assert kube.calls == [] and events == []
