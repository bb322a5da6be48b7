"""The espota2 machines, sans-IO: replayed against ESPHome's own uploader, then exhaustively.

``espota_recorded.json`` holds four sessions of ESPHome's reference uploader
(``esphome/espota2.py``, current and October 2024) with keeplink's receiver on loopback;
its ``_how`` says how they were recorded. The device machine must answer the uploader's
bytes exactly as recorded, and the client must say what the uploader said.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from keeplink import AuthError, ErrorCode, LinkBrokenError, ProtocolError
from keeplink._core.errors import ConfigError
from keeplink._core.espota import (
    BLOCK_SIZE,
    DATA_TIMEOUT_S,
    DEVICE_ERRORS,
    HANDSHAKE_TIMEOUT_S,
    MAGIC,
    Authenticated,
    ChunkAcknowledged,
    ClientState,
    DeviceAuth,
    DeviceState,
    FeaturesAgreed,
    ImageProgress,
    ImageReceived,
    OtaClient,
    OtaDevice,
    OtaFault,
    OtaRefusedError,
    Response,
    TransferStarted,
    UpdateCompleted,
    UpdateFailed,
    UpdateStarted,
    UpdateVerified,
    VersionAgreed,
)

RECORDED = json.loads(Path(__file__).with_name("espota_recorded.json").read_text())
R = Response


def image(n: int) -> bytes:
    return bytes((i * 31 + i // 251) % 256 for i in range(n))


def exchange(name: str) -> tuple[list[tuple[str, bytes]], bytes]:
    rec = RECORDED[name]
    img = image(rec["image_size"])
    assert hashlib.sha256(img).hexdigest() == rec["image_sha256"]
    segments = []
    for entry in rec["exchange"]:
        if entry[1] == "image":
            segments.append(("c", img[entry[2] : entry[3]]))
        else:
            segments.append((entry[0], base64.b64decode(entry[1])))
    return segments, img


def stream(segments: list[tuple[str, bytes]], direction: str) -> bytes:
    return b"".join(data for d, data in segments if d == direction)


def joined(step_send: tuple[bytes | memoryview, ...]) -> bytes:
    return b"".join(bytes(b) for b in step_send)


# ---------------------------------------------------------------------- recorded


@pytest.mark.parametrize("name", [k for k in RECORDED if not k.startswith("_")])
def test_the_device_answers_the_reference_uploader_byte_for_byte(name: str) -> None:
    rec = RECORDED[name]
    segments, img = exchange(name)
    config = rec["device"]
    device = OtaDevice(
        password=config.get("password"),
        auth=DeviceAuth(config.get("auth", "sha256")),
        extended=config.get("extended", True),
        nonce=lambda n: rec["nonce"],
    )
    answered = b""
    events: list[Any] = []
    for direction, data in segments:
        if direction == "c":
            step = device.receive_data(data)
            answered += step.send
            events += step.events
    assert answered == stream(segments, "d")
    assert device.state is DeviceState.DONE
    assert device.ack == 0
    done = [e for e in events if isinstance(e, UpdateCompleted)]
    assert [d.image for d in done] == [img]
    assert done[0].auth == rec["auth_used"]


@pytest.mark.parametrize("name", ["sha256_current", "md5_legacy_device", "no_password"])
def test_the_client_says_what_the_reference_uploader_said(name: str) -> None:
    """Byte for byte, except the feature byte: the uploader also offers gzip and deflate
    (17), keeplink offers SHA-256 and the extended protocol (06); the recorded devices
    granted neither of the others, so everything after it is the same."""
    rec = RECORDED[name]
    segments, img = exchange(name)
    client = OtaClient(
        img, password=rec["device"].get("password"), window=1, cnonce=lambda n: rec["cnonce"]
    )
    said = client.start()
    for direction, data in segments:
        if direction == "d":
            said += joined(client.receive_data(data).send)
    expected = bytearray(stream(segments, "c"))
    assert expected[5] == 0x17
    expected[5] = 0x06
    assert said == bytes(expected)
    assert client.done


# ---------------------------------------------------------------------- sessions


def session(
    client: OtaClient, device: OtaDevice, *, bytewise: bool = False
) -> tuple[list[Any], list[Any], BaseException | None]:
    """Wire a client to a device in memory until one of them is done."""
    to_device = client.start()
    client_events: list[Any] = []
    device_events: list[Any] = []
    while to_device:
        pieces = [to_device[i : i + 1] for i in range(len(to_device))] if bytewise else [to_device]
        answer = b""
        close = False
        for piece in pieces:
            step = device.receive_data(piece)
            device_events += step.events
            answer += step.send
            close = close or step.close
            if step.close:
                break
        to_device = b""
        replies = [answer[i : i + 1] for i in range(len(answer))] if bytewise else [answer]
        try:
            for reply in replies:
                if reply:
                    cstep = client.receive_data(reply)
                    client_events += cstep.events
                    to_device += joined(cstep.send)
            if close and not client.done:
                client.receive_data(b"")
        except (AuthError, ProtocolError, OtaRefusedError, LinkBrokenError) as exc:
            return client_events, device_events, exc
    return client_events, device_events, None


def kinds(events: list[Any]) -> list[type]:
    return [type(e) for e in events if not isinstance(e, ChunkAcknowledged | ImageProgress)]


IMG = image(3 * BLOCK_SIZE + 123)


@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("extended", [True, False])
@pytest.mark.parametrize(
    ("auth", "method"),
    [(DeviceAuth.SHA256, "sha256"), (DeviceAuth.SHA256_OR_MD5, "sha256"), (DeviceAuth.MD5, "md5")],
)
def test_every_firmware_generation_takes_the_image(
    auth: DeviceAuth, method: str, extended: bool, version: int, bytewise: bool
) -> None:
    client = OtaClient(IMG, password="pw")
    device = OtaDevice(password="pw", auth=auth, extended=extended, version=version)
    cev, dev, error = session(client, device, bytewise=bytewise)
    assert error is None
    assert kinds(cev) == [
        VersionAgreed, FeaturesAgreed, Authenticated, TransferStarted, ImageReceived,
        UpdateVerified,
    ]  # fmt: skip
    assert cev[0] == VersionAgreed(version)
    assert cev[1] == FeaturesAgreed(compression=False, extended=extended, flags=0)
    assert cev[2] == Authenticated(method)
    assert [e.image for e in dev if isinstance(e, UpdateCompleted)] == [IMG]
    acks = [e.acked for e in cev if isinstance(e, ChunkAcknowledged)]
    if version == 2:
        assert acks == [BLOCK_SIZE, 2 * BLOCK_SIZE, 3 * BLOCK_SIZE, len(IMG)]
    else:
        assert acks == []
    assert client.done
    assert device.state is DeviceState.DONE


def test_no_password_no_challenge() -> None:
    cev, _, error = session(OtaClient(IMG, password="unused"), OtaDevice())
    assert error is None
    assert Authenticated(None) in cev


def test_a_gzip_payload_is_sent_when_the_device_takes_it_and_installed_inflated() -> None:
    packed = gzip.compress(IMG, mtime=0)
    for extended in (True, False):
        client = OtaClient(IMG, compressed=packed)
        device = OtaDevice(compression=True, extended=extended)
        cev, dev, error = session(client, device)
        assert error is None
        started = next(e for e in cev if isinstance(e, TransferStarted))
        assert started == TransferStarted(
            size=len(packed), md5=hashlib.md5(packed).hexdigest(), compressed=True
        )
        done = next(e for e in dev if isinstance(e, UpdateCompleted))
        assert done.image == IMG
        assert done.compressed
    # A device without gzip gets the plain image even when the client has a gzip one.
    cev, dev, error = session(OtaClient(IMG, compressed=packed), OtaDevice())
    assert error is None
    assert next(e for e in cev if isinstance(e, TransferStarted)).compressed is False


def test_a_payload_that_does_not_inflate_is_refused_at_the_end() -> None:
    not_gzip = b"\x1f\x8b" + bytes(100)
    _, dev, error = session(OtaClient(IMG, compressed=not_gzip), OtaDevice(compression=True))
    assert isinstance(error, OtaRefusedError)
    assert error.response == R.ERROR_UPDATE_END
    assert error.retryable
    assert UpdateFailed(R.ERROR_UPDATE_END, "the gzip payload does not inflate") in dev


@pytest.mark.parametrize("size", [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 5 * BLOCK_SIZE])
def test_the_device_acknowledges_each_block_and_the_tail(size: int) -> None:
    img = image(size)
    client = OtaClient(img, window=64)
    cev, dev, error = session(client, OtaDevice())
    assert error is None
    acks = [e.acked for e in cev if isinstance(e, ChunkAcknowledged)]
    expected = [min(k * BLOCK_SIZE, size) for k in range(1, -(-size // BLOCK_SIZE) + 1)]
    assert acks == expected
    assert [e.image for e in dev if isinstance(e, UpdateCompleted)] == [img]


def test_a_wrong_password_is_auth_failed_for_both_challenges() -> None:
    for auth in DeviceAuth:
        _, dev, error = session(
            OtaClient(IMG, password="wrong"), OtaDevice(password="pw", auth=auth)
        )
        assert isinstance(error, AuthError)
        assert error.code is ErrorCode.AUTH_FAILED
        assert "0x82" in error.message
        assert UpdateFailed(R.ERROR_AUTH_INVALID, "wrong password") in dev


def test_a_device_asking_for_a_password_the_client_lacks_is_auth_failed() -> None:
    _, _, error = session(OtaClient(IMG), OtaDevice(password="pw"))
    assert isinstance(error, AuthError)
    assert "none is configured" in error.message


def test_md5_can_be_refused() -> None:
    client = OtaClient(IMG, password="pw", allow_md5=False)
    _, _, error = session(client, OtaDevice(password="pw", auth=DeviceAuth.MD5))
    assert isinstance(error, AuthError)
    assert "MD5" in error.message
    # the same client takes SHA-256 from a current device
    _, _, error = session(OtaClient(IMG, password="pw", allow_md5=False), OtaDevice(password="pw"))
    assert error is None


def started_client(
    img: bytes = IMG, *, password: str | None = None, window: int = 2, **kw: Any
) -> OtaClient:
    client = OtaClient(img, password=password, window=window, **kw)
    client.start()
    return client


def to_data(client: OtaClient, *, version: int = 2) -> tuple[bytes | memoryview, ...]:
    """Walk a client to the data phase with a current, passwordless device's bytes."""
    client.receive_data(bytes([R.OK, version]))
    client.receive_data(bytes([R.FEATURE_FLAGS, 0, R.AUTH_OK]))
    client.receive_data(bytes([R.UPDATE_PREPARE_OK]))
    return client.receive_data(bytes([R.BIN_MD5_OK])).send


