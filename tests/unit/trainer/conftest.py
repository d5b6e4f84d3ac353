"""Shared fixtures for the trainer data tests: a tiny BPE tokenizer built offline."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest
import torch

from localenv import models

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

# The test models are tiny: extra intra-op threads only add OpenMP spin/wake-up overhead
# (about 100x slower per forward pass on a loaded 2-core machine).
torch.set_num_threads(1)

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# A template unlike the built-in ChatML one, so a test can tell which one was used. Each
# assistant turn ends with the EOS token; the generation prompt is "Assistant:\n".
TEST_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:\n{% endif %}"
)

# Vocabulary for the generated training text (split at use: SIM905 dislikes literal.split()).
_VOCABULARY = (
    "the a model learns to answer questions about kubernetes pods jobs and gpus "
    "quickly slowly train data tokens batch loss value small large blue red cat dog "
    "sky runs reads writes says hello world what is how many why because yes no one two "
    "three four five six seven eight nine ten instruction input response system user "
    "assistant below describes task write"
)


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = _VOCABULARY.split()
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".?!\n")
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def raw_tokenizer() -> Tokenizer:
    """Byte-level BPE (lossless round trip) trained on generated text; adds <s> like Llama."""
    return models.train_bpe(_sentences(400), vocab_size=400, special_tokens=SPECIAL_TOKENS)


@pytest.fixture
def make_tokenizer(raw_tokenizer: Tokenizer) -> Callable[[str | None], PreTrainedTokenizerFast]:
    def make(chat_template: str | None = None) -> PreTrainedTokenizerFast:
        return models.as_transformers(raw_tokenizer, eos_token="</s>", chat_template=chat_template)

    return make


@pytest.fixture
def tokenizer(
    make_tokenizer: Callable[[str | None], PreTrainedTokenizerFast],
) -> PreTrainedTokenizerFast:
    """No chat_template: chat records use the built-in ChatML template."""
    return make_tokenizer(None)


@pytest.fixture
def chat_tokenizer(
    make_tokenizer: Callable[[str | None], PreTrainedTokenizerFast],
) -> PreTrainedTokenizerFast:
    """With its own Jinja chat_template (TEST_CHAT_TEMPLATE)."""
    return make_tokenizer(TEST_CHAT_TEMPLATE)


@pytest.fixture
def write_file(tmp_path: Path) -> Callable[[str, str | bytes], Path]:
    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return write
