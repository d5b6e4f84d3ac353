"""kube.Kube against a small real HTTP server, and where its credentials come from (kube.login).

The integration tests run the same client against the real API server; these pin what is hard
to provoke there: a rejected (rotated) token, a create that finds its object already there, and
requests that must not carry anything but the current token.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf
import pytest
from aiohttp import web

from kubetune_operator import kube

LOG = logging.getLogger("test")


class FakeApiServer:
    """Answers like the API server for a handful of paths; records what it was sent."""

    def __init__(self) -> None:
        self.valid_token = "new"
        self.seen: list[tuple[str, str, str | None, Any]] = []
        self.objects: dict[str, dict[str, Any]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        auth = request.headers.get("Authorization")
        self.seen.append((request.method, request.path_qs, auth, body))
        if auth != f"Bearer {self.valid_token}":
            return web.json_response({"kind": "Status", "message": "Unauthorized"}, status=401)
        if request.method == "POST":
            name = body["metadata"]["name"]
            path = f"{request.path}/{name}"
            if path in self.objects:
                return web.json_response({"message": f'"{name}" already exists'}, status=409)
            self.objects[path] = body
            return web.json_response(body, status=201)
        if request.method == "GET" and request.path in self.objects:
            return web.json_response(self.objects[request.path])
        if request.method == "GET" and request.path.endswith("/pods"):
            return web.json_response({"items": [{"metadata": {"name": "p"}}]})
        return web.json_response({"message": "the server is busy"}, status=503,
                                 headers={"Retry-After": "3"})  # fmt: skip


@pytest.fixture
def server() -> FakeApiServer:
    return FakeApiServer()


@pytest.fixture
def serve(server: FakeApiServer) -> Callable[[Callable[[str], Any]], Any]:
    """Run a coroutine function with the base URL of a live FakeApiServer."""

    async def run(test: Callable[[str], Any]) -> Any:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", server.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            return await test(f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()

    return lambda test: asyncio.run(run(test))


def client(url: str, tokens: list[str]) -> kube.Kube:
    """A Kube whose login hands out `tokens` in turn (the first one at connect)."""
    issued = iter(tokens)
    return kube.Kube(lambda: kopf.ConnectionInfo(server=url, token=next(issued)))


def test_a_rejected_token_logs_in_again_and_retries_once(serve: Any, server: FakeApiServer) -> None:
    async def test(url: str) -> None:
        api = client(url, ["old", "new"])
        try:
            created, is_new = await api.create(
                {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "c", "namespace": "ns"}, "data": {"k": "v"}}
            )  # fmt: skip
        finally:
            await api.close()
        assert is_new and created["data"] == {"k": "v"}

    serve(test)
    assert [(m, p, a) for m, p, a, _ in server.seen] == [
        ("POST", "/api/v1/namespaces/ns/configmaps", "Bearer old"),
        ("POST", "/api/v1/namespaces/ns/configmaps", "Bearer new"),
    ]


def test_create_of_an_existing_object_returns_it(serve: Any, server: FakeApiServer) -> None:
    server.objects["/api/v1/namespaces/ns/configmaps/c"] = {"metadata": {"name": "c"}, "x": 1}

    async def test(url: str) -> None:
        api = client(url, ["new"])
        try:
            existing, is_new = await api.create(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "c", "namespace": "ns"},
                }
            )
            pods = await api.list("/api/v1/namespaces/ns/pods", label_selector="a=b")
            with pytest.raises(kopf.TemporaryError) as busy:
                await api.merge_patch("/api/v1/namespaces/ns/configmaps/other", {"data": {}})
        finally:
            await api.close()
        assert not is_new and existing["x"] == 1
        assert pods == [{"metadata": {"name": "p"}}]
        assert busy.value.delay == 3.0 and "the server is busy" in str(busy.value)

    serve(test)
    methods = [(m, p) for m, p, _, _ in server.seen]
    assert methods[:2] == [
        ("POST", "/api/v1/namespaces/ns/configmaps"),
        ("GET", "/api/v1/namespaces/ns/configmaps/c"),  # only after the 409
    ]
    assert methods[2] == ("GET", "/api/v1/namespaces/ns/pods?labelSelector=a%3Db")
    assert server.seen[3][3] == {"data": {}}


def test_an_unreachable_server_is_a_temporary_error() -> None:
    async def test() -> None:
        api = client("http://127.0.0.1:9", ["t"])
        try:
            with pytest.raises(kopf.TemporaryError, match="API server unreachable"):
                await api.get("/api/v1/namespaces")
        finally:
            await api.close()

    asyncio.run(test())


def test_login_in_a_pod_uses_the_service_account_and_the_service_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "namespace").write_text("kubetune-system")
    monkeypatch.setenv("KUBETUNE_SA_DIR", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    info = kube.in_cluster()
    assert info is not None
    assert info.server == "https://10.96.0.1:443" and info.token == "sa-token"
    assert info.default_namespace == "kubetune-system" and info.ca_path is None
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    assert (kube.in_cluster() or pytest.fail()).server == "https://[fd00::1]:443"
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert kube.in_cluster() is None  # not in a pod


def test_login_elsewhere_reads_the_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = tmp_path / "config"
    config.write_text(json.dumps({
        "current-context": "c",
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "n"}}],
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "kubeconfig-token"}}],
    }))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(config))
    info = kube.login(kopf.OperatorSettings(), LOG)
    assert info.server == "https://127.0.0.1:6443" and info.token == "kubeconfig-token"
    monkeypatch.setenv("KUBECONFIG", "")
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    with pytest.raises(kopf.LoginError, match="no Kubernetes credentials"):
        kube.login(kopf.OperatorSettings(), LOG)
