"""The dashboard (GET /) in a real headless Chromium, driven by Playwright's async API.

The gateway, a simulated device behind a fault proxy and the browser driver all run on the
test's event loop: "hall" is a DeviceSimulator reached through a FaultProxy (so a test can
cut it off and let it back), "garage" points at a port that is bound but never listens (so
it stays offline and its commands stay queued). Needs Debian's ``chromium`` and the
``playwright`` package (its own browser downloads are not used); skipped without them.

Screenshots are written to ``artifacts/`` on every run; with ``KEEPLINK_SCREENSHOTS=1``
they are also copied to ``docs/`` (``dashboard.png``, ``dashboard-device.png``,
``dashboard-narrow.png``), the pictures the docs show.
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
from keeplink.testing import DeviceSimulator, FaultProxy

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
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
DOCS = ROOT / "docs"

if shutil.which(CHROMIUM) is None:  # pragma: no cover - depends on the machine
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or set KEEPLINK_CHROMIUM)",
        allow_module_level=True,
    )


def command_id_of(answer: dict[str, Any]) -> str:
    """A submit's answer names the command at the top level, or (older) under "command"."""
    command = answer.get("command", answer)
    command_id: str = command["id"]
    return command_id


@dataclass
class Rig:
    server: Server
    hall: DeviceSimulator
    proxy: FaultProxy
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
    hall = DeviceSimulator(device_id="hall", fw="2.4.1")
    await hall.start()
    proxy = FaultProxy("127.0.0.1", hall.port, name="hall-proxy")
    await proxy.start()
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
                    "port": proxy.port,
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
            yield Rig(server=server, hall=hall, proxy=proxy, http=http)
    finally:
        await server.stop()
        await proxy.stop()
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
            locale="en-GB",
            color_scheme="light",
        )
        try:
            context.set_default_timeout(WAIT_MS)
            page = context.pages[0] if context.pages else await context.new_page()
            yield page
        finally:
            await context.close()


def device_cell(page: Page, device: str, cell: str) -> Locator:
    return page.locator(f'#devices tr[data-device="{device}"] .{cell}')


def command_cell(page: Page, command_id: str, cell: str) -> Locator:
    return page.locator(f'#commands tr[data-command="{command_id}"] .{cell}')


def strip(page: Page, device: str, kind: str) -> Locator:
    return page.locator(f'.timeline-row[data-device="{device}"] svg.strip[data-kind="{kind}"]')


async def screenshot(page: Page, name: str) -> None:
    """Into artifacts/ always; into docs/ too when KEEPLINK_SCREENSHOTS=1."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True, animations="disabled")
    if os.environ.get("KEEPLINK_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / name)


def watch(page: Page, rig: Rig) -> tuple[list[str], list[str]]:
    """Page errors and console errors (but the 401s the tests provoke), and requests that
    went anywhere but the gateway (the page must work offline)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def console(message: Any) -> None:
        if message.type == "error" and "401 (Unauthorized)" not in message.text:
            errors.append(message.text)

    page.on("console", console)
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(rig.url) else external.append(r.url))
    return errors, external


# A drop and its recovery: the link leaves connected for lost/backoff, then connects again.
DROP_AND_BACK = re.compile(r"connected,(lost|backoff)(,[a-z]+)*,connected$")


