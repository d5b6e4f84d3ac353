"""The process node: a FAKE kubelet that runs pods as local processes.

This machine has no container runtime and no GPU, so this is the one fake in the local
environment. Everything above it is real: pods are created by the real Job and ReplicaSet
controllers, bound by the real scheduler (the node advertises `nvidia.com/gpu` capacity), and
admitted by the real API server; this program then does what a kubelet does for pods bound to it:

- registers its Node (labels, capacity incl. nvidia.com/gpu, addresses, Ready) and renews its
  Lease in kube-node-lease, authenticating as `system:node:<name>` so the Node authorizer and
  NodeRestriction apply to it exactly as to a kubelet;
- materialises volumes under <root>/pods/<uid>/volumes/<name>: configMap, secret, emptyDir,
  downwardAPI and projected (serviceAccountToken through the TokenRequest API, bound to the pod,
  refreshed at 80% of its lifetime; configMap; secret; downwardAPI);
- resolves env (value with $(VAR) expansion, valueFrom fieldRef / secretKeyRef / configMapKeyRef /
  resourceFieldRef, envFrom); a missing Secret/ConfigMap key keeps the pod Pending with
  CreateContainerConfigError, as the kubelet does;
- runs init containers in order, then the containers, each as `unshare --mount` + bind mounts so
  every volume appears at its real mountPath (path mapping: volume <name> of pod <uid> lives at
  <root>/pods/<uid>/volumes/<name> on the host and at its mountPath inside the container;
  terminationMessagePath is backed by <root>/pods/<uid>/containers/<name>/termination-log);
- writes pod status back (phase, conditions, container states, exit codes, termination messages
  incl. FallbackToLogsOnError), honours restartPolicy (Never / OnFailure / Always with back-off),
  memory limits (the process group's RSS over limits.memory is killed as OOMKilled, exit 137),
  pod activeDeadlineSeconds, and deletion (SIGTERM to the process group, SIGKILL after the grace
  period, then the final delete);
- serves `kubectl logs` (the kubelet's /containerLogs endpoint over TLS, client certificates from
  the cluster CA);
- manages each pod's /etc/hosts as a kubelet does, and, since there is no cluster DNS, adds the
  names a headless Service gives the pods of one subdomain (`<hostname>.<subdomain>`, e.g. an
  Indexed Job's `<job>-<index>.<service>`), all 127.0.0.1; HOSTNAME is spec.hostname when set.

Not supported, by design (see docs/local-environment.md): images (the `command` runs on the host,
with the repository's virtualenv first on PATH; a container without `command` fails with
StartError), pod networking (pods share the host's network: podIP is 127.0.0.1, and the API
server is reached at KUBERNETES_SERVICE_HOST=127.0.0.1), probes and lifecycle hooks (a running
container counts as ready), exec/attach/port-forward, persistentVolumeClaim and hostPath volumes
other than plain host paths, runAsUser/readOnlyRootFilesystem (processes run as this program's
user), CPU limits, and GPUs themselves (the capacity is only advertised).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import requests

log = logging.getLogger("process-node")
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
REPO = HERE.parents[1]
START_ERROR_EXIT = 128
TERMINATION_MESSAGE_LIMIT = 4096

Obj = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class MissingReference(Exception):
    """A Secret/ConfigMap (or key) a pod needs does not exist (yet)."""


# ---------------------------------------------------------------------------- API access


class Api:
    """Tiny JSON client with the node's client certificate (no code generation needed)."""

    def __init__(self, server: str, cert: str, key: str, ca: str) -> None:
        self.server = server.rstrip("/")
        self.session = requests.Session()
        self.session.cert = (cert, key)
        self.session.verify = ca
        # Env settings (REQUESTS_CA_BUNDLE, proxies) would override the cluster CA per request.
        self.session.trust_env = False

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        *,
        content_type: str = "",
        **params: Any,
    ) -> requests.Response:
        headers = {"Content-Type": content_type} if content_type else {}
        for attempt in range(20):
            try:
                return self.session.request(
                    method,
                    self.server + path,
                    json=body,
                    params=params,
                    headers=headers,
                    timeout=30,
                )
            except requests.ConnectionError:
                time.sleep(min(0.2 * 2**attempt, 3))
        raise ConnectionError(f"{method} {path}: API server unreachable")

    def get(self, path: str, **params: Any) -> Obj | None:
        response = self.request("GET", path, **params)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: Obj = response.json()
        return result

    def watch(self, path: str, **params: Any) -> Iterator[Obj]:
        with self.session.get(
            self.server + path, params={**params, "watch": "1"}, stream=True, timeout=(10, 330)
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)


