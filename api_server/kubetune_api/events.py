"""Pure: a job's events, oldest first: what happened to the FineTuneJob and how training went.

Sources, merged by time:
- "Created fine-tuning job" at the FineTuneJob's creation;
- the FineTuneJob's Kubernetes Events (the operator posts one per change of phase or reason:
  Pending (which names the Job it created), Running, Suspended, Succeeded, ...; Warnings
  become level "warn", failures "error"). Kubernetes keeps Events for an hour by default
  (kube-apiserver --event-ttl), so older status events of long jobs are gone; the training
  log stays;
- the training log (training_log.py): a `metrics` event per progress report (step, total
  steps, epoch, train loss, learning rate, tokens/s) and one for the evaluation (eval loss and
  the base model's), when the server can read the job's output;
- "New fine-tuned model created" when the job succeeded.

Ids are stable (derived from the Event's uid or the record's step), so `after` cursors work
while the list grows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from kubetune_api.jobs import JobView, timestamp
from kubetune_api.schemas import JobEvent
from kubetune_trainer.training_log import EvalRecord, TrainRecord

Body = Mapping[str, Any]
Level = Literal["info", "warn", "error"]


def _event_time(event: Body) -> float:
    for key in ("eventTime", "firstTimestamp", "lastTimestamp"):
        value = event.get(key)
        if value:
            try:
                return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return float(timestamp((event.get("metadata") or {}).get("creationTimestamp")) or 0)


def _level(event: Body) -> Level:
    # The operator's Event messages start with the phase: "Failed: ...".
    if str(event.get("message", "")).startswith("Failed:"):
        return "error"
    return "warn" if event.get("type") == "Warning" else "info"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def metrics_event(job_id: str, record: TrainRecord | EvalRecord) -> JobEvent:
    if isinstance(record, EvalRecord):
        data: dict[str, Any] = {
            "step": record.step,
            "eval_loss": record.eval_loss,
            "full_valid_loss": record.eval_loss,
            "perplexity": record.perplexity,
            "base_eval_loss": record.base_eval_loss,
            "base_perplexity": record.base_perplexity,
        }
        message = (
            f"Evaluation: validation loss={_fmt(record.eval_loss)} "
            f"(base model {_fmt(record.base_eval_loss)})"
        )
        event_id = f"ftevent-{job_id}-eval-{record.step}"
    else:
        data = {
            "step": record.step,
            "total_steps": record.total_steps,
            "epoch": record.epoch,
            "train_loss": record.train_loss,
            "learning_rate": record.learning_rate,
            "tokens_per_second": record.tokens_per_second,
        }
        message = (
            f"Step {record.step}/{record.total_steps}: training loss={_fmt(record.train_loss)}, "
            f"learning rate={_fmt(record.learning_rate, '.3g')}"
        )
        event_id = f"ftevent-{job_id}-step-{record.step}"
    return JobEvent(
        id=event_id,
        created_at=int(record.time),
        level="info",
        message=message,
        type="metrics",
        data={k: v for k, v in data.items() if v is not None},
    )


def job_events(
    job: JobView,
    kube_events: Sequence[Body],
    records: Sequence[TrainRecord | EvalRecord],
    fine_tuned_model: str | None,
) -> list[JobEvent]:
    """Every event of the job, oldest first."""
    timed: list[tuple[float, int, JobEvent]] = []
    created = timestamp(job.meta.get("creationTimestamp")) or 0
    timed.append(
        (
            created,
            0,
            JobEvent(
                id=f"ftevent-{job.name}-created",
                created_at=created,
                level="info",
                message=f"Created fine-tuning job: {job.name}",
            ),
        )
    )
    succeeded_at = 0.0
    for event in kube_events:
        when = _event_time(event)
        if event.get("reason") == "Succeeded":
            succeeded_at = max(succeeded_at, when)
        reason = str(event.get("reason") or "")
        text = str(event.get("message") or reason)
        timed.append(
            (
                when,
                1,
                JobEvent(
                    id=f"ftevent-{(event.get('metadata') or {}).get('uid', '')}",
                    created_at=int(when),
                    level=_level(event),
                    message=text,
                    data={"reason": reason} if reason else None,
                ),
            )
        )
    for record in records:
        timed.append((record.time, 2, metrics_event(job.name, record)))
    if fine_tuned_model:
        # After the operator's Succeeded Event, which it posts once the status says so.
        finished = max(timestamp(job.status.get("completionTime")) or created, succeeded_at)
        timed.append(
            (
                finished + 0.5,
                3,
                JobEvent(
                    id=f"ftevent-{job.name}-model",
                    created_at=int(finished),
                    level="info",
                    message=f"New fine-tuned model created: {fine_tuned_model}",
                ),
            )
        )
    timed.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in timed]
