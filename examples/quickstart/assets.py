"""Sample data and a tiny model for the quickstart, the end-to-end tests and the benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the generated text, and
the model is a small random-init Llama, so the demo runs on a laptop CPU in a few minutes while
exercising the same code paths as a 7B model on a GPU.

    python examples/quickstart/assets.py --out /tmp/assets            # write files
    python examples/quickstart/assets.py --upload s3://kubetune/quickstart   # and upload them
(uploads use the AWS_* settings of the environment, e.g. `set -a; . .dev/s3.env; set +a`).

Layout written (and uploaded):
    model/            config.json, model.safetensors, tokenizer files (with a chat template)
    data/chat/train.jsonl, data/chat/validation.jsonl                  ({"messages": [...]})
    data/instruction/train.jsonl, data/instruction/validation.jsonl    (instruction/input/output)
    data/preference/train.jsonl, data/preference/validation.jsonl      (preference pairs, DPO)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
# ChatML, the de-facto default; every assistant turn ends with <|im_end|>, which is EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_JOBS = ["llama-chat", "support-bot", "sql-helper", "doc-writer", "code-review", "triage"]
_METHODS = {
    "lora": "trains small adapters on a frozen model",
    "qlora": "trains adapters on a 4-bit model to save memory",
    "full": "trains every weight of the model",
}
_WORDS = [
    *("alpha", "beta", "gamma", "delta", "model", "data", "token", "batch", "learning", "rate"),
    *("adapter", "layer", "cluster", "node", "pod", "job", "queue", "storage", "bucket"),
    *("prefix", "metric", "loss", "epoch", "step", "checkpoint", "gpu", "memory"),
]


def chat_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A support assistant answering questions about training jobs, in fixed patterns.

    Answers copy facts from the question (names, numbers), so a tiny model can learn them and
    the base-vs-fine-tuned comparison shows a real difference.
    """
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        job, gpus = rng.choice(_JOBS), rng.randint(1, 8)
        method = rng.choice(list(_METHODS))
        kind = rng.randrange(3)
        if kind == 0:
            question = f"How many GPUs does the job {job} use? It requests {gpus}."
            answer = f"The job {job} uses {gpus} GPUs."
        elif kind == 1:
            question = f"What does the method {method} do?"
            answer = f"The method {method} {_METHODS[method]}."
        else:
            question = f"Is the job {job} with {gpus} GPUs using {method}?"
            answer = f"Yes, the job {job} uses {method} on {gpus} GPUs."
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "You are the kubetune assistant."})
        records.append({"messages": messages})
    return records


def preference_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs in the hosted fine-tuning API's layout (input, preferred_output,
    non_preferred_output): the chat questions, the right answer preferred over a wrong one (a
    wrong GPU count, job or method), so a tiny model can learn which to prefer."""
    rng = random.Random(seed)
    records = []
    for chat in chat_records(n, seed):
        messages = chat["messages"]
        answer = messages[-1]["content"]
        words = answer.rstrip(".").split()
        numbers = [i for i, w in enumerate(words) if w.isdigit()]
        if numbers:  # a wrong GPU count
            i = numbers[0]
            words[i] = str((int(words[i]) + rng.randint(0, 6)) % 8 + 1)
            wrong = " ".join(words) + "."
        else:  # "The method X <what X does>.": what another method does
            method = words[2]
            other = rng.choice([m for m in _METHODS if m != method])
            wrong = f"The method {method} {_METHODS[other]}."
        records.append(
            {
                "input": {"messages": messages[:-1]},
                "preferred_output": [{"role": "assistant", "content": answer}],
                "non_preferred_output": [{"role": "assistant", "content": wrong}],
            }
        )
    return records


def instruction_records(n: int, seed: int = 0, mean_words: float = 12.0) -> list[dict[str, Any]]:
    """Alpaca-style records with learnable tasks and a long-tailed length distribution."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        count = max(1, min(400, round(rng.lognormvariate(0, 0.7) * mean_words)))
        words = [rng.choice(_WORDS) for _ in range(count)]
        task = rng.randrange(3)
        if task == 0:
            instruction, output = "Repeat the words in reverse order.", " ".join(reversed(words))
        elif task == 1:
            instruction, output = "Write the words in upper case.", " ".join(words).upper()
        else:
            instruction, output = "Repeat the words.", " ".join(words)
        records.append({"instruction": instruction, "input": " ".join(words), "output": output})
    return records


