"""Command stores: the :class:`CommandStore` protocol and the in-process :class:`MemoryStore`.

A store keeps :class:`~keeplink._core.commands.Command` records and per-device
:class:`~keeplink._core.commands.DeviceRecord` rows. It is deliberately dumb: it assigns
``seq`` on insert, writes a record only through a compare-and-set on the stored state
(:meth:`CommandStore.update`), and answers queries. Which transition is legal, and when,
is decided by the outbox with :func:`~keeplink._core.commands.transition`.

Every store encodes records the same way (:func:`command_values` / :func:`command_from_row`),
so a record read back from any store equals the one written, field by field: ``args``,
``precondition_args`` and ``result`` are JSON objects (stored as JSON text), ``last_error``
is a code and a message, ``None`` stays ``None`` and floats are exact. A value that cannot
be stored that way (a non-JSON argument, a non-string key, NaN, an integer outside 64 bits)
is refused with :class:`~keeplink.InvalidRequestError` by every store alike, before
anything is written.

This module is where those names are imported from; they live in private modules by
responsibility: the protocol (``_protocol``), the writes and their encoding (``_writes``),
the row encoding and validation every store shares (``_rows``), and ``_memory``.
"""

from keeplink.outbox._memory import MemoryStore
from keeplink.outbox._protocol import CommandStore
from keeplink.outbox._rows import (
    COMMAND_COLUMNS,
    DEVICE_COLUMNS,
    LIST_LIMIT_MAX,
    command_from_row,
    command_values,
    device_from_row,
    device_values,
    id_prefix_bounds,
)
from keeplink.outbox._writes import (
    Fence,
    Insert,
    PutDevice,
    Supersede,
    Update,
    Write,
    WriteResult,
    recovered,
)

__all__ = [
    "COMMAND_COLUMNS",
    "DEVICE_COLUMNS",
    "LIST_LIMIT_MAX",
    "CommandStore",
    "Fence",
    "Insert",
    "MemoryStore",
    "PutDevice",
    "Supersede",
    "Update",
    "Write",
    "WriteResult",
    "command_from_row",
    "command_values",
    "device_from_row",
    "device_values",
    "id_prefix_bounds",
    "recovered",
]
