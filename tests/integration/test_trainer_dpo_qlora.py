"""DPO and QLoRA through the trainer as the pod runs it (`python -m kubetune_trainer`).

* DPO with full fine-tuning on the hosted API's preference layout: the reference
  log-probabilities are computed before the first step, travel with the checkpoint (a retry after
  the last step evaluates against the same reference), and the fine-tuned model prefers the
  chosen answers of held-out pairs more often than the base model;
* QLoRA on the CPU against LoRA on the same data, steps and seed: the 4-bit base costs little
  quality (final eval loss within 3% of LoRA's), the memory estimate is within 25% of the run's
  peak resident memory, and only the adapter is published.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_support import S3, TrainerRun, jsonl, preference_records, trainer_config

from kubetune_trainer import exitcodes

pytest_plugins = ["trainer_fixtures"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

torch.set_num_threads(1)


def metrics_of(s3: S3, key: str) -> dict[str, Any]:
    return dict(json.loads(s3.get(f"{key}/metrics.json")))


def assert_succeeded(run: TrainerRun) -> None:
    assert run.returncode == exitcodes.OK, run.output[-4000:]


def test_dpo_full_fine_tuning_learns_preferences_and_keeps_its_reference_with_the_checkpoint(
    s3: S3, base_model_uri: str, run_trainer: Any, tmp_path: Path
) -> None:
    train = s3.put("data/pref/train.jsonl", jsonl(preference_records("preference", 96, seed=7)))
    validation = s3.put("data/pref/val.jsonl", jsonl(preference_records("preference", 24, 8)))
    config = trainer_config(
        base_model_uri=base_model_uri,
        train_uri=train,
        validation_uri=validation,
        output_uri=s3.uri("out/dpo-full"),
        work_dir=tmp_path / "work",
        method="full",
        objective="dpo",
        dpo={"beta": 0.1},
        hyperparameters={"epochs": 3, "batchSize": 4, "learningRate": 0.003},
        dataset={"maxSeqLength": 64},
        evaluation={"metrics": ["loss"], "sampleSize": 0},
    )
    run = run_trainer(config)
    assert_succeeded(run)
    assert run.log_lines("reference log-probabilities of 96 training and 24 validation pairs")
    metrics = metrics_of(s3, "out/dpo-full")
    assert metrics["objective"] == "dpo" and metrics["data"]["format"] == "preference"
    assert metrics["dpo"]["reference"] == "precomputed log-probabilities"
    history = metrics["train_loss_history"]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= set(
        history[-1]
    )
    base, tuned = metrics["eval"]["base"], metrics["eval"]["fine_tuned"]
    assert base["loss"] == pytest.approx(math.log(2))
    assert tuned["loss"] < base["loss"]
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert tuned["reward_accuracy"] > 0.5 and tuned["reward_margin"] > 0
    checkpoints = s3.keys("out/dpo-full/checkpoints")
    assert any(k.endswith("/reference_logps.safetensors") for k in checkpoints), checkpoints

    # A retry after the last step evaluates from the checkpoint: same reference, same scores.
    again = run_trainer(config, name="again")
    assert_succeeded(again)
    assert again.log_lines("training already complete")
    assert not again.log_lines("reference log-probabilities of")
    assert metrics_of(s3, "out/dpo-full")["eval"] == metrics["eval"]


def test_qlora_on_cpu_trains_within_3_percent_of_lora_and_its_estimate_fits_the_rss(
    s3: S3,
    base_model_uri: str,
    datasets: dict[str, tuple[str, str]],
    run_trainer: Any,
    tmp_path: Path,
) -> None:
    train, validation = datasets["chat"]

    def config(method: str) -> dict[str, Any]:
        return trainer_config(
            base_model_uri=base_model_uri,
            train_uri=train,
            validation_uri=validation,
            output_uri=s3.uri(f"out/quality-{method}"),
            work_dir=tmp_path / method,
            method=method,
            hyperparameters={"epochs": 4, "batchSize": 2, "learningRate": 0.01},
            dataset={"maxSeqLength": 64},
            evaluation={"metrics": ["loss"], "sampleSize": 0},
        )

    lora_run = run_trainer(config("lora"), name="lora")
    qlora_run = run_trainer(config("qlora"), name="qlora")
    assert_succeeded(lora_run)
    assert_succeeded(qlora_run)
    lora, qlora = metrics_of(s3, "out/quality-lora"), metrics_of(s3, "out/quality-qlora")
    assert qlora["steps"] == lora["steps"]
    lora_loss, qlora_loss = lora["eval"]["fine_tuned"]["loss"], qlora["eval"]["fine_tuned"]["loss"]
    print(f"final eval loss: lora {lora_loss:.4f}, qlora {qlora_loss:.4f}")
    assert qlora_loss < qlora["eval"]["base"]["loss"] - 0.2  # it learned
    assert abs(qlora_loss - lora_loss) <= 0.03 * lora_loss
    # status.estimate against the measured peak resident memory of the run.
    estimate, peak = qlora["memory_estimate_bytes"], qlora["peak_memory_bytes"]
    print(f"qlora estimate {estimate / 2**20:.0f} MiB, RSS peak {peak / 2**20:.0f} MiB")
    assert qlora["peak_memory_kind"] == "RSS peak"
    assert abs(estimate - peak) <= 0.25 * peak
    assert qlora_run.log_lines("qlora: ") and qlora_run.log_lines("4-bit weights")
    # Only the adapter is published: no base weights, quantized or not.
    files = s3.keys("out/quality-qlora")
    assert "adapter_model.safetensors" in files
    assert not [f for f in files if f.startswith("model") or (f.endswith("model.safetensors")
                and f != "adapter_model.safetensors" and not f.startswith("checkpoints/"))]  # fmt: skip
