"""Pure: which vLLM server answers a request for a model, and the rewrites on the way.

The operator serves a succeeded FineTuneJob that sets spec.serving.enabled and writes where in
its status.serving (kubetune_trainer.serving): `{phase, reason, message, server, endpoint,
model}`, with `endpoint` (vLLM's OpenAI base URL, ending in /v1) and `model` (the name to ask
vLLM for) once the phase is Serving. One vLLM server per base model and namespace holds every
adapter of that base there, and serves the base model itself under its URI as a directory
(kubetune_trainer.serving.served_model_name). So:

- a fine-tuned model (`ft:<base>:<namespace>:<suffix>:<job>`, or the FineTuneJob's name) is
  served where its job's status.serving says;
- a catalogue base model is served in a namespace when a LoRA/QLoRA FineTuneJob of that base
  there is Serving: at that job's endpoint, under the base URI.

Only the operator writes status.serving (the chart's kubetune-user role may only `get`
finetunejobs/status), so the endpoint is trusted as far as its shape: http(s) with a host,
path ending in /v1.

Not served: 503 (retryable, Retry-After) while the server or adapter is on its way (Starting,
Loading, or asked for and not reported yet), 409 when something must change first (Pending:
the job has not succeeded; NotServed: the promotion gate refused it or serving is off; Failed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from kubetune_api.catalogue import CatalogueModel
from kubetune_api.errors import ApiError, bad_request
from kubetune_api.jobs import JobView, newest_first
from kubetune_trainer.api import as_directory

ADAPTER_METHODS: Final = frozenset({"lora", "qlora"})
# The server or the adapter is on its way: try again shortly.
ON_ITS_WAY: Final = frozenset({"Starting", "Loading"})
RETRY_AFTER: Final = 5.0
MAX_MODEL_ID: Final = 256
# An SSE event ends at an empty line (LF, CRLF or CR line ends).
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass(frozen=True)
class Route:
    """Where a request goes: `<endpoint>/chat/completions` with `served` as its model; the
    answer is given back under `requested`."""

    requested: str
    endpoint: str
    served: str


# ----------------------------------------------------------------------------- requests


def requested_model(body: Any) -> str:
    """The `model` of a completion request (400 naming the problem otherwise)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required: a model id (GET /v1/models lists them)", "model")
    if len(model) > MAX_MODEL_ID:
        raise bad_request(f"model: at most {MAX_MODEL_ID} characters", "model")
    return model


def upstream_body(body: Mapping[str, Any], route: Route) -> dict[str, Any]:
    return {**body, "model": route.served}


def model_not_found(model: str, namespace: str) -> ApiError:
    return ApiError(
        404,
        f"the model {model!r} does not exist in namespace {namespace} (GET /v1/models lists "
        "the base and fine-tuned models)",
        param="model",
        code="model_not_found",
    )


# ------------------------------------------------------------------------------ resolving


def serving_status(job: JobView) -> dict[str, Any]:
    serving = job.status.get("serving")
    return dict(serving) if isinstance(serving, Mapping) else {}


def valid_endpoint(url: object) -> bool:
    """vLLM's OpenAI base URL as the operator writes it: http(s)://host[:port]/.../v1."""
    if not isinstance(url, str) or len(url) > 2048:
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not parts.username
        and not parts.password
        and not parts.query
        and not parts.fragment
        and parts.path.rstrip("/").endswith("/v1")
    )


def _served_at(serving: Mapping[str, Any]) -> tuple[str, str] | None:
    """(endpoint, model) of a Serving status; None for any other, or a malformed one."""
    endpoint, model = serving.get("endpoint"), serving.get("model")
    if serving.get("phase") != "Serving" or not valid_endpoint(endpoint):
        return None
    if not isinstance(model, str) or not model:
        return None
    assert isinstance(endpoint, str)
    return endpoint.rstrip("/"), model


def _why(serving: Mapping[str, Any]) -> str:
    phase = serving.get("phase")
    reason, message = serving.get("reason"), serving.get("message")
    head = f"{phase}, {reason}" if reason else str(phase)
    return f"{head}: {message}" if message else head


def not_served(requested: str, job: JobView) -> ApiError:
    """Why the job's model cannot answer now: 503 while it is on its way, else 409."""
    serving = serving_status(job)
    phase = serving.get("phase")
    if not phase:
        if not (job.spec.get("serving") or {}).get("enabled"):
            return ApiError(
                409,
                f"the model {requested} is not served: FineTuneJob {job.name} does not ask to "
                "be (spec.serving.enabled is false). Set it to true to serve the model with "
                "vLLM, e.g. kubectl patch ftj "
                f'{job.name} --type merge -p \'{{"spec":{{"serving":{{"enabled":true}}}}}}\'',
                param="model",
                code="model_not_served",
            )
        return ApiError(
            503,
            f"the model {requested} is not served yet: the operator has not reported where "
            f"(FineTuneJob {job.name} has no status.serving yet)",
            code="model_not_ready",
            retry_after=RETRY_AFTER,
        )
    if phase == "Serving":  # but without a usable endpoint: the operator's status is malformed
        return ApiError(
            503,
            f"the model {requested} is reported Serving, but FineTuneJob {job.name}'s "
            "status.serving has no usable endpoint and model",
            code="model_not_ready",
            retry_after=RETRY_AFTER,
        )
    if phase in ON_ITS_WAY:
        return ApiError(
            503,
            f"the model {requested} is not ready yet ({_why(serving)})",
            code="model_not_ready",
            retry_after=RETRY_AFTER,
        )
    return ApiError(
        409,
        f"the model {requested} is not served ({_why(serving)})",
        param="model",
        code="model_not_served",
    )


