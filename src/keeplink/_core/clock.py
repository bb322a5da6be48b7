"""The clock seam. Every timeout, deadline and backoff in keeplink reads time from a Clock.

The core only declares the protocol; implementations (the system clock and the virtual
clock for tests) live in :mod:`keeplink._clock`, above the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["Clock", "Timer"]


class Timer(Protocol):
    """A scheduled callback. ``cancel()`` is idempotent."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """A monotonic clock that can schedule callbacks on the running event loop.

    ``now()`` is in seconds, on an arbitrary but fixed origin. ``call_at`` runs ``callback``
    on the event loop once ``now() >= when``.
    """

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer: ...
