"""keeplink's pytest plugin: a virtual clock fixture and a leak check for every test.

Enable it in your ``conftest.py``::

    pytest_plugins = ["keeplink.testing.pytest_plugin"]

Then every test fails if it leaves an asyncio task running or a timer scheduled on the
event loop (or on a ``virtual_clock``) when it ends: a link that was not stopped, a
simulator that was not closed, a heartbeat that outlived its session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from keeplink._clock import VirtualClock

__all__ = ["leak_report", "virtual_clock"]

# Loop iterations granted to cancelled tasks to finish before they count as leaked.
_GRACE_ROUNDS = 10


def leak_report(loop: asyncio.AbstractEventLoop, before: set[asyncio.Task[object]]) -> list[str]:
    """Tasks still running (not in ``before``) and timers still scheduled on ``loop``."""
    current = asyncio.current_task()
    problems = [
        f"task left running: {task.get_name()} {task.get_coro()!r}"
        for task in asyncio.all_tasks(loop)
        if task is not current and task not in before and not task.done()
    ]
    scheduled = getattr(loop, "_scheduled", [])  # asyncio's heap of TimerHandles
    problems += [
        f"timer left scheduled: {handle!r}" for handle in scheduled if not handle.cancelled()
    ]
    return problems


@pytest_asyncio.fixture(autouse=True)
async def _keeplink_leak_check() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    before = set(asyncio.all_tasks(loop))
    yield
    problems: list[str] = []
    for _ in range(_GRACE_ROUNDS):
        problems = leak_report(loop, before)
        if not problems:
            return
        await asyncio.sleep(0)
    pytest.fail("test left work behind:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def virtual_clock() -> Iterator[VirtualClock]:
    """A :class:`VirtualClock` at t=0; the test fails if it leaves a timer pending on it."""
    clock = VirtualClock()
    yield clock
    if clock.live_timers:
        pytest.fail(
            f"test left {clock.live_timers} timer(s) on the virtual clock at {clock.pending()}",
            pytrace=False,
        )
