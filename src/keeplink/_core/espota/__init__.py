"""ESPHome's native OTA protocol ("espota2"), sans-IO: the client that sends an image and
the device that receives it.

Bytes in, bytes and events out; nothing here awaits, reads a clock or touches a socket. A
caller connects to the device's OTA port (3232 on an ESP32, 8266 on an ESP8266), writes
:meth:`OtaClient.start`, then feeds every read to :meth:`OtaClient.receive_data` and writes
what each :class:`ClientStep` says. :class:`OtaDevice` is the other end, for simulators.

The exchange, as ESPHome's firmware and its reference uploader speak it::

    client → device                           device → client
    magic 6C 26 F7 5C 45                      00, protocol version (1 or 2)
    features (01 gzip, 02 SHA-256 auth,       40 (header ok) or 46 (gzip accepted), or for
      04 extended protocol)                     the extended protocol 48 + server flags
                                              41 (no password), or a challenge:
                                                01 + 32 hex (MD5, old firmware) or
                                                02 + 64 hex (SHA-256, current firmware)
    cnonce hex + hex(H(password+nonce+cnonce)) 41, or 82 (wrong password)
    [extended: OTA type 00] + size (4 bytes)  42 (flash prepared)
    MD5 of the payload, 32 hex                43
    the payload                               version 2: 47 per 8192 bytes received (and
                                                one for the tail)
                                              44 (all received), then 45 (verified, installed)
    00                                        (the device reboots)

Any error: the device writes one byte of 80..FF and closes. There is no resume: a session
that breaks starts again from byte 0. Once the device holds the whole image it verifies,
installs and reboots on its own, so a connection lost after that point does not say
whether the update took (:attr:`OtaClient.committed`).
"""

from __future__ import annotations

from keeplink._core.espota._client import (
    Authenticated,
    ChunkAcknowledged,
    ClientEvent,
    ClientState,
    ClientStep,
    FeaturesAgreed,
    ImageReceived,
    OtaClient,
    TransferStarted,
    UpdateVerified,
    VersionAgreed,
)
from keeplink._core.espota._device import (
    DeviceAuth,
    DeviceEvent,
    DeviceState,
    DeviceStep,
    ImageProgress,
    OtaDevice,
    OtaFault,
    UpdateCompleted,
    UpdateFailed,
    UpdateStarted,
)
from keeplink._core.espota._wire import (
    BLOCK_SIZE,
    DATA_TIMEOUT_S,
    DEVICE_ERRORS,
    HANDSHAKE_TIMEOUT_S,
    MAGIC,
    DeviceError,
    OtaRefusedError,
    Response,
)

__all__ = [
    "BLOCK_SIZE",
    "DATA_TIMEOUT_S",
    "DEVICE_ERRORS",
    "HANDSHAKE_TIMEOUT_S",
    "MAGIC",
    "Authenticated",
    "ChunkAcknowledged",
    "ClientEvent",
    "ClientState",
    "ClientStep",
    "DeviceAuth",
    "DeviceError",
    "DeviceEvent",
    "DeviceState",
    "DeviceStep",
    "FeaturesAgreed",
    "ImageProgress",
    "ImageReceived",
    "OtaClient",
    "OtaDevice",
    "OtaFault",
    "OtaRefusedError",
    "Response",
    "TransferStarted",
    "UpdateCompleted",
    "UpdateFailed",
    "UpdateStarted",
    "UpdateVerified",
    "VersionAgreed",
]
