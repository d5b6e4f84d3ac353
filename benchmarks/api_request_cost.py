"""What each request a FineTuneJob causes costs the control plane, no operator running.

    make cluster-up
    .venv/bin/python benchmarks/api_request_cost.py              # 400 per kind x 3 rounds
    .venv/bin/python benchmarks/api_request_cost.py --quick      # 20 per kind, 1 round

operator_scale.py measures the control plane's CPU for a whole burst of FineTuneJobs; this
splits it by request kind, to say what is left to cut per FineTuneJob and what is not the
operator's. Per round, in a fresh namespace, N requests of each kind from 8 threads as admin,
one kind after the other, and the CPU seconds kube-apiserver, etcd and kube-controller-manager
used meanwhile (plus 2 s after the last request, for the controllers' reactions: the Job
controller's status update of each new suspended Job is counted with the Job creates):

* ftj_create: the user's FineTuneJob (operator_scale.finetunejob, suspended);
* job_create: its Job, as the operator builds it (manifests.children), suspended;
* ftj_status_patch: the operator's first status patch (status.status_patch), merge patch;
* ftj_progress_patch: a trainer's progress report (a status merge patch of stage, progress and
  metrics) once status.jobName is set, every 10 s per running job: the CRD's immutability
  rule compares the spec with the old one on each;
* event_create: the Event of the first phase, as Kopf posts it;
* ftj_label_patch, job_label_patch: a one-label merge patch of a FineTuneJob and of a Job (what
  any update of each kind costs, whatever it changes).

The namespace is deleted, and gone, before the next round. Results:
docs/benchmarks/api_request_cost.json (per kind: the median over rounds of milliseconds of CPU
per request, per process).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

import benchlib  # noqa: E402
from kubeapi import Api  # noqa: E402
from operator_scale import FTJ_API, control_plane_cpu, finetunejob  # noqa: E402

from kubetune_operator import manifests, observed, status  # noqa: E402
from kubetune_operator.settings import OperatorSettings  # noqa: E402
from localenv.testing import Cluster  # noqa: E402

PROCESSES = ("kube-apiserver", "etcd", "kube-controller-manager")
MERGE = {"Content-Type": "application/merge-patch+json"}
SETTLE_S = 2.0


def measure(count: int, request: Callable[[int], Any]) -> dict[str, float]:
    """ms of CPU per request of each control-plane process, for `count` requests."""
    before = control_plane_cpu()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(request, range(count)))
    time.sleep(SETTLE_S)
    after = control_plane_cpu()
    return {p: round(1000 * (after[p] - before[p]) / count, 2) for p in PROCESSES}


def event(namespace: str, ftj: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    meta = ftj["metadata"]
    return {
        "metadata": {"name": f"kubetune-{uuid.uuid4().hex}"},
        "involvedObject": {"apiVersion": ftj["apiVersion"], "kind": "FineTuneJob",
                           "name": meta["name"], "namespace": namespace, "uid": meta["uid"]},
        "reason": "Suspended",
        "message": "Suspended: spec.suspend is true. Created training Job x-train.",
        "type": "Normal",
        "source": {"component": "kubetune-operator"},
        "reportingComponent": "kubetune-operator",
        "reportingInstance": "api-request-cost",
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }  # fmt: skip


def progress_body(i: int) -> str:
    """A trainer's progress report, as reporting.py sends it (stage, progress, metrics)."""
    step = 10 + i % 90
    progress = {"epoch": step / 100, "step": step, "totalSteps": 100, "percent": float(step),
                "etaSeconds": 900 - 9 * step}  # fmt: skip
    return json.dumps({"status": {"stage": "Training", "progress": progress,
                                  "metrics": {"trainLoss": 1.25}}})  # fmt: skip


