"""The trust issue's cases, reproduced as a user would and asserted fixed: the chart installed
(operator.watchNamespaces set), FineTuneJobs applied with kubectl, the real trainer on the
process node, the local S3 server.

1. a credential ending in a newline never reaches status, conditions, Events or logs;
2. a FineTuneJob re-created with the name of a finished one neither resumes its checkpoint nor
   overwrites or republishes its output, unless output.overwrite says so;
3. an output over or inside an input is refused at `kubectl apply`;
4. an unreachable store is retried, then fails with reason StorageUnreachable;
5. a nodeSelector that is not a label is refused at `kubectl apply` (it left the job silent);
6. the operator's ServiceAccount cannot write outside the watched namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e.chart_release import chart_release

from localenv.testing import Cluster, free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
import demo  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
NAMESPACE = "kubetune-trust"
RELEASE = "kubetune-trust"
RELEASE_NAMESPACE = "kubetune-trust-system"
RUN = uuid.uuid4().hex[:8]
OUT = f"s3://kubetune/trust-e2e/{RUN}"
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Iterator[Cluster]:
    """The chart watching NAMESPACE only (its own release, beside the e2e module's)."""
    with chart_release(cluster, release=RELEASE, namespace=NAMESPACE,
                       release_namespace=RELEASE_NAMESPACE, output_prefix=OUT) as installed:  # fmt: skip
        yield installed


def quickstart(name: str, output_uri: str, **spec: Any) -> Obj:
    """examples/quickstart.yaml, short: a few steps, no evaluation, no retries."""
    manifest: Obj = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    manifest["metadata"] = {"name": name}
    manifest["spec"]["output"] = {"uri": output_uri}
    manifest["spec"]["hyperparameters"]["maxSteps"] = 4
    manifest["spec"]["evaluation"] = {"enabled": False}
    manifest["spec"]["maxRetries"] = 0
    for key, value in spec.items():
        current = manifest["spec"].get(key)
        manifest["spec"][key] = {**current, **value} if isinstance(current, dict) else value
    return manifest


def apply(cluster: Cluster, manifest: Obj, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest),
                           check=check)  # fmt: skip


def ftj(cluster: Cluster, name: str) -> Obj:
    return cluster.get("ftj", name, NAMESPACE)


def wait_phase(cluster: Cluster, name: str, *phases: str, timeout: float = 240) -> Obj:
    def done() -> Obj | None:
        status = ftj(cluster, name).get("status") or {}
        return status if status.get("phase") in phases else None

    return wait_until(done, timeout, f"{name} to reach {phases}", interval=1)


def events_json(cluster: Cluster) -> str:
    return cluster.kubectl("get", "events", "-n", NAMESPACE, "-o", "json").stdout


def delete(cluster: Cluster, name: str) -> None:
    cluster.kubectl("delete", "ftj", name, "-n", NAMESPACE, "--wait=true", timeout=120)


def manifest_sums(cluster: Cluster, output: str) -> str:
    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    s3 = demo.assets.s3_client(cluster.s3_env)
    return str(s3.get_object(Bucket=bucket, Key=f"{prefix}/SHA256SUMS")["Body"].read().decode())


def test_a_credential_ending_in_a_newline_never_reaches_status_events_or_logs(
    installed: Cluster,
) -> None:
    cluster = installed
    key_id = cluster.s3_env["AWS_ACCESS_KEY_ID"]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pasted-keys"},
              "stringData": {"AWS_ACCESS_KEY_ID": key_id + "\n",
                             "AWS_SECRET_ACCESS_KEY": cluster.s3_env["AWS_SECRET_ACCESS_KEY"]}}  # fmt: skip
    apply(cluster, secret)
    storage = {"credentialsSecretRef": {"name": "pasted-keys"}}
    apply(cluster, quickstart("pasted", f"{OUT}/pasted", storage=storage))
    status = wait_phase(cluster, "pasted", "Failed", timeout=120)
    assert status["reason"] == "StorageAccessDenied"
    assert "key AWS_ACCESS_KEY_ID of Secret 'pasted-keys'" in status["message"]
    assert "newline" in status["message"]
    logs = cluster.kubectl("logs", "job/pasted-train", "-n", NAMESPACE).stdout
    for where, text in [("status", json.dumps(ftj(cluster, "pasted"))),
                        ("events", events_json(cluster)), ("logs", logs)]:  # fmt: skip
        assert key_id not in text, where


