"""Chaos soak: links, requests and durable commands under a random schedule of every fault.

    python -m bench.chaos --cycles 500 --seed 1 [--links 8] [--json] [--verbose]

``L`` links, each to its own device simulator behind its own :class:`FaultProxy`, all on
127.0.0.1, with one :class:`Outbox` (SQLite in a temporary directory) attached to every
link. Each cycle (20–50 ms of real time) the seeded schedule may switch a fault on a random
proxy (every fault the proxy has: down, black hole, reset now, reset/cut after N bytes,
latency with jitter, slow close, slicer, bandwidth limit and stall, or clear), reboot,
put to sleep, slow down or silence a simulator, flip a simulator's token (the link must go
``failed`` on auth; once the token is restored the soak calls ``link.connect_soon()``, as an
operator would) or restart a link; it submits a few commands to the outbox (plain, keyed
for supersede, with a TTL, refused by the device, cancelled later) and fires a few direct
``link.request()`` calls with short timeouts. Every fault is undone after a few cycles.

After the cycles every fault is cleared, tokens are restored, failed links are connected
and the outbox is given a bounded time to drain. A device whose head command waits for a
time the outbox shows (``Outbox.waiting()``: an in-cycle retry after a lost ack, a
precondition) is left to move on by itself; a parked one is resumed, as an operator would.
A device that is connected and online whose head neither goes out nor waits for a time
(it waits for a new delivery cycle on a live link, or for nothing) is reported as stalled,
with its recent history, and nothing is done to hide it: its commands count as lost.
Then:

supervisors dead
    incidents of a link that should be running (not ``failed`` on an auth flip) without
    a live ``keeplink[<name>].supervisor`` task, or ``failed`` for no reason; checked
    every cycle and at the end.
tasks leaked
    asyncio tasks still not done after everything was stopped (other than the soak's own).
requests unresolved
    direct requests that did not end in exactly one typed outcome (or raised).
commands lost
    commands submitted but missing from the store, not final after the settle phase, final
    in a state their kind cannot legitimately end in, reported ``succeeded`` although the
    device never applied them, or whose ``outbox.wait()`` disagrees with the store.
commands applied twice
    idempotency keys that a simulator's ``applied`` log holds more than once.

Two more rows gate the exit status too: operations that hung past their bound (a
simulator restart, a submit, a cancel, a link stop…) and replies delivered to the wrong
request (an acknowledged echo whose result is not what was sent). The exit status is 0
only if every gated row is 0. Timing is real but short; the schedule is seeded, so a seed
replays the same sequence of actions (the sockets' timing varies a little from run to run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

from keeplink import (
    Acknowledged,
    AuthError,
    Backoff,
    Cancelled,
    ConflictError,
    Link,
    LinkEvent,
    LinkState,
    LinkStateChanged,
    Outcome,
    Rejected,
    TimedOut,
    Unavailable,
)
from keeplink.drivers import JsonLineDriver
from keeplink.outbox import (
    Command,
    CommandState,
    CommandStateChanged,
    DeliveryParked,
    Outbox,
    SqliteStore,
    WaitReason,
)
from keeplink.presence import Presence, PresenceTracker
from keeplink.testing import DeviceSimulator, FaultProxy

__all__ = ["SoakReport", "main", "soak"]

_T = TypeVar("_T")

TOKEN: Final = "chaos-token"
WRONG_TOKEN: Final = "flipped-token"
HOST: Final = "127.0.0.1"

CYCLE_S: Final = (0.02, 0.05)
"""Real time one cycle lasts (uniform)."""
OP_BOUND_S: Final = 5.0
"""Bound on any single awaited operation (a restart, a submit, a stop…)."""
REQUEST_SETTLE_S: Final = 5.0
"""Bound on waiting for the direct requests still in flight after the cycles."""
SETTLE_S: Final = 30.0
"""Bound on the drain of the outbox after the faults stop."""
STALL_S: Final = 0.4
"""A device whose unfinished commands have not changed for this long is looked at: left
alone if it waits for a time the outbox shows, reported as stalled otherwise."""
STALL_GIVE_UP_S: Final = 3.0
"""A stuck device that has not moved for this long is given up on (its commands are lost)."""
AUTH_GRACE_S: Final = 2.0
"""After a token is restored, an auth failure of a handshake already under way is late,
not a bug: the soak connects again (an operator would too)."""
FLIP_MAX_CYCLES: Final = 10
MAX_ATTEMPTS: Final = 1000
REQUEST_TIMEOUT_S: Final = 0.25
RETRY_AFTER_S: Final = 0.5
"""An attempt that failed on a live link (a lost ack) is tried again 0.25–0.5 s later."""
DEBOUNCE_ONLINE_S: Final = 0.01
DEBOUNCE_OFFLINE_S: Final = 0.03
HEARTBEAT_S: Final = 0.05
DETAILS_MAX: Final = 40
HISTORY: Final = 40

_RUNNING: Final = frozenset(
    {
        LinkState.CONNECTING,
        LinkState.HANDSHAKING,
        LinkState.CONNECTED,
        LinkState.LOST,
        LinkState.BACKOFF,
    }
)
_OUTCOME_NAMES: Final[dict[type, str]] = {
    Acknowledged: "acknowledged",
    Rejected: "rejected",
    TimedOut: "timed_out",
    Cancelled: "cancelled",
    Unavailable: "unavailable",
}
_S = CommandState

# What each kind of command may legitimately end as (FAILED after max_attempts is always
# legitimate and counted apart).
_LEGIT: Final[dict[str, frozenset[CommandState]]] = {
    "plain": frozenset({_S.SUCCEEDED}),
    "refused": frozenset({_S.REJECTED}),
    "keyed": frozenset({_S.SUCCEEDED, _S.SUPERSEDED}),
    "ttl": frozenset({_S.SUCCEEDED, _S.EXPIRED}),
    "cancel": frozenset({_S.SUCCEEDED, _S.CANCELLED}),
}
_COMMAND_KINDS: Final = (("plain", 70), ("refused", 8), ("keyed", 10), ("ttl", 6), ("cancel", 6))
_REQUEST_OPS: Final = (("echo", 50), ("set", 10), ("slow", 10), ("noreply", 5), ("fail", 10))
_ACTIONS: Final = (
    # proxy faults
    ("down", 6),
    ("black_hole", 5),
    ("reset_all", 6),
    ("reset_after", 5),
    ("cut_after", 5),
    ("latency", 6),
    ("slow_close", 4),
    ("slicer", 5),
    ("bandwidth", 5),
    ("clear", 8),
    # simulator faults
    ("sim_restart", 5),
    ("sim_sleep", 3),
    ("ack_delay", 4),
    ("drop_acks", 3),
    ("auth_flip", 3),
    # operator
    ("link_restart", 2),
)


def _pick(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    names = [name for name, _ in table]
    weights = [weight for _, weight in table]
    return rng.choices(names, weights)[0]


@dataclass(frozen=True, slots=True, kw_only=True)
class SoakReport:
    """What a soak found. ``ok`` is True only if every gated count is 0."""

    cycles: int
    seed: int
    links: int
    wall_s: float
    cycles_s: float
    settle_s: float
    dead_supervisors: int
    leaked_tasks: int
    unresolved_requests: int
    lost_commands: int
    double_applied: int
    hung_operations: int
    misrouted_replies: int
    requests: int
    request_outcomes: Mapping[str, int]
    commands: int
    command_states: Mapping[str, int]
    failed_after_max_attempts: int
    faults: Mapping[str, int]
    auth_flips: int
    auth_flips_failed: int
    late_auth_failures: int
    stalls: int
    link_connects: int
    link_disconnects: int
    link_internal_errors: int
    timers_left: int
    head_of_line_waits: list[str] = field(default_factory=list)
    """Devices whose head waited for a new delivery cycle on a live link (counted in
    ``stalls``: with in-cycle retries, none should)."""
    errors_logged: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    GATED: ClassVar[tuple[tuple[str, str], ...]] = (
        ("supervisors dead", "dead_supervisors"),
        ("tasks leaked", "leaked_tasks"),
        ("requests unresolved", "unresolved_requests"),
        ("commands lost", "lost_commands"),
        ("commands applied twice", "double_applied"),
        ("operations hung", "hung_operations"),
        ("replies misrouted", "misrouted_replies"),
        ("stalled on a live link", "stalls"),
    )

    @property
    def ok(self) -> bool:
        return all(getattr(self, attr) == 0 for _, attr in self.GATED)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        return out

    def table(self) -> str:
        def counts(mapping: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(mapping.items()))

        notes = {
            "requests unresolved": f"of {self.requests}: {counts(self.request_outcomes)}",
            "commands lost": f"of {self.commands}: {counts(self.command_states)}",
            "supervisors dead": f"{self.links} links, {self.link_connects} connects, "
            f"{self.link_disconnects} disconnects, internal errors {self.link_internal_errors}",
            "tasks leaked": f"timers left {self.timers_left}",
            "commands applied twice": f"failed after max attempts {self.failed_after_max_attempts}",
        }
        lines = [
            f"keeplink chaos soak: {self.cycles} cycles, seed {self.seed}, {self.links} links, "
            f"{self.wall_s:.1f} s (cycles {self.cycles_s:.1f} s, settle {self.settle_s:.1f} s)",
            f"{'check':<24} {'count':>6}  notes",
        ]
        for label, attr in self.GATED:
            lines.append(f"{label:<24} {getattr(self, attr):>6}  {notes.get(label, '')}".rstrip())
        lines.append(f"faults: {counts(self.faults)}")
        lines.append(
            f"auth flips {self.auth_flips} (went failed {self.auth_flips_failed}, late auth "
            f"failures {self.late_auth_failures})"
        )
        for wait in self.head_of_line_waits[:5]:
            lines.append(f"  waited for a new delivery cycle on a live link: {wait}")
        if self.details:
            lines.append("details:")
            lines.extend(f"  {d}" for d in self.details[:DETAILS_MAX])
            if len(self.details) > DETAILS_MAX:
                lines.append(f"  … {len(self.details) - DETAILS_MAX} more")
        if self.errors_logged:
            kinds = collections.Counter(e.split("\n", 1)[0][:160] for e in self.errors_logged)
            lines.append(f"errors and warnings logged: {len(self.errors_logged)}")
            lines.extend(f"  {n} x {first}" for first, n in kinds.most_common(5))
        lines.append("verdict: " + ("PASS" if self.ok else "FAIL"))
        return "\n".join(lines)


class _Collector(logging.Handler):
    """Keeps keeplink's error records (with tracebacks) and counts its warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[str] = []
        self.warnings = 0
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(self.format(record)[:6000])
        else:
            self.warnings += 1