async def test_dashboard_live(rig: Rig, page: Page, tmp_path: Path) -> None:
    errors, external = watch(page, rig)

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
    await expect(page.locator("#tile-online .tile-value")).to_have_text("1 of 2")
    await expect(strip(page, "hall", "link")).to_have_attribute(
        "data-now", "connected", timeout=WAIT_MS
    )
    await expect(strip(page, "garage", "link")).to_have_attribute("data-now", "backoff")
    await expect(
        page.locator('.timeline-row[data-device="garage"] .strip-summary')
    ).to_contain_text("not connected")
    await page.evaluate("window.__notReloaded = true")
    await page.get_by_text("10 min", exact=True).first.click()  # the window picker

    # 2. the fault proxy cuts hall off, then lets it back: the row follows live, and the
    # timeline shows the outage and the recovery, without a reload
    rig.proxy.set_down()
    await expect(device_cell(page, "hall", "link-state")).to_have_text(
        re.compile("^(lost|backoff)$"), timeout=WAIT_MS
    )
    await expect(device_cell(page, "hall", "error").locator("code")).not_to_be_empty()
    await expect(device_cell(page, "hall", "presence")).to_have_text("offline", timeout=WAIT_MS)
    link_strip = strip(page, "hall", "link")
    await expect(link_strip).to_have_attribute(
        "data-states", re.compile(r"connected,(lost|backoff)"), timeout=WAIT_MS
    )
    await expect(link_strip.locator('rect.seg[data-state="backoff"]')).not_to_have_count(0)
    await expect(strip(page, "hall", "presence")).to_have_attribute(
        "data-now", "offline", timeout=WAIT_MS
    )
    rig.proxy.set_down(False)
    await expect(device_cell(page, "hall", "link-state")).to_have_text("connected", timeout=WAIT_MS)
    await expect(device_cell(page, "hall", "presence")).to_have_text("online", timeout=WAIT_MS)
    await expect(link_strip).to_have_attribute("data-states", DROP_AND_BACK, timeout=WAIT_MS)
    await expect(strip(page, "hall", "presence")).to_have_attribute(
        "data-states", re.compile(r"online,offline,online$"), timeout=WAIT_MS
    )
    summary = page.locator('.timeline-row[data-device="hall"] .strip-summary')
    await expect(summary).to_have_attribute("data-drops", "1", timeout=WAIT_MS)
    await expect(summary).to_contain_text(re.compile(r"1 drop, down \d"))
    await expect(page.locator("#tile-drops .tile-value")).to_have_text("1")
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

    # 3. a command for the absent garage: queued; cancel needs the token, asked for
    submitted = await rig.submit("garage", {"op": "set", "args": {"door": "closed"}})
    command_id = command_id_of(submitted)
    assert (await rig.command(command_id))["state"] == "queued"
    await expect(command_cell(page, command_id, "state")).to_have_text("queued", timeout=WAIT_MS)
    await expect(command_cell(page, command_id, "attempts")).to_have_text("0/3")
    await expect(device_cell(page, "garage", "queued")).to_have_text("1", timeout=WAIT_MS)
    cancel = page.locator(f'#commands button.cancel[data-command="{command_id}"]')

    await cancel.click()  # no token yet: the page asks for it
    await expect(page.locator("#write-error")).to_contain_text("token_needed")
    await expect(page.locator("#token")).to_be_focused()

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
    # the token lives in the page's memory only: in no storage
    storage = "[sessionStorage.length, localStorage.length]"
    assert await page.evaluate(storage) == [0, 0]

    # a firmware transfer to hall shows its progress bar; a second garage command waits
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(48 * 1024))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    firmware = await rig.submit(
        "hall", {"op": "firmware", "args": {"path": str(image), "sha256": digest}}
    )
    firmware_id = command_id_of(firmware)
    await expect(command_cell(page, firmware_id, "state")).to_have_text(
        "succeeded", timeout=WAIT_MS
    )
    await expect(command_cell(page, firmware_id, "progress")).to_have_attribute(
        "data-percent", "100.0", timeout=WAIT_MS
    )
    assert await command_cell(page, firmware_id, "progress").locator("progress").count() == 1
    for n in range(3):
        waiting = await rig.submit("garage", {"op": "set", "args": {"light": n}})
    await expect(command_cell(page, command_id_of(waiting), "state")).to_have_text(
        "queued", timeout=WAIT_MS
    )
    # newest first
    first = page.locator("#commands-body tr[data-command]").first
    await expect(first).to_have_attribute("data-command", command_id_of(waiting))
    await expect(device_cell(page, "garage", "queued")).to_have_text("3", timeout=WAIT_MS)
    await expect(page.locator("#tile-queued .tile-value")).to_have_text("3")

    # 4. a screenshot for people to look at: the timelines since the gateway started
    await page.get_by_text("since start", exact=True).first.click()
    await expect(link_strip).to_have_attribute("data-states", re.compile(r"^idle,connecting,"))
    await screenshot(page, "dashboard.png")

    # a reload forgets the token
    await page.reload()
    await expect(page.locator("#ws-status")).to_have_attribute("data-state", "live")
    assert await page.input_value("#token") == ""
    assert await page.evaluate(storage) == [0, 0]

    assert errors == [], errors
    assert external == [], external


