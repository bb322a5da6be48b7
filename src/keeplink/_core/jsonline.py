"""The jsonline reference protocol, sans-IO: typed frames, a decoder and an encoder.

Newline-delimited JSON objects, UTF-8, one object a line, at most 64 KiB a line, nested
at most 64 levels deep.
Bytes go in, frames come out; frames go in, bytes come out. Nothing here
touches a socket or a clock.

A line that is not a valid frame (bad UTF-8, bad JSON, not an object, unknown type, a field
of the wrong type, too long, nested too deeply) becomes a :class:`Malformed` item in the
decoder's output, in its place among the frames: it is the caller's to count and log. It
never raises and never disturbs the frames around it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from keeplink._core.errors import InvalidRequestError

__all__ = [
    "MAX_DEPTH",
    "MAX_LINE",
    "PROTOCOL_VERSION",
    "Ack",
    "ErrorFrame",
    "Frame",
    "Hello",
    "JsonLineDecoder",
    "Malformed",
    "Ping",
    "Pong",
    "Req",
    "StatePush",
    "Welcome",
    "encode_frame",
    "encoded_request",
    "load_object",
    "renumbered_request",
]

MAX_LINE: Final = 64 * 1024
"""Longest line in bytes, newline excluded."""
MAX_DEPTH: Final = 64
"""Deepest nesting of objects and arrays in a frame, the frame itself at level 1. Far more
than any device's result needs, and far below the interpreter's recursion limit wherever a
frame is decoded, stored or served: without it, how deep a frame may be would depend on how
deep the stack happens to be (a result 900 levels deep decodes, then breaks whatever walks
it next)."""
PROTOCOL_VERSION: Final = 1
_MAX_SEQ: Final = 2**32 - 1
_SAMPLE: Final = 80  # bytes of a bad line kept for the log: enough to recognise, never a dump


@dataclass(frozen=True, slots=True)
class Hello:
    token: str | None = None
    v: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Welcome:
    device: str
    fw: str | None = None
    v: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    code: str
    msg: str = ""


@dataclass(frozen=True, slots=True)
class Req:
    seq: int
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None
    wire: bytes | None = field(default=None, compare=False, repr=False)
    """The frame's line, when it was encoded in advance (:func:`encoded_request`)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """A reply. ``ok`` true carries ``result``; false carries the device's ``code``/``msg``.

    ``extra`` holds side data beyond the protocol's fields (e.g. ``rssi``).
    """

    seq: int
    ok: bool
    result: Mapping[str, Any] | None = None
    code: str | None = None
    msg: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class StatePush:
    """A device's unsolicited state push: ``{"t":"state","values":{...}}`` on the wire.

    A link hands it to its subscribers as :class:`~keeplink.FrameReceived` (``frame``), so
    match it by this public name, ``keeplink.StatePush``::

        def on_event(event):
            if isinstance(event, FrameReceived) and isinstance(event.frame, StatePush):
                print(event.frame.values)  # e.g. {"temp": 21.5}

    ``values`` is the JSON object the device sent, as decoded.
    """

    values: Mapping[str, Any]


Frame: TypeAlias = Hello | Welcome | ErrorFrame | Req | Ack | Ping | Pong | StatePush


@dataclass(frozen=True, slots=True)
class Malformed:
    """A line that is not a valid frame: why, and the first bytes of it."""

    reason: str
    sample: bytes


class _BadFrame(Exception):
    """Internal: a field check failed while parsing one line."""


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise _BadFrame(f"missing field {name!r}")
    value = obj[name]
    if (
        isinstance(value, bool)
        and kind is not bool
        and not (isinstance(kind, tuple) and bool in kind)
    ):
        raise _BadFrame(f"field {name!r} must be {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise _BadFrame(f"field {name!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _optional(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if obj.get(name) is None:
        return None
    return _field(obj, name, kind)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _seq(obj: Mapping[str, Any]) -> int:
    seq: int = _field(obj, "seq", int)
    if not 0 <= seq <= _MAX_SEQ:
        raise _BadFrame(f"field 'seq' out of range: {seq}")
    return seq


_ACK_FIELDS: Final = frozenset({"t", "seq", "ok", "result", "code", "msg"})


def _ack_fast(obj: Mapping[str, Any]) -> Ack | None:
    """The common, well-formed ack, checked by exact type (what the JSON decoder makes).
    None: not sure, so :func:`_parse` checks it field by field and says what is wrong."""
    ok = obj.get("ok")
    seq = obj.get("seq")
    result = obj.get("result")
    code = obj.get("code")
    msg = obj.get("msg")
    if type(ok) is not bool or type(seq) is not int or not 0 <= seq <= _MAX_SEQ:
        return None
    if result is not None and type(result) is not dict:
        return None
    if (code is not None and type(code) is not str) or (msg is not None and type(msg) is not str):
        return None
    if not ok and code is None:
        code = "rejected"
    if obj.keys() <= _ACK_FIELDS:
        extra: dict[str, Any] = {}
    else:
        extra = {k: v for k, v in obj.items() if k not in _ACK_FIELDS}
    return Ack(seq=seq, ok=ok, result=result, code=code, msg=msg, extra=extra)


def _parse(obj: Mapping[str, Any]) -> Frame:
    if obj.get("t") == "ack" and (ack := _ack_fast(obj)) is not None:
        return ack  # the hot path: one reply per request
    kind = _field(obj, "t", str)
    if kind == "ack":
        ok: bool = _field(obj, "ok", bool)
        extra = {k: v for k, v in obj.items() if k not in _ACK_FIELDS}
        code = _optional(obj, "code", str)
        if not ok and code is None:
            code = "rejected"
        return Ack(
            seq=_seq(obj),
            ok=ok,
            result=_optional(obj, "result", dict),
            code=code,
            msg=_optional(obj, "msg", str),
            extra=extra,
        )
    if kind == "state":
        return StatePush(values=_field(obj, "values", dict))
    if kind == "ping":
        return Ping()
    if kind == "pong":
        return Pong()
    if kind == "req":
        args = _optional(obj, "args", dict)
        return Req(
            seq=_seq(obj),
            op=_field(obj, "op", str),
            args=args if args is not None else {},
            key=_optional(obj, "key", str),
        )
    if kind == "hello":
        v = _optional(obj, "v", int)
        return Hello(token=_optional(obj, "token", str), v=v if v is not None else 1)
    if kind == "welcome":
        v = _optional(obj, "v", int)
        return Welcome(
            device=_field(obj, "device", str),
            fw=_optional(obj, "fw", str),
            v=v if v is not None else 1,
        )
    if kind == "error":
        msg = _optional(obj, "msg", str)
        return ErrorFrame(code=_field(obj, "code", str), msg=msg if msg is not None else "")
    raise _BadFrame(f"unknown frame type {kind!r}")


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and neither do we.
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # 1e400 is JSON, but no double holds it: read as infinity, no store could keep it.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large for a double")
    return value


# Built once: json.loads() and json.dumps() with options build a new decoder or encoder on
# every call, which costs more than the work on a short frame. Both are stateless.
_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite)
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _deeper_than(value: object, limit: int) -> bool:
    """Whether ``value`` nests objects/arrays more than ``limit`` levels (without recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: object) -> bool:
    """Whether a string in ``value`` (a key or a value, at any depth) is not valid text."""
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _may_nest_deeper(text: bytes | str, limit: int) -> bool:
    """A fast bound: a text with at most ``limit`` opening brackets cannot nest deeper."""
    if isinstance(text, str):
        return text.count("[") + text.count("{") > limit
    return text.count(b"[") + text.count(b"{") > limit


