"""Pure: how this run is spread over pods and processes, from what torchrun tells each process.

torchrun (through kubetune-launch) sets WORLD_SIZE (processes in all), LOCAL_WORLD_SIZE
(processes on this pod) and GROUP_WORLD_SIZE (pods, one agent each); a plain process has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from kubetune_trainer.api import DistributedStatus

Strategy = Literal["single", "ddp", "fsdp"]
CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


def distributed_status(
    env: Mapping[str, str],
    world_size: int,
    strategy: str | None = None,
    reason: str | None = None,
) -> DistributedStatus:
    """status.distributed: nodes, processes per node, world size and the parallelism."""
    per_node = int(env.get("LOCAL_WORLD_SIZE") or world_size)
    nodes = int(env.get("GROUP_WORLD_SIZE") or max(world_size // max(per_node, 1), 1))
    return DistributedStatus.model_validate(
        {
            "nodes": nodes,
            "processesPerNode": per_node,
            "worldSize": world_size,
            "strategy": strategy or ("single" if world_size == 1 else "ddp"),
            "reason": reason,
        }
    )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10e6 else f"{n / 1e6:.1f} MB"


def choose_strategy(
    setting: Literal["auto", "ddp", "fsdp"],
    *,
    world_size: int,
    method: str,
    replica_bytes: int | None,
    memory_limit: int | None,
    where: str = "GPU",
) -> tuple[Strategy, str]:
    """(strategy, why) for spec.distributed.strategy.

    auto: fsdp when a whole replica (the memory estimate of one process holding the model, its
    gradients and optimizer state) exceeds `memory_limit` (one GPU; on CPU the pod's memory
    limit per process, if any), else ddp. One process trains alone whatever the setting.
    """
    if world_size == 1:
        return "single", "one process"
    if setting != "auto":
        return setting, f"spec.distributed.strategy is {setting}"
    if method == "qlora":
        return "ddp", "auto: qlora's 4-bit weights are not sharded"
    if replica_bytes is None:
        return "ddp", "auto: no memory estimate for this model"
    if memory_limit is None:
        return "ddp", "auto: no memory limit known to compare the estimate with"
    verdict = "exceeds" if replica_bytes > memory_limit else "fits in"
    strategy: Strategy = "fsdp" if replica_bytes > memory_limit else "ddp"
    return strategy, (
        f"auto: a whole replica ({_gb(replica_bytes)} estimated) {verdict} the "
        f"{_gb(memory_limit)} of one {where}"
    )


def cpu_memory_limit(local_processes: int, path: Path = CGROUP_MEMORY_MAX) -> int | None:
    """The pod's memory limit (cgroup v2 memory.max) shared by its processes, or None."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if not text.isdigit():  # "max": no limit
        return None
    return int(text) // max(local_processes, 1)
