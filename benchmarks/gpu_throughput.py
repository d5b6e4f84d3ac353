"""GPU throughput: the classic recipe against kubetune's trainer on a 7B-class Llama.

    .venv/bin/python benchmarks/gpu_throughput.py                     # every variant, ~8 min
    .venv/bin/python benchmarks/gpu_throughput.py --variants classic_lora,kubetune_lora
    .venv/bin/python benchmarks/gpu_throughput.py --tiny --allow-cpu  # code check on a CPU

One short script for a GPU machine; nothing is downloaded. A random-init Llama-2-7B-shaped model
(hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000: 6.74B parameters) is built
on the GPU in bf16 and saved once under --work; every variant then loads it in a fresh process
(so peak memory and allocator state are its own) and trains on the same generated Alpaca-like
records (benchmarks/trainer_throughput.py: mean ~90 tokens, tail past 512), LoRA r16 alpha32
dropout 0.05 on q,k,v,o_proj, learning rate 2e-4:

  classic_lora          HF Trainer, fp16 weights + fp16 mixed precision (bf16 where fp16
                        cannot run, fp32 on CPU), padding="max_length" to 512, batch 4, grad-accum 4
  kubetune_lora         kubetune's trainer path: modeling.load_base_model (bf16, SDPA) +
                        prepare_for_training, plan.TrainingPlan packing, collate_packed (4D
                        block-diagonal mask, positions restarting per sequence), recipe.train_step;
                        4 packed rows of 512 x grad-accum 4 (the same hyperparameters)
  kubetune_lora_16rows  the same with 16 rows x grad-accum 1 (same tokens per optimizer step)
  classic_qlora_gc      the classic QLoRA recipe: nf4 + double quant, bf16 compute,
                        prepare_model_for_kbit_training with gradient checkpointing, HF Trainer,
                        padding to 512, batch 4, grad-accum 4 ("plain QLoRA + checkpointing")
  kubetune_qlora_gc     kubetune's trainer, method qlora, gradient checkpointing on
  kubetune_qlora        kubetune's trainer, method qlora, gradient checkpointing off

Reported per variant: useful (non-padding) tokens/s over the timed steps (after --warmup steps),
MFU = useful tokens/s x 4 x parameters / 989 TFLOP/s (H100 SXM dense bf16; frozen base:
forward 2N + input-gradient 2N per token), the same counting padding, and peak GPU memory
(torch.cuda.max_memory_allocated, weights included), beside the trainer's own estimate for the
shape (estimate.py, which it checks a GPU against before training). kubetune_lora also checks
that packing keeps sequences apart: two examples packed in one row against each alone
(max |logit diff|), next to the same comparison without the mask. Targets (issue): LoRA >= 10x
classic useful tokens/s and >= 55% MFU; QLoRA peak <= 6 GiB at >= 1.5x classic_qlora_gc.

QLoRA needs bitsandbytes; an image without it reports those variants as skipped (install the
wheel, e.g. `pip install --no-index bitsandbytes-0.50.2-*.whl`, then rerun them).
Prints one JSON document (also written to --out) with the device name.
"""

# Heavy imports (torch, transformers, the trainer) live in functions: --help must be instant.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

