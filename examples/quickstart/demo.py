"""`make demo`: the quickstart FineTuneJob end to end on the local cluster.

Steps (each printed as it runs):
  1. upload a tiny model and sample chat data to the local S3 server (examples/quickstart/assets.py)
  2. create the S3 credentials Secret in the demo namespace
  3. `helm upgrade --install` the chart (CRDs, operator Deployment, RBAC); the operator's pod runs
     on the local process node with the chart's ServiceAccount
  4. `kubectl apply -f examples/quickstart.yaml`
  5. show live progress until the job ends, then the final status, events, the base vs
     fine-tuned evaluation and the published files
Assumes `make cluster-up` (the Makefile runs it first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / ".dev"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402

NAMESPACE = "kubetune-demo"
OPERATOR_NAMESPACE = "kubetune-system"
JOB = "quickstart"
PREFIX = "s3://kubetune/quickstart"
TIMEOUT_S = 1200


def s3_env() -> dict[str, str]:
    lines = (DEV / "s3.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def run(*args: str, input: str | None = None, check: bool = True) -> str:
    env = {**os.environ, "KUBECONFIG": str(DEV / "kubeconfig")}
    result = subprocess.run(args, input=input, capture_output=True, text=True, env=env, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: {' '.join(args[:3])} failed:\n{result.stderr.strip()}")
    return result.stdout


def kubectl(*args: str, input: str | None = None, check: bool = True) -> str:
    return run(str(DEV / "bin/kubectl"), *args, input=input, check=check)


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def upload_assets(env: dict[str, str]) -> None:
    step(f"Uploading a tiny Llama, its tokenizer and sample chat data to {PREFIX}/")
    out = DEV / "quickstart-assets"
    if not (out / "model/config.json").exists():
        assets.write_assets(out)
    assets.upload(out / "model", f"{PREFIX}/model/", env)
    assets.upload(out / "data", f"{PREFIX}/data/", env)


def create_secret(env: dict[str, str], namespace: str = NAMESPACE) -> None:
    step(f"Creating namespace {namespace} and Secret s3-credentials (the operator never reads it)")
    kubectl("create", "namespace", namespace, check=False)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-credentials", "namespace": namespace},
        "stringData": {
            "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"],
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(secret))


def adopt_crds(release: str = "kubetune", namespace: str = OPERATOR_NAMESPACE) -> None:
    """Let Helm take over CRDs applied earlier with kubectl (Helm's documented adoption)."""
    for name in (
        "finetunejobs.kubetune.dev",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    ):
        if kubectl("get", "crd", name, "--ignore-not-found", "-o", "name").strip():
            kubectl("label", "crd", name, "app.kubernetes.io/managed-by=Helm", "--overwrite")
            kubectl("annotate", "crd", name, f"meta.helm.sh/release-name={release}",
                    f"meta.helm.sh/release-namespace={namespace}", "--overwrite")  # fmt: skip


def install_chart(env: dict[str, str], *sets: str) -> None:
    """`sets` are extra `--set` values (the e2e tests pick free ports for the operator)."""
    step("helm upgrade --install kubetune charts/kubetune (CRDs, operator, RBAC)")
    adopt_crds()
    run(
        str(DEV / "bin/helm"), "upgrade", "--install", "kubetune", str(ROOT / "charts/kubetune"),
        "--kubeconfig", str(DEV / "kubeconfig"),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--values", str(ROOT / "examples/quickstart/local-values.yaml"),
        "--set", f"trainer.storage.endpoint={env['AWS_ENDPOINT_URL']}",
        *(arg for value in sets for arg in ("--set", value)),
        "--wait", "--timeout", "3m",
    )  # fmt: skip
    print(kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "wide").rstrip())


def apply_job(env: dict[str, str]) -> None:
    step(f"kubectl apply -f examples/quickstart.yaml -n {NAMESPACE}")
    kubectl("delete", "finetunejob", JOB, "-n", NAMESPACE, "--ignore-not-found", "--wait=true")
    # A FineTuneJob resumes from the checkpoints under its output.uri; a demo run starts over.
    if assets.remove(f"{PREFIX}/output/", env):
        print(f"(removed the previous run's {PREFIX}/output/, so training starts at step 0)")
    print(kubectl("apply", "-n", NAMESPACE, "-f", str(ROOT / "examples/quickstart.yaml")).rstrip())


def row(ftj: dict[str, Any]) -> str:
    status = ftj.get("status", {})
    progress = status.get("progress", {})
    metrics = status.get("metrics", {})
    percent = progress.get("percent")
    loss = metrics.get("trainLoss")
    cells = [
        f"{status.get('phase', '-'):<10}",
        f"{status.get('stage', '-'):<11}",
        f"step {progress.get('step', 0):>4}/{progress.get('totalSteps', '?'):<5}",
        f"{percent:5.1f}%" if percent is not None else "    -%",
        f"loss {loss:7.4f}" if loss is not None else "loss       -",
        f"lr {metrics.get('learningRate', 0):.2e}",
        f"{metrics.get('tokensPerSecond', 0):8.0f} tok/s",
        f"eta {progress.get('etaSeconds', '-')}s",
    ]
    return "  ".join(cells)


def watch() -> dict[str, Any]:
    step("Live progress (kubectl get ftj quickstart -o json, every 2 s)")
    tty = sys.stdout.isatty()
    last = ""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        out = kubectl("get", "finetunejob", JOB, "-n", NAMESPACE, "-o", "json", check=False)
        if out:
            ftj = json.loads(out)
            line = row(ftj)
            if line != last:
                print(("\r\033[K" if tty else "") + line, end="" if tty else "\n", flush=True)
                last = line
            if ftj.get("status", {}).get("phase") in ("Succeeded", "Failed", "Cancelled"):
                print()
                return dict(ftj)
        time.sleep(2)
    raise SystemExit(f"demo: {JOB} did not finish within {TIMEOUT_S} s")


def report(ftj: dict[str, Any], env: dict[str, str]) -> None:
    step("Final status")
    print(kubectl("get", "finetunejob", JOB, "-n", NAMESPACE, "-o", "wide").rstrip())
    status = ftj["status"]
    print(
        json.dumps({k: status.get(k) for k in ("phase", "reason", "message", "metrics")}, indent=2)
    )
    step("Events")
    print(kubectl("get", "events", "-n", NAMESPACE, "--field-selector",
                  f"involvedObject.name={JOB}", "--sort-by=.lastTimestamp").rstrip())  # fmt: skip
    if status.get("phase") != "Succeeded":
        raise SystemExit(f"demo: the job ended {status.get('phase')}: {status.get('message')}")
    s3 = assets.s3_client(env)
    step("Base model vs fine-tuned (eval_report.md)")
    body = s3.get_object(Bucket="kubetune", Key="quickstart/output/eval_report.md")["Body"]
    print(body.read().decode())
    step(f"Published files under {PREFIX}/output/")
    listing = s3.list_objects_v2(Bucket="kubetune", Prefix="quickstart/output/")
    for obj in listing.get("Contents", []):
        if "/checkpoints/" not in obj["Key"]:
            print(f"  {obj['Size']:>10}  {obj['Key']}")


def main() -> None:
    started = time.monotonic()
    env = s3_env()
    upload_assets(env)
    create_secret(env)
    install_chart(env)
    apply_job(env)
    ftj = watch()
    report(ftj, env)
    print(f"\ndemo: done in {time.monotonic() - started:.0f} s. Try: "
          f"KUBECONFIG={DEV / 'kubeconfig'} {DEV / 'bin/kubectl'} get ftj -A")  # fmt: skip


if __name__ == "__main__":
    main()
