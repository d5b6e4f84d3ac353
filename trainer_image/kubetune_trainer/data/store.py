"""Tokenized examples on disk: flat arrays read on demand instead of Python lists.

One store is a directory of flat arrays, written once while records stream past:

* tokens.i32   every example's token ids, back to back (int32);
* train.u8     per token, 1 where the token carries loss (labels = token id) and 0 where the
               label is IGNORE_INDEX;
* offsets.i64  example i is tokens[offsets[i]:offsets[i+1]] (len = examples + 1);
* trained.i64  trained tokens per example (Example.num_trained), for loss scaling;
* meta.json    TokenStats, the data fingerprint (checkpoint.data_fingerprint of the examples)
               and the format version.

A TokenStore reads them back as a Sequence[Example] that reads token ranges on demand:
the trainer holds O(examples) int64 offsets and lengths, not the tokens, whatever the size of
the dataset. The examples are exactly the ones tokenize_records makes from the same records
(same truncation, same dropped records, same statistics).

Both stores of a run (training and validation) live in one cache directory under the work dir,
named after a key over the data files' contents, the tokenizer's files and every setting that
changes tokenization. It is written to a temporary directory and renamed into place, so a retry
or a resumed pod on the same volume skips tokenization, and a directory that does not read back
completely is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import uuid
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, overload

import numpy as np

from kubetune_trainer.data.records import (
    DataScan,
    DatasetError,
    Record,
    data_files,
    iter_records,
    validation_indices,
)
from kubetune_trainer.data.templates import (
    Layout,
    TemplateError,
    adds_bos,
    encode_layouts,
    layout_record,
)
from kubetune_trainer.data.tokenize import IGNORE_INDEX, Example, TokenStats

if TYPE_CHECKING:
    from numpy.typing import NDArray
    from transformers import PreTrainedTokenizerBase

    from kubetune_trainer.data.records import RecordFormat

log = logging.getLogger(__name__)

STORE_VERSION: Final = 1
# Records tokenized per tokenizer call: big enough for the fast tokenizer's batch encoding to
# pay off, small enough that the batch's Python lists stay a few MB.
BATCH_RECORDS: Final = 1024
# Files of a tokenizer directory that decide its output (a model directory also holds weights,
# which do not).
_TOKENIZER_FILES: Final = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
_ARRAYS: Final = {"tokens": np.int32, "train": np.uint8, "offsets": np.int64, "trained": np.int64}
_SUFFIX: Final = {"tokens": ".i32", "train": ".u8", "offsets": ".i64", "trained": ".i64"}


def _file_digest(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def data_identity(path: str | Path) -> list[list[Any]]:
    """[relative name, size, SHA-256] of every data file under `path`, in reading order.

    The content hash (about 1 GB/s) rather than mtimes: a re-downloaded but unchanged file
    keeps its cache, and a file changed in place within the same second does not."""
    root = Path(path)
    return [
        [
            f.name if root.is_file() else f.relative_to(root).as_posix(),
            f.stat().st_size,
            _file_digest(f),
        ]
        for f in data_files(root)
    ]


def tokenizer_identity(tokenizer_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> list[Any]:
    """The tokenizer's class, its files' hashes and its effective chat template."""
    root = Path(tokenizer_dir)
    files = [
        [name, _file_digest(root / name)] for name in _TOKENIZER_FILES if (root / name).is_file()
    ]
    template = getattr(tokenizer, "chat_template", None)
    return [type(tokenizer).__name__, files, template if isinstance(template, str) else None]


def cache_key(parts: dict[str, Any]) -> str:
    text = json.dumps({"version": STORE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------- reading


def _checked(path: Path, dtype: Any, count: int) -> Path:
    if path.stat().st_size != count * np.dtype(dtype).itemsize:
        raise ValueError(f"{path.name}: {path.stat().st_size} bytes, expected {count} values")
    return path


class _FlatFile:
    """Ranges of a flat array file, read with pread.

    Not mmap: mapped pages count in the process's RSS once touched (a full pass for the data
    fingerprint would map the whole file), while pread leaves them in the page cache, which
    the kernel sizes and shares. The files are plain arrays all the same (np.memmap reads
    them)."""

    def __init__(self, path: Path, dtype: Any, count: int) -> None:
        self.dtype = np.dtype(dtype)
        self.count = count
        self._file = _checked(path, dtype, count).open("rb")

    def read(self, start: int, end: int) -> NDArray[Any]:
        size = self.dtype.itemsize
        data = os.pread(self._file.fileno(), (end - start) * size, start * size)
        if len(data) != (end - start) * size:
            raise OSError(f"{self._file.name}: short read (the file changed)")
        return np.frombuffer(data, dtype=self.dtype)


class _Examples(Sequence[Example]):
    """The sequence protocol over `_example(i)` for 0 <= i < len: ints, negative ints, slices."""

    def _example(self, index: int) -> Example:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> Example: ...
    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...
    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        if isinstance(index, slice):
            return [self._example(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self._example(index)


class TokenStore(_Examples):
    """Examples read from a store directory (see the module docstring).

    Reading an example builds it from its token range; iterating goes chunk by chunk. lengths
    and trained are int64 arrays over all examples (the only O(examples) memory)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / "meta.json").read_text())
        if meta.get("version") != STORE_VERSION:
            raise ValueError(f"store version {meta.get('version')}, expected {STORE_VERSION}")
        self.stats = TokenStats(**meta["stats"])
        self.fingerprint: str = meta["fingerprint"]
        n = int(self.stats.examples)
        self.offsets = np.fromfile(
            _checked(self.directory / "offsets.i64", np.int64, n + 1), np.int64
        )
        total = int(self.offsets[-1])
        if self.offsets[0] != 0 or total != self.stats.total_tokens:
            raise ValueError("offsets do not match the token count")
        self.tokens = _FlatFile(self.directory / "tokens.i32", np.int32, total)
        self.train = _FlatFile(self.directory / "train.u8", np.uint8, total)
        self.trained = np.fromfile(_checked(self.directory / "trained.i64", np.int64, n), np.int64)
        self.lengths: NDArray[np.int64] = np.diff(self.offsets)
        if n and (self.lengths.min() < 1 or int(self.trained.sum()) != self.stats.trained_tokens):
            raise ValueError("example lengths or trained-token counts do not add up")

    def __len__(self) -> int:
        return len(self.lengths)

    def _example(self, index: int) -> Example:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.tokens.read(start, end)
        labels = np.where(self.train.read(start, end) != 0, ids, IGNORE_INDEX)
        return Example(ids.tolist(), labels.tolist())

    def __iter__(self) -> Iterator[Example]:
        # A few thousand examples per NumPy call, then plain list slices: iterating every
        # example (the checkpoint's data fingerprint) costs little more than for lists.
        chunk = 4096
        for first in range(0, len(self), chunk):
            last = min(first + chunk, len(self))
            start, end = int(self.offsets[first]), int(self.offsets[last])
            ids = self.tokens.read(start, end)
            all_ids = ids.tolist()
            all_labels = np.where(self.train.read(start, end) != 0, ids, IGNORE_INDEX).tolist()
            bounds = (self.offsets[first : last + 1] - start).tolist()
            for a, b in itertools.pairwise(bounds):
                yield Example(all_ids[a:b], all_labels[a:b])

    def max_token_id(self) -> int:
        """The largest token id, read in chunks (-1 when empty)."""
        top, step = -1, 1 << 22
        for start in range(0, self.tokens.count, step):
            chunk = self.tokens.read(start, min(start + step, self.tokens.count))
            top = max(top, int(chunk.max()))
        return top


