"""URIs: s3:// parsing, and the schemes that resolve to a local path in place (pvc://, hf://,
file:// and plain paths); where a checkpoint lives.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final

from kubetune_trainer.config import PVC_ROOT
from kubetune_trainer.storage.errors import (
    StorageError,
)

if TYPE_CHECKING:
    pass


CHECKPOINTS_DIR: Final = "checkpoints"
COMPLETE_MARKER: Final = "_COMPLETE"
MANIFEST_NAME: Final = "SHA256SUMS"

_BUCKET_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_STEP_DIR_RE: Final = re.compile(r"step-([0-9]+)")
_COMMIT_RE: Final = re.compile(r"[0-9a-f]{40}")
_HF_REPO_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


# ------------------------------------------------------------------------------------------ URIs


@dataclass(frozen=True)
class S3Uri:
    """s3://bucket/key. An empty key or one ending in '/' names a prefix."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise StorageError(f"{uri!r} is not an s3:// URI", uri=uri, reason="StorageInvalidUri")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not _BUCKET_RE.fullmatch(bucket):
            raise StorageError(
                f"{uri}: {bucket!r} is not a valid bucket name (3-63 characters: a-z, 0-9, '.' "
                "and '-')",
                uri=uri,
                reason="StorageInvalidUri",
            )
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def join(self, *parts: str) -> S3Uri:
        """Append path parts below this URI's key, as a directory ("a" + "b" -> "a/b")."""
        key = self.key
        for raw in parts:
            part = raw.lstrip("/")
            key = f"{key.rstrip('/')}/{part}" if key else part
        return S3Uri(self.bucket, key)

    @property
    def dir_prefix(self) -> str:
        """The key as a directory prefix: '' for the bucket root, else ending in '/'."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"


def uri_scheme(uri: str) -> str:
    """'s3', 'pvc', 'hf', 'file', or 'local' for a plain path."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return "local"
    if scheme in {"s3", "pvc", "hf", "file"}:
        return scheme
    raise StorageError(
        f"{uri}: unsupported scheme {scheme!r}: use s3://, pvc://, hf:// or a local path",
        uri=uri,
        reason="StorageInvalidUri",
    )


def _within(root: Path, rel: str, uri: str) -> Path:
    """root/rel, refusing '..' escapes (a URI must not reach outside its claim)."""
    target = Path(os.path.normpath(root / rel.lstrip("/")))
    if target != root and root not in target.parents:
        raise StorageError(f"{uri}: path escapes {root}", uri=uri, reason="StorageInvalidUri")
    return target


def resolve_pvc(uri: str, pvc_root: str | os.PathLike[str] = PVC_ROOT) -> Path:
    """pvc://claim/path -> PVC_ROOT/claim/path, which must exist (nothing is copied)."""
    if not uri.startswith("pvc://"):
        raise StorageError(f"{uri!r} is not a pvc:// URI", uri=uri, reason="StorageInvalidUri")
    claim, _, rel = uri[len("pvc://") :].partition("/")
    if not claim:
        raise StorageError(f"{uri}: no claim name", uri=uri, reason="StorageInvalidUri")
    mount = Path(os.path.normpath(Path(pvc_root) / claim))
    target = _within(mount, rel, uri)
    if not mount.is_dir():
        raise StorageError(
            f"{uri}: claim {claim!r} is not mounted at {mount}: check that the "
            "PersistentVolumeClaim exists in the job's namespace",
            uri=uri,
            reason="StorageNotFound",
        )
    if not target.exists():
        raise StorageError(
            f"{uri}: {target} does not exist on claim {claim!r}",
            uri=uri,
            reason="StorageNotFound",
        )
    return target


def resolve_local(uri: str) -> Path:
    """A plain path or file:// URI (workstation runs), which must exist."""
    path = Path(uri[len("file://") :] if uri.startswith("file://") else uri).expanduser()
    if not path.exists():
        raise StorageError(f"{uri}: no such file or directory", uri=uri, reason="StorageNotFound")
    return path


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, as huggingface_hub resolves it (HF_HUB_CACHE,
    HF_HOME, XDG_CACHE_HOME)."""
    from huggingface_hub import constants  # noqa: PLC0415 - only for hf:// URIs

    return Path(constants.HF_HUB_CACHE)


def resolve_hf(
    uri: str, revision: str | None = None, hub_cache: str | os.PathLike[str] | None = None
) -> Path:
    """hf://org/name -> its snapshot in the offline Hugging Face cache; never a network call.

    huggingface_hub's own lookup (snapshot_download with local_files_only): refs, commits and
    the cache layout are the library's, not a copy of them. The pod has no business reaching
    the Hub (air-gapped clusters, unpinned weights), so a model missing from the cache is an
    error that says how to provide it.
    """
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only for hf:// URIs
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError  # noqa: PLC0415

    repo = uri.removeprefix("hf://").strip("/")
    if not uri.startswith("hf://") or not _HF_REPO_RE.fullmatch(repo):
        raise StorageError(
            f"{uri!r} is not an hf://org/name URI", uri=uri, reason="StorageInvalidUri"
        )
    cache = Path(hub_cache) if hub_cache is not None else hf_hub_cache()
    rev = revision or "main"
    try:
        return Path(snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True))
    except HFValidationError as exc:
        raise StorageError(
            f"{uri!r} is not an hf://org/name URI: {exc}", uri=uri, reason="StorageInvalidUri"
        ) from None
    except LocalEntryNotFoundError:
        raise StorageError(
            f"{uri} (revision {rev}) is not in the offline Hugging Face cache at {cache}: the "
            "trainer never downloads from the Hub; pre-populate the cache in the image or a "
            f"volume (HF_HOME=<dir> huggingface-cli download {repo} --revision {rev}) or copy "
            "the model to S3 and use an s3:// URI",
            uri=uri,
            reason="StorageNotFound",
        ) from None


def _safe_relpath(rel: str, uri: str) -> PurePosixPath:
    """An object's path below the fetched prefix, as a safe relative local path."""
    path = PurePosixPath(rel.lstrip("/"))
    # A key like "data/../../etc/x" must not write outside the destination directory.
    if not path.parts or ".." in path.parts:
        raise StorageError(
            f"{uri}: object key {rel!r} cannot be stored as a local file",
            uri=uri,
            reason="StorageInvalidUri",
        )
    return path


def checkpoint_uri(output_uri: str, step: int) -> str:
    """<output>/checkpoints/step-<9 digits>/ (zero-padded so listings sort by step)."""
    return str(S3Uri.parse(output_uri).join(CHECKPOINTS_DIR, f"step-{step:09d}/"))
