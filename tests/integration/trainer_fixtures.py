"""Fixtures for the trainer's integration tests, a plugin loaded with `pytest_plugins`."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from trainer_support import (
    FORMATS,
    S3,
    TrainerProcess,
    TrainerRun,
    build_tiny_model,
    jsonl,
    records,
)

from localenv.testing import Cluster


@pytest.fixture(scope="session")
def s3(cluster: Cluster) -> Iterator[S3]:
    env = cluster.s3_env
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    bucket = env.get("KUBETUNE_S3_BUCKET", "kubetune")
    store = S3(client, bucket, f"trainer-tests/{uuid.uuid4().hex[:8]}")
    yield store
    store.delete_all()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def base_model_uri(s3: S3, tiny_model_dir: Path) -> str:
    return s3.upload_dir(tiny_model_dir, "models/tiny-llama")


@pytest.fixture(scope="session")
def datasets(s3: S3) -> dict[str, tuple[str, str]]:
    """(train URI, validation URI) per format; validation uses other random starts."""
    return {
        fmt: (
            s3.put(f"data/{fmt}/train.jsonl", jsonl(records(fmt, 96, seed=7))),
            s3.put(f"data/{fmt}/validation.jsonl", jsonl(records(fmt, 16, seed=8))),
        )
        for fmt in FORMATS
    }


@pytest.fixture
def run_trainer(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., TrainerRun]]:
    """Run the trainer to completion: run_trainer(config, name=..., env=..., timeout=...)."""
    started: list[TrainerProcess] = []

    def run(
        config: dict[str, Any],
        name: str = "run",
        env: dict[str, str] | None = None,
        timeout: float = 240,
    ) -> TrainerRun:
        process = TrainerProcess(config, tmp_path / name, {**cluster.env(), **(env or {})})
        started.append(process)
        result = process.wait(timeout)
        return result

    yield run
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()


@pytest.fixture
def start_trainer(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[..., TrainerProcess]]:
    started: list[TrainerProcess] = []

    def start(
        config: dict[str, Any], name: str = "run", env: dict[str, str] | None = None
    ) -> TrainerProcess:
        process = TrainerProcess(config, tmp_path / name, {**cluster.env(), **(env or {})})
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
