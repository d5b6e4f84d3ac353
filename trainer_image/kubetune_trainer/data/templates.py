"""Turn validated records into token ids plus a per-token "train on this" mask.

Every format is first rendered to text segments, each marked trained or not, and then every
segment is tokenized on its own. Tokenizing per segment guarantees that no token straddles
a prompt/answer boundary, so the mask is exact, and it matches inference, where the prompt
is tokenized alone and the model generates the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from transformers import PreTrainedTokenizerBase

    from kubetune_trainer.data.records import RecordFormat

ALPACA_PROMPT_WITH_INPUT: Final = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT: Final = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Used for chat records when the tokenizer has no chat_template of its own (base models).
# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message. On assistant messages
# the content and "<|im_end|>" are trained (the model must learn to end its turn); the
# role header and the newline after "<|im_end|>" are not. A BOS is prepended when the
# tokenizer adds one on plain encoding. If "<|im_start|>"/"<|im_end|>" are not special
# tokens of the tokenizer they are tokenized as plain text, which still trains correctly
# but inference must then stop on the "<|im_end|>" string.
CHATML_START: Final = "<|im_start|>"
CHATML_END: Final = "<|im_end|>"


class TemplateError(ValueError):
    """A chat template that cannot be split into prompt and answer parts."""


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text and whether its tokens carry loss."""

    text: str
    train: bool


@dataclass(frozen=True)
class Encoded:
    """Token ids and, per token, whether the model learns to predict it."""

    input_ids: list[int]
    train_mask: list[bool]


def alpaca_prompt(instruction: str, input_text: str | None = None) -> str:
    if input_text and input_text.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether plain encoding starts with BOS (Llama does, Qwen and GPT-2 do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids: list[int] = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise TemplateError("the tokenizer has no eos_token; set one before training")
    return eos


def encode_segments(
    segments: Sequence[Segment],
    tokenizer: PreTrainedTokenizerBase,
    *,
    bos: bool = False,
    eos: bool = False,
) -> Encoded:
    """Tokenize each segment on its own (no special tokens added) and concatenate.

    bos prepends an untrained BOS; eos appends a trained EOS (the model must learn to stop).
    """
    ids: list[int] = []
    mask: list[bool] = []
    if bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        mask.append(False)
    for segment in segments:
        if not segment.text:
            continue
        piece: list[int] = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([segment.train] * len(piece))
    if eos:
        ids.append(_eos_id(tokenizer))
        mask.append(True)
    return Encoded(ids, mask)


def chatml_segments(messages: Sequence[Mapping[str, str]]) -> list[Segment]:
    """The default ChatML rendering (see CHATML_START above), split for masking."""
    segments: list[Segment] = []
    for message in messages:
        header = f"{CHATML_START}{message['role']}\n"
        if message["role"] == "assistant":
            segments.append(Segment(header, train=False))
            segments.append(Segment(message["content"] + CHATML_END, train=True))
            segments.append(Segment("\n", train=False))
        else:
            segments.append(Segment(f"{header}{message['content']}{CHATML_END}\n", train=False))
    return segments


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, str]],
    *,
    generation_prompt: bool,
) -> str:
    if not messages:
        raise TemplateError(
            "the conversation starts with an assistant message; the tokenizer's chat "
            "template cannot render the (empty) prompt before it"
        )
    try:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as exc:  # Jinja templates raise anything (raise_exception(), ...)
        raise TemplateError(f"the chat template failed: {exc}") from exc
    if not isinstance(text, str):
        raise TemplateError(f"apply_chat_template returned {type(text).__name__}, not text")
    return text


