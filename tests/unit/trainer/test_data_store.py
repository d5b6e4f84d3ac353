"""Streaming SFT data (data/store.py): records validated and tokenized into memory-mapped
arrays, cached in the work dir, and planned from arrays, with exactly the examples, packing and
batches of the in-memory path (load_records + tokenize_records + lists)."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from kubetune_trainer.checkpoint import data_fingerprint
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import (
    collate_packed,
    collate_padded,
    load_records,
    store,
    tokenize_records,
)
from kubetune_trainer.data.packing import pack_rows, pack_rows_compact, packing_efficiency
from kubetune_trainer.data.records import DatasetError, scan_records, split_train_validation
from kubetune_trainer.data.store import (
    ExampleChain,
    RecordStream,
    TokenStore,
    split_stream,
    tokenized_stores,
)
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.plan import TrainingPlan
from kubetune_trainer.recipe import FineTuneRecipe

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerFast

WORDS = [
    "the",
    "model",
    "learns",
    "to",
    "answer",
    "questions",
    "about",
    "pods",
    "jobs",
    "and",
    "gpus",
    "quickly",
]


def text(rng: random.Random, lo: int = 1, hi: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def record(fmt: str, rng: random.Random) -> dict[str, Any]:
    if fmt == "chat":
        messages = [{"role": "system", "content": text(rng)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 2)):
            messages += [
                {"role": "user", "content": text(rng)},
                {"role": "assistant", "content": text(rng)},
            ]
        return {"messages": messages}
    if fmt == "instruction":
        extra = {"input": text(rng)} if rng.random() < 0.4 else {}
        return {"instruction": text(rng), "output": text(rng), **extra}
    if fmt == "prompt-completion":
        return {"prompt": text(rng, 0, 40), "completion": text(rng)}
    return {"text": text(rng)}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    return path


def stores_for(
    path: Path,
    tokenizer: Any,
    cache: Path,
    *,
    max_len: int = 64,
    fraction: float = 0.2,
    seed: int = 3,
) -> Any:
    scan = scan_records(path)
    train, validation = split_stream(scan, fraction, seed)
    return tokenized_stores(
        train,
        validation,
        cache_root=cache,
        tokenizer=tokenizer,
        tokenizer_dir=cache.parent / "tok",
        fmt=scan.format,
        max_seq_length=max_len,
        split={"fraction": fraction, "seed": seed},
    )


@pytest.mark.parametrize(
    ("fmt", "template"),
    [("chat", False), ("chat", True), ("instruction", False), ("prompt-completion", False),
     ("text", False)],
)  # fmt: skip
def test_stores_hold_exactly_the_examples_batches_and_fingerprint_of_the_in_memory_path(
    fmt: str, template: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue("chat_tokenizer" if template else "tokenizer")
    rng = random.Random(7)
    path = write_jsonl(tmp_path / "train.jsonl", [record(fmt, rng) for _ in range(300)])
    # Short enough that some examples are truncated (and some, with a long prompt, lose every
    # trained token and are dropped); the Alpaca prompt alone is about 80 tokens here.
    max_len = 200 if fmt == "instruction" else 24
    stores = stores_for(path, tokenizer, tmp_path / "cache", max_len=max_len)
    dataset = load_records(path)
    train_records, validation_records = split_train_validation(dataset.records, 0.2, seed=3)
    old_train = tokenize_records(train_records, tokenizer, dataset.format, max_len)
    old_validation = tokenize_records(validation_records, tokenizer, dataset.format, max_len)
    assert old_train.stats.truncated > 0
    assert list(stores.train) == list(old_train)
    assert list(stores.validation) == list(old_validation)
    assert stores.train.stats == old_train.stats
    assert stores.validation.stats == old_validation.stats
    assert stores.train.fingerprint == data_fingerprint(old_train)
    assert stores.records == 300
    assert stores.train.trained.tolist() == [e.num_trained for e in old_train]

    # The same plan and the same model inputs, step by step, packed and padded.
    for packing in (True, False):
        plans = [
            TrainingPlan(lengths, 2 * max_len, 3, 2, seed=11, epochs=2, packing=packing)
            for lengths in ([len(e) for e in old_train], stores.train.lengths)
        ]
        assert plans[0].total_steps == plans[1].total_steps
        for step in range(plans[0].total_steps):
            old, new = (p.step_batches(step) for p in plans)
            assert old == new
            for batch in old.batches:
                if packing:
                    a = collate_packed([[old_train[i] for i in row] for row in batch], 2)
                    b = collate_packed([[stores.train[i] for i in row] for row in batch], 2)
                else:
                    a = collate_padded([old_train[row[0]] for row in batch], 2)
                    b = collate_padded([stores.train[row[0]] for row in batch], 2)
                assert torch.equal(a.input_ids, b.input_ids)
                assert torch.equal(a.labels, b.labels)
                assert torch.equal(a.attention_mask, b.attention_mask)
        assert plans[1].row_fill(0) == pytest.approx(
            packing_efficiency(
                [r for b in plans[0].epoch_batches(0) for r in b], [len(e) for e in old_train]
            )
        )


def test_compact_packing_and_plans_equal_the_list_ones_for_any_lengths() -> None:
    rng = random.Random(0)
    for trial in range(20):
        lengths = [rng.choice([0, 1, 2, rng.randint(1, 64)]) for _ in range(rng.randint(1, 400))]
        lengths[0] = max(1, lengths[0])
        members, starts = pack_rows_compact(np.array(lengths), 64, seed=trial)
        rows = [members[starts[r] : starts[r + 1]].tolist() for r in range(len(starts) - 1)]
        assert rows == pack_rows(lengths, 64, seed=trial)
        for packing in (True, False):
            for world_size in (1, 2):
                args: dict[str, Any] = {
                    "max_seq_length": 64,
                    "batch_size": rng.randint(1, 4),
                    "gradient_accumulation_steps": rng.randint(1, 3),
                    "seed": trial,
                    "epochs": 2.5,
                    "packing": packing,
                    "world_size": world_size,
                }
                try:
                    old = TrainingPlan(lengths, **args)
                except ConfigError:
                    with pytest.raises(ConfigError):
                        TrainingPlan(np.array(lengths, dtype=np.int64), **args)
                    continue
                new = TrainingPlan(np.array(lengths, dtype=np.int64), **args)
                assert new.total_steps == old.total_steps
                assert [new.step_batches(s) for s in range(new.total_steps)] == [
                    old.step_batches(s) for s in range(old.total_steps)
                ]


@pytest.mark.parametrize("compact", [False, True])
def test_fewer_micro_batches_than_processes_fails_before_training_naming_the_numbers(
    compact: bool,
) -> None:
    lengths: Any = [30] * 5  # 5 rows of 64 tokens (two examples do not fit one row)
    if compact:
        lengths = np.array(lengths, dtype=np.int64)
    with pytest.raises(ConfigError) as error:
        TrainingPlan(lengths, 40, 2, 1, seed=0, epochs=1, world_size=4)
    message = str(error.value)
    assert "3 micro-batch(es) of batchSize=2 packed rows" in message
    assert "the 4 processes" in message
    assert "batchSize to 1" in message and "at most 3 process(es)" in message
    assert "add training data" in message
    TrainingPlan(lengths, 40, 1, 1, seed=0, epochs=1, world_size=4)  # batchSize 1: 5 >= 4


def test_a_second_build_is_a_cache_hit_that_never_calls_the_tokenizer(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(1)
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [record("chat", rng) for _ in range(50)])
    tokenizer.save_pretrained(tmp_path / "tok")
    first = stores_for(path, tokenizer, tmp_path / "cache")
    assert not first.hit

    def no_tokenizing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the tokenizer ran on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(type(tokenizer), "__call__", no_tokenizing)
        m.setattr(type(tokenizer), "apply_chat_template", no_tokenizing)
        m.setattr(store, "encode_layouts", no_tokenizing)
        m.setattr(store, "layout_record", no_tokenizing)
        again = stores_for(path, tokenizer, tmp_path / "cache")
    assert again.hit and again.directory == first.directory
    assert list(again.train) == list(first.train) and again.records == 50

    # Every input of tokenization is in the key: each change is a miss, in a directory of its own.
    keys = {first.directory}
    for changed in (
        stores_for(path, tokenizer, tmp_path / "cache", max_len=32),
        stores_for(path, tokenizer, tmp_path / "cache", fraction=0.3),
        stores_for(path, tokenizer, tmp_path / "cache", seed=4),
    ):
        assert not changed.hit
        keys.add(changed.directory)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(tmp_path / "tok")  # the tokenizer's files change too
    tokenizer.chat_template = None
    changed = stores_for(path, tokenizer, tmp_path / "cache")
    assert not changed.hit
    keys.add(changed.directory)
    with path.open("a") as fh:  # one more record
        fh.write(json.dumps(record("chat", rng)) + "\n")
    changed = stores_for(path, tokenizer, tmp_path / "cache")
    assert not changed.hit
    assert changed.records == 51
    keys.add(changed.directory)
    assert len(keys) == 6
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no temporary directory left


@pytest.mark.parametrize(
    "damage",
    ["truncate tokens", "drop the completion marker", "garble meta", "remove offsets"],
)
def test_a_corrupt_or_partial_cache_is_rebuilt(
    damage: str, tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    rng = random.Random(2)
    path = write_jsonl(tmp_path / "train.jsonl", [record("text", rng) for _ in range(40)])
    built = stores_for(path, tokenizer, tmp_path / "cache")
    expected = list(built.train)
    store = built.directory / "train"
    if damage == "truncate tokens":
        data = (store / "tokens.i32").read_bytes()
        (store / "tokens.i32").write_bytes(data[: len(data) // 2])
    elif damage == "drop the completion marker":  # as a crash before the rename would leave
        (built.directory / "COMPLETE").unlink()
    elif damage == "garble meta":
        (store / "meta.json").write_text("{")
    else:
        (store / "offsets.i64").unlink()
    rebuilt = stores_for(path, tokenizer, tmp_path / "cache")
    assert not rebuilt.hit
    assert list(rebuilt.train) == expected
    assert stores_for(path, tokenizer, tmp_path / "cache").hit


BAD_FILES = {
    "mixed and broken": [
        '{"messages": [{"role": "user", "content": "hi"}]}',  # before the first valid record
        '{"text": "plain text"}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        "not json",
        "[1, 2]",
        '{"messages": [{"role": "robot", "content": "x"}]}',
        "",
        '{"prompt": "p", "completion": "c"}',
        '{"messages": "nope"}',
    ],
    "no valid record": ['{"messages": []}', '{"text": ""}'],
    "unknown keys": ['{"question": "q", "answer": "a"}'],
    "empty": ["", ""],
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
@pytest.mark.parametrize("fmt", ["auto", "chat", "text"])
def test_streaming_validation_raises_load_records_line_numbered_errors(
    name: str, fmt: str, tmp_path: Path
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(BAD_FILES[name]) + "\n")
    with pytest.raises(DatasetError) as old:
        load_records(path, fmt)  # type: ignore[arg-type]
    with pytest.raises(DatasetError) as new:
        scan_records(path, fmt)  # type: ignore[arg-type]
    assert str(new.value) == str(old.value)
    if name == "mixed and broken" and fmt == "auto":
        assert "train.jsonl line 4: invalid JSON" in str(new.value)
        assert "train.jsonl line 5: expected a JSON object (got array)" in str(new.value)
        assert "7 invalid record(s)" in str(new.value)


def test_streaming_validation_reports_only_the_first_few_of_many_errors(tmp_path: Path) -> None:
    good = '{"text": "fine"}'
    lines = [good] + ['{"text": 5}'] * 5000
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as old:
        load_records(path)
    with pytest.raises(DatasetError) as new:
        scan_records(path)
    assert str(new.value) == str(old.value)
    assert "5000 invalid record(s)" in str(new.value) and "... and 4995 more" in str(new.value)


def traced_peak(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_records(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python-allocated peak (tracemalloc: objects and NumPy buffers) while validating,
    tokenizing, opening the stores and planning the first steps: flat from 400 to 2,400
    records on the streaming path, growing with the records on the in-memory one."""
    # Records are tokenized BATCH_RECORDS at a time: smaller batches here, so that both sizes
    # hold several full ones.
    monkeypatch.setattr(store, "BATCH_RECORDS", 50)
    rng = random.Random(5)
    rows = [record("chat", rng) for _ in range(2_400)]
    small = write_jsonl(tmp_path / "small" / "train.jsonl", rows[:400])
    large = write_jsonl(tmp_path / "large" / "train.jsonl", rows)

    def streaming(path: Path, cache: str = "cache") -> None:
        stores = stores_for(path, tokenizer, path.parent / cache, fraction=0.05)
        plan = TrainingPlan(stores.train.lengths, 256, 4, 2, seed=0, epochs=1)
        for step in range(3):
            for batch in plan.step_batches(step).batches:
                collate_packed([[stores.train[i] for i in row] for row in batch], 2)

    def in_memory(path: Path) -> None:
        dataset = load_records(path)
        examples = tokenize_records(dataset.records, tokenizer, dataset.format, 64)
        TrainingPlan([len(e) for e in examples], 256, 4, 2, seed=0, epochs=1)

    streaming(small, "warm-up")  # one-time allocations (imports, caches) do not count
    in_memory(small)
    new_growth = traced_peak(lambda: streaming(large)) - traced_peak(lambda: streaming(small))
    old_growth = traced_peak(lambda: in_memory(large)) - traced_peak(lambda: in_memory(small))
    # O(records) int64 arrays (offsets, lengths, trained, the plan's members and row order) are
    # allowed: under 64 bytes per record, 0.13 MB for 2,000 more records.
    allowed = 64 * 2_000 + 300_000
    assert new_growth < allowed, new_growth
    assert old_growth > 5 * allowed, old_growth  # the in-memory path fails it: the test can tell


