"""The agent's settings, vLLM's error messages, and the command line's exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_serving.__main__ import exit_code
from kubetune_serving.published import PublishedError
from kubetune_serving.settings import AgentSettings, SettingsError
from kubetune_serving.vllm import reason
from kubetune_trainer import exitcodes
from kubetune_trainer.storage import MANIFEST_NAME, StorageError, UploadedFile, sha256_file
from kubetune_trainer.storage import write_manifest as manifest_of

ENV = {"KUBETUNE_SERVER_NAME": "kubetune-serve-0123456789", "POD_NAMESPACE": "team"}


def test_settings_from_the_environment() -> None:
    settings = AgentSettings.from_environment(
        {
            **ENV,
            "KUBETUNE_VLLM_URL": "http://127.0.0.1:8001/",
            "KUBETUNE_ADAPTER_DIR": "/tmp/adapters",
            "KUBETUNE_STORAGE": '{"endpoint": "http://minio:9000", "retryTimeout": "30s"}',
            "KUBETUNE_AGENT_INTERVAL": "2.5",
        }
    )
    assert settings.desired_configmap == "kubetune-serve-0123456789-desired"
    assert settings.state_configmap == "kubetune-serve-0123456789-state"
    assert settings.vllm_url == "http://127.0.0.1:8001"
    assert settings.adapter_dir == Path("/tmp/adapters")
    assert settings.storage.endpoint == "http://minio:9000"
    assert settings.interval == 2.5 and settings.recheck == 60
    defaults = AgentSettings.from_environment(ENV)
    assert defaults.vllm_url == "http://127.0.0.1:8000"
    assert defaults.adapter_dir == Path("/models/adapters")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"POD_NAMESPACE": "team"}, "KUBETUNE_SERVER_NAME"),
        ({**ENV, "KUBETUNE_AGENT_INTERVAL": "0"}, "KUBETUNE_AGENT_INTERVAL"),
        ({**ENV, "KUBETUNE_AGENT_RECHECK": "soon"}, "KUBETUNE_AGENT_RECHECK"),
        ({**ENV, "KUBETUNE_STORAGE": '{"endpoint": 3}'}, "KUBETUNE_STORAGE"),
        ({**ENV, "KUBETUNE_VLLM_URL": "127.0.0.1:8000"}, "KUBETUNE_VLLM_URL"),
        ({**ENV, "POD_NAMESPACE": "", "KUBETUNE_SA_DIR": "/nonexistent"}, "POD_NAMESPACE"),
    ],
)
def test_a_bad_setting_is_named(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        AgentSettings.from_environment(env)


def test_the_namespace_falls_back_to_the_service_account_s(tmp_path: Path) -> None:
    (tmp_path / "namespace").write_text("team-b\n")
    env = {"KUBETUNE_SERVER_NAME": "s", "KUBETUNE_SA_DIR": str(tmp_path)}
    assert AgentSettings.from_environment(env).namespace == "team-b"


def test_vllm_errors_are_passed_on_without_the_wrapping() -> None:
    worker = (
        '{"error":{"message":"Call to add_lora method failed: Worker failed with error '
        "'LoRA rank 16 is greater than max_lora_rank 8.', please check the stack trace above "
        'for the root cause","type":"InternalServerError","param":null,"code":500}}'
    )
    assert reason(worker) == "LoRA rank 16 is greater than max_lora_rank 8."
    not_found = '{"error":{"message":"Loading lora x failed: No adapter found for /m","code":404}}'
    assert reason(not_found) == "Loading lora x failed: No adapter found for /m"
    assert reason('{"message": "old\\n style"}') == "old style"
    assert reason("Internal Server Error") == "Internal Server Error"
    assert reason("") == "no reason given"
    assert len(reason("x" * 1000)) == 400


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SettingsError("KUBETUNE_STORAGE ..."), exitcodes.CONFIG_ERROR),
        (StorageError("no object", uri="s3://b/k", reason="StorageNotFound"), 66),
        (PublishedError("no SHA256SUMS", reason="ManifestMissing"), exitcodes.INPUT_NOT_FOUND),
        (PublishedError("checksum mismatch", reason="ChecksumMismatch"), exitcodes.DATA_ERROR),
        (StorageError("denied", uri="s3://b", reason="StorageAccessDenied"), 77),
        (StorageError("down", uri="s3://b", reason="StorageUnreachable"), 75),
        (StorageError("newline", uri="s3://b", reason="StorageCredentialsInvalid"), 78),
        (StorageError("changed", uri="s3://b", reason="StorageObjectChanged"), 1),
        (OSError("disk full"), 1),
    ],
)
def test_fetch_model_exit_codes(error: Exception, code: int) -> None:
    assert exit_code(error) == code


def fetch_model(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "AWS_"))}
    env["KUBETUNE_TERMINATION_LOG"] = str(tmp_path / "termination-log")
    return subprocess.run(
        [sys.executable, "-m", "kubetune_serving", "fetch-model", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_fetch_model_checks_a_local_output_in_place_and_links_it(tmp_path: Path) -> None:
    out = tmp_path / "claim" / "full"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    files = [UploadedFile(p.name, p.stat().st_size, sha256_file(p)) for p in out.iterdir()]
    (out / MANIFEST_NAME).write_bytes(manifest_of(files))
    dest = tmp_path / "models" / "base"
    dest.mkdir(parents=True)  # as an earlier attempt may have left it

    ok = fetch_model("--uri", str(out), "--dest", str(dest), "--verify-manifest", tmp_path=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert dest.is_symlink() and dest.resolve() == out.resolve()
    assert "2 files match its SHA256SUMS" in ok.stderr

    (out / "model.safetensors").write_bytes(b"other weights")
    bad = fetch_model(
        "--uri", str(out), "--dest", str(dest), "--verify-manifest", tmp_path=tmp_path
    )
    assert bad.returncode == exitcodes.DATA_ERROR
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("checksum mismatch: model.safetensors has SHA-256"), message

    missing = fetch_model("--uri", str(tmp_path / "nope"), "--dest", str(dest), tmp_path=tmp_path)
    assert missing.returncode == exitcodes.INPUT_NOT_FOUND
    assert "no such file or directory" in (tmp_path / "termination-log").read_text()


def test_run_outside_a_cluster_says_what_is_missing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "KUBERNETES_"))}
    env.update({**ENV, "KUBETUNE_SA_DIR": "/nonexistent"})
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_serving", "run"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == exitcodes.CONFIG_ERROR
    assert "KUBERNETES_SERVICE_HOST" in result.stderr


def test_the_agent_imports_no_torch() -> None:
    code = (
        "import importlib, pkgutil, sys, kubetune_serving\n"
        "for m in pkgutil.walk_packages(kubetune_serving.__path__, 'kubetune_serving.'):\n"
        "    importlib.import_module(m.name)\n"
        "heavy = sorted(n for n in ('torch', 'transformers', 'peft') if n in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_fetch_model_copies_a_model_of_the_offline_hugging_face_cache(tmp_path: Path) -> None:
    """hf:// is this image's cache, which vLLM's image does not have: a copy, not a link."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blob = repo / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_text('{"model_type": "llama"}')
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    dest = tmp_path / "models" / "base"
    env_cache = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [sys.executable, "-m", "kubetune_serving", "fetch-model", "--uri", "hf://org/tiny",
         "--dest", str(dest)],
        env={**{k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "AWS_"))},
             **env_cache, "KUBETUNE_TERMINATION_LOG": str(tmp_path / "log")},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not dest.is_symlink() and not (dest / "config.json").is_symlink()
    assert (dest / "config.json").read_text() == '{"model_type": "llama"}'
