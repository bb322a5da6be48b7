"""The error taxonomy: one root, subclasses named by meaning, one stable wire code each.

Every error keeplink raises is a :class:`KeeplinkError` and carries an :class:`ErrorCode`.
The code is what crosses a wire (the HTTP API, events, the jsonline ``error``/``ack``
frames) and what a caller branches on; the class is what a ``try`` block catches.

A peer may send a code this version does not know. It is kept verbatim in
:attr:`KeeplinkError.wire_code` so nothing is lost on the way through, while
:attr:`KeeplinkError.code` falls back to the nearest known meaning.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AbortedError",
    "AuthError",
    "CommandNotFoundError",
    "ConfigError",
    "ConflictError",
    "DeviceMismatchError",
    "DeviceNotFoundError",
    "DeviceUnavailableError",
    "ErrorClass",
    "ErrorCode",
    "ErrorInfo",
    "ExpiredError",
    "FencedError",
    "InvalidRequestError",
    "KeeplinkError",
    "LinkBrokenError",
    "LinkClosedError",
    "PreconditionFailedError",
    "ProtocolError",
    "QueueFullError",
    "RejectedError",
    "RequestCancelledError",
    "RequestTimeout",
    "SlotsExhaustedError",
    "StoreBusyError",
    "StoreUnavailableError",
    "WaitTimeoutError",
    "error_class_of",
]


class ErrorCode(enum.StrEnum):
    """Stable wire codes. Values never change once released; new ones are only added."""

    CONNECTION_FAILED = "connection_failed"
    """The channel could not be opened or was broken by the peer or the network."""
    TIMEOUT = "timeout"
    """Something did not happen within its deadline (connect, handshake, send, reply)."""
    AUTH_FAILED = "auth_failed"
    """The peer refused our credentials. Retrying with the same ones will not help."""
    OUT_OF_CONNECTION_SLOTS = "out_of_connection_slots"
    """A hub (BLE proxy, Modbus gateway) has no free connection slot."""
    CONNECTION_ABORTED = "connection_aborted"
    """A connect was abandoned: the caller aborted it or the pool was closed."""
    DEVICE_NOT_FOUND = "device_not_found"
    """No such device is known (to the gateway, or to the hub behind a link)."""
    DEVICE_UNAVAILABLE = "device_unavailable"
    """The device is known but not reachable now (offline, asleep, link down)."""
    DISCOVERY_FAILED = "discovery_failed"
    """Looking the device up (mDNS, service discovery) failed."""
    REJECTED = "rejected"
    """The device answered and refused the request. Never retried."""
    PROTOCOL_ERROR = "protocol_error"
    """The peer sent something that does not follow the protocol."""
    INVALID_REQUEST = "invalid_request"
    """The caller's arguments are invalid; nothing was sent."""
    EXPIRED = "expired"
    """A durable command's deadline passed before it could be delivered."""
    CANCELLED = "cancelled"
    """The request or command was cancelled (by the caller, or by ``stop()``)."""
    LINK_CLOSED = "link_closed"
    """The link was stopped by its owner; it will not reconnect until started again."""
    CONFIG_ERROR = "config_error"
    """The configuration is invalid. Fix it and start again."""
    CHECKSUM_MISMATCH = "checksum_mismatch"
    """A transferred image did not match its announced hash."""
    PRECONDITION_FAILED = "precondition_failed"
    """A durable command's precondition did not hold at delivery time."""
    CONFLICT = "conflict"
    """The request conflicts with the current state (e.g. cancelling a finished command)."""
    COMMAND_NOT_FOUND = "command_not_found"
    """No command with that id."""
    STORE_UNAVAILABLE = "store_unavailable"
    """The command store (a database server) cannot be reached now; nothing was written.
    Retry later: a store reconnects on its own."""
    STORE_BUSY = "store_busy"
    """The command store is locked by another writer (another process holds the SQLite
    write lock) past its busy timeout; nothing was written. Retry later."""
    QUEUE_FULL = "queue_full"
    """The device already has its ``max_queued`` commands queued; nothing was stored."""
    DEVICE_MISMATCH = "device_mismatch"
    """The peer named itself as another device than the one configured at that address (a
    reused address, a swapped device, an impostor): the session was refused and nothing was
    sent. Like ``auth_failed``, retrying will not help until the device or the config is
    fixed."""
    UNKNOWN = "unknown"
    """A code from a peer that this version does not know (kept verbatim in ``wire_code``)."""


