"""The writes a store commits (:data:`Write`), their encoding for any store
(:func:`encode_writes`), and what crash recovery makes of a command (:func:`recovered`)."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from keeplink._core.commands import Command, CommandState, DeviceRecord, transition
from keeplink._core.dispatch import superseded_info
from keeplink._core.errors import ErrorCode, ErrorInfo, InvalidRequestError
from keeplink.outbox._rows import (
    check_integer,
    check_real,
    check_text,
    command_values,
    device_values,
    new_command_values,
    state_value,
)


@dataclass(frozen=True, slots=True)
class Fence:
    """Who may write a device's delivery state: ``node`` holding the device's lease at
    ``epoch``. A store shared by several nodes makes a fenced write only while that lease
    is current, in the same transaction; otherwise it refuses the whole call with
    :class:`~keeplink.outbox.FencedError`. A store of one process has one owner and no
    leases: it takes a fence as always current."""

    node: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Insert:
    """Store a new ``queued`` command; its result is the stored copy, with its ``seq``."""

    command: Command


@dataclass(frozen=True, slots=True)
class Update:
    """Write the whole record (all fields but ``id`` and ``seq``) if the stored command with
    this id is in state ``expect``; its result is whether it was written."""

    command: Command
    expect: CommandState
    fence: Fence | None = None


@dataclass(frozen=True, slots=True)
class Supersede:
    """Supersede every ``queued`` command of ``device`` with this ``key`` that is older
    (lower ``seq``) than the command ``by``, stamped ``now``; its result is the superseded
    commands, by ``seq``. One indexed statement: it does not read the device's queue."""

    device: str
    key: str
    by: str
    now: float


@dataclass(frozen=True, slots=True)
class PutDevice:
    """Insert or replace a device's record; its result is ``None``."""

    record: DeviceRecord
    fence: Fence | None = None


Write: TypeAlias = Insert | Update | Supersede | PutDevice
WriteResult: TypeAlias = Command | bool | builtins.list[Command] | None


# ---------------------------------------------------------------------- shared semantics


def recovered(command: Command, *, now: float) -> Command:
    """What crash recovery makes of a ``sending`` command (its attempt is already counted)."""
    if command.attempts >= command.max_attempts:
        return transition(
            command,
            CommandState.FAILED,
            now=now,
            last_error=ErrorInfo(
                ErrorCode.CONNECTION_ABORTED.value,
                f"attempts exhausted ({command.attempts} of {command.max_attempts}); "
                "the last one was interrupted by a restart",
            ),
        )
    return transition(command, CommandState.QUEUED, now=now)


# ---------------------------------------------------------------------- encoded writes


@dataclass(frozen=True, slots=True)
class EncodedWrite:
    """A :data:`Write` validated and encoded as column values, ready for any store.

    ``kind`` is ``insert`` (``values``: :func:`command_values`), ``update`` (``values``,
    and ``expect``: a state value), ``supersede`` (``values``: device, key, the newer
    command's id, ``now``, the superseded state and the error code and message it gets)
    or ``device`` (``values``: :func:`device_values`).
    """

    kind: str
    values: tuple[Any, ...]
    expect: str | None = None
    fence: tuple[str, str, int] | None = None
    """``(device, node, epoch)`` of a fenced write."""


_SUPERSEDED: Final = CommandState.SUPERSEDED.value


def encode_writes(writes: Sequence[Write]) -> builtins.list[EncodedWrite]:
    """Validate and encode ``writes``. Raises InvalidRequestError for anything that would
    not round-trip, or for a write that is not one of the write types."""
    if isinstance(writes, str | bytes) or not isinstance(writes, Sequence):
        raise InvalidRequestError(f"writes must be a sequence, got {type(writes).__name__}")
    encoded: builtins.list[EncodedWrite] = []
    for write in writes:
        if isinstance(write, Insert):
            encoded.append(EncodedWrite("insert", new_command_values(write.command)))
        elif isinstance(write, Update):
            values = command_values(write.command)
            encoded.append(
                EncodedWrite(
                    "update",
                    values,
                    state_value(write.expect),
                    _fence(values[1], write.fence),
                )
            )
        elif isinstance(write, Supersede):
            info = superseded_info(check_text("by", write.by))
            encoded.append(
                EncodedWrite(
                    "supersede",
                    (
                        check_text("device", write.device),
                        check_text("key", write.key),
                        write.by,
                        check_real("now", write.now),
                        _SUPERSEDED,
                        info.code,
                        info.message,
                    ),
                )
            )
        elif isinstance(write, PutDevice):
            values = device_values(write.record)
            encoded.append(EncodedWrite("device", values, fence=_fence(values[0], write.fence)))
        else:
            raise InvalidRequestError(f"not a store write: {write!r}")
    return encoded


def _fence(device: str, fence: object) -> tuple[str, str, int] | None:
    if fence is None:
        return None
    if not isinstance(fence, Fence):
        raise InvalidRequestError(f"fence must be a Fence, got {fence!r}")
    return (device, check_text("fence.node", fence.node), check_integer("fence.epoch", fence.epoch))
