"""spec.distributed.strategy as a decision, and the memory estimate per process under FSDP.

The trainer's FSDP runs themselves (2 processes against one, sharded checkpoints resumed on
another number of processes) are in tests/integration/test_trainer_fsdp.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.distributed import choose_strategy, cpu_memory_limit, distributed_status
from kubetune_trainer.estimate import ModelShape, estimate_memory, sharded
from kubetune_trainer.fsdp import decoder_layers

if TYPE_CHECKING:
    from pathlib import Path

GB = 10**9
LLAMA3_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_the_spec_defaults_to_auto_and_takes_ddp_or_fsdp_only() -> None:
    base = {
        "baseModel": {"uri": "s3://models/x"},
        "dataset": {"trainUri": "s3://data/t.jsonl"},
        "output": {"uri": "s3://out/run"},
    }
    assert FineTuneSpec.model_validate(base).distributed.strategy == "auto"
    chosen = FineTuneSpec.model_validate({**base, "distributed": {"strategy": "fsdp"}})
    assert chosen.distributed.strategy == "fsdp"
    with pytest.raises(ValueError, match="strategy"):
        FineTuneSpec.model_validate({**base, "distributed": {"strategy": "zero3"}})
    # 4-bit weights are not sharded: refused when applied (a CEL rule in the CRD too).
    with pytest.raises(ValueError, match="fsdp does not support method qlora"):
        FineTuneSpec.model_validate(
            {**base, "method": "qlora", "distributed": {"strategy": "fsdp"}}
        )
    qlora = FineTuneSpec.model_validate({**base, "method": "qlora"})
    assert qlora.distributed.strategy == "auto"


def test_auto_shards_only_a_replica_that_does_not_fit() -> None:
    def choose(setting: str = "auto", **kw: object) -> tuple[str, str]:
        args: dict[str, object] = {
            "world_size": 8,
            "method": "full",
            "replica_bytes": 200 * GB,
            "memory_limit": 141 * GB,
        }
        args.update(kw)
        return choose_strategy(setting, **args)  # type: ignore[arg-type]

    strategy, reason = choose()
    assert strategy == "fsdp"
    assert reason == "auto: a whole replica (200.00 GB estimated) exceeds the 141.00 GB of one GPU"
    assert choose(replica_bytes=100 * GB) == (
        "ddp",
        "auto: a whole replica (100.00 GB estimated) fits in the 141.00 GB of one GPU",
    )
    # CPU with no memory limit known: nothing to compare with, so ddp.
    assert choose(memory_limit=None)[0] == "ddp"
    assert choose(replica_bytes=None) == ("ddp", "auto: no memory estimate for this model")
    assert choose(method="qlora")[0] == "ddp"  # 4-bit weights are not sharded
    # The spec decides when it says so; one process trains alone whatever it says.
    assert choose("ddp") == ("ddp", "spec.distributed.strategy is ddp")
    assert choose("fsdp", replica_bytes=1) == ("fsdp", "spec.distributed.strategy is fsdp")
    assert choose("fsdp", world_size=1) == ("single", "one process")


def test_the_cpu_limit_is_the_pods_cgroup_limit_shared_by_its_processes(tmp_path: Path) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text("8589934592\n")
    assert cpu_memory_limit(2, limit) == 4 * 1024**3
    limit.write_text("max\n")
    assert cpu_memory_limit(2, limit) is None
    assert cpu_memory_limit(2, tmp_path / "absent") is None


def test_status_reports_the_strategy_and_why() -> None:
    env = {"LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2"}
    status = distributed_status(env, 4, "fsdp", "spec.distributed.strategy is fsdp")
    assert status.model_dump(by_alias=True, exclude_none=True) == {
        "nodes": 2,
        "processesPerNode": 2,
        "worldSize": 4,
        "strategy": "fsdp",
        "reason": "spec.distributed.strategy is fsdp",
    }


def test_under_fsdp_weights_and_optimizer_state_are_divided_by_the_world_size() -> None:
    shape = ModelShape.from_config(LLAMA3_70B)
    whole = estimate_memory(
        shape, method="full", batch_size=1, seq_length=2048, gradient_checkpointing=True
    )
    # Full fine-tuning of a 70B model: ~1.1 TB of weights and AdamW state, no GPU holds that.
    assert whole.per_gpu > 1000 * GB
    eight = sharded(whole, 8, shape.layers)
    # A 1/8 shard of the weights plus two whole decoder layers (computing + prefetched).
    assert eight.weights == -(-whole.weights // 8) + 2 * -(-whole.weights // shape.layers)
    assert eight.trainable_state == -(-whole.trainable_state // 8)
    assert (eight.activations, eight.logits, eight.overhead) == (
        whole.activations,
        whole.logits,
        whole.overhead,
    )
    assert eight.per_gpu < whole.per_gpu / 6
    assert "fsdp over 8 processes" in eight.basis
    assert sharded(whole, 1, shape.layers) == whole


def test_the_decoder_layers_are_found_in_a_peft_model_too() -> None:
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    from localenv import models  # noqa: PLC0415

    model = models.tiny_llama(64, layers=3)
    assert decoder_layers(model) == list(model.model.layers)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    layers = decoder_layers(lora)
    assert len(layers) == 3 and all(type(x).__name__ == "LlamaDecoderLayer" for x in layers)
