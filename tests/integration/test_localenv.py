"""The local environment is real: scheduler, Job controller, GC, RBAC, PodSecurity, S3.

Pods run on the process node (the one fake: a kubelet stand-in running pods as processes).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from localenv.testing import Cluster, wait_until

pytestmark = pytest.mark.cluster

NODE = "kubetune-node-0"


def job(name: str, script: str, **pod_spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "python:3.11-slim",
        "command": ["python", "-c", script],
        **pod_spec.pop("container", {}),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": pod_spec.pop("backoffLimit", 0),
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [container], **pod_spec},
            },
        },
    }


def job_condition(cluster: Cluster, name: str, namespace: str) -> dict[str, Any] | None:
    conditions = cluster.get("job", name, namespace).get("status", {}).get("conditions", [])
    done = [c for c in conditions if c["type"] in ("Complete", "Failed") and c["status"] == "True"]
    return done[0] if done else None


def only_pod(cluster: Cluster, namespace: str, selector: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    pods = json.loads(out)["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return dict(pods[0])


def test_control_plane_reports_real_versions(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    assert version["serverVersion"]["gitVersion"] != "v0.0.0-master"
    helm = os.popen(f"{cluster.bin / 'helm'} version --short").read()
    assert helm.startswith("v3."), helm


def test_process_node_advertises_gpus(cluster: Cluster) -> None:
    node = cluster.get("node", NODE)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["kubetune.dev/fake-node"] == "process-node"
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "True"


def test_job_pod_is_scheduled_runs_and_completes(cluster: Cluster, namespace: str) -> None:
    script = "import os; print('hello from', os.environ['HOSTNAME'])"
    manifest = job("hello", script, container={"resources": {"limits": {"nvidia.com/gpu": "2"}}})
    cluster.apply(manifest, namespace)
    done = wait_until(lambda: job_condition(cluster, "hello", namespace), 60, "Job hello to finish")
    assert done["type"] == "Complete"
    pod = only_pod(cluster, namespace, "job-name=hello")
    assert pod["spec"]["nodeName"] == NODE  # bound by the real scheduler
    scheduled = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert scheduled[0]["status"] == "True"
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    reasons = {
        (e["reason"], e["source"].get("component", e.get("reportingComponent")))
        for e in json.loads(events)["items"]
    }
    assert ("Scheduled", "default-scheduler") in reasons
    assert ("SuccessfulCreate", "job-controller") in reasons
    state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (state["exitCode"], state["reason"]) == (0, "Completed")
    logs = cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout
    assert logs.strip() == f"hello from {pod['metadata']['name']}"


def test_failing_job_carries_exit_code_and_termination_message(
    cluster: Cluster, namespace: str
) -> None:
    script = (
        "import sys; open('/dev/termination-log', 'w').write('bad data: line 7');"
        "print('about to fail'); sys.exit(3)"
    )
    cluster.apply(job("fails", script), namespace)
    done = wait_until(lambda: job_condition(cluster, "fails", namespace), 60, "Job fails to fail")
    assert (done["type"], done["reason"]) == ("Failed", "BackoffLimitExceeded")
    pod = only_pod(cluster, namespace, "job-name=fails")
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert terminated["message"] == "bad data: line 7"


def test_fallback_to_logs_on_error(cluster: Cluster, namespace: str) -> None:
    script = "import sys; print('Traceback: boom'); sys.exit(1)"
    container = {"terminationMessagePolicy": "FallbackToLogsOnError"}
    cluster.apply(job("logs", script, container=container), namespace)
    wait_until(lambda: job_condition(cluster, "logs", namespace), 60, "Job logs to fail")
    pod = only_pod(cluster, namespace, "job-name=logs")
    assert (
        pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "Traceback: boom"
    )


def test_env_sources_and_volumes_are_materialised(cluster: Cluster, namespace: str) -> None:
    cluster.apply(
        [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
             "data": {"mode": "fast", "config.json": '{"epochs": 3}'}},
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
             "stringData": {"AWS_ACCESS_KEY_ID": "key-id", "token": "s3cr3t"}},
        ],
        namespace,
    )  # fmt: skip
    script = """
