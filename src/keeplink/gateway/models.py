"""The HTTP API's bodies, answers and query parameters, declared once.

Each request is validated against these models and each answer is built through them, and
:func:`keeplink.gateway.schema.openapi` generates the OpenAPI document from the same
models, so the document cannot drift from what the gateway accepts and answers.

pydantic (v2) rather than msgspec: its strict mode refuses the lax coercions a JSON API must
not make (``true`` as a number, ``"5"`` as an integer), its JSON parser bounds nesting depth
and reports errors by field, and its JSON Schema output is the OpenAPI 3.1 schema dialect.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
)

from keeplink._core.commands import CommandState
from keeplink._core.dispatch import WaitReason
from keeplink.gateway.history import HOURS_KEPT

__all__ = [
    "Command",
    "CommandList",
    "CommandsQuery",
    "Device",
    "DeviceHistory",
    "DeviceList",
    "Error",
    "EventsQuery",
    "Health",
    "HistoryQuery",
    "Reconnected",
    "Submit",
    "SubmitAccepted",
    "describe",
]

MAX_PRIORITY: Final = 2**31 - 1
MIN_ID_PREFIX: Final = 6
"""The shortest prefix of a command's id (hex digits) the API takes for the whole id."""
MAX_TEXT: Final = 256
"""Longest op, key and idempotency key accepted (characters)."""


