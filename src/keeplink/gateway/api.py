"""The gateway's HTTP and WebSocket API, on aiohttp.

Errors are always ``{"code": "<ErrorCode>", "message": "…"}`` with a fitting status. Writes
need ``Authorization: Bearer TOKEN`` (compared in constant time); reads do not. The OpenAPI
schema is served at ``/api/openapi.json``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keeplink import __version__
from keeplink._core.commands import CommandState
from keeplink._core.dispatch import WaitReason
from keeplink._core.errors import (
    AuthError,
    ErrorCode,
    InvalidRequestError,
    KeeplinkError,
)
from keeplink.gateway.metrics import DeviceCounters
from keeplink.gateway.runtime import Gateway

__all__ = ["build_app"]

_log = logging.getLogger("keeplink.gateway.api")

STATUS_OF_CODE: Final[dict[str, int]] = {
    ErrorCode.DEVICE_NOT_FOUND.value: 404,
    ErrorCode.COMMAND_NOT_FOUND.value: 404,
    ErrorCode.INVALID_REQUEST.value: 422,
    ErrorCode.AUTH_FAILED.value: 401,
    ErrorCode.CONFLICT.value: 409,
    ErrorCode.LINK_CLOSED.value: 503,
    ErrorCode.DEVICE_UNAVAILABLE.value: 503,
    ErrorCode.STORE_UNAVAILABLE.value: 503,
}
MAX_BODY: Final = 256 * 1024
SUBMIT_FIELDS: Final = frozenset(
    {"op", "args", "key", "ttl_s", "max_attempts", "idempotency_key", "priority"}
)

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
TOKEN_KEY: web.AppKey[str] = web.AppKey("token", str)
METRICS_KEY: web.AppKey[_Metrics] = web.AppKey("metrics")
SOCKETS_KEY: web.AppKey[set[Any]] = web.AppKey("sockets")  # of WebSocketResponse


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


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
        return _error(status, exc.wire_code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = ErrorCode.INVALID_REQUEST.value
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        elif exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = exc.reason
        return _error(exc.status, code, message)
    except Exception:  # noqa: BLE001 - see below
        # Deliberately broad: a bug must answer as a typed 500, never a stack dump, and be
        # visible in the log with its traceback.
        _log.exception("gateway: unexpected error on %s %s", request.method, request.path)
        return _error(500, ErrorCode.UNKNOWN.value, "internal error; see the gateway log")


def _authorize(request: web.Request) -> None:
    expected = request.app[TOKEN_KEY]
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthError("this endpoint needs Authorization: Bearer <token>")
    if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        raise AuthError("the bearer token is not valid")


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InvalidRequestError(f"body too large ({request.content_length} > {MAX_BODY} bytes)")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise InvalidRequestError(f"body too large (> {MAX_BODY} bytes)")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(reason=f"malformed JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    return body


def _decimal(text: str) -> bool:
    """A plain decimal number: ASCII digits, not too many of them."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ---------------------------------------------------------------------------- handlers


async def list_devices(request: web.Request) -> web.Response:
    return web.json_response({"devices": await request.app[GATEWAY_KEY].devices_view()})


