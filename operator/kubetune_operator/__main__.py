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

    NAMES = ("ftj_event", "job_event", "pod_event")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        return not any(message == f"Handler {name!r} succeeded." for name in self.NAMES)


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
    health = settings.health_port
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