async def test_device_page(rig: Rig, page: Page) -> None:
    errors, external = watch(page, rig)
    await page.goto(rig.url + "/")
    await expect(device_cell(page, "hall", "link-state")).to_have_text("connected", timeout=WAIT_MS)
    # some history: a short cut, a few commands for hall, a protocol error
    rig.proxy.set_down()
    await expect(device_cell(page, "hall", "link-state")).to_have_text(
        re.compile("^(lost|backoff)$"), timeout=WAIT_MS
    )
    rig.proxy.set_down(False)
    await expect(device_cell(page, "hall", "link-state")).to_have_text("connected", timeout=WAIT_MS)
    for n in range(2):
        await rig.submit("hall", {"op": "set", "args": {"fan": n}})
    failing = await rig.submit("hall", {"op": "fail", "args": {"code": "busy"}})
    assert await rig.hall.send_raw(b"\x00\x01garbage, not a frame\n") == 1

    # the device page, by its link in the table
    await page.locator('#devices tr[data-device="hall"] a').click()
    await expect(page).to_have_url(re.compile(r"#/devices/hall$"))
    view = page.locator("#view-device")
    await expect(view).to_be_visible()
    await expect(page.locator("#view-overview")).to_be_hidden()
    await expect(page.locator("#device-title")).to_have_text("hall")
    await expect(page.locator("#device-title")).to_be_focused()
    assert await page.title() == "hall · keeplink gateway"
    facts = page.locator("#device-facts")
    await expect(facts.locator(".link-state")).to_have_text("connected")
    await expect(facts).to_contain_text("2.4.1")  # the firmware the simulator reports

    # the protocol error the simulator's babble caused: counted, and in the last errors
    await expect(page.locator("#device-counters")).to_contain_text("1 protocol error")
    protocol = page.locator('#device-errors li[data-source="protocol"]')
    await expect(protocol.locator(".code")).to_have_text("protocol_error", timeout=WAIT_MS)
    await expect(protocol).to_contain_text("garbage, not a frame")
    await expect(page.locator('#device-errors li[data-source="link"]').first).to_contain_text(
        "connection_failed"
    )
    command_error = page.locator('#device-errors li[data-source="command"]')
    await expect(command_error.locator(".code")).to_have_text("busy", timeout=WAIT_MS)
    await expect(command_error).to_contain_text(command_id_of(failing)[:8])

    # the timeline and the charts
    device_strip = page.locator('#device-timeline svg.strip[data-kind="link"]')
    await expect(device_strip).to_have_attribute("data-states", DROP_AND_BACK, timeout=WAIT_MS)
    await expect(page.locator("#device-outages li")).to_have_count(1)
    await expect(page.locator("#device-outages li")).to_contain_text("back after")
    connects = page.locator('svg.chart[data-kind="connects"]')
    await expect(connects).to_have_attribute("data-connects", "2", timeout=WAIT_MS)
    await expect(connects).to_have_attribute("data-drops", "1")
    await expect(page.locator("#connects-summary")).to_contain_text("2 connects (up) and 1 drop")
    await expect(page.locator('svg.chart[data-kind="queue"]')).to_have_attribute(
        "data-max", re.compile(r"^[0-9]+$")
    )

    # the command history, newest first
    history = page.locator("#device-commands tr[data-command]")
    await expect(history).to_have_count(3, timeout=WAIT_MS)
    await expect(history.first).to_have_attribute("data-command", command_id_of(failing))
    await expect(history.first.locator(".state")).to_have_text("rejected", timeout=WAIT_MS)

    # send a command from the form: asked for the token first; a bad JSON refused here
    await page.fill("#cmd-op", "set")
    await page.fill("#cmd-args", '{"lamp": "on",}')
    await page.click("#cmd-send")
    await expect(page.locator("#cmd-error")).to_contain_text("not valid JSON")
    await expect(page.locator("#cmd-args")).to_have_attribute("aria-invalid", "true")
    await page.fill("#cmd-args", '{"lamp": "on", "level": 7}')
    await page.fill("#cmd-priority", "5")
    await page.fill("#cmd-idempotency", "lamp-on-1")
    await page.click("#cmd-send")
    await expect(page.locator("#write-error")).to_contain_text("token_needed")
    await expect(page.locator("#token")).to_be_focused()
    assert [c.op for c in rig.hall.applied].count("set") == 2  # nothing sent yet
    await page.fill("#token", TOKEN)
    await page.click("#cmd-send")
    result = page.locator("#cmd-result")
    await expect(result).to_contain_text("Accepted", timeout=WAIT_MS)
    sent_id = await result.get_attribute("data-command")
    assert sent_id
    sent_row = page.locator(f'#device-commands tr[data-command="{sent_id}"]')
    await expect(sent_row.locator(".state")).to_have_text("succeeded", timeout=WAIT_MS)
    applied = [c for c in rig.hall.applied if c.key == "lamp-on-1"]
    assert [(c.op, dict(c.args)) for c in applied] == [("set", {"lamp": "on", "level": 7})]
    stored = await rig.command(sent_id)
    assert (stored["priority"], stored["idempotency_key"]) == (5, "lamp-on-1")
    await expect(history).to_have_count(4)

    await page.get_by_text("since start", exact=True).last.click()
    await expect(device_strip).to_have_attribute("data-states", re.compile(r"^idle,connecting,"))
    await screenshot(page, "dashboard-device.png")

    # narrow: one column, nothing wider than the screen
    await page.set_viewport_size({"width": 390, "height": 844})
    await expect(device_strip).to_have_attribute("data-states", DROP_AND_BACK)
    wide = await page.evaluate("document.documentElement.scrollWidth")
    assert wide <= 390, wide
    await screenshot(page, "dashboard-narrow.png")

    # back to every device, by the breadcrumb
    await page.get_by_role("link", name="All devices").click()
    await expect(page.locator("#view-overview")).to_be_visible()
    await expect(view).to_be_hidden()
    # an unknown device says so
    await page.goto(rig.url + "/#/devices/nope")
    await expect(page.locator("#device-missing")).to_contain_text('No device "nope"')

    assert errors == [], errors
    assert external == [], external


