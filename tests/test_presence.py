"""Presence: the precedence rule (hand-computed), debounce by time, presence cycles, and the
tracker on a virtual clock with exact announce times — plus a property test that drives the
sans-IO machine with random claim sequences and checks it against the raw-presence timeline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import IO_BOUND_S
from keeplink import AbortedError, ConfigError, VirtualClock
from keeplink._core.presence import (
    Claim,
    DevicePresence,
    Presence,
    PresenceChanged,
    Source,
    deciding_claim,
    next_expiry,
    raw_presence,
)
from keeplink.presence import PresenceTracker

ON, OFF, UNKNOWN = Presence.ONLINE, Presence.OFFLINE, Presence.UNKNOWN
LINK, MDNS, MQTT, PROBE = Source.LINK, Source.MDNS, Source.MQTT, Source.PROBE


def claims_of(*claims: Claim) -> dict[Source, Claim]:
    return {c.source: c for c in claims}


def raw(*claims: Claim, now: float) -> Presence:
    return raw_presence(claims_of(*claims), now, ever_claimed=bool(claims))


# ---------------------------------------------------------------------- the rule (sans-IO)


def test_precedence_order_is_link_mdns_mqtt_probe() -> None:
    assert sorted(Source, reverse=True) == [LINK, MDNS, MQTT, PROBE]
    assert [p.value for p in Presence] == ["online", "offline", "unknown"]


def test_a_newer_online_claim_from_any_source_revives_the_device() -> None:
    link_lost = Claim(LINK, False, at=0)
    assert raw(link_lost, Claim(PROBE, True, at=5, ttl_s=30), now=6) is ON
    assert raw(link_lost, Claim(MQTT, True, at=0.5), now=6) is ON
    # At the same instant the higher source wins; an older online loses to a newer offline.
    assert raw(link_lost, Claim(PROBE, True, at=0), now=6) is OFF
    assert raw(Claim(PROBE, True, at=0), Claim(LINK, False, at=3), now=6) is OFF


def test_a_stale_lower_offline_does_not_take_down_a_live_link() -> None:
    link_up = Claim(LINK, True, at=0)
    assert raw(link_up, Claim(MQTT, False, at=10), now=11) is ON
    assert raw(link_up, Claim(MQTT, False, at=10), Claim(PROBE, False, at=20), now=21) is ON
    assert raw(Claim(MDNS, True, at=0, ttl_s=120), Claim(MQTT, False, at=10), now=11) is ON


def test_a_newer_higher_offline_beats_an_mdns_online_still_within_its_ttl() -> None:
    mdns = Claim(MDNS, True, at=5, ttl_s=120)
    assert raw(mdns, Claim(LINK, False, at=10), now=11) is OFF
    # An older link offline does not: the mDNS announcement is news after the loss.
    assert raw(mdns, Claim(LINK, False, at=4), now=11) is ON


def test_an_expired_claim_is_silence_not_offline() -> None:
    mdns = Claim(MDNS, True, at=0, ttl_s=120)
    assert raw(mdns, now=119.999) is ON
    assert raw(mdns, now=120) is OFF  # claimed once, so offline, not unknown
    # An expired online claim cannot revive a device a link says is gone.
    assert raw(Claim(LINK, False, at=0), Claim(MDNS, True, at=5, ttl_s=10), now=14) is ON
    assert raw(Claim(LINK, False, at=0), Claim(MDNS, True, at=5, ttl_s=10), now=15) is OFF
    # An expired offline claim stops counting too.
    mqtt_up = Claim(MQTT, True, at=0)
    goodbye = Claim(MDNS, False, at=10, ttl_s=5)
    assert raw(mqtt_up, goodbye, now=12) is OFF
    assert raw(mqtt_up, goodbye, now=15) is ON


def test_no_live_claim_is_unknown_only_for_a_device_never_claimed() -> None:
    assert raw_presence({}, 0, ever_claimed=False) is UNKNOWN
    assert raw_presence({}, 0, ever_claimed=True) is OFF


@pytest.mark.parametrize(
    ("claims", "now", "expected"),
    [
        # mDNS up at 5, link lost at 3 (older), probe down at 7 (lower): mDNS stands.
        ([Claim(MDNS, True, 5, 60), Claim(LINK, False, 3), Claim(PROBE, False, 7)], 8, ON),
        # ...until mDNS expires at 65: link and probe offline remain.
        ([Claim(MDNS, True, 5, 60), Claim(LINK, False, 3), Claim(PROBE, False, 7)], 65, OFF),
        # MQTT up at 5 beaten by mDNS goodbye at 6; the probe's newer online (lower) stands.
        ([Claim(MQTT, True, 5), Claim(MDNS, False, 6), Claim(PROBE, True, 7, 10)], 8, ON),
        ([Claim(MQTT, True, 5), Claim(MDNS, False, 6), Claim(PROBE, True, 7, 10)], 17, OFF),
        # Two onlines, one beaten: the device is online through the other.
        ([Claim(PROBE, True, 1, 100), Claim(MQTT, False, 2), Claim(MDNS, True, 0)], 3, ON),
        # Only offline claims.
        ([Claim(PROBE, False, 1), Claim(MQTT, False, 0)], 3, OFF),
    ],
)
def test_hand_computed_mixtures(claims: list[Claim], now: float, expected: Presence) -> None:
    assert raw(*claims, now=now) is expected


def test_the_deciding_claim_names_the_source_that_settled_it() -> None:
    mqtt_up, mdns_bye, link_lost = (
        Claim(MQTT, True, 5),
        Claim(MDNS, False, 6),
        Claim(LINK, False, 1),
    )
    assert deciding_claim(claims_of(mqtt_up, mdns_bye, link_lost), 7) == mdns_bye
    both_up = claims_of(Claim(MDNS, True, 0, 60), Claim(LINK, True, 1), Claim(PROBE, False, 9))
    assert deciding_claim(both_up, 10) == Claim(LINK, True, 1)
    down = claims_of(Claim(PROBE, False, 9), Claim(LINK, False, 1))
    assert deciding_claim(down, 10) == Claim(PROBE, False, 9)  # the latest word
    assert deciding_claim(claims_of(Claim(MDNS, True, 0, 60)), 60) is None  # silence


def test_next_expiry_is_the_earliest_future_expiry() -> None:
    claims = claims_of(Claim(MDNS, True, 0, 120), Claim(PROBE, True, 10, 30), Claim(LINK, True, 0))
    assert next_expiry(claims, 0) == 40
    assert next_expiry(claims, 40) == 120
    assert next_expiry(claims, 120) is None
    assert Claim(MDNS, True, 5, 120).expires_at == 125
    assert Claim(LINK, True, 5).expires_at is None


@pytest.mark.parametrize(
    "kwargs",
    [{"ttl_s": 0}, {"ttl_s": -1}, {"ttl_s": math.nan}, {"ttl_s": math.inf}, {"at": math.inf}],
)
def test_nonsense_claims_are_rejected(kwargs: dict[str, float]) -> None:
    fields: dict[str, float] = {"at": 0.0} | kwargs
    with pytest.raises(ValueError, match=r"ttl_s|time"):
        Claim(MDNS, True, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"debounce_online_s": -1}, {"debounce_offline_s": math.nan}])
def test_nonsense_debounce_is_a_config_error(kwargs: dict[str, float]) -> None:
    settings_ = {"debounce_online_s": 1.0, "debounce_offline_s": 5.0} | kwargs
    with pytest.raises(ConfigError) as info:
        DevicePresence("d", **settings_)
    assert info.value.code == "config_error"
    with pytest.raises(ConfigError):
        PresenceTracker(clock=VirtualClock(), **settings_)


# ---------------------------------------------------------------------- the machine (sans-IO)


@dataclass(frozen=True)
class Say:
    """A scripted input: at ``t``, ``source`` claims (or, with ``online=None``, forgets)."""

    t: float
    source: Source
    online: bool | None
    ttl_s: float | None = None


def run(
    script: Sequence[Say],
    *,
    on: float = 1.0,
    off: float = 5.0,
    punctual: bool = True,
    until: float | None = None,
) -> tuple[DevicePresence, list[PresenceChanged]]:
    """Feed ``script`` to a DevicePresence, polling at each input and, if ``punctual``, at
    every deadline it asks for (as the tracker does); else only at the inputs and the end."""
    machine = DevicePresence("d", debounce_online_s=on, debounce_offline_s=off)
    out: list[PresenceChanged] = []
    now = 0.0

    def drain(t: float) -> None:
        while (change := machine.poll(t)) is not None:
            out.append(change)

    def catch_up(to: float) -> None:
        if punctual:
            while (due := machine.next_deadline(now)) is not None and due <= to:
                drain(due)

    for say in script:
        catch_up(say.t)
        now = say.t
        if say.online is None:
            machine.forget(say.source, now)
        else:
            machine.claim(Claim(say.source, say.online, now, say.ttl_s), now)
        drain(now)
    end = until if until is not None else now + 1000
    catch_up(end)
    drain(end)
    return machine, out


def announced(changes: Sequence[PresenceChanged]) -> list[tuple[float, Presence, Source | None]]:
    return [(c.at, c.new, c.source) for c in changes]


HAND_SCRIPTS = [
    pytest.param(
        [Say(0, LINK, True), Say(10, LINK, False)],
        [(1, ON, LINK), (15, OFF, LINK)],
        id="link-up-then-lost",
    ),
    pytest.param(
        [Say(0, MDNS, True, 120), Say(10, MQTT, False)],
        [(1, ON, MDNS), (125, OFF, MQTT)],
        id="stale-mqtt-offline-waits-for-the-mdns-ttl",
    ),
    pytest.param(
        [Say(0, LINK, False), Say(2, PROBE, True, 30)],
        [(3, ON, PROBE), (37, OFF, LINK)],
        id="probe-revives-until-its-ttl",
    ),
    pytest.param(
        [Say(0, LINK, True), Say(0.5, LINK, False), Say(0.75, LINK, True)],
        [(1.75, ON, LINK)],
        id="debounce-restarts-at-the-last-raw-change",
    ),
    pytest.param(
        [Say(0, LINK, True), Say(1, LINK, False)],
        [(1, ON, LINK), (6, OFF, LINK)],
        id="a-change-at-the-debounce-end-does-not-cancel-it",
    ),
    pytest.param(
        [Say(0, MDNS, True, 1)],
        [(1, ON, MDNS), (6, OFF, None)],
        id="an-expiry-at-the-debounce-end-does-not-cancel-it",
    ),
    pytest.param(
        [Say(0, LINK, True), Say(3, LINK, None)],
        [(1, ON, LINK), (8, OFF, None)],
        id="forget-leaves-silence",
    ),
    pytest.param(
        [Say(0, LINK, False), Say(4, LINK, True), Say(4, LINK, False)],
        [(5, OFF, LINK)],
        id="same-instant-flip-back-keeps-the-offline-debounce-running",
    ),
]


@pytest.mark.parametrize(("script", "expected"), HAND_SCRIPTS)
@pytest.mark.parametrize("punctual", [True, False], ids=["punctual", "late-polls"])
def test_hand_computed_announcements(
    script: list[Say], expected: list[tuple[float, Presence, Source]], punctual: bool
) -> None:
    _, out = run(script, punctual=punctual)
    assert announced(out) == expected


def test_cycle_and_online_since_follow_announced_onlines() -> None:
    script = [
        Say(0, LINK, True),
        Say(10, LINK, False),
        Say(10.25, LINK, True),  # a blip: same cycle, same online_since
        Say(20, LINK, False),
        Say(30.5, MDNS, True, 60),
        Say(31, LINK, True),
    ]
    machine, out = run(script, until=40)
    assert [(c.at, c.new, c.cycle, c.online_since) for c in out] == [
        (1, ON, 1, 0),
        (25, OFF, 1, None),
        (31.5, ON, 2, 30.5),
    ]
    assert (machine.announced, machine.cycle, machine.online_since) == (ON, 2, 30.5)
    assert [c.old for c in out] == [UNKNOWN, ON, OFF]


def test_zero_debounce_announces_at_once() -> None:
    machine = DevicePresence("d", debounce_online_s=0, debounce_offline_s=0)
    machine.claim(Claim(LINK, True, 3), 3)
    change = machine.poll(3)
    assert change is not None
    assert (change.at, change.new, change.online_since) == (3, ON, 3)
    assert machine.next_deadline(3) is None


def test_a_late_poll_replays_every_change_at_its_own_time() -> None:
    machine = DevicePresence("d", debounce_online_s=1, debounce_offline_s=5)
    machine.claim(Claim(MDNS, True, 0, ttl_s=10), 0)
    assert machine.next_deadline(0) == 1
    first, second = machine.poll(100), machine.poll(100)
    assert first is not None and second is not None
    assert announced([first, second]) == [(1, ON, MDNS), (15, OFF, None)]
    assert machine.poll(100) is None
    assert machine.next_deadline(100) is None


def test_a_stale_claim_is_dropped_and_time_never_goes_backwards() -> None:
    machine = DevicePresence("d", debounce_online_s=1, debounce_offline_s=5)
    machine.claim(Claim(LINK, True, 10), 10)
    machine.claim(Claim(LINK, False, 8), 11)  # made before the claim it would replace
    assert machine.claims[LINK] == Claim(LINK, True, 10)
    with pytest.raises(ValueError, match="future"):
        machine.claim(Claim(LINK, False, 20), 12)
    with pytest.raises(ValueError, match="backwards"):
        machine.poll(10)
    assert machine.poll(11) == PresenceChanged(
        device="d", old=UNKNOWN, new=ON, at=11, cycle=1, source=LINK, online_since=10
    )


# ---------------------------------------------------------------------- property (sans-IO)

QUARTERS = st.integers(min_value=1, max_value=32).map(lambda q: q / 4)
SAYS = st.tuples(
    st.integers(min_value=0, max_value=32).map(lambda q: q / 4),  # 0: at the same instant
    st.sampled_from(list(Source)),
    st.sampled_from([True, True, False, None]),  # None: forget
    st.sampled_from([None, 0.5, 1.0, 2.25, 6.0]),
)


def presence_timeline(script: Sequence[Say], end: float) -> list[tuple[float, Presence]]:
    """Raw presence at every instant it may change (inputs and expiries), from the test's
    own record of each source's latest claim, as (from_time, value) points."""
    snapshots: list[tuple[float, dict[Source, Claim], bool]] = []
    claims: dict[Source, Claim] = {}
    ever = False
    for say in script:
        if say.online is None:
            claims.pop(say.source, None)
        else:
            claims[say.source] = Claim(say.source, say.online, say.t, say.ttl_s)
            ever = True
        snapshots.append((say.t, dict(claims), ever))
    points = {s[0] for s in snapshots} | {0.0, end}
    points |= {e for _, cs, _ in snapshots for c in cs.values() if (e := c.expires_at)}

    def at(x: float) -> Presence:
        current = [s for s in snapshots if s[0] <= x]
        if not current:
            return UNKNOWN
        _, cs, ev = current[-1]
        return raw_presence(cs, x, ever_claimed=ev)

    return [(x, at(x)) for x in sorted(p for p in points if p <= end)]


