"""The GPU memory estimate against the field's rules of thumb and our own H200 measurements."""

from __future__ import annotations

import pytest

from kubetune_trainer.estimate import (
    ModelShape,
    estimate_memory,
    lora_params,
    resolve_gradient_checkpointing,
)

GB = 1e9
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture
def llama7b() -> ModelShape:
    return ModelShape.from_config(LLAMA2_7B)


def test_llama2_7b_shape_has_its_published_parameter_counts(llama7b: ModelShape) -> None:
    assert llama7b.total_params == 6_738_415_616
    # peft's count for r=16 on every linear layer of Llama-2-7B.
    assert lora_params(llama7b, 16, ["all-linear"]) == 39_976_960
    assert lora_params(llama7b, 16, QKVO) == 16_777_216


def test_llama2_7b_at_batch_4x512_matches_the_rules_of_thumb(llama7b: ModelShape) -> None:
    def gb(method: str) -> float:
        # auto checkpointing: always on for qlora and full; lora measured both ways below.
        e = estimate_memory(
            llama7b, method=method, batch_size=4, seq_length=512, gradient_checkpointing=True
        )
        return e.per_gpu / GB

    assert gb("full") >= 80
    assert 16 <= gb("lora") <= 24
    assert 8 <= gb("qlora") <= 12


@pytest.mark.parametrize(
    ("method", "checkpointing", "measured_gb"),
    [
        # shared/notes/gpu-measurements.md: peak allocated on an H200, LoRA/QLoRA r16 q,k,v,o.
        ("lora", False, 26.7),
        ("qlora", True, 6.83),
        ("qlora", False, 21.9),
    ],
)
def test_estimate_is_within_25_percent_of_the_h200_measurements(
    llama7b: ModelShape, method: str, checkpointing: bool, measured_gb: float
) -> None:
    e = estimate_memory(
        llama7b,
        method=method,
        batch_size=4,
        seq_length=512,
        gradient_checkpointing=checkpointing,
        target_modules=QKVO,
    )
    # Compare what torch allocates: without the CUDA context and the allocator slack.
    allocated = (e.per_gpu - e.overhead) / 1.10 / GB
    assert allocated == pytest.approx(measured_gb, rel=0.25)


def test_checkpointing_and_quantization_shrink_the_estimate(llama7b: ModelShape) -> None:
    def per_gpu(method: str, ckpt: bool, batch: int = 4) -> int:
        return estimate_memory(
            llama7b, method=method, batch_size=batch, seq_length=512, gradient_checkpointing=ckpt
        ).per_gpu

    assert per_gpu("lora", True) < per_gpu("lora", False)
    assert per_gpu("qlora", True) < per_gpu("lora", True) < per_gpu("full", True)
    assert per_gpu("lora", False, batch=8) > per_gpu("lora", False, batch=4)


def test_the_basis_explains_the_number(llama7b: ModelShape) -> None:
    e = estimate_memory(
        llama7b, method="qlora", batch_size=4, seq_length=512, gradient_checkpointing=True
    )
    assert e.basis.startswith("qlora: 6.74B params (40.0M trainable), 4-bit weights")
    assert "micro-batch 4x512 tokens, gradient checkpointing on" in e.basis
    assert e.per_gpu == e.weights + e.trainable_state + e.activations + e.logits + e.overhead


def test_auto_gradient_checkpointing_policy(llama7b: ModelShape) -> None:
    without = estimate_memory(
        llama7b, method="lora", batch_size=4, seq_length=512, gradient_checkpointing=False
    )
    assert resolve_gradient_checkpointing("auto", "qlora")
    assert resolve_gradient_checkpointing("auto", "full")
    assert not resolve_gradient_checkpointing("auto", "lora")  # no GPU to compare with
    assert resolve_gradient_checkpointing(
        "auto", "lora", estimate_without=without, gpu_memory_bytes=24 * 1024**3
    )
    assert not resolve_gradient_checkpointing(
        "auto", "lora", estimate_without=without, gpu_memory_bytes=80 * 1024**3
    )
    assert resolve_gradient_checkpointing("enabled", "lora")
    assert not resolve_gradient_checkpointing("disabled", "qlora")


def test_shapes_from_other_config_layouts() -> None:
    gpt2 = ModelShape.from_config(
        {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}
    )
    assert (gpt2.intermediate, gpt2.kv_heads, gpt2.gated_mlp) == (3072, 12, False)
    assert gpt2.tied_embeddings  # the PretrainedConfig default
    multimodal = ModelShape.from_config({"text_config": LLAMA2_7B, "model_type": "llava"})
    assert multimodal.total_params == 6_738_415_616
    with pytest.raises(ValueError, match="hidden_size"):
        ModelShape.from_config({"vocab_size": 10})


def test_dpo_doubles_the_tokens_and_counts_the_full_reference(llama7b: ModelShape) -> None:
    shape = {"batch_size": 4, "seq_length": 512, "gradient_checkpointing": True}
    sft = estimate_memory(llama7b, method="lora", **shape)
    dpo = estimate_memory(llama7b, method="lora", dpo_pairs=10_000, **shape)
    # Both answers of each pair in the micro-batch: twice the activations and logits.
    assert dpo.activations == pytest.approx(2 * sft.activations, rel=1e-6)
    assert dpo.logits == pytest.approx(2 * sft.logits, rel=1e-6)
    assert dpo.weights == sft.weights and dpo.reference == 0  # the adapter off: no copy
    assert "reference (adapter off) 0 GB" in dpo.basis and "x 2 answers" in dpo.basis
    full = estimate_memory(llama7b, method="full", dpo_pairs=10_000, **shape)
    assert full.reference == 8 * 10_000  # two fp32 log-probabilities per pair, precomputed
    assert "reference log-probs" in full.basis


def test_on_cpu_the_estimate_is_fp32_plus_the_process_before_loading(
    llama7b: ModelShape,
) -> None:
    shape = {"batch_size": 4, "seq_length": 512, "gradient_checkpointing": False}
    gpu = estimate_memory(llama7b, method="lora", **shape)
    cpu = estimate_memory(llama7b, method="lora", dtype_bytes=4, overhead=700 * 2**20,
                          overhead_label="process before loading the model", **shape)  # fmt: skip
    assert cpu.weights == pytest.approx(2 * gpu.weights, rel=1e-6)  # fp32, not bf16
    assert cpu.activations == pytest.approx(2 * gpu.activations, rel=1e-3)
    assert cpu.overhead == 700 * 2**20
    assert cpu.basis.endswith("in the process") and "fp32 weights" in cpu.basis
    qlora = estimate_memory(llama7b, method="qlora", dtype_bytes=4, **shape)
    assert qlora.weights < cpu.weights / 4
