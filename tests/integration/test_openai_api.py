"""The OpenAI-compatible API, driven by the official `openai` client, on the local cluster.

Real parts: the control plane (RBAC, TokenRequest, SelfSubjectReview, ResourceQuota), MinIO,
`kubetune-api` as a subprocess with the chart's settings, and the operator with the chart's RBAC
running the fast stand-in trainer (fake_trainer.py; the base model's URI picks what it does:
s3://fake/succeed-N succeeds after N seconds, s3://fake/sleep-N runs until stopped). Callers
are ServiceAccounts bound to the chart's kubetune-user ClusterRole; their tokens are the API
keys. Training metrics and checkpoints are written, while a job runs, by the trainer's own
writers (training_log.TrainingLog, Storage.publish_checkpoint) into the job's output; the
end-to-end test (tests/e2e/test_openai_e2e.py) has the real trainer write them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai_support import (
    ApiServerProcess,
    api_server_env,
    chat_lines,
    install_user_role,
    preference_lines,
    user_token,
)
from operator_harness import (
    OperatorProcess,
    install_crds,
    install_operator_identity,
    operator_env,
)

from kubetune_trainer.api import StorageConfig
from kubetune_trainer.storage import Storage
from kubetune_trainer.training_log import TrainingLog
from localenv.testing import ROOT, Cluster, free_port, wait_until

pytestmark = pytest.mark.cluster

SUCCEED = "fake-succeed"  # a few seconds of "training", then Succeeded
SLEEP = "fake-sleep"  # runs until cancelled or paused
MODELS = [
    {"name": SUCCEED, "uri": "s3://fake/succeed-3", "spec": {"resources": {"gpus": 0}}},
    {"name": SLEEP, "uri": "s3://fake/sleep-600", "spec": {"resources": {"gpus": 0}}},
]
MAX_UPLOAD = 256 * 1024
QUOTA = {"count/finetunejobs.kubetune.dev": "0"}


@dataclass
class Env:
    cluster: Cluster
    server: ApiServerProcess
    prefix: str
    ns_a: str
    ns_b: str
    ns_quota: str
    alice: str  # kubetune-user in ns_a
    bob: str  # kubetune-user in ns_b
    nobody: str  # a ServiceAccount in ns_a without any role
    quota: str  # kubetune-user in ns_quota, where no FineTuneJob fits
    workdir: Path

    def client(self, token: str | None = None, project: str | None = None) -> OpenAI:
        return OpenAI(
            base_url=self.server.base_url, api_key=token or self.alice, project=project,
            max_retries=0, timeout=30,
        )  # fmt: skip


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("openai")
    install_crds(cluster)
    with (
        install_operator_identity(cluster, workdir) as identity,
        install_user_role(cluster) as role,
        cluster.namespace() as ns_a,
        cluster.namespace() as ns_b,
        cluster.namespace() as ns_quota,
    ):
        quota = {"apiVersion": "v1", "kind": "ResourceQuota",
                 "metadata": {"name": "no-jobs"}, "spec": {"hard": QUOTA}}  # fmt: skip
        cluster.apply(quota, ns_quota)
        tokens = {
            "alice": user_token(cluster, ns_a, "alice", role),
            "bob": user_token(cluster, ns_b, "bob", role),
            "nobody": user_token(cluster, ns_a, "nobody", None),
            "quota": user_token(cluster, ns_quota, "carol", role),
        }
        op_env = operator_env(identity, ns_a, free_port(), free_port())
        op_env["KUBETUNE_NAMESPACES"] = ",".join((ns_a, ns_b, ns_quota))
        op_env["KUBETUNE_PEERING_NAME"] = ""  # one replica: no peering needed
        operator = OperatorProcess(
            "a", op_env, workdir / "operator.log", 0, 0
        ).start()  # fmt: skip
        prefix = f"openai-test-{uuid.uuid4().hex[:8]}"
        port = free_port()
        server = ApiServerProcess(
            port,
            api_server_env(cluster, port=port, prefix=prefix, models=MODELS, workdir=workdir,
                           max_upload_bytes=MAX_UPLOAD),
            workdir / "api.log",
        )  # fmt: skip
        try:
            server.start()
            assert operator.alive, operator.tail()
            yield Env(cluster, server, prefix, ns_a, ns_b, ns_quota, workdir=workdir, **tokens)
        finally:
            server.stop()
            operator.stop()


def training_file(env: Env, name: str = "training_data.jsonl", records: int = 40) -> Path:
    path = env.workdir / name
    path.write_bytes(chat_lines(records))
    return path


def wait_status(client: OpenAI, job_id: str, *statuses: str, timeout: float = 120) -> Any:
    def reached() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in statuses else None

    return wait_until(reached, timeout, f"job {job_id} to be {' or '.join(statuses)}", 0.5)


def wait_phase(env: Env, namespace: str, name: str, phase: str, timeout: float = 120) -> None:
    def reached() -> bool:
        ftj = env.cluster.get("ftj", name, namespace)
        return (ftj.get("status") or {}).get("phase") == phase

    wait_until(reached, timeout, f"FineTuneJob {name} to be {phase}", 0.5)


def s3_storage(env: Env) -> Storage:
    s3 = env.cluster.s3_env
    return Storage(StorageConfig(endpoint=s3["AWS_ENDPOINT_URL"]), env=s3, use_cache=False)


# ------------------------------------------------------------------------------ the issue


def test_the_issues_script_runs_as_written(env: Env) -> None:
    data = training_file(env)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/openai/finetune.py"), str(data), SUCCEED],
        env={"PATH": "/usr/bin:/bin", "OPENAI_BASE_URL": env.server.base_url,
             "OPENAI_API_KEY": env.alice},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + env.server.tail()
    status, *events = result.stdout.splitlines()
    assert status in ("validating_files", "queued", "running")
    assert events and events[0].split(" ", 1)[1].startswith("Created fine-tuning job: ftjob-")
    job_id = events[0].rsplit(" ", 1)[1]

    client = env.client()
    job = wait_status(client, job_id, "succeeded", "failed")
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{SUCCEED}:{env.ns_a}::{job_id}"
    assert job.model == SUCCEED and job.organization_id == env.ns_a
    assert job.hyperparameters.n_epochs == 3
    assert job.hyperparameters.batch_size == 1  # auto: 40 examples -> 1
    assert job.finished_at is not None and job.finished_at >= job.created_at
    # The FineTuneJob behind it, created with the caller's identity and labelled.
    ftj = json.loads(env.cluster.kubectl("get", "ftj", job_id, "-n", env.ns_a, "-o", "json",
                                         "--show-managed-fields").stdout)  # fmt: skip
    assert ftj["metadata"]["labels"]["kubetune.dev/created-by"] == "openai-api"
    managers = {m["manager"] for m in ftj["metadata"]["managedFields"]}
    assert "kubetune-api" in managers
    assert ftj["spec"]["hyperparameters"]["epochs"] == 3
    output = ftj["spec"]["output"]["uri"]
    assert output == f"s3://kubetune/{env.prefix}/{env.ns_a}/jobs/{job_id}/"
    # Its events: created, the operator's phase changes, the new model, oldest first.
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data]
    assert messages[0] == f"Created fine-tuning job: {job_id}"
    assert any(m.startswith("Succeeded") for m in messages), messages
    assert messages[-1] == f"New fine-tuned model created: {job.fine_tuned_model}"
    # The model is listed and retrievable.
    models = {m.id: m for m in client.models.list()}
    assert {SUCCEED, SLEEP, job.fine_tuned_model} <= set(models)
    assert models[job.fine_tuned_model].owned_by == env.ns_a
    assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model


# ----------------------------------------------------- metrics, checkpoints, cancel, results


def test_a_running_job_shows_its_metrics_history_and_checkpoints_and_cancels(env: Env) -> None:
    client = env.client()
    data = client.files.create(file=training_file(env).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        training_file=data.id, model=SLEEP, suffix="metrics", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}}},
    )  # fmt: skip
    assert job.seed == 7 and job.user_provided_suffix == "metrics"
    assert job.hyperparameters.model_dump() == {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5,
    }  # fmt: skip
    wait_status(client, job.id, "running")
    # What the trainer writes while it trains: progress reports, then checkpoints.
    output = env.cluster.get("ftj", job.id, env.ns_a)["spec"]["output"]["uri"]
    storage = s3_storage(env)
    log = TrainingLog(storage, output)
    for step in (1, 2, 3, 4):
        log.train(step=step, total_steps=4, epoch=step / 2, train_loss=2.0 / step,
                  learning_rate=1e-3 / step, tokens_per_second=500.0, tokens_seen=64 * step)  # fmt: skip
        if step % 2 == 0:
            checkpoint = env.workdir / f"ckpt-{step}"
            checkpoint.mkdir()
            (checkpoint / "adapter.safetensors").write_bytes(b"weights" * step)
            storage.publish_checkpoint(checkpoint, output, step)

    # The history, not just the latest value, oldest first, as the client pages it.
    metrics = [
        e for e in client.fine_tuning.jobs.list_events(job.id, limit=2) if e.type == "metrics"
    ]
    assert [e.data["step"] for e in metrics] == [1, 2, 3, 4]
    assert metrics[0].data == {"step": 1, "total_steps": 4, "epoch": 0.5, "train_loss": 2.0,
                               "learning_rate": 0.001, "tokens_per_second": 500.0}  # fmt: skip
    assert metrics[3].message == "Step 4/4: training loss=0.5000, learning rate=0.00025"
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]  # newest first
    assert checkpoints[0].metrics.train_loss == 0.5
    assert checkpoints[0].fine_tuning_job_id == job.id
    assert checkpoints[0].fine_tuned_model_checkpoint == (
        f"ft:{SLEEP}:{env.ns_a}:metrics:{job.id}:ckpt-step-4"
    )
    log.evaluation(step=4, eval_loss=0.4, perplexity=1.5, base_eval_loss=3.0, base_perplexity=20.0)

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    wait_phase(env, env.ns_a, job.id, "Cancelled")
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # idempotent
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)
    # The results file: the training log as CSV.
    (results,) = client.fine_tuning.jobs.retrieve(job.id).result_files
    info = client.files.retrieve(results)
    assert (info.purpose, info.filename) == ("fine-tune-results", "step_metrics.csv")
    rows = client.files.content(results).text.splitlines()
    assert rows[0].startswith("step,epoch,train_loss")
    assert rows[-1].startswith("4,2.0,0.5,") and rows[-1].endswith(",0.4")


def test_pause_and_resume(env: Env) -> None:
    client = env.client()
    data = client.files.create(file=training_file(env).open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=data.id, model=SLEEP)
    wait_status(client, job.id, "running")
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    wait_phase(env, env.ns_a, job.id, "Suspended")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"  # idempotent
    assert client.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    wait_status(client, job.id, "running")
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any(m.startswith("Suspended") for m in messages), messages
    client.fine_tuning.jobs.cancel(job.id)


# ------------------------------------------------------------------------- kubectl jobs


def test_method_dpo_trains_preference_pairs_as_a_dpo_finetunejob(env: Env) -> None:
    """The hosted API's DPO call, unchanged: a preference file and method dpo with beta."""
    client = env.client()
    path = env.workdir / "preferences.jsonl"
    path.write_bytes(preference_lines(30))
    pairs = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert pairs.status == "processed"
    job = client.fine_tuning.jobs.create(
        training_file=pairs.id, model=SUCCEED,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3, "n_epochs": 2}}},
    )  # fmt: skip
    assert job.method is not None and job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters.beta == 0.3
    assert job.method.dpo.hyperparameters.n_epochs == 2
    spec = env.cluster.get("ftj", job.id, env.ns_a)["spec"]
    assert spec["objective"] == "dpo" and spec["dpo"]["beta"] == 0.3
    assert spec["dataset"]["format"] == "preference"
    assert wait_status(client, job.id, "succeeded", "failed").status == "succeeded"
    # Pairs never train as supervised data, said at create time.
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(training_file=pairs.id, model=SUCCEED)
    assert err.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            training_file=pairs.id, model=SUCCEED,
            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 11}}},
        )  # fmt: skip
    assert err.value.param == "method.dpo.hyperparameters.beta"