import json, os, pathlib
sa = pathlib.Path('/var/run/secrets/kubernetes.io/serviceaccount')
pathlib.Path('/scratch/x').write_text('ok')
result = {
    'env': {k: os.environ.get(k) for k in ('MODE', 'KEY', 'POD', 'NS', 'LABEL', 'CFG_mode', 'EXPANDED')},
    'config': pathlib.Path('/etc/settings/config.json').read_text(),
    'secret': pathlib.Path('/etc/creds/token').read_text(),
    'scratch': pathlib.Path('/scratch/x').read_text(),
    'sa_namespace': (sa / 'namespace').read_text(),
    'sa_token_parts': len((sa / 'token').read_text().split('.')),
    'sa_ca': (sa / 'ca.crt').read_text().startswith('-----BEGIN CERTIFICATE-----'),
}
open('/dev/termination-log', 'w').write(json.dumps(result))
"""
    pod_spec = {
        "container": {
            "env": [
                {
                    "name": "MODE",
                    "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}},
                },
                {
                    "name": "KEY",
                    "valueFrom": {"secretKeyRef": {"name": "creds", "key": "AWS_ACCESS_KEY_ID"}},
                },
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {
                    "name": "LABEL",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['job-name']"}},
                },
                {"name": "EXPANDED", "value": "$(MODE)-$(POD)"},
            ],
            "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "settings"}}],
            "volumeMounts": [
                {"name": "settings", "mountPath": "/etc/settings", "readOnly": True},
                {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                {"name": "scratch", "mountPath": "/scratch"},
            ],
        },
        "volumes": [
            {"name": "settings", "configMap": {"name": "settings"}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    cluster.apply(job("env", script, **pod_spec), namespace)
    done = wait_until(lambda: job_condition(cluster, "env", namespace), 60, "Job env to finish")
    pod = only_pod(cluster, namespace, "job-name=env")
    message = pod["status"]["containerStatuses"][0]["state"]["terminated"].get("message", "")
    assert done["type"] == "Complete", message
    result = json.loads(message)
    name = pod["metadata"]["name"]
    assert result["env"] == {
        "MODE": "fast", "KEY": "key-id", "POD": name, "NS": namespace, "LABEL": "env",
        "CFG_mode": "fast", "EXPANDED": f"fast-{name}",
    }  # fmt: skip
    assert result["config"] == '{"epochs": 3}'
    assert result["secret"] == "s3cr3t"
    assert result["scratch"] == "ok"
    assert result["sa_namespace"] == namespace
    assert result["sa_token_parts"] == 3  # a JWT from the TokenRequest API
    assert result["sa_ca"] is True


def test_missing_secret_keeps_pod_pending_with_config_error(
    cluster: Cluster, namespace: str
) -> None:
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    cluster.apply(job("nosecret", "print(1)", container={"env": env}), namespace)

    def waiting_reason() -> str | None:
        out = cluster.kubectl(
            "get", "pods", "-n", namespace, "-l", "job-name=nosecret", "-o", "json"
        )
        for pod in json.loads(out.stdout)["items"]:
            for status in pod.get("status", {}).get("containerStatuses", []):
                reason = status["state"].get("waiting", {}).get("reason")
                if reason:
                    return f"{pod['status']['phase']}/{reason}/{status['state']['waiting'].get('message')}"
        return None

    seen = wait_until(waiting_reason, 60, "CreateContainerConfigError")
    assert seen == 'Pending/CreateContainerConfigError/secret "absent" not found'


def test_service_account_token_reaches_api_and_rbac_denies_the_rest(
    cluster: Cluster, namespace: str
) -> None:
    cluster.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reporter"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "allowed"}, "data": {"a": "1"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}, "data": {"b": "2"}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "one-cm"},
             "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["allowed"],
                        "verbs": ["get"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "one-cm"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "one-cm"},
             "subjects": [{"kind": "ServiceAccount", "name": "reporter", "namespace": namespace}]},
        ],
        namespace,
    )  # fmt: skip
    script = """
