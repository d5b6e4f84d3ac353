"""Load and validate training records before any GPU work.

A bad record should fail the job in seconds on the CPU with a message that points at the
file, the line and the field, not an hour later inside the training loop.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, get_args

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

RecordFormat = Literal[
    "chat", "instruction", "prompt-completion", "text", "preference", "prompt-chosen-rejected"
]
FormatOption = Literal[
    "auto",
    "chat",
    "instruction",
    "prompt-completion",
    "text",
    "preference",
    "prompt-chosen-rejected",
]

RECORD_FORMATS: Final[tuple[RecordFormat, ...]] = get_args(RecordFormat)
# Pairs of a better and a worse answer to one prompt (objective dpo); the others are SFT formats.
PREFERENCE_FORMATS: Final[frozenset[str]] = frozenset({"preference", "prompt-chosen-rejected"})
CHAT_ROLES: Final[tuple[str, ...]] = ("system", "user", "assistant")
DATA_SUFFIXES: Final[frozenset[str]] = frozenset({".jsonl", ".json", ".parquet"})
MAX_REPORTED_ERRORS: Final = 5

_T = TypeVar("_T")


class DatasetError(ValueError):
    """The dataset cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Record:
    """One training record and where it came from (for error messages)."""

    data: Mapping[str, Any]
    source: str
    # 1-based: the line number for JSONL, the record index for JSON and Parquet.
    line: int

    @property
    def location(self) -> str:
        return format_location(self.source, self.line)


@dataclass(frozen=True)
class Dataset:
    """Validated records, all in one format."""

    records: list[Record]
    format: RecordFormat


def format_location(source: str, line: int) -> str:
    # JSONL has real lines; JSON arrays and Parquet tables only have record positions.
    unit = "line" if source.endswith(".jsonl") else "record"
    return f"{source} {unit} {line}"


