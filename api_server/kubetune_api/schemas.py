"""Request and response bodies, in the shapes the official `openai` client parses
(openai/types/file_object.py, types/fine_tuning/*.py, types/model.py, pagination.py)."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

JobStatus = Literal[
    "validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"
]
FILE_PURPOSE = "fine-tune"
RESULTS_PURPOSE = "fine-tune-results"


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


# ----------------------------------------------------------------------------------- files


class FileObject(_Out):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(_Out):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class StoredFile(BaseModel):
    """What the server keeps next to an uploaded file (file.json); FileObject plus the facts
    the jobs need (record format and count), decided when the file was validated."""

    model_config = ConfigDict(extra="ignore")

    id: str
    filename: str
    bytes: int
    created_at: int
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    format: str | None = None
    records: int | None = None
    sha256: str | None = None

    def public(self) -> FileObject:
        return FileObject(
            id=self.id,
            bytes=self.bytes,
            created_at=self.created_at,
            filename=self.filename,
            purpose=self.purpose,
            status=self.status,
            status_details=self.status_details,
        )


# ------------------------------------------------------------------------------------ jobs

Auto = Literal["auto"]


class ResolvedHyperparameters(_Out):
    n_epochs: int | float | Auto | None = None
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None


class JobError(_Out):
    code: str
    message: str
    param: str | None = None


class ResolvedDpoHyperparameters(ResolvedHyperparameters):
    beta: float | Auto | None = None


class SupervisedMethod(_Out):
    hyperparameters: ResolvedHyperparameters


class DpoMethod(_Out):
    hyperparameters: ResolvedDpoHyperparameters


class Method(_Out):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class FineTuningJob(_Out):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: ResolvedHyperparameters
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    method: Method | None = None
    user_provided_suffix: str | None = None


class JobEvent(_Out):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class CheckpointMetrics(_Out):
    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    full_valid_loss: float | None = None


class JobCheckpoint(_Out):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int


# ---------------------------------------------------------------------------------- models


class ModelServing(_Out):
    """kubetune's addition to OpenAI's model object: whether chat completions can use it now.
    phase: Serving, or (fine-tuned models) status.serving's Pending, Starting, Loading,
    NotServed or Failed, with its reason and message."""

    phase: str | None = None
    reason: str | None = None
    message: str | None = None


class ModelObject(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    serving: ModelServing | None = None  # null: not served (nothing asked to serve it)


class ModelDeleted(_Out):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# ------------------------------------------------------------------------------------ lists


class ListPage(_Out, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


# --------------------------------------------------------------------------------- requests


class _In(BaseModel):
    """Unknown parameters are refused by name rather than ignored."""

    model_config = ConfigDict(extra="forbid")


class HyperparametersIn(_In):
    # Any: "auto" or a number, checked in hyperparameters.py with messages naming the value.
    n_epochs: Any = "auto"
    batch_size: Any = "auto"
    learning_rate_multiplier: Any = "auto"


class DpoHyperparametersIn(HyperparametersIn):
    beta: Any = "auto"


class SupervisedIn(_In):
    hyperparameters: HyperparametersIn | None = None


class DpoIn(_In):
    hyperparameters: DpoHyperparametersIn | None = None


class MethodIn(_In):
    type: str
    supervised: SupervisedIn | None = None
    dpo: DpoIn | None = None
    reinforcement: dict[str, Any] | None = None


MetadataIn = dict[
    Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=512)]
]


class JobCreate(_In):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    training_file: Annotated[str, Field(min_length=1, max_length=128)]
    validation_file: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    suffix: (
        Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] | None
    ) = None
    seed: Annotated[int, Field(ge=0, le=2147483647)] | None = None
    metadata: Annotated[MetadataIn, Field(max_length=16)] | None = None
    integrations: list[dict[str, Any]] | None = None
