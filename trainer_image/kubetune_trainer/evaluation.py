"""Evaluate the base and the fine-tuned model on the validation data, side by side.

Two measurements per model:
* validation loss (mean cross-entropy per trained token, exactly the tokens training would
  learn) and perplexity = exp(loss);
* greedy answers to `evaluation.sampleSize` validation prompts, scored against the records'
  own answers with ROUGE-L F1 (rouge-score, 0-1) and BLEU (sacrebleu, 0-100), plus answers to
  the user's extra `evaluation.prompts` (not scored: there is no reference).

For LoRA/QLoRA the base model is the same weights with the adapter disabled
(`model.disable_adapter()`), so no second copy is loaded; full fine-tuning evaluates the base
before the first step. The results go to eval_report.json and a readable eval_report.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Final

import torch

from kubetune_trainer.data.packing import batch_rows, collate_packed, collate_padded, pack_rows
from kubetune_trainer.data.preference import pair_text
from kubetune_trainer.data.records import PREFERENCE_FORMATS, Record, RecordFormat
from kubetune_trainer.data.templates import (
    CHATML_END,
    CHATML_START,
    Segment,
    adds_bos,
    alpaca_prompt,
    chatml_segments,
    encode_segments,
)
from kubetune_trainer.modeling import causal_lm_loss, eval_mode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kubetune_trainer.data.tokenize import Example
    from kubetune_trainer.modeling import Precision

REPORT_JSON: Final = "eval_report.json"
REPORT_MD: Final = "eval_report.md"
_MD_CELL_LIMIT: Final = 400


def perplexity(loss: float) -> float:
    # exp overflows a float above ~709; a perplexity that large means "untrained" anyway.
    return math.exp(min(loss, 700.0))


# ------------------------------------------------------------------------------------ loss


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    rows_per_batch: int,
    max_seq_length: int,
    pad_token_id: int,
    precision: Precision,
    mask_dtype: torch.dtype = torch.bool,
    trained_logits_only: bool = False,
    packing: bool = True,
) -> tuple[float, int]:
    """(mean loss per trained token, trained tokens) over `examples`, packed like training
    or one example per row (packing=False), with the same loss computation as training
    (modeling.causal_lm_loss)."""
    total = torch.zeros((), dtype=torch.float64, device=precision.device)
    tokens = 0
    lengths = [len(e) for e in examples]
    rows = (
        pack_rows(lengths, max_seq_length, seed=0)
        if packing
        else [[i] for i in range(len(lengths))]
    )
    with eval_mode(model):
        for group in batch_rows(rows, rows_per_batch):
            if packing:
                batch = collate_packed(
                    [[examples[i] for i in row] for row in group],
                    pad_token_id,
                    mask_dtype=mask_dtype,
                )
            else:
                batch = collate_padded([examples[row[0]] for row in group], pad_token_id)
            batch = batch.to(precision.device)
            with precision.autocast():
                # A divisor of 1: the summed token loss.
                loss = causal_lm_loss(
                    model,
                    batch,
                    torch.ones((), device=precision.device),
                    trained_logits_only=trained_logits_only,
                )
            total += loss.double()
            tokens += batch.num_label_tokens
    if tokens == 0:
        raise ValueError("the validation data has no trained tokens")
    return float(total.item()) / tokens, tokens


# ------------------------------------------------------------------------------ generation


@dataclass(frozen=True)
class Prompt:
    """A prompt as shown in the report, its exact token ids, and the expected answer."""

    text: str
    input_ids: list[int]
    reference: str | None = None


def _chat_prompt_ids(
    messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Token ids of `messages` followed by the assistant's turn opening, as in training."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        ids: list[int] = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        return ids
    segments = [*chatml_segments(messages), Segment(f"{CHATML_START}assistant\n", train=False)]
    return encode_segments(segments, tokenizer, bos=adds_bos(tokenizer)).input_ids


def _plain_prompt_ids(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    # The same tokenization as the prompt segment in training: BOS (if any) + the text alone.
    return encode_segments(
        [Segment(text, train=False)], tokenizer, bos=adds_bos(tokenizer)
    ).input_ids


def record_prompt(
    record: Record, fmt: RecordFormat, tokenizer: PreTrainedTokenizerBase
) -> Prompt | None:
    """The prompt and reference answer of a validation record; None for text records. For
    preference pairs the chosen answer is the reference."""
    data = record.data
    if fmt in PREFERENCE_FORMATS:
        pair = pair_text(data, fmt)
        if isinstance(pair.prompt, list):
            shown = pair.prompt[-1]["content"]
            return Prompt(shown, _chat_prompt_ids(pair.prompt, tokenizer), pair.chosen.strip())
        return Prompt(pair.prompt, _plain_prompt_ids(pair.prompt, tokenizer), pair.chosen.strip())
    if fmt == "chat":
        messages = list(data["messages"])
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:
            return None
        shown = messages[last - 1]["content"]
        ids = _chat_prompt_ids(messages[:last], tokenizer)
        return Prompt(shown, ids, messages[last]["content"].strip())
    if fmt == "instruction":
        prompt = alpaca_prompt(data["instruction"], data.get("input"))
        shown = data["instruction"] + (f"\n{data['input']}" if data.get("input") else "")
        return Prompt(shown, _plain_prompt_ids(prompt, tokenizer), data["output"].strip())
    if fmt == "prompt-completion":
        ids = _plain_prompt_ids(data["prompt"], tokenizer)
        return Prompt(data["prompt"], ids, data["completion"].strip())
    return None  # text records have no prompt/answer split


def extra_prompt(text: str, fmt: RecordFormat, tokenizer: PreTrainedTokenizerBase) -> Prompt:
    """A user-supplied evaluation prompt, wrapped the way the training data was."""
    if fmt == "chat":
        return Prompt(text, _chat_prompt_ids([{"role": "user", "content": text}], tokenizer))
    if fmt == "instruction":
        return Prompt(text, _plain_prompt_ids(alpaca_prompt(text), tokenizer))
    return Prompt(text, _plain_prompt_ids(text, tokenizer))


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids(CHATML_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    prompts: Sequence[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    precision: Precision,
) -> list[str]:
    """Greedy answers, one prompt at a time (no padding, so no left-padding subtleties)."""
    from transformers import GenerationConfig  # noqa: PLC0415

    make: Any = GenerationConfig  # untyped constructor
    config = make(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    answers: list[str] = []
    with eval_mode(model):
        for prompt in prompts:
            ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=precision.device)
            with precision.autocast():
                out = model.generate(  # type: ignore[operator]
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
                )
            text = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
            # The built-in ChatML end marker may be plain text for tokenizers without it.
            answers.append(text.split(CHATML_END, 1)[0].strip())
    return answers


# ---------------------------------------------------------------------------------- scores


def rouge_l(answer: str, reference: str) -> float:
    from rouge_score import rouge_scorer  # noqa: PLC0415 - pulls in nltk

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return float(scorer.score(reference, answer)["rougeL"].fmeasure)


def _bleu_metric() -> Any:
    from sacrebleu.metrics.bleu import BLEU  # noqa: PLC0415

    # Effective order: fine-tuning answers are often shorter than 4 words, and plain BLEU is
    # 0 for any text without a matching 4-gram, which would hide every difference.
    return BLEU(effective_order=True)


def bleu(answers: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 0-100) of the answers against one reference each."""
    return float(_bleu_metric().corpus_score(list(answers), [list(references)]).score)


