import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["keeplink.testing.pytest_plugin"]

# No per-example deadline: CI machines are shared and noisy, and speed goals live in
# benchmarks. On CI, print the blob that reproduces a failure.
settings.register_profile(
    "keeplink",
    deadline=None,
    print_blob=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("keeplink")

import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from gateway_procs import Procs  # noqa: E402
from keeplink.testing.postgres import PostgresServer, postgres_bindir  # noqa: E402
from linkfixtures import make_link, proxy, sim  # noqa: E402,F401  (fixtures for every test)
from mosquitto import Mosquitto, require_mosquitto  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL cluster for the session, on a free loopback port.

    Its directory is made outside pytest's (root-only) temporary tree, because when the
    tests run as root the server runs as the ``postgres`` user, who must be able to reach it.
    """
    if postgres_bindir() is None:
        pytest.skip(
            "the PostgreSQL server binaries are not installed (scripts/check installs them)"
        )
    directory = Path(tempfile.mkdtemp(prefix="keeplink-pg-"))
    server = PostgresServer(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto broker of the test's own, on a free loopback port."""
    require_mosquitto()
    mosquitto = Mosquitto(tmp_path / "broker")
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Gateway and simulator subprocesses of the test's own, killed at the end."""
    p = Procs(tmp_path)
    yield p
    p.cleanup()
