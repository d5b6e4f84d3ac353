"""The local environment: a real Kubernetes control plane, a process node and an S3 server.

    python tests/localenv/cluster.py up      # idempotent; fast when already running
    python tests/localenv/cluster.py down    # stop everything and forget the cluster's state
    python tests/localenv/cluster.py status

Components (binaries from tests/localenv/build-binaries.sh, all from upstream Go modules, each
built the first time a command needs it: `up` builds these, helm and Kueue wait for their users):
etcd, kube-apiserver (secure serving, client-certificate auth, Node+RBAC authorization, default
admission plugins incl. PodSecurity plus NodeRestriction, ServiceAccount token signing),
kube-controller-manager (all default controllers), kube-scheduler, MinIO, and the *process node*
(tests/localenv/process_node.py): the one fake, a kubelet stand-in that runs pods as local
processes because this machine has no container runtime and no GPU.

Stable interface for scripts, docs and tests (all under .dev/ in the repository):
    .dev/kubeconfig   admin kubeconfig (system:masters client certificate)
    .dev/bin/         kubectl, helm (and the other binaries)
    .dev/s3.env       AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                      AWS_DEFAULT_REGION, KUBETUNE_S3_BUCKET (KEY=value lines)
Ports are picked free on first start and kept in .dev/ports.json, so a second checkout (a CI
run on the same machine) gets its own cluster beside this one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / ".dev"
BIN = DEV / "bin"
PKI = DEV / "pki"
RUN = DEV / "run"
LOGS = DEV / "logs"
NODE_NAME = "kubetune-node-0"
NODE_GPUS = 8
SERVICE_CIDR = "10.0.0.0/24"
BUCKET = "kubetune"
PORT_NAMES = (
    "etcd",
    "etcd_peer",
    "apiserver",
    "controller_manager",
    "scheduler",
    "kubelet",
    "s3",
    "s3_console",
)
# What `up` runs; helm is built by the first chart step, Kueue by the first Kueue test.
CLUSTER_BINARIES = ("kube", "etcd", "minio")


def log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


def build_binaries(*names: str) -> None:
    """Build the named binaries the first time (cached after that) and link them into .dev/bin:
    kube (kubectl too), etcd, minio, helm, kueue (tests/localenv/build-binaries.sh)."""
    script = ROOT / "tests" / "localenv" / "build-binaries.sh"
    subprocess.run(["bash", str(script), *names], check=True)


# ---------------------------------------------------------------------------- ports and PKI


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            return port


def allocate_ports(reuse_running: bool) -> dict[str, int]:
    """Keep the ports of .dev/ports.json where possible, so kubeconfigs stay valid."""
    path = DEV / "ports.json"
    ports: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
    taken: set[int] = set()
    for name in PORT_NAMES:
        port = ports.get(name)
        if port is None or port in taken or (not reuse_running and not _port_free(port)):
            port = _free_port(taken)
        ports[name] = port
        taken.add(port)
    path.write_text(json.dumps(ports, indent=2) + "\n")
    return ports


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def issue_certificate(name: str, subject: str, sans: str = "", server: bool = False) -> None:
    """An EC P-256 key and a certificate signed by the local CA."""
    key, csr, crt = PKI / f"{name}.key", PKI / f"{name}.csr", PKI / f"{name}.crt"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    ext = PKI / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    lines = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
    ]
    if sans:
        lines.append(f"subjectAltName={sans}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(PKI / "ca.crt"),
        "-CAkey", str(PKI / "ca.key"), "-CAcreateserial", "-days", "3650",
        "-extfile", str(ext), "-out", str(crt),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()


def ensure_pki() -> None:
    if (PKI / "done").exists():
        return
    shutil.rmtree(PKI, ignore_errors=True)
    PKI.mkdir(parents=True)
    log("generating certificates")
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(PKI / "ca.key"))
    _openssl(
        "req", "-x509", "-new", "-key", str(PKI / "ca.key"), "-days", "3650",
        "-subj", "/CN=kubetune-local-ca", "-out", str(PKI / "ca.crt"),
    )  # fmt: skip
    api_sans = (
        "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    )
    issue_certificate("apiserver", "/CN=kube-apiserver", api_sans, server=True)
    issue_certificate("admin", "/O=system:masters/CN=kubetune-admin")
    issue_certificate("controller-manager", "/CN=system:kube-controller-manager")
    issue_certificate("scheduler", "/CN=system:kube-scheduler")
    # The process node authenticates as a real kubelet would, so the Node authorizer and the
    # NodeRestriction admission plugin limit it to its own node and the pods bound to it.
    issue_certificate("node", f"/O=system:nodes/CN=system:node:{NODE_NAME}")
    issue_certificate(
        "kubelet-serving", f"/CN={NODE_NAME}", "IP:127.0.0.1,DNS:localhost", server=True
    )
    issue_certificate(
        "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client"
    )
    # ServiceAccount token signing key (ES256).
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(PKI / "sa.key"))
    _openssl("ec", "-in", str(PKI / "sa.key"), "-pubout", "-out", str(PKI / "sa.pub"))
    (PKI / "done").write_text("ok\n")


def write_kubeconfig(path: Path, user: str, api_port: int) -> None:
    """A kubeconfig with absolute paths to the PKI (kubectl resolves them from anywhere)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-local",
                "cluster": {
                    "server": f"https://127.0.0.1:{api_port}",
                    "certificate-authority": str(PKI / "ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(PKI / f"{user}.crt"),
                    "client-key": str(PKI / f"{user}.key"),
                },
            }
        ],
        "contexts": [
            {"name": "kubetune-local", "context": {"cluster": "kubetune-local", "user": user}}
        ],
        "current-context": "kubetune-local",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is valid YAML


