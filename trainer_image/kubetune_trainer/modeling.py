"""Model, tokenizer and precision: LoRA, QLoRA and full fine-tuning on Hugging Face models.

* lora: the base model in bf16 (fp32 on CPU), frozen; peft adapters in fp32 (peft upcasts
  them), so the optimizer state is fp32.
* qlora: the base model quantized to 4 bits by bitsandbytes (nf4/fp4, optional double quant)
  with the spec's compute dtype, then prepare_model_for_kbit_training (fp32 norms/embeddings,
  frozen base) and the same adapters. On a GPU or on the CPU: bitsandbytes (>= 0.48) quantizes
  and trains Linear4bit layers on the CPU with its torch implementation; there, like every CPU
  run, the dequantized weights compute in fp32 (quantization.computeDtype is for GPUs).
* full: every weight trained in fp32 ("master weights") under bf16 autocast.

Attention is SDPA, which takes the packed batches' 4D block-diagonal bool mask; a model without
SDPA support falls back to eager attention, which needs the additive float mask instead.

The loss (causal_lm_loss) applies the output head only at the positions that are trained, through
the model's own `logits_to_keep` (see there).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.data.tokenize import IGNORE_INDEX, Example
from kubetune_trainer.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kubetune_trainer.data.packing import Batch

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS: Final = "adapter_model.safetensors"
FULL_WEIGHTS: Final = "model.safetensors"
_DTYPES: Final = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """Where the model runs and in which number formats."""

    device: torch.device
    load_dtype: torch.dtype  # dtype of the (non-quantized) weights as loaded
    compute_dtype: torch.dtype | None  # autocast dtype; None = plain fp32 (CPU)
    grad_scaler: bool  # fp16 compute needs loss scaling; bf16 does not

    def autocast(self) -> torch.autocast:
        if self.compute_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def choose_precision(spec: FineTuneSpec, device: torch.device) -> Precision:
    """bf16 autocast where the GPU supports it (fp16 + loss scaling on older GPUs); fp32 on CPU
    (qlora too: 4-bit weights dequantized to fp32)."""
    if device.type != "cuda":
        return Precision(device, torch.float32, None, grad_scaler=False)
    bf16 = torch.cuda.is_bf16_supported()
    compute = torch.bfloat16 if bf16 else torch.float16
    if spec.method == "qlora":
        wanted = _DTYPES[spec.quantization.compute_dtype]
        if wanted is torch.bfloat16 and not bf16:
            log.warning("this GPU has no bfloat16: QLoRA computes in float16 instead")
        else:
            compute = wanted
    load = torch.float32 if spec.method == "full" else compute
    return Precision(device, load, compute, grad_scaler=compute is torch.float16)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return cast(dict[str, Any], json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise ModelError(
            f"the base model has no config.json ({model_dir.name}): baseModel.uri must point "
            "at a Hugging Face model directory (config.json, *.safetensors, tokenizer files)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the base model's config.json: {exc}") from exc


def load_tokenizer(path: Path, *, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer  # noqa: PLC0415 - transformers imports slowly

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise ModelError(f"cannot load the tokenizer: {type(exc).__name__}: {exc}") from exc
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no eos_token: set one in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        # Padding never carries loss and is masked out, so any id will do; EOS is conventional.
        tokenizer.pad_token = tokenizer.eos_token
    return cast("PreTrainedTokenizerBase", tokenizer)


def _bnb_config(spec: FineTuneSpec, precision: Precision) -> Any:
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    q = spec.quantization
    make: Any = BitsAndBytesConfig  # untyped constructor
    return make(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=precision.compute_dtype or torch.float32,
    )


def load_base_model(model_dir: Path, spec: FineTuneSpec, precision: Precision) -> PreTrainedModel:
    """The pretrained model, on its device, quantized for qlora. Raises ModelError."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    kwargs: dict[str, Any] = {
        "dtype": precision.load_dtype,
        "trust_remote_code": spec.base_model.trust_remote_code,
    }
    if precision.device.type == "cuda":
        # Straight onto the GPU: no second copy of the weights in host memory.
        kwargs["device_map"] = {"": precision.device}
    if spec.method == "qlora":
        kwargs["quantization_config"] = _bnb_config(spec, precision)
        # bitsandbytes quantizes while placing the weights: it needs a device map on CPU too.
        kwargs["device_map"] = {"": precision.device}
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), attn_implementation="sdpa", **kwargs
            )
        except ValueError as exc:
            # transformers names SDPA either way ("sdpa" in the argument check, the function's
            # name in "does not support an attention implementation through ...").
            message = str(exc).lower()
            if "sdpa" not in message and "scaled_dot_product_attention" not in message:
                raise
            log.warning("this architecture has no SDPA attention; using eager attention")
            model = AutoModelForCausalLM.from_pretrained(
                str(model_dir), attn_implementation="eager", **kwargs
            )
    except ModelError:
        raise
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # missing weights, unknown architecture, remote code refused...
        raise ModelError(f"cannot load the base model: {type(exc).__name__}: {exc}") from exc
    # The KV cache is for generation; in training it only costs memory (and, with a 4D mask,
    # would make transformers rebuild the mask; see data/packing.py).
    model.config.use_cache = False
    if spec.method == "qlora" and precision.device.type == "cpu":
        keep_4bit_layout(model)
    return cast("PreTrainedModel", model)


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit CPU weights in their trainable layout.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place, for a
    bf16 inference kernel, on the first forward pass in eval mode without gradients: the
    trainer's probes, evaluation and the DPO reference are such passes. Training then runs on
    the repacked weight through the bf16 kernel, whose gradients differ from the fp32 ones by
    up to 1% (measured on a tiny Llama) and whose eval losses lag LoRA's; layers narrower than
    the 64-weight block even fail to repack. Without it every pass uses the same fp32
    dequantize-and-matmul path, whose LoRA gradients equal those of the dequantized model.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010


