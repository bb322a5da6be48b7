"""What the API shows of commands and devices: their JSON shapes, read from the gateway.

A device's view merges its config, its link's statistics, its presence and its queue; in a
fleet, a device another node delivers to is shown as the shared store and that node's
relayed events have it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from keeplink._core.commands import Command, DeviceRecord
from keeplink._core.errors import KeeplinkError
from keeplink._driver import SessionInfo
from keeplink._link import Link, LinkStatistics
from keeplink.outbox import Waiting

if TYPE_CHECKING:
    from keeplink.gateway.runtime import Gateway

__all__ = [
    "command_json",
    "device_view",
    "devices_view",
    "epoch",
    "fleet_owners",
    "history_view",
    "late_replies_json",
    "owner_of",
    "protocol_errors_json",
    "waiting_json",
]


def epoch(link: Link[Any], at: float) -> float:
    """A time on the link's clock as epoch seconds, the API's time."""
    return time.time() - max(0.0, link.clock.now() - at)


def protocol_errors_json(link: Link[Any] | None, stats: LinkStatistics | None) -> dict[str, Any]:
    """Malformed input the device sent (each dropped, the link unharmed): how many, and the
    last one's ``{code, message, at}``."""
    last = None
    if link is not None and stats is not None and stats.last_protocol_error is not None:
        assert stats.last_protocol_error_at is not None
        last = {
            "code": stats.last_protocol_error.code,
            "message": stats.last_protocol_error.message,
            "at": epoch(link, stats.last_protocol_error_at),
        }
    return {"count": stats.protocol_errors if stats else 0, "last": last}


def late_replies_json(link: Link[Any] | None, stats: LinkStatistics | None) -> dict[str, Any]:
    """Replies that matched no request in flight (after its deadline, or a seq never sent):
    how many, and the last one's ``{seq, message, at}``."""
    last = None
    if link is not None and stats is not None and stats.last_late_reply_seq is not None:
        assert stats.last_late_reply_at is not None
        last = {
            "seq": stats.last_late_reply_seq,
            "message": (
                f"a reply for seq {stats.last_late_reply_seq} matched no request in flight "
                "(it came after its deadline, or names a seq that was never sent); dropped"
            ),
            "at": epoch(link, stats.last_late_reply_at),
        }
    return {"count": stats.late_replies if stats else 0, "last": last}


def waiting_json(waiting: Waiting | None) -> dict[str, Any] | None:
    """Why a queued command is not going out now, as the API shows it."""
    if waiting is None:
        return None
    return {
        "reason": waiting.reason.value,
        "message": waiting.message,
        "until": waiting.until,
        "command": waiting.command,
    }


def command_json(command: Command, *, waiting: Waiting | None = None) -> dict[str, Any]:
    """The API's JSON shape of a command (``waiting``: why it is not going out now)."""
    return {
        "id": command.id,
        "device": command.device,
        "op": command.op,
        "args": dict(command.args),
        "state": command.state.value,
        "key": command.key,
        "idempotency_key": command.idempotency_key,
        "priority": command.priority,
        "attempts": command.attempts,
        "max_attempts": command.max_attempts,
        "created_at": command.created_at,
        "updated_at": command.updated_at,
        "expires_at": command.expires_at,
        "last_error": (command.last_error.to_wire() if command.last_error is not None else None),
        "result": dict(command.result) if command.result is not None else None,
        "waiting": waiting_json(waiting),
    }


