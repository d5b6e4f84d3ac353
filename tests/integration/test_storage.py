"""kubetune_trainer.storage against the real local MinIO server (no mocks).

Objects are set up with a plain boto3 client, independent of the code under test. Every test
works below its own random prefix and deletes it afterwards. Requests are observed through
Storage.stats (a botocore event hook counting API calls) and through extra event handlers
registered on the Storage's real client.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from forwarding_proxy import ForwardingProxy

from kubetune_trainer import exitcodes
from kubetune_trainer.__main__ import classify
from kubetune_trainer.api import SecretKeySelector, StorageConfig
from kubetune_trainer.errors import OutputExists
from kubetune_trainer.ownership import Owner, claim_output, read_owner
from kubetune_trainer.storage import (
    COMPLETE_MARKER,
    MiB,
    Storage,
    StorageError,
    UploadedFile,
    checkpoint_uri,
    parse_manifest,
    verify_manifest,
    write_manifest,
)
from localenv.testing import Cluster, free_port

pytestmark = pytest.mark.cluster

BIG = 24 * MiB - 123  # three parts: multipart both ways at the test's 8 MiB threshold
PART = 8 * MiB


@pytest.fixture(scope="module")
def s3env(cluster: Cluster) -> dict[str, str]:
    return dict(cluster.s3_env)


@pytest.fixture(scope="module")
def raw(s3env: dict[str, str]) -> Any:
    """A plain boto3 client for setup and inspection."""
    return boto3.client(
        "s3",
        endpoint_url=s3env["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3env["AWS_DEFAULT_REGION"],
    )


@pytest.fixture
def base(s3env: dict[str, str], raw: Any) -> Iterator[str]:
    """s3://<bucket>/test-storage/<random>, emptied after the test."""
    bucket = s3env["KUBETUNE_S3_BUCKET"]
    prefix = f"test-storage/{uuid.uuid4().hex[:12]}"
    yield f"s3://{bucket}/{prefix}"
    pages = raw.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    keys = [{"Key": o["Key"]} for page in pages for o in page.get("Contents", [])]
    for start in range(0, len(keys), 1000):
        raw.delete_objects(Bucket=bucket, Delete={"Objects": keys[start : start + 1000]})


@pytest.fixture
def make_storage(s3env: dict[str, str], tmp_path: Path) -> Callable[..., Storage]:
    def make(config: StorageConfig | None = None, **kwargs: Any) -> Storage:
        kwargs.setdefault("env", s3env)
        kwargs.setdefault("work_dir", tmp_path / "work")
        kwargs.setdefault("multipart_threshold", PART)
        kwargs.setdefault("multipart_chunksize", PART)
        # No retrying unless a test asks for it: those below it want the first error.
        kwargs.setdefault("retry_seconds", 0)
        return Storage(config, **kwargs)

    return make


def split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def put(raw: Any, uri: str, data: bytes) -> None:
    bucket, key = split(uri)
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)
    raw.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def record_calls(storage: Storage) -> list[tuple[str, str | None]]:
    """(operation, Key) of every API call the storage's client makes, in order."""
    calls: list[tuple[str, str | None]] = []

    def record(model: Any, params: dict[str, Any], **kwargs: Any) -> None:
        calls.append((model.name, params.get("Key")))

    storage.client.meta.events.register("before-parameter-build.s3", record)
    return calls


# -------------------------------------------------------------------------------- fetching


