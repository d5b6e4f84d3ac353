"""The chart's permissions and admission policy, on the real API server (no operator running).

- RBAC: with operator.watchNamespaces the operator's ServiceAccount may write in those
  namespaces only (`kubectl auth can-i`, as the API server's authorizer answers it); without, it
  may act cluster-wide, but never on Secrets and never delete.
- admissionPolicy: a ValidatingAdmissionPolicy that lets a namespace's FineTuneJobs name only
  the listed images, endpoints and Secrets, and no trustRemoteCode.
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from unit.operator.invalid_manifests import VALID_MANIFEST

from localenv.testing import ROOT, Cluster, wait_until

pytestmark = pytest.mark.cluster

CHART = ROOT / "charts" / "kubetune"
Obj = dict[str, Any]


def render(cluster: Cluster, release: str, namespace: str, *sets: str, only: str) -> list[Obj]:
    args = [str(cluster.bin / "helm"), "template", release, str(CHART), "--namespace", namespace,
            "--show-only", only]  # fmt: skip
    for value in sets:
        args += ["--set", value]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def can_i(cluster: Cluster, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    where = ["-n", namespace] if namespace else ["--all-namespaces"]
    result = cluster.kubectl("auth", "can-i", verb, resource, *where, "--as", who, check=False)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


@pytest.fixture
def namespaces(cluster: Cluster) -> Iterator[tuple[str, str, str]]:
    """(release namespace, a watched namespace, an unwatched one)."""
    with (
        cluster.namespace() as release,
        cluster.namespace() as watched,
        cluster.namespace() as other,
    ):
        yield release, watched, other


def test_with_watch_namespaces_the_operator_can_write_only_there(
    cluster: Cluster, namespaces: tuple[str, str, str]
) -> None:
    release_ns, watched, other = namespaces
    release = f"rbac-{uuid.uuid4().hex[:6]}"
    docs = render(cluster, release, release_ns, f"operator.watchNamespaces={{{watched}}}",
                  only="templates/rbac.yaml")  # fmt: skip
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    for doc in docs:
        cluster.apply(doc, doc["metadata"]["namespace"])
    account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    me = f"system:serviceaccount:{release_ns}:{account}"

    # The issue's reproduction: both answered yes through a ClusterRoleBinding.
    assert not can_i(cluster, me, "create", "jobs", "kube-system")
    assert not can_i(cluster, me, "patch", "configmaps", "kube-system")
    for namespace in (other, release_ns):
        assert not can_i(cluster, me, "create", "jobs", namespace)
        assert not can_i(cluster, me, "list", "finetunejobs.kubetune.dev", namespace)
    assert not can_i(cluster, me, "list", "finetunejobs.kubetune.dev", None)
    # What it needs, where it works...
    for verb, resource in [("create", "jobs"), ("patch", "jobs"), ("watch", "pods"),
                           ("create", "configmaps"), ("patch", "finetunejobs.kubetune.dev/status"),
                           ("create", "roles"), ("list", "events"), ("create", "kopfpeerings.kopf.dev")]:  # fmt: skip
        assert can_i(cluster, me, verb, resource, watched), (verb, resource)
    # ...and never Secrets, never delete, even there.
    assert not can_i(cluster, me, "get", "secrets", watched)
    assert not can_i(cluster, me, "delete", "jobs", watched)


def test_cluster_wide_the_operator_still_never_reads_secrets_or_deletes(
    cluster: Cluster, namespaces: tuple[str, str, str]
) -> None:
    release_ns, _, other = namespaces
    release = f"rbac-{uuid.uuid4().hex[:6]}"
    docs = render(cluster, release, release_ns, only="templates/rbac.yaml")
    try:
        for doc in docs:
            cluster.apply(doc, release_ns)
        account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
        me = f"system:serviceaccount:{release_ns}:{account}"
        assert can_i(cluster, me, "create", "jobs", other)
        assert not can_i(cluster, me, "get", "secrets", other)
        assert not can_i(cluster, me, "delete", "finetunejobs.kubetune.dev", other)
        assert not can_i(cluster, me, "list", "namespaces", None)
    finally:
        cluster.kubectl("delete", "clusterrole,clusterrolebinding", "-l",
                        f"app.kubernetes.io/instance={release}", check=False)  # fmt: skip


# ------------------------------------------------------------------------ admission policy


def ftj(name: str, **spec: Any) -> Obj:
    manifest = copy.deepcopy(VALID_MANIFEST)
    manifest["metadata"] = {"name": name}
    for key, value in spec.items():
        manifest["spec"][key] = {**manifest["spec"].get(key, {}), **value} if isinstance(
            value, dict) else value  # fmt: skip
    return manifest


def dry_run(cluster: Cluster, namespace: str, manifest: Obj) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                           input=json.dumps(manifest), check=False)  # fmt: skip


def test_the_admission_policy_allows_only_listed_images_endpoints_and_secrets(
    cluster: Cluster, namespaces: tuple[str, str, str]
) -> None:
    release_ns, governed, free = namespaces
    release = f"vap-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    cluster.kubectl("label", "namespace", governed, f"kubetune.dev/policy={release}")
    docs = render(
        cluster, release, release_ns,
        "admissionPolicy.enabled=true",
        "admissionPolicy.allowedImagePrefixes={registry.example.com/kubetune/}",
        "admissionPolicy.allowedEndpoints={http://minio.storage:9000}",
        "admissionPolicy.allowedCredentialsSecrets={s3-credentials}",
        f"admissionPolicy.namespaceSelector.matchLabels.kubetune\\.dev/policy={release}",
        only="templates/admission-policy.yaml",
    )  # fmt: skip
    assert [d["kind"] for d in docs] == [
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                          "items": docs}))  # fmt: skip
    policy = docs[0]["metadata"]["name"]
    try:
        denied_image = ftj("image", image="docker.io/someone/trainer:latest")
        # The policy is compiled and reaches the admission chain within moments.
        wait_until(lambda: dry_run(cluster, governed, denied_image).returncode != 0, 30,
                   "the policy to refuse an unlisted image")  # fmt: skip
        checked = cluster.get("validatingadmissionpolicy", policy)
        assert not (checked.get("status", {}).get("typeChecking") or {}).get("expressionWarnings")

        refused = {
            "spec.image docker.io/someone/trainer:latest is not allowed in this cluster: use an "
            "image starting with registry.example.com/kubetune/": denied_image,
            "spec.storage.endpoint http://evil.example:9000 is not allowed": ftj(
                "endpoint", storage={"endpoint": "http://evil.example:9000"}),
            "spec.storage.credentialsSecretRef.name admin-keys is not allowed": ftj(
                "secret", storage={"credentialsSecretRef": {"name": "admin-keys"}}),
            "spec.baseModel.trustRemoteCode is not allowed": ftj(
                "remote-code", baseModel={"uri": "s3://models/x", "trustRemoteCode": True}),
        }  # fmt: skip
        for expected, manifest in refused.items():
            result = dry_run(cluster, governed, manifest)
            assert result.returncode != 0 and expected in result.stderr, result.stderr
        allowed = [
            ftj("defaults"),  # nothing named: the chart's defaults apply
            ftj("listed", image="registry.example.com/kubetune/trainer:0.1.0",
                storage={"endpoint": "http://minio.storage:9000",
                         "credentialsSecretRef": {"name": "s3-credentials"}}),
        ]  # fmt: skip
        for manifest in allowed:
            result = dry_run(cluster, governed, manifest)
            assert result.returncode == 0, result.stderr
        # Namespaces outside the selector are not governed.
        assert dry_run(cluster, free, denied_image).returncode == 0
    finally:
        cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                        policy, check=False)  # fmt: skip
