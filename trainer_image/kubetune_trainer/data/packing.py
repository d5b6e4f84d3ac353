"""Padding-free batching: several examples per row, and no attention across them.

Packing puts short examples side by side in one row so that compute is not wasted on
padding. Three things keep packed sequences independent, exactly as if each ran alone:

* a 4D block-diagonal causal attention mask [B, 1, T, T]: a token attends only to earlier
  tokens of its own sequence. transformers (5.24 tested) passes a 4D mask through to the
  attention unchanged. sdpa takes bool (True = attend) or an additive float mask; eager
  attention adds the mask to the scores, so it needs the float form (mask_dtype). Restarting
  position_ids alone are not enough: with a 2D padding mask, or with the default
  use_cache=True (a cache is created even in training), transformers builds one causal mask
  over the whole row; it infers the sequences from position_ids only when
  attention_mask is None and there is no cache;
* position_ids restarting at 0 for each sequence, so rotary embeddings match;
* label -100 at each sequence's first token: HF causal LMs predict labels[t] from
  position t-1, which in a packed row is the previous sequence's last token.

Padding tokens (only up to the longest row of the batch) attend to themselves alone. A
fully masked query row is well defined only for some masks and kernels (with a -inf
additive mask, eager attention gives NaN there, and the next layer carries it into real
tokens through the values); one unmasked entry per row keeps every kernel safe. No real
token attends to padding and padding has no labels, so pads never change real logits or
the loss.
"""

from __future__ import annotations

import bisect
import random
from array import array
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from kubetune_trainer.data.tokenize import IGNORE_INDEX, Example

if TYPE_CHECKING:
    from collections.abc import Sequence

    from numpy.typing import NDArray
    from torch import Tensor


def pack_rows(lengths: Sequence[int], max_tokens_per_row: int, seed: int = 0) -> list[list[int]]:
    """Group example indices into rows of at most max_tokens_per_row tokens.

    Best-fit decreasing: longest first, each into the fullest row it still fits. The seed
    only breaks ties between equal lengths, so the result is deterministic for a seed but
    differs between seeds (epochs).
    """
    if max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be positive (got {max_tokens_per_row})")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens_per_row]
    if too_long:
        raise ValueError(
            f"{len(too_long)} example(s) are longer than max_tokens_per_row="
            f"{max_tokens_per_row} (first: index {too_long[0]}, {lengths[too_long[0]]} "
            "tokens); truncate to max_seq_length <= max_tokens_per_row first"
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: lengths[i], reverse=True)  # stable: ties keep shuffled order

    rows: list[list[int]] = []
    # (free tokens, row index), sorted: bisect finds the tightest row that fits in O(log n).
    free: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        if length == 0:
            continue
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = max_tokens_per_row, len(rows)
            rows.append([])
        rows[row].append(index)
        if space - length > 0:
            bisect.insort(free, (space - length, row))
    return rows


def _shuffled_range(n: int, rng: random.Random) -> NDArray[np.int64]:
    """np.array of rng.shuffle(list(range(n))): the same permutation, without n int objects."""
    order = array("q", range(n))
    rng.shuffle(order)  # any mutable sequence works
    return np.frombuffer(order, dtype=np.int64).copy()


def pack_rows_compact(
    lengths: NDArray[np.int64], max_tokens_per_row: int, seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """pack_rows as two arrays: members (example indices, row after row, in the order
    pack_rows lists them) and starts (row r is members[starts[r]:starts[r + 1]]).

    The same rows as pack_rows for the same arguments, in O(examples) int64 memory instead of
    Python lists (tests/unit/trainer/test_data_store.py checks the equality)."""
    if max_tokens_per_row < 1:
        raise ValueError(f"max_tokens_per_row must be positive (got {max_tokens_per_row})")
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > max_tokens_per_row)
    if len(too_long):
        first = int(too_long[0])
        raise ValueError(
            f"{len(too_long)} example(s) are longer than max_tokens_per_row="
            f"{max_tokens_per_row} (first: index {first}, {int(lengths[first])} "
            "tokens); truncate to max_seq_length <= max_tokens_per_row first"
        )
    order = _shuffled_range(len(lengths), random.Random(seed))
    # Longest first; a stable sort keeps the shuffled order among equal lengths, as
    # list.sort(reverse=True) does.
    order = order[np.argsort(-lengths[order], kind="stable")]
    order = order[lengths[order] > 0]
    row_of = np.empty(len(order), dtype=np.int64)
    rows = 0
    free: list[tuple[int, int]] = []
    chunk = 1 << 16
    for at in range(0, len(order), chunk):
        part = order[at : at + chunk]
        for k, length in enumerate(lengths[part].tolist()):
            slot = bisect.bisect_left(free, (length, -1))
            if slot < len(free):
                space, row = free.pop(slot)
            else:
                space, row = max_tokens_per_row, rows
                rows += 1
            row_of[at + k] = row
            if space - length > 0:
                bisect.insort(free, (space - length, row))
    # Within a row, examples in the order they were placed (their position in `order`).
    by_row = np.argsort(row_of, kind="stable")
    members = order[by_row]
    starts = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=starts[1:])
    return members, starts


