"""An integration with the life cycle of a Home Assistant config entry, without Home Assistant.

A Home Assistant integration sets up each config entry (one thermostat, here) in
``async_setup_entry``, tears it down in ``async_unload_entry``, and reloads it when its
options change or after a re-auth. This module has the same shape so that it can be read
next to a real integration and copied into one; where Home Assistant has its own
exceptions, this module defines look-alikes (``ConfigEntryNotReady``, and
``ReauthRequired`` where Home Assistant raises ``ConfigEntryAuthFailed``)::

    runtime = await async_setup_entry({"host": "192.0.2.10", "port": 7001,
                                       "token": "s3cret", "device_id": "hall-thermostat"})
    print(diagnostics(runtime))          # the token redacted
    runtime = await async_reload_entry(runtime)
    await async_unload_entry(runtime)    # leaves no task behind

The rules it follows, and why:

- **Set-up fails fast and cleanly.** A thermostat that cannot be reached within
  ``setup_timeout_s`` is ``ConfigEntryNotReady`` (Home Assistant retries the set-up later);
  one that refuses the token is ``ReauthRequired`` carrying keeplink's stable code
  (``auth_failed``, or ``device_mismatch`` for another device at the address). Either way
  everything started is stopped before the exception leaves.
- **After set-up, keeplink reconnects by itself.** Nothing here retries: a thermostat that
  restarts is away for a while (``available`` false) and comes back. Only a refusal that
  retrying cannot fix (the link goes ``failed``) needs the user: it is kept in
  ``runtime.reauth`` and handed to ``on_reauth`` (where Home Assistant would call
  ``entry.async_start_reauth(hass)``).
- **Unload leaves nothing behind**: no task, no timer, no open database. Commands still
  queued stay in the SQLite store and are delivered by the next set-up.
- **Diagnostics never leak secrets**: :func:`diagnostics` redacts every ``token`` and
  ``password`` however deep, and adds the link's statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from examples.thermostat import Thermostat
from keeplink import AuthError, ErrorCode, LinkEvent, LinkState, LinkStateChanged

__all__ = [
    "REDACTED",
    "TO_REDACT",
    "ConfigEntryNotReady",
    "ReauthRequired",
    "Runtime",
    "async_reload_entry",
    "async_setup_entry",
    "async_unload_entry",
    "diagnostics",
    "redact",
]

_log = logging.getLogger(__name__)

DOMAIN: Final = "keeplink_thermostat"
DEFAULT_SETUP_TIMEOUT_S: Final = 10.0
TO_REDACT: Final = frozenset({"token", "password"})
REDACTED: Final = "**REDACTED**"
_REAUTH_CODES: Final = frozenset({ErrorCode.AUTH_FAILED.value, ErrorCode.DEVICE_MISMATCH.value})


class ConfigEntryNotReady(Exception):
    """The thermostat could not be reached during set-up: try the set-up again later."""


class ReauthRequired(Exception):
    """The thermostat refused our credentials (or is another device): the user must give
    new ones. ``code`` is keeplink's stable error code: ``auth_failed`` or
    ``device_mismatch``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


@dataclass(eq=False)
class Runtime:
    """What a set-up entry holds (Home Assistant keeps it as ``entry.runtime_data``)."""

    config: Mapping[str, Any]
    thermostat: Thermostat
    on_reauth: Callable[[ReauthRequired], object] | None = None
    reauth: ReauthRequired | None = None
    """Set when the thermostat refused us after set-up (the link is ``failed``)."""
    unsubscribe: list[Callable[[], None]] = field(default_factory=list)


