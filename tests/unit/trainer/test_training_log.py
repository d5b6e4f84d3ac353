"""The training log (training_log.py): JSON Lines history written whole, resumable, best effort."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kubetune_trainer.training_log import (
    EvalRecord,
    TrainingLog,
    TrainRecord,
    dumps,
    log_uri,
    parse,
)

OUTPUT = "s3://bucket/jobs/one/"


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail = False

    def read_bytes(self, uri: str) -> bytes:
        if uri not in self.objects:
            raise FileNotFoundError(uri)
        return self.objects[uri]

    def put_bytes(self, uri: str, data: bytes, content_type: str = "") -> None:
        if self.fail:
            raise OSError("store unreachable")
        self.objects[uri] = data


def report(log: TrainingLog, step: int, loss: float = 1.0) -> None:
    log.train(step=step, total_steps=10, epoch=step / 5, train_loss=loss, learning_rate=1e-3,
              tokens_per_second=100.4, tokens_seen=step * 64)  # fmt: skip


def test_the_log_lives_under_the_output_prefix() -> None:
    assert log_uri(OUTPUT) == "s3://bucket/jobs/one/.kubetune/metrics.jsonl"
    assert log_uri("s3://bucket/jobs/one") == log_uri(OUTPUT)


def test_every_report_rewrites_the_whole_history_oldest_first() -> None:
    store = MemoryStore()
    log = TrainingLog(store, OUTPUT)
    for step in (2, 4, 6):
        report(log, step, loss=2.0 / step)
    log.evaluation(step=6, eval_loss=0.5, perplexity=1.65, base_eval_loss=3.0,
                   base_perplexity=20.1)  # fmt: skip
    records = parse(store.objects[log_uri(OUTPUT)])
    assert [(r.type, r.step) for r in records] == [
        ("train", 2), ("train", 4), ("train", 6), ("eval", 6),
    ]  # fmt: skip
    first = records[0]
    assert isinstance(first, TrainRecord)
    assert first.train_loss == 1.0 and first.tokens_seen == 128 and first.tokens_per_second == 100
    last = records[-1]
    assert isinstance(last, EvalRecord) and last.base_eval_loss == 3.0


def test_a_resumed_run_keeps_the_history_before_its_checkpoint() -> None:
    store = MemoryStore()
    first_attempt = TrainingLog(store, OUTPUT)
    for step in (1, 2, 3, 4):
        report(first_attempt, step)
    # The pod died after step 4; the last checkpoint was step 2, so training resumes at 3.
    resumed = TrainingLog(store, OUTPUT)
    report(resumed, 3, loss=0.7)
    records = parse(store.objects[log_uri(OUTPUT)])
    assert [r.step for r in records] == [1, 2, 3]
    assert isinstance(records[-1], TrainRecord) and records[-1].train_loss == 0.7


def test_an_evaluation_retried_after_training_keeps_the_last_training_report() -> None:
    store = MemoryStore()
    first_attempt = TrainingLog(store, OUTPUT)
    report(first_attempt, 10)
    first_attempt.evaluation(step=10, eval_loss=1.0, perplexity=None, base_eval_loss=None,
                             base_perplexity=None)  # fmt: skip
    retry = TrainingLog(store, OUTPUT)
    retry.evaluation(step=10, eval_loss=0.9, perplexity=None, base_eval_loss=None,
                     base_perplexity=None)  # fmt: skip
    records = parse(store.objects[log_uri(OUTPUT)])
    assert [(r.type, r.step) for r in records] == [("train", 10), ("eval", 10)]


def test_a_failing_store_never_fails_training(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    store.fail = True
    log = TrainingLog(store, OUTPUT)
    report(log, 1)  # does not raise
    assert "not written" in caplog.text
    store.fail = False
    report(log, 2)
    assert [r.step for r in parse(store.objects[log_uri(OUTPUT)])] == [1, 2]


def test_other_ranks_write_nothing() -> None:
    store = MemoryStore()
    report(TrainingLog(store, OUTPUT, enabled=False), 1)
    assert store.objects == {}


def test_unknown_and_broken_lines_are_skipped() -> None:
    good = dumps([TrainRecord(time=1.0, step=1, total_steps=2, epoch=0.5, train_loss=1.5)])
    data = b'{"type": "future", "time": 1, "step": 1}\nnot json\n' + good
    (record,) = parse(data)
    assert record.step == 1


def test_nan_losses_are_stored_as_null() -> None:
    data = dumps([TrainRecord(time=1.0, step=1, total_steps=2, epoch=0.5,
                              train_loss=float("nan"))])  # fmt: skip
    (record,) = parse(data)
    assert isinstance(record, TrainRecord) and record.train_loss is None


def test_the_module_imports_without_torch() -> None:
    code = (
        "import sys, kubetune_trainer.training_log, kubetune_trainer.data.records\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
