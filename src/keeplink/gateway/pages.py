"""The pages the gateway serves besides the JSON API: the dashboard (one self-contained
HTML file, gzipped once, its inline blocks allowed by hash in a strict CSP) and the OpenAPI
document generated from :mod:`keeplink.gateway.models`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
from importlib import resources
from typing import Final

from aiohttp import web

from keeplink.gateway import schema

__all__ = ["dashboard", "openapi", "takes_gzip"]


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
_PAGE_CSP: Final = (
    "default-src 'none'; "
    f"script-src {_hash_source('script', _DASHBOARD)}; "
    f"style-src {_hash_source('style', _DASHBOARD)}; "
    "connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


_OPENAPI: Final = schema.openapi()


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(_OPENAPI)


def takes_gzip(header: str) -> bool:
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
    if takes_gzip(request.headers.get("Accept-Encoding", "")):
        response = web.Response(body=_DASHBOARD_GZIP, content_type="text/html", charset="utf-8")
        response.headers["Content-Encoding"] = "gzip"
    else:
        response = web.Response(text=_DASHBOARD, content_type="text/html")
    response.headers["Vary"] = "Accept-Encoding"
    response.headers["Content-Security-Policy"] = _PAGE_CSP
    return response
