"""FSDP2 on GPUs: the trainer's sharding (kubetune_trainer/fsdp.py) with NCCL and bf16 mixed
precision, for the day a GPU machine is lent. Run through benchmarks/gpu_fsdp_check.sh:

    benchmarks/gpu_fsdp_check.sh            # every GPU of the machine, ~2 min
    benchmarks/gpu_fsdp_check.sh 1          # one GPU: a mesh of 1 (still FSDP2's code path)
    benchmarks/gpu_fsdp_check.sh 2 --allow-cpu --tiny   # code check on a CPU (gloo, fp32), ~1 min

For lora and full, a random-init Llama (hidden 1024, 8 layers, ~150M parameters) saved once, then
loaded by the trainer's own modeling.load_base_model / prepare_for_training / choose_precision,
sharded by fsdp.shard_model, trained STEPS steps by recipe.train_step on one batch of random
tokens.
Checked, each printed in one JSON document (also written to --out):
* the parameters are sharded DTensors, and a decoder layer computes in bf16 (the gathered
  parameters' dtype) while the sharded master weights keep their load dtype;
* the first loss equals the unsharded model's under the same autocast (bf16: within 2e-2
  relative), and the loss falls;
* a sharded checkpoint (fsdp.save_sharded) loads back (fsdp.load_sharded) into a fresh model
  and optimizer with equal shards; the gathered state (fsdp.full_trainable_state) on rank 0 has
  every trainable tensor at its full shape;
* peak GPU memory per process against the estimate (estimate.sharded).
"""

# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STEPS = 8
SHAPE: dict[str, Any] = {
    "hidden": 1024,
    "intermediate": 2816,
    "layers": 8,
    "heads": 16,
    "kv_heads": 8,
    "vocab": 32000,
}
TINY: dict[str, Any] = {
    "hidden": 64,
    "intermediate": 128,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 1000,
}
ROWS, SEQ = 4, 512


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--allow-cpu", action="store_true", help="gloo + fp32 without a GPU")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, 64 tokens a row")
    parser.add_argument("--out", default="", help="also write the JSON result here")
    args = parser.parse_args()
    seq = SEQ
    if args.tiny:
        SHAPE.update(TINY)
        seq = 64
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no GPU (pass --allow-cpu for a code check on gloo)", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    work = Path(tempfile.gettempdir()) / f"kubetune-gpu-fsdp-check-{SHAPE['hidden']}"
    model_dir = work / "model"
    if dist.get_rank() == 0 and not (model_dir / "config.json").exists():
        from localenv import models

        model = models.tiny_llama(
            SHAPE["vocab"],
            hidden=SHAPE["hidden"],
            intermediate=SHAPE["intermediate"],
            layers=SHAPE["layers"],
            heads=SHAPE["heads"],
            kv_heads=SHAPE["kv_heads"],
        )
        model_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(model_dir)
    dist.barrier()
    results = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "world_size": dist.get_world_size(),
        "methods": {m: check(m, model_dir, work, device, seq) for m in ("lora", "full")},
    }
    if dist.get_rank() == 0:
        text = json.dumps(results, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
    ok = all(r["ok"] for r in results["methods"].values())
    dist.destroy_process_group()
    return 0 if ok else 1


def check(method: str, model_dir: Path, work: Path, device: Any, seq: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from kubetune_trainer import estimate as mem
    from kubetune_trainer import fsdp
    from kubetune_trainer.api import FineTuneSpec
    from kubetune_trainer.modeling import choose_precision, load_base_model, prepare_for_training
    from kubetune_trainer.recipe import ADAM_BETAS, train_step

    spec = FineTuneSpec.model_validate(
        {
            "baseModel": {"uri": "s3://models/check"},
            "dataset": {"trainUri": "s3://data/check.jsonl"},
            "output": {"uri": "s3://out/check"},
            "method": method,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "resources": {"gpus": 1 if device.type == "cuda" else 0},
        }
    )
    precision = choose_precision(spec, device)
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = ROWS
    generator = torch.Generator().manual_seed(0)
    # One batch every step: the loss must fall (random tokens do not generalize).
    batches = [torch.randint(3, SHAPE["vocab"], (rows, seq), generator=generator)] * STEPS

    def build(shard: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(1)  # the same adapter init everywhere
        model = prepare_for_training(
            load_base_model(model_dir, spec, precision), spec, gradient_checkpointing=False
        )
        if shard:
            model = fsdp.shard_model(model, device=device, compute_dtype=precision.compute_dtype)
        else:
            model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-3, betas=ADAM_BETAS)

    # The unsharded model's first loss, same autocast, rank 0's micro-batch.
    plain, _ = build(shard=False)
    with torch.no_grad(), precision.autocast():
        ids = batches[0].to(device)
        reference = float(plain(input_ids=ids, labels=ids).loss)
    del plain
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    model, optimizer = build(shard=True)
    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    gathered_dtypes: set[str] = set()
    layer = fsdp.decoder_layers(model)[0]
    hook = layer.register_forward_pre_hook(
        lambda m, _: gathered_dtypes.update(str(p.dtype) for p in m.parameters(recurse=True))
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)

    class Micro:
        def __init__(self, ids: torch.Tensor) -> None:
            self.ids = ids
            self.num_tokens = ids.numel()

        def to(self, where: Any) -> Any:
            return Micro(self.ids.to(where))

    def loss_fn(m: torch.nn.Module, batch: Micro, divisor: torch.Tensor) -> torch.Tensor:
        out = m(input_ids=batch.ids, labels=batch.ids)
        return out.loss * batch.ids.numel() / divisor

    losses, started = [], time.monotonic()
    for step in range(STEPS):
        mine = batches[step].chunk(world)[rank] if rows % world == 0 else batches[step]
        loss, _ = train_step(
            model,
            [mine],
            Micro,
            step_tokens=mine.numel() * world,
            world_size=world,
            precision=precision,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            params=[p for p in model.parameters() if p.requires_grad],
            loss_fn=loss_fn,  # type: ignore[arg-type]
        )
        dist.all_reduce(loss)  # each process's share of the step's mean token loss
        losses.append(float(loss) / world)
    seconds = time.monotonic() - started
    hook.remove()
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None

    # Sharded checkpoint round trip, then the gathered state.
    ckpt = work / f"ckpt-{method}"
    fsdp.save_sharded(model, optimizer, ckpt, method)
    fresh, fresh_optimizer = build(shard=True)
    fsdp.load_sharded(fresh, fresh_optimizer, ckpt, method)
    restored = all(
        torch.equal(a.to_local(), b.to_local())
        for (_, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters(), strict=True)
        if isinstance(a, DTensor) and isinstance(b, DTensor) and a.requires_grad
    )
    full = fsdp.full_trainable_state(model, method)
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    gathered_ok = rank != 0 or (
        set(full) == set(trainable) and all(full[n].shape == s for n, s in trainable.items())
    )
    shape = mem.ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    whole = mem.estimate_memory(
        shape,
        method=method,
        batch_size=rows // world if rows % world == 0 else rows,
        seq_length=seq,
        gradient_checkpointing=False,
        lora_r=16,
        lora_dropout=0.0,
    )
    estimate = mem.sharded(whole, world, shape.layers)
    first_ok = abs(losses[0] - reference) <= 2e-2 * reference
    expect_bf16 = precision.compute_dtype is not None
    dtype_ok = ("torch.bfloat16" in gathered_dtypes) == expect_bf16 or device.type != "cuda"
    result = {
        "ok": bool(sharded and first_ok and losses[-1] < losses[0] and restored and gathered_ok)
        and dtype_ok,
        "sharded_parameters": len(sharded),
        "gathered_dtypes": sorted(gathered_dtypes),
        "master_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "first_loss": losses[0],
        "unsharded_first_loss": reference,
        "losses": losses,
        "seconds_per_step": seconds / STEPS,
        "checkpoint_restored": restored,
        "gathered_state_complete": gathered_ok,
        "peak_gpu_bytes": peak,
        "estimate_per_gpu_bytes": estimate.per_gpu,
        "estimate_basis": estimate.basis,
    }
    dist.barrier()
    return result


if __name__ == "__main__":
    sys.exit(main())
