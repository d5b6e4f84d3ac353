"""The recipe's pure parts: schedule, plan, exit codes, termination message, resume state,
evaluation scoring and report; plus the LoRA weights round trip on a tiny model."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch

from kubetune_trainer import exitcodes
from kubetune_trainer.__main__ import (
    classify,
    configure_logging,
    one_line,
    run,
    termination_log_path,
    write_termination_message,
)
from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.checkpoint import (
    CheckpointPolicy,
    TrainerState,
    capture_rng,
    load_training_state,
    restore_rng,
    save_training_state,
    spec_differences,
    spec_hash,
    training_spec,
)
from kubetune_trainer.data import DatasetError, Example, load_records
from kubetune_trainer.errors import ConfigError, ModelError, OutputExists, Preempted
from kubetune_trainer.evaluation import (
    EvalReport,
    ModelEval,
    Prompt,
    Scores,
    build_report,
    perplexity,
    validation_loss,
)
from kubetune_trainer.modeling import (
    Precision,
    choose_precision,
    load_trainable,
    prepare_for_training,
    save_trainable,
)
from kubetune_trainer.plan import TrainingPlan, build_scheduler, lr_multiplier, warmup_steps
from kubetune_trainer.preemption import SigtermFlag
from kubetune_trainer.storage import StorageError
from localenv import models

CPU = Precision(torch.device("cpu"), torch.float32, None, grad_scaler=False)


def make_spec(**overrides: Any) -> FineTuneSpec:
    body: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/llama"},
        "dataset": {"trainUri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/run"},
        **overrides,
    }
    return FineTuneSpec.model_validate(body)


# -------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup"])
def test_schedules_warm_up_then_follow_their_shape(kind: str) -> None:
    total, warmup = 100, warmup_steps(100, 0.1, kind)  # type: ignore[arg-type]
    f = [lr_multiplier(s, kind=kind, warmup=warmup, total=total) for s in range(total)]  # type: ignore[arg-type]
    if kind == "constant":
        assert warmup == 0 and f == [1.0] * total  # no warmup, as documented
        return
    assert warmup == 10
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # first step trains
    assert f[10] == 1.0
    if kind == "constant_with_warmup":
        assert f[10:] == [1.0] * 90
    elif kind == "linear":
        assert f[55] == pytest.approx(1 - 45 / 90)
        assert f[-1] == pytest.approx(1 / 90)
    else:
        assert f[55] == pytest.approx(0.5)
        assert 0 < f[-1] < 0.001
        assert all(a >= b for a, b in itertools.pairwise(f[10:]))


def test_a_cpu_process_of_a_gang_resumes_its_optimizer(tmp_path: Path) -> None:
    """Under torchrun on CPU, accelerate's device is cpu:<local rank>: torch.load cannot map
    that tag, and a multi-node CPU job failed to resume (found by tests/e2e/test_multinode_e2e)."""
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([param], lr=1e-2)
    param.grad = torch.ones(2)
    opt.step()
    sched = build_scheduler(opt, kind="cosine", total_steps=4, warmup_ratio=0.0)
    state = TrainerState(step=1, total_steps=4, epoch=0, batch_index=1, spec_hash="h",
                         training_spec={}, data_fingerprint="d")  # fmt: skip
    save_training_state(tmp_path, state=state, optimizer=opt, scheduler=sched)
    fresh = torch.optim.AdamW([param], lr=1e-2)
    fresh_sched = build_scheduler(fresh, kind="cosine", total_steps=4, warmup_ratio=0.0)
    load_training_state(tmp_path, optimizer=fresh, scheduler=fresh_sched,
                        device=torch.device("cpu", 0))  # fmt: skip
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_scheduler_state_resumes_the_same_learning_rates() -> None:
    def lrs(resume_at: int | None) -> list[float]:
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([param], lr=1e-3)
        sched = build_scheduler(opt, kind="cosine", total_steps=20, warmup_ratio=0.1)
        out = []
        for step in range(20):
            if step == resume_at:
                state = sched.state_dict()
                opt = torch.optim.AdamW([param], lr=1e-3)
                sched = build_scheduler(opt, kind="cosine", total_steps=20, warmup_ratio=0.1)
                sched.load_state_dict(state)
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert lrs(None) == lrs(7)
    assert lrs(None)[0] == pytest.approx(5e-4)  # warmup of 2 steps starts at 1/2


# ------------------------------------------------------------------------------------ plan


def lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 60) for _ in range(n)]


def test_a_packed_micro_batch_is_batch_size_rows_of_at_most_max_seq_length_tokens() -> None:
    lens = lengths(300)
    plan = TrainingPlan(lens, 128, 4, 2, seed=1, epochs=1)
    for batch in plan.epoch_batches(0):
        assert len(batch) <= 4
        assert all(sum(lens[i] for i in row) <= 128 for row in batch)
    seen = sorted(i for b in plan.epoch_batches(0) for row in b for i in row)
    assert seen == list(range(300))  # every example once per epoch
    unpacked = TrainingPlan(lens, 128, 4, 2, seed=1, epochs=1, packing=False)
    assert all(len(row) == 1 for b in unpacked.epoch_batches(0) for row in b)
    assert len(unpacked.epoch_batches(0)) == 75


def test_steps_never_straddle_epochs_and_positions_are_a_function_of_the_step() -> None:
    plan = TrainingPlan(lengths(200), 128, 2, 3, seed=5, epochs=2.5)
    per_epoch = [plan.epoch_steps(e) for e in range(3)]
    assert plan.total_steps == per_epoch[0] + per_epoch[1] + round(0.5 * per_epoch[2])
    for step in range(plan.total_steps):
        sb = plan.step_batches(step)
        assert 1 <= len(sb.batches) <= 3
        assert sb.first_batch + len(sb.batches) <= len(plan.epoch_batches(sb.epoch))
    assert plan.position(0) == (0, 0)
    assert plan.position(per_epoch[0]) == (0, len(plan.epoch_batches(0)))
    assert plan.epoch_progress(per_epoch[0]) == pytest.approx(1.0)
    again = TrainingPlan(lengths(200), 128, 2, 3, seed=5, epochs=2.5)
    assert [again.step_batches(s) for s in range(10)] == [plan.step_batches(s) for s in range(10)]
    assert plan.epoch_batches(0) != plan.epoch_batches(1)  # reshuffled every epoch


def test_max_steps_overrides_epochs_and_cycles_through_the_data() -> None:
    plan = TrainingPlan(lengths(40), 128, 2, 1, seed=0, epochs=1, max_steps=50)
    assert plan.total_steps == 50
    assert plan.step_batches(49).epoch > 1


def test_data_parallel_processes_get_a_micro_batch_in_every_step() -> None:
    plan = TrainingPlan(lengths(101), 64, 1, 2, seed=0, epochs=1, world_size=2)
    for step in range(plan.total_steps):
        batches = plan.step_batches(step).batches
        assert len(batches) % 2 == 0 and batches[0::2] and batches[1::2]


# ------------------------------------------------------------------------------ exit codes


def test_exceptions_map_to_the_exit_code_contract() -> None:
    spec = make_spec(method="lora", hyperparameters={"batchSize": 8})
    cases: list[tuple[BaseException, int, str]] = [
        (
            DatasetError("s3://d/train.jsonl: 1 invalid record(s):\n  train.jsonl line 3: x"),
            65,
            "line 3",
        ),
        (
            StorageError("no object at s3://m/x", uri="s3://m/x", reason="StorageNotFound"),
            66,
            "no object",
        ),
        (
            StorageError("access denied to s3://m", uri="s3://m", reason="StorageAccessDenied"),
            77,
            "denied",
        ),
        (
            StorageError("overloaded", uri="s3://m", reason="StorageUnavailable"),
            75,
            "storage unreachable",
        ),
        (
            StorageError("cannot reach", uri="s3://m", reason="StorageUnreachable"),
            75,
            "cannot reach",
        ),
        (StorageError("changed", uri="s3://m", reason="StorageObjectChanged"), 70, "retried"),
        (
            StorageError("rejected region", uri="s3://m", reason="StorageWrongRegion"),
            78,
            "region",
        ),
        (OutputExists("s3://o/x holds the output of FineTuneJob a/b"), 73, "a/b"),
        (ModelError("cannot load the base model: bad"), 79, "cannot load"),
        (ConfigError("lora.targetModules: Target modules {'x'} not found"), 78, "targetModules"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), 80, "qlora"),
        (RuntimeError("CUDA error: out of memory"), 80, "batchSize"),
        (MemoryError(), 80, "host"),
        (Preempted(12, "s3://out/run/checkpoints/step-000000012/"), 143, "step 12"),
        (ZeroDivisionError("division by zero"), 70, "ZeroDivisionError"),
    ]
    for exc, code, needle in cases:
        got, message = classify(exc, spec)
        assert got == code, (exc, message)
        assert needle in message, message
    assert exitcodes.DATA_ERROR == 65 and exitcodes.PREEMPTED == 143


def test_invalid_config_is_a_config_error() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        make_spec(objective="dpo", dataset={"trainUri": "s3://data/t.jsonl", "format": "chat"})
    code, message = classify(info.value)
    assert code == exitcodes.CONFIG_ERROR
    assert "dataset.format must be a preference format" in message


def test_oom_hint_names_the_knobs_that_fit_the_job() -> None:
    _, message = classify(torch.OutOfMemoryError("CUDA out of memory"), make_spec())
    for knob in (
        "method qlora",
        "batchSize (now 4)",
        "maxSeqLength (now 2048)",
        "gradientCheckpointing: enabled",
    ):
        assert knob in message, message
    _, qlora = classify(torch.OutOfMemoryError(), make_spec(method="qlora"))
    assert "method qlora" not in qlora


def test_qlora_trains_on_cpu_in_fp32_like_every_cpu_run() -> None:
    spec = make_spec(method="qlora", resources={"gpus": 0})
    assert choose_precision(spec, torch.device("cpu")) == CPU
    assert choose_precision(make_spec(), torch.device("cpu")) == CPU


def test_termination_message_is_one_redacted_line(tmp_path: Path) -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-key", "KUBETUNE_TERMINATION_LOG": str(tmp_path / "t")}
    text = one_line("bad\n  thing:\tkey s3cr3t-key\n" + "x" * 2000, env)
    assert "\n" not in text and "s3cr3t-key" not in text and "***" in text
    assert text.startswith("bad thing: key ***") and len(text) <= 512
    write_termination_message("line one\nline two", env)
    assert (tmp_path / "t").read_text() == "line one line two\n"
    assert termination_log_path({}) is None or Path("/dev/termination-log").is_file()


def test_missing_config_file_exits_with_config_error(tmp_path: Path) -> None:
    log = tmp_path / "termination"
    os.environ["KUBETUNE_TERMINATION_LOG"] = str(log)
    try:
        code = run(["--config", str(tmp_path / "nope.json")])
    finally:
        del os.environ["KUBETUNE_TERMINATION_LOG"]
    assert code == exitcodes.CONFIG_ERROR
    message = log.read_text()
    assert message.count("\n") == 1 and "cannot read the trainer config" in message


# --------------------------------------------------------------------------- resume state


def test_training_spec_hash_ignores_what_does_not_change_training() -> None:
    a = make_spec()
    b = make_spec(output={"uri": "s3://out/elsewhere"}, maxRetries=5, evaluation={"sampleSize": 1})
    c = make_spec(hyperparameters={"learningRate": 1e-3})
    assert spec_hash(training_spec(a)) == spec_hash(training_spec(b))
    assert spec_hash(training_spec(a)) != spec_hash(training_spec(c))
    assert spec_differences(training_spec(a), training_spec(c)) == [
        "hyperparameters.learningRate: 0.0002 -> 0.001"
    ]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


def test_trainer_state_round_trips_exactly() -> None:
    state = TrainerState(
        step=7,
        total_steps=20,
        epoch=1,
        batch_index=3,
        spec_hash="h",
        training_spec={"method": "lora"},
        data_fingerprint="f",
        loss_history=[{"step": 1, "loss": 2.0000000001, "lr": 1e-4}],
    )
    assert TrainerState.from_json(state.to_json()) == state
    with pytest.raises(ValueError, match="version"):
        TrainerState.from_json(json.dumps({**json.loads(state.to_json()), "version": 99}))


def test_sigterm_inside_the_training_loop_sets_a_flag_instead_of_killing() -> None:
    flag = SigtermFlag()
    flag.install()
    try:
        with pytest.raises(Preempted) as late, flag.deferred(lambda: 7):
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.is_set()  # the loop goes on to its step boundary
        assert late.value.step == 7  # still set when the loop ended: stop then
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not flag._handle


def test_sigterm_outside_the_training_loop_stops_at_once() -> None:
    flag = SigtermFlag()
    flag.install()
    try:
        with pytest.raises(Preempted) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # e.g. a download; the handler interrupts it
        assert stopped.value.step is None and "outside the training loop" in str(stopped.value)
        assert classify(stopped.value)[0] == exitcodes.PREEMPTED
    finally:
        flag.uninstall()


def test_sigterm_the_kernel_hands_to_another_thread_still_interrupts_the_main_thread() -> None:
    # The main thread waits (a download); SIGTERM lands on another thread, as when the main
    # thread had signals blocked at that instant. Without redelivery the handler would run
    # only when the wait ends (after 20 s here).
    flag = SigtermFlag()
    flag.install()
    done = threading.Event()

    def other_thread() -> None:
        time.sleep(0.5)  # the main thread is in its wait by then
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        done.wait(20)
        done.set()

    try:
        with pytest.raises(Preempted):
            threading.Thread(target=other_thread, daemon=True).start()
            done.wait()
        assert not done.is_set(), "the SIGTERM waited for the main thread's wait to end"
    finally:
        done.set()
        flag.uninstall()


def test_a_second_sigterm_does_not_interrupt_the_stopping_run() -> None:
    flag = SigtermFlag()
    flag.install()
    try:
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. during cleanup: ignored
        time.sleep(0.1)
    finally:
        flag.uninstall()


def test_checkpoint_policy_by_steps_and_minutes() -> None:
    by_steps = CheckpointPolicy(interval_steps=5, interval_minutes=0)
    assert [s for s in range(1, 16) if by_steps.due(s)] == [5, 10, 15]
    by_time = CheckpointPolicy(interval_steps=None, interval_minutes=30)
    assert not by_time.due(1)
    by_time._last -= 31 * 60
    assert by_time.due(2)
    by_time.saved()
    assert not by_time.due(3)


# ------------------------------------------------------------------------------ evaluation


def test_report_scores_answers_and_renders_a_safe_markdown_table() -> None:
    samples = [Prompt("count: one two", [1], "three four five"), Prompt("a | b", [2], "c\nd")]
    base = ModelEval(loss=3.0, tokens=10, sample_answers=["no", "x"], prompt_answers=["?"])
    tuned = ModelEval(
        loss=1.0, tokens=10, sample_answers=["three four five", "c d"], prompt_answers=["!"]
    )
    report = build_report(
        samples=samples,
        extra=[Prompt("extra", [3])],
        base=base,
        tuned=tuned,
        metrics=["loss", "perplexity", "rougeL", "bleu"],
    )
    assert report.fine_tuned.rouge_l == pytest.approx(1.0)
    assert report.base.rouge_l == 0.0
    assert report.fine_tuned.bleu > report.base.bleu
    assert report.fine_tuned.perplexity == pytest.approx(math.e)
    md = report.to_markdown()
    assert "| loss | 3.0000 | 1.0000 |" in md
    assert "| 2 | a \\| b | c<br>d | x | c d |" in md
    assert "## Extra prompts" in md and "| 1 | extra | ? | ! |" in md
    assert json.loads(report.to_json())["samples"][0]["rouge_l"]["fine_tuned"] == 1.0
    loss_only = build_report(
        samples=[], extra=[], base=ModelEval(3.0), tuned=ModelEval(1.0), metrics=["loss"]
    )
    assert loss_only.fine_tuned == Scores(loss=1.0)
    assert isinstance(loss_only, EvalReport)
    assert perplexity(10_000.0) < math.inf


# --------------------------------------------------------------------- tiny model (CPU)


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    return models.tiny_llama(64, attn="sdpa").eval()


def test_validation_loss_of_packed_rows_equals_each_sequence_alone(tiny_llama: Any) -> None:
    rng = random.Random(0)
    examples = []
    for _ in range(7):
        ids = [rng.randrange(64) for _ in range(rng.randint(4, 12))]
        examples.append(Example(ids, [-100] * 2 + ids[2:]))
    loss, tokens = validation_loss(
        tiny_llama, examples, rows_per_batch=2, max_seq_length=32, pad_token_id=0, precision=CPU
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            out = tiny_llama(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            total += out.loss.item() * e.num_trained
            count += e.num_trained
    assert tokens == count
    assert loss == pytest.approx(total / count, abs=1e-5)


def test_lora_weights_round_trip_through_a_checkpoint(tiny_llama: Any, tmp_path: Path) -> None:
    spec = make_spec(lora={"r": 4, "alpha": 8, "dropout": 0.0})
    model = prepare_for_training(copy.deepcopy(tiny_llama), spec, gradient_checkpointing=False)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    save_trainable(model, tmp_path, "lora")
    fresh = prepare_for_training(copy.deepcopy(tiny_llama), spec, gradient_checkpointing=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
        load_trainable(fresh, tmp_path, "lora")
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    other = prepare_for_training(
        copy.deepcopy(tiny_llama), make_spec(lora={"r": 8}), gradient_checkpointing=False
    )
    with pytest.raises(ModelError, match="does not fit"):
        load_trainable(other, tmp_path, "lora")


def test_dataset_errors_point_at_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    with pytest.raises(DatasetError) as info:
        load_records(path)
    code, message = classify(info.value)
    assert code == exitcodes.DATA_ERROR
    assert "train.jsonl line 2: prompt must be a string" in one_line(message)
    # Several bad records stay apart in the one-line termination message (status.message).
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n{"completion": "c"}\n')
    with pytest.raises(DatasetError) as info:
        load_records(path)
    assert "(got number); train.jsonl line 3: prompt is" in one_line(classify(info.value)[1])


def test_only_rank_zero_logs_progress_under_torchrun(capsys: pytest.CaptureFixture[str]) -> None:
    log, root = logging.getLogger("kubetune_trainer.test"), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging({"RANK": "1", "WORLD_SIZE": "2"})
        log.info("step 1/2")
        log.warning("packing off")
        configure_logging({"RANK": "0", "WORLD_SIZE": "2"})
        log.info("step 2/2")
        configure_logging({})
        log.info("single process")
    finally:
        root.handlers[:], root.level = handlers, level
    out = capsys.readouterr().out
    assert "step 1/2" not in out  # rank 1: warnings only
    assert "WARNING [rank 1] kubetune_trainer.test: packing off" in out
    assert "INFO [rank 0] kubetune_trainer.test: step 2/2" in out
    assert "INFO kubetune_trainer.test: single process" in out


def test_peak_rss_is_the_trainers_own_not_the_parent_processs() -> None:
    """A trainer started from a large process (pytest after the whole suite, a notebook) reported
    that process's high-water mark: Linux carries ru_maxrss across fork + exec."""
    ballast = bytearray(1536 * 2**20)  # 1.5 GiB resident in this (parent) process
    page = os.sysconf("SC_PAGE_SIZE")
    ballast[::page] = b"\x01" * len(range(0, len(ballast), page))  # touched, so resident
    child = subprocess.run(
        [sys.executable, "-c", "from kubetune_trainer import recipe; print(recipe.peak_rss())"],
        check=True,
        capture_output=True,
        text=True,
    )
    del ballast
    peak = int(child.stdout)
    assert 50 * 2**20 < peak < 1024 * 2**20, peak  # torch imported: hundreds of MiB, not 1.5 GiB
