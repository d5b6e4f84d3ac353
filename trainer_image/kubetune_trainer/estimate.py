"""GPU memory estimate for a fine-tuning run, from the model's config.json alone.

Pure standard library (the operator image may import it too): no torch, no weights. The trainer
reports the estimate to status.estimate after fetching config.json and before loading weights,
and `gradientCheckpointing: auto` uses it to decide whether activations must be recomputed.

The model is coarse on purpose: it should land within ~20% of a measured peak, not predict it
to the byte. Per GPU (data-parallel training replicates everything):

* weights: bf16 2 B/param (lora); fp32 master weights 4 B/param (full, trained under bf16
  autocast, which also caches a 2 B/param bf16 copy of the weights during the forward pass);
  qlora: 4-bit linear layers at 0.5 B/param plus the quantization constants (one fp32 absmax
  per 64 weights, or 8-bit absmax plus an fp32 constant per 256 blocks with double quant), and
  the layers bitsandbytes leaves alone (embeddings, head, norms) in fp32 after
  prepare_model_for_kbit_training.
* trainable state: fp32 weight + grad + two AdamW moments = 16 B per adapter param (lora,
  qlora); full: grad + two moments = 12 B per param on top of the master weights.
* activations per token and layer in bf16 (SDPA keeps no attention matrix): 2·(6h + 2·kv +
  4·i) bytes for a gated MLP (Llama-like), plus 3 B per input feature of every adapted linear
  layer with dropout (the dropped copy and its mask). With gradient checkpointing only each
  layer's input is kept, plus one layer's activations while it is recomputed.
* logits: tokens x vocab x 10 B (bf16 logits, their fp32 upcast for the loss, its gradient).
* 10% allocator slack on all of the above, plus 1 GiB for the CUDA context and workspaces.

On the CPU (resources.gpus 0) the same model estimates the process's peak resident memory (what
`peak_memory` reports: ru_maxrss): everything computes in fp32 there (dtype_bytes 4: LoRA weights
at 4 B/param, no bf16 weight copies, activations twice the bf16 size), and the overhead is the
process's measured resident memory before the model loads (interpreter, torch, transformers,
peft and bitsandbytes imported, the tokenized data) instead of a CUDA context.

DPO (objective dpo) trains on pairs: a micro-batch holds both answers of each pair, twice the
tokens of an SFT micro-batch of the same batchSize. The reference costs no extra peak memory with
an adapter (the adapter is switched off for a no_grad forward pass whose activations are freed
before the policy's); full fine-tuning keeps precomputed reference log-probabilities, 8 bytes per
pair, instead of a frozen copy of the model (which would cost 2 B/param in bf16).

Checked against the measurements in shared/notes/gpu-measurements.md (Llama-2-7B, 4x512 tokens,
H200): LoRA q,k,v,o measured 26.7 GB peak allocated / estimated 27.6 GB before slack; QLoRA with
checkpointing 6.8 GB / 6.4 GB; QLoRA without 21.9 GB / 18.5 GB.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

Method = Literal["lora", "qlora", "full"]

GiB: Final = 1024**3
CUDA_CONTEXT_BYTES: Final = 1 * GiB
ALLOCATOR_SLACK: Final = 1.10
# `auto` checkpointing turns on when the estimate without it exceeds this share of the GPU.
TIGHT_FRACTION: Final = 0.90
LOGIT_BYTES_PER_ELEMENT: Final = 10
NF4_BLOCK: Final = 64
DOUBLE_QUANT_BLOCK: Final = 256

# Architectures whose MLP is two matrices (up, down) rather than gated (gate, up, down).
_UNGATED_MODEL_TYPES: Final = frozenset(
    {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "starcoder2"}
)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read a Hugging Face config.json dict (text_config of multimodal models too)."""
        text = config.get("text_config")
        cfg: Mapping[str, Any] = text if isinstance(text, Mapping) else config

        def first(*names: str, default: int | None = None) -> int:
            for name in names:
                value = cfg.get(name)
                if isinstance(value, int) and value > 0:
                    return value
            if default is None:
                raise ValueError(f"config.json has none of {', '.join(names)}")
            return default

        hidden = first("hidden_size", "n_embd", "d_model")
        heads = first("num_attention_heads", "n_head")
        model_type = str(cfg.get("model_type", config.get("model_type", "")))
        return cls(
            hidden=hidden,
            intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            layers=first("num_hidden_layers", "n_layer", "num_layers"),
            heads=heads,
            kv_heads=first("num_key_value_heads", "num_kv_heads", default=heads),
            head_dim=first("head_dim", default=hidden // heads),
            vocab=first("vocab_size"),
            # PretrainedConfig defaults to tied; Llama-family configs say false explicitly.
            tied_embeddings=bool(
                cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True))
            ),
            gated_mlp=model_type not in _UNGATED_MODEL_TYPES,
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer, by Llama module name."""
        h, i = self.hidden, self.intermediate
        shapes = {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        if self.gated_mlp:
            shapes["gate_proj"] = (h, i)
        return shapes

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear layers (what 4-bit quantization covers)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        return self.layers * per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


def lora_params(shape: ModelShape, r: int, target_modules: Sequence[str]) -> int:
    """Adapter parameters: r·(in + out) per adapted linear layer."""
    return shape.layers * sum(r * (a + b) for a, b in _targets(shape, target_modules).values())


def _targets(shape: ModelShape, target_modules: Sequence[str]) -> dict[str, tuple[int, int]]:
    shapes = shape.linear_shapes()
    if "all-linear" in target_modules:
        return shapes
    # Names are suffixes in peft ("self_attn.q_proj" or "q_proj"); unknown names (other
    # architectures) count as a hidden x hidden layer rather than as nothing.
    out: dict[str, tuple[int, int]] = {}
    for name in target_modules:
        leaf = name.rsplit(".", 1)[-1]
        out[leaf] = shapes.get(leaf, (shape.hidden, shape.hidden))
    return out


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (or of the process, on CPU), by component, and what was assumed."""

    weights: int
    trainable_state: int
    activations: int
    logits: int
    overhead: int
    total_params: int
    trainable_params: int
    gradient_checkpointing: bool
    basis: str
    reference: int = 0  # DPO with full fine-tuning: the precomputed reference log-probabilities

    @property
    def per_gpu(self) -> int:
        return (
            self.weights
            + self.trainable_state
            + self.activations
            + self.logits
            + self.reference
            + self.overhead
        )


