"""What the CRD schema cannot check, before the Job is created.

1. The spec parses with the pydantic models. The API server already enforces the same rules
   (the CRD is generated from the models), so this fails only when they drift apart: an older
   CRD installed next to a newer operator, or an object stored before a rule existed. Such a job
   fails for good (phase Failed, reason InvalidSpec) rather than crash-looping a handler.
2. Every PersistentVolumeClaim named by a pvc:// URI exists. A pod that mounts a missing claim
   would only say "unschedulable"; here the job waits as Pending with reason PVCNotFound, and
   the handler retries, because the claim may well be created after the FineTuneJob.

Decision on Secrets: the operator does not read, list or watch Secrets at all, not even to check
that spec.storage.credentialsSecretRef exists; its RBAC has no access to Secrets. The reference
reaches the pod as secretKeyRef environment variables; when the Secret (or a key) is missing the
kubelet keeps the pod waiting with CreateContainerConfigError, which status.py reports as
Pending / CredentialsSecretMissing with the Secret's name and keys. The pod starts by itself once
the Secret exists, so a late Secret needs no action from the operator either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import ValidationError

from kubetune_operator.manifests import parse_spec, pvc_claims
from kubetune_operator.status import Blocker
from kubetune_trainer.api import FineTuneSpec

# Looks an object up by API path; returns None when it does not exist (kube.Kube.get).
Getter = Callable[[str], Awaitable[Mapping[str, Any] | None]]


def checked_spec(ftj: Mapping[str, Any]) -> tuple[FineTuneSpec | None, str | None]:
    """(the parsed spec, None) for a valid spec, else (None, every problem as
    `field.path: message`, joined). One parse serves both the check and the builders."""
    try:
        return parse_spec(ftj), None
    except ValidationError as err:
        return None, "; ".join(
            f"spec.{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in err.errors()
        )


def spec_error(ftj: Mapping[str, Any]) -> str | None:
    """None for a valid spec, else every problem as `field.path: message`, joined."""
    return checked_spec(ftj)[1]


async def missing_claims(get: Getter, namespace: str, spec: FineTuneSpec) -> list[str]:
    """The claims named by pvc:// URIs that do not exist in the namespace (a GET by name each:
    the operator may read PersistentVolumeClaims)."""
    missing = []
    for claim in sorted(pvc_claims(spec)):
        if await get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}") is None:
            missing.append(claim)
    return missing


def claims_blocker(namespace: str, missing: list[str]) -> Blocker:
    names = ", ".join(missing)
    return Blocker(
        reason="PVCNotFound",
        message=(
            f"PersistentVolumeClaim {names} (named by a pvc:// URI) does not exist in namespace "
            f"{namespace}. Create it; the job starts once it exists."
        ),
    )
