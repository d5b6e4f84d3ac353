"""The benchmark scripts start, and their smoke modes write complete results.

Smoke runs are far too small to measure anything: they check that every code path runs and
that the JSON has its keys with positive numbers. No timing is asserted anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localenv.testing import Cluster

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = ["s3_pull.py", "trainer_throughput.py", "gpu_throughput.py", "dpo_throughput.py"]
# The test machine is small and shared: one thread per process.
THREADS = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 540) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**(env or os.environ), **THREADS},
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, f"{script} {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def check_device(doc: dict[str, Any]) -> None:
    device = doc["device"]
    assert device["cpu"] and positive(device["cores"]) and device["torch"]
    assert doc["command"].startswith(".venv/bin/python benchmarks/")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_needs_nothing_running(script: str) -> None:
    out = run(script, "--help", timeout=60)
    assert out.startswith("usage:")


@pytest.mark.cluster
def test_s3_pull_quick(cluster: Cluster, tmp_path: Path) -> None:
    out, plot = tmp_path / "s3.json", tmp_path / "s3.png"
    run(
        "s3_pull.py",
        *("--quick", "--shards", "1", "--shard-mib", "4", "--reps", "1"),
        *("--work-dir", str(tmp_path / "work"), "--out", str(out), "--plot", str(plot)),
        env=cluster.env(),
    )
    doc = json.loads(out.read_text())
    check_device(doc)
    assert doc["config"]["total_bytes"] == 4 * 1024 * 1024
    for key in ("baseline", "contender", "single_stream", "contender_warm_cache"):
        row = doc["results"][key]
        assert positive(row["median_wall_s"]) and positive(row["gb_per_s"]), row
    assert positive(doc["ratio_contender_vs_baseline"])
    assert isinstance(doc["target_met"], bool)
    assert plot.stat().st_size > 0
    assert not any((tmp_path / "work").glob("run-*")), "download directories are removed"


@pytest.mark.cluster
@pytest.mark.slow
def test_trainer_throughput_quick(cluster: Cluster, tmp_path: Path) -> None:
    out, plot = tmp_path / "trainer.json", tmp_path / "trainer.png"
    run(
        "trainer_throughput.py",
        *("--quick", "--threads", "1", "--work", str(tmp_path / "work")),
        *("--out", str(out), "--plot", str(plot)),
        env=cluster.env(),
    )
    doc = json.loads(out.read_text())
    check_device(doc)
    lengths = doc["data"]["alpaca_tokens_per_record"]
    assert all(positive(lengths[k]) for k in ("mean", "p50", "p99", "max"))
    for name in ("baseline", "contender"):
        row = doc["runs"][name]
        for key in ("useful_tokens_per_s", "train_s", "process_wall_s", "peak_rss_mib"):
            assert positive(row[key]), (name, key, row)
        assert isinstance(row["train_loss_last_step"], float)
        assert positive(doc["validation_loss"][name]["output_tokens"])
    # Both saw the same records: the same non-padding tokens (truncation is identical).
    baseline, contender = doc["runs"]["baseline"], doc["runs"]["contender"]
    assert baseline["useful_tokens"] == contender["useful_tokens"]
    assert baseline["padding_fraction"] > contender["padding_fraction"]
    assert positive(doc["ratio"]) and positive(doc["validation_loss_ratio"])
    assert set(doc["target"]) >= {"ratio_met", "validation_met", "met"}
    # The recipe's own (packed) validation loss equals the benchmark's one-sequence-at-a-time
    # loss of the same adapter: packing kept the sequences apart.
    check = doc["packing_isolation"]
    assert check["abs_difference"] < 1e-3, check
    assert plot.stat().st_size > 0


@pytest.mark.cluster
@pytest.mark.slow
def test_dpo_throughput_quick(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "dpo.json"
    run(
        "dpo_throughput.py",
        *("--quick", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out)),
        env=cluster.env(),
    )
    doc = json.loads(out.read_text())
    check_device(doc)
    rows = doc["results"]
    assert set(rows) == {"kubetune", "kubetune_unpacked", "trl"}
    for name, row in rows.items():
        for key in ("useful_tokens_per_s", "peak_rss_bytes", "useful_tokens", "steps"):
            assert positive(row[key]), (name, key, row)
    # The same pairs, the same useful tokens, whatever the batching.
    assert len({row["useful_tokens"] for row in rows.values()}) == 1, rows
    assert rows["trl"]["speedup_vs_trl"] == 1.0


@pytest.mark.slow
def test_gpu_throughput_tiny_on_cpu(tmp_path: Path) -> None:
    out, plot = tmp_path / "gpu.json", tmp_path / "gpu.png"
    run(
        "gpu_throughput.py",
        *("--tiny", "--allow-cpu", "--variants", "classic_lora,kubetune_lora,kubetune_qlora"),
        *("--records", "300", "--steps", "1", "--warmup", "1"),
        *("--work", str(tmp_path / "work"), "--out", str(out), "--plot", str(plot)),
    )
    doc = json.loads(out.read_text())
    check_device(doc)
    for name in ("classic_lora", "kubetune_lora"):
        row = doc["results"][name]
        assert "error" not in row, row.get("error")
        for key in ("useful_tokens_per_s", "mfu_useful", "timed_s"):
            assert positive(row[key]), (name, key, row)
    assert positive(doc["results"]["kubetune_lora"]["estimate_gib"])
    isolation = doc["results"]["kubetune_lora"]["isolation_check"]
    assert isolation["max_abs_logit_diff_masked"] < 1e-4 < isolation["max_abs_logit_diff_naive"]
    if doc["device"]["gpu"] is None:
        assert "skipped" in doc["results"]["kubetune_qlora"]
    assert set(doc["summary"]["targets"]) == {"lora_10x", "lora_mfu_55pct", "qlora_6gib_at_1_5x"}
    assert plot.stat().st_size > 0
