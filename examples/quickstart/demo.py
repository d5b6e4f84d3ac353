"""`make demo`: the quickstart FineTuneJob end to end on the local cluster.

Steps (each printed as it runs):
  1. upload a tiny model and sample chat data to the local S3 server (examples/quickstart/assets.py)
  2. create the S3 credentials Secret in the demo namespace
  3. `helm upgrade --install` the chart (CRDs, operator Deployment, RBAC); the operator's pod runs
     on the local process node with the chart's ServiceAccount
  4. `kubectl apply -f examples/quickstart.yaml`
  5. show live progress until the job ends, then the final status, events, the base vs
     fine-tuned evaluation and the published files
  6. the OpenAI-compatible API the chart also runs (docs/openai-api.md): write .dev/openai.env
     (OPENAI_BASE_URL, and as OPENAI_API_KEY a token of a ServiceAccount allowed in the demo
     namespace), run examples/openai/finetune.py (the OpenAI client's fine-tuning quickstart,
     unchanged) and follow that job through the API to its fine-tuned model
  7. the hosted script's last step: client.chat.completions.create(model=job.fine_tuned_model)
     answered by the vLLM server the operator starts for it (docs/serving.md), next to the base
     model's answer
Assumes `make cluster-up` (the Makefile runs it first).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEV = ROOT / ".dev"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402

NAMESPACE = "kubetune-demo"
OPERATOR_NAMESPACE = "kubetune-system"
JOB = "quickstart"
PREFIX = "s3://kubetune/quickstart"
TIMEOUT_S = 1200
OPENAI_ENV = DEV / "openai.env"
OPENAI_ACCOUNT = "openai-demo"
USER_ROLE = "kubetune-user"  # the chart's user ClusterRole for release "kubetune"


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
    elif not (out / "data/preference/train.jsonl").exists():  # assets written before DPO
        assets.write_preference_data(out)
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
    step("helm upgrade --install kubetune charts/kubetune (CRDs, operator, RBAC, OpenAI API)")
    adopt_crds()
    # The API server's own S3 keys: the same Secret, in the release namespace.
    create_secret(env, OPERATOR_NAMESPACE)
    run(
        str(helm()), "upgrade", "--install", "kubetune", str(ROOT / "charts/kubetune"),
        "--kubeconfig", str(DEV / "kubeconfig"),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--values", str(ROOT / "examples/quickstart/local-values.yaml"),
        "--set", f"trainer.storage.endpoint={env['AWS_ENDPOINT_URL']}",
        "--set-json", f"serving.command={json.dumps(vllm_command())}",
        *(arg for value in sets for arg in ("--set", value)),
        "--wait", "--timeout", "3m",
    )  # fmt: skip
    print(kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "wide").rstrip())


def helm() -> Path:
    """.dev/bin/helm, built from its Go module the first time (a few minutes, then cached;
    `make cluster-up` does not build it: tests/localenv/build-binaries.sh)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from localenv.cluster import build_binaries  # noqa: PLC0415 - the local environment's tooling

    build_binaries("helm")
    return DEV / "bin/helm"


def vllm_command() -> list[str]:
    """vLLM's CPU build (its own virtualenv, built once and cached: tests/localenv/vllm_env.py),
    as the model servers' command on the process node."""
    sys.path.insert(0, str(ROOT / "tests"))
    from localenv.vllm_env import ensure  # noqa: PLC0415 - the local environment's tooling

    return [str(ensure()), "-m", "vllm.entrypoints.openai.api_server"]


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


# ------------------------------------------------------------------- the OpenAI-compatible API


def api_port() -> int:
    values = yaml.safe_load((ROOT / "examples/quickstart/local-values.yaml").read_text())
    return int(values["apiServer"]["port"])


def openai_key(
    namespace: str = NAMESPACE,
    role: str = USER_ROLE,
    port: int | None = None,
    path: Path | None = OPENAI_ENV,
) -> dict[str, str]:
    """OPENAI_BASE_URL and, as OPENAI_API_KEY, a token of ServiceAccount openai-demo bound to
    the chart's user ClusterRole in `namespace`; written to `path` (mode 0600) if given."""
    step(f"An OpenAI API key: ServiceAccount {OPENAI_ACCOUNT}, bound to {role} in {namespace}")
    binding = {
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": OPENAI_ACCOUNT, "namespace": namespace}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": OPENAI_ACCOUNT, "namespace": namespace},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": role},
             "subjects": [{"kind": "ServiceAccount", "name": OPENAI_ACCOUNT,
                           "namespace": namespace}]},
        ],
    }  # fmt: skip
    kubectl("apply", "-f", "-", input=json.dumps(binding))
    token = kubectl("create", "token", OPENAI_ACCOUNT, "-n", namespace, "--duration", "24h")
    settings = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{port or api_port()}/v1",
        "OPENAI_API_KEY": token.strip(),
    }
    if path is not None:
        path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        path.chmod(0o600)
        print(f"wrote {path.relative_to(ROOT)}: OPENAI_BASE_URL={settings['OPENAI_BASE_URL']}, "
              "OPENAI_API_KEY=<token, 24 h>")  # fmt: skip
    return settings


