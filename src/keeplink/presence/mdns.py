"""mDNS (zeroconf) as a presence source and a wake signal for links.

:class:`MdnsPresence` browses one DNS-SD service type with python-zeroconf. When an instance
of it appears or changes, the device it names is reported online with
:attr:`~keeplink.presence.Source.MDNS` for the remaining TTL of its PTR record, and the
device's link is woken: a link waiting out a long backoff reconnects at once
(:meth:`Link.wake` never cancels a connect or a handshake in progress). When the instance
says goodbye (a record with TTL 0) or its record expires, the device is reported offline::

    tracker = PresenceTracker()
    mdns = MdnsPresence(presence=tracker, links={"hall-thermostat": link})
    await mdns.start()
    ...
    await mdns.close()

Which device an instance names (the default mapping):

1. the ``id`` key of the instance's TXT record, if it has one
   (``Hall Thermostat._keeplink._tcp.local.`` with TXT ``id=hall-thermostat``);
2. otherwise the instance label: the name without the service type
   (``hall-thermostat._keeplink._tcp.local.`` -> ``hall-thermostat``).

The TXT record usually arrives in the same packet as the announcement; when it is not cached
yet, it is resolved first (bounded by :data:`RESOLVE_TIMEOUT_MS`), falling back to the label.
A ``name_to_device`` callable replaces the whole rule: it gets the full instance name and
returns a device id, or ``None`` for an instance that is none of ours. A device watched with
an ``instance`` name (:meth:`MdnsPresence.watch`) is that instance, before any rule. Only
*watched* devices (``links=`` or :meth:`MdnsPresence.watch`) are reported and woken: mDNS on
a shared LAN also announces strangers.

zeroconf calls its handlers synchronously in the event loop and does not catch what they
raise; a raising handler would abort the record update for every other listener. So the
handlers here never raise (an unexpected error is logged with its traceback), and the only
async work, resolving a TXT record, runs in named tasks that :meth:`MdnsPresence.close`
cancels and awaits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    NotRunningException,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from keeplink._core.errors import ConfigError, DeviceUnavailableError, ErrorCode
from keeplink._core.presence import Source
from keeplink._link import Link
from keeplink.presence.tracker import PresenceTracker

__all__ = [
    "DEFAULT_SERVICE_TYPE",
    "RESOLVE_TIMEOUT_MS",
    "TXT_DEVICE_KEY",
    "Interfaces",
    "MdnsPresence",
    "instance_label",
]

_log = logging.getLogger("keeplink.presence.mdns")

DEFAULT_SERVICE_TYPE: Final = "_keeplink._tcp.local."

TXT_DEVICE_KEY: Final = "id"
"""The TXT key whose value names the device (the default mapping's first choice)."""

RESOLVE_TIMEOUT_MS: Final = 3000
"""How long to wait for a TXT record the announcement did not carry: zeroconf's own default
for a service lookup, three query rounds on a quiet LAN. After it, the label decides."""

FALLBACK_TTL_S: Final = 120.0
"""Claim TTL when the instance's PTR record is not in the cache (an update that carried only
SRV/TXT records): RFC 6762's host-record TTL. It errs short, and the next record renews it."""

_REFRESH_SLACK_MS: Final = 1000.0
"""A PTR expiry that moved by less than this is the same record seen twice, not a refresh."""

_TYPE_PTR: Final = 12  # RFC 1035 record type of a DNS-SD browse answer

Interfaces: TypeAlias = Sequence[str | int | tuple[tuple[str, int, int], int]] | InterfaceChoice
"""What zeroconf accepts as ``interfaces``: an :class:`InterfaceChoice` or a list of
addresses (and IPv6 interface indexes). Same shape as ``zeroconf.InterfacesType``."""


def instance_label(name: str, service_type: str) -> str | None:
    """The instance label of a DNS-SD instance name: the name without the service type.

    ``instance_label("hall-thermostat._keeplink._tcp.local.", "_keeplink._tcp.local.")`` is
    ``"hall-thermostat"``. A label may itself hold dots (``"Hall.v2"``): everything before the
    type is kept. Returns ``None`` if ``name`` is not an instance of ``service_type``
    (compared case-insensitively, as DNS names are).
    """
    suffix = "." + service_type
    if len(name) <= len(suffix) or not name.lower().endswith(suffix.lower()):
        return None
    return name[: -len(suffix)]


@dataclass(slots=True)
class _Instance:
    """A service instance seen online, and what it was mapped to."""

    name: str
    """As the browser gave it (the cache matches a PTR's target case-sensitively)."""
    device: str
    expires_ms: float
    """When its PTR record expires, on zeroconf's clock (``current_time_millis``)."""


class _PtrRefreshes(RecordUpdateListener):
    """Sees PTR records of the browsed type arrive again with a fresh TTL.

    The browser says nothing when a known instance's PTR is refreshed (the answer to its own
    periodic query); without this, an MDNS claim would lapse at the first record's expiry
    while the instance is still there.
    """

    def __init__(self, owner: MdnsPresence) -> None:
        self._owner = owner
        self._type_key = owner.service_type.lower()
        self._seen: Zeroconf | None = None

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            new = update.new
            if (
                update.old is not None
                and new.type == _TYPE_PTR
                and new.key == self._type_key
                and not new.is_expired(now)
            ):
                self._seen = zc

    def async_update_records_complete(self) -> None:
        # The cache holds the new records only now.
        zc, self._seen = self._seen, None
        if zc is not None:
            self._owner._on_ptr_refresh(zc)


class MdnsPresence:
    """Presence and wake-ups from mDNS announcements of one service type.

    Configuration is keyword-only. ``zeroconf``: an :class:`AsyncZeroconf` to share (it is
    left open by :meth:`close`); without one, :meth:`start` creates one on ``interfaces``
    and :meth:`close` closes it. ``links``: device id -> link, the devices watched from the
    start (:meth:`watch` adds more). ``name_to_device``: see the module doc.

    Raises ConfigError if ``service_type`` is not a DNS-SD type such as
    ``"_keeplink._tcp.local."``.
    """

    def __init__(
        self,
        *,
        service_type: str = DEFAULT_SERVICE_TYPE,
        presence: PresenceTracker,
        links: Mapping[str, Link[Any]] | None = None,
        name_to_device: Callable[[str], str | None] | None = None,
        zeroconf: AsyncZeroconf | None = None,
        interfaces: Interfaces = InterfaceChoice.All,
    ) -> None:
        labels = service_type.split(".")
        if not (
            len(labels) == 4
            and labels[0].startswith("_")
            and len(labels[0]) > 1
            and labels[1] in ("_tcp", "_udp")
            and labels[2] == "local"
            and labels[3] == ""
        ):
            raise ConfigError(
                f"mDNS service_type must look like '_name._tcp.local.', got {service_type!r}"
            )
        self.service_type = service_type
        self.presence = presence
        self._links: dict[str, Link[Any]] = dict(links) if links is not None else {}
        self._aliases: dict[str, str] = {}
        """Lower-cased instance name -> device, for devices watched with ``instance=``."""
        self._name_to_device = name_to_device
        self._shared_zc = zeroconf
        self._interfaces = interfaces
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._refreshes: _PtrRefreshes | None = None
        self._instances: dict[str, _Instance] = {}
        """Instances seen online, by lower-cased instance name."""
        self._resolving: dict[str, asyncio.Task[None]] = {}
        """TXT lookups in flight, by lower-cased instance name; each reports when done."""
        self._closed = False

    # ------------------------------------------------------------------ public surface

    @property
    def running(self) -> bool:
        return self._browser is not None

    def watch(self, device: str, link: Link[Any], *, instance: str | None = None) -> None:
        """Report ``device``'s presence from now on and wake ``link`` when it announces.

        ``instance``: the full instance name that is this device
        (``"Hall Thermostat._keeplink._tcp.local."``), whatever its TXT record or label
        say; ``None``: the device is found by the mapping rule (see the module doc).

        Replaces the link watched for ``device``, if any. If an instance naming ``device`` is
        already known (announced before this call), it is reported and the link woken now.
        Raises ConfigError if ``instance`` is not an instance of this service type.
        """
        if instance is not None:
            if instance_label(instance, self.service_type) is None:
                raise ConfigError(
                    f"mDNS instance {instance!r} of {device!r} is not an instance of"
                    f" {self.service_type!r}"
                )
            self._aliases[instance.lower()] = device
            known = self._instances.get(instance.lower())
            if known is not None:
                known.device = device
        self._links[device] = link
        now_ms = current_time_millis()
        for seen in self._instances.values():
            remaining_s = (seen.expires_ms - now_ms) / 1000.0
            if seen.device == device and remaining_s > 0:
                self._report_online(device, seen.name, remaining_s)
                return

    def watched(self) -> list[str]:
        """The watched device ids."""
        return list(self._links)

    async def start(self) -> None:
        """Start browsing; return once zeroconf is listening. Idempotent while running.

        Works again after :meth:`close`. Raises ConfigError if zeroconf rejects the service
        type and DeviceUnavailableError (code ``discovery_failed``) if zeroconf cannot start
        (no usable interface, sockets refused); nothing is left running after an error.
        """
        if self._browser is not None:
            return
        owned = self._shared_zc is None
        try:
            aiozc = (
                self._shared_zc
                if self._shared_zc is not None
                else AsyncZeroconf(interfaces=self._interfaces)
            )
        except OSError as exc:
            raise DeviceUnavailableError(
                f"mDNS could not open its sockets: {exc}", code=ErrorCode.DISCOVERY_FAILED
            ) from exc
        zc = aiozc.zeroconf
        try:
            await zc.async_wait_for_start()
            browser = AsyncServiceBrowser(
                zc, self.service_type, handlers=[self.on_service_state_change]
            )
        except BaseException as exc:
            if owned:
                await aiozc.async_close()
            if isinstance(exc, BadTypeInNameException):
                raise ConfigError(f"mDNS service type {self.service_type!r}: {exc}") from exc
            if isinstance(exc, NotRunningException):
                raise DeviceUnavailableError(
                    "mDNS (zeroconf) did not start", code=ErrorCode.DISCOVERY_FAILED
                ) from exc
            raise
        refreshes = _PtrRefreshes(self)
        zc.async_add_listener(refreshes, None)
        self._aiozc = aiozc if owned else None
        self._browser = browser
        self._refreshes = refreshes
        self._closed = False
        _log.info("mDNS: browsing %s", self.service_type)

    async def close(self) -> None:
        """Stop browsing: cancel the browser and every TXT lookup, close the zeroconf this
        object created (a shared one stays open). Idempotent.

        Claims already made stay until their TTL ends: they were true when made.
        """
        self._closed = True
        browser, self._browser = self._browser, None
        refreshes, self._refreshes = self._refreshes, None
        aiozc, self._aiozc = self._aiozc, None
        tasks = list(self._resolving.values())
        self._resolving.clear()
        self._instances.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if browser is not None:
            if refreshes is not None:
                browser.zc.async_remove_listener(refreshes)
            await browser.async_cancel()
        if aiozc is not None:
            await aiozc.async_close()

    def on_service_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """The browser's handler (zeroconf calls it with these keyword arguments).

        Added/Updated: report the device online for its PTR's remaining TTL and wake its
        link. Removed (a goodbye or an expired record): report it offline. Never raises.
        """
        if self._closed:
            _log.debug("mDNS closed; ignoring %s of %r", state_change.name, name)
            return
        try:
            if state_change is ServiceStateChange.Removed:
                self._on_removed(service_type, name)
            else:
                self._on_seen(zeroconf, service_type, name)
        except Exception:  # noqa: BLE001 - see below
            # Deliberately broad: zeroconf does not catch what a handler raises, and it would
            # abort the record update for every other listener. A bug here is logged loudly.
            _log.exception("mDNS: handling %s of %r failed", state_change.name, name)

    # ------------------------------------------------------------------ machinery

    def _on_seen(self, zc: Zeroconf, service_type: str, name: str) -> None:
        key = name.lower()
        aliased = self._aliases.get(key)
        if aliased is not None:
            self._on_mapped(zc, service_type, name, aliased)
            return
        if self._name_to_device is not None:
            self._on_mapped(zc, service_type, name, self._name_to_device(name))
            return
        if key in self._resolving:
            return  # the lookup in flight reports when it is done
        info = AsyncServiceInfo(service_type, name)
        if info.load_from_cache(zc):
            self._on_mapped(zc, service_type, name, self._device_from(name, service_type, info))
            return
        task = asyncio.get_running_loop().create_task(
            self._resolve(zc, service_type, name, info),
            name=f"keeplink.mdns[{name}].resolve",
        )
        self._resolving[key] = task
        task.add_done_callback(functools.partial(self._resolved, key))

    async def _resolve(
        self, zc: Zeroconf, service_type: str, name: str, info: AsyncServiceInfo
    ) -> None:
        try:
            found = await info.async_request(zc, RESOLVE_TIMEOUT_MS)
        except NotRunningException:
            _log.debug("mDNS: zeroconf stopped while resolving %r", name)
            return
        if not found:
            _log.debug("mDNS: no TXT record for %r in time; mapping it by its label", name)
        device = self._device_from(name, service_type, info if found else None)
        self._on_mapped(zc, service_type, name, device)

    def _resolved(self, key: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(key) is task:
            del self._resolving[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("mDNS: resolving %s failed", task.get_name(), exc_info=exc)

    def _device_from(
        self, name: str, service_type: str, info: AsyncServiceInfo | None
    ) -> str | None:
        if info is not None:
            device = info.decoded_properties.get(TXT_DEVICE_KEY)
            if device:
                return device
        return instance_label(name, service_type)

    def _on_mapped(self, zc: Zeroconf, service_type: str, name: str, device: str | None) -> None:
        if device is None:
            _log.debug("mDNS: %r names no device; ignored", name)
            return
        now_ms = current_time_millis()
        ptr = zc.cache.current_entry_with_name_and_alias(service_type, name)
        ttl_s = float(ptr.get_remaining_ttl(now_ms)) if ptr is not None else FALLBACK_TTL_S
        self._instances[name.lower()] = _Instance(name, device, now_ms + ttl_s * 1000.0)
        self._report_online(device, name, ttl_s)

    def _report_online(self, device: str, name: str, ttl_s: float) -> None:
        link = self._links.get(device)
        if link is None:
            _log.debug("mDNS: %r (device %r) is not watched; ignored", name, device)
            return
        self.presence.report(device, Source.MDNS, True, ttl_s=ttl_s)
        if link.wake("mdns"):
            _log.info("mDNS: %r announced; link %r skips its backoff wait", device, link.name)

    def _on_removed(self, service_type: str, name: str) -> None:
        key = name.lower()
        task = self._resolving.pop(key, None)
        if task is not None:
            task.cancel()
        instance = self._instances.pop(key, None)
        if instance is not None:
            device: str | None = instance.device
        elif key in self._aliases:
            device = self._aliases[key]
        elif self._name_to_device is not None:
            device = self._name_to_device(name)
        else:
            device = instance_label(name, service_type)  # its TXT record is gone with it
        if device is None or device not in self._links:
            _log.debug("mDNS: %r left; it names no watched device", name)
            return
        _log.info("mDNS: %r said goodbye (or its record expired)", device)
        self.presence.report(device, Source.MDNS, False)

    def _on_ptr_refresh(self, zc: Zeroconf) -> None:
        """PTR records of our type arrived again: extend the claims whose expiry moved."""
        if self._closed:
            return
        try:
            now_ms = current_time_millis()
            for instance in list(self._instances.values()):
                ptr = zc.cache.current_entry_with_name_and_alias(self.service_type, instance.name)
                if ptr is None:
                    continue
                ttl_s = float(ptr.get_remaining_ttl(now_ms))
                expires_ms = now_ms + ttl_s * 1000.0
                if expires_ms > instance.expires_ms + _REFRESH_SLACK_MS:
                    instance.expires_ms = expires_ms
                    self._report_online(instance.device, instance.name, ttl_s)
        except Exception:  # noqa: BLE001 - see below
            # Deliberately broad, for the same reason as in on_service_state_change.
            _log.exception("mDNS: handling a PTR refresh failed")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<MdnsPresence {self.service_type} {state} watched={len(self._links)}"
            f" instances={len(self._instances)}>"
        )
