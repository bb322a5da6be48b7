"""Device presence, sans-IO: who says a device is there, who wins, and when to say so.

A device's presence is fed by *sources*, ranked by precedence (:class:`Source`):
``LINK > MDNS > MQTT > PROBE``. Each source holds at most one :class:`Claim` per device,
"online" or "offline", made at a time ``at`` and optionally valid for ``ttl_s`` seconds.
A source's newer claim replaces its older one; a claim older than the one it would
replace is stale and dropped.

The rule
--------
*Raw* presence at time ``now`` looks at live claims only. A claim is live if it has no TTL
or ``at + ttl_s > now``; an expired claim counts as nothing (an expired "online" is not an
"offline", it is silence).

- No live claims: ``UNKNOWN`` if the device never had a claim, else ``OFFLINE`` — every
  online claim has a way back to offline, its TTL or its source's goodbye.
- Otherwise ``ONLINE`` iff there is a live online claim ``c`` such that every live offline
  claim ``d`` has ``d.source < c.source`` or ``d.at < c.at``; else ``OFFLINE``.

So, as a specification:

- **Online revives.** A newer online claim from any source beats an older offline claim,
  whatever their precedence: link offline at t=0, probe online at t=5 → online.
- **Precedence protects the live.** A lower source's offline never overrides a higher
  source's live online: link online at t=0, a stale MQTT "offline" at t=10 → online.
- **A newer, higher offline wins.** Link lost at t=10 beats an mDNS online claim from t=5
  still within its TTL → offline (at equal times the higher source wins).
- **Expiry is silence.** mDNS online at t=0 with a 120 s TTL and nothing else → online
  until t=120, then offline (the device was claimed once, so not unknown).

Debounce
--------
Flapping is debounced by time, not by counts. A change of raw presence is *announced* only
once it has held for ``debounce_online_s`` (going online) or ``debounce_offline_s`` (going
offline, or from ``UNKNOWN`` to the first ``OFFLINE``); if raw presence flips back first,
nothing is announced. The announcement is stamped with the exact instant the debounce
ended (``raw change time + debounce``), however late :meth:`DevicePresence.poll` is called.
A raw change at exactly that instant does not cancel it: the old value did hold for the
whole debounce. Raw presence at an instant is what the claims say once everything made at
that instant is in: two sources disagreeing at the same time do not restart a debounce if
the last word restores what was there before.

Each announced ``ONLINE`` starts a new *presence cycle*: ``cycle`` counts them (0: never
online) and ``online_since`` is when raw presence became online for that cycle (not when it
was announced) — what "minimum time online" preconditions measure from. A blip shorter than
the offline debounce does not end the cycle and does not move ``online_since``.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from keeplink._core.errors import ConfigError

__all__ = [
    "Claim",
    "DevicePresence",
    "Presence",
    "PresenceChanged",
    "Source",
    "check_debounce",
    "deciding_claim",
    "next_expiry",
    "raw_presence",
]


class Presence(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    UNKNOWN = "unknown"
    """Nobody has ever claimed anything about the device."""


class Source(enum.IntEnum):
    """Where a claim comes from. A higher value takes precedence."""

    PROBE = 1
    """A ping or port probe: cheap, indirect, the last word only when nothing else speaks."""
    MQTT = 2
    """An MQTT availability topic: a retained "online" plus a last-will "offline"."""
    MDNS = 3
    """A zeroconf record: online for the record's TTL, offline on a goodbye."""
    LINK = 4
    """The device's own link: connected is online until the link says otherwise."""


@dataclass(frozen=True, slots=True)
class Claim:
    """One source's word about one device: online or offline, made at ``at``.

    ``ttl_s`` bounds how long the claim stays live (``None``: until replaced or forgotten).
    Raises ValueError if ``at`` is not finite or ``ttl_s`` is not a positive number; a
    zero-TTL "goodbye" is an offline claim, not an online one that is already over.
    """

    source: Source
    online: bool
    at: float
    ttl_s: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.at):
            raise ValueError(f"claim time must be finite, got {self.at!r}")
        if self.ttl_s is not None and not (self.ttl_s > 0 and math.isfinite(self.ttl_s)):
            raise ValueError(f"claim ttl_s must be a positive number or None, got {self.ttl_s!r}")

    @property
    def expires_at(self) -> float | None:
        """When the claim stops counting, or ``None`` if it lasts until replaced."""
        return None if self.ttl_s is None else self.at + self.ttl_s

    def is_live(self, now: float) -> bool:
        expires_at = self.expires_at
        return expires_at is None or expires_at > now


def _live(claims: Mapping[Source, Claim], now: float) -> list[Claim]:
    return [c for c in claims.values() if c.is_live(now)]


def _beats(offline: Claim, online: Claim) -> bool:
    """An offline claim beats an online one if it ranks at least as high and is no older."""
    return not (offline.source < online.source or offline.at < online.at)


