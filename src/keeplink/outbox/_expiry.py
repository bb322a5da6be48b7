"""Deadlines: one timer for the earliest ``expires_at`` of a queued command; when it fires,
what is due expires (a batch per commit) and the devices behind it are looked at again."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

from keeplink._core.clock import Timer
from keeplink._core.commands import CommandState, transition
from keeplink._core.dispatch import expired_info
from keeplink.outbox._state import Pending, Shared
from keeplink.outbox._writes import Update

EXPIRE_BATCH: Final = 500
"""Expired commands settled in one commit when the expiry timer fires."""


class ExpiryWatch:
    """The expiry timer of one outbox. ``kick(device)`` looks at a device's queue again."""

    def __init__(self, shared: Shared, *, kick: Callable[[str], None]) -> None:
        self._shared = shared
        self._kick = kick
        self._timer: Timer | None = None
        self._at: float | None = None
        self.task: asyncio.Task[None] | None = None
        """Expiring what is due, while it runs."""

    def watch(self, when: float) -> None:
        """Make sure the expiry timer fires by ``when`` (no store read: O(1))."""
        if self._shared.closing or (self._at is not None and self._at <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._at = when
        self._timer = self._shared.clock.call_at(when, self._on_timer)

    def cancel(self) -> None:
        """Stop the timer (the outbox is closing)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._at = None
        if self._shared.closing or (self.task is not None and not self.task.done()):
            return
        self.task = asyncio.get_running_loop().create_task(
            self._expire_due(), name="keeplink.outbox.expiry"
        )

    async def _expire_due(self) -> None:
        """Expire what is due, a batch per commit, then watch the next deadline (indexed)."""
        shared = self._shared
        while True:
            now = shared.clock.now()
            due = await shared.store.due(now=now, limit=EXPIRE_BATCH)
            pending = Pending()
            for command in due:
                expired = transition(
                    command,
                    CommandState.EXPIRED,
                    now=now,
                    last_error=expired_info(command),
                    retry_at=None,
                )
                pending.add(
                    Update(expired, CommandState.QUEUED),
                    shared.events.after_write(expired, CommandState.QUEUED),
                )
            await shared.commit(pending)
            for device in {command.device for command in due}:
                self._kick(device)  # the commands behind it may go now
            if len(due) < EXPIRE_BATCH:
                break
        nxt = await shared.store.next_expiry()
        if nxt is not None:
            self.watch(nxt)