def test_a_finetunejob_applied_with_kubectl_is_a_job_too(env: Env) -> None:
    name = "applied-by-kubectl"
    manifest = {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": "s3://fake/succeed-1"},
                 "dataset": {"trainUri": "s3://kubetune/elsewhere/train.jsonl"},
                 "output": {"uri": "s3://kubetune/elsewhere/output/"},
                 "hyperparameters": {"epochs": 2, "batchSize": 2,
                                     "gradientAccumulationSteps": 3},
                 "resources": {"gpus": 0}},
    }  # fmt: skip
    env.cluster.apply(manifest, env.ns_a)
    client = env.client()
    assert name in [j.id for j in client.fine_tuning.jobs.list(limit=100)]
    job = wait_status(client, name, "succeeded", "failed")
    assert job.status == "succeeded"
    assert job.model == "s3://fake/succeed-1"  # not in the catalogue: its URI
    assert job.training_file == "s3://kubetune/elsewhere/train.jsonl"
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 6)
    assert job.fine_tuned_model == f"ft:s3-fake-succeed-1:{env.ns_a}::{name}"
    assert client.models.retrieve(job.fine_tuned_model).owned_by == env.ns_a
    # Its output is outside the API's store: status events only, no error.
    events = client.fine_tuning.jobs.list_events(name, limit=100).data
    assert events and all(e.type == "message" for e in events)
    assert client.fine_tuning.jobs.checkpoints.list(name).data == []
    assert job.result_files == [] and job.trained_tokens is None


