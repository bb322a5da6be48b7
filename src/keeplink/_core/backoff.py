"""Reconnect backoff: capped exponential growth with full jitter, shaped by the error class.

Sans-IO: :meth:`Backoff.delay` takes the attempt number, the error class and a random draw
in ``[0, 1]`` and returns the delay. The link supplies the draw, so tests can pin it and
assert a schedule exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from keeplink._core.errors import ConfigError, ErrorClass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """When to try again after a failed attempt.

    ``attempt`` counts failed attempts since the last completed handshake, from 0. The
    ceiling grows as ``initial_s * factor ** attempt`` up to ``cap_s``; full jitter picks
    uniformly below it, which spreads a crowd of links reconnecting to a restarted server.

    Raises :class:`ConfigError` on construction if the numbers make no sense.
    """

    initial_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 60.0
    exhausted_s: float = 30.0
    """Fixed delay after ``out_of_connection_slots``: the hub needs time, not a hammering."""
    terminal_retry_s: float | None = None
    """``None``: auth/config errors stop the link (state ``failed``). A number: retry that
    slowly instead (for a cloud that sometimes refuses good credentials)."""
    jitter: bool = True

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise ConfigError(f"backoff initial_s must be > 0, got {self.initial_s!r}")
        if not self.factor >= 1:
            raise ConfigError(f"backoff factor must be >= 1, got {self.factor!r}")
        if not self.cap_s >= self.initial_s:
            raise ConfigError(
                f"backoff cap_s ({self.cap_s!r}) must be >= initial_s ({self.initial_s!r})"
            )
        if not self.exhausted_s >= 0:
            raise ConfigError(f"backoff exhausted_s must be >= 0, got {self.exhausted_s!r}")
        if self.terminal_retry_s is not None and not self.terminal_retry_s > 0:
            raise ConfigError(
                f"backoff terminal_retry_s must be > 0 or None, got {self.terminal_retry_s!r}"
            )

    def ceiling(self, attempt: int) -> float:
        """The largest delay for this attempt number (before jitter)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        # Compare in the exponent's domain so a huge attempt count cannot overflow a float.
        ceiling = self.initial_s
        for _ in range(attempt):
            ceiling *= self.factor
            if ceiling >= self.cap_s:
                return self.cap_s
        return min(ceiling, self.cap_s)

    def delay(self, attempt: int, error_class: ErrorClass, draw: float) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to stop retrying.

        ``draw`` is a uniform random number in ``[0, 1]``.
        """
        if not 0.0 <= draw <= 1.0:
            raise ValueError(f"draw must be in [0, 1], got {draw!r}")
        if error_class is ErrorClass.TERMINAL:
            return self.terminal_retry_s
        if error_class is ErrorClass.RESOURCE_EXHAUSTED:
            return self.exhausted_s
        if error_class is ErrorClass.ABSENT:
            # Nobody is there: a wake signal (mDNS, presence) will cut this short.
            return self.cap_s
        ceiling = self.ceiling(attempt)
        return ceiling * draw if self.jitter else ceiling
