"""Kueue, the real one, for the tests of FineTuneJobs queued through `spec.queueName`.

Built by build-binaries.sh from the Go module proxy like the control plane (wrapper module
tests/localenv/go/kueue), its CRDs and webhook definitions taken from the same module version
(.dev/kueue/config), the first time a test needs it (`make cluster-up` and `make demo` never
build it). It is not part of the always-on local cluster: a test starts it with `running_kueue`,
which

* installs Kueue's CRDs (server-side apply; they stay, like any CRD),
* runs the controller manager as a host process with admin credentials, only the batch/v1 Job
  integration, its webhook server on a free port with a certificate from the local CA,
* registers Kueue's admission webhooks for Jobs and Kueue objects by URL (there is no Service
  network here), the Job ones limited to namespaces labelled KUEUE_NAMESPACE_LABEL,
* and on the way out deletes those webhook registrations before it stops the process, so
  nothing in the cluster depends on a Kueue that is gone.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from localenv.cluster import PKI, build_binaries, issue_certificate
from localenv.testing import DEV, Cluster, free_ports, wait_until

CONFIG = DEV / "kueue" / "config"
KUEUE_API = "kueue.x-k8s.io/v1beta2"
KUEUE_NAMESPACE_LABEL = "kubetune.dev/kueue"  # value "enabled"
WEBHOOK_PREFIX = "kubetune-test-kueue"
# Kueue objects' webhooks, and the batch/v1 Job ones (the only integration enabled here).
WEBHOOK_GROUPS = {"batch", "kueue.x-k8s.io"}


# Without internal certificate management Kueue 0.17 reads its metrics certificate from a fixed
# path, /etc/kueue/metrics/certs, which its Deployment mounts from a Secret. A private mount
# namespace gives the process the same view (a small tmpfs on /etc holding only that directory)
# without touching the host's /etc; the user namespace makes that possible without root.
POD_VIEW = [
    "unshare", "--user", "--map-root-user", "--mount", "sh", "-ec",
    'mount -t tmpfs -o size=1m kueue-etc /etc; mkdir -p /etc/kueue/metrics/certs;'
    ' cp "$1"/tls.crt "$1"/tls.key /etc/kueue/metrics/certs/; shift; exec "$@"',
    "kueue-pod-view",
]  # fmt: skip


@dataclass
class Kueue:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _serving_cert(workdir: Path) -> Path:
    """tls.crt/tls.key for 127.0.0.1, as controller-runtime's webhook server reads them."""
    if not (PKI / "kueue-webhook.crt").exists():
        issue_certificate("kueue-webhook", "/CN=kueue-webhook", "IP:127.0.0.1", server=True)
    certs = workdir / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    (certs / "tls.crt").write_bytes((PKI / "kueue-webhook.crt").read_bytes())
    (certs / "tls.key").write_bytes((PKI / "kueue-webhook.key").read_bytes())
    return certs


def _configuration(certs: Path, webhook_port: int, health_port: int) -> dict[str, Any]:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": "kube-system",  # only for objects Kueue itself would create there
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},  # off
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": str(certs)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
    }


def _webhooks(webhook_port: int) -> list[dict[str, Any]]:
    """Kueue's own webhook configurations, reduced to WEBHOOK_GROUPS and pointed at the port."""
    ca_bundle = base64.b64encode((PKI / "ca.crt").read_bytes()).decode()
    docs = [d for d in yaml.safe_load_all((CONFIG / "manifests.yaml").read_text()) if d]
    out = []
    for doc in docs:
        kept = []
        for hook in doc["webhooks"]:
            groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
            if not groups <= WEBHOOK_GROUPS:
                continue
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{webhook_port}{path}",
                "caBundle": ca_bundle,
            }
            if "batch" in groups:
                hook["namespaceSelector"] = {"matchLabels": {KUEUE_NAMESPACE_LABEL: "enabled"}}
            hook["timeoutSeconds"] = 10
            kept.append(hook)
        name = f"{WEBHOOK_PREFIX}-{doc['kind'].removesuffix('WebhookConfiguration').lower()}"
        out.append({**doc, "metadata": {"name": name}, "webhooks": kept})
    return out


def _ready(health_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=2) as r:
            return int(r.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def running_kueue(cluster: Cluster, workdir: Path, timeout: float = 120) -> Iterator[Kueue]:
    build_binaries("kueue")  # the first time only: ~5 min on 2 quiet cores (tests/conftest.py)
    workdir.mkdir(parents=True, exist_ok=True)
    crds = sorted(str(p) for p in CONFIG.glob("kueue.x-k8s.io_*.yaml"))
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", *[a for p in crds for a in ("-f", p)]
    )
    for crd in ("clusterqueues", "localqueues", "resourceflavors", "workloads"):
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{crd}.kueue.x-k8s.io", "--timeout=60s"
        )
    webhook_port, health_port = free_ports(2)
    config = workdir / "kueue-config.yaml"
    certs = _serving_cert(workdir)
    config.write_text(yaml.safe_dump(_configuration(certs, webhook_port, health_port)))
    log_path = workdir / "kueue.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*POD_VIEW, str(certs), str(cluster.bin / "kueue"), f"--config={config}",
             f"--kubeconfig={cluster.kubeconfig}", "--feature-gates=VisibilityOnDemand=false"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    kueue = Kueue(process, log_path)
    hooks = _webhooks(webhook_port)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"kueue exited ({process.returncode}):\n{kueue.log_tail()}")
            return _ready(health_port)

        wait_until(ready, timeout, "Kueue to be ready")
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": hooks}),
        )
        yield kueue
    finally:
        for hook in hooks:
            cluster.kubectl("delete", hook["kind"].lower(), hook["metadata"]["name"],
                            "--ignore-not-found", check=False)  # fmt: skip
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