# ---------------------------------------------------------------------------- processes


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None


def _pid(name: str) -> int | None:
    path = RUN / f"{name}.pid"
    if not path.exists():
        return None
    pid = int(path.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def start(component: Component) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    RUN.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{component.name}.log").open("ab") as out:
        proc = subprocess.Popen(
            component.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(component.env or {})},
            start_new_session=True,  # outlives this script; `down` stops it by pid
            cwd=ROOT,
        )
    (RUN / f"{component.name}.pid").write_text(f"{proc.pid}\n")


def stop(name: str, grace: float = 10.0) -> None:
    pid = _pid(name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _pid(name) is not None:
            time.sleep(0.1)
        if _pid(name) is not None:
            os.killpg(pid, signal.SIGKILL)
    (RUN / f"{name}.pid").unlink(missing_ok=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float, component: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if _pid(component) is None:
            tail = (LOGS / f"{component}.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"cluster: {component} exited while waiting for {what}:\n{tail}")
        time.sleep(0.2)
    raise SystemExit(f"cluster: timed out after {timeout:.0f}s waiting for {what}; see {LOGS}")


def _https_ok(url: str) -> bool:
    ctx = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    ctx.load_cert_chain(str(PKI / "admin.crt"), str(PKI / "admin.key"))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kubectl"), "--kubeconfig", str(DEV / "kubeconfig"), *args],
        check=check,
        capture_output=True,
        text=True,
    )


# ---------------------------------------------------------------------------- components


def components(ports: dict[str, int], s3_user: str, s3_password: str) -> list[Component]:
    kube = str(BIN / "kube")
    api = f"https://127.0.0.1:{ports['apiserver']}"
    profiling = "true" if os.environ.get("KUBETUNE_APISERVER_PROFILING") == "1" else "false"
    etcd = Component(
        "etcd",
        [
            str(BIN / "etcd"),
            "--name=kubetune-local",
            f"--data-dir={DEV / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{ports['etcd_peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports['etcd_peer']}",
            f"--initial-cluster=kubetune-local=http://127.0.0.1:{ports['etcd_peer']}",
            "--unsafe-no-fsync",  # a throwaway test cluster: durability is not worth the latency
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ],
    )
    apiserver = Component(
        "kube-apiserver",
        [
            kube, "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={PKI / 'apiserver.crt'}",
            f"--tls-private-key-file={PKI / 'apiserver.key'}",
            f"--client-ca-file={PKI / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",  # on top of the defaults (PodSecurity…)
            "--allow-privileged=true",  # so that PodSecurity, not this flag, is what refuses
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={PKI / 'sa.pub'}",
            f"--service-account-signing-key-file={PKI / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--kubelet-client-certificate={PKI / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={PKI / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={PKI / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--profiling={profiling}",  # KUBETUNE_APISERVER_PROFILING=1: /debug/pprof on
            "--v=1",
        ],
    )  # fmt: skip
    controller_manager = Component(
        "kube-controller-manager",
        [
            kube, "kube-controller-manager",
            f"--kubeconfig={DEV / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={DEV / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={DEV / 'controller-manager.kubeconfig'}",
            "--controllers=*",
            f"--service-account-private-key-file={PKI / 'sa.key'}",
            f"--root-ca-file={PKI / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['controller_manager']}",
            "--v=1",
        ],
    )  # fmt: skip
    scheduler = Component(
        "kube-scheduler",
        [
            kube, "kube-scheduler",
            f"--kubeconfig={DEV / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={DEV / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={DEV / 'scheduler.kubeconfig'}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
            "--v=1",
        ],
    )  # fmt: skip
    node = Component(
        "process-node",
        [
            sys.executable, str(ROOT / "tests" / "localenv" / "process_node.py"),
            f"--kubeconfig={DEV / 'node.kubeconfig'}",
            f"--node-name={NODE_NAME}",
            f"--gpus={NODE_GPUS}",
            f"--root={DEV / 'node'}",
            f"--kubelet-port={ports['kubelet']}",
            f"--tls-cert={PKI / 'kubelet-serving.crt'}",
            f"--tls-key={PKI / 'kubelet-serving.key'}",
            f"--client-ca={PKI / 'ca.crt'}",
            f"--api-server={api}",
        ],
    )  # fmt: skip
    s3 = Component(
        "minio",
        [
            str(BIN / "minio"), "server", str(DEV / "s3-data"),
            "--address", f"127.0.0.1:{ports['s3']}",
            "--console-address", f"127.0.0.1:{ports['s3_console']}",
            "--quiet",
        ],
        env={
            "MINIO_ROOT_USER": s3_user,
            "MINIO_ROOT_PASSWORD": s3_password,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CI_CD": "1",
        },
    )  # fmt: skip
    return [etcd, apiserver, controller_manager, scheduler, node, s3]


def read_s3_env() -> dict[str, str]:
    path = DEV / "s3.env"
    if not path.exists():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key: value for key, value in pairs}


def ensure_s3_env(port: int) -> dict[str, str]:
    env = read_s3_env()
    user = env.get("AWS_ACCESS_KEY_ID") or "kubetune-" + secrets.token_hex(4)
    password = env.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": user,
        "AWS_SECRET_ACCESS_KEY": password,
        "AWS_DEFAULT_REGION": "us-east-1",
        "KUBETUNE_S3_BUCKET": BUCKET,
    }
    path = DEV / "s3.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    path.chmod(0o600)
    return env


