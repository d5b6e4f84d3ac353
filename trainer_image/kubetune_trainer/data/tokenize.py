"""Records to training examples: token ids, labels (-100 = no loss), and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from kubetune_trainer.data.records import DatasetError, Record
from kubetune_trainer.data.templates import TemplateError, adds_bos, encode_record

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from transformers import PreTrainedTokenizerBase

    from kubetune_trainer.data.records import RecordFormat

# The label value PyTorch's cross_entropy (and every HF model) ignores.
IGNORE_INDEX: Final = -100


@dataclass(frozen=True)
class Example:
    """One training sequence. labels[t] is the target for input_ids[t] (HF convention: the
    model shifts, so labels[0] never carries loss)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels must have the same length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        # Position 0 is never predicted (nothing precedes it), so it never counts.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class TokenStats:
    """What tokenization did to the dataset, for logs and the job status."""

    records: int = 0
    examples: int = 0
    truncated: int = 0  # examples cut to max_seq_length
    dropped: int = 0  # records with no trained token left (e.g. truncated away)
    total_tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0

    @property
    def mean_length(self) -> float:
        return self.total_tokens / self.examples if self.examples else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "records": self.records,
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "total_tokens": self.total_tokens,
            "trained_tokens": self.trained_tokens,
            "mean_length": self.mean_length,
            "max_length": self.max_length,
        }


class TokenizedDataset(list[Example]):
    """A list of examples that also carries the statistics of how it was made."""

    def __init__(self, examples: Iterable[Example] = (), stats: TokenStats | None = None):
        super().__init__(examples)
        self.stats: TokenStats = stats if stats is not None else TokenStats()


@dataclass
class _Builder:
    max_seq_length: int
    stats: TokenStats = field(default_factory=TokenStats)
    examples: list[Example] = field(default_factory=list)

    def add(self, input_ids: list[int], train_mask: list[bool]) -> None:
        self.stats.records += 1
        if len(input_ids) > self.max_seq_length:
            # Keep the beginning: prompts come first and the model needs them as context.
            input_ids = input_ids[: self.max_seq_length]
            train_mask = train_mask[: self.max_seq_length]
            self.stats.truncated += 1
        labels = [i if t else IGNORE_INDEX for i, t in zip(input_ids, train_mask, strict=True)]
        example = Example(input_ids, labels)
        trained = example.num_trained
        if trained == 0:
            self.stats.dropped += 1
            return
        self.examples.append(example)
        self.stats.examples += 1
        self.stats.total_tokens += len(input_ids)
        self.stats.trained_tokens += trained
        self.stats.max_length = max(self.stats.max_length, len(input_ids))


def tokenize_records(
    records: Iterable[Record | Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    fmt: RecordFormat,
    max_seq_length: int,
) -> TokenizedDataset:
    """Encode validated records; truncate to max_seq_length; drop examples without loss.

    The result is a list[Example] with a .stats (TokenStats) attribute.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2 (got {max_seq_length})")
    bos = adds_bos(tokenizer)
    builder = _Builder(max_seq_length)
    for record in records:
        data = record.data if isinstance(record, Record) else record
        try:
            encoded = encode_record(data, fmt, tokenizer, bos=bos)
        except TemplateError as exc:
            where = record.location if isinstance(record, Record) else "record"
            raise DatasetError(f"{where}: {exc}") from exc
        builder.add(encoded.input_ids, encoded.train_mask)
    return TokenizedDataset(builder.examples, builder.stats)
