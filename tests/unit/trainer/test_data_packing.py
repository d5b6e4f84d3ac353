"""Packing: sequences in one row must behave exactly as if each ran alone."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import pytest
import torch

from kubetune_trainer.data.packing import (
    batch_rows,
    collate_packed,
    collate_padded,
    epoch_rows,
    pack_rows,
    packing_efficiency,
)
from kubetune_trainer.data.tokenize import IGNORE_INDEX, Example
from localenv import models

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

PAD = 2
X = IGNORE_INDEX


def make_examples(vocab_size: int, lengths: list[int], seed: int = 0) -> list[Example]:
    """Random token ids; a random-length prompt prefix is masked, like a real record."""
    rng = random.Random(seed)
    examples = []
    for length in lengths:
        ids = [rng.randrange(5, vocab_size) for _ in range(length)]
        prompt = rng.randrange(0, length - 1)
        examples.append(Example(ids, [X] * prompt + ids[prompt:]))
    return examples


def tiny_llama(vocab_size: int, attn: str = "sdpa") -> LlamaForCausalLM:
    """The packing tests' model: hidden 32, two heads of 16, 128 positions, seeded."""
    model = models.tiny_llama(vocab_size, heads=2, kv_heads=2, max_positions=128, attn=attn)
    model = model.to(torch.float32).eval()
    assert model.config._attn_implementation == attn
    return model


@pytest.fixture
def rows(tokenizer: PreTrainedTokenizerFast) -> list[list[Example]]:
    examples = make_examples(len(tokenizer), [7, 3, 11, 5, 9, 4])
    # Rows of 21, 14 and 4 tokens: the last two get padding in the batch.
    return [examples[0:3], examples[3:5], examples[5:6]]


def alone_logits(model: LlamaForCausalLM, example: Example) -> torch.Tensor:
    return model(input_ids=torch.tensor([example.input_ids])).logits[0]


def max_diff_per_sequence(
    model: LlamaForCausalLM, rows: list[list[Example]], packed_logits: torch.Tensor
) -> list[float]:
    diffs = []
    for b, row in enumerate(rows):
        start = 0
        for example in row:
            end = start + len(example)
            reference = alone_logits(model, example)
            diffs.append((packed_logits[b, start:end] - reference).abs().max().item())
            start = end
    return diffs


def test_collator_builds_exact_packed_tensors() -> None:
    a = Example([10, 11, 12], [X, 11, 12])
    b = Example([20, 21], [20, 21])
    c = Example([30, 31], [X, 31])
    batch = collate_packed([[a, b], [c]], pad_token_id=PAD)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21], [30, 31, PAD, PAD, PAD]]
    # b's first label (20) would be predicted from a's last token: masked.
    assert batch.labels.tolist() == [[X, 11, 12, X, 21], [X, 31, X, X, X]]
    assert batch.position_ids is not None
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert batch.attention_mask.shape == (2, 1, 5, 5)
    assert batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    # Padding attends to itself only (no fully masked row -> no NaN); nothing attends to it.
    assert batch.attention_mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]
    assert (batch.num_tokens, batch.num_label_tokens, batch.num_sequences) == (7, 4, 3)
    assert set(batch.model_inputs()) == {"input_ids", "labels", "attention_mask", "position_ids"}

    additive = collate_packed([[a, b], [c]], PAD, mask_dtype=torch.float32).attention_mask
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, batch.attention_mask)
    assert additive.min().item() == torch.finfo(torch.float32).min

    assert collate_packed([[a]], PAD, pad_to_multiple_of=8).input_ids.shape == (1, 8)


def test_padded_collator_pads_to_longest_in_batch() -> None:
    a = Example([10, 11, 12], [X, 11, 12])
    b = Example([20], [20])
    batch = collate_padded([a, b], pad_token_id=PAD)
    assert batch.input_ids.tolist() == [[10, 11, 12], [20, PAD, PAD]]
    assert batch.labels.tolist() == [[X, 11, 12], [20, X, X]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.position_ids is None
    assert (batch.num_tokens, batch.num_label_tokens) == (4, 2)


@torch.no_grad()
def test_packed_logits_equal_each_sequence_alone_with_sdpa(
    tokenizer: PreTrainedTokenizerFast, rows: list[list[Example]]
) -> None:
    model = tiny_llama(len(tokenizer), "sdpa")
    batch = collate_packed(rows, pad_token_id=tokenizer.pad_token_id)
    inputs = batch.model_inputs()
    del inputs["labels"]
    logits = model(**inputs).logits
    assert not torch.isnan(logits).any()
    assert max(max_diff_per_sequence(model, rows, logits)) < 1e-5

    # The mask is what matters: restarted position_ids with an ordinary 2D padding mask
    # (what a standard collator would give) let later sequences attend to earlier ones.
    real = (batch.input_ids != tokenizer.pad_token_id).long()
    leaky = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=real
    ).logits
    diffs = max_diff_per_sequence(model, rows, leaky)
    first_in_row = [0, 3, 5]  # nothing precedes them, so they are unaffected
    assert all(diffs[i] < 1e-5 for i in first_in_row)
    assert all(diffs[i] > 1e-3 for i in range(len(diffs)) if i not in first_in_row)