import json, os, ssl, urllib.request, urllib.error
sa = '/var/run/secrets/kubernetes.io/serviceaccount'
token = open(sa + '/token').read()
ns = open(sa + '/namespace').read()
ctx = ssl.create_default_context(cafile=sa + '/ca.crt')
base = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
codes = {}
for path in (f'configmaps/allowed', f'configmaps/other', 'secrets'):
    request = urllib.request.Request(f'{base}/api/v1/namespaces/{ns}/{path}',
                                     headers={'Authorization': 'Bearer ' + token})
    try:
        codes[path] = urllib.request.urlopen(request, context=ctx).status
    except urllib.error.HTTPError as err:
        codes[path] = err.code
open('/dev/termination-log', 'w').write(json.dumps(codes))
"""
    cluster.apply(job("token", script, serviceAccountName="reporter"), namespace)
    wait_until(lambda: job_condition(cluster, "token", namespace), 60, "Job token to finish")
    pod = only_pod(cluster, namespace, "job-name=token")
    codes = json.loads(pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert codes == {"configmaps/allowed": 200, "configmaps/other": 403, "secrets": 403}


def test_deleting_a_job_garbage_collects_its_pods(cluster: Cluster, namespace: str) -> None:
    cluster.apply(job("sleeper", "import time; time.sleep(600)"), namespace)

    def running() -> bool:
        pod = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)[
            "items"
        ]
        return bool(pod) and pod[0].get("status", {}).get("phase") == "Running"

    wait_until(running, 60, "the sleeper pod to run")
    pod = only_pod(cluster, namespace, "job-name=sleeper")
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Job"
    cluster.kubectl(
        "delete", "job", "sleeper", "-n", namespace, "--cascade=background", "--wait=false"
    )

    def no_pods() -> bool:
        out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
        return not json.loads(out)["items"]

    wait_until(no_pods, 90, "the garbage collector to delete the Job's pods")


def test_deleting_a_running_pod_sends_sigterm(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    marker = tmp_path / "signal"
    script = """
