"""``free_port``: a port for a server that comes up (or back) later, on a known port."""

from __future__ import annotations

import socket

from keeplink.testing import DeviceSimulator, free_port
from keeplink.testing._ports import ephemeral_range


def test_the_port_is_free_and_outside_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    assert 1024 < low <= high
    ports = {free_port() for _ in range(20)}
    for port in ports:
        # No outgoing connection can be given it as its local port while the server is
        # down, and a client retrying a connect to it cannot connect to itself.
        assert not low <= port <= high
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # and it was free
    assert len(ports) > 1  # chosen at random, not the same one for every caller


async def test_a_simulator_without_a_port_listens_outside_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    async with DeviceSimulator(device_id="ports") as sim:
        first = sim.port
        assert not low <= first <= high
        await sim.restart()  # comes back where its clients look for it
        assert sim.port == first
