"""A client for the gateway's HTTP and WebSocket API, on aiohttp.

It is what the ``keeplink devices | send | commands | cancel | reconnect`` commands use,
and it works as a small library for scripts::

    async with GatewayClient("http://127.0.0.1:8470", token="s3cret") as gw:
        command = await gw.submit("hall", "set", {"target": 21.5})
        final = await gw.wait(command["id"], timeout=60)

Every method returns the API's JSON as it came (plain dicts), so nothing is lost between
the gateway and a caller. Failures are typed :class:`~keeplink.KeeplinkError` subclasses:

- :class:`ApiError`: the gateway answered with an error; ``status`` is the HTTP status and
  ``wire_code``/``message`` are the API's ``{"code", "message"}``;
- :class:`GatewayUnreachableError`: no gateway answered at that URL (refused, reset, name
  not resolved, or no answer within the client's timeout);
- :class:`WaitTimeoutError`: :meth:`GatewayClient.wait` gave up before the command was final;
  ``command`` holds the last state seen.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final
from urllib.parse import quote, urlsplit

import aiohttp

from keeplink._core import commands
from keeplink._core.errors import ErrorCode, KeeplinkError

__all__ = [
    "DEFAULT_URL",
    "FINAL_STATES",
    "ApiError",
    "GatewayClient",
    "GatewayUnreachableError",
    "WaitTimeoutError",
]

DEFAULT_URL: Final = "http://127.0.0.1:8470"
FINAL_STATES: Final[frozenset[str]] = frozenset(state.value for state in commands.FINAL_STATES)
"""Command states that never change again (the API's spelling): the outbox's own
:data:`keeplink.outbox.FINAL_STATES`, as the plain strings the API sends."""

_RECONNECT_DELAY_S: Final = 0.5


def _known_code(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.UNKNOWN


class ApiError(KeeplinkError):
    """The gateway answered an error: ``status`` (HTTP), ``wire_code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message, code=_known_code(code), wire_code=code)
        self.status = status


class GatewayUnreachableError(KeeplinkError):
    """No gateway answered at the URL (connection refused or reset, bad host, timeout)."""

    default_code = ErrorCode.CONNECTION_FAILED

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the gateway at {url}: {reason}")
        self.url = url
        self.reason = reason


class WaitTimeoutError(KeeplinkError):
    """A command was not final within the wait's timeout; ``command`` is its last state."""

    default_code = ErrorCode.TIMEOUT

    def __init__(self, message: str, command: dict[str, Any]) -> None:
        super().__init__(message)
        self.command = command