def value_at(timeline: list[tuple[float, Presence]], x: float) -> Presence:
    return [v for t, v in timeline if t <= x][-1]


@settings(max_examples=300)
@given(
    steps=st.lists(SAYS, min_size=1, max_size=30),
    on=st.sampled_from([0.25, 1.0, 2.5]),
    off=st.sampled_from([0.5, 1.0, 5.0]),
)
def test_announcements_follow_raw_presence_held_for_the_debounce(
    steps: list[tuple[float, Source, bool | None, float | None]], on: float, off: float
) -> None:
    script: list[Say] = []
    t = 0.0
    for dt, source, online, ttl in steps:
        t += dt
        script.append(Say(t, source, online, ttl if online else None))
    end = t + 6 + max(on, off) + 1  # beyond every TTL and every debounce
    machine, out = run(script, on=on, off=off, until=end)
    _, lazy = run(script, on=on, off=off, until=end, punctual=False)
    assert lazy == out, "a late poll must replay the same announcements at the same times"

    debounce = {ON: on, OFF: off}
    timeline = presence_timeline(script, end)
    previous, cycle, last_at = UNKNOWN, 0, -math.inf
    for change in out:
        assert change.old is previous and change.new is not previous
        assert change.new is not UNKNOWN and change.at >= last_at
        # Safety: the new value held, without a break, for the whole debounce before.
        start = change.at - debounce[change.new]
        held = [v for x, v in timeline if start < x < change.at] + [value_at(timeline, start)]
        assert set(held) == {change.new}, (change, timeline)
        cycle += change.new is ON
        assert change.cycle == cycle
        assert change.online_since == (start if change.new is ON else None)
        previous, last_at = change.new, change.at

    # Liveness: every raw run that lasted a debounce was announced by the end of it.
    runs = [(x, v) for i, (x, v) in enumerate(timeline) if i == 0 or timeline[i - 1][1] != v]
    for i, (start, value) in enumerate(runs):
        stop = runs[i + 1][0] if i + 1 < len(runs) else math.inf
        if value is UNKNOWN or stop - start < debounce[value]:
            continue
        by = start + debounce[value]
        said = [c.new for c in out if c.at <= by]
        assert (said[-1] if said else UNKNOWN) is value, (start, value, out)

    # Convergence: claims stopped long ago; announced is what the claims say.
    final = raw_presence(machine.claims, end, ever_claimed=machine.ever_claimed)
    assert machine.announced is final
    assert machine.announced is timeline[-1][1]
    assert machine.next_deadline(end) is None