# --------------------------------------------------------------------------- pagination


def test_pages_cover_every_job_newest_first_and_metadata_filters(env: Env) -> None:
    client = env.client()
    data = client.files.create(file=training_file(env).open("rb"), purpose="fine-tune")
    tagged = []
    for i in range(2):
        job = client.fine_tuning.jobs.create(training_file=data.id, model=SLEEP,
                                             metadata={"team": "search", "run": str(i)})  # fmt: skip
        client.fine_tuning.jobs.cancel(job.id)
        tagged.append(job.id)
    everything = client.fine_tuning.jobs.list(limit=100)
    assert not everything.has_more
    ids = [j.id for j in everything.data]
    assert len(ids) >= 6  # this module's jobs in the namespace, kubectl's included
    created = [j.created_at for j in everything.data]
    assert created == sorted(created, reverse=True)
    first = client.fine_tuning.jobs.list(limit=2)
    assert first.has_more and len(first.data) == 2
    pages = 0
    for _page in first.iter_pages():
        pages += 1
    assert pages == -(-len(ids) // 2)
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == ids  # auto-paging
    search = client.fine_tuning.jobs.list(metadata={"team": "search"}).data
    assert sorted(j.id for j in search) == sorted(tagged)
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"run": "1"})] == [tagged[1]]
    assert search[0].metadata is not None and search[0].metadata["team"] == "search"
    # Events page the same way, oldest to newest (a job that finished earlier: no new events).
    settled = "applied-by-kubectl"
    all_events = client.fine_tuning.jobs.list_events(settled, limit=100).data
    assert len(all_events) >= 3
    paged = [e.id for e in client.fine_tuning.jobs.list_events(settled, limit=1)]
    assert paged == [e.id for e in all_events]
    # Files too (newest first by default).
    files = client.files.list()
    assert data.id in [f.id for f in files]
    assert all(f.purpose == "fine-tune" and f.status == "processed" for f in files)