def test_the_client_says_each_step_in_order() -> None:
    client = OtaClient(IMG, window=1)
    assert client.start() == MAGIC
    assert client.state is ClientState.HELLO
    assert client.receive_data(bytes([R.OK])).send == ()
    step = client.receive_data(bytes([2]))
    assert step.send == (bytes([0x06]),)
    assert step.events == (VersionAgreed(2),)
    step = client.receive_data(bytes([R.FEATURE_FLAGS, 0x02]))
    assert step.events == (FeaturesAgreed(compression=False, extended=True, flags=2),)
    step = client.receive_data(bytes([R.AUTH_OK]))
    assert step.send == (bytes([0]) + len(IMG).to_bytes(4, "big"),)
    step = client.receive_data(bytes([R.UPDATE_PREPARE_OK]))
    assert step.send == (hashlib.md5(IMG).hexdigest().encode(),)
    step = client.receive_data(bytes([R.BIN_MD5_OK]))
    assert joined(step.send) == IMG[:BLOCK_SIZE]
    assert client.in_data_phase
    sent = joined(step.send)
    for _ in range(3):
        sent += joined(client.receive_data(bytes([R.CHUNK_OK])).send)
    assert sent == IMG
    assert client.committed
    step = client.receive_data(bytes([R.CHUNK_OK, R.RECEIVE_OK]))
    assert ImageReceived(len(IMG)) in step.events
    step = client.receive_data(bytes([R.UPDATE_END_OK]))
    assert step.send == (bytes([R.OK]),)
    assert step.events == (UpdateVerified(len(IMG)),)
    assert client.done
    assert client.receive_data(b"anything").send == ()  # after the end, nothing


