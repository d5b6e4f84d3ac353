"""Pure: which vLLM servers a namespace needs, what each holds, and each job's status.serving.

Inputs are what the operator observes (FineTuneJobs, the servers' Deployments and pods, and
each server's state ConfigMap written by the serving agent); outputs are plans and status
values, no I/O (serving_reconcile.py sends them). See kubetune_trainer.serving for the
contract with the agent and docs/serving.md for the design.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from kubetune_operator.manifests import effective_spec, parse_spec
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.api import FineTuneSpec, ServingPhase, ServingStatus, as_directory
from kubetune_trainer.serving import (
    DesiredAdapter,
    DesiredState,
    Promotion,
    ServerKey,
    ServerState,
    max_lora_rank,
    promotion,
    served_model_name,
    server_key,
)

Body = Mapping[str, Any]

# The Service's port, whatever vLLM's port in the pod (KUBETUNE_SERVING_PORTS).
SERVICE_PORT: Final = 8000
# At least this --max-lora-rank, so adding the common r=8/16 adapters never restarts a server.
MIN_LORA_RANK: Final = 16


@dataclass
class ServerPlan:
    """One server and what it must hold."""

    key: ServerKey
    spec: FineTuneSpec  # of one of its jobs: storage and the base model's settings
    adapters: list[DesiredAdapter] = field(default_factory=list)
    jobs: list[Body] = field(default_factory=list)  # the FineTuneJobs it serves (owners)

    @property
    def name(self) -> str:
        return self.key.name

    def max_lora_rank(self, settings: OperatorSettings) -> int:
        ranks = [MIN_LORA_RANK, *(a.rank for a in self.adapters)]
        return max_lora_rank(ranks, settings.serving_max_lora_rank)

    def desired(self) -> DesiredState:
        return DesiredState(adapters=sorted(self.adapters, key=lambda a: a.name))


@dataclass(frozen=True)
class JobServing:
    """What spec.serving and the gate say about one job, before any server is looked at."""

    name: str
    uid: str
    spec: FineTuneSpec | None
    verdict: Promotion
    key: ServerKey | None = None
    refusal: str | None = None  # why it cannot be served even though it was promoted


def assess_jobs(
    namespace: str, ftjs: Iterable[Body], settings: OperatorSettings
) -> list[JobServing]:
    """The namespace's jobs that ask to be served (spec.serving.enabled), with the gate's
    verdict and their server."""
    out: list[JobServing] = []
    for ftj in ftjs:
        if not ((ftj.get("spec") or {}).get("serving") or {}).get("enabled"):
            continue
        meta = ftj["metadata"]
        try:
            spec = effective_spec(parse_spec(ftj), settings)
        except ValidationError:
            continue  # an invalid spec fails the job; nothing to serve
        verdict = promotion(spec, ftj.get("status") or {})
        key = server_key(namespace, meta["name"], spec)
        refusal = None
        if verdict.serve and spec.method != "full" and spec.lora.r > settings.serving_max_lora_rank:
            refusal = (
                f"Not served: the adapter's rank {spec.lora.r} is above the servers' maximum "
                f"{settings.serving_max_lora_rank} (vLLM --max-lora-rank; the chart's "
                "serving.maxLoraRank)."
            )
        out.append(JobServing(meta["name"], meta["uid"], spec, verdict, key, refusal))
    return out


def plan_servers(jobs: Sequence[JobServing], ftjs: Mapping[str, Body]) -> dict[str, ServerPlan]:
    """Server name -> plan, for the servers that hold at least one job."""
    plans: dict[str, ServerPlan] = {}
    for job in jobs:
        if not job.verdict.serve or job.refusal or job.key is None or job.spec is None:
            continue
        plan = plans.setdefault(job.key.name, ServerPlan(job.key, job.spec))
        plan.jobs.append(ftjs[job.name])
        if job.key.mode == "lora":
            uri = as_directory(job.spec.output.uri)
            plan.adapters.append(DesiredAdapter(name=job.name, uri=uri, rank=job.spec.lora.r))
    return plans


# ------------------------------------------------------------------------------------ ports


def server_port(name: str, current: Mapping[str, int], settings: OperatorSettings) -> int | None:
    """vLLM's port for server `name`: the one it has (`current`: server name -> port of every
    server this operator runs, in any namespace), else the lowest free port of the range.
    None when the range is used up. With a single port every server uses it."""
    low, high = settings.serving_port_range
    if low == high:
        return low
    if name in current:
        return current[name]
    taken = set(current.values())
    return next((port for port in range(low, high + 1) if port not in taken), None)


# ----------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ServerObservation:
    """What the operator sees of one server."""

    deployment: Body | None = None
    pods: Sequence[Body] = ()
    state: ServerState | None = None


def endpoint(
    name: str, namespace: str, port: int, pod_ip: str | None, settings: OperatorSettings
) -> str | None:
    if settings.serving_address == "pod":
        return f"http://{pod_ip}:{port}/v1" if pod_ip else None
    return f"http://{name}.{namespace}.svc:{SERVICE_PORT}/v1"


def _ready_pod(pods: Sequence[Body]) -> Body | None:
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        conditions = (pod.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            return pod
    return None


def _server_trouble(pods: Sequence[Body]) -> tuple[ServingPhase, str, str] | None:
    """(phase, reason, message) when the server's pod cannot start or keeps failing."""
    for pod in pods:
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                return (
                    "Starting",
                    "ServerUnschedulable",
                    "The vLLM server's pod cannot be scheduled: "
                    f"{str(cond.get('message') or '').strip()} (the chart's serving.resources, "
                    "nodeSelector, tolerations).",
                )
        for container in [*(status.get("initContainerStatuses") or []),
                          *(status.get("containerStatuses") or [])]:  # fmt: skip
            name = container.get("name")
            terminated = (container.get("state") or {}).get("terminated") or (
                container.get("lastState") or {}
            ).get("terminated")
            waiting = (container.get("state") or {}).get("waiting") or {}
            if terminated and terminated.get("reason") == "OOMKilled":
                return (
                    "Failed",
                    "ServerOutOfMemory",
                    f"The server's {name} container ran out of memory (OOMKilled): give it "
                    "more memory (serving.resources) or a smaller model.",
                )
            if terminated and terminated.get("exitCode") and name == "fetch-model":
                line = _first_line(terminated.get("message"))
                return ("Failed", "ModelFetchFailed", f"The server cannot fetch its model: {line}")
            if waiting.get("reason") in ("CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                                         "CreateContainerConfigError"):  # fmt: skip
                line = _first_line((terminated or {}).get("message")) or str(
                    waiting.get("message") or ""
                )
                return (
                    "Failed",
                    "ServerFailing",
                    f"The server's {name} container: {waiting['reason']}: {line}".rstrip(": "),
                )
    return None


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def job_serving_status(
    job: JobServing,
    server: ServerObservation | None,
    port: int | None,
    settings: OperatorSettings,
    namespace: str,
) -> ServingStatus:
    """status.serving of one job that asks to be served."""
    verdict = job.verdict
    if not verdict.serve:
        phase: ServingPhase = "Pending" if verdict.reason == "WaitingForTraining" else "NotServed"
        return ServingStatus(phase=phase, reason=verdict.reason, message=verdict.message)
    if job.refusal is not None:
        return ServingStatus(phase="NotServed", reason="AdapterRankTooLarge", message=job.refusal)
    assert job.key is not None
    name = job.key.name
    if port is None:
        return ServingStatus(
            phase="Pending",
            reason="NoServingPort",
            message=f"Every port of KUBETUNE_SERVING_PORTS ({settings.serving_ports}) is taken.",
            server=name,
        )
    if server is None or server.deployment is None:
        return ServingStatus(
            phase="Starting",
            reason="ServerCreating",
            message=f"Creating the vLLM server {name}.",
            server=name,
        )
    ready = _ready_pod(server.pods)
    if ready is None:
        trouble = _server_trouble(server.pods)
        phase, reason, message = trouble or (
            "Starting",
            "ServerStarting",
            f"The vLLM server {name} is starting (fetching the base model, loading it).",
        )
        return ServingStatus(phase=phase, reason=reason, message=message, server=name)
    url = endpoint(name, namespace, port, (ready.get("status") or {}).get("podIP"), settings)
    model = job.name if job.key.mode == "lora" else served_model_name(job.key)
    state = server.state
    if state is None or not state.vllm_ready:
        return ServingStatus(
            phase="Starting",
            reason="ServerStarting",
            message=f"The vLLM server {name} is starting.",
            server=name,
        )
    if job.key.mode == "full":
        return ServingStatus(
            phase="Serving",
            reason="Serving",
            message=f"Served by {name} as {model}.",
            server=name,
            endpoint=url,
            model=model,
        )
    report = state.adapters.get(job.name)
    if report is None or report.state == "Loading":
        return ServingStatus(
            phase="Loading",
            reason="AdapterLoading",
            message=f"Fetching the adapter, checking it against SHA256SUMS and loading it into "
            f"{name}.",
            server=name,
        )
    if report.state == "Failed":
        return ServingStatus(
            phase="Failed",
            reason="AdapterLoadFailed",
            message=f"The vLLM server {name} could not load the adapter: {report.message}"[:1024],
            server=name,
        )
    return ServingStatus(
        phase="Serving",
        reason="Serving",
        message=f"Served by {name} as {model}.",
        server=name,
        endpoint=url,
        model=model,
    )
