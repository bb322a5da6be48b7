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

Message ids come from the ``id`` option that ESPHome's ``api.proto`` puts on each message,
read from the protobuf descriptors of :mod:`aioesphomeapi.api_pb2` (public protobuf API).

Run one from a shell: ``keeplink sim --esphome --port 6053 --name kitchen [--noise-psk KEY]``.

It needs aioesphomeapi (keeplink's ``esphome`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

try:
    from aioesphomeapi import api_options_pb2, api_pb2
    from noise.connection import NoiseConnection  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "keeplink.testing.esphome needs aioesphomeapi: pip install 'keeplink[esphome]'"
    ) from exc

from keeplink.testing.espota import Flash, OtaReceiver

__all__ = ["EsphomeSimulator", "SimEntity", "main", "message_types"]

_log = logging.getLogger("keeplink.sim.esphome")

NOISE_PROTOCOL: Final = b"Noise_NNpsk0_25519_ChaChaPoly_SHA256"
NOISE_PROLOGUE: Final = b"NoiseAPIInit\x00\x00"
"""What ESPHome mixes into the handshake before the first message."""
API_VERSION: Final = (1, 12)
"""The API version the simulator announces: one that still sends object ids."""
MAX_FRAME: Final = 64 * 1024
"""Longest frame accepted; a client sending more is cut off (the device has little RAM)."""
COLOR_MODE_BRIGHTNESS: Final = 3
"""ESPHome's ColorMode.BRIGHTNESS (dimmable, no colour)."""


def message_types() -> tuple[dict[int, type[Any]], dict[type[Any], int]]:
    """The native API's message classes by id, and ids by class, from the descriptors."""
    by_id: dict[int, type[Any]] = {}
    id_option: Any = getattr(api_options_pb2, "id")  # noqa: B009 - generated, untyped
    file_descriptor: Any = getattr(api_pb2, "DESCRIPTOR")  # noqa: B009 - generated, untyped
    for name, descriptor in file_descriptor.message_types_by_name.items():
        options = descriptor.GetOptions()
        if options.HasExtension(id_option):
            by_id[int(options.Extensions[id_option])] = getattr(api_pb2, name)
    return by_id, {cls: number for number, cls in by_id.items()}


_BY_ID, _ID_OF = message_types()


def _cls(name: str) -> Any:
    return getattr(api_pb2, name)


@dataclass(slots=True)
class SimEntity:
    """One entity of the simulated device and its current state."""

    object_id: str
    kind: str
    key: int
    name: str
    state: Any = None
    brightness: float = 1.0
    min_value: float = 0.0
    max_value: float = 100.0
    step: float = 0.5
    presses: int = 0


