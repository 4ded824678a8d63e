"""Typed errors with stable codes: the same code travels in ``error`` events on the wire."""
from __future__ import annotations

from typing import Any


class GirisError(Exception):
    """Base of every Giris error. ``code`` is stable and machine-readable."""

    code = "internal"

    def __init__(self, message: str = "", code: str | None = None, **details: Any) -> None:
        super().__init__(message or self.__doc__ or self.code)
        if code is not None:
            self.code = code
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "details": self.details}


class ProtocolError(GirisError):
    """The message could not be decoded or breaks the protocol."""

    code = "bad_message"


class BadInput(GirisError):
    """The request is well formed but its content cannot be served."""

    code = "bad_input"


class SessionNotFound(GirisError):
    """No such session, or it belongs to another client."""

    code = "unknown_session"


class BudgetExceeded(GirisError):
    """Admitting the session would exceed a device's memory budget."""

    code = "budget_exceeded"


class LimitExceeded(GirisError):
    """A configured limit (sessions, text length, image size, request rate) was hit."""

    code = "limit_exceeded"


class StageFailed(GirisError):
    """A pipeline stage crashed too often and was marked failed."""

    code = "stage_failed"


class ServerGone(GirisError):
    """The server did not answer in time or shut down."""

    code = "server_gone"


class Timeout(GirisError):
    """A bounded wait ran out."""

    code = "timeout"


#: code -> exception class, for turning wire errors back into typed exceptions
_BY_CODE: dict[str, type[GirisError]] = {
    "bad_message": ProtocolError,
    "unsupported_version": ProtocolError,
    "unknown_type": ProtocolError,
    "too_large": LimitExceeded,
    "bad_input": BadInput,
    "no_face": BadInput,
    "many_faces": BadInput,
    "bad_image": BadInput,
    "unknown_voice": BadInput,
    "unknown_emotion": BadInput,
    "unknown_session": SessionNotFound,
    "budget_exceeded": BudgetExceeded,
    "limit_exceeded": LimitExceeded,
    "rate_limited": LimitExceeded,
    "stage_failed": StageFailed,
    "server_gone": ServerGone,
    "shutting_down": ServerGone,
    "timeout": Timeout,
}


def from_wire(payload: dict[str, Any]) -> GirisError:
    code = str(payload.get("code", "internal"))
    cls = _BY_CODE.get(code, GirisError)
    return cls(str(payload.get("message", code)), code=code, **dict(payload.get("details") or {}))
