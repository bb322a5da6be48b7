"""keeplink: reliable links to unreliable devices.

The public API is what ``__all__`` lists; everything in ``keeplink._*`` is private.
"""

from keeplink._channel import Codec, StreamChannel
from keeplink._clock import SystemClock, VirtualClock, WallClock, deadline, sleep_until
from keeplink._core.backoff import Backoff
from keeplink._core.classify import MESSAGE_MARKERS, classify, error_from_code
from keeplink._core.clock import Clock, Timer
from keeplink._core.correlation import Correlator, SequenceExhaustedError
from keeplink._core.errors import (
    AbortedError,
    AuthError,
    CommandNotFoundError,
    ConfigError,
    ConflictError,
    DeviceMismatchError,
    DeviceNotFoundError,
    DeviceUnavailableError,
    ErrorClass,
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
    WaitTimeoutError,
    error_class_of,
)
from keeplink._core.jsonline import Malformed, StatePush
from keeplink._core.outcomes import (
    Acknowledged,
    Cancelled,
    Outcome,
    Rejected,
    TimedOut,
    Unavailable,
    enum_or_none,
)
from keeplink._core.states import IllegalTransitionError, LinkState
from keeplink._driver import Channel, Driver, FrameChannel, HeartbeatReply, Reply, SessionInfo
from keeplink._events import (
    ErrorInfo,
    FrameReceived,
    LinkEvent,
    LinkStateChanged,
    ProtocolErrorSeen,
    SideDataReceived,
)
from keeplink._link import LIVENESS_RATIO, Link, LinkStatistics
from keeplink._slots import Slot, SlotPool, SlotPoolStatistics

__version__ = "0.1.0"

__all__ = [
    "LIVENESS_RATIO",
    "MESSAGE_MARKERS",
    "AbortedError",
    "Acknowledged",
    "AuthError",
    "Backoff",
    "Cancelled",
    "Channel",
    "Clock",
    "Codec",
    "CommandNotFoundError",
    "ConfigError",
    "ConflictError",
    "Correlator",
    "DeviceMismatchError",
    "DeviceNotFoundError",
    "DeviceUnavailableError",
    "Driver",
    "ErrorClass",
    "ErrorCode",
    "ErrorInfo",
    "ExpiredError",
    "FrameChannel",
    "FrameReceived",
    "HeartbeatReply",
    "IllegalTransitionError",
    "InvalidRequestError",
    "KeeplinkError",
    "Link",
    "LinkBrokenError",
    "LinkClosedError",
    "LinkEvent",
    "LinkState",
    "LinkStateChanged",
    "LinkStatistics",
    "Malformed",
    "Outcome",
    "PreconditionFailedError",
    "ProtocolError",
    "ProtocolErrorSeen",
    "QueueFullError",
    "Rejected",
    "RejectedError",
    "Reply",
    "RequestCancelledError",
    "RequestTimeout",
    "SequenceExhaustedError",
    "SessionInfo",
    "SideDataReceived",
    "Slot",
    "SlotPool",
    "SlotPoolStatistics",
    "SlotsExhaustedError",
    "StatePush",
    "StoreBusyError",
    "StoreUnavailableError",
    "StreamChannel",
    "SystemClock",
    "TimedOut",
    "Timer",
    "Unavailable",
    "VirtualClock",
    "WaitTimeoutError",
    "WallClock",
    "__version__",
    "classify",
    "deadline",
    "enum_or_none",
    "error_class_of",
    "error_from_code",
    "sleep_until",
]
