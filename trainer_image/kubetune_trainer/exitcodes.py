"""Exit codes of the trainer: the contract between the trainer and the operator's Job.

The operator's podFailurePolicy fails the Job at once on the "user error" codes (retrying cannot
fix a bad dataset or a missing model) and lets the Job's backoffLimit retry the others. The pod's
termination message carries the one-line reason in every case.
"""

from __future__ import annotations

OK = 0
# Something unexpected (a bug, a crash): retried up to maxRetries.
INTERNAL_ERROR = 1
# The trainer config or spec is invalid for this run (e.g. QLoRA without CUDA).
CONFIG_ERROR = 2
# The dataset is malformed, empty, or has no trainable tokens.
DATA_ERROR = 3
# The model or tokenizer cannot be loaded (missing files, unsupported architecture).
MODEL_ERROR = 4
# Object storage refused or could not find something (credentials, bucket, URI).
STORAGE_ERROR = 5
# Out of GPU/CPU memory inside the trainer (CUDA OOM), with a hint in the message.
OUT_OF_MEMORY = 6
# Stopped by SIGTERM after saving a checkpoint (preemption, node drain): retried, resumes.
PREEMPTED = 143

# Codes that the operator's podFailurePolicy turns into an immediate Job failure.
PERMANENT = (CONFIG_ERROR, DATA_ERROR, MODEL_ERROR, STORAGE_ERROR, OUT_OF_MEMORY)
