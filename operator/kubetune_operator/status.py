"""Pure: the part of a FineTuneJob's status the operator owns, computed from what it observes.

Inputs are the FineTuneJob, its Job and the Job's pods, as the API server returns them. The result
is a merge patch of the operator's fields only (phase, conditions, observedGeneration, startTime,
completionTime, jobName, reason, message); the trainer patches stage, progress, metrics,
parameters, estimate and output itself, and those are never touched here. An empty patch means
nothing changed, so no request is sent.

Level-based: the same observations give the same status, whatever happened in between; a status
is a function of the present, not of the events that led there. The exceptions are deliberate and
monotonic: startTime and completionTime are set once, and a terminal phase (Succeeded, Failed,
Cancelled) is final.

Conditions are the source of truth and follow metav1.Condition: one per state (Queued, Running,
Suspended, Complete, Failed, Cancelled; none True while Pending), `phase` is derived from them
(`phase_of`) for the printer column and older clients. Ready means the result can be used: the
job completed and, when spec.serving asks for it, its adapter is being served (status.serving,
written by serving_reconcile; `ready_stale` tells the FineTuneJob's watch handler when Ready must
be recomputed). kstatus reads Reconciling (True while the job or its serving makes progress) and
Stalled (True when it failed for good). A condition's lastTransitionTime changes only when its
status does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from kubetune_operator.manifests import CONTAINER
from kubetune_trainer import exitcodes
from kubetune_trainer.api import FineTuneSpec, Phase

Body = Mapping[str, Any]

OWNED_FIELDS: Final = (
    "phase",
    "conditions",
    "observedGeneration",
    "startTime",
    "completionTime",
    "jobName",
    "reason",
    "message",
)
TERMINAL: Final = frozenset({"Succeeded", "Failed", "Cancelled"})
IN_PROGRESS: Final = frozenset({"Pending", "Queued", "Running"})
# The state conditions, in the order phase_of reads them, with the phase each one means.
STATE_CONDITIONS: Final[tuple[tuple[str, Phase], ...]] = (
    ("Cancelled", "Cancelled"),
    ("Failed", "Failed"),
    ("Complete", "Succeeded"),
    ("Suspended", "Suspended"),
    ("Running", "Running"),
    ("Queued", "Queued"),
)
CONDITION_TYPES: Final = (
    *(kind for kind, _ in STATE_CONDITIONS),
    "Ready",
    "Reconciling",
    "Stalled",
)
# Reasons that need someone's attention: posted as Warning events.
PROBLEMS: Final = frozenset(
    {
        "Unschedulable",
        "CredentialsSecretMissing",
        "CreateContainerConfigError",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "Retrying",
        "PVCNotFound",
        "QuotaExceeded",
        "Forbidden",
        "PriorityClassNotFound",
        "PodSecurityViolation",
        "PodCreateFailed",
    }
)
# Condition types this operator wrote in earlier versions; removed from a status it rewrites.
RETIRED: Final = frozenset({"Succeeded"})
IMAGE_PULL_REASONS: Final = frozenset(
    {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
)
MESSAGE_LIMIT: Final = 1024  # status.message is a ShortText in the API


@dataclass(frozen=True)
class Verdict:
    """What the observations mean: a phase and a reason a user can act on."""

    phase: Phase
    reason: str
    message: str
    started: str | None = None  # when the trainer container first ran, if it did
    finished: str | None = None  # when the Job finished, if it did

    @property
    def is_problem(self) -> bool:
        return self.phase == "Failed" or self.reason in PROBLEMS


@dataclass(frozen=True)
class Blocker:
    """Why there is no training pod: the operator could not create the Job (a missing PVC, a
    quota, an admission policy: `creation_blocker`), or the Job controller cannot create its
    pod (`pod_creation_blocker`). Pending while it may clear by itself; Failed when the API
    server rejected what the spec asks for."""

    reason: str
    message: str
    phase: Phase = "Pending"


def creation_blocker(
    kind: str, name: str, namespace: str, status: int | None, detail: str
) -> Blocker:
    """The API server refused to create one of the FineTuneJob's children: 403 (a quota, an
    admission policy or webhook, RBAC) may clear, so the job stays Pending and the operator
    retries; anything else will not, so the job fails."""
    what = f"Cannot create {kind} {name} in namespace {namespace}: {detail}"
    if status in (400, 422):
        # The spec asks for something the API server will never accept: retrying cannot help.
        return Blocker(
            "InvalidSpec",
            _clip(f"{what}. Fix the FineTuneJob's spec and create it again."),
            phase="Failed",
        )
    if status != 403:
        return Blocker(
            "CreateFailed",
            _clip(f"{what}. This looks like a kubetune-operator bug: please report it."),
            phase="Failed",
        )
    if "exceeded quota" in detail:
        return Blocker(
            "QuotaExceeded",
            _clip(
                f"{what}. Free quota in namespace {namespace} or raise its ResourceQuota; the "
                "operator retries until it fits."
            ),
        )
    return Blocker(
        "Forbidden",
        _clip(
            f"{what}. An admission policy or webhook refused it, or the operator lacks a "
            "permission (see the chart's RBAC); the operator retries."
        ),
    )


def pod_creation_blocker(job_name: str, namespace: str, detail: str) -> Blocker:
    """The Job controller cannot create the training pod (its FailedCreate Event)."""
    what = f"Job {job_name} cannot create its training pod: {detail}"
    if "exceeded quota" in detail:
        return Blocker(
            "QuotaExceeded",
            _clip(
                f"{what}. Free quota in namespace {namespace} or raise its ResourceQuota; the "
                "Job controller retries, so the pod starts once it fits."
            ),
        )
    if "no PriorityClass with name" in detail:
        return Blocker(
            "PriorityClassNotFound",
            _clip(
                f"{what}. Create the PriorityClass or change spec.resources.priorityClassName "
                "(recreate the FineTuneJob); the pod starts once the PriorityClass exists."
            ),
        )
    if "violates PodSecurity" in detail:
        return Blocker(
            "PodSecurityViolation",
            _clip(f"{what}. The namespace's Pod Security level forbids the training pod."),
        )
    return Blocker("PodCreateFailed", _clip(f"{what}."))


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- small readers


def _conditions(obj: Body | None) -> list[Body]:
    return list(((obj or {}).get("status") or {}).get("conditions") or [])


def _true_condition(obj: Body | None, *types: str) -> Body | None:
    for cond in _conditions(obj):
        if cond.get("type") in types and cond.get("status") == "True":
            return cond
    return None


def _container(pod: Body) -> Body:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER:
            return dict(status)
    return dict(statuses[0]) if statuses else {}


def _terminated(pod: Body) -> Body | None:
    state = _container(pod).get("state") or {}
    terminated: Body | None = state.get("terminated")
    return terminated


def _by_age(pods: Sequence[Body]) -> list[Body]:
    return sorted(
        pods,
        key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"].get("name", "")),
    )


def _pod_phase(pod: Body) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def first_line(text: str | None) -> str:
    """The line of a termination message that says what went wrong.

    The trainer writes its actionable line first. When it crashed instead, the message is the
    end of its log (FallbackToLogsOnError), ending with a traceback whose last line is the
    exception.
    """
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return ""
    crashed = any(line.startswith("Traceback (most recent call last)") for line in lines)
    return (lines[-1] if crashed else lines[0])[:512]


def _started(pods: Sequence[Body]) -> str | None:
    """When the trainer container first ran in any pod: training has started from then on."""
    times = []
    for pod in pods:
        state = _container(pod).get("state") or {}
        for key in ("running", "terminated"):
            started = (state.get(key) or {}).get("startedAt")
            if started:
                times.append(str(started))
    return min(times) if times else None


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


# ------------------------------------------------------------------------------- the verdict


def assess(
    ftj: Body,
    job: Body | None,
    pods: Sequence[Body],
    *,
    spec: FineTuneSpec | None,
    spec_error: str | None = None,
    blocker: Blocker | None = None,
    workload: Body | None = None,
) -> Verdict:
    """The phase, reason and message for the current observations (`workload`: the Job's
    Kueue Workload, when Kueue manages it)."""
    status = ftj.get("status") or {}
    previous = status.get("phase")
    verdict = _assess(
        ftj, job, pods, spec=spec, spec_error=spec_error, blocker=blocker, workload=workload
    )
    if previous in TERMINAL and verdict.phase != previous:
        # Final: a Succeeded job whose Job is deleted later did not become Cancelled. Within
        # the same phase the details may still improve (the Job controller counts the last
        # failed pod only after it marked the Job as failing).
        return Verdict(previous, status.get("reason") or previous, status.get("message") or "")
    return verdict


def _assess(
    ftj: Body,
    job: Body | None,
    pods: Sequence[Body],
    *,
    spec: FineTuneSpec | None,
    spec_error: str | None,
    blocker: Blocker | None,
    workload: Body | None,
) -> Verdict:
    status = ftj.get("status") or {}
    if spec_error is not None or spec is None:
        return Verdict("Failed", "InvalidSpec", _clip(f"Invalid spec: {spec_error}"))
    if ftj["metadata"].get("deletionTimestamp"):
        return Verdict(
            "Cancelled",
            "Deleting",
            "The FineTuneJob is being deleted: its training pod is stopped and its Job removed.",
        )
    if job is None:
        if spec.cancel:
            return _cancelled(spec, None)
        return _without_job(status, blocker)
    return _with_job(ftj, spec, job, _by_age(pods), workload, blocker)


def _cancelled(spec: FineTuneSpec, started: str | None) -> Verdict:
    return Verdict(
        "Cancelled",
        "CancelRequested",
        "spec.cancel is true: the training pod was stopped and the job will not run again; "
        f"anything it published stays under {spec.output.uri}.",
        started=started,
    )


def _without_job(status: Body, blocker: Blocker | None) -> Verdict:
    if blocker is not None:
        return Verdict(blocker.phase, blocker.reason, _clip(blocker.message))
    if status.get("jobName"):
        return Verdict(
            "Cancelled",
            "JobDeleted",
            f"The training Job {status['jobName']} was deleted, so this FineTuneJob will not "
            "run again; create a new FineTuneJob to train again.",
        )
    if status.get("phase") == "Pending" and status.get("reason"):
        # Keep the reason a handler recorded (e.g. PVCNotFound) until the Job exists.
        return Verdict("Pending", status["reason"], status.get("message") or "")
    return Verdict("Pending", "Creating", "Creating the training Job.")


def _with_job(  # noqa: PLR0917 - the observations, as _assess reads them
    ftj: Body,
    spec: FineTuneSpec,
    job: Body,
    pods: list[Body],
    workload: Body | None,
    blocker: Blocker | None,
) -> Verdict:
    started = _started(pods)
    succeeded = _true_condition(job, "Complete", "SuccessCriteriaMet")
    if succeeded is not None:
        finished = (job.get("status") or {}).get("completionTime") or succeeded.get(
            "lastTransitionTime"
        )
        return Verdict(
            "Succeeded",
            "Succeeded",
            f"Training finished; the output was written to {spec.output.uri}.",
            started=started,
            finished=finished,
        )
    failed = _true_condition(job, "Failed", "FailureTarget") or _failing_by_policy(job, pods)
    if failed is not None:
        reason, message = _failure(spec, job, failed, pods)
        return Verdict(
            "Failed",
            reason,
            _clip(message),
            started=started,
            finished=failed.get("lastTransitionTime"),
        )
    if spec.cancel:
        return _cancelled(spec, started)
    if (job.get("spec") or {}).get("suspend"):
        return _suspended(spec, started, workload)
    return _progress(ftj, spec, job, pods, started=started, blocker=blocker)


def _suspended(spec: FineTuneSpec, started: str | None, workload: Body | None) -> Verdict:
    if spec.suspend:
        return Verdict(
            "Suspended",
            "Suspended",
            "spec.suspend is true: the training pod is stopped. Set it to false to resume from "
            "the last checkpoint.",
            started=started,
        )
    if spec.queue_name is not None:
        message = f"Waiting for Kueue to admit the job through LocalQueue {spec.queue_name}"
        why = _not_admitted_because(workload)
        return Verdict(
            "Queued",
            "WaitingForAdmission",
            _clip(f"{message}: {why}" if why else f"{message}."),
            started=started,
        )
    return Verdict("Pending", "Resuming", "Resuming the suspended training Job.", started=started)


def _not_admitted_because(workload: Body | None) -> str | None:
    """Kueue's own explanation on the Workload (e.g. "LocalQueue x doesn't exist", "couldn't
    assign flavors ...: insufficient unused quota for nvidia.com/gpu ..., 1 more needed")."""
    for condition in (workload or {}).get("status", {}).get("conditions") or []:
        if condition.get("type") == "QuotaReserved" and condition.get("status") == "False":
            return str(condition.get("message") or "") or None
    return None


