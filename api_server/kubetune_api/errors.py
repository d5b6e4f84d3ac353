"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The `openai` client turns the HTTP status into its exception class (400 BadRequestError, 401
AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 429
RateLimitError) and exposes `param` and `code`. It retries 409, 429 and 5xx by default, so every
error except 429 and 503 carries `x-should-retry: false`: a conflict here is final, not a lock
timeout.
"""

from __future__ import annotations

from typing import Final

from pydantic import ValidationError

ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}
RETRYABLE: Final = frozenset({429, 503})


class ApiError(Exception):
    """An error response; `message` is for the user and never holds a credential."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        headers = {"x-should-retry": "true" if self.status in RETRYABLE else "false"}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code or "invalid_request")


def not_found(message: str, param: str | None = None) -> ApiError:
    return ApiError(404, message, param=param, code="not_found")


def conflict(message: str, param: str | None = None) -> ApiError:
    return ApiError(409, message, param=param, code="conflict")


def location(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """pydantic's error location as a dotted parameter name (method.supervised.hyperparameters);
    the request models avoid unions, so every part is a field name or a list index."""
    dotted = ".".join(str(part) for part in loc)
    return f"{prefix}{dotted}" if dotted else prefix.rstrip(".")


def from_validation(err: ValidationError, prefix: str = "") -> ApiError:
    """The first problem of a request body, naming its field."""
    first = err.errors()[0]
    param = location(first["loc"], prefix)
    message = str(first["msg"])
    if first["type"] == "extra_forbidden":
        message = "unknown parameter"
    return bad_request(f"{param}: {message}" if param else message, param=param or None)
