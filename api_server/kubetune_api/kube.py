"""Kubernetes requests made with the caller's own bearer token.

The server holds no Kubernetes credential of its own: every request carries the token the
caller sent as its OpenAI API key, so the API server's authentication and RBAC decide exactly as
they would for `kubectl` with that token. Only where to reach the API server, and which CA to
trust, is configured: in a pod from KUBERNETES_SERVICE_HOST/PORT (the chart mounts the cluster's
kube-root-ca.crt ConfigMap, since the pod mounts no ServiceAccount token); elsewhere from the
cluster of the current kubeconfig context (its user part is never read).

Errors become OpenAI errors (errors.ApiError) here, in one place:
401 -> 401; 403 for an exceeded ResourceQuota -> 429 (code quota_exceeded), other 403 -> 403;
404 -> 404; 409 -> 409; 400/422 (an invalid object, e.g. a CEL rule) -> 400 with the API
server's message; 429 -> 429 with Retry-After; 5xx and connection problems -> 503.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from kubetune_api.errors import ApiError
from kubetune_api.settings import ApiSettings
from kubetune_trainer.kubeapi import error_message

Body = dict[str, Any]
SA_CA = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
FIELD_MANAGER = "kubetune-api"
_TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass(frozen=True)
class Endpoint:
    """Where the API server is and how to verify it (no credentials)."""

    server: str
    ca_file: Path | None = None
    ca_data: bytes | None = None
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https://"):
            return False
        if self.insecure:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        if self.ca_data is not None:
            return ssl.create_default_context(cadata=self.ca_data.decode("ascii"))
        if self.ca_file is not None:
            return ssl.create_default_context(cafile=str(self.ca_file))
        return ssl.create_default_context()


def _kubeconfig_endpoint(env: Mapping[str, str]) -> Endpoint | None:
    paths = [p for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    path = Path(paths[0]) if paths else Path.home() / ".kube" / "config"
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    contexts = {c["name"]: c.get("context") or {} for c in config.get("contexts") or []}
    clusters = {c["name"]: c.get("cluster") or {} for c in config.get("clusters") or []}
    context = contexts.get(config.get("current-context", ""), {})
    cluster = clusters.get(context.get("cluster", ""))
    if cluster is None and len(clusters) == 1:
        cluster = next(iter(clusters.values()))
    if not cluster or not cluster.get("server"):
        return None
    ca_file = cluster.get("certificate-authority")
    ca_data = cluster.get("certificate-authority-data")
    return Endpoint(
        server=str(cluster["server"]).rstrip("/"),
        ca_file=(path.parent / ca_file) if ca_file else None,
        ca_data=base64.b64decode(ca_data) if ca_data else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
    )


def discover(settings: ApiSettings, env: Mapping[str, str] | None = None) -> Endpoint:
    """The API server: configured, in-cluster, or from the kubeconfig (see the docstring)."""
    env = os.environ if env is None else env
    if settings.kubernetes_server:
        return Endpoint(settings.kubernetes_server.rstrip("/"), settings.kubernetes_ca_file)
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if host and port:
        host = f"[{host}]" if ":" in host else host
        ca = settings.kubernetes_ca_file or (SA_CA if SA_CA.exists() else None)
        return Endpoint(f"https://{host}:{port}", ca)
    found = _kubeconfig_endpoint(env)
    if found is None:
        raise ValueError(
            "no Kubernetes API server: set KUBETUNE_API_KUBERNETES_SERVER, run in a pod, or "
            "point $KUBECONFIG at a kubeconfig"
        )
    if settings.kubernetes_ca_file:
        return Endpoint(found.server, settings.kubernetes_ca_file)
    return found


def translate(status: int, text: str, headers: Mapping[str, str], what: str) -> ApiError:
    """A Kubernetes error response as an OpenAI error (see the module docstring)."""
    message = error_message(text, f"HTTP {status}")
    if status == 401:
        return ApiError(
            401,
            "the API key is not a valid Kubernetes credential (expired, revoked or mistyped): "
            "use a ServiceAccount token, e.g. from `kubectl create token`",
            code="invalid_api_key",
        )
    if status == 403 and "exceeded quota" in message:
        return ApiError(429, message, code="quota_exceeded", retry_after=30)
    if status == 403:
        return ApiError(403, message, code="permission_denied")
    if status == 404:
        return ApiError(404, f"{what} not found", code="not_found")
    if status == 409:
        return ApiError(409, message, code="conflict")
    if status in (400, 422):
        return ApiError(400, message, code="invalid_request")
    if status == 429:
        try:
            retry: float | None = float(headers.get("Retry-After", ""))
        except ValueError:
            retry = None
        return ApiError(429, message, code="rate_limit_exceeded", retry_after=retry or 1)
    return ApiError(503, f"the Kubernetes API server failed: {message}", code="upstream_error")


class Kube:
    """Raw-JSON requests, each with the bearer token of the caller it serves."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32, ssl=self.endpoint.ssl_context()),
            timeout=_TIMEOUT,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        token: str,
        method: str,
        api_path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        what: str = "object",
    ) -> Body:
        assert self._session is not None, "Kube.start() first"
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "Content-Type": content_type,
        }
        try:
            async with self._session.request(
                method,
                self.endpoint.server + api_path,
                params=dict(query or {}),
                data=None if body is None else json.dumps(body),
                headers=headers,
            ) as response:
                text = await response.text()
                status, response_headers = response.status, response.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            raise ApiError(
                503, f"the Kubernetes API server is unreachable: {err!r}", code="upstream_error"
            ) from err
        if status >= 400:
            raise translate(status, text, response_headers, what)
        return dict(json.loads(text)) if text else {}
