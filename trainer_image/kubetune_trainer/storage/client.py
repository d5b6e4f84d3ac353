"""ObjectStore: S3 transfers (one s3transfer manager, several objects at once), the ETag-keyed
download cache, retries with backoff, uploads.
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
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Concatenate, Final, ParamSpec, Self, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
)
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError
from s3transfer.subscribers import BaseSubscriber

from kubetune_trainer.api import StorageConfig, duration_seconds
from kubetune_trainer.config import PVC_ROOT, WORK_DIR, TrainerConfig
from kubetune_trainer.storage.checksums import (
    UploadedFile,
    sha256_file,
)
from kubetune_trainer.storage.errors import (
    RETRIED_REASONS,
    StorageError,
    _client_error,
    _ErrorContext,
    _translate,
)
from kubetune_trainer.storage.uris import (
    S3Uri,
    _safe_relpath,
    resolve_hf,
    resolve_local,
    resolve_pvc,
    uri_scheme,
)

if TYPE_CHECKING:
    from types import TracebackType

    from botocore.model import OperationModel
    from mypy_boto3_s3 import S3Client
    from s3transfer.futures import TransferFuture
    from s3transfer.manager import TransferManager


log = logging.getLogger("kubetune_trainer.storage")  # one logger for the package
MiB: Final = 1024 * 1024
CACHE_DIR_ENV: Final = "KUBETUNE_CACHE_DIR"
_T = TypeVar("_T")
_R = TypeVar("_R")
_P = ParamSpec("_P")
_S = TypeVar("_S", bound="ObjectStore")
_MAX_RETRY_DELAY: Final = 30.0


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
    requests together), whose in-flight transfers can be cancelled at once when one fails.

    Interrupted (an exception raised in the waiting thread itself, such as SIGTERM's Preempted)
    it cancels them and returns at once instead of waiting for them to wind down: a request
    stalled on a slow store would otherwise keep the pod past its grace period. They wind down
    in the background; a process exiting meanwhile does not join them (__main__.exit_with).
    """

    def __init__(self, client: S3Client, config: TransferConfig) -> None:
        self._manager = create_transfer_manager(client, config)
        self._lock = threading.Lock()
        self._futures: set[TransferFuture] = set()
        self._cancelled = False
        self._interrupted = False

    def run(self, submit: Callable[[TransferManager], TransferFuture]) -> None:
        with self._lock:
            if self._cancelled:
                raise CancelledError
            future = submit(self._manager)
            self._futures.add(future)
        try:
            future.result()
        except BaseException:
            if not future.done():  # the wait itself was interrupted
                self.interrupt()
            raise
        finally:
            with self._lock:
                self._futures.discard(future)

    def cancel(self) -> None:
        # s3transfer stops the streams and removes its temporary files.
        with self._lock:
            self._cancelled = True
            for future in self._futures:
                future.cancel()

    def interrupt(self) -> None:
        self._interrupted = True
        self.cancel()

    def __enter__(self) -> _Batch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._interrupted:
            self._manager.__exit__(exc_type, exc, tb)  # waits for the cancelled transfers
            return
        # Cancelled transfers end when their requests do (at most read_timeout): let the
        # manager wait for that and shut its threads down in the background.
        threading.Thread(
            target=self._manager.__exit__,
            args=(exc_type, exc, tb),
            name="kubetune-transfer-cleanup",
            daemon=True,
        ).start()


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
    method: Callable[Concatenate[_S, _P], _R],
) -> Callable[Concatenate[_S, _P], _R]:
    """Run a public Storage method under Storage._retry (only the outermost call retries: a
    method that calls another does not multiply the waiting)."""

    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
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


class ObjectStore:
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
        # None: huggingface_hub's cache (its environment variables), looked up when needed.
        self.hub_cache = Path(hub_cache) if hub_cache is not None else None
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
    ) -> Self:
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
        # Cache hits are linked here, in one thread: eight threads contending for the GIL over
        # hard links made a warm re-fetch of 1,000 small objects 1.6x slower
        # (docs/benchmarks.md, "One transfer manager for all objects").
        missing = [(o, t) for o, t in targets if not self._link_cached(o, t)]
        with _Batch(self.client, self.transfer_config) as batch:
            self._parallel(lambda t: self._fetch_one(batch, *t), missing, batch)
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
        self, fn: Callable[[_T], _R], items: Sequence[_T], batch: _Batch
    ) -> builtins.list[_R]:
        """fn over items on max_workers threads, results in order. The first error wins: items
        not yet started are dropped and the batch's transfers in flight are cancelled, so a
        failure surfaces now rather than after the other (possibly huge) objects finish."""
        if not items:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(items)))
        try:
            futures: builtins.list[Future[_R]] = [pool.submit(fn, item) for item in items]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            # Interrupted while waiting (SIGTERM's Preempted): leave now, see _Batch.
            batch.interrupt()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        errors = [f.exception() for f in futures if f in done]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            for f in pending:
                f.cancel()
            batch.cancel()
            pool.shutdown(wait=True)
            raise first
        pool.shutdown(wait=True)
        return [f.result() for f in futures]

    def _link_cached(self, obj: ObjectInfo, target: Path) -> bool:
        """Link `obj` into place from the cache if a valid entry is there."""
        if self.cache_dir is None or not obj.etag:
            return False
        with self._mapped(obj.uri, "read"):
            entry = self._cache_entry(obj)
            if not _cache_valid(entry, obj):
                return False
            _link_into_place(entry, target, obj.uri)
        self.stats.add(cache_hits=1)
        return True

    def _fetch_one(self, batch: _Batch, obj: ObjectInfo, target: Path) -> None:
        """Download an object `fetch` did not find in the cache (_link_cached)."""
        with self._mapped(obj.uri, "read"):
            if self.cache_dir is None or not obj.etag:
                self._download(batch, obj, target, cached=False)
                return
            entry = self._cache_entry(obj)
            self._download(batch, obj, entry, cached=True)
            _drop_other_versions(entry)
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
                batch,
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