def prepared_recipe(
    tmp_path: Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    streaming: bool,
    files: dict[str, Path],
    **dataset: Any,
) -> FineTuneRecipe:
    """A FineTuneRecipe through its data steps (_setup_data, _setup_examples, _setup_plan) on
    local files standing for the s3:// URIs in `files`: no model, no object storage."""
    config = TrainerConfig.model_validate(
        {
            "spec": {
                "baseModel": {"uri": "s3://models/tiny"},
                "dataset": {"maxSeqLength": 96, **dataset},
                "output": {"uri": "s3://out/run"},
                "hyperparameters": {"batchSize": 2, "gradientAccumulationSteps": 2, "epochs": 2},
                "evaluation": {"metrics": ["loss", "rougeL"], "sampleSize": 3},
            },
            "workDir": str(tmp_path / ("work-stream" if streaming else "work-lists")),
        }
    )
    recipe = FineTuneRecipe(config, env={})
    recipe.streaming_data = streaming
    recipe._fetch = lambda uri, name, revision=None: files[uri]  # type: ignore[method-assign]
    recipe._setup_data()
    recipe.tokenizer_dir = tmp_path / "tok"
    recipe.tokenizer = tokenizer
    recipe._setup_examples()
    recipe._setup_plan()
    recipe.mask_dtype = torch.bool  # set by _setup_model from the model
    return recipe


