"""The outbox's typed events: each announced after what it reports was persisted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from keeplink._core.commands import Command, CommandState
from keeplink._core.dispatch import Waiting

__all__ = [
    "CommandStateChanged",
    "CommandWaiting",
    "DeliveryParked",
    "FirmwareProgress",
    "OutboxEvent",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandStateChanged:
    """A command's new state, announced after it was persisted."""

    command: Command
    old: CommandState | None
    """None for a newly submitted command."""
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryParked:
    """The breaker parked (or resumed: ``reason`` None) delivery to a device."""

    device: str
    reason: str | None
    until: float | None
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandWaiting:
    """The head of a device's queue waits (a retry time, a precondition, the breaker…), or
    moves again (``waiting`` None). The commands behind it wait behind it."""

    device: str
    command_id: str | None
    waiting: Waiting | None
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FirmwareProgress:
    """How far a transfer has come (the device's acknowledged offset)."""

    command_id: str
    device: str
    offset: int
    size: int
    percent: float
    rate_bps: float
    """Acknowledged bytes per second since the transfer started."""
    bytes_sent: int
    """Image bytes written so far, re-sends included."""
    resumes: int
    at: float


OutboxEvent: TypeAlias = CommandStateChanged | DeliveryParked | CommandWaiting | FirmwareProgress
"""Every event :meth:`~keeplink.outbox.Outbox.subscribe` delivers."""
