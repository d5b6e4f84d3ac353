"""Keep credentials out of everything the trainer writes: logs, the termination message (which
becomes status.message and Events), error messages.

Exact-value replacement is not enough: an exception may quote a credential the way Python or a
library prints it, not as it is. A key id that ends in a newline shows up in botocore's
"Invalid header value b'AWS4-HMAC-SHA256 Credential=AKIA...\\n/...'" as the characters
backslash and n; JSON escapes it as \\n too, URLs percent-encode it, and a stripped copy has no
newline at all. `Redactor` replaces every such spelling of every secret, longest first.

`install` wraps the process's stdout and stderr, so log lines, tracebacks printed by the logging
module or by Python itself, and warnings all pass through it; messages built for the status are
passed through `redact` explicitly.

Only the standard library: imported before anything else in the trainer.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Final, TextIO
from urllib.parse import quote

# Environment variables that hold credentials (the storage Secret's keys reach the pod as these).
SECRET_ENV: Final = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MASK: Final = "***"
# Shorter fragments would mask ordinary words; no real credential is this short.
MIN_LENGTH: Final = 4


def spellings(secret: str) -> set[str]:
    """The ways `secret` may appear in text: as is, stripped, and escaped as Python's repr,
    JSON and URLs escape it (each also stripped)."""
    out: set[str] = set()
    for value in {secret, secret.strip()}:
        out.add(value)
        out.add(repr(value)[1:-1])
        out.add(value.encode("unicode_escape").decode("ascii"))
        out.add(json.dumps(value)[1:-1])
        out.add(quote(value, safe=""))
    return {s for s in out if len(s.strip()) >= MIN_LENGTH}


class Redactor:
    """Replaces every spelling of the given secrets with ***."""

    def __init__(self, secrets: Iterable[str]) -> None:
        found: set[str] = set()
        for secret in secrets:
            if secret and len(secret.strip()) >= MIN_LENGTH:
                found |= spellings(secret)
        # Longest first: a stripped value is a substring of the unstripped one.
        self._spellings = sorted(found, key=len, reverse=True)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Redactor:
        env = os.environ if env is None else env
        return cls(env.get(name, "") for name in SECRET_ENV)

    def __bool__(self) -> bool:
        return bool(self._spellings)

    def __call__(self, text: str) -> str:
        for spelling in self._spellings:
            if spelling in text:
                text = text.replace(spelling, MASK)
        return text


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` with the credentials of the environment masked."""
    return Redactor.from_environment(env)(text)


class RedactingStream(io.TextIOBase):
    """A text stream that masks secrets in what is written through it, line by line: a
    secret split across two write() calls of one line is still found."""

    def __init__(self, target: TextIO, redactor: Redactor) -> None:
        self._target = target
        self._redactor = redactor
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        complete, newline, rest = self._pending.rpartition("\n")
        if newline:
            self._target.write(self._redactor(complete + newline))
            self._pending = rest
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._target.write(self._redactor(self._pending))
            self._pending = ""
        self._target.flush()

    def fileno(self) -> int:
        return self._target.fileno()

    def isatty(self) -> bool:
        return self._target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")


def install(env: Mapping[str, str] | None = None) -> Redactor:
    """Mask the environment's credentials in everything written to stdout and stderr from
    now on (idempotent). Returns the redactor, for messages that go elsewhere."""
    redactor = Redactor.from_environment(env)
    if redactor:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, RedactingStream):
                setattr(sys, name, RedactingStream(stream, redactor))
    return redactor
