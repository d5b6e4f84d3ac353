"""The agent's two Kubernetes calls: read a ConfigMap, merge-patch a ConfigMap's data.

Where the API server is and the token come from the pod (kubetune_trainer.kubeapi.InCluster:
KUBERNETES_SERVICE_HOST/PORT and the service account directory, KUBETUNE_SA_DIR to point
elsewhere). The token is read for every request: projected tokens are rotated on disk.
"""

from __future__ import annotations

import json
import ssl
from typing import Any, Final

import httpx

from kubetune_trainer.kubeapi import MERGE_PATCH, InCluster, error_message, path

FIELD_MANAGER: Final = "kubetune-serving-agent"


class KubeError(Exception):
    """The API server could not be reached or refused; `status` is the HTTP status if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConfigMaps:
    """ConfigMaps of one namespace, with the pod's service account."""

    def __init__(self, api: InCluster, namespace: str, *, timeout: float = 10.0) -> None:
        self.api = api
        self.namespace = namespace
        verify: ssl.SSLContext | bool = True
        if api.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(api.ca_file))
        self._client = httpx.Client(base_url=api.url, verify=verify, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def _path(self, name: str) -> str:
        return path("v1", "configmaps", self.namespace, name)

    def _send(self, method: str, name: str, **kwargs: Any) -> httpx.Response:
        what = f"{method} configmap {self.namespace}/{name}"
        try:
            token = self.api.token()
            headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
            response = self._client.request(method, self._path(name), headers=headers, **kwargs)
        except (httpx.HTTPError, OSError) as exc:
            raise KubeError(f"{what}: {exc or type(exc).__name__}") from exc
        if response.status_code >= 400:
            message = error_message(response.text, response.text[:200])
            raise KubeError(
                f"{what}: HTTP {response.status_code} {message}", status=response.status_code
            )
        return response

    def data(self, name: str) -> dict[str, str] | None:
        """The ConfigMap's data, or None when it does not exist."""
        try:
            response = self._send("GET", name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return dict(response.json().get("data") or {})

    def patch_data(self, name: str, data: dict[str, str]) -> None:
        """JSON merge patch of these keys (the others stay)."""
        self._send(
            "PATCH",
            name,
            params={"fieldManager": FIELD_MANAGER},
            content=json.dumps({"data": data}).encode(),
            headers={"Content-Type": MERGE_PATCH},
        )
