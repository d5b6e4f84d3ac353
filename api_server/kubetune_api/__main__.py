"""`kubetune-api` (or `python -m kubetune_api`): serve the OpenAI-compatible fine-tuning API.

Configured by KUBETUNE_API_* environment variables (settings.py, `--help` lists them) plus the
S3 keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, so the same command runs in the chart's
Deployment and on a workstation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from aiohttp import web

from kubetune_api.app import build_app
from kubetune_api.catalogue import CatalogueError, load_catalogue
from kubetune_api.context import Context
from kubetune_api.identity import Identity
from kubetune_api.kube import Kube, discover
from kubetune_api.objectstore import ObjectStore
from kubetune_api.settings import ApiSettings, SettingsError, env_name, load_settings


def _usage() -> argparse.ArgumentParser:
    lines = []
    for name, field in ApiSettings.model_fields.items():
        default = "required" if field.is_required() else (field.default or "unset")
        lines.append(f"  {env_name(name)} (default: {default})")
        if field.description:
            lines.append(f"      {field.description}")
    return argparse.ArgumentParser(
        prog="kubetune-api",
        description="Serve kubetune's OpenAI-compatible fine-tuning API (files, jobs, events, "
        "checkpoints, models) backed by FineTuneJobs.",
        epilog="environment:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(settings: ApiSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    # botocore logs request details at debug level; keep it at warning whatever ours is.
    logging.getLogger("botocore").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    _usage().parse_args(argv)
    try:
        settings = load_settings()
        models = load_catalogue(settings.models_file)
        endpoint = discover(settings)
    except (SettingsError, CatalogueError, ValueError) as err:
        print(f"kubetune-api: invalid configuration: {err}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    kube = Kube(endpoint)
    context = Context(
        settings=settings,
        kube=kube,
        identity=Identity(kube),
        store=ObjectStore(settings),
        models=models,
        started=int(time.time()),
    )
    logging.getLogger("kubetune_api").info(
        "serving on %s:%d; Kubernetes API %s; %d base model(s): %s",
        settings.host,
        settings.port,
        endpoint.server,
        len(models),
        ", ".join(models) or "none",
    )
    web.run_app(
        build_app(context),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=logging.getLogger("kubetune_api.access"),
        access_log_format='%a "%r" %s %b %Tfs',
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