def attention_mask_dtype(model: torch.nn.Module, precision: Precision) -> torch.dtype:
    """bool for SDPA; eager attention adds the mask to its scores, so it needs floats."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        return torch.bool
    return precision.compute_dtype or torch.float32


def prepare_for_training(
    model: PreTrainedModel, spec: FineTuneSpec, *, gradient_checkpointing: bool
) -> torch.nn.Module:
    """Freeze/quantize-prepare, add adapters, enable gradient checkpointing."""
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415

        # Checkpointing is enabled below, the same way for every method.
        prepare: Any = prepare_model_for_kbit_training  # untyped
        model = prepare(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads)
        # and restores the RNG state for recomputation, so dropout stays deterministic.
        kwargs = {"use_reentrant": False}
        hf: Any = model
        if hasattr(hf, "activation_checkpointing_enable"):  # the transformers 5.x name
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if spec.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    lora = spec.lora
    targets: str | list[str] = (
        "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return cast(torch.nn.Module, get_peft_model(model, config))
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise ConfigError(f"lora.targetModules: {exc}") from exc


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, so no RNG is drawn) for the block; the model's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------- loss


def causal_lm_loss(
    model: torch.nn.Module,
    batch: Batch,
    divisor: torch.Tensor,
    *,
    trained_logits_only: bool,
) -> torch.Tensor:
    """Summed token cross-entropy of `batch` divided by `divisor`: exactly the loss that
    `model(**inputs, num_items_in_batch=divisor).loss` returns (transformers' ForCausalLMLoss).

    With trained_logits_only the output head runs only where a label is trained (labels[t + 1]
    != -100): not at prompt, padding or sequence-end positions, whose logits the loss ignores
    anyway. That saves the head's FLOPs and, above all, the [batch, seq, vocab] logits tensor
    (2 GB in fp32 for 4 x 1024 tokens of a 128k vocabulary) at most positions. It goes through
    the model's own forward with a boolean `logits_to_keep` (transformers' slice_logits_to_keep:
    hidden states [num_true, hidden] before lm_head): what runs is still model(...), so a DDP
    wrapper still syncs gradients, PEFT's forward and the model's own post-head steps (logit
    soft-capping or scaling) still apply, and nothing has to reach into submodules of a
    quantized or wrapped model. Models that cannot take a mask fall back to the full logits
    (supports_trained_logits decides once). As in transformers, logits are upcast to fp32 before
    the cross-entropy.
    """
    if not trained_logits_only:
        out = model(**batch.model_inputs(), use_cache=False, num_items_in_batch=divisor)
        return cast(torch.Tensor, out.loss)
    shifted = batch.labels[:, 1:]
    trained = shifted != IGNORE_INDEX
    # Position t predicts labels[t + 1]; the last position of a row predicts nothing.
    keep = torch.nn.functional.pad(trained, (0, 1), value=False)
    inputs = batch.model_inputs()
    del inputs["labels"]
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), shifted[trained], reduction="sum")
    return loss / divisor.to(loss.device)


def supports_trained_logits(model: torch.nn.Module, precision: Precision) -> bool:
    """Whether `model` takes a boolean [batch, seq] `logits_to_keep` and returns logits only
    at the True positions (transformers' own models do; some remote-code models do not).

    Probed once with a 3-token forward pass in eval mode (no dropout, so no RNG is drawn)."""
    ids = torch.zeros((1, 3), dtype=torch.long, device=precision.device)
    keep = torch.tensor([[True, False, True]], device=precision.device)
    try:
        with eval_mode(model), torch.no_grad(), precision.autocast():
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        supported = tuple(logits.shape[:-1]) == (2,)
    except Exception as exc:  # TypeError (unknown argument), IndexError (int-only slicing), ...
        log.info("the model takes no logits_to_keep mask (%s: %s)", type(exc).__name__, exc)
        supported = False
    if not supported:
        log.warning(
            "this model cannot compute logits at selected positions only: the loss uses the "
            "logits of every position (correct, but slower and more memory)"
        )
    return supported


@dataclass(frozen=True)
class PackingCheck:
    """Max |logit difference| of a sequence packed behind another against alone: with the
    block-diagonal mask and restarting positions (masked), and with naive packing (no mask,
    positions running on); `scale` is the largest |logit| alone."""

    masked: float
    naive: float
    scale: float


def packing_check(
    model: torch.nn.Module,
    first: Example,
    second: Example,
    *,
    pad_token_id: int,
    mask_dtype: torch.dtype,
    precision: Precision,
) -> PackingCheck:
    """Three forward passes in eval mode (the model's mode is restored)."""
    from kubetune_trainer.data.packing import collate_packed  # noqa: PLC0415

    packed = collate_packed([[first, second]], pad_token_id, mask_dtype=mask_dtype)
    alone = collate_packed([[second]], pad_token_id, mask_dtype=mask_dtype)
    packed, alone = packed.to(precision.device), alone.to(precision.device)
    n = len(first)
    with eval_mode(model), torch.no_grad(), precision.autocast():
        out_packed = model(**packed.model_inputs(), use_cache=False).logits[0, n:].float()
        out_alone = model(**alone.model_inputs(), use_cache=False).logits[0].float()
        naive = model(input_ids=packed.input_ids, use_cache=False).logits[0, n:].float()
    return PackingCheck(
        masked=float((out_packed - out_alone).abs().max()),
        naive=float((naive - out_alone).abs().max()),
        scale=float(out_alone.abs().max()),
    )


def packing_keeps_sequences_apart(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_token_id: int,
    mask_dtype: torch.dtype,
    precision: Precision,
) -> bool:
    """Whether `model` honours packed rows (data/packing.py): the 4D block-diagonal mask and
    position_ids restarting per sequence. transformers' common architectures do; others
    build their own mask or positions from a 2D mask (BLOOM's ALiBi fails on a 4D one) and
    remote-code models may ignore either, which would let packed sequences see each other.

    Probed once on two real examples (at most 16 tokens each, packing_check): the masked
    difference must be numerical noise, well below what attending across the boundary
    changes."""
    pair = [*examples[:2], *examples[:1]]  # one example: packed behind itself
    first, second = (Example(e.input_ids[:16], e.labels[:16]) for e in pair[:2])
    try:
        check = packing_check(
            model,
            first,
            second,
            pad_token_id=pad_token_id,
            mask_dtype=mask_dtype,
            precision=precision,
        )
        noise = 1e-3 if precision.compute_dtype in (None, torch.float32) else 3e-2
        apart = check.masked <= max(noise * max(1.0, check.scale), 0.1 * check.naive)
        reason = (
            f"max |logit difference| {check.masked:.3g} packed vs alone, "
            f"{check.naive:.3g} without the mask"
        )
    except Exception as exc:  # a model that cannot take a 4D mask or position_ids
        apart, reason = False, f"{type(exc).__name__}: {exc}"
    if not apart:
        log.warning(
            "this model does not keep packed sequences apart (%s): training without packing, "
            "one example per row (correct, but padding costs compute)",
            reason,
        )
    return apart


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count as the parameters they represent."""
    counter = getattr(model, "get_nb_trainable_parameters", None)
    if counter is not None:
        trainable, total = counter()
        return int(trainable), int(total)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def check_vocabulary(model: torch.nn.Module, max_token_id: int) -> None:
    embeddings: Any = cast("PreTrainedModel", model).get_input_embeddings()
    size = int(embeddings.weight.shape[0])
    if max_token_id >= size:
        raise ModelError(
            f"the tokenizer produces token id {max_token_id} but the model's embedding has "
            f"{size} rows: the tokenizer does not belong to this model (check "
            "baseModel.tokenizerUri)"
        )


# ----------------------------------------------------------------------- trainable weights


def save_trainable(model: torch.nn.Module, directory: Path, method: str) -> Path:
    """The trained weights only: the adapter for lora/qlora, everything for full."""
    directory.mkdir(parents=True, exist_ok=True)
    if method == "full":
        path = directory / FULL_WEIGHTS
        save_model(model, str(path))  # handles tied (shared) embeddings
        return path
    from peft import get_peft_model_state_dict  # noqa: PLC0415

    path = directory / ADAPTER_WEIGHTS
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(path))
    return path


def load_trainable(model: torch.nn.Module, directory: Path, method: str) -> None:
    device = next(model.parameters()).device
    if method == "full":
        missing, unexpected = load_model(model, str(directory / FULL_WEIGHTS), device=str(device))
        if missing or unexpected:
            raise ModelError(
                f"checkpoint weights do not match the model: {len(missing)} missing, "
                f"{len(unexpected)} unexpected tensors"
            )
        return
    from peft import set_peft_model_state_dict  # noqa: PLC0415

    state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(device))
    try:
        result: Any = set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # size mismatch: the checkpoint had another rank
        raise ModelError(f"checkpoint adapter does not fit this model: {exc}") from exc
    if result.unexpected_keys:
        raise ModelError(
            f"checkpoint adapter does not fit this model: {len(result.unexpected_keys)} "
            f"unexpected tensors (first: {result.unexpected_keys[0]})"
        )
