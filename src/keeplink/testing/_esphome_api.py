"""The native API on the simulator's side: the wire (plaintext and Noise frames, message
ids from the protobuf descriptors) and one client's session (hello, login, entity lists,
states, commands).

Private to :mod:`keeplink.testing.esphome`, which documents and re-exports what is public.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aioesphomeapi import api_options_pb2, api_pb2
from noise.connection import NoiseConnection  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from keeplink.testing.esphome import EsphomeSimulator

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


BY_ID, ID_OF = message_types()


def cls(name: str) -> Any:
    """The native API message class of this name."""
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


def default_entities() -> dict[str, SimEntity]:
    entities = [
        SimEntity("relay", "switch", 0x1001, "Relay", state=False),
        SimEntity("setpoint", "number", 0x1002, "Setpoint", state=20.0),
        SimEntity("lamp", "light", 0x1003, "Lamp", state=False, brightness=1.0),
        SimEntity("reboot", "button", 0x1004, "Reboot"),
        SimEntity("temperature", "sensor", 0x1005, "Temperature", state=21.0),
    ]
    return {e.object_id: e for e in entities}


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def read_varint(reader: asyncio.StreamReader) -> int:
    value = shift = 0
    while True:
        byte = (await reader.readexactly(1))[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
        if shift > 28:
            raise ValueError("varint too long")


class Closing(Exception):
    """This connection ends now (auth refused, disconnect, protocol error)."""


@dataclass(slots=True)
class Conn:
    number: int
    writer: asyncio.StreamWriter
    noise: Any = None
    subscribed: bool = False
    authenticated: bool = False
    indicator_read: bool = False
    """The next plaintext frame's 0x00 indicator byte was read already."""


def state_message(entity: SimEntity) -> Any | None:
    if entity.kind == "switch":
        return cls("SwitchStateResponse")(key=entity.key, state=bool(entity.state))
    if entity.kind == "number":
        return cls("NumberStateResponse")(key=entity.key, state=float(entity.state))
    if entity.kind == "sensor":
        return cls("SensorStateResponse")(key=entity.key, state=float(entity.state))
    if entity.kind == "light":
        return cls("LightStateResponse")(
            key=entity.key,
            state=bool(entity.state),
            brightness=entity.brightness,
            color_mode=COLOR_MODE_BRIGHTNESS,
        )
    return None  # a button has no state


def list_message(entity: SimEntity) -> Any:
    common = {"object_id": entity.object_id, "key": entity.key, "name": entity.name}
    if entity.kind == "switch":
        return cls("ListEntitiesSwitchResponse")(**common)
    if entity.kind == "number":
        return cls("ListEntitiesNumberResponse")(
            **common, min_value=entity.min_value, max_value=entity.max_value, step=entity.step
        )
    if entity.kind == "light":
        return cls("ListEntitiesLightResponse")(
            **common, supported_color_modes=[COLOR_MODE_BRIGHTNESS]
        )
    if entity.kind == "button":
        return cls("ListEntitiesButtonResponse")(**common)
    return cls("ListEntitiesSensorResponse")(
        **common, unit_of_measurement="°C", accuracy_decimals=1
    )


def write_noise_frame(conn: Conn, payload: bytes) -> None:
    conn.writer.write(bytes((0x01, len(payload) >> 8, len(payload) & 0xFF)) + payload)


async def read_noise_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(3)
    if header[0] != 0x01:
        raise Closing(f"bad noise indicator {header[0]:#x}")
    return await reader.readexactly((header[1] << 8) | header[2])


def encode(conn: Conn, message: Any) -> None:
    """Write one message on the connection, framed as its session is (plaintext or Noise)."""
    msg_id = ID_OF[type(message)]
    data = message.SerializeToString()
    if conn.noise is None:
        conn.writer.write(b"\x00" + varint(len(data)) + varint(msg_id) + data)
        return
    plain = bytes((msg_id >> 8, msg_id & 0xFF, len(data) >> 8, len(data) & 0xFF)) + data
    write_noise_frame(conn, conn.noise.encrypt(plain))