def _progress(
    ftj: Body,
    spec: FineTuneSpec,
    job: Body,
    pods: list[Body],
    *,
    started: str | None,
    blocker: Blocker | None,
) -> Verdict:
    job_name = job["metadata"]["name"]
    # A pod being deleted (the Job was suspended, or the pod preempted or evicted) is on its way
    # out whatever its phase says: it is neither the running trainer nor a failed attempt.
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    if not live and pods:
        return Verdict(
            "Pending",
            "PodStopping",
            f"The training pod {pods[-1]['metadata']['name']} is stopping; Job {job_name} "
            "starts a new one, which resumes from the last checkpoint.",
            started=started,
        )
    if not live and blocker is not None:
        return Verdict(blocker.phase, blocker.reason, blocker.message, started=started)
    if not live:
        return Verdict(
            "Pending",
            "WaitingForPod",
            f"Job {job_name} was created; waiting for its training pod.",
            started=started,
        )
    if spec.resources.nodes > 1:
        return _gang_progress(ftj, spec, job, pods, live, started=started)
    pod = live[-1]
    pod_name = pod["metadata"]["name"]
    phase = _pod_phase(pod)
    if phase == "Running":
        return Verdict(
            "Running",
            "TrainerRunning",
            f"The trainer is running in pod {pod_name}.",
            started=started,
        )
    if phase == "Succeeded":
        return Verdict(
            "Running",
            "TrainerFinished",
            f"The trainer in pod {pod_name} finished; waiting for Job {job_name} to complete.",
            started=started,
        )
    if phase == "Failed":
        failures = max(_failures(job), 1)
        return Verdict(
            "Pending",
            "Retrying",
            _clip(
                f"Attempt {failures} of {spec.max_retries + 1} failed "
                f"({_attempt(spec, pod)}); retrying, resuming from the last checkpoint."
            ),
            started=started,
        )
    return _pending_pod(ftj, spec, pod, pod_name, started)


