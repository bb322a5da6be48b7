"""Loopback ports for tests: where to start a server that starts later."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port"]

_LOWEST = 20_000
"""Below this, ports are often some system service's well-known one."""
_TRIES = 64
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections (Linux's, else IANA's)."""
    try:
        low, high = (int(part) for part in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 49152, 65535
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range.

    Nothing holds it: another process may take it before you bind it. Use it for a server
    that must be started (or restarted) on a port known in advance (a broker, a database, a
    device that comes up later); let anything else bind port 0 itself.

    It is chosen below the kernel's ephemeral range, so that while the server is down no
    outgoing connection is given it as its local port (any connection on the machine could
    be), and a client retrying a connect to it cannot connect to itself (TCP's simultaneous
    open, when the kernel picks the destination port as the source): either would leave the
    port taken when the server comes back.
    """
    low, _ = ephemeral_range()
    rng = random.SystemRandom()
    if low - _LOWEST >= 1_000:
        for _ in range(_TRIES):
            port = rng.randrange(_LOWEST, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