def test_the_window_bounds_what_is_in_flight() -> None:
    client = started_client(window=2)
    first = to_data(client)
    assert len(joined(first)) == 2 * BLOCK_SIZE
    assert all(isinstance(b, memoryview) for b in first)  # views of the image, not copies
    step = client.receive_data(bytes([R.CHUNK_OK]))
    assert len(joined(step.send)) == BLOCK_SIZE
    assert step.events == (ChunkAcknowledged(BLOCK_SIZE, len(IMG)),)
    step = client.receive_data(bytes([R.CHUNK_OK]))
    assert len(joined(step.send)) == 123
    assert client.sent == len(IMG)


def test_a_version_1_device_gets_the_whole_image_at_once() -> None:
    client = started_client()
    assert joined(to_data(client, version=1)) == IMG
    with pytest.raises(ProtocolError, match="more blocks"):
        client.receive_data(bytes([R.CHUNK_OK]))


def test_unsupported_versions_are_a_protocol_error() -> None:
    for version in (0, 3, 255):
        client = started_client()
        with pytest.raises(ProtocolError, match=f"version {version}"):
            client.receive_data(bytes([R.OK, version]))
        assert client.state is ClientState.FAILED


# Where the client waits for a response byte, and the bytes that get it there.
WAITS: dict[str, bytes] = {
    "hello": b"",
    "features": bytes([R.OK, 2]),
    "auth": bytes([R.OK, 2, R.FEATURE_FLAGS, 0]),
    "auth_result": bytes([R.OK, 2, R.FEATURE_FLAGS, 0, R.REQUEST_SHA256_AUTH]) + b"a" * 64,
    "size": bytes([R.OK, 2, R.FEATURE_FLAGS, 0, R.AUTH_OK]),
    "checksum": bytes([R.OK, 2, R.FEATURE_FLAGS, 0, R.AUTH_OK, R.UPDATE_PREPARE_OK]),
    "data": bytes([R.OK, 2, R.FEATURE_FLAGS, 0, R.AUTH_OK, R.UPDATE_PREPARE_OK, R.BIN_MD5_OK]),
    "verify": bytes([R.OK, 2, R.FEATURE_FLAGS, 0, R.AUTH_OK, R.UPDATE_PREPARE_OK, R.BIN_MD5_OK])
    + bytes([R.CHUNK_OK] * 4 + [R.RECEIVE_OK]),
}