async def async_setup_entry(
    config: Mapping[str, Any],
    *,
    on_reauth: Callable[[ReauthRequired], object] | None = None,
) -> Runtime:
    """Set up one thermostat from its entry's ``config``: ``host``, ``port``,
    ``device_id``, optionally ``token``, ``store`` (the SQLite file for queued commands)
    and ``setup_timeout_s``.

    Raises ReauthRequired when the thermostat refuses the token, ConfigEntryNotReady when
    it cannot be reached in time; nothing is left running then.
    """
    thermostat = Thermostat(
        host=config["host"],
        port=config["port"],
        device_id=config["device_id"],
        token=config.get("token"),
        store=config.get("store", f"{DOMAIN}-{config['device_id']}.db"),
    )
    await thermostat.start()
    timeout = config.get("setup_timeout_s", DEFAULT_SETUP_TIMEOUT_S)
    try:
        await thermostat.wait_connected(timeout=timeout)
    except AuthError as exc:
        # Terminal: the link is failed and will not retry by itself.
        await thermostat.close()
        raise ReauthRequired(exc.wire_code, exc.message) from exc
    except TimeoutError as exc:
        # keeplink's WaitTimeoutError is a TimeoutError; the link was still trying.
        await thermostat.close()
        raise ConfigEntryNotReady(
            f"{config['device_id']} at {config['host']}:{config['port']} did not answer"
            f" within {timeout:g}s: {thermostat.link.last_error}"
        ) from exc
    except BaseException:
        await thermostat.close()
        raise
    runtime = Runtime(config=dict(config), thermostat=thermostat, on_reauth=on_reauth)
    # Subscribed before any await: no state change can slip between set-up and the watch.
    runtime.unsubscribe.append(
        thermostat.link.subscribe(functools.partial(_watch_for_refusal, runtime))
    )
    return runtime


async def async_unload_entry(runtime: Runtime) -> bool:
    """Tear the entry down: every task, timer and file it opened is gone when this returns."""
    for unsubscribe in runtime.unsubscribe:
        unsubscribe()
    runtime.unsubscribe.clear()
    await runtime.thermostat.close()
    return True


async def async_reload_entry(runtime: Runtime, config: Mapping[str, Any] | None = None) -> Runtime:
    """Unload, then set up again: with ``config`` (new options, a new token after a
    re-auth) or the entry's own. Raises what :func:`async_setup_entry` raises."""
    await async_unload_entry(runtime)
    return await async_setup_entry(
        runtime.config if config is None else config, on_reauth=runtime.on_reauth
    )


def _watch_for_refusal(runtime: Runtime, event: LinkEvent) -> None:
    """After set-up: a refusal that retrying cannot fix becomes a re-auth request, once."""
    if not (isinstance(event, LinkStateChanged) and event.new is LinkState.FAILED):
        return
    if event.error is None or event.error.code not in _REAUTH_CODES:
        return
    runtime.reauth = ReauthRequired(event.error.code, event.error.message)
    _log.warning("%s: re-auth needed: %s", runtime.config["device_id"], runtime.reauth)
    if runtime.on_reauth is not None:
        runtime.on_reauth(runtime.reauth)


# ---------------------------------------------------------------------------- diagnostics


def diagnostics(runtime: Runtime) -> dict[str, Any]:
    """What a user attaches to a bug report: the entry's config with its secrets redacted,
    what the thermostat last said, and the link's statistics (its state, connects and
    disconnects, the last error, request outcomes, protocol errors, late replies). Times
    in ``link`` are on the link's clock (the event loop's), not the wall clock.

    Everything is plain JSON (enums as their values), as Home Assistant stores it.
    """
    thermostat = runtime.thermostat
    report = {
        "domain": DOMAIN,
        "config": dict(runtime.config),
        "available": thermostat.available,
        "state": dataclasses.asdict(thermostat.state),
        "side_data": dict(thermostat.link.side_data),
        "link": dataclasses.asdict(thermostat.link.statistics()),
        "reauth": (
            None
            if runtime.reauth is None
            else {"code": runtime.reauth.code, "message": runtime.reauth.message}
        ),
    }
    plain: dict[str, Any] = json.loads(json.dumps(report, default=str))
    redacted: dict[str, Any] = redact(plain)
    return redacted


def redact(data: Any, keys: frozenset[str] = TO_REDACT) -> Any:
    """``data`` with the value of every key in ``keys`` replaced by REDACTED, at any depth
    (what Home Assistant's ``async_redact_data`` does)."""
    if isinstance(data, Mapping):
        return {k: REDACTED if k in keys else redact(v, keys) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(item, keys) for item in data]
    return data
