"""A release of the chart of its own for one e2e module: the quickstart assets in MinIO, the
CRDs from crds/ (so it can live beside other modules' releases), the S3 Secret, and an operator
watching one namespace, with ports of its own (pods share the host's network here)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from localenv.testing import Cluster, free_ports

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "quickstart"))
import demo  # noqa: E402


@contextmanager
def chart_release(
    cluster: Cluster,
    *,
    release: str,
    namespace: str,
    release_namespace: str,
    output_prefix: str,
    values: Sequence[str] = (),
) -> Iterator[Cluster]:
    """Installed on entry, uninstalled on exit, with its namespaces and everything under
    `output_prefix` in S3. `values`: more `--set` assignments."""
    env = cluster.s3_env
    demo.upload_assets(env)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    # Left over from an earlier run (its teardown does not wait): gone before we start.
    cluster.kubectl("delete", "namespace", namespace, release_namespace, "--ignore-not-found",
                    "--wait=true", timeout=180)  # fmt: skip
    demo.create_secret(env, namespace)
    metrics, health = free_ports(2)
    sets = [
        "crds.enabled=false",
        f"operator.watchNamespaces={{{namespace}}}",
        f"operator.metricsPort={metrics}", f"metrics.service.port={metrics}",
        f"operator.healthPort={health}", "operator.logFormat=text",
        f"trainer.storage.endpoint={env['AWS_ENDPOINT_URL']}",
        "trainer.storage.credentialsSecretName=s3-credentials",
        *values,
    ]  # fmt: skip
    helm = [str(cluster.bin / "helm"), "--kubeconfig", str(cluster.kubeconfig)]
    subprocess.run(
        [*helm, "upgrade", "--install", release, str(ROOT / "charts/kubetune"),
         "--namespace", release_namespace, "--create-namespace", "--wait", "--timeout", "3m",
         *(arg for value in sets for arg in ("--set", value))],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    try:
        yield cluster
    finally:
        subprocess.run([*helm, "uninstall", release, "--namespace", release_namespace, "--wait"],
                       check=False, capture_output=True)  # fmt: skip
        cluster.kubectl("delete", "namespace", namespace, release_namespace, "--wait=false",
                        check=False)  # fmt: skip
        demo.assets.remove(f"{output_prefix}/", env)
