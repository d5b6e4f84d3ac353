"""Preference pairs (objective dpo): detection, line-numbered errors, tokens, skips, batches."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest
import torch

from kubetune_trainer.data.preference import collate_pairs, tokenize_pairs
from kubetune_trainer.data.records import DatasetError, load_records
from kubetune_trainer.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    WriteFile = Callable[[str, str | bytes], Path]

HOSTED = {
    "input": {"messages": [{"role": "user", "content": "how many pods"}]},
    "preferred_output": [{"role": "assistant", "content": "two pods"}],
    "non_preferred_output": [{"role": "assistant", "content": "blue cat"}],
}
STRINGS = {"prompt": "the sky is", "chosen": " blue", "rejected": " a dog"}
MESSAGES = {
    "prompt": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "how many gpus"},
    ],
    "chosen": [{"role": "assistant", "content": "two gpus"}],
    "rejected": [{"role": "assistant", "content": "the red dog"}],
}


def jsonl(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def load_error(path: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_records(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        (HOSTED, "preference"),
        (STRINGS, "prompt-chosen-rejected"),
        (MESSAGES, "prompt-chosen-rejected"),
    ],
)
def test_preference_formats_are_detected(write_file: WriteFile, record: Any, fmt: str) -> None:
    dataset = load_records(write_file("p.jsonl", jsonl(record, record)))
    assert dataset.format == fmt and len(dataset.records) == 2


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {**STRINGS, "rejected": " blue"},
            "chosen and rejected are the same answer",
        ),
        (
            {**HOSTED, "non_preferred_output": [{"role": "assistant", "content": "two pods "}]},
            "preferred_output and non_preferred_output are the same answer",
        ),
        ({**STRINGS, "chosen": "  "}, "chosen must not be empty"),
        (
            {**HOSTED, "preferred_output": [{"role": "assistant", "content": ""}]},
            "preferred_output[0].content must not be empty",
        ),
        (
            {**HOSTED, "preferred_output": [{"role": "user", "content": "x"}]},
            "preferred_output must hold exactly one assistant message",
        ),
        ({**HOSTED, "input": {"messages": []}}, "input.messages must not be empty"),
        (
            {**MESSAGES, "chosen": "two gpus"},
            "chosen must be an array",
        ),
        (
            {**STRINGS, "chosen": [{"role": "assistant", "content": "x"}]},
            "prompt must be a message list when chosen and rejected are message lists",
        ),
        ({"prompt": "q", "chosen": "a"}, "rejected is required"),
    ],
)
def test_bad_pairs_fail_with_their_line_and_field(
    write_file: WriteFile, bad: Any, message: str
) -> None:
    good = HOSTED if "input" in bad else STRINGS
    error = load_error(write_file("p.jsonl", jsonl(good, good, bad)))
    assert "p.jsonl line 3: " + message in error, error


def test_sft_and_preference_records_do_not_mix(write_file: WriteFile) -> None:
    completion = {"prompt": "q", "completion": "a"}
    error = load_error(write_file("p.jsonl", jsonl(STRINGS, completion)))
    assert "line 2: mixed formats" in error and "prompt-completion format" in error


def _trained(example: Any) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


def test_string_pairs_encode_like_prompt_completion_and_train_the_answer_only(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    (pair,) = tokenize_pairs([STRINGS], tokenizer, "prompt-chosen-rejected", 64)
    sky = tokenizer("the sky is", add_special_tokens=False)["input_ids"]
    prompt = [tokenizer.bos_token_id, *sky]
    blue = tokenizer(" blue", add_special_tokens=False)["input_ids"]
    assert pair.chosen.input_ids == [*prompt, *blue, tokenizer.eos_token_id]
    assert _trained(pair.chosen) == [*blue, tokenizer.eos_token_id]
    assert pair.chosen.input_ids[: len(prompt)] == pair.rejected.input_ids[: len(prompt)]


@pytest.mark.parametrize("template", [True, False], ids=["chat-template", "chatml"])
def test_message_pairs_train_the_final_answer_not_earlier_assistant_turns(
    make_tokenizer: Callable[[str | None], PreTrainedTokenizerFast], template: bool
) -> None:
    from conftest import TEST_CHAT_TEMPLATE  # noqa: PLC0415

    tokenizer = make_tokenizer(TEST_CHAT_TEMPLATE if template else None)
    (pair,) = tokenize_pairs([MESSAGES], tokenizer, "prompt-chosen-rejected", 256)
    chosen = tokenizer.decode(_trained(pair.chosen))
    assert chosen.startswith("two gpus") and "hello world" not in chosen
    assert tokenizer.decode(_trained(pair.rejected)).startswith("the red dog")


def test_pairs_that_do_not_fit_are_skipped_and_counted_never_truncated(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    long = {**STRINGS, "rejected": " a dog" * 40}
    pairs = tokenize_pairs([STRINGS, long, STRINGS], tokenizer, "prompt-chosen-rejected", 16)
    assert len(pairs) == 2
    assert pairs.stats.too_long == 1 and pairs.stats.records == 3
    assert pairs.stats.as_dict()["skipped_too_long"] == 1


@pytest.mark.parametrize("packing", [True, False])
def test_collated_pairs_map_every_trained_label_to_its_sequence(
    tokenizer: PreTrainedTokenizerFast, packing: bool
) -> None:
    other = {"prompt": "what is", "chosen": " one", "rejected": " two three"}
    pairs = tokenize_pairs([STRINGS, other], tokenizer, "prompt-chosen-rejected", 64)
    batch = collate_pairs([[1, 0]], pairs, 2, packing=True) if packing else None
    if not packing:
        batch = collate_pairs([[1], [0]], pairs, 2, packing=False)
    assert batch is not None and batch.num_pairs == 2
    assert batch.pair_index.tolist() == [1, 0]
    # Sequences in pair-major order: pair 1 chosen, pair 1 rejected, pair 0 chosen, ...
    expected = [pairs[1].chosen, pairs[1].rejected, pairs[0].chosen, pairs[0].rejected]
    labels = batch.batch.labels[:, 1:]
    trained = labels[labels != IGNORE_INDEX]
    for n, example in enumerate(expected):
        mine = trained[batch.sequence_of_label == n].tolist()
        assert mine == _trained(example)[: len(mine)] and len(mine) == example.num_trained
    assert int(batch.sequence_of_label.max()) == 3
    assert batch.batch.input_ids.shape[0] == (1 if packing else 4)
    assert torch.equal(batch.sequence_of_label, batch.sequence_of_label.sort().values)
