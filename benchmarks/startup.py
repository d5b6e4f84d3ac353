"""Start-up: `kubectl apply` of the quickstart FineTuneJob to its first optimizer step.

    make cluster-up
    .venv/bin/python benchmarks/startup.py           # chart as `make demo`, 1 warm-up + 3 runs
    .venv/bin/python benchmarks/startup.py --quick   # no warm-up, 1 run

The cluster is warm: the chart is installed as `make demo` does (examples/quickstart/demo.py:
assets in the local S3 server, the s3-credentials Secret, `helm upgrade --install` with
local-values.yaml; skipped when the release is already deployed), so the operator is running
and the trainer's files are in the page cache. Each run applies examples/quickstart.yaml under
a fresh name and output prefix (so nothing resumes from an earlier checkpoint) with
`kubectl apply`, then records, on this host's wall clock:

* from watch streams (arrival time): the FineTuneJob, its Job and its pod appear, the pod is
  bound to the node (spec.nodeName), the pod reports its container running;
* the trainer process's start (psutil create_time of the pid in the pod's containerID; the
  local process node runs containers as host processes);
* from the trainer's log (.dev/node/pods/<uid>/containers/trainer/current.log, millisecond
  timestamps of the same clock): "stage: Fetching", the last "fetched" line, "stage: Preparing",
  "stage: Loading", "parameters:" (model loaded, adapters added), "stage: Training" and the
  first "step 1/" line, written right after the first optimizer step.

Then the FineTuneJob is deleted (and its pod waited for) before the next run. Separately, in a
fresh interpreter, the import time of each library the trainer loads on the way (the same order)
is measured, since imports dominate. Results: docs/benchmarks/startup.json and startup.png; see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
for _extra in (ROOT / "tests", ROOT / "examples" / "quickstart"):
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))

import benchlib  # noqa: E402
import demo  # noqa: E402
from kubeapi import Api, Watch  # noqa: E402

from localenv.testing import DEV, Cluster  # noqa: E402

NAMESPACE = demo.NAMESPACE  # the chart of `make demo` watches only this namespace
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
FTJ_API = "/apis/kubetune.dev/v1alpha1"
FTJ_LABEL = "kubetune.dev/finetunejob"
TARGET_S = 30.0
NODE_PODS = DEV / "node" / "pods"
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
# Trainer log markers, in the order they appear: (milestone, text the message starts with).
MARKERS = (
    ("stage_fetching", "stage: Fetching"),
    ("stage_preparing", "stage: Preparing"),
    ("stage_loading", "stage: Loading"),
    ("model_ready", "parameters:"),
    ("stage_training", "stage: Training"),
    ("first_step", "step 1/"),
)
# The breakdown: (segment, from milestone, to milestone).
SEGMENTS = (
    ("kubectl apply", "start", "applied"),
    ("operator creates the Job", "applied", "job_seen"),
    ("Job controller creates the pod", "job_seen", "pod_seen"),
    ("scheduler binds the pod", "pod_seen", "pod_scheduled"),
    ("node starts the container", "pod_scheduled", "process_started"),
    ("python, imports (torch), config", "process_started", "stage_fetching"),
    ("fetch data + model from S3", "stage_fetching", "fetched"),
    ("tokenizer (transformers import)", "fetched", "stage_preparing"),
    ("tokenize, plan", "stage_preparing", "stage_loading"),
    ("model + LoRA (peft import)", "stage_loading", "model_ready"),
    ("optimizer, resume check", "model_ready", "stage_training"),
    ("first optimizer step", "stage_training", "first_step"),
)
# Imports the trainer makes on the way to its first step, in its order (a fresh interpreter).
IMPORT_STEPS = (
    ("python start", None),
    ("torch", "import torch"),
    ("kubetune_trainer.recipe (accelerate, boto3, httpx)", "import kubetune_trainer.recipe"),
    ("transformers AutoTokenizer", "from transformers import AutoTokenizer"),
    ("transformers Llama model class", "from transformers.models.llama import modeling_llama"),
    ("peft", "import peft; from peft import LoraConfig, get_peft_model"),
)
IMPORT_PROBE = """
import json, sys, time
marks = [("python start", time.time() - float(sys.argv[1]))]
if sys.argv[3] == "hidden":  # as kubetune_trainer.__main__.hide_bitsandbytes does for lora
    sys.modules["bitsandbytes"] = None
