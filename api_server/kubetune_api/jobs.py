"""Pure: FineTuneJobs <-> OpenAI fine-tuning jobs. No I/O here; service.py sends and reads.

A job IS a FineTuneJob: its id is the FineTuneJob's name, so any FineTuneJob (one applied with
kubectl too) is a job. Jobs the API creates are named `ftjob-<24 hex>`, carry the label
`kubetune.dev/created-by: openai-api`, and keep what only the OpenAI API knows (the model name,
file ids, suffix, metadata, the hyperparameters as requested and resolved) in the annotation
`openai.kubetune.dev/job`.

Status: Succeeded -> succeeded, Failed -> failed, Cancelled (or spec.cancel) -> cancelled,
spec.suspend -> paused, Running -> running, Pending/Queued (or resumed but not yet restarted)
-> queued, and no phase yet (the operator has not seen the job) -> validating_files.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError

from kubetune_api.catalogue import CatalogueModel, merge
from kubetune_api.errors import bad_request
from kubetune_api.hyperparameters import DEFAULT_BETA, Resolved
from kubetune_api.objectstore import Layout
from kubetune_api.schemas import (
    DpoMethod,
    FineTuningJob,
    JobError,
    JobStatus,
    Method,
    ResolvedDpoHyperparameters,
    ResolvedHyperparameters,
    StoredFile,
    SupervisedMethod,
)
from kubetune_trainer.api import API_VERSION, GROUP, KIND, FineTuneSpec

Body = Mapping[str, Any]

CREATED_BY_LABEL: Final = f"{GROUP}/created-by"
CREATED_BY: Final = "openai-api"
JOB_ANNOTATION: Final = "openai.kubetune.dev/job"
IDEMPOTENCY_ANNOTATION: Final = "openai.kubetune.dev/idempotency-key-sha256"
MODEL_DELETED_ANNOTATION: Final = "openai.kubetune.dev/model-deleted"
JOB_PREFIX: Final = "ftjob-"
TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
# Reasons of a failure caused by the training data, so `error.param` can name the file.
DATA_REASONS: Final = frozenset({"DataError"})


def timestamp(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def new_job_name(namespace: str, idempotency_key: str | None) -> str:
    """`ftjob-<24 hex>`: random, or derived from the client's Idempotency-Key so that a
    retried create (the `openai` client retries timeouts) finds the job it already made."""
    if idempotency_key:
        digest = hashlib.sha256(f"{namespace}\0{idempotency_key}".encode()).hexdigest()
        return JOB_PREFIX + digest[:24]
    return JOB_PREFIX + secrets.token_hex(12)


def idempotency_digest(idempotency_key: str) -> str:
    return hashlib.sha256(idempotency_key.encode()).hexdigest()


# --------------------------------------------------------------------------- reading a job


class Recorded(BaseModel):
    """The annotation JOB_ANNOTATION: what only the OpenAI API knows about a job."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    training_file: str | None = None
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    hyperparameters: ResolvedHyperparameters | None = None
    beta: float | None = None  # method dpo


@dataclass(frozen=True)
class JobView:
    """A FineTuneJob as the API sees it."""

    body: Body

    @property
    def meta(self) -> Body:
        return dict(self.body.get("metadata") or {})

    @property
    def name(self) -> str:
        return str(self.meta.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.meta.get("namespace", ""))

    @property
    def uid(self) -> str:
        return str(self.meta.get("uid", ""))

    @property
    def spec(self) -> Body:
        return dict(self.body.get("spec") or {})

    @property
    def status(self) -> Body:
        return dict(self.body.get("status") or {})

    @property
    def annotations(self) -> Body:
        return dict(self.meta.get("annotations") or {})

    @property
    def openai(self) -> dict[str, Any]:
        """What the API recorded when it created the job ({} for kubectl-applied jobs, and
        for an annotation someone edited into another shape: then the spec speaks)."""
        try:
            recorded = Recorded.model_validate_json(self.annotations.get(JOB_ANNOTATION) or "{}")
        except ValidationError:
            return {}
        return recorded.model_dump(exclude_none=True)

    @property
    def created_by_api(self) -> bool:
        return (self.meta.get("labels") or {}).get(CREATED_BY_LABEL) == CREATED_BY

    @property
    def output_uri(self) -> str:
        return str((self.spec.get("output") or {}).get("uri", ""))

    @property
    def storage_endpoint(self) -> str | None:
        endpoint = (self.spec.get("storage") or {}).get("endpoint")
        return str(endpoint) if endpoint else None

    @property
    def phase(self) -> str | None:
        phase = self.status.get("phase")
        return str(phase) if phase else None

    @property
    def model_deleted(self) -> bool:
        return bool(self.annotations.get(MODEL_DELETED_ANNOTATION))

    def base_model(self, names_by_uri: Mapping[str, str]) -> str:
        recorded = self.openai.get("model")
        if isinstance(recorded, str) and recorded:
            return recorded
        uri = str((self.spec.get("baseModel") or {}).get("uri", ""))
        return names_by_uri.get(uri.rstrip("/"), uri)


