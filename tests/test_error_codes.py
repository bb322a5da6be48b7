"""Every ErrorCode, produced by a real failure; classify(); codes across the wire."""

from __future__ import annotations

import asyncio
import errno
import shutil
import ssl
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from helpers import connected, eventually, until_state
from keeplink import (
    AbortedError,
    AuthError,
    ConfigError,
    DeviceMismatchError,
    DeviceNotFoundError,
    ErrorCode,
    InvalidRequestError,
    KeeplinkError,
    Link,
    LinkBrokenError,
    LinkState,
    ProtocolError,
    QueueFullError,
    Rejected,
    RejectedError,
    SlotsExhaustedError,
    StoreBusyError,
    TimedOut,
    Unavailable,
    VirtualClock,
    classify,
    error_from_code,
)
from keeplink._core.errors import CommandNotFoundError, ConflictError
from keeplink._slots import SlotPool
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import MemoryStore, Outbox
from keeplink.presence import PresenceTracker
from keeplink.testing import DeviceSimulator, FaultProxy, free_port

S = LinkState
Producer = Callable[[], Awaitable[KeeplinkError]]
PRODUCERS: dict[ErrorCode, Producer] = {}


def produces(code: ErrorCode) -> Callable[[Producer], Producer]:
    def register(fn: Producer) -> Producer:
        PRODUCERS[code] = fn
        return fn

    return register


@produces(ErrorCode.CONNECTION_FAILED)
async def refused_connect() -> KeeplinkError:
    driver = JsonLineDriver(host="127.0.0.1", port=free_port())
    with pytest.raises(LinkBrokenError) as info:
        await driver.open()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    return info.value


@produces(ErrorCode.TIMEOUT)
async def reply_never_comes() -> KeeplinkError:
    async with DeviceSimulator() as sim:
        async with Link(JsonLineDriver(host=sim.host, port=sim.port), name="t") as link:
            await connected(link)
            outcome = await link.request("noreply", {}, timeout=0.05)
    assert isinstance(outcome, TimedOut)
    return outcome.error


@produces(ErrorCode.AUTH_FAILED)
async def wrong_token() -> KeeplinkError:
    async with DeviceSimulator(token="right") as sim:
        driver = JsonLineDriver(host=sim.host, port=sim.port, token="wrong")
        async with Link(driver, name="t") as link:
            with pytest.raises(AuthError) as info:
                await connected(link)
    return info.value


@produces(ErrorCode.DEVICE_MISMATCH)
async def another_device_answers_at_the_address() -> KeeplinkError:
    async with DeviceSimulator(device_id="garage") as sim:
        driver = JsonLineDriver(host=sim.host, port=sim.port, device_id="hall")
        async with Link(driver, name="hall") as link:
            with pytest.raises(DeviceMismatchError) as info:
                await connected(link)
            assert link.state is S.FAILED  # terminal, like a refused token
            outcome = await link.request("set", {"x": 1}, timeout=5)
        assert isinstance(outcome, Unavailable) and outcome.error is info.value
        assert sim.statistics().requests == 0  # nothing reached the wrong device
    assert isinstance(info.value, AuthError)
    return info.value


@produces(ErrorCode.OUT_OF_CONNECTION_SLOTS)
async def slot_wait_elapses() -> KeeplinkError:
    clock = VirtualClock()
    pool = SlotPool(size=1, name="ble-proxy", clock=clock, acquire_timeout_s=20)
    held = pool.acquire_nowait("other")
    waiter = asyncio.create_task(pool.acquire("me"))
    await clock.advance(20)
    with pytest.raises(SlotsExhaustedError) as info:
        await waiter
    held.release()
    await pool.close()
    return info.value


@produces(ErrorCode.CONNECTION_ABORTED)
async def pool_closed_while_queued() -> KeeplinkError:
    pool = SlotPool(size=1, name="gw")
    held = pool.acquire_nowait("other")
    waiter = asyncio.create_task(pool.acquire("me"))
    await eventually(lambda: pool.statistics().waiting == 1)
    await pool.close()
    with pytest.raises(AbortedError) as info:
        await waiter
    held.release()
    return info.value


@produces(ErrorCode.DEVICE_NOT_FOUND)
async def hub_does_not_know_the_device() -> KeeplinkError:
    async with DeviceSimulator() as hub:
        hub.refuse_hello = ("device_not_found", "no device 'garage' behind this hub")
        async with Link(JsonLineDriver(host=hub.host, port=hub.port), name="garage") as link:
            await until_state(link, S.BACKOFF)
            error = link.last_error
    assert isinstance(error, DeviceNotFoundError)
    return error


@produces(ErrorCode.DEVICE_UNAVAILABLE)
async def request_while_the_device_is_away() -> KeeplinkError:
    async with DeviceSimulator() as sim, FaultProxy(sim.host, sim.port) as proxy:
        proxy.set_down(True)
        async with Link(JsonLineDriver(host=proxy.host, port=proxy.port), name="t") as link:
            await until_state(link, S.BACKOFF)
            outcome = await link.request("set", {}, timeout=1)
    assert isinstance(outcome, Unavailable)
    return outcome.error


@produces(ErrorCode.DISCOVERY_FAILED)
async def name_does_not_resolve() -> KeeplinkError:
    # Resolution happens in a private network namespace (only `lo`), so the lookup fails
    # at once and no query ever leaves this machine.
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not available to make a private network namespace")
    script = textwrap.dedent(
        """
        import asyncio
        from keeplink.drivers import JsonLineDriver
        async def main():
            try:
                await JsonLineDriver(host="thermostat.invalid", port=7001).open()
            except Exception as exc:
                print(exc.wire_code, type(exc).__name__, type(exc.__cause__).__name__)
        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-n", sys.executable, "-c", script,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0 and b"unshare" in err:
        pytest.skip(f"cannot make a network namespace here: {err.decode().strip()}")
    code, cls, cause = out.decode().split()
    assert cause == "gaierror"
    return error_from_code(code, f"{cls}: name lookup failed")


@produces(ErrorCode.REJECTED)
async def device_refuses() -> KeeplinkError:
    async with DeviceSimulator(reject_ops=frozenset({"open-valve"})) as sim:
        async with Link(JsonLineDriver(host=sim.host, port=sim.port), name="t") as link:
            await connected(link)
            outcome = await link.request("open-valve", {}, timeout=5)
    assert isinstance(outcome, Rejected)
    return outcome.error


async def _peer_sending(first_frame: bytes) -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(first_frame)
        try:
            await reader.read()
        except OSError:
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


@produces(ErrorCode.PROTOCOL_ERROR)
async def peer_answers_hello_with_a_request() -> KeeplinkError:
    server, port = await _peer_sending(b'{"t":"req","seq":1,"op":"reboot"}\n')
    try:
        async with Link(JsonLineDriver(host="127.0.0.1", port=port), name="t") as link:
            await until_state(link, S.BACKOFF)
            error = link.last_error
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(error, ProtocolError)
    return error


@produces(ErrorCode.INVALID_REQUEST)
async def bad_arguments() -> KeeplinkError:
    async with DeviceSimulator() as sim:
        async with Link(JsonLineDriver(host=sim.host, port=sim.port), name="t") as link:
            await connected(link)
            with pytest.raises(InvalidRequestError) as info:
                await link.request("set", {"when": object()}, timeout=5)
    return info.value


@produces(ErrorCode.CANCELLED)
async def stopped_with_a_request_pending() -> KeeplinkError:
    async with DeviceSimulator() as sim:
        link = Link(JsonLineDriver(host=sim.host, port=sim.port), name="t")
        link.start()
        await connected(link)
        pending = asyncio.create_task(link.request("noreply", {}, timeout=60))
        await eventually(lambda: sim.statistics().requests == 1)
        await link.stop()
        outcome = await pending
    return outcome.error  # type: ignore[return-value]


@produces(ErrorCode.LINK_CLOSED)
async def request_on_a_stopped_link() -> KeeplinkError:
    link = Link(JsonLineDriver(host="127.0.0.1", port=7001), name="t")
    outcome = await link.request("set", {}, timeout=1)
    assert isinstance(outcome, Unavailable)
    return outcome.error


@produces(ErrorCode.CONFIG_ERROR)
async def impossible_port() -> KeeplinkError:
    with pytest.raises(ConfigError) as info:
        JsonLineDriver(host="127.0.0.1", port=70000)
    return info.value


@produces(ErrorCode.CHECKSUM_MISMATCH)
async def firmware_hash_does_not_match() -> KeeplinkError:
    import base64

    async with DeviceSimulator() as sim:
        async with Link(JsonLineDriver(host=sim.host, port=sim.port), name="t") as link:
            await connected(link)
            await link.call("ota.begin", {"size": 4, "sha256": "0" * 64}, timeout=5)
            chunk = {"offset": 0, "data": base64.b64encode(b"abcd").decode()}
            await link.call("ota.chunk", chunk, timeout=5)
            outcome = await link.request("ota.end", {}, timeout=5)
    assert isinstance(outcome, Rejected)
    assert isinstance(outcome.error, RejectedError)
    return outcome.error


@produces(ErrorCode.UNKNOWN)
async def peer_speaks_a_newer_dialect() -> KeeplinkError:
    server, port = await _peer_sending(b'{"t":"error","code":"quota_exceeded","msg":"later"}\n')
    try:
        async with Link(JsonLineDriver(host="127.0.0.1", port=port), name="t") as link:
            await until_state(link, S.BACKOFF)  # unknown: treated as transient, retried
            error = link.last_error
    finally:
        server.close()
        await server.wait_closed()
    assert error is not None
    assert error.wire_code == "quota_exceeded"  # preserved, not lost
    return error


async def _outbox_with_a_command(**submit: Any) -> tuple[Outbox, VirtualClock, str]:
    clock = VirtualClock(start=1_800_000_000.0)
    outbox = Outbox(MemoryStore(), clock=clock)
    await outbox.start()
    command = await outbox.submit("absent-device", "set", {"x": 1}, **submit)
    return outbox, clock, command.id


@produces(ErrorCode.EXPIRED)
async def deadline_passes_while_the_device_is_away() -> KeeplinkError:
    outbox, clock, command_id = await _outbox_with_a_command(ttl_s=30)
    await clock.advance(30)
    command = await asyncio.wait_for(outbox.wait(command_id), 10)
    await outbox.close()
    assert command.last_error is not None
    return error_from_code(command.last_error.code, command.last_error.message)


@produces(ErrorCode.PRECONDITION_FAILED)
async def image_changed_before_delivery() -> KeeplinkError:
    import tempfile

    from keeplink.outbox.firmware import image_matches

    async with DeviceSimulator(device_id="ota") as sim:
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/fw.bin"
            await asyncio.to_thread(Path(path).write_bytes, b"v1 image")
            outbox = Outbox(
                MemoryStore(),
                presence=PresenceTracker(debounce_online_s=0, debounce_offline_s=0),
            )
            outbox.preconditions["image_matches"] = image_matches
            await outbox.start()
            command = await outbox.submit(
                "ota", "firmware", {"path": path, "sha256": "0" * 64}, precondition="image_matches"
            )
            link = Link(JsonLineDriver(host=sim.host, port=sim.port), name="ota")
            await outbox.attach("ota", link)
            link.start()
            try:
                done = await asyncio.wait_for(outbox.wait(command.id), 10)
            finally:
                await link.stop()
                await outbox.close()
                outbox.presence.close()
    assert done.last_error is not None
    return error_from_code(done.last_error.code, done.last_error.message)


@produces(ErrorCode.CONFLICT)
async def cancel_a_finished_command() -> KeeplinkError:
    outbox, _, command_id = await _outbox_with_a_command()
    await outbox.cancel(command_id)
    with pytest.raises(ConflictError) as info:
        await outbox.cancel(command_id)
    await outbox.close()
    return info.value


@produces(ErrorCode.COMMAND_NOT_FOUND)
async def no_such_command() -> KeeplinkError:
    outbox, _, _ = await _outbox_with_a_command()
    with pytest.raises(CommandNotFoundError) as info:
        await outbox.get("0" * 32)
    await outbox.close()
    return info.value


@produces(ErrorCode.STORE_UNAVAILABLE)
async def database_not_there() -> KeeplinkError:
    from keeplink import StoreUnavailableError
    from keeplink.outbox.postgres import PostgresStore

    port = free_port()  # nothing listens here: the database server is down
    store = PostgresStore(f"postgresql://keeplink@127.0.0.1:{port}/keeplink")
    with pytest.raises(StoreUnavailableError) as info:
        await store.open()
    await store.close()
    assert isinstance(info.value.__cause__, OSError)  # refused, kept as the cause
    return info.value


@produces(ErrorCode.QUEUE_FULL)
async def a_submit_over_max_queued() -> KeeplinkError:
    outbox, _, _ = await _outbox_with_a_command(max_queued=1)
    with pytest.raises(QueueFullError) as info:
        await outbox.submit("absent-device", "set", {"x": 2}, max_queued=1)
    assert await outbox.store.count(device="absent-device") == 1  # nothing stored
    await outbox.close()
    return info.value


@produces(ErrorCode.STORE_BUSY)
async def another_process_holds_the_sqlite_write_lock() -> KeeplinkError:
    import sqlite3
    import tempfile

    from keeplink.outbox import SqliteStore

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "busy.db"
        store = SqliteStore(path)
        await store.open()
        outbox = Outbox(store)
        await outbox.start()
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # held until the store's busy timeout passes
        try:
            with pytest.raises(StoreBusyError) as info:
                await outbox.submit("absent-device", "set", {"x": 1})
            await outbox.close()
        finally:
            blocker.close()
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    return info.value


def test_every_code_has_a_producer() -> None:
    assert set(PRODUCERS) == set(ErrorCode)


@pytest.mark.parametrize("code", sorted(PRODUCERS, key=lambda c: c.value), ids=lambda c: c.value)
async def test_a_real_failure_produces_the_code(code: ErrorCode) -> None:
    error = await PRODUCERS[code]()
    assert error.code is code
    assert error.to_wire()["code"] == (error.wire_code if code is ErrorCode.UNKNOWN else code.value)


# ---------------------------------------------------------------------------- classify


async def test_classify_goes_by_type_for_real_exceptions() -> None:
    with pytest.raises(ConnectionRefusedError) as refused:
        await asyncio.open_connection("127.0.0.1", free_port())
    assert classify(refused.value) is ErrorCode.CONNECTION_FAILED
    with pytest.raises(TimeoutError) as timeout:
        async with asyncio.timeout(0):
            await asyncio.sleep(1)
    assert classify(timeout.value) is ErrorCode.TIMEOUT
    assert (
        classify(ssl.SSLCertVerificationError("certificate verify failed")) is ErrorCode.AUTH_FAILED
    )
    assert classify(ssl.SSLError("bad record mac")) is ErrorCode.CONNECTION_FAILED
    assert classify(asyncio.CancelledError()) is ErrorCode.CANCELLED
    assert classify(SlotsExhaustedError("full")) is ErrorCode.OUT_OF_CONNECTION_SLOTS


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.EHOSTUNREACH, ErrorCode.DEVICE_UNAVAILABLE),
        (errno.ENETUNREACH, ErrorCode.DEVICE_UNAVAILABLE),
        (errno.ETIMEDOUT, ErrorCode.TIMEOUT),
        (errno.ECONNABORTED, ErrorCode.CONNECTION_ABORTED),
        (errno.EADDRNOTAVAIL, ErrorCode.CONFIG_ERROR),
        (errno.EPIPE, ErrorCode.CONNECTION_FAILED),
    ],
)
def test_classify_maps_os_errnos(err: int, code: ErrorCode) -> None:
    assert classify(OSError(err, "boom")) is code


class BleakError(Exception):
    """A library exception with no structured code (like bleak's)."""


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("No free connection slots on proxy", ErrorCode.OUT_OF_CONNECTION_SLOTS),
        ("connection_failed: OUT OF CONNECTION SLOTS", ErrorCode.OUT_OF_CONNECTION_SLOTS),
        ("Connection aborted by peer", ErrorCode.CONNECTION_ABORTED),
        ("Device with address AA:BB not found", ErrorCode.DEVICE_NOT_FOUND),
        ("Unauthorized", ErrorCode.AUTH_FAILED),
        ("operation timed out", ErrorCode.TIMEOUT),
        ("something else entirely", ErrorCode.CONNECTION_FAILED),
    ],
)
def test_message_markers_are_a_case_insensitive_last_resort(message: str, code: ErrorCode) -> None:
    assert classify(BleakError(message)) is code


