"""Shared helpers for the benchmark scripts: device description, JSON output, S3 settings, plots.

The scripts run as `python benchmarks/<name>.py`, so this module is imported by its plain name.
Nothing here measures anything; the scripts time their own runs side by side.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "docs" / "benchmarks"
S3_ENV_FILE = ROOT / ".dev" / "s3.env"

# tests/: localenv.models, the tiny models and tokenizers the tests build too.
for _extra in (ROOT / "trainer_image", ROOT / "examples" / "quickstart", ROOT / "tests"):
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))


def cpu_model() -> str:
    """The `Model name` line of lscpu (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version(module)
    except Exception:
        return None


def device_info(*, with_torch: bool = True) -> dict[str, Any]:
    """What the figures were measured on; every result file carries it."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if with_torch:
        import torch  # noqa: PLC0415

        info["torch"] = torch.__version__
        info["transformers"] = _version("transformers")
        info["peft"] = _version("peft")
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    else:
        info["torch"] = _version("torch")
    info["boto3"] = _version("boto3")
    return info


def device_line(info: Mapping[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return f"{info['cpu']}, {info['cores']} cores{gpu}, torch {info.get('torch')}"


def command_line() -> str:
    """How this run was started, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(ROOT))
    except ValueError:
        shown = str(script)
    return shlex.join([".venv/bin/python", shown, *sys.argv[1:]])


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def load_s3_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """AWS_* settings for the local S3 server: the environment if it names an endpoint, else
    .dev/s3.env (written by `make cluster-up`)."""
    env = dict(os.environ if env is None else env)
    if env.get("AWS_ENDPOINT_URL") and env.get("AWS_ACCESS_KEY_ID"):
        return env
    if not S3_ENV_FILE.is_file():
        raise SystemExit(
            f"no S3 endpoint: set AWS_ENDPOINT_URL and credentials, or run `make cluster-up` "
            f"(which writes {S3_ENV_FILE.relative_to(ROOT)})"
        )
    for line in S3_ENV_FILE.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    return env


def bar_chart(
    path: Path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    ylabel: str,
    footer: str,
    annotations: Sequence[str] | None = None,
    target: float | None = None,
    target_label: str | None = None,
) -> None:
    """A plain bar chart (PNG) with the device and command in a footer."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(max(8.0, 1.15 * len(values)), 4.5), dpi=110)
    colors = ["#8c8c8c", "#2a7ab0", "#55a868", "#c44e52", "#8172b2"]
    bars = ax.bar(
        range(len(values)), values, color=[colors[i % len(colors)] for i in range(len(values))]
    )
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    for i, bar in enumerate(bars):
        text = annotations[i] if annotations else f"{values[i]:.3g}"
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if target is not None:
        ax.axhline(target, color="#c44e52", linestyle="--", linewidth=1)
        if target_label:
            ax.annotate(target_label, (0, target), va="bottom", fontsize=8, color="#c44e52")
    ax.set_ylim(0, max([*values, target or 0]) * 1.18)
    fig.text(0.01, 0.01, footer.replace(" | ", "\n", 1), fontsize=6.5, color="#555555")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
