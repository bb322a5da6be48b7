"""Loopback ports for tests: where to start a server that starts later."""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Nothing holds it: another process may take it before you bind it. Use it for a server
    that must be started (or restarted) on a port known in advance (a broker, a database, a
    device that comes up later); let anything else bind port 0 itself.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
