"""Packing is used only where the model keeps packed sequences apart (modeling.
packing_keeps_sequences_apart): architectures that honour the 4D block-diagonal mask and
restarting position_ids pass; a model that ignores them, or cannot take a 4D mask at all
(BLOOM builds ALiBi from a 2D mask), is trained one example per row instead."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.data import Example
from kubetune_trainer.evaluation import validation_loss
from kubetune_trainer.modeling import (
    Precision,
    attention_mask_dtype,
    load_base_model,
    packing_keeps_sequences_apart,
)
from localenv import models

CPU = Precision(torch.device("cpu"), torch.float32, None, grad_scaler=False)
VOCAB = 64
SMALL: dict[str, Any] = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}


def tiny_gpt2() -> PreTrainedModel:  # learned absolute positions
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL))


def tiny_opt() -> PreTrainedModel:  # positions derived from the mask unless given
    config = OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        **SMALL,
    )
    return OPTForCausalLM(config)


def tiny_qwen2() -> PreTrainedModel:  # biases on q/k/v, tied embeddings
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **SMALL,
    )
    return Qwen2ForCausalLM(config)


def tiny_bloom() -> PreTrainedModel:  # ALiBi, no SDPA attention
    return BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, **SMALL))


def examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 12))]
        prompt = rng.randint(1, len(ids) - 1)
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


def probe(model: torch.nn.Module) -> bool:
    dtype = attention_mask_dtype(model, CPU)
    return packing_keeps_sequences_apart(model, examples(3), 0, dtype, CPU)


TRANSFORMERS_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": lambda: models.tiny_llama(VOCAB, attn="sdpa"),
    "gpt2": tiny_gpt2,
    "opt": tiny_opt,
    "qwen2": tiny_qwen2,
}


@pytest.mark.parametrize("name", TRANSFORMERS_MODELS)
def test_transformers_models_keep_packed_sequences_apart(name: str) -> None:
    torch.manual_seed(0)
    model = TRANSFORMERS_MODELS[name]()
    model.train()
    assert probe(model)
    assert model.training  # the probe runs in eval mode and restores the mode


class IgnoresPacking(torch.nn.Module):
    """A causal LM that drops the 4D mask and the positions (as some remote-code models do):
    packed sequences would attend to each other."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = models.tiny_llama(VOCAB, attn="sdpa")

    def forward(self, **kwargs: Any) -> Any:
        kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)
        return self.inner(**kwargs)


def test_a_model_that_ignores_the_mask_is_not_packed(caplog: pytest.LogCaptureFixture) -> None:
    assert not probe(IgnoresPacking())
    assert "does not keep packed sequences apart" in caplog.text
    assert "without the mask" in caplog.text  # the measured differences are in the message


def test_bloom_cannot_take_a_4d_mask_and_is_not_packed(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    assert not probe(tiny_bloom())
    assert "training without packing" in caplog.text


def test_a_single_example_is_enough_for_the_probe() -> None:
    model = models.tiny_llama(VOCAB, attn="sdpa")
    assert packing_keeps_sequences_apart(model, examples(1), 0, torch.bool, CPU)


def test_an_architecture_without_sdpa_loads_with_eager_attention(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny_bloom().save_pretrained(tmp_path)
    spec = FineTuneSpec.model_validate(
        {
            "baseModel": {"uri": "s3://models/bloom"},
            "dataset": {"trainUri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/run"},
        }
    )
    model = load_base_model(tmp_path, spec, CPU)
    assert model.config._attn_implementation == "eager"
    assert attention_mask_dtype(model, CPU) == torch.float32


def test_validation_loss_is_the_same_packed_or_one_example_per_row() -> None:
    model = models.tiny_llama(VOCAB, attn="sdpa")
    ex = examples(9, seed=3)
    kwargs: dict[str, Any] = {
        "rows_per_batch": 3,
        "max_seq_length": 32,
        "pad_token_id": 0,
        "precision": CPU,
    }
    packed = validation_loss(model, ex, packing=True, **kwargs)
    unpacked = validation_loss(model, ex, packing=False, **kwargs)
    assert packed[1] == unpacked[1] == sum(e.num_trained for e in ex)
    assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
    # Bloom cannot run packed, but evaluates one example per row.
    bloom_loss, tokens = validation_loss(tiny_bloom(), ex, packing=False, **kwargs)
    assert tokens == packed[1] and bloom_loss > 0
