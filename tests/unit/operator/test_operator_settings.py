"""The operator's KUBETUNE_* settings: typed, defaulted, and failing by variable name."""

from __future__ import annotations

import gc
import logging
import os

import kopf
import pytest

from kubetune_operator import __main__ as entry
from kubetune_operator import gc_tuning
from kubetune_operator.persistence import MemoryDiffBase, ProgressAnnotations
from kubetune_operator.settings import (
    OperatorSettings,
    SettingsError,
    configure_kopf,
    load_settings,
)


def test_defaults_without_environment() -> None:
    settings = load_settings({})
    assert settings == OperatorSettings()
    assert settings.trainer_command == ("kubetune-trainer", "--config")
    assert settings.clusterwide
    assert settings.peering_name == "kubetune"


def test_every_variable_is_read() -> None:
    settings = load_settings(
        {
            "KUBETUNE_TRAINER_IMAGE": "registry.example/trainer:v1",
            "KUBETUNE_IMAGE_PULL_POLICY": "Always",
            "KUBETUNE_TRAINER_COMMAND": '["python", "/x.py", "--config"]',
            "KUBETUNE_DEFAULT_STORAGE_ENDPOINT": "http://minio:9000",
            "KUBETUNE_DEFAULT_GPU_RESOURCE_NAME": "amd.com/gpu",
            "KUBETUNE_NAMESPACES": "team-a, team-b",
            "KUBETUNE_METRICS_PORT": "9090",
            "KUBETUNE_HEALTH_PORT": "0",
            "KUBETUNE_PEERING_NAME": "",
            "KUBETUNE_PEERING_PRIORITY": "5",
            "KUBETUNE_PEERING_LIFETIME": "15",
            "KUBETUNE_LOG_FORMAT": "json",
            "KUBETUNE_LOG_LEVEL": "debug",
            "KUBETUNE_S3_BUCKET": "ignored: another tool's variable",
        }
    )
    assert settings.trainer_image == "registry.example/trainer:v1"
    assert settings.image_pull_policy == "Always"
    assert settings.trainer_command == ("python", "/x.py", "--config")
    assert settings.default_storage_endpoint == "http://minio:9000"
    assert settings.default_gpu_resource_name == "amd.com/gpu"
    assert settings.namespaces == ("team-a", "team-b")
    assert not settings.clusterwide
    assert (settings.metrics_port, settings.health_port) == (9090, 0)
    assert settings.peering_name == ""  # standalone
    assert settings.effective_priority() == 5
    assert settings.peering_lifetime == 15
    assert (settings.log_format, settings.log_level) == ("json", "debug")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KUBETUNE_METRICS_PORT", "eighty"),
        ("KUBETUNE_HEALTH_PORT", "70000"),
        ("KUBETUNE_IMAGE_PULL_POLICY", "Sometimes"),
        ("KUBETUNE_TRAINER_COMMAND", "kubetune-trainer --config"),
        ("KUBETUNE_TRAINER_COMMAND", "[]"),
        ("KUBETUNE_DEFAULT_STORAGE_ENDPOINT", "minio:9000"),
        ("KUBETUNE_DEFAULT_GPU_RESOURCE_NAME", "gpu"),
        ("KUBETUNE_NAMESPACES", "Team_A"),
        ("KUBETUNE_PEERING_NAME", "Not A Name"),
        ("KUBETUNE_PEERING_LIFETIME", "1"),
        ("KUBETUNE_LOG_FORMAT", "xml"),
    ],
)
def test_a_bad_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({variable: value})
    assert str(info.value).startswith(variable), str(info.value)


def test_an_endpoint_with_credentials_is_refused_without_quoting_them() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"KUBETUNE_DEFAULT_STORAGE_ENDPOINT": "https://AKEY:s3cret@s3.example"})
    message = str(info.value)
    assert message.startswith("KUBETUNE_DEFAULT_STORAGE_ENDPOINT") and "credentials" in message
    assert "AKEY" not in message and "s3cret" not in message


def test_seniority_priority_prefers_the_older_replica() -> None:
    settings = OperatorSettings()
    older, newer = settings.effective_priority(1000.0), settings.effective_priority(1001.0)
    assert older > newer


def test_kopf_keeps_progress_under_our_group_and_the_diff_base_in_memory() -> None:
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, OperatorSettings(peering_lifetime=20), "replica-0")
    progress = kopf_settings.persistence.progress_storage
    diffbase = kopf_settings.persistence.diffbase_storage
    assert isinstance(progress, ProgressAnnotations) and progress.prefix == "kubetune.dev"
    assert isinstance(diffbase, MemoryDiffBase)
    assert kopf_settings.peering.lifetime == 20
    assert kopf_settings.scanning.disabled
    assert kopf_settings.posting.reporting_component == "kubetune-operator"
    assert max(kopf_settings.networking.error_backoffs) >= 60  # type: ignore[call-overload,unused-ignore]


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord(
        "kopf._core.reactor.observation", logging.WARNING, "", 0, message, (), None
    )


def test_a_missing_kueue_is_reported_as_information_not_as_a_warning() -> None:
    # Kopf's wording (kopf._core.reactor.observation) for handlers of resources nobody serves.
    kueue = "Selector(group='kueue.x-k8s.io', version='v1beta2', any_name='workloads')"
    record = _record(f"Unresolved resources cannot be served (try creating their CRDs): {kueue}")
    assert entry._KueueIsOptional().filter(record)
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("Kueue is not installed")
    # Anything else unresolved (the FineTuneJob CRD itself, say) stays a warning.
    ftj = "Selector(group='kubetune.dev', version='v1alpha1', any_name='finetunejobs')"
    other = _record(
        f"Unresolved resources cannot be served (try creating their CRDs): {ftj}, {kueue}"
    )
    assert entry._KueueIsOptional().filter(other)
    assert other.levelno == logging.WARNING


def test_the_operator_tunes_the_garbage_collector_before_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, object] = {}

    def run(**_: object) -> None:  # stands in for kopf.run: what the operator would run with
        seen["threshold"] = gc.get_threshold()

    before = gc.get_threshold()
    monkeypatch.setattr(entry.kopf, "run", run)
    monkeypatch.setattr(entry.kopf, "configure", lambda **_: None)
    for name in list(os.environ):
        if name.startswith("KUBETUNE_"):
            monkeypatch.delenv(name)
    try:
        assert entry.main([]) == 0
    finally:
        gc.set_threshold(*before)
    assert seen["threshold"] == gc_tuning.THRESHOLDS
    assert seen["threshold"][0] > 700  # CPython's default, which the benchmark measured
