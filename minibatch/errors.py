"""Errors minibatch raises, and the two signals a handler may raise.

Each `MinibatchError` carries its HTTP status and problem `type`, so the API renders
them all with one handler. `Retry` and `Fail` are a handler speaking, not minibatch
failing, so they stand outside that family. Imports nothing from the package.
"""

from __future__ import annotations

import math
from typing import Any


class MinibatchError(Exception):
    """Base of every error minibatch raises on purpose."""

    status = 500
    title = "Internal error"
    headers: dict[str, str] = {}  # sent with the problem response

    def __init__(self, detail: str, errors: list[dict] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []

    @property
    def type(self) -> str:
        return "https://minibatch.dev/problems/" + self.title.lower().replace(" ", "-")


class InvalidInput(MinibatchError):
    """The request or submission is malformed; `errors` names each field or line."""

    status = 422
    title = "Invalid input"


class IdempotencyMismatch(InvalidInput):
    """An Idempotency-Key reused with another body: 422 in every dialect."""


class BadRequest(MinibatchError):
    status = 400
    title = "Bad request"


class NotFound(MinibatchError):
    status = 404
    title = "Not found"


class Conflict(MinibatchError):
    status = 409
    title = "Conflict"


class Forbidden(MinibatchError):
    status = 403
    title = "Forbidden"


class Unauthorized(MinibatchError):
    status = 401
    title = "Unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class TooManyRequests(MinibatchError):
    """A tenant's limit: requests per second per key, or items queued at once."""

    status = 429
    title = "Too many requests"

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class PayloadTooLarge(MinibatchError):
    status = 413
    title = "Payload too large"


class UnsupportedMediaType(MinibatchError):
    status = 415
    title = "Unsupported media type"


class StorageUnavailable(MinibatchError):
    """The database cannot be written (disk full, I/O error, read-only)."""

    status = 503
    title = "Storage unavailable"


class StoreBusy(StorageUnavailable):
    """Another process holds the database's write lock, and this store does not wait for
    it (`Store.wait_for_lock(False)`): try again in a moment."""


class Retry(Exception):
    """Raised by a handler: try this item again after `after` seconds (or fail it, with
    `output` as its output, when this was its last attempt)."""

    def __init__(self, after: float | None = None, message: str = "retry requested",
                 output: Any = None) -> None:
        super().__init__(message)
        self.after = after
        self.output = output  # kept as the item's output if no attempt is left


class Fail(Exception):
    """Raised by a handler: fail this item now, with no further attempts. `output`, if
    given, is kept as the failed item's output (say, the error response of an upstream)."""

    def __init__(self, message: str = "failed by handler", code: str = "failed",
                 output: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.output = output
