"""The API's edge: typed error answers, the ``Host`` check against DNS rebinding, the
browser hardening headers, bearer-token authorization, and bounded, validated bodies and
query parameters.

Errors are always ``{"code": "<ErrorCode>", "message": "…"}`` with a fitting status; client
errors are logged at DEBUG, at most a line a second.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import pydantic_core
from aiohttp import web
from pydantic import BaseModel, ValidationError

from keeplink._core.errors import (
    AuthError,
    ErrorCode,
    ErrorInfo,
    InvalidRequestError,
    KeeplinkError,
)
from keeplink.gateway import models
from keeplink.gateway.listener import RateLimit
from keeplink.gateway.runtime import Gateway

__all__ = [
    "GATEWAY_KEY",
    "MAX_BODY",
    "STATUS_OF_CODE",
    "TOKEN_KEY",
    "answer",
    "authorize",
    "authorize_read",
    "edge_middleware",
    "errors_middleware",
    "expect_continue",
    "hardening",
    "host_name",
    "json_error",
    "no_route",
    "parse_body",
    "parse_query",
]

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

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
TOKEN_KEY: web.AppKey[str] = web.AppKey("token", str)

_M = TypeVar("_M", bound=BaseModel)


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(ErrorInfo(code=code, message=message).to_wire(), status=status)


def answer(model: type[BaseModel], value: Any, *, status: int = 200) -> web.Response:
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
async def errors_middleware(
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
        return json_error(status, exc.wire_code, exc.message)
    except _ClientGone as exc:
        _quiet(request, exc.status, exc.message)
        response = json_error(exc.status, ErrorCode.INVALID_REQUEST.value, exc.message)
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
        return json_error(exc.status, code, message)
    except Exception:  # noqa: BLE001 - see below
        # Deliberately broad: a bug must answer as a typed 500, never a stack dump, and be
        # visible in the log with its traceback.
        _log.exception("gateway: unexpected error on %s %s", request.method, request.path)
        return json_error(500, ErrorCode.UNKNOWN.value, "internal error; see the gateway log")


# ---------------------------------------------------------------------------- the edge


def host_name(header: str) -> str | None:
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
async def edge_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    allowed = request.app[GATEWAY_KEY].config.allowed_hosts
    host = request.headers.get("Host")
    if host is None or not _host_allowed(host_name(host), allowed):
        raise web.HTTPMisdirectedRequest(
            reason=f"this gateway does not answer for host {host!r} "
            "(IP addresses, localhost and gateway.allowed_hosts only)"
        )
    return await handler(request)


_API_CSP: Final = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'"


async def hardening(request: web.Request, response: web.StreamResponse) -> None:
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


def authorize(request: web.Request) -> None:
    presented = _presented(request)
    if presented is None:
        raise AuthError("this endpoint needs Authorization: Bearer <token>")
    if not _matches(presented, request.app[TOKEN_KEY]):
        raise AuthError("the bearer token is not valid")


def authorize_read(request: web.Request, *, query: bool = False) -> None:
    """Reads are open unless the gateway has a read_token; then that or the write token."""
    read_token = request.app[GATEWAY_KEY].config.read_token
    if read_token is None:
        return
    presented = _presented(request, query=query)
    if presented is None:
        raise AuthError("reads need Authorization: Bearer <read token> on this gateway")
    if not (_matches(presented, read_token) or _matches(presented, request.app[TOKEN_KEY])):
        raise AuthError("the bearer token is not valid")


def parse_query(request: web.Request, model: type[_M]) -> _M:
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


async def parse_body(request: web.Request, model: type[_M]) -> _M:
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


async def no_route(request: web.Request) -> web.StreamResponse:
    """404 for a path no route has; 405 (with Allow) for a method a route does not take."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        response = json_error(
            405,
            ErrorCode.INVALID_REQUEST.value,
            f"method {request.method} not allowed on {request.path}",
        )
        response.headers["Allow"] = ",".join(sorted(allowed))
        return response
    return json_error(
        404, ErrorCode.INVALID_REQUEST.value, f"no such endpoint: {request.method} {request.path}"
    )


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` is answered; any other expectation is a JSON 417 (aiohttp's
    own handler would echo the header into a plain-text answer, and fail on a non-ASCII one)."""
    expect = request.headers.get("Expect", "")
    if expect.isascii() and expect.strip().lower() == "100-continue":
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return None
    return json_error(
        417, ErrorCode.INVALID_REQUEST.value, "only Expect: 100-continue is understood"
    )
