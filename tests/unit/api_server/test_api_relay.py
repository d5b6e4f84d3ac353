"""Relaying a completion to a model server (kubetune_api.inference.Inference.relay) over real
HTTP, with a small aiohttp server in vLLM's place that can do what vLLM rarely does on cue:
hold an event back, stall, drop the connection mid-stream, answer garbage. The real vLLM is in
tests/integration/test_openai_serving.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from kubetune_api.app import openai_errors
from kubetune_api.context import Context
from kubetune_api.identity import Identity
from kubetune_api.inference import Inference
from kubetune_api.kube import Endpoint, Kube
from kubetune_api.models import Models
from kubetune_api.objectstore import ObjectStore
from kubetune_api.routing import Route
from kubetune_api.settings import load_settings

Upstream = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHAT = {"model": "ft:tiny:team-a::job", "messages": [{"role": "user", "content": "hi"}]}


def event(content: str, model: str = "job") -> bytes:
    chunk = {"object": "chat.completion.chunk", "model": model,
             "choices": [{"index": 0, "delta": {"content": content}}]}  # fmt: skip
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def inference(timeout: float) -> Inference:
    settings = load_settings(
        {"KUBETUNE_API_BUCKET": "kubetune", "KUBETUNE_API_INFERENCE_TIMEOUT": str(timeout)}
    )
    kube = Kube(Endpoint("https://127.0.0.1:9"))  # never asked: the route is given
    store = ObjectStore(settings, env={"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"})
    context = Context(settings, kube, Identity(kube), store, {}, started=int(time.time()))
    return Inference(context, Models(context))


@asynccontextmanager
async def relay_to(upstream: Upstream | None, timeout: float = 30) -> AsyncIterator[TestClient]:
    """A client of an app that relays POST /v1/chat/completions to `upstream` (None: to a port
    where nothing listens)."""
    vllm = web.Application()
    if upstream is not None:
        vllm.router.add_post("/v1/chat/completions", upstream)
    async with TestServer(vllm) as server:
        port = server.port if upstream is not None else 9
        route = Route(str(CHAT["model"]), f"http://127.0.0.1:{port}/v1", "job")
        relay = inference(timeout)

        async def handler(request: web.Request) -> web.StreamResponse:
            return await relay.relay(request, route, await request.json(), "chat/completions")

        app = web.Application(middlewares=[openai_errors])  # errors as the real app answers
        app.router.add_post("/v1/chat/completions", handler)
        app.on_startup.append(lambda _: relay.start())
        app.on_cleanup.append(lambda _: relay.close())
        async with TestClient(TestServer(app)) as client:
            yield client


async def sse_start(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


def test_each_event_reaches_the_client_before_the_next_is_made() -> None:
    async def run() -> tuple[bytes, bytes]:
        gate = asyncio.Event()
        seen: list[Any] = []

        async def upstream(request: web.Request) -> web.StreamResponse:
            seen.append(await request.json())
            response = await sse_start(request)
            await response.write(event("one"))
            await gate.wait()  # until the client has the first event
            await response.write(event(" two") + b"data: [DONE]\n\n")
            return response

        async with relay_to(upstream) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert response.headers["Content-Type"] == "text/event-stream"
            first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            gate.set()
            rest = await response.content.read()
        assert seen == [{**CHAT, "model": "job", "stream": True}]  # only the model differs
        return first, rest

    first, rest = asyncio.run(run())
    chunk = json.loads(first.removeprefix(b"data: "))
    assert chunk["model"] == CHAT["model"] and chunk["choices"][0]["delta"]["content"] == "one"
    second, done, end = rest.split(b"\n\n")
    assert json.loads(second.removeprefix(b"data: "))["model"] == CHAT["model"]
    assert (done, end) == (b"data: [DONE]", b"")


def stream_of(upstream: Upstream, timeout: float = 30) -> list[Any]:
    async def run() -> bytes:
        async with relay_to(upstream, timeout) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert response.status == 200
            return await asyncio.wait_for(response.content.read(), 10)

    data = asyncio.run(run())
    return [json.loads(e[6:]) for e in data.decode().split("\n\n") if e.startswith("data: {")]


def test_a_model_server_that_drops_the_stream_leaves_an_error_event() -> None:
    async def upstream(request: web.Request) -> web.StreamResponse:
        response = await sse_start(request)
        await response.write(event("one"))
        assert request.transport is not None
        request.transport.close()  # mid-answer, as a crashing server would
        return response

    first, error = stream_of(upstream)
    assert first["model"] == CHAT["model"]
    assert error["error"]["code"] == "model_server_error"
    assert "broke off its answer" in error["error"]["message"]


def test_a_stalled_stream_ends_with_a_timeout_event() -> None:
    async def upstream(request: web.Request) -> web.StreamResponse:
        response = await sse_start(request)
        await response.write(event("one"))
        await asyncio.sleep(2)
        return response

    first, error = stream_of(upstream, timeout=0.3)
    assert first["choices"][0]["delta"]["content"] == "one"
    assert error["error"]["code"] == "model_server_timeout"
    assert "0.3 s" in error["error"]["message"]


def answer_of(upstream: Upstream | None, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    async def run() -> tuple[int, dict[str, Any]]:
        async with relay_to(upstream, timeout) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
            return response.status, await response.json()

    return asyncio.run(run())


def test_answers_and_failures_without_a_stream() -> None:
    async def fine(request: web.Request) -> web.Response:
        return web.json_response({"object": "chat.completion", "model": "job", "choices": []})

    assert answer_of(fine) == (200, {"object": "chat.completion", "model": CHAT["model"],
                                     "choices": []})  # fmt: skip

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>", content_type="text/html")

    status, body = answer_of(garbage)
    assert (status, body["error"]["code"]) == (502, "model_server_error")

    async def failing(request: web.Request) -> web.Response:
        error = {"message": "EngineCore for job died", "type": "InternalServerError", "code": 500}
        return web.json_response({"error": error}, status=500)

    status, body = answer_of(failing)
    assert (status, body["error"]["code"]) == (500, "model_server_error")
    assert body["error"]["message"] == f"the model server: EngineCore for {CHAT['model']} died"

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.json_response({})

    status, body = answer_of(slow, timeout=0.3)
    assert (status, body["error"]["code"]) == (504, "model_server_timeout")
    status, body = answer_of(None)
    assert (status, body["error"]["code"]) == (503, "model_server_unreachable")