async def get_device(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    return web.json_response(await gateway.device_view(request.match_info["device"]))


async def submit_command(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY_KEY]
    device_id = request.match_info["device"]
    gateway.device(device_id)  # 404 before looking at the body
    body = await _json_body(request)
    unknown = sorted(set(body) - SUBMIT_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown field {unknown[0]!r}; allowed: {sorted(SUBMIT_FIELDS)}")
    op, args = body.get("op"), body.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise InvalidRequestError("args must be a JSON object")
    key = body.get("key")
    ttl = body.get("ttl_s")
    if ttl is not None and (
        isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl)
    ):
        raise InvalidRequestError(f"ttl_s must be a number of seconds, got {ttl!r}")
    link = gateway.links[device_id]
    if not isinstance(op, str) or not op:
        raise InvalidRequestError(f"op must be a non-empty string, got {op!r}")
    args = gateway.command_args(device_id, args)
    # The device's driver validates op and args now, so a bad command fails at once (422)
    # rather than being stored and failing on delivery.
    link.driver.build_request(0, op, args, body.get("idempotency_key"))
    command = await gateway.outbox.submit(
        device_id,
        op,
        args,
        key=key,
        ttl_s=ttl,
        max_attempts=body.get("max_attempts", 3),
        priority=body.get("priority", 0),
        idempotency_key=body.get("idempotency_key"),
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
    return web.json_response(
        {"command": gateway.command_json(command), "device_presence": presence, "note": note},
        status=202,
    )


async def reconnect_device(request: web.Request) -> web.Response:
    """Make a failed or backing-off link try again now (202 with what was done)."""
    _authorize(request)
    answer = await request.app[GATEWAY_KEY].reconnect(request.match_info["device"])
    return web.json_response(answer, status=202)


async def list_commands(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    device = request.query.get("device")
    if device is not None:
        gateway.device(device)
    states = None
    if "state" in request.query:
        try:
            states = [CommandState(s) for s in request.query["state"].split(",")]
        except ValueError:
            known = [s.value for s in CommandState]
            raise InvalidRequestError(
                f"state must be one of {known}, got {request.query['state']!r}"
            ) from None
    limit_text = request.query.get("limit", "100")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not _decimal(limit_text) or not 1 <= int(limit_text) <= 10_000:
        raise InvalidRequestError(f"limit must be an integer in 1..10000, got {limit_text!r}")
    limit = int(limit_text)
    order = request.query.get("order", "oldest")
    if order not in ("oldest", "newest"):
        raise InvalidRequestError(f"order must be oldest or newest, got {order!r}")
    commands = await gateway.outbox.list(
        device=device, states=states, limit=limit, newest=order == "newest"
    )
    return web.json_response({"commands": [gateway.command_json(c) for c in commands]})


async def get_command(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    command = await gateway.outbox.get(request.match_info["command"])
    return web.json_response(gateway.command_json(command))


async def cancel_command(request: web.Request) -> web.Response:
    _authorize(request)
    gateway = request.app[GATEWAY_KEY]
    command = await gateway.outbox.cancel(request.match_info["command"])
    return web.json_response(gateway.command_json(command))


async def events(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY_KEY]
    since_text = request.query.get("since", "")
    since = int(since_text) if _decimal(since_text) else None
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    request.app[SOCKETS_KEY].add(ws)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)

    def push(event: dict[str, Any]) -> None:
        if queue.full():
            queue.get_nowait()  # a client this slow loses the oldest, never blocks delivery
        queue.put_nowait(event)

    if since is not None:
        for event in gateway.backlog(since):
            push(event)
    unlisten = gateway.listen(push)
    reader = asyncio.get_running_loop().create_task(
        _drain_client(ws), name="keeplink.api.ws-reader"
    )
    try:
        while not ws.closed and not reader.done():
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            await ws.send_str(json.dumps(getter.result()))
    except (ConnectionResetError, RuntimeError):
        pass  # the client went away mid-send
    finally:
        unlisten()
        request.app[SOCKETS_KEY].discard(ws)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
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
    return web.json_response(body)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


async def dashboard(request: web.Request) -> web.Response:
    page = resources.files("keeplink.gateway").joinpath("dashboard.html").read_text("utf-8")
    return web.Response(text=page, content_type="text/html")


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
        self.delivered = Counter(
            "keeplink_delivered_total", "Commands acknowledged", registry=self.registry
        )
        self.registry.register(DeviceCounters(gateway))
        gateway.on_delivered = self._observe

    def _observe(self, latency: float) -> None:
        self.latency.observe(max(latency, 0.0))
        self.delivered.inc()

    async def render(self, gateway: Gateway) -> bytes:
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
    body = await request.app[METRICS_KEY].render(request.app[GATEWAY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(gateway: Gateway, *, token: str) -> web.Application:
    """The aiohttp application for a started Gateway."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[GATEWAY_KEY] = gateway
    app[TOKEN_KEY] = token
    app[METRICS_KEY] = _Metrics(gateway)
    sockets: set[Any] = set()
    app[SOCKETS_KEY] = sockets
    app.on_shutdown.append(_close_sockets)
    app.router.add_get("/", dashboard)
    app.router.add_get("/api/devices", list_devices)
    app.router.add_get("/api/devices/{device}", get_device)
    app.router.add_post("/api/devices/{device}/commands", submit_command)
    app.router.add_post("/api/devices/{device}/reconnect", reconnect_device)
    app.router.add_get("/api/commands", list_commands)
    app.router.add_get("/api/commands/{command}", get_command)
    app.router.add_delete("/api/commands/{command}", cancel_command)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/openapi.json", openapi)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


_ERROR = {"$ref": "#/components/schemas/Error"}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.0.3",
    "info": {"title": "keeplink gateway", "version": __version__},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
            "Command": {
                "type": "object",
                "required": ["id", "device", "op", "state", "attempts"],
                "properties": {
                    "id": {"type": "string"},
                    "device": {"type": "string"},
                    "op": {"type": "string"},
                    "args": {"type": "object"},
                    "state": {"type": "string", "enum": [s.value for s in CommandState]},
                    "attempts": {"type": "integer"},
                    "max_attempts": {"type": "integer"},
                    "last_error": {"nullable": True, "allOf": [_ERROR]},
                    "waiting": {
                        "nullable": True,
                        "allOf": [{"$ref": "#/components/schemas/Waiting"}],
                    },
                },
            },
            "Waiting": {
                "type": "object",
                "description": (
                    "Why a queued command is not going out now; null while it is about to "
                    "go or is not queued"
                ),
                "required": ["reason", "message"],
                "properties": {
                    "reason": {"type": "string", "enum": [r.value for r in WaitReason]},
                    "message": {"type": "string"},
                    "until": {
                        "type": "number",
                        "nullable": True,
                        "description": "epoch seconds when it is looked at again",
                    },
                    "command": {
                        "type": "string",
                        "nullable": True,
                        "description": "the command it waits for (behind) or is about",
                    },
                },
            },
            "Submit": {
                "type": "object",
                "required": ["op"],
                "additionalProperties": False,
                "properties": {
                    "op": {"type": "string", "minLength": 1},
                    "args": {"type": "object"},
                    "key": {"type": "string", "minLength": 1},
                    "ttl_s": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "idempotency_key": {"type": "string", "minLength": 1},
                    "priority": {"type": "integer"},
                },
            },
        },
    },
    "paths": {
        "/api/devices": {
            "get": {"summary": "All devices", "responses": {"200": {"description": "devices"}}}
        },
        "/api/devices/{device}": {
            "parameters": [
                {"name": "device", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": {
                "summary": "One device: presence, link state, last error, queued count",
                "responses": {"200": {"description": "the device"}, "404": _err("unknown device")},
            },
        },
        "/api/devices/{device}/commands": {
            "parameters": [
                {"name": "device", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "post": {
                "summary": "Submit a durable command",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Submit"}}
                    },
                },
                "responses": {
                    "202": {"description": "stored; queued when the device is away"},
                    "400": _err("malformed JSON"),
                    "401": _err("missing or bad token"),
                    "404": _err("unknown device"),
                    "422": _err("invalid op or args"),
                },
            },
        },
        "/api/devices/{device}/reconnect": {
            "parameters": [
                {"name": "device", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "post": {
                "summary": "Make a failed or backing-off link try again now",
                "description": (
                    "A failed link (auth_failed, device_mismatch) starts again; a link waiting "
                    "out a backoff skips the rest of the wait; a connected or connecting link "
                    "is left alone. No request body."
                ),
                "security": [{"bearer": []}],
                "responses": {
                    "202": {
                        "description": "what was done, and the device view afterwards",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["reconnect", "note", "device"],
                                    "properties": {
                                        "reconnect": {
                                            "type": "string",
                                            "enum": ["started", "woken", "none"],
                                        },
                                        "note": {"type": "string"},
                                        "device": {"type": "object"},
                                    },
                                }
                            }
                        },
                    },
                    "401": _err("missing or bad token"),
                    "404": _err("unknown device"),
                    "409": _err("another node of the fleet owns the device"),
                },
            },
        },
        "/api/commands": {
            "get": {
                "summary": "Commands, oldest first (order=newest for newest first)",
                "parameters": [
                    {
                        "name": "order",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["oldest", "newest"]},
                    },
                    {"name": "device", "in": "query", "schema": {"type": "string"}},
                    {"name": "state", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                    },
                ],
                "responses": {
                    "200": {"description": "commands"},
                    "404": _err("unknown device"),
                    "422": _err("bad filter"),
                },
            }
        },
        "/api/commands/{command}": {
            "parameters": [
                {"name": "command", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": {
                "summary": "One command",
                "responses": {
                    "200": {
                        "description": "the command",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Command"}}
                        },
                    },
                    "404": _err("unknown command"),
                },
            },
            "delete": {
                "summary": "Cancel a queued or in-flight command",
                "security": [{"bearer": []}],
                "responses": {
                    "200": {"description": "the cancelled command"},
                    "401": _err("missing or bad token"),
                    "404": _err("unknown command"),
                    "409": _err("the command is already final"),
                },
            },
        },
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
    },
}