def waiting_client(where: str) -> OtaClient:
    client = started_client(password="pw", window=64)
    if WAITS[where]:
        client.receive_data(WAITS[where])
    assert client.state.value == where
    return client


@pytest.mark.parametrize("where", list(WAITS))
@pytest.mark.parametrize("response", sorted(DEVICE_ERRORS))
def test_every_error_byte_in_every_state_is_a_typed_error(where: str, response: int) -> None:
    client = waiting_client(where)
    with pytest.raises((AuthError, ProtocolError, OtaRefusedError)) as caught:
        client.receive_data(bytes([response]))
    error = caught.value
    spec = DEVICE_ERRORS[response]
    if response == R.ERROR_AUTH_INVALID:
        assert type(error) is AuthError
        assert error.code is ErrorCode.AUTH_FAILED
    elif response == R.ERROR_MAGIC:
        assert type(error) is ProtocolError
        assert error.code is ErrorCode.PROTOCOL_ERROR
    else:
        assert isinstance(error, OtaRefusedError)
        assert error.response == response
        assert error.retryable is spec.retryable
        assert error.wire_code == spec.wire_code
        expected = (
            ErrorCode.CHECKSUM_MISMATCH
            if spec.wire_code == "checksum_mismatch"
            else ErrorCode.REJECTED
        )
        assert error.code is expected
    assert f"0x{response:02X}" in error.message
    assert client.state is ClientState.FAILED
    assert client.receive_data(bytes([R.OK])).send == ()  # a failed client ignores input


def test_an_unknown_error_byte_is_refused_and_not_retried() -> None:
    client = waiting_client("size")
    with pytest.raises(OtaRefusedError) as caught:
        client.receive_data(bytes([0xA7]))
    assert caught.value.wire_code == "device_error_0xa7"
    assert not caught.value.retryable


@pytest.mark.parametrize("where", list(WAITS))
def test_an_unexpected_byte_is_a_protocol_error(where: str) -> None:
    client = waiting_client(where)
    wrong = R.UPDATE_END_OK if where != "verify" else R.BIN_MD5_OK
    with pytest.raises(ProtocolError, match=f"unexpected byte 0x{wrong:02X}"):
        client.receive_data(bytes([wrong]))


@pytest.mark.parametrize("where", list(WAITS))
def test_a_close_before_the_end_is_a_broken_link(where: str) -> None:
    client = waiting_client(where)
    with pytest.raises(LinkBrokenError) as caught:
        client.receive_data(b"")
    assert caught.value.code is ErrorCode.CONNECTION_FAILED
    committed = where == "verify" or (where == "data" and client.sent == len(IMG))
    assert ("may have installed it" in caught.value.message) is committed