COMPLETION_INDEX: Final = "batch.kubernetes.io/job-completion-index"


def _index(pod: Body) -> str:
    meta = pod.get("metadata") or {}
    return str((meta.get("annotations") or {}).get(COMPLETION_INDEX, ""))


def root_failed_pod(failed: Sequence[Body]) -> Body | None:
    """Of a job's failed pods (oldest first), the one whose failure explains the others: the
    newest that did not only lose a peer (exitcodes.IGNORED; a gang's other pods stop with
    it), else the newest."""
    own = [p for p in failed if (_terminated(p) or {}).get("exitCode") not in exitcodes.IGNORED]
    chosen = own or list(failed)
    return chosen[-1] if chosen else None


def _gang_progress(
    ftj: Body,
    spec: FineTuneSpec,
    job: Body,
    pods: list[Body],
    live: list[Body],
    *,
    started: str | None,
) -> Verdict:
    """A multi-node job: one story for its pods. The newest pod of each completion index is
    the gang member; it runs when all do."""
    nodes = spec.resources.nodes
    newest = {_index(p): p for p in live}  # live is oldest first
    members = sorted(newest.values(), key=lambda p: int(_index(p) or 0))
    failed = [p for p in members if _pod_phase(p) == "Failed"]
    if failed:
        every_failed = [p for p in pods if _pod_phase(p) == "Failed"]
        root = root_failed_pod(every_failed) or failed[-1]
        return Verdict(
            "Pending",
            "Retrying",
            _clip(
                f"Attempt {max(_failures(job), 1)} of {spec.max_retries + 1} failed in pod "
                f"{root['metadata']['name']} ({_attempt(spec, root)}); the {nodes} pods restart "
                "together, resuming from the last checkpoint."
            ),
            started=started,
        )
    waiting = [p for p in members if _pod_phase(p) not in ("Running", "Succeeded")]
    if waiting:
        pod = waiting[0]
        return _pending_pod(ftj, spec, pod, pod["metadata"]["name"], started)
    if len(members) < nodes:
        return Verdict(
            "Pending",
            "WaitingForPod",
            f"{len(members)} of {nodes} training pods of Job {job['metadata']['name']} exist; "
            "waiting for the rest.",
            started=started,
        )
    processes = nodes * spec.resources.processes()
    if all(_pod_phase(p) == "Succeeded" for p in members):
        return Verdict(
            "Running",
            "TrainerFinished",
            f"The trainer finished on all {nodes} pods; waiting for Job "
            f"{job['metadata']['name']} to complete.",
            started=started,
        )
    first = members[0]["metadata"]["name"]
    return Verdict(
        "Running",
        "TrainerRunning",
        f"The trainer is running on {nodes} pods, {processes} processes (progress from rank 0 "
        f"in pod {first}).",
        started=started,
    )


