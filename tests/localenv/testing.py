"""Test helpers for the local environment (used by tests/conftest.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from localenv.cluster import build_binaries

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / ".dev"
T = TypeVar("T")


@dataclass
class Cluster:
    """The running local cluster, seen through .dev/kubeconfig, .dev/bin and .dev/s3.env."""

    kubeconfig: Path = DEV / "kubeconfig"
    bin: Path = DEV / "bin"
    s3_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def up(cls) -> Cluster:
        """Start the cluster if needed, with helm built too (its users render or install the
        chart; the first call builds it, a few minutes, then it is cached)."""
        subprocess.run([sys.executable, str(ROOT / "tests/localenv/cluster.py"), "up"], check=True)
        build_binaries("helm")
        lines = (DEV / "s3.env").read_text().splitlines()
        env = dict(line.split("=", 1) for line in lines if "=" in line)
        return cls(s3_env=env)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]], namespace: str) -> None:
        items = manifest if isinstance(manifest, list) else [manifest]
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        self.kubectl("apply", "-n", namespace, "-f", "-", input=doc)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        ns = ["-n", namespace] if namespace else []
        return dict(json.loads(self.kubectl("get", kind, name, *ns, "-o", "json").stdout))

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use this cluster and S3 server."""
        return {**os.environ, **self.s3_env, "KUBECONFIG": str(self.kubeconfig)}

    @contextmanager
    def namespace(self, labels: dict[str, str] | None = None) -> Iterator[str]:
        name = f"t-{uuid.uuid4().hex[:8]}"
        meta: dict[str, Any] = {"name": name, "labels": labels or {}}
        doc = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        self.kubectl("apply", "-f", "-", input=doc)

        # Pods need the namespace's default ServiceAccount (made by the controller-manager).
        def has_default_sa() -> bool:
            result = self.kubectl("get", "sa", "default", "-n", name, check=False)
            return result.returncode == 0

        wait_until(has_default_sa, timeout=30, what=f"default ServiceAccount in {name}")
        try:
            yield name
        finally:
            self.kubectl("delete", "namespace", name, "--wait=false", check=False)


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago (held together while
    the kernel picks them, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]
