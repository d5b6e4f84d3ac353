"""QLoRA on the CPU: the base model really is 4-bit, and only the adapter is saved."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.modeling import (
    ADAPTER_WEIGHTS,
    choose_precision,
    load_base_model,
    prepare_for_training,
    save_trainable,
)
from localenv import models

if TYPE_CHECKING:
    from pathlib import Path

bnb = pytest.importorskip("bitsandbytes")


def spec(method: str) -> FineTuneSpec:
    return FineTuneSpec.model_validate(
        {
            "baseModel": {"uri": "s3://models/tiny"},
            "dataset": {"trainUri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/run"},
            "method": method,
            "resources": {"gpus": 0},
            "lora": {"r": 4, "alpha": 8},
        }
    )


def test_qlora_base_weights_are_4_bit_on_cpu_and_only_the_adapter_is_saved(
    tmp_path: Path,
) -> None:
    source = models.tiny_llama(128, attn="sdpa")
    source.save_pretrained(tmp_path / "model")
    qlora = spec("qlora")
    precision = choose_precision(qlora, torch.device("cpu"))
    base = load_base_model(tmp_path / "model", qlora, precision)

    linear = [m for n, m in base.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert linear and all(isinstance(m, bnb.nn.Linear4bit) for m in linear)
    for module in linear:
        weight = module.weight
        assert weight.dtype == torch.uint8  # two 4-bit codes per byte
        assert weight.numel() * 2 == module.in_features * module.out_features
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quant
    # The decoder's linear layers take an eighth of their fp32 bytes, plus the constants.
    fp32 = sum(m.in_features * m.out_features * 4 for m in linear)
    packed = sum(m.weight.numel() * m.weight.element_size() for m in linear)
    assert packed * 8 == fp32
    assert base.get_memory_footprint() < source.get_memory_footprint() * 0.75

    # An eval-mode pass without gradients (the probes, evaluation, the DPO reference) leaves
    # the weights in their trainable layout (modeling.keep_4bit_layout).
    with torch.no_grad():
        base.eval()(input_ids=torch.randint(3, 128, (1, 5)))
    for module in linear:
        assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)
        assert module.weight.dtype == torch.uint8

    model = prepare_for_training(base, qlora, gradient_checkpointing=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(3, 128, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    saved = load_file(str(save_trainable(model, tmp_path / "ckpt", "qlora")))
    assert saved and all("lora_" in k for k in saved)
    assert sum(t.numel() for t in saved.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [ADAPTER_WEIGHTS]


def test_qlora_gradients_on_cpu_equal_those_of_the_dequantized_model(tmp_path: Path) -> None:
    """The adapter learns what it would on the same weights in fp32: bitsandbytes' CPU path
    dequantizes and multiplies in fp32, forward and backward, even after eval-mode passes."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    models.tiny_llama(128, attn="sdpa").save_pretrained(tmp_path / "model")
    qlora, lora = spec("qlora"), spec("lora")
    cpu = torch.device("cpu")
    quantized = load_base_model(tmp_path / "model", qlora, choose_precision(qlora, cpu))
    with torch.no_grad():
        quantized.eval()(input_ids=torch.randint(3, 128, (1, 5)))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            plain.get_submodule(name).weight.data.copy_(weight)
    q_model = prepare_for_training(quantized, qlora, gradient_checkpointing=False)
    f_model = prepare_for_training(plain, lora, gradient_checkpointing=False)
    state = {k: torch.randn_like(v) * 0.1 for k, v in get_peft_model_state_dict(q_model).items()}
    set_peft_model_state_dict(q_model, state)
    set_peft_model_state_dict(f_model, state)
    ids = torch.randint(3, 128, (2, 12))
    losses = []
    for model in (q_model, f_model):
        model.eval()  # no dropout: the same function twice
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    grads = [
        {n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (q_model, f_model)
    ]
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-6, rtol=1e-4, msg=name)