def _pending_pod(
    ftj: Body, spec: FineTuneSpec, pod: Body, pod_name: str, started: str | None
) -> Verdict:
    for cond in _conditions(pod):
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            compute = spec.resources
            wanted = f"gpus: {compute.gpus} x {compute.gpu_resource_name}"
            return Verdict(
                "Pending",
                "Unschedulable",
                _clip(
                    f"The training pod cannot be scheduled: {cond.get('message', '').strip()} "
                    f"Check spec.resources ({wanted}, cpu, memory, nodeSelector, tolerations, "
                    "priorityClassName) against the cluster's nodes."
                ),
                started=started,
            )
    waiting = (_container(pod).get("state") or {}).get("waiting") or {}
    reason = str(waiting.get("reason") or "")
    detail = str(waiting.get("message") or "").strip()
    if reason == "CreateContainerConfigError":
        return _config_error(ftj, spec, detail, started)
    if reason in IMAGE_PULL_REASONS:
        image = _container(pod).get("image") or spec.image
        return Verdict(
            "Pending",
            reason,
            _clip(
                f"Cannot pull the trainer image {image}: {detail or reason}. Check spec.image "
                "(or the operator's default image) and the namespace's image pull secrets."
            ),
            started=started,
        )
    return Verdict(
        "Pending", "PodStarting", f"The training pod {pod_name} is starting.", started=started
    )


