"""FineTuneJobs as OpenAI jobs (kubetune_api.jobs): status, error, model ids, the manifest."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_api.catalogue import parse_catalogue
from kubetune_api.errors import ApiError
from kubetune_api.finetuning import check_file_formats, objective_of
from kubetune_api.hyperparameters import DEFAULT_BETA, Resolved, resolve_beta
from kubetune_api.jobs import (
    CREATED_BY,
    CREATED_BY_LABEL,
    JOB_ANNOTATION,
    JobView,
    NewJob,
    Outputs,
    fine_tuned_model_id,
    finetunejob,
    job_status,
    metadata_matches,
    new_job_name,
    newest_first,
    parse_fine_tuned_model,
    to_openai,
)
from kubetune_api.objectstore import Layout
from kubetune_api.schemas import JobCreate, StoredFile
from kubetune_trainer.api import FineTuneSpec

LAYOUT = Layout("kubetune", "openai", "http://127.0.0.1:9000")
MODELS = parse_catalogue(
    [
        {
            "name": "tiny-llama",
            "uri": "s3://kubetune/quickstart/model/",
            "maxBatchSize": 4,
            "spec": {
                "hyperparameters": {"learningRate": 0.003},
                "resources": {"gpus": 0, "memory": "4Gi"},
                "dataset": {"maxSeqLength": 256},
            },
        }
    ]
)
TRAIN = StoredFile(id="file-" + "a" * 24, filename="train.jsonl", bytes=10, created_at=1,
                   purpose="fine-tune", status="processed", format="chat", records=200)  # fmt: skip


def ftj(
    phase: str | None = None,
    *,
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
    recorded: dict[str, Any] | None = None,
    name: str = "ftjob-1",
) -> JobView:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "team-a",
        "uid": "uid-1",
        "creationTimestamp": "2025-01-02T03:04:05Z",
    }
    if recorded is not None:
        meta["annotations"] = {JOB_ANNOTATION: json.dumps(recorded)}
        meta["labels"] = {CREATED_BY_LABEL: CREATED_BY}
    body_spec = {
        "baseModel": {"uri": "s3://kubetune/quickstart/model/"},
        "dataset": {"trainUri": "s3://kubetune/data/train.jsonl"},
        "hyperparameters": {"epochs": 3.0, "batchSize": 2, "gradientAccumulationSteps": 2,
                            "learningRate": 0.0015, "seed": 7},
        "output": {"uri": "s3://kubetune/out/"},
        **(spec or {}),
    }  # fmt: skip
    body_status = {**({"phase": phase} if phase else {}), **(status or {})}
    return JobView({"metadata": meta, "spec": body_spec, "status": body_status})


@pytest.mark.parametrize(
    ("phase", "spec", "expected"),
    [
        (None, {}, "validating_files"),
        ("Pending", {}, "queued"),
        ("Queued", {}, "queued"),
        ("Running", {}, "running"),
        ("Succeeded", {}, "succeeded"),
        ("Failed", {}, "failed"),
        ("Cancelled", {}, "cancelled"),
        ("Suspended", {"suspend": True}, "paused"),
        ("Running", {"suspend": True}, "paused"),  # asked to pause, pod still stopping
        ("Suspended", {"suspend": False}, "queued"),  # resumed, not restarted yet
        ("Running", {"cancel": True}, "cancelled"),  # cancel requested
        ("Succeeded", {"cancel": True}, "succeeded"),  # finished first
        ("Failed", {"suspend": True}, "failed"),
    ],
)
def test_status_maps_phase_and_intent(
    phase: str | None, spec: dict[str, Any], expected: str
) -> None:
    assert job_status(ftj(phase, spec=spec)) == expected


def test_a_failed_job_carries_reason_and_message_naming_the_training_file() -> None:
    job = to_openai(
        ftj("Failed", status={"reason": "DataError", "message": "train.jsonl line 3: bad"}),
        MODELS, {},
    )  # fmt: skip
    assert job.status == "failed"
    assert job.error is not None
    assert (job.error.code, job.error.message, job.error.param) == (
        "DataError", "train.jsonl line 3: bad", "training_file",
    )  # fmt: skip
    oom = to_openai(ftj("Failed", status={"reason": "OOMKilled", "message": "m"}), MODELS, {})
    assert oom.error is not None and oom.error.param is None


def test_a_kubectl_applied_job_reads_from_its_spec() -> None:
    names = {"s3://kubetune/quickstart/model": "tiny-llama"}
    progress = {"etaSeconds": 60, "updateTime": "2025-01-02T03:05:00Z"}
    job = to_openai(ftj("Running", status={"progress": progress}), MODELS, names)
    assert job.id == "ftjob-1" and job.organization_id == "team-a"
    assert job.model == "tiny-llama"
    assert job.training_file == "s3://kubetune/data/train.jsonl"
    assert job.seed == 7
    assert job.created_at == 1735787045
    assert job.estimated_finish == 1735787100 + 60
    # 2 x 2 examples per step; 0.0015 is half the catalogue's 0.003.
    assert job.hyperparameters.model_dump() == {
        "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 0.5,
    }  # fmt: skip
    assert job.fine_tuned_model is None and job.finished_at is None


def test_a_succeeded_job_names_its_model_and_results() -> None:
    recorded = {"model": "tiny-llama", "suffix": "support", "training_file": TRAIN.id,
                "metadata": {"team": "a"},
                "hyperparameters": {"n_epochs": 2, "batch_size": 1,
                                    "learning_rate_multiplier": 1.0}}  # fmt: skip
    view = ftj("Succeeded", recorded=recorded, status={"completionTime": "2025-01-02T04:00:00Z"})
    job = to_openai(view, MODELS, {}, Outputs(trained_tokens=1234, result_file="file-results-x"))
    assert job.fine_tuned_model == "ft:tiny-llama:team-a:support:ftjob-1"
    assert job.trained_tokens == 1234 and job.result_files == ["file-results-x"]
    assert job.finished_at == 1735790400
    assert job.training_file == TRAIN.id and job.metadata == {"team": "a"}
    assert job.user_provided_suffix == "support"
    assert job.method is not None and job.method.supervised.hyperparameters.n_epochs == 2


def test_fine_tuned_model_ids_round_trip_and_stay_one_path_segment() -> None:
    view = ftj("Succeeded")
    model = fine_tuned_model_id(view, "s3://kubetune/quickstart/model/")
    assert model == "ft:s3-kubetune-quickstart-model:team-a::ftjob-1"
    assert "/" not in model
    assert parse_fine_tuned_model(model) == ("team-a", "ftjob-1")
    assert parse_fine_tuned_model("tiny-llama") is None
    assert parse_fine_tuned_model("ft:a:b") is None


def test_job_names_are_random_or_follow_the_idempotency_key() -> None:
    first, second = new_job_name("ns", None), new_job_name("ns", None)
    assert first != second and first.startswith("ftjob-") and len(first) == 30
    assert new_job_name("ns", "key-1") == new_job_name("ns", "key-1")
    assert new_job_name("ns", "key-1") != new_job_name("other", "key-1")


def test_the_manifest_is_a_valid_finetunejob_with_its_own_output() -> None:
    new = NewJob(
        name="ftjob-abc", namespace="team-a", model=MODELS["tiny-llama"], training=TRAIN,
        validation=None, resolved=Resolved(3, 10, 1.0, 0.003), seed=5, suffix=None,
        metadata={"k": "v"}, credentials_secret="s3-credentials", idempotency_key="retry-me",
    )  # fmt: skip
    manifest = finetunejob(new, LAYOUT)
    spec = FineTuneSpec.model_validate(manifest["spec"])
    assert spec.base_model.uri == "s3://kubetune/quickstart/model/"
    assert spec.dataset.train_uri == f"s3://kubetune/openai/team-a/files/{TRAIN.id}/data.jsonl"
    assert spec.dataset.format == "chat" and spec.dataset.max_seq_length == 256
    assert spec.output.uri == "s3://kubetune/openai/team-a/jobs/ftjob-abc/"
    # 10 examples per step with micro-batches of at most 4 (the catalogue's bound): 4 x 3.
    assert (spec.hyperparameters.batch_size, spec.hyperparameters.gradient_accumulation_steps) == (
        4,
        3,
    )
    assert spec.hyperparameters.epochs == 3 and spec.hyperparameters.seed == 5
    assert spec.resources.gpus == 0
    assert spec.storage.endpoint == "http://127.0.0.1:9000"
    assert spec.storage.credentials_secret_ref is not None
    assert manifest["metadata"]["labels"] == {CREATED_BY_LABEL: CREATED_BY}
    view = JobView({**manifest, "status": {}})
    assert view.openai["training_file"] == TRAIN.id and view.created_by_api
    assert metadata_matches(view, {"k": "v"}) and not metadata_matches(view, {"k": "w"})


def test_a_request_the_finetunejob_schema_refuses_is_a_400() -> None:
    new = NewJob(
        name="ftjob-abc", namespace="team-a", model=MODELS["tiny-llama"], training=TRAIN,
        validation=None, resolved=Resolved(3, 1, 1.0, 0.003), seed=5, suffix=None,
        metadata=None, credentials_secret="Not_A_Name", idempotency_key=None,
    )  # fmt: skip
    with pytest.raises(ApiError) as err:
        finetunejob(new, LAYOUT)
    assert err.value.status == 400 and "credentialsSecretRef" in err.value.message


def test_jobs_list_newest_first() -> None:
    old = ftj(name="b")
    newer = {**old.meta, "name": "a", "creationTimestamp": "2026-01-01T00:00:00Z"}
    new = JobView({**old.body, "metadata": newer})
    assert [j.name for j in newest_first([old, new])] == ["a", "b"]


def test_the_server_reads_only_outputs_in_the_jobs_own_namespace_prefix() -> None:
    own = "s3://kubetune/openai/team-a/jobs/ftjob-1/"
    assert LAYOUT.owns("team-a", own, None)
    assert LAYOUT.owns("team-a", own, "http://127.0.0.1:9000/")
    assert not LAYOUT.owns("team-b", own, None)  # another namespace's job output
    assert not LAYOUT.owns("team-a", "s3://kubetune/openai/team-a/", None)  # the whole prefix
    assert not LAYOUT.owns("team-a", "s3://kubetune/openai/team-ab/jobs/x/", None)
    assert not LAYOUT.owns("team-a", "s3://kubetune/quickstart/output/", None)
    assert not LAYOUT.owns("team-a", own, "https://s3.example.com")  # another store
    assert not LAYOUT.owns("team-a", "s3://kubetune/openai/team-a/../team-b/jobs/x/", None)


def test_an_edited_annotation_never_breaks_the_job() -> None:
    for garbage in ('{"metadata": {"k": 1}}', "not json", '["a"]', '{"hyperparameters": 3}'):
        view = ftj("Running")
        meta = {**view.meta, "annotations": {JOB_ANNOTATION: garbage}}
        job = to_openai(JobView({**view.body, "metadata": meta}), MODELS, {})
        assert job.metadata is None and job.training_file == "s3://kubetune/data/train.jsonl"


# ------------------------------------------------------------------------------------- dpo

PAIRS = TRAIN.model_copy(update={"id": "file-" + "b" * 24, "format": "preference"})


def _create(**method: Any) -> JobCreate:
    return JobCreate.model_validate({"model": "tiny-llama", "training_file": TRAIN.id, **method})


def test_method_dpo_is_a_dpo_finetunejob_with_its_beta_and_reads_back_as_dpo() -> None:
    new = NewJob(
        name="ftjob-dpo", namespace="team-a", model=MODELS["tiny-llama"], training=PAIRS,
        validation=None, resolved=Resolved(2, 4, 1.0, 0.003), seed=5, suffix=None,
        metadata=None, credentials_secret=None, idempotency_key=None, objective="dpo", beta=0.25,
    )  # fmt: skip
    manifest = finetunejob(new, LAYOUT)
    spec = FineTuneSpec.model_validate(manifest["spec"])  # the CEL rule's twin: format and dpo
    assert spec.objective == "dpo" and spec.dpo.beta == 0.25
    assert spec.dataset.format == "preference"
    job = to_openai(JobView({**manifest, "status": {}}), MODELS, {})
    assert job.method is not None and job.method.type == "dpo" and job.method.supervised is None
    assert job.method.dpo is not None
    assert job.method.dpo.hyperparameters.model_dump() == {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0, "beta": 0.25,
    }  # fmt: skip


def test_a_kubectl_applied_dpo_job_reads_its_method_from_the_spec() -> None:
    job = to_openai(ftj(spec={"objective": "dpo", "dpo": {"beta": 0.5}}), MODELS, {})
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters.beta == 0.5
    default = to_openai(ftj(spec={"objective": "dpo"}), MODELS, {})
    assert default.method is not None and default.method.dpo is not None
    assert default.method.dpo.hyperparameters.beta == DEFAULT_BETA == 0.1


@pytest.mark.parametrize(
    ("method", "objective"),
    [
        (None, "sft"),
        ({"type": "supervised"}, "sft"),
        ({"type": "dpo"}, "dpo"),
        ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}, "dpo"),
    ],
)
def test_method_type_chooses_the_objective(method: Any, objective: str) -> None:
    assert objective_of(_create(**({"method": method} if method else {}))) == objective


@pytest.mark.parametrize(
    ("method", "param", "words"),
    [
        ({"type": "reinforcement"}, "method.type", "reinforcement fine-tuning"),
        ({"type": "dpo", "supervised": {}}, "method.supervised", "only method.dpo"),
        ({"type": "supervised", "dpo": {}}, "method.dpo", "only method.supervised"),
    ],
)
def test_methods_that_cannot_run_are_400s_naming_the_field(
    method: Any, param: str, words: str
) -> None:
    with pytest.raises(ApiError) as err:
        objective_of(_create(method=method))
    assert err.value.status == 400 and err.value.param == param and words in err.value.message


def test_files_must_fit_the_method() -> None:
    check_file_formats("dpo", PAIRS, None)
    check_file_formats("sft", TRAIN, TRAIN)
    with pytest.raises(ApiError) as err:
        check_file_formats("dpo", TRAIN, None)
    assert err.value.param == "training_file" and "holds chat records" in err.value.message
    with pytest.raises(ApiError) as err:
        check_file_formats("sft", PAIRS, None)
    assert err.value.param == "training_file" and "'type': 'dpo'" in err.value.message
    with pytest.raises(ApiError) as err:
        check_file_formats("dpo", PAIRS, TRAIN)
    assert err.value.param == "validation_file"


@pytest.mark.parametrize("beta", [0, -1, 11, True, "high"])
def test_beta_out_of_range_is_a_400_naming_it(beta: Any) -> None:
    with pytest.raises(ApiError) as err:
        resolve_beta(beta, "method.dpo.hyperparameters.beta")
    assert err.value.param == "method.dpo.hyperparameters.beta"
    assert resolve_beta("auto", "b") == DEFAULT_BETA and resolve_beta(10, "b") == 10.0
