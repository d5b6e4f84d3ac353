"""The few calls the agent makes to vLLM's OpenAI-compatible server (same pod, loopback).

Runtime LoRA loading needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in vLLM's environment; its
errors come back as {"error": {"message": ...}} and are passed on as vLLM wrote them, minus
the "see the stack trace" wrapping that says nothing to a user.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import httpx

# vLLM wraps worker errors: "Call to add_lora method failed: Worker failed with error
# 'LoRA rank 16 is greater than max_lora_rank 8.', please check the stack trace above ...".
_WORKER_ERROR_RE: Final = re.compile(r"Worker failed with error '(.*)', please check", re.DOTALL)
MESSAGE_LIMIT: Final = 400


class VllmError(Exception):
    """vLLM refused a request or could not be reached; the message is vLLM's reason."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def reason(body: str) -> str:
    """vLLM's error message from a response body, on one line."""
    message = body
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
        elif isinstance(error, str):
            message = error
    inner = _WORKER_ERROR_RE.search(message)
    if inner:
        message = inner.group(1)
    text = " ".join(message.split()) or "no reason given"
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


class Vllm:
    """GET /health, GET /v1/models, POST /v1/load_lora_adapter, /v1/unload_lora_adapter."""

    def __init__(self, url: str, *, timeout: float = 10.0, load_timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.load_timeout = load_timeout
        self._client = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise VllmError(
                f"cannot reach vLLM at {self.url}{path}: {exc or type(exc).__name__}"
            ) from exc

    def health(self) -> str | None:
        """None when vLLM is ready, else why not."""
        try:
            response = self._request("GET", "/health")
        except VllmError as exc:
            return str(exc)
        if response.status_code != 200:
            return f"vLLM's /health answers HTTP {response.status_code}: {reason(response.text)}"
        return None

    def adapters(self) -> dict[str, str]:
        """The LoRA adapters vLLM holds: name -> the directory it loaded them from."""
        response = self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise VllmError(
                f"GET /v1/models answered HTTP {response.status_code}: {reason(response.text)}",
                status=response.status_code,
            )
        return {
            str(card["id"]): str(card.get("root") or "")
            for card in response.json().get("data", [])
            if card.get("parent")  # base models have none
        }

    def load(self, name: str, path: str) -> None:
        response = self._request(
            "POST",
            "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": path},
            timeout=self.load_timeout,
        )
        if response.status_code != 200:
            raise VllmError(reason(response.text), status=response.status_code)

    def unload(self, name: str) -> bool:
        """Unload `name`; False when vLLM did not hold it (nothing to do)."""
        response = self._request("POST", "/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise VllmError(reason(response.text), status=response.status_code)
        return True
