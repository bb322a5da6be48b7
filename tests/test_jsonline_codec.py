"""The jsonline codec, sans-IO: scripted bytes in, exact frames out."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keeplink import InvalidRequestError, Malformed, RejectedError
from keeplink._core.errors import ErrorInfo
from keeplink._core.jsonline import (
    MAX_DEPTH,
    MAX_LINE,
    Ack,
    ErrorFrame,
    Hello,
    JsonLineDecoder,
    Ping,
    Pong,
    Req,
    StatePush,
    Welcome,
    encode_frame,
)


def test_decodes_every_frame_of_the_reference_protocol() -> None:
    wire = (
        b'{"t":"hello","v":1,"token":"abc"}\n'
        b'{"t":"welcome","v":1,"device":"hall","fw":"1.2.0"}\n'
        b'{"t":"error","code":"auth_failed","msg":"bad token"}\n'
        b'{"t":"req","seq":7,"op":"set","args":{"target":21.5},"key":"K1"}\n'
        b'{"t":"ack","seq":7,"ok":true,"result":{"x":1},"rssi":-61}\n'
        b'{"t":"ack","seq":8,"ok":false,"code":"rejected","msg":"no"}\n'
        b'{"t":"ping"}\n{"t":"pong"}\n'
        b'{"t":"state","values":{"temp":20}}\n'
    )
    assert JsonLineDecoder().feed(wire) == [
        Hello(token="abc"),
        Welcome(device="hall", fw="1.2.0"),
        ErrorFrame(code="auth_failed", msg="bad token"),
        Req(seq=7, op="set", args={"target": 21.5}, key="K1"),
        Ack(seq=7, ok=True, result={"x": 1}, extra={"rssi": -61}),
        Ack(seq=8, ok=False, code="rejected", msg="no"),
        Ping(),
        Pong(),
        StatePush(values={"temp": 20}),
    ]


def test_a_negative_ack_without_code_means_rejected() -> None:
    (ack,) = JsonLineDecoder().feed(b'{"t":"ack","seq":1,"ok":false}\n')
    assert ack == Ack(seq=1, ok=False, code="rejected")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"\xff\xfe garbage", "invalid UTF-8"),
        (b"{not json", "invalid JSON"),
        (b"[1,2,3]", "not a JSON object but list"),
        (b'{"t":"warp"}', "unknown frame type 'warp'"),
        (b'{"seq":1}', "missing field 't'"),
        (b'{"t":"ack","seq":"7","ok":true}', "field 'seq' must be int, got str"),
        (b'{"t":"ack","seq":true,"ok":true}', "field 'seq' must be int, got bool"),
        (b'{"t":"ack","seq":-1,"ok":true}', "field 'seq' out of range"),
        (b'{"t":"ack","seq":1,"ok":"yes"}', "field 'ok' must be bool, got str"),
        (b'{"t":"state","values":[1]}', "field 'values' must be dict, got list"),
        (b'{"t":"req","seq":1,"op":5}', "field 'op' must be str, got int"),
        (b'{"t":"state","values":{"x":NaN}}', "NaN is not JSON"),
        (b"[" * 100_00 + b"]" * 100_00, "invalid JSON"),
    ],
)
def test_a_bad_line_is_reported_in_place_and_the_next_line_still_decodes(
    line: bytes, reason: str
) -> None:
    out = JsonLineDecoder().feed(b'{"t":"ping"}\n' + line + b'\n{"t":"pong"}\n')
    assert out[0] == Ping()
    assert isinstance(out[1], Malformed)
    assert reason in out[1].reason
    assert len(out[1].sample) <= 80
    assert out[2] == Pong()
    assert len(out) == 3


def test_an_overlong_line_is_reported_once_and_skipped_without_buffering_it() -> None:
    decoder = JsonLineDecoder()
    out = []
    for _ in range(10):  # 10 × 20 KiB without a newline: 200 KiB > 64 KiB
        out += decoder.feed(b"x" * 20_000)
        assert decoder.buffered <= MAX_LINE
    out += decoder.feed(b'tail\n{"t":"ping"}\n')
    assert len(out) == 2
    assert isinstance(out[0], Malformed)
    assert out[0].reason == f"line longer than {MAX_LINE} bytes"
    assert out[1] == Ping()


def test_a_line_of_exactly_the_limit_is_accepted() -> None:
    pad = MAX_LINE - len(b'{"t":"state","values":{"p":""}}')
    line = b'{"t":"state","values":{"p":"' + b"a" * pad + b'"}}'
    assert len(line) == MAX_LINE
    (frame,) = JsonLineDecoder().feed(line + b"\n")
    assert isinstance(frame, StatePush)


def _state_nested(levels: int) -> bytes:
    """A state push whose frame nests ``levels`` deep (the frame object is level 1)."""
    inner = "[" * (levels - 2) + "]" * (levels - 2)
    return f'{{"t":"state","values":{{"v":{inner}}}}}'.encode()


def test_nesting_is_limited_to_max_depth_whatever_the_stack() -> None:
    at_limit, over = _state_nested(MAX_DEPTH), _state_nested(MAX_DEPTH + 1)
    out = JsonLineDecoder().feed(at_limit + b"\n" + over + b"\n" + _state_nested(5000) + b"\n")
    assert isinstance(out[0], StatePush)
    assert out[1:] == [
        Malformed(f"nested deeper than {MAX_DEPTH} levels", over[:80]),
        Malformed("invalid JSON: nested too deeply", _state_nested(5000)[:80]),
    ]
    # Brackets inside strings are text, not nesting.
    text = "[{" * 1000
    assert JsonLineDecoder().feed(
        json.dumps({"t": "state", "values": {"s": text}}).encode() + b"\n"
    ) == [StatePush(values={"s": text})]
    deep: list[object] = []
    for _ in range(MAX_DEPTH):
        deep = [deep]
    with pytest.raises(InvalidRequestError, match=f"nested deeper than {MAX_DEPTH} levels"):
        encode_frame(Req(seq=1, op="set", args={"v": deep}))


def test_blank_lines_and_crlf_are_tolerated() -> None:
    assert JsonLineDecoder().feed(b'\n\r\n{"t":"ping"}\r\n') == [Ping()]


frames = st.one_of(
    st.builds(Ping),
    st.builds(Pong),
    st.builds(
        Req,
        seq=st.integers(0, 2**32 - 1),
        op=st.text(min_size=1, max_size=20),
        args=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=20)),
        key=st.none() | st.text(min_size=1, max_size=10),
    ),
    st.builds(
        Ack,
        seq=st.integers(0, 2**32 - 1),
        ok=st.just(True),
        result=st.dictionaries(st.text(max_size=5), st.booleans()),
        extra=st.dictionaries(st.sampled_from(["rssi", "device"]), st.integers(-100, 0)),
    ),
    st.builds(
        StatePush,
        values=st.dictionaries(
            st.text(max_size=5), st.floats(allow_nan=False, allow_infinity=False)
        ),
    ),
)


@given(items=st.lists(frames, max_size=20), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_frames_split_anywhere_decode_to_the_same_frames(
    items: list[object], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(f) for f in items)  # type: ignore[arg-type]
    points = sorted({c % (len(wire) + 1) for c in cuts})
    decoder = JsonLineDecoder()
    out: list[object] = []
    start = 0
    for point in [*points, len(wire)]:
        out += decoder.feed(wire[start:point])
        start = point
    assert out == items


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise_and_never_invent_frames_from_garbage(data: bytes) -> None:
    out = JsonLineDecoder().feed(data + b"\n")
    for item in out:
        if not isinstance(item, Malformed):
            # Anything that decoded really is a frame on the wire.
            assert isinstance(
                item, Ping | Pong | Ack | Req | StatePush | Hello | Welcome | ErrorFrame
            )


def test_encoding_is_compact_json_one_object_a_line() -> None:
    data = encode_frame(Req(seq=3, op="set", args={"a": "é"}, key="k"))
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {"t": "req", "seq": 3, "op": "set", "args": {"a": "é"}, "key": "k"}


@pytest.mark.parametrize(
    "frame",
    [
        Req(seq=1, op="set", args={"x": float("nan")}),
        Req(seq=1, op="set", args={"x": object()}),
        Req(seq=2**32, op="set"),
        Req(seq=1, op="set", args={"blob": "a" * MAX_LINE}),
    ],
)
def test_frames_that_cannot_go_on_the_wire_are_invalid_requests(frame: Req) -> None:
    with pytest.raises(InvalidRequestError) as info:
        encode_frame(frame)
    assert info.value.code == "invalid_request"


def test_a_frame_with_an_unpaired_surrogate_is_malformed_and_a_pair_is_text() -> None:
    """ "\\ud800" alone is valid JSON but not text: it once reached the store, which refused
    the settled command, leaving it sending for good."""
    decoder = JsonLineDecoder()
    lone, paired = decoder.feed(
        b'{"t":"ack","seq":1,"ok":false,"code":"\\ud800","msg":"x"}\n'
        b'{"t":"ack","seq":2,"ok":true,"result":{"e":"\\ud83d\\ude00"}}\n'
    )
    assert isinstance(lone, Malformed)
    assert "unpaired UTF-16 surrogate" in lone.reason
    assert isinstance(paired, Ack)
    assert paired.result == {"e": "\U0001f600"}


def test_a_number_too_large_for_a_double_is_malformed_and_the_largest_one_is_a_number() -> None:
    """1e400 is valid JSON text, but it is no number a double holds: Python reads it as
    infinity, which no store keeps (a settled command with it stayed sending for good)."""
    decoder = JsonLineDecoder()
    huge, negative, largest = decoder.feed(
        b'{"t":"ack","seq":1,"ok":true,"result":{"v":1e400}}\n'
        b'{"t":"state","values":{"v":-1e999}}\n'
        b'{"t":"ack","seq":2,"ok":true,"result":{"v":1.7976931348623157e308}}\n'
    )
    assert isinstance(huge, Malformed) and "too large" in huge.reason
    assert isinstance(negative, Malformed) and "too large" in negative.reason
    assert isinstance(largest, Ack)
    assert largest.result == {"v": 1.7976931348623157e308}


def test_an_error_keeps_text_a_store_takes() -> None:
    info = ErrorInfo.of(RejectedError("a\ud800b\x00c" + "m" * 5000, wire_code="busy\ud800"))
    info.message.encode("utf-8")  # valid text now
    assert info.code == "busy\ufffd\ufffd\ufffd"
    assert "\x00" not in info.message
    assert info.message.startswith("a") and len(info.message) == 1000
    assert info.message.endswith("…")


@pytest.mark.parametrize(
    "line",
    [b'{"t":"ping"}{"t":"pong"}', b'{"t":"ping"} {}', b'{"t":"ping"', b"{}}", b'{"a":1}]}'],
)
def test_a_line_that_looks_like_one_object_but_is_not_is_malformed(line: bytes) -> None:
    [item] = JsonLineDecoder().feed(line + b"\n")
    assert isinstance(item, Malformed)
    assert item.reason.startswith("invalid JSON: ")
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads(line)
    assert item.reason == f"invalid JSON: {info.value}"


@pytest.mark.parametrize("line", [b' {"t":"ping"}', b'{"t":"ping"} ', b'\t{"t":"ping"}\t'])
def test_whitespace_around_the_object_is_allowed(line: bytes) -> None:
    assert JsonLineDecoder().feed(line + b"\n") == [Ping()]
