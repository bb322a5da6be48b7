"""Malformed input on the wire never kills the link; TLS (with client certificates) works."""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import Recorder, eventually, until_state
from keeplink import (
    AuthError,
    ErrorCode,
    FrameReceived,
    Link,
    LinkState,
    ProtocolErrorSeen,
    TimedOut,
    VirtualClock,
)
from keeplink._core.jsonline import StatePush
from keeplink.drivers import JsonLineDriver
from keeplink.testing import DeviceSimulator

S = LinkState
WELCOME = b'{"t":"welcome","v":1,"device":"raw","fw":"0.1"}\n'

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawPeer:
    """A peer that welcomes the link and then sends whatever bytes a test scripts."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.connected = asyncio.Event()

    async def start(self) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()  # the hello
            writer.write(WELCOME)
            self.writers.append(writer)
            self.connected.set()
            try:
                while await reader.read(65536):
                    pass
            except OSError:
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def send(self, data: bytes) -> None:
        writer = self.writers[-1]
        writer.write(data)
        await writer.drain()

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def raw_peer() -> AsyncIterator[RawPeer]:
    peer = RawPeer()
    yield peer
    await peer.close()


BAD_LINES = [
    b"\x00\x01\x02\xff\xfe random bytes",
    b"x" * 100_000,  # a huge line, over the 64 KiB limit
    b"\xc3\x28 invalid utf-8",
    b'{"t":"state","values":"not an object"}',
    b'{"t":"ack","seq":"one","ok":true}',
    b"[1,2,3]",
    b'{"t":"nonsense"}',
    b"{truncated",
]


async def test_malformed_input_is_counted_logged_once_and_never_kills_the_link(
    raw_peer: RawPeer, virtual_clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    port = await raw_peer.start()
    link = Link(JsonLineDriver(host="127.0.0.1", port=port), name="raw", clock=virtual_clock)
    rec = Recorder(link)
    with caplog.at_level(logging.DEBUG, logger="keeplink"):
        async with link:
            await asyncio.wait_for(link.wait_connected(), 10)
            for n, bad in enumerate(BAD_LINES):
                await raw_peer.send(
                    bad + b"\n" + f'{{"t":"state","values":{{"n":{n}}}}}\n'.encode()
                )
            await eventually(lambda: len(rec.of(FrameReceived)) == len(BAD_LINES))
            stats = link.statistics()
    assert stats.protocol_errors == len(BAD_LINES)
    assert (stats.connects, stats.disconnects) == (1, 0)
    pushes = [e.frame for e in rec.of(FrameReceived)]  # type: ignore[union-attr]
    assert pushes == [StatePush(values={"n": n}) for n in range(len(BAD_LINES))]
    errors = rec.of(ProtocolErrorSeen)
    assert [e.count for e in errors] == list(range(1, len(BAD_LINES) + 1))  # type: ignore[union-attr]
    assert "longer than 65536 bytes" in errors[1].reason  # type: ignore[union-attr]
    warnings = [
        r for r in caplog.records if r.levelno == logging.WARNING and "malformed" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert "[protocol_error]" in warnings[0].getMessage()


async def test_a_timeout_says_what_the_device_sent_instead_of_the_reply(
    raw_peer: RawPeer, virtual_clock: VirtualClock
) -> None:
    port = await raw_peer.start()
    link = Link(JsonLineDriver(host="127.0.0.1", port=port), name="raw", clock=virtual_clock)
    async with link:
        await asyncio.wait_for(link.wait_connected(), 10)
        quiet = asyncio.create_task(link.request("get", {}, timeout=5))
        await eventually(lambda: link.statistics().requests_sent == 1)
        await virtual_clock.advance(5)
        assert (await quiet).error.message == "no reply within 5s"  # nothing came: just that
        pending = asyncio.create_task(link.request("set", {"x": 1}, timeout=5))
        await eventually(lambda: link.statistics().requests_sent == 2)
        # Its answer, malformed (a list for a result), and a reply for a seq never sent.
        await raw_peer.send(b'{"t":"ack","seq":1,"ok":true,"result":[1,2]}\n')
        await raw_peer.send(b'{"t":"ack","seq":4000,"ok":true,"result":{}}\n')
        await eventually(lambda: link.statistics().late_replies == 1)
        await virtual_clock.advance(5)
        outcome = await pending
    assert isinstance(outcome, TimedOut)
    assert outcome.error.code is ErrorCode.TIMEOUT
    assert outcome.error.message == (
        "no reply within 5s; meanwhile the device sent 1 malformed frame (last: field "
        "'result' must be dict, got list) and 1 reply for no request in flight (last: seq 4000)"
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=8))
async def test_random_garbage_never_kills_the_link(garbage: list[bytes]) -> None:
    peer = RawPeer()
    port = await peer.start()
    link = Link(JsonLineDriver(host="127.0.0.1", port=port), name="fuzz", heartbeat_s=None)
    try:
        async with link:
            await asyncio.wait_for(link.wait_connected(), 10)
            for chunk in garbage:
                await peer.send(chunk)
            await peer.send(b'\n{"t":"state","values":{"end":true}}\n')
            seen: list[object] = []
            link.subscribe(seen.append)
            await eventually(lambda: any(isinstance(e, FrameReceived) for e in seen))
            assert link.state is S.CONNECTED
            assert link.statistics().disconnects == 0
    finally:
        await peer.close()


# ---------------------------------------------------------------------------- TLS


def _make_pki(tmp: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, k: ec.EllipticCurvePrivateKey) -> None:
        (tmp / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp / f"{stem}.key").write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256())
        )
        return cert, k

    def leaf(
        cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], server: bool
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(issuer[0].subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("device.test")]), critical=False
            )
        return builder.sign(issuer[1], hashes.SHA256()), k

    trusted = ca("keeplink test CA")
    rogue = ca("someone else's CA")
    write("ca", *trusted)
    write("server", *leaf("device.test", trusted, True))
    write("rogue", *leaf("device.test", rogue, True))
    write("client", *leaf("integration", trusted, False))
    return {stem: tmp / f"{stem}.pem" for stem in ("ca", "server", "rogue", "client")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("cryptography")
    return _make_pki(tmp_path_factory.mktemp("pki"))


def _server_context(pki: dict[str, Path], cert: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki[cert], pki[cert].with_suffix(".key"))
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED  # the device insists on a client certificate
    return ctx


def _client_context(pki: dict[str, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.load_cert_chain(pki["client"], pki["client"].with_suffix(".key"))
    return ctx


async def test_tls_with_a_client_certificate(pki: dict[str, Path]) -> None:
    async with DeviceSimulator(device_id="tls", ssl_context=_server_context(pki, "server")) as sim:
        driver = JsonLineDriver(
            host=sim.host,
            port=sim.port,
            ssl_context=_client_context(pki),
            server_hostname="device.test",
        )
        async with Link(driver, name="tls") as link:
            info = await asyncio.wait_for(link.wait_connected(), 10)
            assert info.device_id == "tls"
            await sim.push_state({"secure": True})
            seen: list[object] = []
            link.subscribe(seen.append)
            await eventually(lambda: bool(seen))


async def test_tls_peer_with_an_untrusted_certificate_is_a_terminal_auth_error(
    pki: dict[str, Path],
) -> None:
    async with DeviceSimulator(device_id="rogue", ssl_context=_server_context(pki, "rogue")) as sim:
        driver = JsonLineDriver(
            host=sim.host,
            port=sim.port,
            ssl_context=_client_context(pki),
            server_hostname="device.test",
        )
        async with Link(driver, name="tls") as link:
            with pytest.raises(AuthError) as info:
                await asyncio.wait_for(link.wait_connected(), 10)
            assert "certificate verify failed" in str(info.value)
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
            await until_state(link, S.FAILED)