@given(
    others=st.lists(
        st.tuples(st.sampled_from([MDNS, MQTT, PROBE]), st.booleans(), QUARTERS), max_size=3
    ),
    link_online=st.booleans(),
)
def test_the_newest_word_of_the_top_source_decides(
    others: list[tuple[Source, bool, float]], link_online: bool
) -> None:
    claims = {s: Claim(s, online, at) for s, online, at in others}
    claims[LINK] = Claim(LINK, link_online, at=8)  # the newest claim, from the top source
    assert raw_presence(claims, 9, ever_claimed=True) is (ON if link_online else OFF)


# ---------------------------------------------------------------------- the tracker (async)


@pytest.fixture
def tracker(virtual_clock: VirtualClock) -> Iterator[PresenceTracker]:
    tracker = PresenceTracker(clock=virtual_clock)
    yield tracker
    tracker.close()


@pytest.fixture
def events(tracker: PresenceTracker) -> list[PresenceChanged]:
    seen: list[PresenceChanged] = []
    tracker.subscribe(seen.append)
    return seen


def log(events: Sequence[PresenceChanged]) -> list[tuple[str, float, Presence, int]]:
    return [(e.device, e.at, e.new, e.cycle) for e in events]


async def test_the_first_claim_is_announced_after_the_debounce(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    assert tracker.presence("hall") is UNKNOWN
    tracker.report("hall", LINK, True)
    tracker.report("porch", MQTT, False)
    await virtual_clock.advance_to(0.999)
    assert (tracker.presence("hall"), tracker.cycle("hall"), events) == (UNKNOWN, 0, [])
    await virtual_clock.advance_to(1)
    assert events == [
        PresenceChanged(
            device="hall", old=UNKNOWN, new=ON, at=1, cycle=1, source=LINK, online_since=0
        )
    ]
    await virtual_clock.advance_to(4.999)
    assert tracker.presence("porch") is UNKNOWN
    await virtual_clock.advance_to(5)
    assert log(events) == [("hall", 1, ON, 1), ("porch", 5, OFF, 0)]
    assert events[-1].source is MQTT and events[-1].old is UNKNOWN
    assert virtual_clock.live_timers == 0  # nothing left to decide


async def test_a_device_configured_with_its_own_debounce_is_announced_on_its_own_time(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    tracker.configure("quick", debounce_online_s=0.25, debounce_offline_s=0)
    tracker.configure("slow", debounce_offline_s=30)  # online: the tracker's 1 s
    assert tracker.debounce_of("quick") == (0.25, 0)
    assert tracker.debounce_of("slow") == (1.0, 30)
    assert tracker.debounce_of("other") == (1.0, 5.0)  # the tracker's own
    for device in ("quick", "slow", "other"):
        tracker.report(device, LINK, True)
    await virtual_clock.advance_to(2)
    assert log(events) == [("quick", 0.25, ON, 1), ("slow", 1, ON, 1), ("other", 1, ON, 1)]
    events.clear()
    for device in ("quick", "slow", "other"):
        tracker.report(device, LINK, False)
    await virtual_clock.advance_to(40)
    assert log(events) == [("quick", 2, OFF, 1), ("other", 7, OFF, 1), ("slow", 32, OFF, 1)]

    # A device already reported takes its new debounce from its next raw change on.
    events.clear()
    tracker.configure("other", debounce_online_s=3)
    tracker.report("other", LINK, True)
    await virtual_clock.advance_to(42.999)
    assert events == []
    await virtual_clock.advance_to(43)
    assert log(events) == [("other", 43, ON, 2)]


@pytest.mark.parametrize(
    "kwargs",
    [{"debounce_online_s": -1}, {"debounce_offline_s": math.inf}, {"debounce_online_s": True}],
)
def test_a_nonsense_per_device_debounce_is_a_config_error_and_changes_nothing(
    kwargs: dict[str, float],
) -> None:
    tracker = PresenceTracker(clock=VirtualClock())
    tracker.configure("hall", debounce_online_s=2)
    with pytest.raises(ConfigError, match="debounce"):
        tracker.configure("hall", **kwargs)
    assert tracker.debounce_of("hall") == (2, 5.0)
    tracker.close()


async def test_a_newer_online_from_a_probe_revives_a_device_whose_link_was_lost(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    tracker.report("pump", LINK, True)
    await virtual_clock.advance_to(10)
    tracker.report("pump", LINK, False)
    await virtual_clock.advance_to(20)
    tracker.report("pump", PROBE, True, ttl_s=30)
    await virtual_clock.advance_to(100)
    assert log(events) == [
        ("pump", 1, ON, 1),
        ("pump", 15, OFF, 1),
        ("pump", 21, ON, 2),  # revived by the probe
        ("pump", 55, OFF, 2),  # the probe's TTL ran out at 50; the link is still lost
    ]
    assert [e.source for e in events] == [LINK, LINK, PROBE, LINK]


async def test_a_stale_mqtt_offline_does_not_take_down_a_connected_link(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    tracker.report("plug", MQTT, True)
    tracker.report("plug", LINK, True)
    await virtual_clock.advance_to(10)
    tracker.report("plug", MQTT, False)  # the broker's last will, from an old session
    await virtual_clock.advance_to(300)
    assert log(events) == [("plug", 1, ON, 1)]
    assert tracker.presence("plug") is ON
    tracker.report("plug", LINK, False)
    await virtual_clock.advance_to(400)
    assert log(events) == [("plug", 1, ON, 1), ("plug", 305, OFF, 1)]


async def test_link_lost_after_an_mdns_announcement_wins_within_the_ttl(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    await virtual_clock.advance_to(5)
    tracker.report("lamp", MDNS, True, ttl_s=120)
    tracker.report("lamp", LINK, True)
    await virtual_clock.advance_to(10)
    tracker.report("lamp", LINK, False)
    await virtual_clock.advance_to(14.999)
    assert tracker.presence("lamp") is ON
    await virtual_clock.advance_to(200)
    assert log(events) == [("lamp", 6, ON, 1), ("lamp", 15, OFF, 1)]
    assert events[-1].source is LINK


async def test_an_expired_mdns_claim_goes_offline_after_ttl_plus_debounce_not_before(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    tracker.report("tv", MDNS, True, ttl_s=120)
    await virtual_clock.advance_to(124.999)
    assert tracker.presence("tv") is ON
    assert virtual_clock.pending() == [125]  # one timer, at the debounce end after expiry
    await virtual_clock.advance_to(125)
    assert log(events) == [("tv", 1, ON, 1), ("tv", 125, OFF, 1)]
    assert events[-1].source is None  # nobody said offline: the record ran out
    assert tracker.online_since("tv") is None


async def test_a_200ms_offline_blip_announces_nothing(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    tracker.report("fan", LINK, True)
    await virtual_clock.advance_to(10)
    tracker.report("fan", LINK, False)
    await virtual_clock.advance(0.2)
    tracker.report("fan", LINK, True)
    await virtual_clock.advance_to(100)
    assert log(events) == [("fan", 1, ON, 1)]
    assert (tracker.cycle("fan"), tracker.online_since("fan")) == (1, 0)


async def flap(tracker: PresenceTracker, clock: VirtualClock, device: str) -> float:
    """Online 200 ms, offline 200 ms, a hundred times; then offline for good. Returns the
    time of the last offline report. Checks one timer at most all along."""
    for _ in range(100):
        tracker.report(device, LINK, True)
        await clock.advance(0.2)
        assert clock.live_timers <= 1
        tracker.report(device, LINK, False)
        settle = clock.now()
        await clock.advance(0.2)
        assert clock.live_timers <= 1
    return settle


async def test_a_flapping_unknown_device_is_announced_offline_only_once_it_settles(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    settle = await flap(tracker, virtual_clock, "relay")
    await virtual_clock.advance_to(settle + 4.999)
    assert events == []
    await virtual_clock.advance_to(settle + 10)
    assert log(events) == [("relay", settle + 5, OFF, 0)]


async def test_a_flapping_online_device_stays_online_until_it_settles_offline(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    tracker.report("relay", LINK, True)
    await virtual_clock.advance_to(10)
    settle = await flap(tracker, virtual_clock, "relay")
    assert log(events) == [("relay", 1, ON, 1)]
    await virtual_clock.advance_to(settle + 4.999)
    assert tracker.presence("relay") is ON
    await virtual_clock.advance_to(settle + 10)
    assert log(events) == [("relay", 1, ON, 1), ("relay", settle + 5, OFF, 1)]


async def test_cycle_counts_announced_onlines_and_online_since_is_the_raw_start(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    assert (tracker.cycle("cam"), tracker.online_since("cam")) == (0, None)
    tracker.report("cam", MDNS, True, ttl_s=60)
    await virtual_clock.advance_to(0.5)
    tracker.report("cam", LINK, True)  # no new raw change: still the cycle that began at 0
    await virtual_clock.advance_to(30)
    assert (tracker.cycle("cam"), tracker.online_since("cam")) == (1, 0)
    assert events[0].source is LINK  # the deciding claim when it was announced
    tracker.report("cam", LINK, False)
    await virtual_clock.advance_to(40.25)
    tracker.report("cam", MQTT, True)
    await virtual_clock.advance_to(50)
    assert log(events) == [("cam", 1, ON, 1), ("cam", 35, OFF, 1), ("cam", 41.25, ON, 2)]
    assert (tracker.cycle("cam"), tracker.online_since("cam")) == (2, 40.25)
    assert events[-1].online_since == 40.25


async def test_a_raising_subscriber_does_not_break_the_tracker(
    tracker: PresenceTracker, virtual_clock: VirtualClock
) -> None:
    seen: list[PresenceChanged] = []

    def broken(event: PresenceChanged) -> None:
        raise RuntimeError("subscriber bug")

    tracker.subscribe(broken)
    tracker.subscribe(seen.append)
    tracker.report("door", LINK, True)
    await virtual_clock.advance_to(2)
    tracker.report("door", LINK, False)
    await virtual_clock.advance_to(10)
    assert log(seen) == [("door", 1, ON, 1), ("door", 7, OFF, 1)]
    assert tracker.subscriber_errors == 2
    assert tracker.presence("door") is OFF


async def test_a_subscriber_reporting_from_its_callback_keeps_every_order(
    virtual_clock: VirtualClock,
) -> None:
    tracker = PresenceTracker(clock=virtual_clock, debounce_online_s=0, debounce_offline_s=0)
    seen: list[PresenceChanged] = []

    def hub_reveals_child(event: PresenceChanged) -> None:
        if event.device == "hub" and event.new is ON:
            tracker.report("child", MQTT, True)

    tracker.subscribe(hub_reveals_child)
    tracker.subscribe(seen.append)
    tracker.report("hub", LINK, True)
    assert log(seen) == [("hub", 0, ON, 1), ("child", 0, ON, 1)]
    unsubscribe = tracker.subscribe(seen.append)
    unsubscribe()
    tracker.report("hub", LINK, False)
    assert len(seen) == 3
    tracker.close()


async def test_wait_for_returns_at_the_announcement(
    tracker: PresenceTracker, virtual_clock: VirtualClock
) -> None:
    tracker.report("gate", LINK, True)
    online = asyncio.create_task(tracker.wait_for("gate", ON))
    offline = asyncio.create_task(tracker.wait_for("gate", OFF))
    await virtual_clock.advance_to(0.999)
    assert not online.done()
    await virtual_clock.advance_to(1)
    assert online.done() and not offline.done()
    await online
    await tracker.wait_for("gate", ON)  # already: at once
    tracker.report("gate", LINK, False)
    await virtual_clock.advance_to(6)
    assert offline.done()
    await offline


async def test_wait_for_is_cancellable_and_close_aborts_the_rest(
    tracker: PresenceTracker, virtual_clock: VirtualClock
) -> None:
    cancelled = asyncio.create_task(tracker.wait_for("gate", ON))
    aborted = asyncio.create_task(tracker.wait_for("gate", ON))
    await virtual_clock.settle()
    cancelled.cancel()
    await virtual_clock.settle()
    assert cancelled.cancelled()
    tracker.close()
    with pytest.raises(AbortedError):
        await aborted
    with pytest.raises(AbortedError):
        await tracker.wait_for("gate", ON)


async def test_close_leaves_no_timer_and_later_reports_are_ignored(
    virtual_clock: VirtualClock,
) -> None:
    tracker = PresenceTracker(clock=virtual_clock)
    tracker.report("a", LINK, True)
    tracker.report("a", MQTT, True)
    tracker.report("b", MDNS, True, ttl_s=60)
    assert virtual_clock.pending() == [1, 1]  # one timer per device
    await virtual_clock.advance_to(1)
    assert virtual_clock.pending() == [60]  # only b's record can change anything by itself
    tracker.close()
    assert virtual_clock.live_timers == 0
    tracker.report("a", LINK, False)
    tracker.forget("b", MDNS)
    tracker.close()
    assert virtual_clock.live_timers == 0
    assert (tracker.presence("a"), tracker.presence("b"), tracker.closed) == (ON, ON, True)


async def test_forget_drops_a_source_and_bad_reports_record_nothing(
    tracker: PresenceTracker, events: list[PresenceChanged], virtual_clock: VirtualClock
) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        tracker.report("ghost", MDNS, True, ttl_s=0)
    with pytest.raises(ValueError, match="Source"):
        tracker.report("ghost", 7, True)  # type: ignore[arg-type]
    assert tracker.devices() == []
    tracker.forget("ghost", MDNS)  # unknown device: nothing to do
    tracker.report("heater", MQTT, True)
    await virtual_clock.advance_to(2)
    tracker.forget("heater", MQTT)
    assert dict(tracker.claims("heater")) == {}
    await virtual_clock.advance_to(20)
    assert log(events) == [("heater", 1, ON, 1), ("heater", 7, OFF, 1)]
    assert events[-1].source is None


async def test_the_default_clock_is_the_event_loops() -> None:
    tracker = PresenceTracker(debounce_online_s=0.01)
    tracker.report("real", LINK, True)
    assert tracker.presence("real") is UNKNOWN
    async with asyncio.timeout(IO_BOUND_S):
        await tracker.wait_for("real", ON)
    assert tracker.online_since("real") is not None
    tracker.close()
