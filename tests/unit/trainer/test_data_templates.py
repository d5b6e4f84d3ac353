"""Templates and masking: labels must equal input_ids exactly where the model should learn."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from kubetune_trainer.data.records import DatasetError, Record
from kubetune_trainer.data.templates import ALPACA_PROMPT_NO_INPUT, alpaca_prompt
from kubetune_trainer.data.tokenize import IGNORE_INDEX, Example, tokenize_records

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PreTrainedTokenizerFast

MESSAGES = [
    {"role": "system", "content": "You answer about pods."},
    {"role": "user", "content": "how many pods?"},
    {"role": "assistant", "content": "two pods."},
    {"role": "user", "content": "why?"},
    {"role": "assistant", "content": "because the job says two."},
    {"role": "user", "content": "thanks"},  # trailing user turn: never trained
]


def expected_from_pieces(
    tokenizer: PreTrainedTokenizerFast, pieces: list[tuple[str, bool]]
) -> tuple[list[int], list[int]]:
    """Independent reference: tokenize each piece, label it only if trained."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_one(tokenizer: PreTrainedTokenizerFast, record: dict[str, Any], fmt: Any) -> Example:
    examples = tokenize_records([record], tokenizer, fmt, max_seq_length=1024)
    assert len(examples) == 1
    return examples[0]


def trained_text(tokenizer: PreTrainedTokenizerFast, example: Example) -> list[str]:
    """Decode each run of consecutive trained labels."""
    runs: list[list[int]] = []
    previous = False
    for label in example.labels:
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(label)
        previous = trained
    return [tokenizer.decode(run) for run in runs]


def test_chat_with_tokenizer_template_trains_every_assistant_turn_exactly(
    chat_tokenizer: PreTrainedTokenizerFast,
) -> None:
    example = encode_one(chat_tokenizer, {"messages": MESSAGES}, "chat")
    ids, labels = expected_from_pieces(
        chat_tokenizer,
        [
            ("<s>", False),
            ("System: You answer about pods.\nUser: how many pods?\nAssistant:\n", False),
            ("two pods.</s>", True),
            ("\nUser: why?\nAssistant:\n", False),
            ("because the job says two.</s>", True),
            ("\nUser: thanks\n", False),
        ],
    )
    assert example.input_ids == ids
    assert example.labels == labels
    # Same ids as rendering the whole conversation with the template and tokenizing it once.
    rendered = chat_tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert example.input_ids == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert trained_text(chat_tokenizer, example) == [
        "two pods.</s>",
        "because the job says two.</s>",
    ]
    assert example.input_ids[0] == chat_tokenizer.bos_token_id  # from the template, once


def test_chat_without_template_uses_chatml_and_trains_assistant_turns_exactly(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    assert not tokenizer.chat_template
    example = encode_one(tokenizer, {"messages": MESSAGES}, "chat")
    ids, labels = expected_from_pieces(
        tokenizer,
        [
            ("<s>", False),  # this tokenizer adds BOS on plain encoding, so ChatML gets one
            ("<|im_start|>system\nYou answer about pods.<|im_end|>\n", False),
            ("<|im_start|>user\nhow many pods?<|im_end|>\n", False),
            ("<|im_start|>assistant\n", False),
            ("two pods.<|im_end|>", True),
            ("\n<|im_start|>user\nwhy?<|im_end|>\n<|im_start|>assistant\n", False),
            ("because the job says two.<|im_end|>", True),
            ("\n<|im_start|>user\nthanks<|im_end|>\n", False),
        ],
    )
    assert example.input_ids == ids
    assert example.labels == labels
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_ends = [i for i, label in enumerate(example.labels) if label == im_end]
    assert len(trained_ends) == 2  # the end-of-turn token of both assistant turns


def test_instruction_uses_alpaca_prompt_and_trains_output_and_eos(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    record = {"instruction": "Add the numbers.", "input": "two three", "output": "five"}
    example = encode_one(tokenizer, record, "instruction")
    prompt = alpaca_prompt("Add the numbers.", "two three")
    assert prompt.endswith("### Input:\ntwo three\n\n### Response:\n")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    output_ids = tokenizer("five", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    assert example.input_ids == [bos, *prompt_ids, *output_ids, eos]
    assert example.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*output_ids, eos]

    no_input = encode_one(
        tokenizer, {"instruction": "Say yes.", "input": "", "output": "yes"}, "instruction"
    )
    assert tokenizer.decode(no_input.input_ids) == (
        "<s>" + ALPACA_PROMPT_NO_INPUT.format(instruction="Say yes.") + "yes</s>"
    )
    assert trained_text(tokenizer, no_input) == ["yes</s>"]


def test_prompt_completion_masks_prompt_and_text_trains_everything(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pc = encode_one(
        tokenizer, {"prompt": "what is two?", "completion": " two"}, "prompt-completion"
    )
    prompt_ids = tokenizer("what is two?", add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(" two", add_special_tokens=False)["input_ids"]
    assert pc.input_ids == [bos, *prompt_ids, *completion_ids, eos]
    assert pc.labels == [IGNORE_INDEX] * (1 + len(prompt_ids)) + [*completion_ids, eos]

    text = encode_one(tokenizer, {"text": "the cat runs."}, "text")
    text_ids = tokenizer("the cat runs.", add_special_tokens=False)["input_ids"]
    assert text.input_ids == [bos, *text_ids, eos]
    assert text.labels == [IGNORE_INDEX, *text_ids, eos]  # BOS is input, never a target


def test_truncation_and_dropping_are_counted(tokenizer: PreTrainedTokenizerFast) -> None:
    long_prompt = "the model learns to answer questions about kubernetes pods " * 4
    records = [
        {"prompt": "hi", "completion": "hello world"},  # fits
        {"prompt": "hi", "completion": "one two three four five six seven eight nine ten " * 3},
        {"prompt": long_prompt, "completion": "yes"},  # completion truncated away
    ]
    examples = tokenize_records(records, tokenizer, "prompt-completion", max_seq_length=16)
    stats = examples.stats
    assert (stats.records, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert [len(e) for e in examples][1] == 16
    assert stats.max_length == 16
    assert stats.total_tokens == sum(len(e) for e in examples)
    assert stats.trained_tokens == sum(e.num_trained for e in examples)
    assert stats.mean_length == stats.total_tokens / 2
    assert examples[1].labels[-1] != tokenizer.eos_token_id  # EOS was cut off


def test_template_errors_name_the_record(
    make_tokenizer: Callable[[str | None], PreTrainedTokenizerFast],
) -> None:
    chat_tokenizer = make_tokenizer(
        "{% for m in messages %}{% if loop.last or m['role'] != 'assistant' %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    )  # drops earlier assistant turns: history is rewritten, cannot be masked
    record = Record({"messages": MESSAGES[1:5]}, "train.jsonl", 9)
    with pytest.raises(DatasetError, match=r"train.jsonl line 9: .*messages\[1\] as an extension"):
        tokenize_records([record], chat_tokenizer, "chat", max_seq_length=256)

    starts_with_assistant = Record({"messages": MESSAGES[2:3]}, "train.jsonl", 4)
    with pytest.raises(DatasetError, match=r"train.jsonl line 4: .*starts with an assistant"):
        tokenize_records([starts_with_assistant], make_tokenizer("{{ 'x' }}"), "chat", 256)