def one_round(api: Api, count: int) -> dict[str, dict[str, float]]:
    namespace = f"api-cost-{uuid.uuid4().hex[:6]}"
    api.json("POST", "/api/v1/namespaces", json={"metadata": {"name": namespace}})
    settings = OperatorSettings()
    ftjs_path = f"{FTJ_API}/namespaces/{namespace}/finetunejobs"
    jobs_path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    ftjs: list[dict[str, Any]] = [{} for _ in range(count)]
    jobs: list[dict[str, Any]] = [{} for _ in range(count)]
    label = json.dumps({"metadata": {"labels": {"bench": "x"}}})
    try:
        for i in range(3):  # warm the handlers and the connections
            api.json("POST", ftjs_path, json=finetunejob(f"warm-{i}"))

        def create_ftj(i: int) -> None:
            ftjs[i] = api.json("POST", ftjs_path, json=finetunejob(f"b-{i:05d}"))

        def create_job(i: int) -> None:
            target = manifests.target(ftjs[i], settings)
            jobs[i] = api.json("POST", jobs_path, json=manifests.children(target, settings)[-1])

        def status_body(i: int) -> str:
            spec = manifests.effective_spec(manifests.parse_spec(ftjs[i]), settings)
            job = observed.slim_job(jobs[i])
            _, patch = status.status_patch(ftjs[i], job, [], datetime.now(UTC), spec=spec)
            return json.dumps({"status": patch})

        results = {"ftj_create": measure(count, create_ftj)}
        results["job_create"] = measure(count, create_job)
        bodies = [status_body(i) for i in range(count)]
        results["ftj_status_patch"] = measure(
            count,
            lambda i: api.json("PATCH", f"{ftjs_path}/b-{i:05d}/status", data=bodies[i],
                               headers=MERGE),
        )  # fmt: skip
        results["ftj_progress_patch"] = measure(
            count,
            lambda i: api.json("PATCH", f"{ftjs_path}/b-{i:05d}/status",
                               data=progress_body(i), headers=MERGE),
        )  # fmt: skip
        results["event_create"] = measure(
            count,
            lambda i: api.json("POST", f"/api/v1/namespaces/{namespace}/events",
                               json=event(namespace, ftjs[i])),
        )  # fmt: skip
        results["ftj_label_patch"] = measure(
            count, lambda i: api.json("PATCH", f"{ftjs_path}/b-{i:05d}", data=label, headers=MERGE)
        )
        results["job_label_patch"] = measure(
            count,
            lambda i: api.json("PATCH", f"{jobs_path}/{jobs[i]['metadata']['name']}",
                               data=label, headers=MERGE),
        )  # fmt: skip
        return results
    finally:
        api.call("DELETE", f"/api/v1/namespaces/{namespace}")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # the next round must not pay for this deletion
            if api.call("GET", f"/api/v1/namespaces/{namespace}").status_code == 404:
                break
            time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=None, help="requests per kind (400)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="20 per kind, one round")
    parser.add_argument("--out", type=Path, default=benchlib.DOCS_DIR / "api_request_cost.json")
    args = parser.parse_args(argv)
    count = args.count or (20 if args.quick else 400)
    rounds = args.rounds or (1 if args.quick else 3)

    cluster = Cluster.up()
    api = Api(cluster.kubeconfig)
    runs = []
    for i in range(rounds):
        runs.append(one_round(api, count))
        print(f"round {i + 1}: {json.dumps(runs[-1])}", flush=True)
    kinds = list(runs[0])
    median = {
        kind: {p: benchlib.median([r[kind][p] for r in runs]) for p in PROCESSES} for kind in kinds
    }
    operator = ("job_create", "ftj_status_patch", "event_create")
    doc = {
        "benchmark": "api_request_cost",
        "command": benchlib.command_line(),
        "date": benchlib.now(),
        "device": benchlib.device_info(with_torch=False),
        "count": count,
        "rounds": rounds,
        "unit": "ms of CPU per request (median over rounds)",
        "runs": runs,
        "median": median,
        "per_finetunejob": {
            "user's create": median["ftj_create"],
            "operator's requests (Job create incl. the Job controller's reaction, status "
            "patch, Event)": {p: round(sum(median[k][p] for k in operator), 2) for p in PROCESSES},
        },
    }
    benchlib.write_json(args.out, doc)
    print(f"api_request_cost: wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