def template_segments(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> list[Segment]:
    """Split the tokenizer's own chat_template rendering into trained/untrained parts.

    For assistant message i, render messages[:i] with the generation prompt (the prompt the
    model sees at inference) and messages[:i+1]; the difference is the assistant's answer.
    Both renderings must be prefixes of the whole conversation, otherwise the template
    rewrites history (e.g. drops earlier reasoning) and the turns cannot be masked exactly.
    Only prefixes ending before an assistant turn are rendered, so templates that merge the
    system message into the first user turn work too.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not through.startswith(prompt) or not full.startswith(through):
            raise TemplateError(
                f"the chat template does not render messages[{i}] as an extension of the "
                "earlier messages, so the assistant turn cannot be masked exactly"
            )
        start, end = len(prompt), len(through)
        # Leave separators after the end-of-turn marker untrained ("<|im_end|>\n" trains
        # "<|im_end|>" only), unless the template adds no marker at all: then the trailing
        # whitespace may be the answer's own text.
        answer = through[start:end]
        stripped = answer.rstrip()
        if not stripped.endswith(message["content"].rstrip()):
            end = start + len(stripped)
        spans.append((start, end))

    segments: list[Segment] = []
    cursor = 0
    for start, end in spans:
        segments.append(Segment(full[cursor:start], train=False))
        segments.append(Segment(full[start:end], train=True))
        cursor = end
    segments.append(Segment(full[cursor:], train=False))
    return [s for s in segments if s.text]


def encode_chat(
    messages: Sequence[Mapping[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    bos: bool | None = None,
) -> Encoded:
    """Tokens for a conversation; every assistant turn (and only those) is trained.

    bos (default: adds_bos(tokenizer)) only applies to the built-in ChatML template.
    """
    if getattr(tokenizer, "chat_template", None):
        # The template writes its own BOS (if any), so no special tokens are added.
        return encode_segments(template_segments(tokenizer, messages), tokenizer)
    if bos is None:
        bos = adds_bos(tokenizer)
    return encode_segments(chatml_segments(messages), tokenizer, bos=bos)


def record_segments(data: Mapping[str, Any], fmt: RecordFormat) -> list[Segment]:
    """Prompt and completion text for the non-chat formats (EOS is added at encoding)."""
    if fmt == "instruction":
        prompt = alpaca_prompt(data["instruction"], data.get("input"))
        return [Segment(prompt, train=False), Segment(data["output"], train=True)]
    if fmt == "prompt-completion":
        return [Segment(data["prompt"], train=False), Segment(data["completion"], train=True)]
    if fmt == "text":
        return [Segment(data["text"], train=True)]
    raise ValueError(f"record_segments does not handle format {fmt!r}; use encode_chat")


def encode_record(
    data: Mapping[str, Any],
    fmt: RecordFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    bos: bool | None = None,
) -> Encoded:
    """Token ids and train mask for one validated record of the given format.

    Pass bos (from adds_bos) when encoding many records to avoid probing the tokenizer
    for every record.
    """
    if bos is None:
        bos = adds_bos(tokenizer)
    layout = layout_record(data, fmt, tokenizer, bos=bos)
    return encode_segments(layout.segments, tokenizer, bos=layout.bos, eos=layout.eos)


@dataclass(frozen=True)
class Layout:
    """A record rendered but not yet tokenized: what encode_segments takes."""

    segments: list[Segment]
    bos: bool
    eos: bool


def layout_record(
    data: Mapping[str, Any], fmt: RecordFormat, tokenizer: PreTrainedTokenizerBase, *, bos: bool
) -> Layout:
    """The segments of one record and whether a BOS / EOS goes around them."""
    if fmt == "chat":
        if getattr(tokenizer, "chat_template", None):
            # The template writes its own BOS (if any), so no special tokens are added.
            return Layout(template_segments(tokenizer, data["messages"]), bos=False, eos=False)
        return Layout(chatml_segments(data["messages"]), bos=bos, eos=False)
    return Layout(record_segments(data, fmt), bos=bos, eos=True)


def _encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """tokenizer(text, add_special_tokens=False)["input_ids"] for every text, in one call.

    A plain fast tokenizer (no truncation, padding or special-token splitting configured on
    its Rust backend) is called directly: the same ids without transformers' per-encoding
    conversion, which otherwise costs as much as the encoding itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and bool(backend.encode_special_tokens)
        == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    ids: list[list[int]] = tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]
    return ids


def encode_layouts(layouts: Sequence[Layout], tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """encode_segments for many records with one tokenizer call (a fast tokenizer encodes a
    batch on its own threads); the same ids as encoding each segment alone."""
    texts = [s.text for layout in layouts for s in layout.segments if s.text]
    pieces = _encode_texts(texts, tokenizer) if texts else []
    out: list[Encoded] = []
    at = 0
    for layout in layouts:
        ids: list[int] = []
        mask: list[bool] = []
        if layout.bos and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            mask.append(False)
        for segment in layout.segments:
            if not segment.text:
                continue
            piece = pieces[at]
            at += 1
            ids.extend(piece)
            mask.extend([segment.train] * len(piece))
        if layout.eos:
            ids.append(_eos_id(tokenizer))
            mask.append(True)
        out.append(Encoded(ids, mask))
    return out
