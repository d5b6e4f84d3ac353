"""What to do this round, and what to report: pure functions of what is desired, what vLLM
holds and what the agent remembers. No I/O, no clock (the caller passes `now`).

The agent loads an adapter from <adapter dir>/<name>/<SHA-256 of its SHA256SUMS>/, so the
directory vLLM reports for an adapter (the `root` of /v1/models) says which published files it
holds: an agent that restarts recognises its own loads, and a republished output (another
manifest) goes to a new directory, which vLLM treats as a new adapter (no stale cache).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Final

from kubetune_trainer.serving import AdapterReport, AdapterState, DesiredAdapter, ServerState

# A FineTuneJob name (DNS subdomain): also safe as a directory name.
ADAPTER_NAME_RE: Final = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
LOADED_MESSAGE: Final = "Loaded in vLLM; every file matched the output's SHA256SUMS."
# Retries of a failed adapter: 15 s, doubling, at most every 10 minutes.
FIRST_RETRY_S: Final = 15.0
MAX_RETRY_S: Final = 600.0


@dataclass(frozen=True)
class Held:
    """An adapter the agent loaded: vLLM holds it from `path`, whose files were checked against
    the manifest whose SHA-256 is `manifest_sha256`; `checked` is when that manifest was last
    compared with the store's (monotonic seconds)."""

    manifest_sha256: str
    path: str
    checked: float


@dataclass(frozen=True)
class Failure:
    """The last attempt at a desired adapter failed. `state` is Failed, or Loading when the
    problem may pass (an unreachable store); either way it is retried at `retry_at`, or at once
    when the desired entry changes."""

    uri: str
    rank: int
    state: AdapterState
    message: str
    attempts: int
    retry_at: float

    def applies_to(self, desired: DesiredAdapter) -> bool:
        return (self.uri, self.rank) == (desired.uri, desired.rank)


def valid_name(name: str) -> bool:
    return ADAPTER_NAME_RE.fullmatch(name) is not None


def version_dir(adapter_dir: str, name: str, manifest_sha256: str) -> str:
    return str(PurePosixPath(adapter_dir) / name / manifest_sha256)


def recover(name: str, path: str, adapter_dir: str) -> Held | None:
    """The agent's record of an adapter vLLM holds from `path`, if the agent loaded it (from a
    version directory); the manifest is checked again at once."""
    p = PurePosixPath(path)
    if p.parent == PurePosixPath(adapter_dir) / name and SHA256_RE.fullmatch(p.name):
        return Held(p.name, path, checked=-math.inf)
    return None


def retry_delay(attempts: int) -> float:
    return float(min(FIRST_RETRY_S * 2 ** max(attempts - 1, 0), MAX_RETRY_S))


def failed(
    desired: DesiredAdapter,
    message: str,
    previous: Failure | None,
    now: float,
    *,
    transient: bool = False,
) -> Failure:
    """The record of one more failed attempt (backoff grows while the entry is unchanged)."""
    attempts = previous.attempts + 1 if previous and previous.applies_to(desired) else 1
    return Failure(
        uri=desired.uri,
        rank=desired.rank,
        state="Loading" if transient else "Failed",
        message=message,
        attempts=attempts,
        retry_at=now + retry_delay(attempts),
    )


@dataclass(frozen=True)
class Plan:
    unload: tuple[str, ...]  # vLLM holds them; they are not desired
    load: tuple[DesiredAdapter, ...]  # fetch, verify, load (after unloading an older copy)
    recheck: tuple[DesiredAdapter, ...]  # loaded: compare their SHA256SUMS with the store's


def plan(
    desired: Sequence[DesiredAdapter],
    served: Mapping[str, str],
    held: Mapping[str, Held],
    failures: Mapping[str, Failure],
    *,
    now: float,
    recheck_after: float,
) -> Plan:
    """desired (valid, unique names) + served (vLLM's adapters: name -> directory) + the
    agent's records -> the actions of this round."""
    wanted = {d.name for d in desired}
    load: list[DesiredAdapter] = []
    recheck: list[DesiredAdapter] = []
    for d in desired:
        h = held.get(d.name)
        if h is not None and served.get(d.name) == h.path:
            if now - h.checked >= recheck_after:
                recheck.append(d)
            continue
        f = failures.get(d.name)
        if f is not None and f.applies_to(d) and now < f.retry_at:
            continue
        load.append(d)
    unload = tuple(sorted(name for name in served if name not in wanted))
    return Plan(unload, tuple(load), tuple(recheck))


def reports(
    desired: Sequence[DesiredAdapter],
    served: Mapping[str, str] | None,
    held: Mapping[str, Held],
    failures: Mapping[str, Failure],
    notes: Mapping[str, str],
) -> dict[str, AdapterReport]:
    """One report per desired adapter. `served` is None while vLLM is not ready (nothing is
    served then); `notes` say what is being done with adapters on their way in."""
    out: dict[str, AdapterReport] = {}
    for d in desired:
        h, f = held.get(d.name), failures.get(d.name)
        if served is not None and h is not None and served.get(d.name) == h.path:
            out[d.name] = AdapterReport(
                state="Loaded", uri=d.uri, message=LOADED_MESSAGE, manifest_sha256=h.manifest_sha256
            )
        elif f is not None and f.applies_to(d):
            out[d.name] = AdapterReport(state=f.state, uri=d.uri, message=f.message)
        else:
            message = notes.get(d.name) or (
                "Waiting for vLLM to be ready." if served is None else "Waiting to be loaded."
            )
            out[d.name] = AdapterReport(state="Loading", uri=d.uri, message=message)
    return out


def _content(state: ServerState) -> dict[str, object]:
    return state.model_dump(exclude={"updated": True, "adapters": {"__all__": {"updated"}}})


def changed(new: ServerState, old: ServerState | None) -> bool:
    """Whether `new` says anything `old` did not (the `updated` times aside)."""
    return old is None or _content(new) != _content(old)


def stamp(new: ServerState, old: ServerState | None, now: str) -> ServerState:
    """`new` with its `updated` times: kept from `old` where nothing else changed."""
    previous = old.adapters if old is not None else {}
    adapters = {}
    for name, report in new.adapters.items():
        before = previous.get(name)
        updated = now
        if before is not None and before.model_dump(exclude={"updated"}) == report.model_dump(
            exclude={"updated"}
        ):
            updated = before.updated
        adapters[name] = report.model_copy(update={"updated": updated})
    updated = old.updated if old is not None and not changed(new, old) else now
    return new.model_copy(update={"adapters": adapters, "updated": updated})