for label, statement in json.loads(sys.argv[2]):
    t = time.perf_counter()
    exec(statement)
    marks.append((label, time.perf_counter() - t))
print(json.dumps(marks))
"""
# The two ways the imports were measured, side by side (alternating).
IMPORT_VARIANTS = {
    "trainer (lora: bitsandbytes hidden)": "hidden",
    "bitsandbytes importable (before)": "importable",
}


def log(message: str) -> None:
    print(f"startup: {message}", file=sys.stderr, flush=True)


def process_start_time(pid: int) -> float:
    """When a process started, on the wall clock, to 10 ms. (psutil's create_time adds the boot
    time, which /proc gives in whole seconds: up to a second off.)"""
    stat = Path(f"/proc/{pid}/stat").read_text()
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime
    now, uptime = time.time(), float(Path("/proc/uptime").read_text().split()[0])
    return now - uptime + ticks / os.sysconf("SC_CLK_TCK")


def log_time(stamp: str) -> float:
    """The trainer's asctime (local time, milliseconds) as a Unix timestamp."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Run:
    name: str
    marks: dict[str, float] = field(default_factory=dict)
    pod_uid: str = ""
    pid: int | None = None
    phase: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, key: str, at: float) -> None:
        with self.lock:
            self.marks.setdefault(key, at)

    def on_ftj(self, _type: str, obj: dict[str, Any], at: float) -> None:
        if obj.get("metadata", {}).get("name") == self.name:
            self.mark("ftj_seen", at)
            self.phase = str((obj.get("status") or {}).get("phase") or "")

    def on_job(self, _type: str, obj: dict[str, Any], at: float) -> None:
        if (obj.get("metadata", {}).get("labels") or {}).get(FTJ_LABEL) == self.name:
            self.mark("job_seen", at)

    def on_pod(self, _type: str, obj: dict[str, Any], at: float) -> None:
        meta = obj.get("metadata", {})
        if (meta.get("labels") or {}).get(FTJ_LABEL) != self.name:
            return
        self.mark("pod_seen", at)
        if not self.pod_uid:
            self.pod_uid = str(meta.get("uid", ""))
        if (obj.get("spec") or {}).get("nodeName"):
            self.mark("pod_scheduled", at)
        for status in (obj.get("status") or {}).get("containerStatuses") or []:
            if "running" in (status.get("state") or {}):
                self.mark("pod_running_seen", at)
            container_id = str(status.get("containerID") or "")
            if container_id.startswith("process://") and self.pid is None:
                self.pid = int(container_id.removeprefix("process://"))

    def read_log(self) -> None:
        """Milestones from the trainer's log so far."""
        if not self.pod_uid:
            return
        path = NODE_PODS / self.pod_uid / "containers" / "trainer" / "current.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in lines:
            match = LOG_LINE.match(line)
            if not match:
                continue
            at, message = log_time(match[1]), match[2]
            for key, prefix in MARKERS:
                if message.startswith(prefix):
                    self.mark(key, at)
            if message.startswith("fetched ") and "stage_preparing" not in self.marks:
                with self.lock:
                    self.marks["fetched"] = at  # the last fetch before Preparing

    def breakdown(self) -> dict[str, float | None]:
        start = self.marks["start"]
        rel = {k: v - start for k, v in self.marks.items()}
        out: dict[str, float | None] = {}
        for label, a, b in SEGMENTS:
            out[label] = round(rel[b] - rel[a], 3) if a in rel and b in rel else None
        return out