def test_a_retried_create_with_an_idempotency_key_finds_its_job(env: Env) -> None:
    client = env.client()
    data = client.files.create(file=training_file(env).open("rb"), purpose="fine-tune")
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = client.fine_tuning.jobs.create(training_file=data.id, model=SLEEP, extra_headers=key)
    again = client.fine_tuning.jobs.create(training_file=data.id, model=SLEEP, extra_headers=key)
    assert again.id == first.id
    other = client.fine_tuning.jobs.create(training_file=data.id, model=SLEEP)
    assert other.id != first.id
    for job in (first, other):
        client.fine_tuning.jobs.cancel(job.id)


# ------------------------------------------------------------------------------- errors


def test_bad_input_gets_openai_errors_naming_the_field_or_line(env: Env) -> None:
    client = env.client()
    good = client.files.create(file=training_file(env).open("rb"), purpose="fine-tune")
    jobs = client.fine_tuning.jobs

    def bad_request(call: Any, **kwargs: Any) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as err:
            call(**kwargs)
        assert isinstance(err.value.body, dict) and err.value.body["message"]
        return err.value

    err = bad_request(jobs.create, training_file="file-" + "0" * 24, model=SUCCEED)
    assert err.param == "training_file"
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-" + "0" * 24)
    err = bad_request(client.files.create, file=("train.jsonl", training_file(env).read_bytes()),
                      purpose="assistants")  # fmt: skip
    assert err.param == "purpose"
    lines = training_file(env).read_bytes() + b'{"messages": [{"role": "bot", "content": "x"}]}\n'
    err = bad_request(client.files.create, file=("broken.jsonl", lines), purpose="fine-tune")
    assert err.param == "file" and "broken.jsonl line 41: messages[0].role" in err.message
    err = bad_request(
        client.files.create, file=("report.jsonl", b"%PDF-1.7\n"), purpose="fine-tune"
    )
    assert "line 1: invalid JSON" in err.message
    err = bad_request(jobs.create, training_file=good.id, model="gpt-4o-mini")
    assert err.param == "model" and SUCCEED in err.message
    err = bad_request(jobs.create, training_file=good.id, model=SUCCEED,
                      hyperparameters={"n_epochs": -3})  # fmt: skip
    assert err.param == "hyperparameters.n_epochs"
    err = bad_request(jobs.create, training_file=good.id, model=SUCCEED,
                      method={"type": "reinforcement"})  # fmt: skip
    assert err.param == "method.type" and err.code == "unsupported_method"
    err = bad_request(jobs.create, training_file=good.id, model=SUCCEED, method={"type": "dpo"})
    assert err.param == "training_file" and "preference pairs" in err.message
    err = bad_request(jobs.create, training_file=good.id, model=SUCCEED,
                      method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}})  # fmt: skip
    assert err.param == "training_file"  # the file is checked first
    big = b'{"text": "' + b"x" * (MAX_UPLOAD + 1000) + b'"}\n'
    err = bad_request(client.files.create, file=("big.jsonl", big), purpose="fine-tune")
    assert err.code == "file_too_large"
    # Not the caller's: 404; a finished job cannot be paused: 409.
    with pytest.raises(openai.NotFoundError):
        jobs.retrieve("ftjob-" + "0" * 24)
    finished = next(j for j in jobs.list(limit=100) if j.status == "succeeded")
    with pytest.raises(openai.ConflictError):
        jobs.pause(finished.id)
    # Not a Kubernetes credential: 401; no RBAC rights: 403.
    with pytest.raises(openai.AuthenticationError):
        env.client("not-a-token").models.list()
    nobody = env.client(env.nobody)
    for call in (nobody.fine_tuning.jobs.list, nobody.files.list, nobody.models.list):
        with pytest.raises(openai.PermissionDeniedError):
            call()
    with pytest.raises(openai.PermissionDeniedError):
        nobody.files.create(file=training_file(env).open("rb"), purpose="fine-tune")
    with pytest.raises(openai.PermissionDeniedError):
        nobody.fine_tuning.jobs.create(training_file=good.id, model=SUCCEED)
    # The namespace's ResourceQuota allows no more FineTuneJobs: 429.
    quota = env.client(env.quota)
    data = quota.files.create(file=training_file(env).open("rb"), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError) as limited:
        quota.fine_tuning.jobs.create(training_file=data.id, model=SUCCEED)
    assert limited.value.code == "quota_exceeded"
    # A project that is not a namespace name: 400.
    with pytest.raises(openai.BadRequestError):
        env.client(project="Not A Namespace").fine_tuning.jobs.list()


