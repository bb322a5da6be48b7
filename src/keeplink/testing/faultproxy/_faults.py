"""The fault proxy's faults as plain data, their argument checks, and the signal that wakes
every pump when one of them changes."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

Direction = Literal["up", "down"]
KillMode = Literal["close", "rst", "abort"]
DIRECTIONS: Final[tuple[Direction, ...]] = ("up", "down")


@dataclass(slots=True)
class Faults:
    """Every fault setting of one proxy: the setters write it, every pump reads it."""

    down: bool = False
    black_hole: bool = False
    reset_after: tuple[int, Direction] | None = None
    cut_after: tuple[int, Direction] | None = None
    latency: float = 0.0
    jitter: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    slow_close: float = 0.0
    slice: int | None = None
    slice_delay: float = 0.0
    bandwidth: float | None = None

    def clear(self) -> None:
        """Every fault off except ``down`` (the jitter's random generator is kept)."""
        self.black_hole = False
        self.reset_after = None
        self.cut_after = None
        self.latency = 0.0
        self.jitter = 0.0
        self.slow_close = 0.0
        self.slice = None
        self.slice_delay = 0.0
        self.bandwidth = None

    def due(self, read_at: float, jitter_sample: float) -> float:
        """When a chunk read at ``read_at`` may be forwarded under the current latency."""
        return read_at + max(0.0, self.latency + jitter_sample * self.jitter)

    def limit(self, forwarded: int, direction: Direction) -> tuple[int | None, KillMode]:
        """Bytes a connection that already forwarded ``forwarded`` in ``direction`` may
        still forward there (None: no limit), and the kill that follows reaching it; a
        reset wins over a cut at the same byte."""
        room: int | None = None
        action: KillMode = "close"
        limits: tuple[tuple[tuple[int, Direction] | None, KillMode], ...] = (
            (self.reset_after, "rst"),
            (self.cut_after, "close"),
        )
        for limit, kind in limits:
            if limit is None or limit[1] != direction:
                continue
            left = max(0, limit[0] - forwarded)
            if room is None or left < room or (left == room and kind == "rst"):
                room, action = left, kind
        return room, action


def resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Changes:
    """Wakes every pump waiting for a fault to change."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        for fut in list(self._waiters):
            resolve(fut)

    async def wait(self, timeout: float | None) -> None:
        """Wait until a fault setting changes, or ``timeout`` seconds (None: no limit)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.add(fut)
        timer = None if timeout is None else loop.call_later(timeout, resolve, fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if timer is not None:
                timer.cancel()

    async def sleep_until(self, deadline: Callable[[], float]) -> None:
        """Wait until ``loop.time() >= deadline()``, re-reading the deadline on changes."""
        loop = asyncio.get_running_loop()
        while (left := deadline() - loop.time()) > 0:
            await self.wait(left)


# ---------------------------------------------------------------------- argument checks


def check_loopback(host: str, what: str) -> str:
    """Return the address to use for ``host``; ``ValueError`` unless it is loopback."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"{what} must be a loopback address (127.0.0.0/8, ::1 or 'localhost'), got {host!r}"
        )
    return host


def check_port(port: int, what: str, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise ValueError(f"{what} must be an integer in {low}..65535, got {port!r}")


def check_seconds(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_nbytes(nbytes: int | None, what: str, *, minimum: int = 0) -> None:
    if nbytes is None:
        return
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < minimum:
        raise ValueError(f"{what} must be None or an integer >= {minimum}, got {nbytes!r}")


def check_direction(direction: str) -> Direction:
    if direction == "up":
        return "up"
    if direction == "down":
        return "down"
    raise ValueError(
        f"direction must be 'up' (client->upstream) or 'down' (upstream->client), got {direction!r}"
    )


def check_rate(bytes_per_s: float | None) -> float | None:
    if bytes_per_s is None:
        return None
    if isinstance(bytes_per_s, bool) or not isinstance(bytes_per_s, (int, float)):
        raise ValueError(f"bytes_per_s must be None or a number, got {bytes_per_s!r}")
    if not math.isfinite(bytes_per_s) or bytes_per_s < 0:
        raise ValueError(f"bytes_per_s must be None or a finite number >= 0, got {bytes_per_s!r}")
    return float(bytes_per_s)