class Startup:
    def __init__(self, cluster: Cluster, api: Api, namespace: str, timeout: float) -> None:
        self.cluster, self.api, self.namespace, self.timeout = cluster, api, namespace, timeout
        self.prefix = f"s3://kubetune/bench/startup/{uuid.uuid4().hex[:8]}"

    def manifest(self, name: str) -> dict[str, Any]:
        doc = yaml.safe_load(QUICKSTART.read_text())
        doc["metadata"] = {"name": name, "namespace": self.namespace}
        doc["spec"]["output"]["uri"] = f"{self.prefix}/{name}/output/"
        return dict(doc)

    def run_once(self, name: str) -> Run:
        run = Run(name)
        ns = self.namespace
        watches = [
            Watch(self.api, f"{FTJ_API}/namespaces/{ns}/finetunejobs", run.on_ftj, time.time),
            Watch(self.api, f"/apis/batch/v1/namespaces/{ns}/jobs", run.on_job, time.time),
            Watch(self.api, f"/api/v1/namespaces/{ns}/pods", run.on_pod, time.time),
        ]
        for watch in watches:
            watch.start()
        try:
            doc = json.dumps(self.manifest(name))
            run.mark("start", time.time())
            self.cluster.kubectl("apply", "-f", "-", input=doc)
            run.mark("applied", time.time())
            deadline = time.monotonic() + self.timeout
            while "first_step" not in run.marks and time.monotonic() < deadline:
                time.sleep(0.2)
                if run.pid is not None and "process_started" not in run.marks:
                    with suppress(OSError, ValueError):
                        run.mark("process_started", process_start_time(run.pid))
                run.read_log()
                if run.phase in ("Failed", "Cancelled"):
                    break
            run.read_log()
            if "first_step" not in run.marks:
                log(f"{name}: no first step within {self.timeout} s; marks: {sorted(run.marks)}")
        finally:
            for watch in watches:
                watch.stop()
            self.cluster.kubectl("delete", "finetunejob", name, "-n", ns, "--wait=false",
                                 check=False)  # fmt: skip
            self._wait_pods_gone(name)
        return run

    def _wait_pods_gone(self, name: str, timeout: float = 120) -> None:
        """Until the training pod has stopped (it checkpoints on SIGTERM), so runs don't overlap."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cluster.kubectl(
                "get", "pods", "-n", self.namespace, "-l", f"{FTJ_LABEL}={name}", "-o", "name",
                check=False,
            )  # fmt: skip
            if out.returncode == 0 and not out.stdout.strip():
                return
            time.sleep(1)
        log(f"{name}: pod still there after {timeout} s")

    def cleanup_outputs(self, env: dict[str, str]) -> None:
        demo.assets.remove(self.prefix, env)


def import_times(repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of each import step in a fresh interpreter (the trainer's order), with
    bitsandbytes hidden as the trainer does for lora and without, alternating."""
    steps = [(label, stmt) for label, stmt in IMPORT_STEPS if stmt]
    samples: dict[str, dict[str, list[float]]] = {v: {} for v in IMPORT_VARIANTS}
    for _ in range(repeats):
        for variant, mode in IMPORT_VARIANTS.items():
            out = subprocess.run(
                [sys.executable, "-c", IMPORT_PROBE, repr(time.time()), json.dumps(steps), mode],
                capture_output=True, text=True, check=True, cwd=ROOT,
            ).stdout  # fmt: skip
            marks = json.loads(out.strip().splitlines()[-1])
            for label, seconds in [*marks, ("total", sum(s for _, s in marks))]:
                samples[variant].setdefault(label, []).append(seconds)
    return {
        variant: {label: round(statistics.median(v), 3) for label, v in by_label.items()}
        for variant, by_label in samples.items()
    }


def chart_ready(cluster: Cluster) -> bool:
    out = cluster.kubectl(
        "get", "deploy", "-n", demo.OPERATOR_NAMESPACE, "-l",
        "app.kubernetes.io/component=operator", "-o", "jsonpath={.items[*].status.readyReplicas}",
        check=False,
    )  # fmt: skip
    return out.returncode == 0 and out.stdout.strip() not in ("", "0")