# ---------------------------------------------------------------------------- the node


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        config = json.loads(Path(args.kubeconfig).read_text())
        user = config["users"][0]["user"]
        cluster = config["clusters"][0]["cluster"]
        self.api = Api(
            cluster["server"], user["client-certificate"], user["client-key"],
            cluster["certificate-authority"],
        )  # fmt: skip
        self.name: str = args.node_name
        self.gpus: int = args.gpus
        self.root = Path(args.root)
        self.kubelet_port: int = args.kubelet_port
        self.api_port = int(urlparse(cluster["server"]).port or 443)
        self.runners: dict[str, PodRunner] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    # -- registration and heartbeats

    def register(self) -> None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": str(memory),
            "pods": "110",
            "ephemeral-storage": str(shutil.disk_usage(self.root).total),
            "nvidia.com/gpu": str(self.gpus),
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": "process-node",
                    "nvidia.com/gpu.present": "true",
                    "kubetune.dev/fake-node": "process-node",
                },
            },
        }
        response = self.api.request("POST", "/api/v1/nodes", node)
        if response.status_code not in (201, 409):
            response.raise_for_status()
        self.capacity = capacity
        self.update_status()

    def update_status(self) -> None:
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "process node (fake kubelet) is posting ready status",
            "lastHeartbeatTime": now(),
        }
        status = {
            "status": {
                "capacity": self.capacity,
                "allocatable": self.capacity,
                "conditions": [ready],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "osImage": "kubetune process node (fake)",
                    "kernelVersion": os.uname().release,
                    "containerRuntimeVersion": "process://fake",
                    "kubeletVersion": "v0.0.0-process-node",
                    "kubeProxyVersion": "",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }
        response = self.api.request(
            "PATCH", f"/api/v1/nodes/{self.name}/status", status,
            content_type="application/strategic-merge-patch+json",
        )  # fmt: skip
        response.raise_for_status()

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        response = self.api.request(
            "PATCH", path, {"spec": spec}, content_type="application/merge-patch+json"
        )
        if response.status_code == 404:
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": "kube-node-lease"},
                "spec": spec,
            }
            response = self.api.request("POST", path.rsplit("/", 1)[0], lease)
        if response.status_code >= 400:
            log.warning("lease renewal failed: %s %s", response.status_code, response.text[:200])

    def heartbeat_loop(self) -> None:
        beats = 0
        while not self.stopping.wait(10):
            try:
                self.renew_lease()
                beats += 1
                if beats % 6 == 0:
                    self.update_status()
            except Exception:
                log.exception("heartbeat failed")

    # -- events

    def event(self, pod: Obj, reason: str, message: str, kind: str = "Normal") -> None:
        meta = pod["metadata"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": "kubelet", "host": self.name},
            "firstTimestamp": now(),
            "lastTimestamp": now(),
            "count": 1,
            "reportingComponent": "kubelet",
            "reportingInstance": self.name,
        }  # fmt: skip
        response = self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        if response.status_code >= 400:
            log.debug("event %s not recorded: %s", reason, response.status_code)

    # -- pods

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.name}"
        while not self.stopping.is_set():
            try:
                listing = self.api.get("/api/v1/pods", fieldSelector=selector)
                assert listing is not None
                seen = set()
                for pod in listing["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self.on_pod(pod, first_sight=True)
                self.forget_missing(seen)
                version = listing["metadata"]["resourceVersion"]
                for event in self.api.watch(
                    "/api/v1/pods", fieldSelector=selector, resourceVersion=version,
                    allowWatchBookmarks="true", timeoutSeconds="300",
                ):  # fmt: skip
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    if event["type"] == "BOOKMARK":
                        continue
                    pod = event["object"]
                    if event["type"] == "DELETED":
                        self.on_deleted(pod)
                    else:
                        self.on_pod(pod, first_sight=False)
            except Exception:
                if not self.stopping.is_set():
                    log.exception("pod watch failed; listing again")
                    time.sleep(1)

    def on_pod(self, pod: Obj, first_sight: bool) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            runner = self.runners.get(uid)
            if runner is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    if pod["metadata"].get("deletionTimestamp"):
                        self.final_delete(pod)
                    return
                if first_sight and pod.get("status", {}).get("containerStatuses"):
                    # Started by an earlier run of this node: its processes are gone.
                    PodRunner.fail_orphan(self, pod)
                    return
                if pod["metadata"].get("deletionTimestamp"):
                    self.final_delete(pod)
                    return
                runner = PodRunner(self, pod)
                self.runners[uid] = runner
                runner.start()
                return
            finished = not runner.is_alive()
        if finished:
            if pod["metadata"].get("deletionTimestamp"):  # a finished pod being deleted
                self.final_delete(pod)
                with self.lock:
                    self.runners.pop(uid, None)
                shutil.rmtree(runner.dir, ignore_errors=True)
            return
        runner.update(pod)

    def on_deleted(self, pod: Obj) -> None:
        with self.lock:
            runner = self.runners.pop(pod["metadata"]["uid"], None)
        if runner:
            runner.stop(grace=0, reason="pod object deleted")
            self.refresh_hosts(runner)

    def refresh_hosts(self, changed: PodRunner) -> None:
        """The kubelet's managed /etc/hosts, plus what cluster DNS would answer for a headless
        Service: every pod of the same namespace and subdomain (an Indexed Job's pods,
        `<hostname>.<subdomain>`) resolves, and they all live on 127.0.0.1 here. Rewritten in
        place for every pod of the group whenever a member comes or goes."""
        with self.lock:
            group = [
                r for r in self.runners.values()
                if (r.namespace, r.subdomain) == (changed.namespace, changed.subdomain)
            ]  # fmt: skip
        for runner in group if changed.subdomain else [changed]:
            runner.write_hosts(group if changed.subdomain else [changed])

    def forget_missing(self, seen: set[str]) -> None:
        with self.lock:
            gone = [uid for uid in self.runners if uid not in seen]
        for uid in gone:
            with self.lock:
                runner = self.runners.pop(uid, None)
            if runner:
                runner.stop(grace=0, reason="pod no longer bound to this node")

    def final_delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        self.api.request(
            "DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body
        )

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.stop(grace=5, reason="process node shutting down")
        for runner in runners:
            runner.join(timeout=10)


# ---------------------------------------------------------------------------- containers


class Container:
    """One container's process, log and termination message."""

    def __init__(self, runner: PodRunner, spec: Obj, init: bool) -> None:
        self.runner = runner
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.dir = runner.dir / "containers" / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "current.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.restart_count = 0
        self.started_at: str | None = None
        self.state: Obj = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: Obj = {}
        self.oom_killed = False

    def start(self, env: dict[str, str], mounts: list[Obj]) -> None:
        spec = self.spec
        argv = [*spec.get("command", []), *spec.get("args", [])]
        argv = [expand(arg, env) for arg in argv]
        termination = self.dir / "termination-log"
        termination.write_text("")
        marker = self.dir / "start-error"
        marker.unlink(missing_ok=True)
        all_mounts = [
            *mounts,
            {
                "source": str(termination),
                "target": spec.get("terminationMessagePath") or "/dev/termination-log",
                "readOnly": False,
            },
        ]
        init_spec = {
            "argv": argv or ["/nonexistent-entrypoint"],
            "env": env,
            "mounts": all_mounts,
            "workingDir": spec.get("workingDir") or str(self.runner.dir / "home"),
            "workingDirIsExplicit": bool(spec.get("workingDir")),
            "terminationLog": str(termination),
            "startErrorMarker": str(marker),
            # Bound back if a volume hides them (e.g. an emptyDir at /tmp over a checkout there).
            "hostPaths": sorted({str(REPO), str(VENV_BIN.parent)}),
        }
        if not argv:
            # Images are not run here, so there is no ENTRYPOINT to fall back on.
            termination.write_text(
                "process node: the container has no `command`; images are not run on this fake node"
            )
        spec_path = self.dir / "init.json"
        spec_path.write_text(json.dumps(init_spec))
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--",
                 sys.executable, str(HERE / "container_init.py"), str(spec_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env,
            )  # fmt: skip
        self.started_at = now()
        self.oom_killed = False
        self.state = {"running": {"startedAt": self.started_at}}

    def poll(self) -> int | None:
        if self.process is None:
            return None
        code = self.process.poll()
        if code is not None and "running" in self.state:
            self.state = {"terminated": self.terminated(code)}
        return code

    def terminated(self, code: int) -> Obj:
        if code < 0:  # killed by a signal: report as a runtime does
            code = 128 - code
        message = (self.dir / "termination-log").read_text(errors="replace")[
            :TERMINATION_MESSAGE_LIMIT
        ]
        if (
            not message
            and code != 0
            and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        ):
            message = tail_text(self.log_path, lines=80, limit=2048)
        if self.oom_killed:
            reason = "OOMKilled"
        elif (self.dir / "start-error").exists():
            reason = "StartError"
        else:
            reason = "Completed" if code == 0 else "Error"
        state: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": self.started_at,
            "finishedAt": now(),
            "containerID": f"process://{self.process.pid if self.process else 0}",
        }
        if message:
            state["message"] = message
        return state

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def rss_bytes(self) -> int:
        if self.process is None:
            return 0
        return process_group_rss(self.process.pid)

    def status(self) -> Obj:
        running = "running" in self.state
        status: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": running and not self.init,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
        }
        if self.process is not None:
            status["containerID"] = f"process://{self.process.pid}"
        if self.last_state:
            status["lastState"] = self.last_state
        return status