class ExampleChain(_Examples):
    """Several example sequences read as one, without copying them into a list."""

    def __init__(self, *parts: Sequence[Example]) -> None:
        self.parts = [p for p in parts if len(p)]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def _example(self, index: int) -> Example:
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(f"example {index} past the last part")

    def __iter__(self) -> Iterator[Example]:
        for part in self.parts:
            yield from part


# ----------------------------------------------------------------------------------- writing


class _StoreWriter:
    """Appends examples to a store directory with tokenize_records' truncation and drop rules."""

    def __init__(self, directory: Path, max_seq_length: int) -> None:
        directory.mkdir(parents=True)
        self.directory = directory
        self.max_seq_length = max_seq_length
        self.stats = TokenStats()
        self.digest = hashlib.sha256()
        self.offsets = array("q", [0])
        self.trained = array("q")
        self._tokens = (directory / "tokens.i32").open("wb")
        self._train = (directory / "train.u8").open("wb")

    def add_batch(self, encoded: Sequence[tuple[list[int], list[bool]]]) -> None:
        ids_out: list[int] = []
        mask_out: list[bool] = []
        lengths: list[int] = []
        stats, limit = self.stats, self.max_seq_length
        for full_ids, full_mask in encoded:
            stats.records += 1
            input_ids, train_mask = full_ids, full_mask
            if len(input_ids) > limit:
                # Keep the beginning: prompts come first and the model needs them as context.
                input_ids, train_mask = input_ids[:limit], train_mask[:limit]
                stats.truncated += 1
            # Position 0 is never predicted (nothing precedes it), so it never counts.
            trained = sum(train_mask[1:])
            if trained == 0:
                stats.dropped += 1
                continue
            ids_out.extend(input_ids)
            mask_out.extend(train_mask)
            lengths.append(len(input_ids))
            self.trained.append(trained)
            self.offsets.append(self.offsets[-1] + len(input_ids))
            stats.examples += 1
            stats.total_tokens += len(input_ids)
            stats.trained_tokens += trained
            stats.max_length = max(stats.max_length, len(input_ids))
        if not lengths:
            return
        ids = np.asarray(ids_out, dtype=np.int64)
        mask = np.asarray(mask_out, dtype=np.bool_)
        labels = np.where(mask, ids, IGNORE_INDEX)
        # checkpoint.data_fingerprint over the same examples, without building them.
        start = 0
        for length in lengths:
            end = start + length
            self.digest.update(array("q", [length]).tobytes())
            self.digest.update(ids[start:end].tobytes())
            self.digest.update(labels[start:end].tobytes())
            start = end
        self._tokens.write(ids.astype(np.int32).tobytes())
        self._train.write(mask.astype(np.uint8).tobytes())

    def close(self) -> None:
        for fh in (self._tokens, self._train):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        (self.directory / "offsets.i64").write_bytes(self.offsets.tobytes())
        (self.directory / "trained.i64").write_bytes(self.trained.tobytes())
        meta = {
            "version": STORE_VERSION,
            "stats": asdict(self.stats),
            "fingerprint": self.digest.hexdigest(),
        }
        (self.directory / "meta.json").write_text(json.dumps(meta, indent=1))