def sentence_bleu(answer: str, reference: str) -> float:
    return float(_bleu_metric().sentence_score(answer, [reference]).score)


# ---------------------------------------------------------------------------------- report


@dataclass
class ModelEval:
    """What one model (base or fine-tuned) produced."""

    loss: float | None = None
    tokens: int = 0
    sample_answers: list[str] = field(default_factory=list)
    prompt_answers: list[str] = field(default_factory=list)
    # objective dpo: [chosen, rejected] log-probabilities of each held-out pair, and the scores
    # against the reference (dpo.PreferenceEval as a dict); `loss` is then the DPO loss.
    pair_logps: list[list[float]] | None = None
    preference: dict[str, float] | None = None

    @property
    def perplexity(self) -> float | None:
        if self.pair_logps is not None:  # exp(DPO loss) is no perplexity
            return None
        return None if self.loss is None else perplexity(self.loss)


@dataclass
class Scores:
    loss: float | None = None
    perplexity: float | None = None
    rouge_l: float | None = None
    bleu: float | None = None
    # objective dpo, on the held-out pairs (dpo.PreferenceEval)
    preference_accuracy: float | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None


@dataclass
class SampleRow:
    prompt: str
    reference: str | None
    base: str
    fine_tuned: str
    rouge_l: dict[str, float] | None = None
    bleu: dict[str, float] | None = None


