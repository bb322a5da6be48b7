"""The fault switches of :class:`~keeplink.testing.FaultProxy` (all but ``set_down``, which
opens and closes the listener): each checks its arguments, writes the proxy's
:class:`Faults` and wakes the pumps."""

from __future__ import annotations

import random

from keeplink.testing.faultproxy._faults import (
    Changes,
    Faults,
    check_direction,
    check_nbytes,
    check_rate,
    check_seconds,
)
from keeplink.testing.faultproxy._pump import Connection


class FaultControls:
    """The fault setters, mixed into :class:`~keeplink.testing.FaultProxy`."""

    _faults: Faults
    _changes: Changes
    _conns: set[Connection]

    def set_black_hole(self, on: bool = True) -> None:
        """Swallow everything: read and discard in both directions, forward nothing, close
        nothing (an EOF is held back until the black hole is switched off).

        Applies to open connections too; data swallowed is lost for good.
        """
        self._faults.black_hole = bool(on)
        self._changes.notify()

    def reset_all(self) -> None:
        """Reset every open connection now.

        The client side is closed with ``SO_LINGER`` 0 (the client sees
        ``ConnectionResetError``, unsent data is dropped); the upstream side is closed
        normally. Counted in ``resets_sent``.
        """
        for conn in list(self._conns):
            conn.kill("rst")

    def set_reset_after(self, nbytes: int | None, *, direction: str = "up") -> None:
        """Reset every connection once it has forwarded ``nbytes`` in ``direction``.

        ``"up"`` counts client->upstream bytes, ``"down"`` upstream->client bytes, since
        the connection opened. The bytes up to the limit are delivered (the upstream side
        is closed normally, after them), nothing after; then the client is reset as by
        :meth:`reset_all`. Open connections that already forwarded that many bytes are
        reset at once. ``None`` removes the limit.

        Raises ``ValueError`` for a negative ``nbytes`` or an unknown direction.
        """
        check_nbytes(nbytes, "nbytes")
        checked = check_direction(direction)
        self._faults.reset_after = None if nbytes is None else (nbytes, checked)
        self._enforce_limits()

    def set_cut_after(self, nbytes: int | None, *, direction: str = "down") -> None:
        """Close every connection (FIN, not RST) once it has forwarded ``nbytes`` in
        ``direction``; the bytes up to the limit are delivered, nothing after.

        Counting is as for :meth:`set_reset_after`; open connections already past the
        limit are closed at once. ``None`` removes the limit. Note that the kernel still
        answers with RST if the client sends more data after the cut.

        Raises ``ValueError`` for a negative ``nbytes`` or an unknown direction.
        """
        check_nbytes(nbytes, "nbytes")
        checked = check_direction(direction)
        self._faults.cut_after = None if nbytes is None else (nbytes, checked)
        self._enforce_limits()

    def set_latency(self, seconds: float, *, jitter: float = 0.0, seed: int | None = None) -> None:
        """Delay every forwarded chunk by ``seconds`` plus a uniform ``[-jitter, +jitter]``
        (never below 0), counted from when the proxy read it; order is preserved.

        ``seed`` makes the jitter repeatable. ``set_latency(0)`` removes the delay, also
        for chunks already waiting. Raises ``ValueError`` for negative or non-finite
        values; nothing is changed then.
        """
        latency = check_seconds(seconds, "seconds")
        spread = check_seconds(jitter, "jitter")
        self._faults.latency, self._faults.jitter = latency, spread
        if seed is not None:
            self._faults.rng = random.Random(seed)
        self._changes.notify()

    def set_slow_close(self, seconds: float) -> None:
        """When one side closes (EOF), pass the close to the other side only after
        ``seconds``; data still flows the other way meanwhile. 0 removes the delay.

        Raises ``ValueError`` for negative or non-finite values.
        """
        self._faults.slow_close = check_seconds(seconds, "seconds")
        self._changes.notify()

    def set_slicer(self, max_chunk: int | None, *, delay: float = 0.0) -> None:
        """Forward data in writes of at most ``max_chunk`` bytes, ``delay`` seconds apart.

        With no delay the pieces are separate writes, but the receiving TCP stack may
        still merge them. ``None`` removes the slicer.

        Raises ``ValueError`` if ``max_chunk`` is below 1 or ``delay`` is negative.
        """
        check_nbytes(max_chunk, "max_chunk", minimum=1)
        spacing = check_seconds(delay, "delay")
        self._faults.slice, self._faults.slice_delay = max_chunk, spacing
        self._changes.notify()

    def set_bandwidth(self, bytes_per_s: float | None) -> None:
        """Limit forwarding to ``bytes_per_s`` in each direction of each connection.

        0 stalls: the proxy stops reading from both sides, so the sender's socket
        buffers fill and its ``drain()`` blocks, until the limit is changed. ``None``
        removes the limit.

        Raises ``ValueError`` for negative or non-finite values.
        """
        self._faults.bandwidth = check_rate(bytes_per_s)
        self._changes.notify()

    def clear(self) -> None:
        """Remove every fault except :meth:`set_down`; stalled or delayed data flows again."""
        self._faults.clear()
        self._changes.notify()

    def _enforce_limits(self) -> None:
        """Apply a changed byte limit to the open connections, then wake the pumps."""
        for conn in list(self._conns):
            conn.enforce_limits()
        self._changes.notify()