def job_route(job: JobView, requested: str) -> Route:
    """A fine-tuned model: where its FineTuneJob's status.serving says, or why not."""
    found = _served_at(serving_status(job))
    if found is None:
        raise not_served(requested, job)
    return Route(requested, *found)


def serves_base(job: JobView, base_directory: str) -> bool:
    """Whether this job's server holds `base_directory` as its base model (a LoRA/QLoRA job of
    that base; an hf:// revision pins another model than the catalogue's)."""
    spec = job.spec
    base = spec.get("baseModel") or {}
    return (
        str(spec.get("method") or "lora") in ADAPTER_METHODS
        and as_directory(str(base.get("uri") or "")) == base_directory
        and not base.get("revision")
    )


def base_server_job(jobs: Iterable[JobView], model: CatalogueModel) -> JobView | None:
    """The newest job whose server holds this base model and is Serving."""
    directory = as_directory(model.uri)
    for job in newest_first(list(jobs)):
        if serves_base(job, directory) and _served_at(serving_status(job)) is not None:
            return job
    return None


def base_route(jobs: Iterable[JobView], model: CatalogueModel, namespace: str) -> Route:
    """A catalogue base model: at the endpoint of the newest job of it that is Serving."""
    jobs = list(jobs)
    server = base_server_job(jobs, model)
    if server is not None:
        found = _served_at(serving_status(server))
        assert found is not None
        return Route(model.name, found[0], as_directory(model.uri))
    directory = as_directory(model.uri)
    candidates = [j for j in newest_first(jobs) if serves_base(j, directory)]
    waiting = [j for j in candidates if serving_status(j).get("phase") in ON_ITS_WAY]
    if waiting:
        raise ApiError(
            503,
            f"the base model {model.name} is not ready yet in namespace {namespace}: its vLLM "
            f"server is on its way (FineTuneJob {waiting[0].name}: "
            f"{_why(serving_status(waiting[0]))})",
            code="model_not_ready",
            retry_after=RETRY_AFTER,
        )
    raise ApiError(
        409,
        f"the base model {model.name} is not served in namespace {namespace}: a base model is "
        "served by the vLLM server of its fine-tuned adapters, and no LoRA or QLoRA "
        "FineTuneJob of it here is being served (spec.serving.enabled on a succeeded job "
        "serves both)",
        param="model",
        code="model_not_served",
    )


# ------------------------------------------------------------------------------- answers


def rewrite_model(value: Any, requested: str) -> Any:
    """A vLLM answer (or stream chunk) under the model id the client asked for."""
    if isinstance(value, dict) and "model" in value:
        return {**value, "model": requested}
    return value


def _rewrite_event(event: bytes, requested: str) -> bytes:
    lines = event.splitlines()
    data = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
    if len(data) != 1:  # a comment (keep-alive) or a multi-line event: as it is
        return event
    index = data[0]
    payload = lines[index][5:].removeprefix(b" ")
    if payload.startswith(b"[DONE]"):
        return event
    try:
        value = json.loads(payload)
    except ValueError:
        return event
    if not isinstance(value, dict) or "model" not in value:
        return event
    text = json.dumps(rewrite_model(value, requested), ensure_ascii=False, separators=(",", ":"))
    lines[index] = b"data: " + text.encode()
    return b"\n".join(lines)


class EventRewriter:
    """vLLM's Server-Sent Events, re-framed event by event, each data event's `model` rewritten;
    comments, [DONE] and anything unparsable pass as they are. Feed it bytes as they arrive."""

    def __init__(self, requested: str) -> None:
        self.requested = requested
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in `chunk` (plus what came before), ready to send."""
        self._pending += chunk
        out: list[bytes] = []
        while (end := _EVENT_END.search(self._pending)) is not None:
            event = self._pending[: end.start()]
            self._pending = self._pending[end.end() :]
            out.append(_rewrite_event(event, self.requested) + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left at the end of the stream (an unterminated last event)."""
        rest, self._pending = self._pending, b""
        return _rewrite_event(rest, self.requested) + b"\n\n" if rest.strip() else b""


def stream_error(err: ApiError) -> bytes:
    """An error after the stream has started: an SSE data event the client raises APIError for."""
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n"


# -------------------------------------------------------------------------------- errors


def upstream_error(status: int, text: str, route: Route) -> ApiError:
    """vLLM's error answer in OpenAI's shape, under the client's model id. vLLM answers
    `{"error": {message, type, param, code: <HTTP status>}}`; FastAPI's own errors `{"detail"}`."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    message: Any = None
    param: Any = None
    if isinstance(error, dict):
        message, param = error.get("message"), error.get("param")
    elif isinstance(body, dict):
        message = body.get("detail")
    if not isinstance(message, str) or not message:
        message = json.dumps(message) if message else (text.strip()[:500] or f"HTTP {status}")
    message = message.replace(route.served, route.requested)
    codes = {400: "invalid_request", 404: "model_not_found", 429: "rate_limit_exceeded"}
    return ApiError(
        status if 400 <= status < 600 else 502,
        f"the model server: {message}" if status >= 500 else message,
        param=param if isinstance(param, str) else None,
        code=codes.get(status, "model_server_error"),
    )
