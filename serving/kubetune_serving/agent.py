"""`kubetune-serving-agent run`: the sidecar loop, by level.

Every round (KUBETUNE_AGENT_INTERVAL seconds): read <server>-desired, ask vLLM whether it is
ready and which adapters it holds, plan (plan.py), unload what is not desired (and delete its
files), fetch + verify + load what is missing, and merge-patch <server>-state when the report
changed. Nothing is assumed from the previous round that vLLM can contradict: adapters a
restarted vLLM lost are loaded again, and an API server that cannot be reached only skips
the round. A failure is per adapter: it is reported and retried with backoff, and the others
go on.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pydantic

from kubetune_serving.kube import ConfigMaps, KubeError
from kubetune_serving.plan import (
    Failure,
    Held,
    changed,
    failed,
    plan,
    recover,
    reports,
    stamp,
    valid_name,
    version_dir,
)
from kubetune_serving.published import (
    ADAPTER_FILES,
    SKIP_FOR_ADAPTER,
    PublishedError,
    check_listed,
    fetch_files,
    read_manifest,
    verify_files,
)
from kubetune_serving.settings import AgentSettings
from kubetune_serving.vllm import Vllm, VllmError
from kubetune_trainer.redact import redact
from kubetune_trainer.serving import (
    DESIRED_KEY,
    STATE_KEY,
    AdapterReport,
    DesiredAdapter,
    DesiredState,
    ServerState,
)
from kubetune_trainer.storage import RETRIED_REASONS, Storage, StorageError

log = logging.getLogger(__name__)

MESSAGE_LIMIT: Final = 512
NEVER: Final = float("inf")


def one_line(text: str) -> str:
    """Credentials masked, whitespace collapsed, bounded: fit for a status message."""
    text = " ".join(redact(text).split())
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        configmaps: ConfigMaps,
        vllm: Vllm,
        storage: Storage,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.configmaps = configmaps
        self.vllm = vllm
        self.storage = storage
        self.clock = clock
        self.adapter_dir = str(settings.adapter_dir)
        self.held: dict[str, Held] = {}
        self.failures: dict[str, Failure] = {}
        self.notes: dict[str, str] = {}  # what is being done with adapters on their way in
        self.written: ServerState | None = None  # what <server>-state holds, as far as known

    # ---------------------------------------------------------------------------- the loop

    def run(self, stop: threading.Event) -> None:
        log.info(
            "serving agent for %s/%s: vLLM at %s, adapters in %s, every %gs",
            self.settings.namespace,
            self.settings.server_name,
            self.settings.vllm_url,
            self.adapter_dir,
            self.settings.interval,
        )
        while not stop.is_set():
            try:
                self.round(stop)
            except Exception:  # a bug must not end the sidecar: log it, try again next round
                log.exception("round failed")
            stop.wait(self.settings.interval)
        log.info("stopped")

    def round(self, stop: threading.Event | None = None) -> None:
        desired, problem = self._desired()
        if desired is None and not problem:
            return  # the API server cannot be reached: nothing to read, nowhere to report
        not_ready = self.vllm.health()
        served: dict[str, str] | None = None
        if not_ready is None:
            try:
                served = self.vllm.adapters()
            except VllmError as exc:
                not_ready = str(exc)
        if desired is None:  # unknown: change nothing, say why
            previous = self.written.adapters if self.written is not None else {}
            self._publish(previous, served is not None, problem)
        elif served is None:
            self._report(desired, None, f"vLLM is not ready: {not_ready}")
        else:
            self._reconcile(desired, served, stop)
            self._report(desired, self._served_or_none(), "")

    def _served_or_none(self) -> dict[str, str] | None:
        try:
            return self.vllm.adapters()
        except VllmError:
            return None

    # ----------------------------------------------------------------------- desired state

    def _desired(self) -> tuple[list[DesiredAdapter] | None, str]:
        """The desired adapters (valid, first of each name), or None and why not."""
        name = self.settings.desired_configmap
        try:
            data = self.configmaps.data(name)
        except KubeError as exc:
            log.warning("cannot read the desired state, retrying next round: %s", exc)
            return None, ""  # cannot report either, most likely
        if data is None:
            return None, f"ConfigMap {name} does not exist (the operator creates it)."
        try:
            state = DesiredState.model_validate_json(data.get(DESIRED_KEY) or "{}")
        except pydantic.ValidationError as exc:
            return None, one_line(f"{name}/{DESIRED_KEY} is not a DesiredState: {exc}")
        adapters: list[DesiredAdapter] = []
        seen: set[str] = set()
        for adapter in state.adapters:
            if adapter.name in seen:
                continue
            seen.add(adapter.name)
            adapters.append(adapter)
            if not valid_name(adapter.name):
                self.failures[adapter.name] = Failure(
                    adapter.uri, adapter.rank, "Failed", "Not a valid adapter name.", 1, NEVER
                )
        return adapters, ""

    # ---------------------------------------------------------------------------- actions

    def _reconcile(
        self,
        desired: list[DesiredAdapter],
        served: dict[str, str],
        stop: threading.Event | None,
    ) -> None:
        now = self.clock()
        wanted = {d.name for d in desired}
        # Forget what is no longer desired; recognise our own loads after a restart; notice
        # what a restarted vLLM lost.
        for table in (self.failures, self.notes):
            for name in [n for n in table if n not in wanted]:
                del table[name]
        for name, path in served.items():
            if name not in self.held and (h := recover(name, path, self.adapter_dir)):
                log.info("%s: vLLM holds it from %s (loaded before this agent started)", name, path)
                self.held[name] = h
        for name in list(self.held):
            if served.get(name) != self.held[name].path:
                if name in wanted:
                    log.warning("%s: vLLM no longer holds it (restarted?): loading it again", name)
                    self.notes[name] = "vLLM no longer held it (restarted?): loading it again."
                del self.held[name]
        todo = plan(
            [d for d in desired if valid_name(d.name)],
            served,
            self.held,
            self.failures,
            now=now,
            recheck_after=self.settings.recheck,
        )
        for name in todo.unload:
            self._unload(name)
        for adapter in todo.recheck:
            self._recheck(adapter, now)
        # ...and those a recheck found republished.
        load = [*todo.load, *(d for d in todo.recheck if d.name not in self.held)]
        if load:
            for d in load:
                self.notes.setdefault(d.name, "Fetching the adapter and checking its SHA256SUMS.")
            self._report(desired, served, "")
        for adapter in load:
            if stop is not None and stop.is_set():
                return
            self._load(adapter, served)
            self._report(desired, self._served_or_none(), "")
        self._collect_garbage(wanted | set(served))

    def _unload(self, name: str) -> None:
        try:
            self.vllm.unload(name)
        except VllmError as exc:
            log.warning("%s: unloading failed, retrying next round: %s", name, exc)
            return
        self.held.pop(name, None)
        shutil.rmtree(Path(self.adapter_dir) / name, ignore_errors=True)
        log.info("%s: unloaded and its files deleted", name)

    def _recheck(self, adapter: DesiredAdapter, now: float) -> None:
        """Compare a loaded adapter's manifest with the store's: republished -> load again."""
        held = self.held[adapter.name]
        try:
            manifest = read_manifest(self.storage, adapter.uri)
        except (StorageError, PublishedError) as exc:
            log.warning("%s: cannot check its SHA256SUMS, keeping it: %s", adapter.name, exc)
            self.held[adapter.name] = Held(held.manifest_sha256, held.path, now)
            return
        if manifest.sha256 == held.manifest_sha256:
            self.held[adapter.name] = Held(held.manifest_sha256, held.path, now)
            return
        log.info("%s: republished (SHA256SUMS changed): loading the new files", adapter.name)
        self.notes[adapter.name] = "Republished (its SHA256SUMS changed): loading the new files."
        del self.held[adapter.name]

    def _load(self, adapter: DesiredAdapter, served: dict[str, str]) -> None:
        name, started = adapter.name, time.monotonic()
        try:
            manifest = read_manifest(self.storage, adapter.uri)
            check_listed(manifest, ADAPTER_FILES, "a LoRA adapter")
            target = Path(version_dir(self.adapter_dir, name, manifest.sha256))
            reused = False
            if target.is_dir():  # fetched before (vLLM restarted): check it again, keep it
                try:
                    verify_files(target, manifest.selected(SKIP_FOR_ADAPTER))
                    reused = True
                except PublishedError:
                    shutil.rmtree(target)
            count = (
                0
                if reused
                else fetch_files(self.storage, adapter.uri, manifest, target, skip=SKIP_FOR_ADAPTER)
            )
            fetched = time.monotonic()
            if name in served:  # an older copy: vLLM loads a name once
                self.vllm.unload(name)
            self.vllm.load(name, str(target))
        except (StorageError, PublishedError, VllmError, OSError) as exc:
            self._failed(adapter, exc)
            return
        finally:
            self.notes.pop(name, None)
        self.held[name] = Held(manifest.sha256, str(target), self.clock())
        self.failures.pop(name, None)
        for old in (Path(self.adapter_dir) / name).iterdir():
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        log.info(
            "%s: loaded %s (%s; fetch+verify %.2fs, load %.2fs)",
            name,
            adapter.uri,
            "files already here, checked again" if reused else f"{count} files fetched and checked",
            fetched - started,
            time.monotonic() - fetched,
        )

    def _failed(self, adapter: DesiredAdapter, exc: Exception) -> None:
        transient = False
        if isinstance(exc, StorageError):
            transient = exc.reason in RETRIED_REASONS
            message = f"Fetching {adapter.uri} failed: {exc}"
        elif isinstance(exc, PublishedError):
            message = str(exc)  # names the manifest or the files; the report has the URI
        elif isinstance(exc, VllmError):
            transient = exc.status is None  # vLLM went away mid-load: not the adapter's fault
            message = f"vLLM refused the adapter: {exc}"
            if "max_lora_rank" in str(exc):
                message += (
                    f" (spec.lora.r is {adapter.rank}; the server's --max-lora-rank is set "
                    "from the largest rank it serves, up to the operator's limit)"
                )
        else:
            message = f"Cannot store the adapter in {self.adapter_dir}: {exc}"
        message = one_line(message)
        previous = self.failures.get(adapter.name)
        self.failures[adapter.name] = failed(
            adapter, message, previous, self.clock(), transient=transient
        )
        log.warning("%s: %s", adapter.name, message)

    def _collect_garbage(self, keep: set[str]) -> None:
        """Delete adapter directories nobody wants or holds (and leftovers of killed fetches)."""
        root = Path(self.adapter_dir)
        if not root.is_dir():
            return
        for entry in root.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir():
                for part in entry.glob(".*.partial"):
                    shutil.rmtree(part, ignore_errors=True)

    # ---------------------------------------------------------------------------- report

    def _report(
        self, desired: list[DesiredAdapter], served: dict[str, str] | None, message: str
    ) -> None:
        adapters = reports(desired, served, self.held, self.failures, self.notes)
        self._publish(adapters, served is not None, message)

    def _publish(self, adapters: dict[str, AdapterReport], ready: bool, message: str) -> None:
        """Merge-patch <server>-state if the report changed (from what it holds now: a state
        ConfigMap someone recreated or edited is written again)."""
        self._read_written()
        state = ServerState(vllm_ready=ready, message=message, adapters=adapters)
        if not changed(state, self.written):
            return
        state = stamp(state, self.written, _now())
        try:
            self.configmaps.patch_data(self.settings.state_configmap, {STATE_KEY: state.to_json()})
        except KubeError as exc:
            log.warning("cannot write the state, retrying next round: %s", exc)
            return
        self.written = state
        log.info(
            "state: vLLM %s; %s%s",
            "ready" if state.vllm_ready else "not ready",
            ", ".join(f"{n} {r.state}" for n, r in sorted(state.adapters.items())) or "no adapters",
            f" ({message})" if message else "",
        )

    def _read_written(self) -> None:
        try:
            data = self.configmaps.data(self.settings.state_configmap)
        except KubeError:
            return  # keep what we know; the patch will tell
        text = (data or {}).get(STATE_KEY)
        try:
            self.written = ServerState.model_validate_json(text) if text else None
        except pydantic.ValidationError:
            self.written = None