def data_files(path: str | Path) -> list[Path]:
    """One file, or the data files under a directory sorted by relative path."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DatasetError(f"{root}: no such file or directory")
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix in DATA_SUFFIXES
            # Skip hidden files and folders (editor swap files, .cache from downloads).
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DatasetError(f"{root}: no .jsonl, .json or .parquet files")
    return files


def _display_name(file: Path, root: Path) -> str:
    return file.name if root.is_file() else file.relative_to(root).as_posix()


def _json_type(value: object) -> str:
    names: dict[type, str] = {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _not_utf8(name: str, line: int, data: bytes, offset: int) -> DatasetError:
    """The byte at `offset` of `data` (which starts at line `line`) is not UTF-8."""
    line += data.count(b"\n", 0, offset)
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return DatasetError(
        f"{name} line {line}: not valid UTF-8 (byte 0x{data[offset : offset + 1].hex()} at "
        f"column {column}): save the file as UTF-8"
    )


def _read_jsonl(file: Path, name: str) -> Iterator[Record | DatasetError]:
    # Bytes, decoded line by line: a line in another encoding is a DatasetError with its line
    # number, not a UnicodeDecodeError from deep inside the file reader.
    with file.open("rb") as fh:
        for number, data in enumerate(fh, start=1):
            try:
                raw = data.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield _not_utf8(name, number, data, exc.start)
                continue
            if not raw.strip():
                continue  # blank lines (often a trailing newline) are not records
            try:
                # Without the line break, so the decoder's message is about the record.
                value = json.loads(raw.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                yield DatasetError(f"{name} line {number}: invalid JSON: {exc}")
                continue
            if not isinstance(value, dict):
                yield DatasetError(
                    f"{name} line {number}: expected a JSON object (got {_json_type(value)})"
                )
                continue
            yield Record(value, name, number)


def _read_json(file: Path, name: str) -> Iterator[Record | DatasetError]:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield _not_utf8(name, 1, data, exc.start)
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        yield DatasetError(f"{name}: invalid JSON: {exc}")
        return
    if not isinstance(value, list):
        yield DatasetError(f"{name}: expected a JSON array of objects (got {_json_type(value)})")
        return
    for index, item in enumerate(value, start=1):
        if isinstance(item, dict):
            yield Record(item, name, index)
        else:
            yield DatasetError(
                f"{name} record {index}: expected an object (got {_json_type(item)})"
            )


def _read_parquet(file: Path, name: str) -> Iterator[Record | DatasetError]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - heavy import, only for Parquet inputs

    # Row groups a batch at a time, so a large file is never all in memory as Python objects.
    index = 0
    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
        for batch in batches:
            for row in batch.to_pylist():
                index += 1
                yield Record(row, name, index)
    except Exception as exc:  # pyarrow raises several unrelated types
        yield DatasetError(f"{name}: cannot read Parquet: {exc}")


def read_records(path: str | Path) -> Iterator[Record | DatasetError]:
    """Yield raw records (or the read error for that position) in file order."""
    root = Path(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    for file in data_files(root):
        reader = readers.get(file.suffix)
        if reader is None:
            raise DatasetError(f"{file}: unsupported file type (use .jsonl, .json or .parquet)")
        yield from reader(file, _display_name(file, root))


def _check_string(data: Mapping[str, Any], key: str, *, non_empty: bool) -> str | None:
    if key not in data or data[key] is None:
        return f"{key} is required"
    value = data[key]
    if not isinstance(value, str):
        return f"{key} must be a string (got {_json_type(value)})"
    if non_empty and not value.strip():
        return f"{key} must not be empty"
    return None


def _check_messages(messages: Any, name: str) -> str | None:
    """A non-empty list of {role, content} messages (system first only)."""
    if messages is None:
        return f"{name} is required"
    if not isinstance(messages, list):
        return f"{name} must be an array (got {_json_type(messages)})"
    if not messages:
        return f"{name} must not be empty"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{name}[{i}] must be an object (got {_json_type(message)})"
        role = message.get("role")
        if role not in CHAT_ROLES:
            got = json.dumps(role) if isinstance(role, str) else _json_type(role)
            return f"{name}[{i}].role must be one of {', '.join(CHAT_ROLES)} (got {got})"
        if role == "system" and i != 0:
            return f"{name}[{i}].role system is only allowed as the first message"
        content = message.get("content")
        if not isinstance(content, str):
            return f"{name}[{i}].content must be a string (got {_json_type(content)})"
    return None


def _check_chat(data: Mapping[str, Any]) -> str | None:
    messages: Any = data.get("messages")
    error = _check_messages(messages, "messages")
    if error is None and not any(m["role"] == "assistant" for m in messages):
        return "messages must contain at least one assistant message"
    return error


def _check_answer(value: Any, name: str) -> str | None:
    """One assistant message with non-empty content, as a one-element list."""
    error = _check_messages(value, name)
    if error is not None:
        return error
    if len(value) != 1 or value[0]["role"] != "assistant":
        return f"{name} must hold exactly one assistant message"
    if not value[0]["content"].strip():
        return f"{name}[0].content must not be empty"
    return None


def _answer_text(value: Any) -> str:
    return str(value[0]["content"]) if isinstance(value, list) else str(value)


def _check_distinct(data: Mapping[str, Any], chosen: str, rejected: str) -> str | None:
    if _answer_text(data[chosen]).strip() == _answer_text(data[rejected]).strip():
        return (
            f"{chosen} and {rejected} are the same answer: a pair must say which of two "
            "different answers is better"
        )
    return None


def _check_preference(data: Mapping[str, Any]) -> str | None:
    """The hosted fine-tuning API's preference layout."""
    given = data.get("input")
    if given is None:
        return "input is required"
    if not isinstance(given, dict):
        return f"input must be an object (got {_json_type(given)})"
    messages: Any = given.get("messages")
    error = _check_messages(messages, "input.messages")
    if error is not None:
        return error
    if messages[-1]["role"] == "assistant":
        return "input.messages must end with a user or system message (the answers follow it)"
    return (
        _check_answer(data.get("preferred_output"), "preferred_output")
        or _check_answer(data.get("non_preferred_output"), "non_preferred_output")
        or _check_distinct(data, "preferred_output", "non_preferred_output")
    )