PEAK_TFLOPS = 989.0  # H100 SXM, dense bf16
ROW_TOKENS = 512
LLAMA_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 2048,
}
# name: (kind, method, rows, grad-accum, gradient checkpointing)
VARIANTS: dict[str, tuple[str, str, int, int, bool]] = {
    "classic_lora": ("classic", "lora", 4, 4, False),
    "kubetune_lora": ("kubetune", "lora", 4, 4, False),
    "kubetune_lora_16rows": ("kubetune", "lora", 16, 1, False),
    "classic_qlora_gc": ("classic", "qlora", 4, 4, True),
    "kubetune_qlora_gc": ("kubetune", "qlora", 4, 4, True),
    "kubetune_qlora": ("kubetune", "qlora", 4, 4, False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Classic padded HF-Trainer recipe vs kubetune's packed trainer on a "
        "7B-class random-init Llama: LoRA bf16 and QLoRA; useful tokens/s, MFU, peak GPU memory.",
        epilog="Variants: " + ", ".join(VARIANTS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--records", type=int, default=2500, help="generated records")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (code check)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (LoRA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kubetune-gpu-bench"))
    parser.add_argument("--out", type=Path, default=benchlib.DOCS_DIR / "gpu_throughput.json")
    parser.add_argument("--plot", type=Path, default=benchlib.DOCS_DIR / "gpu_throughput.png")
    hidden = argparse.SUPPRESS
    parser.add_argument("--worker", choices=list(VARIANTS), help=hidden)
    parser.add_argument("--result", type=Path, help=hidden)
    args = parser.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be positive and --warmup not negative")
    return args


# ---------------------------------------------------------------------------------- assets


def build_assets(args: argparse.Namespace) -> dict[str, Any]:
    """Tokenizer, records and the random-init model under --work (model reused if present)."""
    import random

    import torch
    import trainer_throughput as tt
    from assets import build_tokenizer  # examples/quickstart/assets.py
    from transformers import LlamaForCausalLM

    from kubetune_trainer.data.templates import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT
    from localenv import models  # tests/localenv/models.py

    shape = TINY if args.tiny else LLAMA_7B
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    gen = tt.TextGenerator(args.seed)
    rng = random.Random(args.seed + 1)
    corpus = [gen.text(rng.randint(5, 60), rng) for _ in range(20_000)]
    corpus += [ALPACA_PROMPT_WITH_INPUT, ALPACA_PROMPT_NO_INPUT] * 200
    tokenizer = build_tokenizer(corpus, vocab_size=shape["vocab_size"])
    tokenizer.save_pretrained(work / "tokenizer")
    records = tt.alpaca_like_records(args.records, args.seed + 2, gen)
    with (work / "records.jsonl").open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")

    model_dir = work / ("model-tiny" if args.tiny else "model-7b")
    marker = model_dir / "config.json"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = models.llama_config(
        shape["vocab_size"],
        hidden=shape["hidden_size"],
        intermediate=shape["intermediate_size"],
        layers=shape["num_hidden_layers"],
        heads=shape["num_attention_heads"],
        kv_heads=shape["num_key_value_heads"],
        max_positions=4096,
        tokenizer=tokenizer,
    )
    t0 = time.perf_counter()
    if not marker.is_file():
        torch.manual_seed(args.seed)
        with torch.device(device):
            model: Any = LlamaForCausalLM(config)
        model = model.to(torch.bfloat16)
        model.save_pretrained(model_dir)
        del model
    params = _parameter_count(config)
    return {
        "model_dir": str(model_dir),
        "parameters": params,
        "shape": shape,
        "tokenizer_vocab": len(tokenizer),
        "records": len(records),
        "build_s": round(time.perf_counter() - t0, 1),
    }


def _parameter_count(config: Any) -> int:
    h, i, n, v = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return int(n * per_layer + 2 * v * h + h)


# ---------------------------------------------------------------------------------- workers


def _records(work: Path) -> list[dict[str, Any]]:
    lines = (work / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line]


def _cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"peak_gpu_memory_gib": None}
    return {
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
    }


