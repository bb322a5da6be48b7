"""Durable commands: stores, dispatcher, outbox."""

from keeplink._core.commands import (
    COMMAND_TRANSITIONS,
    FINAL_STATES,
    Command,
    CommandState,
    DeviceRecord,
)
from keeplink._core.dispatch import PreconditionResult, Waiting, WaitReason
from keeplink._core.errors import FencedError
from keeplink.outbox._outbox import (
    DeliveryContext,
    Executor,
    Outbox,
    Precondition,
    min_online,
)
from keeplink.outbox.events import (
    CommandStateChanged,
    CommandWaiting,
    DeliveryParked,
    FirmwareProgress,
    OutboxEvent,
)
from keeplink.outbox.firmware import FirmwareTransfer, image_matches
from keeplink.outbox.sqlite import SqliteStore
from keeplink.outbox.store import CommandStore, Fence, MemoryStore

__all__ = [
    "COMMAND_TRANSITIONS",
    "FINAL_STATES",
    "Command",
    "CommandState",
    "CommandStateChanged",
    "CommandStore",
    "CommandWaiting",
    "DeliveryContext",
    "DeliveryParked",
    "DeviceRecord",
    "Executor",
    "Fence",
    "FencedError",
    "FirmwareProgress",
    "FirmwareTransfer",
    "MemoryStore",
    "Outbox",
    "OutboxEvent",
    "Precondition",
    "PreconditionResult",
    "SqliteStore",
    "WaitReason",
    "Waiting",
    "image_matches",
    "min_online",
]
