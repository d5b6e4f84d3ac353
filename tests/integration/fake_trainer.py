"""A stand-in for `kubetune-trainer` in operator tests: reports status as the trainer will.

The operator's Job runs `<KUBETUNE_TRAINER_COMMAND> /etc/kubetune/config.json`; the tests set the
command to `python tests/integration/fake_trainer.py --config`, so the Job keeps its real shape.
The stand-in reads the TrainerConfig the operator rendered, then PATCHes (merge patch) the status
subresource of its FineTuneJob with its projected ServiceAccount token, exactly as the trainer
does: /apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{name}/status.

What it does is chosen by the job's spec.baseModel.uri, `s3://fake/<mode>[-<seconds>]`:
- succeed-N: report progress for N seconds (default 2), then metrics (validation loss 1.0, the
  base model's 2.0), exit 0; worse-N: the same with validation loss 3.0; its termination
  message is a JSON record of what its RBAC allowed (own status, another job's, pods);
- data-error: write an actionable line as termination message, exit DATA_ERROR;
- oom: allocate memory until the memory limit kills it (OOMKilled);
- crash: print a traceback, exit 1 (retried by the Job);
- sleep-N: report progress, then sleep N seconds; on SIGTERM wait a moment (as the trainer
  saves a checkpoint) and exit 143.
Only the standard library and kubetune_trainer.exitcodes are used: it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_trainer import exitcodes

SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TERMINATION_LOG = Path("/dev/termination-log")


class Api:
    def __init__(self) -> None:
        self.token = (SA / "token").read_text()
        self.context = ssl.create_default_context(cafile=str(SA / "ca.crt"))
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ["KUBERNETES_SERVICE_PORT"]
        self.base = f"https://{host}:{port}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    config = json.loads(Path(parser.parse_args().config).read_text())
    job = config["job"]
    ns, name = job["namespace"], job["name"]
    status_path = f"/apis/kubetune.dev/v1alpha1/namespaces/{ns}/finetunejobs/{name}/status"
    mode, _, arg = config["spec"]["baseModel"]["uri"].removeprefix("s3://fake/").rpartition("-")
    if not arg.isdigit():
        mode, arg = f"{mode}-{arg}".strip("-"), ""
    seconds = float(arg) if arg else 2.0
    api = Api()

    def report(step: int, total: int, **extra: Any) -> int:
        progress = {"step": step, "totalSteps": total, "percent": 100.0 * step / total}
        status = {"stage": "Training", "progress": {**progress, "updateTime": now()}, **extra}
        return api.call("PATCH", status_path, {"status": status})

    own = report(0, 10)
    if mode == "data-error":
        TERMINATION_LOG.write_text(
            "train.jsonl line 3: record has no 'messages' field (dataset.format chat)\n"
            "more detail on the next lines\n"
        )
        return exitcodes.DATA_ERROR
    if mode == "oom":
        hog = []
        while True:  # until the memory limit kills us
            hog.append(bytearray(32 * 2**20))
            hog[-1][::4096] = b"x" * (32 * 2**20 // 4096)
            time.sleep(0.05)
    if mode == "crash":
        print("Traceback (most recent call last):\n  File 'train.py'\nRuntimeError: CUDA error")
        return 1
    if mode == "sleep":

        def on_term(signum: int, frame: object) -> None:
            time.sleep(2)  # "saving a checkpoint"
            sys.exit(143)

        signal.signal(signal.SIGTERM, on_term)
        report(1, 10)
        time.sleep(seconds)
        return 0
    # succeed (or worse: succeed with a validation loss above the base model's)
    steps = 5
    for step in range(1, steps + 1):
        time.sleep(seconds / steps)
        report(step * 2, 10, metrics={"trainLoss": 2.0 - step * 0.2})
    evaluated = {"evalLoss": 3.0 if mode == "worse" else 1.0, "baseEvalLoss": 2.0}
    api.call("PATCH", status_path, {"status": {"metrics": evaluated}})
    rbac = {
        "own": own,
        "other": api.call(
            "PATCH",
            status_path.replace(f"/finetunejobs/{name}/", f"/finetunejobs/{name}-other/"),
            {"status": {"stage": "Training"}},
        ),
        "pods": api.call("GET", f"/api/v1/namespaces/{ns}/pods"),
        "spec": api.call("PATCH", status_path.removesuffix("/status"), {"spec": {"suspend": True}}),
    }
    api.call("PATCH", status_path, {"status": {"stage": "Publishing"}})
    TERMINATION_LOG.write_text(json.dumps(rbac))
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