def test_committed_means_the_device_may_hold_the_whole_image() -> None:
    client = started_client(window=1)
    to_data(client)
    assert not client.committed
    for _ in range(3):
        client.receive_data(bytes([R.CHUNK_OK]))
    assert client.sent == len(IMG)
    assert client.committed  # everything written: the device may be installing it


def test_the_device_saying_received_too_early_is_a_protocol_error() -> None:
    client = started_client(window=1)
    to_data(client)
    with pytest.raises(ProtocolError, match="whole image after 0"):
        client.receive_data(bytes([R.RECEIVE_OK]))


def test_a_nonce_that_is_not_hex_is_a_protocol_error() -> None:
    client = waiting_client("auth")
    with pytest.raises(ProtocolError, match="not hex"):
        client.receive_data(bytes([R.REQUEST_AUTH]) + b"z" * 32)


def test_gzip_chosen_without_being_offered_is_a_protocol_error() -> None:
    client = started_client()
    client.receive_data(bytes([R.OK, 2]))
    with pytest.raises(ProtocolError, match="gzip"):
        client.receive_data(bytes([R.SUPPORTS_COMPRESSION]))
    client = started_client()
    client.receive_data(bytes([R.OK, 2]))
    with pytest.raises(ProtocolError, match="gzip"):
        client.receive_data(bytes([R.FEATURE_FLAGS, 0x01]))


def test_the_client_refuses_to_be_misused() -> None:
    client = OtaClient(IMG)
    with pytest.raises(ProtocolError):
        client.receive_data(b"\x00")
    client.start()
    with pytest.raises(ProtocolError):
        client.start()
    with pytest.raises(ConfigError):
        OtaClient(IMG, window=0)
    with pytest.raises(ConfigError):
        OtaFault("later", 0x83)
    with pytest.raises(ConfigError):
        OtaFault("write", 0x10)
    with pytest.raises(ConfigError):
        OtaDevice(version=3)


# ---------------------------------------------------------------------- the device


def feed(device: OtaDevice, *chunks: bytes) -> tuple[bytes, list[Any], bool]:
    out, events, close = b"", [], False
    for chunk in chunks:
        step = device.receive_data(chunk)
        out += step.send
        events += step.events
        close = close or step.close
    return out, events, close


def test_bad_magic_is_answered_with_80_and_a_close() -> None:
    out, events, close = feed(OtaDevice(), b"\x6c\x26\xf7\x5c\x46")
    assert (out, close) == (bytes([R.ERROR_MAGIC]), True)
    assert events == [UpdateFailed(R.ERROR_MAGIC, "bad magic 6c26f75c46")]


def test_a_current_device_refuses_a_client_without_sha256() -> None:
    out, events, close = feed(OtaDevice(password="pw"), MAGIC, b"\x01")
    assert out == bytes([R.OK, 2, R.HEADER_OK, R.ERROR_AUTH_INVALID])
    assert close
    assert events == [UpdateFailed(R.ERROR_AUTH_INVALID, "the client does not offer SHA-256")]


def test_a_transition_device_falls_back_to_md5_for_an_old_client() -> None:
    device = OtaDevice(password="pw", auth=DeviceAuth.SHA256_OR_MD5, nonce=lambda n: "a" * n)
    out, _, close = feed(device, MAGIC, b"\x01")
    assert out == bytes([R.OK, 2, R.HEADER_OK, R.REQUEST_AUTH]) + b"a" * 32
    assert not close
    device = OtaDevice(password="pw", auth=DeviceAuth.SHA256_OR_MD5, nonce=lambda n: "b" * n)
    out, _, _ = feed(device, MAGIC, b"\x06")
    assert out == bytes([R.OK, 2, R.FEATURE_FLAGS, 0, R.REQUEST_SHA256_AUTH]) + b"b" * 64


def to_device_data(device: OtaDevice, img: bytes, *, md5: str | None = None) -> bytes:
    out, _, _ = feed(
        device,
        MAGIC,
        b"\x06",
        b"\x00" + len(img).to_bytes(4, "big"),
        (md5 or hashlib.md5(img).hexdigest()).encode(),
    )
    return out


