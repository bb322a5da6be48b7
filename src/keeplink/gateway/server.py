"""Running the gateway: ``keeplink serve --config FILE``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from pathlib import Path

from aiohttp import web

from keeplink.gateway.api import build_app
from keeplink.gateway.config import GatewayConfig, load_config
from keeplink.gateway.runtime import Gateway

__all__ = ["Server", "read_config", "serve"]

_log = logging.getLogger("keeplink.gateway")


class Server:
    """A Gateway plus its HTTP server. ``await start()``, ``url``, ``await stop()``."""

    def __init__(self, config: GatewayConfig, *, token: str, base_dir: Path | None = None):
        self.config = config
        self.token = token
        self.gateway = Gateway(config, base_dir=base_dir)
        self._runner: web.AppRunner | None = None
        self.port = config.listen_port

    async def start(self) -> None:
        await self.gateway.start()
        runner = web.AppRunner(build_app(self.gateway, token=self.token), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.listen_host, self.config.listen_port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            await self.gateway.stop()
            raise
        self._runner = runner
        server = site._server  # aiohttp keeps the listening sockets here
        if server is not None and getattr(server, "sockets", None):
            self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        host = self.config.listen_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """HTTP first (no new commands), then links, then the outbox and its store."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.gateway.stop()


def read_config(config_path: str | Path) -> tuple[GatewayConfig, Path]:
    """Load and validate the file, before any event loop runs. Raises ConfigError."""
    path = Path(config_path).absolute()
    return load_config(path), path.parent


async def serve(
    config: GatewayConfig, *, base_dir: Path, ready: asyncio.Event | None = None
) -> int:
    """Run until SIGINT/SIGTERM; relative store paths are relative to ``base_dir``."""
    token = config.token or os.environ.get("KEEPLINK_TOKEN") or secrets.token_urlsafe(18)
    server = Server(config, token=token, base_dir=base_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"keeplink gateway on {server.url} (dashboard: {server.url}/)", flush=True)
    if config.token is None and "KEEPLINK_TOKEN" not in os.environ:
        print(f"write token (set gateway.token to choose one): {token}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        print("keeplink gateway stopping", flush=True)
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return 0
