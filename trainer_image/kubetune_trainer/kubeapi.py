"""What every kubetune component needs of the Kubernetes API, whatever HTTP client it uses.

The operator (aiohttp, with Kopf's credentials), the API server (aiohttp, with each caller's
token), the trainer and the serving agent (httpx, with the pod's token) each keep the HTTP client
that fits their process; this module is the one place for what they share: where the API server
is from inside a pod, REST paths, the resource name of a kind, and the API server's error text.
Standard library only, so importing it costs nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

MERGE_PATCH: Final = "application/merge-patch+json"
SA_DIR_ENV: Final = "KUBETUNE_SA_DIR"
DEFAULT_SA_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class InCluster:
    """The pod's API server and ServiceAccount files (read when used: tokens rotate on disk)."""

    url: str
    token_file: Path
    ca_file: Path | None = None
    namespace_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> InCluster | None:
        """KUBERNETES_SERVICE_HOST/PORT (as client libraries do; no cluster DNS needed) and the
        ServiceAccount directory, or None when not in a pod. KUBETUNE_SA_DIR replaces the
        directory (token, ca.crt), e.g. with a token from `kubectl create token`."""
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        sa_dir = Path(env.get(SA_DIR_ENV) or DEFAULT_SA_DIR)
        token = sa_dir / "token"
        if not host or not port or not token.is_file():
            return None
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        ca, namespace = sa_dir / "ca.crt", sa_dir / "namespace"
        return cls(
            f"https://{host}:{port}",
            token,
            ca if ca.is_file() else None,
            namespace if namespace.is_file() else None,
        )

    def token(self) -> str:
        return self.token_file.read_text(encoding="utf-8").strip()

    def namespace(self) -> str | None:
        if self.namespace_file is None:
            return None
        return self.namespace_file.read_text(encoding="utf-8").strip() or None


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


def resource_of(kind: str) -> str:
    """The resource (plural) of a kind, by the rule the API server applies to built-in kinds
    and CRDs' defaults (client-go's meta.UnsafeGuessKindToResource): lower case, then "es"
    after an "s", "ies" for a final "y", else "s". A rule, not a table, so a new child kind
    needs no entry; tests/integration checks it against discovery for every kind created."""
    lower = kind.lower()
    if lower.endswith("s"):
        return lower + "es"
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    return lower + "s"


def object_path(body: Mapping[str, Any], *, collection: bool = False) -> str:
    """The path of a manifest's object (or of its collection, to create it)."""
    meta = body["metadata"]
    name = None if collection else meta["name"]
    return path(body["apiVersion"], resource_of(body["kind"]), meta.get("namespace"), name)


def error_message(text: str, fallback: str) -> str:
    """The API server's own message from an error response (a Status object), else fallback."""
    try:
        message = json.loads(text or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or fallback)