def job_status(job: JobView) -> JobStatus:
    phase, spec = job.phase, job.spec
    if phase == "Succeeded":
        return "succeeded"
    if phase == "Failed":
        return "failed"
    if phase == "Cancelled" or spec.get("cancel"):
        return "cancelled"
    if spec.get("suspend"):
        return "paused"
    if phase == "Running":
        return "running"
    if phase in ("Pending", "Queued", "Suspended"):  # Suspended: resumed, not restarted yet
        return "queued"
    return "validating_files"


def fine_tuned_model_id(job: JobView, base_model: str) -> str:
    """`ft:<base model>:<namespace>:<suffix>:<job id>`, like OpenAI's `ft:<model>:<org>:...`.
    A base model known only by its URI (a kubectl-applied job) is spelled without "/" and ":"
    (s3-kubetune-quickstart-model), so the id stays one URL path segment."""
    suffix = job.openai.get("suffix") or ""
    base = re.sub(r"[^A-Za-z0-9._+-]+", "-", base_model).strip("-") or "model"
    return f"ft:{base}:{job.namespace}:{suffix}:{job.name}"


def parse_fine_tuned_model(model_id: str) -> tuple[str, str] | None:
    """(namespace, job id) of a fine-tuned model id."""
    if not model_id.startswith("ft:"):
        return None
    parts = model_id.split(":")
    if len(parts) != 5 or not parts[-1] or not parts[-3]:
        return None
    return parts[-3], parts[-1]


def _job_error(job: JobView) -> JobError | None:
    status = job.status
    reason = str(status.get("reason") or "Failed")
    return JobError(
        code=reason,
        message=str(status.get("message") or "the job failed"),
        param="training_file" if reason in DATA_REASONS else None,
    )


def _hyperparameters(job: JobView, model: CatalogueModel | None) -> ResolvedHyperparameters:
    recorded = job.openai.get("hyperparameters")
    if isinstance(recorded, dict):
        return ResolvedHyperparameters.model_validate(recorded)
    hp = job.spec.get("hyperparameters") or {}
    epochs = hp.get("epochs")
    batch = hp.get("batchSize")
    accumulation = hp.get("gradientAccumulationSteps") or 1
    rate = hp.get("learningRate")
    multiplier = None
    if model is not None and isinstance(rate, int | float):
        multiplier = round(float(rate) / model.learning_rate, 6)
    return ResolvedHyperparameters(
        n_epochs=int(epochs) if isinstance(epochs, float) and epochs.is_integer() else epochs,
        batch_size=batch * accumulation if isinstance(batch, int) else None,
        learning_rate_multiplier=multiplier,
    )


@dataclass(frozen=True)
class Outputs:
    """What the job's output in object storage adds (when the server may read it)."""

    trained_tokens: int | None = None
    result_file: str | None = None


def results_file_id(job_name: str) -> str:
    return f"file-results-{job_name}"


def to_openai(
    job: JobView,
    models: Mapping[str, CatalogueModel],
    names_by_uri: Mapping[str, str],
    outputs: Outputs | None = None,
) -> FineTuningJob:
    status = job_status(job)
    recorded = job.openai
    base = job.base_model(names_by_uri)
    kube_status = job.status
    hyperparameters = _hyperparameters(job, models.get(base))
    dataset = job.spec.get("dataset") or {}
    progress = kube_status.get("progress") or {}
    estimated: int | None = None
    if status == "running" and progress.get("etaSeconds") is not None:
        updated = timestamp(progress.get("updateTime"))
        if updated is not None:
            estimated = updated + int(progress["etaSeconds"])
    seed = (job.spec.get("hyperparameters") or {}).get("seed", 42)
    outputs = outputs or Outputs()
    metadata = recorded.get("metadata")
    return FineTuningJob(
        id=job.name,
        created_at=timestamp(job.meta.get("creationTimestamp")) or 0,
        error=_job_error(job) if status == "failed" else None,
        fine_tuned_model=fine_tuned_model_id(job, base)
        if status == "succeeded" and not job.model_deleted
        else None,
        finished_at=timestamp(kube_status.get("completionTime")) if status in TERMINAL else None,
        hyperparameters=hyperparameters,
        model=base,
        organization_id=job.namespace,
        result_files=[outputs.result_file] if outputs.result_file else [],
        seed=int(seed),
        status=status,
        trained_tokens=outputs.trained_tokens if status == "succeeded" else None,
        training_file=str(recorded.get("training_file") or dataset.get("trainUri", "")),
        validation_file=recorded.get("validation_file") or dataset.get("validationUri"),
        estimated_finish=estimated,
        integrations=[],
        metadata=metadata if isinstance(metadata, dict) else None,
        method=_method(job, hyperparameters),
        user_provided_suffix=recorded.get("suffix"),
    )


