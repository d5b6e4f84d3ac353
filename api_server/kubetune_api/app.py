"""The HTTP routes (aiohttp): parse the request, find the caller, delegate, answer JSON.

Every /v1 route authenticates first (identity.py). Errors of any kind leave as OpenAI-shaped
JSON (errors.py); an unexpected exception is logged with its traceback and answered 500
without details. Nothing here logs a header or a body.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from aiohttp import BodyPartReader, web
from pydantic import BaseModel

from kubetune_api.context import Context
from kubetune_api.errors import ApiError, bad_request, not_found
from kubetune_api.files import Files, Upload, safe_filename
from kubetune_api.finetuning import FineTuning
from kubetune_api.identity import Caller
from kubetune_api.inference import Inference
from kubetune_api.models import Models
from kubetune_trainer.api import DNS_SUBDOMAIN_PATTERN

log = logging.getLogger(__name__)

CONTEXT: Final = web.AppKey("context", Context)
FILES: Final = web.AppKey("files", Files)
JOBS: Final = web.AppKey("jobs", FineTuning)
MODELS: Final = web.AppKey("models", Models)
INFERENCE: Final = web.AppKey("inference", Inference)
CHUNK: Final = 1024 * 1024
# Multipart framing and the purpose field around the file itself.
_MULTIPART_OVERHEAD: Final = 64 * 1024
_JOB_ID = re.compile(DNS_SUBDOMAIN_PATTERN)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reply(value: BaseModel) -> web.Response:
    return web.json_response(value.model_dump(mode="json"))


def error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers())


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as err:
        if err.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, err.message)
        return error_response(err)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        if err.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif err.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        elif err.status == 413:
            message = "request body too large"
        else:
            message = err.reason
        status = err.status if err.status in (404, 405, 413) else 400
        return error_response(ApiError(status, message, code="invalid_request"))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(
            ApiError(500, "internal error; details are in the API server's log", code="internal")
        )


async def caller_of(request: web.Request) -> Caller:
    return await request.app[CONTEXT].identity.caller(
        request.headers.get("Authorization"), request.headers.get("OpenAI-Project")
    )


def query(request: web.Request) -> dict[str, str]:
    return {key: request.query[key] for key in request.query}


def job_id(request: web.Request) -> str:
    value = request.match_info["job_id"]
    if len(value) > 253 or not _JOB_ID.fullmatch(value):
        raise not_found(f"no fine-tuning job {value!r}", param="fine_tuning_job_id")
    return value


async def json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise bad_request("the request body is not JSON") from None


# ------------------------------------------------------------------------------ health


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


# ------------------------------------------------------------------------------ models


async def list_models(request: web.Request) -> web.Response:
    return reply(await request.app[MODELS].list_models(await caller_of(request)))


async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    return reply(await request.app[MODELS].retrieve(await caller_of(request), model))


async def delete_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    return reply(await request.app[MODELS].delete(await caller_of(request), model))


# ------------------------------------------------------------------------------- files


async def _receive_file(part: BodyPartReader, scratch: Path, limit: int) -> Upload:
    filename = safe_filename(part.filename or "upload.jsonl")
    target = scratch / filename
    digest, size = hashlib.sha256(), 0
    with target.open("wb") as out:
        while chunk := await part.read_chunk(CHUNK):
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            digest.update(chunk)
            out.write(chunk)
    return Upload(path=target, filename=filename, size=size, sha256=digest.hexdigest())


def _too_large(limit: int) -> ApiError:
    return bad_request(
        f"the file is larger than this server accepts ({limit:,} bytes, the chart's "
        "apiServer.maxUploadBytes)",
        param="file",
        code="file_too_large",
    )


async def create_file(request: web.Request) -> web.Response:
    context, files = request.app[CONTEXT], request.app[FILES]
    caller = await caller_of(request)
    # Authorized before the body is read: strangers do not get to upload.
    await context.identity.require(caller, "create", "upload files")
    limit = context.settings.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + _MULTIPART_OVERHEAD:
        raise _too_large(limit)
    if not request.content_type.startswith("multipart/"):
        raise bad_request("upload the file as multipart/form-data (fields file and purpose)")
    reader = await request.multipart()
    purpose: str | None = None
    with tempfile.TemporaryDirectory(prefix="kubetune-upload-") as scratch:
        upload: Upload | None = None
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise bad_request("nested multipart bodies are not supported")
            if part.name == "purpose":
                purpose = (await part.text()).strip()[:64]
            elif part.name == "file" and upload is None:
                upload = await _receive_file(part, Path(scratch), limit)
            elif (part.name or "").startswith("expires_after"):
                raise bad_request(
                    "expires_after is not supported: files stay until deleted",
                    param="expires_after",
                )
            else:
                raise bad_request(f"unknown parameter {part.name!r}", param=part.name)
        if upload is None:
            raise bad_request("no file: send it in the multipart field 'file'", param="file")
        if purpose is None:
            raise bad_request("purpose is required (fine-tune)", param="purpose")
        return reply(await files.create(caller, upload, purpose))


async def list_files(request: web.Request) -> web.Response:
    return reply(await request.app[FILES].list_files(await caller_of(request), query(request)))


async def get_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    return reply(await request.app[FILES].retrieve(await caller_of(request), file_id))


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    return reply(await request.app[FILES].delete(await caller_of(request), file_id))


async def file_content(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    content = await request.app[FILES].content(await caller_of(request), file_id)
    return web.Response(
        body=content.data,
        content_type=content.content_type,
        headers={"Content-Disposition": f'attachment; filename="{content.filename}"'},
    )


# ------------------------------------------------------------------------- completions


async def chat_completions(request: web.Request) -> web.StreamResponse:
    caller = await caller_of(request)
    body = await json_body(request)
    return await request.app[INFERENCE].forward(request, caller, body, "chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    caller = await caller_of(request)
    body = await json_body(request)
    return await request.app[INFERENCE].forward(request, caller, body, "completions")


# -------------------------------------------------------------------------------- jobs


async def create_job(request: web.Request) -> web.Response:
    caller = await caller_of(request)
    body = await json_body(request)
    key = request.headers.get("Idempotency-Key")
    return reply(await request.app[JOBS].create(caller, body, key))


async def list_jobs(request: web.Request) -> web.Response:
    return reply(await request.app[JOBS].list_jobs(await caller_of(request), query(request)))


async def get_job(request: web.Request) -> web.Response:
    return reply(await request.app[JOBS].retrieve(await caller_of(request), job_id(request)))


async def cancel_job(request: web.Request) -> web.Response:
    return reply(await request.app[JOBS].cancel(await caller_of(request), job_id(request)))


async def pause_job(request: web.Request) -> web.Response:
    return reply(await request.app[JOBS].pause(await caller_of(request), job_id(request)))


async def resume_job(request: web.Request) -> web.Response:
    return reply(await request.app[JOBS].resume(await caller_of(request), job_id(request)))


async def job_events(request: web.Request) -> web.Response:
    caller = await caller_of(request)
    return reply(await request.app[JOBS].events(caller, job_id(request), query(request)))


async def job_checkpoints(request: web.Request) -> web.Response:
    caller = await caller_of(request)
    return reply(await request.app[JOBS].checkpoints(caller, job_id(request), query(request)))


# --------------------------------------------------------------------------------- app


def build_app(context: Context) -> web.Application:
    app = web.Application(middlewares=[openai_errors], client_max_size=1024 * 1024)
    app[CONTEXT] = context
    app[FILES] = files = Files(context)
    app[JOBS] = FineTuning(context, files)
    app[MODELS] = models = Models(context)
    app[INFERENCE] = inference = Inference(context, models)
    jobs = "/v1/fine_tuning/jobs"
    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/v1/models", list_models),
            web.get("/v1/models/{model}", get_model),
            web.delete("/v1/models/{model}", delete_model),
            web.post("/v1/chat/completions", chat_completions),
            web.post("/v1/completions", completions),
            web.post("/v1/files", create_file),
            web.get("/v1/files", list_files),
            web.get("/v1/files/{file_id}", get_file),
            web.delete("/v1/files/{file_id}", delete_file),
            web.get("/v1/files/{file_id}/content", file_content),
            web.post(jobs, create_job),
            web.get(jobs, list_jobs),
            web.get(jobs + "/{job_id}", get_job),
            web.post(jobs + "/{job_id}/cancel", cancel_job),
            web.post(jobs + "/{job_id}/pause", pause_job),
            web.post(jobs + "/{job_id}/resume", resume_job),
            web.get(jobs + "/{job_id}/events", job_events),
            web.get(jobs + "/{job_id}/checkpoints", job_checkpoints),
        ]
    )

    async def start(app: web.Application) -> None:
        await context.kube.start()
        await inference.start()

    async def stop(app: web.Application) -> None:
        await inference.close()
        await context.kube.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app