class ApiSession:
    """One client connection to the simulated device."""

    def __init__(self, sim: EsphomeSimulator, conn: Conn) -> None:
        self.sim = sim
        self.conn = conn

    def send(self, message: Any) -> None:
        if not self.sim.silent:
            encode(self.conn, message)

    async def run(self, reader: asyncio.StreamReader) -> None:
        """Serve the connection until it ends (raises Closing, or the stream's errors)."""
        conn, sim = self.conn, self.sim
        first = await reader.readexactly(1)
        if sim.psk is not None:
            if first != b"\x01":
                # Plaintext to an encrypted device: a noise frame the client reads as
                # "this device requires encryption".
                write_noise_frame(conn, b"")
                raise Closing("plaintext client on an encrypted device")
            await self._noise_handshake(reader)
        elif first != b"\x00":
            # A noise hello to a plaintext device: a plaintext marker says so.
            conn.writer.write(b"\x00\x00\x00")
            raise Closing("encrypted client on a plaintext device")
        else:
            conn.indicator_read = True
        while True:
            msg_id, data = await self._read_message(reader)
            message_class = BY_ID.get(msg_id)
            if message_class is None or sim.silent:
                continue
            message = message_class()
            message.ParseFromString(data)
            self._handle(message)
            await conn.writer.drain()

    async def _read_message(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        conn = self.conn
        if conn.noise is None:
            if conn.indicator_read:
                conn.indicator_read = False
            elif await reader.readexactly(1) != b"\x00":
                raise Closing("bad plaintext indicator")
            length = await read_varint(reader)
            msg_id = await read_varint(reader)
            if length > MAX_FRAME:
                raise Closing(f"frame of {length} bytes")
            return msg_id, await reader.readexactly(length)
        frame = await read_noise_frame(reader)
        plain = conn.noise.decrypt(frame)
        if len(plain) < 4:
            raise Closing("decrypted frame too short")
        return (plain[0] << 8) | plain[1], plain[4:]

    async def _noise_handshake(self, reader: asyncio.StreamReader) -> None:
        conn, sim = self.conn, self.sim
        # The first byte (0x01) of the client's empty hello frame is already read.
        rest = await reader.readexactly(2)
        await reader.readexactly((rest[0] << 8) | rest[1])
        handshake = await read_noise_frame(reader)
        mac_plain = sim.mac.replace(":", "").lower()
        write_noise_frame(conn, b"\x01" + sim.name.encode() + b"\0" + mac_plain.encode() + b"\0")
        proto = NoiseConnection.from_name(NOISE_PROTOCOL)
        proto.set_as_responder()
        proto.set_psks(sim.psk)
        proto.set_prologue(NOISE_PROLOGUE)
        proto.start_handshake()
        if not handshake or handshake[0] != 0:
            raise Closing("bad handshake frame")
        try:
            proto.read_message(handshake[1:])
        except Exception as exc:
            write_noise_frame(conn, b"\x01Handshake MAC failure")
            await conn.writer.drain()
            raise Closing(f"noise handshake failed: {exc!r}") from exc
        write_noise_frame(conn, b"\x00" + proto.write_message())
        conn.noise = proto

    # ------------------------------------------------------------------ messages

    def _handle(self, message: Any) -> None:
        conn, sim = self.conn, self.sim
        kind = type(message).__name__
        if kind == "HelloRequest":
            major, minor = API_VERSION
            self.send(
                cls("HelloResponse")(
                    api_version_major=major,
                    api_version_minor=minor,
                    server_info=f"keeplink esphome simulator {sim.esphome_version}",
                    name=sim.name,
                ),
            )
            conn.authenticated = sim.password is None
        elif kind == "AuthenticationRequest":
            if sim.password is not None:
                ok = message.password == sim.password
                self.send(cls("AuthenticationResponse")(invalid_password=not ok))
                if not ok:
                    raise Closing("wrong password")
                conn.authenticated = True
        elif kind == "DisconnectRequest":
            self.send(cls("DisconnectResponse")())
            raise Closing("client disconnected")
        elif kind == "PingRequest":
            sim.pings += 1
            if not sim.hold_pings:
                self.send(cls("PingResponse")())
        elif kind == "DeviceInfoRequest":
            sim.device_info_requests += 1
            self.send(sim.device_info())
        elif not conn.authenticated:
            raise Closing(f"{kind} before authentication")
        elif kind == "ListEntitiesRequest":
            for entity in sim.entities.values():
                self.send(list_message(entity))
            self.send(cls("ListEntitiesDoneResponse")())
        elif kind == "SubscribeStatesRequest":
            conn.subscribed = True
            for entity in sim.entities.values():
                sim.send_state(conn, entity)
        elif kind.endswith("CommandRequest"):
            self._command(kind, message)

    def _entity_by_key(self, key: int) -> SimEntity | None:
        sim = self.sim
        for entity in sim.entities.values():
            if entity.key == key:
                return entity
        return None

    def _command(self, kind: str, message: Any) -> None:
        sim = self.sim
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
        sim.commands.append((entity.object_id, fields))
        if sim.on_command is not None:
            sim.on_command(entity.object_id, fields)
        if sim.drop_commands:
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
        sim.publish(entity)
