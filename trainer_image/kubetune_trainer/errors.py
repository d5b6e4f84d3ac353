"""Exceptions that name a failure class; `__main__` maps each to an exit code (exitcodes.py).

DatasetError (data.records) and StorageError (storage) are the other two classes; anything else
is an internal error. Messages are written for the user: they end up, on one line, in the pod's
termination message and from there in the FineTuneJob's status.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The run cannot work with this spec on this machine (e.g. QLoRA without a CUDA GPU)."""


class ModelError(Exception):
    """The base model or tokenizer cannot be loaded or does not fit the data."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of `step` was published (None: outside the training loop,
    where there was nothing new to save)."""

    def __init__(self, step: int | None, checkpoint_uri: str | None = None) -> None:
        where = f"checkpoint of step {step} at {checkpoint_uri}" if checkpoint_uri else None
        super().__init__(
            f"stopped by SIGTERM; resumes from the {where}"
            if where
            else "stopped by SIGTERM outside the training loop; the next attempt resumes from "
            "the last checkpoint, if there is one"
        )
        self.step = step
        self.checkpoint_uri = checkpoint_uri


class OutputExists(Exception):
    """spec.output.uri holds files this FineTuneJob did not write, and output.overwrite is
    false: nothing is overwritten, and no other job's checkpoint is resumed."""
