"""`hide_bitsandbytes`: lora and full runs skip the bitsandbytes import peft would make.

Each case runs in a fresh interpreter: the effect is process-wide by design (one job per
process), so it must not leak into the test session.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import importlib.util, sys
from kubetune_trainer.__main__ import hide_bitsandbytes
from kubetune_trainer.api import FineTuneSpec
spec = FineTuneSpec.model_validate({
    "baseModel": {"uri": "s3://models/llama"},
    "dataset": {"trainUri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/run"},
    "method": sys.argv[1],
})
hide_bitsandbytes(spec)
from peft.import_utils import is_bnb_available  # what peft checks before importing it
print(importlib.util.find_spec("bitsandbytes") is not None, is_bnb_available())
"""


def probe(method: str) -> list[str]:
    """[importlib finds it, peft sees it] after hide_bitsandbytes (transformers and accelerate
    check with importlib.util.find_spec too)."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, method],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[-2:]


def test_lora_sees_no_bitsandbytes() -> None:
    assert probe("lora") == ["False", "False"]  # full: the same branch (method != qlora)


def test_qlora_keeps_bitsandbytes_as_installed() -> None:
    import importlib.util  # noqa: PLC0415

    installed = str(importlib.util.find_spec("bitsandbytes") is not None)
    assert probe("qlora") == [installed, installed]