def _config_error(ftj: Body, spec: FineTuneSpec, detail: str, started: str | None) -> Verdict:
    ref = spec.storage.credentials_secret_ref
    # Kubelet: 'secret "x" not found' or "couldn't find key k in Secret ns/x".
    if ref is not None and ref.name in detail and "ecret" in detail:
        namespace = ftj["metadata"].get("namespace", "")
        return Verdict(
            "Pending",
            "CredentialsSecretMissing",
            _clip(
                f"The training pod cannot start: {detail}. Create Secret {ref.name} in namespace "
                f"{namespace} with the keys {ref.access_key_id_key} and "
                f"{ref.secret_access_key_key} (spec.storage.credentialsSecretRef); the pod "
                "starts once it exists."
            ),
            started=started,
        )
    return Verdict(
        "Pending",
        "CreateContainerConfigError",
        _clip(f"The training pod cannot start: {detail}."),
        started=started,
    )


def pod_failure_action(policy: Body | None, pod: Body) -> str | None:
    """The action of the first rule of a Job's podFailurePolicy that a failed pod matches (None:
    no rule does, so the failure counts against backoffLimit), evaluated the way the Job
    controller does (k8s.io/kubernetes pkg/controller/job/pod_failure_policy.go): rules in
    order; an exit-code rule looks at terminated containers with a non-zero exit code (of
    containerName only, when set); a pod-condition rule at the pod's conditions."""
    status = pod.get("status") or {}
    for rule in (policy or {}).get("rules") or []:
        on_exit = rule.get("onExitCodes")
        if on_exit is not None:
            values = set(on_exit.get("values") or ())
            wanted = on_exit.get("containerName")
            for container in [
                *(status.get("containerStatuses") or []),
                *(status.get("initContainerStatuses") or []),
            ]:
                code = ((container.get("state") or {}).get("terminated") or {}).get("exitCode")
                if not code or (wanted is not None and container.get("name") != wanted):
                    continue
                if (code in values) == (on_exit.get("operator") == "In"):
                    return str(rule.get("action"))
        else:
            patterns = rule.get("onPodConditions") or []
            for cond in status.get("conditions") or []:
                if any(
                    cond.get("type") == p.get("type")
                    and cond.get("status") == p.get("status", "True")
                    for p in patterns
                ):
                    return str(rule.get("action"))
    return None