# ---------------------------------------------------------------------------- isolation


def test_namespaces_see_and_touch_only_their_own_jobs_and_files(env: Env) -> None:
    alice, bob = env.client(env.alice), env.client(env.bob)
    alice_file = alice.files.create(file=training_file(env).open("rb"), purpose="fine-tune")
    alice_job = alice.fine_tuning.jobs.create(training_file=alice_file.id, model=SLEEP)
    bob_file = bob.files.create(file=training_file(env, "bob.jsonl").open("rb"),
                                purpose="fine-tune")  # fmt: skip
    bob_job = bob.fine_tuning.jobs.create(training_file=bob_file.id, model=SLEEP)
    try:
        # Each key sees its own namespace only.
        assert alice_job.id not in [j.id for j in bob.fine_tuning.jobs.list(limit=100)]
        assert bob_job.id not in [j.id for j in alice.fine_tuning.jobs.list(limit=100)]
        assert alice_file.id not in [f.id for f in bob.files.list()]
        assert bob_file.id not in [f.id for f in alice.files.list()]
        assert not [m for m in bob.models.list() if f":{env.ns_a}:" in m.id]
        # Alice's ids mean nothing in Bob's namespace.
        for call in (bob.fine_tuning.jobs.retrieve, bob.fine_tuning.jobs.cancel,
                     bob.fine_tuning.jobs.pause, bob.fine_tuning.jobs.list_events):  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                call(alice_job.id)
        for file_call in (bob.files.retrieve, bob.files.content, bob.files.delete):
            with pytest.raises(openai.NotFoundError):
                file_call(alice_file.id)
        with pytest.raises(openai.BadRequestError) as err:
            bob.fine_tuning.jobs.create(training_file=alice_file.id, model=SLEEP)
        assert err.value.param == "training_file"
        # Naming the other namespace as project: RBAC says no.
        bob_in_a = env.client(env.bob, project=env.ns_a)
        for denied in (
            bob_in_a.fine_tuning.jobs.list,
            lambda: bob_in_a.fine_tuning.jobs.retrieve(alice_job.id),
            lambda: bob_in_a.fine_tuning.jobs.cancel(alice_job.id),
            lambda: bob_in_a.fine_tuning.jobs.list_events(alice_job.id),
            bob_in_a.files.list,
            lambda: bob_in_a.files.retrieve(alice_file.id),
            lambda: bob_in_a.files.content(alice_file.id),
            lambda: bob_in_a.files.delete(alice_file.id),
        ):
            with pytest.raises(openai.PermissionDeniedError):
                denied()
        alice_in_b = env.client(env.alice, project=env.ns_b)
        for denied in (alice_in_b.fine_tuning.jobs.list, alice_in_b.files.list):
            with pytest.raises(openai.PermissionDeniedError):
                denied()
        with pytest.raises(openai.PermissionDeniedError):
            alice_in_b.fine_tuning.jobs.cancel(bob_job.id)
        with pytest.raises(openai.PermissionDeniedError):
            alice_in_b.files.retrieve(bob_file.id)
        assert bob.fine_tuning.jobs.retrieve(bob_job.id).status != "cancelled"
        assert alice.fine_tuning.jobs.retrieve(alice_job.id).status != "cancelled"
        assert alice.files.retrieve(alice_file.id).id == alice_file.id
        # A file in use by an unfinished job cannot be deleted; afterwards it can.
        with pytest.raises(openai.ConflictError):
            alice.files.delete(alice_file.id)
    finally:
        alice.fine_tuning.jobs.cancel(alice_job.id)
        bob.fine_tuning.jobs.cancel(bob_job.id)
    assert alice.files.delete(alice_file.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(alice_file.id)


def test_deleting_a_fine_tuned_model_keeps_its_job(env: Env) -> None:
    client = env.client()
    finished = next(j for j in client.fine_tuning.jobs.list(limit=100)
                    if j.status == "succeeded" and j.id.startswith("ftjob-"))  # fmt: skip
    model = finished.fine_tuned_model
    assert model is not None
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete(SUCCEED)  # base models belong to the catalogue
    assert client.models.delete(model).deleted
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(model)
    job = client.fine_tuning.jobs.retrieve(finished.id)
    assert job.status == "succeeded" and job.fine_tuned_model is None
    assert model not in [m.id for m in client.models.list()]
    assert json.loads(json.dumps(job.model_dump()))["id"] == finished.id