def worker_classic(args: argparse.Namespace, variant: str, model_dir: Path) -> dict[str, Any]:
    """The classic recipe: HF Trainer on padded rows; QLoRA the way the guides do it."""
    import torch
    import trainer_throughput as tt
    from peft import prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    _, method, rows, accum, _ = VARIANTS[variant]
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.work / "tokenizer")
    kwargs: dict[str, Any] = {"device_map": {"": 0}} if cuda else {}
    fp16 = bf16 = False
    if method == "qlora":
        make_config: Any = BitsAndBytesConfig  # untyped
        kwargs["quantization_config"] = make_config(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
        bf16 = True
    elif cuda and torch.cuda.get_device_capability()[0] >= 7:
        kwargs["dtype"], fp16 = torch.float16, True  # the guide's fp16
    elif cuda:
        kwargs["dtype"], bf16 = torch.bfloat16, True
    else:
        kwargs["dtype"] = torch.float32  # fp16 cannot train on a CPU
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False
    if method == "qlora":
        prepare: Any = prepare_model_for_kbit_training  # untyped
        model = prepare(model, use_gradient_checkpointing=True)
    model = tt.classic_lora_model(model)
    texts = [tt.classic_text(r, tokenizer.eos_token) for r in _records(args.work)]
    encoded = tokenizer(texts, padding="max_length", max_length=ROW_TOKENS, truncation=True)
    dataset = [
        {"input_ids": i, "attention_mask": m}
        for i, m in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    ]
    base_collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    counted = {"useful": 0, "processed": 0}

    def collator(features: list[dict[str, Any]]) -> Any:
        batch = base_collator(features)
        counted["useful"] += int(batch["attention_mask"].sum())
        counted["processed"] += int(batch["attention_mask"].numel())
        return batch

    marks: dict[str, Any] = {}
    warmup, total = args.warmup, args.warmup + args.steps

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if warmup == 0:
                _cuda_sync()
                marks["start"] = (time.perf_counter(), 0, 0)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Batches of step k are collated at its start, so the counts are exact here.
            if state.global_step == warmup:
                _cuda_sync()
                marks["start"] = (time.perf_counter(), counted["useful"], counted["processed"])
            if state.global_step == total:
                _cuda_sync()
                marks["end"] = (time.perf_counter(), counted["useful"], counted["processed"])

    training_args = TrainingArguments(
        output_dir=str(args.work / "hf-trainer" / variant),
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=accum,
        learning_rate=2e-4,
        max_steps=total,
        fp16=fp16,
        bf16=bf16,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        disable_tqdm=True,
        use_cpu=not cuda,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[Timer()],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    seconds = marks["end"][0] - marks["start"][0]
    return {
        "useful_tokens": marks["end"][1] - marks["start"][1],
        "processed_tokens": marks["end"][2] - marks["start"][2],
        "timed_s": seconds,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "precision": "fp16" if fp16 else ("bf16" if bf16 else "fp32"),
        **_peak(),
    }


def worker_kubetune(args: argparse.Namespace, variant: str, model_dir: Path) -> dict[str, Any]:
    """kubetune's trainer path (what FineTuneRecipe runs per step), without object storage."""
    import torch
    import trainer_throughput as tt

    from kubetune_trainer import estimate
    from kubetune_trainer.api import FineTuneSpec
    from kubetune_trainer.data import collate_packed, tokenize_records
    from kubetune_trainer.modeling import (
        attention_mask_dtype,
        choose_precision,
        load_base_model,
        load_tokenizer,
        packing_check,
        prepare_for_training,
        read_model_config,
    )
    from kubetune_trainer.plan import TrainingPlan, build_scheduler
    from kubetune_trainer.recipe import seed_everything, train_step

    _, method, rows, accum, checkpointing = VARIANTS[variant]
    cuda = torch.cuda.is_available()
    spec = FineTuneSpec.model_validate(
        {
            "baseModel": {"uri": "s3://bench/model"},
            "dataset": {"trainUri": "s3://bench/data", "maxSeqLength": ROW_TOKENS},
            "method": method,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": tt.LORA_TARGETS},
            "hyperparameters": {
                "learningRate": 2e-4,
                "batchSize": rows,
                "gradientAccumulationSteps": accum,
                "scheduler": "linear",
                "warmupRatio": 0.0,
                "seed": args.seed,
            },
            "output": {"uri": "s3://bench/out"},
            "resources": {"gpus": 1 if cuda else 0},
        }
    )
    seed_everything(args.seed)
    device = torch.device("cuda" if cuda else "cpu")
    precision = choose_precision(spec, device)
    tokenizer = load_tokenizer(args.work / "tokenizer", trust_remote_code=False)
    examples = tokenize_records(_records(args.work), tokenizer, "instruction", ROW_TOKENS)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = load_base_model(model_dir, spec, precision)
    model = prepare_for_training(base, spec, gradient_checkpointing=checkpointing)
    if method != "qlora":  # 4-bit weights are placed by from_pretrained and cannot move
        model.to(device)
    model.train()
    mask_dtype = attention_mask_dtype(base, precision)
    pad_id = int(tokenizer.pad_token_id)
    total = args.warmup + args.steps
    plan = TrainingPlan(
        lengths=[len(e) for e in examples],
        max_seq_length=ROW_TOKENS,
        batch_size=rows,
        gradient_accumulation_steps=accum,
        seed=args.seed,
        epochs=1,
        max_steps=total,
    )
    if plan.steps_per_epoch < total:
        raise SystemExit(
            f"{len(examples)} records give {plan.steps_per_epoch} steps: raise --records"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    scheduler = build_scheduler(optimizer, kind="linear", total_steps=total, warmup_ratio=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
    trained = [e.num_trained for e in examples]

    def collate(micro: list[list[int]]) -> Any:
        return collate_packed(
            [[examples[i] for i in row] for row in micro], pad_id, mask_dtype=mask_dtype
        )

    losses: list[float] = []
    useful = processed = 0
    started = time.perf_counter()
    for step in range(total):
        if step == args.warmup:
            _cuda_sync()
            started = time.perf_counter()
        batches = plan.step_batches(step).batches
        loss, tokens = train_step(
            model,
            batches,
            collate,
            step_tokens=sum(trained[i] for b in batches for r in b for i in r),
            world_size=1,
            precision=precision,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            params=params,
        )
        if step >= args.warmup:
            useful += tokens
            processed += sum(
                len(micro) * max(sum(len(examples[i]) for i in row) for row in micro)
                for micro in batches
            )
        if step in (0, total - 1):
            losses.append(float(loss.item()))
    _cuda_sync()
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "useful_tokens": useful,
        "processed_tokens": processed,
        "timed_s": seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "precision": str(precision.compute_dtype or torch.float32).removeprefix("torch."),
        **_peak(),
        # The trainer's own memory estimate for this shape (what it checks a GPU against
        # before training), to compare with the measured peak.
        "estimate_gib": round(
            estimate.estimate_memory(
                estimate.ModelShape.from_config(read_model_config(model_dir)),
                method=spec.method,
                batch_size=rows,
                seq_length=ROW_TOKENS,
                gradient_checkpointing=checkpointing,
                target_modules=tt.LORA_TARGETS,
            ).per_gpu
            / 2**30,
            2,
        ),
    }
    if variant == "kubetune_lora":
        check = packing_check(
            model,
            examples[0],
            examples[1],
            pad_token_id=pad_id,
            mask_dtype=mask_dtype,
            precision=precision,
        )
        result["isolation_check"] = {
            "max_abs_logit_diff_masked": check.masked,
            "max_abs_logit_diff_naive": check.naive,
            "logit_scale": check.scale,
        }
    return result


# ---------------------------------------------------------------------------- orchestration


def run_variant(args: argparse.Namespace, variant: str, assets: dict[str, Any]) -> dict[str, Any]:
    kind, method, rows, accum, checkpointing = VARIANTS[variant]
    result_file = args.work / f"result-{variant}.json"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--worker", variant, "--result", str(result_file), "--work", str(args.work)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed)),
        *(["--tiny"] if args.tiny else []),
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    row: dict[str, Any] = {
        "kind": kind,
        "method": method,
        "micro_batch": f"{rows}x{ROW_TOKENS}" + (" padded" if kind == "classic" else " packed"),
        "gradient_accumulation_steps": accum,
        "gradient_checkpointing": checkpointing,
        "process_wall_s": round(time.perf_counter() - started, 1),
    }
    if proc.returncode != 0 or not result_file.is_file():
        row["error"] = (proc.stdout + proc.stderr)[-1500:]
        return row
    row.update(json.loads(result_file.read_text()))
    if row.get("skipped"):
        return row
    params = assets["parameters"]
    row["useful_tokens_per_s"] = row["useful_tokens"] / row["timed_s"]
    row["processed_tokens_per_s"] = row["processed_tokens"] / row["timed_s"]
    row["mfu_useful"] = row["useful_tokens_per_s"] * 4 * params / (PEAK_TFLOPS * 1e12)
    row["mfu_counting_padding"] = row["processed_tokens_per_s"] * 4 * params / (PEAK_TFLOPS * 1e12)
    return row


def worker_main(args: argparse.Namespace) -> None:
    import torch

    variant = args.worker
    kind, method, *_ = VARIANTS[variant]
    model_dir = args.work / ("model-tiny" if args.tiny else "model-7b")
    result: dict[str, Any]
    if method == "qlora" and not torch.cuda.is_available():
        result = {"skipped": "QLoRA needs a CUDA GPU (bitsandbytes 4-bit)"}
    elif method == "qlora" and not _has_bitsandbytes():
        result = {"skipped": "bitsandbytes is not installed on this machine"}
    elif kind == "classic":
        result = worker_classic(args, variant, model_dir)
    else:
        result = worker_kubetune(args, variant, model_dir)
    benchlib.write_json(args.result, result)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _ratio(rows: dict[str, Any], a: str, b: str) -> float | None:
    x, y = rows.get(a, {}), rows.get(b, {})
    if "useful_tokens_per_s" in x and "useful_tokens_per_s" in y:
        return round(float(x["useful_tokens_per_s"]) / float(y["useful_tokens_per_s"]), 2)
    return None


def summarize(rows: dict[str, Any]) -> dict[str, Any]:
    lora = [
        k
        for k in ("kubetune_lora", "kubetune_lora_16rows")
        if "useful_tokens_per_s" in rows.get(k, {})
    ]
    best_lora = max(lora, key=lambda k: rows[k]["useful_tokens_per_s"], default=None)
    small = [
        k
        for k in ("kubetune_qlora", "kubetune_qlora_gc")
        if (rows.get(k, {}).get("peak_gpu_memory_gib") or 1e9) <= 6.0
    ]
    best_qlora = max(small, key=lambda k: rows[k]["useful_tokens_per_s"], default=None)
    summary: dict[str, Any] = {
        "lora_best_variant": best_lora,
        "lora_ratio_vs_classic": None
        if best_lora is None
        else _ratio(rows, best_lora, "classic_lora"),
        "lora_mfu": None if best_lora is None else round(rows[best_lora]["mfu_useful"], 3),
        "qlora_best_variant_within_6gib": best_qlora,
        "qlora_ratio_vs_classic_qlora_gc": None
        if best_qlora is None
        else _ratio(rows, best_qlora, "classic_qlora_gc"),
    }
    summary["targets"] = {
        "lora_10x": None
        if summary["lora_ratio_vs_classic"] is None
        else summary["lora_ratio_vs_classic"] >= 10,
        "lora_mfu_55pct": None if summary["lora_mfu"] is None else summary["lora_mfu"] >= 0.55,
        "qlora_6gib_at_1_5x": None
        if summary["qlora_ratio_vs_classic_qlora_gc"] is None
        else summary["qlora_ratio_vs_classic_qlora_gc"] >= 1.5,
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA GPU: run on a GPU machine, or pass --tiny --allow-cpu", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    assets = build_assets(args)
    rows = {}
    for variant in args.variant_list:
        rows[variant] = run_variant(args, variant, assets)
        shown = {k: v for k, v in rows[variant].items() if k != "error"}
        print(json.dumps({variant: shown}), file=sys.stderr, flush=True)
        if "error" in rows[variant]:
            print(rows[variant]["error"], file=sys.stderr, flush=True)
    result = {
        "benchmark": "gpu_throughput",
        "measured_at": benchlib.now(),
        "command": benchlib.command_line(),
        "device": benchlib.device_info(),
        "model": assets,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "peak_tflops": PEAK_TFLOPS,
        "results": rows,
        "summary": summarize(rows),
        "total_wall_s": round(time.perf_counter() - started, 1),
    }
    benchlib.write_json(args.out, result)
    measured = [k for k, row in rows.items() if "useful_tokens_per_s" in row]
    if measured:
        benchlib.bar_chart(
            args.plot,
            [k.replace("_", "\n", 1) for k in measured],
            [rows[k]["useful_tokens_per_s"] for k in measured],
            title=f"{'tiny Llama' if args.tiny else '7B-class Llama'}: useful tokens/s "
            f"({args.steps} timed steps after {args.warmup})",
            ylabel="useful (non-padding) tokens / s",
            footer=f"{benchlib.device_line(result['device'])} | {result['command']}",
            annotations=[
                f"{rows[k]['useful_tokens_per_s']:,.0f}\nMFU {rows[k]['mfu_useful']:.1%}\n"
                f"{rows[k].get('peak_gpu_memory_gib') or '-'} GiB"
                for k in measured
            ],
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
