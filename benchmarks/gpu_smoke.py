"""GPU smoke test of the trainer's building blocks: LoRA and QLoRA steps on a 1B+ Llama.

    python benchmarks/gpu_smoke.py                          # LoRA + QLoRA, 1.1B Llama, 4x512
    python benchmarks/gpu_smoke.py --methods qlora --rows 8 --seq 1024 --steps 30
    python benchmarks/gpu_smoke.py --gradient-checkpointing # recompute activations
    python benchmarks/gpu_smoke.py --tiny --allow-cpu --methods lora --steps 3   # CPU check

Needs a CUDA GPU (and bitsandbytes for qlora); nothing is downloaded. A random-init Llama of
the TinyLlama shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocab
32000: 1.10B parameters) is saved once in bf16 to a temporary directory and loaded through the
recipe's own path (modeling.load_base_model + prepare_for_training: SDPA, bf16 or 4-bit nf4 with
double quant, peft LoRA r16 on all linear layers). Synthetic examples (lognormal lengths, mean
~90 tokens, loss on the second half) are packed by plan.TrainingPlan into rows of --seq tokens,
collated with the 4D block-diagonal mask and trained with recipe.train_step (AdamW, cosine
schedule), exactly as in a FineTuneJob.

Prints one JSON object per method: first/last loss (it should fall: every sequence repeats a
short random pattern, and a NaN or a rising loss points at the precision/quantization path),
useful (non-pad) tokens/s after warmup, peak allocated GPU memory, and the trainer's memory
estimate for the same shape (estimate.py), to compare with the measured peak.
"""

# Heavy imports (torch, transformers, the trainer) live in functions: --help must be instant.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TINYLLAMA = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="LoRA/QLoRA training steps of the kubetune trainer on a random-init Llama.",
        epilog=__doc__.split("\n\n", 1)[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", default="lora,qlora", help="comma-separated: lora,qlora,full")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from tokens/s")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    parser.add_argument("--seq", type=int, default=512, help="tokens per packed row")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (code check)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (lora/full)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_examples(n: int, vocab: int, max_len: int, seed: int) -> list[Any]:
    """Sequences that repeat a short random pattern; loss on the second half."""
    from kubetune_trainer.data import IGNORE_INDEX, Example

    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        length = max(8, min(max_len, round(rng.lognormvariate(math.log(75), 0.6))))
        pattern = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))]
        ids = [pattern[i % len(pattern)] for i in range(length)]
        half = length // 2
        examples.append(Example(ids, [IGNORE_INDEX] * half + ids[half:]))
    return examples


def build_model(directory: Path, shape: dict[str, int]) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    config.dtype = "bfloat16"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model


def run_method(method: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from kubetune_trainer import estimate as mem
    from kubetune_trainer.api import FineTuneSpec
    from kubetune_trainer.data import collate_packed
    from kubetune_trainer.modeling import (
        choose_precision,
        load_base_model,
        parameter_counts,
        prepare_for_training,
        read_model_config,
    )
    from kubetune_trainer.plan import TrainingPlan, build_scheduler
    from kubetune_trainer.recipe import seed_everything, train_step

    spec = FineTuneSpec.model_validate(
        {
            "baseModel": {"uri": "s3://bench/model"},
            "dataset": {"trainUri": "s3://bench/data", "maxSeqLength": args.seq},
            "method": method,
            "hyperparameters": {"learningRate": args.lr},
            "output": {"uri": "s3://bench/out"},
        }
    )
    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision(spec, device)
    config = read_model_config(model_dir)
    shape = mem.ModelShape.from_config(config)
    estimate = mem.estimate_memory(
        shape,
        method=spec.method,
        batch_size=args.rows,
        seq_length=args.seq,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = load_base_model(model_dir, spec, precision)
    model = prepare_for_training(base, spec, gradient_checkpointing=args.gradient_checkpointing)
    if method != "qlora":  # 4-bit weights are placed by from_pretrained and cannot move
        model.to(device)
    model.train()
    trainable, total = parameter_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]

    needed = args.steps * args.grad_accum * args.rows * args.seq
    examples = synthetic_examples(needed // 60 + 64, shape.vocab, args.seq, args.seed)
    plan = TrainingPlan(
        lengths=[len(e) for e in examples],
        max_seq_length=args.seq,
        batch_size=args.rows,
        gradient_accumulation_steps=args.grad_accum,
        seed=args.seed,
        epochs=1,
        max_steps=args.steps,
    )
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    scheduler = build_scheduler(
        optimizer, kind="cosine", total_steps=plan.total_steps, warmup_ratio=0.05
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
    trained = [e.num_trained for e in examples]

    def collate(micro: list[list[int]]) -> Any:
        return collate_packed([[examples[i] for i in row] for row in micro], 0)

    losses: list[float] = []
    tokens_timed = 0
    started = 0.0
    for step in range(plan.total_steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
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
        losses.append(float(loss.item()))
        if step >= args.warmup:
            tokens_timed += tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    timed = plan.total_steps > args.warmup
    elapsed = time.perf_counter() - started if timed else 0.0
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    result = {
        "method": method,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": total,
        "trainable": trainable,
        "micro_batch": f"{args.rows}x{args.seq}",
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": plan.total_steps,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "useful_tokens_per_second": tokens_timed / elapsed if timed else None,
        "peak_gpu_memory_bytes": peak,
        "peak_gpu_memory_gib": None if peak is None else round(peak / 2**30, 2),
        "estimate_bytes": estimate.per_gpu,
        "estimate_basis": estimate.basis,
    }
    del model, base, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports only after argument parsing, so --help is instant on any machine.
    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA GPU: run on a GPU machine, or pass --allow-cpu --tiny", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, TINY if args.tiny else TINYLLAMA)
        for method in methods:
            print(json.dumps(run_method(method, model_dir, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
