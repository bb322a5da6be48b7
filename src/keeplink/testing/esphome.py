"""An ESPHome device simulator that speaks the native API, for tests and demos.

A real TCP server on loopback that a real :class:`aioesphomeapi.APIClient` (or keeplink's
:class:`~keeplink.drivers.esphome.EsphomeDriver`) connects to, in plaintext or with Noise
encryption (``Noise_NNpsk0_25519_ChaChaPoly_SHA256``, the ``noiseprotocol`` package that
aioesphomeapi itself uses), or with a legacy API password. It has a few entities, each with
a fixed key:

=============  ========  ===============================================
object id      kind      behaviour
=============  ========  ===============================================
``relay``      switch    a command sets it and publishes the new state
``setpoint``   number    0..100, step 0.5; a command sets and publishes
``lamp``       light     on/off and brightness; a command publishes
``reboot``     button    a press is counted (``presses``), no state
``temperature`` sensor   :meth:`EsphomeSimulator.set_sensor` publishes
=============  ========  ===============================================

Faults, all switchable at run time: ``hold_pings`` (PingRequests go unanswered),
:meth:`~EsphomeSimulator.go_silent` (the socket stays open and everything that arrives is
dropped unanswered: a half-open peer), ``drop_commands`` (commands are taken and never
applied, so no state follows), a deep-sleep schedule (awake ``awake_s``, then asleep
``asleep_s`` with the server closed), :meth:`~EsphomeSimulator.kill` (connections aborted,
server gone) and :meth:`~EsphomeSimulator.restart`. The firmware it reports
(``esphome_version``, ``project_version``, ``compilation_time``) is plain attributes: a
flash changes them (:meth:`~EsphomeSimulator.reboot_into` does that and reboots), and the
next DeviceInfoResponse says so.

With ``ota_port`` it also has an OTA port (:class:`~keeplink.testing.espota.OtaReceiver`,
``sim.ota``): after a verified image it reboots into a new build (a new compilation time,
or ``next_build``), as a real device does after an update; both ports close while it
sleeps.

Message ids come from the ``id`` option that ESPHome's ``api.proto`` puts on each message,
read from the protobuf descriptors of :mod:`aioesphomeapi.api_pb2` (public protobuf API).

Run one from a shell: ``keeplink sim --esphome --port 6053 --name kitchen [--noise-psk KEY]
[--ota-port 3232 [--ota-password PW]]``.

It needs aioesphomeapi (keeplink's ``esphome`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from keeplink.testing._ports import free_port

try:
    import aioesphomeapi  # noqa: F401 - the extra this module needs, said once
    import noise  # type: ignore[import-untyped]  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keeplink.testing.esphome needs aioesphomeapi: pip install 'keeplink[esphome]'"
    ) from exc

from keeplink.testing._esphome_api import (
    ApiSession,
    Closing,
    Conn,
    SimEntity,
    cls,
    default_entities,
    encode,
    message_types,
    state_message,
)
from keeplink.testing.espota import Flash, OtaReceiver

__all__ = ["EsphomeSimulator", "SimEntity", "main", "message_types"]

_log = logging.getLogger("keeplink.sim.esphome")


class EsphomeSimulator:
    """An ESPHome device on ``host:port`` speaking the native API.

    ``noise_psk`` (base64 of 32 bytes): encrypted sessions only; ``password``: the legacy
    plaintext password (commands need a login). ``mac`` is reported as ESPHome does: pretty
    (``AA:BB:…``) in DeviceInfo, 12 lower-case hex digits in the Noise server hello.
    ``awake_s``/``asleep_s``: a deep-sleep schedule (both or neither).
    """

    def __init__(
        self,
        *,
        name: str = "esphome-sim",
        host: str = "127.0.0.1",
        port: int = 0,
        mac: str = "AA:BB:CC:DD:EE:01",
        noise_psk: str | None = None,
        password: str | None = None,
        friendly_name: str | None = None,
        esphome_version: str = "2026.11.0",
        project_name: str = "keeplink.sim",
        project_version: str = "1.0.0",
        compilation_time: str = "Dec  1 2026, 12:00:00",
        model: str = "esp32dev",
        awake_s: float | None = None,
        asleep_s: float | None = None,
        ota_port: int | None = None,
        ota_password: str | None = None,
        reboot_s: float = 0.05,
    ) -> None:
        if (awake_s is None) != (asleep_s is None):
            raise ValueError("awake_s and asleep_s go together")
        self.name = name
        self.host = host
        self.port = port
        self.mac = mac.upper()
        self.noise_psk = noise_psk
        self.psk = base64.b64decode(noise_psk) if noise_psk is not None else None
        """The Noise key's 32 bytes, or None: a plaintext device."""
        if self.psk is not None and len(self.psk) != 32:
            raise ValueError("noise_psk must be the base64 of 32 bytes")
        self.password = password
        self.friendly_name = friendly_name or name
        self.esphome_version = esphome_version
        self.project_name = project_name
        self.project_version = project_version
        self.compilation_time = compilation_time
        self.model = model
        self.awake_s = awake_s
        self.asleep_s = asleep_s
        self.entities = default_entities()
        self.hold_pings = False
        """Leave PingRequests unanswered (everything else is answered)."""
        self.drop_commands = False
        """Take entity commands without applying them: no state update follows."""
        self.silent = False
        self.asleep = False
        self.connections_total = 0
        self.pings = 0
        self.device_info_requests = 0
        self.commands: list[tuple[str, dict[str, Any]]] = []
        """Every entity command received, in order: (object id, fields)."""
        self.on_command: Callable[[str, dict[str, Any]], None] | None = None
        self._server: asyncio.Server | None = None
        self._conns: dict[int, Conn] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._schedule: asyncio.Task[None] | None = None
        self.ota: OtaReceiver | None = None
        """Its OTA port (``ota_port``; 0 picks one), or None without one. A verified image
        makes the device reboot ``reboot_s`` later into a new build (:meth:`flashed`)."""
        if ota_port is not None:
            self.ota = OtaReceiver(
                password=ota_password, host=host, port=ota_port, on_flash=self._flashed
            )
        self.reboot_s = reboot_s
        self.next_build: dict[str, str] | None = None
        """What the next flash reboots into (``project_version``, ``compilation_time``,
        ``esphome_version``); None: the same project version, a new compilation time."""
        self.builds: list[dict[str, str]] = []
        """Every build a flash rebooted it into, in order."""
        self._reboots: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        mode = "noise" if self.psk is not None else "plaintext"
        return f"EsphomeSimulator({self.name!r} {self.host}:{self.port} {mode})"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen (on the same port again after a stop/kill), and start the sleep schedule."""
        await self._listen()
        if self.ota is not None:
            await self.ota.start()
        if self.awake_s is not None and self._schedule is None:
            self._schedule = asyncio.get_running_loop().create_task(
                self._sleep_cycle(), name=f"esphome-sim[{self.name}].sleep"
            )

    async def _listen(self) -> None:
        if self._server is not None:
            return
        if self.port == 0 and self.host == "127.0.0.1":
            self.port = free_port()  # it may sleep and come back: see free_port
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self.asleep = False

    async def _close_server(self, *, abort: bool) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for conn in list(self._conns.values()):
            if abort:
                conn.writer.transport.abort()
            else:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    self._send(conn, cls("DisconnectRequest")())
                conn.writer.close()
        if self._handlers:
            await asyncio.wait(set(self._handlers))
        if server is not None:
            await server.wait_closed()

    async def stop(self) -> None:
        """Say goodbye to every client (DisconnectRequest) and close the servers."""
        schedule, self._schedule = self._schedule, None
        if schedule is not None:
            schedule.cancel()
            await asyncio.wait((schedule,))
        await self.wait_rebooted()
        await self._close_server(abort=False)
        if self.ota is not None:
            await self.ota.close()

    async def kill(self) -> None:
        """Power loss: every connection aborted at once, no goodbye, the server gone."""
        schedule, self._schedule = self._schedule, None
        if schedule is not None:
            schedule.cancel()
            await asyncio.wait((schedule,))
        await self._close_server(abort=True)

    async def restart(self) -> None:
        """Kill, then start again on the same port (as after a reboot or a flash)."""
        await self.kill()
        self.silent = False
        await self.start()

    async def reboot_into(
        self,
        *,
        project_version: str,
        compilation_time: str,
        esphome_version: str | None = None,
    ) -> None:
        """What a finished flash does: the new build's versions, then a reboot (every
        connection dropped, the server back on the same port)."""
        self.project_version = project_version
        self.compilation_time = compilation_time
        if esphome_version is not None:
            self.esphome_version = esphome_version
        await self.restart()

    async def wait_rebooted(self) -> None:
        """Wait until the reboot a flash began (if any) is over: the device is up on its
        new build."""
        while self._reboots:
            await asyncio.wait(set(self._reboots))

    def _flashed(self, flash: Flash) -> None:
        task = asyncio.get_running_loop().create_task(
            self._reboot_after_flash(), name=f"esphome-sim[{self.name}].reboot"
        )
        self._reboots.add(task)
        task.add_done_callback(self._reboots.discard)

    async def _reboot_after_flash(self) -> None:
        # (After the OTA session's last answer, as the firmware reboots once it is sent.)
        await asyncio.sleep(self.reboot_s)
        build = self.next_build or {}
        self.next_build = None
        when = time.strftime("%b %d %Y, %H:%M:%S", time.gmtime())
        if when == self.compilation_time:
            when += f" #{len(self.builds) + 1}"  # two flashes within one second
        new = {
            "project_version": build.get("project_version", self.project_version),
            "compilation_time": build.get("compilation_time", when),
            "esphome_version": build.get("esphome_version", self.esphome_version),
        }
        self.builds.append(new)
        _log.debug("esphome sim %s: flashed, rebooting into %s", self.name, new)
        await self.reboot_into(**new)

    def go_silent(self) -> None:
        """Stop answering and sending anything; sockets stay open (a half-open peer)."""
        self.silent = True

    def speak(self) -> None:
        """Answer again after :meth:`go_silent`."""
        self.silent = False

    async def __aenter__(self) -> EsphomeSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def connections_active(self) -> int:
        return len(self._conns)

    async def _sleep_cycle(self) -> None:
        assert self.awake_s is not None
        assert self.asleep_s is not None
        while True:
            await asyncio.sleep(self.awake_s)
            _log.debug("esphome sim %s: going to deep sleep for %gs", self.name, self.asleep_s)
            await self._close_server(abort=False)
            if self.ota is not None:
                await self.ota.close()
            self.asleep = True
            await asyncio.sleep(self.asleep_s)
            await self._listen()
            if self.ota is not None:
                await self.ota.start()

    # ------------------------------------------------------------------ states

    def set_sensor(self, value: float, object_id: str = "temperature") -> None:
        """Set a sensor's value and publish it to every subscribed client."""
        entity = self.entities[object_id]
        entity.state = value
        self.publish(entity)

    def publish(self, entity: SimEntity) -> None:
        """Send the entity's state to every subscribed client."""
        for conn in list(self._conns.values()):
            if conn.subscribed:
                self.send_state(conn, entity)

    def send_state(self, conn: Conn, entity: SimEntity) -> None:
        """Send the entity's state on one connection (a button has none)."""
        message = state_message(entity)
        if message is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._send(conn, message)

    def device_info(self) -> Any:
        """The DeviceInfoResponse this device sends now."""
        return cls("DeviceInfoResponse")(
            uses_password=self.password is not None,
            name=self.name,
            friendly_name=self.friendly_name,
            mac_address=self.mac,
            esphome_version=self.esphome_version,
            compilation_time=self.compilation_time,
            model=self.model,
            has_deep_sleep=self.awake_s is not None,
            project_name=self.project_name,
            project_version=self.project_version,
            api_encryption_supported=self.psk is not None,
        )

    # ------------------------------------------------------------------ wire

    def _send(self, conn: Conn, message: Any) -> None:
        if not self.silent:
            encode(conn, message)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections_total += 1
        conn = Conn(self.connections_total, writer)
        self._conns[conn.number] = conn
        try:
            await ApiSession(self, conn).run(reader)
        except (Closing, ValueError) as exc:
            _log.debug("esphome sim %s: connection %d closed: %s", self.name, conn.number, exc)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except Exception as exc:  # noqa: BLE001 - deliberately broad, and logged: see below
            # Whatever one client sends (a frame that does not decrypt or parse) ends that
            # connection only; the device keeps serving the others.
            _log.warning("esphome sim %s: connection %d failed: %r", self.name, conn.number, exc)
        finally:
            self._conns.pop(conn.number, None)
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keeplink sim --esphome", description="Run one simulated ESPHome device."
    )
    parser.add_argument("--esphome", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6053)
    parser.add_argument("--name", default="esphome-sim", help="the node name it reports")
    parser.add_argument("--mac", default="AA:BB:CC:DD:EE:01")
    parser.add_argument("--noise-psk", help="base64 of 32 bytes: encrypted sessions only")
    parser.add_argument("--password", help="legacy API password (plaintext)")
    parser.add_argument("--project-version", default="1.0.0")
    parser.add_argument("--ota-port", type=int, help="listen for espota2 firmware (0: any)")
    parser.add_argument("--ota-password", help="the OTA password")
    parser.add_argument("--awake-s", type=float, help="deep sleep: awake this long…")
    parser.add_argument("--asleep-s", type=float, help="…then asleep this long")
    return parser


async def _run(args: argparse.Namespace) -> None:
    sim = EsphomeSimulator(
        name=args.name,
        host=args.host,
        port=args.port,
        mac=args.mac,
        noise_psk=args.noise_psk,
        password=args.password,
        project_version=args.project_version,
        awake_s=args.awake_s,
        asleep_s=args.asleep_s,
        ota_port=args.ota_port,
        ota_password=args.ota_password,
    )
    await sim.start()
    ota = f", OTA on port {sim.ota.port}" if sim.ota is not None else ""
    print(f"esphome device {sim.name!r} listening on {sim.host}:{sim.port}{ota}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await sim.stop()


def main(argv: list[str] | None = None) -> int:
    """``keeplink sim --esphome …``: run one simulated ESPHome device until interrupted."""
    args = build_parser().parse_args(argv)
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