def activation_bytes_per_token_layer(
    shape: ModelShape, *, method: Method, target_modules: Sequence[str], lora_dropout: float
) -> int:
    """Saved activations of one decoder layer for one token, in bytes (bf16)."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    mlp = 4 * i if shape.gated_mlp else 2 * i
    base = 2 * (6 * h + 2 * kv + mlp)
    if method == "full" or lora_dropout == 0:
        return base
    # peft applies dropout to each adapted layer's input separately: a copy and a mask each.
    return base + sum(3 * a for a, _ in _targets(shape, target_modules).values())


def estimate_memory(
    shape: ModelShape,
    *,
    method: Method,
    batch_size: int,
    seq_length: int,
    gradient_checkpointing: bool,
    lora_r: int = 16,
    target_modules: Sequence[str] = ("all-linear",),
    lora_dropout: float = 0.05,
    double_quant: bool = True,
    dtype_bytes: int = 2,
    overhead: int = CUDA_CONTEXT_BYTES,
    overhead_label: str = "CUDA context",
    dpo_pairs: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one training process, by component (see the module docstring).

    dtype_bytes: 2 for bf16/fp16 compute on a GPU, 4 for fp32 (CPU). overhead: the CUDA context,
    or on CPU the process's resident memory before the model loads. dpo_pairs: objective dpo,
    with this many training + validation pairs (micro-batches hold both answers of each pair).
    """
    total = shape.total_params
    tokens = batch_size * seq_length * (2 if dpo_pairs is not None else 1)
    if method == "full":
        trainable = total
        # fp32 master weights + the bf16 copies autocast caches during the forward pass.
        weights = 4 * total + (2 * total if dtype_bytes == 2 else 0)
        state = 12 * trainable
    else:
        trainable = lora_params(shape, lora_r, target_modules)
        state = 16 * trainable
        if method == "lora":
            weights = dtype_bytes * total
        else:
            # Quantization constants per weight: fp32 absmax per block, or (double quant)
            # 8-bit absmax plus one fp32 constant per DOUBLE_QUANT_BLOCK blocks.
            if double_quant:
                constants = 1 / NF4_BLOCK + 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
            else:
                constants = 4 / NF4_BLOCK
            quantized = shape.linear_params
            weights = math.ceil(quantized * (0.5 + constants)) + 4 * (total - quantized)

    scale = dtype_bytes / 2  # activations are counted in bf16 bytes
    per_layer = round(
        scale
        * activation_bytes_per_token_layer(
            shape, method=method, target_modules=target_modules, lora_dropout=lora_dropout
        )
    )
    # Full fine-tuning keeps the residual stream in fp32 (the master weights' dtype).
    residual = (4 if method == "full" else dtype_bytes) * shape.hidden
    if gradient_checkpointing:
        activations = tokens * (shape.layers * residual + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    logits = tokens * shape.vocab * LOGIT_BYTES_PER_ELEMENT

    def slack(n: int) -> int:
        return math.ceil(n * ALLOCATOR_SLACK)

    reference = 8 * dpo_pairs if dpo_pairs is not None and method == "full" else 0
    estimate = MemoryEstimate(
        weights=slack(weights),
        trainable_state=slack(state),
        activations=slack(activations),
        logits=slack(logits),
        overhead=overhead,
        total_params=total,
        trainable_params=trainable,
        gradient_checkpointing=gradient_checkpointing,
        basis="",
        reference=reference,
    )
    basis = _basis(
        estimate,
        method,
        batch_size,
        seq_length,
        dtype_bytes=dtype_bytes,
        overhead_label=overhead_label,
        dpo=dpo_pairs is not None,
    )
    return replace(estimate, basis=basis)


def _gb(n: int) -> str:
    if 0 < n < 100e6:  # tiny (CPU test) models: a figure that is not 0.0
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.1f} GB"