def test_the_recipe_streams_sft_data_into_the_same_steps_batches_and_eval_prompts(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(9)
    train = write_jsonl(tmp_path / "train.jsonl", [record("chat", rng) for _ in range(120)])
    tokenizer.save_pretrained(tmp_path / "tok")
    caplog.set_level("INFO", logger="kubetune_trainer")
    files = {"s3://data/train.jsonl": train, "s3://data/validation.jsonl": train}
    for validation in (
        {"validationSplit": 0.1},
        {"validationUri": "s3://data/validation.jsonl"},
        {},
    ):
        dataset = {"trainUri": "s3://data/train.jsonl", **validation}
        old = prepared_recipe(tmp_path, tokenizer, streaming=False, files=files, **dataset)
        new = prepared_recipe(tmp_path, tokenizer, streaming=True, files=files, **dataset)
        assert isinstance(new.train_examples, TokenStore)
        assert isinstance(new.train_records, RecordStream)
        assert len(new.train_records) == len(old.train_records)
        assert len(new.validation_records) == len(old.validation_records)
        assert list(new.validation_examples) == list(old.validation_examples)
        assert new.eval_samples == old.eval_samples
        assert new.plan.total_steps == old.plan.total_steps
        for step in range(old.plan.total_steps):
            planned = old.plan.step_batches(step)
            assert new.plan.step_batches(step) == planned
            for batch in planned.batches:
                a, b = old._collate(batch), new._collate(batch)
                assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
                assert sum(old._trained_tokens[i] for r in batch for i in r) == sum(
                    new._trained_tokens[i] for r in batch for i in r
                )
        assert data_fingerprint(new.train_examples) == data_fingerprint(old.train_examples)
        assert list(new._sequences()) == list(old._sequences())
    assert "tokenized 120 records (cache miss)" in caplog.text

    caplog.clear()  # a retry of the same job: same work dir
    prepared_recipe(
        tmp_path,
        tokenizer,
        streaming=True,
        files=files,
        trainUri="s3://data/train.jsonl",
        validationSplit=0.1,
    )
    assert "tokenized 120 records (cache hit)" in caplog.text


def test_the_recipe_names_the_users_uri_and_line_in_streamed_data_errors(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    good = json.dumps(record("text", random.Random(0)))
    bad = write_jsonl(tmp_path / "data" / "train.jsonl", [json.loads(good)])
    with bad.open("a") as fh:
        fh.write('{"text": 3}\n')
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(DatasetError) as error:
        prepared_recipe(
            tmp_path,
            tokenizer,
            streaming=True,
            files={"s3://data/train/": bad.parent},
            trainUri="s3://data/train/",
        )
    assert str(error.value) == (
        "s3://data/train/: 1 invalid record(s):\n  train.jsonl line 3: text must be a string "
        "(got number)"
    )


def test_a_runs_data_fingerprint_is_read_from_its_store_not_hashed_again(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(3)
    path = write_jsonl(tmp_path / "train.jsonl", [record("chat", rng) for _ in range(200)])
    store = stores_for(path, tokenizer, tmp_path / "cache", max_len=32).train
    hashed = data_fingerprint(list(store))
    monkeypatch.setattr(TokenStore, "__iter__", lambda _: pytest.fail("examples hashed again"))
    run = SimpleNamespace(dpo=False, train_examples=store)
    assert FineTuneRecipe._data_fingerprint(run) == hashed  # type: ignore[arg-type]


def test_a_store_and_a_chain_of_stores_index_like_lists(tmp_path: Path, tokenizer: Any) -> None:
    rng = random.Random(5)
    path = write_jsonl(tmp_path / "train.jsonl", [record("chat", rng) for _ in range(60)])
    stores = stores_for(path, tokenizer, tmp_path / "cache", max_len=32)
    chain = ExampleChain(stores.train, ExampleChain(), stores.validation)
    for sequence, listed in (
        (stores.train, list(stores.train)),
        (chain, [*stores.train, *stores.validation]),
    ):
        n = len(listed)
        assert len(sequence) == n and n > 2
        assert [sequence[i] for i in (0, n - 1, -1, -n)] == [listed[i] for i in (0, n - 1, -1, -n)]
        assert sequence[1:-1:2] == listed[1:-1:2] and sequence[n:] == []
        for bad in (n, -n - 1):
            with pytest.raises(IndexError):
                sequence[bad]
