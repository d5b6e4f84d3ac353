"""Serving fine-tuned models with vLLM: what the operator and the serving agent agree on.

One vLLM server (a Deployment and a Service) per base model, storage and namespace serves every
adapter trained on that base there (LoRA and QLoRA: loaded at run time, no restart); a full
fine-tune gets a server of its own. The operator decides what each server holds and reports it
in the FineTuneJobs' status; the serving agent, a sidecar in the server's pod, only executes:

    operator --writes--> ConfigMap <server>-desired   desired.json: DesiredState
                                                      (the adapters to hold, nothing secret)
    agent    --reads---> it, fetches each adapter from S3, checks it against the output's
                          SHA256SUMS, loads it into vLLM (POST /v1/load_lora_adapter) and
                          unloads what is no longer desired (POST /v1/unload_lora_adapter)
    agent    --writes--> ConfigMap <server>-state     state.json: ServerState
    operator --reads---> it (a watch), and writes status.serving of each FineTuneJob

So the agent needs no right on FineTuneJobs at all: `get` on the first ConfigMap and `get`,
`patch` on the second, by name. The operator creates both (the state one empty).

Only pydantic and the standard library: imported by the operator image, which has no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune_trainer.api import FineTuneSpec, StorageConfig, as_directory

# Labels of a server's objects (Deployment, pods, Service, ConfigMaps, its ServiceAccount).
SERVER_LABEL: Final = "kubetune.dev/model-server"  # value: the server's name
COMPONENT: Final = "model-server"
DESIRED_SUFFIX: Final = "-desired"
STATE_SUFFIX: Final = "-state"
DESIRED_KEY: Final = "desired.json"
STATE_KEY: Final = "state.json"
# Where the server pod keeps models: the base model (or full fine-tune) and the adapters.
MODELS_DIR: Final = "/models"
BASE_MODEL_DIR: Final = f"{MODELS_DIR}/base"
ADAPTERS_DIR: Final = f"{MODELS_DIR}/adapters"
# vLLM accepts these --max-lora-rank values (vllm/config/lora.py); the server uses the smallest
# that holds every adapter it serves.
VLLM_LORA_RANKS: Final = (1, 8, 16, 32, 64, 128, 256, 320, 512)

ServerMode = Literal["lora", "full"]
AdapterState = Literal["Loading", "Loaded", "Failed"]


class _Doc(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# --------------------------------------------------------------------------- server identity


@dataclass(frozen=True)
class ServerKey:
    """What makes two jobs share a server: same namespace, base model (and revision), and the
    same store and credentials (the agent fetches every adapter with one Secret). A full
    fine-tune is its own server (`job` is its FineTuneJob's name)."""

    namespace: str
    mode: ServerMode
    model_uri: str  # the base model for lora; the job's output for full
    revision: str | None
    endpoint: str | None
    secret: str | None
    job: str | None = None

    @property
    def name(self) -> str:
        """kubetune-serve-<10 hex>: a DNS label, stable for the same key."""
        text = json.dumps(
            [self.mode, self.model_uri, self.revision, self.endpoint, self.secret, self.job]
        )
        return f"kubetune-serve-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def served_model_name(key: ServerKey) -> str:
    """vLLM's --served-model-name: the FineTuneJob's name for a full fine-tune, else the base
    model's URI (the adapters are served under their FineTuneJobs' names)."""
    return key.job if key.job is not None else key.model_uri


def server_key(namespace: str, name: str, spec: FineTuneSpec) -> ServerKey:
    """The server that serves this job's result. `spec` is the effective spec (the operator's
    defaults for endpoint and Secret filled in)."""
    storage = spec.storage
    secret = storage.credentials_secret_ref.name if storage.credentials_secret_ref else None
    if spec.method == "full":
        return ServerKey(
            namespace, "full", as_directory(spec.output.uri), None, storage.endpoint, secret, name
        )
    return ServerKey(
        namespace,
        "lora",
        as_directory(spec.base_model.uri),
        spec.base_model.revision,
        storage.endpoint,
        secret,
    )


# ------------------------------------------------------------------------------ the gate


@dataclass(frozen=True)
class Promotion:
    """Whether a job's result may be served now, and why (not)."""

    serve: bool
    reason: str
    message: str


def promotion(spec: FineTuneSpec, status: Mapping[str, Any]) -> Promotion:
    """spec.serving and the job's outcome -> serve or not. Pure: the operator's verdict."""
    if not spec.serving.enabled:
        return Promotion(False, "NotRequested", "spec.serving.enabled is false.")
    if status.get("phase") != "Succeeded":
        return Promotion(
            False, "WaitingForTraining", "The model is served once the job has succeeded."
        )
    if spec.serving.promotion_gate == "evalLoss":
        metrics = status.get("metrics") or {}
        tuned, base = metrics.get("evalLoss"), metrics.get("baseEvalLoss")
        if tuned is None or base is None:
            return Promotion(
                False,
                "PromotionGateNoEvaluation",
                "spec.serving.promotionGate is evalLoss but the job reported no validation loss "
                "for both models: enable evaluation with the loss metric and validation data.",
            )
        if not tuned < base:
            return Promotion(
                False,
                "PromotionGateRefused",
                f"Not promoted: the fine-tuned validation loss {tuned:.4f} is not below the "
                f"base model's {base:.4f} (spec.serving.promotionGate: evalLoss).",
            )
    return Promotion(True, "Promoted", "The job succeeded and may be served.")


def max_lora_rank(ranks: Iterable[int], cap: int) -> int:
    """The smallest vLLM --max-lora-rank that holds every rank (at least 8), capped."""
    needed = max([8, *ranks])
    fitting = [r for r in VLLM_LORA_RANKS if r >= needed] or [VLLM_LORA_RANKS[-1]]
    return min(fitting[0], cap)


# ------------------------------------------------------------------------ the two documents


class DesiredAdapter(_Doc):
    """One adapter the server must hold."""

    name: str = Field(description="vLLM's lora_name: the FineTuneJob's name.")
    uri: str = Field(description="The job's output prefix (adapter files and SHA256SUMS).")
    rank: int = Field(ge=1, description="The adapter's LoRA rank (spec.lora.r).")


class DesiredState(_Doc):
    """ConfigMap <server>-desired, key desired.json: written by the operator."""

    adapters: list[DesiredAdapter] = Field(default_factory=list)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1) + "\n"


class AdapterReport(_Doc):
    """What the agent did with one desired adapter."""

    state: AdapterState
    uri: str
    message: str = ""
    # SHA-256 of the SHA256SUMS manifest the loaded files were checked against: a republished
    # output (another manifest) is reloaded.
    manifest_sha256: str | None = None
    updated: str = ""


class ServerState(_Doc):
    """ConfigMap <server>-state, key state.json: written by the agent, read by the operator."""

    vllm_ready: bool = False
    message: str = ""
    adapters: dict[str, AdapterReport] = Field(default_factory=dict)
    updated: str = ""

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=1) + "\n"


def storage_json(storage: StorageConfig) -> str:
    """The storage settings the agent fetches with (KUBETUNE_STORAGE in its environment)."""
    return storage.model_dump_json(by_alias=True, exclude_none=True)
