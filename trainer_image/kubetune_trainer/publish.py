"""The job's deliverable under spec.output.uri, and its manifest.

    adapter_model.safetensors, adapter_config.json   lora / qlora (loads with PeftModel)
    config.json, model.safetensors, ...              full (loads with from_pretrained)
    tokenizer files                                  the tokenizer the run trained with
    merged/                                          output.mergeAdapter: base + adapter merged
    trainer_config.json, metrics.json                the exact config; losses and scores
    eval_report.json, eval_report.md                 base vs fine-tuned (evaluation.py)
    SHA256SUMS                                       written last: `sha256sum -c SHA256SUMS`

Files are staged in a local directory and uploaded together; the manifest goes up only after
every file is stored, so its presence means the output is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch

from kubetune_trainer.storage import MANIFEST_NAME, S3Uri, Storage, UploadedFile, write_manifest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TRAINER_CONFIG_FILE: Final = "trainer_config.json"
METRICS_FILE: Final = "metrics.json"
MERGED_DIR: Final = "merged"
_DTYPE_NAMES: Final = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def original_dtype(model_config: dict[str, Any]) -> torch.dtype | None:
    """The 16-bit dtype the base checkpoint was stored in, if any (config.json dtype)."""
    name = model_config.get("dtype") or model_config.get("torch_dtype")
    return _DTYPE_NAMES.get(str(name))


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_adapter(
    model: torch.nn.Module,
    out_dir: Path,
    base_model_uri: str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """adapter_model.safetensors + adapter_config.json, naming the base model by its URI.
    `state_dict`: the adapter's weights when the model's own are sharded (fsdp)."""
    model.save_pretrained(str(out_dir), state_dict=state_dict)  # type: ignore[operator]
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # peft records the local download path; the URI is what a user can find again.
    config["base_model_name_or_path"] = base_model_uri
    write_json(config_path, config)
    # peft's generated model card only repeats the local path; the eval report is the card.
    (out_dir / "README.md").unlink(missing_ok=True)


def save_full_model(
    model: torch.nn.Module,
    out_dir: Path,
    dtype: torch.dtype | None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Full weights in the base checkpoint's dtype (bf16/fp16), not the fp32 master copy.
    `state_dict`: the whole weights when the model's own are sharded (fsdp; gathered to the
    CPU), saved instead of the model's."""
    if state_dict is not None:
        if dtype is not None:
            state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
        model.save_pretrained(str(out_dir), state_dict=state_dict)  # type: ignore[operator]
        return
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(str(out_dir))  # type: ignore[operator]


def save_merged(
    base_model_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype | None,
    trust_remote_code: bool,
) -> None:
    """Base + adapter merged into plain weights, servable without peft.

    The base is reloaded unquantized on the CPU: merging into 4-bit QLoRA weights would round
    the adapter away, and the CPU keeps GPU memory out of it.
    """
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    base = AutoModelForCausalLM.from_pretrained(
        str(base_model_dir), dtype=dtype or torch.float32, trust_remote_code=trust_remote_code
    )
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def upload_outputs(storage: Storage, local_dir: Path, output_uri: str) -> list[UploadedFile]:
    """Upload everything, then SHA256SUMS; return all files including the manifest."""
    files = storage.upload_dir(local_dir, output_uri)
    manifest = write_manifest(files)
    storage.put_bytes(
        str(S3Uri.parse(output_uri).join(MANIFEST_NAME)), manifest, "text/plain; charset=utf-8"
    )
    entry = UploadedFile(MANIFEST_NAME, len(manifest), hashlib.sha256(manifest).hexdigest())
    log.info("published %d files to %s", len(files) + 1, output_uri)
    return [*files, entry]