import signal, sys, time
def on_term(signum, frame):
    open('/out/signal', 'w').write(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open('/out/started', 'w').write('yes')
time.sleep(600)
"""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "graceful"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 20,
            "containers": [{"name": "main", "image": "python", "command": ["python", "-c", script],
                            "volumeMounts": [{"name": "out", "mountPath": "/out"}]}],
            "volumes": [{"name": "out", "hostPath": {"path": str(tmp_path)}}],
        },
    }  # fmt: skip
    cluster.apply(pod, namespace)
    wait_until((tmp_path / "started").exists, 60, "the pod to start")
    started = time.monotonic()
    cluster.kubectl("delete", "pod", "graceful", "-n", namespace, "--wait=true", timeout=60)
    assert marker.read_text() == "SIGTERM"
    assert time.monotonic() - started < 15  # it exited on SIGTERM, not on the 20 s SIGKILL


def test_memory_limit_is_enforced_as_oomkilled(cluster: Cluster, namespace: str) -> None:
    script = "import time; blob = bytearray(400 * 2**20); blob[::4096] = b'x' * (400 * 256); time.sleep(60)"
    container = {"resources": {"limits": {"memory": "128Mi"}}}
    cluster.apply(job("hungry", script, container=container), namespace)
    wait_until(lambda: job_condition(cluster, "hungry", namespace), 60, "Job hungry to fail")
    pod = only_pod(cluster, namespace, "job-name=hungry")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)


def test_unsatisfiable_gpu_request_is_unschedulable(cluster: Cluster, namespace: str) -> None:
    container = {"resources": {"limits": {"nvidia.com/gpu": "64"}}}
    cluster.apply(job("toobig", "print(1)", container=container), namespace)

    def unschedulable() -> str | None:
        out = cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=toobig", "-o", "json")
        for pod in json.loads(out.stdout)["items"]:
            for cond in pod.get("status", {}).get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return str(cond["message"])
        return None

    message = wait_until(unschedulable, 60, "the scheduler to give up on 64 GPUs")
    assert "Insufficient nvidia.com/gpu" in message


def test_restricted_namespace_rejects_privileged_pod(cluster: Cluster) -> None:
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    with cluster.namespace(labels) as namespace:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "root"},
            "spec": {"containers": [{"name": "main", "image": "python", "command": ["true"],
                                     "securityContext": {"privileged": True}}]},
        }  # fmt: skip
        result = cluster.kubectl(
            "apply", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False
        )
        assert result.returncode != 0
        assert 'violates PodSecurity "restricted:latest"' in result.stderr
        assert "privileged" in result.stderr


def test_s3_multipart_upload_listing_and_ranged_get(cluster: Cluster) -> None:
    env = cluster.s3_env
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    bucket = env["KUBETUNE_S3_BUCKET"]
    prefix = f"tests/{os.getpid()}-{time.time_ns()}/"
    data = os.urandom(70 * 2**20)  # over 64 MiB, in 8 MiB parts
    body = prefix + "big.bin"
    config = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20)
    s3.upload_fileobj(io.BytesIO(data), bucket, body, Config=config)
    head = s3.head_object(Bucket=bucket, Key=body)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-9")  # a real multipart upload: 9 parts
    s3.put_object(Bucket=bucket, Key=prefix + "small.txt", Body=b"hello")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        prefix + "big.bin",
        prefix + "small.txt",
    ]
    start, end = 10 * 2**20 - 5, 10 * 2**20 + 5
    part = s3.get_object(Bucket=bucket, Key=body, Range=f"bytes={start}-{end}")["Body"].read()
    assert part == data[start : end + 1]
    whole = s3.get_object(Bucket=bucket, Key=body)["Body"].read()
    assert hashlib.sha256(whole).digest() == hashlib.sha256(data).digest()
    s3.delete_objects(
        Bucket=bucket,
        Delete={"Objects": [{"Key": prefix + "big.bin"}, {"Key": prefix + "small.txt"}]},
    )


def test_volume_over_the_directory_holding_the_repository(cluster: Cluster, namespace: str) -> None:
    # An emptyDir at /tmp hides a checkout that lives under /tmp (as CI's clones do); mounting
    # over the repository's parent directory reproduces that wherever the checkout is.
    hidden = str(Path(__file__).resolve().parents[2].parent)
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
                   "data": {"x": "visible"}}, namespace)  # fmt: skip
    script = "open('/dev/termination-log', 'w').write(open('/etc/cfg/x').read())"
    pod_spec = {
        "container": {"volumeMounts": [{"name": "scratch", "mountPath": hidden},
                                       {"name": "cfg", "mountPath": "/etc/cfg"}]},
        "volumes": [{"name": "scratch", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "cfg"}}],
    }  # fmt: skip
    cluster.apply(job("shadow", script, **pod_spec), namespace)
    done = wait_until(lambda: job_condition(cluster, "shadow", namespace), 60, "Job shadow")
    pod = only_pod(cluster, namespace, "job-name=shadow")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert done["type"] == "Complete", terminated.get("message")
    assert terminated["message"] == "visible"


def test_an_indexed_jobs_pods_find_each_other_under_their_headless_service(
    cluster: Cluster, namespace: str
) -> None:
    """What a multi-node FineTuneJob's torchrun rendezvous needs: <job>-<index>.<service>
    resolves for every pod of the gang (the process node's managed /etc/hosts)."""
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "workers"},
               "spec": {"clusterIP": "None", "selector": {"job-name": "gang"}}}  # fmt: skip
    script = (
        "import os, socket, time\n"
        "for i in (0, 1):\n"
        "    for _ in range(100):\n"
        "        try:\n"
        "            print(f'gang-{i}.workers', socket.gethostbyname(f'gang-{i}.workers'))\n"
        "            break\n"
        "        except OSError:\n"
        "            time.sleep(0.2)\n"
        "    else:\n"
        "        raise SystemExit(f'gang-{i}.workers does not resolve')\n"
        "print('HOSTNAME', os.environ['HOSTNAME'])\n"
    )
    manifest = job("gang", script, subdomain="workers")
    manifest["spec"].update(completionMode="Indexed", completions=2, parallelism=2)
    cluster.apply([service, manifest], namespace)
    done = wait_until(lambda: job_condition(cluster, "gang", namespace), 90, "Job gang to finish")
    assert done["type"] == "Complete", done
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=gang",
                                      "-o", "json").stdout)["items"]  # fmt: skip
    for pod in pods:
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        logs = cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout
        assert "gang-0.workers 127.0.0.1" in logs and "gang-1.workers 127.0.0.1" in logs
        assert f"HOSTNAME gang-{index}" in logs