def _batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_stores(
    records: Iterable[Record],
    route: Callable[[int], int],
    directories: Sequence[Path],
    *,
    tokenizer: PreTrainedTokenizerBase,
    fmt: RecordFormat,
    max_seq_length: int,
) -> int:
    """Tokenize validated records into one store per directory; route(i) picks the store of
    the i-th record. Returns the number of records read."""
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2 (got {max_seq_length})")
    bos = adds_bos(tokenizer)
    writers = [_StoreWriter(d, max_seq_length) for d in directories]
    seen = 0
    for batch in _batches(records, BATCH_RECORDS):
        layouts: list[Layout] = []
        for record in batch:
            try:
                layouts.append(layout_record(record.data, fmt, tokenizer, bos=bos))
            except TemplateError as exc:
                raise DatasetError(f"{record.location}: {exc}") from exc
        try:
            encoded = encode_layouts(layouts, tokenizer)
        except TemplateError as exc:  # no EOS token: the same for every record
            raise DatasetError(f"{batch[0].location}: {exc}") from exc
        routed: list[list[tuple[list[int], list[bool]]]] = [[] for _ in writers]
        for offset, enc in enumerate(encoded):
            routed[route(seen + offset)].append((enc.input_ids, enc.train_mask))
        for writer, items in zip(writers, routed, strict=True):
            writer.add_batch(items)
        seen += len(batch)
        del layouts, encoded, routed  # before the next batch is built, not after
    for writer in writers:
        writer.close()
    return seen


# ------------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CachedStores:
    train: TokenStore
    validation: TokenStore
    hit: bool
    directory: Path
    records: int


