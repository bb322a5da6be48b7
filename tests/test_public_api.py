"""The public surface is on purpose: the export list is pinned, layers import one way."""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import subprocess
import sys
import time

import pytest

import keeplink
import keeplink.drivers
import keeplink.testing
from helpers import Recorder, connected, eventually

PACKAGE = pathlib.Path(keeplink.__file__).parent

EXPECTED = {
    "LIVENESS_RATIO", "MESSAGE_MARKERS", "AbortedError", "AuthError", "Backoff", "Channel",
    "Clock", "Codec", "ConfigError", "DeviceNotFoundError", "DeviceUnavailableError", "Driver",
    "ErrorClass", "ErrorCode", "ErrorInfo", "ExpiredError", "FrameChannel", "FrameReceived",
    "HeartbeatReply", "IllegalTransitionError", "InvalidRequestError", "KeeplinkError", "Link",
    "LinkBrokenError", "LinkClosedError", "LinkEvent", "LinkState", "LinkStateChanged",
    "LinkStatistics", "Malformed", "ProtocolError", "ProtocolErrorSeen", "RejectedError",
    "Reply", "RequestCancelledError", "RequestTimeout", "SessionInfo", "SideDataReceived",
    "SlotsExhaustedError", "StoreUnavailableError", "StreamChannel", "SystemClock", "Timer",
    "VirtualClock",
    "__version__", "classify", "deadline", "error_class_of", "error_from_code", "sleep_until",
    "Acknowledged", "Cancelled", "Outcome", "Rejected", "TimedOut", "Unavailable",
    "enum_or_none", "Correlator", "SequenceExhaustedError", "Slot", "SlotPool",
    "SlotPoolStatistics", "CommandNotFoundError", "ConflictError", "PreconditionFailedError",
    "DeviceMismatchError", "QueueFullError", "StoreBusyError", "StatePush", "WaitTimeoutError",
    "WallClock",
}  # fmt: skip


def test_the_export_list_is_pinned() -> None:
    assert set(keeplink.__all__) == EXPECTED
    assert len(keeplink.__all__) == len(EXPECTED), "duplicates in __all__"
    for name in keeplink.__all__:
        assert hasattr(keeplink, name), name


TESTING = {
    "AppliedCommand", "DeviceSimulator", "FaultProxy", "MemoryChannel", "PeerRequest",
    "ProxyStatistics", "ScriptedDriver", "ScriptedPeer", "SimStatistics", "VirtualClock",
    "free_port",
}  # fmt: skip


def test_the_testing_export_list_is_pinned() -> None:
    assert set(keeplink.testing.__all__) == TESTING
    assert len(keeplink.testing.__all__) == len(TESTING), "duplicates in __all__"


ESPOTA_MODULES = {
    "keeplink.outbox.esphome_ota": {
        "BUILD_KEYS", "DEFAULT_PORT", "Address", "EsphomeOta", "Installed", "PasswordFor",
        "build_of", "runs_build",
    },
    "keeplink.testing.espota": {"DeviceAuth", "Flash", "OtaFault", "OtaReceiver"},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ESPOTA_MODULES))
def test_the_esphome_ota_modules_export_lists_are_pinned(name: str) -> None:
    """Public modules of their own (imported by name, not re-exported by their package)."""
    module = importlib.import_module(name)
    assert set(module.__all__) == ESPOTA_MODULES[name]
    assert len(module.__all__) == len(ESPOTA_MODULES[name]), "duplicates in __all__"
    for export in module.__all__:
        assert hasattr(module, export), f"{name}.{export}"


def test_subpackages_export_what_they_list() -> None:
    for module in (keeplink.drivers, keeplink.testing):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


async def test_a_state_push_is_matched_by_its_public_name(
    virtual_clock: keeplink.VirtualClock,
) -> None:
    async with keeplink.testing.DeviceSimulator(device_id="hall", clock=virtual_clock) as sim:
        driver = keeplink.drivers.JsonLineDriver(host=sim.host, port=sim.port)
        link = keeplink.Link(driver, name="hall", clock=virtual_clock, heartbeat_s=None)
        rec = Recorder(link)
        async with link:
            await connected(link)
            assert await sim.push_state({"temp": 21.5}) == 1
            await eventually(lambda: bool(rec.of(keeplink.FrameReceived)), what="a push")
    frames = [e.frame for e in rec.of(keeplink.FrameReceived)]  # type: ignore[union-attr]
    assert frames == [keeplink.StatePush(values={"temp": 21.5})]
    assert all(isinstance(f, keeplink.drivers.StatePush) for f in frames)
    assert keeplink.StatePush is keeplink.drivers.StatePush
    assert keeplink.StatePush.__doc__ and "FrameReceived" in keeplink.StatePush.__doc__
    assert "StatePush" in keeplink.drivers.__all__


