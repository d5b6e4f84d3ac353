"""`kubetune-launch [--grace-seconds N] <torchrun arguments>`: torchrun for the trainer, keeping
what torchrun loses.

torchrun exits 1 whenever a worker fails, so a data error on 4 GPUs would be retried instead of
failing at once (exitcodes.PERMANENT), and the termination message is whichever rank wrote last.
It also gives workers 30 s after SIGTERM, less than the checkpoint grace period. This wrapper
runs torchrun's own launcher in-process, then:

- exits with the exit code of the process that failed first, a peer's PEER_LOST only when no
  process failed for a reason of its own (the rank that ran out of memory, not the ranks that
  lost it);
- copies that process's one-line reason into the pod's termination message (each process
  writes its own, under KUBETUNE_TERMINATION_DIR);
- gives workers the pod's grace period to checkpoint after SIGTERM;
- turns a rendezvous that never completes into RENDEZVOUS_FAILED with the address it tried,
  and a rendezvous store that vanishes under it (a peer restarting) into PEER_LOST.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from kubetune_trainer import exitcodes
from kubetune_trainer.__main__ import (
    TERMINATION_DIR_ENV,
    configure_logging,
    one_line,
    write_termination_message,
)
from kubetune_trainer.redact import install as install_redaction

log = logging.getLogger("kubetune_trainer.launch")

# What a broken connection to the rendezvous store says (TCPStore, c10d), as opposed to a peer
# that was never reached.
_CONNECTION_LOST: Final = ("reset by peer", "broken pipe", "connection closed", "closed by peer")


@dataclass(frozen=True)
class Failure:
    """One worker that exited non-zero."""

    local_rank: int
    exit_code: int  # as a shell shows it: 128+N when killed by signal N
    timestamp: float


def shell_code(exitcode: int) -> int:
    """multiprocessing's -N (killed by signal N) as a shell's 128+N."""
    return 128 - exitcode if exitcode < 0 else exitcode


def _secondary(code: int) -> int:
    """0: a reason of its own; 1: lost a peer; 2: stopped by SIGTERM, which the launcher sends
    every other process once one has failed."""
    return {exitcodes.PEER_LOST: 1, exitcodes.PREEMPTED: 2}.get(code, 0)


def root_failure(failures: Iterable[Failure]) -> Failure:
    """The failure that explains the others: the earliest one with a reason of its own (not
    PEER_LOST, not the SIGTERM the launcher sends the rest), else the earliest lost peer. Ties
    go to the lower rank."""
    ordered = sorted(failures, key=lambda f: (_secondary(f.exit_code), f.timestamp, f.local_rank))
    if not ordered:
        raise ValueError("no failures")
    return ordered[0]


def rendezvous_code(exc: BaseException) -> int:
    """A launcher that failed before its workers ran: its store went away (PEER_LOST: a peer
    restarting; the replacement pod joins the next gang), or it never met its peers."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, ConnectionError) or any(mark in text for mark in _CONNECTION_LOST):
        return exitcodes.PEER_LOST
    return exitcodes.RENDEZVOUS_FAILED


def _when(directory: Path, local_rank: int, fallback: float) -> float:
    """When a process failed: when it wrote its reason (torch only knows whole seconds)."""
    try:
        return (directory / str(local_rank)).stat().st_mtime
    except OSError:
        return float(fallback)


def worker_message(directory: Path, local_rank: int) -> str:
    try:
        return (directory / str(local_rank)).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="kubetune-launch", add_help=False)
    parser.add_argument("--grace-seconds", type=int, default=30)
    return parser.parse_known_args(argv)


def launch(argv: Sequence[str]) -> tuple[int, str]:
    """Run torchrun with `argv`; (exit code, one-line reason or "")."""
    ours, torchrun_argv = _parse(argv)
    # torch only now: `--help` of the trainer image's other commands stays instant.
    from torch.distributed.run import parse_args  # noqa: PLC0415
    from torch.distributed.run import run as torchrun  # noqa: PLC0415

    args = parse_args(torchrun_argv)  # type: ignore[no-untyped-call]
    # Workers checkpoint on SIGTERM; leave them the pod's grace period less a margin to exit.
    os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(max(ours.grace_seconds - 5, 5))
    messages = Path(tempfile.mkdtemp(prefix="kubetune-launch-"))
    os.environ[TERMINATION_DIR_ENV] = str(messages)  # for the workers only
    try:
        return _run(torchrun, args, messages)
    finally:
        os.environ.pop(TERMINATION_DIR_ENV, None)


def _run(torchrun: Any, args: argparse.Namespace, messages: Path) -> tuple[int, str]:
    from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: PLC0415
    from torch.distributed.elastic.multiprocessing.errors import (  # noqa: PLC0415
        ChildFailedError,
    )

    address = f"{args.master_addr}:{args.master_port}" if args.master_addr else "localhost"
    try:
        torchrun(args)
    except ChildFailedError as exc:
        failures = [
            Failure(
                f.local_rank, shell_code(f.exitcode), _when(messages, f.local_rank, f.timestamp)
            )
            for f in exc.failures.values()
        ]
        root = root_failure(failures)
        message = worker_message(messages, root.local_rank)
        fallback = f"trainer process {root.local_rank} exited with code {root.exit_code}"
        return root.exit_code, message or fallback
    except SignalException as exc:
        # Our own SIGTERM: the workers were told and had their grace period to checkpoint.
        code = 128 + int(exc.sigval)
        return code, f"stopped by {signal.Signals(exc.sigval).name}"
    except Exception as exc:  # anything before the workers ran is the rendezvous
        code = rendezvous_code(exc)
        if code == exitcodes.PEER_LOST:
            return code, f"the rendezvous at {address} went away (a peer restarted): {exc}"
        return code, (
            f"rendezvous failed: the pods of this job could not meet at {address}: "
            f"{type(exc).__name__}: {exc}. Check that every pod was scheduled and that pods "
            "may reach each other (NetworkPolicy, DNS of the job's headless Service)."
        )
    return exitcodes.OK, ""


def main(argv: Sequence[str] | None = None) -> None:
    install_redaction()
    configure_logging()
    code, message = launch(sys.argv[1:] if argv is None else argv)
    if code != exitcodes.OK:
        log.error("exit code %d: %s", code, one_line(message))
        write_termination_message(message)
    sys.exit(code)


if __name__ == "__main__":
    main()
