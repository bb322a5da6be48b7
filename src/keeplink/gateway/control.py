"""Device control the API offers: reconnect a link now, resume a parked delivery now, and
the note that says why a refused link holds a device's commands.

Both actions act only where this node delivers to the device; in a fleet, another node's
device is refused with ConflictError naming the node to ask.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from keeplink._core.errors import ConflictError, ErrorClass, error_class_of
from keeplink._core.states import LinkState
from keeplink.gateway.views import device_view, owner_of

if TYPE_CHECKING:
    from keeplink.gateway.runtime import Gateway

__all__ = ["NOTE_MESSAGE_CHARS", "reconnect", "refusal_note", "resume"]

_log = logging.getLogger("keeplink.gateway")

NOTE_MESSAGE_CHARS: Final = 200
"""Of a peer's error message quoted in a note: enough to act on, never a wall of text."""


def refusal_note(gateway: Gateway, device_id: str) -> str | None:
    """Why the device's commands cannot go out until something changes, when its link
    was refused (``auth_failed``, ``device_mismatch``, a config error): the note a
    submit answers with. ``None`` when the link was not refused, or another node owns
    the device. Refusal notes start with ``queued: the link``."""
    if gateway.fleet is not None and not gateway.fleet.owns(device_id):
        return None
    link = gateway.links.get(device_id)
    error = link.last_error if link is not None else None
    if link is None or error is None or error_class_of(error.code) is not ErrorClass.TERMINAL:
        return None
    message = error.message
    if len(message) > NOTE_MESSAGE_CHARS:
        message = message[:NOTE_MESSAGE_CHARS] + "…"
    why = f"{error.wire_code}: {message}"
    action = f"POST /api/devices/{device_id}/reconnect"
    if link.state is LinkState.FAILED:
        return f"queued: the link failed ({why}); {action} or fix the device config"
    retry_s = link.backoff.terminal_retry_s
    if link.state is LinkState.BACKOFF and retry_s is not None:
        return (
            f"queued: the link was refused ({why}); retrying every {retry_s:g} s, "
            f"or {action} to retry now"
        )
    return None


async def _delivered_here(gateway: Gateway, device_id: str, what: str) -> None:
    """Raise DeviceNotFoundError for an unknown device, and ConflictError in a fleet
    when another node delivers to it (``what`` must be sent there)."""
    gateway.device(device_id)
    if gateway.fleet is not None and not gateway.fleet.owns(device_id):
        owner = await owner_of(gateway, device_id)
        where = f"node {owner!r}" if owner is not None else "no node yet"
        raise ConflictError(
            f"device {device_id!r} is delivered to by {where}, not this one "
            f"({gateway.config.node!r}); send the {what} there"
        )


async def reconnect(gateway: Gateway, device_id: str) -> dict[str, Any]:
    """Make the device's link try again now: a failed link starts again (for a device
    whose credentials or identity were fixed), a link waiting out a backoff skips the
    rest of the wait. A link that is connected or connecting is left alone; nothing
    ever cancels a handshake in progress.

    Returns ``{"reconnect": "started" | "woken" | "none", "note", "device"}`` (the
    device view afterwards). Raises DeviceNotFoundError, and ConflictError in a fleet
    when another node owns the device (its link runs there).
    """
    await _delivered_here(gateway, device_id, "reconnect")
    link = gateway.links[device_id]
    error = link.last_error
    state = link.state
    if state is LinkState.FAILED:
        link.connect_soon()
        action = "started"
        why = f" ({error.wire_code}: {error.message[:NOTE_MESSAGE_CHARS]})" if error else ""
        note = f"the failed link{why} tries again now"
    elif state is LinkState.BACKOFF and link.wake("reconnect request"):
        action, note = "woken", "the link skips the rest of its backoff wait"
    else:
        action, note = "none", f"nothing to do: the link is {state.value}"
    _log.info("gateway: reconnect of %r requested: %s", device_id, action)
    return {"reconnect": action, "note": note, "device": await device_view(gateway, device_id)}


async def resume(gateway: Gateway, device_id: str) -> dict[str, Any]:
    """Deliver to a device the breaker parked (after repeated failed delivery cycles)
    now, instead of at the end of its park. A device that is not parked is left alone.

    Returns ``{"resumed": bool, "note", "device"}`` (the device view afterwards).
    Raises DeviceNotFoundError, and ConflictError in a fleet when another node owns
    the device (its deliveries run there).
    """
    await _delivered_here(gateway, device_id, "resume")
    record = await gateway.outbox.device_record(device_id)
    if record.parked_reason is None:
        note = "nothing to do: delivery to the device is not parked"
        resumed = False
    else:
        await gateway.outbox.resume(device_id)
        note = "delivery resumes now; the failed-cycle count starts again from 0"
        resumed = True
    _log.info("gateway: resume of %r requested: %s", device_id, note)
    return {"resumed": resumed, "note": note, "device": await device_view(gateway, device_id)}
