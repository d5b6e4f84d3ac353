"""Live status for `kubectl get ftj` and readable progress lines for `kubectl logs`.

StatusReporter PATCHes the trainer-owned part of the FineTuneJob's status (stage, progress,
metrics, parameters, estimate, output) with a JSON merge patch on the status subresource. The
operator owns phase, conditions, message and reason; the reporter refuses to send those, so the
two writers never fight. Every call only merges into a pending patch in memory; a background
thread sends it at most every `interval` seconds (immediately on stage changes and when asked),
so training never waits on the API server, and any API error is logged and swallowed: a
status update is never worth a failed training run.

Outside a cluster (no service account token or no KUBERNETES_SERVICE_HOST) or without a job
identity in the trainer config, the reporter only logs.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import httpx
from pydantic import BaseModel

from kubetune_trainer.api import (
    GROUP,
    PLURAL,
    VERSION,
    DistributedStatus,
    MemoryEstimate,
    OutputStatus,
    ParameterCounts,
    Progress,
    Stage,
    TrainingMetrics,
)
from kubetune_trainer.config import JobIdentity
from kubetune_trainer.kubeapi import MERGE_PATCH, InCluster, path

log = logging.getLogger(__name__)

# The only status fields the trainer writes; everything else belongs to the operator.
TRAINER_OWNED_FIELDS: Final = frozenset(
    {"stage", "progress", "metrics", "parameters", "estimate", "distributed", "output"}
)
DEFAULT_INTERVAL_S: Final = 10.0
# Names our patches in metadata.managedFields, so `kubectl get -o yaml --show-managed-fields`
# shows exactly which status fields the trainer wrote.
FIELD_MANAGER: Final = "kubetune-trainer"


def merge_patch(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge of `update` into a copy of `base` (objects merge, other values replace)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out


def _dump(model: BaseModel) -> dict[str, Any]:
    # camelCase as in the CRD; unset fields are left out so they do not erase known values.
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


class StatusReporter:
    """Throttled, non-blocking status patches for one FineTuneJob (see the module docstring)."""

    def __init__(
        self,
        job: JobIdentity | None,
        api: InCluster | None,
        *,
        interval: float = DEFAULT_INTERVAL_S,
        request_timeout: float = 5.0,
    ) -> None:
        self.job = job
        self.api = api
        self.interval = interval
        self.enabled = job is not None and api is not None
        self.sent = 0  # successful patches
        self.failed = 0  # failed attempts
        self._stage: Stage | None = None
        self._pending: dict[str, Any] = {}
        self._urgent = False
        self._closing = False
        self._in_flight = False
        self._attempts = 0
        self._last_attempt = -math.inf
        self._uid_checked = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._client: httpx.Client | None = None
        if self.enabled:
            assert api is not None
            verify: ssl.SSLContext | bool = True
            if api.ca_file is not None:
                verify = ssl.create_default_context(cafile=str(api.ca_file))
            self._client = httpx.Client(verify=verify, timeout=request_timeout)
            self._thread = threading.Thread(target=self._run, name="status-reporter", daemon=True)
            self._thread.start()

    @classmethod
    def from_environment(
        cls, job: JobIdentity | None, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> StatusReporter:
        api = InCluster.from_env(env) if job is not None else None
        if job is not None and api is None:
            log.info(
                "not running in a cluster: status of %s/%s is only logged", job.namespace, job.name
            )
        return cls(job, api, **kwargs)

    @property
    def status_path(self) -> str:
        assert self.job is not None
        return path(f"{GROUP}/{VERSION}", PLURAL, self.job.namespace, self.job.name, "status")

    # ------------------------------------------------------------------------------ API

    def report(
        self,
        *,
        stage: Stage | None = None,
        progress: Progress | None = None,
        metrics: TrainingMetrics | None = None,
        parameters: ParameterCounts | None = None,
        estimate: MemoryEstimate | None = None,
        distributed: DistributedStatus | None = None,
        output: OutputStatus | None = None,
        urgent: bool = False,
    ) -> None:
        """Queue status fields; returns at once. A new stage is sent without waiting."""
        patch: dict[str, Any] = {}
        if stage is not None and stage != self._stage:
            log.info("stage: %s", stage)
            self._stage = stage
            patch["stage"] = stage
            urgent = True
        for name, model in (
            ("progress", progress),
            ("metrics", metrics),
            ("parameters", parameters),
            ("estimate", estimate),
            ("distributed", distributed),
            ("output", output),
        ):
            if model is not None:
                patch[name] = _dump(model)
        self.queue(patch, urgent=urgent)

    def queue(self, patch: Mapping[str, Any], *, urgent: bool = False) -> None:
        """Merge a raw status patch (trainer-owned fields only) into the pending one."""
        foreign = set(patch) - TRAINER_OWNED_FIELDS
        if foreign:
            raise ValueError(f"the trainer may not write status fields {sorted(foreign)}")
        if not patch:
            return
        if not self.enabled:
            log.debug("status (not sent, no cluster): %s", json.dumps(patch, sort_keys=True))
            return
        with self._cond:
            self._pending = merge_patch(self._pending, patch)
            self._urgent = self._urgent or urgent
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Send what is pending now; wait up to `timeout` s for one attempt. True if sent."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._pending and not self._in_flight:
                return True
            start = self._attempts
            self._urgent = True
            self._cond.notify_all()
            while self._in_flight or (self._pending and self._attempts <= start):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._pending

    def close(self, timeout: float = 5.0) -> None:
        """Flush (one last attempt) and stop the thread; bounded, as SIGTERM's grace is short."""
        if not self.enabled:
            return
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._client is not None:
            self._client.close()

    # ---------------------------------------------------------------------- background

    def _due(self) -> bool:
        if not self._pending:
            return False
        return self._urgent or time.monotonic() - self._last_attempt >= self.interval

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._due():
                    wait = None
                    if self._pending:
                        wait = max(0.0, self.interval - (time.monotonic() - self._last_attempt))
                    self._cond.wait(wait)
                if self._closing:
                    return
                patch, self._pending, self._urgent = self._pending, {}, False
                self._in_flight = True
                self._last_attempt = time.monotonic()
            ok = self._send(patch)
            with self._cond:
                self._in_flight = False
                self._attempts += 1
                if ok:
                    self.sent += 1
                elif not self.enabled:
                    self.failed += 1
                    self._pending = {}  # reporting was disabled: drop, never retry
                else:
                    self.failed += 1
                    # Keep the fields for the next attempt; anything queued since is newer.
                    self._pending = merge_patch(patch, self._pending)
                self._cond.notify_all()

    def _send(self, patch: dict[str, Any]) -> bool:
        assert self.api is not None and self.job is not None and self._client is not None
        try:
            # Re-read every time: projected service account tokens are rotated on disk.
            token = self.api.token()
            headers = {"Authorization": f"Bearer {token}"}
            url = self.api.url + self.status_path
            if not self._uid_checked and not self._check_uid(url, headers):
                return False
            response = self._client.patch(
                url,
                params={"fieldManager": FIELD_MANAGER},
                content=json.dumps({"status": patch}).encode(),
                headers={**headers, "Content-Type": MERGE_PATCH},
            )
            if response.status_code >= 400:
                log.warning(
                    "status patch of %s/%s rejected: HTTP %d %s",
                    self.job.namespace,
                    self.job.name,
                    response.status_code,
                    response.text[:300].replace("\n", " "),
                )
                return False
            return True
        except (httpx.HTTPError, OSError) as exc:
            log.warning("status patch of %s/%s failed: %s", self.job.namespace, self.job.name, exc)
            return False
        except Exception:  # never let a status update take the training run down
            log.exception("status patch of %s/%s failed", self.job.namespace, self.job.name)
            return False

    def _check_uid(self, url: str, headers: dict[str, str]) -> bool:
        """Refuse to report into a FineTuneJob re-created under the same name."""
        assert self.job is not None and self._client is not None
        response = self._client.get(url, headers=headers)
        if response.status_code == 403:
            # The Role may grant patch only; the operator deletes our Job with its owner anyway.
            self._uid_checked = True
            return True
        if response.status_code >= 400:
            log.warning(
                "cannot read %s/%s: HTTP %d",
                self.job.namespace,
                self.job.name,
                response.status_code,
            )
            return False
        uid = response.json().get("metadata", {}).get("uid")
        self._uid_checked = True
        if uid != self.job.uid:
            log.error(
                "FineTuneJob %s/%s has uid %s, not %s (re-created?): status reporting disabled",
                self.job.namespace,
                self.job.name,
                uid,
                self.job.uid,
            )
            self.enabled = False
            return False
        return True


