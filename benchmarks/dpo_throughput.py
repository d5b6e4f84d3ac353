"""DPO throughput: kubetune's trainer against TRL's DPOTrainer, side by side in one run.

    make cluster-up                                            # the local S3 server
    .venv/bin/python benchmarks/dpo_throughput.py              # CPU: 400 pairs, one epoch
    .venv/bin/python benchmarks/dpo_throughput.py --quick      # smoke test, measures nothing
    .venv/bin/python benchmarks/dpo_throughput.py --pairs 2000 --hidden 1024 --layers 8  # a GPU

Both train LoRA DPO (beta 0.1, sigmoid loss, the base model with the adapter off as the
reference) on the same pairs from the same random-init Llama, for the same number of pairs:
* data: the quickstart's preference pairs (examples/quickstart/assets.preference_records: chat
  questions about training jobs, the right answer preferred over a wrong one), rendered with its
  ChatML template; prompt + answer 30-65 tokens;
* model: a random-init Llama (default hidden 256, intermediate 512, 4 layers, the quickstart's
  byte-level BPE trained on the pairs), fp32 on CPU, bf16 weights and autocast on a GPU; LoRA
  r16 alpha32, dropout 0, every linear layer;
* kubetune: FineTuneRecipe, objective dpo, batchSize 4 (packed rows of pairs up to 2 x 128
  tokens: `kubetune`; one pair per row, padded: `kubetune_unpacked`), model and data from the
  local S3 server as the API requires; steps timed by the recipe (state.train_seconds);
* TRL: DPOTrainer (trl 1.16), per_device_train_batch_size 4 pairs padded to the batch's
  longest, the same learning rate, schedule and epochs; steps timed by the Trainer
  (train_runtime).
Useful tokens are the non-padding tokens of both sequences of every pair (prompt + chosen,
prompt + rejected); useful tokens/s divides them by the training time only (model loading and
tokenization excluded). Peak memory: each run's own process peak RSS (CPU; ru_maxrss through
os.wait4) or torch.cuda.max_memory_allocated (GPU). Every run is its own process, one after the
other, `--reps` times each in alternation; the median counts. Results: --out (JSON) and the
same name with .png (a bar chart).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import benchlib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
import assets  # noqa: E402

VARIANTS = ("kubetune", "kubetune_unpacked", "trl")
MAX_SEQ = 128
BATCH = 4
LR = 5e-3
BETA = 0.1


def build_inputs(work: Path, args: argparse.Namespace) -> None:
    """Tokenizer, model and pairs, written once; every run loads the same files."""
    if (work / "model/config.json").exists():
        return
    train = assets.preference_records(args.pairs, seed=2)
    texts = [m["content"] for r in train for m in r["input"]["messages"]]
    texts += [
        r[k][0]["content"] for r in train for k in ("preferred_output", "non_preferred_output")
    ]
    tokenizer = assets.build_tokenizer(texts)
    model = assets.build_model(tokenizer, hidden=args.hidden, layers=args.layers, heads=4)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    assets.write_jsonl(work / "data/train.jsonl", train)


def _cuda() -> bool:
    import torch  # noqa: PLC0415

    return bool(torch.cuda.is_available())


def _peak_gpu() -> int | None:
    import torch  # noqa: PLC0415

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def worker_kubetune(args: argparse.Namespace, packing: bool) -> dict[str, Any]:
    from kubetune_trainer.config import TrainerConfig  # noqa: PLC0415
    from kubetune_trainer.recipe import FineTuneRecipe  # noqa: PLC0415

    env = benchlib.load_s3_env()
    work = Path(args.work)
    spec = {
        "baseModel": {"uri": args.model_uri},
        "dataset": {"trainUri": args.train_uri, "validationSplit": 0, "maxSeqLength": MAX_SEQ},
        "method": "lora",
        "objective": "dpo",
        "dpo": {"beta": BETA},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]},
        "hyperparameters": {
            "epochs": 1,
            "batchSize": BATCH,
            "gradientAccumulationSteps": 1,
            "learningRate": LR,
            "scheduler": "constant",
            "warmupRatio": 0,
            "packing": packing,
            "gradientCheckpointing": "disabled",
        },
        "evaluation": {"enabled": False},
        "output": {"uri": f"{args.output_uri}/{uuid.uuid4().hex[:8]}"},
        "resources": {"gpus": 1 if _cuda() else 0},
    }
    config = TrainerConfig.model_validate(
        {"spec": spec, "workDir": str(work / f"run-{uuid.uuid4().hex[:6]}")}
    )
    recipe = FineTuneRecipe(config, env=env)
    recipe.setup()
    recipe.train()
    state = recipe.state
    result = {
        "pairs": len(recipe.train_pairs),
        "steps": state.step,
        "useful_tokens": state.tokens_seen,
        "train_seconds": state.train_seconds,
        "final_loss": state.loss_history[-1]["loss"],
        "peak_gpu_bytes": _peak_gpu(),
    }
    recipe.cleanup()
    return result


def worker_trl(args: argparse.Namespace) -> dict[str, Any]:
    import datasets  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import trl  # noqa: PLC0415
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    work = Path(args.work)
    cuda = _cuda()
    rows = [json.loads(line) for line in (work / "data/train.jsonl").read_text().splitlines()]
    pairs = [
        {
            "prompt": r["input"]["messages"],
            "chosen": r["preferred_output"],
            "rejected": r["non_preferred_output"],
        }
        for r in rows
    ]
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    dtype = torch.bfloat16 if cuda else torch.float32  # as kubetune loads LoRA's base
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype)
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                   task_type="CAUSAL_LM"),
    )  # fmt: skip
    config = trl.DPOConfig(
        output_dir=str(work / f"trl-{uuid.uuid4().hex[:6]}"),
        beta=BETA,
        learning_rate=LR,
        lr_scheduler_type="constant",
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_length=MAX_SEQ,
        gradient_checkpointing=False,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not cuda,
        bf16=cuda,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(
        model=model, args=config, train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tokenizer,
    )  # fmt: skip
    data = trainer.train_dataset
    useful = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(
            data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True
        )
    )
    out = trainer.train()
    return {
        "pairs": len(data),
        "steps": trainer.state.global_step,
        "useful_tokens": useful,
        "train_seconds": float(out.metrics["train_runtime"]),
        "final_loss": float(out.metrics["train_loss"]),
        "peak_gpu_bytes": _peak_gpu(),
    }


def worker_main(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    if args.worker == "trl":
        result = worker_trl(args)
    else:
        result = worker_kubetune(args, packing=args.worker == "kubetune")
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(args: argparse.Namespace, name: str, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", name, "--work", str(args.work),
               "--threads", str(args.threads), *extra]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.communicate()
    if status != 0:
        raise SystemExit(f"{name} failed:\n{out[-3000:]}\n{err[-3000:]}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    result["useful_tokens_per_s"] = result["useful_tokens"] / result["train_seconds"]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=1, help="runs of each variant (median)")
    parser.add_argument("--threads", type=int, default=benchlib.usable_cores())
    parser.add_argument("--quick", action="store_true", help="smoke test: 24 pairs, tiny model")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/dpo_throughput.json")
    parser.add_argument("--work", type=Path, default=ROOT / ".dev/bench-dpo")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-uri", help=argparse.SUPPRESS)
    parser.add_argument("--train-uri", help=argparse.SUPPRESS)
    parser.add_argument("--output-uri", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.hidden, args.layers = 24, 64, 2
        args.work = args.work.with_name(args.work.name + "-quick")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return {}
    build_inputs(args.work, args)
    env = benchlib.load_s3_env()
    prefix = f"s3://{env.get('KUBETUNE_S3_BUCKET', 'kubetune')}/bench-dpo/{uuid.uuid4().hex[:8]}"
    assets.upload(args.work / "model", f"{prefix}/model", env)
    assets.upload(args.work / "data", f"{prefix}/data", env)
    extra = ["--model-uri", f"{prefix}/model", "--train-uri", f"{prefix}/data/train.jsonl",
             "--output-uri", f"{prefix}/out"]  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        for name in VARIANTS:
            result = run_worker(args, name, extra)
            runs[name].append(result)
            print(
                f"rep {rep + 1} {name:18s} {result['useful_tokens_per_s']:8.0f} useful tok/s, "
                f"{result['steps']} steps in {result['train_seconds']:.1f}s, peak RSS "
                f"{result['peak_rss_bytes'] / 2**20:.0f} MiB"
                + (
                    f", GPU peak {result['peak_gpu_bytes'] / 2**30:.2f} GiB"
                    if result["peak_gpu_bytes"]
                    else ""
                ),
                flush=True,
            )
    assets.remove(f"{prefix}/", env)
    summary = {
        name: {
            "useful_tokens_per_s": benchlib.median([r["useful_tokens_per_s"] for r in rs]),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "peak_gpu_bytes": rs[0]["peak_gpu_bytes"],
            "useful_tokens": rs[0]["useful_tokens"],
            "steps": rs[0]["steps"],
            "final_loss": rs[0]["final_loss"],
        }
        for name, rs in runs.items()
    }
    base = summary["trl"]["useful_tokens_per_s"]
    for row in summary.values():
        row["speedup_vs_trl"] = row["useful_tokens_per_s"] / base
    doc = {
        "benchmark": "dpo_throughput",
        "description": "LoRA DPO: kubetune's trainer (packed and unpacked) vs TRL DPOTrainer",
        "date": benchlib.now(),
        "command": benchlib.command_line(),
        "device": benchlib.device_info(),
        "setup": {
            "pairs": args.pairs,
            "hidden": args.hidden,
            "layers": args.layers,
            "batch_pairs": BATCH,
            "max_seq_length": MAX_SEQ,
            "learning_rate": LR,
            "beta": BETA,
            "threads": args.threads,
            "reps": args.reps,
        },
        "results": summary,
        "runs": runs,
    }
    benchlib.write_json(args.out, doc)
    order = ["trl", "kubetune_unpacked", "kubetune"]
    benchlib.bar_chart(
        args.out.with_suffix(".png"),
        ["TRL DPOTrainer (padded)", "kubetune (unpacked)", "kubetune (packed)"],
        [summary[n]["useful_tokens_per_s"] for n in order],
        title=f"LoRA DPO, {args.pairs} pairs: useful tokens/s (median of {args.reps})",
        ylabel="useful tokens/s",
        footer=f"{benchlib.device_line(doc['device'])}\n{doc['command']}",
        annotations=[
            f"{summary[n]['useful_tokens_per_s']:.0f} ({summary[n]['speedup_vs_trl']:.2f}x)\n"
            f"RSS {summary[n]['peak_rss_bytes'] / 2**20:.0f} MiB"
            for n in order
        ],
    )
    print(json.dumps(summary, indent=1))
    return doc


if __name__ == "__main__":
    main()
