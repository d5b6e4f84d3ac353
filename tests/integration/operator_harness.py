"""Running kubetune-operator against the local cluster the way the chart deploys it.

- `install_operator_identity`: the chart's RBAC (rendered by `helm template`) applied to a fresh
  namespace, and a kubeconfig holding a token of the chart's ServiceAccount, so the operator runs
  with exactly the permissions it ships with, never as admin;
- `OperatorProcess`: one `kubetune-operator` replica as a subprocess (JSON logs to a file), which
  a test can kill -9 and restart like a crashed pod;
- `PhaseLog`: every phase/reason a FineTuneJob goes through, from a `kubectl get -w` stream, so
  short-lived phases are not missed by polling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localenv.testing import ROOT, Cluster, wait_until

CHART = ROOT / "charts" / "kubetune"
CRDS = ROOT / "crds"
FAKE_TRAINER = ROOT / "tests" / "integration" / "fake_trainer.py"
OPERATOR_BIN = Path(sys.executable).parent / "kubetune-operator"
# Short peering lifetime: a replica killed with -9 is replaced within seconds, not a minute.
PEERING_LIFETIME = 6


@dataclass(frozen=True)
class OperatorIdentity:
    namespace: str
    service_account: str
    kubeconfig: Path
    release: str


def install_crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/finetunejobs.kubetune.dev", "crd/kopfpeerings.kopf.dev",
        "crd/clusterkopfpeerings.kopf.dev",
    )  # fmt: skip


def render_rbac(
    cluster: Cluster,
    release: str,
    namespace: str,
    watch: Sequence[str] = (),
    template: str = "templates/rbac.yaml",
) -> list[dict[str, Any]]:
    """A template of the chart (its RBAC by default): cluster-wide, or for the watched
    namespaces."""
    args = ["--set", f"operator.watchNamespaces={{{','.join(watch)}}}"] if watch else []
    rendered = subprocess.run(
        [str(cluster.bin / "helm"), "template", release, str(CHART), "--namespace", namespace,
         "--show-only", template, *args],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(rendered) if d]


@contextmanager
def install_operator_identity(
    cluster: Cluster, workdir: Path, *, clusterwide: bool = True
) -> Iterator[OperatorIdentity]:
    """The chart's ServiceAccount and, when `clusterwide`, its ClusterRole and binding (else
    no rights yet: grant_operator gives it the chart's Role in each watched namespace); a
    kubeconfig with the ServiceAccount's token."""
    with cluster.namespace() as namespace:
        release = f"kt-{uuid.uuid4().hex[:6]}"
        docs = render_rbac(cluster, release, namespace)
        assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
        if not clusterwide:
            docs = [d for d in docs if d["kind"] == "ServiceAccount"]
        cluster.apply(docs, namespace)
        # The chart's policy that holds each trainer to its own FineTuneJob's status.
        policy = render_rbac(cluster, release, namespace,
                             template="templates/trainer-status-policy.yaml")  # fmt: skip
        cluster.apply(policy, namespace)
        account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
        token = cluster.kubectl(
            "create", "token", account, "-n", namespace, "--duration", "2h"
        ).stdout.strip()
        admin = yaml.safe_load(cluster.kubeconfig.read_text())
        server = admin["clusters"][0]["cluster"]
        kubeconfig = workdir / "operator.kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "local", "cluster": server}],
                    "users": [{"name": account, "user": {"token": token}}],
                    "contexts": [
                        {"name": "operator", "context": {"cluster": "local", "user": account}}
                    ],
                    "current-context": "operator",
                }
            )
        )
        try:
            yield OperatorIdentity(namespace, account, kubeconfig, release)
        finally:
            selector = f"app.kubernetes.io/instance={release}"
            cluster.kubectl(
                "delete",
                "clusterrole,clusterrolebinding,validatingadmissionpolicy,"
                "validatingadmissionpolicybinding",
                "-l", selector, "--wait=false", check=False,
            )  # fmt: skip


