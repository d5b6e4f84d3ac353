"""Data that does not fit in memory: the trainer's peak RSS and time to the first optimizer step
as the dataset grows, in-memory records and examples against streamed, memory-mapped ones.

    .venv/bin/python benchmarks/data_scale.py                               # 10k, 100k, 1M
    .venv/bin/python benchmarks/data_scale.py --sizes 10000,100000,1000000,2000000
    .venv/bin/python benchmarks/data_scale.py --sizes 200,400 --quick       # smoke test

* data: generated chat records (a system message in 20%, then one or two user / assistant
  turns of 3-40 words from a Zipf-distributed lexicon), one JSONL file per size, about 60
  tokens per record with the tokenizer below; 5% of each file is the validation split.
* model and tokenizer: a byte-level BPE (vocab 2048) trained on the generated text and a
  random-init tiny Llama (tests/localenv/models.py), saved once; the optimizer step itself is
  trivial, so the figures are the data pipeline's.
* each run is FineTuneRecipe (recipe.py) in a child process of its own, through setup() and
  one optimizer step (LoRA, batchSize 4 packed rows of 256 tokens): `in-memory` sets
  streaming_data = False (every record in a list, every example in lists: the path before
  issue #16), `streaming` is the default (records validated and tokenized as they stream past,
  into memory-mapped token arrays in the work dir), `streaming, cached` runs again on the same
  work dir (a retried or resumed pod: the tokenized cache is read, nothing is tokenized).
  Inputs are local files standing in for s3:// URIs; nothing is uploaded or published.
* peak RSS is VmHWM from the child's own /proc/self/status, read after the first step (not
  ru_maxrss, which Linux carries over from the parent across fork + exec); time to the first
  step is from the child's first line to the end of that step (imports included), with the
  setup steps timed separately. A child whose RSS passes --rss-cap-gib is killed and recorded
  as such (the in-memory path at several million records).

Targets: streaming peak RSS at the largest size within 1.5x of the smallest; streaming not
slower than in-memory at the smallest size. Results: docs/benchmarks/data_scale.json + PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

ROWS_TOKENS = 256
VALIDATION_SPLIT = 0.05


# ------------------------------------------------------------------------------------- data


class Lexicon:
    """Pseudo-words with Zipf-distributed frequencies, so that BPE token counts are realistic."""

    def __init__(self, seed: int, words: int = 5_000) -> None:
        rng = random.Random(seed)
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        self.words = [
            "".join(rng.choice(letters[: 8 + i % 18]) for _ in range(rng.randint(1, 9)))
            for i in range(words)
        ]
        weights = [1 / (rank + 1) ** 1.05 for rank in range(words)]
        total = sum(weights)
        acc = 0.0
        self.cumulative = []
        for w in weights:
            acc += w / total
            self.cumulative.append(acc)

    def text(self, rng: random.Random, lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        picks = rng.choices(self.words, cum_weights=self.cumulative, k=n)
        return " ".join(picks).capitalize() + rng.choice(".?!")


def chat_record(lexicon: Lexicon, rng: random.Random) -> dict[str, Any]:
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": lexicon.text(rng, 3, 12)})
    for _ in range(1 if rng.random() < 0.7 else 2):
        messages.append({"role": "user", "content": lexicon.text(rng, 3, 25)})
        messages.append({"role": "assistant", "content": lexicon.text(rng, 3, 40)})
    return {"messages": messages}


def write_records(path: Path, n: int, seed: int) -> Path:
    """n chat records (the first n of one seeded stream, so smaller files are prefixes)."""
    if path.is_file() and path.with_suffix(".done").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lexicon, rng = Lexicon(seed), random.Random(seed + 1)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps(chat_record(lexicon, rng)) + "\n")
    path.with_suffix(".done").write_text("")
    return path


def build_model(work: Path, seed: int, vocab: int) -> Path:
    """Tokenizer trained on the generated text, and a tiny random Llama, in one directory."""
    directory = work / "model"
    if (directory / "config.json").is_file():
        return directory
    from localenv import models  # noqa: PLC0415

    lexicon, rng = Lexicon(seed), random.Random(seed + 2)
    texts = [lexicon.text(rng, 3, 40) for _ in range(20_000)]
    tokenizer = models.build_tokenizer(
        texts,
        vocab_size=vocab,
        special_tokens=["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        chat_template=None,
    )
    model = models.tiny_llama(len(tokenizer), seed=seed, hidden=64, layers=2, heads=4)
    models.save_model(model, tokenizer, directory)
    return directory


# ----------------------------------------------------------------------------------- worker


def _status_kib(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


class _FirstStepDone(Exception):
    pass


def worker(args: argparse.Namespace) -> None:
    started = time.monotonic()
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    from kubetune_trainer.config import TrainerConfig  # noqa: PLC0415
    from kubetune_trainer.recipe import FineTuneRecipe  # noqa: PLC0415

    files = {"s3://bench/data/train.jsonl": Path(args.data), "s3://bench/model/": Path(args.model)}
    config = TrainerConfig.model_validate(
        {
            "spec": {
                "baseModel": {"uri": "s3://bench/model/"},
                "dataset": {
                    "trainUri": "s3://bench/data/train.jsonl",
                    "format": "chat",
                    "maxSeqLength": ROWS_TOKENS,
                    "validationSplit": VALIDATION_SPLIT,
                },
                "method": "lora",
                "hyperparameters": {
                    "batchSize": 4,
                    "gradientAccumulationSteps": 1,
                    "maxSteps": 1,
                    "seed": 0,
                    "gradientCheckpointing": "disabled",
                },
                "output": {"uri": "s3://bench/output/"},
                "resources": {"gpus": 0},
                "evaluation": {"metrics": ["loss"], "sampleSize": 0},
            },
            "workDir": args.work,
        }
    )
    recipe = FineTuneRecipe(config, env={})
    recipe.streaming_data = args.worker == "streaming"
    # Local files for the s3:// URIs; no output claim, no checkpoint lookup, no training log.
    r: Any = recipe
    r._fetch = lambda uri, name, revision=None: files[uri]
    r._setup_output = lambda: None
    r._verified_checkpoint = lambda: None
    timings: dict[str, float] = {}
    for name in ("_setup_data", "_setup_examples", "_setup_plan", "_setup_model", "_setup_resume"):
        original = getattr(recipe, name)

        def timed(original: Any = original, name: str = name) -> Any:
            t0 = time.monotonic()
            try:
                return original()
            finally:
                timings[name.removeprefix("_setup_")] = round(time.monotonic() - t0, 3)

        setattr(recipe, name, timed)
    recipe.setup()
    recipe.training_log.enabled = False
    setup_done = time.monotonic()
    rss_after_setup = _status_kib("VmRSS")

    def stop() -> None:
        raise _FirstStepDone

    recipe.after_training = stop
    with contextlib.suppress(_FirstStepDone):
        recipe.train()
    first_step = time.monotonic()
    result = {
        "path": args.worker,
        "records": len(recipe.train_records) + len(recipe.validation_records),
        "examples": len(recipe.train_examples) + len(recipe.validation_examples),
        "total_tokens": recipe.train_examples.stats.total_tokens,
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        "rss_after_setup_mib": round(rss_after_setup / 1024, 1),
        "time_to_first_step_s": round(first_step - started, 3),
        "setup_s": round(setup_done - started, 3),
        "stages_s": timings,
        # What the data path changes: validate, tokenize, plan, and the data fingerprint and
        # largest token id that _setup_resume and _setup_model read from the examples.
        "data_s": round(sum(timings.values()), 3),
        "steps": recipe.state.step,
    }
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- orchestrator


def run_child(args: argparse.Namespace, path: str, data: Path, model: Path, work: Path) -> Any:
    result_file = work.parent / f"{work.name}.{path}.result.json"
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable, __file__, "--worker", path, "--data", str(data), "--model", str(model),
        "--work", str(work), "--result", str(result_file), "--threads", str(args.threads),
    ]  # fmt: skip
    log_file = work.parent / f"{work.name}.{path}.log"
    work.parent.mkdir(parents=True, exist_ok=True)
    cap_kib = int(args.rss_cap_gib * 2**20)
    started = time.monotonic()
    with log_file.open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=benchlib.ROOT)
        killed = None
        while child.poll() is None:
            time.sleep(0.2)
            try:
                rss = _status_kib("VmRSS", str(child.pid))
            except OSError:
                continue
            if rss > cap_kib:
                child.kill()
                killed = f"killed: RSS passed the {args.rss_cap_gib:g} GiB cap"
            elif time.monotonic() - started > args.child_timeout:
                child.kill()
                killed = f"killed: still running after {args.child_timeout:g} s"
        child.wait()
    if killed or child.returncode != 0 or not result_file.is_file():
        tail = log_file.read_text().strip().splitlines()[-5:]
        return {
            "path": path,
            "failed": killed or f"exit code {child.returncode}",
            "log_tail": tail,
            "wall_s": round(time.monotonic() - started, 1),
        }
    result = json.loads(result_file.read_text())
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def plot(path: Path, data: dict[str, Any]) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    styles = {
        "in-memory": ("#8c8c8c", "o"),
        "streaming": ("#2a7ab0", "s"),
        "streaming-cached": ("#55a868", "^"),
    }
    for key, ylabel, ax in (
        ("peak_rss_mib", "peak RSS (MiB, VmHWM)", axes[0]),
        ("time_to_first_step_s", "time to first optimizer step (s)", axes[1]),
    ):
        for name, (color, marker) in styles.items():
            points = [
                (size["records"], size["runs"][name][key])
                for size in data["results"]
                if name in size["runs"] and key in size["runs"][name]
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker=marker, color=color, label=name)
                for x, y in points:
                    ax.annotate(f"{y:.0f}", (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")  # fmt: skip
        for size in data["results"]:
            failed = size["runs"].get("in-memory", {}).get("failed")
            if failed:
                ax.annotate(f"in-memory {failed}", (size["records"], 0), fontsize=7,
                            rotation=90, va="bottom", color="#c44e52")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("chat records")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("FineTuneRecipe up to its first optimizer step: in-memory vs streamed data",
                 fontsize=10)  # fmt: skip
    footer = f"{benchlib.device_line(data['device'])} | {data['command']}"
    fig.text(0.01, 0.01, footer.replace(" | ", "\n", 1), fontsize=6.5, color="#555555")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def targets_met(results: list[dict[str, Any]]) -> dict[str, Any]:
    def value(size: dict[str, Any], run: str, key: str) -> float | None:
        got = size["runs"].get(run, {}).get(key)
        return float(got) if isinstance(got, int | float) else None

    smallest, largest = results[0], results[-1]
    rss_small = value(smallest, "streaming", "peak_rss_mib")
    rss_large = value(largest, "streaming", "peak_rss_mib")
    old_time = value(smallest, "in-memory", "time_to_first_step_s")
    new_time = value(smallest, "streaming", "time_to_first_step_s")
    old_data = value(smallest, "in-memory", "data_s")
    new_data = value(smallest, "streaming", "data_s")
    ratio = rss_large / rss_small if rss_small and rss_large else None
    return {
        "streaming_peak_rss_ratio": round(ratio, 3) if ratio else None,
        "streaming_peak_rss_within_1_5x": ratio is not None and ratio <= 1.5,
        "streaming_vs_in_memory_time_at_smallest": round(new_time / old_time, 3)
        if old_time and new_time
        else None,
        "streaming_not_slower_at_smallest": old_time is not None
        and new_time is not None
        and new_time <= old_time,
        "streaming_setup_steps_not_slower_at_smallest": old_data is not None
        and new_data is not None
        and new_data <= old_data,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work)
    model = build_model(work, args.seed, 256 if args.quick else 2048)
    data: dict[str, Any] = {
        "benchmark": "data_scale",
        "command": benchlib.command_line(),
        "device": benchlib.device_info(),
        "started": benchlib.now(),
        "settings": {
            "format": "chat",
            "max_seq_length": ROWS_TOKENS,
            "batch_size_rows": 4,
            "validation_split": VALIDATION_SPLIT,
            "threads": args.threads,
            "rss_cap_gib": args.rss_cap_gib,
            "in_memory_max_records": args.in_memory_max,
        },
        "targets": {
            "streaming_peak_rss": "largest size within 1.5x of the smallest",
            "streaming_time": "not slower than in-memory at the smallest size",
        },
        "results": [],
    }
    out = Path(args.out)
    if args.append and out.is_file():  # keep the other sizes of an earlier run
        earlier = json.loads(out.read_text())
        data["results"] = [r for r in earlier["results"] if r["records"] not in sizes]
        data["command"] = f"{earlier['command']}; {data['command']}"
    order = args.runs.split(",")
    for n in sizes:
        records = write_records(work / "data" / f"chat-{n}.jsonl", n, args.seed)
        size: dict[str, Any] = {"records": n, "jsonl_mib": round(records.stat().st_size / 2**20, 1)}
        runs: dict[str, Any] = {}
        for name, path, fresh in sorted(
            (
                ("in-memory", "in-memory", True),
                ("streaming", "streaming", True),
                ("streaming-cached", "streaming", False),
            ),
            key=lambda run: order.index(run[0]),
        ):
            if name == "in-memory" and n > args.in_memory_max:
                skipped = f"skipped: over --in-memory-max {args.in_memory_max}"
                runs[name] = {"path": path, "failed": skipped}
                continue
            run_work = work / "runs" / f"{n}-{path}"
            if fresh and run_work.exists():
                subprocess.run(["rm", "-rf", str(run_work)], check=True)
            runs[name] = run_child(args, path, records, model, run_work)
            print(f"{n:>9} records  {name:<17} {json.dumps(runs[name])}", flush=True)
            size["runs"] = runs
            data["results"] = sorted(
                [*(r for r in data["results"] if r["records"] != n), size],
                key=lambda r: r["records"],
            )
            data["targets_met"] = targets_met(data["results"])
            data["finished"] = benchlib.now()
            benchlib.write_json(out, data)  # after every run: a killed benchmark keeps its figures
            plot(out.with_suffix(".png"), data)
    print(json.dumps(data["targets_met"]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="records per run")
    parser.add_argument("--out", default=str(benchlib.DOCS_DIR / "data_scale.json"))
    parser.add_argument("--work", default="/tmp/kubetune-bench-data", help="data, model, runs")
    parser.add_argument("--quick", action="store_true", help="smaller tokenizer (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--rss-cap-gib", type=float, default=16.0, help="kill a run above this")
    parser.add_argument(
        "--in-memory-max", type=int, default=2_000_000, help="skip the in-memory path above this"
    )
    parser.add_argument(
        "--runs",
        default="in-memory,streaming,streaming-cached",
        help="the order of the runs at each size (streaming-cached must follow streaming)",
    )
    parser.add_argument("--child-timeout", type=float, default=3600, help="kill a run after")
    parser.add_argument(
        "--append", action="store_true", help="keep the other sizes already in --out"
    )
    parser.add_argument("--worker", choices=["in-memory", "streaming"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
