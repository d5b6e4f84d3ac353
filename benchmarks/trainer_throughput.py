"""Trainer throughput on CPU: the classic padded HF-Trainer recipe against kubetune's trainer.

    make cluster-up                                                     # the local S3 server
    .venv/bin/python benchmarks/trainer_throughput.py                   # 400 records
    .venv/bin/python benchmarks/trainer_throughput.py --records 2000    # more steps, longer
    .venv/bin/python benchmarks/trainer_throughput.py --explore         # + contender variants
    .venv/bin/python benchmarks/trainer_throughput.py --recipe-shape 8x2  # + recipe at 8 x GA 2
    .venv/bin/python benchmarks/trainer_throughput.py --recipe-full-logits  # + head everywhere
    .venv/bin/python benchmarks/trainer_throughput.py --quick           # smoke test, no measure

* data: generated Alpaca-like instruction records (40% with an input) from a Zipf-distributed
  pseudo-word lexicon; the Alpaca-formatted token count is lognormal (mean ~90, p50 ~73, p99
  ~290) plus 0.5% of 520-1000 tokens; the actual mean/p50/p99/max are measured and reported. The
  tokenizer is a byte-level BPE (vocab 8192) trained on the generated text
  (examples/quickstart/assets.build_tokenizer), so token counts per word are realistic.
* model: a random-init Llama (hidden 256, intermediate 688, 4 layers, 4 heads), float32, saved
  once and loaded by every run, so all start from identical weights. LoRA r16 alpha32 dropout
  0.05 on q_proj, k_proj, v_proj, o_proj everywhere.
* baseline, the classic recipe: Alpaca prompt + output + EOS tokenized with
  padding="max_length", max_length=512, truncation=True; DataCollatorForLanguageModeling
  (mlm=False); HF Trainer with per_device_train_batch_size=4, gradient_accumulation_steps=4,
  learning_rate=2e-4, one epoch (fp16 only where CUDA is available; fp32 here).
* contender, kubetune's trainer: FineTuneRecipe (trainer_image/kubetune_trainer/recipe.py) run
  as `python -m kubetune_trainer --config run.json` runs it, with model and data uploaded to the
  local S3 server (s3:// URIs, as the API requires), batchSize 4 packed rows of 512,
  gradientAccumulationSteps 4, learningRate 2e-4, one epoch, the classic schedule (linear, no
  warmup). `--contender pipeline` instead drives the project's data pipeline (tokenize_records,
  TrainingPlan, collate_packed) in a plain loop, which needs no S3; --explore adds variants of
  that loop (naive packing, mask dtype, rows per batch, threads, output head at trained
  positions only, which the recipe itself now does); --recipe-shape adds recipe runs with other
  micro-batch shapes (batchSize x gradientAccumulationSteps).
* a common validation metric computed by this script for the base and every trained adapter:
  mean cross-entropy per output token of held-out records, each sequence alone in its row.

Every training runs in its own process with the same torch.set_num_threads. All of them are
started together, and the orchestrator hands out optimizer steps one at a time (Gate), so no two
runs ever compute at once and all see the same background load on a shared machine. Useful
tokens are non-padding tokens; useful tokens/s divides them by the run's own step time (model
loading and tokenization are reported separately), and per CPU-second as a second view. Peak
RSS is each child's ru_maxrss (os.wait4). Results: docs/benchmarks/trainer_throughput.json + PNG.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import os
import random
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import benchlib

_STARTED = time.perf_counter()

ROWS_TOKENS = 512
TARGET_RATIO = 6.0
VAL_TOLERANCE = 0.02
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODEL_INPUTS = ("attention_mask", "position_ids")  # what naive packing drops

# ------------------------------------------------------------------------------------ data

_ONSETS = [*"bcdfghjklmnprstvwz", "st", "tr", "pl", "ch", "sh", "th", "gr", "br", ""]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
_CODAS = ["", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "x"]
_INSTRUCTION_OPENERS = [
    "Write a short answer to the question.",
    "Summarize the text below.",
    "Explain the following in simple terms.",
    "Give three examples of the topic.",
    "Rewrite the sentence in a formal tone.",
    "Classify the following item.",
    "Describe the process step by step.",
    "Translate the phrase into plain words.",
]


class TextGenerator:
    """Pseudo-English: a lexicon of syllable words drawn with Zipf frequencies, in sentences."""

    def __init__(self, seed: int, words: int = 12_000, zipf: float = 1.05) -> None:
        rng = random.Random(seed)
        seen: set[str] = set()
        self.lexicon: list[str] = []
        while len(self.lexicon) < words:
            syllables = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
            word = "".join(
                rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
                for _ in range(syllables)
            )
            if word not in seen:
                seen.add(word)
                self.lexicon.append(word)
        cumulative, total = [], 0.0
        for rank in range(words):
            total += 1.0 / (rank + 1) ** zipf
            cumulative.append(total)
        self._cumulative = cumulative

    def words(self, n: int, rng: random.Random) -> list[str]:
        top = self._cumulative[-1]
        return [
            self.lexicon[bisect.bisect_left(self._cumulative, rng.random() * top)] for _ in range(n)
        ]

    def text(self, n: int, rng: random.Random) -> str:
        words, sentences, i = self.words(n, rng), [], 0
        while i < n:
            k = min(n - i, rng.randint(6, 18))
            sentence = " ".join(words[i : i + k])
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".....?!,"))
            i += k
        return " ".join(sentences)


def alpaca_like_records(
    n: int,
    seed: int,
    gen: TextGenerator,
    *,
    median_tokens: float = 49.0,
    sigma: float = 0.7,
    long_tail: float = 0.005,
) -> list[dict[str, str]]:
    """Instruction records (like examples/quickstart/assets.instruction_records, with a real
    vocabulary) whose Alpaca-formatted length follows lognormal(median, sigma) tokens, plus a
    `long_tail` fraction (at least one record) of 520-1000 tokens, truncated to 512 by both
    recipes. The target lengths are stratified (evenly spaced quantiles, shuffled), so even a
    few hundred records have the intended mean and tail; the fixed prompt header (about 30-45
    tokens) sets a floor, like in Alpaca itself."""
    rng = random.Random(seed)
    n_long = max(1, round(n * long_tail)) if n >= 50 else 0
    normal = statistics.NormalDist(math.log(median_tokens), sigma)
    targets = [
        min(1500.0, math.exp(normal.inv_cdf((i + 0.5) / (n - n_long)))) for i in range(n - n_long)
    ]
    targets += [rng.uniform(520, 1000) for _ in range(n_long)]
    rng.shuffle(targets)
    records = []
    for target in targets:
        has_input = rng.random() < 0.4
        instruction_words = rng.randint(3, 14)
        budget = max(3.0, target - 30 - 1.4 * instruction_words - (12 if has_input else 0))
        input_words = round(budget * rng.uniform(0.2, 0.6) / 1.4) if has_input else 0
        output_words = max(2, round(budget / 1.4) - input_words)
        opener = rng.choice(_INSTRUCTION_OPENERS) if rng.random() < 0.5 else ""
        instruction = (opener + " " + gen.text(instruction_words, rng)).strip()
        records.append(
            {
                "instruction": instruction,
                "input": gen.text(input_words, rng) if has_input else "",
                "output": gen.text(output_words, rng),
            }
        )
    return records


def classic_text(record: dict[str, Any], eos: str) -> str:
    from kubetune_trainer.data.templates import alpaca_prompt  # noqa: PLC0415

    prompt = alpaca_prompt(record["instruction"], record.get("input"))
    return f"{prompt}{record['output']}{eos}"


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def build_assets(work: Path, n_train: int, n_val: int, seed: int, vocab: int) -> dict[str, Any]:
    """Records, tokenizer and the random-init model, written under `work`."""
    from assets import build_tokenizer  # noqa: PLC0415  (examples/quickstart/assets.py)

    from kubetune_trainer.data.templates import (  # noqa: PLC0415
        ALPACA_PROMPT_NO_INPUT,
        ALPACA_PROMPT_WITH_INPUT,
    )
    from localenv import models  # noqa: PLC0415  (tests/localenv/models.py)

    gen = TextGenerator(seed)
    rng = random.Random(seed + 1)
    corpus = [gen.text(rng.randint(5, 60), rng) for _ in range(min(20_000, vocab * 3))]
    corpus += [ALPACA_PROMPT_WITH_INPUT, ALPACA_PROMPT_NO_INPUT] * 200
    tokenizer = build_tokenizer(corpus, vocab_size=vocab)
    train = alpaca_like_records(n_train, seed + 2, gen)
    validation = alpaca_like_records(n_val, seed + 3, gen)
    (work / "data").mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("validation", validation)):
        with (work / "data" / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    model = models.tiny_llama(
        len(tokenizer), hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4,
        tokenizer=tokenizer, seed=seed,
    )  # fmt: skip
    models.save_model(model, tokenizer, work / "model")

    lengths = [len(tokenizer(classic_text(r, tokenizer.eos_token))["input_ids"]) for r in train]
    return {
        "train_records": n_train,
        "validation_records": n_val,
        "tokenizer": f"byte-level BPE, vocab {len(tokenizer)}, trained on the generated text",
        "model": "random-init Llama: hidden 256, intermediate 688, 4 layers, 4 heads "
        f"(4 KV heads), vocab {len(tokenizer)}, untied embeddings, float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "alpaca_tokens_per_record": {
            "mean": round(statistics.fmean(lengths), 1),
            "p50": percentile(lengths, 50),
            "p90": percentile(lengths, 90),
            "p99": percentile(lengths, 99),
            "max": max(lengths),
            "over_512": sum(1 for n in lengths if n > ROWS_TOKENS),
        },
    }


# ------------------------------------------------------------------------ interleaving gate

GATE_ENV = "KUBETUNE_BENCH_GATE_FD"


class Gate:
    """Lets the orchestrator interleave the measured runs step by step.

    Every worker stops before each optimizer step and waits for its turn, so at most one
    worker computes at any time and all of them see the same background load on a shared
    machine. A worker's training time is the sum of its own slices (turn to next stop);
    waiting for a turn is not counted. Without the orchestrator (no GATE_ENV) it only times.
    """

    def __init__(self) -> None:
        fd = os.environ.get(GATE_ENV)
        self._out = os.fdopen(int(fd), "w", buffering=1) if fd else None
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._open: tuple[float, float] | None = None

    def _close(self) -> None:
        if self._open is not None:
            self.wall.append(time.perf_counter() - self._open[0])
            self.cpu.append(time.process_time() - self._open[1])
            self._open = None

    def _wait(self, message: str) -> None:
        if self._out is None:
            return
        self._out.write(message + "\n")
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("the orchestrator went away")

    def turn(self, done: int, total: int) -> None:
        """Before optimizer step `done` (0-based) of `total`."""
        self._close()
        self._wait(f"ready {done} {total}")
        self._open = (time.perf_counter(), time.process_time())

    def finish(self) -> None:
        """Training is over; waits until every worker's training is over."""
        self._close()
        self._wait("trained")

    def timings(self) -> dict[str, Any]:
        return {
            "train_s": sum(self.wall),
            "train_cpu_s": sum(self.cpu),
            "step_s_median": statistics.median(self.wall) if self.wall else None,
            "step_s_min": min(self.wall, default=None),
        }


