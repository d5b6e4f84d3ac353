"""Hyperparameters, pagination, error shapes, events, results CSV, uploads, settings and the
catalogue of the API server: pure functions, no cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import kube
from kubetune_api.catalogue import CatalogueError, parse_catalogue
from kubetune_api.errors import ApiError, from_validation
from kubetune_api.events import job_events
from kubetune_api.files import Upload, results_csv, safe_filename, validate
from kubetune_api.finetuning import metadata_filter
from kubetune_api.hyperparameters import auto_batch_size, auto_epochs, resolve
from kubetune_api.identity import bearer_token, token_namespace
from kubetune_api.jobs import JobView
from kubetune_api.pagination import limit_of, paginate
from kubetune_api.schemas import HyperparametersIn, JobCreate
from kubetune_api.settings import SettingsError, load_settings
from kubetune_trainer.training_log import EvalRecord, TrainRecord

# ------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize(("examples", "epochs"), [(10, 10), (20, 5), (30, 4), (34, 3),
                                                  (1000, 3), (10000, 2), (30000, 1)])  # fmt: skip
def test_auto_epochs_follow_the_data_size(examples: int, epochs: int) -> None:
    assert auto_epochs(examples) == epochs


def test_auto_batch_size_grows_with_data_within_the_models_bound() -> None:
    assert auto_batch_size(10, 8) == 1
    assert auto_batch_size(2000, 8) == 4
    assert auto_batch_size(100_000, 8) == 8


def test_resolution_shows_numbers_and_multiplies_the_models_learning_rate() -> None:
    auto = resolve(None, examples=200, model_max_batch=8, model_learning_rate=0.003)
    assert (auto.epochs, auto.batch_size, auto.learning_rate_multiplier) == (3, 1, 1.0)
    assert auto.learning_rate == 0.003
    given = resolve(HyperparametersIn(n_epochs=2, batch_size=16, learning_rate_multiplier=0.5),
                    examples=200, model_max_batch=8, model_learning_rate=0.003)  # fmt: skip
    assert (given.epochs, given.batch_size, given.learning_rate) == (2, 16, 0.0015)
    assert given.public().model_dump() == {
        "n_epochs": 2, "batch_size": 16, "learning_rate_multiplier": 0.5,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("values", "param"),
    [
        ({"n_epochs": -1}, "hyperparameters.n_epochs"),
        ({"n_epochs": 0}, "hyperparameters.n_epochs"),
        ({"n_epochs": 2.5}, "hyperparameters.n_epochs"),
        ({"n_epochs": "three"}, "hyperparameters.n_epochs"),
        ({"n_epochs": True}, "hyperparameters.n_epochs"),
        ({"batch_size": 0}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": -0.1}, "hyperparameters.learning_rate_multiplier"),
        ({"learning_rate_multiplier": 1000}, "hyperparameters.learning_rate_multiplier"),
    ],
)
def test_bad_hyperparameters_are_400s_naming_the_parameter(
    values: dict[str, Any], param: str
) -> None:
    with pytest.raises(ApiError) as err:
        resolve(HyperparametersIn(**values), examples=10, model_max_batch=8,
                model_learning_rate=0.003)  # fmt: skip
    assert err.value.status == 400 and err.value.param == param
    assert param in err.value.message


def test_unknown_request_fields_are_named() -> None:
    with pytest.raises(Exception) as caught:
        JobCreate.model_validate({"model": "m", "training_file": "f", "n_epoch": 3})
    err = from_validation(caught.value)  # type: ignore[arg-type]
    assert (err.status, err.param) == (400, "n_epoch")
    assert "unknown parameter" in err.message


# ------------------------------------------------------------------------------ pagination


def test_cursor_pages_cover_the_list_once() -> None:
    items = [f"id-{i}" for i in range(7)]
    seen, after, pages = [], None, 0
    while True:
        page = paginate(items, after=after, limit=3, key=str)
        seen += page.data
        pages += 1
        if not page.has_more:
            break
        after = page.data[-1]
    assert seen == items and pages == 3
    assert paginate(items, after=None, limit=7, key=str).has_more is False


def test_bad_cursors_and_limits_are_400s() -> None:
    with pytest.raises(ApiError) as err:
        paginate(["a"], after="zzz", limit=1, key=str)
    assert err.value.param == "after"
    for raw in ("0", "x", "1001"):
        with pytest.raises(ApiError) as err:
            limit_of({"limit": raw}, 20, 1000)
        assert err.value.param == "limit"
    assert limit_of({}, 20, 1000) == 20


def test_metadata_filter_reads_the_clients_deep_object_query() -> None:
    assert metadata_filter({"metadata[team]": "a", "limit": "2", "metadata[x]": ""}) == {
        "team": "a", "x": "",
    }  # fmt: skip


# ----------------------------------------------------------------------------------- errors


def test_errors_have_openais_shape_and_say_whether_to_retry() -> None:
    err = ApiError(404, "no such job", param="fine_tuning_job_id", code="not_found")
    assert err.body() == {
        "error": {
            "message": "no such job",
            "type": "not_found_error",
            "param": "fine_tuning_job_id",
            "code": "not_found",
        }
    }
    assert err.headers() == {"x-should-retry": "false"}
    limited = ApiError(429, "slow down", retry_after=2.4)
    assert limited.headers() == {"x-should-retry": "true", "Retry-After": "2"}


@pytest.mark.parametrize(
    ("status", "message", "expected", "code"),
    [
        (401, "Unauthorized", 401, "invalid_api_key"),
        (403, 'finetunejobs is forbidden: User "x" cannot create', 403, "permission_denied"),
        (403, "exceeded quota: q, requested: count/finetunejobs.kubetune.dev=1", 429,
         "quota_exceeded"),
        (404, "not found", 404, "not_found"),
        (409, "already exists", 409, "conflict"),
        (422, "spec.cancel: Invalid value", 400, "invalid_request"),
        (429, "too many requests", 429, "rate_limit_exceeded"),
        (500, "etcd", 503, "upstream_error"),
    ],
)  # fmt: skip
def test_kubernetes_errors_become_openai_errors(
    status: int, message: str, expected: int, code: str
) -> None:
    err = kube.translate(status, json.dumps({"message": message}), {}, "job x")
    assert (err.status, err.code) == (expected, code)


def test_the_api_key_is_a_bearer_token_and_service_accounts_have_a_namespace() -> None:
    assert bearer_token("Bearer abc.def") == "abc.def"
    for bad in (None, "", "Basic abc", "Bearer "):
        with pytest.raises(ApiError) as err:
            bearer_token(bad)
        assert err.value.status == 401
    assert token_namespace("system:serviceaccount:team-a:trainer") == "team-a"
    assert token_namespace("alice@example.com") is None


# ----------------------------------------------------------------------------------- events


def test_events_merge_status_and_metrics_oldest_first() -> None:
    job = JobView({
        "metadata": {"name": "ftjob-1", "namespace": "a", "uid": "u",
                     "creationTimestamp": "2025-01-01T00:00:00Z"},
        "spec": {}, "status": {"completionTime": "2025-01-01T00:10:00Z"},
    })  # fmt: skip
    kube_events = [
        {"metadata": {"uid": "e2"}, "reason": "Succeeded", "message": "Succeeded: done",
         "type": "Normal", "firstTimestamp": "2025-01-01T00:10:02Z"},
        {"metadata": {"uid": "e1"}, "reason": "TrainerRunning", "message": "Running: training",
         "type": "Normal", "firstTimestamp": "2025-01-01T00:01:00Z"},
        {"metadata": {"uid": "e0"}, "reason": "Retrying", "message": "Pending: retry",
         "type": "Warning", "firstTimestamp": "2025-01-01T00:00:30Z"},
    ]  # fmt: skip
    start = 1735689600
    records = [
        TrainRecord(time=start + 120, step=1, total_steps=2, epoch=0.5, train_loss=2.0,
                    learning_rate=0.001),
        TrainRecord(time=start + 180, step=2, total_steps=2, epoch=1.0, train_loss=1.5,
                    learning_rate=0.0005),
        EvalRecord(time=start + 240, step=2, eval_loss=1.4, base_eval_loss=3.0),
    ]  # fmt: skip
    events = job_events(job, kube_events, records, "ft:m:a::ftjob-1")
    assert [e.message.split(":")[0] for e in events] == [
        "Created fine-tuning job", "Pending", "Running", "Step 1/2", "Step 2/2", "Evaluation",
        "Succeeded", "New fine-tuned model created",
    ]  # fmt: skip
    assert [e.created_at for e in events] == sorted(e.created_at for e in events)
    assert len({e.id for e in events}) == len(events)
    assert events[1].level == "warn"
    step = events[3]
    assert step.type == "metrics"
    assert step.data == {"step": 1, "total_steps": 2, "epoch": 0.5, "train_loss": 2.0,
                         "learning_rate": 0.001}  # fmt: skip
    evaluation = events[5]
    assert evaluation.data is not None and evaluation.data["eval_loss"] == 1.4


def test_results_csv_has_one_row_per_step() -> None:
    data = results_csv([
        TrainRecord(time=1, step=1, total_steps=2, epoch=0.5, train_loss=2.0, learning_rate=0.1),
        TrainRecord(time=2, step=2, total_steps=2, epoch=1.0, train_loss=1.0, learning_rate=0.0),
        EvalRecord(time=3, step=2, eval_loss=0.9),
    ]).decode()  # fmt: skip
    assert data.splitlines() == [
        "step,epoch,train_loss,learning_rate,tokens_per_second,full_valid_loss",
        "1,0.5,2.0,0.1,,",
        "2,1.0,1.0,0.0,,0.9",
    ]


# ---------------------------------------------------------------------------------- uploads


def _upload(tmp_path: Path, name: str, content: bytes) -> Upload:
    path = tmp_path / safe_filename(name)
    path.write_bytes(content)
    return Upload(path=path, filename=safe_filename(name), size=len(content), sha256="0")


def test_uploads_are_validated_by_the_trainers_loader(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    good = (json.dumps(chat) + "\n") * 3
    assert validate(_upload(tmp_path, "train.jsonl", good.encode())) == ("chat", 3)
    bad = good + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n"
    with pytest.raises(ApiError) as err:
        validate(_upload(tmp_path, "bad.jsonl", bad.encode()))
    assert err.value.param == "file" and "bad.jsonl line 4" in err.value.message
    assert str(tmp_path) not in err.value.message  # the server's scratch path stays hidden
    with pytest.raises(ApiError) as err:
        validate(_upload(tmp_path, "notes.txt", b"hello"))
    assert ".jsonl" in err.value.message
    with pytest.raises(ApiError) as err:
        validate(_upload(tmp_path, "binary.jsonl", b"\xff\xfe\x00garbage"))
    assert "UTF-8" in err.value.message
    with pytest.raises(ApiError) as err:
        validate(_upload(tmp_path, "csv.jsonl", b"a,b,c\n1,2,3\n"))
    assert "line 1: invalid JSON" in err.value.message


def test_upload_names_cannot_escape_the_scratch_directory() -> None:
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("C:\\data\\train set.jsonl") == "train_set.jsonl"
    assert safe_filename(".hidden.jsonl") == "hidden.jsonl"
    assert safe_filename("") == "upload.jsonl"


# ------------------------------------------------------------------ settings and catalogue


def test_settings_name_the_bad_variable() -> None:
    settings = load_settings({"KUBETUNE_API_BUCKET": "kubetune", "KUBETUNE_API_PORT": "8123"})
    assert settings.port == 8123 and settings.prefix == "openai"
    with pytest.raises(SettingsError, match="KUBETUNE_API_BUCKET"):
        load_settings({})
    with pytest.raises(SettingsError, match="KUBETUNE_API_PREFIX"):
        load_settings({"KUBETUNE_API_BUCKET": "kubetune", "KUBETUNE_API_PREFIX": "a/../b"})


def test_the_catalogue_is_checked_against_the_finetunejob_schema() -> None:
    models = parse_catalogue([{"name": "m", "uri": "hf://org/model",
                               "spec": {"method": "qlora", "resources": {"gpus": 1}}}])  # fmt: skip
    assert models["m"].learning_rate == 2e-4
    with pytest.raises(CatalogueError, match=r"model m: spec\.resources\.gpus"):
        parse_catalogue(
            [{"name": "m", "uri": "hf://org/model", "spec": {"resources": {"gpus": -1}}}]
        )
    with pytest.raises(CatalogueError, match=r"spec\.output"):
        parse_catalogue([{"name": "m", "uri": "hf://org/model", "spec": {"output": {"uri": "x"}}}])
    with pytest.raises(CatalogueError, match="listed twice"):
        parse_catalogue([{"name": "m", "uri": "hf://a/b"}, {"name": "m", "uri": "hf://a/c"}])
    with pytest.raises(CatalogueError, match="name"):
        parse_catalogue([{"name": "ft:m", "uri": "hf://a/b"}])
