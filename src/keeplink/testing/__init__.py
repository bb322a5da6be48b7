"""Tools for testing integrations built on keeplink; shipped because you need them too.

- :class:`DeviceSimulator`: a jsonline device on loopback with real devices' bad habits.
- :class:`FaultProxy`: a TCP proxy that injects the network's bad habits at run time.
- :class:`ScriptedPeer` and :class:`ScriptedDriver`: a link over an in-memory peer the test
  scripts (accept or refuse the handshake, answer requests, push, drop, go silent); no
  sockets, so a :class:`VirtualClock` drives everything. :class:`MemoryChannel` is its
  channel.
- :class:`VirtualClock`: exact, repeatable time for every timeout and backoff.
- :func:`free_port`: a loopback TCP port that was free a moment ago, for a server that
  starts (or restarts) later on a port known in advance.
- ``keeplink.testing.pytest_plugin``: a ``virtual_clock`` fixture and a leak check.
- ``keeplink.testing.modbus``: a pymodbus gateway on loopback with misbehaving units
  (imported on its own: it needs pymodbus).
- ``keeplink.testing.mqtt``: a fake MQTT device and a small MQTT test client on a real
  broker (imported on its own: it needs mqtt5).
- ``keeplink.testing.store_suite``: the conformance tests every command store must pass,
  for a store of your own (imported on its own: it needs pytest and hypothesis).
"""

from keeplink._clock import VirtualClock
from keeplink.testing._ports import free_port
from keeplink.testing.faultproxy import FaultProxy, ProxyStatistics
from keeplink.testing.scripted import MemoryChannel, PeerRequest, ScriptedDriver, ScriptedPeer
from keeplink.testing.sim import AppliedCommand, DeviceSimulator, SimStatistics

__all__ = [
    "AppliedCommand",
    "DeviceSimulator",
    "FaultProxy",
    "MemoryChannel",
    "PeerRequest",
    "ProxyStatistics",
    "ScriptedDriver",
    "ScriptedPeer",
    "SimStatistics",
    "VirtualClock",
    "free_port",
]
