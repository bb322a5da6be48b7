"""A jsonline device simulator, for tests, demos and integration authors.

It is a real TCP (or TLS) server on loopback that speaks the reference protocol, with the
behaviours real devices have and real integrations trip over, all switchable at run time:
an auth token, the sequence width it echoes, answering pings or not, slow acks, lost acks,
state pushes, refusing ops, and sleeping (awake ``A`` seconds every ``S``, unreachable in
between). It keeps a log of every command it applied, honouring idempotency keys, so a test
can prove that each command was applied exactly once.

Ops: ``set`` (merge args into the state), ``get``, ``echo`` (ack with the args), ``slow``
(echo after ``args["delay_s"]`` seconds), ``noreply`` (never acked), ``fail`` (reject with
``args["code"]``), and the firmware ops ``ota.begin``/``ota.chunk``/``ota.end``.

Run one from a shell::

    python -m keeplink.testing.sim --port 7001 --device-id hall --token s3cret
"""

from keeplink.testing.sim._cli import build_parser as build_parser
from keeplink.testing.sim._cli import main
from keeplink.testing.sim._device import DeviceSimulator
from keeplink.testing.sim._records import AppliedCommand, SimStatistics

__all__ = ["AppliedCommand", "DeviceSimulator", "SimStatistics", "main"]