class ErrorClass(enum.Enum):
    """How the reconnect policy treats an error."""

    TRANSIENT = "transient"
    """Retry with exponential backoff."""
    RESOURCE_EXHAUSTED = "resource_exhausted"
    """The peer is busy (no free slot): retry after a fixed, longer delay."""
    ABSENT = "absent"
    """The device is away: wait for a wake signal, or the backoff cap."""
    TERMINAL = "terminal"
    """Auth or configuration: retrying cannot fix it (unless a slow retry is configured)."""


_CLASS_OF_CODE: Final[dict[ErrorCode, ErrorClass]] = {
    ErrorCode.OUT_OF_CONNECTION_SLOTS: ErrorClass.RESOURCE_EXHAUSTED,
    ErrorCode.DEVICE_UNAVAILABLE: ErrorClass.ABSENT,
    ErrorCode.DEVICE_NOT_FOUND: ErrorClass.ABSENT,
    ErrorCode.DISCOVERY_FAILED: ErrorClass.ABSENT,
    ErrorCode.AUTH_FAILED: ErrorClass.TERMINAL,
    ErrorCode.DEVICE_MISMATCH: ErrorClass.TERMINAL,
    ErrorCode.CONFIG_ERROR: ErrorClass.TERMINAL,
}


def error_class_of(code: ErrorCode) -> ErrorClass:
    """The reconnect class of a code; anything not listed is transient."""
    return _CLASS_OF_CODE.get(code, ErrorClass.TRANSIENT)


class KeeplinkError(Exception):
    """Root of every error keeplink raises.

    ``code`` is the known meaning; ``wire_code`` is the exact string to put on (or that came
    off) a wire, which differs from ``code.value`` only for a peer's unknown code.
    """

    default_code: ErrorCode = ErrorCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        wire_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: ErrorCode = code if code is not None else self.default_code
        self.wire_code: str = wire_code if wire_code is not None else self.code.value

    def __str__(self) -> str:
        return f"[{self.wire_code}] {self.message}"

    def to_wire(self) -> dict[str, str]:
        """The ``{"code", "message"}`` shape used by the API, events and jsonline frames
        (:meth:`ErrorInfo.to_wire`), with the message as it is."""
        return ErrorInfo(code=self.wire_code, message=self.message).to_wire()


class LinkClosedError(KeeplinkError):
    """You closed it: the link was stopped by its owner."""

    default_code = ErrorCode.LINK_CLOSED


class LinkBrokenError(KeeplinkError):
    """The peer or the network failed. The underlying error is ``__cause__``."""

    default_code = ErrorCode.CONNECTION_FAILED


class AuthError(KeeplinkError):
    """The peer refused our credentials (terminal for the reconnect policy by default)."""

    default_code = ErrorCode.AUTH_FAILED


class DeviceMismatchError(AuthError):
    """The peer is not the device we meant to reach: its handshake named another device id.

    An :class:`AuthError` (the peer failed to prove it is the configured device), so the
    reconnect policy treats it like refused credentials: terminal by default, or a slow
    retry when one is configured. The session is closed before any request is sent.
    """

    default_code = ErrorCode.DEVICE_MISMATCH


class ConfigError(KeeplinkError):
    """The configuration is invalid: which file, which key, what is wrong."""

    default_code = ErrorCode.CONFIG_ERROR


class RequestTimeout(KeeplinkError):
    """A connect, handshake, send or reply did not complete within its deadline."""

    default_code = ErrorCode.TIMEOUT


class WaitTimeoutError(RequestTimeout, TimeoutError):
    """A caller's wait (e.g. ``Link.wait_connected(timeout=...)``) ran out before what it
    waited for happened. Only the wait ended: the thing waited on (the link) is untouched.

    Code ``timeout``, like every :class:`RequestTimeout`; also an instance of the builtin
    :class:`TimeoutError`, so ``except TimeoutError`` catches it as it would
    ``asyncio.timeout``'s.
    """


