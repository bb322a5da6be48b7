"""Durable commands, sans-IO: the record, its states and the one transition table.

A command is stored before anything is attempted and every change of state is a new,
frozen :class:`Command` made by :func:`transition`, which refuses what the table forbids.
Times are wall-clock seconds (epoch), because commands outlive the process.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from keeplink._core.errors import ErrorInfo, InvalidRequestError
from keeplink._core.requests import is_key, is_name
from keeplink._core.states import IllegalTransitionError

__all__ = [
    "COMMAND_TRANSITIONS",
    "FINAL_STATES",
    "Command",
    "CommandState",
    "DeviceRecord",
    "new_command",
    "transition",
]


class CommandState(enum.StrEnum):
    QUEUED = "queued"
    """Stored; waiting for the device to be present and its link up."""
    SENDING = "sending"
    """Being delivered now (its attempt is already counted)."""
    SUCCEEDED = "succeeded"
    """The device acknowledged it."""
    FAILED = "failed"
    """Gave up: attempts exhausted, or a precondition failed for good."""
    REJECTED = "rejected"
    """The device refused it. Never retried."""
    EXPIRED = "expired"
    """Its deadline passed before it could be delivered."""
    CANCELLED = "cancelled"
    """Cancelled by a user."""
    SUPERSEDED = "superseded"
    """A newer command with the same ``key`` replaced it while it was queued."""


_C = CommandState

FINAL_STATES: Final = frozenset(
    {_C.SUCCEEDED, _C.FAILED, _C.REJECTED, _C.EXPIRED, _C.CANCELLED, _C.SUPERSEDED}
)

COMMAND_TRANSITIONS: Final[dict[CommandState, frozenset[CommandState]]] = {
    _C.QUEUED: frozenset({_C.SENDING, _C.FAILED, _C.EXPIRED, _C.CANCELLED, _C.SUPERSEDED}),
    # SENDING -> QUEUED: a retryable failure (attempt counted), or recovery after a crash.
    _C.SENDING: frozenset(
        {_C.QUEUED, _C.SUCCEEDED, _C.FAILED, _C.REJECTED, _C.EXPIRED, _C.CANCELLED}
    ),
    **{state: frozenset() for state in FINAL_STATES},
}

MAX_ATTEMPTS_LIMIT: Final = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """One durable command for one device. Frozen: every change is a new record."""

    id: str
    device: str
    op: str
    args: Mapping[str, Any]
    state: CommandState
    created_at: float
    updated_at: float
    idempotency_key: str
    """Travels with the command to the device, which drops a duplicate it already applied."""
    key: str | None = None
    """Supersede key: a newer queued command with the same key replaces this one."""
    priority: int = 0
    """Higher first; FIFO (``seq``) among equals."""
    max_attempts: int = 3
    attempts: int = 0
    expires_at: float | None = None
    precondition: str | None = None
    precondition_args: Mapping[str, Any] = field(default_factory=dict)
    last_error: ErrorInfo | None = None
    result: Mapping[str, Any] | None = None
    cycle: int = 0
    """The device's delivery cycle of the last attempt: at most one delivery per cycle."""
    retry_at: float | None = None
    """Set when an attempt failed on a link that stayed up (a lost ack): the command may be
    tried again in the same cycle from this time on, with the same idempotency key."""
    seq: int = 0
    """Submission order, assigned by the store on insert."""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRecord:
    """Per-device delivery state that must survive a restart (the breaker)."""

    device: str
    cycle: int = 0
    """Delivery cycles seen so far (one each time the device becomes deliverable: present
    and its link up), kept across restarts so that "at most one delivery per cycle" still
    holds after a crash."""
    failed_cycles: int = 0
    """Consecutive delivery cycles whose deliveries all failed."""
    failed_cycle: int = 0
    """The last cycle counted in ``failed_cycles`` (a cycle counts once, however many of
    its attempts fail)."""
    parked_reason: str | None = None
    """Set when the breaker parks delivery: why, in words for people."""
    parked_until: float | None = None


def new_command(
    *,
    device: str,
    op: str,
    args: Mapping[str, Any] | None,
    now: float,
    key: str | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
    max_attempts: int = 3,
    ttl_s: float | None = None,
    precondition: str | None = None,
    precondition_args: Mapping[str, Any] | None = None,
) -> Command:
    """A new queued command. Raises InvalidRequestError for arguments that make no sense."""
    if not is_name(device):
        raise InvalidRequestError(f"device must be a non-empty string, got {device!r}")
    if not is_name(op):
        raise InvalidRequestError(f"op must be a non-empty string, got {op!r}")
    if args is not None and not isinstance(args, Mapping):
        raise InvalidRequestError(f"args must be an object, got {type(args).__name__}")
    if not is_key(key):
        raise InvalidRequestError(f"key must be a non-empty string, got {key!r}")
    if not is_key(idempotency_key):
        raise InvalidRequestError(
            f"idempotency_key must be a non-empty string, got {idempotency_key!r}"
        )
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT
    ):
        raise InvalidRequestError(
            f"max_attempts must be an integer in 1..{MAX_ATTEMPTS_LIMIT}, got {max_attempts!r}"
        )
    if ttl_s is not None and (
        isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not ttl_s > 0
    ):
        raise InvalidRequestError(f"ttl_s must be a positive number, got {ttl_s!r}")
    command_id = uuid.uuid4().hex
    return Command(
        id=command_id,
        device=device,
        op=op,
        args=dict(args or {}),
        state=CommandState.QUEUED,
        created_at=now,
        updated_at=now,
        idempotency_key=idempotency_key or command_id,
        key=key,
        priority=priority,
        max_attempts=max_attempts,
        expires_at=None if ttl_s is None else now + ttl_s,
        precondition=precondition,
        precondition_args=dict(precondition_args or {}),
    )


def transition(command: Command, new: CommandState, *, now: float, **changes: Any) -> Command:
    """The command in state ``new`` (with ``changes``), stamped ``updated_at=now``.

    Raises IllegalTransitionError if the table does not allow ``command.state -> new``.
    """
    if new not in COMMAND_TRANSITIONS[command.state]:
        raise IllegalTransitionError(
            f"illegal command transition {command.state.value} -> {new.value} ({command.id})"
        )
    return replace(command, state=new, updated_at=now, **changes)