def check_url(url: str) -> str:
    """The base URL without a trailing slash; InvalidURL-free or a ValueError saying why."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the gateway URL must look like http://host:port, got {url!r}")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in the gateway URL {url!r}: {exc}") from None
    return url.rstrip("/")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ClientConnectorError):
        error = exc.os_error
        if isinstance(error.errno, int) and error.errno > 0:
            return f"{os.strerror(error.errno)} ({exc.host}:{exc.port})"
        return f"{error.strerror or error} ({exc.host}:{exc.port})"
    return str(exc) or type(exc).__name__


class GatewayClient:
    """One gateway at ``url``. Use as an async context manager (it owns an aiohttp session).

    ``token`` is sent as ``Authorization: Bearer`` (writes need it); ``timeout`` bounds each
    HTTP request in seconds.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        self.url = check_url(url)
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._session is None:
            headers = {"Accept": "application/json"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("GatewayClient is not open; use `async with GatewayClient(...)`")
        return self._session

    # ------------------------------------------------------------------ HTTP

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call; the decoded JSON of a 2xx answer, else :class:`ApiError`."""
        url = self.url + path
        try:
            async with self.session.request(
                method, url, json=dict(body) if body is not None else None, params=params
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise GatewayUnreachableError(self.url, _reason(exc)) from exc
        try:
            data = json.loads(raw.decode("utf-8")) if raw else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if status >= 400:
            if (
                isinstance(data, dict)
                and isinstance(data.get("code"), str)
                and isinstance(data.get("message"), str)
            ):
                raise ApiError(status, data["code"], data["message"])
            snippet = raw[:200].decode("utf-8", "replace").strip()
            code = ErrorCode.UNKNOWN.value
            raise ApiError(status, code, f"HTTP {status} from {url}: {snippet or 'no body'}")
        if data is None and raw:
            raise ApiError(status, ErrorCode.PROTOCOL_ERROR.value, f"{url} did not answer JSON")
        return data

    async def devices(self) -> dict[str, Any]:
        """``GET /api/devices``: ``{"devices": [...]}``."""
        result: dict[str, Any] = await self.request("GET", "/api/devices")
        return result

    async def device(self, device_id: str) -> dict[str, Any]:
        """``GET /api/devices/{id}``."""
        result: dict[str, Any] = await self.request("GET", f"/api/devices/{_seg(device_id)}")
        return result

    async def submit(
        self,
        device_id: str,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        ttl_s: float | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
    ) -> dict[str, Any]:
        """``POST /api/devices/{id}/commands``: the stored command (the fields
        :meth:`command` answers) with ``device_presence`` and ``note`` beside them."""
        body: dict[str, Any] = {"op": op, "args": dict(args or {})}
        optional = {
            "key": key,
            "ttl_s": ttl_s,
            "max_attempts": max_attempts,
            "idempotency_key": idempotency_key,
            "priority": priority,
        }
        body.update({name: value for name, value in optional.items() if value is not None})
        result: dict[str, Any] = await self.request(
            "POST", f"/api/devices/{_seg(device_id)}/commands", body=body
        )
        return result

    async def reconnect(self, device_id: str) -> dict[str, Any]:
        """``POST /api/devices/{id}/reconnect``: ``{"reconnect", "note", "device"}``."""
        result: dict[str, Any] = await self.request(
            "POST", f"/api/devices/{_seg(device_id)}/reconnect"
        )
        return result

    async def resume(self, device_id: str) -> dict[str, Any]:
        """``POST /api/devices/{id}/resume``: ``{"resumed", "note", "device"}``."""
        result: dict[str, Any] = await self.request(
            "POST", f"/api/devices/{_seg(device_id)}/resume"
        )
        return result

    async def commands(
        self, *, device: str | None = None, state: str | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """``GET /api/commands``: ``{"commands": [...]}``; ``state`` may be comma-separated."""
        params = {"device": device, "state": state, "limit": str(limit) if limit else None}
        query = {name: value for name, value in params.items() if value is not None}
        result: dict[str, Any] = await self.request("GET", "/api/commands", params=query)
        return result

    async def command(self, command_id: str) -> dict[str, Any]:
        """``GET /api/commands/{id}``: ``command_id`` may be a unique prefix of the id (at
        least 6 hex digits), as for :meth:`cancel` and :meth:`wait`."""
        result: dict[str, Any] = await self.request("GET", f"/api/commands/{_seg(command_id)}")
        return result

    async def cancel(self, command_id: str) -> dict[str, Any]:
        """``DELETE /api/commands/{id}``: the command as stored afterwards."""
        result: dict[str, Any] = await self.request("DELETE", f"/api/commands/{_seg(command_id)}")
        return result

    # ------------------------------------------------------------------ WebSocket

    async def _connect_events(self, since: int | None) -> aiohttp.ClientWebSocketResponse:
        url = self.url + "/api/events"
        params = {"since": str(since)} if since is not None else None
        try:
            return await self.session.ws_connect(
                url, params=params, heartbeat=30, timeout=aiohttp.ClientWSTimeout(ws_close=5)
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise ApiError(
                exc.status, ErrorCode.PROTOCOL_ERROR.value, f"WebSocket refused: {exc.message}"
            ) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise GatewayUnreachableError(self.url, _reason(exc)) from exc

    async def events(self, *, since: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The gateway's event stream (``GET /api/events``), one decoded event at a time.

        ``since=N`` first replays the gateway's backlog of events with ``seq > N``. The
        iterator ends when the gateway closes the socket; :class:`GatewayUnreachableError`
        when it cannot be opened.
        """
        ws = await self._connect_events(since)
        try:
            async for event in _decoded(ws):
                yield event
        finally:
            await ws.close()

    async def wait(
        self,
        command_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow the event stream until the command is final; return it (the API's JSON).

        ``on_event`` sees every event about this command (``command`` and
        ``firmware_progress``) and about its device (``link``, ``presence``, ``parked``) that
        happened after the command was created. A dropped stream (a gateway restart) is
        reopened until the timeout; the stored command is re-read each time, so nothing is
        missed. Raises WaitTimeoutError (with the last state seen) after ``timeout`` seconds.
        """
        last: dict[str, Any] = await self.command(command_id)
        if last.get("state") in FINAL_STATES:
            return last
        command_id = str(last.get("id", command_id))  # a prefix named it: events carry the id
        seen = [last]
        unreachable: list[str] = []
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await self._follow(command_id, seen, unreachable, on_event)
        except TimeoutError:
            if not scope.expired():
                raise
            state = seen[-1].get("state", "unknown")
            message = f"command {command_id} is still {state} after {timeout:g} s"
            if unreachable:
                message += f" (the gateway is unreachable: {unreachable[-1]})"
            raise WaitTimeoutError(message, seen[-1]) from None

    async def _follow(
        self,
        command_id: str,
        seen: list[dict[str, Any]],
        unreachable: list[str],
        on_event: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        device = seen[-1].get("device")
        created = seen[-1].get("created_at")
        created_at = float(created) if isinstance(created, int | float) else 0.0
        while True:
            try:
                # Subscribe first (with the backlog), then read the stored state: a change
                # is either in that state or on the stream, never in neither.
                ws = await self._connect_events(since=0)
                try:
                    current = await self.command(command_id)
                    unreachable.clear()
                    if current.get("state") != seen[-1].get("state"):
                        seen.append(current)
                        if on_event is not None:
                            on_event({"type": "command", "old": None, "command": current})
                    if current.get("state") in FINAL_STATES:
                        return current
                    async for event in _decoded(ws):
                        if not _concerns(event, command_id, device, created_at):
                            continue
                        if event.get("type") == "command":
                            command = event["command"]
                            known = seen[-1]
                            if _version(command) < _version(known) or (
                                _version(command) == _version(known)
                                and command.get("state") == known.get("state")
                            ):
                                continue  # replayed from the backlog: already known
                            seen.append(command)
                        if on_event is not None:
                            on_event(event)
                        if seen[-1].get("state") in FINAL_STATES:
                            return seen[-1]
                finally:
                    await ws.close()
            except GatewayUnreachableError as exc:
                unreachable.append(exc.reason)
            await asyncio.sleep(_RECONNECT_DELAY_S)


async def _decoded(ws: aiohttp.ClientWebSocketResponse) -> AsyncIterator[dict[str, Any]]:
    async for message in ws:
        if message.type is aiohttp.WSMsgType.TEXT:
            try:
                event = json.loads(message.data)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event
        elif message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
            break


def _version(command: Mapping[str, Any]) -> tuple[float, int]:
    """Orders the states of one command: by update time, then by how far along it is."""
    updated = command.get("updated_at")
    attempts = command.get("attempts")
    return (
        float(updated) if isinstance(updated, int | float) else 0.0,
        int(attempts) if isinstance(attempts, int) else 0,
    )


def _concerns(event: Mapping[str, Any], command_id: str, device: Any, created: float) -> bool:
    kind = event.get("type")
    if kind == "command":
        command = event.get("command")
        return isinstance(command, Mapping) and command.get("id") == command_id
    if kind == "firmware_progress":
        return bool(event.get("command_id") == command_id)
    if kind in ("link", "presence", "parked"):
        at = event.get("at")
        recent = isinstance(at, int | float) and at >= created
        return bool(event.get("device") == device and recent)
    return False


def _seg(value: str) -> str:
    """A path segment, percent-encoded (ids are plain, but never trust that)."""
    return quote(value, safe="")
