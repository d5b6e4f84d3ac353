"""The trainer end to end, as the pod runs it: `python -m kubetune_trainer --config run.json`.

A tiny random-init Llama (2 layers, hidden 64) and a BPE tokenizer are uploaded to the local
MinIO like a user's model; datasets are JSONL objects in S3. Formats covered: chat (LoRA, status
into a real FineTuneJob, merged output), instruction (full fine-tuning), prompt-completion (LoRA,
SIGTERM and exact resume), text (LoRA, loss-only evaluation), plus a malformed dataset.
"""

from __future__ import annotations

import json
import math
import signal
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from forwarding_proxy import ForwardingProxy
from peft import PeftModel
from trainer_support import S3, TrainerRun, build_tokenizer, jsonl, records, trainer_config
from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM

from kubetune_trainer import exitcodes
from kubetune_trainer.data import load_records, tokenize_records
from kubetune_trainer.evaluation import validation_loss
from kubetune_trainer.modeling import Precision
from kubetune_trainer.storage import COMPLETE_MARKER, MANIFEST_NAME, verify_manifest
from localenv.testing import Cluster

pytest_plugins = ["trainer_fixtures"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

torch.set_num_threads(1)

# Enough steps for the counting task to be learned visibly by a LoRA of rank 8.
LEARNING = {
    "hyperparameters": {"epochs": 4, "batchSize": 2, "learningRate": 0.01},
    "dataset": {"maxSeqLength": 64},
}


def metrics_of(s3: S3, key: str) -> dict[str, Any]:
    return dict(json.loads(s3.get(f"{key}/metrics.json")))


def assert_succeeded(run: TrainerRun) -> None:
    assert run.returncode == exitcodes.OK, run.output[-4000:]
    assert run.termination_message.startswith("succeeded: published to s3://")


def assert_learned(metrics: dict[str, Any]) -> None:
    losses = [h["loss"] for h in metrics["train_loss_history"]]
    assert len(losses) == metrics["total_steps"] == metrics["steps"]
    quarter = max(1, len(losses) // 4)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    assert last < first - 0.2, losses
    evaluation = metrics["eval"]
    assert evaluation["fine_tuned"]["loss"] < evaluation["base"]["loss"] - 0.2, evaluation
    assert math.isclose(
        evaluation["fine_tuned"]["perplexity"], math.exp(evaluation["fine_tuned"]["loss"])
    )


def download_verified(s3: S3, key: str, local: Path) -> Path:
    """Download an output prefix (without checkpoints) and check it against SHA256SUMS."""
    s3.download_dir(key, local)
    manifest = (local / MANIFEST_NAME).read_bytes()
    listed = {line.split("  ", 1)[1] for line in manifest.decode().splitlines()}
    present = {
        p.relative_to(local).as_posix()
        for p in local.rglob("*")
        if p.is_file()
        and not {"checkpoints", ".kubetune"} & set(p.parts)  # resumable state, job control
        and p.name != MANIFEST_NAME
    }
    assert listed == present
    assert verify_manifest(manifest, local) == len(listed)
    return local


# ------------------------------------------------------------------------------------- data


def test_malformed_record_fails_with_its_line_before_the_model_is_fetched(
    s3: S3, run_trainer: Any, tmp_path: Path
) -> None:
    rows = jsonl(records("prompt-completion", 4, seed=1)).splitlines()
    rows.insert(2, '{"prompt": "count: one", "completion": ')  # line 3: truncated JSON
    train = s3.put("data/malformed/train.jsonl", "\n".join(rows) + "\n")
    config = trainer_config(
        # No model exists here: reaching the model fetch would fail with STORAGE_ERROR instead.
        base_model_uri=s3.uri("models/does-not-exist"),
        train_uri=train,
        output_uri=s3.uri("out/malformed"),
        work_dir=tmp_path / "work",
    )
    run = run_trainer(config, timeout=120)

    assert run.returncode == exitcodes.DATA_ERROR, run.output[-3000:]
    message = run.termination_message
    assert "\n" not in message
    assert message.startswith("data error: s3://")
    assert "train.jsonl line 3: invalid JSON" in message
    assert not run.log_lines("loading the base model")
    assert not run.log_lines("models/does-not-exist")


# ------------------------------------------------------------------------- LoRA, chat, status


def kube_api(cluster: Cluster) -> tuple[str, str, str]:
    """(host, port, CA file) of the local API server, from the admin kubeconfig."""
    config = json.loads(cluster.kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    host, port = httpx.URL(server).host, str(httpx.URL(server).port)
    return host, port, config["clusters"][0]["cluster"]["certificate-authority"]


def finetunejob(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def trainer_rbac(name: str) -> list[dict[str, Any]]:
    """A ServiceAccount allowed to get/patch the status of one FineTuneJob, nothing else."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "trainer"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "trainer"},
            "rules": [
                {
                    "apiGroups": ["kubetune.dev"],
                    "resources": ["finetunejobs/status"],
                    "resourceNames": [name],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "trainer"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "trainer"},
            "subjects": [{"kind": "ServiceAccount", "name": "trainer"}],
        },
    ]


def test_lora_chat_reports_status_into_its_finetunejob_and_publishes_loadable_outputs(
    *,
    cluster: Cluster,
    namespace: str,
    s3: S3,
    base_model_uri: str,
    datasets: dict[str, tuple[str, str]],
    tiny_model_dir: Path,
    run_trainer: Any,
    tmp_path: Path,
) -> None:
    root = Path(__file__).resolve().parents[2]
    crd = root / "crds/kubetune.dev_finetunejobs.yaml"
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/finetunejobs.kubetune.dev", timeout=60
    )
    train, validation = datasets["chat"]
    output = s3.uri("out/chat")
    config = trainer_config(
        base_model_uri=base_model_uri,
        train_uri=train,
        validation_uri=validation,
        output_uri=output,
        work_dir=tmp_path / "work",
        output={"uri": output, "mergeAdapter": True},
        evaluation={"sampleSize": 2, "maxNewTokens": 6, "prompts": ["count: two three"]},
        **LEARNING,
    )
    spec = config["spec"]
    cluster.apply([finetunejob("chat", spec), finetunejob("other", spec)], namespace)
    cluster.apply(trainer_rbac("chat"), namespace)
    uid = cluster.get("finetunejob", "chat", namespace)["metadata"]["uid"]
    token = cluster.kubectl("create", "token", "trainer", "-n", namespace).stdout.strip()
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(token)
    host, port, ca = kube_api(cluster)
    (sa_dir / "ca.crt").write_bytes(Path(ca).read_bytes())
    config["job"] = {"namespace": namespace, "name": "chat", "uid": uid}
    env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
    env["KUBETUNE_SA_DIR"] = str(sa_dir)

    run = run_trainer(config, env=env)

    assert_succeeded(run)
    assert not run.log_lines("status patch"), run.log_lines("status patch")
    metrics = metrics_of(s3, "out/chat")
    assert_learned(metrics)
    # A Llama takes packed rows and logits at trained positions only.
    assert metrics["packing"] is True and metrics["trained_logits_only"] is True
    report = json.loads(s3.get("out/chat/eval_report.json"))
    assert len(report["samples"]) == 2 and report["samples"][0]["reference"]
    assert report["prompts"][0]["prompt"] == "count: two three"
    assert (
        "| # | prompt | reference | base answer | fine-tuned answer |"
        in s3.get("out/chat/eval_report.md").decode()
    )

    # Status: every trainer-owned field arrived, through the narrow Role.
    status = cluster.get("finetunejob", "chat", namespace)["status"]
    assert status["stage"] == "Completed"
    progress = status["progress"]
    assert progress["step"] == progress["totalSteps"] == metrics["total_steps"]
    assert progress["percent"] == 100
    assert status["metrics"]["trainLoss"] > 0
    assert status["metrics"]["evalLoss"] == pytest.approx(metrics["eval"]["fine_tuned"]["loss"])
    assert status["metrics"]["baseEvalLoss"] > status["metrics"]["evalLoss"]
    assert status["metrics"]["basePerplexity"] > status["metrics"]["perplexity"]
    assert 0 <= status["metrics"]["rougeL"] <= 1
    assert status["metrics"]["tokensPerSecond"] > 0
    assert status["parameters"]["trainable"] < status["parameters"]["total"]
    assert status["estimate"]["perGpu"] > 0 and "lora" in status["estimate"]["basis"]
    assert status["output"]["adapterUri"] == output
    assert status["output"]["modelUri"] == f"{output}/merged"
    published = {f["path"]: f["sha256"] for f in status["output"]["files"]}
    assert {"adapter_model.safetensors", "merged/model.safetensors", MANIFEST_NAME} <= set(
        published
    )
    # The trainer's field manager owns status fields it may write, and nothing else.
    obj = json.loads(
        cluster.kubectl(
            "get", "finetunejob", "chat", "-n", namespace, "-o", "json", "--show-managed-fields"
        ).stdout
    )
    owned = [m for m in obj["metadata"]["managedFields"] if m["manager"] == "kubetune-trainer"]
    assert owned and all(m["subresource"] == "status" for m in owned)
    fields = {k for m in owned for k in m["fieldsV1"]["f:status"]} - {"."}
    assert fields == {
        "f:stage",
        "f:progress",
        "f:metrics",
        "f:parameters",
        "f:estimate",
        "f:distributed",  # one process: strategy single
        "f:output",
    }
    assert status["distributed"] == {
        "nodes": 1, "processesPerNode": 1, "worldSize": 1, "strategy": "single",
        "reason": "one process",
    }  # fmt: skip
    # The same token cannot write another FineTuneJob's status.
    denied = httpx.patch(
        f"https://{host}:{port}/apis/kubetune.dev/v1alpha1/namespaces/{namespace}"
        "/finetunejobs/other/status",
        content=json.dumps({"status": {"stage": "Training"}}),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/merge-patch+json",
        },
        verify=ssl.create_default_context(cafile=str(sa_dir / "ca.crt")),
    )
    assert denied.status_code == 403

    # A pod restarted after its last step (say, its node died while publishing) resumes from
    # the final checkpoint: it does not train again, and still shows the whole story.
    cluster.kubectl(
        "patch", "finetunejob", "chat", "-n", namespace, "--subresource=status",
        "--type=json", "-p", '[{"op": "remove", "path": "/status"}]',
    )  # fmt: skip
    again = run_trainer(config, env=env)
    assert_succeeded(again)
    assert again.log_lines("training already complete")
    status = cluster.get("finetunejob", "chat", namespace)["status"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == metrics["total_steps"]
    assert status["metrics"]["trainLoss"] == round(metrics["train_loss_history"][-1]["loss"], 4)
    assert status["output"]["adapterUri"] == output

    # The published adapter is the model the run evaluated: same validation loss when
    # loaded back with peft, and the merged copy gives the same logits.
    local = download_verified(s3, "out/chat", tmp_path / "published")
    assert {p.name for p in local.iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "trainer_config.json",
        "metrics.json",
        "eval_report.json",
        "eval_report.md",
        "merged",
    }
    adapter_config = json.loads((local / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == base_model_uri
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    tuned = PeftModel.from_pretrained(base, local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    val_path = tmp_path / "validation.jsonl"
    val_path.write_bytes(s3.get("data/chat/validation.jsonl"))
    examples = tokenize_records(load_records(val_path).records, tokenizer, "chat", 64)
    loss, _ = validation_loss(
        tuned,
        examples,
        rows_per_batch=2,
        max_seq_length=64,
        pad_token_id=tokenizer.pad_token_id,
        precision=Precision(torch.device("cpu"), torch.float32, None, grad_scaler=False),
    )
    assert loss == pytest.approx(metrics["eval"]["fine_tuned"]["loss"], abs=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(local / "merged")
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


# ------------------------------------------------------------------------- full fine-tuning


def test_full_fine_tuning_on_instruction_data_learns_and_publishes_a_model(
    s3: S3,
    base_model_uri: str,
    datasets: dict[str, tuple[str, str]],
    run_trainer: Any,
    tmp_path: Path,
) -> None:
    train, validation = datasets["instruction"]
    config = trainer_config(
        base_model_uri=base_model_uri,
        train_uri=train,
        validation_uri=validation,
        output_uri=s3.uri("out/full"),
        work_dir=tmp_path / "work",
        method="full",
        hyperparameters={"epochs": 3, "batchSize": 2, "learningRate": 0.003},
        dataset={"maxSeqLength": 128},
    )
    run = run_trainer(config)

    assert_succeeded(run)
    # auto gradient checkpointing is on for full fine-tuning.
    assert run.log_lines("gradient checkpointing on")
    metrics = metrics_of(s3, "out/full")
    assert_learned(metrics)
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["total"]

    local = download_verified(s3, "out/full", tmp_path / "published")
    assert (local / "model.safetensors").exists() and (local / "config.json").exists()
    assert not (local / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(local)
    assert sum(p.numel() for p in model.parameters()) == metrics["parameters"]["total"]


# ------------------------------------------------------------------------------ text format


def test_text_format_trains_and_evaluates_loss_only(
    s3: S3,
    base_model_uri: str,
    datasets: dict[str, tuple[str, str]],
    run_trainer: Any,
    tmp_path: Path,
) -> None:
    train, validation = datasets["text"]
    config = trainer_config(
        base_model_uri=base_model_uri,
        train_uri=train,
        validation_uri=validation,
        output_uri=s3.uri("out/text"),
        work_dir=tmp_path / "work",
        hyperparameters={"maxSteps": 6, "packing": False, "batchSize": 8},
        evaluation={"metrics": ["loss", "perplexity"], "sampleSize": 0},
    )
    run = run_trainer(config)

    assert_succeeded(run)
    assert run.log_lines("micro-batches of up to 8 examples")  # padded batches
    metrics = metrics_of(s3, "out/text")
    assert metrics["steps"] == 6 and metrics["data"]["format"] == "text"
    assert metrics["eval"]["fine_tuned"]["rouge_l"] is None
    assert metrics["eval"]["fine_tuned"]["loss"] < metrics["eval"]["base"]["loss"]
    download_verified(s3, "out/text", tmp_path / "published")


# ------------------------------------------------------------- an architecture without packing


def test_bloom_trains_with_eager_attention_one_example_per_row(
    s3: S3,
    datasets: dict[str, tuple[str, str]],
    run_trainer: Any,
    tmp_path: Path,
) -> None:
    """BLOOM has no SDPA attention and builds ALiBi from a 2D mask, so it cannot take packed
    rows: the trainer notices (a probe, not a list of architectures) and trains unpacked."""
    tokenizer = build_tokenizer()
    config = BloomConfig(
        hidden_size=64,
        n_layer=2,
        n_head=4,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1234)
    local = tmp_path / "tiny-bloom"
    BloomForCausalLM(config).save_pretrained(local)
    tokenizer.save_pretrained(local)
    train, validation = datasets["chat"]
    run = run_trainer(
        trainer_config(
            base_model_uri=s3.upload_dir(local, "models/tiny-bloom"),
            train_uri=train,
            validation_uri=validation,
            output_uri=s3.uri("out/bloom"),
            work_dir=tmp_path / "work",
            **LEARNING,
        )
    )

    assert_succeeded(run)
    assert run.log_lines("no SDPA attention; using eager attention")
    assert run.log_lines("does not keep packed sequences apart")
    assert run.log_lines("micro-batches of up to 2 examples")  # re-planned, padded batches
    metrics = metrics_of(s3, "out/bloom")
    assert metrics["packing"] is False
    assert_learned(metrics)


# ---------------------------------------------------------------------------------- resume


def test_sigterm_checkpoints_and_the_resumed_run_matches_an_uninterrupted_one(
    *,
    s3: S3,
    cluster: Cluster,
    base_model_uri: str,
    datasets: dict[str, tuple[str, str]],
    run_trainer: Any,
    start_trainer: Any,
    tmp_path: Path,
) -> None:
    train, validation = datasets["prompt-completion"]

    def config(output: str, name: str) -> dict[str, Any]:
        return trainer_config(
            base_model_uri=base_model_uri,
            train_uri=train,
            validation_uri=validation,
            output_uri=s3.uri(output),
            work_dir=tmp_path / name,
            checkpointing={"intervalSteps": 20, "keep": 2},
            evaluation={"metrics": ["loss"], "sampleSize": 0},
            hyperparameters={**LEARNING["hyperparameters"], "epochs": 6},  # 48 steps
            dataset=LEARNING["dataset"],
        )

    # B: interrupted by SIGTERM mid-run, as in a preemption. A: the same run, uninterrupted,
    # trained meanwhile (each process is single-threaded; the machine has two cores). B's
    # store is behind a proxy holding its step-20 checkpoint upload: the SIGTERM lands there,
    # inside the training loop, however fast or loaded the machine.
    step_20 = s3.uri("out/resumed/checkpoints/step-000000020/").split("/", 3)[3]
    with ForwardingProxy(cluster.s3_env["AWS_ENDPOINT_URL"], hold=step_20) as proxy:
        b = start_trainer(config("out/resumed", "b"), name="b", env={"AWS_ENDPOINT_URL": proxy.url})
        a = start_trainer(config("out/uninterrupted", "a"), name="a")
        assert proxy.held.wait(120), "B never uploaded its step-20 checkpoint"
        b.proc.send_signal(signal.SIGTERM)
        proxy.release()
        interrupted = b.wait(timeout=120)
    uninterrupted = a.wait(timeout=240)

    assert interrupted.returncode == exitcodes.PREEMPTED, interrupted.output[-3000:]
    assert interrupted.termination_message.startswith("preempted: stopped by SIGTERM")
    assert_succeeded(uninterrupted)
    total = metrics_of(s3, "out/uninterrupted")["total_steps"]
    checkpoints = s3.keys("out/resumed/checkpoints")
    # The newest checkpoint is the one taken on SIGTERM, at the next step boundary.
    stopped = max(int(k.split("/")[0].removeprefix("step-")) for k in checkpoints)
    assert stopped == 21 < total, checkpoints  # the step-20 checkpoint completed first
    assert f"checkpoint of step {stopped} at s3://" in interrupted.termination_message
    state = json.loads(s3.get(f"out/resumed/checkpoints/step-{stopped:09d}/trainer_state.json"))
    assert state["step"] == stopped and len(state["loss_history"]) == stopped
    assert state["batch_index"] > 0  # the data position: next micro-batch of its epoch

    # A later checkpoint without its _COMPLETE marker (an upload cut short) must be ignored.
    bogus = f"out/resumed/checkpoints/step-{stopped + 5:09d}"
    for key in checkpoints:
        step_dir, rel = key.split("/", 1)
        if step_dir == f"step-{stopped:09d}" and rel != COMPLETE_MARKER:
            s3.put(f"{bogus}/{rel}", s3.get(f"out/resumed/checkpoints/{key}"))

    resumed = run_trainer(config("out/resumed", "c"), name="c")

    assert_succeeded(resumed)
    assert resumed.log_lines(f"resuming from the checkpoint of step {stopped}/{total}")
    expected = metrics_of(s3, "out/uninterrupted")
    got = metrics_of(s3, "out/resumed")
    assert got["steps"] == expected["steps"] == total
    a_losses = [(h["step"], h["loss"]) for h in expected["train_loss_history"]]
    c_losses = [(h["step"], h["loss"]) for h in got["train_loss_history"]]
    assert [s for s, _ in c_losses] == [s for s, _ in a_losses] == list(range(1, total + 1))
    for (step, want), (_, have) in zip(a_losses, c_losses, strict=True):
        assert have == pytest.approx(want, abs=1e-4), f"step {step}"
    assert got["eval"]["fine_tuned"]["loss"] == pytest.approx(
        expected["eval"]["fine_tuned"]["loss"], abs=1e-4
    )
    # The finished run pruned to `keep` complete checkpoints, the incomplete one is gone.
    left = sorted({k.split("/")[0] for k in s3.keys("out/resumed/checkpoints")})
    assert left[-1] == f"step-{total:09d}" and len(left) <= 2, left


# ------------------------------------------------------------------------- trust: issue cases


def _owned(job_uid: str) -> dict[str, str]:
    return {"namespace": "team", "name": "support", "uid": job_uid}


def test_a_new_job_neither_resumes_nor_overwrites_another_jobs_output(
    s3: S3,
    base_model_uri: str,
    datasets: dict[str, tuple[str, str]],
    run_trainer: Any,
    tmp_path: Path,
) -> None:
    """The quickstart deleted and applied again with other settings: the old run's finished
    model and checkpoints stay, unresumed, unless the new job says output.overwrite."""
    train, validation = datasets["prompt-completion"]

    def config(uid: str, name: str, **spec: Any) -> dict[str, Any]:
        return trainer_config(
            base_model_uri=base_model_uri,
            train_uri=train,
            validation_uri=validation,
            output_uri=s3.uri("out/owned"),
            work_dir=tmp_path / name,
            job=_owned(uid),
            evaluation={"metrics": ["loss"], "sampleSize": 0},
            **spec,
        )

    first = run_trainer(config("uid-first", "first", hyperparameters={"epochs": 2}), name="first")
    assert_succeeded(first)
    published = s3.get(f"out/owned/{MANIFEST_NAME}")
    first_steps = metrics_of(s3, "out/owned")["steps"]

    # Same name, new uid, other epochs and learning rate (the issue's reproduction).
    changed = {"hyperparameters": {"epochs": 1, "learningRate": 5e-3}}
    second = run_trainer(config("uid-second", "second", **changed), name="second")
    assert second.returncode == exitcodes.OUTPUT_EXISTS, second.output[-3000:]
    message = second.termination_message
    assert message.startswith("output exists: output.uri s3://")
    assert "FineTuneJob team/support (uid uid-first)" in message
    assert "spec.output.overwrite: true" in message
    assert not second.log_lines("RESUMING") and not second.log_lines("loading the base model")
    assert s3.get(f"out/owned/{MANIFEST_NAME}") == published  # nothing was touched

    overwrite = {**changed, "output": {"uri": s3.uri("out/owned"), "overwrite": True}}
    third = run_trainer(config("uid-second", "third", **overwrite), name="third")
    assert_succeeded(third)
    assert third.log_lines("previous contents deleted (output.overwrite)")
    assert third.log_lines("no checkpoint under") and not third.log_lines("resuming from")
    metrics = metrics_of(s3, "out/owned")
    assert metrics["steps"] == metrics["total_steps"] < first_steps  # its own run, from step 0


def test_sigterm_before_training_stops_the_run_at_once(
    *,
    s3: S3,
    cluster: Cluster,
    base_model_uri: str,
    datasets: dict[str, tuple[str, str]],
    start_trainer: Any,
    tmp_path: Path,
) -> None:
    # The trainer reaches MinIO through a proxy that holds the base model's download, so the
    # SIGTERM lands during setup on any machine (after a log line it raced the first step).
    train, _ = datasets["chat"]
    model_key = base_model_uri.split("/", 3)[3]
    with ForwardingProxy(cluster.s3_env["AWS_ENDPOINT_URL"], hold=model_key) as proxy:
        run = start_trainer(
            trainer_config(
                base_model_uri=base_model_uri,
                train_uri=train,
                output_uri=s3.uri("out/sigterm-early"),
                work_dir=tmp_path / "work",
            ),
            env={"AWS_ENDPOINT_URL": proxy.url},
        )
        assert proxy.held.wait(60), "the trainer never asked for the base model"
        run.proc.send_signal(signal.SIGTERM)
        result = run.wait(timeout=30)
    assert result.returncode == exitcodes.PREEMPTED, result.output[-3000:]
    assert "outside the training loop" in result.termination_message
    assert result.log_lines("not waiting for")  # the held download was left behind
    assert not s3.keys("out/sigterm-early/checkpoints/")


def test_a_credential_with_a_newline_fails_naming_the_secret_and_leaks_nowhere(
    *,
    s3: S3,
    cluster: Cluster,
    base_model_uri: str,
    datasets: dict[str, tuple[str, str]],
    run_trainer: Any,
    tmp_path: Path,
) -> None:
    key_id = cluster.s3_env["AWS_ACCESS_KEY_ID"]
    train, _ = datasets["chat"]
    config = trainer_config(
        base_model_uri=base_model_uri,
        train_uri=train,
        output_uri=s3.uri("out/bad-key"),
        work_dir=tmp_path / "work",
        storage={"credentialsSecretRef": {"name": "s3-credentials"}},
    )
    run = run_trainer(config, env={"AWS_ACCESS_KEY_ID": key_id + "\n"}, timeout=60)
    assert run.returncode == exitcodes.STORAGE_ERROR, run.output[-3000:]
    assert "key AWS_ACCESS_KEY_ID of Secret 's3-credentials'" in run.termination_message
    for text in (run.output, run.termination_message):
        assert key_id not in text
