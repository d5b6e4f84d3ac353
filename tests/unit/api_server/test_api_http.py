"""The HTTP layer without a cluster: routes answer OpenAI-shaped errors before any Kubernetes
or S3 request is made, and the server imports no torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from kubetune_api.app import build_app
from kubetune_api.context import Context
from kubetune_api.identity import Identity
from kubetune_api.kube import Endpoint, Kube
from kubetune_api.objectstore import ObjectStore
from kubetune_api.settings import load_settings

# Nothing listens there: any request that reached Kubernetes would fail with 503.
UNREACHABLE = "https://127.0.0.1:9"


def context() -> Context:
    settings = load_settings({"KUBETUNE_API_BUCKET": "kubetune"})
    kube = Kube(Endpoint(UNREACHABLE))
    keys = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}  # no credential lookup
    store = ObjectStore(settings, env=keys)
    return Context(settings, kube, Identity(kube), store, {}, started=int(time.time()))


async def _call(method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    async with TestClient(TestServer(build_app(context()))) as client:
        response = await client.request(method, path, **kwargs)
        return response.status, dict(response.headers), await response.json()


def call(method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    return asyncio.run(_call(method, path, **kwargs))


def test_health_needs_no_key() -> None:
    assert call("GET", "/healthz")[0] == 200


def test_requests_without_a_key_are_401_in_openais_shape() -> None:
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/fine_tuning/jobs"),
                         ("POST", "/v1/files"), ("GET", "/v1/files/file-x/content"),
                         ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions")):  # fmt: skip
        status, headers, body = call(method, path)
        assert status == 401, path
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key"
        assert headers["x-should-retry"] == "false"


def test_unknown_endpoints_and_methods_answer_in_openais_shape() -> None:
    status, _, body = call("POST", "/v1/embeddings")
    assert status == 404 and "no such endpoint" in body["error"]["message"]
    for method, path in (("PUT", "/v1/models"), ("GET", "/v1/chat/completions"),
                         ("GET", "/v1/completions")):  # fmt: skip
        status, _, body = call(method, path)
        assert status == 405 and body["error"]["type"], path


def test_an_unreachable_kubernetes_api_is_a_503_not_a_500() -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        status, headers, body = call(
            method, path, headers={"Authorization": "Bearer t"}, json={"model": "m"}
        )
        assert status == 503 and body["error"]["code"] == "upstream_error"
        assert headers["x-should-retry"] == "true"


def test_the_server_imports_no_torch() -> None:
    code = (
        "import importlib, pkgutil, sys, kubetune_api\n"
        "for m in pkgutil.walk_packages(kubetune_api.__path__, 'kubetune_api.'):\n"
        "    importlib.import_module(m.name)\n"
        "heavy = [n for n in ('torch', 'transformers', 'peft', 'pyarrow') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
