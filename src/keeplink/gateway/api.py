"""The gateway's HTTP and WebSocket API, on aiohttp.

Errors are always ``{"code": "<ErrorCode>", "message": "…"}`` with a fitting status. Writes
need ``Authorization: Bearer TOKEN`` (compared in constant time); reads need the read token
(or the write token) when the gateway has a ``read_token``. Bodies, answers and query
parameters are the models of :mod:`keeplink.gateway.models`; the OpenAPI document served at
``/api/openapi.json`` is generated from them.

The edge refuses what a browser could be tricked into: a request whose ``Host`` is not an IP
address, localhost or one of ``allowed_hosts`` (DNS rebinding), and a WebSocket whose
``Origin`` is another site. Every answer carries the browser hardening headers.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gzip
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final, TypeVar

import pydantic_core
from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from keeplink import __version__
from keeplink._core.commands import Command, CommandState
from keeplink._core.errors import (
    AuthError,
    CommandNotFoundError,
    ErrorCode,
    ErrorInfo,
    InvalidRequestError,
    KeeplinkError,
)
from keeplink._link import Link
from keeplink.gateway import models
from keeplink.gateway.listener import RateLimit
from keeplink.gateway.metrics import DeviceCounters
from keeplink.gateway.runtime import Gateway
from keeplink.outbox.firmware import FirmwareTransfer

__all__ = ["build_app"]

_log = logging.getLogger("keeplink.gateway.api")

STATUS_OF_CODE: Final[dict[str, int]] = {
    ErrorCode.DEVICE_NOT_FOUND.value: 404,
    ErrorCode.COMMAND_NOT_FOUND.value: 404,
    ErrorCode.INVALID_REQUEST.value: 422,
    ErrorCode.AUTH_FAILED.value: 401,
    ErrorCode.CONFLICT.value: 409,
    ErrorCode.QUEUE_FULL.value: 429,
    ErrorCode.LINK_CLOSED.value: 503,
    ErrorCode.DEVICE_UNAVAILABLE.value: 503,
    ErrorCode.STORE_UNAVAILABLE.value: 503,
    ErrorCode.STORE_BUSY.value: 503,
}
MAX_BODY: Final = 256 * 1024
CLIENT_BUFFER: Final = 2_000
"""Events a WebSocket client may have waiting; one that falls further behind is closed
(close code 1013, reason naming the ``since=`` to resume from)."""
BEHIND_CLOSE_CODE: Final = 1013
PING_S: Final = 30.0
"""An idle event stream is pinged this often; a ping that cannot be written in as long
ends the connection."""

PREFIX_MATCHES_SHOWN: Final = 10
"""Ids an ambiguous prefix's error lists at most."""

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
TOKEN_KEY: web.AppKey[str] = web.AppKey("token", str)
METRICS_KEY: web.AppKey[_Metrics] = web.AppKey("metrics")
SOCKETS_KEY: web.AppKey[set[Any]] = web.AppKey("sockets")  # of WebSocketResponse

_M = TypeVar("_M", bound=BaseModel)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(ErrorInfo(code=code, message=message).to_wire(), status=status)


def _answer(model: type[BaseModel], value: Any, *, status: int = 200) -> web.Response:
    """Answer ``value`` as ``model`` says (the shape the OpenAPI document shows)."""
    body = model.model_validate(value).model_dump(mode="json")
    return web.json_response(body, status=status)


_CLIENT_ERRORS: Final = RateLimit(1.0)


def _quiet(request: web.Request, status: int, message: str) -> None:
    """Client errors at DEBUG, at most one line a second (a flood never fills the log)."""
    quiet = _CLIENT_ERRORS.allow(time.monotonic())
    if quiet is not None:
        more = f" (+{quiet} more)" if quiet else ""
        _log.debug(
            "client error %d on %s %s: %s%s", status, request.method, request.path, message, more
        )


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except KeeplinkError as exc:
        status = STATUS_OF_CODE.get(
            exc.wire_code, 400 if exc.code is ErrorCode.INVALID_REQUEST else 500
        )
        if status >= 500:
            _log.info("gateway: %s %s: %s", request.method, request.path, exc.message)
        else:
            _quiet(request, status, exc.message)
        return _error(status, exc.wire_code, exc.message)
    except _ClientGone as exc:
        _quiet(request, exc.status, exc.message)
        response = _error(exc.status, ErrorCode.INVALID_REQUEST.value, exc.message)
        response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = ErrorCode.INVALID_REQUEST.value
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        elif exc.status == 413:
            message = f"body too large (the limit is {MAX_BODY} bytes)"
        else:
            message = exc.reason
        _quiet(request, exc.status, message)
        return _error(exc.status, code, message)
    except Exception:  # noqa: BLE001 - see below
        # Deliberately broad: a bug must answer as a typed 500, never a stack dump, and be
        # visible in the log with its traceback.
        _log.exception("gateway: unexpected error on %s %s", request.method, request.path)
        return _error(500, ErrorCode.UNKNOWN.value, "internal error; see the gateway log")