async def test_a_read_token_is_asked_for_and_kept_in_memory(page: Page) -> None:
    """On a gateway with a read_token the page shows nothing until it is given one."""
    read_token = "dash-read-token-4567"
    dead = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dead.bind(("127.0.0.1", 0))
    config = parse_config(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "store": "memory:",
                "token": TOKEN,
                "read_token": read_token,
            },
            "devices": [{"id": "attic", "driver": "jsonline", "port": dead.getsockname()[1]}],
        },
        source="test_dashboard",
    )
    server = Server(config, token=TOKEN)
    await server.start()
    try:
        await page.goto(server.url + "/")
        await expect(page.locator("#load-error")).to_contain_text("needs a token to read")
        await expect(page.locator("#token")).to_be_focused()
        await expect(page.locator('#devices tr[data-device="attic"]')).to_have_count(0)
        await page.locator("#token").press_sequentially(read_token)
        await expect(device_cell(page, "attic", "link-state")).to_have_text(
            re.compile("^(connecting|backoff)$")
        )
        await expect(page.locator("#load-error")).to_be_hidden()
        await expect(page.locator("#ws-status")).to_have_attribute("data-state", "live")
        await expect(strip(page, "attic", "link")).to_have_attribute(
            "data-now", re.compile("^(connecting|backoff)$")
        )
        assert await page.evaluate("[sessionStorage.length, localStorage.length]") == [0, 0]
    finally:
        await server.stop()
        dead.close()
