"""Object storage for the trainer: pull inputs, push outputs and checkpoints.

Inputs come as URIs (kubetune_trainer.api): s3://bucket/key from any S3-compatible store,
pvc://claim/path from a mounted PersistentVolumeClaim, hf://org/name from the offline Hugging
Face cache, and plain paths or file:// URIs for runs on a workstation. Only s3:// is copied;
the others resolve to a local path in place.

Credentials reach the pod as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables
(secretKeyRef); endpoint, region and addressing style come from spec.storage. Every failure is a
StorageError with a one-line message that names the URI and what to check, never a credential.

Downloads run several objects at once (a thread pool over objects) through one s3transfer
manager, which also splits large objects into parallel ranged GETs. Each object lands in a
local cache keyed by its ETag and size, then is hard-linked into place: a retried pod on the
same volume, or a second fetch of unchanged data, downloads nothing.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Concatenate, Final, ParamSpec, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,  # not the builtin
)
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.subscribers import BaseSubscriber

from kubetune_trainer.api import OutputFile, StorageConfig, duration_seconds
from kubetune_trainer.config import PVC_ROOT, WORK_DIR, TrainerConfig

if TYPE_CHECKING:
    from types import TracebackType

    from botocore.model import OperationModel
    from mypy_boto3_s3 import S3Client
    from s3transfer.futures import TransferFuture
    from s3transfer.manager import TransferManager

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
CHECKPOINTS_DIR: Final = "checkpoints"
COMPLETE_MARKER: Final = "_COMPLETE"
MANIFEST_NAME: Final = "SHA256SUMS"
CACHE_DIR_ENV: Final = "KUBETUNE_CACHE_DIR"

_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_STEP_DIR_RE: Final = re.compile(r"step-([0-9]+)")
_COMMIT_RE: Final = re.compile(r"[0-9a-f]{40}")
_HF_REPO_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_MANIFEST_LINE_RE: Final = re.compile(r"([0-9a-f]{64}) [ *](.+)")
_T = TypeVar("_T")
_R = TypeVar("_R")
_P = ParamSpec("_P")
# Failures that may pass (the store is down, overloaded or unreachable for now): retried with
# backoff for StorageConfig.retryTimeout, then reported as they are.
RETRIED_REASONS: Final = frozenset(
    {"StorageUnreachable", "StorageTimeout", "StorageUnavailable", "StorageClockSkew"}
)
_MAX_RETRY_DELAY: Final = 30.0


# ---------------------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A storage operation failed. The message is one line, names the URI, and says what to
    check; `reason` is a CamelCase code usable as a status reason (e.g. StorageAccessDenied)."""

    def __init__(self, message: str, *, uri: str, reason: str = "StorageError") -> None:
        # One line: the message ends up in a Kubernetes condition and in a single log line.
        super().__init__(" ".join(message.split()))
        self.uri = uri
        self.reason = reason


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, the low-level error botocore wraps in kwargs["error"], and the chain."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        kwargs = getattr(current, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        for nxt in (inner, current.__cause__, current.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _connection_problem(exc: BaseException) -> str:
    """'DNS lookup failed', 'connection refused', or a short generic text."""
    for cause in _causes(exc):
        text = str(cause)
        if (
            isinstance(cause, socket.gaierror)
            or type(cause).__name__ == "NameResolutionError"
            or "Name or service not known" in text
            or "nodename nor servname" in text
            or "Temporary failure in name resolution" in text
        ):
            return "DNS lookup failed for its host name"
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in text:
            return "connection refused"
        if isinstance(cause, SSLError) or "CERTIFICATE_VERIFY_FAILED" in text:
            return "TLS handshake failed (check the certificate or use http://)"
    return "could not connect"


@dataclass(frozen=True)
class _ErrorContext:
    """What the message may mention besides the URI (never the credentials themselves)."""

    endpoint: str = "the default AWS S3 endpoint"
    region: str = "us-east-1"
    secret_name: str | None = None
    anonymous: bool = False
    connect_timeout: float | None = None
    read_timeout: float | None = None
    redact: tuple[str, ...] = ()

    def secret_hint(self) -> str:
        if self.secret_name:
            name = self.secret_name
            return f"check the credentials Secret {name!r} (spec.storage.credentialsSecretRef)"
        if self.anonymous:
            return (
                "the request was anonymous: set spec.storage.credentialsSecretRef to a Secret "
                "with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return (
            "check the credentials Secret named in spec.storage.credentialsSecretRef "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        )


