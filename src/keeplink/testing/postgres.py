"""A real PostgreSQL server for tests and benchmarks: a throwaway cluster on loopback.

    server = PostgresServer(tmp_path / "pg")
    server.start()              # initdb (the first time), then pg_ctl start on a free port
    dsn = server.dsn()          # postgresql://keeplink@127.0.0.1:PORT/postgres
    ...
    server.stop()               # pg_ctl stop -m fast; start() again reuses the port
    server.kill()               # SIGKILL of the postmaster: a crash, recovered on start()

It uses the Debian server binaries (``/usr/lib/postgresql/<version>/bin``, the newest one
installed; or ``pg_config --bindir``). PostgreSQL refuses to run as root: when this process
is root, ``initdb`` and ``pg_ctl`` run as the ``postgres`` user through ``runuser`` and the
directory is handed to that user. The cluster listens on 127.0.0.1 only, trusts local
connections (it is a test server), and keeps its socket in its own directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

from keeplink.testing._ports import free_port

__all__ = ["PostgresServer", "postgres_bindir"]

START_BOUND_S: Final = 30.0
"""How long initdb or a start may take (a first initdb on a slow CI disk takes seconds)."""
USER: Final = "keeplink"
"""The cluster's superuser."""


def postgres_bindir() -> Path | None:
    """Where the server binaries are: the newest ``/usr/lib/postgresql/<v>/bin``, else
    ``pg_config --bindir``; ``None`` if PostgreSQL is not installed."""
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted(
            (p for p in root.iterdir() if (p / "bin" / "pg_ctl").exists()),
            key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)] or [0],
        )
        if versions:
            return versions[-1] / "bin"
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "pg_ctl").exists():
            return candidate
    return None


class PostgresServer:
    """One cluster in ``directory``, restartable on the same port.

    As root, ``directory`` is handed to the ``postgres`` user, who must also be able to
    reach it: make it with ``tempfile.mkdtemp()`` (not inside a root-only directory).
    """

    host = "127.0.0.1"

    def __init__(self, directory: Path) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise FileNotFoundError("the PostgreSQL server binaries are not installed")
        self.bindir = bindir
        self.directory = directory
        self.data = directory / "data"
        self.sockets = directory / "sockets"
        self.log_path = directory / "server.log"
        self.port: int | None = None
        self.starts = 0
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, capture_output=True, text=True, timeout=START_BOUND_S, check=False
        )

    def _prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sockets.mkdir(exist_ok=True)
        if self._as_postgres:
            for path in (self.directory, self.sockets):
                shutil.chown(path, "postgres", "postgres")
        if (self.data / "PG_VERSION").exists():
            return
        done = self._run(
            "initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8",
            "--no-sync", "--locale=C.UTF-8",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        """Start the server; returns once it accepts connections. Raises RuntimeError with
        the log's tail if it does not start."""
        self._prepare()
        if self.port is None:
            self.port = free_port()
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses={self.host} "
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        done = self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options,
            "-w", "-t", str(int(START_BOUND_S)), "start",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {done.stderr.strip()}\n{self.tail()}")
        self.starts += 1

    def stop(self, *, mode: str = "fast") -> None:
        """``pg_ctl stop`` (``fast``: sessions are ended, a clean shutdown)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would; ``start()`` recovers the cluster."""
        pid_file = self.data / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + START_BOUND_S
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status").returncode == 0

    def dsn(self, database: str = "postgres") -> str:
        if self.port is None:
            raise RuntimeError("the server was never started")
        return f"postgresql://{USER}@{self.host}:{self.port}/{database}"

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(mode="immediate")
