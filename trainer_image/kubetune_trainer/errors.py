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
    where there was nothing new to save). `by_peer`: another process of the gang got the
    SIGTERM, and this one stopped with it at the same step."""

    def __init__(
        self, step: int | None, checkpoint_uri: str | None = None, *, by_peer: bool = False
    ) -> None:
        where = f"checkpoint of step {step} at {checkpoint_uri}" if checkpoint_uri else None
        cause = "a peer process got SIGTERM" if by_peer else "SIGTERM"
        super().__init__(
            f"stopped by {cause}; resumes from the {where}"
            if where
            else f"stopped by {cause} outside the training loop; the next attempt resumes from "
            "the last checkpoint, if there is one"
        )
        self.step = step
        self.checkpoint_uri = checkpoint_uri
        self.by_peer = by_peer


class OutputExists(Exception):
    """spec.output.uri holds files this FineTuneJob did not write, and output.overwrite is
    false: nothing is overwritten, and no other job's checkpoint is resumed."""
