"""The Helm chart: lint-clean, schema-valid manifests, secure defaults, CRDs identical to crds/.

Uses the real `helm` binary from the local environment (.dev/bin/helm, built by
tests/localenv/build-binaries.sh the first time; tests/conftest.py builds it before the tests run).
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
        subprocess.run(["bash", str(ROOT / "tests/localenv/build-binaries.sh"), "helm"], check=True)
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


API_SERVER = (
    "apiServer.enabled=true",
    "apiServer.storage.bucket=kubetune",
    "trainer.storage.endpoint=http://minio.storage:9000",
    "trainer.storage.credentialsSecretName=s3-credentials",
    "apiServer.models[0].name=llama-8b",
    "apiServer.models[0].uri=s3://models/llama-8b/",
    "apiServer.models[0].spec.resources.gpus=1",
)


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
        API_SERVER,
    ],
    ids=["defaults", "everything-on", "bring-your-own", "api-server"],
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
    (role,) = [
        r for r in by_kind(render(), "ClusterRole") if r["metadata"]["name"] == "rel-kubetune"
    ]
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


# ------------------------------------------------------------------ the OpenAI-compatible API


def test_api_server_is_off_by_default() -> None:
    docs = render()
    assert [d["metadata"]["name"] for d in by_kind(docs, "Deployment")] == ["rel-kubetune"]
    assert not [d for d in docs if d["metadata"]["name"].startswith("rel-kubetune-api")]


def test_api_server_holds_no_kubernetes_credential_and_is_locked_down() -> None:
    docs = render(*API_SERVER)
    (deployment,) = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "rel-kubetune-api"
    ]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels["app.kubernetes.io/component"] == "api"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "rel-kubetune-api"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["kubetune-api"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # Its ServiceAccount is bound to nothing: it acts with its callers' tokens.
    bindings = by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding")
    bound = {s["name"] for b in bindings for s in b.get("subjects", [])}
    assert "rel-kubetune-api" not in bound
    (account,) = [
        a for a in by_kind(docs, "ServiceAccount") if a["metadata"]["name"] == "rel-kubetune-api"
    ]
    assert account["automountServiceAccountToken"] is False
    # Only the cluster CA is mounted, to verify the API server.
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kubernetes-ca"]["configMap"]["name"] == "kube-root-ca.crt"
    (service,) = [
        s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "rel-kubetune-api"
    ]
    assert service["spec"]["selector"] == labels


def test_api_server_values_reach_its_settings() -> None:
    docs = render(*API_SERVER, "apiServer.maxUploadBytes=1048576", "apiServer.port=8123")
    (deployment,) = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "rel-kubetune-api"
    ]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") or e.get("valueFrom") for e in container["env"]}
    assert env["KUBETUNE_API_BUCKET"] == "kubetune"
    assert env["KUBETUNE_API_PREFIX"] == "openai"
    assert env["KUBETUNE_API_STORAGE_ENDPOINT"] == "http://minio.storage:9000"
    assert env["KUBETUNE_API_MAX_UPLOAD_BYTES"] == "1048576"
    assert env["KUBETUNE_API_PORT"] == "8123"
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    }
    (catalogue,) = [
        c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "rel-kubetune-api-models"
    ]
    models = json.loads(catalogue["data"]["models.json"])
    assert models == [{"name": "llama-8b", "uri": "s3://models/llama-8b/",
                       "spec": {"resources": {"gpus": 1}}}]  # fmt: skip
    # The catalogue the chart renders is one the server accepts.
    from kubetune_api.catalogue import parse_catalogue  # noqa: PLC0415

    assert list(parse_catalogue(models)) == ["llama-8b"]


def test_user_role_grants_finetunejobs_to_namespace_editors_and_nothing_else() -> None:
    (role,) = [
        r for r in by_kind(render(), "ClusterRole") if r["metadata"]["name"] == "rel-kubetune-user"
    ]
    labels = role["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"finetunejobs", "finetunejobs/status", "events"}
    verbs = {
        v for rule in role["rules"] if rule["resources"] == ["finetunejobs"] for v in rule["verbs"]
    }
    assert {"create", "get", "list", "patch"} <= verbs
    off = render("userRole.create=false")
    assert not [r for r in by_kind(off, "ClusterRole") if r["metadata"]["name"].endswith("-user")]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("apiServer.enabled=true",), "needs apiServer.storage.bucket"),
        (("apiServer.enabled=true", "apiServer.storage.bucket=Bad_Bucket"), "bucket"),
        (("apiServer.models[0].name=x",), "uri"),
        (("apiServer.models[0].name=ft:x", "apiServer.models[0].uri=hf://a/b"), "name"),
        (("apiServer.logFormat=xml",), "logFormat"),
    ],
)
def test_bad_api_server_values_fail_at_install(sets: tuple[str, ...], message: str) -> None:
    args = [arg for value in sets for arg in ("--set", value)]
    result = helm("template", "rel", str(CHART), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr
