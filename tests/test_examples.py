"""Every program in examples/ run end to end, as a new integration author would run them.

- The thermostat client and the integration against :class:`DeviceSimulator` on loopback;
  what is timed (debounce, reconnects) runs on a :class:`VirtualClock` started at an epoch
  time (the outbox wants one), while real sockets carry the bytes.
- The Modbus example against a real pymodbus server (``keeplink.testing.modbus``).
- The MQTT example against a real Mosquitto (``tests/mosquitto.py``; skipped only where the
  broker is not installed, as the MQTT driver's own tests are).

The examples are imported as the package ``examples`` from the repository root.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import json
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the root there
    sys.path.insert(0, _ROOT)

from examples import integration, modbus_example, mqtt_example  # noqa: E402
from examples.integration import __main__ as integration_main  # noqa: E402
from examples.thermostat import (  # noqa: E402
    Mode,
    Thermostat,
    ThermostatError,
    ThermostatState,
)
from examples.thermostat import __main__ as thermostat_main  # noqa: E402
from helpers import IO_BOUND_S, eventually, io_settle  # noqa: E402
from keeplink import AuthError, Backoff, Link, LinkState, VirtualClock  # noqa: E402
from keeplink.outbox import CommandState, SqliteStore  # noqa: E402
from keeplink.testing import DeviceSimulator, FaultProxy  # noqa: E402
from keeplink.testing.modbus import INPUT_VALUE, ModbusGateway  # noqa: E402
from keeplink.testing.mqtt import mqtt_device_on  # noqa: E402
from mosquitto import Mosquitto  # noqa: E402

Q = CommandState
EPOCH = 1_700_000_000.0
DEVICE = "hall-thermostat"


@pytest.fixture
async def gateway() -> AsyncIterator[ModbusGateway]:
    """A pymodbus gateway on a free port, stopped after the test."""
    gw = ModbusGateway()
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


TOKEN = "s3cret"
HEARTBEAT_S = 30.0
BACKOFF = Backoff(initial_s=1, cap_s=4)
DEBOUNCE_ONLINE_S = 1.0
DEBOUNCE_OFFLINE_S = 5.0


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def clock() -> Iterator[VirtualClock]:
    """Virtual time at a realistic epoch, shared by the simulator, the link and the outbox;
    the test fails if it leaves a timer pending on it."""
    virtual = VirtualClock(EPOCH)
    yield virtual
    assert virtual.live_timers == 0, f"timers left at {virtual.pending()}"


@pytest.fixture
async def device(clock: VirtualClock) -> AsyncIterator[DeviceSimulator]:
    sim = DeviceSimulator(device_id=DEVICE, token=TOKEN, clock=clock)
    sim.state.update({"temp": 19.5, "target": 19.0, "mode": "heat"})  # what it holds at boot
    async with sim:
        yield sim


def thermostat_for(sim: DeviceSimulator, store: Path, clock: VirtualClock) -> Thermostat:
    return Thermostat(
        host=sim.host,
        port=sim.port,
        device_id=DEVICE,
        token=TOKEN,
        store=store,
        heartbeat_s=HEARTBEAT_S,
        backoff=BACKOFF,
        debounce_online_s=DEBOUNCE_ONLINE_S,
        debounce_offline_s=DEBOUNCE_OFFLINE_S,
        clock=clock,
    )


class Listener:
    """What a thermostat's listener saw: ``available`` each time it was called."""

    def __init__(self, thermostat: Thermostat) -> None:
        self.thermostat = thermostat
        self.calls: list[tuple[bool, ThermostatState]] = []
        thermostat.add_listener(self)

    def __call__(self) -> None:
        self.calls.append((self.thermostat.available, self.thermostat.state))

    def flips(self) -> list[bool]:
        """``available`` as it changed, from False (before anything was known)."""
        flips = [False]
        for available, _ in self.calls:
            if available != flips[-1]:
                flips.append(available)
        return flips


