"""How GET / serves the dashboard page (no browser needed): compressed when the client
takes gzip, under a CSP that allows exactly its own inline script and style."""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from keeplink.gateway.config import parse_config
from keeplink.gateway.pages import takes_gzip
from keeplink.gateway.server import Server

TOKEN = "dash-serving-token-0123"


@pytest.fixture
async def url() -> AsyncIterator[str]:
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "store": "memory:", "token": TOKEN},
            "devices": [{"id": "attic", "driver": "jsonline", "port": dead.getsockname()[1]}],
        },
        source="test_dashboard_serving",
    )
    server = Server(config, token=TOKEN)
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()
        dead.close()


async def fetch(url: str, accept: str) -> tuple[dict[str, str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(url + "/", headers={"Accept-Encoding": accept}) as response:
            assert response.status == 200
            return dict(response.headers), await response.read()


async def test_the_page_is_gzipped_for_clients_that_take_it(url: str) -> None:
    headers, body = await fetch(url, "gzip, deflate")
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Vary"] == "Accept-Encoding"
    page = gzip.decompress(body)
    assert len(body) < len(page) / 3
    plain_headers, plain = await fetch(url, "identity")
    assert "Content-Encoding" not in plain_headers
    assert plain == page
    assert plain_headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == plain_headers["Content-Security-Policy"]


async def test_the_csp_allows_exactly_the_pages_inline_blocks(url: str) -> None:
    headers, body = await fetch(url, "identity")
    page = body.decode()
    csp = headers["Content-Security-Policy"]
    for kind in ("script", "style"):
        blocks = re.findall(rf"<{kind}>(.*?)</{kind}>", page, flags=re.S)
        assert len(blocks) == 1, kind
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}';" in csp
    assert "unsafe-inline" not in csp
    # no external URL anywhere in it: it works offline, and the CSP would refuse one
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "style=" not in page  # inline style attributes would need unsafe-inline


@pytest.mark.parametrize(
    ("header", "takes"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("br;q=1.0, gzip;q=0.8", True),
        ("GZIP", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0.0, identity", False),
        ("gzip;q=x", False),
        ("identity", False),
        ("", False),
        ("deflate", False),
    ],
)
def test_accept_encoding_is_read_with_its_q_values(header: str, takes: bool) -> None:
    assert takes_gzip(header) is takes
