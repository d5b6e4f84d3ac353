"""No credential reaches a log line, a termination message (status, Events) or an error, in
whatever spelling an exception quotes it."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from urllib.parse import quote

import pytest

from kubetune_trainer.__main__ import one_line, write_termination_message
from kubetune_trainer.redact import RedactingStream, Redactor

KEY_ID = "KTEXAMPLEKEYID0042"
SECRET = "s3cr3t/with+chars=="
ENV = {"AWS_ACCESS_KEY_ID": KEY_ID + "\n", "AWS_SECRET_ACCESS_KEY": SECRET}


@pytest.mark.parametrize(
    "quoted",
    [
        # botocore refusing the header (the case): the newline as backslash-n.
        f"Invalid header value b'AWS4-HMAC-SHA256 Credential={KEY_ID}\\n/20261202/us-east-1/s3'",
        f"Credential={KEY_ID}/20261202/us-east-1/s3/aws4_request",  # stripped
        json.dumps({"key": KEY_ID + "\n"}),  # JSON-escaped
        f"https://s3.example/?X-Amz-Credential={quote(KEY_ID + chr(10), safe='')}",
        f"secret was {SECRET!r}",
        f"secret was {quote(SECRET, safe='')}",
    ],
)
def test_every_spelling_of_a_credential_is_masked(quoted: str) -> None:
    redacted = one_line(quoted, ENV)
    assert KEY_ID not in redacted and SECRET not in redacted
    assert quote(SECRET, safe="") not in redacted
    assert "***" in redacted


def test_the_termination_message_has_no_credential(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    env = {**ENV, "KUBETUNE_TERMINATION_LOG": str(log)}
    write_termination_message(
        f"internal error: ValueError: Invalid header value b'Credential={KEY_ID}\\n/x'", env
    )
    assert KEY_ID not in log.read_text() and "***" in log.read_text()


def test_log_lines_and_tracebacks_through_the_stream_are_masked() -> None:
    target = io.StringIO()
    stream = RedactingStream(target, Redactor(ENV.values()))
    logger = logging.getLogger("test-redact")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"Invalid header value b'Credential={KEY_ID}\\n/20261202'")
        except ValueError:
            logger.exception("upload failed")
        stream.write(f"a secret split across writes: {SECRET[:6]}")
        stream.write(f"{SECRET[6:]} end\n")
        stream.flush()
    finally:
        logger.removeHandler(handler)
    text = target.getvalue()
    assert "upload failed" in text and "Traceback" in text
    assert KEY_ID not in text and SECRET not in text


def test_short_or_empty_values_mask_nothing() -> None:
    assert Redactor(["", "ab", "  "])("ab is a word") == "ab is a word"
