"""A thin async Kubernetes client: raw JSON objects by API path, errors mapped to Kopf's.

Built on kubernetes_asyncio's ApiClient (authentication, TLS, token refresh) but without its
generated models: the builders in manifests.py produce plain dicts, and status.py reads plain
dicts, so objects go over the wire as they are.

Error policy, so that handlers stay free of try/except:
- 404 on reads and patches is an answer (None), not an error;
- 409 on create means "already exists": the existing object is returned instead (create_or_get),
  which makes every create idempotent when a handler re-runs;
- 429, 5xx and connection problems raise kopf.TemporaryError with a delay (Retry-After when the
  server sends one), so Kopf retries the handler later instead of hammering the API server;
- 403 also becomes a TemporaryError, with a long delay and a message naming the missing
  permission: RBAC may be fixed while the operator runs;
- anything else (400, 422: a bug in a builder) is a kopf.PermanentError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

Body = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
_RETRYABLE = frozenset({429, 500, 502, 503, 504})
_DEFAULT_DELAY = 5.0
_FORBIDDEN_DELAY = 60.0
# Connections to the API server kept open and used at once. kubernetes_asyncio's default, 100,
# makes a burst of creates open (and TLS-handshake, on both sides) up to 100 connections.
POOL_SIZE = 16
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def _ignore_environment(api: client.ApiClient) -> None:
    """Stop aiohttp from consulting proxy variables and ~/.netrc on every request.

    kubernetes_asyncio creates its session with trust_env=True: aiohttp then looks up the
    proxy environment and parses ~/.netrc per request, in a worker thread (a thread hand-off per
    request, a tenth of the operator's CPU under load). Called only when no proxy variable is
    set, so it changes nothing else; a kubeconfig `proxy-url` still applies (passed per request).
    """
    rest = api.rest_client
    old: aiohttp.ClientSession = rest.pool_manager
    connector = old.connector
    old.detach()  # hand the connector over without closing it
    rest.pool_manager = aiohttp.ClientSession(
        connector=connector, trust_env=False, read_bufsize=2**21
    )


def path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The REST path of a collection or object: ("batch/v1", "jobs", "ns", "x") ->
    /apis/batch/v1/namespaces/ns/jobs/x."""
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [root]
    if namespace:
        parts.append(f"namespaces/{quote(namespace, safe='')}")
    parts.append(plural)
    if name:
        parts.append(quote(name, safe=""))
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


_PLURALS = {
    "ConfigMap": "configmaps",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
    "KopfPeering": "kopfpeerings",
    "ClusterKopfPeering": "clusterkopfpeerings",
}


def object_path(body: Mapping[str, Any], *, collection: bool = False) -> str:
    """The path of a manifest's object (or of its collection, to create it)."""
    meta = body["metadata"]
    plural = _PLURALS[body["kind"]]
    name = None if collection else meta["name"]
    return path(body["apiVersion"], plural, meta.get("namespace"), name)


def describe(err: ApiException) -> str:
    """The API server's own message from an error response, else the HTTP reason."""
    try:
        message = json.loads(err.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or err.reason or err.status)


def _retry_after(err: ApiException) -> float | None:
    headers: Mapping[str, str] = err.headers or {}
    value = headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Kube:
    """Raw-JSON requests against the API server."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    @classmethod
    async def connect(cls) -> Kube:
        """In a pod: its ServiceAccount token; elsewhere: $KUBECONFIG or ~/.kube/config."""
        configuration = client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST") and SA_TOKEN.exists():
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            kubeconfig = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
            await config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
        configuration.connection_pool_maxsize = POOL_SIZE
        api = client.ApiClient(configuration=configuration)
        if not any(os.environ.get(name) for name in _PROXY_VARIABLES):
            _ignore_environment(api)
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self,
        method: str,
        api_path: str,
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Body:
        """One request; the decoded response. Errors map as the module docstring says."""
        try:
            data, _status, _headers = await self.api.call_api(
                api_path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=True,
                _request_timeout=60,
                response_types_map={200: "object", 201: "object", 202: "object"},
            )
        except ApiException as err:
            raise _translate(method, api_path, err) from err
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            raise kopf.TemporaryError(
                f"{method} {api_path}: API server unreachable: {err!r}", delay=_DEFAULT_DELAY
            ) from err
        return dict(data or {})

    async def get(self, api_path: str) -> Body | None:
        try:
            return await self.request("GET", api_path)
        except _NotFound:
            return None

    async def list(self, api_path: str, *, label_selector: str | None = None) -> list[Body]:
        query = {"labelSelector": label_selector} if label_selector else {}
        try:
            listing = await self.request("GET", api_path, query=query)
        except _NotFound:
            return []
        return list(listing.get("items") or [])

    async def create(self, body: Mapping[str, Any]) -> tuple[Body, bool]:
        """Create the object, or get the one that already exists: (object, created)."""
        try:
            created = await self.request("POST", object_path(body, collection=True), body=body)
            return created, True
        except _Conflict:
            existing = await self.get(object_path(body))
            if existing is None:  # deleted between our POST and GET: try again soon
                raise kopf.TemporaryError(
                    f"{body['kind']} {body['metadata']['name']} is being deleted", delay=2
                ) from None
            return existing, False

    async def merge_patch(self, api_path: str, patch: Mapping[str, Any]) -> Body | None:
        """JSON merge patch; None when the object is gone."""
        try:
            return await self.request("PATCH", api_path, body=patch, content_type=MERGE_PATCH)
        except _NotFound:
            return None


class _NotFound(kopf.PermanentError):
    """404: handled inside this module (get/list/patch return None or [])."""


class _Conflict(kopf.PermanentError):
    """409 AlreadyExists on create: handled inside this module."""


class ApiError(kopf.PermanentError):
    """A request the API server rejected for good (a bug, or an invalid object)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


def _translate(method: str, api_path: str, err: ApiException) -> Exception:
    what = f"{method} {api_path}: {describe(err)}"
    if err.status == 404:
        return _NotFound(what)
    if err.status == 409 and method == "POST":
        return _Conflict(what)
    if err.status in _RETRYABLE:
        return kopf.TemporaryError(what, delay=_retry_after(err) or _DEFAULT_DELAY)
    if err.status == 403:
        return kopf.TemporaryError(
            f"{what} (the operator's RBAC lacks this permission: see the chart's ClusterRole)",
            delay=_FORBIDDEN_DELAY,
        )
    if err.status == 409:  # a conflicting update: retry with fresh data
        return kopf.TemporaryError(what, delay=1)
    return ApiError(what, err.status)
