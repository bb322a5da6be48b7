"""Logs that help at 3 a.m.: the first failure of a kind loud, its repeats at DEBUG.

A link that cannot reach its device fails the same way every backoff step for hours; one
WARNING says so, and the rest go to DEBUG until it recovers (which is logged at INFO).
:class:`Repeats` remembers which kinds were already logged loud; the caller logs.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Repeats"]

K = TypeVar("K")


class Repeats(Generic[K]):
    """Which kinds of failure (a code, an exception type, a subscriber) were logged loud.

    ``latest_only``: only the latest kind is remembered, so a different failure is loud
    again, and then the first one too (a link that alternates between two errors logs each
    change). Otherwise every kind is remembered until :meth:`recovered`.
    """

    __slots__ = ("_latest_only", "_seen")

    def __init__(self, *, latest_only: bool = False) -> None:
        self._latest_only = latest_only
        self._seen: set[K] = set()

    def first(self, kind: K) -> bool:
        """True the first time ``kind`` is seen (log it at WARNING or ERROR), False for a
        repeat (log it at DEBUG). Either way ``kind`` is remembered from now on."""
        if kind in self._seen:
            return False
        self.note(kind)
        return True

    def note(self, kind: K) -> None:
        """Remember ``kind`` as logged loud (the caller logged it some other way)."""
        if self._latest_only:
            self._seen.clear()
        self._seen.add(kind)

    def recovered(self) -> bool:
        """Forget every kind. Returns True if a failure was remembered: log the recovery
        at INFO."""
        had = bool(self._seen)
        self._seen.clear()
        return had
