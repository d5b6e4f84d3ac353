"""The Dockerfiles: lint-clean, and installing exactly the locked set pyproject.toml declares.

The Dockerfiles are linted with hadolint and checked against pyproject.toml and the locks; the
operator and API server images' promise of "no torch" is checked by importing every module of
their package in a fresh interpreter. The images themselves are built and run by
tests/integration/test_built_images.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGES = {
    # Dockerfile: (pyproject extra it installs, console script it runs, package it serves)
    "Dockerfile": ("operator", "kubetune-operator", "kubetune_operator"),
    "trainer_image/Dockerfile": ("trainer", "kubetune-trainer", "kubetune_trainer"),
    "api_server/Dockerfile": ("api", "kubetune-api", "kubetune_api"),
}


def hadolint() -> str:
    return str(Path(sys.executable).parent / "hadolint")


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_is_lint_clean(dockerfile: str) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_installs_its_extra_from_the_lock_and_runs_its_console_script(
    dockerfile: str,
) -> None:
    extra, script, package = IMAGES[dockerfile]
    text = (ROOT / dockerfile).read_text()
    # The extra's hashed lock (requirements/<extra>.txt, see test_lock.py), then the project
    # itself without dependencies, so nothing unpinned is resolved at build time.
    runs = re.findall(r"^RUN (.*?[^\\])$", text, re.MULTILINE | re.DOTALL)
    locked = [r for r in runs if "pip install --require-hashes" in r]
    assert len(locked) == 1 and f"requirements/{extra}.txt" in locked[0], locked
    assert [r for r in runs if re.search(r"pip install .*--no-deps \.$", r)], runs
    assert extra in PYPROJECT["project"]["optional-dependencies"]
    entrypoint = re.findall(r"^ENTRYPOINT \[\"([^\"]+)\"\]", text, re.MULTILINE)
    assert entrypoint == [script]
    assert PYPROJECT["project"]["scripts"][script].startswith(f"{package}.")


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dockerfile_runs_as_numeric_non_root_user(dockerfile: str) -> None:
    users = re.findall(r"^USER (\S+)", (ROOT / dockerfile).read_text(), re.MULTILINE)
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can be verified


@pytest.mark.parametrize("package", ["kubetune_operator", "kubetune_api"])
def test_small_image_modules_import_without_torch(package: str) -> None:
    code = (
        f"import importlib, pkgutil, sys, {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        "heavy = sorted(n for n in ('torch', 'transformers', 'peft') if n in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