# ---------------------------------------------------------------------------------- workers


def _setup_torch(threads: int, seed: int) -> Any:
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


def _import_stack() -> float:
    """Import transformers and peft (seconds); kept out of the load timings."""
    t0 = time.perf_counter()
    import peft  # noqa: F401, PLC0415
    import transformers  # noqa: F401, PLC0415
    from transformers import AutoModelForCausalLM, Trainer  # noqa: F401, PLC0415

    return time.perf_counter() - t0


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def classic_lora_model(model: Any) -> Any:
    """The classic recipe's adapter: LoRA r16 alpha32 dropout 0.05 on q,k,v,o_proj."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _load(work: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa")
    model.config.use_cache = False  # training: no KV cache (for every run)
    return tokenizer, model


def worker_classic(args: argparse.Namespace, gate: Gate) -> dict[str, Any]:
    """The classic recipe, exactly: pad to 512, HF Trainer, batch 4 x grad-accum 4."""
    torch = _setup_torch(args.threads, args.seed)
    import_s = _import_stack()
    from transformers import (  # noqa: PLC0415
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    t0 = time.perf_counter()
    tokenizer, model = _load(args.work)
    model = classic_lora_model(model)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    records = _read_jsonl(args.work / "data" / "train.jsonl")
    texts = [classic_text(r, tokenizer.eos_token) for r in records]
    encoded = tokenizer(texts, padding="max_length", max_length=ROWS_TOKENS, truncation=True)
    dataset = [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    useful = sum(sum(mask) for mask in encoded["attention_mask"])
    tokenize_s = time.perf_counter() - t0

    class Gated(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            gate.turn(0, state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step < state.max_steps:
                gate.turn(state.global_step, state.max_steps)
            else:
                gate.finish()

    training_args = TrainingArguments(
        output_dir=str(args.out_dir / "hf-trainer"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        learning_rate=2e-4,
        num_train_epochs=1,
        fp16=torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False),
        callbacks=[Gated()],
    )
    output = trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    model.save_pretrained(args.out_dir / "adapter")
    return {
        "label": "classic recipe: pad to 512, HF Trainer, batch 4 x grad-accum 4",
        "import_s": import_s,
        "load_s": load_s,
        "tokenize_s": tokenize_s,
        **gate.timings(),
        "optimizer_steps": int(output.global_step),
        "useful_tokens": useful,
        "processed_tokens": len(dataset) * ROWS_TOKENS,
        "train_loss_last_step": losses[-1] if losses else None,
        "train_loss_mean": float(output.training_loss),
        "train_loss_tokens": "all non-padding tokens (prompt and output)",
    }


def worker_pipeline(args: argparse.Namespace, gate: Gate) -> dict[str, Any]:
    """The project's data pipeline (tokenize_records, TrainingPlan, collate_packed) in a
    plain loop: the contender before recipe.py existed, and the base of the variants."""
    torch = _setup_torch(args.threads, args.seed)
    from kubetune_trainer.data import collate_packed, load_records, tokenize_records  # noqa: PLC0415
    from kubetune_trainer.modeling import causal_lm_loss  # noqa: PLC0415
    from kubetune_trainer.plan import TrainingPlan, build_scheduler  # noqa: PLC0415

    import_s = _import_stack()
    t0 = time.perf_counter()
    tokenizer, model = _load(args.work)
    model = classic_lora_model(model)
    model.train()
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    dataset = load_records(args.work / "data" / "train.jsonl", "instruction")
    examples = tokenize_records(dataset.records, tokenizer, dataset.format, ROWS_TOKENS)
    plan = TrainingPlan(
        lengths=[len(e) for e in examples],
        max_seq_length=ROWS_TOKENS,
        batch_size=args.rows,
        gradient_accumulation_steps=args.grad_accum,
        seed=args.seed,
        epochs=1,
        packing=True,
    )
    tokenize_s = time.perf_counter() - t0

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    scheduler = build_scheduler(
        optimizer, kind="linear", total_steps=plan.total_steps, warmup_ratio=0.0
    )
    mask_dtype = torch.float32 if args.mask == "float" else torch.bool
    pad_id = tokenizer.pad_token_id
    useful = processed = 0
    losses: list[float] = []
    for step in range(plan.total_steps):
        gate.turn(step, plan.total_steps)
        batches = [
            collate_packed(
                [[examples[i] for i in row] for row in micro_batch], pad_id, mask_dtype=mask_dtype
            )
            for micro_batch in plan.step_batches(step).batches
        ]
        label_tokens = sum(b.num_label_tokens for b in batches)
        divisor = torch.tensor(float(label_tokens))
        step_loss = 0.0
        for batch in batches:
            inputs = batch.model_inputs()
            if args.mask == "none":  # naive packing: sequences see each other (a bound only)
                inputs.pop("attention_mask")
                inputs.pop("position_ids")
            if args.logits == "labels":  # the recipe's loss (modeling.causal_lm_loss)
                hidden = dataclasses.replace(batch, **{k: inputs.get(k) for k in MODEL_INPUTS})
                loss = causal_lm_loss(model, hidden, divisor, trained_logits_only=True)
            else:
                loss = model(**inputs).loss * (batch.num_label_tokens / label_tokens)
            loss.backward()
            step_loss += float(loss.detach())
            useful += batch.num_tokens
            processed += batch.input_ids.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    gate.finish()
    model.save_pretrained(args.out_dir / "adapter")
    label = {
        "block": "project data pipeline, plain loop: 4D block-diagonal bool mask",
        "float": "project data pipeline, plain loop: 4D block-diagonal float mask",
        "none": "naive packing, no mask (sequences attend to each other: a bound only)",
    }[args.mask]
    if args.logits == "labels":
        label += ", output head only at trained positions"
    return {
        "label": f"{label}, {args.rows} rows x {ROWS_TOKENS} x grad-accum {args.grad_accum}, "
        f"{args.threads} thread(s)",
        "import_s": import_s,
        "load_s": load_s,
        "tokenize_s": tokenize_s,
        **gate.timings(),
        "optimizer_steps": plan.total_steps,
        "useful_tokens": useful,
        "processed_tokens": processed,
        "train_loss_last_step": losses[-1] if losses else None,
        "train_loss_mean": statistics.fmean(losses) if losses else None,
        "train_loss_tokens": "output tokens only (prompt masked)",
    }


def recipe_config(args: argparse.Namespace, base: str, output: str) -> dict[str, Any]:
    """The TrainerConfig a user would write for the same run (`kubetune-trainer --config`)."""
    return {
        "spec": {
            "baseModel": {"uri": f"{base}/model"},
            "dataset": {
                "trainUri": f"{base}/data/train.jsonl",
                "validationUri": f"{base}/data/validation.jsonl",
                "format": "instruction",
                "maxSeqLength": ROWS_TOKENS,
            },
            "method": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": LORA_TARGETS},
            "hyperparameters": {
                "epochs": 1,
                "learningRate": 2e-4,
                "batchSize": args.rows,
                "gradientAccumulationSteps": args.grad_accum,
                # The classic recipe's schedule (HF Trainer defaults): linear, no warmup.
                "scheduler": "linear",
                "warmupRatio": 0.0,
                "weightDecay": 0.0,
                "seed": args.seed,
                "packing": True,
                "gradientCheckpointing": "disabled",
            },
            "output": {"uri": output},
            "resources": {"gpus": 0},
            "evaluation": {"metrics": ["loss"], "sampleSize": 0},
            "checkpointing": {"intervalMinutes": 0},
        },
        "workDir": str(args.out_dir / "work"),
    }


def worker_recipe(args: argparse.Namespace, gate: Gate) -> dict[str, Any]:
    """kubetune's trainer: FineTuneRecipe run exactly as `python -m kubetune_trainer` runs it
    (setup, train, evaluate, publish, cleanup), from and to the local S3 server. Its two
    observer hooks (before_step, after_training) stop at the gate and count processed tokens;
    nothing else is changed."""
    torch = _setup_torch(args.threads, args.seed)
    import_s = _import_stack()
    from kubetune_trainer.__main__ import configure_logging  # noqa: PLC0415
    from kubetune_trainer.config import TrainerConfig  # noqa: PLC0415
    from kubetune_trainer.recipe import FineTuneRecipe  # noqa: PLC0415
    from kubetune_trainer.storage import Storage  # noqa: PLC0415

    configure_logging()
    config_doc = recipe_config(args, args.s3_base, args.s3_output)
    (args.out_dir / "run.json").write_text(json.dumps(config_doc, indent=2))
    config = TrainerConfig.model_validate(config_doc)
    recipe = FineTuneRecipe(config)
    t0 = time.perf_counter()
    recipe.setup()
    setup_s = time.perf_counter() - t0

    processed = 0
    lengths = [len(e) for e in recipe.train_examples]

    def before_step(planned: Any) -> None:
        nonlocal processed
        gate.turn(planned.step, recipe.plan.total_steps)
        for micro in planned.batches:
            processed += len(micro) * max(sum(lengths[i] for i in row) for row in micro)

    if args.full_logits:  # the A/B of the output head at trained positions only
        recipe.trained_logits_only = False
    recipe.before_step = before_step
    recipe.after_training = gate.finish  # the final checkpoint comes after the last step
    try:
        recipe.train()
        recipe.evaluate()
        recipe.publish()
    finally:
        recipe.cleanup()
    history = recipe.state.loss_history
    report = recipe.eval_report

    # The published adapter, for the benchmark's own validation metric.
    storage = Storage(env=os.environ, work_dir=args.out_dir / "work", use_cache=False)
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.json"):
        storage.fetch(f"{args.s3_output.rstrip('/')}/{name}", args.out_dir / "adapter")
    storage.delete_prefix(args.s3_output)
    del torch
    return {
        "label": f"kubetune FineTuneRecipe (recipe.py): packed rows, {args.rows} rows x "
        f"{ROWS_TOKENS} x grad-accum {args.grad_accum}"
        + (", logits at every position" if args.full_logits else ""),
        "import_s": import_s,
        "setup_s": setup_s,
        **gate.timings(),
        "optimizer_steps": recipe.plan.total_steps,
        "useful_tokens": recipe.state.tokens_seen,
        "processed_tokens": processed,
        "train_loss_last_step": history[-1]["loss"] if history else None,
        "train_loss_mean": statistics.fmean(h["loss"] for h in history) if history else None,
        "train_loss_tokens": "output tokens only (prompt masked)",
        "output_head_at_trained_positions_only": recipe.trained_logits_only,
        "recipe_eval_loss": None if report is None else report.fine_tuned.loss,
        "recipe_base_eval_loss": None if report is None else report.base.loss,
    }


def worker_eval(args: argparse.Namespace, gate: Gate) -> dict[str, Any]:
    """The common metric: mean cross-entropy per output token of held-out records, each
    sequence alone in its row (no packing), dropout off."""
    torch = _setup_torch(args.threads, args.seed)
    from peft import PeftModel  # noqa: PLC0415

    from kubetune_trainer.data import collate_padded, load_records, tokenize_records  # noqa: PLC0415

    tokenizer, base = _load(args.work)
    dataset = load_records(args.work / "data" / "validation.jsonl", "instruction")
    examples = tokenize_records(dataset.records, tokenizer, dataset.format, ROWS_TOKENS)

    # Sorted by length into small right-padded batches: each sequence still runs alone in its
    # own row (causal attention never reaches the padding after it), just several at once.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    groups = [order[i : i + 16] for i in range(0, len(order), 16)]

    def evaluate(model: Any) -> dict[str, float]:
        model.eval()
        out_sum = all_sum = 0.0
        out_n = all_n = 0
        with torch.inference_mode():
            for group in groups:
                batch = collate_padded([examples[i] for i in group], tokenizer.pad_token_id)
                ids, mask, trained = batch.input_ids, batch.attention_mask, batch.labels != -100
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), ids[:, 1:], reduction="none"
                )
                real, out = mask[:, 1:].bool(), trained[:, 1:]
                out_sum += float(nll[out].sum())
                out_n += int(out.sum())
                all_sum += float(nll[real].sum())
                all_n += int(real.sum())
        return {"output_tokens": out_sum / out_n, "all_tokens": all_sum / all_n}

    results: dict[str, Any] = {"base": evaluate(base), "examples": len(examples)}
    for name in args.adapters:
        model = PeftModel.from_pretrained(base, args.work / "runs" / name / "adapter")
        results[name] = evaluate(model)
        base = model.unload()  # the same base weights for the next adapter
    return results


WORKERS = {
    "classic": worker_classic,
    "pipeline": worker_pipeline,
    "recipe": worker_recipe,
    "eval": worker_eval,
}

# ---------------------------------------------------------------------------- orchestration


class Run:
    """One worker process and its place in the interleaving."""

    def __init__(self, args: argparse.Namespace, name: str, role: str, extra: list[str]) -> None:
        self.name = name
        self.out_dir = args.work / "runs" / name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "result.json").unlink(missing_ok=True)
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *("--worker", role, "--work", str(args.work), "--out-dir", str(self.out_dir)),
            *("--threads", str(args.threads), "--seed", str(args.seed)),
            *extra,
        ]
        threads = next((extra[i + 1] for i, a in enumerate(extra) if a == "--threads"), None)
        read_fd, write_fd = os.pipe()
        env = {
            **os.environ,
            "OMP_NUM_THREADS": threads or str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONHASHSEED": "0",
            "HF_HUB_OFFLINE": "1",
            GATE_ENV: str(write_fd),
        }
        self.log = (self.out_dir / "log.txt").open("w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        self.events = os.fdopen(read_fd, "r")
        self.state = "starting"  # -> ready / running -> trained -> exited
        self.done, self.total = 0, 1

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def collect(self) -> dict[str, Any]:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - self.started
        self.log.close()
        result_file = self.out_dir / "result.json"
        if self.proc.returncode != 0 or not result_file.is_file():
            tail = (self.out_dir / "log.txt").read_text()[-4000:]
            raise SystemExit(f"worker {self.name} failed (exit {self.proc.returncode}):\n{tail}")
        result: dict[str, Any] = json.loads(result_file.read_text())
        result["process_wall_s"] = wall
        result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
        if "useful_tokens" in result:
            result["useful_tokens_per_s"] = result["useful_tokens"] / result["train_s"]
            result["useful_tokens_per_cpu_s"] = result["useful_tokens"] / result["train_cpu_s"]
            result["padding_fraction"] = 1 - result["useful_tokens"] / result["processed_tokens"]
        return result


def run_interleaved(
    args: argparse.Namespace, specs: dict[str, tuple[str, list[str]]]
) -> dict[str, dict[str, Any]]:
    """Start every worker, then hand out optimizer steps one at a time, always to the worker
    that is least far through its run, so each run's steps are spread over the same period."""
    runs = {name: Run(args, name, role, extra) for name, (role, extra) in specs.items()}
    results: dict[str, dict[str, Any]] = {}
    try:
        while True:
            busy = [r for r in runs.values() if r.state in ("starting", "running")]
            if not busy:
                ready = [r for r in runs.values() if r.state == "ready"]
                if ready:
                    nxt = min(ready, key=lambda r: (r.done / r.total, r.name))
                    nxt.state = "running"
                    nxt.go()
                    continue
                for run in runs.values():
                    if run.state == "trained":
                        run.go()  # every run is trained: release them all to save and exit
                break
            waiting = [r for r in runs.values() if r.state not in ("trained", "exited")]
            readable, _, _ = select.select([r.events for r in waiting], [], [])
            for stream in readable:
                run = next(r for r in waiting if r.events is stream)
                line = stream.readline()
                if not line:  # the process exited (workers without a gate, or a failure)
                    run.state = "exited"
                    results[run.name] = run.collect()  # raises if it failed
                    continue
                words = line.split()
                if words[0] == "ready":
                    run.state, run.done, run.total = "ready", int(words[1]), max(1, int(words[2]))
                elif words[0] == "trained":
                    run.state = "trained"
        for name, run in runs.items():
            if name not in results:
                results[name] = run.collect()
            print(f"{name}: {_describe(results[name])}", flush=True)
        return results
    finally:
        for run in runs.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def run_single(args: argparse.Namespace, name: str, role: str, extra: list[str]) -> dict[str, Any]:
    return run_interleaved(args, {name: (role, extra)})[name]


