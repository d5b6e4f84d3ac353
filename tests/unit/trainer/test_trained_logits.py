"""The loss with the output head at trained positions only (modeling.causal_lm_loss) is exactly
transformers' full-logits loss: the same value and the same gradients, on packed rows with
prompt (-100) labels, padding and a row without any trained token."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.data import Batch, Example, collate_packed, collate_padded
from kubetune_trainer.evaluation import validation_loss
from kubetune_trainer.modeling import (
    Precision,
    causal_lm_loss,
    prepare_for_training,
    supports_trained_logits,
)
from kubetune_trainer.recipe import train_step
from localenv import models

CPU = Precision(torch.device("cpu"), torch.float32, None, grad_scaler=False)
VOCAB = 96


def tiny_llama(*, tied: bool = False) -> LlamaForCausalLM:
    return models.tiny_llama(VOCAB, tied=tied, attn="sdpa")


def tiny_gemma2() -> Gemma2ForCausalLM:
    """A model with a post-head step (final logit soft-capping) that the loss must keep."""
    torch.manual_seed(0)
    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        final_logit_softcapping=2.0,
        attn_implementation="eager",  # Gemma 2 has no SDPA attention
    )
    return Gemma2ForCausalLM(config)


def lora(model: torch.nn.Module) -> torch.nn.Module:
    spec = FineTuneSpec.model_validate(
        {
            "baseModel": {"uri": "s3://models/llama"},
            "dataset": {"trainUri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/run"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        }
    )
    peft = prepare_for_training(model, spec, gradient_checkpointing=False)
    for name, param in peft.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter matter for the gradients
            torch.nn.init.normal_(param, std=0.1)
    return peft


def examples(n: int, seed: int = 0) -> list[Example]:
    """Prompt tokens labelled -100, then trained output tokens; one with no trained token."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 11))]
        prompt = len(ids) if i == 2 else rng.randint(1, len(ids) - 1)
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def packed() -> Batch:
    ex = examples(7)
    # Rows of different lengths: the shorter rows are padded; row 1 has no trained token.
    return collate_packed([[ex[0], ex[1]], [ex[2]], [ex[3], ex[4], ex[5], ex[6]]], 0)


def loss_and_grads(
    model: torch.nn.Module, batch: Batch, *, trained_logits_only: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    divisor = torch.tensor(float(batch.num_label_tokens + 3))  # as if other micro-batches
    loss = causal_lm_loss(model, batch, divisor, trained_logits_only=trained_logits_only)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


CASES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama-lora": lambda: lora(tiny_llama()),
    "llama-full": tiny_llama,
    "llama-full-tied": lambda: tiny_llama(tied=True),
    "gemma2-softcap-full": tiny_gemma2,
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_the_full_logits_loss(case: str) -> None:
    model = CASES[case]().train()
    assert supports_trained_logits(model, CPU)
    assert model.training  # the probe leaves the mode as it was
    batch = packed() if case.startswith("llama") else collate_padded(examples(5), 0)
    assert batch.num_label_tokens > 0

    reference, ref_grads = loss_and_grads(model, batch, trained_logits_only=False)
    loss, grads = loss_and_grads(model, batch, trained_logits_only=True)

    # The reference is transformers' own loss, through labels and num_items_in_batch.
    divisor = torch.tensor(float(batch.num_label_tokens + 3))
    with torch.no_grad():
        hf = model(**batch.model_inputs(), use_cache=False, num_items_in_batch=divisor).loss
    assert reference.item() == pytest.approx(hf.item(), rel=1e-6)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert set(grads) == set(ref_grads) and grads
    if case.endswith("lora"):
        assert all("lora_" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_micro_batch_without_trained_tokens_has_zero_loss() -> None:
    model = tiny_llama().train()
    ex = examples(3)
    batch = collate_packed([[ex[2]]], 0)  # the example without a trained token
    assert batch.num_label_tokens == 0
    loss = causal_lm_loss(model, batch, torch.tensor(5.0), trained_logits_only=True)
    loss.backward()
    assert loss.item() == 0.0
    assert model.lm_head.weight.grad is not None
    assert not model.lm_head.weight.grad.any()


def test_train_step_takes_the_same_step_either_way() -> None:
    ex = examples(8, seed=1)
    micro = [[[0, 1], [2, 3]], [[4], [5, 6, 7]]]
    step_tokens = sum(ex[i].num_trained for b in micro for r in b for i in r)

    def step(trained_logits_only: bool) -> tuple[float, list[torch.Tensor]]:
        model = lora(tiny_llama()).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        loss, tokens = train_step(
            model,
            micro,
            lambda b: collate_packed([[ex[i] for i in row] for row in b], 0),
            step_tokens=step_tokens,
            world_size=1,
            precision=CPU,
            optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
            scaler=torch.amp.GradScaler("cpu", enabled=False),
            params=params,
            trained_logits_only=trained_logits_only,
        )
        assert tokens == sum(len(e) for e in ex)
        return loss.item(), [p.detach().clone() for p in params]

    full_loss, full_params = step(False)
    loss, params = step(True)
    assert loss == pytest.approx(full_loss, rel=1e-5)
    for a, b in zip(params, full_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_validation_loss_is_the_same_either_way() -> None:
    model = lora(tiny_llama())
    ex = examples(9, seed=2)
    kwargs: dict[str, Any] = {
        "rows_per_batch": 2,
        "max_seq_length": 24,
        "pad_token_id": 0,
        "precision": CPU,
    }
    full = validation_loss(model, ex, trained_logits_only=False, **kwargs)
    fast = validation_loss(model, ex, trained_logits_only=True, **kwargs)
    assert fast[1] == full[1]
    assert fast[0] == pytest.approx(full[0], rel=1e-6)


class NoLogitsMask(torch.nn.Module):
    """A causal LM whose forward knows no logits_to_keep (like some remote-code models)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_llama()

    def forward(self, **kwargs: Any) -> Any:
        kwargs.pop("logits_to_keep", None)
        return self.inner(**kwargs)


def test_models_without_a_logits_mask_fall_back_to_full_logits() -> None:
    assert not supports_trained_logits(NoLogitsMask(), CPU)  # wrong shape back
    broken = copy.deepcopy(tiny_llama())
    broken.forward = lambda **kw: (_ for _ in ()).throw(TypeError("no logits_to_keep"))  # type: ignore[method-assign]
    assert not supports_trained_logits(broken, CPU)
