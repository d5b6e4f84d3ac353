"""Preference pairs (objective dpo): records to token ids, statistics, and batches.

A pair is two sequences that share their prompt: prompt + chosen answer and prompt + rejected
answer, each an Example whose labels train only the answer (and its end-of-turn or EOS token),
exactly as the SFT formats encode an answer (templates.py):

* `preference` (the hosted fine-tuning API's layout) and `prompt-chosen-rejected` with message
  lists: the conversation plus one assistant message, rendered with the tokenizer's chat
  template (or the built-in ChatML one); only the final assistant turn is trained, earlier
  assistant turns in the prompt are context;
* `prompt-chosen-rejected` with plain strings: BOS (when the tokenizer adds one) + prompt +
  answer + EOS, like a prompt-completion record.

A pair is never truncated: a truncated answer is a different answer, and cutting one side of a
pair biases the preference. A pair whose chosen or rejected sequence is longer than
maxSeqLength is skipped and counted (PairStats.too_long), and identical or empty answers were
already refused with their line numbers by records.py.

Batches: a micro-batch holds whole pairs. Packed, a row holds pairs up to 2 x maxSeqLength
tokens, each sequence with its own block of the block-diagonal mask (packing.py); padded, each
sequence is a row. The sequences are numbered pair-major (2k = chosen of the k-th pair of the
micro-batch, 2k + 1 = its rejected), and `sequence_of_label` maps every trained label position
to its sequence, so per-sequence log-probabilities are one index_add over the trained tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import torch

from kubetune_trainer.data.packing import Batch, collate_packed, collate_padded
from kubetune_trainer.data.records import DatasetError, Record
from kubetune_trainer.data.templates import (
    Encoded,
    Segment,
    TemplateError,
    adds_bos,
    chatml_segments,
    encode_segments,
    template_segments,
)
from kubetune_trainer.data.tokenize import IGNORE_INDEX, Example

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from transformers import PreTrainedTokenizerBase

    from kubetune_trainer.data.records import RecordFormat

# Packed pair rows hold up to this many times maxSeqLength tokens (both sequences of a pair).
PAIR_ROW_FACTOR: Final = 2


@dataclass(frozen=True)
class PairText:
    """A record's prompt and answers: messages (chat style) or plain strings."""

    prompt: list[dict[str, str]] | str
    chosen: str
    rejected: str

    @property
    def chat(self) -> bool:
        return isinstance(self.prompt, list)


def pair_text(data: Mapping[str, Any], fmt: RecordFormat) -> PairText:
    """The prompt and both answers of a validated preference record."""
    if fmt == "preference":
        messages = [{"role": m["role"], "content": m["content"]} for m in data["input"]["messages"]]
        return PairText(
            messages,
            data["preferred_output"][0]["content"],
            data["non_preferred_output"][0]["content"],
        )
    if fmt == "prompt-chosen-rejected":
        prompt = data["prompt"]
        if isinstance(prompt, list):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
            return PairText(messages, data["chosen"][0]["content"], data["rejected"][0]["content"])
        return PairText(str(prompt), str(data["chosen"]), str(data["rejected"]))
    raise ValueError(f"{fmt!r} is not a preference format")


def _last_answer_only(segments: list[Segment]) -> list[Segment]:
    """Train the final assistant turn only: earlier answers are the prompt's context."""
    last = max(i for i, s in enumerate(segments) if s.train)
    return [s if i == last else Segment(s.text, train=False) for i, s in enumerate(segments)]


def encode_answer(
    prompt: list[dict[str, str]] | str,
    answer: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    bos: bool,
) -> Encoded:
    """Token ids and train mask of prompt + answer, the answer alone trained."""
    if isinstance(prompt, str):
        segments = [Segment(prompt, train=False), Segment(answer, train=True)]
        return encode_segments(segments, tokenizer, bos=bos, eos=True)
    messages = [*prompt, {"role": "assistant", "content": answer}]
    if getattr(tokenizer, "chat_template", None):
        return encode_segments(_last_answer_only(template_segments(tokenizer, messages)), tokenizer)
    return encode_segments(_last_answer_only(chatml_segments(messages)), tokenizer, bos=bos)


@dataclass(frozen=True)
class Pair:
    """Prompt + chosen and prompt + rejected, as training sequences."""

    chosen: Example
    rejected: Example

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def num_trained(self) -> int:
        return self.chosen.num_trained + self.rejected.num_trained


@dataclass
class PairStats:
    """What tokenization did to the pairs, for logs and metrics.json."""

    records: int = 0
    pairs: int = 0
    too_long: int = 0  # skipped: prompt + an answer longer than maxSeqLength
    total_tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0  # longest sequence (one side of a pair)

    @property
    def examples(self) -> int:
        return self.pairs

    @property
    def dropped(self) -> int:
        return self.too_long

    @property
    def truncated(self) -> int:
        return 0  # pairs are never truncated

    @property
    def mean_length(self) -> float:
        return self.total_tokens / (2 * self.pairs) if self.pairs else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "records": self.records,
            "pairs": self.pairs,
            "skipped_too_long": self.too_long,
            "total_tokens": self.total_tokens,
            "trained_tokens": self.trained_tokens,
            "mean_length": self.mean_length,
            "max_length": self.max_length,
        }