# ---------------------------------------------------------------------------- the edge


def _host_name(header: str) -> str | None:
    """The name in a ``Host`` header (or an Origin's authority), without the port."""
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not re.fullmatch(r":[0-9]{1,5}", rest)):
            return None
        return name
    name, colon, port = header.rpartition(":")
    if not colon:
        name = header
    elif not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        return None
    return name.rstrip(".") or None


def _host_allowed(name: str | None, allowed: tuple[str, ...]) -> bool:
    """IP addresses and localhost are safe from DNS rebinding; other names only when the
    operator listed them (the names the gateway is really reached by)."""
    if name is None:
        return False
    if name == "localhost" or name.endswith(".localhost") or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@web.middleware
async def _edge(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    allowed = request.app[GATEWAY_KEY].config.allowed_hosts
    host = request.headers.get("Host")
    if host is None or not _host_allowed(_host_name(host), allowed):
        raise web.HTTPMisdirectedRequest(
            reason=f"this gateway does not answer for host {host!r} "
            "(IP addresses, localhost and gateway.allowed_hosts only)"
        )
    return await handler(request)


def _hash_source(kind: str, page: str) -> str:
    """CSP sources for the page's inline ``<script>``/``<style>`` blocks, by hash."""
    blocks = re.findall(rf"<{kind}>(.*?)</{kind}>", page, flags=re.S)
    return " ".join(
        "'sha256-" + _b64(hashlib.sha256(block.encode()).digest()) + "'" for block in blocks
    )


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


_DASHBOARD: Final = (
    resources.files("keeplink.gateway").joinpath("dashboard.html").read_text("utf-8")
)
_DASHBOARD_GZIP: Final = gzip.compress(_DASHBOARD.encode("utf-8"), mtime=0)
"""The page compressed once (about a quarter of its size) for clients that take gzip."""
_API_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"
_PAGE_CSP: Final = (
    "default-src 'none'; "
    f"script-src {_hash_source('script', _DASHBOARD)}; "
    f"style-src {_hash_source('style', _DASHBOARD)}; "
    "connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


async def _hardening(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("Cache-Control", "no-store")
    headers.setdefault("Content-Security-Policy", _API_CSP)


def _presented(request: web.Request, *, query: bool = False) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return request.query.get("access_token") if query else None
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise AuthError("this endpoint needs Authorization: Bearer <token>")
    return presented.strip()


def _matches(presented: str, expected: str) -> bool:
    # A header may carry any byte; a token is ASCII. Compared as bytes, in constant time.
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), expected.encode())


def _authorize(request: web.Request) -> None:
    presented = _presented(request)
    if presented is None:
        raise AuthError("this endpoint needs Authorization: Bearer <token>")
    if not _matches(presented, request.app[TOKEN_KEY]):
        raise AuthError("the bearer token is not valid")


def _authorize_read(request: web.Request, *, query: bool = False) -> None:
    """Reads are open unless the gateway has a read_token; then that or the write token."""
    read_token = request.app[GATEWAY_KEY].config.read_token
    if read_token is None:
        return
    presented = _presented(request, query=query)
    if presented is None:
        raise AuthError("reads need Authorization: Bearer <read token> on this gateway")
    if not (_matches(presented, read_token) or _matches(presented, request.app[TOKEN_KEY])):
        raise AuthError("the bearer token is not valid")


def _query(request: web.Request, model: type[_M]) -> _M:
    known = set(model.model_fields)
    for name in request.query:
        if name not in known:
            raise InvalidRequestError(f"unknown query parameter {name!r}; allowed: {sorted(known)}")
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise InvalidRequestError(models.describe(exc)) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


class _ClientGone(Exception):
    """A body that never came whole: answered (if anyone still listens) and closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def _body(request: web.Request, model: type[_M]) -> _M:
    """The whole body (however many reads and chunks it takes, up to MAX_BODY: 413 over
    it), validated as ``model``: malformed JSON is 400, a wrong shape 422."""
    limit_s = request.app[GATEWAY_KEY].config.header_timeout_s
    try:
        async with asyncio.timeout(limit_s):  # a body trickled or cut short holds no slot
            raw = await request.read()
    except TimeoutError:
        raise _ClientGone(408, f"the body did not arrive within {limit_s:g} s") from None
    except web.RequestPayloadError as exc:  # a bad gzip/deflate body, a broken chunk
        raise web.HTTPBadRequest(reason=_one_line(f"the body could not be read: {exc}")) from None
    except ConnectionError:
        raise _ClientGone(400, "the client went away before its body arrived") from None
    try:
        # Strict JSON: NaN and Infinity are not JSON; nesting is bounded by the parser.
        document = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise web.HTTPBadRequest(reason=_one_line(f"malformed JSON: {exc}")) from None
    if not isinstance(document, dict):
        raise InvalidRequestError("the body must be a JSON object")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise InvalidRequestError(models.describe(exc)) from None


# ---------------------------------------------------------------------------- handlers


async def list_devices(request: web.Request) -> web.Response:
    _authorize_read(request)
    devices = await request.app[GATEWAY_KEY].devices_view()
    return _answer(models.DeviceList, {"devices": devices})


async def get_device(request: web.Request) -> web.Response:
    _authorize_read(request)
    gateway = request.app[GATEWAY_KEY]
    return _answer(models.Device, await gateway.device_view(request.match_info["device"]))


async def device_history(request: web.Request) -> web.Response:
    """The device's last hours, from this node's bounded in-memory history."""
    _authorize_read(request)
    gateway = request.app[GATEWAY_KEY]
    device_id = request.match_info["device"]
    gateway.device(device_id)  # 404 before looking at the query
    query = _query(request, models.HistoryQuery)
    return _answer(models.DeviceHistory, gateway.history_view(device_id, hours=query.hours))


async def submit_command(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY_KEY]
    device_id = request.match_info["device"]
    config = gateway.device(device_id)  # 404 before looking at the body
    body = await _body(request, models.Submit)
    link = gateway.links[device_id]
    args = gateway.command_args(device_id, body.args or {})
    await _check_deliverable(gateway, link, body.op, args, body.idempotency_key)
    command = await gateway.outbox.submit(
        device_id,
        body.op,
        args,
        key=body.key,
        ttl_s=body.ttl_s if body.ttl_s is not None else gateway.config.ttl_s,
        max_attempts=body.max_attempts,
        priority=body.priority,
        idempotency_key=body.idempotency_key,
        max_queued=config.max_queued,
    )
    presence = gateway.presence_of(device_id).value
    waiting = gateway.outbox.waiting(command)
    refused = gateway.refusal_note(device_id)
    if refused is not None:
        note = refused
    elif presence != "online":
        note = "queued: the device is away; it will be delivered when it is back"
    elif waiting is not None:
        note = f"queued: {waiting.message}"
    else:
        note = "queued for delivery now"
    # The command's own fields, as GET /api/commands/{id} answers them, and what happens next.
    accepted = {**gateway.command_json(command), "device_presence": presence, "note": note}
    response = _answer(models.SubmitAccepted, accepted, status=202)
    response.headers["Location"] = _command_url(command.id)
    return response


def _command_url(command_id: str) -> str:
    return "/api/commands/" + urllib.parse.quote(command_id, safe="")


_ID_STANDIN: Final = "0" * 32
"""A command's id (32 hex digits), which its requests carry as the key when it has none."""


async def _check_deliverable(
    gateway: Gateway, link: Link[Any], op: str, args: dict[str, Any], key: str | None
) -> None:
    """Refuse (InvalidRequestError: 422, nothing stored) a command that could never be
    delivered, rather than store it to fail on delivery: the checks of the device's driver
    (op and args, as the largest sequence number and the key it goes out with encode), or
    of the executor that delivers the op (a firmware transfer: its ``ota.*`` requests on
    this link, its args, the image file)."""
    executor = gateway.outbox.executors.get(op)
    if isinstance(executor, FirmwareTransfer):
        await executor.check(link, args)
    elif executor is None:
        seq = (1 << link.driver.seq_bits) - 1
        link.driver.build_request(seq, op, args, key or _ID_STANDIN)


async def reconnect_device(request: web.Request) -> web.Response:
    """Make a failed or backing-off link try again now (202 with what was done)."""
    _authorize(request)
    answer = await request.app[GATEWAY_KEY].reconnect(request.match_info["device"])
    return _answer(models.Reconnected, answer, status=202)


async def resume_device(request: web.Request) -> web.Response:
    """Deliver to a parked device now (202 with what was done)."""
    _authorize(request)
    answer = await request.app[GATEWAY_KEY].resume(request.match_info["device"])
    return _answer(models.Resumed, answer, status=202)


async def list_commands(request: web.Request) -> web.Response:
    _authorize_read(request)
    gateway = request.app[GATEWAY_KEY]
    query = _query(request, models.CommandsQuery)
    if query.device is not None:
        gateway.device(query.device)
    commands = await gateway.outbox.list(
        device=query.device,
        states=query.states(),
        limit=query.limit,
        newest=query.order == "newest",
    )
    return _answer(models.CommandList, {"commands": [gateway.command_json(c) for c in commands]})


async def _named(gateway: Gateway, name: str) -> Command:
    """The command ``name`` names: its whole id, or a prefix of at least MIN_ID_PREFIX hex
    digits (any case) that starts exactly one command's id. Raises CommandNotFoundError
    (404), and InvalidRequestError (422) listing the ids a prefix of several starts."""
    try:
        return await gateway.outbox.get(name)
    except CommandNotFoundError:
        prefix = name.lower()
        if not re.fullmatch("[0-9a-f]+", prefix):
            raise
        shortest = models.MIN_ID_PREFIX
        if len(prefix) < shortest:
            raise CommandNotFoundError(
                f"no command {name!r} (an id prefix needs at least {shortest} hex digits)"
            ) from None
    ids = await gateway.store.ids_with_prefix(prefix, limit=PREFIX_MATCHES_SHOWN + 1)
    if not ids:
        raise CommandNotFoundError(f"no command {name!r}, nor one whose id starts with it")
    if len(ids) > 1:
        many = (
            f"more than {PREFIX_MATCHES_SHOWN} commands, among them"
            if len(ids) > PREFIX_MATCHES_SHOWN
            else f"{len(ids)} commands:"
        )
        shown = ", ".join(ids[:PREFIX_MATCHES_SHOWN])
        raise InvalidRequestError(
            f"{name!r} is ambiguous: it starts the ids of {many} {shown}; give more of the id"
        )
    return await gateway.outbox.get(ids[0])


async def get_command(request: web.Request) -> web.Response:
    _authorize_read(request)
    gateway = request.app[GATEWAY_KEY]
    command = await _named(gateway, request.match_info["command"])
    return _answer(models.Command, gateway.command_json(command))


async def cancel_command(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY_KEY]
    command = await _named(gateway, request.match_info["command"])
    command = await gateway.outbox.cancel(command.id)
    return _answer(models.Command, gateway.command_json(command))


def _same_origin(request: web.Request) -> bool:
    """A browser's WebSocket must come from a page of this gateway (or an allowed host);
    clients that are not browsers send no Origin."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    scheme, sep, authority = origin.partition("://")
    if not sep or scheme not in ("http", "https") or "/" in authority:
        return False  # "null" (a sandboxed frame, a file) and anything odd
    host = request.headers.get("Host", "")
    if authority.lower() == host.lower():
        return True
    return _host_name(authority) in request.app[GATEWAY_KEY].config.allowed_hosts


async def events(request: web.Request) -> web.StreamResponse:
    _authorize_read(request, query=True)
    if not _same_origin(request):
        raise web.HTTPForbidden(
            reason=f"WebSocket from a foreign origin {request.headers.get('Origin')!r} refused"
        )
    query = _query(request, models.EventsQuery)
    gateway = request.app[GATEWAY_KEY]
    # Pings are sent by the loop below while the stream is idle (aiohttp's own heartbeat
    # timer can outlive a close the server starts).
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    request.app[SOCKETS_KEY].add(ws)
    pending: collections.deque[dict[str, Any]] = collections.deque()
    ready = asyncio.Event()
    behind = asyncio.Event()

    def push(event: dict[str, Any]) -> None:
        # Never blocks delivery and never grows past CLIENT_BUFFER: a client that far
        # behind is closed, and resumes with since=.
        if len(pending) >= CLIENT_BUFFER:
            behind.set()
        else:
            pending.append(event)
            ready.set()

    if query.since is not None:
        for event in gateway.backlog(query.since):
            push(event)
    unlisten = gateway.listen(push)
    loop = asyncio.get_running_loop()
    reader = loop.create_task(_drain_client(ws), name="keeplink.api.ws-reader")
    fell_behind = loop.create_task(behind.wait(), name="keeplink.api.ws-behind")
    sent: int = query.since or 0
    try:
        while not ws.closed and not reader.done() and not behind.is_set():
            if not pending:
                ready.clear()
                waiter = loop.create_task(ready.wait())
                done, _ = await asyncio.wait(
                    {waiter, reader, fell_behind},
                    timeout=PING_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                if not done:
                    await asyncio.wait_for(ws.ping(), PING_S)  # idle: is anyone there?
                continue
            event = pending.popleft()
            send = loop.create_task(ws.send_str(json.dumps(event)))
            await asyncio.wait({send, reader, fell_behind}, return_when=asyncio.FIRST_COMPLETED)
            if not send.done():
                # The client stopped reading: its socket is full and a close frame would
                # wait behind the data. Drop the connection.
                send.cancel()
                await asyncio.gather(send, return_exceptions=True)
                if request.transport is not None:
                    request.transport.abort()
                break
            send.result()
            sent = int(event.get("seq", sent))
        if behind.is_set() and not ws.closed:
            reader.cancel()  # close() reads the client's answer itself
            await asyncio.gather(reader, return_exceptions=True)
            await ws.close(
                code=BEHIND_CLOSE_CODE,
                message=f"fell behind; reconnect with since={sent}".encode(),
            )
    except TimeoutError:
        # An idle ping could not be written: the client stopped reading.
        if request.transport is not None:
            request.transport.abort()
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away mid-send
    finally:
        unlisten()
        request.app[SOCKETS_KEY].discard(ws)
        for task in (reader, fell_behind):
            task.cancel()
        await asyncio.gather(reader, fell_behind, return_exceptions=True)
        await ws.close()
    return ws


async def _close_sockets(app: web.Application) -> None:
    sockets: set[Any] = app[SOCKETS_KEY]
    for ws in tuple(sockets):
        await ws.close(code=1001, message=b"gateway shutting down")


async def _drain_client(ws: web.WebSocketResponse) -> None:
    async for message in ws:
        if message.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
            break


async def healthz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    body: dict[str, Any] = {
        "status": "ok",
        "version": __version__,
        "node": gateway.config.node,
        "devices": len(gateway.links),
        "links": dict(gateway.link_counts()),
    }
    fleet = gateway.fleet
    if fleet is not None:
        body["fleet"] = {
            "live_nodes": list(fleet.live),
            "owned": sorted(d for d in gateway.links if fleet.owns(d)),
        }
        if not fleet.healthy:
            body["status"] = "degraded"
            body["reason"] = fleet.problem
    return _answer(models.Health, body)


_OPENAPI: Final = models.openapi()


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(_OPENAPI)


def _takes_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header takes gzip (``gzip;q=0`` refuses it)."""
    for item in header.lower().split(","):
        name, *params = (part.strip() for part in item.split(";"))
        if name not in ("gzip", "x-gzip", "*"):
            continue
        for param in params:
            if param.startswith("q="):
                try:
                    return float(param[2:]) > 0
                except ValueError:
                    return False
        return True
    return False


async def dashboard(request: web.Request) -> web.Response:
    if _takes_gzip(request.headers.get("Accept-Encoding", "")):
        response = web.Response(body=_DASHBOARD_GZIP, content_type="text/html", charset="utf-8")
        response.headers["Content-Encoding"] = "gzip"
    else:
        response = web.Response(text=_DASHBOARD, content_type="text/html")
    response.headers["Vary"] = "Accept-Encoding"
    response.headers["Content-Security-Policy"] = _PAGE_CSP
    return response


class _Metrics:
    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry()
        self.links = Gauge("keeplink_links", "Links by state", ["state"], registry=self.registry)
        self.reconnects = Gauge(
            "keeplink_reconnects_total",
            "Completed handshakes after the first, all links",
            registry=self.registry,
        )
        self.requests = Gauge(
            "keeplink_requests_total",
            "Requests by outcome, all links",
            ["outcome"],
            registry=self.registry,
        )
        self.queue = Gauge(
            "keeplink_queue_depth", "Queued commands", ["device"], registry=self.registry
        )
        self.latency = Histogram(
            "keeplink_delivery_latency_seconds",
            "From submit to acknowledged",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400),
            registry=self.registry,
        )
        self.websockets = Gauge(
            "keeplink_api_websockets",
            "Event stream clients connected now",
            registry=self.registry,
        )
        self.delivered = Counter(
            "keeplink_delivered_total", "Commands acknowledged", registry=self.registry
        )
        self.registry.register(DeviceCounters(gateway))
        gateway.on_delivered = self._observe

    def _observe(self, latency: float) -> None:
        self.latency.observe(max(latency, 0.0))
        self.delivered.inc()

    async def render(self, gateway: Gateway, *, websockets: int = 0) -> bytes:
        self.websockets.set(websockets)
        for state in (
            "idle",
            "connecting",
            "handshaking",
            "connected",
            "lost",
            "backoff",
            "stopping",
            "stopped",
            "failed",
        ):
            self.links.labels(state=state).set(gateway.link_counts().get(state, 0))
        reconnects = 0
        outcomes: dict[str, int] = {}
        for link in gateway.links.values():
            stats = link.statistics()
            reconnects += max(0, stats.connects - 1)
            for name, count in stats.outcomes.items():
                outcomes[name] = outcomes.get(name, 0) + count
        self.reconnects.set(reconnects)
        for name, count in outcomes.items():
            self.requests.labels(outcome=name).set(count)
        for device in gateway.devices:
            depth = await gateway.store.count(device=device, states=[CommandState.QUEUED])
            self.queue.labels(device=device).set(depth)
        return generate_latest(self.registry)


