"""Exit codes of `kubetune-trainer`, shared by the trainer (which exits with them) and the operator.

The operator's Job has a podFailurePolicy that fails the whole Job at once on PERMANENT codes:
retrying a pod cannot fix a bad config, a malformed dataset or a model that does not fit, it only
burns GPU hours. Any other non-zero exit (a crash, a lost connection, SIGKILL) is retried up to
spec.maxRetries, resuming from the last checkpoint. Before exiting with a permanent code, the
trainer writes one line a user can act on (what is wrong, where) as the first line of its
termination message.

Values follow BSD sysexits(3) where one fits, and stay below 128, so they never collide with
Python's 1 (uncaught exception) and 2 (argparse usage), or with 128+N (killed by signal N, such
as 137 for SIGKILL/OOMKilled).

Pure constants: imported by the operator image, which has no torch.
"""

from typing import Final

OK: Final = 0
# The pods of a multi-node job could not meet: the first pod's rendezvous address did not answer
# within the rendezvous timeout (a peer not scheduled, a NetworkPolicy, DNS). Retried, with a
# reason of its own. (EX_UNAVAILABLE)
RENDEZVOUS_FAILED: Final = 69
# The data is malformed: a record without the fields its format needs, an empty dataset, a
# dataset format that cannot be detected, no trainable tokens left. (EX_DATAERR)
DATA_ERROR: Final = 65
# An input does not exist: base model, tokenizer or dataset URI not found. (EX_NOINPUT)
INPUT_NOT_FOUND: Final = 66
# Something unexpected inside the trainer (a bug): retried. (EX_SOFTWARE)
INTERNAL_ERROR: Final = 70
# spec.output.uri holds files this FineTuneJob did not write (another job's output or
# checkpoints) and output.overwrite is false. (EX_CANTCREAT)
OUTPUT_EXISTS: Final = 73
# A process of a data-parallel gang stopped because a peer did: its connection to the others
# broke, or another pod was preempted and the gang stopped together at a checkpoint. Not this
# pod's fault: the Job ignores it (no retry used up) and replaces the pod; the peer that failed
# first carries the real exit code. (EX_PROTOCOL)
PEER_LOST: Final = 76
# The object store stayed unreachable, failing (5xx) or throttling for spec.storage.retryTimeout:
# retried (another pod, maybe on another node, may reach it). (EX_TEMPFAIL)
STORAGE_UNREACHABLE: Final = 75
# Object storage refused access (credentials, bucket policy, wrong endpoint). (EX_NOPERM)
STORAGE_ERROR: Final = 77
# The configuration cannot work: an unsupported config version, a model the method cannot train
# (e.g. QLoRA without a GPU), contradicting settings the schema could not catch. (EX_CONFIG)
CONFIG_ERROR: Final = 78
# The model or tokenizer files exist but cannot be loaded (unsupported architecture, corrupt
# weights, remote code needed but trustRemoteCode is false).
MODEL_ERROR: Final = 79
# The trainer ran out of GPU (or host) memory itself and says how to fit (qlora, smaller
# batchSize or maxSeqLength, gradient checkpointing). A kernel OOM kill is 137 instead.
OUT_OF_MEMORY: Final = 80
# Stopped by SIGTERM after saving a checkpoint (preemption, node drain): retried, and resumes.
PREEMPTED: Final = 143

# Exit codes that mean "do not retry"; the operator fails the Job on the first one.
PERMANENT: Final = (
    DATA_ERROR,
    INPUT_NOT_FOUND,
    OUTPUT_EXISTS,
    STORAGE_ERROR,
    CONFIG_ERROR,
    MODEL_ERROR,
    OUT_OF_MEMORY,
)

# The CamelCase reason the operator reports in status.reason for each permanent exit code.
REASONS: Final = {
    DATA_ERROR: "DataError",
    INPUT_NOT_FOUND: "InputNotFound",
    OUTPUT_EXISTS: "OutputExists",
    STORAGE_ERROR: "StorageAccessDenied",
    CONFIG_ERROR: "ConfigError",
    MODEL_ERROR: "ModelLoadError",
    OUT_OF_MEMORY: "OutOfMemory",
}

# Retried exit codes with a reason of their own: a Retrying message names it, and a job that
# runs out of retries fails with it instead of the generic BackoffLimitExceeded.
RETRIED_REASONS: Final = {
    RENDEZVOUS_FAILED: "RendezvousFailed",
    STORAGE_UNREACHABLE: "StorageUnreachable",
}

# Exit codes the Job does not count as failures (podFailurePolicy Ignore), like a disruption.
IGNORED: Final = (PEER_LOST,)