async def advance_while_backing_off(
    clock: VirtualClock, link: Link[Any], until: Callable[[], bool], *, limit_s: float = 30.0
) -> float:
    """Until ``until()`` holds: move virtual time on in small steps while the link waits out
    a backoff (only the clock ends that wait), and let the sockets work while it connects or
    handshakes (virtual time standing still, so no connect or handshake timeout can fire
    however slowly a loaded machine carries the bytes). Returns the virtual time moved."""
    moved = 0.0
    async with asyncio.timeout(IO_BOUND_S):
        while not until():
            if link.state is LinkState.BACKOFF:
                assert moved < limit_s, f"still backing off after {moved:g}s of virtual time"
                await clock.advance(0.25)
                moved += 0.25
            await io_settle()
    return moved


async def connected(thermostat: Thermostat) -> None:
    async with asyncio.timeout(IO_BOUND_S):  # real sockets: the virtual timeout never fires
        await thermostat.wait_connected(timeout=60)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ------------------------------------------------------------------------------ public API


def test_the_examples_use_only_keeplinks_public_api() -> None:
    """What an author copies must not lean on private modules or names: every keeplink
    import names a module without a leading underscore, and a name its ``__all__`` lists."""
    sources = sorted((Path(_ROOT) / "examples").rglob("*.py"))
    assert len(sources) >= 6
    imported: list[str] = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules = [(node.module, alias.name) for alias in node.names]
            else:
                continue
            for module, name in modules:
                if module.split(".")[0] != "keeplink":
                    continue
                where = f"{path.name}: {module}" + (f".{name}" if name else "")
                assert not any(part.startswith("_") for part in module.split(".")), where
                if name is not None:
                    assert name in importlib.import_module(module).__all__, where
                imported.append(where)
    assert any("StatePush" in where for where in imported)


# ------------------------------------------------------------------------------ thermostat


async def test_the_thermostat_sets_its_target_and_keeps_its_state(
    device: DeviceSimulator, clock: VirtualClock, tmp_path: Path
) -> None:
    async with thermostat_for(device, tmp_path / "t.db", clock) as thermostat:
        seen = Listener(thermostat)
        await connected(thermostat)
        assert thermostat.session is not None and thermostat.session.device_id == DEVICE
        # What it held at boot is read after the connect.
        await eventually(lambda: thermostat.state.temperature == 19.5, what="the first read")
        assert thermostat.state == ThermostatState(temperature=19.5, target=19.0, mode=Mode.HEAT)

        assert not thermostat.available  # connected, but not for debounce_online_s yet
        await clock.advance(DEBOUNCE_ONLINE_S)
        assert thermostat.available

        result = await thermostat.set_target(21.5)
        assert result.applied and result.state is Q.SUCCEEDED
        assert result.rssi == -61  # the side data of its own ack
        assert thermostat.rssi == -61
        assert thermostat.state.target == 21.5
        [applied] = [c for c in device.applied if c.op == "set"]
        assert applied.args == {"target": 21.5}
        assert applied.key is not None  # the outbox's idempotency key went with it

        await device.push_state({"temp": 20.25})
        await eventually(lambda: thermostat.state.temperature == 20.25, what="a state push")
        await device.push_state({"mode": "turbo"})  # newer firmware: unknown, never raw
        await eventually(lambda: thermostat.state.mode is None, what="an unknown mode")
        assert seen.calls[-1] == (True, thermostat.state)

        with pytest.raises(ValueError, match="target must be"):
            await thermostat.set_target(99)
        device.reject_ops = {"set"}
        with pytest.raises(ThermostatError) as refused:
            await thermostat.set_target(20)
        assert refused.value.code == "rejected"
        assert [c.op for c in device.applied] == ["get", "set"]
    assert seen.flips() == [False, True]


async def test_the_thermostat_reconnects_by_itself_after_the_device_restarts(
    device: DeviceSimulator, clock: VirtualClock, tmp_path: Path
) -> None:
    async with thermostat_for(device, tmp_path / "t.db", clock) as thermostat:
        seen = Listener(thermostat)
        await connected(thermostat)
        await clock.advance(DEBOUNCE_ONLINE_S)
        assert thermostat.available

        await device.stop()  # it reboots, and takes a while
        async with asyncio.timeout(IO_BOUND_S):
            await thermostat.link.wait_for_state(LinkState.BACKOFF)
        # Gone, but not for debounce_offline_s yet: still available, to the tenth.
        await clock.advance(DEBOUNCE_OFFLINE_S - 0.1)
        await io_settle()
        assert thermostat.available
        await clock.advance(0.1)
        assert not thermostat.available

        queued = await thermostat.set_target(22.5, wait_s=0)  # while it is away: stored
        assert not queued.applied and queued.state is Q.QUEUED

        await device.start()  # back on the same port; nobody told the thermostat
        link = thermostat.link
        await advance_while_backing_off(clock, link, lambda: link.state is LinkState.CONNECTED)
        assert not thermostat.available
        await clock.advance(DEBOUNCE_ONLINE_S)
        assert thermostat.available
        # The command that waited is delivered now, once.
        await eventually(lambda: thermostat.state.target == 22.5, what="the queued target")
        assert [c.args for c in device.applied if c.op == "set"] == [{"target": 22.5}]
        assert thermostat.link.statistics().connects == 2
    assert seen.flips() == [False, True, False, True]