def test_only_app_updates_are_taken() -> None:
    out, _, close = feed(OtaDevice(), MAGIC, b"\x06", b"\x01" + (10).to_bytes(4, "big"))
    assert out[-1] == R.ERROR_UNSUPPORTED_OTA_TYPE
    assert close


@pytest.mark.parametrize(
    ("fault", "response"),
    [
        (OtaFault("begin", R.ERROR_UPDATE_PREPARE), R.ERROR_UPDATE_PREPARE),
        (OtaFault("write", R.ERROR_WRITING_FLASH, after_bytes=9000), R.ERROR_WRITING_FLASH),
        (OtaFault("end", R.ERROR_SIGNATURE_INVALID), R.ERROR_SIGNATURE_INVALID),
    ],
)
def test_faults_answer_their_byte_at_their_stage(fault: OtaFault, response: int) -> None:
    device = OtaDevice(fault=fault)
    head = b"\x00" + len(IMG).to_bytes(4, "big") + hashlib.md5(IMG).hexdigest().encode()
    out, events, close = feed(device, MAGIC, b"\x06", head, IMG)
    assert close
    assert out[-1] == response
    assert any(isinstance(e, UpdateFailed) and e.response == response for e in events)
    if fault.stage == "write":
        assert device.received >= 9000
        assert device.received < len(IMG)


def test_a_too_big_image_is_refused_at_begin() -> None:
    device = OtaDevice(max_size=1000)
    out = to_device_data(device, IMG)
    assert out.endswith(bytes([R.ERROR_ESP32_NOT_ENOUGH_SPACE]))
    assert device.state is DeviceState.FAILED


def test_an_image_that_does_not_match_its_md5_is_refused_after_receiving() -> None:
    device = OtaDevice()
    to_device_data(device, IMG, md5="0" * 32)
    out, events, _ = feed(device, IMG)
    assert out.endswith(bytes([R.RECEIVE_OK, R.ERROR_MD5_MISMATCH]))
    assert UpdateFailed(R.ERROR_MD5_MISMATCH, "MD5 mismatch") in events


def test_the_device_reports_progress_and_then_the_install() -> None:
    device = OtaDevice()
    to_device_data(device, IMG)
    out, events, close = feed(device, IMG[:100], IMG[100:])
    assert not close  # it waits for the client's final byte
    assert out == bytes([R.CHUNK_OK] * 4 + [R.RECEIVE_OK, R.UPDATE_END_OK])
    assert events[0] == ImageProgress(100, len(IMG))
    assert isinstance(events[-1], UpdateCompleted)
    out, events, close = feed(device, b"\x00")
    assert (out, events, close) == (b"", [], True)
    assert device.ack == 0


def test_a_close_after_the_install_is_still_an_install() -> None:
    device = OtaDevice()
    to_device_data(device, IMG)
    feed(device, IMG)
    out, events, close = feed(device, b"")
    assert (out, events, close) == (b"", [], True)
    assert device.state is DeviceState.DONE


def test_a_close_mid_transfer_fails_the_update_quietly() -> None:
    device = OtaDevice()
    to_device_data(device, IMG)
    out, events, close = feed(device, IMG[:5000], b"")
    assert out == b""
    assert close
    assert events[-1] == UpdateFailed(None, "the client closed the connection in data")


def test_timeouts_follow_the_firmware() -> None:
    device = OtaDevice()
    assert device.timeout_s == HANDSHAKE_TIMEOUT_S
    step = device.expire()
    assert (step.send, step.close) == (b"", True)  # the handshake watchdog says nothing
    assert step.events == (UpdateFailed(None, "handshake timeout"),)
    device = OtaDevice()
    to_device_data(device, IMG)
    assert device.timeout_s == DATA_TIMEOUT_S
    step = device.expire()
    assert (step.send, step.close) == (bytes([R.ERROR_UNKNOWN]), True)
    assert device.expire().send == b""  # finished: nothing more


def test_update_started_comes_after_the_size() -> None:
    _, events, _ = feed(OtaDevice(), MAGIC, b"\x06", b"\x00" + (77).to_bytes(4, "big"))
    assert events == [UpdateStarted(77)]


def test_received_twice_is_a_protocol_error() -> None:
    client = waiting_client("verify")
    with pytest.raises(ProtocolError, match="unexpected byte 0x44"):
        client.receive_data(bytes([R.RECEIVE_OK]))