def _describe(result: dict[str, Any]) -> str:
    if "useful_tokens_per_s" not in result:
        return f"done in {result['process_wall_s']:.1f}s"
    return (
        f"{result['useful_tokens_per_s']:.0f} useful tok/s, train {result['train_s']:.1f}s "
        f"({result['train_cpu_s']:.1f} CPU-s), {result['optimizer_steps']} steps, padding "
        f"{result['padding_fraction']:.1%}, peak RSS {result['peak_rss_mib']:.0f} MiB"
    )


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def upload_inputs(work: Path, env: dict[str, str]) -> tuple[str, str]:
    """Model and data to the local S3 server, as a user would; (base URI, output URI)."""
    from kubetune_trainer.storage import Storage  # noqa: PLC0415

    bucket = env.get("KUBETUNE_S3_BUCKET", "kubetune")
    run_id = uuid.uuid4().hex[:10]
    base = f"s3://{bucket}/bench/trainer/{run_id}"
    storage = Storage(env=env, work_dir=work, use_cache=False)
    storage.upload_dir(work / "model", f"{base}/model")
    storage.upload_dir(work / "data", f"{base}/data")
    return base, f"{base}/output/"


def plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    runs = result["runs"]
    names = list(runs)
    short = {
        "baseline": "classic\n(pad to 512,\nHF Trainer)",
        "contender": "kubetune\nFineTuneRecipe\n(packed)",
        "pipeline_loop": "project pipeline,\nplain loop",
        "naive_no_mask": "naive packing\n(no mask;\nbound only)",
        "float_mask": "pipeline,\nfloat mask",
        "rows_8_x_2": "pipeline,\n8 rows x GA 2",
        "rows_1_x_4": "pipeline,\n1 row x GA 4",
        "one_thread": "pipeline,\n1 thread",
        "label_only_logits": "pipeline, head\nonly on labels",
        "recipe_8x2": "FineTuneRecipe\n8 rows x GA 2",
        "recipe_full_logits": "FineTuneRecipe,\nhead at every\nposition",
    }
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(7 + 1.1 * len(names), 5),
        dpi=110,
        gridspec_kw={"width_ratios": [max(3, len(names)), 3]},
    )
    values = [runs[n]["useful_tokens_per_s"] for n in names]
    colors = ["#8c8c8c", "#2a7ab0"] + ["#9ecae1"] * len(names)
    bars = left.bar(range(len(names)), values, color=colors[: len(names)])
    left.set_xticks(range(len(names)), [short.get(n, n) for n in names], fontsize=7)
    left.set_ylabel("useful (non-padding) tokens / s")
    left.set_title(
        f"training throughput: {result['ratio']:.2f}x (target {TARGET_RATIO:g}x)", fontsize=10
    )
    for bar, value in zip(bars, values, strict=True):
        left.annotate(
            f"{value:,.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", fontsize=7
        )
    goal = runs["baseline"]["useful_tokens_per_s"] * TARGET_RATIO
    left.axhline(goal, color="#c44e52", linestyle="--", linewidth=1)
    left.annotate(
        f"{TARGET_RATIO:g}x classic", (-0.4, goal), va="bottom", fontsize=7, color="#c44e52"
    )
    left.set_ylim(0, max([*values, goal]) * 1.12)
    val = result["validation_loss"]
    keys = ["base", "baseline", "contender"]
    losses = [val[k]["output_tokens"] for k in keys]
    right.bar(range(3), losses, color=["#cccccc", "#8c8c8c", "#2a7ab0"])
    right.set_xticks(range(3), ["untrained", "classic", "kubetune"], fontsize=8)
    spread = max(losses) - min(losses)
    right.set_ylim(min(losses) - max(spread, 0.01) * 2, max(losses) + max(spread, 0.01))
    right.set_ylabel("validation cross-entropy (nats)")
    right.set_title(
        "held-out loss per output token\n(each sequence alone; lower is better)", fontsize=9
    )
    for i, value in enumerate(losses):
        right.annotate(f"{value:.4f}", (i, value), ha="center", fontsize=8)
    footer = f"{benchlib.device_line(result['device'])}\n{result['command']}"
    fig.text(0.01, 0.01, footer, fontsize=6.5, color="#555555")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


