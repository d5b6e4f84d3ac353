"""Loading and validating training records: formats, error locations, the split."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune_trainer.data.records import (
    DatasetError,
    load_records,
    split_train_validation,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    WriteFile = Callable[[str, str | bytes], Path]

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
}
INSTRUCTION = {"instruction": "Add.", "input": "1 2", "output": "3"}
PROMPT_COMPLETION = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "plain text"}


def jsonl(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def load_error(path: Path, fmt: Any = "auto") -> str:
    with pytest.raises(DatasetError) as info:
        load_records(path, fmt)
    return str(info.value)


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (CHAT, "chat"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "chat",
        ),
        (INSTRUCTION, "instruction"),
        ({"instruction": "Say hi.", "output": "hi"}, "instruction"),
        ({"instruction": "Say hi.", "input": None, "output": "hi"}, "instruction"),
        (PROMPT_COMPLETION, "prompt-completion"),
        (TEXT, "text"),
    ],
)
def test_each_format_is_detected_and_loaded(
    write_file: WriteFile, record: dict[str, Any], fmt: str
) -> None:
    path = write_file("train.jsonl", jsonl(record, record))
    dataset = load_records(path)
    assert dataset.format == fmt
    assert [r.data for r in dataset.records] == [record, record]
    assert [(r.source, r.line) for r in dataset.records] == [("train.jsonl", 1), ("train.jsonl", 2)]
    assert load_records(path, fmt).format == fmt  # explicit format accepted too


def test_json_array_and_parquet_are_read_with_record_indexes(write_file: WriteFile) -> None:
    json_path = write_file("train.json", json.dumps([INSTRUCTION, INSTRUCTION]))
    dataset = load_records(json_path)
    assert dataset.format == "instruction"
    assert [(r.source, r.line) for r in dataset.records] == [("train.json", 1), ("train.json", 2)]

    parquet_path = json_path.with_name("chat.parquet")
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT, CHAT]), parquet_path)
    dataset = load_records(parquet_path)
    assert dataset.format == "chat"
    assert dataset.records[2].data == CHAT  # list-of-struct column comes back as dicts
    assert dataset.records[2].location == "chat.parquet record 3"


def test_directory_is_read_in_name_order_and_blank_lines_are_skipped(
    write_file: WriteFile, tmp_path: Path
) -> None:
    write_file("data/b.jsonl", jsonl({"text": "b1"}))
    write_file("data/a.jsonl", "\n" + jsonl({"text": "a1"}) + "   \n" + jsonl({"text": "a2"}))
    write_file("data/sub/c.json", json.dumps([{"text": "c1"}]))
    write_file("data/.hidden.jsonl", "not json")
    write_file("data/README.md", "ignored")
    dataset = load_records(tmp_path / "data")
    assert [(r.data["text"], r.location) for r in dataset.records] == [
        ("a1", "a.jsonl line 2"),
        ("a2", "a.jsonl line 4"),
        ("b1", "b.jsonl line 1"),
        ("c1", "sub/c.json record 1"),
    ]


@pytest.mark.parametrize(
    ("content", "fmt", "expected"),
    [
        pytest.param(
            jsonl(TEXT) + '{"text": "unterminated\n',
            "auto",
            "train.jsonl line 2: invalid JSON: Unterminated string starting at: line 1 column 10",
            id="bad-json",
        ),
        pytest.param(
            jsonl(INSTRUCTION, INSTRUCTION, {"instruction": "x"}),
            "auto",
            "train.jsonl line 3: output is required",
            id="missing-field",
        ),
        pytest.param(
            jsonl(
                CHAT,
                {"messages": [*CHAT["messages"][:2], {"role": "bot", "content": "x"}]},
            ),
            "auto",
            "train.jsonl line 2: messages[2].role must be one of system, user, assistant "
            '(got "bot")',
            id="wrong-role",
        ),
        pytest.param(
            jsonl({"messages": [{"role": "user", "content": "q"}]}),
            "auto",
            "train.jsonl line 1: messages must contain at least one assistant message",
            id="no-assistant",
        ),
        pytest.param(
            jsonl(CHAT, {"messages": [{"role": "user", "content": 5}]}),
            "chat",
            "train.jsonl line 2: messages[0].content must be a string (got number)",
            id="content-type",
        ),
        pytest.param(
            jsonl(PROMPT_COMPLETION, {"prompt": "a", "completion": ["b"]}),
            "auto",
            "train.jsonl line 2: completion must be a string (got array)",
            id="completion-type",
        ),
        pytest.param(
            jsonl(CHAT, {"messages": "hi"}),
            "auto",
            "train.jsonl line 2: messages must be an array (got string)",
            id="messages-type",
        ),
        pytest.param(
            jsonl(
                CHAT, {"messages": [CHAT["messages"][1], CHAT["messages"][0], CHAT["messages"][2]]}
            ),
            "auto",
            "train.jsonl line 2: messages[1].role system is only allowed as the first message",
            id="late-system",
        ),
        pytest.param(
            jsonl(INSTRUCTION, {"instruction": "  ", "output": "x"}),
            "auto",
            "train.jsonl line 2: instruction must not be empty",
            id="empty-instruction",
        ),
        pytest.param(
            jsonl(CHAT, CHAT, INSTRUCTION),
            "auto",
            "train.jsonl line 3: mixed formats: this record is in instruction format but the "
            "dataset format is chat (detected from train.jsonl line 1)",
            id="mixed-formats",
        ),
        pytest.param(
            jsonl(TEXT),
            "chat",
            "train.jsonl line 1: mixed formats: this record is in text format but the dataset "
            "format is chat",
            id="explicit-format-mismatch",
        ),
        pytest.param(
            jsonl(TEXT) + "[1, 2]\n",
            "auto",
            "train.jsonl line 2: expected a JSON object (got array)",
            id="not-an-object",
        ),
        pytest.param("", "auto", "the dataset is empty", id="empty-file"),
        pytest.param("\n\n  \n", "auto", "the dataset is empty", id="only-blank-lines"),
        pytest.param(
            jsonl({"question": "q", "answer": "a"}),
            "auto",
            "train.jsonl line 1: cannot detect the dataset format",
            id="unknown-keys",
        ),
    ],
)
def test_malformed_records_name_file_line_and_field(
    write_file: WriteFile, content: str, fmt: str, expected: str
) -> None:
    message = load_error(write_file("train.jsonl", content), fmt)
    assert expected in message


def test_json_file_errors_use_record_indexes(write_file: WriteFile) -> None:
    message = load_error(write_file("train.json", json.dumps([TEXT, {"text": 3}, "x"])))
    assert "train.json record 2: text must be a string (got number)" in message
    assert "train.json record 3: expected an object (got string)" in message
    message = load_error(write_file("other.json", json.dumps({"text": "x"})))
    assert "other.json: expected a JSON array of objects (got object)" in message


def test_first_five_errors_are_listed_in_file_order(write_file: WriteFile) -> None:
    rows = [TEXT] + [{"text": ""}] * 6 + ["{broken"]
    content = "".join(r if isinstance(r, str) else json.dumps(r) for r in rows[:1]) + "\n"
    content += "".join(json.dumps(r) + "\n" for r in rows[1:7]) + "{broken\n"
    message = load_error(write_file("train.jsonl", content))
    assert "7 invalid record(s)" in message
    listed = [line.strip() for line in message.splitlines()[1:]]
    assert listed == [
        "train.jsonl line 2: text must not be empty;",
        "train.jsonl line 3: text must not be empty;",
        "train.jsonl line 4: text must not be empty;",
        "train.jsonl line 5: text must not be empty;",
        "train.jsonl line 6: text must not be empty;",
        "... and 2 more",
    ]


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    assert "no such file or directory" in load_error(tmp_path / "nope.jsonl")
    (tmp_path / "empty").mkdir()
    assert "no .jsonl, .json or .parquet files" in load_error(tmp_path / "empty")


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_split_is_deterministic_disjoint_and_never_empty(n: int) -> None:
    items = list(range(n))
    train, validation = split_train_validation(items, 0.1, seed=7)
    assert (train, validation) == split_train_validation(items, 0.1, seed=7)
    assert sorted(train + validation) == items
    assert len(validation) == max(1, round(n * 0.1))
    assert train and validation
    assert train == sorted(train)  # source order kept inside each part
    assert validation == sorted(validation)


def test_split_depends_on_seed_and_handles_tiny_datasets() -> None:
    items = list(range(50))
    assert split_train_validation(items, 0.2, seed=1) != split_train_validation(items, 0.2, seed=2)
    assert split_train_validation([1], 0.5) == ([1], [])
    assert split_train_validation([1, 2], 0.99, seed=0)[0]  # training keeps one record
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="between 0 and 1"):
            split_train_validation(items, fraction)


def test_a_line_that_is_not_utf8_fails_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    good = json.dumps({"text": "ok"}).encode() + b"\n"
    path.write_bytes(good * 3 + '{"text": "caf\xe9"}\n'.encode("latin-1") + good)
    with pytest.raises(
        DatasetError, match=r"train.jsonl line 4: not valid UTF-8 \(byte 0xe9 at column 14\)"
    ):
        load_records(path, "auto")


def test_a_json_file_that_is_not_utf8_fails_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]\n')
    with pytest.raises(DatasetError, match=r"train.json line 3: not valid UTF-8"):
        load_records(path, "auto")


def test_a_byte_order_mark_is_not_a_broken_first_record(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "ok"}).encode() + b"\n")
    assert len(load_records(path, "auto").records) == 1
