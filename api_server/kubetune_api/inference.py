"""Chat completions and completions: find the vLLM server that holds the model, forward.

`POST /v1/chat/completions` and `POST /v1/completions` name a model the caller may see: a
catalogue base model, a fine-tuned model `ft:<base>:<namespace>:<suffix>:<job>` of the caller's
namespace, or that FineTuneJob's plain name (as vLLM itself calls the adapter). The FineTuneJob
reads are made with the caller's token, so RBAC decides exactly as for the fine-tuning routes:
`get` on FineTuneJobs for a fine-tuned model, `list` for a base model (routing.py says which
job's server holds it). A route found is kept ROUTE_CACHE_SECONDS per token, namespace and model
(by the token's SHA-256, as identity.py does): a chat session then costs the Kubernetes API
server one read every few seconds, not one per request. A revoked right, or a model moved to
another server, is seen within that time; a route that fails (server unreachable, model unknown
to vLLM) is dropped at once, and a model that is not served is never cached.

The body goes to `<endpoint>/chat/completions` (or `/completions`) with `model` replaced by the
name vLLM serves it under, and nothing else changed; the caller's token is not forwarded. The
answer comes back with `model` rewritten to the id the client asked for: a JSON answer whole,
a stream (`stream: true`, Server-Sent Events) event by event, each written to the client as
soon as it arrives. vLLM's errors keep their status and message in OpenAI's shape; an
unreachable server is a 503, a server that does not answer within KUBETUNE_API_INFERENCE_TIMEOUT
a 504, an answer that is not JSON a 502. Once a stream has started, a failure is an error event
(`data: {"error": ...}`), which the `openai` client raises.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from typing import Any, Final, Literal

import aiohttp
from aiohttp import web

from kubetune_api import routing
from kubetune_api.context import Context
from kubetune_api.errors import ApiError
from kubetune_api.identity import Caller, TtlCache
from kubetune_api.jobs import JobView, job_status
from kubetune_api.models import Models
from kubetune_api.routing import Route
from kubetune_trainer.api import DNS_SUBDOMAIN_PATTERN

log = logging.getLogger(__name__)

Kind = Literal["chat/completions", "completions"]
_JOB_NAME: Final = re.compile(DNS_SUBDOMAIN_PATTERN)
_CONNECT_TIMEOUT: Final = 10.0
ROUTE_CACHE_SECONDS: Final = 5.0
# Failures that may mean status.serving has changed since the route was cached.
_STALE: Final = frozenset({"model_server_unreachable", "model_not_found", "model_server_error"})
_STREAM_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx-style ingresses: do not buffer the stream
}


def unreachable(route: Route, err: BaseException) -> ApiError:
    return ApiError(
        503,
        f"the model server for {route.requested} is unreachable ({route.endpoint}): "
        f"{type(err).__name__}: {err}".rstrip(": "),
        code="model_server_unreachable",
        retry_after=routing.RETRY_AFTER,
    )


def broken(route: Route, err: BaseException) -> ApiError:
    return ApiError(
        502,
        f"the model server for {route.requested} broke off its answer: "
        f"{type(err).__name__}: {err}".rstrip(": "),
        code="model_server_error",
    )


def timed_out(route: Route, seconds: float) -> ApiError:
    return ApiError(
        504,
        f"the model server for {route.requested} did not answer within {seconds:g} s "
        "(KUBETUNE_API_INFERENCE_TIMEOUT)",
        code="model_server_timeout",
    )


class Inference:
    def __init__(self, context: Context, models: Models) -> None:
        self.context = context
        self.models = models
        self._session: aiohttp.ClientSession | None = None
        self._routes = TtlCache(ROUTE_CACHE_SECONDS)

    async def start(self) -> None:
        timeout = self.context.settings.inference_timeout
        self._session = aiohttp.ClientSession(
            # No total limit: a long generation streams for as long as tokens keep coming;
            # sock_read bounds the wait for the first and each following piece.
            timeout=aiohttp.ClientTimeout(total=None, connect=_CONNECT_TIMEOUT, sock_read=timeout),
            connector=aiohttp.TCPConnector(limit=256),
            trust_env=False,  # in-cluster addresses never go through a proxy
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------------- routes

    async def _job(self, caller: Caller, model: str) -> JobView:
        """The FineTuneJob behind a fine-tuned model id or a job name (404 if none)."""
        missing = routing.model_not_found(model, caller.namespace)
        try:
            if model.startswith("ft:"):
                return await self.models.fine_tuned_job(caller, model)
            if len(model) > 253 or not _JOB_NAME.fullmatch(model):
                raise missing
            job = await self.context.get_job(caller, model)
        except ApiError as err:
            if err.status == 404:
                raise missing from None
            raise
        if job.model_deleted or job_status(job) in ("failed", "cancelled"):
            raise missing
        return job

    async def route(self, caller: Caller, model: str) -> Route:
        key = (caller.key, caller.namespace, model)
        cached = self._routes.get(key)
        if isinstance(cached, Route):
            return cached
        base = self.context.models.get(model)
        if base is not None:
            jobs = await self.context.list_jobs(caller)
            found = routing.base_route(jobs, base, caller.namespace)
        else:
            found = routing.job_route(await self._job(caller, model), model)
        self._routes.put(key, found)
        return found

    # ----------------------------------------------------------------------- forwarding

    async def forward(
        self, request: web.Request, caller: Caller, body: Any, kind: Kind
    ) -> web.StreamResponse:
        route = await self.route(caller, routing.requested_model(body))
        try:
            return await self.relay(request, route, body, kind)
        except ApiError as err:
            if err.code in _STALE:  # look again next time: the operator may have moved it
                self._routes.drop((caller.key, caller.namespace, route.requested))
            raise

    async def relay(
        self, request: web.Request, route: Route, body: dict[str, Any], kind: Kind
    ) -> web.StreamResponse:
        """The request to vLLM, and its answer (or error) to the client."""
        assert self._session is not None, "Inference.start() first"
        seconds = self.context.settings.inference_timeout
        try:
            async with self._session.post(
                f"{route.endpoint}/{kind}",
                data=json.dumps(routing.upstream_body(body, route)),
                headers={"Content-Type": "application/json"},
            ) as upstream:
                if upstream.status >= 400:
                    text = (await upstream.read()).decode(errors="replace")
                    raise routing.upstream_error(upstream.status, text, route)
                if upstream.content_type == "text/event-stream":
                    return await self._stream(request, upstream, route)
                answer = await upstream.read()
        except aiohttp.ConnectionTimeoutError as err:  # also a TimeoutError: before it
            raise unreachable(route, err) from err
        except TimeoutError as err:
            raise timed_out(route, seconds) from err
        except (aiohttp.ClientError, OSError) as err:
            raise unreachable(route, err) from err
        try:
            value = json.loads(answer)
        except ValueError:
            raise ApiError(
                502,
                f"the model server for {route.requested} answered something that is not JSON",
                code="model_server_error",
            ) from None
        return web.json_response(routing.rewrite_model(value, route.requested))

    async def _stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, route: Route
    ) -> web.StreamResponse:
        """vLLM's events to the client as they come. Once the first byte has gone out, a
        failure can only be told in the stream: an error event the client raises."""
        response = web.StreamResponse(status=200, headers=_STREAM_HEADERS)
        await response.prepare(request)
        rewriter = routing.EventRewriter(route.requested)
        failure: ApiError | None = None
        try:
            async for piece in upstream.content.iter_any():
                if (out := rewriter.feed(piece)) and not await _send(response, out):
                    # The client went away: leaving the `async with` closes the connection
                    # to vLLM, which aborts the generation.
                    log.info("the client closed its stream of %s", route.requested)
                    return response
        except TimeoutError:
            failure = timed_out(route, self.context.settings.inference_timeout)
        except (aiohttp.ClientError, OSError) as cause:
            failure = broken(route, cause)
        if failure is not None:
            log.warning("%s: stream broken: %s", request.path, failure.message)
            tail = routing.stream_error(failure)
        else:
            tail = rewriter.flush()
        if await _send(response, tail):
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
        return response


async def _send(response: web.StreamResponse, data: bytes) -> bool:
    """Write to the client; False when it has gone (aiohttp's ClientConnectionResetError is a
    ConnectionResetError too)."""
    try:
        if data:
            await response.write(data)
    except ConnectionResetError:
        return False
    return True
