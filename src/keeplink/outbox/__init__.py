"""Durable commands: stores, dispatcher, outbox."""

from keeplink._core.commands import (
    COMMAND_TRANSITIONS,
    FINAL_STATES,
    Command,
    CommandState,
    DeviceRecord,
)
from keeplink.outbox._outbox import (
    CommandStateChanged,
    DeliveryContext,
    DeliveryParked,
    Executor,
    Outbox,
    OutboxEvent,
    Precondition,
    PreconditionResult,
    min_online,
)
from keeplink.outbox.firmware import FirmwareProgress, FirmwareTransfer, image_matches
from keeplink.outbox.sqlite import SqliteStore
from keeplink.outbox.store import CommandStore, MemoryStore

__all__ = [
    "COMMAND_TRANSITIONS",
    "FINAL_STATES",
    "Command",
    "CommandState",
    "CommandStateChanged",
    "CommandStore",
    "DeliveryContext",
    "DeliveryParked",
    "DeviceRecord",
    "Executor",
    "FirmwareProgress",
    "FirmwareTransfer",
    "MemoryStore",
    "Outbox",
    "OutboxEvent",
    "Precondition",
    "PreconditionResult",
    "SqliteStore",
    "image_matches",
    "min_online",
]