def _count(n: int) -> str:
    """6.74B, 40.0M, 16.4K, 512."""
    for unit, size, digits in (("B", 1e9, 2), ("M", 1e6, 1), ("K", 1e3, 1)):
        if n >= size:
            return f"{n / size:.{digits}f}{unit}"
    return str(n)


def _basis(
    e: MemoryEstimate,
    method: Method,
    batch_size: int,
    seq_length: int,
    *,
    dtype_bytes: int = 2,
    overhead_label: str = "CUDA context",
    dpo: bool = False,
) -> str:
    lora_dtype = "bf16 weights" if dtype_bytes == 2 else "fp32 weights"
    dtype = {"lora": lora_dtype, "qlora": "4-bit weights", "full": "fp32 master weights"}[method]
    ckpt = "on" if e.gradient_checkpointing else "off"
    shape = f"micro-batch {batch_size}x{seq_length} tokens"
    if dpo:
        shape = f"dpo, micro-batch {batch_size}x{seq_length} tokens x 2 answers"
    reference = ""
    if dpo:
        reference = (
            f" + reference log-probs {_gb(e.reference)}"
            if method == "full"
            else " + reference (adapter off) 0 GB"
        )
    where = "per GPU" if overhead_label == "CUDA context" else "in the process"
    return (
        f"{method}: {_count(e.total_params)} params ({_count(e.trainable_params)} "
        f"trainable), {dtype}, {shape}, gradient "
        f"checkpointing {ckpt}: weights {_gb(e.weights)} + optimizer/grads "
        f"{_gb(e.trainable_state)} + activations {_gb(e.activations)} + logits "
        f"{_gb(e.logits)}{reference} + {overhead_label} {_gb(e.overhead)} {where}"
    )


def resolve_gradient_checkpointing(
    setting: Literal["auto", "enabled", "disabled"],
    method: Method,
    *,
    estimate_without: MemoryEstimate | None = None,
    gpu_memory_bytes: int | None = None,
) -> bool:
    """The spec's gradientCheckpointing as a decision.

    auto: on for qlora and full (their point is fitting a model that would not fit otherwise),
    and for lora when the estimate without it exceeds 90% of the GPU. With no GPU to compare
    against (CPU runs), lora trains without it.
    """
    if setting != "auto":
        return setting == "enabled"
    if method in ("qlora", "full"):
        return True
    if estimate_without is None or gpu_memory_bytes is None:
        return False
    return estimate_without.per_gpu > TIGHT_FRACTION * gpu_memory_bytes


def sharded(estimate: MemoryEstimate, world_size: int, layers: int) -> MemoryEstimate:
    """The estimate per process under FSDP over `world_size` processes: weights, gradients and
    optimizer state are divided among them; activations, logits and the overhead are not. Two
    decoder layers are whole at a time (the one computing and the one prefetched)."""
    if world_size <= 1:
        return estimate
    gathered = 2 * math.ceil(estimate.weights / max(layers, 1))
    weights = min(estimate.weights, math.ceil(estimate.weights / world_size) + gathered)
    state = math.ceil(estimate.trainable_state / world_size)
    basis = (
        f"{estimate.basis}; fsdp over {world_size} processes: weights {_gb(weights)} (a "
        f"1/{world_size} shard + 2 gathered layers) + optimizer/grads {_gb(state)}"
    )
    return replace(estimate, weights=weights, trainable_state=state, basis=basis)