@dataclass
class OperatorProcess:
    """One replica: `kubetune-operator` with the chart's identity, watching one namespace."""

    name: str
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    health_port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(OPERATOR_BIN)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records so far (other lines, e.g. a crash, as {"message": line})."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line}
            out.append(record if isinstance(record, dict) else {"message": line})
        return out

    def messages(self, name: str | None = None) -> list[str]:
        """Log messages, optionally only those about the FineTuneJob `name`."""
        return [
            str(r.get("message"))
            for r in self.records()
            if name is None or (r.get("object") or {}).get("name") == name
        ]

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        def seen() -> bool:
            assert self.alive, f"operator {self.name} exited:\n{self.tail()}"
            return any(text in m for m in self.messages())

        try:
            wait_until(seen, timeout, f"operator {self.name} to log {text!r}")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.tail()}") from None

    def wait_for_peer_record(self, cluster: Cluster, namespace: str, count: int) -> None:
        """Until `count` replicas keep their records in the namespace's KopfPeering."""

        def records() -> bool:
            assert self.alive, f"operator {self.name} exited:\n{self.tail()}"
            result = cluster.kubectl(
                "get", "kopfpeerings.kopf.dev", "kubetune", "-n", namespace, "-o", "json",
                check=False,
            )  # fmt: skip
            status = json.loads(result.stdout).get("status") if result.returncode == 0 else None
            return len(status or {}) >= count

        wait_until(records, 30, f"{count} replicas in the KopfPeering of {namespace}")

    def wait_active(self, timeout: float = 40) -> OperatorProcess:
        """Until peering let this replica work (Kopf logs that it resumes)."""
        self.wait_for_log("Resuming operations", timeout)
        return self

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def http(self, port: int, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()

    def kill(self) -> None:
        """kill -9: no goodbye to the peers, no cleanup, as when a node dies."""
        if self.alive and self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.alive and self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def grant_operator(cluster: Cluster, identity: OperatorIdentity, namespace: str) -> None:
    """The chart's Role and RoleBinding for a watched namespace (operator.watchNamespaces)."""
    docs = render_rbac(cluster, identity.release, identity.namespace, [namespace])
    granted = [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    assert {d["metadata"]["namespace"] for d in granted} == {namespace}, granted
    cluster.apply(granted, namespace)


def operator_env(
    identity: OperatorIdentity, namespace: str, metrics_port: int, health_port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "KUBECONFIG"))}
    env.update(
        {
            "KUBECONFIG": str(identity.kubeconfig),
            "KUBETUNE_NAMESPACES": namespace,
            "KUBETUNE_TRAINER_COMMAND": json.dumps(["python", str(FAKE_TRAINER), "--config"]),
            "KUBETUNE_DEFAULT_STORAGE_ENDPOINT": "http://127.0.0.1:9",
            "KUBETUNE_METRICS_PORT": str(metrics_port),
            "KUBETUNE_HEALTH_PORT": str(health_port),
            "KUBETUNE_PEERING_LIFETIME": str(PEERING_LIFETIME),
            "KUBETUNE_LOG_FORMAT": "json",
        }
    )
    return env


@dataclass
class PhaseLog:
    """(name, phase, reason) of every FineTuneJob change in a namespace, in order."""

    cluster: Cluster
    namespace: str
    entries: list[tuple[str, str, str]] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None

    def start(self) -> PhaseLog:
        template = '{.metadata.name}{" "}{.status.phase}{" "}{.status.reason}{"\\n"}'
        self.process = subprocess.Popen(
            [str(self.cluster.bin / "kubectl"), "--kubeconfig", str(self.cluster.kubeconfig),
             "get", "finetunejobs", "-n", self.namespace, "--watch", "-o", f"jsonpath={template}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            parts = line.split()
            if len(parts) >= 2:
                entry = (parts[0], parts[1], parts[2] if len(parts) > 2 else "")
                if not self.entries or self.entries[-1] != entry:
                    self.entries.append(entry)

    def phases(self, name: str) -> list[str]:
        out: list[str] = []
        for entry_name, phase, _ in list(self.entries):
            if entry_name == name and (not out or out[-1] != phase):
                out.append(phase)
        return out

    def reasons(self, name: str) -> list[str]:
        return [reason for entry_name, _, reason in list(self.entries) if entry_name == name]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
