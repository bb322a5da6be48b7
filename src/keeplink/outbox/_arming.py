"""When a device can be delivered to: its link's state is its presence (the link is the
highest-precedence source, unless it is a hub's), and becoming deliverable (presence online
and the link up) begins a new presence cycle and a delivery pass."""

from __future__ import annotations

from collections.abc import Callable

from keeplink._core.dispatch import Gate
from keeplink._core.presence import Source
from keeplink._core.states import LinkState
from keeplink.outbox._state import Shared
from keeplink.presence import PresenceChanged

_DOWN = (LinkState.LOST, LinkState.BACKOFF, LinkState.FAILED, LinkState.STOPPED)
"""Link states that say a device on its own link is offline."""


class Arming:
    """Follows links and presence; ``kick(device)`` starts a delivery pass."""

    def __init__(self, shared: Shared, *, kick: Callable[[str], None]) -> None:
        self._shared = shared
        self._kick = kick

    def on_link_state(self, device: str, state: LinkState) -> None:
        shared = self._shared
        hub = shared.devices[device].hub if device in shared.devices else False
        if not hub and state is LinkState.CONNECTED:
            shared.presence.report(device, Source.LINK, True)
        elif not hub and state in _DOWN:
            shared.presence.report(device, Source.LINK, False)
        self.refresh(device)

    def on_presence(self, change: PresenceChanged) -> None:
        self.refresh(change.device)

    def refresh(self, device: str) -> None:
        """Look at the gate again: becoming deliverable begins a new cycle."""
        shared = self._shared
        state = shared.devices.get(device)
        if state is None:
            return
        deliverable = shared.gate(state) is Gate.OPEN
        if deliverable and not state.deliverable:
            state.episode += 1
            state.pending_cycles += 1
            state.deliverable = True
            self._kick(device)
        elif not deliverable:
            state.deliverable = False
