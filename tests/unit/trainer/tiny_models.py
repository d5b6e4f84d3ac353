"""The unit tests' model: built offline, in milliseconds."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_model(*, vocab_size: int = 64, tied: bool = False) -> LlamaForCausalLM:
    """A 2-layer, 32-wide random Llama (seeded), SDPA attention: the unit tests' model."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)
