"""OpenAI hyperparameters -> FineTuneJob hyperparameters, with "auto" resolved.

- n_epochs: auto aims at about 3 epochs, more for small datasets and fewer for large ones, so a
  job sees between 100 and 25,000 examples in total (OpenAI's published heuristic for chat
  fine-tuning data), within 1-25 epochs.
- batch_size: examples per optimizer step (the FineTuneJob's batchSize, with one micro-batch
  per step). auto: about 0.2% of the training examples, between 1 and the catalogue's
  maxBatchSize for the model (which bounds memory on the model's GPUs).
- learning_rate_multiplier: multiplies the model's learning rate (the catalogue entry's
  spec.hyperparameters.learningRate, else the FineTuneJob default 2e-4). auto: 1, the rate
  chosen for the model by whoever manages the catalogue.
- beta (method dpo): the FineTuneJob's spec.dpo.beta. auto: its default, 0.1 (TRL's and the
  hosted API's).
The resolved numbers are what the job shows in `hyperparameters`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from kubetune_api.errors import bad_request
from kubetune_api.schemas import HyperparametersIn, ResolvedHyperparameters
from kubetune_trainer.api import DpoConfig

TARGET_EPOCHS: Final = 3
MIN_TARGET_EXAMPLES: Final = 100
MAX_TARGET_EXAMPLES: Final = 25_000
MIN_EPOCHS: Final = 1
MAX_AUTO_EPOCHS: Final = 25
MAX_EPOCHS: Final = 1000  # the FineTuneJob's limit
MAX_BATCH_SIZE: Final = 1024
BATCH_FRACTION: Final = 0.002
MAX_LEARNING_RATE: Final = 1.0  # the FineTuneJob's limit
_BETA = DpoConfig.model_fields["beta"]
DEFAULT_BETA: Final[float] = _BETA.default
MAX_BETA: Final[float] = next(float(m.le) for m in _BETA.metadata if hasattr(m, "le"))


@dataclass(frozen=True)
class Resolved:
    epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float

    def public(self) -> ResolvedHyperparameters:
        return ResolvedHyperparameters(
            n_epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate_multiplier=self.learning_rate_multiplier,
        )


def auto_epochs(examples: int) -> int:
    epochs = TARGET_EPOCHS
    if examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / max(1, examples)))
    elif examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // examples)
    return epochs


def auto_batch_size(examples: int, model_max: int) -> int:
    return max(1, min(model_max, round(examples * BATCH_FRACTION)))


def _is_auto(value: Any) -> bool:
    return value is None or value == "auto"


def _integer(value: Any, name: str, low: int, high: int) -> int:
    # bool is an int in Python, and JSON true must not become 1 epoch.
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise bad_request(
            f"{name} must be an integer or \"auto\" (got {value!r})", param=name,
            code="invalid_hyperparameter",
        )  # fmt: skip
    if not low <= value <= high:
        raise bad_request(
            f"{name} must be between {low} and {high} (got {value!r})", param=name,
            code="invalid_hyperparameter",
        )  # fmt: skip
    return int(value)


def resolve(
    given: HyperparametersIn | None,
    *,
    examples: int,
    model_max_batch: int,
    model_learning_rate: float,
    param: str = "hyperparameters",
) -> Resolved:
    """The numbers for a job; 400 naming the hyperparameter when one is out of range."""
    given = given or HyperparametersIn()
    epochs = (
        auto_epochs(examples)
        if _is_auto(given.n_epochs)
        else _integer(given.n_epochs, f"{param}.n_epochs", MIN_EPOCHS, MAX_EPOCHS)
    )
    batch = (
        auto_batch_size(examples, model_max_batch)
        if _is_auto(given.batch_size)
        else _integer(given.batch_size, f"{param}.batch_size", 1, MAX_BATCH_SIZE)
    )
    multiplier = 1.0
    if not _is_auto(given.learning_rate_multiplier):
        value = given.learning_rate_multiplier
        name = f"{param}.learning_rate_multiplier"
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise bad_request(
                f"{name} must be a positive number or \"auto\" (got {value!r})", param=name,
                code="invalid_hyperparameter",
            )  # fmt: skip
        multiplier = float(value)
    learning_rate = model_learning_rate * multiplier
    if learning_rate > MAX_LEARNING_RATE:
        raise bad_request(
            f"{param}.learning_rate_multiplier {multiplier:g} gives a learning rate of "
            f"{learning_rate:g} (the model's is {model_learning_rate:g}); at most "
            f"{MAX_LEARNING_RATE:g} is allowed",
            param=f"{param}.learning_rate_multiplier",
            code="invalid_hyperparameter",
        )
    return Resolved(epochs, batch, multiplier, learning_rate)


def resolve_beta(value: Any, param: str) -> float:
    """method.dpo.hyperparameters.beta: "auto" (the FineTuneJob default) or a number in
    (0, MAX_BETA]; 400 naming it otherwise."""
    if _is_auto(value):
        return DEFAULT_BETA
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_BETA:
        raise bad_request(
            f'{param} must be a number greater than 0 and at most {MAX_BETA:g}, or "auto" '
            f"(got {value!r})",
            param=param,
            code="invalid_hyperparameter",
        )
    return float(value)