@dataclass
class EvalReport:
    base: Scores
    fine_tuned: Scores
    samples: list[SampleRow]
    prompts: list[SampleRow]
    validation_tokens: int
    metrics: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    def to_markdown(self) -> str:
        def num(value: float | None, digits: int = 4) -> str:
            return "—" if value is None else f"{value:.{digits}f}"

        lines = [
            "# Evaluation report",
            "",
            f"Validation tokens: {self.validation_tokens:,}. Greedy decoding.",
            "",
            "| metric | base | fine-tuned |",
            "|---|---|---|",
            f"| loss | {num(self.base.loss)} | {num(self.fine_tuned.loss)} |",
            f"| perplexity | {num(self.base.perplexity, 2)} "
            f"| {num(self.fine_tuned.perplexity, 2)} |",
            f"| ROUGE-L F1 | {num(self.base.rouge_l)} | {num(self.fine_tuned.rouge_l)} |",
            f"| BLEU | {num(self.base.bleu, 2)} | {num(self.fine_tuned.bleu, 2)} |",
        ]
        if self.fine_tuned.preference_accuracy is not None:
            lines[-4] = f"| DPO loss | {num(self.base.loss)} | {num(self.fine_tuned.loss)} |"
            lines += [
                f"| preference accuracy | {num(self.base.preference_accuracy, 3)} "
                f"| {num(self.fine_tuned.preference_accuracy, 3)} |",
                f"| reward accuracy | — | {num(self.fine_tuned.reward_accuracy, 3)} |",
                f"| reward margin | — | {num(self.fine_tuned.reward_margin)} |",
            ]
        if self.samples:
            lines += [
                "",
                "## Validation samples",
                "",
                "| # | prompt | reference | base answer | fine-tuned answer | ROUGE-L base → ft "
                "| BLEU base → ft |",
                "|---|---|---|---|---|---|---|",
            ]
            for i, row in enumerate(self.samples, 1):
                rouge = (
                    f"{row.rouge_l['base']:.3f} → {row.rouge_l['fine_tuned']:.3f}"
                    if row.rouge_l
                    else "—"
                )
                bleu_text = (
                    f"{row.bleu['base']:.1f} → {row.bleu['fine_tuned']:.1f}" if row.bleu else "—"
                )
                lines.append(
                    f"| {i} | {_cell(row.prompt)} | {_cell(row.reference or '')} | "
                    f"{_cell(row.base)} | {_cell(row.fine_tuned)} | {rouge} | {bleu_text} |"
                )
        if self.prompts:
            lines += [
                "",
                "## Extra prompts",
                "",
                "| # | prompt | base answer | fine-tuned answer |",
                "|---|---|---|---|",
            ]
            for i, row in enumerate(self.prompts, 1):
                lines.append(
                    f"| {i} | {_cell(row.prompt)} | {_cell(row.base)} | {_cell(row.fine_tuned)} |"
                )
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    if len(text) > _MD_CELL_LIMIT:
        text = text[:_MD_CELL_LIMIT] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def build_report(
    *,
    samples: Sequence[Prompt],
    extra: Sequence[Prompt],
    base: ModelEval,
    tuned: ModelEval,
    metrics: Sequence[str],
) -> EvalReport:
    """Score both models' answers and assemble the report (only the requested metrics)."""
    want_rouge, want_bleu = "rougeL" in metrics, "bleu" in metrics
    rows: list[SampleRow] = []
    for prompt, base_answer, tuned_answer in zip(
        samples, base.sample_answers, tuned.sample_answers, strict=True
    ):
        ref = prompt.reference or ""
        rows.append(
            SampleRow(
                prompt=prompt.text,
                reference=prompt.reference,
                base=base_answer,
                fine_tuned=tuned_answer,
                rouge_l={
                    "base": rouge_l(base_answer, ref),
                    "fine_tuned": rouge_l(tuned_answer, ref),
                }
                if want_rouge
                else None,
                bleu={
                    "base": sentence_bleu(base_answer, ref),
                    "fine_tuned": sentence_bleu(tuned_answer, ref),
                }
                if want_bleu
                else None,
            )
        )
    extra_rows = [
        SampleRow(prompt=p.text, reference=None, base=b, fine_tuned=t)
        for p, b, t in zip(extra, base.prompt_answers, tuned.prompt_answers, strict=True)
    ]

    def scores(model: ModelEval, key: str) -> Scores:
        refs = [p.reference or "" for p in samples]
        answers = model.sample_answers
        pref = model.preference or {}
        dpo_only = key == "fine_tuned"  # the base model is the reference: no reward of its own
        return Scores(
            preference_accuracy=pref.get("preference_accuracy"),
            reward_accuracy=pref.get("reward_accuracy") if dpo_only else None,
            reward_margin=pref.get("reward_margin") if dpo_only else None,
            loss=model.loss if "loss" in metrics else None,
            perplexity=model.perplexity if "perplexity" in metrics else None,
            rouge_l=sum(r.rouge_l[key] for r in rows if r.rouge_l) / len(rows)
            if want_rouge and rows
            else None,
            bleu=bleu(answers, refs) if want_bleu and rows else None,
        )

    return EvalReport(
        base=scores(base, "base"),
        fine_tuned=scores(tuned, "fine_tuned"),
        samples=rows,
        prompts=extra_rows,
        validation_tokens=tuned.tokens,
        metrics=list(metrics),
    )


def model_eval_to_dict(value: ModelEval) -> dict[str, Any]:
    return asdict(value)


def model_eval_from_dict(value: dict[str, Any]) -> ModelEval:
    return ModelEval(**value)