# ---------------------------------------------------------------------------- pods


class PodRunner(threading.Thread):
    def __init__(self, node: Node, pod: Obj) -> None:
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.dir = node.root / "pods" / self.uid
        self.stop_requested = threading.Event()
        self.deleted = False  # stopped because the pod is being deleted: delete it at the end
        self.next_memory_check = 0.0
        self.stop_grace = 30.0
        self.stop_reason = ""
        self.started_at: str | None = None
        self.init_containers = [
            Container(self, c, True) for c in pod["spec"].get("initContainers", [])
        ]
        self.containers = [Container(self, c, False) for c in pod["spec"]["containers"]]
        self.token_volumes: list[tuple[Path, Obj]] = []
        self.phase = "Pending"
        # A pod's host name is spec.hostname when set (an Indexed Job's <job>-<index>).
        self.hostname: str = pod["spec"].get("hostname") or self.pod_name
        self.subdomain: str = pod["spec"].get("subdomain") or ""
        self.hosts_file = self.dir / "etc-hosts"

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}"

    # -- entry points from the watch

    def update(self, pod: Obj) -> None:
        self.pod = pod
        deletion = pod["metadata"].get("deletionTimestamp")
        if deletion and not self.stop_requested.is_set():
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            self.stop(grace=float(30 if grace is None else grace), reason="pod deleted")

    def stop(self, grace: float, reason: str) -> None:
        self.deleted = True
        self.stop_grace = grace
        self.stop_reason = reason
        self.stop_requested.set()

    @staticmethod
    def fail_orphan(node: Node, pod: Obj) -> None:
        meta = pod["metadata"]
        patch = {
            "status": {
                "phase": "Failed",
                "reason": "NodeRestarted",
                "message": "the process node restarted and lost this pod's processes",
            }
        }
        node.api.request(
            "PATCH", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status", patch,
            content_type="application/strategic-merge-patch+json",
        )  # fmt: skip

    # -- the pod's life

    def run(self) -> None:
        try:
            self.live()
        except Exception as err:
            log.exception("pod %s/%s failed in the process node", self.namespace, self.pod_name)
            self.phase = "Failed"
            self.write_status(reason="ProcessNodeError", message=str(err)[:500])
        finally:
            if self.deleted:
                self.node.final_delete(self.pod)
                with self.node.lock:
                    self.node.runners.pop(self.uid, None)
                shutil.rmtree(self.dir, ignore_errors=True)

    def names(self) -> list[str]:
        """The DNS names of this pod: host name, and under its subdomain (a headless Service)."""
        if not self.subdomain:
            return [self.hostname]
        fqdn = f"{self.hostname}.{self.subdomain}.{self.namespace}.svc"
        short = f"{self.hostname}.{self.subdomain}"
        return [f"{fqdn}.cluster.local", fqdn, f"{short}.{self.namespace}", short, self.hostname]

    def write_hosts(self, group: list[PodRunner]) -> None:
        # The machine's own name too: processes here see it as their host name (no UTS
        # namespace), and gloo binds to what it resolves to, as it would to a pod's IP.
        lines = [
            f"127.0.0.1\tlocalhost {socket.gethostname()}",
            "::1\tlocalhost ip6-localhost ip6-loopback",
        ]
        lines += [f"127.0.0.1\t{' '.join(r.names())}" for r in group]
        text = "\n".join(lines) + "\n"
        # In place, not renamed: a container bind-mounted this file and must see the change.
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        with self.hosts_file.open("a+") as f:
            f.seek(0)
            if f.read() != text:
                f.seek(0)
                f.truncate()
                f.write(text)

    def live(self) -> None:
        self.started_at = now()
        (self.dir / "home").mkdir(parents=True, exist_ok=True)
        self.node.refresh_hosts(self)
        self.write_status()
        mounts_by_container, env_by_container = self.wait_for_config()
        if mounts_by_container is None or env_by_container is None:
            self.terminate_phase()
            return
        threading.Thread(target=self.refresh_tokens, daemon=True).start()
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for container in self.init_containers:
            while True:
                code = self.run_to_exit(container, env_by_container, mounts_by_container)
                if code is None:  # stopped
                    self.terminate_phase()
                    return
                if code == 0:
                    break
                if policy == "Never":
                    self.phase = "Failed"
                    self.write_status()
                    return
                container.restart_count += 1
                if self.backoff(container):
                    self.terminate_phase()
                    return
        for container in self.containers:
            self.start_container(container, env_by_container, mounts_by_container)
        self.phase = "Running"
        self.write_status()
        self.supervise(policy, env_by_container, mounts_by_container)

    def wait_for_config(
        self,
    ) -> tuple[dict[str, list[Obj]] | None, dict[str, dict[str, str]] | None]:
        """Volumes and env, retried while a referenced object is missing (kubelet behaviour)."""
        warned = ""
        while not self.stop_requested.is_set():
            try:
                volumes = self.materialise_volumes()
                mounts = {c.name: self.mounts(c.spec, volumes) for c in self.all_containers()}
                env = {c.name: self.container_env(c.spec) for c in self.all_containers()}
                return mounts, env
            except MissingReference as err:
                message = str(err)
                reason = (
                    "FailedMount" if message.startswith("volume") else "CreateContainerConfigError"
                )
                if message != warned:
                    self.node.event(self.pod, "Failed" if reason != "FailedMount" else reason,
                                    f"Error: {message}", "Warning")  # fmt: skip
                    warned = message
                for container in self.all_containers():
                    container.state = {"waiting": {"reason": reason, "message": message}}
                self.write_status()
                self.stop_requested.wait(2)
        return None, None

    def all_containers(self) -> list[Container]:
        return [*self.init_containers, *self.containers]

    def start_container(
        self, container: Container, env: dict[str, dict[str, str]], mounts: dict[str, list[Obj]]
    ) -> None:
        container.start(env[container.name], mounts[container.name])
        self.node.event(self.pod, "Started", f"Started container {container.name}")

    def run_to_exit(
        self, container: Container, env: dict[str, dict[str, str]], mounts: dict[str, list[Obj]]
    ) -> int | None:
        self.start_container(container, env, mounts)
        self.write_status()
        while True:
            code = container.poll()
            if code is not None:
                self.write_status()
                return code
            if self.check_stop_and_limits([container]):
                return None
            time.sleep(0.2)

    def supervise(
        self, policy: str, env: dict[str, dict[str, str]], mounts: dict[str, list[Obj]]
    ) -> None:
        restart_at: dict[str, float] = {}
        while True:
            if self.check_stop_and_limits(self.containers):
                self.terminate_phase()
                return
            changed = False
            for container in self.containers:
                was_running = "running" in container.state
                code = container.poll()
                if code is not None and was_running:
                    changed = True
                    if policy == "Always" or (policy == "OnFailure" and code != 0):
                        delay = min(10 * 2**container.restart_count, 300)
                        restart_at[container.name] = time.monotonic() + delay
                        container.last_state = container.state
                        container.state = {
                            "waiting": {
                                "reason": "CrashLoopBackOff",
                                "message": f"back-off {delay}s restarting failed container",
                            }
                        }
                due = restart_at.get(container.name)
                if due is not None and time.monotonic() >= due:
                    del restart_at[container.name]
                    container.restart_count += 1
                    self.start_container(container, env, mounts)
                    changed = True
            if not restart_at and all(c.poll() is not None for c in self.containers):
                codes = [c.state["terminated"]["exitCode"] for c in self.containers]
                self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
                self.write_status()
                return
            if changed:
                self.write_status()
            time.sleep(0.2)

    def check_stop_and_limits(self, containers: list[Container]) -> bool:
        """Deletion, memory limits and activeDeadlineSeconds; True when the pod must stop."""
        if self.stop_requested.is_set():
            self.kill_all(containers, self.stop_grace, self.stop_reason)
            return True
        if time.monotonic() >= self.next_memory_check:
            self.next_memory_check = time.monotonic() + 1.0
            self.enforce_memory_limits(containers)
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        if deadline and self.started_at:
            started = datetime.strptime(self.started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            if (datetime.now(UTC) - started).total_seconds() > deadline:
                self.kill_all(containers, 0, "active deadline exceeded")
                self.write_status(
                    reason="DeadlineExceeded",
                    message="Pod was active on the node longer than the specified deadline",
                )
                return True
        return False

    def enforce_memory_limits(self, containers: list[Container]) -> None:
        """A cgroup stand-in: the process group's RSS over limits.memory is OOM-killed."""
        for container in containers:
            limit = parse_quantity(
                container.spec.get("resources", {}).get("limits", {}).get("memory")
            )
            if limit and "running" in container.state and container.rss_bytes() > limit:
                container.oom_killed = True
                container.signal(signal.SIGKILL)
                self.node.event(
                    self.pod, "OOMKilling",
                    f"Memory cgroup out of memory (emulated): container {container.name} "
                    f"exceeded its limit of {limit} bytes", "Warning",
                )  # fmt: skip

    def kill_all(self, containers: list[Container], grace: float, reason: str) -> None:
        running = [c for c in containers if c.process is not None and c.process.poll() is None]
        for container in running:
            self.node.event(self.pod, "Killing", f"Stopping container {container.name} ({reason})")
            container.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(
            c.process.poll() is None for c in running if c.process
        ):
            time.sleep(0.1)
        for container in running:
            container.signal(signal.SIGKILL)
            if container.process is not None:
                container.process.wait()
            container.poll()

    def backoff(self, container: Container) -> bool:
        delay = min(10 * 2 ** (container.restart_count - 1), 300)
        container.state = {"waiting": {"reason": "CrashLoopBackOff"}}
        self.write_status()
        return self.stop_requested.wait(delay)

    def terminate_phase(self) -> None:
        """A pod stopped by deletion ends Failed unless all had succeeded (kubelet >= 1.27)."""
        codes = [c.state.get("terminated", {}).get("exitCode") for c in self.containers]
        self.phase = "Succeeded" if codes and all(code == 0 for code in codes) else "Failed"
        for container in self.all_containers():
            if "waiting" in container.state:
                container.state = {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "ContainerStatusUnknown",
                        "message": "The container could not be started before the pod stopped",
                        "finishedAt": now(),
                    }
                }
        self.write_status()

    # -- status

    def write_status(self, reason: str = "", message: str = "") -> None:
        ready = self.phase == "Running" and all("running" in c.state for c in self.containers)
        initialized = all(
            c.state.get("terminated", {}).get("exitCode") == 0 for c in self.init_containers
        )

        def condition(kind: str, value: bool, why: str = "") -> Obj:
            cond: Obj = {
                "type": kind,
                "status": "True" if value else "False",
                "lastTransitionTime": now(),
            }
            if why and not value:
                cond["reason"] = why
            return cond

        not_ready_reason = (
            "PodCompleted" if self.phase in ("Succeeded", "Failed") else "ContainersNotReady"
        )
        status: Obj = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.started_at,
            "conditions": [
                condition("PodReadyToStartContainers", True),
                condition("Initialized", initialized, "ContainersNotInitialized"),
                condition("ContainersReady", ready, not_ready_reason),
                condition("Ready", ready, not_ready_reason),
            ],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if reason:
            status["reason"] = reason
            status["message"] = message
        response = self.node.api.request(
            "PATCH", self.path + "/status", {"status": status},
            content_type="application/strategic-merge-patch+json",
        )  # fmt: skip
        if response.status_code >= 400 and response.status_code != 404:
            log.warning("status of %s/%s: %s %s", self.namespace, self.pod_name,
                        response.status_code, response.text[:300])  # fmt: skip

    # -- volumes and env

    def get_object(self, kind: str, name: str) -> Obj | None:
        return self.node.api.get(f"/api/v1/namespaces/{self.namespace}/{kind}/{name}")

    def config_data(
        self, kind: str, name: str, optional: bool, what: str
    ) -> dict[str, bytes] | None:
        obj = self.get_object(kind, name)
        if obj is None:
            if optional:
                return None
            singular = "secret" if kind == "secrets" else "configmap"
            raise MissingReference(f'{what}{singular} "{name}" not found')
        if kind == "secrets":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def materialise_volumes(self) -> dict[str, Path]:
        volumes: dict[str, Path] = {}
        self.token_volumes = []
        for volume in self.pod["spec"].get("volumes", []):
            name = volume["name"]
            target = self.dir / "volumes" / name
            if "hostPath" in volume:
                volumes[name] = Path(volume["hostPath"]["path"])
                continue
            target.mkdir(parents=True, exist_ok=True)
            volumes[name] = target
            what = f"volume {name}: "
            if "emptyDir" in volume:
                continue
            if "configMap" in volume or "secret" in volume:
                kind = "configmaps" if "configMap" in volume else "secrets"
                source = volume.get("configMap") or volume["secret"]
                ref = source.get("name") or source.get("secretName")
                data = self.config_data(kind, ref, source.get("optional", False), what)
                write_items(
                    target, data or {}, source.get("items"), source.get("defaultMode", 0o644)
                )
            elif "downwardAPI" in volume:
                for item in volume["downwardAPI"].get("items", []):
                    write_file(
                        target / item["path"], self.field_value(item["fieldRef"]).encode(), 0o644
                    )
            elif "projected" in volume:
                self.write_projected(target, volume["projected"], what)
            else:
                kinds = ", ".join(k for k in volume if k != "name")
                raise MissingReference(f"{what}unsupported volume type {kinds} on the process node")
        return volumes

    def write_projected(self, target: Path, projected: Obj, what: str) -> None:
        mode = projected.get("defaultMode", 0o644)
        for source in projected.get("sources", []):
            if "serviceAccountToken" in source:
                self.token_volumes.append((target, source["serviceAccountToken"]))
                self.write_token(target, source["serviceAccountToken"])
            elif "configMap" in source or "secret" in source:
                kind = "configmaps" if "configMap" in source else "secrets"
                ref = source.get("configMap") or source["secret"]
                data = self.config_data(kind, ref["name"], ref.get("optional", False), what)
                write_items(target, data or {}, ref.get("items"), mode)
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items", []):
                    write_file(
                        target / item["path"], self.field_value(item["fieldRef"]).encode(), mode
                    )

    def write_token(self, target: Path, source: Obj) -> None:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        spec: Obj = {
            "expirationSeconds": source.get("expirationSeconds", 3600),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": self.pod_name,
                "uid": self.uid,
            },
        }
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        response = self.node.api.request(
            "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )  # fmt: skip
        if response.status_code >= 400:
            raise MissingReference(
                f"volume: token for serviceaccount {account}: {response.text[:200]}"
            )
        token = response.json()["status"]["token"]
        write_file(target / source["path"], token.encode(), 0o600)

    def refresh_tokens(self) -> None:
        """Rotate projected tokens at 80% of their lifetime, as the kubelet does."""
        if not self.token_volumes:
            return
        lifetime = min(s.get("expirationSeconds", 3600) for _, s in self.token_volumes)
        while not self.stop_requested.wait(lifetime * 0.8):
            for target, source in self.token_volumes:
                try:
                    self.write_token(target, source)
                except Exception:
                    log.exception("token refresh failed")

    def mounts(self, spec: Obj, volumes: dict[str, Path]) -> list[Obj]:
        result = []
        for mount in spec.get("volumeMounts", []):
            source = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            result.append(
                {
                    "source": str(source),
                    "target": mount["mountPath"],
                    "readOnly": bool(mount.get("readOnly")),
                }
            )
        # The pod's /etc/hosts, managed by the node as a kubelet does (refresh_hosts).
        result.append({"source": str(self.hosts_file), "target": "/etc/hosts", "readOnly": True})
        return result

    def field_value(self, ref: Obj) -> str:
        path: str = ref["fieldPath"]
        meta, spec = self.pod["metadata"], self.pod["spec"]
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1",
            "status.hostIPs": "127.0.0.1",
            "status.podIP": "127.0.0.1",
            "status.podIPs": "127.0.0.1",
        }
        if path in simple:
            return str(simple[path])
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str(meta.get(match[1], {}).get(match[2], ""))
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1], {})
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        raise MissingReference(f"unsupported fieldRef {path}")

    def resource_value(self, spec: Obj, ref: Obj) -> str:
        section, _, name = ref["resource"].partition(".")
        value = spec.get("resources", {}).get(section, {}).get(name)
        if value is None:
            if name == "memory":
                return str(self.node.capacity["memory"])
            return str(self.node.capacity.get(name, "0"))
        return str(value)

    def container_env(self, spec: Obj) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.dir / "home"),
            "HOSTNAME": self.hostname,
            "LANG": "C.UTF-8",
            # No pod network: the API server is reached on loopback (see module docstring).
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.node.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.node.api_port),
        }
        for source in spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "configmaps" if "configMapRef" in source else "secrets"
            data = self.config_data(kind, ref["name"], ref.get("optional", False), "")
            for key, value in (data or {}).items():
                env[prefix + key] = value.decode(errors="replace")
        for item in spec.get("env", []):
            name = item["name"]
            if "value" in item or "valueFrom" not in item:
                env[name] = expand(item.get("value", ""), env)
                continue
            source = item["valueFrom"]
            if "fieldRef" in source:
                env[name] = self.field_value(source["fieldRef"])
            elif "resourceFieldRef" in source:
                env[name] = self.resource_value(spec, source["resourceFieldRef"])
            else:
                kind = "secrets" if "secretKeyRef" in source else "configmaps"
                ref = source.get("secretKeyRef") or source["configMapKeyRef"]
                data = self.config_data(kind, ref["name"], ref.get("optional", False), "")
                if data is None:
                    continue
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    singular = "secret" if kind == "secrets" else "configmap"
                    raise MissingReference(
                        f"couldn't find key {ref['key']} in {singular} {ref['name']}"
                    )
                env[name] = data[ref["key"]].decode(errors="replace")
        return env


