"""The dashboard (GET /) in a real headless Chromium, driven by Playwright's async API.

The gateway, a simulated device and the browser driver all run on the test's event loop:
"hall" is a DeviceSimulator, "garage" points at a port that is bound but never listens (so
it stays offline and its commands stay queued). Needs Debian's ``chromium`` and the
``playwright`` package (its own browser downloads are not used); skipped without them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keeplink.gateway.config import parse_config
from keeplink.gateway.server import Server
from keeplink.testing import DeviceSimulator

try:
    from playwright.async_api import Locator, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip(
        "playwright is not installed (pip install 'playwright>=1.45'; its browser downloads "
        "are not needed, Debian's chromium is used)",
        allow_module_level=True,
    )

CHROMIUM = os.environ.get("KEEPLINK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "dash-test-token-0123"
WAIT_MS = 10_000
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

if shutil.which(CHROMIUM) is None:  # pragma: no cover - depends on the machine
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or set KEEPLINK_CHROMIUM)",
        allow_module_level=True,
    )


@dataclass
class Rig:
    server: Server
    hall: DeviceSimulator
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.server.url

    async def submit(self, device: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(
            f"{self.url}/api/devices/{device}/commands",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as response:
            assert response.status == 202, await response.text()
            answer: dict[str, Any] = await response.json()
            return answer

    async def command(self, command_id: str) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/api/commands/{command_id}") as response:
            assert response.status == 200, await response.text()
            answer: dict[str, Any] = await response.json()
            return answer


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    hall = DeviceSimulator(device_id="hall")
    await hall.start()
    # Bound but never listening: every connect is refused at once, and no one else can take
    # the port while the test runs.
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    config = parse_config(
        {
            "gateway": {"listen": "127.0.0.1:0", "store": "memory:", "token": TOKEN},
            "devices": [
                {
                    "id": "hall",
                    "driver": "jsonline",
                    "port": hall.port,
                    "backoff": {"initial_s": 0.1, "cap_s": 0.5},
                },
                {
                    "id": "garage",
                    "driver": "jsonline",
                    "port": dead.getsockname()[1],
                    "backoff": {"initial_s": 5, "cap_s": 5},
                },
            ],
        },
        source="test_dashboard",
    )
    server = Server(config, token=TOKEN)
    try:
        await server.start()
        async with aiohttp.ClientSession() as http:
            yield Rig(server=server, hall=hall, http=http)
    finally:
        await server.stop()
        await hall.stop()
        dead.close()


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 800},
            service_workers="block",
        )
        try:
            context.set_default_timeout(WAIT_MS)
            page = context.pages[0] if context.pages else await context.new_page()
            yield page
        finally:
            await context.close()


def device_cell(page: Page, device: str, cell: str) -> Locator:
    return page.locator(f'tr[data-device="{device}"] .{cell}')


def command_cell(page: Page, command_id: str, cell: str) -> Locator:
    return page.locator(f'tr[data-command="{command_id}"] .{cell}')


async def test_dashboard_live(rig: Rig, page: Page, tmp_path: Path) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    external: list[str] = []
    # the page must work offline: every request it makes goes to the gateway
    page.on("request", lambda r: None if r.url.startswith(rig.url) else external.append(r.url))

    # 1. the page loads; hall is connected, garage keeps failing
    await page.goto(rig.url + "/")
    await expect(page.locator("#ws-status")).to_have_attribute(
        "data-state", "live", timeout=WAIT_MS
    )
    await expect(device_cell(page, "hall", "link-state")).to_have_text("connected", timeout=WAIT_MS)
    await expect(device_cell(page, "hall", "presence")).to_have_text("online", timeout=WAIT_MS)
    await expect(device_cell(page, "garage", "link-state")).to_have_text("backoff", timeout=WAIT_MS)
    await expect(device_cell(page, "garage", "error")).not_to_have_text("—", timeout=WAIT_MS)
    await expect(device_cell(page, "hall", "driver")).to_have_text("jsonline")
    await page.evaluate("window.__notReloaded = true")

    # 2. the device goes away and comes back: the row follows live, without a reload
    await rig.hall.stop()
    await expect(device_cell(page, "hall", "link-state")).to_have_text(
        re.compile("^(lost|backoff)$"), timeout=WAIT_MS
    )
    await expect(device_cell(page, "hall", "error").locator("code")).not_to_be_empty()
    await expect(device_cell(page, "hall", "presence")).to_have_text("offline", timeout=WAIT_MS)
    await rig.hall.start()
    await expect(device_cell(page, "hall", "link-state")).to_have_text("connected", timeout=WAIT_MS)
    await expect(device_cell(page, "hall", "presence")).to_have_text("online", timeout=WAIT_MS)
    assert await page.evaluate("window.__notReloaded === true")

    # the event stream drops: the page reconnects, asking for what it missed
    before = await page.evaluate("window.keeplinkDashboard.lastSeq")
    assert isinstance(before, int)
    assert before > 0
    async with page.expect_websocket(timeout=WAIT_MS) as reconnected:
        status = await page.evaluate(
            "window.keeplinkDashboard.dropSocket(),"
            " document.getElementById('ws-status').dataset.state"
        )
        assert status == "reconnecting"
    since = re.search(r"[?&]since=(\d+)", (await reconnected.value).url)
    assert since is not None
    assert int(since.group(1)) >= before
    await expect(page.locator("#ws-status")).to_have_attribute(
        "data-state", "live", timeout=WAIT_MS
    )

    # 3. a command for the absent garage: queued; cancel needs the token
    submitted = await rig.submit("garage", {"op": "set", "args": {"door": "closed"}})
    command_id = submitted["id"]
    assert submitted["state"] == "queued"
    await expect(command_cell(page, command_id, "state")).to_have_text("queued", timeout=WAIT_MS)
    await expect(command_cell(page, command_id, "attempts")).to_have_text("0/3")
    await expect(device_cell(page, "garage", "queued")).to_have_text("1", timeout=WAIT_MS)
    cancel = page.locator(f'button.cancel[data-command="{command_id}"]')

    await page.fill("#token", "not-the-token")
    await cancel.click()
    await expect(page.locator("#write-error")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#write-error")).to_contain_text("auth_failed")
    await expect(page.locator("#write-error")).to_contain_text("the bearer token is not valid")
    await expect(command_cell(page, command_id, "state")).to_have_text("queued")

    await page.fill("#token", TOKEN)
    await cancel.click()
    await expect(command_cell(page, command_id, "state")).to_have_text("cancelled", timeout=WAIT_MS)
    await expect(cancel).to_have_count(0)
    await expect(page.locator("#write-error")).to_be_hidden()
    await expect(device_cell(page, "garage", "queued")).to_have_text("0", timeout=WAIT_MS)
    assert (await rig.command(command_id))["state"] == "cancelled"
    assert await page.evaluate("sessionStorage.getItem('keeplink.token')") == TOKEN
    assert await page.evaluate("localStorage.getItem('keeplink.token')") is None

    # a firmware transfer to hall shows its progress bar; a second garage command waits
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(48 * 1024))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    firmware = await rig.submit(
        "hall", {"op": "firmware", "args": {"path": str(image), "sha256": digest}}
    )
    firmware_id = firmware["id"]
    await expect(command_cell(page, firmware_id, "state")).to_have_text(
        "succeeded", timeout=WAIT_MS
    )
    await expect(command_cell(page, firmware_id, "progress")).to_have_attribute(
        "data-percent", "100.0", timeout=WAIT_MS
    )
    assert await command_cell(page, firmware_id, "progress").locator("progress").count() == 1
    waiting = await rig.submit("garage", {"op": "set", "args": {"light": "on"}})
    await expect(command_cell(page, waiting["id"], "state")).to_have_text("queued", timeout=WAIT_MS)
    # newest first
    first = page.locator("#commands-body tr[data-command]").first
    await expect(first).to_have_attribute("data-command", waiting["id"])

    await expect(device_cell(page, "garage", "queued")).to_have_text("1", timeout=WAIT_MS)

    # 4. a screenshot for people to look at
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(
        path=str(ARTIFACTS / "dashboard.png"), full_page=True, animations="disabled"
    )

    assert errors == [], errors
    assert external == [], external