_NOT_FOUND: Final = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_DENIED: Final = frozenset(
    {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
)
_EXPIRED: Final = frozenset({"ExpiredToken", "TokenRefreshRequired", "InvalidToken"})
_WRONG_REGION: Final = frozenset(
    {
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
        "301",
        "IllegalLocationConstraintException",
    }
)
_UNAVAILABLE: Final = frozenset(
    {"SlowDown", "ServiceUnavailable", "503", "InternalError", "500", "XMinioServerNotInitialized"}
)


def _client_error(
    code: str, status: int | None, message: str, *, uri: str, action: str, ctx: _ErrorContext
) -> StorageError:
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if code in _NOT_FOUND:
        return StorageError(f"no object at {uri}", uri=uri, reason="StorageNotFound")
    if code == "NoSuchBucket":
        return StorageError(
            f"bucket {bucket!r} does not exist at {ctx.endpoint} ({uri}): check the bucket name "
            "in the URI and spec.storage.endpoint",
            uri=uri,
            reason="StorageNoSuchBucket",
        )
    if code == "InvalidAccessKeyId":
        detail = f"{ctx.endpoint} does not know the access key id"
    elif code == "SignatureDoesNotMatch":
        detail = "the secret access key does not match the access key id"
    elif code in _EXPIRED:
        detail = "the session token has expired"
    elif code in _ACCESS_DENIED:
        detail = f"the credentials may not {action} this bucket or prefix"
    else:
        detail = ""
    if detail:
        return StorageError(
            f"access denied to {uri} ({detail}): {ctx.secret_hint()}",
            uri=uri,
            reason="StorageAccessDenied",
        )
    if code in _WRONG_REGION:
        return StorageError(
            f"{uri}: bucket {bucket!r} rejected region {ctx.region!r} ({code}): set "
            "spec.storage.region to the bucket's region",
            uri=uri,
            reason="StorageWrongRegion",
        )
    if code == "RequestTimeTooSkewed":
        return StorageError(
            f"{ctx.endpoint} rejected the request for {uri}: the pod's clock differs too much "
            "from the store's; fix the node's time synchronization",
            uri=uri,
            reason="StorageClockSkew",
        )
    if code in {"PreconditionFailed", "412"}:
        return StorageError(
            f"{uri} changed while it was being downloaded; retry once writers are done",
            uri=uri,
            reason="StorageObjectChanged",
        )
    if code in _UNAVAILABLE:
        return StorageError(
            f"{ctx.endpoint} is overloaded or unavailable ({code}) for {uri} after retries; "
            "retry later",
            uri=uri,
            reason="StorageUnavailable",
        )
    if code == "InvalidBucketName":
        return StorageError(
            f"{uri}: invalid bucket name {bucket!r}", uri=uri, reason="StorageInvalidUri"
        )
    http = f" (HTTP {status})" if status else ""
    return StorageError(
        f"could not {action} {uri}: {code}{http}: {message}", uri=uri, reason="StorageError"
    )


def storage_error(
    exc: BaseException,
    uri: str,
    *,
    action: str = "access",
    endpoint: str | None = None,
    region: str = "us-east-1",
    secret_name: str | None = None,
    redact: Iterable[str] = (),
) -> StorageError:
    """Translate a botocore/s3transfer exception into a StorageError for `uri`.

    `action` is the verb for the message ("read", "write", "list", "delete"); `redact` lists
    strings (the credentials) that must never appear in the message.
    """
    ctx = _ErrorContext(
        endpoint=endpoint or _ErrorContext.endpoint,
        region=region,
        secret_name=secret_name,
        redact=tuple(redact),
    )
    return _translate(exc, uri, action, ctx)


def _translate(exc: BaseException, uri: str, action: str, ctx: _ErrorContext) -> StorageError:
    error = _translate_unredacted(exc, uri, action, ctx)
    text = str(error)
    for secret in ctx.redact:
        if secret:
            text = text.replace(secret, "***")
    if text != str(error):
        error = StorageError(text, uri=uri, reason=error.reason)
    return error


def _translate_unredacted(
    exc: BaseException, uri: str, action: str, ctx: _ErrorContext
) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    # s3transfer wraps the last network error of its own retry loop.
    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        return _translate_unredacted(exc.last_exception, uri, action, ctx)
    if isinstance(exc, S3DownloadFailedError) and "did not match expected ETag" in str(exc):
        return _client_error("PreconditionFailed", 412, "", uri=uri, action=action, ctx=ctx)
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(err.get("Code") or meta.get("HTTPStatusCode") or "Unknown")
        status, message = meta.get("HTTPStatusCode"), str(err.get("Message", ""))
        return _client_error(code, status, message, uri=uri, action=action, ctx=ctx)
    # Timeouts before connection errors: ConnectTimeoutError is also a ConnectionError.
    if isinstance(exc, ConnectTimeoutError):
        limit = f" after {ctx.connect_timeout:g}s" if ctx.connect_timeout else ""
        return StorageError(
            f"timed out connecting to the S3 endpoint {ctx.endpoint}{limit} for {uri}: check "
            "spec.storage.endpoint and that the pod's network (NetworkPolicy, proxy) reaches it",
            uri=uri,
            reason="StorageTimeout",
        )
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        limit = f" for {ctx.read_timeout:g}s" if ctx.read_timeout else ""
        return StorageError(
            f"timed out: the S3 endpoint {ctx.endpoint} did not answer{limit} while trying to "
            f"{action} {uri}; the store is overloaded or the network is slow, retry later",
            uri=uri,
            reason="StorageTimeout",
        )
    # Connection refused, DNS, TLS and proxy failures (EndpointConnectionError and friends).
    if isinstance(exc, BotoConnectionError):
        return StorageError(
            f"cannot reach the S3 endpoint {ctx.endpoint} for {uri} ({_connection_problem(exc)}): "
            "check spec.storage.endpoint and that the store is running and reachable from the pod",
            uri=uri,
            reason="StorageUnreachable",
        )
    if isinstance(
        exc, ConnectionClosedError | ResponseStreamingError | IncompleteReadError | ConnectionError
    ):
        return StorageError(
            f"the connection to {ctx.endpoint} broke while trying to {action} {uri} after "
            "retries; retry later",
            uri=uri,
            reason="StorageUnavailable",
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"no usable credentials to {action} {uri}: {ctx.secret_hint()}",
            uri=uri,
            reason="StorageAccessDenied",
        )
    return StorageError(
        f"could not {action} {uri}: {type(exc).__name__}: {exc}", uri=uri, reason="StorageError"
    )


# ------------------------------------------------------------------------------------------ URIs


@dataclass(frozen=True)
class S3Uri:
    """s3://bucket/key. An empty key or one ending in '/' names a prefix."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise StorageError(f"{uri!r} is not an s3:// URI", uri=uri, reason="StorageInvalidUri")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not _BUCKET_RE.fullmatch(bucket):
            raise StorageError(
                f"{uri}: {bucket!r} is not a valid bucket name (3-63 characters: a-z, 0-9, '.' "
                "and '-')",
                uri=uri,
                reason="StorageInvalidUri",
            )
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> S3Uri:
        """Append path parts below this URI's key, as a directory ("a" + "b" -> "a/b")."""
        key = self.key
        for raw in parts:
            part = raw.lstrip("/")
            key = f"{key.rstrip('/')}/{part}" if key else part
        return S3Uri(self.bucket, key)

    @property
    def dir_prefix(self) -> str:
        """The key as a directory prefix: '' for the bucket root, else ending in '/'."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"


def uri_scheme(uri: str) -> str:
    """'s3', 'pvc', 'hf', 'file', or 'local' for a plain path."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return "local"
    if scheme in {"s3", "pvc", "hf", "file"}:
        return scheme
    raise StorageError(
        f"{uri}: unsupported scheme {scheme!r}: use s3://, pvc://, hf:// or a local path",
        uri=uri,
        reason="StorageInvalidUri",
    )


def _within(root: Path, rel: str, uri: str) -> Path:
    """root/rel, refusing '..' escapes (a URI must not reach outside its claim)."""
    target = Path(os.path.normpath(root / rel.lstrip("/")))
    if target != root and root not in target.parents:
        raise StorageError(f"{uri}: path escapes {root}", uri=uri, reason="StorageInvalidUri")
    return target


def resolve_pvc(uri: str, pvc_root: str | os.PathLike[str] = PVC_ROOT) -> Path:
    """pvc://claim/path -> PVC_ROOT/claim/path, which must exist (nothing is copied)."""
    if not uri.startswith("pvc://"):
        raise StorageError(f"{uri!r} is not a pvc:// URI", uri=uri, reason="StorageInvalidUri")
    claim, _, rel = uri[len("pvc://") :].partition("/")
    if not claim:
        raise StorageError(f"{uri}: no claim name", uri=uri, reason="StorageInvalidUri")
    mount = Path(os.path.normpath(Path(pvc_root) / claim))
    target = _within(mount, rel, uri)
    if not mount.is_dir():
        raise StorageError(
            f"{uri}: claim {claim!r} is not mounted at {mount}: check that the "
            "PersistentVolumeClaim exists in the job's namespace",
            uri=uri,
            reason="StorageNotFound",
        )
    if not target.exists():
        raise StorageError(
            f"{uri}: {target} does not exist on claim {claim!r}",
            uri=uri,
            reason="StorageNotFound",
        )
    return target


def resolve_local(uri: str) -> Path:
    """A plain path or file:// URI (workstation runs), which must exist."""
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()
    if not path.exists():
        raise StorageError(f"{uri}: no such file or directory", uri=uri, reason="StorageNotFound")
    return path


def hf_hub_cache(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face hub cache directory, resolved like huggingface_hub does."""
    env = os.environ if env is None else env
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def resolve_hf(
    uri: str, revision: str | None = None, hub_cache: str | os.PathLike[str] | None = None
) -> Path:
    """hf://org/name -> its snapshot in the offline Hugging Face cache; never a network call.

    The pod has no business reaching the Hub (air-gapped clusters, unpinned weights), so a
    model missing from the cache is an error that says how to provide it.
    """
    repo = uri.removeprefix("hf://").strip("/")
    if not uri.startswith("hf://") or not _HF_REPO_RE.fullmatch(repo):
        raise StorageError(
            f"{uri!r} is not an hf://org/name URI", uri=uri, reason="StorageInvalidUri"
        )
    cache = Path(hub_cache) if hub_cache is not None else hf_hub_cache()
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    rev = revision or "main"
    commit: str | None = rev if _COMMIT_RE.fullmatch(rev) else None
    ref = repo_dir / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = repo_dir / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise StorageError(
            f"{uri} (revision {rev}) is not in the offline Hugging Face cache at {cache}: the "
            "trainer never downloads from the Hub; pre-populate the cache in the image or a "
            f"volume (HF_HOME=<dir> huggingface-cli download {repo} --revision {rev}) or copy "
            "the model to S3 and use an s3:// URI",
            uri=uri,
            reason="StorageNotFound",
        )
    return snapshot


def _safe_relpath(rel: str, uri: str) -> PurePosixPath:
    """An object's path below the fetched prefix, as a safe relative local path."""
    path = PurePosixPath(rel.lstrip("/"))
    # A key like "data/../../etc/x" must not write outside the destination directory.
    if not path.parts or ".." in path.parts:
        raise StorageError(
            f"{uri}: object key {rel!r} cannot be stored as a local file",
            uri=uri,
            reason="StorageInvalidUri",
        )
    return path


def checkpoint_uri(output_uri: str, step: int) -> str:
    """<output>/checkpoints/step-<9 digits>/ (zero-padded so listings sort by step)."""
    return str(S3Uri.parse(output_uri).join(CHECKPOINTS_DIR, f"step-{step:09d}/"))


# -------------------------------------------------------------------------------- checksums


@dataclass(frozen=True)
class UploadedFile:
    """One uploaded file: its path relative to the upload root, size and SHA-256."""

    path: str
    size: int
    sha256: str

    def to_output_file(self) -> OutputFile:
        return OutputFile(path=self.path, size=self.size, sha256=self.sha256)


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(files: Iterable[UploadedFile]) -> bytes:
    """A SHA256SUMS manifest ("<sha256>  <path>" lines, sorted), checkable with `sha256sum -c`."""
    lines = []
    for f in sorted(files, key=lambda f: f.path):
        if "\n" in f.path or "\r" in f.path or "\\" in f.path:
            # sha256sum would need its escaping syntax; no trainer output has such names.
            raise ValueError(f"cannot list {f.path!r} in a manifest")
        lines.append(f"{f.sha256}  {f.path}\n")
    return "".join(lines).encode("utf-8")


def parse_manifest(data: bytes) -> dict[str, str]:
    """path -> sha256 from a SHA256SUMS manifest (text ' ' or binary '*' mode lines)."""
    out: dict[str, str] = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE_RE.fullmatch(line)
        if not match:
            raise ValueError(f"manifest line {number} is not '<sha256>  <path>': {line[:80]!r}")
        out[match.group(2)] = match.group(1)
    return out


def verify_manifest(manifest: bytes, root: str | os.PathLike[str]) -> int:
    """Check every file listed in `manifest` under `root`; return how many were verified.

    Raises StorageError naming up to five missing or mismatching files.
    """
    base = Path(root)
    problems: list[str] = []
    expected = parse_manifest(manifest)
    for rel, digest in expected.items():
        path = base / rel
        if not path.is_file():
            problems.append(f"{rel} missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel} checksum mismatch")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise StorageError(
            f"{base} does not match its manifest: {', '.join(problems[:5])}{more}",
            uri=str(base),
            reason="StorageChecksumMismatch",
        )
    return len(expected)


# ----------------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class ObjectInfo:
    """One object found under a URI; `path` is relative to that URI ('/'-separated)."""

    uri: str
    bucket: str
    key: str
    path: str
    size: int
    etag: str
    last_modified: datetime


@dataclass
class TransferStats:
    """What a Storage did, for logs and tests (thread-safe counters)."""

    api_calls: Counter[str] = field(default_factory=Counter)
    downloaded_objects: int = 0
    downloaded_bytes: int = 0
    cache_hits: int = 0
    uploaded_objects: int = 0
    uploaded_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def count_call(self, operation: str) -> None:
        with self._lock:
            self.api_calls[operation] += 1


class _KnownObject(BaseSubscriber):
    """Hands s3transfer the size and ETag from the listing: every GET then carries If-Match, so
    an object replaced after listing fails instead of landing in the cache under a stale ETag
    (or mixing two versions across ranges)."""

    def __init__(self, size: int, etag: str) -> None:
        self._size = size
        self._etag = etag

    def on_queued(self, future: TransferFuture, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)
        if self._etag:
            future.meta.provide_object_etag(self._etag)


class _Batch:
    """One transfer manager shared by a batch of objects (its max_concurrency bounds all their
    requests together), whose in-flight transfers can be cancelled at once when one fails."""

    def __init__(self, client: S3Client, config: TransferConfig) -> None:
        self._manager = create_transfer_manager(client, config)
        self._lock = threading.Lock()
        self._futures: set[TransferFuture] = set()
        self._cancelled = False

    def run(self, submit: Callable[[TransferManager], TransferFuture]) -> None:
        with self._lock:
            if self._cancelled:
                raise CancelledError
            future = submit(self._manager)
            self._futures.add(future)
        try:
            future.result()
        finally:
            with self._lock:
                self._futures.discard(future)

    def cancel(self) -> None:
        # s3transfer stops the streams and removes its temporary files.
        with self._lock:
            self._cancelled = True
            for future in self._futures:
                future.cancel()

    def __enter__(self) -> _Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._manager.__exit__(exc_type, exc, tb)


def check_credentials(env: Mapping[str, str], config: StorageConfig) -> None:
    """Refuse credentials no S3 client can send: whitespace or a control character (typically
    a trailing newline from `echo` or a file) makes the HTTP client reject the header and quote
    it, key and all. The message names the Secret and key, never the value."""
    ref = config.credentials_secret_ref
    keys = {
        "AWS_ACCESS_KEY_ID": ref.access_key_id_key if ref else None,
        "AWS_SECRET_ACCESS_KEY": ref.secret_access_key_key if ref else None,
        "AWS_SESSION_TOKEN": None,
    }
    for variable, key in keys.items():
        value = env.get(variable)
        if not value or not any(c.isspace() or not c.isprintable() for c in value):
            continue
        where = (
            f"key {key} of Secret {ref.name!r} (spec.storage.credentialsSecretRef)"
            if ref is not None and key is not None
            else f"the environment variable {variable}"
        )
        fix = (
            f"recreate it without the newline, e.g. `kubectl create secret generic {ref.name} "
            f"--from-literal={key}=...` or `printf %s` instead of `echo`"
            if ref is not None and key is not None
            else "set it without whitespace"
        )
        raise StorageError(
            f"the value of {where} contains whitespace or a control character (often a "
            f"trailing newline): {fix}",
            uri=config.endpoint or "s3://",
            reason="StorageCredentialsInvalid",
        )


def _retried(
    method: Callable[Concatenate[Storage, _P], _R],
) -> Callable[Concatenate[Storage, _P], _R]:
    """Run a public Storage method under Storage._retry (only the outermost call retries: a
    method that calls another does not multiply the waiting)."""

    def wrapper(self: Storage, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if getattr(self._local, "retrying", False):
            return method(self, *args, **kwargs)
        self._local.retrying = True
        try:
            return self._retry(lambda: method(self, *args, **kwargs))
        finally:
            self._local.retrying = False

    functools.update_wrapper(wrapper, method)
    return wrapper


def _version_name(etag: str, size: int) -> str:
    clean = re.sub(r"[^0-9A-Za-z-]", "", etag)[:80]
    return f"{clean}-{size}"


class Storage:
    """S3-compatible storage plus the local URI schemes, with a download cache.

    Thread-safe: one instance may serve several threads (boto3 clients are thread-safe).
    """

    def __init__(
        self,
        config: StorageConfig | None = None,
        *,
        env: Mapping[str, str] | None = None,
        work_dir: str | os.PathLike[str] = WORK_DIR,
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        pvc_root: str | os.PathLike[str] = PVC_ROOT,
        hub_cache: str | os.PathLike[str] | None = None,
        max_workers: int = 8,
        max_concurrency: int = 10,
        multipart_threshold: int = 32 * MiB,
        multipart_chunksize: int = 32 * MiB,
        max_attempts: int = 5,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        retry_seconds: float | None = None,
    ) -> None:
        config = config or StorageConfig()
        env = os.environ if env is None else env
        check_credentials(env, config)
        self.retry_seconds = (
            duration_seconds(config.retry_timeout) if retry_seconds is None else retry_seconds
        )
        self._local = threading.local()
        self.endpoint: str | None = (
            config.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        )
        self.region = config.region
        self.pvc_root = Path(pvc_root)
        self.hub_cache = Path(hub_cache) if hub_cache is not None else hf_hub_cache(env)
        self.cache_dir: Path | None = None
        if use_cache:
            default_cache = env.get(CACHE_DIR_ENV) or Path(work_dir) / ".cache" / "s3"
            self.cache_dir = Path(cache_dir if cache_dir is not None else default_cache)
        self.max_workers = max_workers
        self.stats = TransferStats()

        session = boto3.session.Session()
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        token = env.get("AWS_SESSION_TOKEN") or None
        if key_id and secret:
            anonymous = False
        else:
            key_id = secret = token = None
            # No Secret: ambient credentials (workload identity, instance profile) if there are
            # any, else unsigned requests, which public buckets accept. (On a non-AWS node the
            # lookup may wait ~1s for the instance metadata endpoint.)
            anonymous = session.get_credentials() is None
        self.anonymous = anonymous
        self._errors = _ErrorContext(
            endpoint=self.endpoint or _ErrorContext.endpoint,
            region=self.region,
            secret_name=config.credentials_secret_ref.name
            if config.credentials_secret_ref
            else None,
            anonymous=anonymous,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            redact=tuple(v for v in (key_id, secret, token) if v),
        )

        boto_config = BotoConfig(
            region_name=self.region,
            signature_version=UNSIGNED if anonymous else "s3v4",
            s3={"addressing_style": config.addressing_style},
            # "standard" retries throttling, 5xx and connection errors with jittered backoff.
            # "adaptive" adds a client-side rate limiter shared by all threads, which after one
            # SlowDown stalls every parallel transfer; the store's 503s already pace us.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            # One connection per concurrent request: all transfer requests come from the shared
            # manager's max_concurrency threads; the rest leaves room for listings and puts
            # from other threads, so no request waits for a free connection.
            max_pool_connections=max_concurrency + max_workers + 4,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            tcp_keepalive=True,
            # botocore >= 1.36 adds CRC trailers to every upload by default, which many
            # S3-compatible stores (older MinIO, Ceph, R2...) reject. Integrity of our outputs
            # comes from the SHA-256 manifest and checkpoint markers instead.
            request_checksum_calculation="when_required",
            # Also makes s3transfer skip its HeadObject and fetch every object as ranged GETs
            # that all carry If-Match with the listed ETag (see _KnownObject).
            response_checksum_validation="when_required",
        )
        self.client: S3Client = session.client(
            "s3",
            endpoint_url=self.endpoint,
            config=boto_config,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=token,
        )
        self.client.meta.events.register("before-call.s3", self._count_call)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            # Total concurrent requests of the shared transfer manager, over all objects.
            max_concurrency=max_concurrency,
            num_download_attempts=max_attempts,
            io_chunksize=1 * MiB,  # fewer, larger writes than the 256 KiB default
            preferred_transfer_client="classic",  # CRT ignores our client's endpoint settings
        )

    @classmethod
    def from_trainer_config(
        cls, config: TrainerConfig, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Storage:
        return cls(config.spec.storage, env=env, work_dir=config.work_dir, **kwargs)

    def _retry(self, operation: Callable[[], _R]) -> _R:
        """`operation`, tried again with exponential backoff (1 s doubling to 30 s) while it
        fails in a way that may pass (RETRIED_REASONS), for at most retry_seconds in all."""
        deadline = time.monotonic() + self.retry_seconds
        delay, attempt = 1.0, 1
        while True:
            try:
                return operation()
            except StorageError as exc:
                remaining = deadline - time.monotonic()
                if exc.reason not in RETRIED_REASONS:
                    raise
                if remaining <= 0:
                    if attempt == 1:
                        raise
                    raise StorageError(
                        f"{exc} (still failing after {attempt} attempts in "
                        f"{self.retry_seconds:g}s: spec.storage.retryTimeout)",
                        uri=exc.uri,
                        reason=exc.reason,
                    ) from exc
                wait = min(delay, remaining)
                log.warning(
                    "%s; retrying in %.0fs (attempt %d, for up to %.0fs more)",
                    exc,
                    wait,
                    attempt,
                    remaining,
                )
                time.sleep(wait)
                delay, attempt = min(delay * 2, _MAX_RETRY_DELAY), attempt + 1

    def _count_call(self, model: OperationModel, **kwargs: Any) -> None:
        self.stats.count_call(model.name)

    @contextmanager
    def _mapped(self, uri: str | S3Uri, action: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except (
            BotoCoreError,
            ClientError,
            RetriesExceededError,
            S3DownloadFailedError,
            TimeoutError,
            ConnectionError,
        ) as exc:
            raise _translate(exc, str(uri), action, self._errors) from exc

    # --------------------------------------------------------------------------- listing

    def _list_raw(self, bucket: str, prefix: str, uri: str) -> Iterator[dict[str, Any]]:
        with self._mapped(uri, "list"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    yield dict(obj)

    def _info(self, bucket: str, obj: Mapping[str, Any], rel: str) -> ObjectInfo:
        key = str(obj["Key"])
        return ObjectInfo(
            uri=f"s3://{bucket}/{key}",
            bucket=bucket,
            key=key,
            path=rel,
            size=int(obj["Size"]),
            etag=str(obj.get("ETag", "")),
            last_modified=obj["LastModified"],
        )

    def _resolve(self, src: S3Uri) -> tuple[builtins.list[ObjectInfo], bool]:
        """Objects named by `src` and whether it named a single object.

        A key without a trailing '/' is an object if one exists with exactly that key, else a
        directory: "data" matches "data/a.jsonl" but never "data-old/a.jsonl".
        """
        uri = str(src)
        if not src.key or src.key.endswith("/"):
            return [
                self._info(src.bucket, o, o["Key"][len(src.key) :])
                for o in self._list_raw(src.bucket, src.key, uri)
                if not o["Key"].endswith("/")  # zero-byte "folder" markers from consoles
            ], False
        exact: ObjectInfo | None = None
        children: builtins.list[ObjectInfo] = []
        for o in self._list_raw(src.bucket, src.key, uri):
            key = o["Key"]
            if key == src.key:
                exact = self._info(src.bucket, o, PurePosixPath(key).name)
            elif key.startswith(src.key + "/") and not key.endswith("/"):
                children.append(self._info(src.bucket, o, key[len(src.key) + 1 :]))
        return ([exact], True) if exact is not None else (children, False)

    @_retried
    def list(self, uri: str) -> builtins.list[ObjectInfo]:
        """Objects at `uri`: the object itself, or everything under it as a directory."""
        return self._resolve(S3Uri.parse(uri))[0]

    @_retried
    def exists(self, uri: str) -> bool:
        """Whether an object or any object below `uri` (as a directory) exists."""
        src = S3Uri.parse(uri)
        # Pages are fetched lazily: this stops at the first match. "data" exists if "data" or
        # "data/..." does; a sibling "data-old/..." does not count.
        return any(
            o["Key"] == src.key or o["Key"].startswith(src.dir_prefix)
            for o in self._list_raw(src.bucket, src.key, uri)
        )

    @_retried
    def read_bytes(self, uri: str) -> bytes:
        src = S3Uri.parse(uri)
        with self._mapped(src, "read"):
            body = self.client.get_object(Bucket=src.bucket, Key=src.key)["Body"]
            try:
                return body.read()
            finally:
                body.close()

    # ------------------------------------------------------------------------- fetching

    @_retried
    def fetch(self, uri: str, dest: str | os.PathLike[str], *, revision: str | None = None) -> Path:
        """Make `uri` available locally and return its local path.

        s3:// objects are downloaded below `dest` (a directory): a single object to
        dest/<name>, a prefix with its relative paths preserved (the return value is then
        dest). pvc://, hf://, file:// and plain paths resolve in place; `dest` is unused and
        `revision` applies to hf:// only.
        """
        scheme = uri_scheme(uri)
        if scheme == "pvc":
            return resolve_pvc(uri, self.pvc_root)
        if scheme == "hf":
            return resolve_hf(uri, revision, self.hub_cache)
        if scheme in {"file", "local"}:
            return resolve_local(uri)
        src = S3Uri.parse(uri)
        started = time.monotonic()
        objects, single = self._resolve(src)
        if not objects:
            raise StorageError(
                f"no objects under {src}: check the URI (keys are case-sensitive) and that the "
                "data was uploaded",
                uri=uri,
                reason="StorageNotFound",
            )
        root = Path(dest)
        targets = [(o, root / _safe_relpath(o.path, o.uri)) for o in objects]
        _check_distinct(targets, uri)
        before = (self.stats.downloaded_objects, self.stats.downloaded_bytes, self.stats.cache_hits)
        with _Batch(self.client, self.transfer_config) as batch:
            self._parallel(lambda t: self._fetch_one(batch, *t), targets, batch.cancel)
        log.info(
            "fetched %s: %d objects (%d downloaded, %.1f MiB; %d from cache) in %.1fs",
            uri,
            len(targets),
            self.stats.downloaded_objects - before[0],
            (self.stats.downloaded_bytes - before[1]) / MiB,
            self.stats.cache_hits - before[2],
            time.monotonic() - started,
        )
        return targets[0][1] if single else root

    def _parallel(
        self, fn: Callable[[_T], _R], items: Sequence[_T], cancel: Callable[[], None]
    ) -> builtins.list[_R]:
        """fn over items on max_workers threads, results in order. The first error wins: items
        not yet started are dropped and `cancel` stops the transfers in flight, so a failure
        surfaces now rather than after the other (possibly huge) objects finish."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            futures: builtins.list[Future[_R]] = [pool.submit(fn, item) for item in items]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            errors = [f.exception() for f in futures if f in done]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                for f in pending:
                    f.cancel()
                cancel()
                raise first
            return [f.result() for f in futures]

    def _fetch_one(self, batch: _Batch, obj: ObjectInfo, target: Path) -> None:
        with self._mapped(obj.uri, "read"):
            if self.cache_dir is None or not obj.etag:
                self._download(batch, obj, target, cached=False)
                return
            entry = self._cache_entry(obj)
            if not _cache_valid(entry, obj):
                self._download(batch, obj, entry, cached=True)
                _drop_other_versions(entry)
            else:
                self.stats.add(cache_hits=1)
            _link_into_place(entry, target, obj.uri)

    def _cache_entry(self, obj: ObjectInfo) -> Path:
        assert self.cache_dir is not None
        # One directory per (endpoint, bucket, key); the file name is the version, so a changed
        # object gets a new entry atomically and no separate metadata can go stale.
        ident = hashlib.sha256(f"{self.endpoint}\n{obj.uri}".encode()).hexdigest()
        return self.cache_dir / ident[:2] / ident[2:40] / _version_name(obj.etag, obj.size)

    def _download(self, batch: _Batch, obj: ObjectInfo, target: Path, *, cached: bool) -> None:
        """Download to a temporary name next to `target`, then rename: a killed pod never
        leaves a partial file under a final name."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
        try:
            known = _KnownObject(obj.size, obj.etag)
            batch.run(lambda m: m.download(obj.bucket, obj.key, str(tmp), subscribers=[known]))
            size = tmp.stat().st_size
            if size != obj.size:
                raise StorageError(
                    f"{obj.uri}: downloaded {size} bytes but the store listed {obj.size}; retry",
                    uri=obj.uri,
                    reason="StorageObjectChanged",
                )
            if cached:
                # Read-only and stamped with the object's time: a write through a hard link
                # in the destination fails, or changes the mtime and invalidates the entry.
                tmp.chmod(0o444)
                stamp = _mtime_ns(obj)
                os.utime(tmp, ns=(stamp, stamp))
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            # botocore's timeouts are OSErrors too (via requests): network, not disk.
            if isinstance(exc, BotoCoreError | TimeoutError | ConnectionError):
                raise
            raise StorageError(
                f"cannot write {obj.uri} to {target}: {exc.strerror or exc}",
                uri=obj.uri,
                reason="StorageLocalError",
            ) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.stats.add(downloaded_objects=1, downloaded_bytes=obj.size)

    # -------------------------------------------------------------------------- uploading

    @_retried
    def upload_file(self, local: str | os.PathLike[str], uri: str) -> UploadedFile:
        """Upload one file to exactly `uri`; `path` in the result is the object's name."""
        path = Path(local)
        dst = S3Uri.parse(uri)
        with _Batch(self.client, self.transfer_config) as batch:
            return self._upload_one(batch, path, dst, PurePosixPath(dst.key).name)

    @_retried
    def upload_dir(
        self, local_dir: str | os.PathLike[str], uri: str
    ) -> builtins.list[UploadedFile]:
        """Upload every file below `local_dir` to `uri` as a directory, several at once.

        Each object carries its SHA-256 as x-amz-meta-sha256. Returns the files sorted by path.
        """
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(
                f"cannot upload {root} to {uri}: not a directory",
                uri=uri,
                reason="StorageLocalError",
            )
        files = sorted(
            (Path(dirpath) / name).relative_to(root).as_posix()
            for dirpath, _, names in os.walk(root)  # symlinked directories are not followed
            for name in names
            if (Path(dirpath) / name).is_file()
        )
        if not files:
            raise StorageError(
                f"nothing to upload to {uri}: {root} has no files",
                uri=uri,
                reason="StorageLocalError",
            )
        base = S3Uri.parse(uri)
        with _Batch(self.client, self.transfer_config) as batch:
            return self._parallel(
                lambda rel: self._upload_one(batch, root / rel, base.join(rel), rel),
                files,
                batch.cancel,
            )

    def _upload_one(self, batch: _Batch, path: Path, dst: S3Uri, rel: str) -> UploadedFile:
        with self._mapped(dst, "write"):
            try:
                size = path.stat().st_size
                digest = sha256_file(path)
            except OSError as exc:
                raise StorageError(
                    f"cannot upload {path} to {dst}: {exc.strerror or exc}",
                    uri=str(dst),
                    reason="StorageLocalError",
                ) from exc
            extra_args = {
                "Metadata": {"sha256": digest},
                "ContentType": mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            }
            batch.run(lambda m: m.upload(str(path), dst.bucket, dst.key, extra_args=extra_args))
        self.stats.add(uploaded_objects=1, uploaded_bytes=size)
        return UploadedFile(path=rel, size=size, sha256=digest)

    @_retried
    def put_bytes(
        self, uri: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        dst = S3Uri.parse(uri)
        with self._mapped(dst, "write"):
            self.client.put_object(
                Bucket=dst.bucket, Key=dst.key, Body=data, ContentType=content_type
            )
        self.stats.add(uploaded_objects=1, uploaded_bytes=len(data))

    @_retried
    def create_bytes(
        self, uri: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        """Store `data` at `uri` only if no object is there: an atomic create (an S3 conditional
        write, If-None-Match: *). False when one already was."""
        dst = S3Uri.parse(uri)
        try:
            with self._mapped(dst, "write"):
                self.client.put_object(
                    Bucket=dst.bucket,
                    Key=dst.key,
                    Body=data,
                    ContentType=content_type,
                    IfNoneMatch="*",
                )
        except StorageError as exc:
            if exc.reason == "StorageObjectChanged":  # 412 Precondition Failed: it exists
                return False
            raise
        self.stats.add(uploaded_objects=1, uploaded_bytes=len(data))
        return True

    @_retried
    def put_json(self, uri: str, value: Any) -> None:
        data = json.dumps(value, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        self.put_bytes(uri, data, "application/json")

    # ---------------------------------------------------------------------------- deleting

    def _delete_keys(self, bucket: str, keys: Sequence[str], uri: str) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start : start + 1000]
            with self._mapped(uri, "delete"):
                response = self.client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise _client_error(
                    str(first.get("Code", "Unknown")),
                    None,
                    f"{first.get('Message', '')} ({len(errors)} objects not deleted)",
                    uri=f"s3://{bucket}/{first.get('Key', '')}",
                    action="delete",
                    ctx=self._errors,
                )

    @_retried
    def delete_prefix(self, uri: str) -> int:
        """Delete the object at `uri` and everything below it as a directory; return the count.

        Refuses a bucket root, so a mistyped URI cannot empty a bucket.
        """
        src = S3Uri.parse(uri)
        if not src.key.strip("/"):
            raise StorageError(
                f"refusing to delete everything in bucket {src.bucket!r} ({uri})",
                uri=uri,
                reason="StorageInvalidUri",
            )
        # Unlike _resolve, keeps "folder" markers: nothing of the prefix stays.
        keys = [
            o["Key"]
            for o in self._list_raw(src.bucket, src.key, uri)
            if o["Key"] == src.key or o["Key"].startswith(src.dir_prefix)
        ]
        self._delete_keys(src.bucket, keys, uri)
        return len(keys)

    # ------------------------------------------------------------------------- checkpoints

    @_retried
    def publish_checkpoint(
        self,
        local_dir: str | os.PathLike[str],
        output_uri: str,
        step: int,
        *,
        owner: str | None = None,
    ) -> str:
        """Upload a checkpoint to <output>/checkpoints/step-<9 digits>/ and return its URI.

        The _COMPLETE marker (JSON: step, the owner (the FineTuneJob's uid) and every file's
        size and SHA-256) is written last, after all files are stored: a pod killed mid-upload
        leaves a prefix without a marker, which complete_checkpoints ignores.
        """
        if (Path(local_dir) / COMPLETE_MARKER).exists():
            raise StorageError(
                f"{local_dir} contains a file named {COMPLETE_MARKER}, reserved for the marker",
                uri=output_uri,
                reason="StorageLocalError",
            )
        uri = checkpoint_uri(output_uri, step)
        ckpt = S3Uri.parse(uri)
        marker = ckpt.join(COMPLETE_MARKER)
        # A previous attempt at this step may have left files (or even a marker vouching for
        # other files): drop the marker first, then the rest, so no mix is ever "complete".
        stale = [o["Key"] for o in self._list_raw(ckpt.bucket, ckpt.key, uri)]
        if marker.key in stale:
            self._delete_keys(ckpt.bucket, [marker.key], uri)
        self._delete_keys(ckpt.bucket, [k for k in stale if k != marker.key], uri)
        files = self.upload_dir(local_dir, uri)
        self.put_json(
            str(marker),
            {
                "step": step,
                "owner": owner,
                "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
            },
        )
        return uri

    def _scan_checkpoints(self, output_uri: str) -> dict[int, _Checkpoint]:
        base = S3Uri.parse(output_uri).join(CHECKPOINTS_DIR + "/")
        found: dict[int, _Checkpoint] = {}
        for obj in self._list_raw(base.bucket, base.key, str(base)):
            dirname, _, rest = obj["Key"][len(base.key) :].partition("/")
            match = _STEP_DIR_RE.fullmatch(dirname)
            if not match or not rest:
                continue
            step = int(match.group(1))
            ckpt = found.setdefault(step, _Checkpoint(step, str(base.join(dirname + "/"))))
            ckpt.sizes[rest] = int(obj["Size"])
        return found

    def _vouched(self, ckpt: _Checkpoint, owner: str | None = None) -> bool:
        """Whether the checkpoint's marker exists, names its step (and `owner`, when given),
        and lists files that all exist with the recorded sizes (one GET; the sizes come from
        the listing)."""
        if COMPLETE_MARKER not in ckpt.sizes:
            return False
        marker_uri = str(S3Uri.parse(ckpt.uri).join(COMPLETE_MARKER))
        try:
            marker = json.loads(self.read_bytes(marker_uri))
            files = {str(f["path"]): int(f["size"]) for f in marker["files"]}
            if owner is not None and marker.get("owner") != owner:
                log.warning(
                    "ignoring checkpoint %s: written by another job (owner %s, not %s)",
                    ckpt.uri,
                    marker.get("owner"),
                    owner,
                )
                return False
            valid = marker["step"] == ckpt.step and all(
                ckpt.sizes.get(path) == size for path, size in files.items()
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring checkpoint %s: unreadable marker (%s)", ckpt.uri, exc)
            return False
        except StorageError as exc:
            if exc.reason != "StorageNotFound":  # else: pruned between listing and reading
                raise
            return False
        if not valid:
            log.warning("ignoring checkpoint %s: its marker does not match its files", ckpt.uri)
        return bool(valid)

    @_retried
    def complete_checkpoints(
        self, output_uri: str, owner: str | None = None
    ) -> builtins.list[tuple[int, str]]:
        """(step, uri) of every checkpoint whose _COMPLETE marker vouches for its files (and
        names `owner`, when given), newest first. Prefixes without a marker (killed uploads)
        never qualify, nor do another job's checkpoints."""
        found = sorted(self._scan_checkpoints(output_uri).values(), key=lambda c: -c.step)
        return [(c.step, c.uri) for c in found if self._vouched(c, owner)]

    def latest_complete_checkpoint(
        self, output_uri: str, owner: str | None = None
    ) -> tuple[int, str] | None:
        """The newest of complete_checkpoints, or None."""
        return next(iter(self.complete_checkpoints(output_uri, owner)), None)

    @_retried
    def fetch_checkpoint(self, uri: str, dest: str | os.PathLike[str]) -> Path:
        """Download a complete checkpoint and check every file against the SHA-256 its
        _COMPLETE marker recorded (sizes alone miss a corrupted or replaced file): a
        StorageError with reason StorageChecksumMismatch names the files that differ."""
        local = self.fetch(uri, dest)
        try:
            marker = json.loads((local / COMPLETE_MARKER).read_bytes())
            expected = {str(f["path"]): str(f["sha256"]) for f in marker["files"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StorageError(
                f"{uri}: unreadable {COMPLETE_MARKER} marker ({exc})",
                uri=uri,
                reason="StorageChecksumMismatch",
            ) from exc
        bad = [
            path
            for path, digest in sorted(expected.items())
            if not (local / path).is_file() or sha256_file(local / path) != digest
        ]
        if bad:
            raise StorageError(
                f"{uri}: {', '.join(bad[:5])} do(es) not match the SHA-256 in its "
                f"{COMPLETE_MARKER} marker",
                uri=uri,
                reason="StorageChecksumMismatch",
            )
        return local

    @_retried
    def prune_checkpoints(
        self, output_uri: str, keep: int, owner: str | None = None
    ) -> builtins.list[int]:
        """Keep the newest `keep` complete checkpoints; delete older ones and incomplete ones
        below the newest complete step (leftovers of killed pods). Returns deleted steps.

        Incomplete checkpoints above the newest complete one are left alone: they may be an
        upload in progress. Each marker is deleted before its files, so an interrupted prune
        leaves an incomplete checkpoint, never a complete-looking partial one.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1: resuming needs a checkpoint")
        found = self._scan_checkpoints(output_uri)
        steps = sorted(found, reverse=True)
        complete = [s for s in steps if self._vouched(found[s], owner)]
        if not complete:
            return []
        doomed = complete[keep:] + [s for s in steps if s not in complete and s < complete[0]]
        for step in sorted(doomed):
            ckpt = S3Uri.parse(found[step].uri)
            keys = [ckpt.join(rel).key for rel in found[step].sizes]
            marker = ckpt.join(COMPLETE_MARKER).key
            if marker in keys:
                self._delete_keys(ckpt.bucket, [marker], found[step].uri)
                keys.remove(marker)
            self._delete_keys(ckpt.bucket, keys, found[step].uri)
        return sorted(doomed)


@dataclass
class _Checkpoint:
    step: int
    uri: str
    sizes: dict[str, int] = field(default_factory=dict)  # path below the step dir -> size


def _mtime_ns(obj: ObjectInfo) -> int:
    return int(obj.last_modified.timestamp() * 1_000_000) * 1000


def _cache_valid(entry: Path, obj: ObjectInfo) -> bool:
    try:
        st = entry.stat()
    except FileNotFoundError:
        return False
    return st.st_size == obj.size and st.st_mtime_ns == _mtime_ns(obj)


def _drop_other_versions(entry: Path) -> None:
    """Remove older versions of the same object (temp files of other writers stay)."""
    for sibling in entry.parent.iterdir():
        if sibling.name != entry.name and not sibling.name.startswith("."):
            sibling.unlink(missing_ok=True)


def _link_into_place(entry: Path, target: Path, uri: str) -> None:
    """Hard-link the cache entry to `target` (copy across filesystems), atomically."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and os.path.samefile(entry, target):
            return  # an earlier fetch already put this version here
        try:
            os.link(entry, tmp)
        except OSError:
            shutil.copy2(entry, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(
            f"cannot place {uri} at {target}: {exc.strerror or exc}",
            uri=uri,
            reason="StorageLocalError",
        ) from exc


def _check_distinct(targets: Sequence[tuple[ObjectInfo, Path]], uri: str) -> None:
    """Keys like "a" and "a/b", or "a//b" and "a/b", cannot both become local files."""
    paths = [t[1] for t in targets]
    seen = set(paths)
    if len(seen) != len(paths) or any(p in seen for path in paths for p in path.parents):
        raise StorageError(
            f"{uri}: object keys collide as local paths (a key that is also a 'directory', or "
            "duplicate slashes)",
            uri=uri,
            reason="StorageInvalidUri",
        )
