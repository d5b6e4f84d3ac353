"""Prometheus metrics of the operator, served on KUBETUNE_METRICS_PORT at /metrics.

- kubetune_finetunejobs{phase}: FineTuneJobs this replica sees, by phase (a gauge computed at
  scrape time from what the watch delivered, so it can never drift from a missed decrement);
- kubetune_phase_transitions_total{phase}: phase changes the operator wrote;
- kubetune_reconcile_duration_seconds{handler}: how long each handler took;
- kubetune_reconcile_errors_total{handler, kind}: handler failures (temporary, permanent, other).

A paused peering replica watches nothing and so reports nothing: only the active one counts.
Kopf serves the liveness probe separately (KUBETUNE_HEALTH_PORT, /healthz).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import kopf
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune_trainer.api import Phase

PHASES: tuple[Phase, ...] = (
    "Pending",
    "Queued",
    "Suspended",
    "Running",
    "Succeeded",
    "Failed",
    "Cancelled",
)

REGISTRY = CollectorRegistry()

TRANSITIONS = Counter(
    "kubetune_phase_transitions",
    "FineTuneJob phase changes written by the operator.",
    ["phase"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Duration of the operator's handlers.",
    ["handler"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ERRORS = Counter(
    "kubetune_reconcile_errors",
    "Handler failures by kind: temporary (retried), permanent, unexpected.",
    ["handler", "kind"],
    registry=REGISTRY,
)


class PhaseTracker(Collector):
    """Phase of every FineTuneJob seen, keyed by uid; exported as counts per phase."""

    def __init__(self) -> None:
        self.phases: dict[str, str] = {}

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        uid = str(body.get("metadata", {}).get("uid", ""))
        if event_type == "DELETED":
            self.phases.pop(uid, None)
        else:
            self.phases[uid] = str((body.get("status") or {}).get("phase") or "Pending")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kubetune_finetunejobs", "FineTuneJobs by phase.", labels=["phase"]
        )
        counts: dict[str, int] = dict.fromkeys(PHASES, 0)
        for phase in list(self.phases.values()):
            counts[phase] = counts.get(phase, 0) + 1
        for phase, count in counts.items():
            family.add_metric([phase], count)
        yield family


TRACKER = PhaseTracker()
REGISTRY.register(TRACKER)


def serve(port: int) -> None:
    """Start the /metrics HTTP server in a daemon thread (port 0: no server)."""
    if port:
        start_http_server(port, registry=REGISTRY)


@asynccontextmanager
async def timed(handler: str) -> AsyncIterator[None]:
    """Time a handler and count its failures by kind."""
    started = time.perf_counter()
    try:
        yield
    except kopf.TemporaryError:
        ERRORS.labels(handler, "temporary").inc()
        raise
    except kopf.PermanentError:
        ERRORS.labels(handler, "permanent").inc()
        raise
    except Exception:
        ERRORS.labels(handler, "unexpected").inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(handler).observe(time.perf_counter() - started)
