"""Helpers for the trainer's integration tests (fixtures: trainer_fixtures.py).

A user's view of the trainer: a tiny random-init Llama and its tokenizer are built locally,
saved with save_pretrained and uploaded to the local MinIO like any model; datasets are JSONL
objects in S3; the trainer runs as `python -m kubetune_trainer --config run.json` in a
subprocess with the S3 credentials in its environment, as in the pod.

The task is learnable by a 2-layer model in a few dozen steps: continue counting in words
("three four five" -> "six seven"), so the fine-tuned model's loss must fall below the base's.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localenv import models

WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
FORMATS = ("chat", "instruction", "prompt-completion", "text")
# Subprocess runs use one thread: the test machine has 2 cores shared with other work.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def counting_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion): a few consecutive number words, then the next few."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        start, shown, more = rng.randrange(10), rng.randint(2, 4), rng.randint(2, 4)
        words = [WORDS[(start + i) % 10] for i in range(shown + more)]
        pairs.append((f"count: {' '.join(words[:shown])}", " " + " ".join(words[shown:])))
    return pairs


def as_format(fmt: str, prompt: str, completion: str) -> dict[str, Any]:
    if fmt == "chat":
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion.strip()},
            ]
        }
    if fmt == "instruction":
        return {
            "instruction": "Continue counting.",
            "input": prompt.removeprefix("count: "),
            "output": completion.strip(),
        }
    if fmt == "prompt-completion":
        return {"prompt": prompt, "completion": completion}
    return {"text": prompt + completion}


def preference_pairs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the counting task, where the rejected answer skips a number
    or repeats the last one, so the preference is learnable and never a tie."""
    rng = random.Random(seed)
    pairs = []
    for prompt, completion in counting_pairs(n, seed):
        words = completion.split()
        wrong = list(words)
        i = rng.randrange(len(wrong))
        wrong[i] = WORDS[(WORDS.index(words[i]) + rng.randint(2, 8)) % 10]
        pairs.append((prompt, " " + " ".join(words), " " + " ".join(wrong)))
    return pairs


def preference_records(fmt: str, n: int, seed: int) -> list[dict[str, Any]]:
    """preference (the hosted API's layout), prompt-chosen-rejected (strings), or
    prompt-chosen-rejected-chat (message lists)."""
    out: list[dict[str, Any]] = []
    for prompt, chosen, rejected in preference_pairs(n, seed):
        if fmt == "preference":
            out.append(
                {
                    "input": {"messages": [{"role": "user", "content": prompt}]},
                    "preferred_output": [{"role": "assistant", "content": chosen.strip()}],
                    "non_preferred_output": [{"role": "assistant", "content": rejected.strip()}],
                }
            )
        elif fmt == "prompt-chosen-rejected-chat":
            out.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen.strip()}],
                    "rejected": [{"role": "assistant", "content": rejected.strip()}],
                }
            )
        else:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def records(fmt: str, n: int, seed: int) -> list[dict[str, Any]]:
    return [as_format(fmt, p, c) for p, c in counting_pairs(n, seed)]


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def build_tokenizer() -> Any:
    """The integration tests' tokenizer: a byte-level BPE of vocabulary 1,000 trained on the
    counting task and the prompt templates, EOS `</s>`, CHAT_TEMPLATE."""
    corpus = [prompt + completion for prompt, completion in counting_pairs(200, 1)]
    corpus += [
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nContinue counting.\n\n### Input:\n\n\n### Response:\n",
        "User: count:\nAssistant: ",
    ] * 20
    return models.build_tokenizer(
        corpus,
        vocab_size=1000,
        special_tokens=SPECIAL_TOKENS,
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(directory: Path, *, heads: int = 4) -> Path:
    """A random-init 2-layer Llama (hidden 64) plus tokenizer, saved like a Hub model.

    `heads=2` gives head_dim 32, the smallest vLLM's CPU attention runs (the serving tests)."""
    tokenizer = build_tokenizer()
    model = models.tiny_llama(
        len(tokenizer), hidden=64, heads=heads, max_positions=512, tokenizer=tokenizer, seed=1234
    )
    return models.save_model(model, tokenizer, directory)


@dataclass
class S3:
    """The test bucket, under a prefix unique to this pytest session."""

    client: Any
    bucket: str
    prefix: str

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}/{key}"

    def put(self, key: str, body: str | bytes) -> str:
        data = body.encode() if isinstance(body, str) else body
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)
        return self.uri(key)

    def upload_dir(self, local: Path, key: str) -> str:
        for path in sorted(local.rglob("*")):
            if path.is_file():
                rel = path.relative_to(local).as_posix()
                self.client.upload_file(str(path), self.bucket, f"{self.prefix}/{key}/{rel}")
        return self.uri(key)

    def keys(self, key: str) -> list[str]:
        prefix = f"{self.prefix}/{key.rstrip('/')}/"
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return sorted(o["Key"][len(prefix) :] for p in pages for o in p.get("Contents", []))

    def get(self, key: str) -> bytes:
        body = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"]
        return bytes(body.read())

    def delete_all(self) -> None:
        """Remove everything under this session's prefix."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/"
        )
        for page in pages:
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})

    def download_dir(self, key: str, local: Path) -> Path:
        for rel in self.keys(key):
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, f"{self.prefix}/{key}/{rel}", str(target))
        return local


def trainer_config(
    *,
    base_model_uri: str,
    train_uri: str,
    output_uri: str,
    work_dir: Path,
    validation_uri: str | None = None,
    job: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A TrainerConfig document; `spec` entries are merged one level deep into the defaults."""
    body: dict[str, Any] = {
        "baseModel": {"uri": base_model_uri},
        "dataset": {"trainUri": train_uri, "maxSeqLength": 128},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "hyperparameters": {
            "epochs": 1,
            "learningRate": 3e-3,
            "batchSize": 4,
            "gradientAccumulationSteps": 1,
            "warmupRatio": 0.1,
            "seed": 7,
        },
        "output": {"uri": output_uri},
        "resources": {"gpus": 0},
        "evaluation": {"sampleSize": 2, "maxNewTokens": 6},
    }
    if validation_uri:
        body["dataset"]["validationUri"] = validation_uri
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    config: dict[str, Any] = {"spec": body, "workDir": str(work_dir)}
    if job:
        config["job"] = job
    return config


@dataclass
class TrainerRun:
    returncode: int
    output: str
    termination_message: str

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.output.splitlines() if needle in line]


class TrainerProcess:
    """`python -m kubetune_trainer` started in the background (for the SIGTERM test)."""

    def __init__(self, config: dict[str, Any], tmp: Path, env: dict[str, str]) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.config_path = tmp / "run.json"
        self.config_path.write_text(json.dumps(config))
        self.termination_log = tmp / "termination-log"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, **THREAD_ENV, "KUBETUNE_TERMINATION_LOG": str(self.termination_log)},
        )

    def read_until(self, predicate: Callable[[str], bool]) -> str | None:
        """Read lines until one matches; None at end of output."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if predicate(line):
                return line
        return None

    def wait(self, timeout: float) -> TrainerRun:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out or "")
        message = self.termination_log.read_text().strip() if self.termination_log.exists() else ""
        return TrainerRun(self.proc.returncode, "".join(self.lines), message)
