"""The trainer's input: one versioned document, shared by the operator and the trainer.

The operator renders it from a FineTuneJob into a ConfigMap (mounted at CONFIG_PATH in the pod);
a user debugging a run on a workstation writes the same JSON by hand and runs
`python -m kubetune_trainer --config run.json`. The spec inside is the FineTuneJob's spec with
every default applied (and the operator's defaults, such as the storage endpoint, filled in), so
the trainer never guesses a setting the user did not see in `kubectl get ftj -o yaml`.

Only pydantic and the standard library are imported here: the operator image has no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune_trainer.api import FineTuneSpec

TRAINER_CONFIG_KIND = "TrainerConfig"
# Where the operator mounts the config, and the key in its ConfigMap.
CONFIG_DIR = "/etc/kubetune"
CONFIG_KEY = "config.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
# Scratch space for downloads, checkpoints and outputs (an emptyDir in the pod).
WORK_DIR = "/workspace"
# PersistentVolumeClaims named in pvc:// URIs are mounted at PVC_ROOT/<claim>.
PVC_ROOT = "/mnt/pvc"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class JobIdentity(_Model):
    """The FineTuneJob whose status the trainer reports into."""

    namespace: str = Field(description="Namespace of the FineTuneJob.")
    name: str = Field(description="Name of the FineTuneJob.")
    uid: str = Field(description="UID of the FineTuneJob, so a re-created job is never patched.")


class TrainerConfig(_Model):
    """Everything the trainer needs to run one fine-tuning job."""

    api_version: Literal["kubetune.dev/v1alpha1"] = "kubetune.dev/v1alpha1"
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    job: JobIdentity | None = Field(
        default=None,
        description="Report status into this FineTuneJob; absent for a standalone run (logs only).",
    )
    spec: FineTuneSpec = Field(description="The effective FineTuneJob spec, defaults applied.")
    work_dir: str = Field(default=WORK_DIR, description="Local scratch directory.")
