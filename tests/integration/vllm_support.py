"""The real vLLM CPU engine for tests: a tiny Llama, a LoRA adapter of it, and the OpenAI server.

- `build_adapter`: a peft LoRA adapter of a model directory with non-zero B weights, so the
  adapter's answers differ from the base model's;
- `VllmServer`: `python -m vllm.entrypoints.openai.api_server` from vLLM's own virtualenv
  (tests/localenv/vllm_env.py builds it once), the model served under a name of our choice,
  LoRA adapters loadable at run time (`load_adapter`, POST /v1/load_lora_adapter), as the
  serving agent loads them. About 90 s to start on 2 cores: start one per test module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from localenv.testing import wait_until
from localenv.vllm_env import ensure

STARTUP_SECONDS = 420.0


def build_adapter(base: Path, directory: Path, rank: int = 8, seed: int = 0) -> Path:
    """A LoRA adapter (q_proj, v_proj) of the model in `base`, saved with save_pretrained."""
    import torch  # noqa: PLC0415 - the heavy imports only where an adapter is built
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")  # fmt: skip
    tuned = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    tuned.save_pretrained(directory)
    return directory


@dataclass
class VllmServer:
    model: Path
    served_name: str
    port: int
    log_path: Path
    max_lora_rank: int = 16
    process: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VllmServer:
        python = ensure()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}  # fmt: skip
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server",
                   "--model", str(self.model), "--served-model-name", self.served_name,
                   "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                   "--port", str(self.port), "--host", "127.0.0.1", "--dtype", "float32",
                   "--gpu-memory-utilization", "0.1", "--max-model-len", "512"]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(self._ready, STARTUP_SECONDS, "vLLM to serve its model", 1.0)
        return self

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.tail()
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                listing = json.load(response)
        except (OSError, ValueError):
            return False
        return self.served_name in [m["id"] for m in listing.get("data", [])]

    def load_adapter(self, name: str, path: Path) -> None:
        """What the serving agent does for each desired adapter."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/load_lora_adapter",
            data=json.dumps({"lora_name": name, "lora_path": str(path)}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = response.read().decode()
        except urllib.error.HTTPError as err:
            raise AssertionError(f"loading {name}: {err.code} {err.read()!r}") from err
        assert "successfully" in answer, answer

    def tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