def _load(directory: Path) -> tuple[TokenStore, TokenStore, int] | None:
    try:
        done = json.loads((directory / "COMPLETE").read_text())
        return (
            TokenStore(directory / "train"),
            TokenStore(directory / "validation"),
            done["records"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if directory.exists():
            log.warning("tokenized cache %s is unreadable (%s): rebuilding it", directory, exc)
        return None


def cached_stores(
    cache_root: Path,
    key: str,
    build: Callable[[Path, Path], int],
) -> CachedStores:
    """The training and validation stores under cache_root/key, built by build(train_dir,
    validation_dir) -> records when missing or unreadable, atomically (temporary directory,
    then rename)."""
    directory = cache_root / key
    loaded = _load(directory)
    if loaded is not None:
        return CachedStores(*loaded[:2], hit=True, directory=directory, records=loaded[2])
    shutil.rmtree(directory, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{key}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        records = build(tmp / "train", tmp / "validation")
        (tmp / "COMPLETE").write_text(json.dumps({"records": records}))
        try:
            tmp.rename(directory)
        except OSError:  # another process of this node renamed its copy first: use that one
            if _load(directory) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loaded = _load(directory)
    if loaded is None:
        raise OSError(f"tokenized cache {directory} cannot be read back after writing it")
    # Older versions of the same data (other keys) are left for a run with other settings.
    return CachedStores(*loaded[:2], hit=False, directory=directory, records=loaded[2])


class RecordStream:
    """Validated records (scan_records) read again from disk each time they are iterated;
    with `selected`, only the records whose position has selected[i] == want."""

    def __init__(
        self, scan: DataScan, selected: NDArray[np.bool_] | None = None, *, want: bool = True
    ) -> None:
        self.scan, self.selected, self.want = scan, selected, want

    @property
    def path(self) -> Path:
        return self.scan.path

    def keeps(self, index: int) -> bool:
        return self.selected is None or bool(self.selected[index]) == self.want

    def __len__(self) -> int:
        if self.selected is None:
            return self.scan.count
        chosen = int(self.selected.sum())
        return chosen if self.want else self.scan.count - chosen

    def __iter__(self) -> Iterator[Record]:
        for i, record in enumerate(iter_records(self.scan.path)):
            if self.keeps(i):
                yield record


def split_stream(scan: DataScan, fraction: float, seed: int) -> tuple[RecordStream, RecordStream]:
    """split_train_validation for a scanned dataset: the same two parts, streamed."""
    selected = np.zeros(scan.count, dtype=np.bool_)
    selected[validation_indices(scan.count, fraction, seed)] = True
    return RecordStream(scan, selected, want=False), RecordStream(scan, selected, want=True)


def tokenized_stores(
    train: RecordStream,
    validation: RecordStream | None,
    *,
    cache_root: Path,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_dir: Path,
    fmt: RecordFormat,
    max_seq_length: int,
    split: dict[str, Any] | None = None,
) -> CachedStores:
    """Training and validation TokenStores for the records, from the cache when it has them.

    `validation` is either a split of the same file as `train` (split_stream; `split` then
    names the fraction and seed) or a stream of its own file, or None."""
    # A split of one file (split_stream), or two files read one after the other.
    same_file = validation is not None and validation.selected is not None
    key = cache_key(
        {
            "train": data_identity(train.path),
            "validation": None
            if validation is None
            else ("split", split)
            if same_file
            else data_identity(validation.path),
            "tokenizer": tokenizer_identity(tokenizer_dir, tokenizer),
            "format": fmt,
            "max_seq_length": max_seq_length,
        }
    )

    def build(train_dir: Path, validation_dir: Path) -> int:
        args: dict[str, Any] = {
            "tokenizer": tokenizer,
            "fmt": fmt,
            "max_seq_length": max_seq_length,
        }
        if same_file:
            assert validation is not None
            return write_stores(
                iter_records(train.path),
                lambda i: 0 if train.keeps(i) else 1,
                [train_dir, validation_dir],
                **args,
            )
        records = write_stores(iter(train), lambda i: 0, [train_dir], **args)
        return records + write_stores(iter(validation or ()), lambda i: 0, [validation_dir], **args)

    return cached_stores(cache_root, key, build)