async def device_view(
    gateway: Gateway,
    device_id: str,
    *,
    owners: Mapping[str, str] | None = None,
    statuses: Mapping[str, tuple[str, str]] | None = None,
    depths: Mapping[str, tuple[int, int]] | None = None,
    records: Mapping[str, DeviceRecord] | None = None,
) -> dict[str, Any]:
    """The device as the API shows it. ``owners``, ``statuses``, ``depths`` and
    ``records`` are what a list of every device read once for all of them."""
    config = gateway.device(device_id)
    link = gateway.links.get(device_id)
    stats = link.statistics() if link is not None else None
    elsewhere = gateway.fleet is not None and not gateway.fleet.owns(device_id)
    if elsewhere:
        # Another node (or none yet) delivers to it: the shared store has its record,
        # and that node's events what its link and presence are.
        if records is None:
            records = await gateway.store.get_devices([device_id])
        record = records.get(device_id) or DeviceRecord(device=device_id)
    else:
        record = await gateway.outbox.device_record(device_id)
    if depths is None:
        depths = await gateway.store.depths([device_id])
    queued, sending = depths[device_id]
    last = stats.last_error if stats is not None else None
    retry_in = None
    if stats is not None and stats.retry_at is not None and link is not None:
        retry_in = max(0.0, stats.retry_at - link.clock.now())
    view: dict[str, Any] = {
        "id": device_id,
        "node": await owner_of(gateway, device_id, owners=owners),
        "driver": config.driver,
        "presence": gateway.presence.presence(device_id).value,
        "link": {
            "state": stats.state.value if stats else "idle",
            "attempt": stats.attempt if stats else 0,
            "connects": stats.connects if stats else 0,
            "disconnects": stats.disconnects if stats else 0,
            "retry_in_s": retry_in,
            "last_error": last.to_wire() if last else None,
            "firmware": stats.session.firmware if stats and stats.session else None,
            "device_info": device_info_json(config.driver, stats.session if stats else None),
            "protocol_errors": protocol_errors_json(link, stats),
            "late_replies": late_replies_json(link, stats),
        },
        "queued": queued,
        "sending": sending,
        "parked": (
            {"reason": record.parked_reason, "until": record.parked_until}
            if record.parked_reason is not None
            else None
        ),
    }
    if elsewhere:
        remote = await _remote_status(gateway, device_id, view["node"], statuses)
        view["presence"] = remote.get("presence", "unknown")
        link_view = remote.get("link", {})
        view["link"] = {
            "state": link_view.get("state", "unknown"),
            "last_error": link_view.get("last_error"),
        }
    return view


DEVICE_INFO_KEYS: Final = (
    "name", "friendly_name", "mac", "esphome_version", "project_name", "project_version",
    "compilation_time", "model", "manufacturer", "has_deep_sleep", "encrypted",
)  # fmt: skip
"""What an ESPHome device's DeviceInfo says of it, as its session reports it."""


def device_info_json(driver: str, session: SessionInfo | None) -> dict[str, Any] | None:
    """The DeviceInfo of an ESPHome device's current session (name, MAC, the ESPHome and
    project versions, the compilation time: the build it runs); None for other drivers or
    while not connected."""
    if driver != "esphome" or session is None:
        return None
    return {key: session.extra.get(key) for key in DEVICE_INFO_KEYS}


async def owner_of(
    gateway: Gateway, device_id: str, *, owners: Mapping[str, str] | None = None
) -> str | None:
    """The node delivering to the device: this one on a single node; in a fleet, the
    lease holder as the shared store has it now (``None`` while unowned), so every
    node answers the same."""
    if gateway.fleet is None:
        return gateway.config.node
    if owners is None:
        owners = await fleet_owners(gateway)
    return owners.get(device_id)


async def _remote_status(
    gateway: Gateway,
    device_id: str,
    owner: str | None,
    statuses: Mapping[str, tuple[str, str]] | None,
) -> dict[str, Any]:
    """What the device's owner last recorded of it (from the store), or, while the
    store cannot be reached, what its relayed events said."""
    assert gateway.fleet is not None
    if statuses is None:
        try:
            statuses = await gateway.fleet.store.statuses()
        except KeeplinkError:
            return gateway.remote.get(device_id, {})
    node, text = statuses.get(device_id, (None, "{}"))
    if owner is None or node != owner:
        return {}  # unowned, or its owner has not said anything yet
    try:
        status = json.loads(text)
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


async def fleet_owners(gateway: Gateway) -> Mapping[str, str]:
    """Device → owning node, read from the shared store (the keeper's last reading
    while the store cannot be reached)."""
    assert gateway.fleet is not None
    try:
        return await gateway.fleet.store.owners()
    except KeeplinkError:
        return gateway.fleet.owners


async def devices_view(gateway: Gateway) -> list[dict[str, Any]]:
    """Every device's view, from a few reads for all of them (not a few each)."""
    owners = statuses = records = None
    if gateway.fleet is not None:
        owners = await fleet_owners(gateway)
        with contextlib.suppress(KeeplinkError):
            statuses = await gateway.fleet.store.statuses()
        records = await gateway.store.get_devices(
            [d for d in gateway.devices if not gateway.fleet.owns(d)]
        )
    depths = await gateway.store.depths(list(gateway.devices))
    return [
        await device_view(
            gateway, device_id, owners=owners, statuses=statuses, depths=depths, records=records
        )
        for device_id in gateway.devices
    ]


def history_view(gateway: Gateway, device_id: str, *, hours: int) -> dict[str, Any]:
    """The device's last ``hours`` as this node remembers them (the API's
    DeviceHistory)."""
    gateway.device(device_id)
    relayed = gateway.fleet is not None and not gateway.fleet.owns(device_id)
    view = gateway.history.view(device_id, hours=hours)
    return {"device": device_id, "node": gateway.config.node, "relayed": relayed, **view}
