"""Pure: how this run is spread over pods and processes, from what torchrun tells each process.

torchrun (through kubetune-launch) sets WORLD_SIZE (processes in all), LOCAL_WORLD_SIZE
(processes on this pod) and GROUP_WORLD_SIZE (pods, one agent each); a plain process has none.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubetune_trainer.api import DistributedStatus


def distributed_status(
    env: Mapping[str, str], world_size: int, strategy: str | None = None
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
        }
    )
