"""The hashed locks in requirements/ agree with pyproject.toml and with each other.

Each lock's header names the extras it was compiled for (`make lock` writes it; the dev lock
has them all). For the environments the project installs into (Python 3.11 on this machine and
the local images, 3.12 in the CUDA image; Linux x86-64), every requirement of those extras must
be pinned once, inside its pyproject range, with hashes; the image locks must pin what the dev
lock pins, so the images run the versions the tests ran.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[3]
LOCKS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ENVIRONMENTS = {
    f"py{minor}": {
        "python_version": minor,
        "python_full_version": f"{minor}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    for minor in ("3.11", "3.12")
}
STALE = "run `make lock` after changing pyproject.toml"


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: int


def read_lock(path: Path) -> tuple[list[str], list[Pin]]:
    """(extras named in the header's compile command, pinned entries)."""
    return parse_lock(path.read_text(), path.name)


def parse_lock(text: str, name: str) -> tuple[list[str], list[Pin]]:
    command = text.split("\n", 2)[1]
    extras = re.findall(r"--extra (\S+)", command)
    if "--all-extras" in command:
        extras = list(PYPROJECT["optional-dependencies"])
    pins = []
    # An entry: `name==version [; marker] \` then indented `--hash=` lines.
    for entry in re.split(r"\n(?=[^\s#])", text):
        if entry.startswith("#") or not entry.strip():
            continue
        requirement = Requirement(entry.split("\\", 1)[0].strip())
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{name}: {requirement} is not an exact pin"
        pins.append(
            Pin(
                canonicalize_name(requirement.name),
                Version(spec.version),
                requirement.marker,
                entry.count("--hash=sha256:"),
            )
        )
    return extras, pins


def pinned_in(pins: list[Pin], environment: dict[str, str]) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for pin in pins:
        if pin.marker is None or pin.marker.evaluate(environment):
            assert pin.name not in out, f"{pin.name} pinned twice for {environment}"
            out[pin.name] = pin.version
    return out


def declared(extras: list[str]) -> list[Requirement]:
    lines = list(PYPROJECT["dependencies"])
    for extra in extras:
        lines += PYPROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


LOCK_FILES = sorted(p.name for p in LOCKS.glob("*.txt"))


def test_there_is_a_lock_per_install_set() -> None:
    assert LOCK_FILES == ["api.txt", "dev.txt", "operator.txt", "trainer.txt"]
    # .venv gets every extra, so the tests of each can run, and a new extra is locked at once.
    assert read_lock(LOCKS / "dev.txt")[0] == list(PYPROJECT["optional-dependencies"])
    assert read_lock(LOCKS / "api.txt")[0] == ["api"]
    assert read_lock(LOCKS / "operator.txt")[0] == ["operator"]
    assert read_lock(LOCKS / "trainer.txt")[0] == ["trainer"]


@pytest.mark.parametrize("environment", sorted(ENVIRONMENTS))
@pytest.mark.parametrize("lock", LOCK_FILES)
def test_lock_pins_every_requirement_within_its_pyproject_range(
    lock: str, environment: str
) -> None:
    env = ENVIRONMENTS[environment]
    extras, pins = read_lock(LOCKS / lock)
    assert all(pin.hashes > 0 for pin in pins), f"{lock}: an entry without hashes"
    pinned = pinned_in(pins, env)
    for requirement in declared(extras):
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{lock} does not pin {requirement} ({STALE})"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{lock} pins {name}=={pinned[name]}, outside {requirement} ({STALE})"
        )


@pytest.mark.parametrize("environment", sorted(ENVIRONMENTS))
@pytest.mark.parametrize("lock", ["api.txt", "operator.txt", "trainer.txt"])
def test_image_lock_pins_what_the_dev_lock_pins(lock: str, environment: str) -> None:
    env = ENVIRONMENTS[environment]
    dev = pinned_in(read_lock(LOCKS / "dev.txt")[1], env)
    image = pinned_in(read_lock(LOCKS / lock)[1], env)
    differ = {name: (str(v), str(dev.get(name))) for name, v in image.items() if dev.get(name) != v}
    assert not differ, f"{lock} vs dev.txt (lock, dev): {differ} ({STALE})"


def test_cpu_variant_drops_only_what_gpu_code_paths_load() -> None:
    def select(variant: str) -> set[str]:
        text = subprocess.run(
            ["awk", "-v", f"variant={variant}", "-f", "variant.awk", "trainer.txt"],
            cwd=LOCKS, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        pins = parse_lock(text, f"trainer.txt ({variant})")[1]
        assert text.count("--hash=") == sum(pin.hashes for pin in pins)  # no stray hash lines
        return {pin.name for pin in pins}

    full, cpu = select("cuda"), select("cpu")
    assert full == {pin.name for pin in read_lock(LOCKS / "trainer.txt")[1]}
    # torch's CPU code links the CUDA libraries (libtorch_cpu.so needs libcudart, libcupti).
    assert {"torch", "nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13"} <= cpu
    assert full - cpu == {"triton", "cuda-bindings", "cuda-pathfinder", "cuda-toolkit"}