def _failing_by_policy(job: Body, pods: Sequence[Body]) -> Body | None:
    """The Failed condition the Job controller is about to add, when a failed pod matches a
    FailJob rule of the Job's podFailurePolicy (a permanent trainer exit code): the pod's
    failure decides the Job's, so the status says Failed at once instead of "retrying" until
    the controller has caught up."""
    policy = (job.get("spec") or {}).get("podFailurePolicy")
    for pod in reversed(pods):  # newest first
        if _pod_phase(pod) == "Failed" and pod_failure_action(policy, pod) == "FailJob":
            finished = (_terminated(pod) or {}).get("finishedAt")
            return {
                "type": "FailureTarget",
                "status": "True",
                "reason": "PodFailurePolicy",
                "lastTransitionTime": finished,
            }
    return None


def _failures(job: Body) -> int:
    """Failed pods the Job counts, including those it has not added to status.failed yet."""
    status = job.get("status") or {}
    uncounted = (status.get("uncountedTerminatedPods") or {}).get("failed") or []
    return int(status.get("failed") or 0) + len(uncounted)


def _attempt(spec: FineTuneSpec, pod: Body | None) -> str:
    """One failed attempt, in words."""
    terminated = _terminated(pod) if pod is not None else None
    if terminated is None:
        return "no details: the pod is gone"
    if terminated.get("reason") == "OOMKilled":
        return f"killed for exceeding its memory limit of {spec.resources.memory} (OOMKilled)"
    code = terminated.get("exitCode")
    line = first_line(terminated.get("message"))
    return f"exit code {code}: {line}" if line else f"exit code {code}"


def _failure(spec: FineTuneSpec, job: Body, failed: Body, pods: list[Body]) -> tuple[str, str]:
    job_reason = str(failed.get("reason") or "")
    if job_reason == "DeadlineExceeded":
        return (
            "DeadlineExceeded",
            f"The job ran longer than spec.timeout ({spec.timeout}) and was stopped. Raise "
            "spec.timeout, or shorten training (hyperparameters.maxSteps or epochs).",
        )
    failed_pods = [p for p in pods if _pod_phase(p) == "Failed"]
    last = root_failed_pod(failed_pods)
    terminated = _terminated(last) if last is not None else None
    if terminated is not None:
        if terminated.get("reason") == "OOMKilled":
            return (
                "OOMKilled",
                f"The trainer was killed for using more memory than its limit "
                f"({spec.resources.memory}). Try method qlora, a smaller "
                "hyperparameters.batchSize or dataset.maxSeqLength, or raise resources.memory.",
            )
        code = terminated.get("exitCode")
        if code in exitcodes.REASONS:
            reason = exitcodes.REASONS[code]
            line = first_line(terminated.get("message"))
            return reason, line or f"The trainer exited with code {code} ({reason})."
    job_name = job["metadata"]["name"]
    if job_reason == "BackoffLimitExceeded":
        failures = max(_failures(job), len(failed_pods))
        code = terminated.get("exitCode") if terminated is not None else None
        if code in exitcodes.RETRIED_REASONS:
            line = first_line(terminated.get("message") if terminated is not None else None)
            return (
                exitcodes.RETRIED_REASONS[code],
                f"{line or f'The trainer exited with code {code}.'} (the trainer failed "
                f"{failures} time(s), more than spec.maxRetries ({spec.max_retries}) allows)",
            )
        return (
            "BackoffLimitExceeded",
            f"The trainer failed {failures} time(s), more than spec.maxRetries "
            f"({spec.max_retries}) allows; last attempt: {_attempt(spec, last)}. "
            f"See `kubectl logs job/{job_name}`.",
        )
    message = str(failed.get("message") or "").strip()
    return job_reason or "JobFailed", message or f"Job {job_name} failed."


