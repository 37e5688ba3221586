"""Which store errors are worth retrying, and the retry loop with backoff and jitter.

Transient: 5xx, 503 SlowDown, 429, 408, connection refused/reset, timeouts. Retried until
``retry_seconds`` have passed for that object. Permanent: every other 4xx (403, NoSuchBucket,
bad credentials, 412 PreconditionFailed): raised at once. Errors are found by walking the
exception's ``__cause__``/``__context__`` chain for a botocore-style ``response`` (the
fsspec plugins translate them into ``OSError``s but keep the original as the cause).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_RETRY_SECONDS = 60.0
FIRST_DELAY_SECONDS = 0.05
MAX_DELAY_SECONDS = 5.0

TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "TooManyRequestsException", "OperationAborted",
})
# Connection-level failures by class name, so that this module needs no client imports.
TRANSIENT_TYPES = frozenset({
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionError", "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
    "ClientPayloadError", "ClientOSError", "ServerTimeoutError", "ResponseStreamingError",
    "IncompleteReadError", "ProxyConnectionError", "ConnectionRefusedError",
    "ConnectionResetError", "BrokenPipeError", "TimeoutError", "HTTPClientError",
})


class StoreError(OSError):
    """A store refused or failed an operation: ``url``, the store's ``code`` and HTTP ``status``."""

    def __init__(self, url: str, code: str | None, status: int | None, message: str,
                 transient: bool = False):
        super().__init__(f"{url}: {code or 'error'}"
                         + (f" (HTTP {status})" if status else "") + f": {message}")
        self.url = url
        self.code = code
        self.status = status
        self.transient = transient


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 16:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def error_details(exc: BaseException) -> tuple[str | None, int | None]:
    """The store's error code and HTTP status found in ``exc``'s chain (None when absent)."""
    for link in _chain(exc):
        response = getattr(link, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = response["Error"].get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status is None and isinstance(code, str) and code.isdigit():
                status = int(code)
            return code, status
    return None, None


def is_transient(exc: BaseException) -> bool:
    code, status = error_details(exc)
    if code is not None or status is not None:
        if code in TRANSIENT_CODES:
            return True
        return status is not None and (status >= 500 or status in (408, 429))
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError)):
        return False
    return any(type(link).__name__ in TRANSIENT_TYPES or isinstance(link, (ConnectionError, TimeoutError))
               for link in _chain(exc))


def as_store_error(url: str, exc: BaseException) -> StoreError:
    """``exc`` as a ``StoreError`` naming ``url`` and the store's code (``exc`` is its cause)."""
    if isinstance(exc, StoreError):
        return exc
    code, status = error_details(exc)
    if code is None:
        code = type(exc).__name__
    message = str(exc) or type(exc).__name__
    if code == "PreconditionFailed" or isinstance(exc, FileExistsError):
        message = f"the object exists and overwrite=False (a conditional create refused it): {message}"
    error = StoreError(url, code, status, message, is_transient(exc))
    error.__cause__ = exc
    return error


def with_retries(url: str, operation: Callable[[], T], retry_seconds: float,
                 sleep: Callable[[float], Any] = time.sleep) -> T:
    """Run ``operation`` until it succeeds, a permanent error, or ``retry_seconds`` passed.

    Full-jitter exponential backoff (a delay drawn from 0..min(cap, first * 2**attempt)), so
    that many workers hitting SlowDown at once do not retry in step."""
    deadline = time.monotonic() + retry_seconds
    attempt = 0
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise as_store_error(url, exc) from exc
            delay = random.uniform(0, min(MAX_DELAY_SECONDS, FIRST_DELAY_SECONDS * 2 ** attempt))
            left = deadline - time.monotonic()
            if left <= 0:
                error = as_store_error(url, exc)
                raise StoreError(url, error.code, error.status,
                                 f"still failing after {attempt + 1} attempt(s) in "
                                 f"{retry_seconds:g} s (retry_seconds): {exc}", True) from exc
            sleep(min(delay, left))
            attempt += 1
