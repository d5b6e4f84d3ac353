"""The real vLLM CPU engine for tests and benchmarks: LoRA adapters of a tiny Llama, and the
OpenAI server (the one helper for test_openai_serving.py, test_serving_agent.py and
benchmarks/serving.py).

- `build_adapter`: a peft LoRA adapter of a model directory with non-zero B weights, so the
  adapter's answers differ from the base model's; saved with save_pretrained, or by `save`
  (the serving agent's tests save it as the trainer does);
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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localenv.testing import wait_until
from localenv.vllm_env import ensure

if TYPE_CHECKING:
    import openai

STARTUP_SECONDS = 420.0


def build_adapter(
    base: Path,
    directory: Path,
    rank: int = 8,
    seed: int = 0,
    *,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    save: Callable[[Any, Path], None] | None = None,
) -> Path:
    """A LoRA adapter (alpha 2 x rank) of the model in `base` on `targets`, its B weights drawn
    from `seed`, written by `save(peft_model, directory)` (default: save_pretrained)."""
    import torch  # noqa: PLC0415 - the heavy imports only where an adapter is built
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                        task_type="CAUSAL_LM")  # fmt: skip
    tuned = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapter would change nothing
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    if save is None:
        tuned.save_pretrained(directory)
    else:
        save(tuned, directory)
    return directory


@dataclass
class VllmServer:
    model: Path
    served_name: str
    port: int
    log_path: Path
    max_lora_rank: int = 16
    max_loras: int | None = None  # vLLM's default (1) unless set
    process: subprocess.Popen[bytes] | None = field(default=None)
    startup_s: float = 0.0  # start to serving the model, set by start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> VllmServer:
        python = ensure()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server",
                   "--model", str(self.model), "--served-model-name", self.served_name,
                   "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                   *(["--max-loras", str(self.max_loras)] if self.max_loras else []),
                   "--port", str(self.port), "--host", "127.0.0.1", "--dtype", "float32",
                   "--gpu-memory-utilization", "0.1", "--max-model-len", "512"]  # fmt: skip
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_until(self._ready, STARTUP_SECONDS, "vLLM to serve its model", 1.0)
        self.startup_s = time.monotonic() - started
        return self

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, self.tail()
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                listing = json.load(response)
        except (OSError, ValueError):
            return False
        return self.served_name in [m["id"] for m in listing.get("data", [])]

    def client(self) -> openai.OpenAI:
        """The official openai client, straight to this server (no retries)."""
        import openai  # noqa: PLC0415

        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0)

    def adapters(self) -> dict[str, str]:
        """The LoRA adapters loaded now: name -> path (vLLM's model cards with a parent)."""
        with urllib.request.urlopen(f"{self.base_url}/models", timeout=10) as response:
            cards = json.load(response)["data"]
        return {c["id"]: c["root"] for c in cards if c.get("parent")}

    def load_adapter(self, name: str, path: Path) -> None:
        """What the serving agent does for each desired adapter."""
        request = urllib.request.Request(
            f"{self.base_url}/load_lora_adapter",
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
