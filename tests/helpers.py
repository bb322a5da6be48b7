"""Small helpers shared by the tests (no logic of the code under test is repeated here)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from keeplink import Link, LinkEvent, LinkState, LinkStateChanged, SessionInfo

# A safety bound for waits on real socket I/O (never a timing rule: those run in virtual
# time). Generous, because CI machines are slow and noisy.
IO_BOUND_S = 10.0


async def eventually(predicate: Callable[[], bool], *, what: str = "condition") -> None:
    """Wait until ``predicate()`` holds, yielding to the loop; fail after IO_BOUND_S."""
    async with asyncio.timeout(IO_BOUND_S):
        while not predicate():  # noqa: ASYNC110 - polls the effects of real I/O
            await asyncio.sleep(0.001)
    assert predicate(), what


async def connected(link: Link[Any]) -> SessionInfo:
    """Wait until the link is connected (raises its terminal error); fail after IO_BOUND_S."""
    async with asyncio.timeout(IO_BOUND_S):
        return await link.wait_connected()


async def until_state(link: Link[object], *states: LinkState) -> LinkState:
    async with asyncio.timeout(IO_BOUND_S):
        return await link.wait_for_state(*states)


class Recorder:
    """Subscribes to a link and keeps every event, for assertions on exact sequences."""

    def __init__(self, link: Link[object]) -> None:
        self.events: list[LinkEvent] = []
        self.unsubscribe = link.subscribe(self.events.append)

    def states(self) -> list[LinkState]:
        return [e.new for e in self.events if isinstance(e, LinkStateChanged)]

    def transitions(self) -> list[LinkStateChanged]:
        return [e for e in self.events if isinstance(e, LinkStateChanged)]

    def of(self, kind: type) -> list[LinkEvent]:
        return [e for e in self.events if isinstance(e, kind)]


async def io_settle() -> None:
    """Give real sockets a moment to carry what was written at this virtual instant.

    Tests that run timing rules on a VirtualClock step it forward; between steps, bytes on
    loopback still travel in real time. This is that travel time, never a timing rule.
    """
    await asyncio.sleep(0.002)
