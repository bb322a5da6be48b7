"""A child process for the fleet test: many simulated devices in one process of their own.

    python tests/fleet_sims.py DEVICE [DEVICE ...]

It starts a :class:`~keeplink.testing.DeviceSimulator` for every DEVICE on a free loopback
port and prints one JSON line, ``{"ports": {device: port}}``. Then, for every line
``stats`` read on stdin, it prints one JSON line with each device's ``sessions_active``,
``duplicates`` and the keys of the commands it ``applied``, in order. It stops its
simulators and exits 0 at the end of stdin.

The gateway nodes under test and the devices they serve then share no event loop and no
core with the test's own client: the takeover time the fleet test measures is the nodes'.
"""

from __future__ import annotations

import asyncio
import json
import sys
from contextlib import AsyncExitStack

from keeplink.testing import DeviceSimulator


def stats(sims: dict[str, DeviceSimulator]) -> dict[str, dict[str, object]]:
    answer: dict[str, dict[str, object]] = {}
    for device, sim in sims.items():
        seen = sim.statistics()
        answer[device] = {
            "sessions_active": seen.sessions_active,
            "duplicates": seen.duplicates,
            "applied": [c.key for c in sim.applied],
        }
    return answer


async def main(devices: list[str]) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with AsyncExitStack() as stack:
        sims = {d: await stack.enter_async_context(DeviceSimulator(device_id=d)) for d in devices}
        print(json.dumps({"ports": {d: sim.port for d, sim in sims.items()}}), flush=True)
        while line := await reader.readline():
            if line.strip() == b"stats":
                print(json.dumps(stats(sims)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
