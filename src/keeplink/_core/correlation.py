"""Request correlation, sans-IO: sequence numbers for one link and the requests in flight.

A request goes out carrying a sequence number and the device echoes it in its reply. The
:class:`Correlator` hands out those numbers and remembers, per number, what waits for the
reply (a *token*: the async layer above attaches a future) and until when.

Every request leaves exactly once, through one of four doors: :meth:`Correlator.resolve`
(the reply came), :meth:`Correlator.cancel` (the caller gave up), :meth:`Correlator.expire`
(its deadline passed) or :meth:`Correlator.drain` (the link stops). Once an entry is out,
no call returns it again.

Nothing here awaits or reads a clock: deadlines are plain numbers on the caller's clock,
and :meth:`Correlator.expire` is told what time it is.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from keeplink._core.errors import ErrorCode, KeeplinkError

__all__ = [
    "SEQUENCE_WIDTHS",
    "Correlator",
    "CorrelatorStatistics",
    "Pending",
    "SequenceExhaustedError",
]

T = TypeVar("T")

SEQUENCE_WIDTHS: Final[tuple[int, ...]] = (8, 16, 32)
# The widths devices put on the wire: a byte, a short or a word. Anything else is a typo.

_COMPACT_MIN_STALE: Final = 64
# Resolved entries leave their heap slot behind (lazy deletion). Below this many dead slots
# a rebuild costs more than the memory it frees; above it, the heap is rebuilt once the dead
# outnumber the live, which keeps it within twice the live size at O(1) amortised cost.


class SequenceExhaustedError(KeeplinkError):
    """No sequence number can be allocated now.

    Either the in-flight limit is reached or every number of the width is in flight. Only
    :meth:`Correlator.allocate_nowait` raises it; the async layer above waits for a free
    number instead. Nothing was registered and the correlator is unchanged.
    """

    default_code = ErrorCode.DEVICE_UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Pending(Generic[T]):
    """One request in flight: its sequence number, its deadline and the caller's token."""

    seq: int
    deadline: float | None
    """On the caller's clock. ``None`` never expires: only a reply, cancel or drain end it."""
    token: T
    """Whatever the caller attached (the async layer puts the reply's future here)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CorrelatorStatistics:
    """Counters since construction. ``allocated_total`` always equals ``resolved_total +
    expired_total + cancelled_total + in_flight``."""

    allocated_total: int
    resolved_total: int
    expired_total: int
    cancelled_total: int
    """Entries removed by :meth:`Correlator.cancel` or :meth:`Correlator.drain`."""
    unknown_replies: int
    """:meth:`Correlator.resolve` calls whose number was not in flight (late or bogus)."""
    in_flight: int
    max_in_flight_seen: int


class Correlator(Generic[T]):
    """Sequence numbers for one link and the requests in flight on it.

    ``bits`` is the width of the sequence number on the wire (8, 16 or 32); numbers live in
    ``[0, 2**bits)``. ``max_in_flight`` caps the requests outstanding at once (``None``: the
    whole space). ``name`` names the link in error messages.

    Raises :class:`ValueError` on construction if ``bits`` is not a supported width or
    ``max_in_flight`` is not an integer in ``[1, 2**bits]``.
    """

    __slots__ = (
        "_allocated_total",
        "_bits",
        "_cancelled_total",
        "_entries",
        "_expired_total",
        "_heap",
        "_last",
        "_max_in_flight",
        "_max_in_flight_seen",
        "_modulus",
        "_name",
        "_resolved_total",
        "_serial",
        "_stale",
        "_unknown_replies",
    )

    def __init__(
        self, *, bits: int = 32, max_in_flight: int | None = None, name: str = "link"
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SEQUENCE_WIDTHS:
            raise ValueError(f"bits must be one of {SEQUENCE_WIDTHS}, got {bits!r}")
        modulus = 1 << bits
        if max_in_flight is None:
            max_in_flight = modulus
        elif (
            isinstance(max_in_flight, bool)
            or not isinstance(max_in_flight, int)
            or not 1 <= max_in_flight <= modulus
        ):
            raise ValueError(
                f"max_in_flight must be an integer in [1, {modulus}] for {bits}-bit sequence "
                f"numbers, or None, got {max_in_flight!r}"
            )
        self._bits = bits
        self._modulus = modulus
        self._max_in_flight = max_in_flight
        self._name = name
        # seq -> (allocation serial, entry), in allocation order. The serial tells a live
        # heap slot from a dead one left by an earlier request that had the same number.
        self._entries: dict[int, tuple[int, Pending[T]]] = {}
        # (deadline, serial, seq); the unique serial breaks deadline ties in allocation order.
        self._heap: list[tuple[float, int, int]] = []
        self._stale = 0  # heap slots whose request has already left
        self._last = modulus - 1  # so the first number allocated is 0
        self._serial = 0
        self._allocated_total = 0
        self._resolved_total = 0
        self._expired_total = 0
        self._cancelled_total = 0
        self._unknown_replies = 0
        self._max_in_flight_seen = 0

    def __repr__(self) -> str:
        return (
            f"<Correlator {self._name!r} bits={self._bits} "
            f"in_flight={len(self._entries)}/{self._max_in_flight}>"
        )

    @property
    def bits(self) -> int:
        """Width of the sequence number on the wire."""
        return self._bits

    @property
    def modulus(self) -> int:
        """``2**bits``: how many distinct sequence numbers there are."""
        return self._modulus

    @property
    def max_in_flight(self) -> int:
        """The most requests that may be outstanding at once."""
        return self._max_in_flight

    @property
    def name(self) -> str:
        """The link's name, as used in error messages."""
        return self._name

    @property
    def in_flight(self) -> int:
        """Requests allocated and not yet resolved, cancelled, expired or drained."""
        return len(self._entries)

    @property
    def full(self) -> bool:
        """True when :meth:`allocate_nowait` would raise :class:`SequenceExhaustedError`."""
        return len(self._entries) >= self._max_in_flight

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq: object) -> bool:
        """Whether ``seq`` (taken modulo ``2**bits``, as :meth:`resolve` does) is in flight."""
        return isinstance(seq, int) and seq % self._modulus in self._entries

    def allocate_nowait(self, token: T, *, deadline: float | None) -> int:
        """Register a request waiting with ``token`` and return its sequence number.

        Numbers cycle: the candidate is the one after the last allocated (modulo
        ``2**bits``), skipping any still in flight. A released number therefore comes back
        only after the rest of the space has been used, so a late reply to a request that
        already left is unlikely to be taken for a new one.

        ``deadline`` is on the caller's clock; ``None`` never expires.

        Raises :class:`SequenceExhaustedError` if the in-flight limit is reached (or every
        number is in flight) and :class:`ValueError` if ``deadline`` is NaN; in both cases
        nothing is registered and the state is unchanged.
        """
        if deadline is not None and deadline != deadline:  # NaN, without a call
            raise ValueError("deadline must be a number or None, got nan")
        entries = self._entries
        in_flight = len(entries)
        if in_flight >= self._max_in_flight:
            raise SequenceExhaustedError(self._exhausted_message())
        modulus = self._modulus
        seq = (self._last + 1) % modulus
        if seq in entries:
            # Bounded: fewer than `modulus` numbers are in flight, so a free one turns up
            # within `in_flight + 1` steps; usually the first candidate is free.
            for _ in range(modulus):
                seq = (seq + 1) % modulus
                if seq not in entries:
                    break
            else:  # pragma: no cover - unreachable while in_flight < max_in_flight <= modulus
                raise SequenceExhaustedError(self._exhausted_message())
        serial = self._serial
        self._serial = serial + 1
        self._last = seq
        entries[seq] = (serial, Pending(seq, deadline, token))
        if deadline is not None:
            heapq.heappush(self._heap, (deadline, serial, seq))
        self._allocated_total += 1
        if in_flight >= self._max_in_flight_seen:
            self._max_in_flight_seen = in_flight + 1
        return seq

    def resolve(self, seq: int) -> Pending[T] | None:
        """The reply for ``seq`` arrived: remove and return its entry.

        ``seq`` is taken modulo ``2**bits`` (a device echoes it at its own width). A number
        not in flight (a late reply to an expired or cancelled request, or a bogus one)
        returns ``None``, counts in ``unknown_replies`` and changes nothing else; the caller
        logs it at debug level and drops it.
        """
        pending = self._remove(seq)
        if pending is None:
            self._unknown_replies += 1
        else:
            self._resolved_total += 1
        return pending

    def cancel(self, seq: int) -> Pending[T] | None:
        """The caller gave up on ``seq``: remove and return its entry.

        Same as :meth:`resolve` (including the modulo) but counted as cancelled. A number
        not in flight returns ``None`` and changes nothing.
        """
        pending = self._remove(seq)
        if pending is not None:
            self._cancelled_total += 1
        return pending

    def expire(self, now: float) -> list[Pending[T]]:
        """Remove and return every entry whose deadline is ``<= now``.

        Earliest deadline first; equal deadlines in allocation order. Entries without a
        deadline, or due later, stay. Raises :class:`ValueError` if ``now`` is NaN (nothing
        is removed).
        """
        if math.isnan(now):
            raise ValueError("now must be a number, got nan")
        heap = self._heap
        entries = self._entries
        due: list[Pending[T]] = []
        while heap and heap[0][0] <= now:
            _, serial, seq = heapq.heappop(heap)
            entry = entries.get(seq)
            if entry is None or entry[0] != serial:
                self._stale -= 1
                continue
            del entries[seq]
            due.append(entry[1])
        self._expired_total += len(due)
        return due

    def next_deadline(self) -> float | None:
        """The earliest deadline still in flight, or ``None`` if no entry has one.

        O(1) amortised: it only discards dead heap slots from the top.
        """
        heap = self._heap
        entries = self._entries
        while heap:
            deadline, serial, seq = heap[0]
            entry = entries.get(seq)
            if entry is not None and entry[0] == serial:
                return deadline
            heapq.heappop(heap)
            self._stale -= 1
        return None

    def drain(self) -> list[Pending[T]]:
        """Remove and return every entry, in allocation order (for ``stop()``).

        They count as cancelled. The correlator is empty afterwards but keeps its position
        in the number cycle, so numbers just drained are not the next ones handed out.
        """
        drained = [pending for _, pending in self._entries.values()]
        self._entries.clear()
        self._heap.clear()
        self._stale = 0
        self._cancelled_total += len(drained)
        return drained

    def statistics(self) -> CorrelatorStatistics:
        """A snapshot of the counters."""
        return CorrelatorStatistics(
            allocated_total=self._allocated_total,
            resolved_total=self._resolved_total,
            expired_total=self._expired_total,
            cancelled_total=self._cancelled_total,
            unknown_replies=self._unknown_replies,
            in_flight=len(self._entries),
            max_in_flight_seen=self._max_in_flight_seen,
        )

    def _remove(self, seq: int) -> Pending[T] | None:
        entry = self._entries.pop(seq % self._modulus, None)
        if entry is None:
            return None
        pending = entry[1]
        if pending.deadline is not None:
            self._stale += 1
            if self._stale > _COMPACT_MIN_STALE and self._stale * 2 > len(self._heap):
                self._compact()
        return pending

    def _compact(self) -> None:
        entries = self._entries
        live = []
        for slot in self._heap:
            entry = entries.get(slot[2])
            if entry is not None and entry[0] == slot[1]:
                live.append(slot)
        heapq.heapify(live)
        self._heap = live
        self._stale = 0

    def _exhausted_message(self) -> str:
        if self._max_in_flight == self._modulus:
            return (
                f"all {self._modulus} sequence numbers of the {self._bits}-bit space are in "
                f"flight on link {self._name!r}"
            )
        return f"in-flight limit {self._max_in_flight} reached on link {self._name!r}"