def _online_claims_standing(live: Iterable[Claim]) -> list[Claim]:
    """The live online claims that no live offline claim beats, highest source first."""
    live = list(live)
    offline = [d for d in live if not d.online]
    standing = [c for c in live if c.online and not any(_beats(d, c) for d in offline)]
    return sorted(standing, key=lambda c: c.source, reverse=True)


def raw_presence(claims: Mapping[Source, Claim], now: float, *, ever_claimed: bool) -> Presence:
    """Presence at ``now`` from the claims alone, before any debounce (see the module doc).

    ``claims`` holds at most one claim per source. ``ever_claimed`` says whether the device
    ever had a claim; it separates ``UNKNOWN`` from ``OFFLINE`` when no claim is live.
    """
    live = _live(claims, now)
    if not live:
        return Presence.OFFLINE if ever_claimed or claims else Presence.UNKNOWN
    return Presence.ONLINE if _online_claims_standing(live) else Presence.OFFLINE


def deciding_claim(claims: Mapping[Source, Claim], now: float) -> Claim | None:
    """The claim that makes raw presence what it is at ``now``, if one does.

    Online: the highest-precedence live online claim that stands. Offline because an offline
    claim beats every live online claim: the highest-precedence offline claim that beats one
    of them. Offline with no live online claim: the newest live offline claim (ties: the
    higher source). ``None`` when presence comes from silence (every claim expired or
    forgotten, or none yet).
    """
    live = _live(claims, now)
    standing = _online_claims_standing(live)
    if standing:
        return standing[0]
    online = [c for c in live if c.online]
    offline = [d for d in live if not d.online]
    if online:
        beaters = [d for d in offline if any(_beats(d, c) for c in online)]
        return max(beaters, key=lambda d: (d.source, d.at))
    if offline:
        return max(offline, key=lambda d: (d.at, d.source))
    return None


