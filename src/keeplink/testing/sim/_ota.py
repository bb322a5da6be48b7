"""Firmware receiving: ``ota.begin``, ``ota.chunk`` and ``ota.end`` as a device answers
them. Bytes already held survive a dropped connection, so a transfer resumes."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keeplink.testing.sim._records import Refused


@dataclass(slots=True)
class _Image:
    size: int
    sha256: str
    data: bytearray = field(default_factory=bytearray)


class OtaReceiver:
    """The image being received, if any; each op returns the ack's result or raises
    :class:`Refused`."""

    def __init__(self) -> None:
        self._image: _Image | None = None

    def begin(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Start (or, for the same size and hash, resume) a transfer."""
        size, digest = args.get("size"), args.get("sha256")
        if not isinstance(size, int) or size < 0 or not isinstance(digest, str):
            raise Refused("invalid_request", "ota.begin needs size (int) and sha256 (str)")
        if self._image is None or (self._image.size, self._image.sha256) != (size, digest):
            self._image = _Image(size=size, sha256=digest)
        return {"offset": len(self._image.data)}

    def chunk(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self._image is None:
            raise Refused("invalid_request", "ota.chunk before ota.begin")
        offset, data = args.get("offset"), args.get("data")
        if not isinstance(offset, int) or not isinstance(data, str):
            raise Refused("invalid_request", "ota.chunk needs offset (int) and data (base64)")
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise Refused("invalid_request", f"ota.chunk data is not base64: {exc}") from exc
        held = len(self._image.data)
        if offset > held:
            raise Refused("invalid_request", f"ota.chunk offset {offset} beyond held {held}")
        if offset + len(raw) > self._image.size:
            raise Refused("invalid_request", "ota.chunk past the announced size")
        del self._image.data[offset:]
        self._image.data += raw
        return {"offset": len(self._image.data)}

    def end(self) -> tuple[dict[str, Any], bytes]:
        """Verify the image: the ack's result and the image to install. A mismatch
        forgets the image (the next transfer starts from 0)."""
        image = self._image
        if image is None:
            raise Refused("invalid_request", "ota.end before ota.begin")
        if len(image.data) != image.size or hashlib.sha256(image.data).hexdigest() != image.sha256:
            self._image = None
            raise Refused("checksum_mismatch", "image hash does not match")
        self._image = None
        return {"installed": True, "size": image.size}, bytes(image.data)
