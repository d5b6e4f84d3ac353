"""`kubetune-operator` (or `python -m kubetune_operator`): run the FineTuneJob operator.

Configured by KUBETUNE_* environment variables only (see settings.py and `--help`), so the same
command runs in the chart's Deployment and on a workstation against any kubeconfig.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import kopf

from kubetune_operator import handlers
from kubetune_operator.gc_tuning import tune_gc
from kubetune_operator.settings import (
    OperatorSettings,
    SettingsError,
    env_name,
    load_settings,
)


def _usage() -> argparse.ArgumentParser:
    lines = []
    for name, field in OperatorSettings.model_fields.items():
        default = field.default if field.default not in (None, ()) else "unset"
        lines.append(f"  {env_name(name)} (default: {default})")
        if field.description:
            lines.append(f"      {field.description}")
    return argparse.ArgumentParser(
        prog="kubetune-operator",
        description="Run the kubetune FineTuneJob operator against the current kubeconfig "
        "(in a pod: its ServiceAccount).",
        epilog="environment:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# Importing the module registers its Kopf handlers.
__all__ = ["handlers", "main"]


class _QuietEventHandlers(logging.Filter):
    """Drop Kopf's "Handler 'pod_event' succeeded." lines: one per watch event is noise."""

    NAMES = ("ftj_event", "job_event", "pod_event", "workload_event")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        return not any(message == f"Handler {name!r} succeeded." for name in self.NAMES)


class _KueueIsOptional(logging.Filter):
    """Kopf warns at start-up that it cannot watch Kueue's Workloads where Kueue is not
    installed; that is the normal case, so say it as information, in words a user can use."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        only_kueue = message.count("Selector(") == 1 and "kueue.x-k8s.io" in message
        if message.startswith("Unresolved resources") and only_kueue:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = (
                "Kueue is not installed (no workloads.kueue.x-k8s.io API): FineTuneJobs with "
                "a queueName wait for it. After installing Kueue, restart the operator so "
                "that it follows their Workloads too (why they wait, suspend)."
            )
            record.args = ()
        return True


def main(argv: Sequence[str] | None = None) -> int:
    _usage().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as err:
        print(f"kubetune-operator: invalid configuration: {err}", file=sys.stderr)
        return 2
    kopf.configure(
        verbose=settings.log_level == "debug",
        quiet=settings.log_level == "warning",
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
    )
    if settings.log_level != "debug":
        logging.getLogger("kopf.objects").addFilter(_QuietEventHandlers())
    logging.getLogger("kopf._core.reactor.observation").addFilter(_KueueIsOptional())
    health = settings.health_port
    tune_gc()  # after start-up's imports and settings: see gc_tuning.py
    kopf.run(
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        standalone=not settings.peering_name,
        peering_name=settings.peering_name or None,
        priority=settings.effective_priority(),
        liveness_endpoint=f"http://0.0.0.0:{health}/healthz" if health else None,
        memo=kopf.Memo(settings=settings),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
