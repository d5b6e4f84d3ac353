"""The offline parts of kubetune_trainer.storage: URIs, local resolution, manifests, errors.

No network: Storage objects are built with fake keys (creating a boto3 client sends nothing)
and only asked about local schemes; botocore exceptions are constructed, as botocore does.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError

from kubetune_trainer.api import FineTuneSpec, StorageConfig
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.storage import (
    MiB,
    S3Uri,
    Storage,
    StorageError,
    UploadedFile,
    _check_distinct,
    _safe_relpath,
    checkpoint_uri,
    parse_manifest,
    resolve_hf,
    resolve_local,
    resolve_pvc,
    sha256_file,
    storage_error,
    uri_scheme,
    verify_manifest,
    write_manifest,
)

KEY_ID = "test-access-key-id-0001"  # redaction is by value, any string works
SECRET = "s3cr3t/EXAMPLE+key/abcdefghijklmnop"
FAKE_ENV = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_storage(tmp_path: Path, config: StorageConfig | None = None, **kwargs: Any) -> Storage:
    return Storage(config, env=FAKE_ENV, work_dir=tmp_path / "work", **kwargs)


# ------------------------------------------------------------------------------------- URIs


def test_s3_uri_parse_str_and_join() -> None:
    uri = S3Uri.parse("s3://my-bucket/data/train")
    assert (uri.bucket, uri.key, str(uri)) == (
        "my-bucket",
        "data/train",
        "s3://my-bucket/data/train",
    )
    assert uri.dir_prefix == "data/train/"
    assert str(uri.join("a.jsonl")) == "s3://my-bucket/data/train/a.jsonl"
    assert str(uri.join("sub/", "/b")) == "s3://my-bucket/data/train/sub/b"
    root = S3Uri.parse("s3://my-bucket")
    assert (root.key, root.dir_prefix, str(root.join("x"))) == ("", "", "s3://my-bucket/x")
    assert S3Uri.parse("s3://my-bucket/dir/").dir_prefix == "dir/"


@pytest.mark.parametrize("bad", ["s3://", "s3://Upper/x", "s3://ab/x", "s3:///key", "gs://b/x"])
def test_s3_uri_rejects_malformed(bad: str) -> None:
    with pytest.raises(StorageError) as info:
        S3Uri.parse(bad)
    assert info.value.reason == "StorageInvalidUri"
    assert bad in str(info.value)


def test_uri_scheme_dispatch() -> None:
    assert uri_scheme("s3://b/k") == "s3"
    assert uri_scheme("pvc://claim/x") == "pvc"
    assert uri_scheme("hf://org/name") == "hf"
    assert uri_scheme("file:///tmp/x") == "file"
    assert uri_scheme("data/train.jsonl") == "local"
    with pytest.raises(StorageError, match=r"unsupported scheme 'gs'.*s3://, pvc://, hf://"):
        uri_scheme("gs://bucket/x")


def test_checkpoint_uri_is_zero_padded() -> None:
    assert checkpoint_uri("s3://out/run-1", 123) == "s3://out/run-1/checkpoints/step-000000123/"
    assert checkpoint_uri("s3://out/run-1/", 5) == "s3://out/run-1/checkpoints/step-000000005/"


def test_safe_relpath_and_collisions(tmp_path: Path) -> None:
    assert str(_safe_relpath("a/b.json", "s3://b/p")) == "a/b.json"
    assert str(_safe_relpath("/a//b.json", "s3://b/p")) == "a/b.json"
    assert str(_safe_relpath("./a", "s3://b/p")) == "a"
    for evil in ("../etc/passwd", "a/../../x", "", "/"):
        with pytest.raises(StorageError, match="cannot be stored as a local file"):
            _safe_relpath(evil, "s3://b/p")
    from kubetune_trainer.storage import ObjectInfo  # noqa: PLC0415

    def target(rel: str) -> tuple[ObjectInfo, Path]:
        info = ObjectInfo("s3://b/" + rel, "b", rel, rel, 1, '"e"', None)  # type: ignore[arg-type]
        return info, tmp_path / _safe_relpath(rel, "s3://b/")

    _check_distinct([target("a/b"), target("a/c")], "s3://b/")
    with pytest.raises(StorageError, match="collide"):
        _check_distinct([target("a"), target("a/b")], "s3://b/")
    with pytest.raises(StorageError, match="collide"):
        _check_distinct([target("a//b"), target("a/b")], "s3://b/")


# ------------------------------------------------------------------------- local schemes


def test_pvc_resolves_in_place(tmp_path: Path) -> None:
    (tmp_path / "data-claim" / "sets").mkdir(parents=True)
    (tmp_path / "data-claim" / "sets" / "train.jsonl").write_text("{}\n")
    assert resolve_pvc("pvc://data-claim/sets/train.jsonl", tmp_path) == (
        tmp_path / "data-claim" / "sets" / "train.jsonl"
    )
    assert resolve_pvc("pvc://data-claim", tmp_path) == tmp_path / "data-claim"

    with pytest.raises(StorageError, match=r"pvc://other/x: claim 'other' is not mounted at"):
        resolve_pvc("pvc://other/x", tmp_path)
    with pytest.raises(StorageError, match=r"pvc://data-claim/missing: .* does not exist on"):
        resolve_pvc("pvc://data-claim/missing", tmp_path)
    with pytest.raises(StorageError, match="escapes"):
        resolve_pvc("pvc://data-claim/../../etc", tmp_path)


def test_local_paths_and_file_uris(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("{}\n")
    assert resolve_local(str(path)) == path
    assert resolve_local(f"file://{path}") == path
    with pytest.raises(StorageError, match=r"file:///nope/x.jsonl: no such file") as info:
        resolve_local("file:///nope/x.jsonl")
    assert info.value.reason == "StorageNotFound"


def make_hf_cache(root: Path, repo: str = "org/tiny-model") -> Path:
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "refs" / "v1").write_text(COMMIT)  # as huggingface_hub writes refs
    return snapshot


def test_hf_resolves_only_from_offline_cache(tmp_path: Path) -> None:
    snapshot = make_hf_cache(tmp_path)
    assert resolve_hf("hf://org/tiny-model", hub_cache=tmp_path) == snapshot
    assert resolve_hf("hf://org/tiny-model", "v1", tmp_path) == snapshot
    assert resolve_hf("hf://org/tiny-model", COMMIT, tmp_path) == snapshot

    with pytest.raises(StorageError) as info:
        resolve_hf("hf://org/other", hub_cache=tmp_path)
    message = str(info.value)
    assert message.startswith("hf://org/other (revision main) is not in the offline")
    assert "huggingface-cli download org/other" in message
    assert "s3://" in message
    assert info.value.reason == "StorageNotFound"
    with pytest.raises(StorageError, match=r"revision v9"):
        resolve_hf("hf://org/tiny-model", "v9", tmp_path)
    with pytest.raises(StorageError, match="not an hf://org/name URI"):
        resolve_hf("hf://org/name/extra", hub_cache=tmp_path)


def test_hf_hub_cache_is_huggingface_hubs_and_follows_its_environment(tmp_path: Path) -> None:
    probe = "from kubetune_trainer.storage import hf_hub_cache; print(hf_hub_cache())"
    for env, expected in [
        ({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}, "/a"),
        ({"HF_HOME": "/b", "XDG_CACHE_HOME": "/c"}, "/b/hub"),
        ({"XDG_CACHE_HOME": "/c"}, "/c/huggingface/hub"),
    ]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
        out = subprocess.run(
            [sys.executable, "-c", probe], env={**clean, **env}, check=True,
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        assert out == expected, env


def test_fetch_resolves_local_schemes_without_any_request(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    snapshot = make_hf_cache(hub)
    (tmp_path / "pvc" / "claim").mkdir(parents=True)
    storage = offline_storage(tmp_path, pvc_root=tmp_path / "pvc", hub_cache=hub)
    dest = tmp_path / "dest"
    assert storage.fetch("hf://org/tiny-model", dest) == snapshot
    assert storage.fetch("pvc://claim", dest) == tmp_path / "pvc" / "claim"
    assert storage.fetch(str(snapshot / "config.json"), dest) == snapshot / "config.json"
    assert not dest.exists()
    assert not storage.stats.api_calls


# --------------------------------------------------------------------------- client setup


def test_client_settings_come_from_spec_then_env(tmp_path: Path) -> None:
    config = StorageConfig(
        endpoint="http://minio.storage:9000", region="eu-west-3", addressing_style="virtual"
    )
    env = {**FAKE_ENV, "AWS_ENDPOINT_URL": "http://fallback:9000"}
    storage = Storage(config, env=env, work_dir=tmp_path, max_workers=4, max_concurrency=12)
    conf: Any = storage.client.meta.config  # botocore.config.Config sets its attributes dynamically
    assert storage.client.meta.endpoint_url == "http://minio.storage:9000"
    assert storage.client.meta.region_name == "eu-west-3"
    assert conf.s3 == {"addressing_style": "virtual"}
    assert conf.retries == {"mode": "standard", "total_max_attempts": 5}
    assert conf.max_pool_connections >= 12 + 4
    assert (conf.connect_timeout, conf.read_timeout) == (10, 60)
    assert conf.request_checksum_calculation == "when_required"
    assert storage.transfer_config.max_request_concurrency == 12
    assert 16 * MiB <= storage.transfer_config.multipart_chunksize <= 64 * MiB
    assert not storage.anonymous
    # No endpoint in the spec: AWS_ENDPOINT_URL applies.
    fallback = Storage(StorageConfig(), env=env, work_dir=tmp_path)
    assert fallback.endpoint == "http://fallback:9000"
    assert getattr(fallback.client.meta.config, "s3", None) == {"addressing_style": "path"}


def test_cache_dir_default_env_and_off(tmp_path: Path) -> None:
    assert offline_storage(tmp_path).cache_dir == tmp_path / "work" / ".cache" / "s3"
    env = {**FAKE_ENV, "KUBETUNE_CACHE_DIR": str(tmp_path / "shared")}
    assert Storage(env=env, work_dir=tmp_path).cache_dir == tmp_path / "shared"
    assert offline_storage(tmp_path, cache_dir=tmp_path / "c").cache_dir == tmp_path / "c"
    assert offline_storage(tmp_path, use_cache=False).cache_dir is None


def test_from_trainer_config_uses_spec_storage_and_work_dir(tmp_path: Path) -> None:
    spec = FineTuneSpec.model_validate(
        {
            "baseModel": {"uri": "hf://org/tiny-model"},
            "dataset": {"trainUri": "s3://data-bucket/train"},
            "output": {"uri": "s3://out-bucket/run"},
            "storage": {"endpoint": "http://s3.local:9000", "region": "auto"},
        }
    )
    config = TrainerConfig(spec=spec, work_dir=str(tmp_path))
    storage = Storage.from_trainer_config(config, env=FAKE_ENV)
    assert (storage.endpoint, storage.region) == ("http://s3.local:9000", "auto")
    assert storage.cache_dir == tmp_path / ".cache" / "s3"


# ----------------------------------------------------------------------------- manifests


def test_manifest_round_trip_and_sha256sum_compatible(tmp_path: Path) -> None:
    files = []
    for rel, content in [("b.bin", b"\x00\x01"), ("dir/a file.json", b"{}"), ("c", b"")]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        files.append(UploadedFile(rel, len(content), hashlib.sha256(content).hexdigest()))
        assert sha256_file(path) == files[-1].sha256
    manifest = write_manifest(files)
    assert manifest.decode().splitlines()[0] == f"{files[0].sha256}  b.bin"  # sorted by path
    assert parse_manifest(manifest) == {f.path: f.sha256 for f in files}
    assert verify_manifest(manifest, tmp_path) == 3
    # The coreutils tool accepts it as is.
    (tmp_path / "SHA256SUMS").write_bytes(manifest)
    check = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"],
        cwd=tmp_path,
        capture_output=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout
    # Binary-mode lines ("<sha> *path") are read too.
    assert parse_manifest(f"{files[0].sha256} *b.bin\n".encode()) == {"b.bin": files[0].sha256}


def test_verify_manifest_names_bad_files(tmp_path: Path) -> None:
    (tmp_path / "ok").write_bytes(b"ok")
    (tmp_path / "bad").write_bytes(b"changed")
    manifest = write_manifest(
        [
            UploadedFile("ok", 2, hashlib.sha256(b"ok").hexdigest()),
            UploadedFile("bad", 3, hashlib.sha256(b"bad").hexdigest()),
            UploadedFile("gone", 1, hashlib.sha256(b"x").hexdigest()),
        ]
    )
    with pytest.raises(StorageError) as info:
        verify_manifest(manifest, tmp_path)
    assert "bad checksum mismatch" in str(info.value)
    assert "gone missing" in str(info.value)
    assert "ok" not in str(info.value).split(":", 1)[1].replace("manifest", "")
    assert info.value.reason == "StorageChecksumMismatch"


def test_manifest_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="cannot list"):
        write_manifest([UploadedFile("a\nb", 1, "0" * 64)])
    with pytest.raises(ValueError, match="line 2"):
        parse_manifest(b"%s  a\nnot a manifest line\n" % (b"0" * 64))


# -------------------------------------------------------------------------- error mapping


def client_error(code: str, status: int, message: str = "", op: str = "GetObject") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, op)


URI = "s3://train-data/sets/v2"


@pytest.mark.parametrize(
    ("exc", "reason", "expected"),
    [
        (client_error("NoSuchKey", 404), "StorageNotFound", f"no object at {URI}"),
        (client_error("404", 404, op="HeadObject"), "StorageNotFound", f"no object at {URI}"),
        (
            client_error("NoSuchBucket", 404, op="ListObjectsV2"),
            "StorageNoSuchBucket",
            "bucket 'train-data' does not exist at http://minio:9000",
        ),
        (
            client_error("AccessDenied", 403),
            "StorageAccessDenied",
            f"access denied to {URI} (the credentials may not read",
        ),
        (client_error("403", 403, op="HeadObject"), "StorageAccessDenied", "access denied"),
        (
            client_error("InvalidAccessKeyId", 403),
            "StorageAccessDenied",
            "http://minio:9000 does not know the access key id",
        ),
        (
            client_error("SignatureDoesNotMatch", 403, f"key {SECRET} sig"),
            "StorageAccessDenied",
            "the secret access key does not match",
        ),
        (client_error("ExpiredToken", 400), "StorageAccessDenied", "session token has expired"),
        (
            client_error("AuthorizationHeaderMalformed", 400),
            "StorageWrongRegion",
            "set spec.storage.region",
        ),
        (client_error("RequestTimeTooSkewed", 403), "StorageClockSkew", "clock"),
        (client_error("PreconditionFailed", 412), "StorageObjectChanged", "changed while"),
        (
            S3DownloadFailedError('Contents of stored object "k" did not match expected ETag.'),
            "StorageObjectChanged",
            "changed while",
        ),
        (client_error("SlowDown", 503), "StorageUnavailable", "overloaded or unavailable"),
        (
            client_error("WeirdError", 400, f"odd {KEY_ID}"),
            "StorageError",
            f"could not read {URI}: WeirdError (HTTP 400): odd ***",
        ),
        (
            EndpointConnectionError(
                endpoint_url="http://minio:9000/train-data",
                error=ConnectionRefusedError(111, "Connection refused"),
            ),
            "StorageUnreachable",
            f"cannot reach the S3 endpoint http://minio:9000 for {URI} (connection refused)",
        ),
        (
            EndpointConnectionError(
                endpoint_url="http://minio:9000/x",
                error=socket.gaierror(-2, "Name or service not known"),
            ),
            "StorageUnreachable",
            "(DNS lookup failed",
        ),
        (
            ConnectTimeoutError(endpoint_url="http://minio:9000/x"),
            "StorageTimeout",
            "timed out connecting to the S3 endpoint http://minio:9000",
        ),
        (
            ReadTimeoutError(endpoint_url="http://minio:9000/x"),
            "StorageTimeout",
            "did not answer",
        ),
        (
            RetriesExceededError(ReadTimeoutError(endpoint_url="http://minio:9000/x")),
            "StorageTimeout",
            "did not answer",
        ),
        (NoCredentialsError(), "StorageAccessDenied", "no usable credentials"),
    ],
)
def test_error_mapping(exc: Exception, reason: str, expected: str) -> None:
    error = storage_error(
        exc, URI, action="read", endpoint="http://minio:9000", redact=[KEY_ID, SECRET]
    )
    message = str(error)
    assert expected in message
    assert error.reason == reason
    assert error.uri == URI
    assert URI in message
    assert "\n" not in message
    assert KEY_ID not in message
    assert SECRET not in message


def test_access_denied_names_the_secret(tmp_path: Path) -> None:
    config = StorageConfig.model_validate({"credentialsSecretRef": {"name": "team-s3"}})
    storage = offline_storage(tmp_path, config)
    with pytest.raises(StorageError) as info, storage._mapped(URI, "write"):
        raise client_error("AccessDenied", 403, op="PutObject")
    assert str(info.value) == (
        f"access denied to {URI} (the credentials may not write this bucket or prefix): check "
        "the credentials Secret 'team-s3' (spec.storage.credentialsSecretRef)"
    )


def test_storage_error_is_one_line() -> None:
    error = StorageError("first\n  second\tthird", uri="s3://b/k")
    assert str(error) == "first second third"
    assert error.reason == "StorageError"