def test_a_recreated_job_neither_resumes_nor_overwrites_the_finished_output(
    installed: Cluster,
) -> None:
    cluster = installed
    output = f"{OUT}/recreated"
    apply(cluster, quickstart("recreated", output))
    wait_phase(cluster, "recreated", "Succeeded")
    first_uid = ftj(cluster, "recreated")["metadata"]["uid"]
    published = manifest_sums(cluster, output)

    # The issue's reproduction: deleted, applied again with other settings.
    delete(cluster, "recreated")
    changed = {"hyperparameters": {"epochs": 1, "learningRate": 0.001}}
    apply(cluster, quickstart("recreated", output, **changed))
    status = wait_phase(cluster, "recreated", "Failed", "Succeeded", timeout=120)
    assert (status["phase"], status["reason"]) == ("Failed", "OutputExists")
    assert f"FineTuneJob {NAMESPACE}/recreated (uid {first_uid})" in status["message"]
    assert "spec.output.overwrite: true" in status["message"]
    assert manifest_sums(cluster, output) == published  # untouched, not republished

    # Told to overwrite, it trains from step 0 and publishes its own model.
    delete(cluster, "recreated")
    overwrite = {**changed, "output": {"uri": output, "overwrite": True}}
    apply(cluster, quickstart("recreated", output, **overwrite))
    status = wait_phase(cluster, "recreated", "Succeeded", "Failed")
    assert status["phase"] == "Succeeded", status
    assert manifest_sums(cluster, output) != published
    logs = cluster.kubectl("logs", "job/recreated-train", "-n", NAMESPACE).stdout
    assert "previous contents deleted (output.overwrite)" in logs and "resuming" not in logs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"output": {"uri": "s3://kubetune/quickstart/model"}},  # the base model, no slash
         "output.uri must not equal, contain or lie inside baseModel.uri"),
        ({"output": {"uri": "s3://kubetune/quickstart/data/chat/train.jsonl/adapter"}},
         "output.uri must not equal, contain or lie inside dataset.trainUri"),
        ({"output": {"uri": "s3://kubetune/quickstart/"}},  # contains every input
         "output.uri must not equal, contain or lie inside baseModel.uri"),
        ({"resources": {"nodeSelector": {"gpu type": "h100"}}},
         "nodeSelector keys must be label keys"),
    ],
)  # fmt: skip
def test_an_output_over_an_input_or_a_bad_label_is_refused_at_apply(
    installed: Cluster, spec: Obj, expected: str
) -> None:
    manifest = quickstart("refused", f"{OUT}/refused", **spec)
    result = apply(installed, manifest, check=False)
    assert result.returncode != 0 and expected in result.stderr, result.stderr
    assert installed.kubectl("get", "ftj", "refused", "-n", NAMESPACE, check=False).returncode


def test_an_unreachable_store_is_retried_then_fails_with_its_own_reason(
    installed: Cluster,
) -> None:
    cluster = installed
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    manifest = quickstart("offline", f"{OUT}/offline", maxRetries=1,
                          storage={"endpoint": endpoint, "retryTimeout": "4s"})  # fmt: skip
    apply(cluster, manifest)
    status = wait_phase(cluster, "offline", "Failed", timeout=240)
    assert status["reason"] == "StorageUnreachable", status
    assert f"cannot reach the S3 endpoint {endpoint}" in status["message"]
    assert "connection refused" in status["message"] and "2 time(s)" in status["message"]
    reasons = [e["reason"] for e in json.loads(events_json(cluster))["items"]
               if e["involvedObject"].get("name") == "offline"]  # fmt: skip
    assert "Retrying" in reasons and "StorageUnreachable" in reasons


def test_the_operator_cannot_write_outside_its_watched_namespace(installed: Cluster) -> None:
    me = f"system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}"

    def can_i(verb: str, resource: str, namespace: str) -> str:
        return installed.kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", me,
                                 check=False).stdout.strip()  # fmt: skip

    assert can_i("create", "jobs", "kube-system") == "no"
    assert can_i("patch", "configmaps", "kube-system") == "no"
    assert can_i("create", "jobs", NAMESPACE) == "yes"
    assert can_i("get", "secrets", NAMESPACE) == "no"