def create_bucket(env: dict[str, str]) -> None:
    import boto3  # noqa: PLC0415  (the venv's; imported late so `down` works without it)

    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        client.create_bucket(Bucket=BUCKET)


def all_running() -> bool:
    names = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
    return all(_pid(n) is not None for n in (*names, "process-node", "minio"))


def node_ready() -> bool:
    result = kubectl(
        "get", "node", NODE_NAME, "-o",
        "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        check=False,
    )  # fmt: skip
    return result.stdout.strip() == "True"


def up() -> None:
    started = time.monotonic()
    build_binaries(*CLUSTER_BINARIES)
    ensure_pki()
    if all_running():
        ports = json.loads((DEV / "ports.json").read_text())
        if _https_ok(f"https://127.0.0.1:{ports['apiserver']}/readyz") and node_ready():
            log(f"already up ({time.monotonic() - started:.1f}s); KUBECONFIG={DEV / 'kubeconfig'}")
            return
    down(forget=False)
    ports = allocate_ports(reuse_running=False)
    for user in ("admin", "controller-manager", "scheduler", "node"):
        name = "kubeconfig" if user == "admin" else f"{user}.kubeconfig"
        write_kubeconfig(DEV / name, user, ports["apiserver"])
    s3_env = ensure_s3_env(ports["s3"])
    etcd, apiserver, controller_manager, scheduler, node, s3 = components(
        ports, s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"]
    )
    start(s3)  # MinIO starts in parallel with the control plane
    start(etcd)
    wait_for("etcd", lambda: _http_ok(f"http://127.0.0.1:{ports['etcd']}/health"), 60, "etcd")
    start(apiserver)
    api = f"https://127.0.0.1:{ports['apiserver']}"
    wait_for("kube-apiserver", lambda: _https_ok(f"{api}/readyz"), 120, "kube-apiserver")
    start(controller_manager)
    start(scheduler)
    start(node)
    s3_url = f"{s3_env['AWS_ENDPOINT_URL']}/minio/health/ready"
    wait_for("minio", lambda: _http_ok(s3_url), 60, "minio")
    create_bucket(s3_env)
    wait_for("the process node", node_ready, 60, "process-node")
    # Pods need the default ServiceAccount, which the controller-manager creates.
    sa = lambda: kubectl("get", "serviceaccount", "default", check=False).returncode == 0  # noqa: E731
    wait_for("the default ServiceAccount", sa, 60, "kube-controller-manager")
    log(f"up in {time.monotonic() - started:.1f}s")
    print_usage()


def down(forget: bool = True) -> None:
    # The node first, so that it stops its pods' processes while the API is still there.
    for name in ("process-node", "kube-scheduler", "kube-controller-manager", "kube-apiserver"):
        stop(name)
    for name in ("etcd", "minio"):
        stop(name)
    if forget:
        for state in ("etcd", "s3-data", "node", "logs"):
            shutil.rmtree(DEV / state, ignore_errors=True)
        log("down; state removed (binaries, certificates and .dev/s3.env kept)")


def status() -> int:
    names = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
    for name in (*names, "process-node", "minio"):
        pid = _pid(name)
        print(f"{name:24} {'running pid ' + str(pid) if pid else 'stopped'}")
    return 0 if all_running() else 1


def print_usage() -> None:
    print(
        f"""
Local cluster is up.
  export KUBECONFIG={DEV / "kubeconfig"} PATH={BIN}:$PATH
  kubectl get nodes                 # {NODE_NAME}: the process node (a fake kubelet)
  set -a; . {DEV / "s3.env"}; set +a  # S3 settings for aws/boto3 (bucket {BUCKET})
  make cluster-down                 # stop it
Logs: {LOGS}"""
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args()
    DEV.mkdir(exist_ok=True)
    if args.command == "up":
        up()
    elif args.command == "down":
        down()
    else:
        return status()
    return 0


if __name__ == "__main__":
    sys.exit(main())
