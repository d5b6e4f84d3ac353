"""A job's published output, fetched and checked file by file against its SHA256SUMS.

The trainer uploads SHA256SUMS last (kubetune_trainer.publish): its presence means the output
is complete, and it names every file with its SHA-256. Only the files it lists are fetched
(minus the directories a server does not need), into a temporary directory that is renamed
into place once every file matched: a half-fetched or tampered output is never where vLLM
looks, and an unlisted file never gets there.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from kubetune_trainer.storage import (
    MANIFEST_NAME,
    Storage,
    StorageError,
    parse_manifest,
    sha256_file,
    uri_scheme,
)

# Never needed to serve: checkpoints and the training log (not listed anyway), and for an
# adapter the merged full model (output.mergeAdapter), which would dwarf the adapter.
SKIP_FOR_MODEL: Final = ("checkpoints/", ".kubetune/")
SKIP_FOR_ADAPTER: Final = (*SKIP_FOR_MODEL, "merged/")
# What vLLM needs to load a LoRA adapter, and a full model.
ADAPTER_FILES: Final = (
    ("adapter_config.json",),
    ("adapter_model.safetensors", "adapter_model.bin"),
)
MODEL_FILES: Final = (("config.json",),)


class PublishedError(Exception):
    """The output cannot be served as published; `reason` is CamelCase."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(" ".join(message.split()))
        self.reason = reason


@dataclass(frozen=True)
class Manifest:
    uri: str  # of SHA256SUMS
    sha256: str  # of SHA256SUMS itself: identifies one publication of the output
    data: bytes
    files: dict[str, str]  # path -> sha256

    def selected(self, skip: Iterable[str]) -> dict[str, str]:
        prefixes = tuple(skip)
        return {rel: d for rel, d in self.files.items() if not rel.startswith(prefixes)}


def join(uri: str, rel: str) -> str:
    return uri.rstrip("/") + "/" + rel


def read_manifest(storage: Storage, uri: str) -> Manifest:
    """SHA256SUMS under the output prefix `uri` (s3://, pvc://, file:// or a path)."""
    manifest_uri = join(uri, MANIFEST_NAME)
    try:
        if uri_scheme(manifest_uri) == "s3":
            data = storage.read_bytes(manifest_uri)
        else:  # resolves in place
            data = storage.fetch(manifest_uri, "/nonexistent").read_bytes()
    except StorageError as exc:
        if exc.reason != "StorageNotFound":
            raise
        raise PublishedError(
            f"{manifest_uri} does not exist: the output is incomplete (the trainer writes "
            "SHA256SUMS last, after every other file) or is not a kubetune job's output",
            reason="ManifestMissing",
        ) from exc
    except OSError as exc:
        raise PublishedError(
            f"cannot read {manifest_uri}: {exc}", reason="ManifestMissing"
        ) from exc
    try:
        files = parse_manifest(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PublishedError(
            f"{manifest_uri} is not a SHA256SUMS manifest: {exc}", reason="ManifestInvalid"
        ) from exc
    return Manifest(manifest_uri, hashlib.sha256(data).hexdigest(), data, files)


def check_listed(manifest: Manifest, required: Iterable[tuple[str, ...]], what: str) -> None:
    """Refuse an output whose manifest lacks a file the server needs."""
    missing = [" or ".join(names) for names in required if not set(names) & set(manifest.files)]
    if missing:
        raise PublishedError(
            f"{manifest.uri} lists no {', '.join(missing)}: the output is not {what}",
            reason="NotServable",
        )


def verify_files(root: Path, expected: Mapping[str, str]) -> None:
    """Every listed file under `root` has its listed SHA-256; else name the files that do not."""
    problems = []
    for rel, digest in sorted(expected.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        actual = sha256_file(path)
        if actual != digest:
            problems.append(f"{rel} has SHA-256 {actual[:12]}…, SHA256SUMS lists {digest[:12]}…")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PublishedError(
            f"checksum mismatch: {'; '.join(problems[:5])}{more}. The file changed after the "
            "job published it: restore it or run the job again",
            reason="ChecksumMismatch",
        )


def _relpath(rel: str, manifest_uri: str) -> PurePosixPath:
    path = PurePosixPath(rel)
    if path.is_absolute() or not path.parts or ".." in path.parts:
        raise PublishedError(
            f"{manifest_uri} lists {rel!r}, which is not a path inside the output",
            reason="ManifestInvalid",
        )
    return path


def fetch_files(
    storage: Storage,
    uri: str,
    manifest: Manifest,
    dest: Path,
    *,
    skip: Iterable[str] = SKIP_FOR_MODEL,
    workers: int = 4,
) -> int:
    """Fetch the files `manifest` lists under `uri` (those under `skip` aside) into `dest`,
    check each, write the manifest beside them, then rename the directory to `dest` (replacing
    it). Returns the number of files."""
    selected = manifest.selected(skip)
    paths = {rel: _relpath(rel, manifest.uri) for rel in selected}
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.partial")
    partial.mkdir(parents=True)
    try:
        if uri_scheme(uri) == "s3":

            def fetch(rel: str) -> None:
                try:
                    storage.fetch(join(uri, rel), partial / paths[rel].parent)
                except StorageError as exc:
                    if exc.reason != "StorageNotFound":
                        raise  # else verify_files names it as missing

        else:
            root = storage.fetch(uri, partial)  # a local directory, resolved in place

            def fetch(rel: str) -> None:
                source, target = root / paths[rel], partial / paths[rel]
                if source.is_file():  # else verify_files names it as missing
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(selected)))) as pool:
            list(pool.map(fetch, selected))
        verify_files(partial, selected)
        (partial / MANIFEST_NAME).write_bytes(manifest.data)
        if dest.exists():
            shutil.rmtree(dest)
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return len(selected)
