"""kubetune's DPO against the reference implementation, TRL's DPOTrainer (loss_type sigmoid).

Same tiny random-init Llama, same preference pairs, same LoRA adapter at step 0 (captured from
kubetune's run and loaded into TRL's PeftModel), same hyperparameters, and the same batch
composition: kubetune's plan (packing off: batchSize pairs per micro-batch) decides the order,
and TRL reads the pairs in that order (train_sampling_strategy "sequential"). Both run in fp32 on
the CPU with LoRA dropout 0, so nothing random differs between them.

What must agree, and why the tolerances are what they are:
* step 1: both losses are ln 2 exactly (policy = reference: the adapter's B matrix starts at 0);
* every step's loss, mean chosen and rejected rewards and reward accuracy. The two compute the
  same fp32 math in a different order (kubetune: logits only at the answers' positions and one
  cross-entropy; TRL: its fused LM head over every position), which differs by ~1e-7 relative
  per forward pass; AdamW's normalized updates carry such differences along without growing
  them much over 16 steps. Measured (2026-12, torch 2.15, TRL 1.16): max |loss difference|
  1.2e-7, |reward difference| 3.8e-7, identical reward accuracies over the 16 steps. The test
  allows 1e-5, 25x the measurement and still three orders of magnitude below the 1e-2-scale
  changes a real bug makes (a wrong sign, a missing or extra token, a shifted label, a mean over
  tokens instead of a sum, a reference that drifts with the adapter);
* the held-out pairs after training: TRL's eval reward accuracy equals kubetune's, and the
  preference accuracy (log pi(chosen) > log pi(rejected)) of TRL's final adapter, measured with
  kubetune's own evaluation code, equals kubetune's, with the pairs' log-probabilities within
  1e-3 (16 pairs: one flipped near-tie would move an accuracy by 1/16; none is that close here).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_support import S3, jsonl, preference_records, trainer_config

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.recipe import FineTuneRecipe
from localenv.testing import Cluster

pytest_plugins = ["trainer_fixtures"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

torch.set_num_threads(1)

PAIRS, BATCH, EPOCHS, BETA, LR = 32, 4, 2, 0.1, 5e-3
LOSS_TOLERANCE = 1e-5
REWARD_TOLERANCE = 1e-5


def test_dpo_matches_trl_dpotrainer_step_by_step(
    cluster: Cluster, s3: S3, base_model_uri: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from kubetune_trainer.dpo import pair_logps  # noqa: PLC0415
    from kubetune_trainer.modeling import Precision  # noqa: PLC0415

    train_rows = preference_records("prompt-chosen-rejected", PAIRS, seed=11)
    validation_rows = preference_records("prompt-chosen-rejected", 16, seed=12)
    config = trainer_config(
        base_model_uri=base_model_uri,
        train_uri=s3.put("data/parity/train.jsonl", jsonl(train_rows)),
        validation_uri=s3.put("data/parity/validation.jsonl", jsonl(validation_rows)),
        output_uri=s3.uri("out/dpo-parity"),
        work_dir=tmp_path / "work",
        objective="dpo",
        dpo={"beta": BETA, "labelSmoothing": 0.0},
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        hyperparameters={
            "epochs": EPOCHS,
            "batchSize": BATCH,
            "gradientAccumulationSteps": 1,
            "learningRate": LR,
            "scheduler": "constant",
            "warmupRatio": 0.0,
            "packing": False,
        },
        evaluation={"metrics": ["loss"], "sampleSize": 0},
    )

    # ---- kubetune, in this process: capture the adapter as initialized, and the plan's order.
    recipe = FineTuneRecipe(TrainerConfig.model_validate(config), env=cluster.env())
    initial: dict[str, torch.Tensor] = {}

    def capture(planned: Any) -> None:
        if planned.step == 0:
            from peft import get_peft_model_state_dict  # noqa: PLC0415

            state = get_peft_model_state_dict(recipe.unwrapped)
            initial.update({k: v.detach().clone() for k, v in state.items()})

    recipe.before_step = capture
    try:
        recipe.setup()
        recipe.train()
        recipe.evaluate()
        ours = recipe.metrics_summary()
        order = [
            i
            for step in range(recipe.plan.total_steps)
            for batch in recipe.plan.step_batches(step).batches
            for row in batch
            for i in row
        ]
        our_pairs = recipe.train_pairs
        our_validation = recipe.validation_pairs
    finally:
        recipe.cleanup()
    history = ours["train_loss_history"]
    steps = len(history)
    assert steps == EPOCHS * PAIRS // BATCH and initial
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)

    # ---- TRL on the same pairs, in the same order, from the same adapter.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(our_pairs) == PAIRS  # no pair skipped: pair i is record i
    rows = [train_rows[i] for i in order]
    train = datasets.Dataset.from_list(rows)
    evaluation = datasets.Dataset.from_list(validation_rows)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base, lora)
    result: Any = set_peft_model_state_dict(model, initial)
    assert not result.unexpected_keys
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=BETA,
        loss_type=["sigmoid"],
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_steps=steps,
        max_grad_norm=1.0,
        weight_decay=0.0,
        optim="adamw_torch",
        max_length=None,
        gradient_checkpointing=False,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=7,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation,
        processing_class=tokenizer,
    )  # fmt: skip
    # The same tokens: TRL's own tokenization of the pairs equals kubetune's.
    for i, example in enumerate(trainer.train_dataset.select(range(4))):
        pair = our_pairs[order[i]]
        prompt = example["prompt_ids"]
        assert prompt + example["chosen_ids"] == pair.chosen.input_ids
        assert prompt + example["rejected_ids"] == pair.rejected.input_ids
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e and "step" in e]
    assert [e["step"] for e in logged] == list(range(1, steps + 1))

    differences: dict[str, float] = {}
    for mine, theirs in zip(history, logged, strict=True):
        for ours_key, trl_key, tolerance in (
            ("loss", "loss", LOSS_TOLERANCE),
            ("reward_chosen", "rewards/chosen", REWARD_TOLERANCE),
            ("reward_rejected", "rewards/rejected", REWARD_TOLERANCE),
            ("reward_margin", "rewards/margins", REWARD_TOLERANCE),
            ("reward_accuracy", "rewards/accuracies", 1e-9),
        ):
            gap = abs(mine[ours_key] - theirs[trl_key])
            differences[ours_key] = max(differences.get(ours_key, 0.0), gap)
            assert gap <= tolerance, (mine["step"], ours_key, mine[ours_key], theirs[trl_key])
    print("max |kubetune - TRL| per metric over", steps, "steps:", json.dumps(differences))
    assert history[-1]["loss"] < math.log(2) - 0.02  # and both learned something

    # ---- the held-out pairs after training
    trl_eval = trainer.evaluate()
    assert trl_eval["eval_rewards/accuracies"] == pytest.approx(
        ours["eval"]["fine_tuned"]["reward_accuracy"], abs=1e-9
    )
    assert trl_eval["eval_loss"] == pytest.approx(ours["eval"]["fine_tuned"]["loss"], abs=1e-4)
    cpu = Precision(torch.device("cpu"), torch.float32, None, grad_scaler=False)
    theirs_logps = pair_logps(
        model, our_validation, rows_per_batch=BATCH, max_seq_length=128,
        pad_token_id=int(tokenizer.pad_token_id), precision=cpu, packing=False,
    )  # fmt: skip
    theirs_accuracy = float((theirs_logps[:, 0] > theirs_logps[:, 1]).double().mean())
    assert theirs_accuracy == ours["eval"]["fine_tuned"]["preference_accuracy"]
    assert (
        ours["eval"]["fine_tuned"]["preference_accuracy"]
        > (ours["eval"]["base"]["preference_accuracy"])
    )
