"""The agent's settings, from its environment; a bad value fails naming the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pydantic

from kubetune_trainer.api import StorageConfig
from kubetune_trainer.kubeapi import DEFAULT_SA_DIR, SA_DIR_ENV
from kubetune_trainer.serving import ADAPTERS_DIR, DESIRED_SUFFIX, STATE_SUFFIX

SERVER_NAME_ENV: Final = "KUBETUNE_SERVER_NAME"
NAMESPACE_ENV: Final = "POD_NAMESPACE"
VLLM_URL_ENV: Final = "KUBETUNE_VLLM_URL"
ADAPTER_DIR_ENV: Final = "KUBETUNE_ADAPTER_DIR"
STORAGE_ENV: Final = "KUBETUNE_STORAGE"
INTERVAL_ENV: Final = "KUBETUNE_AGENT_INTERVAL"
RECHECK_ENV: Final = "KUBETUNE_AGENT_RECHECK"
DEFAULT_VLLM_URL: Final = "http://127.0.0.1:8000"


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def storage_config(env: Mapping[str, str]) -> StorageConfig:
    """KUBETUNE_STORAGE (kubetune_trainer.serving.storage_json), or the defaults when unset."""
    text = env.get(STORAGE_ENV, "").strip()
    if not text:
        return StorageConfig()
    try:
        return StorageConfig.model_validate_json(text)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        raise SettingsError(
            f"{STORAGE_ENV} is not a valid spec.storage JSON object: {problems}"
        ) from exc


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SettingsError(f"{name} must be a positive number of seconds, not {text!r}")
    return value


def _namespace(env: Mapping[str, str]) -> str:
    """POD_NAMESPACE (the downward API), else the service account's namespace file."""
    value = env.get(NAMESPACE_ENV, "").strip()
    if value:
        return value
    ns_file = Path(env.get(SA_DIR_ENV) or DEFAULT_SA_DIR) / "namespace"
    if ns_file.is_file():
        return ns_file.read_text(encoding="utf-8").strip()
    raise SettingsError(
        f"{NAMESPACE_ENV} is not set: pass the pod's namespace with the downward API "
        "(fieldRef metadata.namespace)"
    )


@dataclass(frozen=True)
class AgentSettings:
    server_name: str
    namespace: str
    vllm_url: str = DEFAULT_VLLM_URL
    adapter_dir: Path = Path(ADAPTERS_DIR)
    storage: StorageConfig = field(default_factory=StorageConfig)
    interval: float = 5.0  # seconds between rounds
    recheck: float = 60.0  # seconds between checks of a loaded adapter's SHA256SUMS

    @property
    def desired_configmap(self) -> str:
        return self.server_name + DESIRED_SUFFIX

    @property
    def state_configmap(self) -> str:
        return self.server_name + STATE_SUFFIX

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> AgentSettings:
        env = os.environ if env is None else env
        server = env.get(SERVER_NAME_ENV, "").strip()
        if not server:
            raise SettingsError(
                f"{SERVER_NAME_ENV} is not set: the server's name (its ConfigMaps are "
                f"<name>-desired and <name>-state)"
            )
        url = (env.get(VLLM_URL_ENV) or DEFAULT_VLLM_URL).strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise SettingsError(f"{VLLM_URL_ENV} must be an http(s) URL, not {url!r}")
        return cls(
            server_name=server,
            namespace=_namespace(env),
            vllm_url=url,
            adapter_dir=Path(env.get(ADAPTER_DIR_ENV) or ADAPTERS_DIR),
            storage=storage_config(env),
            interval=_seconds(env, INTERVAL_ENV, cls.interval),
            recheck=_seconds(env, RECHECK_ENV, cls.recheck),
        )