async def metrics(request: web.Request) -> web.Response:
    _authorize_read(request)
    body = await request.app[METRICS_KEY].render(
        request.app[GATEWAY_KEY], websockets=len(request.app[SOCKETS_KEY])
    )
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _no_route(request: web.Request) -> web.StreamResponse:
    """404 for a path no route has; 405 (with Allow) for a method a route does not take."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        response = _error(
            405,
            ErrorCode.INVALID_REQUEST.value,
            f"method {request.method} not allowed on {request.path}",
        )
        response.headers["Allow"] = ",".join(sorted(allowed))
        return response
    return _error(
        404, ErrorCode.INVALID_REQUEST.value, f"no such endpoint: {request.method} {request.path}"
    )


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` is answered; any other expectation is a JSON 417 (aiohttp's
    own handler would echo the header into a plain-text answer, and fail on a non-ASCII one)."""
    expect = request.headers.get("Expect", "")
    if expect.isascii() and expect.strip().lower() == "100-continue":
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None
    return _error(417, ErrorCode.INVALID_REQUEST.value, "only Expect: 100-continue is understood")


def build_app(gateway: Gateway, *, token: str) -> web.Application:
    """The aiohttp application for a started Gateway."""
    app = web.Application(middlewares=[_errors, _edge], client_max_size=MAX_BODY)
    app[GATEWAY_KEY] = gateway
    app[TOKEN_KEY] = token
    app[METRICS_KEY] = _Metrics(gateway)
    sockets: set[Any] = set()
    app[SOCKETS_KEY] = sockets
    app.on_shutdown.append(_close_sockets)
    app.on_response_prepare.append(_hardening)
    app.router.add_get("/", dashboard, expect_handler=_expect)
    app.router.add_get("/api/devices", list_devices, expect_handler=_expect)
    app.router.add_get("/api/devices/{device}", get_device, expect_handler=_expect)
    app.router.add_get("/api/devices/{device}/history", device_history, expect_handler=_expect)
    app.router.add_post("/api/devices/{device}/commands", submit_command, expect_handler=_expect)
    app.router.add_post("/api/devices/{device}/reconnect", reconnect_device, expect_handler=_expect)
    app.router.add_post("/api/devices/{device}/resume", resume_device, expect_handler=_expect)
    app.router.add_get("/api/commands", list_commands, expect_handler=_expect)
    app.router.add_get("/api/commands/{command}", get_command, expect_handler=_expect)
    app.router.add_delete("/api/commands/{command}", cancel_command, expect_handler=_expect)
    app.router.add_get("/api/events", events, expect_handler=_expect)
    app.router.add_get("/api/openapi.json", openapi, expect_handler=_expect)
    app.router.add_get("/metrics", metrics, expect_handler=_expect)
    app.router.add_get("/healthz", healthz, expect_handler=_expect)
    # Last: every other path, so that no request meets aiohttp's own Expect handling.
    app.router.add_route("*", r"/{tail:[\s\S]*}", _no_route, expect_handler=_expect)
    return app
