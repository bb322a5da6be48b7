"""What the simulator records and reports: the commands it applied, its statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class AppliedCommand:
    """One command the device applied (a duplicate idempotency key is not applied again)."""

    op: str
    args: Mapping[str, Any]
    key: str | None
    seq: int
    connection: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SimStatistics:
    connections_total: int
    connections_active: int
    max_concurrent: int
    auth_failures: int
    requests: int
    duplicates: int
    pings: int
    malformed: int
    asleep: bool
    acks_sent: int
    sessions_active: int
    """Connections past the handshake (welcomed) and not yet closed."""
    max_sessions: int
    max_outstanding: int
    """Most requests received but not yet answered at once (on one connection)."""


class Refused(Exception):
    """The device refuses a request: answered with a refusing ack of ``code``."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