# ------------------------------------------------------------------------------- the status


def spec_applied(ftj: Body, refused: str | None) -> Body:
    """The SpecApplied condition after carrying a spec change into the children: False with
    the API server's reason when a child refused the change (the job runs with the settings it
    had), True otherwise."""
    generation = ftj["metadata"].get("generation")
    if refused is None:
        return {
            "type": "SpecApplied",
            "status": "True",
            "observedGeneration": generation,
            "reason": "Applied",
            "message": "The spec's mutable settings reached the training Job.",
        }
    return {
        "type": "SpecApplied",
        "status": "False",
        "observedGeneration": generation,
        "reason": "UpdateNotApplied",
        "message": _clip(
            f"The change of generation {generation} did not reach the training Job or its "
            f"config: {refused}. The job goes on with its previous settings."
        ),
    }


def phase_of(conditions: Sequence[Body]) -> Phase:
    """The phase the conditions say: the first True state condition's, else Pending."""
    true = {c.get("type") for c in conditions if c.get("status") == "True"}
    return next((phase for kind, phase in STATE_CONDITIONS if kind in true), "Pending")


@dataclass(frozen=True)
class Readiness:
    """Whether a FineTuneJob's result can be used, and why (the Ready condition)."""

    ready: bool
    reason: str
    message: str
    waiting: bool = False  # progressing towards Ready (a succeeded job not served yet)


def readiness(verdict: Verdict, ftj: Body) -> Readiness:
    """Ready: complete, and served when spec.serving.enabled (status.serving.phase Serving)."""
    if verdict.phase != "Succeeded":
        return Readiness(False, verdict.reason, verdict.message)
    if not ((ftj.get("spec") or {}).get("serving") or {}).get("enabled"):
        return Readiness(True, verdict.reason, verdict.message)
    serving = (ftj.get("status") or {}).get("serving") or {}
    phase = serving.get("phase")
    if phase == "Serving":
        return Readiness(True, "Serving", str(serving.get("message") or "Served."))
    reason = str(serving.get("reason") or "WaitingToBeServed")
    message = str(
        serving.get("message")
        or "Training succeeded; waiting for the operator to serve the adapter (spec.serving)."
    )
    return Readiness(False, reason, message, waiting=phase not in ("NotServed", "Failed"))


def ready_stale(ftj: Body) -> bool:
    """A succeeded FineTuneJob whose Ready condition no longer matches its status.serving:
    the serving side changed it, so the status must be computed again."""
    current = ftj.get("status") or {}
    if current.get("phase") != "Succeeded":
        return False
    verdict = Verdict("Succeeded", str(current.get("reason") or ""), "")
    wanted = readiness(verdict, ftj)
    ready = _true_condition(ftj, "Ready") is not None
    old = next((c for c in _conditions(ftj) if c.get("type") == "Ready"), None)
    return ready != wanted.ready or (old is not None and old.get("reason") != wanted.reason)


