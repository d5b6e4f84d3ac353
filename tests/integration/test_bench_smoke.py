"""Smoke runs of the control-plane benchmarks (benchmarks/operator_scale.py, crd_admission.py,
api_request_cost.py, startup.py).

Far too small to measure anything: they check that the scripts run against the local cluster and
write complete results (keys present, numbers positive). No timing is asserted.

startup.py is only started with --help here: a real run installs the chart, whose cluster-wide
operator would then also reconcile the FineTuneJobs of the other cluster tests. Its log parsing
is checked on a recorded trainer log instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localenv.testing import ROOT, Cluster

pytestmark = pytest.mark.cluster

BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{script} {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def positive(value: Any, what: str) -> None:
    assert isinstance(value, int | float) and value > 0, f"{what}: {value!r}"


def test_operator_scale_smoke(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "operator_scale.json"
    # --allow-other-operators: a cluster-wide chart installed by another test or session must
    # not fail the smoke run (its figures would be off, but only keys and signs are checked).
    run(
        "operator_scale.py", "--jobs", "20", "--quick", "--configs", "shipped",
        "--idle-seconds", "2", "--out", str(out), "--allow-other-operators",
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert {"command", "device", "jobs", "targets", "results", "targets_met"} <= set(data)
    assert data["jobs"] == 20
    result = data["results"]["shipped"]
    assert result["done"] == 20, result
    for key in ("all_done_s", "create_s"):
        positive(result[key], key)
    for key in ("p50", "p99", "max"):
        positive(result["latency_s"][key], f"latency {key}")
    positive(result["operator"]["cpu_s"], "operator cpu_s")
    positive(result["operator"]["peak_rss_mb"], "peak_rss_mb")
    requests = result["api_requests"]
    positive(requests["per_object"], "requests per object")
    # Each FineTuneJob's one child (its Job), and the namespace's trainer identity (three objects)
    # once for all twenty: 1.15 creates each. Two or more: the handlers raced to create the identity.
    assert 1 <= requests["per_object_by_verb"]["create"] < 2, requests
    assert result["idle"]["cpu_s"] >= 0
    assert result["during_batch_cpu_s"]["stolen by the hypervisor"] >= 0
    assert set(data["targets_met"]["shipped"]) == set(data["targets"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_crd_admission_smoke(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "crd_admission.json"
    run("crd_admission.py", "--jobs", "10", "--rounds", "2", "--before", "HEAD", "--out", str(out))
    data = json.loads(out.read_text())
    assert data["jobs"] == 10 and data["rounds"] == 2
    assert set(data["runs"]) == {"current", "no_cel", "before"}
    for name, runs in data["runs"].items():
        assert len(runs) == 2
        for result in runs:
            keys = ("all_creates_s", "p50_ms", "p99_ms", "apiserver_cpu_ms_per_create")
            for key in (*keys, "object_bytes"):
                positive(result[key], f"{name} {key}")
    assert data["ratios_vs_current"]["current"] == 1.0
    # This tree's CRD is back, CEL rules and all: no variant is left installed.
    crd = cluster.kubectl("get", "crd", "finetunejobs.kubetune.dev", "-o", "json").stdout
    assert "x-kubernetes-validations" in crd


def test_api_request_cost_smoke(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "api_request_cost.json"
    run("api_request_cost.py", "--count", "20", "--rounds", "1", "--out", str(out))
    data = json.loads(out.read_text())
    kinds = {"ftj_create", "job_create", "ftj_status_patch", "ftj_progress_patch", "event_create",
             "ftj_label_patch", "job_label_patch"}  # fmt: skip
    assert set(data["median"]) == kinds and len(data["runs"]) == 1
    for kind, cost in data["median"].items():
        positive(cost["kube-apiserver"], f"{kind} kube-apiserver")
    # Its namespace is gone before it returns (the next round, or test, does not pay for it).
    namespaces = cluster.kubectl("get", "namespaces", "-o", "name").stdout
    assert "api-cost-" not in namespaces


def test_naive_operator_and_startup_scripts_start() -> None:
    naive = run("kopf_defaults_operator.py", "--help", timeout=60)
    assert "KUBETUNE_NAMESPACES" in naive.stdout
    startup = run("startup.py", "--help", timeout=60)
    assert "--runs" in startup.stdout


TRAINER_LOG = """\
2026-11-26 10:03:00,588 INFO kubetune_trainer.reporting: stage: Fetching
2026-11-26 10:03:00,724 INFO kubetune_trainer.storage: fetched s3://b/data/train.jsonl: 1 objects
2026-11-26 10:03:00,856 INFO kubetune_trainer.storage: fetched s3://b/model/: 6 objects
2026-11-26 10:03:05,422 INFO kubetune_trainer.reporting: stage: Preparing
2026-11-26 10:03:06,128 INFO kubetune_trainer.reporting: stage: Loading
2026-11-26 10:03:15,194 INFO kubetune_trainer.recipe: parameters: 65,536 trainable of 426,624
2026-11-26 10:03:15,237 INFO kubetune_trainer.reporting: stage: Training
2026-11-26 10:03:16,924 INFO kubetune_trainer.recipe: step 1/57 (1.8%) | epoch 0.05 | loss 6.29
2026-11-26 10:03:18,684 INFO kubetune_trainer.recipe: step 2/57 (3.5%) | epoch 0.11 | loss 6.17
"""


def test_startup_reads_the_trainer_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import startup  # noqa: PLC0415
    finally:
        sys.path.remove(str(BENCH))
    log = tmp_path / "pod-uid" / "containers" / "trainer" / "current.log"
    log.parent.mkdir(parents=True)
    log.write_text(TRAINER_LOG)
    monkeypatch.setattr(startup, "NODE_PODS", tmp_path)
    run_ = startup.Run("job", pod_uid="pod-uid")
    run_.read_log()
    first_step = run_.marks["first_step"]
    assert first_step - run_.marks["stage_fetching"] == pytest.approx(16.336, abs=1e-3)
    assert run_.marks["fetched"] - run_.marks["stage_fetching"] == pytest.approx(0.268, abs=1e-3)
    for key in ("stage_preparing", "stage_loading", "model_ready", "stage_training"):
        assert run_.marks["stage_fetching"] < run_.marks[key] < first_step, key
    run_.marks.update(start=run_.marks["stage_fetching"] - 2, applied=run_.marks["stage_fetching"])
    breakdown = run_.breakdown()
    assert breakdown["first optimizer step"] == pytest.approx(1.687, abs=1e-3)
    assert breakdown["scheduler binds the pod"] is None  # no pod events in this test


def test_data_scale_smoke(tmp_path: Path) -> None:
    """benchmarks/data_scale.py at 200 and 400 records (no cluster needed: local files)."""
    out = tmp_path / "data_scale.json"
    run(
        "data_scale.py", "--sizes", "200,400", "--quick", "--threads", "1",
        "--work", str(tmp_path / "work"), "--out", str(out), timeout=600,
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert {"command", "device", "settings", "targets", "results", "targets_met"} <= set(data)
    assert [size["records"] for size in data["results"]] == [200, 400]
    for size in data["results"]:
        runs = size["runs"]
        assert set(runs) == {"in-memory", "streaming", "streaming-cached"}
        for name, result in runs.items():
            assert "failed" not in result, (name, result)
            assert result["steps"] == 1
            for key in ("peak_rss_mib", "time_to_first_step_s", "setup_s", "data_s"):
                positive(result[key], f"{name} {key}")
            assert result["records"] == size["records"]
        # The same data gives the same examples on every path.
        assert len({r["examples"] for r in runs.values()}) == 1
        assert len({r["total_tokens"] for r in runs.values()}) == 1
    assert set(data["targets_met"]) >= {
        "streaming_peak_rss_within_1_5x",
        "streaming_not_slower_at_smallest",
    }
    assert out.with_suffix(".png").stat().st_size > 0