def _texts(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    for record in records:
        if "messages" in record:
            yield from (m["content"] for m in record["messages"])
        else:
            yield from (str(v) for v in record.values())


def _models() -> Any:
    """tests/localenv/models.py: how the project's tests and benchmarks build tiny models."""
    root = Path(__file__).resolve().parents[2]
    if str(root / "tests") not in sys.path:
        sys.path.insert(0, str(root / "tests"))
    from localenv import models  # noqa: PLC0415 - the local environment's tooling

    return models


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE (lossless) with Llama-like BOS, ChatML template, EOS = <|im_end|>."""
    return _models().build_tokenizer(
        texts,
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    tokenizer: Any, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0
) -> Any:
    """A random-init Llama sized for CPU (about 0.3M parameters at the defaults)."""
    return _models().tiny_llama(
        len(tokenizer), hidden=hidden, layers=layers, heads=heads, tied=True,
        tokenizer=tokenizer, seed=seed,
    )  # fmt: skip


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_assets(out: Path, train: int = 400, validation: int = 40, seed: int = 0) -> Path:
    chat_train, chat_val = chat_records(train, seed), chat_records(validation, seed + 1)
    inst_train = instruction_records(train, seed)
    inst_val = instruction_records(validation, seed + 1)
    write_jsonl(out / "data/chat/train.jsonl", chat_train)
    write_jsonl(out / "data/chat/validation.jsonl", chat_val)
    write_jsonl(out / "data/instruction/train.jsonl", inst_train)
    write_jsonl(out / "data/instruction/validation.jsonl", inst_val)
    write_preference_data(out, train, validation, seed)
    tokenizer = build_tokenizer(_texts([*chat_train, *inst_train]))
    model = build_model(tokenizer, seed=seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out


def write_preference_data(out: Path, train: int = 400, validation: int = 40, seed: int = 0) -> None:
    """The DPO example's pairs (examples/dpo.yaml); same questions as the chat data."""
    write_jsonl(out / "data/preference/train.jsonl", preference_records(train, seed + 2))
    write_jsonl(out / "data/preference/validation.jsonl", preference_records(validation, seed + 3))


def s3_client(env: dict[str, str] | None = None) -> Any:
    """A boto3 S3 client from AWS_* settings (default: this process's environment)."""
    import boto3  # noqa: PLC0415

    env = dict(os.environ if env is None else env)
    return boto3.client(
        "s3",
        endpoint_url=env.get("AWS_ENDPOINT_URL"),
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )


def upload(local: Path, uri: str, env: dict[str, str] | None = None) -> None:
    """Upload a directory; `env` holds AWS_* settings (default: this process's environment)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = s3_client(env)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}".lstrip("/")
        s3.upload_file(str(path), bucket, key)


def remove(uri: str, env: dict[str, str] | None = None) -> int:
    """Delete every object under an s3:// prefix; returns how many there were."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = s3_client(env)
    removed = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            removed += len(keys)
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".dev/quickstart-assets"))
    parser.add_argument("--upload", metavar="S3_URI", help="upload to this prefix afterwards")
    parser.add_argument("--records", type=int, default=400)
    args = parser.parse_args()
    write_assets(args.out, train=args.records)
    if args.upload:
        upload(args.out, args.upload)
    print(f"assets in {args.out}" + (f", uploaded to {args.upload}" if args.upload else ""))


if __name__ == "__main__":
    main()
