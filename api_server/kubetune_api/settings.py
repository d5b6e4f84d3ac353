"""The server's configuration: typed, loaded once from KUBETUNE_API_* environment variables.

The chart sets these on the API server's Deployment (the S3 keys come from a Secret as
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); a developer running `kubetune-api` sets them in the
shell. A bad value stops the server at start with a message naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kubetune_trainer.api import DNS_SUBDOMAIN_PATTERN

ENV_PREFIX = "KUBETUNE_API_"
MiB = 1024 * 1024
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
# Key prefix below the bucket: path segments without empty ones, no leading or trailing "/".
PREFIX_PATTERN = r"^([A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*)?$"

Port = Annotated[int, Field(ge=1, le=65535)]


class SettingsError(ValueError):
    """A KUBETUNE_API_* variable has a value the server cannot use; the message names it."""


class ApiSettings(BaseModel):
    """Everything the server is configured with. Field `x` is read from KUBETUNE_API_X."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="0.0.0.0", description="Address to listen on.")
    port: Port = Field(default=8000, description="Port to listen on (plain HTTP).")
    bucket: Annotated[str, Field(pattern=BUCKET_PATTERN)] = Field(
        description=(
            "Bucket holding uploaded files and the outputs of the jobs the API creates (required)."
        )
    )
    prefix: Annotated[str, Field(max_length=512, pattern=PREFIX_PATTERN)] = Field(
        default="openai",
        description=(
            "Key prefix in the bucket: files go to <prefix>/<namespace>/files/, job outputs "
            "to <prefix>/<namespace>/jobs/<job-id>/."
        ),
    )
    storage_endpoint: (
        Annotated[str, Field(max_length=2048, pattern=r"^https?://[^/ ]+(/.*)?$")] | None
    ) = Field(default=None, description="S3 endpoint; unset: AWS S3 for the region.")
    storage_region: str = Field(default="us-east-1", description="S3 region.")
    job_credentials_secret: Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN)] | None = Field(
        default=None,
        description=(
            "Secret (in the caller's namespace) named in spec.storage.credentialsSecretRef of "
            "the FineTuneJobs the API creates. Unset: the operator's default Secret applies."
        ),
    )
    models_file: Path | None = Field(
        default=None,
        description="JSON or YAML list of the base models the API offers (catalogue.py).",
    )
    max_upload_bytes: int = Field(
        default=100 * MiB, ge=1, description="Largest file accepted by POST /v1/files."
    )
    inference_timeout: float = Field(
        default=600.0,
        gt=0,
        le=86400,
        description=(
            "Seconds to wait for a vLLM server's answer to a chat completion or completion: "
            "for the whole answer, or for each next piece of a stream."
        ),
    )
    kubernetes_server: Annotated[str, Field(pattern=r"^https?://[^ ]+$")] | None = Field(
        default=None,
        description=(
            "Kubernetes API server URL. Unset: in a pod, KUBERNETES_SERVICE_HOST/PORT; "
            "elsewhere, the cluster of $KUBECONFIG's current context."
        ),
    )
    kubernetes_ca_file: Path | None = Field(
        default=None,
        description=(
            "CA bundle for the Kubernetes API server. Unset: the pod's ServiceAccount ca.crt, "
            "or the kubeconfig's certificate authority."
        ),
    )
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning"] = "info"

    @field_validator("prefix")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if any(part in {".", ".."} for part in value.split("/")):
            raise ValueError("must not contain '.' or '..' segments")
        return value


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def load_settings(environ: Mapping[str, str] | None = None) -> ApiSettings:
    """Read KUBETUNE_API_* variables; raise SettingsError naming every variable that is wrong."""
    env = os.environ if environ is None else environ
    raw = {
        field: env[env_name(field)]
        for field in ApiSettings.model_fields
        if env.get(env_name(field), "") != ""
    }
    try:
        return ApiSettings.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            name = env_name(str(e["loc"][0])) if e["loc"] else ENV_PREFIX
            problems.append(f"{name}={env.get(name)!r}: {e['msg']}")
        raise SettingsError("; ".join(problems)) from None


def is_dns_label(value: str) -> bool:
    return re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value) is not None and len(value) <= 63