# ------------------------------------------------------------------------------ progress log


def log_every(total_steps: int) -> int:
    """Log cadence in steps: about 100 lines per run, every step for short runs."""
    return max(1, total_steps // 100)


@dataclass(frozen=True)
class ProgressSnapshot:
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: int
    memory_bytes: int | None = None
    memory_label: str = "GPU peak"

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.total_steps if self.total_steps else 100.0

    def line(self) -> str:
        """One human-readable log line."""
        parts = [
            f"step {self.step}/{self.total_steps} ({self.percent:.1f}%)",
            f"epoch {self.epoch:.2f}",
            f"loss {self.loss:.4f}",
            f"lr {self.learning_rate:.3g}",
            f"{self.tokens_per_second:,.0f} tok/s",
        ]
        if self.memory_bytes is not None:
            parts.append(f"{self.memory_label} {self.memory_bytes / 1024**3:.2f} GiB")
        parts.append(f"eta {timedelta(seconds=self.eta_seconds)}")
        return " | ".join(parts)

    def progress(self) -> Progress:
        return Progress(
            epoch=round(self.epoch, 4),
            step=self.step,
            total_steps=self.total_steps,
            percent=round(self.percent, 2),
            eta_seconds=self.eta_seconds,
            update_time=datetime.now(UTC).replace(microsecond=0),
        )


class ThroughputWindow:
    """Tokens, steps and time since the last log line, and since training (re)started."""

    def __init__(self, start_step: int) -> None:
        now = time.monotonic()
        self.start_step = start_step
        self.start_time = now
        self.window_start = now
        self.window_tokens = 0
        self.total_tokens = 0

    def add(self, tokens: int) -> None:
        self.window_tokens += tokens
        self.total_tokens += tokens

    def close_window(self, step: int, total_steps: int) -> tuple[float, int]:
        """(tokens/s in the window, ETA in seconds from the mean step time so far)."""
        now = time.monotonic()
        elapsed = max(now - self.window_start, 1e-9)
        rate = self.window_tokens / elapsed
        self.window_start, self.window_tokens = now, 0
        done = step - self.start_step
        per_step = (now - self.start_time) / done if done > 0 else 0.0
        return rate, round(per_step * (total_steps - step))

    def mean_tokens_per_second(self) -> float:
        return self.total_tokens / max(time.monotonic() - self.start_time, 1e-9)
