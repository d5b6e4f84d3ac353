"""Who is calling, in which namespace, and may they: Kubernetes decides, with the caller's token.

- The OpenAI API key is a Kubernetes bearer token (a ServiceAccount token from `kubectl create
  token`, or any token the API server accepts). A SelfSubjectReview sent with it tells who it
  belongs to; the API server answers that for any authenticated caller, and 401 otherwise.
- The namespace is the client's `project` (the OpenAI-Project header), else the token's own
  namespace (system:serviceaccount:<namespace>:<name>).
- FineTuneJob and Event requests go to Kubernetes with the caller's token (kube.py), so RBAC
  decides them directly. Files live in object storage, which the server reaches with its own
  S3 credentials; before touching them it asks Kubernetes, with a SelfSubjectAccessReview sent
  with the caller's token, whether the caller may create (upload, delete) or list (read)
  FineTuneJobs in that namespace. Uploaded files exist only to train FineTuneJobs, so the right
  to run FineTuneJobs in a namespace is the right to its files.

Answers are cached for a few seconds per token (by its SHA-256, never the token itself): a page
of requests then costs one review, and a revoked token stops working within CACHE_SECONDS for
files and at once for jobs.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Final

from kubetune_api.errors import ApiError
from kubetune_api.kube import Kube
from kubetune_api.settings import is_dns_label
from kubetune_trainer.api import GROUP, PLURAL

CACHE_SECONDS: Final = 10.0
_CACHE_LIMIT: Final = 4096
_SA_USER = re.compile(r"system:serviceaccount:([a-z0-9]([-a-z0-9]*[a-z0-9])?):[^:]+")
AUTH_API = "authentication.k8s.io/v1"
AUTHZ_API = "authorization.k8s.io/v1"


@dataclass(frozen=True)
class Caller:
    token: str
    username: str
    namespace: str

    @property
    def key(self) -> str:
        return hashlib.sha256(self.token.encode()).hexdigest()


class TtlCache:
    """Answers kept for `seconds`, at most _CACHE_LIMIT of them (then the expired, or all,
    are dropped)."""

    def __init__(self, seconds: float = CACHE_SECONDS) -> None:
        self.seconds = seconds
        self._items: dict[tuple[str, ...], tuple[float, object]] = {}

    def get(self, key: tuple[str, ...]) -> object | None:
        hit = self._items.get(key)
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    def put(self, key: tuple[str, ...], value: object) -> None:
        if len(self._items) >= _CACHE_LIMIT:
            now = time.monotonic()
            self._items = {k: v for k, v in self._items.items() if v[0] >= now}
            if len(self._items) >= _CACHE_LIMIT:
                self._items.clear()
        self._items[key] = (time.monotonic() + self.seconds, value)

    def drop(self, key: tuple[str, ...]) -> None:
        self._items.pop(key, None)


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "no API key: send a Kubernetes token as the API key (Authorization: Bearer ...)",
            code="invalid_api_key",
        )
    return token.strip()


def token_namespace(username: str) -> str | None:
    match = _SA_USER.fullmatch(username)
    return match.group(1) if match else None


class Identity:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._users = TtlCache()
        self._decisions = TtlCache()

    async def username(self, token: str) -> str:
        key = (hashlib.sha256(token.encode()).hexdigest(),)
        cached = self._users.get(key)
        if isinstance(cached, str):
            return cached
        review = await self.kube.request(
            token,
            "POST",
            f"/apis/{AUTH_API}/selfsubjectreviews",
            body={"apiVersion": AUTH_API, "kind": "SelfSubjectReview"},
            what="self subject review",
        )
        username = str(((review.get("status") or {}).get("userInfo") or {}).get("username", ""))
        self._users.put(key, username)
        return username

    async def caller(self, authorization: str | None, project: str | None) -> Caller:
        """The authenticated caller and the namespace the request is about."""
        token = bearer_token(authorization)
        username = await self.username(token)
        if project:
            if not is_dns_label(project):
                raise ApiError(
                    400,
                    f"project {project!r} is not a namespace name (lowercase letters, digits, "
                    "'-', at most 63 characters)",
                    param="project",
                    code="invalid_project",
                )
            namespace = project
        else:
            found = token_namespace(username)
            if found is None:
                raise ApiError(
                    400,
                    f"the API key belongs to {username!r}, which has no namespace of its own: "
                    "pass the namespace as the client's project (OpenAI-Project header)",
                    param="project",
                    code="missing_project",
                )
            namespace = found
        return Caller(token=token, username=username, namespace=namespace)

    async def allowed(self, caller: Caller, verb: str) -> bool:
        key = (caller.key, caller.namespace, verb)
        cached = self._decisions.get(key)
        if isinstance(cached, bool):
            return cached
        review = await self.kube.request(
            caller.token,
            "POST",
            f"/apis/{AUTHZ_API}/selfsubjectaccessreviews",
            body={
                "apiVersion": AUTHZ_API,
                "kind": "SelfSubjectAccessReview",
                "spec": {
                    "resourceAttributes": {
                        "group": GROUP,
                        "resource": PLURAL,
                        "namespace": caller.namespace,
                        "verb": verb,
                    }
                },
            },
            what="self subject access review",
        )
        decision = bool((review.get("status") or {}).get("allowed"))
        self._decisions.put(key, decision)
        return decision

    async def require(self, caller: Caller, verb: str, action: str) -> None:
        """403 unless the caller may `verb` FineTuneJobs in its namespace."""
        if not await self.allowed(caller, verb):
            raise ApiError(
                403,
                f"{caller.username} may not {action} in namespace {caller.namespace}: that "
                f"needs RBAC permission to {verb} {PLURAL}.{GROUP} there (for example the "
                "kubetune-user ClusterRole, or edit)",
                code="permission_denied",
            )
