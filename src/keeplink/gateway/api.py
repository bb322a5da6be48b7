"""The gateway's HTTP and WebSocket API, on aiohttp.

Errors are always ``{"code": "<ErrorCode>", "message": "…"}`` with a fitting status. Writes
need ``Authorization: Bearer TOKEN`` (compared in constant time); reads need the read token
(or the write token) when the gateway has a ``read_token``. Bodies, answers and query
parameters are the models of :mod:`keeplink.gateway.models`; the OpenAPI document served at
``/api/openapi.json`` is generated from them.

The edge (:mod:`keeplink.gateway.edge`) refuses what a browser could be tricked into: a
request whose ``Host`` is not an IP address, localhost or one of ``allowed_hosts`` (DNS
rebinding); here a WebSocket whose ``Origin`` is another site is refused too. Every answer
carries the browser hardening headers. The dashboard and the OpenAPI document are served
from :mod:`keeplink.gateway.pages`, the metrics from :mod:`keeplink.gateway.metrics`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
import urllib.parse
from typing import Any, Final

from aiohttp import WSMsgType, web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keeplink import __version__
from keeplink._core.commands import Command
from keeplink._core.errors import CommandNotFoundError, InvalidRequestError
from keeplink._link import Link
from keeplink.gateway import models
from keeplink.gateway.drivers import REGISTRY
from keeplink.gateway.edge import (
    GATEWAY_KEY,
    MAX_BODY,
    TOKEN_KEY,
    answer,
    authorize,
    authorize_read,
    edge_middleware,
    errors_middleware,
    expect_continue,
    hardening,
    host_name,
    no_route,
    parse_body,
    parse_query,
)
from keeplink.gateway.executors import Checked
from keeplink.gateway.metrics import ApiMetrics
from keeplink.gateway.pages import dashboard, openapi
from keeplink.gateway.runtime import Gateway

__all__ = ["MAX_BODY", "build_app"]

_log = logging.getLogger("keeplink.gateway.api")

CLIENT_BUFFER: Final = 2_000
"""Events a WebSocket client may have waiting; one that falls further behind is closed
(close code 1013, reason naming the ``since=`` to resume from)."""
BEHIND_CLOSE_CODE: Final = 1013
PING_S: Final = 30.0
"""An idle event stream is pinged this often; a ping that cannot be written in as long
ends the connection."""

PREFIX_MATCHES_SHOWN: Final = 10
"""Ids an ambiguous prefix's error lists at most."""

METRICS_KEY: web.AppKey[ApiMetrics] = web.AppKey("metrics")
SOCKETS_KEY: web.AppKey[set[Any]] = web.AppKey("sockets")  # of WebSocketResponse

# ---------------------------------------------------------------------------- handlers


async def list_devices(request: web.Request) -> web.Response:
    authorize_read(request)
    devices = await request.app[GATEWAY_KEY].devices_view()
    return answer(models.DeviceList, {"devices": devices})


async def get_device(request: web.Request) -> web.Response:
    authorize_read(request)
    gateway = request.app[GATEWAY_KEY]
    return answer(models.Device, await gateway.device_view(request.match_info["device"]))


async def device_history(request: web.Request) -> web.Response:
    """The device's last hours, from this node's bounded in-memory history."""
    authorize_read(request)
    gateway = request.app[GATEWAY_KEY]
    device_id = request.match_info["device"]
    gateway.device(device_id)  # 404 before looking at the query
    query = parse_query(request, models.HistoryQuery)
    return answer(models.DeviceHistory, gateway.history_view(device_id, hours=query.hours))


