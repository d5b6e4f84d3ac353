"""The real images, built and run here with podman (no Docker engine, no image registry).

`build_local_images` runs images/build.sh (what `make images BASE=local VARIANT=cpu` runs): the
three Dockerfiles (operator, trainer, API server) FROM a local Debian bookworm base, the
trainer's CPU variant. `Podman` runs
containers with the settings this machine needs (images/containers.conf and the runc runtime:
no CAP_SYS_RESOURCE, cgroup v1; docs/images.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "images" / "build.sh"
CONTAINERS_CONF = ROOT / "images" / "containers.conf"


def app_version() -> str:
    for line in (ROOT / "charts" / "kubetune" / "Chart.yaml").read_text().splitlines():
        if line.startswith("appVersion:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise ValueError("charts/kubetune/Chart.yaml has no appVersion")


@dataclass(frozen=True)
class LocalImages:
    operator: str
    trainer: str
    api: str
    seconds: float  # how long images/build.sh took (cold or cached)


def build_local_images(timeout: float) -> LocalImages:
    """Build (or find in the layer cache) the images FROM the local base; fail with the log."""
    start = time.monotonic()
    images = "operator trainer api"
    build({"BASE": "local", "VARIANT": "cpu", "IMAGES": images, "REGISTRY": ""}, timeout)
    version = app_version()
    return LocalImages(
        operator=f"localhost/kubetune/operator:{version}",
        trainer=f"localhost/kubetune/trainer:{version}-cpu",
        api=f"localhost/kubetune/api:{version}",
        seconds=time.monotonic() - start,
    )


@contextmanager
def local_registry(directory: Path, port: int) -> Iterator[str]:
    """An OCI registry on 127.0.0.1:`port` (Debian's docker-registry, installed with apt when
    missing), storing under `directory`; yields its address. Plain HTTP: push and pull with
    --tls-verify=false."""
    if shutil.which("docker-registry") is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "docker-registry"],
            check=True,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage: {{filesystem: {{rootdirectory: {directory / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    with (directory / "registry.log").open("wb") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=2):
                    break
            except OSError as err:
                if time.monotonic() > deadline or process.poll() is not None:
                    output = (directory / "registry.log").read_text()
                    raise AssertionError(f"registry did not start: {err}\n{output}") from None
                time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=10)


def build(env: dict[str, str], timeout: float) -> None:
    """Run images/build.sh with these settings; fail with the end of its log."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        env={**os.environ, "REGISTRY": "", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"images/build.sh failed:\n{(result.stdout + result.stderr)[-6000:]}")


@dataclass(frozen=True)
class Podman:
    """`podman --runtime runc` with images/containers.conf (as images/build.sh uses it here)."""

    def command(self, *args: str) -> list[str]:
        return ["podman", "--runtime", "runc", *args]

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def check(self, *args: str, timeout: float = 120) -> str:
        result = self.run(*args, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stderr[-4000:]}")
        return result.stdout

    @contextmanager
    def container(self) -> Iterator[str]:
        """A fresh container name; that container is removed afterwards, whatever happened."""
        name = f"kubetune-test-{uuid.uuid4().hex[:8]}"
        try:
            yield name
        finally:
            self.run("rm", "--force", "--time", "5", name)

    def config(self, image: str) -> dict[str, object]:
        """The image's OCI config (User, Entrypoint, Env, ...)."""
        inspected = json.loads(self.check("image", "inspect", image))
        return dict(inspected[0]["Config"])

    def size_mb(self, image: str) -> int:
        return int(self.check("image", "inspect", "--format", "{{.Size}}", image)) // 1_000_000