def run_openai_quickstart(settings: dict[str, str], workdir: Path, model: str | None = None) -> str:
    """Run examples/openai/finetune.py on the quickstart's chat data; print; return the job id."""
    step("set -a; . .dev/openai.env; set +a; python examples/openai/finetune.py "
         "training_data.jsonl")  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    assets_dir = DEV / "quickstart-assets"
    if not (assets_dir / "data/chat/train.jsonl").exists():
        assets.write_assets(assets_dir)
    shutil.copy(assets_dir / "data/chat/train.jsonl", workdir / "training_data.jsonl")
    script = ROOT / "examples/openai/finetune.py"
    result = subprocess.run(
        [sys.executable, str(script), "training_data.jsonl", *([model] if model else [])],
        cwd=workdir, env={**os.environ, **settings}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"demo: {script.name} failed:\n{result.stderr.strip()}")
    print(result.stdout.rstrip())
    return result.stdout.split("Created fine-tuning job: ", 1)[1].split()[0]


def follow_openai_job(settings: dict[str, str], job_id: str, timeout: float = TIMEOUT_S) -> Any:
    """Status changes and the latest training metrics, through the API, until the job ends."""
    from openai import OpenAI  # noqa: PLC0415

    step(f"Following {job_id} with client.fine_tuning.jobs.retrieve and list_events")
    client = OpenAI(base_url=settings["OPENAI_BASE_URL"], api_key=settings["OPENAI_API_KEY"])
    deadline, last, shown, job = time.monotonic() + timeout, "", 0.0, None
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status != last:
            print(f"status: {job.status}", flush=True)
            last = job.status
        if time.monotonic() - shown > 10:
            metrics = [e for e in client.fine_tuning.jobs.list_events(job_id, limit=1000)
                       if e.type == "metrics"]  # fmt: skip
            if metrics:
                print(f"  {len(metrics)} metrics events; latest: {metrics[-1].message}", flush=True)
            shown = time.monotonic()
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(3)
    if job is None or job.status != "succeeded":
        raise SystemExit(f"demo: {job_id} ended {job and job.status}: {job and job.error}")
    step("The last events, checkpoints, results file and the fine-tuned model")
    events = list(client.fine_tuning.jobs.list_events(job_id, limit=1000))
    for event in events[-4:]:
        print(event.created_at, event.message)
    for ckpt in client.fine_tuning.jobs.checkpoints.list(job_id):
        print(f"checkpoint {ckpt.id}: step {ckpt.step_number}, train loss "
              f"{ckpt.metrics.train_loss}, eval loss {ckpt.metrics.full_valid_loss}")  # fmt: skip
    print(f"trained_tokens: {job.trained_tokens}, hyperparameters: "
          f"{job.hyperparameters.model_dump()}")  # fmt: skip
    rows = client.files.content(job.result_files[0]).text.splitlines()
    print(f"result_files: {job.result_files[0]} ({len(rows) - 1} rows: {rows[0]})")
    print("models:", ", ".join(m.id for m in client.models.list()))
    return job


QUESTION = "What does the method lora do?"  # the quickstart's validation data has the answer


def ask_served_model(settings: dict[str, str], job: Any, base: str, timeout: float = 900) -> None:
    """The hosted API script's last step: chat.completions with the fine-tuned model, answered
    by vLLM once the operator serves it; the base model's answer beside it."""
    from openai import APIStatusError, OpenAI  # noqa: PLC0415

    step(f"client.chat.completions.create(model={job.fine_tuned_model!r}, ...): vLLM serves it")
    client = OpenAI(base_url=settings["OPENAI_BASE_URL"], api_key=settings["OPENAI_API_KEY"])
    deadline, said, started = time.monotonic() + timeout, "", time.monotonic()
    answers: dict[str, str] = {}
    for model in (job.fine_tuned_model, base):
        while model not in answers:
            try:
                reply = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": QUESTION}],
                    max_tokens=24,
                    temperature=0,
                )
                answers[model] = (reply.choices[0].message.content or "").strip()
            except APIStatusError as err:  # not served yet: the message says why
                if time.monotonic() > deadline or err.status_code not in (409, 503):
                    raise SystemExit(f"demo: {model} is not served: {err.message}") from None
                if err.message != said:
                    print(f"  ({time.monotonic() - started:.0f} s) {err.message}", flush=True)
                    said = err.message
                time.sleep(5)
    print(f"served after {time.monotonic() - started:.0f} s\n\nQ: {QUESTION}")
    width = max(len(base) + 5, len("fine-tuned"))
    for label, model in ((f"base {base}", base), ("fine-tuned", job.fine_tuned_model)):
        # The random-init base model often ends its answer at once.
        print(f"{label:<{width}} | {answers[model] or '(an empty answer)'}")


def main() -> None:
    started = time.monotonic()
    env = s3_env()
    upload_assets(env)
    create_secret(env)
    install_chart(env)
    apply_job(env)
    ftj = watch()
    report(ftj, env)
    settings = openai_key()
    job_id = run_openai_quickstart(settings, DEV / "openai-demo")
    job = follow_openai_job(settings, job_id)
    ask_served_model(settings, job, base=job.model)
    print(f"\ndemo: done in {time.monotonic() - started:.0f} s. Try: "
          f"KUBECONFIG={DEV / 'kubeconfig'} {DEV / 'bin/kubectl'} get ftj -A; or "
          "set -a; . .dev/openai.env; set +a; python examples/openai/finetune.py "
          ".dev/openai-demo/training_data.jsonl")  # fmt: skip


if __name__ == "__main__":
    main()
