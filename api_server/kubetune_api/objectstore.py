"""The server's view of object storage: one prefix per namespace, nothing outside it.

    s3://<bucket>/<prefix>/<namespace>/files/<file-id>/data.jsonl   an uploaded file
    s3://<bucket>/<prefix>/<namespace>/files/<file-id>/file.json    its metadata (StoredFile)
    s3://<bucket>/<prefix>/<namespace>/jobs/<job-id>/               the output of an API job

The server reads and writes with its own S3 credentials, so it only ever builds keys from a
namespace it has authorized the caller for (identity.py) and, for job outputs, reads a job's
output only when it lies below that job's own namespace prefix in the server's store (`owns`):
a FineTuneJob applied with kubectl whose output.uri points elsewhere (another namespace's
prefix included) gets status-only events, never another namespace's data.

Requests go through kubetune_trainer.storage.Storage (the trainer's S3 client: retries,
timeouts, one-line errors), run in threads so the event loop never blocks. Storage failures
become 503 for the caller, with the details only in the server's log (they name buckets and
keys).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from kubetune_api.errors import ApiError
from kubetune_api.settings import ApiSettings
from kubetune_trainer.api import StorageConfig
from kubetune_trainer.storage import COMPLETE_MARKER, S3Uri, Storage, StorageError
from kubetune_trainer.training_log import EvalRecord, TrainRecord, log_uri, parse

log = logging.getLogger(__name__)

DATA_NAME: Final = "data.jsonl"
META_NAME: Final = "file.json"
CHECKPOINTS: Final = "checkpoints"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    created_at: int
    uri: str


@dataclass(frozen=True)
class Layout:
    bucket: str
    prefix: str
    endpoint: str | None

    def namespace_root(self, namespace: str) -> str:
        key = f"{self.prefix}/{namespace}/" if self.prefix else f"{namespace}/"
        return f"s3://{self.bucket}/{key}"

    def files_root(self, namespace: str) -> str:
        return f"{self.namespace_root(namespace)}files/"

    def file_dir(self, namespace: str, file_id: str) -> str:
        return f"{self.files_root(namespace)}{file_id}/"

    def data_uri(self, namespace: str, file_id: str) -> str:
        return f"{self.file_dir(namespace, file_id)}{DATA_NAME}"

    def meta_uri(self, namespace: str, file_id: str) -> str:
        return f"{self.file_dir(namespace, file_id)}{META_NAME}"

    def job_output(self, namespace: str, job_id: str) -> str:
        return f"{self.namespace_root(namespace)}jobs/{job_id}/"

    def owns(self, namespace: str, output_uri: str, endpoint: str | None) -> bool:
        """Whether a job in `namespace` with this output (and spec.storage.endpoint) writes
        into that namespace's prefix of the server's store."""
        if endpoint is not None and endpoint.rstrip("/") != (self.endpoint or "").rstrip("/"):
            return False
        if not output_uri.startswith("s3://") or "/../" in output_uri or "/./" in output_uri:
            return False
        uri = output_uri if output_uri.endswith("/") else output_uri + "/"
        root = self.namespace_root(namespace)
        return uri.startswith(root) and uri != root

    @classmethod
    def of(cls, settings: ApiSettings) -> Layout:
        return cls(settings.bucket, settings.prefix.strip("/"), settings.storage_endpoint)


def unavailable(err: StorageError) -> ApiError:
    log.error("object storage: %s (%s)", err, err.reason)
    return ApiError(
        503,
        f"the object store failed ({err.reason}); details are in the API server's log",
        code="storage_unavailable",
    )


class ObjectStore:
    """Async access to the server's bucket (see the module docstring)."""

    def __init__(self, settings: ApiSettings, env: Mapping[str, str] | None = None) -> None:
        self.layout = Layout.of(settings)
        config = StorageConfig(endpoint=settings.storage_endpoint, region=settings.storage_region)
        # No download cache: the server keeps nothing on disk but upload scratch files.
        self.storage = Storage(
            config, env=env, use_cache=False, max_workers=4, max_concurrency=4, max_attempts=3
        )

    async def _run(self, function: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(function, *args)
        except StorageError as err:
            raise unavailable(err) from err

    async def read(self, uri: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            return bytes(await asyncio.to_thread(self.storage.read_bytes, uri))
        except StorageError as err:
            if err.reason == "StorageNotFound":
                return None
            raise unavailable(err) from err

    async def put(self, uri: str, data: bytes, content_type: str) -> None:
        await self._run(self.storage.put_bytes, uri, data, content_type)

    async def upload(self, local: Path, uri: str) -> None:
        await self._run(self.storage.upload_file, local, uri)

    async def delete(self, uri: str) -> int:
        return int(await self._run(self.storage.delete_prefix, uri))

    async def child_names(self, uri: str) -> list[str]:
        """The first path segment of every object below the prefix `uri` (its "folders")."""
        objects = await self._run(self.storage.list, uri)
        return sorted({o.path.split("/", 1)[0] for o in objects if "/" in o.path})

    async def read_json(self, uri: str) -> Any:
        data = await self.read(uri)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            log.warning("ignoring %s: not JSON", uri)
            return None

    async def training_log(self, output_uri: str) -> list[TrainRecord | EvalRecord] | None:
        """A job's training log (training_log.py), or None when it has none (yet)."""
        data = await self.read(log_uri(output_uri))
        return None if data is None else parse(data)

    async def checkpoints(self, output_uri: str) -> list[Checkpoint]:
        """The complete checkpoints the trainer keeps (their _COMPLETE marker exists), by step."""
        base = str(S3Uri.parse(output_uri).join(CHECKPOINTS + "/"))
        objects = await self._run(self.storage.list, base)
        markers = [o for o in objects if o.path.endswith(f"/{COMPLETE_MARKER}")]
        found: list[Checkpoint] = []
        for marker in markers:
            body = await self.read_json(marker.uri)
            if not isinstance(body, dict) or not isinstance(body.get("step"), int):
                continue
            created = body.get("createdAt")
            try:
                when = datetime.fromisoformat(str(created)) if created else marker.last_modified
            except ValueError:
                when = marker.last_modified
            uri = marker.uri.removesuffix(COMPLETE_MARKER)
            found.append(Checkpoint(int(body["step"]), int(when.timestamp()), uri))
        return sorted(found, key=lambda c: c.step)