async def test_a_quick_reboot_is_not_a_disconnect(
    device: DeviceSimulator, clock: VirtualClock, tmp_path: Path
) -> None:
    async with thermostat_for(device, tmp_path / "t.db", clock) as thermostat:
        seen = Listener(thermostat)
        await connected(thermostat)
        await clock.advance(DEBOUNCE_ONLINE_S)

        await device.restart()  # down and up again at once
        link = thermostat.link
        moved = await advance_while_backing_off(
            clock, link, lambda: link.statistics().connects == 2
        )
        assert moved <= BACKOFF.initial_s  # the first retry after a lost session
        await clock.advance(DEBOUNCE_OFFLINE_S)
        assert thermostat.available
    assert seen.flips() == [False, True]  # it never went away


async def test_the_thermostat_program_sets_the_target_and_exits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with DeviceSimulator(device_id=DEVICE, token=TOKEN) as sim:  # real time here
        argv = ["--port", str(sim.port), "--db", str(tmp_path / "t.db"), "--once"]
        parse = thermostat_main.build_parser().parse_args
        assert await thermostat_main.run(parse([*argv, "--token", TOKEN, "--target", "21.5"])) == 0
        out = capsys.readouterr().out
        assert f"connected to {DEVICE}" in out
        assert "target 21.5 applied (rssi -61)" in out
        assert sim.state["target"] == 21.5

        assert await thermostat_main.run(parse([*argv, "--token", "wrong"])) == 1
        assert "refused us: [auth_failed]" in capsys.readouterr().out


# ------------------------------------------------------------------------------ integration


def entry(sim: DeviceSimulator, tmp_path: Path, **changes: Any) -> dict[str, Any]:
    config = {
        "host": sim.host,
        "port": sim.port,
        "token": TOKEN,
        "device_id": DEVICE,
        "store": str(tmp_path / "entry.db"),
        "setup_timeout_s": 5.0,
    }
    return config | changes