# ---------------------------------------------------------------------------- helpers


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $$ escapes, unknown references stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, text)


def write_file(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)  # atomic, so a reader never sees half a token


def write_items(target: Path, data: dict[str, bytes], items: list[Obj] | None, mode: int) -> None:
    if items is None:
        for key, value in data.items():
            write_file(target / key, value, mode)
        return
    for item in items:
        if item["key"] in data:
            write_file(target / item["path"], data[item["key"]], item.get("mode", mode))


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 0.001,
}  # fmt: skip


def parse_quantity(value: str | None) -> int:
    if not value:
        return 0
    match = _QUANTITY.match(str(value))
    if not match or match[2] not in _SUFFIX:
        return 0
    return int(float(match[1]) * _SUFFIX[match[2]])


def process_group_rss(pgid: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of stat: the process group
                total += int(Path(entry.path, "statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def tail_text(path: Path, lines: int, limit: int) -> str:
    try:
        data = path.read_bytes()[-limit * 4 :]
    except OSError:
        return ""
    text = "\n".join(data.decode(errors="replace").splitlines()[-lines:])
    return text[-limit:]


# ---------------------------------------------------------------------------- kubelet API


def serve_kubelet_api(node: Node, port: int, cert: str, key: str, client_ca: str) -> None:
    """The kubelet's /containerLogs endpoint, so `kubectl logs` works through the API server."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = url.path.strip("/").split("/")
            if parts == ["healthz"]:
                self.reply(200, b"ok")
                return
            if len(parts) != 4 or parts[0] != "containerLogs":
                self.reply(501, b"process node: only /containerLogs is implemented")
                return
            _, namespace, pod, name = parts
            with node.lock:
                runner = next(
                    (
                        r
                        for r in node.runners.values()
                        if (r.namespace, r.pod_name) == (namespace, pod)
                    ),
                    None,
                )
            container = None
            if runner:
                container = next((c for c in runner.all_containers() if c.name == name), None)
            if container is None or not container.log_path.exists():
                self.reply(404, f"container {name} of pod {namespace}/{pod} not found".encode())
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            data = container.log_path.read_bytes()
            if "tailLines" in query:
                data = b"".join(data.splitlines(keepends=True)[-int(query["tailLines"]) :])
            self.wfile.write(data)
            if query.get("follow") == "true":
                offset = container.log_path.stat().st_size
                while True:
                    chunk = read_from(container.log_path, offset)
                    offset += len(chunk)
                    if chunk:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    elif container.poll() is not None or (runner and not runner.is_alive()):
                        break
                    else:
                        time.sleep(0.2)

        def reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(client_ca)
    context.verify_mode = ssl.CERT_REQUIRED  # only the API server's kubelet-client cert gets in
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="kubelet-api").start()


def read_from(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read()


def main() -> None:
    parser = argparse.ArgumentParser(description="kubetune process node (a fake kubelet)")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--root", required=True)
    parser.add_argument("--kubelet-port", type=int, required=True)
    parser.add_argument("--tls-cert", required=True)
    parser.add_argument("--tls-key", required=True)
    parser.add_argument("--client-ca", required=True)
    parser.add_argument("--api-server", required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    Path(args.root).mkdir(parents=True, exist_ok=True)
    node = Node(args)
    node.register()
    node.renew_lease()
    serve_kubelet_api(node, args.kubelet_port, args.tls_cert, args.tls_key, args.client_ca)

    def on_signal(signum: int, frame: Any) -> None:
        node.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=node.heartbeat_loop, daemon=True, name="heartbeat").start()
    log.info("process node %s registered with %d fake GPUs", node.name, node.gpus)
    node.watch_pods()


if __name__ == "__main__":
    main()
