"""Mapping foreign exceptions and peers' wire codes onto keeplink's error codes.

:func:`classify` decides by exception type first (OSError errno, timeouts, SSL errors,
keeplink's own errors). Only when the type says nothing does it look at the message text,
case-insensitively, for markers that peers predating structured codes put there (e.g. a
BLE proxy that reports slot exhaustion as ``connection_failed: ... no free connection
slots``). That text matching is a last resort, documented in :data:`MESSAGE_MARKERS`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
from typing import Final

from keeplink._core.errors import (
    AbortedError,
    AuthError,
    CommandNotFoundError,
    ConfigError,
    ConflictError,
    DeviceMismatchError,
    DeviceNotFoundError,
    DeviceUnavailableError,
    ErrorCode,
    ExpiredError,
    InvalidRequestError,
    KeeplinkError,
    LinkBrokenError,
    LinkClosedError,
    PreconditionFailedError,
    ProtocolError,
    QueueFullError,
    RejectedError,
    RequestCancelledError,
    RequestTimeout,
    SlotsExhaustedError,
    StoreBusyError,
    StoreUnavailableError,
)

__all__ = ["MESSAGE_MARKERS", "broken_from", "classify", "describe", "error_from_code"]

_ERRNO_CODES: Final[dict[int, ErrorCode]] = {
    errno.ECONNREFUSED: ErrorCode.CONNECTION_FAILED,
    errno.ECONNRESET: ErrorCode.CONNECTION_FAILED,
    errno.ECONNABORTED: ErrorCode.CONNECTION_ABORTED,
    errno.EPIPE: ErrorCode.CONNECTION_FAILED,
    errno.ENOTCONN: ErrorCode.CONNECTION_FAILED,
    errno.ETIMEDOUT: ErrorCode.TIMEOUT,
    errno.EHOSTUNREACH: ErrorCode.DEVICE_UNAVAILABLE,
    errno.EHOSTDOWN: ErrorCode.DEVICE_UNAVAILABLE,
    errno.ENETUNREACH: ErrorCode.DEVICE_UNAVAILABLE,
    errno.ENETDOWN: ErrorCode.DEVICE_UNAVAILABLE,
    errno.EADDRNOTAVAIL: ErrorCode.CONFIG_ERROR,
    errno.EMFILE: ErrorCode.CONNECTION_FAILED,
    errno.ENFILE: ErrorCode.CONNECTION_FAILED,
}

MESSAGE_MARKERS: Final[tuple[tuple[str, ErrorCode], ...]] = (
    # Lower-case substrings, checked in order, only for exceptions whose type says nothing.
    ("out_of_connection_slots", ErrorCode.OUT_OF_CONNECTION_SLOTS),
    ("no free connection slot", ErrorCode.OUT_OF_CONNECTION_SLOTS),
    ("out of connection slots", ErrorCode.OUT_OF_CONNECTION_SLOTS),
    ("connection slots", ErrorCode.OUT_OF_CONNECTION_SLOTS),
    ("connection_aborted", ErrorCode.CONNECTION_ABORTED),
    ("connection aborted", ErrorCode.CONNECTION_ABORTED),
    ("device_not_found", ErrorCode.DEVICE_NOT_FOUND),
    ("device not found", ErrorCode.DEVICE_NOT_FOUND),
    ("not found", ErrorCode.DEVICE_NOT_FOUND),
    ("auth_failed", ErrorCode.AUTH_FAILED),
    ("authentication failed", ErrorCode.AUTH_FAILED),
    ("unauthorized", ErrorCode.AUTH_FAILED),
    ("invalid token", ErrorCode.AUTH_FAILED),
    ("timed out", ErrorCode.TIMEOUT),
    ("timeout", ErrorCode.TIMEOUT),
)


def classify(exc: BaseException) -> ErrorCode:
    """The error code for any exception: by type first, by message text as a last resort."""
    if isinstance(exc, KeeplinkError):
        return exc.code
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return ErrorCode.TIMEOUT
    if isinstance(exc, asyncio.CancelledError):
        return ErrorCode.CANCELLED
    if isinstance(exc, ssl.SSLCertVerificationError):
        # A certificate we do not trust will not become trustworthy by retrying.
        return ErrorCode.AUTH_FAILED
    if isinstance(exc, ssl.SSLError):
        return ErrorCode.CONNECTION_FAILED
    if isinstance(exc, socket.gaierror):
        return ErrorCode.DISCOVERY_FAILED
    if isinstance(exc, ConnectionRefusedError | ConnectionResetError | BrokenPipeError):
        return ErrorCode.CONNECTION_FAILED
    if isinstance(exc, ConnectionAbortedError):
        return ErrorCode.CONNECTION_ABORTED
    if isinstance(exc, OSError) and exc.errno in _ERRNO_CODES:
        return _ERRNO_CODES[exc.errno]
    if isinstance(exc, PermissionError):
        return ErrorCode.CONFIG_ERROR
    text = str(exc).lower()
    for marker, code in MESSAGE_MARKERS:
        if marker in text:
            return code
    if isinstance(exc, OSError | EOFError):
        return ErrorCode.CONNECTION_FAILED
    if isinstance(exc, UnicodeError | ValueError):
        return ErrorCode.PROTOCOL_ERROR
    return ErrorCode.CONNECTION_FAILED


_CLASS_BY_CODE: Final[dict[ErrorCode, type[KeeplinkError]]] = {
    ErrorCode.CONNECTION_FAILED: LinkBrokenError,
    ErrorCode.TIMEOUT: RequestTimeout,
    ErrorCode.AUTH_FAILED: AuthError,
    ErrorCode.OUT_OF_CONNECTION_SLOTS: SlotsExhaustedError,
    ErrorCode.CONNECTION_ABORTED: AbortedError,
    ErrorCode.DEVICE_NOT_FOUND: DeviceNotFoundError,
    ErrorCode.DEVICE_UNAVAILABLE: DeviceUnavailableError,
    ErrorCode.DISCOVERY_FAILED: DeviceUnavailableError,
    ErrorCode.REJECTED: RejectedError,
    ErrorCode.PROTOCOL_ERROR: ProtocolError,
    ErrorCode.INVALID_REQUEST: InvalidRequestError,
    ErrorCode.EXPIRED: ExpiredError,
    ErrorCode.STORE_UNAVAILABLE: StoreUnavailableError,
    ErrorCode.STORE_BUSY: StoreBusyError,
    ErrorCode.QUEUE_FULL: QueueFullError,
    ErrorCode.CANCELLED: RequestCancelledError,
    ErrorCode.LINK_CLOSED: LinkClosedError,
    ErrorCode.CONFIG_ERROR: ConfigError,
    ErrorCode.CHECKSUM_MISMATCH: RejectedError,
    ErrorCode.PRECONDITION_FAILED: PreconditionFailedError,
    ErrorCode.CONFLICT: ConflictError,
    ErrorCode.COMMAND_NOT_FOUND: CommandNotFoundError,
    ErrorCode.DEVICE_MISMATCH: DeviceMismatchError,
}


def error_from_code(wire_code: str, message: str) -> KeeplinkError:
    """The typed error for a code that came off a wire. An unknown code is kept verbatim.

    ``out_of_connection_slots`` becomes :class:`SlotsExhaustedError`, ``auth_failed``
    :class:`AuthError`, and so on; ``"x_new_code"`` becomes a plain :class:`KeeplinkError`
    with ``code=UNKNOWN`` and ``wire_code="x_new_code"``.
    """
    try:
        code = ErrorCode(wire_code)
    except ValueError:
        return KeeplinkError(message, code=ErrorCode.UNKNOWN, wire_code=wire_code)
    cls = _CLASS_BY_CODE.get(code, KeeplinkError)
    return cls(message, code=code)


def describe(exc: BaseException) -> str:
    """A short, readable description: ``Connection refused (ECONNREFUSED)``, not the repr."""
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.errno:
        name = errno.errorcode.get(exc.errno)
        # os.strerror, not exc.strerror: asyncio puts "Connect call failed (addr)" there.
        text = os.strerror(exc.errno)
        return f"{text} ({name})" if name else text
    return str(exc) or type(exc).__name__


def broken_from(exc: BaseException, context: str) -> KeeplinkError:
    """Wrap a foreign exception from a channel operation as a typed error (caller chains it).

    The class follows the code: an untrusted certificate is an AuthError, a refused or reset
    connection a LinkBrokenError, and so on.
    """
    code = classify(exc)
    detail = describe(exc)
    cls = _CLASS_BY_CODE.get(code, LinkBrokenError)
    if cls in (
        RejectedError,
        InvalidRequestError,
        ExpiredError,
        RequestCancelledError,
        ConflictError,
        PreconditionFailedError,
        CommandNotFoundError,
        StoreUnavailableError,
        QueueFullError,
    ):
        cls = LinkBrokenError
    return cls(f"{context}: {detail}", code=code)
