"""Typed request outcomes: branch on them without catching exceptions.

``Link.request`` returns exactly one of these; ``Link.call`` returns the acknowledged result
or raises ``outcome.error``::

    match await link.request("set", {"target": 21.5}, timeout=5):
        case Acknowledged(result=result):
            ...
        case Rejected(code=code, message=message):
            ...
        case TimedOut() | Cancelled() | Unavailable() as failed:
            log.warning("not applied: %s", failed.error)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias, TypeVar

from keeplink._core.classify import error_from_code
from keeplink._core.errors import (
    ErrorCode,
    KeeplinkError,
    RejectedError,
    RequestCancelledError,
    RequestTimeout,
)

__all__ = [
    "Acknowledged",
    "Cancelled",
    "Outcome",
    "Rejected",
    "TimedOut",
    "Unavailable",
    "enum_or_none",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Acknowledged:
    """The device acknowledged the request. ``side`` is side data that came with the ack."""

    ok: ClassVar[bool] = True
    seq: int
    result: Mapping[str, Any] = field(default_factory=dict)
    side: Mapping[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> None:
        return None

    def unwrap(self) -> Mapping[str, Any]:
        return self.result


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """The device answered and refused. ``code`` is the device's own (kept verbatim)."""

    ok: ClassVar[bool] = False
    seq: int
    code: str
    message: str

    @property
    def error(self) -> KeeplinkError:
        """The typed error for the device's code: ``out_of_connection_slots`` is a
        SlotsExhaustedError, ``rejected`` a RejectedError, and so on. A code this version
        does not know is a RejectedError whose ``wire_code`` keeps the device's word."""
        err = error_from_code(self.code, self.message)
        if err.code is ErrorCode.UNKNOWN:
            return RejectedError(self.message, code=ErrorCode.REJECTED, wire_code=self.code)
        return err

    def unwrap(self) -> Mapping[str, Any]:
        raise self.error


@dataclass(frozen=True, slots=True, kw_only=True)
class TimedOut:
    """No reply within the request's deadline (or the write itself timed out)."""

    ok: ClassVar[bool] = False
    after_s: float
    seq: int | None = None
    sent: bool = True
    """False if the deadline passed before the request could be written."""
    meanwhile: str | None = None
    """What the device sent while the request waited that matched nothing (malformed frames,
    replies for no request in flight), when it sent any: often the reason there was no
    reply, so the error's message carries it."""

    @property
    def error(self) -> RequestTimeout:
        if self.sent and self.meanwhile:
            return RequestTimeout(f"no reply within {self.after_s:g}s; {self.meanwhile}")
        if self.sent:
            return RequestTimeout(f"no reply within {self.after_s:g}s")
        return RequestTimeout(f"no free window to send within {self.after_s:g}s")

    def unwrap(self) -> Mapping[str, Any]:
        raise self.error


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancelled:
    """The request was cancelled before it resolved (``stop()``)."""

    ok: ClassVar[bool] = False
    reason: str
    seq: int | None = None

    @property
    def error(self) -> RequestCancelledError:
        return RequestCancelledError(self.reason)

    def unwrap(self) -> Mapping[str, Any]:
        raise self.error


@dataclass(frozen=True, slots=True, kw_only=True)
class Unavailable:
    """The link could not carry the request (not connected, or the write failed)."""

    ok: ClassVar[bool] = False
    cause: KeeplinkError
    seq: int | None = None

    @property
    def error(self) -> KeeplinkError:
        return self.cause

    def unwrap(self) -> Mapping[str, Any]:
        raise self.cause


Outcome: TypeAlias = Acknowledged | Rejected | TimedOut | Cancelled | Unavailable

E = TypeVar("E", bound=enum.Enum)


def enum_or_none(enum_type: type[E], raw: object) -> E | None:
    """Map a raw value read from a device to a member of ``enum_type``; unknown → None.

    A device with newer firmware reports a mode we do not know: the integration sees
    ``None`` ("unknown"), never a raw number it might feed back into a setter.
    """
    try:
        return enum_type(raw)
    except (ValueError, TypeError):
        return None
