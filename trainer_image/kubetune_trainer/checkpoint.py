"""Resumable training state: what a checkpoint holds and when one is taken.

A checkpoint is a directory, uploaded with Storage.publish_checkpoint (its _COMPLETE marker goes
last, so a pod killed mid-upload leaves nothing that looks resumable):

    adapter_model.safetensors | model.safetensors   trainable weights (modeling.save_trainable)
    optimizer.pt, scheduler.pt, [scaler.pt]         AdamW moments, LR schedule position, AMP scale
    | dcp/ (fsdp: instead of the weights and         each process's shard of the trainable weights
      optimizer.pt; fsdp.py)                        and AdamW moments; loads on any world size
    rng.pt                                          python, numpy, torch and CUDA generator states
    [reference_logps.safetensors]                   DPO + full: the reference log-probabilities
    trainer_state.json                              step, data position, losses, spec, fingerprint

The data position needs no sampler state: the plan (plan.py) is a pure function of the data and
the seed, so the step number says which micro-batch comes next. It is stored anyway (epoch and
micro-batch index) and checked, together with a fingerprint of the tokenized data and a hash of
the training-relevant spec, so a resume onto different data or settings is reported loudly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import numpy as np
import torch

from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.data.tokenize import Example

log = logging.getLogger(__name__)

STATE_FILE: Final = "trainer_state.json"
OPTIMIZER_FILE: Final = "optimizer.pt"
SCHEDULER_FILE: Final = "scheduler.pt"
SCALER_FILE: Final = "scaler.pt"
RNG_FILE: Final = "rng.pt"
REFERENCE_FILE: Final = "reference_logps.safetensors"
STATE_VERSION: Final = 1
# Spec sections that change what is trained; output, storage, resources, evaluation and the
# checkpoint cadence do not, so a resume under different values there is silent.
TRAINING_SPEC_FIELDS: Final = (
    "base_model",
    "dataset",
    "method",
    "objective",
    "dpo",
    "lora",
    "quantization",
    "hyperparameters",
)


def training_spec(spec: FineTuneSpec) -> dict[str, Any]:
    """The training-relevant part of the spec, as the user wrote it (camelCase)."""
    return spec.model_dump(mode="json", by_alias=True, include=set(TRAINING_SPEC_FIELDS))


def spec_hash(training: Mapping[str, Any]) -> str:
    canonical = json.dumps(training, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def spec_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'field: saved -> current' for every training setting that differs."""
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
    ]


def data_fingerprint(examples: Iterable[Example]) -> str:
    """SHA-256 over every example's token ids and labels, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(array("q", [len(example)]).tobytes())
        digest.update(array("q", example.input_ids).tobytes())
        digest.update(array("q", example.labels).tobytes())
    return digest.hexdigest()


@dataclass
class TrainerState:
    """Everything about a run's progress that is not a tensor."""

    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # epoch of the next micro-batch
    batch_index: int  # index of the next micro-batch within that epoch
    spec_hash: str
    training_spec: dict[str, Any]
    data_fingerprint: str
    tokens_seen: int = 0
    train_seconds: float = 0.0
    loss_history: list[dict[str, float]] = field(default_factory=list)  # step, loss, lr
    # Full fine-tuning evaluates the base model before training (its weights are gone after);
    # the result travels with the checkpoints so a resumed run can still compare.
    base_eval: dict[str, Any] | None = None
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported trainer_state version {data.get('version')!r}")
        return cls(**data)


# ------------------------------------------------------------------------------------ RNG


def capture_rng() -> dict[str, Any]:
    """Every generator the training step draws from (dropout, shuffles), loadable with
    torch.load(weights_only=True)."""
    np_state = cast(tuple[str, Any, int, int, float], np.random.get_state(legacy=True))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            np_name,
            torch.from_numpy(np_keys.astype(np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning(
                "checkpoint has CUDA RNG states for %d GPUs, this pod has %d: dropout masks "
                "after resuming will differ from an uninterrupted run",
                len(cuda),
                torch.cuda.device_count(),
            )


# ------------------------------------------------------------------------------- save/load


def save_training_state(
    directory: Path,
    *,
    state: TrainerState,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write everything except the model weights into `directory` (the optimizer too unless
    None: fsdp checkpoints hold its sharded state with the weights, fsdp.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    if scaler is not None and scaler.is_enabled():
        torch.save(scaler.state_dict(), directory / SCALER_FILE)
    torch.save(capture_rng(), directory / RNG_FILE)
    # The state file goes last locally too: a directory with it is complete.
    (directory / STATE_FILE).write_text(state.to_json(), encoding="utf-8")


def save_reference(directory: Path, tables: Mapping[str, torch.Tensor]) -> None:
    """DPO with full fine-tuning: the precomputed reference log-probabilities, by split."""
    from safetensors.torch import save_file  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tables.items()}, str(directory / REFERENCE_FILE))


def load_reference(directory: Path) -> dict[str, torch.Tensor] | None:
    """The reference log-probabilities saved with a checkpoint, or None."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = directory / REFERENCE_FILE
    return dict(load_file(str(path))) if path.is_file() else None


def read_state(directory: Path) -> TrainerState:
    return TrainerState.from_json((directory / STATE_FILE).read_text(encoding="utf-8"))


def load_training_state(
    directory: Path,
    *,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Restore optimizer, scheduler and AMP scaler; return the RNG states.

    The RNG states are returned rather than applied: the caller restores them last, after
    every other setup step that draws random numbers (adapter initialization).
    """
    # A CPU process of a gang has device cpu:<rank> (accelerate), a tag torch.load cannot map.
    where = device if device is not None and device.type != "cpu" else "cpu"
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(directory / OPTIMIZER_FILE, map_location=where, weights_only=True)
        )
    scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))
    scaler_file = directory / SCALER_FILE
    if scaler is not None and scaler.is_enabled() and scaler_file.exists():
        scaler.load_state_dict(torch.load(scaler_file, weights_only=True))
    rng: dict[str, Any] = torch.load(directory / RNG_FILE, weights_only=True)
    return rng


# -------------------------------------------------------------------------------- triggers


class CheckpointPolicy:
    """Every `interval_steps` steps and/or every `interval_minutes` minutes."""

    def __init__(self, interval_steps: int | None, interval_minutes: int) -> None:
        self.interval_steps = interval_steps
        self.interval_s = interval_minutes * 60
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.interval_steps and step % self.interval_steps == 0:
            return True
        return bool(self.interval_s) and time.monotonic() - self._last >= self.interval_s

    def saved(self) -> None:
        self._last = time.monotonic()