def load_object(data: bytes) -> dict[str, Any]:
    """``data`` as a JSON object every store, log and answer of keeplink can keep, or a
    ValueError that says why not: not UTF-8, not JSON (NaN and Infinity are not), not an
    object, a number too large for a double, nested deeper than MAX_DEPTH, or a string
    with an unpaired UTF-16 surrogate. What a device sends is read through this, whatever
    its protocol."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None
    try:
        # A line that is one object and nothing else (what devices send): raw_decode
        # alone, without decode()'s two whitespace scans; anything else goes through
        # decode(), which also words the errors.
        if text[:1] == "{" and text[-1:] == "}":
            obj, end = _DECODER.raw_decode(text)
            if end != len(text):
                obj = _DECODER.decode(text)
        else:
            obj = _DECODER.decode(text)
    except ValueError as exc:  # JSONDecodeError, and the NaN/Infinity/overflow refusals
        raise ValueError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object but {type(obj).__name__}")
    if _may_nest_deeper(data, MAX_DEPTH) and _deeper_than(obj, MAX_DEPTH):
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and _lone_surrogate(obj):
        # "\ud800" alone is valid JSON but not text: no store or log can keep it.
        raise ValueError("a string holds an unpaired UTF-16 surrogate")
    return obj


def _decode_line(line: bytes) -> Frame | Malformed:
    try:
        obj = load_object(line)
    except ValueError as exc:
        return Malformed(str(exc), line[:_SAMPLE])
    try:
        return _parse(obj)
    except _BadFrame as exc:
        return Malformed(str(exc), line[:_SAMPLE])


class JsonLineDecoder:
    """Bytes in, frames (and :class:`Malformed` items) out, in wire order.

    A line longer than ``max_line`` is reported once as malformed and skipped up to its
    newline, without buffering it: memory stays bounded whatever the peer sends.
    """

    __slots__ = ("_buffer", "_discarding", "max_line")

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[Frame | Malformed]:
        """Consume ``data``; return every item completed by it."""
        buffer = self._buffer
        if data and not buffer and not self._discarding and data.find(b"\n") == len(data) - 1:
            # The usual case, one whole line in one read: nothing to buffer.
            line = bytes(data[:-1]).rstrip(b"\r")
            if len(line) > self.max_line:
                return [self._too_long(line[:_SAMPLE])]
            return [_decode_line(line)] if line[:1] == b"{" or line.strip() else []
        out: list[Frame | Malformed] = []
        buffer += data
        start = 0
        while True:
            newline = buffer.find(b"\n", start)
            if newline < 0:
                break
            if self._discarding:
                self._discarding = False
            else:
                line = bytes(buffer[start:newline]).rstrip(b"\r")
                if len(line) > self.max_line:
                    out.append(self._too_long(line[:_SAMPLE]))
                elif line.strip():
                    out.append(_decode_line(line))
            start = newline + 1
        del buffer[:start]
        if len(buffer) > self.max_line:
            if not self._discarding:
                out.append(self._too_long(bytes(buffer[:_SAMPLE])))
                self._discarding = True
            buffer.clear()
        return out

    def _too_long(self, sample: bytes) -> Malformed:
        return Malformed(f"line longer than {self.max_line} bytes", sample)

    @property
    def buffered(self) -> int:
        """Bytes held waiting for a newline."""
        return len(self._buffer)


def _frame_to_obj(frame: Frame) -> dict[str, Any]:
    if isinstance(frame, Req):
        obj: dict[str, Any] = {
            "t": "req",
            "seq": frame.seq,
            "op": frame.op,
            "args": dict(frame.args),
        }
        if frame.key is not None:
            obj["key"] = frame.key
        return obj
    if isinstance(frame, Ack):
        obj = {"t": "ack", "seq": frame.seq, "ok": frame.ok}
        if frame.result is not None:
            obj["result"] = dict(frame.result)
        if frame.code is not None:
            obj["code"] = frame.code
        if frame.msg is not None:
            obj["msg"] = frame.msg
        for key, value in frame.extra.items():
            if key not in _ACK_FIELDS:
                obj[key] = value
        return obj
    if isinstance(frame, Ping):
        return {"t": "ping"}
    if isinstance(frame, Pong):
        return {"t": "pong"}
    if isinstance(frame, StatePush):
        return {"t": "state", "values": dict(frame.values)}
    if isinstance(frame, Hello):
        obj = {"t": "hello", "v": frame.v}
        if frame.token is not None:
            obj["token"] = frame.token
        return obj
    if isinstance(frame, Welcome):
        obj = {"t": "welcome", "v": frame.v, "device": frame.device}
        if frame.fw is not None:
            obj["fw"] = frame.fw
        return obj
    return {"t": "error", "code": frame.code, "msg": frame.msg}


def encoded_request(
    seq: int, op: str, args: Mapping[str, Any], key: str | None, *, max_line: int = MAX_LINE
) -> Req:
    """A request frame, encoded once now (raising InvalidRequestError if it cannot be),
    carrying its line so that sending it does not encode it again."""
    obj: dict[str, Any] = {"t": "req", "seq": seq, "op": op, "args": args}
    if key is not None:
        obj["key"] = key
    if not 0 <= seq <= _MAX_SEQ:
        raise InvalidRequestError(f"seq {seq} is outside 0..{_MAX_SEQ}")
    return Req(seq=seq, op=op, args=args, key=key, wire=_encode_obj(obj, max_line))


_REQ_HEAD: Final = b'{"t":"req","seq":'


def renumbered_request(frame: Req, seq: int, *, max_line: int = MAX_LINE) -> Req:
    """``frame`` (made by :func:`encoded_request`) under sequence number ``seq``: its line
    is re-made around the new number, its arguments are not encoded again. Raises
    InvalidRequestError like :func:`encoded_request`."""
    wire = frame.wire
    if wire is None or not wire.startswith(_REQ_HEAD) or not 0 <= seq <= _MAX_SEQ:
        return encoded_request(seq, frame.op, frame.args, frame.key, max_line=max_line)
    line = b"%s%d%s" % (_REQ_HEAD, seq, wire[wire.index(b",", len(_REQ_HEAD)) :])
    if len(line) - 1 > max_line:
        raise InvalidRequestError(
            f"encoded frame is {len(line) - 1} bytes, over the {max_line}-byte line limit"
        )
    return Req(seq=seq, op=frame.op, args=frame.args, key=frame.key, wire=line)


def encode_frame(frame: Frame, *, max_line: int = MAX_LINE) -> bytes:
    """Serialize one frame to one line (newline included).

    Raises :class:`InvalidRequestError` if the frame holds values JSON cannot carry, a
    sequence number outside 32 bits, nests deeper than :data:`MAX_DEPTH`, or would exceed
    ``max_line`` bytes.
    """
    if isinstance(frame, Req) and frame.wire is not None:
        return frame.wire
    if isinstance(frame, Req | Ack) and not 0 <= frame.seq <= _MAX_SEQ:
        raise InvalidRequestError(f"seq {frame.seq} is outside 0..{_MAX_SEQ}")
    return _encode_obj(_frame_to_obj(frame), max_line)


def _encode_obj(obj: dict[str, Any], max_line: int) -> bytes:
    try:
        text = _ENCODER.encode(obj)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"frame cannot be encoded as JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRequestError("frame cannot be encoded as JSON: nested too deeply") from exc
    if _may_nest_deeper(text, MAX_DEPTH) and _deeper_than(obj, MAX_DEPTH):
        raise InvalidRequestError(f"frame is nested deeper than {MAX_DEPTH} levels")
    data = text.encode("utf-8")
    if len(data) > max_line:
        raise InvalidRequestError(
            f"encoded frame is {len(data)} bytes, over the {max_line}-byte line limit"
        )
    return data + b"\n"