class TokenizedPairs(list[Pair]):
    """A list of pairs with the statistics of how it was made."""

    def __init__(self, pairs: Iterable[Pair] = (), stats: PairStats | None = None):
        super().__init__(pairs)
        self.stats: PairStats = stats if stats is not None else PairStats()


def _example(encoded: Encoded) -> Example:
    labels = [
        i if t else IGNORE_INDEX for i, t in zip(encoded.input_ids, encoded.train_mask, strict=True)
    ]
    return Example(encoded.input_ids, labels)


def tokenize_pairs(
    records: Iterable[Record | Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    fmt: RecordFormat,
    max_seq_length: int,
) -> TokenizedPairs:
    """Encode validated preference records; skip (and count) pairs that do not fit."""
    bos = adds_bos(tokenizer)
    stats = PairStats()
    pairs: list[Pair] = []
    for record in records:
        data = record.data if isinstance(record, Record) else record
        where = record.location if isinstance(record, Record) else "record"
        stats.records += 1
        text = pair_text(data, fmt)
        try:
            chosen = _example(encode_answer(text.prompt, text.chosen, tokenizer, bos=bos))
            rejected = _example(encode_answer(text.prompt, text.rejected, tokenizer, bos=bos))
        except TemplateError as exc:
            raise DatasetError(f"{where}: {exc}") from exc
        if chosen.input_ids == rejected.input_ids:
            raise DatasetError(f"{where}: chosen and rejected answers encode to the same tokens")
        if max(len(chosen), len(rejected)) > max_seq_length:
            stats.too_long += 1
            continue
        if chosen.num_trained == 0 or rejected.num_trained == 0:  # cannot happen: non-empty
            raise DatasetError(f"{where}: an answer has no token to train on")
        pair = Pair(chosen, rejected)
        pairs.append(pair)
        stats.pairs += 1
        stats.total_tokens += len(pair)
        stats.trained_tokens += pair.num_trained
        stats.max_length = max(stats.max_length, len(chosen), len(rejected))
    return TokenizedPairs(pairs, stats)


# ------------------------------------------------------------------------------------ batches


@dataclass(frozen=True)
class PairBatch:
    """Model inputs for whole pairs, and which sequence each trained label belongs to."""

    batch: Batch
    sequence_of_label: torch.Tensor  # [trained labels] long: 2k chosen, 2k + 1 rejected
    pair_index: torch.Tensor  # [pairs] long: dataset index of each pair, in batch order
    num_pairs: int

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device: torch.device | str) -> PairBatch:
        return replace(
            self,
            batch=self.batch.to(device),
            sequence_of_label=self.sequence_of_label.to(device, non_blocking=True),
            pair_index=self.pair_index.to(device, non_blocking=True),
        )


def collate_pairs(
    rows: Sequence[Sequence[int]],
    pairs: Sequence[Pair],
    pad_token_id: int,
    *,
    packing: bool,
    mask_dtype: torch.dtype = torch.bool,
) -> PairBatch:
    """A micro-batch of pairs: `rows` are lists of pair indices into `pairs` (packed: several
    pairs per row; unpacked: one pair per row, its two sequences padded as two rows)."""
    order = [i for row in rows for i in row]
    if not order:
        raise ValueError("collate_pairs needs at least one pair")
    # Sequence number of every position: -1 for padding.
    if packing:
        seq_rows = [[s for i in row for s in (pairs[i].chosen, pairs[i].rejected)] for row in rows]
        batch = collate_packed(seq_rows, pad_token_id, mask_dtype=mask_dtype)
        numbered: list[list[int]] = []
        sequence = 0
        for row in seq_rows:
            ids: list[int] = []
            for example in row:
                ids.extend([sequence] * len(example))
                sequence += 1
            numbered.append(ids)
    else:
        flat = [s for i in order for s in (pairs[i].chosen, pairs[i].rejected)]
        batch = collate_padded(flat, pad_token_id)
        numbered = [[n] * len(example) for n, example in enumerate(flat)]
    width = batch.input_ids.shape[1]
    sequence_ids = torch.full((len(numbered), width), -1, dtype=torch.long)
    for r, ids in enumerate(numbered):
        sequence_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    trained = batch.labels[:, 1:] != IGNORE_INDEX
    return PairBatch(
        batch=batch,
        sequence_of_label=sequence_ids[:, 1:][trained],
        pair_index=torch.tensor(order, dtype=torch.long),
        num_pairs=len(order),
    )