async def test_the_outboxs_wall_clock_is_public_for_a_presence_tracker_it_shares() -> None:
    """A PresenceTracker handed to an Outbox stamps the ``online_since`` that the outbox's
    ``min_online`` compares with its own (wall-clock) time, so it must run on a wall clock
    too: ``keeplink.WallClock``, the outbox's default."""
    from keeplink.outbox import MemoryStore, Outbox
    from keeplink.presence import PresenceTracker, Source

    assert isinstance(Outbox(MemoryStore()).clock, keeplink.WallClock)
    tracker = PresenceTracker(clock=keeplink.WallClock(), debounce_online_s=0)
    try:
        before = time.time()
        tracker.report("hall", Source.MDNS, True)
        since = tracker.online_since("hall")
        assert since is not None and before <= since <= time.time()
    finally:
        tracker.close()


def test_the_package_is_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


MODULE_LINES = 620
CLASS_LINES = 320
"""About 600 lines a module and 300 a class, everywhere in the package: past these a module
or a class does more than one thing (a room one can no longer hold in one's head). Split it
by what it does rather than let it grow."""


def test_every_module_and_class_stays_small() -> None:
    too_big: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text("utf-8")
        name = path.relative_to(PACKAGE).as_posix()
        if len(text.splitlines()) > MODULE_LINES:
            too_big.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > CLASS_LINES:
                    too_big.append(f"{name}: class {node.name} is {lines} lines")
    assert too_big == []


# Lower number = lower layer. A module may import only from its own layer or lower ones.
# The runtime (layers 1-3) is ordered too: clock, events and logs below the channel, the
# driver seam and the slots, and those below the link that is built on all of them.
LAYERS: list[tuple[str, int]] = [
    ("keeplink._core", 0),
    ("keeplink._clock", 1),
    ("keeplink._events", 1),
    ("keeplink._logs", 1),
    ("keeplink._channel", 2),
    ("keeplink._driver", 2),
    ("keeplink._slots", 2),
    ("keeplink._link", 3),
    ("keeplink.drivers", 4),
    ("keeplink.outbox", 5),
    ("keeplink.presence", 5),
    ("keeplink.presence.mdns", 5),
    ("keeplink.testing", 6),
    ("keeplink.gateway", 7),
    ("keeplink.cli", 7),
    ("keeplink.cli_client", 7),
    ("keeplink.gateway_client", 7),
    ("keeplink.__main__", 7),
    ("keeplink", 7),  # the package __init__ re-exports from everywhere
]


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} has no layer; add it to LAYERS")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name == "keeplink" or name.startswith("keeplink.")}


def test_layers_import_one_way() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for imported in imports_of(path):
            if layer_of(imported) > layer_of(me):
                violations.append(f"{me} (layer {layer_of(me)}) imports {imported}")
    assert violations == []


def test_the_core_never_touches_sockets_clocks_or_the_event_loop() -> None:
    banned = {"asyncio", "socket", "time", "selectors", "threading"}
    for path in sorted((PACKAGE / "_core").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            for name in names:
                assert name not in banned or (name, path.name) in ALLOWED_CORE, (
                    f"{path.name} imports {name}"
                )


def imported_test_modules(path: pathlib.Path) -> set[str]:
    """The test modules (``test_*``) that ``path`` imports, however it spells the import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.add(node.module)
            if node.level > 0:  # from . import test_x
                found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[-1].startswith("test_")}


def test_test_modules_never_import_each_other() -> None:
    """Shared helpers live in plain modules (helpers.py, gateway_procs.py, ...) and shared
    fixtures in conftest.py: importing a test module runs its collection twice and hides
    its tests' dependencies."""
    tests = pathlib.Path(__file__).resolve().parent
    violations = [
        f"{path.relative_to(tests)} imports {imported}"
        for path in sorted(tests.rglob("*.py"))
        for imported in sorted(imported_test_modules(path))
    ]
    assert violations == []


# classify() recognises asyncio's and socket's exception *types*; it never does I/O.
ALLOWED_CORE = {("asyncio", "classify.py"), ("socket", "classify.py")}


@pytest.mark.parametrize(
    ("module", "needs"),
    [
        ("keeplink.testing.store_suite", "hypothesis"),
        ("keeplink.testing.modbus", "pymodbus"),
        ("keeplink.testing.mqtt", "mqtt5"),
        ("keeplink.testing.esphome", "aioesphomeapi"),
        ("keeplink.drivers.esphome", "aioesphomeapi"),
    ],
)
def test_an_optional_testing_module_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch, module: str, needs: str
) -> None:
    for name in [needs, *(n for n in sys.modules if n.startswith(needs + "."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=f"{module} needs {needs}"):
        importlib.import_module(module)


def test_the_modbus_driver_and_its_probe_need_no_modbus_library() -> None:
    """keeplink speaks Modbus TCP with its own codec: the driver and the unit probe import
    (and encode a request) with pymodbus unimportable; only the test peer needs it."""
    code = (
        "import sys; sys.modules['pymodbus'] = None\n"
        "import keeplink.drivers.modbus as m, keeplink.presence.modbus\n"
        "d = m.ModbusDriver(host='h')\n"
        "r = d.build_request(1, 'read_coils', {'unit': 1, 'address': 0, 'count': 1}, None)\n"
        "assert r.adu == bytes.fromhex('00010000000601010000 0001'.replace(' ', ''))\n"
        "assert not [n for n in sys.modules if n.startswith('pymodbus.')]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