def _check_prompt_chosen_rejected(data: Mapping[str, Any]) -> str | None:
    """prompt, chosen, rejected: all plain strings, or all message lists."""
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        error = _check_messages(prompt, "prompt")
        if error is None and prompt[-1]["role"] == "assistant":
            error = "prompt must end with a user or system message (the answers follow it)"
        return (
            error
            or _check_answer(data.get("chosen"), "chosen")
            or _check_answer(data.get("rejected"), "rejected")
            or _check_distinct(data, "chosen", "rejected")
        )
    if isinstance(data.get("chosen"), list) or isinstance(data.get("rejected"), list):
        return "prompt must be a message list when chosen and rejected are message lists"
    return (
        _check_string(data, "prompt", non_empty=False)
        or _check_string(data, "chosen", non_empty=True)
        or _check_string(data, "rejected", non_empty=True)
        or _check_distinct(data, "chosen", "rejected")
    )


def _check_instruction(data: Mapping[str, Any]) -> str | None:
    error = _check_string(data, "instruction", non_empty=True)
    if error is None and data.get("input") is not None:
        error = _check_string(data, "input", non_empty=False)
    return error or _check_string(data, "output", non_empty=True)


def _check_prompt_completion(data: Mapping[str, Any]) -> str | None:
    return _check_string(data, "prompt", non_empty=False) or _check_string(
        data, "completion", non_empty=False
    )


def _check_text(data: Mapping[str, Any]) -> str | None:
    return _check_string(data, "text", non_empty=True)


_CHECKS = {
    "chat": _check_chat,
    "instruction": _check_instruction,
    "prompt-completion": _check_prompt_completion,
    "text": _check_text,
    "preference": _check_preference,
    "prompt-chosen-rejected": _check_prompt_chosen_rejected,
}


def validate_record(data: Mapping[str, Any], fmt: RecordFormat) -> str | None:
    """The first problem with one record as "field: problem", or None if it is valid."""
    return _CHECKS[fmt](data)


def guess_format(data: Mapping[str, Any]) -> RecordFormat | None:
    """The format a record's keys suggest (most specific first), ignoring value checks."""
    if "preferred_output" in data or "non_preferred_output" in data:
        return "preference"
    if "chosen" in data or "rejected" in data:
        return "prompt-chosen-rejected"
    if "messages" in data:
        return "chat"
    if "instruction" in data or "output" in data:
        return "instruction"
    if "prompt" in data or "completion" in data:
        return "prompt-completion"
    if "text" in data:
        return "text"
    return None


def _record_error(record: Record, fmt: RecordFormat, origin: str | None) -> str | None:
    problem = validate_record(record.data, fmt)
    if problem is None:
        return None
    looks_like = guess_format(record.data)
    if (
        looks_like is not None
        and looks_like != fmt
        and validate_record(record.data, looks_like) is None
    ):
        # A valid record of another format: say so instead of "messages is required".
        detected = f" (detected from {origin})" if origin else ""
        return (
            f"{record.location}: mixed formats: this record is in {looks_like} format "
            f"but the dataset format is {fmt}{detected}"
        )
    return f"{record.location}: {problem}"