def test_fetch_prefix_in_parallel_with_multipart_and_etag_cache(
    raw: Any, base: str, make_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    big = os.urandom(BIG)
    objects = {
        "a.jsonl": b'{"text": "a"}\n',
        "sub/b.jsonl": b'{"text": "b"}\n' * 100,
        "sub/deep/c.json": b"[]",
        "big.bin": big,
    }
    for rel, data in objects.items():
        put(raw, f"{base}/train/{rel}", data)
    put(raw, f"{base}/train-old/stale.jsonl", b"not part of train/")  # a sibling prefix
    put(raw, f"{base}/train/empty/", b"")  # a console-made "folder" marker
    storage = make_storage(max_workers=4)
    cache = storage.cache_dir
    assert cache is not None

    dest = tmp_path / "d1"
    assert storage.fetch(f"{base}/train", dest) == dest
    assert files_under(dest) == objects
    calls = storage.stats.api_calls
    # One listing, no HeadObject; big.bin came as three ranged GETs, the rest as one each.
    assert calls == {"ListObjectsV2": 1, "GetObject": 3 + 3}
    assert (storage.stats.downloaded_objects, storage.stats.cache_hits) == (4, 0)
    assert not [p for p in [*dest.rglob(".*"), *cache.rglob(".*")] if p.suffix == ".part"]

    # A second fetch elsewhere is served from the cache: no GetObject, hard links to it.
    again = tmp_path / "d2"
    storage.fetch(f"{base}/train/", again)
    assert storage.stats.api_calls["GetObject"] == 6
    assert storage.stats.cache_hits == 4
    assert files_under(again) == objects
    for rel in objects:
        assert (again / rel).stat().st_ino == (dest / rel).stat().st_ino

    # A fresh Storage on the same cache (a retried pod on the same volume) downloads nothing.
    retried = make_storage(cache_dir=cache)
    single = retried.fetch(f"{base}/train/big.bin", tmp_path / "d3")
    assert single == tmp_path / "d3" / "big.bin"
    assert single.read_bytes() == big
    assert retried.stats.api_calls == {"ListObjectsV2": 1}

    # A changed object is downloaded again, alone; its old cache version is dropped.
    put(raw, f"{base}/train/sub/b.jsonl", b'{"text": "new"}\n')
    storage.fetch(f"{base}/train", dest)
    assert storage.stats.api_calls["GetObject"] == 7
    assert (dest / "sub/b.jsonl").read_bytes() == b'{"text": "new"}\n'
    assert (again / "sub/b.jsonl").read_bytes() == objects["sub/b.jsonl"]  # replaced, not edited
    assert (dest / "a.jsonl").stat().st_ino == (again / "a.jsonl").stat().st_ino
    versions = [p for p in cache.rglob("*") if p.is_file()]
    assert len(versions) == 4  # one entry per object, the stale b.jsonl version removed


def test_failed_fetch_stops_and_leaves_no_partial_files(
    raw: Any, base: str, make_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    put(raw, f"{base}/data/big.bin", os.urandom(BIG))
    put(raw, f"{base}/data/a.jsonl", b"{}\n")
    dest = tmp_path / "d"
    (dest / "a.jsonl").mkdir(parents=True)  # a directory where a file must go
    (dest / "a.jsonl" / "keep").write_text("x")
    storage = make_storage()
    with pytest.raises(StorageError) as info:
        storage.fetch(f"{base}/data", dest)
    assert str(info.value).startswith(f"cannot place {base}/data/a.jsonl at {dest / 'a.jsonl'}")
    assert info.value.reason == "StorageLocalError"
    # The other download was cancelled or finished: either way no temporary file is left and
    # nothing incomplete sits under a final name.
    assert storage.cache_dir is not None
    leftovers = [*dest.rglob(".*"), *storage.cache_dir.rglob(".*")]
    assert leftovers == []
    big = dest / "big.bin"
    assert not big.exists() or big.stat().st_size == BIG


def test_fetch_without_cache_downloads_straight_to_dest(
    raw: Any, base: str, make_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    put(raw, f"{base}/data/x.jsonl", b"{}\n")
    storage = make_storage(use_cache=False)
    assert storage.fetch(f"{base}/data", tmp_path / "d").joinpath("x.jsonl").read_bytes() == b"{}\n"
    storage.fetch(f"{base}/data", tmp_path / "d")
    assert storage.stats.api_calls["GetObject"] == 2
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------- errors


def test_missing_prefix(base: str, make_storage: Callable[..., Storage], tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        make_storage().fetch(f"{base}/nothing-here", tmp_path / "d")
    assert str(info.value).startswith(f"no objects under {base}/nothing-here: check the URI")
    assert info.value.reason == "StorageNotFound"
    with pytest.raises(StorageError, match=f"^no object at {base}/nothing-here$"):
        make_storage().read_bytes(f"{base}/nothing-here")


def test_wrong_bucket(make_storage: Callable[..., Storage], tmp_path: Path) -> None:
    uri = f"s3://kubetune-missing-{uuid.uuid4().hex[:8]}/data"
    with pytest.raises(StorageError) as info:
        make_storage().fetch(uri, tmp_path / "d")
    assert info.value.reason == "StorageNoSuchBucket"
    assert "does not exist at http://127.0.0.1:" in str(info.value)
    assert f"({uri})" in str(info.value)


@pytest.mark.parametrize(
    ("override", "detail"),
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret-" + "x" * 20}, "secret access key does not match"),
        ({"AWS_ACCESS_KEY_ID": "unknown-key-id"}, "does not know the access key id"),
    ],
)
def test_wrong_credentials(
    s3env: dict[str, str],
    base: str,
    make_storage: Callable[..., Storage],
    tmp_path: Path,
    *,
    override: dict[str, str],
    detail: str,
) -> None:
    env = {**s3env, **override}
    config = StorageConfig.model_validate({"credentialsSecretRef": {"name": "team-s3"}})
    with pytest.raises(StorageError) as info:
        make_storage(config, env=env).fetch(f"{base}/data", tmp_path / "d")
    message = str(info.value)
    assert message.startswith(f"access denied to {base}/data (")
    assert detail in message
    assert "check the credentials Secret 'team-s3'" in message
    assert info.value.reason == "StorageAccessDenied"
    for credential in [
        *override.values(),
        s3env["AWS_ACCESS_KEY_ID"],
        s3env["AWS_SECRET_ACCESS_KEY"],
    ]:
        assert credential not in message


def test_unreachable_endpoint(
    base: str, make_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    storage = make_storage(StorageConfig(endpoint=endpoint), max_attempts=2)
    with pytest.raises(StorageError) as info:
        storage.fetch(f"{base}/data", tmp_path / "d")
    assert str(info.value).startswith(
        f"cannot reach the S3 endpoint {endpoint} for {base}/data (connection refused)"
    )
    assert info.value.reason == "StorageUnreachable"


def test_endpoint_that_never_answers_times_out(
    base: str, make_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    with socket.socket() as server:  # accepts connections (kernel backlog), never responds
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        storage = make_storage(StorageConfig(endpoint=endpoint), max_attempts=1, read_timeout=0.5)
        with pytest.raises(StorageError) as info:
            storage.read_bytes(f"{base}/model.safetensors")
    assert str(info.value).startswith(
        f"timed out: the S3 endpoint {endpoint} did not answer for 0.5s while trying to read "
        f"{base}/model.safetensors"
    )
    assert info.value.reason == "StorageTimeout"


class Interrupted(Exception):
    """Raised by a signal handler in the waiting thread, as SIGTERM raises Preempted."""


@pytest.mark.parametrize("operation", ["fetch", "upload_file"])
def test_an_interrupted_transfer_returns_at_once_even_from_a_stalled_store(
    *,
    operation: str,
    raw: Any,
    s3env: dict[str, str],
    base: str,
    make_storage: Callable[..., Storage],
    tmp_path: Path,
) -> None:
    # Every request under the test's prefix is held by the proxy until `release` (20 s after
    # the signal): an interrupted wait must not sit on those transfers until the store answers.
    for name in ("a.bin", "b.bin"):
        put(raw, f"{base}/data/{name}", b"x" * 1024)
    (tmp_path / "up.bin").write_bytes(b"y" * 1024)
    _, prefix = split(base)
    threads_before = {t.ident for t in threading.enumerate()}
    with ForwardingProxy(s3env["AWS_ENDPOINT_URL"], hold=prefix) as proxy:
        storage = make_storage(StorageConfig(endpoint=proxy.url))
        released = threading.Event()

        def interrupt_then_release() -> None:
            assert proxy.held.wait(30)
            # To the main thread, where a SIGTERM from the kubelet lands (a process signalling
            # itself would get the signal in the calling thread).
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)
            if not released.wait(20):
                released.set()
                proxy.release()

        def on_signal(signum: int, frame: Any) -> None:
            raise Interrupted

        previous = signal.signal(signal.SIGUSR1, on_signal)
        watchdog = threading.Thread(target=interrupt_then_release, daemon=True)
        watchdog.start()
        try:
            with pytest.raises(Interrupted):
                if operation == "fetch":
                    storage.fetch(f"{base}/data", tmp_path / "d")
                else:
                    storage.upload_file(tmp_path / "up.bin", f"{base}/up.bin")
            assert not released.is_set(), "the interrupted transfer waited for the store"
        finally:
            released.set()
            proxy.release()
            watchdog.join()
            signal.signal(signal.SIGUSR1, previous)

    # Once the store answers, the abandoned transfers wind down: no thread is left behind.
    def left() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.ident not in threads_before)

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left()


# -------------------------------------------------------------------------------- uploading


def test_upload_dir_with_manifest_and_object_helpers(
    raw: Any, base: str, make_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    local = tmp_path / "out"
    content = {
        "adapter_config.json": b'{"r": 16}',
        "adapter_model.safetensors": os.urandom(9 * MiB),  # two parts
        "tokenizer/tokenizer.json": b"{}",
        "eval/answers.jsonl": b'{"a": 1}\n',
    }
    for rel, data in content.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    storage = make_storage()
    calls = record_calls(storage)

    uploaded = storage.upload_dir(local, f"{base}/run")
    assert uploaded == [
        UploadedFile(rel, len(data), hashlib.sha256(data).hexdigest())
        for rel, data in sorted(content.items())
    ]
    assert ("UploadPart", f"{split(base)[1]}/run/adapter_model.safetensors") in calls
    bucket, prefix = split(base)
    head = raw.head_object(Bucket=bucket, Key=f"{prefix}/run/adapter_model.safetensors")
    assert (
        head["Metadata"]["sha256"]
        == hashlib.sha256(content["adapter_model.safetensors"]).hexdigest()
    )

    # The manifest's checksums match the bytes as stored, read back independently.
    manifest = write_manifest(uploaded)
    storage.put_bytes(f"{base}/run/SHA256SUMS", manifest, "text/plain")
    stored = storage.read_bytes(f"{base}/run/SHA256SUMS")
    assert stored == manifest
    for rel, digest in parse_manifest(stored).items():
        body = raw.get_object(Bucket=bucket, Key=f"{prefix}/run/{rel}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest
    fetched = storage.fetch(f"{base}/run", tmp_path / "back")
    assert verify_manifest(stored, fetched) == 4

    # upload_file, put_json, list, exists, delete_prefix.
    one = storage.upload_file(local / "adapter_config.json", f"{base}/single/config.json")
    assert one == UploadedFile("config.json", 9, hashlib.sha256(b'{"r": 16}').hexdigest())
    storage.put_json(f"{base}/run/status.json", {"loss": 1.5})
    assert json.loads(storage.read_bytes(f"{base}/run/status.json")) == {"loss": 1.5}
    listed = storage.list(f"{base}/run")
    assert [o.path for o in listed] == sorted([*content, "SHA256SUMS", "status.json"])
    assert storage.list(f"{base}/run/SHA256SUMS")[0].size == len(manifest)
    assert storage.exists(f"{base}/run")
    assert storage.exists(f"{base}/run/tokenizer")
    assert storage.exists(f"{base}/run/status.json")
    assert not storage.exists(f"{base}/ru")  # a key prefix, not a directory
    assert storage.delete_prefix(f"{base}/run") == 6
    assert not storage.exists(f"{base}/run")
    assert storage.exists(f"{base}/single")
    with pytest.raises(StorageError, match="refusing to delete everything in bucket"):
        storage.delete_prefix(f"s3://{bucket}/")


# ------------------------------------------------------------------------------ checkpoints


def checkpoint_dir(root: Path, step: int) -> Path:
    path = root / f"ckpt-{step}"
    (path / "optimizer").mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(f"weights {step}".encode() * 1000)
    (path / "optimizer" / "state.pt").write_bytes(f"optimizer {step}".encode())
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_checkpoints_publish_resume_and_prune(
    raw: Any, base: str, make_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    out = f"{base}/output"
    storage = make_storage()
    assert storage.latest_complete_checkpoint(out) is None
    assert storage.prune_checkpoints(out, keep=2) == []

    # A leftover of an earlier attempt at step 3 (a stale file and a marker) is replaced.
    put(raw, checkpoint_uri(out, 3) + "junk.bin", b"old")
    put(raw, checkpoint_uri(out, 3) + COMPLETE_MARKER, b'{"step": 3, "files": []}')
    for step in (1, 2, 3):
        calls = record_calls(storage)
        uri = storage.publish_checkpoint(checkpoint_dir(tmp_path, step), out, step)
        assert uri == f"{out}/checkpoints/step-{step:09d}/"
        writes = [key for op, key in calls if op in {"PutObject", "CompleteMultipartUpload"}]
        assert len(writes) == 4
        assert writes[-1] == split(uri)[1] + COMPLETE_MARKER  # the marker is written last

    listed = {o.path for o in storage.list(checkpoint_uri(out, 3))}
    assert listed == {
        "adapter_model.safetensors",
        "optimizer/state.pt",
        "trainer_state.json",
        COMPLETE_MARKER,
    }
    marker = json.loads(storage.read_bytes(checkpoint_uri(out, 3) + COMPLETE_MARKER))
    local = tmp_path / "ckpt-3"
    assert marker["step"] == 3
    assert {f["path"]: f["sha256"] for f in marker["files"]} == {
        rel: hashlib.sha256((local / rel).read_bytes()).hexdigest()
        for rel in ("adapter_model.safetensors", "optimizer/state.pt", "trainer_state.json")
    }
    assert storage.latest_complete_checkpoint(out) == (3, checkpoint_uri(out, 3))

    # Never picked: a higher step whose upload died before the marker, one whose marker
    # vouches for a file that is missing, and an unreadable marker.
    put(raw, checkpoint_uri(out, 9) + "adapter_model.safetensors", b"partial")
    put(raw, checkpoint_uri(out, 8) + "trainer_state.json", b"{}")
    put(
        raw,
        checkpoint_uri(out, 8) + COMPLETE_MARKER,
        json.dumps(
            {"step": 8, "files": [{"path": "adapter_model.safetensors", "size": 5, "sha256": ""}]}
        ).encode(),
    )
    put(raw, checkpoint_uri(out, 7) + COMPLETE_MARKER, b"not json")
    put(raw, checkpoint_uri(out, 0) + "adapter_model.safetensors", b"stale")  # incomplete, old
    assert storage.latest_complete_checkpoint(out) == (3, checkpoint_uri(out, 3))

    # The resumed pod fetches the checkpoint and checks it against the marker.
    restored = storage.fetch(checkpoint_uri(out, 3), tmp_path / "resume")
    for f in marker["files"]:
        assert hashlib.sha256((restored / f["path"]).read_bytes()).hexdigest() == f["sha256"]

    # Prune keeps the newest 2 complete ones, drops older and stale incomplete ones below them;
    # broken or incomplete ones above the newest complete step may be uploads in flight.
    assert storage.prune_checkpoints(out, keep=2) == [0, 1]
    remaining = {o.path.split("/")[1] for o in storage.list(out)}
    assert remaining == {f"step-{s:09d}" for s in (2, 3, 7, 8, 9)}
    assert storage.prune_checkpoints(out, keep=1) == [2]
    assert storage.latest_complete_checkpoint(out) == (3, checkpoint_uri(out, 3))
    with pytest.raises(ValueError, match="keep must be at least 1"):
        storage.prune_checkpoints(out, keep=0)


# ------------------------------------------------------------------------- retries and outages


def test_an_unreachable_store_is_retried_for_the_retry_timeout_then_reported(
    base: str, make_storage: Callable[..., Storage], tmp_path: Path, caplog: Any
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens
    storage = make_storage(StorageConfig(endpoint=endpoint), max_attempts=1, retry_seconds=4)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError) as info:
        storage.fetch(f"{base}/data", tmp_path / "d")
    elapsed = time.monotonic() - started
    assert 4 <= elapsed < 15, elapsed
    assert info.value.reason == "StorageUnreachable"
    assert "connection refused" in str(info.value) and "spec.storage.retryTimeout" in str(
        info.value
    )
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) >= 2  # backoff 1 s, 2 s, ...
    # The trainer exits with the retried code, reason StorageUnreachable, not access denied.
    assert classify(info.value)[0] == exitcodes.STORAGE_UNREACHABLE


def test_a_store_that_comes_back_within_the_retry_timeout_is_used(
    raw: Any,
    s3env: dict[str, str],
    base: str,
    make_storage: Callable[..., Storage],
    tmp_path: Path,
) -> None:
    put(raw, f"{base}/data/train.jsonl", b'{"text": "hello"}\n')
    with ForwardingProxy(s3env["AWS_ENDPOINT_URL"], listen_after=2.5) as proxy:
        storage = make_storage(StorageConfig(endpoint=proxy.url), max_attempts=1, retry_seconds=30)
        local = storage.fetch(f"{base}/data", tmp_path / "d")
    assert (local / "train.jsonl").read_bytes() == b'{"text": "hello"}\n'


def test_access_denied_is_not_retried(
    base: str, make_storage: Callable[..., Storage], s3env: dict[str, str], tmp_path: Path
) -> None:
    env = {**s3env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    storage = make_storage(env=env, retry_seconds=30)
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.fetch(f"{base}/data", tmp_path / "d")
    assert info.value.reason == "StorageAccessDenied" and time.monotonic() - started < 10


@pytest.mark.parametrize("variable", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_a_credential_with_a_trailing_newline_is_refused_naming_the_secret_and_key(
    make_storage: Callable[..., Storage], s3env: dict[str, str], variable: str
) -> None:
    env = {**s3env, variable: s3env[variable] + "\n"}
    ref = SecretKeySelector(name="team-s3", access_key_id_key="id", secret_access_key_key="key")
    with pytest.raises(StorageError) as info:
        make_storage(StorageConfig(credentials_secret_ref=ref), env=env)
    message = str(info.value)
    key = "id" if variable == "AWS_ACCESS_KEY_ID" else "key"
    assert info.value.reason == "StorageCredentialsInvalid"
    assert f"key {key} of Secret 'team-s3'" in message and "newline" in message
    assert s3env[variable] not in message


# ----------------------------------------------------------------- ownership and checkpoints


JOB_A = Owner(uid="uid-a", namespace="team", name="support")
JOB_B = Owner(uid="uid-b", namespace="team", name="support")  # same name, recreated


def test_a_job_claims_its_output_and_refuses_another_jobs(
    raw: Any, base: str, make_storage: Callable[..., Storage]
) -> None:
    storage = make_storage()
    out = f"{base}/out"
    assert claim_output(storage, out, JOB_A, overwrite=False) == "claimed"
    assert claim_output(storage, out, JOB_A, overwrite=False) == "ours"  # a retried pod
    put(raw, f"{out}/adapter_model.safetensors", b"weights of job A")
    with pytest.raises(OutputExists) as refused:
        claim_output(storage, out, JOB_B, overwrite=False)
    assert "FineTuneJob team/support (uid uid-a)" in str(refused.value)
    assert "output.overwrite" in str(refused.value)
    assert storage.read_bytes(f"{out}/adapter_model.safetensors") == b"weights of job A"
    assert claim_output(storage, out, JOB_B, overwrite=True) == "overwritten"
    assert not storage.exists(f"{out}/adapter_model.safetensors")
    assert read_owner(storage, out) is not None and read_owner(storage, out)[0] == JOB_B  # type: ignore[index]


def test_unclaimed_files_in_the_output_are_not_overwritten(
    raw: Any, base: str, make_storage: Callable[..., Storage]
) -> None:
    storage = make_storage()
    put(raw, f"{base}/out/train.jsonl", b"someone's data")
    with pytest.raises(OutputExists, match=r"1 object\(s\) no FineTuneJob claimed .*train.jsonl"):
        claim_output(storage, f"{base}/out", JOB_A, overwrite=False)
    # A sibling prefix is not inside the output.
    assert claim_output(storage, f"{base}/out-2", JOB_A, overwrite=False) == "claimed"


def test_a_claim_is_an_atomic_create(base: str, make_storage: Callable[..., Storage]) -> None:
    storage = make_storage()
    assert storage.create_bytes(f"{base}/x", b"first") is True
    assert storage.create_bytes(f"{base}/x", b"second") is False
    assert storage.read_bytes(f"{base}/x") == b"first"


def test_a_job_resumes_only_its_own_checksum_verified_checkpoints(
    raw: Any, base: str, make_storage: Callable[..., Storage], tmp_path: Path
) -> None:
    storage = make_storage()
    out = f"{base}/out"
    for step in (1, 2):
        storage.publish_checkpoint(checkpoint_dir(tmp_path, step), out, step, owner="uid-a")
    assert storage.complete_checkpoints(out, owner="uid-b") == []
    assert [s for s, _ in storage.complete_checkpoints(out, owner="uid-a")] == [2, 1]
    # Same size, other content: the listing's sizes cannot tell, the SHA-256 can.
    newest = checkpoint_uri(out, 2)
    original = storage.read_bytes(f"{newest}trainer_state.json")
    put(raw, f"{newest}trainer_state.json", bytes(b ^ 1 for b in original))
    with pytest.raises(StorageError) as corrupted:
        storage.fetch_checkpoint(newest, tmp_path / "resume-2")
    assert corrupted.value.reason == "StorageChecksumMismatch" and "trainer_state.json" in str(
        corrupted.value
    )
    local = storage.fetch_checkpoint(checkpoint_uri(out, 1), tmp_path / "resume-1")
    assert (local / "trainer_state.json").is_file()
