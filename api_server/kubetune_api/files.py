"""Files: upload (validated with the trainer's own record loader), list, retrieve, content,
delete; and each finished job's results file (its training log as CSV).

An upload is checked before it is stored, with kubetune_trainer.data.records, the code the
trainer runs on the same file: format detection (chat, instruction, prompt-completion, text)
and line-numbered errors. A file that would fail the job is refused with those errors (400,
param "file"), so a stored file is always `processed` and knows its format and record count,
which "auto" hyperparameters need. The data goes up first and file.json last: a file exists
once its metadata does.

Access: files are FineTuneJob inputs, so uploading and deleting need the right to create
FineTuneJobs in the namespace, reading needs get/list (identity.py).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from kubetune_api import jobs
from kubetune_api.context import Context
from kubetune_api.errors import bad_request, conflict, not_found
from kubetune_api.identity import Caller
from kubetune_api.pagination import limit_of, paginate
from kubetune_api.schemas import (
    FILE_PURPOSE,
    RESULTS_PURPOSE,
    FileDeleted,
    FileObject,
    ListPage,
    StoredFile,
)
from kubetune_trainer.data.records import DatasetError, load_records
from kubetune_trainer.training_log import EvalRecord, TrainRecord

FILE_ID: Final = re.compile(r"file-[0-9a-f]{24}")
RESULTS_NAME: Final = "step_metrics.csv"
RESULTS_COLUMNS: Final = (
    "step", "epoch", "train_loss", "learning_rate", "tokens_per_second", "full_valid_loss",
)  # fmt: skip
MAX_LIST: Final = 10_000
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """A received upload in a scratch file, before validation."""

    path: Path
    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Content:
    data: bytes
    content_type: str
    filename: str


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def safe_filename(name: str) -> str:
    """The file's base name, restricted to characters that are safe everywhere."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return cleaned[:200] or "upload.jsonl"


