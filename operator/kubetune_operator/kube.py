"""A thin async Kubernetes client: raw JSON objects by API path, errors mapped to Kopf's.

aiohttp (which Kopf already uses) with the credentials of `login`, which is also the operator's
Kopf login handler: one source of credentials for Kopf's watches and for these requests. No
client library: the builders in manifests.py produce plain dicts and status.py reads plain dicts,
and a generated client's models would cost the operator ~40 MB of memory for nothing (Kopf
imports kubernetes_asyncio's whole model package when it is installed).

Error policy, so that handlers stay free of try/except:
- 404 on reads and patches is an answer (None), not an error;
- 409 on create means "already exists": the existing object is returned instead (create_or_get),
  which makes every create idempotent when a handler re-runs;
- 401 logs in again (a rotated ServiceAccount token) and retries once;
- 429, 5xx and connection problems raise kopf.TemporaryError with a delay (Retry-After when the
  server sends one), so Kopf retries the handler later instead of hammering the API server;
- 403 becomes Forbidden, a TemporaryError with a long delay: a quota may free up, and a
  policy or the RBAC may be fixed while the operator runs;
- anything else (400, 422: a bug in a builder) is a kopf.PermanentError.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import kopf

from kubetune_trainer.kubeapi import MERGE_PATCH, InCluster, error_message, object_path

Body = dict[str, Any]

_RETRYABLE = frozenset({429, 500, 502, 503, 504})
_DEFAULT_DELAY = 5.0
_FORBIDDEN_DELAY = 60.0
_TIMEOUT = aiohttp.ClientTimeout(total=60)
# Connections to the API server kept open and used at once: a burst of creates then reuses
# them instead of opening (and TLS-handshaking, on both sides) one per request.
POOL_SIZE = 16
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def in_cluster(env: Mapping[str, str] | None = None) -> kopf.ConnectionInfo | None:
    """The pod's ServiceAccount, at the address Kubernetes puts in every pod's environment
    (kubeapi.InCluster), as Kopf's connection info."""
    found = InCluster.from_env(env)
    if found is None:
        return None
    return kopf.ConnectionInfo(
        server=found.url,
        ca_path=str(found.ca_file) if found.ca_file else None,
        token=found.token() or None,
        default_namespace=found.namespace(),
    )


def login(settings: kopf.OperatorSettings, logger: logging.Logger | Any) -> kopf.ConnectionInfo:
    """In a pod: its ServiceAccount token; elsewhere: $KUBECONFIG or ~/.kube/config (tokens,
    client certificates, basic auth; not exec plugins). Read again on every call, so a rotated
    token is picked up."""
    info = in_cluster() or kopf.login_with_kubeconfig(settings=settings, logger=logger)
    if info is None:
        raise kopf.LoginError(
            "no Kubernetes credentials: not in a pod with a ServiceAccount token, and no "
            "$KUBECONFIG or ~/.kube/config"
        )
    return info


def describe(status: int, reason: str | None, text: str) -> str:
    """The API server's own message from an error response, else the HTTP reason."""
    return error_message(text, str(reason or status))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Kube:
    """Raw-JSON requests against the API server."""

    def __init__(self, relogin: Callable[[], kopf.ConnectionInfo]) -> None:
        self._relogin = relogin
        info = relogin()
        self._server = info.server.rstrip("/")
        self._proxy = info.proxy_url
        self._authorize(info)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=POOL_SIZE, ssl=info.as_ssl_context()),
            # Without proxy variables, skip aiohttp's per-request proxy and ~/.netrc lookups.
            trust_env=any(os.environ.get(name) for name in _PROXY_VARIABLES),
            timeout=_TIMEOUT,
        )

    @classmethod
    async def connect(cls, settings: kopf.OperatorSettings, logger: Any) -> Kube:
        """With the credentials of `login` (the same as Kopf's)."""
        return cls(lambda: login(settings, logger))

    def _authorize(self, info: kopf.ConnectionInfo) -> None:
        self._headers = {"Accept": "application/json", **info.as_http_headers()}

    async def close(self) -> None:
        await self._session.close()

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
        for attempt in (1, 2):
            try:
                async with self._session.request(
                    method,
                    self._server + api_path,
                    params=dict(query or {}),
                    data=None if body is None else json.dumps(body),
                    headers={**self._headers, "Content-Type": content_type},
                    proxy=self._proxy,
                ) as response:
                    text = await response.text()
                    status, reason, headers = response.status, response.reason, response.headers
            except (TimeoutError, aiohttp.ClientError, OSError) as err:
                raise kopf.TemporaryError(
                    f"{method} {api_path}: API server unreachable: {err!r}", delay=_DEFAULT_DELAY
                ) from err
            if status == 401 and attempt == 1:
                self._authorize(self._relogin())  # e.g. a rotated ServiceAccount token
                continue
            if status >= 400:
                raise _translate(method, api_path, status, text, reason=reason, headers=headers)
            return dict(json.loads(text)) if text else {}
        raise AssertionError("unreachable")

    async def get(self, api_path: str) -> Body | None:
        try:
            return await self.request("GET", api_path)
        except _NotFound:
            return None

    async def list(
        self,
        api_path: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[Body]:
        query = {"labelSelector": label_selector} if label_selector else {}
        if field_selector:
            query["fieldSelector"] = field_selector
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
    """A request the API server rejected for good (a bug, or an invalid object). `detail` is
    the API server's own message, for a status a user reads."""

    def __init__(self, message: str, status: int | None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail or message


class Forbidden(kopf.TemporaryError):
    """403: RBAC, an admission webhook or policy, or a ResourceQuota refused the request. Kopf
    retries it later (a quota frees up, a policy or the RBAC is fixed)."""

    def __init__(self, message: str, detail: str, delay: float) -> None:
        super().__init__(message, delay=delay)
        self.status = 403
        self.detail = detail


def _translate(
    method: str,
    api_path: str,
    status: int,
    text: str,
    *,
    reason: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Exception:
    detail = describe(status, reason, text)
    what = f"{method} {api_path}: {detail}"
    if status == 404:
        return _NotFound(what)
    if status == 409 and method == "POST":
        return _Conflict(what)
    if status in _RETRYABLE:
        return kopf.TemporaryError(what, delay=_retry_after(headers or {}) or _DEFAULT_DELAY)
    if status == 403:
        return Forbidden(
            f"{what} (a quota, an admission policy, or the operator's RBAC: see the chart's "
            "rbac.yaml)",
            detail,
            delay=_FORBIDDEN_DELAY,
        )
    if status == 409:  # a conflicting update: retry with fresh data
        return kopf.TemporaryError(what, delay=1)
    return ApiError(what, status, detail)