EXPLORE: dict[str, list[str]] = {
    # name: extra worker arguments of the plain-loop pipeline (see docs/benchmarks.md)
    "pipeline_loop": [],
    "naive_no_mask": ["--mask", "none"],
    "float_mask": ["--mask", "float"],
    "rows_8_x_2": ["--rows", "8", "--grad-accum", "2"],
    "rows_1_x_4": ["--rows", "1", "--grad-accum", "4"],
    "one_thread": ["--threads", "1"],
    "label_only_logits": ["--logits", "labels"],
}


def _shape(text: str) -> tuple[int, int]:
    rows, _, accum = text.lower().partition("x")
    try:
        shape = int(rows), int(accum)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxACCUM, e.g. 8x2 (got {text!r})") from None
    if min(shape) < 1:
        raise argparse.ArgumentTypeError(f"rows and accumulation must be positive (got {text!r})")
    return shape


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Trainer throughput on CPU: the classic padded HF-Trainer recipe vs "
        "kubetune's packed trainer (useful tokens/s, wall time, peak RSS, train and "
        "validation loss). Needs the local S3 server (make cluster-up) for the recipe's inputs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--records", type=int, help="training records (default 400)")
    parser.add_argument("--validation", type=int, help="held-out records (default 120)")
    parser.add_argument(
        "--quick", action="store_true", help="16 records, vocab 1024: a smoke test (not a measure)"
    )
    parser.add_argument("--threads", type=int, default=benchlib.usable_cores())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, help="tokenizer vocabulary (default 8192)")
    parser.add_argument(
        "--contender",
        choices=["recipe", "pipeline"],
        default="recipe",
        help="recipe: FineTuneRecipe (default); pipeline: the project's data pipeline in a "
        "plain loop (no S3 needed)",
    )
    parser.add_argument(
        "--explore",
        action="store_true",
        help="also run plain-loop variants of the contender: the loop itself, naive packing "
        "(no mask), float mask, 8 rows x grad-accum 2, 1 row x grad-accum 4, 1 thread, output "
        "head only on labels",
    )
    parser.add_argument(
        "--recipe-shape",
        type=_shape,
        action="append",
        default=[],
        metavar="ROWSxACCUM",
        help="also run FineTuneRecipe with batchSize ROWS and gradientAccumulationSteps ACCUM "
        "(for example 8x2; repeatable); the contender keeps the classic 4x4",
    )
    parser.add_argument(
        "--recipe-full-logits",
        action="store_true",
        help="also run FineTuneRecipe with the output head at every position (as before it "
        "learned to skip untrained positions): the same training, for an A/B of that change",
    )
    parser.add_argument("--work", type=Path, default=benchlib.ROOT / ".dev/bench/trainer")
    parser.add_argument("--out", type=Path, default=benchlib.DOCS_DIR / "trainer_throughput.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    parser.add_argument("--no-plot", action="store_true")
    # Internal: one measured run in this process (started by the orchestrator).
    hidden = argparse.SUPPRESS
    parser.add_argument("--worker", choices=list(WORKERS), help=hidden)
    parser.add_argument("--out-dir", type=Path, help=hidden)
    parser.add_argument("--rows", type=int, default=4, help=hidden)
    parser.add_argument("--grad-accum", type=int, default=4, help=hidden)
    parser.add_argument("--mask", choices=["block", "float", "none"], default="block", help=hidden)
    parser.add_argument("--adapters", nargs="*", default=[], help=hidden)
    parser.add_argument("--logits", choices=["all", "labels"], default="all", help=hidden)
    parser.add_argument("--full-logits", action="store_true", help=hidden)
    parser.add_argument("--s3-base", help=hidden)
    parser.add_argument("--s3-output", help=hidden)
    args = parser.parse_args(argv)
    args.records = args.records or (16 if args.quick else 400)
    args.validation = args.validation or (4 if args.quick else 120)
    args.vocab = args.vocab or (1024 if args.quick else 8192)
    if args.threads < 1 or args.records < 1 or args.validation < 1:
        parser.error("--threads, --records and --validation must be positive")
    return args


def worker_main(args: argparse.Namespace) -> None:
    gate = Gate()
    result = WORKERS[args.worker](args, gate)
    result["startup_s"] = time.perf_counter() - _STARTED
    result["self_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    benchlib.write_json(args.out_dir / "result.json", result)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return {}
    # A terminated benchmark unwinds, so run_interleaved stops its workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    device = benchlib.device_info()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = build_assets(args.work, args.records, args.validation, args.seed, args.vocab)
    data["build_s"] = time.perf_counter() - t0
    print(f"data: {json.dumps(data['alpaca_tokens_per_record'])}", flush=True)

    specs: dict[str, tuple[str, list[str]]] = {"baseline": ("classic", [])}
    if args.contender == "recipe":
        env = benchlib.load_s3_env()
        os.environ.update(env)
        base, output = upload_inputs(args.work, env)
        specs["contender"] = ("recipe", ["--s3-base", base, "--s3-output", output])
        for shape in args.recipe_shape:
            rows, accum = shape
            variant = f"{output.rstrip('/')}-{rows}x{accum}/"
            shape_args = ["--rows", str(rows), "--grad-accum", str(accum)]
            specs[f"recipe_{rows}x{accum}"] = (
                "recipe",
                ["--s3-base", base, "--s3-output", variant, *shape_args],
            )
        if args.recipe_full_logits:
            output_full = f"{output.rstrip('/')}-full-logits/"
            specs["recipe_full_logits"] = (
                "recipe",
                ["--s3-base", base, "--s3-output", output_full, "--full-logits"],
            )
        kind = "kubetune FineTuneRecipe (trainer_image/kubetune_trainer/recipe.py)"
    else:
        specs["contender"] = ("pipeline", [])
        kind = "project data pipeline in a plain loop (no recipe)"
    if args.explore:
        specs.update({name: ("pipeline", extra) for name, extra in EXPLORE.items()})
    runs = run_interleaved(args, specs)
    adapters = list(runs)
    if args.contender == "recipe":
        storage_base = specs["contender"][1][1]
        from kubetune_trainer.storage import Storage  # noqa: PLC0415

        Storage(env=os.environ, work_dir=args.work, use_cache=False).delete_prefix(storage_base)
    evaluation = run_single(args, "eval", "eval", ["--adapters", *adapters])

    baseline, contender = runs["baseline"], runs["contender"]
    ratio = contender["useful_tokens_per_s"] / baseline["useful_tokens_per_s"]
    val = {k: evaluation[k] for k in ["base", *adapters]}
    val["examples"] = evaluation["examples"]
    val["metric"] = (
        "mean cross-entropy (nats) per output token of held-out records, each sequence alone; "
        "all_tokens also counts prompt tokens (the classic recipe's training objective)"
    )
    val_ratio = val["contender"]["output_tokens"] / val["baseline"]["output_tokens"]
    isolation = None
    if contender.get("recipe_eval_loss") is not None:
        # The recipe evaluates packed (like training); the benchmark one sequence at a time.
        # Equal losses mean packing kept the sequences apart.
        isolation = {
            "recipe_packed_eval_loss": contender["recipe_eval_loss"],
            "benchmark_one_sequence_loss": val["contender"]["output_tokens"],
            "abs_difference": abs(
                contender["recipe_eval_loss"] - val["contender"]["output_tokens"]
            ),
        }
    result: dict[str, Any] = {
        "benchmark": "trainer_throughput",
        "measured_at": benchlib.now(),
        "command": benchlib.command_line(),
        "device": device,
        "threads": args.threads,
        "data": data,
        "contender_kind": kind,
        "method": "all runs alive at once, optimizer steps handed out one at a time (never two "
        "runs computing together); train_s sums a run's own steps",
        "runs": runs,
        "validation_loss": val,
        "ratio": ratio,
        "ratio_cpu_time": contender["useful_tokens_per_cpu_s"]
        / baseline["useful_tokens_per_cpu_s"],
        "validation_loss_ratio": val_ratio,
        "packing_isolation": isolation,
        "target": {
            "ratio": TARGET_RATIO,
            "validation_loss_within": VAL_TOLERANCE,
            "ratio_met": ratio >= TARGET_RATIO,
            "validation_met": val_ratio <= 1 + VAL_TOLERANCE,
        },
        "total_wall_s": time.perf_counter() - started,
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    result["target"]["met"] = result["target"]["ratio_met"] and result["target"]["validation_met"]
    result = _round(result)
    benchlib.write_json(args.out, result)
    print(
        f"contender {contender['useful_tokens_per_s']:.0f} vs classic "
        f"{baseline['useful_tokens_per_s']:.0f} useful tok/s: {ratio:.2f}x "
        f"(target {TARGET_RATIO:g}x); validation loss {val['contender']['output_tokens']:.4f} vs "
        f"{val['baseline']['output_tokens']:.4f} (untrained {val['base']['output_tokens']:.4f})"
        f" -> {args.out}",
        flush=True,
    )
    if not args.no_plot:
        plot(args.plot or args.out.with_suffix(".png"), result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