def test_the_type_wins_over_the_message() -> None:
    assert (
        classify(ConnectionRefusedError("out of connection slots")) is ErrorCode.CONNECTION_FAILED
    )
    assert classify(AuthError("connection slots")) is ErrorCode.AUTH_FAILED


# ---------------------------------------------------------------------------- the wire


@pytest.mark.parametrize("code", [c for c in ErrorCode if c is not ErrorCode.UNKNOWN])
def test_every_code_round_trips_through_its_wire_form(code: ErrorCode) -> None:
    error = error_from_code(code.value, "said the peer")
    assert (error.code, error.wire_code) == (code, code.value)
    again = error_from_code(wire_code=error.to_wire()["code"], message=error.message)
    assert type(again) is type(error)
    assert again.code is code


def test_a_peers_slot_exhaustion_becomes_a_slots_exhausted_error() -> None:
    error = Rejected(seq=1, code="out_of_connection_slots", message="3 of 3 in use").error
    assert isinstance(error, SlotsExhaustedError)
    assert error.code is ErrorCode.OUT_OF_CONNECTION_SLOTS


@pytest.fixture
async def raw_hub() -> AsyncIterator[tuple[asyncio.Server, int]]:
    server, port = await _peer_sending(
        b'{"t":"error","code":"out_of_connection_slots","msg":"3/3"}\n'
    )
    yield server, port
    server.close()
    await server.wait_closed()


async def test_a_handshake_refusal_keeps_the_peers_code(
    raw_hub: tuple[asyncio.Server, int],
) -> None:
    _, port = raw_hub
    async with Link(JsonLineDriver(host="127.0.0.1", port=port), name="t") as link:
        await until_state(link, S.BACKOFF)
        assert isinstance(link.last_error, SlotsExhaustedError)
        assert link.last_error.message == "3/3"