def not_the_simulators(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since ``before`` and still running, but for the simulator's own
    (it serves each connection in a task that ends once it has read the close)."""
    return [
        task
        for task in asyncio.all_tasks()
        if task not in before
        and not task.done()
        and not task.get_coro().__qualname__.startswith("DeviceSimulator.")  # type: ignore[union-attr]
    ]


@pytest.fixture
async def real_device() -> AsyncIterator[DeviceSimulator]:
    async with DeviceSimulator(device_id=DEVICE, token=TOKEN) as sim:
        yield sim


async def test_setup_diagnostics_and_unload_leave_no_task_behind(
    real_device: DeviceSimulator, tmp_path: Path
) -> None:
    before = set(asyncio.all_tasks())
    runtime = await integration.async_setup_entry(entry(real_device, tmp_path))
    assert runtime.thermostat.link.state is LinkState.CONNECTED
    assert not_the_simulators(before), "a set-up entry runs its link"
    await runtime.thermostat.wait_available(timeout=IO_BOUND_S)

    report = integration.diagnostics(runtime)
    text = json.dumps(report)  # plain JSON, as Home Assistant stores it
    assert TOKEN not in text
    assert report["config"]["token"] == integration.REDACTED
    assert report["config"]["device_id"] == DEVICE
    assert report["available"] is True
    assert report["link"]["state"] == "connected"
    assert report["link"]["connects"] == 1
    assert report["link"]["session"]["device_id"] == DEVICE
    assert report["reauth"] is None
    assert integration.redact({"a": [{"password": "x", "b": 1}]}) == {
        "a": [{"password": integration.REDACTED, "b": 1}]
    }

    assert await integration.async_unload_entry(runtime) is True
    assert not_the_simulators(before) == []  # at once: unload waited for all of it
    await eventually(lambda: set(asyncio.all_tasks()) <= before, what="every task gone")


@pytest.mark.parametrize(
    ("changes", "code"),
    [({"token": "wrong"}, "auth_failed"), ({"device_id": "kitchen"}, "device_mismatch")],
)
async def test_a_refusal_at_setup_is_a_reauth_with_keeplinks_code(
    real_device: DeviceSimulator, tmp_path: Path, changes: dict[str, Any], code: str
) -> None:
    before = set(asyncio.all_tasks())
    with pytest.raises(integration.ReauthRequired) as refused:
        await integration.async_setup_entry(entry(real_device, tmp_path, **changes))
    assert refused.value.code == code
    assert isinstance(refused.value.__cause__, AuthError)
    assert not_the_simulators(before) == []

    # The re-auth flow gives the right credentials: set-up succeeds.
    runtime = await integration.async_setup_entry(entry(real_device, tmp_path))
    await integration.async_unload_entry(runtime)


async def test_an_unreachable_thermostat_is_not_ready_yet(tmp_path: Path) -> None:
    before = set(asyncio.all_tasks())
    config = {"host": "127.0.0.1", "port": closed_port(), "device_id": DEVICE}
    config |= {"store": str(tmp_path / "entry.db"), "setup_timeout_s": 0.2}
    with pytest.raises(integration.ConfigEntryNotReady, match="connection_failed"):
        await integration.async_setup_entry(config)
    assert not_the_simulators(before) == []


async def test_a_token_refused_after_setup_asks_for_reauth_and_a_reload_fixes_it(
    real_device: DeviceSimulator, tmp_path: Path
) -> None:
    asked: list[integration.ReauthRequired] = []
    runtime = await integration.async_setup_entry(
        entry(real_device, tmp_path), on_reauth=asked.append
    )
    real_device.token = "rotated"  # someone changed the token on the device
    real_device.drop_connections()
    async with asyncio.timeout(IO_BOUND_S):
        await runtime.thermostat.link.wait_for_state(LinkState.FAILED)
    assert [r.code for r in asked] == ["auth_failed"]
    assert runtime.reauth is asked[0]
    assert integration.diagnostics(runtime)["reauth"]["code"] == "auth_failed"

    runtime = await integration.async_reload_entry(
        runtime, entry(real_device, tmp_path) | {"token": "rotated"}
    )
    assert runtime.thermostat.link.state is LinkState.CONNECTED
    assert runtime.reauth is None and runtime.on_reauth is not None
    assert "rotated" not in json.dumps(integration.diagnostics(runtime))
    await integration.async_unload_entry(runtime)


async def test_commands_queued_before_an_unload_are_delivered_after_the_next_setup(
    real_device: DeviceSimulator, tmp_path: Path
) -> None:
    config = entry(real_device, tmp_path)
    runtime = await integration.async_setup_entry(config)
    await real_device.go_to_sleep()  # away: connections closed and refused
    async with asyncio.timeout(IO_BOUND_S):
        await runtime.thermostat.link.wait_for_state(LinkState.BACKOFF)
    queued = await runtime.thermostat.set_target(18.5, wait_s=0)
    assert queued.state is Q.QUEUED
    await integration.async_unload_entry(runtime)  # Home Assistant stops, say

    await real_device.wake_up()
    runtime = await integration.async_setup_entry(config)  # and starts again
    await eventually(lambda: real_device.state.get("target") == 18.5, what="the delivery")
    await eventually(lambda: runtime.thermostat.state.target == 18.5, what="the cache")
    assert [c.key for c in real_device.applied if c.op == "set"] == [queued.command_id]
    await integration.async_unload_entry(runtime)


async def test_the_integration_program_prints_diagnostics_without_the_token(
    real_device: DeviceSimulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--port", str(real_device.port), "--store", str(tmp_path / "entry.db")]
    parse = integration_main.build_parser().parse_args
    assert await integration_main.run(parse([*argv, "--token", TOKEN])) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["link"]["state"] == "connected"
    assert TOKEN not in out
    assert await integration_main.run(parse([*argv, "--token", "wrong"])) == 1
    assert "re-auth required: auth_failed" in capsys.readouterr().out


# ------------------------------------------------------------------------------ modbus


async def test_the_modbus_example_writes_and_reads_back_each_present_unit(
    gateway: ModbusGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    report = await modbus_example.run("127.0.0.1", gateway.port, [1, 2, 9], setpoint=45.5)
    for unit in (1, 2):
        assert report[unit] == {
            "present": True,
            "setpoint": 45.5,
            "mode": modbus_example.Mode.HEAT,
            "outdoor": INPUT_VALUE / 10,
            "pump": True,
            "bad_address": "modbus_exception_2",
        }
        # What landed in the server's datastore, read behind the driver's back.
        assert await gateway.registers(unit, 0, 3) == [0x4236, 0x0000, 1]  # 45.5 f32, heat
        assert await gateway.coils(unit, 0, 1) == [True]
    assert report[9] == {"present": False}  # pymodbus has no unit 9
    assert await gateway.registers(3, 0, 3) == [0, 0, 0]  # never asked for, never written
    assert "unit 9: not there" in capsys.readouterr().out


async def test_the_modbus_example_runs_against_its_own_demo_gateway(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await modbus_example.amain(modbus_example.build_parser().parse_args(["--demo"])) == 0
    out = capsys.readouterr().out
    assert "unit 1: {'present': True, 'setpoint': 45.5" in out
    assert "'outdoor': 7.5" in out
    assert "unit 3: not there" in out


# ------------------------------------------------------------------------------ mqtt


async def test_mqtt_plugs_come_and_go_and_get_their_commands_when_there(
    broker: Mosquitto, tmp_path: Path
) -> None:
    assert broker.port is not None
    plugs = mqtt_example.Plugs(
        broker.host,
        broker.port,
        ["plug-1", "plug-2"],
        store=SqliteStore(tmp_path / "plugs.db"),
        response_topic="{device}/resp",
        debounce_online_s=0.05,
        debounce_offline_s=0.05,
    )
    seen: list[tuple[str, bool]] = []
    async with (
        plugs,
        FaultProxy(broker.host, broker.port, name="plug-1") as network,
    ):
        plugs.add_listener(lambda plug, there: seen.append((plug, there)))
        async with asyncio.timeout(IO_BOUND_S):
            await plugs.link.wait_connected()
        assert not plugs.available("plug-1")
        queued = await plugs.switch("plug-1", True, wait_s=0.2)
        assert queued.state is Q.QUEUED  # nobody there: it waits, stored

        async with mqtt_device_on("plug-1", network.host, network.port, respond=True) as plug:
            async with asyncio.timeout(IO_BOUND_S):
                done = await plugs.outbox.wait(queued.id)
            assert done.state is Q.SUCCEEDED
            assert done.result == {"applied": queued.idempotency_key}
            assert plugs.available("plug-1")
            assert plug.commands == [
                {
                    "op": "switch",
                    "args": {"on": True, "device": "plug-1"},  # named once, filled in
                    "key": queued.idempotency_key,
                    "cid": plug.commands[0]["cid"],
                }
            ]
            off = await plugs.switch("plug-1", False)  # it is there: at once
            assert off.state is Q.SUCCEEDED
            assert plug.applied == [queued.idempotency_key, off.idempotency_key]

            network.set_down()  # its connection dies: the broker publishes its will
            await eventually(lambda: not plugs.available("plug-1"), what="the last will")
        assert not plugs.available("plug-2")  # never said a word
    assert seen == [("plug-1", True), ("plug-1", False)]


async def test_the_mqtt_program_switches_a_plug_that_is_there(
    broker: Mosquitto, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert broker.port is not None
    argv = ["--port", str(broker.port), "--plug", "plug-1", "--on", "--wait", "5"]
    args = mqtt_example.build_parser().parse_args([*argv, "--db", str(tmp_path / "p.db")])
    async with mqtt_device_on("plug-1", broker.host, broker.port) as plug:
        await plug.wait_online()
        states = await mqtt_example.run(args)  # no response topic: done at the PUBACK
    assert states == {"plug-1": Q.SUCCEEDED}
    assert [c["args"] for c in plug.commands] == [{"on": True, "device": "plug-1"}]
    out = capsys.readouterr().out
    assert "plug-1: there" in out and "plug-1: switch on: succeeded" in out