def validate(upload: Upload) -> tuple[str, int]:
    """(format, record count) of a JSON Lines upload; 400 with the loader's messages."""
    if not upload.filename.endswith(".jsonl"):
        raise bad_request(
            f"{upload.filename}: fine-tuning files must be JSON Lines (.jsonl), one JSON object "
            "per line",
            param="file",
            code="invalid_file_format",
        )
    try:
        dataset = load_records(upload.path)
    except (DatasetError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        text = str(err).replace(str(upload.path), upload.filename)
        if isinstance(err, UnicodeDecodeError):
            text = f"{upload.filename}: not UTF-8 text (byte {err.start}): not a JSONL file"
        raise bad_request(text, param="file", code="invalid_file_format") from None
    return dataset.format, len(dataset.records)


def _parse(meta: object, file_id: str) -> StoredFile | None:
    if not isinstance(meta, dict):
        return None
    try:
        return StoredFile.model_validate(meta)
    except ValidationError:
        log.warning("ignoring file %s: unreadable metadata", file_id)
        return None


def results_csv(records: list[TrainRecord | EvalRecord]) -> bytes:
    """The training log as OpenAI's step_metrics.csv: one row per report; the evaluation
    fills full_valid_loss in the row of its step."""
    rows: dict[int, dict[str, object]] = {}
    for record in records:
        row = rows.setdefault(record.step, {"step": record.step})
        if isinstance(record, TrainRecord):
            row.update(
                epoch=record.epoch,
                train_loss=record.train_loss,
                learning_rate=record.learning_rate,
                tokens_per_second=record.tokens_per_second,
            )
        else:
            row["full_valid_loss"] = record.eval_loss
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RESULTS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({k: "" if v is None else v for k, v in rows[step].items()})
    return out.getvalue().encode("utf-8")


class Files:
    def __init__(self, context: Context) -> None:
        self.context = context
        self.store = context.store
        self.layout = context.store.layout
        # Metadata is immutable once written: list pages read it once per file.
        self._meta: dict[tuple[str, str], StoredFile] = {}
        # Validation holds a file's records in memory: one at a time per replica.
        self._validating = asyncio.Semaphore(1)

    # ------------------------------------------------------------------ upload

    async def create(self, caller: Caller, upload: Upload, purpose: str) -> FileObject:
        await self.context.identity.require(caller, "create", "upload files")
        if purpose != FILE_PURPOSE:
            raise bad_request(
                f"purpose {purpose!r} is not supported: this API stores fine-tuning data only "
                f"(purpose={FILE_PURPOSE!r})",
                param="purpose",
                code="invalid_purpose",
            )
        async with self._validating:
            fmt, count = await asyncio.to_thread(validate, upload)
        stored = StoredFile(
            id=new_file_id(),
            filename=upload.filename,
            bytes=upload.size,
            created_at=int(time.time()),
            purpose=FILE_PURPOSE,
            status="processed",
            format=fmt,
            records=count,
            sha256=upload.sha256,
        )
        ns = caller.namespace
        await self.store.upload(upload.path, self.layout.data_uri(ns, stored.id))
        await self.store.put(
            self.layout.meta_uri(ns, stored.id),
            stored.model_dump_json(indent=2).encode(),
            "application/json",
        )
        self._meta[(ns, stored.id)] = stored
        return stored.public()

    # -------------------------------------------------------------------- read

    async def stored(self, caller: Caller, file_id: str, param: str | None = None) -> StoredFile:
        """A file of the caller's namespace; 404 (or 400 naming `param`) when there is none."""
        stored = None
        if FILE_ID.fullmatch(file_id):
            meta = await self.store.read_json(self.layout.meta_uri(caller.namespace, file_id))
            stored = _parse(meta, file_id)
        if stored is None:
            message = f"no file {file_id!r} in namespace {caller.namespace}"
            if param:
                raise bad_request(message, param=param, code="file_not_found")
            raise not_found(message, param="file_id")
        return stored

    async def retrieve(self, caller: Caller, file_id: str) -> FileObject:
        await self.context.identity.require(caller, "get", "read files")
        if file_id.startswith("file-results-"):
            return (await self._results(caller, file_id))[0]
        return (await self.stored(caller, file_id)).public()

    async def list_files(self, caller: Caller, query: Mapping[str, str]) -> ListPage[FileObject]:
        await self.context.identity.require(caller, "list", "list files")
        limit = limit_of(query, MAX_LIST, MAX_LIST)
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request(f"order must be asc or desc (got {order!r})", param="order")
        ns = caller.namespace
        ids = [
            i
            for i in await self.store.child_names(self.layout.files_root(ns))
            if FILE_ID.fullmatch(i)
        ]
        missing = [i for i in ids if (ns, i) not in self._meta]
        metas = await asyncio.gather(
            *(self.store.read_json(self.layout.meta_uri(ns, i)) for i in missing)
        )
        for file_id, meta in zip(missing, metas, strict=True):
            stored = _parse(meta, file_id)
            if stored is not None:  # None: an upload in progress (no metadata yet)
                self._meta[(ns, file_id)] = stored
        files = [self._meta[(ns, i)].public() for i in ids if (ns, i) in self._meta]
        purpose = query.get("purpose")
        if purpose:
            files = [f for f in files if f.purpose == purpose]
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        return paginate(files, after=query.get("after"), limit=limit, key=lambda f: f.id)

    async def content(self, caller: Caller, file_id: str) -> Content:
        await self.context.identity.require(caller, "get", "read files")
        if file_id.startswith("file-results-"):
            obj, csv_data = await self._results(caller, file_id)
            return Content(csv_data, "text/csv", obj.filename)
        stored = await self.stored(caller, file_id)
        data = await self.store.read(self.layout.data_uri(caller.namespace, stored.id))
        if data is None:
            raise not_found(f"file {file_id} has no content (deleted?)", param="file_id")
        return Content(data, "application/jsonl", stored.filename)

    async def _results(self, caller: Caller, file_id: str) -> tuple[FileObject, bytes]:
        """The results file of job <id> (file-results-<id>); the job is read with the
        caller's token, so RBAC on the FineTuneJob decides."""
        job = await self.context.get_job(caller, file_id.removeprefix("file-results-"))
        records = None
        if self.context.readable(job) and jobs.job_status(job) in jobs.TERMINAL:
            records = await self.store.training_log(job.output_uri)
        if not records:
            raise not_found(f"no file {file_id!r} in namespace {caller.namespace}", "file_id")
        data = results_csv(records)
        created = jobs.timestamp(job.status.get("completionTime")) or int(records[-1].time)
        obj = FileObject(
            id=file_id,
            bytes=len(data),
            created_at=created,
            filename=RESULTS_NAME,
            purpose=RESULTS_PURPOSE,
        )
        return obj, data

    # ------------------------------------------------------------------ delete

    async def delete(self, caller: Caller, file_id: str) -> FileDeleted:
        await self.context.identity.require(caller, "create", "delete files")
        if file_id.startswith("file-results-"):
            raise bad_request(
                "results files belong to their job and are deleted with its model "
                "(DELETE /v1/models/<fine-tuned model>)",
                param="file_id",
            )
        stored = await self.stored(caller, file_id)
        for job in await self.context.list_jobs(caller, api_only=True):
            if jobs.uses_file(job, stored.id) and jobs.job_status(job) not in jobs.TERMINAL:
                raise conflict(
                    f"file {stored.id} is used by fine-tuning job {job.name}, which is "
                    f"{jobs.job_status(job)}: cancel it or wait until it ends",
                    param="file_id",
                )
        ns = caller.namespace
        # The metadata first: from then on the file does not exist, even if the rest fails.
        await self.store.delete(self.layout.meta_uri(ns, stored.id))
        await self.store.delete(self.layout.file_dir(ns, stored.id))
        self._meta.pop((ns, stored.id), None)
        return FileDeleted(id=stored.id)
