"""Running the OpenAI-compatible API server against the local cluster, as the chart does.

- `install_user_role`: the chart's kubetune-user ClusterRole (helm template), so the callers'
  rights are exactly what the chart ships;
- `user_token`: a ServiceAccount in a namespace, bound to that role (or to nothing), and a
  token for it: the API key a user would get from `kubectl create token`;
- `ApiServerProcess`: `kubetune-api` as a subprocess with the chart's settings (bucket, prefix,
  endpoint, catalogue, S3 keys from the environment); like the chart's pod it has no
  Kubernetes credential of its own (the admin kubeconfig only tells it where the API server
  is and which CA to trust; it never reads the user part).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localenv.testing import ROOT, Cluster, wait_until

CHART = ROOT / "charts" / "kubetune"
API_BIN = Path(sys.executable).parent / "kubetune-api"


def chat_lines(count: int, seed: int = 0) -> bytes:
    sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
    import assets  # noqa: PLC0415

    return "".join(json.dumps(r) + "\n" for r in assets.chat_records(count, seed)).encode()


def preference_lines(count: int) -> bytes:
    """Preference pairs in the hosted API's DPO layout."""
    lines = []
    for i in range(count):
        record = {
            "input": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot say."}],
        }
        lines.append(json.dumps(record) + "\n")
    return "".join(lines).encode()


@contextmanager
def install_user_role(cluster: Cluster) -> Iterator[str]:
    """The chart's user ClusterRole under a unique release name; yields its name."""
    release = f"kt-{uuid.uuid4().hex[:6]}"
    rendered = subprocess.run(
        [str(cluster.bin / "helm"), "template", release, str(CHART),
         "--show-only", "templates/user-rbac.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (role,) = [d for d in yaml.safe_load_all(rendered) if d]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
    try:
        yield str(role["metadata"]["name"])
    finally:
        cluster.kubectl("delete", "clusterrole", role["metadata"]["name"], "--wait=false",
                        check=False)  # fmt: skip


def user_token(cluster: Cluster, namespace: str, name: str, role: str | None) -> str:
    """A ServiceAccount `name` in `namespace`, bound to ClusterRole `role` there (or to
    nothing), and a token for it."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": name, "namespace": namespace}},
    ]  # fmt: skip
    if role:
        docs.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": f"{name}-kubetune-user", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        })  # fmt: skip
    cluster.apply(docs, namespace)
    return cluster.kubectl(
        "create", "token", name, "-n", namespace, "--duration", "2h"
    ).stdout.strip()


@dataclass
class ApiServerProcess:
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ApiServerProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(API_BIN)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

        def healthy() -> bool:
            assert self.process is not None and self.process.poll() is None, self.tail()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(healthy, 30, "kubetune-api to answer /healthz")
        return self

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def api_server_env(
    cluster: Cluster,
    *,
    port: int,
    prefix: str,
    models: list[dict[str, Any]],
    workdir: Path,
    max_upload_bytes: int,
) -> dict[str, str]:
    catalogue = workdir / "models.json"
    catalogue.write_text(json.dumps(models))
    s3 = cluster.s3_env
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBETUNE_", "AWS_", "OPENAI_"))}  # fmt: skip
    env.update({
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBETUNE_API_PORT": str(port),
        "KUBETUNE_API_BUCKET": s3["KUBETUNE_S3_BUCKET"],
        "KUBETUNE_API_PREFIX": prefix,
        "KUBETUNE_API_STORAGE_ENDPOINT": s3["AWS_ENDPOINT_URL"],
        "KUBETUNE_API_MODELS_FILE": str(catalogue),
        "KUBETUNE_API_MAX_UPLOAD_BYTES": str(max_upload_bytes),
        "AWS_ACCESS_KEY_ID": s3["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"],
    })  # fmt: skip
    return env
