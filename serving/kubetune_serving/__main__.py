"""`kubetune-serving-agent fetch-model ...` (init container) and `kubetune-serving-agent run`
(sidecar). See docs/serving.md.

Failures of fetch-model exit with the trainer's codes (kubetune_trainer.exitcodes) and one line
a user can act on, on stderr and in the termination log (the pod's termination message).
Credentials never appear: every output goes through the trainer's redaction.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Final

from kubetune_serving.agent import Agent, one_line
from kubetune_serving.kube import ConfigMaps
from kubetune_serving.published import (
    MODEL_FILES,
    SKIP_FOR_MODEL,
    PublishedError,
    check_listed,
    fetch_files,
    read_manifest,
    verify_files,
)
from kubetune_serving.settings import AgentSettings, SettingsError, storage_config
from kubetune_serving.vllm import Vllm
from kubetune_trainer import exitcodes
from kubetune_trainer.kubeapi import InCluster
from kubetune_trainer.redact import install as install_redaction
from kubetune_trainer.storage import RETRIED_REASONS, Storage, StorageError, uri_scheme

log = logging.getLogger("kubetune_serving")

TERMINATION_LOG_ENV: Final = "KUBETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG: Final = "/dev/termination-log"
# The sidecar's store retries are short: the next round retries anyway, and a long wait
# would hold up unloads and the state report.
AGENT_STORAGE_RETRY_S: Final = 20.0

_NOT_FOUND: Final = frozenset({"StorageNotFound", "StorageNoSuchBucket", "ManifestMissing"})
_WRONG_SETTING: Final = frozenset(
    {"StorageWrongRegion", "StorageInvalidUri", "StorageCredentialsInvalid"}
)
_BAD_DATA: Final = frozenset({"ChecksumMismatch", "ManifestInvalid", "NotServable"})
# An object replaced mid-download, a full local disk: another attempt may succeed.
_MAY_PASS: Final = frozenset({"StorageObjectChanged", "StorageLocalError"})


def exit_code(exc: BaseException) -> int:
    """The exit code for a failure of fetch-model (exitcodes.PERMANENT ones are not retried)."""
    reason = getattr(exc, "reason", "")
    if isinstance(exc, SettingsError) or reason in _WRONG_SETTING:
        return exitcodes.CONFIG_ERROR
    if reason in _NOT_FOUND:
        return exitcodes.INPUT_NOT_FOUND
    if reason in _BAD_DATA:
        return exitcodes.DATA_ERROR
    if reason in RETRIED_REASONS:
        return exitcodes.STORAGE_UNREACHABLE
    if isinstance(exc, StorageError) and reason not in _MAY_PASS:
        return exitcodes.STORAGE_ERROR  # access denied, expired credentials, ...
    return 1  # may pass: the kubelet restarts the init container


def write_termination_message(message: str, env: Mapping[str, str]) -> None:
    path = Path(env.get(TERMINATION_LOG_ENV) or DEFAULT_TERMINATION_LOG)
    with contextlib.suppress(OSError):  # not in a pod: stderr has it
        path.write_text(message + "\n", encoding="utf-8")


def fetch_model(uri: str, dest: Path, revision: str | None, verify: bool) -> str:
    """The base model, or a full fine-tune's output checked against its SHA256SUMS, at `dest`.

    s3:// is downloaded into `dest` (a directory the agent may create and replace, not a mount
    point). hf:// (the offline Hugging Face cache of this image, which vLLM's image does not
    have) is copied there. pvc:// and local paths are used in place: `dest` becomes a symbolic
    link to them, so the vLLM container mounts the same volume at the same path (the operator
    mounts a pvc:// claim read-only at /mnt/pvc/<claim> in both)."""
    storage = Storage(storage_config(os.environ), use_cache=False)
    if uri_scheme(uri) == "s3":
        if not verify:
            storage.fetch(uri if uri.endswith("/") else uri + "/", dest)
            return f"fetched {uri} to {dest}"
        manifest = read_manifest(storage, uri)
        check_listed(manifest, MODEL_FILES, "a model")
        count = fetch_files(storage, uri, manifest, dest, skip=SKIP_FOR_MODEL)
        return f"fetched {uri} to {dest}: {count} files match its SHA256SUMS"
    source = storage.fetch(uri, dest, revision=revision)
    checked = ""
    if verify:
        manifest = read_manifest(storage, uri)
        check_listed(manifest, MODEL_FILES, "a model")
        selected = manifest.selected(SKIP_FOR_MODEL)
        verify_files(source, selected)
        checked = f": {len(selected)} files match its SHA256SUMS"
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.is_dir():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if uri_scheme(uri) == "hf":
        # The cache's snapshot files are links to its blobs: copy what they point to.
        shutil.copytree(source, dest, symlinks=False)
        return f"copied {uri} ({source}) to {dest}{checked}"
    dest.symlink_to(source, target_is_directory=True)
    return f"{dest} links to {source} ({uri}){checked}"


def _fetch_model_command(args: argparse.Namespace) -> int:
    try:
        log.info(fetch_model(args.uri, Path(args.dest), args.revision, args.verify_manifest))
    except (SettingsError, StorageError, PublishedError, OSError) as exc:
        message = one_line(f"{exc}")
        log.error("%s", message)
        write_termination_message(message, os.environ)
        return exit_code(exc)
    return exitcodes.OK


def _run_command(args: argparse.Namespace) -> int:
    try:
        settings = AgentSettings.from_environment()
        api = InCluster.from_env()
        if api is None:
            raise SettingsError(
                "not in a cluster: KUBERNETES_SERVICE_HOST, KUBERNETES_SERVICE_PORT and a "
                "service account token (KUBETUNE_SA_DIR/token) are needed"
            )
        storage = Storage(settings.storage, use_cache=False, retry_seconds=AGENT_STORAGE_RETRY_S)
    except (SettingsError, StorageError) as exc:
        log.error("%s", one_line(str(exc)))
        return exit_code(exc)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    configmaps = ConfigMaps(api, settings.namespace)
    vllm = Vllm(settings.vllm_url)
    try:
        Agent(settings, configmaps=configmaps, vllm=vllm, storage=storage).run(stop)
    finally:
        configmaps.close()
        vllm.close()
    return exitcodes.OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubetune-serving-agent",
        description="The vLLM server pod's helper: fetch the model, then keep vLLM's LoRA "
        "adapters as the operator wants them.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch-model",
        help="fetch the base model (or a full fine-tune's output) for vLLM (init container)",
        description="Storage settings: KUBETUNE_STORAGE (spec.storage as JSON) and AWS_* "
        "credentials.",
    )
    fetch.add_argument("--uri", required=True, help="s3://, pvc://, hf:// or a local path")
    fetch.add_argument("--dest", required=True, help="the directory vLLM loads (--model)")
    fetch.add_argument("--revision", help="hf:// only: the revision in the offline cache")
    fetch.add_argument(
        "--verify-manifest",
        action="store_true",
        help="a job's output: fetch the files its SHA256SUMS lists and check every one",
    )
    fetch.set_defaults(handler=_fetch_model_command)
    run = sub.add_parser(
        "run",
        help="the sidecar loop: <server>-desired -> vLLM -> <server>-state",
        description="Settings from the environment: KUBETUNE_SERVER_NAME, POD_NAMESPACE, "
        "KUBETUNE_VLLM_URL, KUBETUNE_ADAPTER_DIR, KUBETUNE_STORAGE, AWS_*, "
        "KUBETUNE_AGENT_INTERVAL, KUBETUNE_AGENT_RECHECK (docs/serving.md).",
    )
    run.set_defaults(handler=_run_command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    install_redaction()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # boto's per-request chatter is not the agent's story.
    for noisy in ("botocore", "boto3", "s3transfer", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
