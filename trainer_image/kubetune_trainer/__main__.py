"""`kubetune-trainer --config run.json` (or `python -m kubetune_trainer`): run one job.

The exit code tells the operator's podFailurePolicy what happened (exitcodes.py) and a one-line
reason goes to the termination log, which Kubernetes shows as the container's termination
message: /dev/termination-log in a pod, or the file named by KUBETUNE_TERMINATION_LOG.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import pydantic

from kubetune_trainer import exitcodes
from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.config import CONFIG_PATH, TrainerConfig
from kubetune_trainer.data.records import DatasetError
from kubetune_trainer.errors import ConfigError, ModelError, OutputExists, Preempted
from kubetune_trainer.preemption import SigtermFlag
from kubetune_trainer.redact import install as install_redaction
from kubetune_trainer.redact import redact
from kubetune_trainer.storage import StorageError

log = logging.getLogger("kubetune_trainer")

TERMINATION_LOG_ENV: Final = "KUBETUNE_TERMINATION_LOG"
TERMINATION_DIR_ENV: Final = "KUBETUNE_TERMINATION_DIR"  # set by kubetune-launch
DEFAULT_TERMINATION_LOG: Final = "/dev/termination-log"
# Kubernetes keeps 4096 bytes of a termination message; the operator shows the first 512
# characters of its first line in status.message.
MESSAGE_LIMIT: Final = 512
# StorageError.reason values that mean "the input is not there" (permanent, INPUT_NOT_FOUND).
_NOT_FOUND_REASONS: Final = frozenset({"StorageNotFound", "StorageNoSuchBucket"})
# ...those that are a wrong setting in spec.storage or a URI (permanent, CONFIG_ERROR)...
_WRONG_SETTING_REASONS: Final = frozenset({"StorageWrongRegion", "StorageInvalidUri"})
# ...those that mean the store could not be reached or kept failing for storage.retryTimeout
# (Storage retried them already): retried by the Job, with reason StorageUnreachable...
_UNREACHABLE_REASONS: Final = frozenset(
    {"StorageUnreachable", "StorageUnavailable", "StorageTimeout", "StorageClockSkew"}
)
# ...and those another attempt can fix (an object replaced mid-download, a full local disk):
# not permanent either, so the Job's backoffLimit retries them and the run resumes from its
# last checkpoint.
_TRANSIENT_REASONS: Final = frozenset({"StorageObjectChanged", "StorageLocalError"})


def one_line(message: str, env: Mapping[str, str] | None = None) -> str:
    """Credentials redacted (before whitespace is collapsed: a secret may contain some),
    whitespace collapsed, truncated for a termination message."""
    text = " ".join(redact(message, env).split())
    if len(text) > MESSAGE_LIMIT:
        text = text[: MESSAGE_LIMIT - 1] + "…"
    return text


def oom_hint(spec: FineTuneSpec | None) -> str:
    if spec is None:
        return "reduce the batch size or sequence length"
    hp = spec.hyperparameters
    hints = []
    if spec.method != "qlora":
        hints.append("use method qlora (4-bit base model, about a third of the memory)")
    if hp.batch_size > 1:
        hints.append(
            f"lower hyperparameters.batchSize (now {hp.batch_size}) and raise "
            f"gradientAccumulationSteps (now {hp.gradient_accumulation_steps}) to keep the "
            "effective batch"
        )
    hints.append(f"lower dataset.maxSeqLength (now {spec.dataset.max_seq_length})")
    if hp.gradient_checkpointing != "enabled":
        hints.append("set hyperparameters.gradientCheckpointing: enabled")
    hints.append("or request a GPU with more memory")
    return "; ".join(hints)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    # torch is imported lazily (so --help is instant); no torch loaded, no torch OOM.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    # Some CUDA kernels still raise a plain RuntimeError for out-of-memory.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# What gloo and NCCL say when a peer process or its pod went away mid-collective.
_PEER_GONE: Final = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "communicator was aborted",
    "remote process exited",
)


def _is_peer_lost(exc: BaseException, env: Mapping[str, str]) -> bool:
    """A collective or the rendezvous store failed because another process of the gang is
    gone (that process's own exit code says why)."""
    torch = sys.modules.get("torch")
    if torch is None or int(env.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist_error = getattr(getattr(torch, "distributed", None), "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(mark in text for mark in _PEER_GONE)


def classify(
    exc: BaseException, spec: FineTuneSpec | None = None, env: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """(exit code, one-line reason) for an exception that ended the run."""
    env = os.environ if env is None else env
    if isinstance(exc, Preempted):
        if exc.by_peer:
            return exitcodes.PEER_LOST, f"stopped with the gang: {exc}"
        return exitcodes.PREEMPTED, f"preempted: {exc}"
    if isinstance(exc, DatasetError):
        return exitcodes.DATA_ERROR, f"data error: {exc}"
    if isinstance(exc, OutputExists):
        return exitcodes.OUTPUT_EXISTS, f"output exists: {exc}"
    if isinstance(exc, StorageError):
        if exc.reason in _NOT_FOUND_REASONS:
            return exitcodes.INPUT_NOT_FOUND, f"input not found: {exc}"
        if exc.reason in _UNREACHABLE_REASONS:
            return exitcodes.STORAGE_UNREACHABLE, f"storage unreachable: {exc}"
        if exc.reason in _WRONG_SETTING_REASONS:
            return exitcodes.CONFIG_ERROR, f"storage settings: {exc}"
        if exc.reason in _TRANSIENT_REASONS:
            return exitcodes.INTERNAL_ERROR, f"storage error (retried): {exc}"
        return exitcodes.STORAGE_ERROR, f"storage error: {exc}"
    if isinstance(exc, ModelError):
        return exitcodes.MODEL_ERROR, f"model error: {exc}"
    if isinstance(exc, ConfigError):
        return exitcodes.CONFIG_ERROR, f"config error: {exc}"
    if isinstance(exc, pydantic.ValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        return exitcodes.CONFIG_ERROR, f"config error: invalid trainer config: {problems}"
    if _is_oom(exc):
        where = "host" if isinstance(exc, MemoryError) else "GPU"
        return exitcodes.OUT_OF_MEMORY, f"out of {where} memory: {oom_hint(spec)}"
    if _is_peer_lost(exc, env):
        return exitcodes.PEER_LOST, f"a peer process is gone: {type(exc).__name__}: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return exitcodes.INTERNAL_ERROR, "interrupted"
    return exitcodes.INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}"


def termination_log_path(env: Mapping[str, str] | None = None) -> Path | None:
    """Where this process's one-line reason goes. Under kubetune-launch each process writes its
    own file (the launcher copies the one that explains the failure); else the pod's
    termination log."""
    env = os.environ if env is None else env
    if env.get(TERMINATION_DIR_ENV):
        return Path(env[TERMINATION_DIR_ENV]) / env.get("LOCAL_RANK", "0")
    if env.get(TERMINATION_LOG_ENV):
        return Path(env[TERMINATION_LOG_ENV])
    default = Path(DEFAULT_TERMINATION_LOG)
    # Only inside a pod: the kubelet creates the file; never create it on a workstation.
    if default.is_file() and os.access(default, os.W_OK):
        return default
    return None


def write_termination_message(message: str, env: Mapping[str, str] | None = None) -> None:
    path = termination_log_path(env)
    if path is None:
        return
    try:
        path.write_text(one_line(message, env) + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)


def load_config(path: Path) -> TrainerConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the trainer config {path}: {exc.strerror or exc}") from exc
    return TrainerConfig.model_validate_json(text)


def configure_logging(environ: Mapping[str, str] | None = None) -> None:
    """INFO to stdout. Under torchrun every process writes to the same container log, so the
    processes other than rank 0 log warnings and errors only, each line marked with its rank:
    progress appears once, and a problem on one process still shows which."""
    env = os.environ if environ is None else environ
    rank, world_size = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    marker = f"[rank {rank}] " if world_size > 1 else ""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s {marker}%(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("httpx", "botocore", "boto3", "s3transfer", "urllib3", "accelerate", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Progress bars are unreadable in `kubectl logs`; our own lines report progress.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft calls a transformers alias deprecated in 5.x on every forward; not actionable here.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )


def hide_bitsandbytes(spec: FineTuneSpec) -> None:
    """Make bitsandbytes look uninstalled for methods that do not quantize.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes imports torch._dynamo's
    debugging and functorch modules: about 2.5 s of a CPU pod's start-up
    (benchmarks/startup.py). Only qlora uses it. Called once per process, by `run`, which runs
    one job: the effect is process-wide (importlib then finds no such module).
    """
    if spec.method != "qlora" and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


def run(argv: Sequence[str] | None = None) -> int:
    """Run one job; return the exit code."""
    parser = argparse.ArgumentParser(prog="kubetune-trainer", description=__doc__)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(CONFIG_PATH),
        help=f"TrainerConfig JSON (default {CONFIG_PATH}, mounted by the operator)",
    )
    args = parser.parse_args(argv)
    # First of all: whatever is printed from here on (logs, tracebacks) has no credentials, and
    # SIGTERM stops the run cleanly (with a checkpoint while training) from this moment on.
    install_redaction()
    preemption = SigtermFlag()
    preemption.install()
    configure_logging()

    from kubetune_trainer.recipe import FineTuneRecipe  # noqa: PLC0415 - after logging setup

    spec: FineTuneSpec | None = None
    recipe: FineTuneRecipe | None = None
    try:
        config = load_config(args.config)
        spec = config.spec
        hide_bitsandbytes(spec)
        recipe = FineTuneRecipe(config, preemption=preemption)
        recipe.setup()
        recipe.train()
        recipe.evaluate()
        recipe.publish()
        code, message = exitcodes.OK, f"succeeded: published to {spec.output.uri}"
    except BaseException as exc:  # every failure becomes an exit code and a reason
        code, message = classify(exc, spec)
        if code == exitcodes.INTERNAL_ERROR:
            log.exception("%s", one_line(message))
        else:
            log.error("%s", one_line(message))
    finally:
        if recipe is not None:
            try:
                recipe.cleanup()
            except Exception:  # the run's own outcome matters more than a cleanup failure
                log.exception("cleanup failed")
    write_termination_message(message)
    log.info("exit code %d", code)
    return code


def exit_with(code: int) -> None:
    """Exit with `code` once the run has returned. Threads it left running are transfers it
    abandoned (SIGTERM during a download from a stalled store, storage/client.py's _Batch):
    an ordinary exit would join them, possibly until the kubelet's SIGKILL (exit 137, not
    143), so then the process leaves without them."""
    left = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and not t.daemon
    ]
    if code == exitcodes.OK or not left:
        sys.exit(code)
    log.info("not waiting for %d threads still running: %s", len(left), ", ".join(sorted(left)))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    exit_with(run())


if __name__ == "__main__":
    main()