class _Body(BaseModel):
    """A request: unknown fields refused, no lax coercion, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Answer(BaseModel):
    """An answer: every field declared (a field the gateway forgot to declare fails loudly)."""

    model_config = ConfigDict(extra="forbid")


def _finite(value: Any) -> Any:
    """Refuse NaN and infinity anywhere inside free-form JSON (``1e400`` parses to inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite (no NaN, Infinity or overflow)")
    if isinstance(value, dict):
        for item in value.values():
            _finite(item)
    elif isinstance(value, list):
        for item in value:
            _finite(item)
    return value


def _ascii_int(value: Any) -> Any:
    """A query integer: plain ASCII digits only (``"²"``, ``"1_000"``, ``" 5"`` refused)."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise ValueError(f"must be an integer written in decimal digits, got {value!r}")
    return value


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
QueryInt = Annotated[int, BeforeValidator(_ascii_int)]


# ---------------------------------------------------------------------------- requests


class Submit(_Body):
    """A durable command for a device."""

    op: Text = Field(description="the operation, e.g. set or firmware")
    args: dict[str, JsonValue] | None = Field(
        default=None, description="the operation's arguments (a JSON object)"
    )
    key: Text | None = Field(
        default=None, description="a newer queued command with the same key supersedes this one"
    )
    ttl_s: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="seconds until the command expires undelivered (default: the gateway's ttl_s)",
    )
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 3
    idempotency_key: Text | None = Field(
        default=None, description="sent with every delivery; the device drops repeats"
    )
    priority: Annotated[int, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)] = 0

    @field_validator("args")
    @classmethod
    def _args_finite(cls, value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
        _finite(value)
        return value


class CommandsQuery(_Answer):
    """``GET /api/commands`` filters."""

    device: str | None = Field(default=None, description="only this device's commands")
    state: str | None = Field(
        default=None,
        description="comma-separated states: " + ", ".join(s.value for s in CommandState),
    )
    limit: Annotated[QueryInt, Field(ge=1, le=10_000)] = 100
    order: Literal["oldest", "newest"] = "oldest"

    @field_validator("state")
    @classmethod
    def _states(cls, value: str | None) -> str | None:
        known = {s.value for s in CommandState}
        if value is not None:
            for each in value.split(","):
                if each not in known:
                    raise ValueError(f"must be one of {sorted(known)}, got {each!r}")
        return value

    def states(self) -> list[CommandState] | None:
        return None if self.state is None else [CommandState(s) for s in self.state.split(",")]


class EventsQuery(_Answer):
    """``GET /api/events`` parameters."""

    since: Annotated[QueryInt, Field(ge=0)] | None = Field(
        default=None, description="replay the buffered events after this seq first"
    )
    access_token: str | None = Field(
        default=None,
        description="the read token, for browsers (a WebSocket cannot carry Authorization)",
    )


class HistoryQuery(_Answer):
    """``GET /api/devices/{device}/history`` parameters."""

    hours: Annotated[QueryInt, Field(ge=1, le=HOURS_KEPT)] = Field(
        default=1, description=f"how far back, in hours (at most {HOURS_KEPT})"
    )


# ---------------------------------------------------------------------------- answers


class Error(_Answer):
    """Every error answer."""

    code: str = Field(description="a stable keeplink error code, e.g. invalid_request")
    message: str


class Waiting(_Answer):
    """Why a queued command is not going out now."""

    reason: WaitReason
    message: str
    until: float | None = Field(default=None, description="epoch seconds of the next look")
    command: str | None = Field(default=None, description="the command it waits behind")


class Command(_Answer):
    id: str
    device: str
    op: str
    args: dict[str, JsonValue]
    state: CommandState
    key: str | None
    idempotency_key: str | None
    priority: int
    attempts: int
    max_attempts: int
    created_at: float
    updated_at: float
    expires_at: float | None
    last_error: Error | None
    result: dict[str, JsonValue] | None
    waiting: Waiting | None = Field(
        description="why it waits; null while it is about to go or is not queued"
    )


class CommandList(_Answer):
    commands: list[Command]


class SubmitAccepted(Command):
    """The stored command, as ``GET /api/commands/{id}`` answers it, with what happens next."""

    device_presence: str = Field(description="the device's presence at submit")
    note: str = Field(description="what happens next, in words")


class ProtocolErrorSeen(_Answer):
    code: str
    message: str = Field(description="the reason, with the start of the offending line")
    at: float = Field(description="epoch seconds")


class ProtocolErrors(_Answer):
    """Malformed input the device sent (each dropped; the link unharmed)."""

    count: int
    last: ProtocolErrorSeen | None


class LateReplySeen(_Answer):
    seq: int
    message: str
    at: float = Field(description="epoch seconds")


class LateReplies(_Answer):
    """Replies that matched no request in flight (after its deadline, or never sent)."""

    count: int
    last: LateReplySeen | None


class DeviceInfo(_Answer):
    """An ESPHome device's DeviceInfo, from its current session: the build it runs is its
    ``project_version`` and ``compilation_time``."""

    name: str | None = None
    friendly_name: str | None = None
    mac: str | None = None
    esphome_version: str | None = None
    project_name: str | None = None
    project_version: str | None = None
    compilation_time: str | None = None
    model: str | None = None
    manufacturer: str | None = None
    has_deep_sleep: bool | None = None
    encrypted: bool | None = Field(default=None, description="the session uses Noise")


class LinkView(_Answer):
    state: str
    last_error: Error | None = None
    attempt: int | None = None
    connects: int | None = None
    disconnects: int | None = None
    retry_in_s: float | None = None
    firmware: str | None = None
    device_info: DeviceInfo | None = Field(
        default=None, description="ESPHome devices: the DeviceInfo of the current session"
    )
    protocol_errors: ProtocolErrors | None = None
    late_replies: LateReplies | None = None


class Parked(_Answer):
    reason: str
    until: float | None


class Device(_Answer):
    id: str
    node: str | None = Field(description="the node delivering to it; null while unowned")
    driver: str
    presence: str
    link: LinkView
    queued: int
    sending: int
    parked: Parked | None


class Reconnected(_Answer):
    reconnect: Literal["started", "woken", "none"] = Field(
        description="started: a failed link tries again; woken: a backoff wait cut short"
    )
    note: str
    device: Device


class Resumed(_Answer):
    resumed: bool = Field(description="true: delivery was parked and resumes now")
    note: str
    device: Device


class DeviceList(_Answer):
    devices: list[Device]


class Span(_Answer):
    """A state held from ``start`` to ``end`` (epoch seconds); ``unknown`` where this node
    knows nothing."""

    state: str
    start: float
    end: float
    error: Error | None = Field(description="for a link state: the error that led to it")


class Outage(_Answer):
    """The link left ``connected`` at ``start`` and was connected again at ``end``."""

    start: float = Field(description="epoch seconds")
    end: float | None = Field(description="epoch seconds; null while it is not back yet")
    duration_s: float = Field(description="so far, while it is not back yet")
    state: str = Field(description="the state it dropped to (lost, backoff or failed)")
    error: Error | None = Field(description="why it dropped")


class HistoryBucket(_Answer):
    """One minute's counters. A minute in which nothing happened has no bucket: its queue
    depth is the ``queued`` of the bucket before it (``queued_at_start`` before the first)."""

    start: float = Field(description="epoch seconds, a multiple of bucket_s")
    queued: int = Field(description="queue depth at the end of the minute (now, for this one)")
    queued_max: int = Field(description="the highest queue depth in the minute")
    connects: int = Field(description="handshakes completed")
    drops: int = Field(description="times the link left connected for lost, backoff or failed")
    protocol_errors: int = Field(description="malformed input the device sent (dropped)")
    delivered: int = Field(description="commands that succeeded")
    failed: int = Field(description="commands that ended failed, rejected or expired")


class HistoryError(_Answer):
    """An error the device's history kept; a repeat of the newest is counted on it."""

    source: Literal["link", "protocol", "command"]
    code: str
    message: str
    first_at: float = Field(description="epoch seconds")
    last_at: float = Field(description="epoch seconds of the latest repeat")
    count: int
    command: str | None = Field(description="the (latest) command, for a command error")


class DeviceHistory(_Answer):
    """A device's last hours as this node saw them: presence and link state spans, the
    link's outages, per-minute counters (queue depth, connects, drops, protocol errors,
    delivered and failed commands) and the last errors.

    Kept in this node's memory from the events it sees, since it started, and bounded per
    device: the last 1,000 state changes, 24 hours of minute buckets, the last 50 distinct
    errors. Before ``known_since`` it knows nothing (it started later, or older changes
    were dropped) and says ``unknown``. In a fleet, a device another node delivers to has
    the history of the events that node relayed to this one (``relayed`` true): a relay this
    node missed is missing here too, and its protocol errors are not relayed at all."""

    device: str
    node: str = Field(description="the node whose memory this is")
    relayed: bool = Field(description="another node of the fleet delivers to the device now")
    since: float = Field(description="the window's start, epoch seconds")
    until: float = Field(description="the window's end: now")
    known_since: float = Field(description="from when on the spans are known")
    bucket_s: int
    presence: list[Span]
    link: list[Span]
    outages: list[Outage]
    queued_at_start: int = Field(description="the queue depth at since")
    buckets: list[HistoryBucket] = Field(description="oldest first; quiet minutes left out")
    errors: list[HistoryError] = Field(description="newest first")


class Fleet(_Answer):
    live_nodes: list[str]
    owned: list[str]


class Health(_Answer):
    status: Literal["ok", "degraded"]
    version: str
    node: str
    devices: int
    links: dict[str, int]
    fleet: Fleet | None = None
    reason: str | None = None


# ---------------------------------------------------------------------------- helpers


def describe(error: ValidationError, *, where: str = "") -> str:
    """One line for the first problem: ``ttl_s: Input should be greater than 0``."""
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    place = f"{where}{loc}" if loc else (where.rstrip(".") or "body")
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{place}: unknown field"
    if first["type"] == "missing":
        return f"{place}: is required"
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{place}: {message}, got {got}"
