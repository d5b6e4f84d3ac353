"""The Helm chart: lint-clean, schema-valid manifests, secure defaults, CRDs identical to crds/.

Uses the real `helm` binary from the local environment (.dev/bin/helm, built by
tests/localenv/build-binaries.sh; `make test` builds it before the tests run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "kubetune"
HELM = ROOT / ".dev" / "bin" / "helm"
KUBE_VERSION = "1.36"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        subprocess.run(["bash", str(ROOT / "tests/localenv/build-binaries.sh")], check=True)
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stderr}")
    return result


def render(*sets: str) -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHART), "--namespace", "kubetune-system"]
    for value in sets:
        args += ["--set", value]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "charts/generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_helm_lint_is_clean() -> None:
    out = helm("lint", "--strict", str(CHART)).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    "sets",
    [
        (),
        (
            "replicaCount=2",
            "podDisruptionBudget.enabled=true",
            "metrics.serviceMonitor.enabled=true",
            "operator.watchNamespaces={team-a,team-b}",
            "image.digest=sha256:" + "a" * 64,
        ),
        ("crds.enabled=false", "rbac.create=false", "serviceAccount.create=false",
         "serviceAccount.name=existing"),
    ],
    ids=["defaults", "everything-on", "bring-your-own"],
)  # fmt: skip
def test_rendered_manifests_validate_against_kubernetes_schemas(sets: tuple[str, ...]) -> None:
    docs = render(*sets)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # not a Kubernetes API (Prometheus Operator CRD)
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_chart_crds_are_exactly_the_crds_in_the_repository() -> None:
    chart = {d["metadata"]["name"]: d for d in by_kind(render(), "CustomResourceDefinition")}
    source = {
        d["metadata"]["name"]: d
        for path in sorted((ROOT / "crds").glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d
    }
    assert chart.keys() == source.keys()
    for name, crd in chart.items():
        assert crd["spec"] == source[name]["spec"], name
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_operator_pod_is_locked_down_by_default() -> None:
    (deployment,) = by_kind(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == "ghcr.io/kubetune/operator:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer:0.1.0"


def test_operator_rbac_never_touches_secrets_or_deletes() -> None:
    (role,) = by_kind(render(), "ClusterRole")
    for rule in role["rules"]:
        assert "secrets" not in rule["resources"]
        assert "*" not in rule["verbs"] and "delete" not in rule["verbs"]


def test_values_reach_the_operator_settings() -> None:
    docs = render(
        "trainer.storage.endpoint=http://minio.storage:9000",
        "trainer.gpuResourceName=amd.com/gpu",
        "trainer.storage.credentialsSecretName=team-s3",
        "operator.watchNamespaces={a,b}",
        "trainer.image.digest=sha256:" + "b" * 64,
    )
    (deployment,) = by_kind(docs, "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["KUBETUNE_DEFAULT_STORAGE_ENDPOINT"] == "http://minio.storage:9000"
    assert env["KUBETUNE_DEFAULT_GPU_RESOURCE_NAME"] == "amd.com/gpu"
    assert env["KUBETUNE_NAMESPACES"] == "a,b"
    assert env["KUBETUNE_DEFAULT_CREDENTIALS_SECRET"] == "team-s3"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/trainer@sha256:" + "b" * 64


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replicaCount=many", "replicaCount"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("operator.logFormat=xml", "logFormat"),
        ("operator.metricsPort=70000", "metricsPort"),
        ("trainer.storage.endpoint=minio:9000", "endpoint"),
        ("image.digest=latest", "digest"),
        ("operatr.logLevel=debug", "operatr"),
    ],
)
def test_bad_values_fail_at_install(value: str, message: str) -> None:
    result = helm("template", "rel", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_impossible_combinations_fail_with_a_clear_message() -> None:
    result = helm("template", "rel", str(CHART), "--set", "replicaCount=2",
                  "--set", "operator.peeringName=", check=False)  # fmt: skip
    assert "needs operator.peeringName" in result.stderr
    result = helm("template", "rel", str(CHART), "--set", "metrics.serviceMonitor.enabled=true",
                  "--set", "metrics.service.enabled=false", check=False)  # fmt: skip
    assert "needs metrics.service.enabled" in result.stderr


def test_values_schema_documents_every_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], path: str) -> None:
        for key, child in node.get("properties", {}).items():
            here = f"{path}.{key}".lstrip(".")
            if "properties" in child:
                walk(child, here)
            else:
                assert child.get("description"), f"{here} has no `# --` comment in values.yaml"

    walk(schema, "")