class _Validator:
    """Validate records one at a time, in file order, with load_records' messages.

    Memory stays flat: only the records before the first valid one are held (their messages
    depend on the format that record decides), plus the first few error messages.
    """

    def __init__(self, fmt: FormatOption) -> None:
        if fmt != "auto" and fmt not in RECORD_FORMATS:
            raise DatasetError(f"unknown dataset format {fmt!r}")
        self.resolved: RecordFormat | None = None if fmt == "auto" else fmt
        self.origin: str | None = None
        self.pending: list[Record | DatasetError] = []
        self.errors: list[str] = []
        self.error_count = 0
        self.count = 0
        self.first: Record | None = None

    def _error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(message)

    def _check(self, item: Record | DatasetError) -> Record | None:
        if isinstance(item, DatasetError):
            self._error(str(item))
            return None
        if self.resolved is not None and (error := _record_error(item, self.resolved, self.origin)):
            self._error(error)
            return None
        return item

    def feed(self, item: Record | DatasetError) -> Iterator[Record]:
        """The records now known to be valid (pending ones once the format is decided)."""
        if isinstance(item, Record):
            self.count += 1
            if self.first is None:
                self.first = item
            if self.resolved is None:
                guess = guess_format(item.data)
                if guess is not None and validate_record(item.data, guess) is None:
                    self.resolved, self.origin = guess, item.location
        if self.resolved is None:
            self.pending.append(item)
            return
        if self.pending:
            pending, self.pending = self.pending, []
            for held in pending:
                if (record := self._check(held)) is not None:
                    yield record
        if (record := self._check(item)) is not None:
            yield record

    def finish(self, path: str | Path) -> RecordFormat:
        """Raise the collected errors (or an empty/undetectable dataset); else the format."""
        if self.resolved is None:
            # No valid record at all: validate against what the keys suggest so the error
            # names the broken field rather than just "cannot detect the format".
            self.resolved = next(
                (g for r in self.pending if isinstance(r, Record) and (g := guess_format(r.data))),
                None,
            )
        pending, self.pending = self.pending, []
        for held in pending:
            if self.resolved is None:
                if isinstance(held, DatasetError):
                    self._error(str(held))
            else:
                self._check(held)
        if self.error_count:
            # One record per line in the log; the semicolons keep them apart in the one-line
            # termination message (and so in status.message), which collapses line breaks.
            shown = ";\n  ".join(self.errors)
            more = self.error_count - len(self.errors)
            tail = f";\n  ... and {more} more" if more else ""
            raise DatasetError(f"{path}: {self.error_count} invalid record(s):\n  {shown}{tail}")
        if self.first is None:
            raise DatasetError(f"{path}: the dataset is empty (no records)")
        if self.resolved is None:
            first = self.first
            keys = ", ".join(sorted(first.data)) or "none"
            raise DatasetError(
                f"{first.location}: cannot detect the dataset format: no record is a valid chat "
                f"(messages), instruction (instruction, output), prompt-completion (prompt, "
                f"completion), text (text), preference (input, preferred_output, "
                f"non_preferred_output) or prompt-chosen-rejected (prompt, chosen, rejected) "
                f"record; first record keys: {keys}"
            )
        return self.resolved


def load_records(path: str | Path, fmt: FormatOption = "auto") -> Dataset:
    """Read and validate every record; raise DatasetError listing the first few problems.

    With fmt="auto" the format comes from the first valid record's keys and every other
    record must then be of that format.
    """
    validator = _Validator(fmt)
    records = [record for item in read_records(path) for record in validator.feed(item)]
    return Dataset(records, validator.finish(path))


@dataclass(frozen=True)
class DataScan:
    """What a validating pass over a dataset learned, without keeping its records."""

    path: Path
    format: RecordFormat
    count: int  # records (all valid)
    first_location: str


def scan_records(path: str | Path, fmt: FormatOption = "auto") -> DataScan:
    """Validate every record as load_records does (same errors), holding none of them."""
    validator = _Validator(fmt)
    for item in read_records(path):
        for _ in validator.feed(item):
            pass
    resolved = validator.finish(path)
    assert validator.first is not None  # finish() raises on an empty dataset
    return DataScan(Path(path), resolved, validator.count, validator.first.location)


def iter_records(path: str | Path) -> Iterator[Record]:
    """The records of a dataset scan_records accepted, in file order, one at a time."""
    for item in read_records(path):
        if isinstance(item, DatasetError):  # the data changed since it was scanned
            raise item
        yield item


def split_train_validation(
    records: Sequence[_T], fraction: float, seed: int = 0
) -> tuple[list[_T], list[_T]]:
    """Deterministic random split; keeps source order inside each part.

    With >= 2 records the validation part gets at least one record and the training part
    keeps at least one.
    """
    chosen = set(validation_indices(len(records), fraction, seed))
    train = [r for i, r in enumerate(records) if i not in chosen]
    validation = [r for i, r in enumerate(records) if i in chosen]
    return train, validation


def validation_indices(n: int, fraction: float, seed: int = 0) -> list[int]:
    """The record positions split_train_validation puts in the validation part."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be between 0 and 1 (got {fraction})")
    if n < 2:
        return []
    n_val = min(n - 1, max(1, round(n * fraction)))
    return random.Random(seed).sample(range(n), n_val)
