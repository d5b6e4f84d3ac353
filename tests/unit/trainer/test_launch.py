"""kubetune-launch: torchrun's failures mapped back to the trainer's exit codes and reasons.

The unit half checks the choice of the failure that explains the others; the other half runs the
real torchrun launcher (torch.distributed.run, in-process) over stand-in workers that exit the
way trainer processes do.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kubetune_trainer import exitcodes
from kubetune_trainer.__main__ import classify, termination_log_path
from kubetune_trainer.errors import Preempted
from kubetune_trainer.launch import Failure, rendezvous_code, root_failure, shell_code
from localenv.testing import free_port


def test_the_root_failure_is_the_first_with_a_reason_of_its_own() -> None:
    lost_early = Failure(local_rank=0, exit_code=exitcodes.PEER_LOST, timestamp=100)
    oom = Failure(local_rank=1, exit_code=exitcodes.OUT_OF_MEMORY, timestamp=101)
    crash = Failure(local_rank=2, exit_code=1, timestamp=102)
    assert root_failure([lost_early, crash, oom]) == oom
    # Only peers lost: the pod is one of those that stopped with the gang.
    lost_late = Failure(local_rank=3, exit_code=exitcodes.PEER_LOST, timestamp=105)
    assert root_failure([lost_late, lost_early]) == lost_early
    # The SIGTERM the launcher sends the others once one has failed explains nothing.
    stopped = Failure(local_rank=0, exit_code=143, timestamp=99)
    assert root_failure([stopped, lost_early]) == lost_early
    assert root_failure([stopped, crash]) == crash
    # Ties go to the lower rank, deterministically.
    a, b = Failure(2, 65, 7), Failure(1, 78, 7)
    assert root_failure([a, b]) == b
    with pytest.raises(ValueError):
        root_failure([])


def test_killed_workers_get_a_shells_exit_code() -> None:
    assert shell_code(-9) == 137 and shell_code(-15) == 143 and shell_code(65) == 65


def test_a_rendezvous_that_went_away_is_a_lost_peer_and_one_never_reached_is_not() -> None:
    assert rendezvous_code(ConnectionResetError("reset")) == exitcodes.PEER_LOST
    assert rendezvous_code(RuntimeError("Broken pipe")) == exitcodes.PEER_LOST
    timeout = TimeoutError("The client socket has timed out after 600s while trying to connect")
    assert rendezvous_code(timeout) == exitcodes.RENDEZVOUS_FAILED
    assert exitcodes.RENDEZVOUS_FAILED in exitcodes.RETRIED_REASONS


def test_a_process_stopped_by_its_gang_is_a_lost_peer_not_preempted() -> None:
    own = classify(Preempted(7, "s3://b/ckpt/7"))
    peer = classify(Preempted(7, "s3://b/ckpt/7", by_peer=True))
    assert own[0] == exitcodes.PREEMPTED
    assert peer[0] == exitcodes.PEER_LOST and "a peer process got SIGTERM" in peer[1]


def test_a_broken_collective_is_a_lost_peer_only_in_a_gang() -> None:
    import torch.distributed  # noqa: PLC0415 - classify looks at loaded torch only

    gone = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:4242")
    assert classify(gone, env={"WORLD_SIZE": "4"})[0] == exitcodes.PEER_LOST
    assert classify(gone, env={"WORLD_SIZE": "1"})[0] == exitcodes.INTERNAL_ERROR
    store = torch.distributed.DistStoreError("wait timeout")
    assert classify(store, env={"WORLD_SIZE": "2"})[0] == exitcodes.PEER_LOST


def test_each_launched_process_writes_its_own_reason() -> None:
    env = {"KUBETUNE_TERMINATION_DIR": "/tmp/x", "LOCAL_RANK": "3"}
    assert termination_log_path(env) == Path("/tmp/x/3")


WORKER = textwrap.dedent(
    """
    import os, sys, time
    from kubetune_trainer.__main__ import write_termination_message
    rank = int(os.environ["LOCAL_RANK"])
    plan = {int(k): int(v) for k, v in (p.split("=") for p in sys.argv[1].split(","))}
    code = plan.get(rank, 0)
    if code == 76:
        time.sleep(1.5)  # a peer notices the loss after the one that failed
        write_termination_message("a peer process is gone: Connection closed by peer")
    elif code:
        write_termination_message(f"data error: line {rank} of train.jsonl is not JSON")
    sys.exit(code)
    """
)


def _launch(tmp_path: Path, plan: str) -> subprocess.CompletedProcess[str]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    log = tmp_path / "termination-log"
    log.write_text("")
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.launch", "--grace-seconds=10", "--standalone",
         "--nnodes=1", "--nproc-per-node=3", "--no-python", sys.executable, str(worker), plan],
        env={**_env(), "KUBETUNE_TERMINATION_LOG": str(log)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _env() -> dict[str, str]:
    import os  # noqa: PLC0415

    return {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}


def test_torchrun_keeps_the_exit_code_and_reason_of_the_process_that_failed(
    tmp_path: Path,
) -> None:
    """Rank 1 has a data error, ranks 0 and 2 lose it: the pod exits 65 with rank 1's reason
    (plain torchrun would exit 1, and the Job would retry a data error)."""
    done = _launch(tmp_path, "0=76,1=65,2=76")
    assert done.returncode == exitcodes.DATA_ERROR, done.stdout + done.stderr
    message = (tmp_path / "termination-log").read_text()
    assert message.startswith("data error: line 1 of train.jsonl"), message


def test_a_gang_member_that_only_lost_its_peers_exits_peer_lost(tmp_path: Path) -> None:
    done = _launch(tmp_path, "0=76,1=76,2=0")
    assert done.returncode == exitcodes.PEER_LOST, done.stdout + done.stderr
    assert "a peer process is gone" in (tmp_path / "termination-log").read_text()


def test_success_leaves_no_termination_message(tmp_path: Path) -> None:
    done = _launch(tmp_path, "0=0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "termination-log").read_text() == ""


def test_peers_that_never_meet_fail_with_the_address_they_tried(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text("")
    log = tmp_path / "termination-log"
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.launch", "--nnodes=2", "--nproc-per-node=1",
         "--node-rank=1", "--master-addr=127.0.0.1", f"--master-port={port}",
         "--rdzv-conf=timeout=3", "--no-python", sys.executable, str(worker)],
        env={**_env(), "KUBETUNE_TERMINATION_LOG": str(log)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == exitcodes.RENDEZVOUS_FAILED, done.stdout + done.stderr
    message = log.read_text()
    assert f"could not meet at 127.0.0.1:{port}" in message, message
