"""Tiny models and tokenizers, built offline: the one place the tests, benchmarks and the
quickstart's assets (examples/quickstart/assets.py) make them.

- `train_bpe` / `build_tokenizer`: a byte-level BPE (lossless round trip) trained on the
  caller's text, `<s>` prepended like Llama's, wrapped for transformers with a chat template;
- `llama_config` / `tiny_llama`: a random-init Llama of the caller's shape, seeded.

Each caller keeps its own sizes, corpus, special tokens and chat template (they pin losses,
shapes and token counts: vLLM's CPU attention needs head_dim >= 32, the packing tests pin
their positions, the benchmarks their published shapes); what is shared is how they are made.
torch, tokenizers and transformers are imported on first use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<s>"
PAD = "<pad>"


def train_bpe(texts: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str]) -> Tokenizer:
    """A byte-level BPE trained on `texts`; every encoding starts with `<s>` (which must be
    one of `special_tokens`), as Llama's tokenizer does."""
    from tokenizers import (  # noqa: PLC0415 - heavy imports only when building
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


def as_transformers(
    raw: Tokenizer, *, eos_token: str, chat_template: str | None
) -> PreTrainedTokenizerFast:
    """`raw` as a transformers tokenizer: BOS `<s>`, PAD `<pad>`, the given EOS and template."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tokenizer: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw, bos_token=BOS, eos_token=eos_token, pad_token=PAD
    )
    tokenizer.chat_template = chat_template
    return tokenizer  # type: ignore[no-any-return]


def build_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int,
    special_tokens: Sequence[str],
    eos_token: str,
    chat_template: str | None,
) -> PreTrainedTokenizerFast:
    """`train_bpe` then `as_transformers`: what save_pretrained writes next to a model."""
    raw = train_bpe(texts, vocab_size=vocab_size, special_tokens=special_tokens)
    return as_transformers(raw, eos_token=eos_token, chat_template=chat_template)


def llama_config(
    vocab_size: int,
    *,
    hidden: int = 32,
    intermediate: int | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    max_positions: int = 2048,
    tied: bool = False,
    tokenizer: Any = None,
    attn: str | None = None,
) -> LlamaConfig:
    """A Llama of this shape: head_dim = hidden / heads; `intermediate` defaults to 2 x hidden,
    `kv_heads` to heads / 2 (grouped-query attention); BOS/EOS/PAD ids from `tokenizer` if
    given (else transformers' defaults); `attn` pins the attention implementation."""
    from transformers import LlamaConfig  # noqa: PLC0415

    extra: dict[str, Any] = {}
    if tokenizer is not None:
        extra.update(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    if attn is not None:
        extra["attn_implementation"] = attn
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate if intermediate is not None else 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads if kv_heads is not None else max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        **extra,
    )


def tiny_llama(vocab_size: int, *, seed: int = 0, **shape: Any) -> LlamaForCausalLM:
    """A random-init Llama (`llama_config(vocab_size, **shape)`), weights drawn after
    torch.manual_seed(seed). The defaults are the unit tests' model: 2 layers, hidden 32,
    4 heads (head_dim 8), 2 KV heads: milliseconds to build."""
    import torch  # noqa: PLC0415
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    config = llama_config(vocab_size, **shape)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model(model: Any, tokenizer: Any, directory: Path) -> Path:
    """Model and tokenizer in one directory, as a Hub model is laid out."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
