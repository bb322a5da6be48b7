"""What preconditions and executors see at delivery time, and the seams they implement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from keeplink._core.commands import Command
from keeplink._core.dispatch import PreconditionResult
from keeplink._core.outcomes import Outcome
from keeplink._link import Link

if TYPE_CHECKING:
    from keeplink.outbox._outbox import Outbox


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryContext:
    """What a precondition or an executor may know at delivery time."""

    outbox: Outbox
    device: str
    now: float
    online_since: float | None
    cycle: int


class Precondition(Protocol):
    """Checked at delivery time, never at submit: the world may have changed meanwhile."""

    async def __call__(self, command: Command, ctx: DeliveryContext) -> PreconditionResult: ...


Executor = Callable[[Link[Any], Command, DeliveryContext], Awaitable[Outcome]]
"""Delivers one command over the link (a firmware transfer, say) and says how it went.

Its outcome is settled as a plain request's would be. It raises
:class:`~keeplink.InvalidRequestError` or :class:`~keeplink.PreconditionFailedError` for a
command that can never be delivered as it is (args it cannot send, an image file that
changed since it was queued): nothing went out, and the command ends ``failed`` with that
error, not ``rejected`` (the device refused nothing) and without retries."""


async def min_online(command: Command, ctx: DeliveryContext) -> PreconditionResult:
    """``{"seconds": N}``: the device must have been online for N seconds (large transfers)."""
    seconds = command.precondition_args.get("seconds", 0)
    if not isinstance(seconds, int | float) or seconds < 0:
        return PreconditionResult.failed(f"min_online needs seconds >= 0, got {seconds!r}")
    if ctx.online_since is None:
        return PreconditionResult.wait_until(ctx.now + float(seconds))
    ready = ctx.online_since + float(seconds)
    return PreconditionResult.passed() if ctx.now >= ready else PreconditionResult.wait_until(ready)