def conditions(
    verdict: Verdict,
    generation: int | None,
    previous: Sequence[Body],
    now: datetime,
    *,
    extra: Body | None = None,
    ready: Readiness | None = None,
) -> list[Body]:
    """Our conditions (then any others, untouched, or replaced by `extra` of the same type),
    lastTransitionTime kept when the status of a condition did not change."""
    phase = verdict.phase
    ready = ready or readiness(verdict, {})
    wanted = {kind: phase == means for kind, means in STATE_CONDITIONS}
    wanted |= {
        "Ready": ready.ready,
        "Reconciling": phase in IN_PROGRESS or ready.waiting,
        "Stalled": phase == "Failed",
    }
    by_type = {str(c.get("type")): c for c in previous}
    out: list[Body] = []
    for kind in CONDITION_TYPES:
        status = "True" if wanted[kind] else "False"
        old = by_type.get(kind)
        since = rfc3339(now) if old is None or old.get("status") != status else None
        reason, message = verdict.reason, verdict.message
        if kind == "Ready" or (kind == "Reconciling" and ready.waiting):
            reason, message = ready.reason, ready.message
        cond: dict[str, Any] = {
            "type": kind,
            "status": status,
            "observedGeneration": generation,
            "lastTransitionTime": since or (old or {}).get("lastTransitionTime") or rfc3339(now),
            "reason": reason,
            "message": message,
        }
        if generation is None:
            del cond["observedGeneration"]
        out.append(cond)
    # Conditions of ours that are gone (Succeeded, before Complete) are dropped, not kept.
    others = [c for c in previous if c.get("type") not in wanted and c.get("type") not in RETIRED]
    if extra is not None:
        old = next((c for c in others if c.get("type") == extra["type"]), None)
        same = old is not None and old.get("status") == extra["status"]
        since = (old or {}).get("lastTransitionTime") if same else None
        replaced = {**extra, "lastTransitionTime": since or rfc3339(now)}
        others = [replaced if c is old else c for c in others] if old else [*others, replaced]
    return out + others


def desired_status(
    ftj: Body,
    job: Body | None,
    pods: Sequence[Body],
    now: datetime,
    *,
    spec: FineTuneSpec | None,
    spec_error: str | None = None,
    blocker: Blocker | None = None,
    workload: Body | None = None,
    condition: Body | None = None,
) -> tuple[Verdict, dict[str, Any]]:
    """The operator's status fields, all of them, as they should be now."""
    current = ftj.get("status") or {}
    verdict = assess(
        ftj, job, pods, spec=spec, spec_error=spec_error, blocker=blocker, workload=workload
    )
    generation = ftj["metadata"].get("generation")
    conds = conditions(
        verdict,
        generation,
        current.get("conditions") or [],
        now,
        extra=condition,
        ready=readiness(verdict, ftj),
    )
    out: dict[str, Any] = {
        "phase": phase_of(conds),  # derived: the conditions are the truth
        "reason": verdict.reason,
        "message": verdict.message,
        "conditions": conds,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    start = current.get("startTime") or verdict.started
    if start:
        out["startTime"] = start
    if verdict.phase in TERMINAL:
        out["completionTime"] = current.get("completionTime") or verdict.finished or rfc3339(now)
    job_name = job["metadata"]["name"] if job is not None else current.get("jobName")
    if job_name:
        out["jobName"] = job_name
    return verdict, out


def status_patch(
    ftj: Body,
    job: Body | None,
    pods: Sequence[Body],
    now: datetime,
    *,
    spec: FineTuneSpec | None,
    spec_error: str | None = None,
    blocker: Blocker | None = None,
    workload: Body | None = None,
    condition: Body | None = None,
) -> tuple[Verdict, dict[str, Any]]:
    """The verdict, and the merge patch of the owned fields that differ ({} if none do)."""
    verdict, desired = desired_status(
        ftj,
        job,
        pods,
        now,
        spec=spec,
        spec_error=spec_error,
        blocker=blocker,
        workload=workload,
        condition=condition,
    )
    current = ftj.get("status") or {}
    return verdict, {key: value for key, value in desired.items() if current.get(key) != value}