def plot(path: Path, runs: list[dict[str, Any]], footer: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [label for label, _, _ in SEGMENTS]
    cmap = plt.get_cmap("tab20")
    height = 2.6 + 0.45 * len(runs)
    fig, ax = plt.subplots(figsize=(11, height), dpi=110)
    for row, run in enumerate(runs):
        left = 0.0
        for i, label in enumerate(labels):
            width = run["breakdown_s"].get(label) or 0.0
            ax.barh(row, width, left=left, color=cmap(i), label=label if row == 0 else None)
            if width >= 1.0:
                ax.annotate(f"{width:.1f}", (left + width / 2, row), ha="center", va="center",
                            fontsize=7)  # fmt: skip
            left += width
        ax.annotate(f" {run['total_s']:.1f} s", (left, row), va="center", fontsize=8)
    ax.axvline(TARGET_S, color="#c44e52", linestyle="--", linewidth=1)
    ax.annotate(f"target {TARGET_S:.0f} s ", (TARGET_S, -0.5), color="#c44e52", fontsize=8,
                ha="right", va="top")  # fmt: skip
    ax.set_yticks(range(len(runs)), [r["name"] for r in runs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(TARGET_S, *[r["total_s"] for r in runs]) * 1.08)
    ax.set_xlabel("seconds since `kubectl apply`")
    ax.set_title("quickstart FineTuneJob: apply to first optimizer step (CPU demo)", fontsize=10)
    legend_share = 0.9 / height
    fig.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 0.1 / height))
    fig.text(0.01, 0.01, footer, fontsize=6.5, color="#555555")
    fig.tight_layout(rect=(0, legend_share, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=None, help="measured runs (default 3)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured runs (default 1)")
    parser.add_argument("--quick", action="store_true", help="1 run, no warm-up")
    parser.add_argument("--namespace", default=NAMESPACE, help="watched by the operator")
    parser.add_argument("--reinstall", action="store_true", help="helm upgrade even if ready")
    parser.add_argument("--import-repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--timeout", type=float, default=300, help="per run, s")
    parser.add_argument("--out", type=Path, default=benchlib.DOCS_DIR / "startup.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    repeats = args.import_repeats or (1 if args.quick else 3)

    cluster = Cluster.up()
    env = demo.s3_env()
    demo.upload_assets(env)
    demo.create_secret(env, args.namespace)
    if args.reinstall or not chart_ready(cluster):
        demo.install_chart(env)
    else:
        log("the chart is deployed and its operator ready: not reinstalled (--reinstall)")
    device = benchlib.device_info(with_torch=False)
    bench = Startup(cluster, Api(cluster.kubeconfig), args.namespace, args.timeout)
    results: list[dict[str, Any]] = []
    try:
        for i in range(warmup + runs):
            name = f"startup-{uuid.uuid4().hex[:6]}"
            measured = i >= warmup
            log(f"{'run' if measured else 'warm-up'} {name}")
            run = bench.run_once(name)
            if "first_step" not in run.marks:
                raise SystemExit(f"startup: {name} never reached its first step")
            start = run.marks["start"]
            entry = {
                "name": name if measured else f"{name} (warm-up)",
                "measured": measured,
                "total_s": round(run.marks["first_step"] - start, 3),
                "breakdown_s": run.breakdown(),
                "milestones_s": {
                    k: round(v - start, 3)
                    for k, v in sorted(run.marks.items(), key=lambda kv: kv[1])
                },
            }
            log(f"{name}: first step after {entry['total_s']:.1f} s")
            results.append(entry)
    finally:
        bench.cleanup_outputs(env)
    imports = import_times(repeats)
    measured_runs = [r for r in results if r["measured"]]
    totals = [r["total_s"] for r in measured_runs]
    median_breakdown = {
        label: round(statistics.median([r["breakdown_s"][label] or 0.0 for r in measured_runs]), 3)
        for label, _, _ in SEGMENTS
    }
    control_plane = sum(median_breakdown[label] for label, _, _ in SEGMENTS[:5])
    out = {
        "benchmark": "startup",
        "command": benchlib.command_line(),
        "date": benchlib.now(),
        "device": device,
        "device_line": f"{device['cpu']}, {device['cores']} cores (shared with the control plane)",
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "target_s": TARGET_S,
        "total_s": {
            "median": round(statistics.median(totals), 3),
            "min": min(totals),
            "max": max(totals),
            "runs": totals,
        },
        "target_met": statistics.median(totals) <= TARGET_S,
        "median_breakdown_s": median_breakdown,
        "control_plane_s": round(control_plane, 3),
        "trainer_s": round(statistics.median(totals) - control_plane, 3),
        "import_times_s": imports,
        "runs": results,
    }
    benchlib.write_json(args.out, out)
    png = args.plot or args.out.with_suffix(".png")
    plot(png, results, f"{out['command']}  |  {out['device_line']}  |  {out['date']}")
    for label, seconds in median_breakdown.items():
        log(f"  {label:36s} {seconds:6.2f} s")
    log(f"median {out['total_s']['median']:.1f} s (target {TARGET_S:.0f} s); imports {imports}")
    log(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
