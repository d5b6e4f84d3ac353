"""The training log: every progress report of a run, as JSON Lines next to its output.

    <spec.output.uri>/.kubetune/metrics.jsonl

One `train` record per progress report (step, epoch, training loss over the reporting window,
learning rate, throughput, tokens so far; with objective dpo also the window's mean rewards of
the chosen and rejected answers, their margin and the reward accuracy) and one `eval` record
after the final evaluation (with dpo: the held-out preference accuracy of both models). The
FineTuneJob's status only holds the latest values; this object holds the history, which the
OpenAI-compatible API server (kubetune_api) turns into `metrics` events and a results file.

Written by rank 0 of the trainer: the whole object is rewritten on each report (a few hundred
small lines at most: reports come every ~1% of the steps), so readers never see a partial line
and a resumed run continues the same history. Writing is best effort: a failure is logged and
training goes on, since the history is a convenience and the status already has the latest
values.

Only pydantic and the standard library are imported here: the API server has no torch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Protocol, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

log = logging.getLogger(__name__)

LOG_DIR = ".kubetune"
LOG_NAME = "metrics.jsonl"
LOG_PATH = f"{LOG_DIR}/{LOG_NAME}"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    time: float = Field(description="Unix time of the report, in seconds.")
    step: int = Field(ge=0, description="Optimizer steps completed.")


class TrainRecord(_Record):
    """One progress report during training."""

    type: Literal["train"] = "train"
    total_steps: int = Field(ge=0)
    epoch: float = Field(ge=0, description="Fractional epoch.")
    train_loss: float | None = Field(
        default=None, description="Mean training loss since the previous report."
    )
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int | None = Field(default=None, description="Tokens trained on so far.")
    reward_chosen: float | None = Field(default=None, description="DPO: mean chosen reward.")
    reward_rejected: float | None = Field(default=None, description="DPO: mean rejected reward.")
    reward_margin: float | None = Field(default=None, description="DPO: mean reward margin.")
    reward_accuracy: float | None = Field(
        default=None, description="DPO: share of pairs whose chosen answer has the higher reward."
    )


class EvalRecord(_Record):
    """The evaluation after training (validation data)."""

    type: Literal["eval"] = "eval"
    eval_loss: float | None = None
    perplexity: float | None = None
    base_eval_loss: float | None = None
    base_perplexity: float | None = None
    preference_accuracy: float | None = Field(
        default=None, description="DPO: held-out pairs the fine-tuned model prefers correctly."
    )
    base_preference_accuracy: float | None = Field(
        default=None, description="DPO: the same for the base model."
    )
    eval_reward_accuracy: float | None = Field(
        default=None, description="DPO: held-out pairs whose chosen answer gained more reward."
    )


LogRecord = Annotated[TrainRecord | EvalRecord, Field(discriminator="type")]
_RECORD: TypeAdapter[TrainRecord | EvalRecord] = TypeAdapter(LogRecord)


def log_uri(output_uri: str) -> str:
    """Where a job with this output prefix keeps its training log."""
    return f"{output_uri.rstrip('/')}/{LOG_PATH}"


def dumps(records: list[TrainRecord | EvalRecord]) -> bytes:
    lines = (r.model_dump_json(exclude_none=True) for r in records)
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def parse(data: bytes) -> list[TrainRecord | EvalRecord]:
    """The records of a log; lines this version does not understand are skipped (a newer
    trainer may add record types)."""
    records: list[TrainRecord | EvalRecord] = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            records.append(_RECORD.validate_python(json.loads(line)))
        except (ValueError, ValidationError):
            continue
    return records


class ObjectStore(Protocol):
    """What the log needs from kubetune_trainer.storage.Storage."""

    def read_bytes(self, uri: str) -> bytes: ...

    def put_bytes(
        self, uri: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None: ...


class TrainingLog:
    """The trainer's writer. `enabled` is false on ranks other than 0."""

    def __init__(self, store: ObjectStore, output_uri: str, *, enabled: bool = True) -> None:
        self.store = store
        self.uri = log_uri(output_uri)
        self.enabled = enabled
        self.records: list[TrainRecord | EvalRecord] | None = None  # None: not loaded yet

    def _load(self, first: TrainRecord | EvalRecord) -> list[TrainRecord | EvalRecord]:
        """A resumed run keeps the history up to the checkpoint it resumed from: records at or
        after the first new step came from the attempt that was cut short."""
        try:
            earlier = parse(self.store.read_bytes(self.uri))
        except Exception:  # no log yet (a new run), or unreadable: start a new one
            return []
        # An evaluation follows the last training report of its step; a training report
        # replaces the ones from that step on.
        last = first.step if first.type == "eval" else first.step - 1
        return [r for r in earlier if r.type == "train" and r.step <= last]

    def write(self, record: TrainRecord | EvalRecord) -> None:
        """Append a record and store the whole log; never raises."""
        if not self.enabled:
            return
        try:
            if self.records is None:
                self.records = self._load(record)
            self.records.append(record)
            self.store.put_bytes(self.uri, dumps(self.records), "application/x-ndjson")
        except Exception as exc:  # best effort: the history never fails a training run
            log.warning("training log %s not written: %s", self.uri, exc)

    def train(
        self,
        *,
        step: int,
        total_steps: int,
        epoch: float,
        train_loss: float | None,
        learning_rate: float | None,
        tokens_per_second: float | None,
        tokens_seen: int | None,
        rewards: Mapping[str, float] | None = None,
    ) -> None:
        """`rewards` (DPO): reward_chosen, reward_rejected, reward_margin, reward_accuracy."""
        self.write(
            TrainRecord(
                time=round(time.time(), 3),
                step=step,
                total_steps=total_steps,
                epoch=round(epoch, 4),
                train_loss=train_loss,
                learning_rate=learning_rate,
                tokens_per_second=None if tokens_per_second is None else round(tokens_per_second),
                tokens_seen=tokens_seen,
                **cast(dict[str, Any], dict(rewards or {})),
            )
        )

    def evaluation(
        self,
        *,
        step: int,
        eval_loss: float | None,
        perplexity: float | None,
        base_eval_loss: float | None,
        base_perplexity: float | None,
        preference: Mapping[str, float | None] | None = None,
    ) -> None:
        """`preference` (DPO): preference_accuracy, base_preference_accuracy,
        eval_reward_accuracy."""
        self.write(
            EvalRecord(
                time=round(time.time(), 3),
                step=step,
                eval_loss=eval_loss,
                perplexity=perplexity,
                base_eval_loss=base_eval_loss,
                base_perplexity=base_perplexity,
                **cast(dict[str, Any], dict(preference or {})),
            )
        )
