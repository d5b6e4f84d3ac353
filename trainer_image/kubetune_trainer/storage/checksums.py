"""Checksums: SHA-256 of files and the SHA256SUMS manifest published with every output."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from kubetune_trainer.api import OutputFile
from kubetune_trainer.storage.errors import (
    StorageError,
)

if TYPE_CHECKING:
    pass


_MANIFEST_LINE_RE: Final = re.compile(r"([0-9a-f]{64}) [ *](.+)")


# -------------------------------------------------------------------------------- checksums


@dataclass(frozen=True)
class UploadedFile:
    """One uploaded file: its path relative to the upload root, size and SHA-256."""

    path: str
    size: int
    sha256: str

    def to_output_file(self) -> OutputFile:
        return OutputFile(path=self.path, size=self.size, sha256=self.sha256)


def sha256_file(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(files: Iterable[UploadedFile]) -> bytes:
    """A SHA256SUMS manifest ("<sha256>  <path>" lines, sorted), checkable with `sha256sum -c`."""
    lines = []
    for f in sorted(files, key=lambda f: f.path):
        if "\n" in f.path or "\r" in f.path or "\\" in f.path:
            # sha256sum would need its escaping syntax; no trainer output has such names.
            raise ValueError(f"cannot list {f.path!r} in a manifest")
        lines.append(f"{f.sha256}  {f.path}\n")
    return "".join(lines).encode("utf-8")


def parse_manifest(data: bytes) -> dict[str, str]:
    """path -> sha256 from a SHA256SUMS manifest (text ' ' or binary '*' mode lines)."""
    out: dict[str, str] = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE_RE.fullmatch(line)
        if not match:
            raise ValueError(f"manifest line {number} is not '<sha256>  <path>': {line[:80]!r}")
        out[match.group(2)] = match.group(1)
    return out


def verify_manifest(manifest: bytes, root: str | os.PathLike[str]) -> int:
    """Check every file listed in `manifest` under `root`; return how many were verified.

    Raises StorageError naming up to five missing or mismatching files.
    """
    base = Path(root)
    problems: list[str] = []
    expected = parse_manifest(manifest)
    for rel, digest in expected.items():
        path = base / rel
        if not path.is_file():
            problems.append(f"{rel} missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel} checksum mismatch")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise StorageError(
            f"{base} does not match its manifest: {', '.join(problems[:5])}{more}",
            uri=str(base),
            reason="StorageChecksumMismatch",
        )
    return len(expected)
