"""Storage errors: one StorageError per failure, with a message that names the URI and what to
check, never a credential; which failures are retried.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,  # not the builtin
)
from s3transfer.exceptions import RetriesExceededError, S3DownloadFailedError

if TYPE_CHECKING:
    pass


log = logging.getLogger("kubetune_trainer.storage")  # one logger for the package

# Failures that may pass (the store is down, overloaded or unreachable for now): retried with
# backoff for StorageConfig.retryTimeout, then reported as they are.
RETRIED_REASONS: Final = frozenset(
    {"StorageUnreachable", "StorageTimeout", "StorageUnavailable", "StorageClockSkew"}
)


# ---------------------------------------------------------------------------------------- errors


class StorageError(Exception):
    """A storage operation failed. The message is one line, names the URI, and says what to
    check; `reason` is a CamelCase code usable as a status reason (e.g. StorageAccessDenied)."""

    def __init__(self, message: str, *, uri: str, reason: str = "StorageError") -> None:
        # One line: the message ends up in a Kubernetes condition and in a single log line.
        super().__init__(" ".join(message.split()))
        self.uri = uri
        self.reason = reason


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, the low-level error botocore wraps in kwargs["error"], and the chain."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        kwargs = getattr(current, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        for nxt in (inner, current.__cause__, current.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _connection_problem(exc: BaseException) -> str:
    """'DNS lookup failed', 'connection refused', or a short generic text."""
    for cause in _causes(exc):
        text = str(cause)
        if (
            isinstance(cause, socket.gaierror)
            or type(cause).__name__ == "NameResolutionError"
            or "Name or service not known" in text
            or "nodename nor servname" in text
            or "Temporary failure in name resolution" in text
        ):
            return "DNS lookup failed for its host name"
        if isinstance(cause, ConnectionRefusedError) or "Connection refused" in text:
            return "connection refused"
        if isinstance(cause, SSLError) or "CERTIFICATE_VERIFY_FAILED" in text:
            return "TLS handshake failed (check the certificate or use http://)"
    return "could not connect"


@dataclass(frozen=True)
class _ErrorContext:
    """What the message may mention besides the URI (never the credentials themselves)."""

    endpoint: str = "the default AWS S3 endpoint"
    region: str = "us-east-1"
    secret_name: str | None = None
    anonymous: bool = False
    connect_timeout: float | None = None
    read_timeout: float | None = None
    redact: tuple[str, ...] = ()

    def secret_hint(self) -> str:
        if self.secret_name:
            name = self.secret_name
            return f"check the credentials Secret {name!r} (spec.storage.credentialsSecretRef)"
        if self.anonymous:
            return (
                "the request was anonymous: set spec.storage.credentialsSecretRef to a Secret "
                "with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        return (
            "check the credentials Secret named in spec.storage.credentialsSecretRef "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        )


_NOT_FOUND: Final = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_DENIED: Final = frozenset(
    {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "AccountProblem"}
)
_EXPIRED: Final = frozenset({"ExpiredToken", "TokenRefreshRequired", "InvalidToken"})
_WRONG_REGION: Final = frozenset(
    {
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
        "301",
        "IllegalLocationConstraintException",
    }
)
_UNAVAILABLE: Final = frozenset(
    {"SlowDown", "ServiceUnavailable", "503", "InternalError", "500", "XMinioServerNotInitialized"}
)


def _client_error(
    code: str, status: int | None, message: str, *, uri: str, action: str, ctx: _ErrorContext
) -> StorageError:
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if code in _NOT_FOUND:
        return StorageError(f"no object at {uri}", uri=uri, reason="StorageNotFound")
    if code == "NoSuchBucket":
        return StorageError(
            f"bucket {bucket!r} does not exist at {ctx.endpoint} ({uri}): check the bucket name "
            "in the URI and spec.storage.endpoint",
            uri=uri,
            reason="StorageNoSuchBucket",
        )
    if code == "InvalidAccessKeyId":
        detail = f"{ctx.endpoint} does not know the access key id"
    elif code == "SignatureDoesNotMatch":
        detail = "the secret access key does not match the access key id"
    elif code in _EXPIRED:
        detail = "the session token has expired"
    elif code in _ACCESS_DENIED:
        detail = f"the credentials may not {action} this bucket or prefix"
    else:
        detail = ""
    if detail:
        return StorageError(
            f"access denied to {uri} ({detail}): {ctx.secret_hint()}",
            uri=uri,
            reason="StorageAccessDenied",
        )
    if code in _WRONG_REGION:
        return StorageError(
            f"{uri}: bucket {bucket!r} rejected region {ctx.region!r} ({code}): set "
            "spec.storage.region to the bucket's region",
            uri=uri,
            reason="StorageWrongRegion",
        )
    if code == "RequestTimeTooSkewed":
        return StorageError(
            f"{ctx.endpoint} rejected the request for {uri}: the pod's clock differs too much "
            "from the store's; fix the node's time synchronization",
            uri=uri,
            reason="StorageClockSkew",
        )
    if code in {"PreconditionFailed", "412"}:
        return StorageError(
            f"{uri} changed while it was being downloaded; retry once writers are done",
            uri=uri,
            reason="StorageObjectChanged",
        )
    if code in _UNAVAILABLE:
        return StorageError(
            f"{ctx.endpoint} is overloaded or unavailable ({code}) for {uri} after retries; "
            "retry later",
            uri=uri,
            reason="StorageUnavailable",
        )
    if code == "InvalidBucketName":
        return StorageError(
            f"{uri}: invalid bucket name {bucket!r}", uri=uri, reason="StorageInvalidUri"
        )
    http = f" (HTTP {status})" if status else ""
    return StorageError(
        f"could not {action} {uri}: {code}{http}: {message}", uri=uri, reason="StorageError"
    )


def storage_error(
    exc: BaseException,
    uri: str,
    *,
    action: str = "access",
    endpoint: str | None = None,
    region: str = "us-east-1",
    secret_name: str | None = None,
    redact: Iterable[str] = (),
) -> StorageError:
    """Translate a botocore/s3transfer exception into a StorageError for `uri`.

    `action` is the verb for the message ("read", "write", "list", "delete"); `redact` lists
    strings (the credentials) that must never appear in the message.
    """
    ctx = _ErrorContext(
        endpoint=endpoint or _ErrorContext.endpoint,
        region=region,
        secret_name=secret_name,
        redact=tuple(redact),
    )
    return _translate(exc, uri, action, ctx)


def _translate(exc: BaseException, uri: str, action: str, ctx: _ErrorContext) -> StorageError:
    error = _translate_unredacted(exc, uri, action, ctx)
    text = str(error)
    for secret in ctx.redact:
        if secret:
            text = text.replace(secret, "***")
    if text != str(error):
        error = StorageError(text, uri=uri, reason=error.reason)
    return error


def _translate_unredacted(
    exc: BaseException, uri: str, action: str, ctx: _ErrorContext
) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    # s3transfer wraps the last network error of its own retry loop.
    if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
        return _translate_unredacted(exc.last_exception, uri, action, ctx)
    if isinstance(exc, S3DownloadFailedError) and "did not match expected ETag" in str(exc):
        return _client_error("PreconditionFailed", 412, "", uri=uri, action=action, ctx=ctx)
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(err.get("Code") or meta.get("HTTPStatusCode") or "Unknown")
        status, message = meta.get("HTTPStatusCode"), str(err.get("Message", ""))
        return _client_error(code, status, message, uri=uri, action=action, ctx=ctx)
    # Timeouts before connection errors: ConnectTimeoutError is also a ConnectionError.
    if isinstance(exc, ConnectTimeoutError):
        limit = f" after {ctx.connect_timeout:g}s" if ctx.connect_timeout else ""
        return StorageError(
            f"timed out connecting to the S3 endpoint {ctx.endpoint}{limit} for {uri}: check "
            "spec.storage.endpoint and that the pod's network (NetworkPolicy, proxy) reaches it",
            uri=uri,
            reason="StorageTimeout",
        )
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        limit = f" for {ctx.read_timeout:g}s" if ctx.read_timeout else ""
        return StorageError(
            f"timed out: the S3 endpoint {ctx.endpoint} did not answer{limit} while trying to "
            f"{action} {uri}; the store is overloaded or the network is slow, retry later",
            uri=uri,
            reason="StorageTimeout",
        )
    # Connection refused, DNS, TLS and proxy failures (EndpointConnectionError and friends).
    if isinstance(exc, BotoConnectionError):
        return StorageError(
            f"cannot reach the S3 endpoint {ctx.endpoint} for {uri} ({_connection_problem(exc)}): "
            "check spec.storage.endpoint and that the store is running and reachable from the pod",
            uri=uri,
            reason="StorageUnreachable",
        )
    if isinstance(
        exc, ConnectionClosedError | ResponseStreamingError | IncompleteReadError | ConnectionError
    ):
        return StorageError(
            f"the connection to {ctx.endpoint} broke while trying to {action} {uri} after "
            "retries; retry later",
            uri=uri,
            reason="StorageUnavailable",
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"no usable credentials to {action} {uri}: {ctx.secret_hint()}",
            uri=uri,
            reason="StorageAccessDenied",
        )
    return StorageError(
        f"could not {action} {uri}: {type(exc).__name__}: {exc}", uri=uri, reason="StorageError"
    )