def next_expiry(claims: Mapping[Source, Claim], now: float) -> float | None:
    """The earliest expiry after ``now`` of a live claim: when raw presence may change by
    itself. ``None`` if no live claim has a TTL."""
    expiries = [e for c in claims.values() if (e := c.expires_at) is not None and e > now]
    return min(expiries, default=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class PresenceChanged:
    """An announced (debounced) change of a device's presence."""

    device: str
    old: Presence
    new: Presence
    at: float
    """When the debounce ended: the raw change time plus the debounce."""
    cycle: int
    """The device's presence cycle after the change (incremented by each ``ONLINE``)."""
    source: Source | None
    """The source of the deciding claim (:func:`deciding_claim`) as raw presence held up to
    ``at``; ``None`` if the change comes from silence, e.g. an mDNS record that expired."""
    online_since: float | None
    """For ``ONLINE``: when raw presence became online. For ``OFFLINE``: ``None``."""


def check_debounce(name: str, value: float) -> None:
    """Raise ConfigError unless ``value`` is a usable debounce (finite, >= 0 seconds)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value >= 0 and math.isfinite(value))
    ):
        raise ConfigError(f"presence {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class _Pending:
    target: Presence
    since: float
    due: float


@dataclass(frozen=True, slots=True)
class _Undo:
    """The state just before the latest raw change, made at ``at``."""

    raw: Presence
    pending: _Pending | None
    at: float


class DevicePresence:
    """One device's claims and debounced presence, as a sans-IO state machine.

    Feed it :meth:`claim` and :meth:`forget` with the current time; call :meth:`poll` at
    :meth:`next_deadline` (and after each feed) and publish what it returns. Time given to
    any method must never go backwards (ValueError); the state is unchanged after one.

    Internally time is replayed in order: claim expiries and debounce ends that fell between
    two calls are applied at their own instants, so a late poll gives the same announcements
    with the same times as a punctual one (one :meth:`poll` per announcement, oldest first).
    """

    __slots__ = (
        "_announced",
        "_claims",
        "_cycle",
        "_decider",
        "_ever_claimed",
        "_now",
        "_online_since",
        "_outbox",
        "_pending",
        "_raw",
        "_undo",
        "debounce_offline_s",
        "debounce_online_s",
        "device",
    )

    def __init__(self, device: str, *, debounce_online_s: float, debounce_offline_s: float) -> None:
        check_debounce("debounce_online_s", debounce_online_s)
        check_debounce("debounce_offline_s", debounce_offline_s)
        self.device = device
        self.debounce_online_s = debounce_online_s
        self.debounce_offline_s = debounce_offline_s
        self._claims: dict[Source, Claim] = {}
        self._ever_claimed = False
        self._now = -math.inf
        self._raw = Presence.UNKNOWN
        self._announced = Presence.UNKNOWN
        self._cycle = 0
        self._online_since: float | None = None
        self._pending: _Pending | None = None
        self._undo: _Undo | None = None
        # The source that decides raw presence over the latest stretch of time. Announcing
        # comes before the changes of its instant, so this is the source that held.
        self._decider: Source | None = None
        self._outbox: deque[PresenceChanged] = deque()

    # ------------------------------------------------------------------ read-only state

    @property
    def announced(self) -> Presence:
        """The debounced presence, as last announced (``UNKNOWN`` before the first)."""
        return self._announced

    @property
    def raw(self) -> Presence:
        """Raw presence as of the latest time this machine was given."""
        return self._raw

    @property
    def cycle(self) -> int:
        """Announced transitions to ``ONLINE`` so far (0: never announced online)."""
        return self._cycle

    @property
    def online_since(self) -> float | None:
        """When raw presence became online for the current cycle; ``None`` unless online."""
        return self._online_since

    @property
    def claims(self) -> Mapping[Source, Claim]:
        """The latest claim of each source (expired ones included), read-only."""
        return MappingProxyType(self._claims)

    @property
    def ever_claimed(self) -> bool:
        """Whether any claim was ever recorded (``UNKNOWN`` is over for good once it is)."""
        return self._ever_claimed

    # ------------------------------------------------------------------ inputs

    def claim(self, claim: Claim, now: float) -> None:
        """Record ``claim`` (made at or before ``now``), replacing its source's claim.

        A claim older than the one its source already holds is stale and ignored. Raises
        ValueError if ``now`` goes backwards or ``claim.at`` is after ``now``.
        """
        self._check_time(now)
        if claim.at > now:
            raise ValueError(f"claim made at {claim.at} is in the future of now={now}")
        self._advance(now)
        held = self._claims.get(claim.source)
        if held is not None and claim.at < held.at:
            return
        self._claims[claim.source] = claim
        self._ever_claimed = True
        self._reevaluate(now)
        self._advance(now)  # a zero debounce is due at once

    def forget(self, source: Source, now: float) -> None:
        """``source`` no longer has an opinion (e.g. its integration was removed)."""
        self._check_time(now)
        self._advance(now)
        if self._claims.pop(source, None) is not None:
            self._reevaluate(now)
            self._advance(now)

    def poll(self, now: float) -> PresenceChanged | None:
        """Apply what is due by ``now`` and return the oldest unreturned announcement.

        Call it again until it returns ``None``: a late poll can find several.
        """
        self._check_time(now)
        self._advance(now)
        return self._outbox.popleft() if self._outbox else None

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`poll` should be called next: the end of a pending debounce or the next
        claim expiry, whichever is first; ``None`` if nothing can change by itself. The
        answer is ``<= now`` when something is already due. Pure: changes nothing."""
        if self._outbox:
            return min(now, self._now)
        candidates = [next_expiry(self._claims, self._now)]
        if self._pending is not None:
            candidates.append(self._pending.due)
        return min((c for c in candidates if c is not None), default=None)

    # ------------------------------------------------------------------ machinery

    def _check_time(self, now: float) -> None:
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now!r}")
        if now < self._now:
            raise ValueError(f"time went backwards for {self.device!r}: {self._now} -> {now}")

    def _advance(self, now: float) -> None:
        """Replay, in time order, the debounce ends and claim expiries up to ``now``.

        At one instant a debounce end goes first: the value it confirms held long enough.
        """
        while True:
            expiry = next_expiry(self._claims, self._now)
            due = self._pending.due if self._pending is not None else None
            if due is not None and due <= now and (expiry is None or due <= expiry):
                self._announce(due)  # an expiry at this same instant is handled next
            elif expiry is not None and expiry <= now:
                self._now = expiry
                self._reevaluate(expiry)
            else:
                break
        self._now = now

    def _reevaluate(self, at: float) -> None:
        raw = raw_presence(self._claims, at, ever_claimed=self._ever_claimed)
        decider = deciding_claim(self._claims, at)
        self._decider = None if decider is None else decider.source
        if raw is self._raw:
            return
        undo = self._undo
        if undo is not None and undo.at == at and undo.raw is raw:
            # A flip and back within one instant (two sources reporting at the same time):
            # the flip held for no time at all, so it must not restart a running debounce.
            self._raw, self._pending, self._undo = raw, undo.pending, None
            return
        self._undo = _Undo(self._raw, self._pending, at)
        self._raw = raw
        if raw is self._announced:
            self._pending = None  # flipped back in time: nothing to say
        else:
            debounce = self.debounce_online_s if raw is Presence.ONLINE else self.debounce_offline_s
            self._pending = _Pending(raw, at, at + debounce)

    def _announce(self, at: float) -> None:
        pending = self._pending
        assert pending is not None
        self._pending = self._undo = None
        old = self._announced
        self._announced = pending.target
        if pending.target is Presence.ONLINE:
            self._cycle += 1
            self._online_since = pending.since
        else:
            self._online_since = None
        self._outbox.append(
            PresenceChanged(
                device=self.device,
                old=old,
                new=pending.target,
                at=at,
                cycle=self._cycle,
                source=self._decider,
                online_since=self._online_since,
            )
        )

    def __repr__(self) -> str:
        return (
            f"<DevicePresence {self.device!r} {self._announced} raw={self._raw}"
            f" cycle={self._cycle}>"
        )
