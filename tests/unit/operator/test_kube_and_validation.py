"""The thin API client's paths and error mapping, and the checks the schema cannot make."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import kopf
import pytest
from ftj_objects import served

from kubetune_operator import kube, manifests, validation
from kubetune_trainer import kubeapi


def test_paths() -> None:
    assert kubeapi.path("v1", "pods", "ns") == "/api/v1/namespaces/ns/pods"
    assert kubeapi.path("batch/v1", "jobs", "ns", "j") == "/apis/batch/v1/namespaces/ns/jobs/j"
    assert (
        kubeapi.path("kubetune.dev/v1alpha1", "finetunejobs", "ns", "x", "status")
        == "/apis/kubetune.dev/v1alpha1/namespaces/ns/finetunejobs/x/status"
    )
    assert (
        kubeapi.path("kopf.dev/v1", "clusterkopfpeerings")
        == "/apis/kopf.dev/v1/clusterkopfpeerings"
    )
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "n"}}
    assert kubeapi.object_path(job) == "/apis/batch/v1/namespaces/n/jobs/j"
    assert kubeapi.object_path(job, collection=True) == "/apis/batch/v1/namespaces/n/jobs"


@pytest.mark.parametrize(
    ("kind", "resource"),
    [
        ("ConfigMap", "configmaps"),
        ("Service", "services"),
        ("Ingress", "ingresses"),
        ("NetworkPolicy", "networkpolicies"),
        ("ClusterKopfPeering", "clusterkopfpeerings"),
        ("FineTuneJob", "finetunejobs"),
    ],
)
def test_resources_follow_the_api_servers_rule_for_kinds(kind: str, resource: str) -> None:
    assert kubeapi.resource_of(kind) == resource


def _error(
    status: int, method: str = "GET", message: str = "nope", retry_after: str | None = None
) -> Exception:
    body = json.dumps({"kind": "Status", "message": message})
    headers = {"Retry-After": retry_after} if retry_after else {}
    return kube._translate(method, "/x", status, body, reason="Reason", headers=headers)


@pytest.mark.parametrize(
    ("status", "method", "expected", "delay"),
    [
        (429, "GET", kopf.TemporaryError, 7.0),
        (503, "PATCH", kopf.TemporaryError, 7.0),
        (403, "POST", kopf.TemporaryError, 60.0),
        (409, "PATCH", kopf.TemporaryError, 1.0),
        (422, "POST", kube.ApiError, None),
        (400, "PATCH", kube.ApiError, None),
    ],
)
def test_errors_steer_retries(
    status: int, method: str, expected: type[Exception], delay: float | None
) -> None:
    err = _error(status, method, "the reason", retry_after="7")
    assert isinstance(err, expected)
    assert "the reason" in str(err)
    if delay is not None:
        assert isinstance(err, kopf.TemporaryError)
        assert err.delay == delay  # Retry-After where the server sends it (429, 5xx)


def test_not_found_and_conflict_are_answers_not_errors() -> None:
    assert isinstance(_error(404), kube._NotFound)
    assert isinstance(_error(409, "POST"), kube._Conflict)
    assert "Reason" in str(kube._translate("GET", "/x", 500, "<html>", reason="Reason"))


def test_valid_spec_has_no_error() -> None:
    assert validation.spec_error(served()) is None


def test_spec_error_names_the_field() -> None:
    ftj = served()
    ftj["spec"]["lora"]["r"] = 0  # as if an older, laxer CRD had let it through
    error = validation.spec_error(ftj)
    assert error is not None and error.startswith("spec.lora.r:")


def test_missing_claims_are_looked_up_by_name() -> None:
    ftj = served(
        dataset={"trainUri": "pvc://data/train.jsonl"},
        output={"uri": "pvc://results/run-1"},
    )
    spec = manifests.parse_spec(ftj)
    asked: list[str] = []

    async def get(path: str) -> Mapping[str, Any] | None:
        asked.append(path)
        return {"kind": "PersistentVolumeClaim"} if path.endswith("/data") else None

    missing = asyncio.run(validation.missing_claims(get, "team-a", spec))
    assert missing == ["results"]
    assert asked == [
        "/api/v1/namespaces/team-a/persistentvolumeclaims/data",
        "/api/v1/namespaces/team-a/persistentvolumeclaims/results",
    ]
    blocker = validation.claims_blocker("team-a", missing)
    assert blocker.reason == "PVCNotFound"
    assert "PersistentVolumeClaim results" in blocker.message