def epoch_rows_compact(
    lengths: NDArray[np.int64], max_tokens_per_row: int, *, seed: int, epoch: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """epoch_rows as (members, starts, row order): row i of the epoch is row order[i]."""
    members, starts = pack_rows_compact(lengths, max_tokens_per_row, seed=seed * 100_003 + epoch)
    order = _shuffled_range(len(starts) - 1, random.Random(f"{seed}/{epoch}"))
    return members, starts, order


def epoch_rows(
    lengths: Sequence[int], max_tokens_per_row: int, *, seed: int, epoch: int
) -> list[list[int]]:
    """Packed rows for one epoch, in a shuffled order that depends on (seed, epoch)."""
    rows = pack_rows(lengths, max_tokens_per_row, seed=seed * 100_003 + epoch)
    random.Random(f"{seed}/{epoch}").shuffle(rows)
    return rows


def batch_rows(rows: Sequence[list[int]], rows_per_batch: int) -> list[list[list[int]]]:
    """Consecutive groups of rows_per_batch rows (the last group may be smaller)."""
    if rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be positive (got {rows_per_batch})")
    return [list(rows[i : i + rows_per_batch]) for i in range(0, len(rows), rows_per_batch)]


def packing_efficiency(rows: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Non-padding fraction when every row is padded to the longest row."""
    used = [sum(lengths[i] for i in row) for row in rows]
    longest = max(used, default=0)
    return sum(used) / (longest * len(used)) if longest else 0.0


@dataclass(frozen=True)
class Batch:
    """Model inputs plus the token counts needed for loss scaling and throughput."""

    input_ids: Tensor  # [B, T] long
    labels: Tensor  # [B, T] long, IGNORE_INDEX where no loss
    attention_mask: Tensor  # [B, 1, T, T] packed, or [B, T] padded
    position_ids: Tensor | None  # [B, T] for packed batches
    num_tokens: int  # real (non-pad) tokens: the useful work in this batch
    num_label_tokens: int  # tokens that carry loss after the model's shift
    num_sequences: int

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for model(**inputs)."""
        inputs = {
            "input_ids": self.input_ids,
            "labels": self.labels,
            "attention_mask": self.attention_mask,
        }
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            position_ids=None
            if self.position_ids is None
            else self.position_ids.to(device, non_blocking=True),
        )


def _label_tokens(labels: Tensor) -> int:
    # HF shifts labels left by one, so labels[:, 0] is never a target.
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean "may attend" mask as an additive float mask (0 or the dtype's minimum).

    The minimum rather than -inf, as transformers does, so that an accidental fully masked
    row gives a uniform softmax instead of NaN.
    """
    zero = torch.zeros((), dtype=dtype)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(mask, zero, blocked)


def collate_packed(
    rows: Sequence[Sequence[Example]],
    pad_token_id: int,
    *,
    mask_dtype: torch.dtype = torch.bool,
    pad_to_multiple_of: int = 1,
) -> Batch:
    """Build a packed batch: each row holds whole examples back to back.

    mask_dtype bool gives True = may attend (for sdpa); a float dtype gives an additive
    0 / minimum mask (needed by eager attention, also accepted by sdpa).
    """
    if not rows or any(not row for row in rows):
        raise ValueError("collate_packed needs at least one non-empty row")
    row_lengths = [sum(len(e) for e in row) for row in rows]
    width = max(row_lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)

    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    # Sequence id per token; each padding position gets its own negative id so that it
    # matches only itself in the equality below (self-attention only, never fully masked).
    segment_ids = -torch.arange(1, width + 1, dtype=torch.long).repeat(batch, 1)
    for b, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            end = start + len(example)
            input_ids[b, start:end] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[b, start:end] = torch.tensor(example.labels, dtype=torch.long)
            labels[b, start] = IGNORE_INDEX  # would be predicted from the previous sequence
            position_ids[b, start:end] = torch.arange(len(example), dtype=torch.long)
            segment_ids[b, start:end] = s
            start = end

    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same_sequence = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = (same_sequence & causal)[:, None, :, :]
    if mask_dtype != torch.bool:
        mask = additive_mask(mask, mask_dtype)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=mask,
        position_ids=position_ids,
        num_tokens=sum(row_lengths),
        num_label_tokens=_label_tokens(labels),
        num_sequences=sum(len(row) for row in rows),
    )


def collate_padded(
    examples: Sequence[Example], pad_token_id: int, *, pad_to_multiple_of: int = 1
) -> Batch:
    """One example per row, right-padded to the longest example of the batch.

    The 2D attention_mask (1 = real token) is enough here; transformers makes it causal.
    """
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    width = max(len(e) for e in examples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, example in enumerate(examples):
        n = len(example)
        input_ids[b, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[b, :n] = 1
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        position_ids=None,
        num_tokens=sum(len(e) for e in examples),
        num_label_tokens=_label_tokens(labels),
        num_sequences=len(examples),
    )


@dataclass(frozen=True)
class PackedCollator:
    """collate_fn for a DataLoader whose items are rows (lists of examples)."""

    pad_token_id: int
    mask_dtype: torch.dtype = torch.bool
    pad_to_multiple_of: int = 1

    def __call__(self, rows: Sequence[Sequence[Example]]) -> Batch:
        return collate_packed(
            rows,
            self.pad_token_id,
            mask_dtype=self.mask_dtype,
            pad_to_multiple_of=self.pad_to_multiple_of,
        )


@dataclass(frozen=True)
class PaddedCollator:
    """collate_fn for a DataLoader whose items are single examples."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, examples: Sequence[Example]) -> Batch:
        return collate_padded(
            examples, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of
        )
