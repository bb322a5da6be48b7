"""The Link: one supervised connection to one endpoint, as a facade over small rooms.

- :mod:`.facade` — :class:`Link`, the public surface: configuration, start/stop, waits,
  statistics; it routes everything else to the rooms below.
- :mod:`.lifecycle` — the link machine (:mod:`keeplink._core.linkmachine`), the waiters for
  its changes and the ``LinkStateChanged`` events: the only place a state changes.
- :mod:`.supervisor` — attempt after attempt: slot, connect, handshake, session, backoff.
- :mod:`.session` — one session: its channel, inbound frames, the one disconnect path.
- :mod:`.heartbeat` — heartbeat and liveness, one re-armed timer per session.
- :mod:`.requests` — correlation, the window, deadlines: the request hot path.
- :mod:`.stats` — the counters and the frozen :class:`LinkStatistics` record.
"""

from __future__ import annotations

from keeplink._link.facade import LIVENESS_RATIO, Link
from keeplink._link.stats import LinkStatistics

__all__ = ["LIVENESS_RATIO", "Link", "LinkStatistics"]