async def submit_command(request: web.Request) -> web.Response:
    authorize(request)
    gateway = request.app[GATEWAY_KEY]
    device_id = request.match_info["device"]
    config = gateway.device(device_id)  # 404 before looking at the body
    body = await parse_body(request, models.Submit)
    link = gateway.links[device_id]
    args = gateway.command_args(device_id, body.args or {})
    await _check_deliverable(gateway, device_id, link, body.op, args, body.idempotency_key)
    spec = REGISTRY[config.driver]
    precondition, precondition_args = spec.preconditions(config).get(body.op, (None, None))
    command = await gateway.outbox.submit(
        device_id,
        body.op,
        args,
        precondition=precondition,
        precondition_args=precondition_args,
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
    response = answer(models.SubmitAccepted, accepted, status=202)
    response.headers["Location"] = _command_url(command.id)
    return response


def _command_url(command_id: str) -> str:
    return "/api/commands/" + urllib.parse.quote(command_id, safe="")


_ID_STANDIN: Final = "0" * 32
"""A command's id (32 hex digits), which its requests carry as the key when it has none."""


async def _check_deliverable(
    gateway: Gateway,
    device: str,
    link: Link[Any],
    op: str,
    args: dict[str, Any],
    key: str | None,
) -> None:
    """Refuse (InvalidRequestError: 422, nothing stored) a command that could never be
    delivered, rather than store it to fail on delivery: the checks of the device's driver
    (op and args, as the largest sequence number and the key it goes out with encode), or
    of the executor that delivers the op (a firmware transfer: its ``ota.*`` requests on
    this link, its args, the image file), as the device's driver made it."""
    executor = gateway.executor(device, op)
    if isinstance(executor, Checked):
        await executor.check(link, args)
    elif executor is None and op in gateway.executors:
        raise InvalidRequestError(f"the device {device!r} takes no {op!r} command")
    elif executor is None:
        seq = (1 << link.driver.seq_bits) - 1
        link.driver.build_request(seq, op, args, key or _ID_STANDIN)


async def reconnect_device(request: web.Request) -> web.Response:
    """Make a failed or backing-off link try again now (202 with what was done)."""
    authorize(request)
    done = await request.app[GATEWAY_KEY].reconnect(request.match_info["device"])
    return answer(models.Reconnected, done, status=202)


async def resume_device(request: web.Request) -> web.Response:
    """Deliver to a parked device now (202 with what was done)."""
    authorize(request)
    done = await request.app[GATEWAY_KEY].resume(request.match_info["device"])
    return answer(models.Resumed, done, status=202)


async def list_commands(request: web.Request) -> web.Response:
    authorize_read(request)
    gateway = request.app[GATEWAY_KEY]
    query = parse_query(request, models.CommandsQuery)
    if query.device is not None:
        gateway.device(query.device)
    commands = await gateway.outbox.list(
        device=query.device,
        states=query.states(),
        limit=query.limit,
        newest=query.order == "newest",
    )
    return answer(models.CommandList, {"commands": [gateway.command_json(c) for c in commands]})


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
    authorize_read(request)
    gateway = request.app[GATEWAY_KEY]
    command = await _named(gateway, request.match_info["command"])
    return answer(models.Command, gateway.command_json(command))


async def cancel_command(request: web.Request) -> web.Response:
    authorize(request)
    gateway = request.app[GATEWAY_KEY]
    command = await _named(gateway, request.match_info["command"])
    command = await gateway.outbox.cancel(command.id)
    return answer(models.Command, gateway.command_json(command))


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
    return host_name(authority) in request.app[GATEWAY_KEY].config.allowed_hosts


async def events(request: web.Request) -> web.StreamResponse:
    authorize_read(request, query=True)
    if not _same_origin(request):
        raise web.HTTPForbidden(
            reason=f"WebSocket from a foreign origin {request.headers.get('Origin')!r} refused"
        )
    query = parse_query(request, models.EventsQuery)
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
    return answer(models.Health, body)


async def metrics(request: web.Request) -> web.Response:
    authorize_read(request)
    body = await request.app[METRICS_KEY].render(
        request.app[GATEWAY_KEY], websockets=len(request.app[SOCKETS_KEY])
    )
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(gateway: Gateway, *, token: str) -> web.Application:
    """The aiohttp application for a started Gateway."""
    app = web.Application(
        middlewares=[errors_middleware, edge_middleware], client_max_size=MAX_BODY
    )
    app[GATEWAY_KEY] = gateway
    app[TOKEN_KEY] = token
    app[METRICS_KEY] = ApiMetrics(gateway)
    sockets: set[Any] = set()
    app[SOCKETS_KEY] = sockets
    app.on_shutdown.append(_close_sockets)
    app.on_response_prepare.append(hardening)
    expect: dict[str, Any] = {"expect_handler": expect_continue}  # never aiohttp's own
    app.router.add_get("/", dashboard, **expect)
    app.router.add_get("/api/devices", list_devices, **expect)
    app.router.add_get("/api/devices/{device}", get_device, **expect)
    app.router.add_get("/api/devices/{device}/history", device_history, **expect)
    app.router.add_post("/api/devices/{device}/commands", submit_command, **expect)
    app.router.add_post("/api/devices/{device}/reconnect", reconnect_device, **expect)
    app.router.add_post("/api/devices/{device}/resume", resume_device, **expect)
    app.router.add_get("/api/commands", list_commands, **expect)
    app.router.add_get("/api/commands/{command}", get_command, **expect)
    app.router.add_delete("/api/commands/{command}", cancel_command, **expect)
    app.router.add_get("/api/events", events, **expect)
    app.router.add_get("/api/openapi.json", openapi, **expect)
    app.router.add_get("/metrics", metrics, **expect)
    app.router.add_get("/healthz", healthz, **expect)
    # Last: every other path, so that no request meets aiohttp's own Expect handling.
    app.router.add_route("*", r"/{tail:[\s\S]*}", no_route, **expect)
    return app
