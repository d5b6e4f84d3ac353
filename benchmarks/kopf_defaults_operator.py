"""`kubetune-operator` with Kopf's default settings: the naive baseline of operator_scale.py.

    .venv/bin/python benchmarks/kopf_defaults_operator.py     # same KUBETUNE_* variables

The same entry point, handlers and reconcile code as the shipped operator; only
`settings.configure_kopf` (called from the startup handler) is replaced by a no-op, so Kopf runs
with its own defaults instead of the project's choices:

* progress storage: Kopf's SmartProgressStorage (annotations *and* status.kopf, which the
  FineTuneJob schema prunes) instead of annotations under kubetune.dev;
* diff-base annotation kopf.zalando.org/last-handled-configuration;
* no server-side label selector on the Job and pod watches (every Job and pod of the watched
  namespaces is streamed and filtered client-side);
* no watch timeouts, Kopf's default network back-offs and error delays;
* CRD/namespace scanning on (the chart's RBAC forbids it: Kopf logs a warning and falls back);
* peering keep-alives not stealthy, and Kopf's default lifetime (60 s).

Benchmark-only: nothing in the operator package refers to this file.
"""

from __future__ import annotations

from typing import Any

from kubetune_operator import __main__ as entry
from kubetune_operator import handlers


def keep_kopf_defaults(*_: Any, **__: Any) -> None:
    """Instead of settings.configure_kopf: leave every Kopf setting at its default."""


if __name__ == "__main__":
    handlers.configure_kopf = keep_kopf_defaults  # type: ignore[attr-defined]
    raise SystemExit(entry.main())