class RejectedError(KeeplinkError):
    """The device answered and refused. ``wire_code`` is the device's own code."""

    default_code = ErrorCode.REJECTED


class RequestCancelledError(KeeplinkError):
    """The request was cancelled before it resolved (by the caller or by ``stop()``)."""

    default_code = ErrorCode.CANCELLED


class SlotsExhaustedError(KeeplinkError):
    """A hub has no free connection slot."""

    default_code = ErrorCode.OUT_OF_CONNECTION_SLOTS


class AbortedError(KeeplinkError):
    """A connect or a queued slot acquire was abandoned (abort signal or pool closed)."""

    default_code = ErrorCode.CONNECTION_ABORTED


class ProtocolError(KeeplinkError):
    """The peer sent something that does not follow the protocol."""

    default_code = ErrorCode.PROTOCOL_ERROR


class InvalidRequestError(KeeplinkError, ValueError):
    """The caller's arguments are invalid. Raised before anything is sent."""

    default_code = ErrorCode.INVALID_REQUEST


class DeviceNotFoundError(KeeplinkError, LookupError):
    """No such device."""

    default_code = ErrorCode.DEVICE_NOT_FOUND


class DeviceUnavailableError(KeeplinkError):
    """The device is known but not reachable now."""

    default_code = ErrorCode.DEVICE_UNAVAILABLE


class CommandNotFoundError(KeeplinkError, LookupError):
    """No command with that id."""

    default_code = ErrorCode.COMMAND_NOT_FOUND


class ConflictError(KeeplinkError):
    """The request conflicts with the current state, e.g. cancelling a finished command."""

    default_code = ErrorCode.CONFLICT


class PreconditionFailedError(KeeplinkError):
    """A durable command's precondition did not hold at delivery time."""

    default_code = ErrorCode.PRECONDITION_FAILED


class ExpiredError(KeeplinkError):
    """A deadline passed before delivery."""

    default_code = ErrorCode.EXPIRED


class FencedError(ConflictError):
    """A write for a device made by a node whose lease on the device is no longer current
    (another node took it over): refused, nothing of the call written. The node must stop
    delivering to that device."""


class StoreUnavailableError(KeeplinkError):
    """The command store cannot be reached (its database is down or the connection broke);
    the write was not made. Raised with ``__cause__`` set to the driver's error."""

    default_code = ErrorCode.STORE_UNAVAILABLE


class StoreBusyError(StoreUnavailableError):
    """The command store stayed locked by another writer past its busy timeout; the write
    was not made (``__cause__`` is the driver's error). Retry later."""

    default_code = ErrorCode.STORE_BUSY


class QueueFullError(KeeplinkError):
    """The device's queue is at its ``max_queued``; the command was not stored."""

    default_code = ErrorCode.QUEUE_FULL


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error as it crosses a wire or a database row: its stable code and a message."""

    code: str
    message: str

    @classmethod
    def of(cls, exc: KeeplinkError) -> ErrorInfo:
        """The error as a row or a view keeps it: text a store takes (no NUL, no lone
        surrogate: a peer's words may carry either), the message at most MAX_MESSAGE
        characters."""
        return cls(code=printable(exc.wire_code, 64), message=printable(exc.message, MAX_MESSAGE))

    def to_wire(self) -> dict[str, str]:
        """The one JSON shape of an error: ``{"code", "message"}``, as the HTTP API answers
        it and the gateway's events and device views carry it."""
        return {"code": self.code, "message": self.message}


MAX_MESSAGE: Final = 1000
"""Longest error message kept (a peer may send 60 KB of it)."""


def printable(text: str, limit: int) -> str:
    """``text`` without NUL or unpaired surrogates (each becomes U+FFFD), cut to ``limit``
    characters (ending in "…" when cut)."""
    if "\x00" in text or not _encodable(text):
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        text = text.replace("\x00", "\ufffd")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
