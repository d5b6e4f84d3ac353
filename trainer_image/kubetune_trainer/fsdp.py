"""FSDP2 (torch.distributed.fsdp.fully_shard): sharding, sharded checkpoints, full weights.

Sharding: every decoder layer is its own FSDP unit (gathered for its forward and backward, then
freed again), then the root (embeddings, final norm, head). A peft model is sharded the same way:
its decoder layers sit deeper in the module tree, with the adapters inside them, and only the
adapters require grad, so the frozen base weights are sharded but get no gradient and no
optimizer state. On a GPU the parameters are gathered in the compute dtype (bf16) and gradients
are reduced in fp32 (MixedPrecisionPolicy); on the CPU (gloo) everything is fp32. gloo has what
FSDP2 needs in torch 2.15 (all_gather_single, reduce_scatter_single), checked by the tests.

Checkpoints (torch.distributed.checkpoint, DCP): each process writes its own shard of the
trainable weights and optimizer state (`dcp/__<rank>_0.distcp`), rank 0 also `dcp/.metadata`.
DCP reshards on load, so a checkpoint written by N processes loads on M (M may be 1: the state
dict helpers and DCP also work on a plain, unsharded model without a process group). LoRA
checkpoints hold the adapter only (frozen base weights are reloaded from the base model).

Publishing gathers the full trainable state to rank 0's CPU memory (full_state_dict,
cpu_offload), so the published files are those of a single-process run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import torch

log = logging.getLogger(__name__)

DCP_DIR: Final = "dcp"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: the ModuleList with the most parameters (Llama's
    model.layers, GPT-2's h, ...), found by shape rather than by name so a peft wrapper or
    another architecture needs nothing special."""
    best: torch.nn.ModuleList | None = None
    best_size = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    return list(best) if best is not None else []


def shard_model(
    model: torch.nn.Module, *, device: torch.device, compute_dtype: torch.dtype | None
) -> torch.nn.Module:
    """fully_shard every decoder layer, then the root, over all processes (in place)."""
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if device.type == "cuda" and compute_dtype is not None
        else MixedPrecisionPolicy()
    )
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    log.info(
        "fsdp: %d decoder layers and the root sharded over %d processes (%s)",
        len(layers),
        dist.get_world_size(),
        "bf16 params, fp32 gradient reduction" if policy.param_dtype else "fp32",
    )
    return model


@contextmanager
def no_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate unsharded gradients locally (no reduce-scatter) for the micro-batches before
    the last of a step, like DDP's no_sync."""
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def _options(*, full: bool = False, trainable_only: bool = True) -> Any:
    """What to save or load: the trainable tensors only (LoRA), or all; loading the adapter
    only cannot be strict (the frozen base weights are missing on purpose: load_sharded checks
    that nothing else is)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # noqa: PLC0415

    return StateDictOptions(
        full_state_dict=full,
        cpu_offload=full,
        ignore_frozen_params=trainable_only,
        strict=not trainable_only,
    )


def _trainable_only(method: str) -> bool:
    """LoRA / QLoRA: the adapter only; full: every weight."""
    return method != "full"


def save_sharded(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path, method: str
) -> None:
    """This process's shard of the trainable weights and optimizer state, into directory/dcp
    (a collective: every process calls it, each with its own directory)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict_saver import save  # noqa: PLC0415

    model_state, optim_state = get_state_dict(
        model, optimizer, options=_options(trainable_only=_trainable_only(method))
    )
    save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory / DCP_DIR)


def is_sharded_checkpoint(directory: Path) -> bool:
    return (directory / DCP_DIR / ".metadata").is_file()


def load_sharded(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path, method: str
) -> None:
    """Load a DCP checkpoint written by any number of processes into this model (sharded over
    any number, or a plain model) and optimizer."""
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load  # noqa: PLC0415

    options = _options(trainable_only=_trainable_only(method))
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    # DCP loads in place into the tensors of this template (resharding as needed).
    load({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory / DCP_DIR)
    result: Any = set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=options,
    )
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint weights do not match the model: {len(missing)} missing (first: "
            f"{missing[:1]}), {len(result.unexpected_keys)} unexpected"
        )


def full_trainable_state(model: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The unsharded trainable weights (adapter, or all for full) in rank 0's CPU memory; the
    other processes get an empty dict. A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: PLC0415

    state = get_model_state_dict(
        model, options=_options(full=True, trainable_only=_trainable_only(method))
    )
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