@torch.no_grad()
def test_position_ids_alone_separate_sequences_only_without_a_cache(
    tokenizer: PreTrainedTokenizerFast, rows: list[list[Example]]
) -> None:
    """Pins transformers 5.x behaviour. With attention_mask=None, masking_utils infers the
    sequences from restarting position_ids (find_packed_sequence_indices) but only when no
    cache exists, and config.use_cache=True makes the model create one even in training.
    The explicit 4D mask works either way, so the trainer does not rely on the inference."""
    model = tiny_llama(len(tokenizer), "sdpa")
    batch = collate_packed(rows, pad_token_id=tokenizer.pad_token_id)
    model.train()  # dropout is 0 in this config; shows training mode does not change it
    default = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    no_cache = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
    ).logits
    model.eval()
    assert max(max_diff_per_sequence(model, rows, default)) > 1e-3
    assert max(max_diff_per_sequence(model, rows, no_cache)) < 1e-5


@torch.no_grad()
def test_eager_attention_needs_the_additive_float_mask(
    tokenizer: PreTrainedTokenizerFast, rows: list[list[Example]]
) -> None:
    model = tiny_llama(len(tokenizer), "eager")
    batch = collate_packed(rows, tokenizer.pad_token_id, mask_dtype=torch.float32)
    logits = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
    ).logits
    assert max(max_diff_per_sequence(model, rows, logits)) < 1e-5


@torch.no_grad()
def test_packed_loss_is_token_weighted_mean_of_sequence_losses(
    tokenizer: PreTrainedTokenizerFast, rows: list[list[Example]]
) -> None:
    model = tiny_llama(len(tokenizer), "sdpa")
    batch = collate_packed(rows, pad_token_id=tokenizer.pad_token_id)
    packed_loss = model(**batch.model_inputs()).loss

    losses, counts = [], []
    for example in (e for row in rows for e in row):
        out = model(
            input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])
        )
        losses.append(out.loss.item())
        counts.append(example.num_trained)
    expected = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    assert sum(counts) == batch.num_label_tokens
    assert packed_loss.item() == pytest.approx(expected, abs=1e-5)


def test_pack_rows_places_every_example_once_within_capacity() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    rows = pack_rows(lengths, 128, seed=1)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert rows == pack_rows(lengths, 128, seed=1)  # deterministic
    # Best-fit decreasing is close to the lower bound on the number of rows.
    assert len(rows) <= -(-sum(lengths) // 128) + 2

    first, again, other = (epoch_rows(lengths, 128, seed=5, epoch=e) for e in (0, 0, 1))
    assert first == again
    assert first != other
    assert sorted(i for row in other for i in row) == list(range(500))

    with pytest.raises(ValueError, match="longer than max_tokens_per_row=64"):
        pack_rows([10, 65], 64)


def test_packing_efficiency_on_long_tailed_lengths() -> None:
    rng = random.Random(0)
    max_len, row_tokens, rows_per_batch = 1024, 2048, 8
    # Log-normal lengths: most examples short, a long tail up to max_seq_length.
    lengths = [min(max_len, max(8, int(rng.lognormvariate(5.0, 0.9)))) for _ in range(4000)]
    assert max(lengths) == max_len

    rows = epoch_rows(lengths, row_tokens, seed=0, epoch=0)
    batches = batch_rows(rows, rows_per_batch)
    real = sum(lengths)
    # Each batch is padded to its longest row.
    padded_area = sum(
        len(batch) * max(sum(lengths[i] for i in row) for row in batch) for batch in batches
    )
    assert real / padded_area > 0.9
    assert packing_efficiency(rows, lengths) > 0.9

    # For contrast: one example per row, padded to the longest in a batch of 8.
    unpacked = [[i] for i in range(len(lengths))]
    assert packing_efficiency(unpacked[:8], lengths) < 0.9

    # The collator counts the same useful tokens.
    examples = make_examples(400, [lengths[i] for i in rows[0]] + [lengths[i] for i in rows[1]])
    n0 = len(rows[0])
    batch = collate_packed([examples[:n0], examples[n0:]], PAD)
    assert batch.num_tokens == sum(len(e) for e in examples)
    assert batch.input_ids.shape[1] <= row_tokens
