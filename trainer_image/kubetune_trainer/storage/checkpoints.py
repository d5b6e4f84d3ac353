"""Checkpoints in the object store: published whole (the _COMPLETE marker written last, listing
every file with its size and SHA-256), found, verified, fetched and pruned.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune_trainer.storage.checksums import (
    UploadedFile,
    sha256_file,
)
from kubetune_trainer.storage.client import (
    ObjectStore,
    _retried,
)
from kubetune_trainer.storage.errors import (
    StorageError,
)
from kubetune_trainer.storage.uris import (
    _STEP_DIR_RE,
    CHECKPOINTS_DIR,
    COMPLETE_MARKER,
    S3Uri,
    checkpoint_uri,
)

if TYPE_CHECKING:
    pass


log = logging.getLogger("kubetune_trainer.storage")  # one logger for the package


class Storage(ObjectStore):
    """S3-compatible storage plus the local URI schemes, with a download cache, and the
    checkpoints of an output. Thread-safe: one instance may serve several threads."""

    # ------------------------------------------------------------------------- checkpoints

    @_retried
    def publish_checkpoint(
        self,
        local_dir: str | os.PathLike[str],
        output_uri: str,
        step: int,
        *,
        owner: str | None = None,
        extra_files: Sequence[UploadedFile] = (),
        clear: bool = True,
    ) -> str:
        """Upload a checkpoint to <output>/checkpoints/step-<9 digits>/ and return its URI.

        The _COMPLETE marker (JSON: step, the owner (the FineTuneJob's uid) and every file's
        size and SHA-256) is written last, after all files are stored: a pod killed mid-upload
        leaves a prefix without a marker, which complete_checkpoints ignores.

        `extra_files`: files other processes already uploaded there (fsdp shards), which the
        marker vouches for too; they cleared the prefix first (`clear_checkpoint`, then
        `clear=False` here).
        """
        if (Path(local_dir) / COMPLETE_MARKER).exists():
            raise StorageError(
                f"{local_dir} contains a file named {COMPLETE_MARKER}, reserved for the marker",
                uri=output_uri,
                reason="StorageLocalError",
            )
        uri = checkpoint_uri(output_uri, step)
        marker = S3Uri.parse(uri).join(COMPLETE_MARKER)
        if clear:
            self.clear_checkpoint(output_uri, step)
        files = sorted([*self.upload_dir(local_dir, uri), *extra_files], key=lambda f: f.path)
        self.put_json(
            str(marker),
            {
                "step": step,
                "owner": owner,
                "createdAt": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
            },
        )
        return uri

    def clear_checkpoint(self, output_uri: str, step: int) -> None:
        """Delete what a previous attempt at this step left (or even a marker vouching for
        other files): the marker first, then the rest, so no mix is ever "complete"."""
        uri = checkpoint_uri(output_uri, step)
        ckpt = S3Uri.parse(uri)
        marker = ckpt.join(COMPLETE_MARKER)
        stale = [o["Key"] for o in self._list_raw(ckpt.bucket, ckpt.key, uri)]
        if marker.key in stale:
            self._delete_keys(ckpt.bucket, [marker.key], uri)
        self._delete_keys(ckpt.bucket, [k for k in stale if k != marker.key], uri)

    def _scan_checkpoints(self, output_uri: str) -> dict[int, _Checkpoint]:
        base = S3Uri.parse(output_uri).join(CHECKPOINTS_DIR + "/")
        found: dict[int, _Checkpoint] = {}
        for obj in self._list_raw(base.bucket, base.key, str(base)):
            dirname, _, rest = obj["Key"][len(base.key) :].partition("/")
            match = _STEP_DIR_RE.fullmatch(dirname)
            if not match or not rest:
                continue
            step = int(match.group(1))
            ckpt = found.setdefault(step, _Checkpoint(step, str(base.join(dirname + "/"))))
            ckpt.sizes[rest] = int(obj["Size"])
        return found

    def _vouched(self, ckpt: _Checkpoint, owner: str | None = None) -> bool:
        """Whether the checkpoint's marker exists, names its step (and `owner`, when given),
        and lists files that all exist with the recorded sizes (one GET; the sizes come from
        the listing)."""
        if COMPLETE_MARKER not in ckpt.sizes:
            return False
        marker_uri = str(S3Uri.parse(ckpt.uri).join(COMPLETE_MARKER))
        try:
            marker = json.loads(self.read_bytes(marker_uri))
            files = {str(f["path"]): int(f["size"]) for f in marker["files"]}
            if owner is not None and marker.get("owner") != owner:
                log.warning(
                    "ignoring checkpoint %s: written by another job (owner %s, not %s)",
                    ckpt.uri,
                    marker.get("owner"),
                    owner,
                )
                return False
            valid = marker["step"] == ckpt.step and all(
                ckpt.sizes.get(path) == size for path, size in files.items()
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring checkpoint %s: unreadable marker (%s)", ckpt.uri, exc)
            return False
        except StorageError as exc:
            if exc.reason != "StorageNotFound":  # else: pruned between listing and reading
                raise
            return False
        if not valid:
            log.warning("ignoring checkpoint %s: its marker does not match its files", ckpt.uri)
        return bool(valid)

    @_retried
    def complete_checkpoints(
        self, output_uri: str, owner: str | None = None
    ) -> builtins.list[tuple[int, str]]:
        """(step, uri) of every checkpoint whose _COMPLETE marker vouches for its files (and
        names `owner`, when given), newest first. Prefixes without a marker (killed uploads)
        never qualify, nor do another job's checkpoints."""
        found = sorted(self._scan_checkpoints(output_uri).values(), key=lambda c: -c.step)
        return [(c.step, c.uri) for c in found if self._vouched(c, owner)]

    def latest_complete_checkpoint(
        self, output_uri: str, owner: str | None = None
    ) -> tuple[int, str] | None:
        """The newest of complete_checkpoints, or None."""
        return next(iter(self.complete_checkpoints(output_uri, owner)), None)

    @_retried
    def fetch_checkpoint(self, uri: str, dest: str | os.PathLike[str]) -> Path:
        """Download a complete checkpoint and check every file against the SHA-256 its
        _COMPLETE marker recorded (sizes alone miss a corrupted or replaced file): a
        StorageError with reason StorageChecksumMismatch names the files that differ."""
        local = self.fetch(uri, dest)
        try:
            marker = json.loads((local / COMPLETE_MARKER).read_bytes())
            expected = {str(f["path"]): str(f["sha256"]) for f in marker["files"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StorageError(
                f"{uri}: unreadable {COMPLETE_MARKER} marker ({exc})",
                uri=uri,
                reason="StorageChecksumMismatch",
            ) from exc
        bad = [
            path
            for path, digest in sorted(expected.items())
            if not (local / path).is_file() or sha256_file(local / path) != digest
        ]
        if bad:
            raise StorageError(
                f"{uri}: {', '.join(bad[:5])} do(es) not match the SHA-256 in its "
                f"{COMPLETE_MARKER} marker",
                uri=uri,
                reason="StorageChecksumMismatch",
            )
        return local

    @_retried
    def prune_checkpoints(
        self, output_uri: str, keep: int, owner: str | None = None
    ) -> builtins.list[int]:
        """Keep the newest `keep` complete checkpoints; delete older ones and incomplete ones
        below the newest complete step (leftovers of killed pods). Returns deleted steps.

        Incomplete checkpoints above the newest complete one are left alone: they may be an
        upload in progress. Each marker is deleted before its files, so an interrupted prune
        leaves an incomplete checkpoint, never a complete-looking partial one.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1: resuming needs a checkpoint")
        found = self._scan_checkpoints(output_uri)
        steps = sorted(found, reverse=True)
        complete = [s for s in steps if self._vouched(found[s], owner)]
        if not complete:
            return []
        doomed = complete[keep:] + [s for s in steps if s not in complete and s < complete[0]]
        for step in sorted(doomed):
            ckpt = S3Uri.parse(found[step].uri)
            keys = [ckpt.join(rel).key for rel in found[step].sizes]
            marker = ckpt.join(COMPLETE_MARKER).key
            if marker in keys:
                self._delete_keys(ckpt.bucket, [marker], found[step].uri)
                keys.remove(marker)
            self._delete_keys(ckpt.bucket, keys, found[step].uri)
        return sorted(doomed)


@dataclass
class _Checkpoint:
    step: int
    uri: str
    sizes: dict[str, int] = field(default_factory=dict)  # path below the step dir -> size
