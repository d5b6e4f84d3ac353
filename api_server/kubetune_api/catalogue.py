"""The base models the API offers: an admin-managed list (the chart's `apiServer.models`).

Each entry maps a model name, as callers pass it in `model`, to the model's URI, and may carry
`spec`: FineTuneJob spec fields (camelCase, as in `kubectl explain ftj.spec`) laid under every
job created for that model, such as the method, LoRA rank, GPUs, memory, maxSeqLength, or the
learning rate that `learning_rate_multiplier` multiplies. The fields that the API itself owns
(base model, dataset URIs and format, output, storage, suspend, cancel) cannot be set there.
Every entry is checked at start against the FineTuneJob schema, so a typo stops the server with
a message naming the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from kubetune_trainer.api import MODEL_URI_PATTERN, FineTuneSpec, Hyperparameters

# The spec fields a catalogue entry may not set: the API derives them from the request.
RESERVED_SPEC_FIELDS = ("baseModel", "output", "storage", "suspend", "cancel")
RESERVED_DATASET_FIELDS = ("trainUri", "validationUri", "format")
DEFAULT_LEARNING_RATE: float = Hyperparameters.model_fields["learning_rate"].default


class CatalogueError(ValueError):
    """The catalogue cannot be used; the message names the entry."""


class CatalogueModel(BaseModel):
    """One base model."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    # No ":" (fine-tuned model names are "ft:<base>:<namespace>:...") and no "/" trouble in URLs.
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][\w.+-]*$")]
    uri: Annotated[str, Field(max_length=2048, pattern=MODEL_URI_PATTERN)]
    description: str = ""
    owned_by: str = Field(default="kubetune", max_length=253)
    max_batch_size: int = Field(
        default=8, ge=1, le=1024, description="Upper bound of batch_size=auto for this model."
    )
    spec: dict[str, Any] = Field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        """The learning rate `learning_rate_multiplier` 1.0 stands for."""
        hp = self.spec.get("hyperparameters") or {}
        return float(hp.get("learningRate", DEFAULT_LEARNING_RATE))


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Objects merge key by key; anything else in `overlay` replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_entry(entry: CatalogueModel) -> None:
    reserved = [f for f in RESERVED_SPEC_FIELDS if f in entry.spec]
    dataset = entry.spec.get("dataset") or {}
    reserved += [f"dataset.{f}" for f in RESERVED_DATASET_FIELDS if f in dataset]
    if reserved:
        raise CatalogueError(
            f"model {entry.name}: spec.{', spec.'.join(reserved)} cannot be set in the "
            "catalogue: the API sets them for each job"
        )
    sample = merge(
        {
            "baseModel": {"uri": entry.uri},
            "dataset": {"trainUri": "s3://bucket/train.jsonl"},
            "output": {"uri": "s3://bucket/output/"},
        },
        entry.spec,
    )
    try:
        FineTuneSpec.model_validate(sample)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CatalogueError(f"model {entry.name}: spec.{where}: {first['msg']}") from None


def parse_catalogue(document: Any) -> dict[str, CatalogueModel]:
    """Entries by name, in the order given."""
    if document is None:
        return {}
    if not isinstance(document, list):
        raise CatalogueError("the model catalogue must be a list of {name, uri, ...} entries")
    models: dict[str, CatalogueModel] = {}
    for index, item in enumerate(document):
        try:
            entry = CatalogueModel.model_validate(item)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            name = item.get("name") if isinstance(item, dict) else None
            raise CatalogueError(f"model {name or f'#{index}'}: {where}: {first['msg']}") from None
        if entry.name in models:
            raise CatalogueError(f"model {entry.name} is listed twice")
        _check_entry(entry)
        models[entry.name] = entry
    return models


def load_catalogue(path: Path | None) -> dict[str, CatalogueModel]:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CatalogueError(f"{path}: {err.strerror or err}") from None
    try:
        document = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as err:
        raise CatalogueError(f"{path}: not YAML or JSON: {err}") from None
    return parse_catalogue(document)


def by_uri(models: dict[str, CatalogueModel]) -> dict[str, str]:
    """Model name by URI (first entry wins), to name the base model of kubectl-applied jobs."""
    names: dict[str, str] = {}
    for model in models.values():
        names.setdefault(model.uri.rstrip("/"), model.name)
    return names