@dataclass(eq=False, slots=True)
class _Device:
    index: int
    name: str
    sim: DeviceSimulator
    proxy: FaultProxy
    link: Link[Any]
    clear_at: int | None = None
    wake_at: int | None = None
    drop_acks_until: int | None = None
    ack_delay_until: int | None = None
    flip_until: int | None = None
    flip_failed: bool = False
    auth_grace_until: float = 0.0
    dead: bool = False
    failed_events: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Request:
    index: int
    device: str
    op: str
    args: dict[str, Any]
    key: str | None
    task: asyncio.Task[Outcome]


@dataclass(slots=True)
class _Submitted:
    command: Command
    kind: str
    waiter: asyncio.Task[Command]


class _Soak:
    def __init__(self, *, cycles: int, seed: int, links: int, db_dir: Path) -> None:
        self.cycles = cycles
        self.seed = seed
        self.n_links = links
        self.rng = random.Random(seed)
        self.db_dir = db_dir
        self.devices: list[_Device] = []
        self.by_name: dict[str, _Device] = {}
        self.presence = PresenceTracker(
            debounce_online_s=DEBOUNCE_ONLINE_S, debounce_offline_s=DEBOUNCE_OFFLINE_S
        )
        self.outbox = Outbox(
            SqliteStore(db_dir / "outbox.db", synchronous="NORMAL"),
            presence=self.presence,
            request_timeout_s=REQUEST_TIMEOUT_S,
            retry_after_s=RETRY_AFTER_S,
            breaker_cycles=1_000_000,
            park_s=1.0,
        )
        self.cycle = 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.details: list[str] = []
        self.dead_supervisors = 0
        self.hung = 0
        self.auth_flips = 0
        self.auth_flips_failed = 0
        self.late_auth = 0
        self.stalls = 0
        self.head_waits: list[str] = []
        self.requests: list[_Request] = []
        self.keys_by_device: dict[str, list[str]] = collections.defaultdict(list)
        self.args_by_key: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.submitted: list[_Submitted] = []
        self.cancels: list[tuple[int, str, str]] = []
        self.history: dict[str, collections.deque[str]] = collections.defaultdict(
            lambda: collections.deque(maxlen=HISTORY)
        )
        self.t0 = 0.0

    # ------------------------------------------------------------------ helpers

    def log(self, device: str, text: str) -> None:
        """Remember what happened to a device, to explain a finding about it later."""
        now = asyncio.get_running_loop().time() - self.t0
        self.history[device].append(f"{now:8.3f}s c{self.cycle:<4} {text}")

    def explain(self, device: str) -> str:
        """A device's recent history and the outbox's view of it, for a report."""
        lines = [f"    history of {device} (newest last):"]
        lines += [f"      {entry}" for entry in self.history[device]]
        return "\n".join(lines)

    def ports(self) -> dict[int, str]:
        """Which listening port is whose, to name the owner of a socket in a warning."""
        out: dict[int, str] = {}
        for dev in self.devices:
            out[dev.sim.port] = f"simulator {dev.name}"
            with contextlib.suppress(RuntimeError):
                out[dev.proxy.port] = f"fault proxy {dev.name}"
        return out

    def note(self, text: str) -> None:
        self.details.append(f"[cycle {self.cycle}] {text}")

    async def bounded(
        self, what: str, awaitable: Awaitable[_T], *, device: str | None = None
    ) -> _T | None:
        """Await with a bound; a hang is counted and reported, never waited out."""
        try:
            async with asyncio.timeout(OP_BOUND_S):
                return await awaitable
        except TimeoutError:
            self.hung += 1
            text = f"hung for {OP_BOUND_S:g}s: {what}"
            if device is not None:
                text += "\n" + self.explain(device)
            self.note(text)
            return None

    async def cancel_command(self, command_id: str, device: str) -> None:
        self.log(device, f"chaos: cancel {command_id[:8]}")
        with contextlib.suppress(ConflictError):  # already final
            await self.bounded(
                f"outbox.cancel({command_id})", self.outbox.cancel(command_id), device=device
            )

    # ------------------------------------------------------------------ setup / teardown

    async def setup(self) -> None:
        self.t0 = asyncio.get_running_loop().time()
        await self.outbox.start()
        self.outbox.subscribe(self._on_outbox_event)
        self.presence.subscribe(
            lambda c: self.log(c.device, f"presence {c.old.value}->{c.new.value} (cycle {c.cycle})")
        )
        for i in range(self.n_links):
            name = f"chaos-{i}"
            bits = (32, 16)[i % 2]
            sim = DeviceSimulator(device_id=name, token=TOKEN, host=HOST, seq_bits=bits)
            await sim.start()
            proxy = FaultProxy(HOST, sim.port, name=name)
            await proxy.start()
            driver = JsonLineDriver(host=proxy.host, port=proxy.port, token=TOKEN, seq_bits=bits)
            link: Link[Any] = Link(
                driver,
                name=name,
                backoff=Backoff(initial_s=0.01, cap_s=0.1, exhausted_s=0.1),
                heartbeat_s=HEARTBEAT_S,
                connect_timeout_s=0.3,
                handshake_timeout_s=0.3,
                send_timeout_s=0.2,
                rng=random.Random(self.seed * 1000 + i).random,
            )
            device = _Device(i, name, sim, proxy, link)
            link.subscribe(self._on_link_event(device))
            self.devices.append(device)
            self.by_name[name] = device
            await self.outbox.attach(name, link)
            link.start()

    def _on_outbox_event(self, event: object) -> None:
        if isinstance(event, CommandStateChanged):
            c = event.command
            old = event.old.value if event.old is not None else "new"
            err = f" [{c.last_error.code}]" if c.last_error is not None else ""
            self.log(
                c.device,
                f"command {c.id[:8]} {old}->{c.state.value} attempts {c.attempts} "
                f"cycle {c.cycle} prio {c.priority}{err}",
            )
        elif isinstance(event, DeliveryParked):
            self.log(event.device, f"delivery parked: {event.reason}")

    def _on_link_event(self, device: _Device) -> Callable[[LinkEvent], None]:
        def on_event(event: LinkEvent) -> None:
            if isinstance(event, LinkStateChanged):
                err = f" [{event.error.code}]" if event.error is not None else ""
                self.log(device.name, f"link {event.old.value}->{event.new.value}{err}")
            if isinstance(event, LinkStateChanged) and event.new is LinkState.FAILED:
                code = event.error.code if event.error is not None else "?"
                device.failed_events.append(code)
                if device.flip_until is not None and code == "auth_failed":
                    device.flip_failed = True

        return on_event

    async def teardown(self) -> None:
        await self.bounded("outbox.close()", self.outbox.close())
        for device in self.devices:
            await self.bounded(f"{device.name}: link.stop()", device.link.stop())
        for device in self.devices:
            await self.bounded(f"{device.name}: proxy.stop()", device.proxy.stop())
            await self.bounded(f"{device.name}: sim.stop()", device.sim.stop())
        self.presence.close()
        for sub in self.submitted:
            if not sub.waiter.done():
                sub.waiter.cancel()
        waiters = [s.waiter for s in self.submitted]
        if waiters:
            await asyncio.wait(waiters, timeout=OP_BOUND_S)
        for waiter in waiters:
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: the outbox's close fails late waits

    # ------------------------------------------------------------------ the cycles

    async def run_cycles(self) -> None:
        for cycle in range(1, self.cycles + 1):
            self.cycle = cycle
            await self.undo_due()
            for _ in range(self.rng.choice((0, 1, 1, 2))):
                await self.act(_pick(self.rng, _ACTIONS), self.rng.choice(self.devices))
            for _ in range(self.rng.randint(0, 3)):
                await self.submit()
            for _ in range(self.rng.randint(0, 3)):
                self.fire_request()
            await self.cancel_due()
            self.check_supervisors()
            await asyncio.sleep(self.rng.uniform(*CYCLE_S))

    async def act(self, action: str, dev: _Device) -> None:
        rng, proxy, sim = self.rng, dev.proxy, dev.sim
        if dev.flip_until is not None and action not in ("sim_restart", "link_restart"):
            return  # keep the path clear while the token is flipped: the link must see it
        self.faults[action] += 1
        self.log(dev.name, f"chaos: {action}")
        if action == "down":
            proxy.set_down(True, drop_existing=rng.random() < 0.7)
        elif action == "black_hole":
            proxy.set_black_hole(True)
        elif action == "reset_all":
            proxy.reset_all()
        elif action == "reset_after":
            proxy.set_reset_after(rng.randint(20, 3000), direction=rng.choice(("up", "down")))
        elif action == "cut_after":
            proxy.set_cut_after(rng.randint(20, 3000), direction=rng.choice(("up", "down")))
        elif action == "latency":
            proxy.set_latency(
                rng.uniform(0.0, 0.1), jitter=rng.uniform(0.0, 0.05), seed=rng.randrange(2**32)
            )
        elif action == "slow_close":
            proxy.set_slow_close(rng.uniform(0.0, 0.2))
        elif action == "slicer":
            proxy.set_slicer(rng.randint(1, 64), delay=rng.choice((0.0, 0.0, 0.001, 0.003)))
        elif action == "bandwidth":
            proxy.set_bandwidth(rng.choice((0.0, 0.0, 500.0, 2000.0, 20000.0)))
        elif action == "clear":
            proxy.clear()
            proxy.set_down(False)
            dev.clear_at = None
            return
        elif action == "sim_restart":
            await self.bounded(f"{dev.name}: sim.restart()", sim.restart(), device=dev.name)
            dev.wake_at = None  # a reboot wakes it
            return
        elif action == "sim_sleep":
            await self.bounded(f"{dev.name}: sim.go_to_sleep()", sim.go_to_sleep())
            dev.wake_at = self.cycle + rng.randint(1, 8)
            return
        elif action == "ack_delay":
            sim.ack_delay_s = rng.uniform(0.05, 0.4)
            dev.ack_delay_until = self.cycle + rng.randint(1, 8)
            return
        elif action == "drop_acks":
            sim.drop_acks = True
            dev.drop_acks_until = self.cycle + rng.randint(1, 6)
            return
        elif action == "auth_flip":
            proxy.clear()
            proxy.set_down(False)
            dev.clear_at = None
            sim.token = WRONG_TOKEN
            sim.drop_connections()
            dev.flip_until = self.cycle + FLIP_MAX_CYCLES
            dev.flip_failed = False
            self.auth_flips += 1
            return
        elif action == "link_restart":
            await self.bounded(f"{dev.name}: link.stop()", dev.link.stop(), device=dev.name)
            dev.link.start()
            return
        if dev.clear_at is None:
            dev.clear_at = self.cycle + rng.randint(1, 10)

    async def undo_due(self) -> None:
        loop = asyncio.get_running_loop()
        for dev in self.devices:
            if dev.clear_at is not None and self.cycle >= dev.clear_at:
                self.log(dev.name, "undo: proxy cleared")
                dev.proxy.clear()
                dev.proxy.set_down(False)
                dev.clear_at = None
            if dev.wake_at is not None and self.cycle >= dev.wake_at:
                self.log(dev.name, "undo: sim wakes up")
                await self.bounded(f"{dev.name}: sim.wake_up()", dev.sim.wake_up())
                dev.wake_at = None
            if dev.drop_acks_until is not None and self.cycle >= dev.drop_acks_until:
                self.log(dev.name, "undo: acks flow again")
                dev.sim.drop_acks = False
                dev.drop_acks_until = None
            if dev.ack_delay_until is not None and self.cycle >= dev.ack_delay_until:
                self.log(dev.name, "undo: no ack delay")
                dev.sim.ack_delay_s = 0.0
                dev.ack_delay_until = None
            if dev.flip_until is not None and (dev.flip_failed or self.cycle >= dev.flip_until):
                self.restore_token(dev, loop.time())

    def restore_token(self, dev: _Device, now: float) -> None:
        if dev.flip_failed:
            self.auth_flips_failed += 1
        self.log(dev.name, f"token restored (link went failed: {dev.flip_failed}); connect()")
        dev.sim.token = TOKEN
        dev.flip_until = None
        dev.flip_failed = False
        dev.auth_grace_until = now + AUTH_GRACE_S
        dev.link.connect_soon()  # as an operator would, once the credentials are fixed

    # ------------------------------------------------------------------ commands

    async def submit(self) -> None:
        rng = self.rng
        dev = rng.choice(self.devices)
        kind = _pick(rng, _COMMAND_KINDS)
        n = len(self.submitted)
        op = "set"
        args: dict[str, Any] = {"last": n}
        options: dict[str, Any] = {}
        if kind == "refused":
            op, args = "fail", {"code": "rejected", "msg": f"chaos {n}"}
        elif kind == "keyed":
            options["key"] = "mode"
            args = {"mode": n}
        elif kind == "ttl":
            options["ttl_s"] = rng.uniform(0.05, 1.0)
        priority = rng.choice((0, 0, 0, 1))
        command = await self.bounded(
            f"{dev.name}: outbox.submit()",
            self.outbox.submit(
                dev.name,
                op,
                args,
                max_attempts=MAX_ATTEMPTS,
                priority=priority,
                **options,
            ),
        )
        if command is None:
            return
        if kind == "cancel":
            self.cancels.append((self.cycle + rng.randint(0, 4), command.id, dev.name))
        waiter = asyncio.get_running_loop().create_task(
            self.outbox.wait(command.id), name=f"chaos.wait[{command.id}]"
        )
        self.submitted.append(_Submitted(command, kind, waiter))

    async def cancel_due(self) -> None:
        keep: list[tuple[int, str, str]] = []
        for due, command_id, device in self.cancels:
            if due > self.cycle:
                keep.append((due, command_id, device))
                continue
            await self.cancel_command(command_id, device)
        self.cancels = keep

    # ------------------------------------------------------------------ direct requests

    def fire_request(self) -> None:
        rng = self.rng
        dev = rng.choice(self.devices)
        op = _pick(rng, _REQUEST_OPS)
        index = len(self.requests)
        args: dict[str, Any] = {"rid": index}
        key: str | None = None
        if op == "slow":
            args["delay_s"] = rng.uniform(0.0, 0.2)
        elif op == "fail":
            args = {"code": rng.choice(("rejected", "busy")), "msg": f"rid {index}"}
        if op in ("echo", "slow", "set") and rng.random() < 0.5:
            pool = self.keys_by_device[dev.name]
            if op != "set" and pool and rng.random() < 0.2:
                key = rng.choice(pool)  # a caller retrying with the same key
            else:
                key = f"direct-{self.seed}-{index}"
                if op != "set":
                    pool.append(key)
            self.args_by_key[key].append(args)
        timeout = rng.uniform(0.03, 0.3)
        task = asyncio.get_running_loop().create_task(
            dev.link.request(op, args, timeout=timeout, key=key),
            name=f"chaos.request[{index}]",
        )
        self.requests.append(_Request(index, dev.name, op, args, key, task))

    # ------------------------------------------------------------------ supervision

    def check_supervisors(self, *, phase: str = "cycle") -> None:
        alive = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
        now = asyncio.get_running_loop().time()
        for dev in self.devices:
            link = dev.link
            state = link.state
            problem: str | None = None
            if state is LinkState.FAILED:
                if dev.flip_until is not None:
                    continue  # expected: the token is wrong
                if now < dev.auth_grace_until and isinstance(link.last_error, AuthError):
                    self.late_auth += 1
                    link.connect_soon()
                    continue
                problem = f"failed unexpectedly: {link.last_error!r}"
            elif state not in _RUNNING:
                problem = f"should be running but is {state.value}"
            elif f"keeplink[{dev.name}].supervisor" not in alive:
                problem = f"state {state.value} but its supervisor task is gone"
            if problem is None:
                dev.dead = False
                continue
            if not dev.dead:
                dev.dead = True
                self.dead_supervisors += 1
                stats = link.statistics()
                self.note(
                    f"{phase}: link {dev.name}: {problem} "
                    f"(internal errors {stats.internal_errors}, last error {stats.last_error})"
                )
            link.connect_soon()  # an operator would; keeps the soak going

    # ------------------------------------------------------------------ settle

    async def settle(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for dev in self.devices:
            dev.proxy.clear()
            dev.proxy.set_down(False)
            dev.clear_at = None
            if dev.sim.asleep:
                await self.bounded(f"{dev.name}: sim.wake_up()", dev.sim.wake_up())
            dev.wake_at = None
            dev.sim.drop_acks = False
            dev.sim.ack_delay_s = 0.0
            dev.drop_acks_until = dev.ack_delay_until = None
            if dev.flip_until is not None:
                self.restore_token(dev, now)
            dev.link.connect_soon()
        for _, command_id, device in self.cancels:
            await self.cancel_command(command_id, device)
        self.cancels = []

        pending = [r.task for r in self.requests if not r.task.done()]
        if pending:
            await asyncio.wait(pending, timeout=REQUEST_SETTLE_S)

        signatures: dict[str, tuple[Any, ...]] = {}
        changed_at: dict[str, float] = {}
        stalled: set[str] = set()
        deadline = loop.time() + SETTLE_S
        while loop.time() < deadline:
            self.check_supervisors(phase="settle")
            open_ = await self.outbox.list(states=[_S.QUEUED, _S.SENDING], limit=10_000)
            if not open_:
                break
            by_device: dict[str, list[Command]] = collections.defaultdict(list)
            for command in open_:
                by_device[command.device].append(command)
            now = loop.time()
            waiting = False  # anything that may still move on its own
            for name, commands in by_device.items():
                dev = self.by_name[name]
                sig = tuple(sorted((c.id, c.state.value, c.attempts) for c in commands))
                if signatures.get(name) != sig:
                    signatures[name] = sig
                    changed_at[name] = now
                    stalled.discard(name)
                    waiting = True
                    continue
                quiet_for = now - changed_at[name]
                if quiet_for < STALL_S or any(c.state is _S.SENDING for c in commands):
                    waiting = True  # an attempt under way ends by its own timeout
                    continue
                if dev.link.state is not LinkState.CONNECTED:
                    dev.link.connect_soon()
                    waiting = True
                    continue
                if self.presence.presence(name) is not Presence.ONLINE:
                    waiting = True
                    continue
                queued = [c for c in commands if c.state is _S.QUEUED]
                head = min(queued, key=lambda c: (-c.priority, c.seq))  # delivery order
                why = self.outbox.waiting(head)
                if why is not None and why.reason is WaitReason.PARKED:
                    await self.outbox.resume(name)  # as an operator would
                    waiting = True
                    continue
                if why is not None and why.until is not None and why.until > time.time() - 1:
                    # A wait the outbox shows, with its time: an in-cycle retry after a
                    # lost ack, or a precondition. It moves on by itself.
                    waiting = True
                    continue
                # Stuck: the device is online, its link up, and its head neither goes out
                # nor waits for a time (``next_cycle`` on a live link, or no reason at
                # all). No bounce would be honest here: the commands count as lost.
                if name not in stalled:
                    stalled.add(name)
                    self.stalls += 1
                    if why is not None and why.reason is WaitReason.NEXT_CYCLE:
                        self.head_waits.append(
                            f"{name}: {len(commands)} queued behind {head.id} (attempts "
                            f"{head.attempts}, tried in cycle {head.cycle}, last error "
                            f"{head.last_error})"
                        )
                    self.note(
                        f"settle: {name}: {len(commands)} command(s) stuck for "
                        f"{quiet_for:.2f}s: link connected, presence online, head command "
                        f"{head.id} (cycle {head.cycle}, retry_at {head.retry_at}) waits for "
                        f"{why}\n" + self.explain(name)
                    )
                if quiet_for < STALL_GIVE_UP_S:
                    waiting = True
            if not waiting:
                break
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ verdicts

    def request_verdict(self) -> tuple[int, int, collections.Counter[str]]:
        unresolved = misrouted = 0
        outcomes: collections.Counter[str] = collections.Counter()
        for req in self.requests:
            task = req.task
            if not task.done():
                unresolved += 1
                self.note(f"request {req.index} ({req.op} on {req.device}) never resolved")
                continue
            if task.cancelled():
                unresolved += 1
                self.note(f"request {req.index} ({req.op} on {req.device}) was cancelled")
                continue
            exc = task.exception()
            if exc is not None:
                unresolved += 1
                text = "".join(traceback.format_exception(exc)).strip()
                self.note(f"request {req.index} ({req.op} on {req.device}) raised:\n{text}")
                continue
            outcome = task.result()
            name = _OUTCOME_NAMES.get(type(outcome))
            if name is None:
                unresolved += 1
                self.note(f"request {req.index} resolved to a non-outcome {outcome!r}")
                continue
            outcomes[name] += 1
            if isinstance(outcome, Acknowledged):
                if req.op in ("fail", "noreply"):
                    misrouted += 1
                    self.note(f"request {req.index} ({req.op}) acknowledged: {outcome!r}")
                elif req.op in ("echo", "slow"):
                    allowed = self.args_by_key.get(req.key, []) if req.key else []
                    if dict(outcome.result) != req.args and dict(outcome.result) not in allowed:
                        misrouted += 1
                        self.note(
                            f"request {req.index} ({req.op} {req.args} key {req.key}) got "
                            f"{dict(outcome.result)}"
                        )
        return unresolved, misrouted, outcomes

    async def command_verdict(self) -> tuple[int, int, collections.Counter[str]]:
        lost = exhausted = 0
        states: collections.Counter[str] = collections.Counter()
        applied: dict[str, set[str]] = {
            d.name: {a.key for a in d.sim.applied if a.key is not None} for d in self.devices
        }
        for sub in self.submitted:
            cid = sub.command.id
            stored = await self.outbox.store.get(cid)
            if stored is None:
                lost += 1
                self.note(f"command {cid} ({sub.kind}) is missing from the store")
                continue
            states[stored.state.value] += 1
            if not stored.final:
                lost += 1
                self.note(
                    f"command {cid} ({sub.kind}, {stored.device}) not final after settle: "
                    f"{stored.state.value}, attempts {stored.attempts}, cycle {stored.cycle}, "
                    f"last error {stored.last_error}"
                )
                continue
            if stored.state is _S.FAILED and stored.attempts >= stored.max_attempts:
                exhausted += 1
            elif stored.state not in _LEGIT[sub.kind]:
                lost += 1
                self.note(
                    f"command {cid} ({sub.kind}, {stored.device}) ended {stored.state.value}: "
                    f"attempts {stored.attempts}, last error {stored.last_error}"
                )
                continue
            if (
                stored.state is _S.SUCCEEDED
                and stored.idempotency_key not in applied[stored.device]
            ):
                lost += 1
                self.note(
                    f"command {cid} ({sub.kind}, {stored.device}) succeeded but the device "
                    "never applied it"
                )
                continue
            waiter = sub.waiter
            if not waiter.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await asyncio.wait([waiter])
            if not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
                lost += 1
                self.note(
                    f"command {cid} is {stored.state.value} in the store but outbox.wait() "
                    f"did not return it ({waiter!r})"
                )
            elif waiter.result().state is not stored.state:
                lost += 1
                self.note(
                    f"command {cid}: outbox.wait() returned {waiter.result().state.value}, "
                    f"the store says {stored.state.value}"
                )
        return lost, exhausted, states

    def double_verdict(self) -> int:
        doubled = 0
        for dev in self.devices:
            counts = collections.Counter(a.key for a in dev.sim.applied if a.key is not None)
            for key, n in counts.items():
                if n > 1:
                    doubled += n - 1
                    seqs = [a.seq for a in dev.sim.applied if a.key == key]
                    conns = [a.connection for a in dev.sim.applied if a.key == key]
                    self.note(
                        f"{dev.name}: key {key} applied {n} times (seqs {seqs}, "
                        f"connections {conns})"
                    )
        return doubled


@contextlib.contextmanager
def _captured_logs(quiet: bool) -> Iterator[_Collector]:
    logger = logging.getLogger("keeplink")
    collector = _Collector()
    logger.addHandler(collector)
    propagate = logger.propagate
    if quiet:
        logger.propagate = False
    try:
        yield collector
    finally:
        logger.removeHandler(collector)
        logger.propagate = propagate


async def soak(*, cycles: int, seed: int, links: int = 8, quiet_logs: bool = True) -> SoakReport:
    """Run the chaos soak in the running loop and return what it found (never raises for
    what it finds; every wait in it is bounded)."""
    if cycles < 0 or links < 1:
        raise ValueError("cycles must be >= 0 and links >= 1")
    loop = asyncio.get_running_loop()
    before = set(asyncio.all_tasks())
    loop_errors: list[str] = []
    previous_handler = loop.get_exception_handler()

    def on_loop_error(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        text = str(context.get("message", "loop error"))
        if isinstance(exc, BaseException):
            text += "\n" + "".join(traceback.format_exception(exc)).strip()
        loop_errors.append(f"asyncio: {text}"[:6000])

    loop.set_exception_handler(on_loop_error)
    run: _Soak | None = None

    def on_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        cycle = run.cycle if run is not None else 0
        text = f"warning near cycle {cycle}: {category.__name__}: {message} ({filename}:{lineno})"
        if run is not None:
            for port, who in run.ports().items():
                if f", {port})" in text:
                    text += f" [port {port}: {who}]"
        loop_errors.append(text)

    began = time.perf_counter()
    try:
        with (
            warnings.catch_warnings(),
            tempfile.TemporaryDirectory(prefix="keeplink-chaos-") as tmp,
            _captured_logs(quiet_logs) as logs,
        ):
            # Recorded, not raised: a warning from a finalizer (say, an un-awaited
            # coroutine) is a finding to report and must not escape as an unraisable error.
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            run = _Soak(cycles=cycles, seed=seed, links=links, db_dir=Path(tmp))
            try:
                await run.setup()
                await run.run_cycles()
                cycles_done = time.perf_counter()
                run.cycle = cycles
                await run.settle()
                run.check_supervisors(phase="end")
                settled = time.perf_counter()
                unresolved, misrouted, outcomes = run.request_verdict()
                lost, exhausted, states = await run.command_verdict()
                doubled = run.double_verdict()
                stats = [d.link.statistics() for d in run.devices]
            finally:
                await run.teardown()
            leaked: list[asyncio.Task[Any]] = []
            for round_ in range(60):
                current = asyncio.current_task()
                leaked = [
                    t
                    for t in asyncio.all_tasks()
                    if t is not current and t not in before and not t.done()
                ]
                if not leaked:
                    break
                await asyncio.sleep(0 if round_ < 10 else 0.01)
            for task in leaked:
                run.note(f"task leaked: {task.get_name()} {task.get_coro()!r}")
            gc.collect()  # finalizers run now, while warnings are still recorded
            scheduled = getattr(loop, "_scheduled", [])
            timers_left = sum(1 for handle in scheduled if not handle.cancelled())
            errors = logs.errors + loop_errors
    finally:
        loop.set_exception_handler(previous_handler)
    end = time.perf_counter()
    return SoakReport(
        cycles=cycles,
        seed=seed,
        links=links,
        wall_s=end - began,
        cycles_s=cycles_done - began,
        settle_s=settled - cycles_done,
        dead_supervisors=run.dead_supervisors,
        leaked_tasks=len(leaked),
        unresolved_requests=unresolved,
        lost_commands=lost,
        double_applied=doubled,
        hung_operations=run.hung,
        misrouted_replies=misrouted,
        requests=len(run.requests),
        request_outcomes=dict(outcomes),
        commands=len(run.submitted),
        command_states=dict(states),
        failed_after_max_attempts=exhausted,
        faults=dict(run.faults),
        auth_flips=run.auth_flips,
        auth_flips_failed=run.auth_flips_failed,
        late_auth_failures=run.late_auth,
        stalls=run.stalls,
        head_of_line_waits=run.head_waits,
        link_connects=sum(s.connects for s in stats),
        link_disconnects=sum(s.disconnects for s in stats),
        link_internal_errors=sum(s.internal_errors for s in stats),
        timers_left=timers_left,
        errors_logged=errors,
        details=run.details,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--links", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--verbose", action="store_true", help="let keeplink's log records through")
    args = parser.parse_args(argv)
    if args.cycles < 0 or args.links < 1:
        parser.error("--cycles must be >= 0 and --links >= 1")
    report = asyncio.run(
        soak(cycles=args.cycles, seed=args.seed, links=args.links, quiet_logs=not args.verbose)
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