def _method(job: JobView, hyperparameters: ResolvedHyperparameters) -> Method:
    """The job's method, from its spec (so a kubectl-applied dpo job reads as one too)."""
    if job.spec.get("objective") != "dpo":
        return Method(supervised=SupervisedMethod(hyperparameters=hyperparameters))
    beta = job.openai.get("beta")
    if beta is None:
        beta = (job.spec.get("dpo") or {}).get("beta", DEFAULT_BETA)
    dpo = ResolvedDpoHyperparameters(**hyperparameters.model_dump(), beta=beta)
    return Method(type="dpo", dpo=DpoMethod(hyperparameters=dpo))


def metadata_matches(job: JobView, wanted: Mapping[str, str]) -> bool:
    have = job.openai.get("metadata")
    have = have if isinstance(have, dict) else {}
    return all(have.get(key) == value for key, value in wanted.items())


def newest_first(jobs: list[JobView]) -> list[JobView]:
    return sorted(
        jobs,
        key=lambda j: (str(j.meta.get("creationTimestamp", "")), j.name),
        reverse=True,
    )


# -------------------------------------------------------------------------- creating a job


@dataclass(frozen=True)
class NewJob:
    """Everything a job is made of, checked and resolved (service.py gathers it)."""

    name: str
    namespace: str
    model: CatalogueModel
    training: StoredFile
    validation: StoredFile | None
    resolved: Resolved
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    credentials_secret: str | None
    idempotency_key: str | None
    objective: str = "sft"  # or dpo (method.type dpo)
    beta: float | None = None  # dpo only, resolved


def _micro_batches(batch_size: int, model_max: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps): batch_size examples per optimizer step, in
    micro-batches no larger than the model's catalogue bound."""
    micro = min(batch_size, model_max)
    return micro, -(-batch_size // micro)


def finetunejob(new: NewJob, layout: Layout) -> dict[str, Any]:
    """The FineTuneJob manifest; 400 if the catalogue entry and the request do not fit the
    FineTuneJob schema together (e.g. a learning rate over its limit)."""
    micro, accumulation = _micro_batches(new.resolved.batch_size, new.model.max_batch_size)
    dataset: dict[str, Any] = {
        "trainUri": layout.data_uri(new.namespace, new.training.id),
        "format": new.training.format or "auto",
    }
    if new.validation is not None:
        dataset["validationUri"] = layout.data_uri(new.namespace, new.validation.id)
    storage: dict[str, Any] = {}
    if layout.endpoint:
        storage["endpoint"] = layout.endpoint
    if new.credentials_secret:
        storage["credentialsSecretRef"] = {"name": new.credentials_secret}
    owned: dict[str, Any] = {
        "baseModel": {"uri": new.model.uri},
        "dataset": dataset,
        "hyperparameters": {
            "epochs": new.resolved.epochs,
            "batchSize": micro,
            "gradientAccumulationSteps": accumulation,
            "learningRate": new.resolved.learning_rate,
            "seed": new.seed,
        },
        "output": {"uri": layout.job_output(new.namespace, new.name)},
        "storage": storage,
    }
    if new.objective == "dpo":
        owned["objective"] = "dpo"
        owned["dpo"] = {"beta": new.beta if new.beta is not None else DEFAULT_BETA}
    spec = merge(new.model.spec, owned)
    try:
        FineTuneSpec.model_validate(spec)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(
            f"the job does not fit model {new.model.name}: spec.{where}: {first['msg']}",
            code="invalid_job",
        ) from None
    recorded = {
        "model": new.model.name,
        "training_file": new.training.id,
        "validation_file": new.validation.id if new.validation else None,
        "suffix": new.suffix,
        "metadata": new.metadata,
        "hyperparameters": new.resolved.public().model_dump(),
        "beta": new.beta if new.objective == "dpo" else None,
    }
    annotations = {JOB_ANNOTATION: json.dumps(recorded, sort_keys=True)}
    if new.idempotency_key:
        annotations[IDEMPOTENCY_ANNOTATION] = idempotency_digest(new.idempotency_key)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": new.name,
            "namespace": new.namespace,
            "labels": {CREATED_BY_LABEL: CREATED_BY},
            "annotations": annotations,
        },
        "spec": spec,
    }


def uses_file(job: JobView, file_id: str) -> bool:
    recorded = job.openai
    return file_id in (recorded.get("training_file"), recorded.get("validation_file"))
