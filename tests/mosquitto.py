"""A real Mosquitto broker for tests: loopback only, a free port, a generated config.

    broker = Mosquitto(tmp_path / "broker")
    broker.start()          # returns once the port accepts connections
    ...
    broker.stop()           # SIGTERM, then SIGKILL if it lingers
    broker.start()          # the same port again (a restart)

Nothing is persisted (``persistence false``): a restart forgets retained messages and
sessions, like a broker whose disk was lost. The broker logs to ``broker.log`` in its
directory (flushed line by line, so a test can read it while the broker runs) and to
stdout, kept in ``stdout.log`` (buffered; it also has what mosquitto says before its log
starts). A broker that fails to start raises with the logs' tail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import pytest

from keeplink.testing import free_port

__all__ = ["MOSQUITTO", "Mosquitto", "mosquitto_binary"]

MOSQUITTO: Final = "mosquitto"
START_BOUND_S: Final = 10.0
"""How long a broker may take to accept connections (CI machines are slow)."""
STOP_BOUND_S: Final = 5.0
"""How long a broker may take to exit after SIGTERM before it is killed."""
PORT_TRIES: Final = 5
"""Fresh ports tried when the one picked was taken in between (first start only)."""


def mosquitto_binary() -> str | None:
    """The broker's path: on PATH, or where Debian installs it (/usr/sbin, often not on
    PATH for a non-root user)."""
    found = shutil.which(MOSQUITTO)
    if found is not None:
        return found
    fallback = Path("/usr/sbin/mosquitto")
    return str(fallback) if fallback.exists() else None


def require_mosquitto() -> None:
    """Skip the test if the broker is not installed (fail it on CI, which installs it)."""
    if mosquitto_binary() is not None:
        return
    reason = "the mosquitto broker is not installed (Debian: apt-get install mosquitto)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI installs it, so its absence is a broken CI script")
    pytest.skip(reason)


class Mosquitto:
    """One broker process at a time on ``127.0.0.1:port``, restartable on the same port.

    ``users`` maps user names to passwords: with it, anonymous clients are refused and only
    those users may connect (a password file is made with ``mosquitto_passwd``).
    """

    host = "127.0.0.1"

    def __init__(self, directory: Path, *, users: Mapping[str, str] | None = None) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("the mosquitto binary is not installed")
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.port: int | None = None
        self.log_path = directory / "broker.log"
        self.stdout_path = directory / "stdout.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the broker and wait until it accepts connections. Raises RuntimeError
        (with the log's tail) if it exits or does not listen within START_BOUND_S."""
        if self.running:
            return
        if self.port is not None:
            self._start_on(self.port)
            return
        for attempt in range(PORT_TRIES):
            port = free_port()
            try:
                self._start_on(port)
            except RuntimeError:
                if attempt == PORT_TRIES - 1 or "in use" not in self._tails().lower():
                    raise
                continue
            self.port = port
            return

    def stop(self) -> None:
        """Stop the broker (SIGTERM; SIGKILL after STOP_BOUND_S). Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_BOUND_S)

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL): no goodbye to any client."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_BOUND_S)

    def log(self) -> str:
        """What the broker has logged so far (``broker.log``)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def _tails(self) -> str:
        """The end of both logs, for an error message."""
        stdout = ""
        with contextlib.suppress(OSError):
            stdout = self.stdout_path.read_text(errors="replace")
        return f"{self.log()[-1500:]}\n-- stdout --\n{stdout[-1500:]}"

    # ------------------------------------------------------------------ machinery

    def _runs(self) -> int:
        """How many times the broker has said it is running, in this directory's log."""
        return sum(line.endswith(" running") for line in self.log().splitlines())

    def _start_on(self, port: int) -> None:
        config = self._write_config(port)
        runs = self._runs()
        with self.stdout_path.open("ab") as log:
            process = subprocess.Popen(
                [self.binary, "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        self._process = process
        deadline = time.monotonic() + START_BOUND_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._process = None
                raise RuntimeError(
                    f"mosquitto exited with {process.returncode} on port {port}:\n" + self._tails()
                )
            # Its own word that it runs, not just a port that accepts: someone else could
            # be listening there.
            if self._runs() > runs:
                with contextlib.suppress(OSError):
                    socket.create_connection((self.host, port), timeout=0.5).close()
                    self.starts += 1
                    return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(
            f"mosquitto did not listen on port {port} within {START_BOUND_S:g}s:\n" + self._tails()
        )

    def _write_config(self, port: int) -> Path:
        lines = [
            f"listener {port} {self.host}",
            "persistence false",
            "log_dest stdout",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto switches to the "mosquitto" user, which cannot read files
            # in a test's private temporary directory. Stay who we are.
            lines.append("user root")
        if self.users:
            passwords = self.directory / "passwords"
            passwords.write_text("")
            passwords.chmod(0o600)
            tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            for user, password in self.users.items():
                subprocess.run(
                    [tool, "-b", str(passwords), user, password],
                    check=True,
                    capture_output=True,
                    timeout=STOP_BOUND_S,
                )
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        config = self.directory / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        pid = self._process.pid if self._process is not None else None
        return f"<Mosquitto {self.host}:{self.port} {state} pid={pid}>"