def _default_entities() -> dict[str, SimEntity]:
    entities = [
        SimEntity("relay", "switch", 0x1001, "Relay", state=False),
        SimEntity("setpoint", "number", 0x1002, "Setpoint", state=20.0),
        SimEntity("lamp", "light", 0x1003, "Lamp", state=False, brightness=1.0),
        SimEntity("reboot", "button", 0x1004, "Reboot"),
        SimEntity("temperature", "sensor", 0x1005, "Temperature", state=21.0),
    ]
    return {e.object_id: e for e in entities}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def _read_varint(reader: asyncio.StreamReader) -> int:
    value = shift = 0
    while True:
        byte = (await reader.readexactly(1))[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
        if shift > 28:
            raise ValueError("varint too long")


class _Closing(Exception):
    """This connection ends now (auth refused, disconnect, protocol error)."""


@dataclass(slots=True)
class _Conn:
    number: int
    writer: asyncio.StreamWriter
    noise: Any = None
    subscribed: bool = False
    authenticated: bool = False
    indicator_read: bool = False
    """The next plaintext frame's 0x00 indicator byte was read already."""


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
        self._psk = base64.b64decode(noise_psk) if noise_psk is not None else None
        if self._psk is not None and len(self._psk) != 32:
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
        self.entities = _default_entities()
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
        self._conns: dict[int, _Conn] = {}
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
        mode = "noise" if self._psk is not None else "plaintext"
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
                    self._send(conn, _cls("DisconnectRequest")())
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
        self._publish(entity)

    def _publish(self, entity: SimEntity) -> None:
        for conn in list(self._conns.values()):
            if conn.subscribed:
                self._send_state(conn, entity)

    def _state_message(self, entity: SimEntity) -> Any | None:
        if entity.kind == "switch":
            return _cls("SwitchStateResponse")(key=entity.key, state=bool(entity.state))
        if entity.kind == "number":
            return _cls("NumberStateResponse")(key=entity.key, state=float(entity.state))
        if entity.kind == "sensor":
            return _cls("SensorStateResponse")(key=entity.key, state=float(entity.state))
        if entity.kind == "light":
            return _cls("LightStateResponse")(
                key=entity.key,
                state=bool(entity.state),
                brightness=entity.brightness,
                color_mode=COLOR_MODE_BRIGHTNESS,
            )
        return None  # a button has no state

    def _send_state(self, conn: _Conn, entity: SimEntity) -> None:
        message = self._state_message(entity)
        if message is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._send(conn, message)

    def _list_message(self, entity: SimEntity) -> Any:
        common = {"object_id": entity.object_id, "key": entity.key, "name": entity.name}
        if entity.kind == "switch":
            return _cls("ListEntitiesSwitchResponse")(**common)
        if entity.kind == "number":
            return _cls("ListEntitiesNumberResponse")(
                **common, min_value=entity.min_value, max_value=entity.max_value, step=entity.step
            )
        if entity.kind == "light":
            return _cls("ListEntitiesLightResponse")(
                **common, supported_color_modes=[COLOR_MODE_BRIGHTNESS]
            )
        if entity.kind == "button":
            return _cls("ListEntitiesButtonResponse")(**common)
        return _cls("ListEntitiesSensorResponse")(
            **common, unit_of_measurement="°C", accuracy_decimals=1
        )

    def device_info(self) -> Any:
        """The DeviceInfoResponse this device sends now."""
        return _cls("DeviceInfoResponse")(
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
            api_encryption_supported=self._psk is not None,
        )

    # ------------------------------------------------------------------ wire

    def _send(self, conn: _Conn, message: Any) -> None:
        if self.silent:
            return
        msg_id = _ID_OF[type(message)]
        data = message.SerializeToString()
        if conn.noise is None:
            conn.writer.write(b"\x00" + _varint(len(data)) + _varint(msg_id) + data)
            return
        plain = bytes((msg_id >> 8, msg_id & 0xFF, len(data) >> 8, len(data) & 0xFF)) + data
        self._write_noise_frame(conn, conn.noise.encrypt(plain))

    @staticmethod
    def _write_noise_frame(conn: _Conn, payload: bytes) -> None:
        conn.writer.write(bytes((0x01, len(payload) >> 8, len(payload) & 0xFF)) + payload)

    @staticmethod
    async def _read_noise_frame(reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(3)
        if header[0] != 0x01:
            raise _Closing(f"bad noise indicator {header[0]:#x}")
        return await reader.readexactly((header[1] << 8) | header[2])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections_total += 1
        conn = _Conn(self.connections_total, writer)
        self._conns[conn.number] = conn
        try:
            await self._session(conn, reader)
        except (_Closing, ValueError) as exc:
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

    async def _session(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        first = await reader.readexactly(1)
        if self._psk is not None:
            if first != b"\x01":
                # Plaintext to an encrypted device: a noise frame the client reads as
                # "this device requires encryption".
                self._write_noise_frame(conn, b"")
                raise _Closing("plaintext client on an encrypted device")
            await self._noise_handshake(conn, reader)
        elif first != b"\x00":
            # A noise hello to a plaintext device: a plaintext marker says so.
            conn.writer.write(b"\x00\x00\x00")
            raise _Closing("encrypted client on a plaintext device")
        else:
            conn.indicator_read = True
        while True:
            msg_id, data = await self._read_message(conn, reader)
            cls = _BY_ID.get(msg_id)
            if cls is None or self.silent:
                continue
            message = cls()
            message.ParseFromString(data)
            self._handle(conn, message)
            await conn.writer.drain()

    async def _read_message(self, conn: _Conn, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        if conn.noise is None:
            if conn.indicator_read:
                conn.indicator_read = False
            elif await reader.readexactly(1) != b"\x00":
                raise _Closing("bad plaintext indicator")
            length = await _read_varint(reader)
            msg_id = await _read_varint(reader)
            if length > MAX_FRAME:
                raise _Closing(f"frame of {length} bytes")
            return msg_id, await reader.readexactly(length)
        frame = await self._read_noise_frame(reader)
        plain = conn.noise.decrypt(frame)
        if len(plain) < 4:
            raise _Closing("decrypted frame too short")
        return (plain[0] << 8) | plain[1], plain[4:]

    async def _noise_handshake(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        # The first byte (0x01) of the client's empty hello frame is already read.
        rest = await reader.readexactly(2)
        await reader.readexactly((rest[0] << 8) | rest[1])
        handshake = await self._read_noise_frame(reader)
        mac_plain = self.mac.replace(":", "").lower()
        self._write_noise_frame(
            conn, b"\x01" + self.name.encode() + b"\0" + mac_plain.encode() + b"\0"
        )
        proto = NoiseConnection.from_name(NOISE_PROTOCOL)
        proto.set_as_responder()
        proto.set_psks(self._psk)
        proto.set_prologue(NOISE_PROLOGUE)
        proto.start_handshake()
        if not handshake or handshake[0] != 0:
            raise _Closing("bad handshake frame")
        try:
            proto.read_message(handshake[1:])
        except Exception as exc:
            self._write_noise_frame(conn, b"\x01Handshake MAC failure")
            await conn.writer.drain()
            raise _Closing(f"noise handshake failed: {exc!r}") from exc
        self._write_noise_frame(conn, b"\x00" + proto.write_message())
        conn.noise = proto

    # ------------------------------------------------------------------ messages

    def _handle(self, conn: _Conn, message: Any) -> None:
        kind = type(message).__name__
        if kind == "HelloRequest":
            major, minor = API_VERSION
            self._send(
                conn,
                _cls("HelloResponse")(
                    api_version_major=major,
                    api_version_minor=minor,
                    server_info=f"keeplink esphome simulator {self.esphome_version}",
                    name=self.name,
                ),
            )
            conn.authenticated = self.password is None
        elif kind == "AuthenticationRequest":
            if self.password is not None:
                ok = message.password == self.password
                self._send(conn, _cls("AuthenticationResponse")(invalid_password=not ok))
                if not ok:
                    raise _Closing("wrong password")
                conn.authenticated = True
        elif kind == "DisconnectRequest":
            self._send(conn, _cls("DisconnectResponse")())
            raise _Closing("client disconnected")
        elif kind == "PingRequest":
            self.pings += 1
            if not self.hold_pings:
                self._send(conn, _cls("PingResponse")())
        elif kind == "DeviceInfoRequest":
            self.device_info_requests += 1
            self._send(conn, self.device_info())
        elif not conn.authenticated:
            raise _Closing(f"{kind} before authentication")
        elif kind == "ListEntitiesRequest":
            for entity in self.entities.values():
                self._send(conn, self._list_message(entity))
            self._send(conn, _cls("ListEntitiesDoneResponse")())
        elif kind == "SubscribeStatesRequest":
            conn.subscribed = True
            for entity in self.entities.values():
                self._send_state(conn, entity)
        elif kind.endswith("CommandRequest"):
            self._command(kind, message)

    def _entity_by_key(self, key: int) -> SimEntity | None:
        for entity in self.entities.values():
            if entity.key == key:
                return entity
        return None

    def _command(self, kind: str, message: Any) -> None:
        entity = self._entity_by_key(message.key)
        if entity is None:
            return  # ESPHome ignores a command for a key it does not have
        fields: dict[str, Any] = {}
        if kind == "SwitchCommandRequest" and entity.kind == "switch":
            fields = {"state": bool(message.state)}
        elif kind == "NumberCommandRequest" and entity.kind == "number":
            fields = {"value": float(message.state)}
        elif kind == "LightCommandRequest" and entity.kind == "light":
            if message.has_state:
                fields["state"] = bool(message.state)
            if message.has_brightness:
                fields["brightness"] = float(message.brightness)
        elif kind == "ButtonCommandRequest" and entity.kind == "button":
            fields = {"press": True}
        else:
            return
        self.commands.append((entity.object_id, fields))
        if self.on_command is not None:
            self.on_command(entity.object_id, fields)
        if self.drop_commands:
            return
        if entity.kind == "button":
            entity.presses += 1
            return
        if entity.kind == "number":
            value = min(max(fields["value"], entity.min_value), entity.max_value)
            entity.state = value if math.isfinite(value) else entity.state
        elif entity.kind == "light":
            entity.state = fields.get("state", entity.state)
            entity.brightness = fields.get("brightness", entity.brightness)
        else:
            entity.state = fields["state"]
        self._publish(entity)


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
