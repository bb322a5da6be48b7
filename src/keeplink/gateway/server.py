"""Running the gateway: ``keeplink serve --config FILE``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import signal
import socket
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from keeplink._core.errors import ConfigError
from keeplink.gateway.api import build_app
from keeplink.gateway.config import MIN_TOKEN_CHARS, GatewayConfig, load_config
from keeplink.gateway.listener import (
    BACKLOG,
    DEFAULT_MAX_CLIENTS,
    Listener,
    RateLimit,
    accept_error_handler,
    client_ceiling,
    parser_logger,
)
from keeplink.gateway.runtime import Gateway

SHUTDOWN_S: Final = 5.0
"""At stop, requests still running get this long to finish before they are cancelled (a
cancel waiting on a device must not keep the links up for a minute)."""

__all__ = ["Server", "read_config", "serve"]

_log = logging.getLogger("keeplink.gateway")


class Server:
    """A Gateway plus its HTTP server. ``await start()``, ``url``, ``await stop()``.

    The listening socket is bound first: an address in use, or one this host does not have,
    is a ConfigError naming ``gateway.listen``, and then nothing has started. Client
    connections are capped and timed (see keeplink.gateway.listener); the cap defaults to
    what the descriptor limit leaves after a reserve for the device links.
    """

    def __init__(self, config: GatewayConfig, *, token: str, base_dir: Path | None = None):
        self.config = config
        self.token = token
        self.gateway = Gateway(config, base_dir=base_dir)
        self._runner: web.AppRunner | None = None
        self.listener: Listener | None = None
        self.port = config.listen_port
        self.max_clients = _max_clients(config)

    async def start(self) -> None:
        """Bind, start the gateway, then serve. Raises ConfigError (nothing left running)."""
        sock = _bind(self.config)
        try:
            await self.gateway.start()
        except BaseException:
            sock.close()
            raise
        try:
            self.port = int(sock.getsockname()[1])
            app = build_app(self.gateway, token=self.token)
            Listener.install(app)
            runner = web.AppRunner(
                app,
                access_log=None,
                keepalive_timeout=self.config.idle_timeout_s,
                logger=parser_logger(),
                shutdown_timeout=SHUTDOWN_S,
            )
            await runner.setup()
            assert runner.server is not None  # set up above
        except BaseException:
            sock.close()
            await self.gateway.stop()
            raise
        self._runner = runner
        self.listener = Listener(
            sock,
            runner.server,
            max_clients=self.max_clients,
            header_timeout_s=self.config.header_timeout_s,
        )
        self.listener.start()

    @property
    def url(self) -> str:
        host = self.config.listen_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """HTTP first (no new commands), then links, then the outbox and its store."""
        if self.listener is not None:
            await self.listener.stop_accepting()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
        await self.gateway.stop()


def _bind(config: GatewayConfig) -> socket.socket:
    host = config.listen_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, config.listen_port), family=family, backlog=BACKLOG)
    except OSError as exc:
        raise ConfigError(
            f"{config.source}: gateway.listen: cannot listen on {config.listen}: "
            f"{exc.strerror or exc}"
        ) from exc


def _max_clients(config: GatewayConfig) -> int:
    """gateway.max_clients, or what the descriptor limit leaves after the devices' reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    ceiling = client_ceiling(soft, devices=len(config.devices))
    if config.max_clients is None:
        return min(DEFAULT_MAX_CLIENTS, ceiling)
    if config.max_clients > ceiling:
        _log.warning(
            "gateway: gateway.max_clients = %d does not fit the descriptor limit (%d) with "
            "%d device(s); serving %d clients at most (raise the limit: ulimit -n)",
            config.max_clients, soft, len(config.devices), ceiling,
        )  # fmt: skip
        return ceiling
    return config.max_clients


def read_config(config_path: str | Path) -> tuple[GatewayConfig, Path]:
    """Load and validate the file, before any event loop runs. Raises ConfigError."""
    path = Path(config_path).absolute()
    return load_config(path), path.parent


async def serve(
    config: GatewayConfig, *, base_dir: Path, ready: asyncio.Event | None = None
) -> int:
    """Run until SIGINT/SIGTERM; relative store paths are relative to ``base_dir``."""
    token = config.token or os.environ.get("KEEPLINK_TOKEN") or secrets.token_urlsafe(18)
    if len(token) < MIN_TOKEN_CHARS:  # only KEEPLINK_TOKEN can be short: the file is checked
        raise ConfigError(
            f"KEEPLINK_TOKEN: must be at least {MIN_TOKEN_CHARS} characters, got {len(token)} "
            "(a short token is easy to guess)"
        )
    server = Server(config, token=token, base_dir=base_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(accept_error_handler(RateLimit(), previous or _default_handler))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except BaseException:
        _remove_signal_handlers(loop)
        loop.set_exception_handler(previous)
        raise
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
        _remove_signal_handlers(loop)
        loop.set_exception_handler(previous)
    return 0


def _default_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    loop.default_exception_handler(context)


def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(sig)
