"""A child process for the crash-safety test: runs the real outbox dispatcher on SQLite.

    python tests/outbox_child.py DB_PATH HOST PORT DEVICE [SUBMITS]

It prints ``started`` once it delivers, then ``done`` and exits 0 when every command in
the store is final. With SUBMITS, 32 concurrent producers also submit that many commands
while it delivers (group-committed together), printing ``S <id>`` as each submit
returns. The parent kills it with SIGKILL at random moments in between.
"""

from __future__ import annotations

import asyncio
import sys

from keeplink import Backoff, Link
from keeplink._core.commands import FINAL_STATES, CommandState
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import Outbox, SqliteStore
from keeplink.presence import PresenceTracker

PRODUCERS = 32


async def produce(outbox: Outbox, device: str, count: int, first: int) -> None:
    async def producer(p: int) -> None:
        for n in range(first + p, first + count, PRODUCERS):
            command = await outbox.submit(device, "set", {"n": n}, max_attempts=50)
            print("S", command.id, flush=True)  # returned: it must survive the kill

    await asyncio.gather(*(producer(p) for p in range(PRODUCERS)))


async def main(db: str, host: str, port: int, device: str, submits: int, first: int) -> int:
    presence = PresenceTracker(debounce_online_s=0.0, debounce_offline_s=0.0)
    outbox = Outbox(SqliteStore(db), presence=presence, request_timeout_s=5, breaker_cycles=1000)
    link = Link(
        JsonLineDriver(host=host, port=port),
        name=device,
        heartbeat_s=None,
        backoff=Backoff(initial_s=0.01, cap_s=0.05),
    )
    await outbox.start()
    try:
        await outbox.attach(device, link)
        link.start()
        await link.wait_connected()
        print("started", flush=True)
        if submits:
            await produce(outbox, device, submits, first)
        while True:
            pending = await outbox.store.count(states=set(CommandState) - FINAL_STATES)
            if pending == 0:
                break
            await asyncio.sleep(0.05)
        print("done", flush=True)
    finally:
        await link.stop()
        await outbox.close()
        presence.close()
    return 0


if __name__ == "__main__":
    submits, first = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 5 else (0, 0)
    raise SystemExit(
        asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], submits, first))
    )
