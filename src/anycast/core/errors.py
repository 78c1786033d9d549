"""Anycast's exception tree.

Every error a user can see carries a short public ``message`` and a stable ``code``.
HTTP servers turn them into ``{"error": {"code": ..., "message": ...}}`` with ``status``;
clients turn such bodies back into the same exception class.
"""

from __future__ import annotations

from typing import Any


class AnycastError(Exception):
    """Base of every error Anycast raises on purpose."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class InvalidInput(AnycastError, ValueError):
    """The caller sent something malformed; the message says what is allowed."""

    status = 400
    code = "invalid_input"


class PayloadTooLarge(InvalidInput):
    status = 413
    code = "payload_too_large"


class BodyTimeout(InvalidInput):
    """The caller stopped sending the request body part way."""

    status = 408
    code = "body_timeout"


class ClientClosed(AnycastError):
    """The caller closed the connection before its request was whole; nobody gets an answer."""

    status = 499  # nginx's "client closed request"
    code = "client_closed"


class NotFound(AnycastError):
    status = 404
    code = "not_found"


class Conflict(AnycastError):
    """A compare-and-set lost: somebody else changed the object first."""

    status = 409
    code = "conflict"


class Unavailable(AnycastError):
    """Nothing can serve the call right now; retrying later may work."""

    status = 503
    code = "unavailable"


class IntegrityError(AnycastError):
    """An artifact's bytes do not match its manifest."""

    status = 422
    code = "integrity"


class ConfigError(AnycastError):
    status = 400
    code = "config"


_BY_STATUS: dict[int, type[AnycastError]] = {
    400: InvalidInput,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: IntegrityError,
    503: Unavailable,
}


def from_response(status: int, body: Any) -> AnycastError:
    """Rebuild the error a server sent as ``{"error": {...}}``."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return AnycastError(f"HTTP {status}: {str(body)[:200]}")
    cls = _BY_STATUS.get(status, AnycastError)
    exc = cls(str(error.get("message", "")), code=str(error.get("code", cls.code)))
    exc.status = status
    exc.details = dict(error.get("details") or {})
    return exc
