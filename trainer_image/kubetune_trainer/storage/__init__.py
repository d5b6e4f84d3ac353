"""Object storage for the trainer: pull inputs, push outputs and checkpoints.

Inputs come as URIs (kubetune_trainer.api): s3://bucket/key from any S3-compatible store,
pvc://claim/path from a mounted PersistentVolumeClaim, hf://org/name from the offline Hugging
Face cache, and plain paths or file:// URIs for runs on a workstation. Only s3:// is copied;
the others resolve to a local path in place.

Credentials reach the pod as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables
(secretKeyRef); endpoint, region and addressing style come from spec.storage. Every failure is a
StorageError with a one-line message that names the URI and what to check, never a credential.

Downloads run several objects at once (a thread pool over objects) through one s3transfer
manager, which also splits large objects into parallel ranged GETs. Each object lands in a
local cache keyed by its ETag and size, then is hard-linked into place: a retried pod on the
same volume, or a second fetch of unchanged data, downloads nothing.

One module per concern: errors (StorageError and what is retried), uris (s3:// and the local
schemes, hf:// through huggingface_hub's offline cache lookup), checksums (SHA256SUMS), client
(ObjectStore: transfers, cache, retries) and checkpoints (Storage: ObjectStore plus the
checkpoints of an output). Everything is imported from here.
"""

from __future__ import annotations

from kubetune_trainer.storage.checkpoints import (
    Storage,
)
from kubetune_trainer.storage.checksums import (
    UploadedFile,
    parse_manifest,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from kubetune_trainer.storage.client import (
    CACHE_DIR_ENV,
    MiB,
    ObjectInfo,
    ObjectStore,
    TransferStats,
    _check_distinct,
    check_credentials,
)
from kubetune_trainer.storage.errors import (
    RETRIED_REASONS,
    StorageError,
    storage_error,
)
from kubetune_trainer.storage.uris import (
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    MANIFEST_NAME,
    S3Uri,
    _safe_relpath,
    checkpoint_uri,
    hf_hub_cache,
    resolve_hf,
    resolve_local,
    resolve_pvc,
    uri_scheme,
)

__all__ = [
    "CACHE_DIR_ENV",
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "MANIFEST_NAME",
    "RETRIED_REASONS",
    "MiB",
    "ObjectInfo",
    "ObjectStore",
    "S3Uri",
    "Storage",
    "StorageError",
    "TransferStats",
    "UploadedFile",
    "_check_distinct",
    "_safe_relpath",
    "check_credentials",
    "checkpoint_uri",
    "hf_hub_cache",
    "parse_manifest",
    "resolve_hf",
    "resolve_local",
    "resolve_pvc",
    "sha256_file",
    "storage_error",
    "uri_scheme",
    "verify_manifest",
    "write_manifest",
]
