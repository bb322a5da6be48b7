"""espota2 on the wire: magic, versions, features, the device's answers and its errors."""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from keeplink._core.errors import (
    AuthError,
    ErrorCode,
    ProtocolError,
    RejectedError,
)

MAGIC: Final = bytes([0x6C, 0x26, 0xF7, 0x5C, 0x45])
BLOCK_SIZE: Final = 8192
"""The device acknowledges every 8192 bytes it received (protocol version 2), whatever
sizes the client writes; the reference uploader writes blocks of this size."""
HANDSHAKE_TIMEOUT_S: Final = 20.0
"""The device gives up on a client that has not finished the handshake in 20 s."""
DATA_TIMEOUT_S: Final = 105.0
"""The device gives up after 105 s without data (current firmware; it covers lwIP's
retransmit run for a lost chunk ack: 1.5 + 3 + 6 + 12 + 24 + 48 s)."""

FEATURE_COMPRESSION: Final = 0x01
FEATURE_SHA256_AUTH: Final = 0x02
FEATURE_EXTENDED: Final = 0x04
SERVER_COMPRESSION: Final = 0x01
SERVER_PARTITION_ACCESS: Final = 0x02
OTA_TYPE_APP: Final = 0x00
SUPPORTED_VERSIONS: Final = (1, 2)


class Response(enum.IntEnum):
    """The device's one-byte answers (ESPHome's ``OTAResponseTypes``)."""

    OK = 0x00
    REQUEST_AUTH = 0x01
    REQUEST_SHA256_AUTH = 0x02
    HEADER_OK = 0x40
    AUTH_OK = 0x41
    UPDATE_PREPARE_OK = 0x42
    BIN_MD5_OK = 0x43
    RECEIVE_OK = 0x44
    UPDATE_END_OK = 0x45
    SUPPORTS_COMPRESSION = 0x46
    CHUNK_OK = 0x47
    FEATURE_FLAGS = 0x48
    ERROR_MAGIC = 0x80
    ERROR_UPDATE_PREPARE = 0x81
    ERROR_AUTH_INVALID = 0x82
    ERROR_WRITING_FLASH = 0x83
    ERROR_UPDATE_END = 0x84
    ERROR_INVALID_BOOTSTRAPPING = 0x85
    ERROR_WRONG_CURRENT_FLASH_CONFIG = 0x86
    ERROR_WRONG_NEW_FLASH_CONFIG = 0x87
    ERROR_ESP8266_NOT_ENOUGH_SPACE = 0x88
    ERROR_ESP32_NOT_ENOUGH_SPACE = 0x89
    ERROR_NO_UPDATE_PARTITION = 0x8A
    ERROR_MD5_MISMATCH = 0x8B
    ERROR_RP2040_NOT_ENOUGH_SPACE = 0x8C
    ERROR_SIGNATURE_INVALID = 0x8D
    ERROR_UNSUPPORTED_OTA_TYPE = 0x8E
    ERROR_PARTITION_TABLE_VERIFY = 0x8F
    ERROR_PARTITION_TABLE_UPDATE = 0x90
    ERROR_BOOTLOADER_VERIFY = 0x91
    ERROR_BOOTLOADER_UPDATE = 0x92
    ERROR_VERSION_DOWNGRADE = 0x93
    ERROR_ENCRYPTION_REQUIRED = 0x94
    ERROR_UNKNOWN = 0xFF


# ---------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class DeviceError:
    """What an error byte from the device means."""

    wire_code: str
    """The code it travels under (an ErrorCode value where one fits, else its own word)."""
    retryable: bool
    """Whether sending the image again may succeed without a person doing something."""
    message: str


DEVICE_ERRORS: Final[Mapping[int, DeviceError]] = {
    Response.ERROR_MAGIC: DeviceError(
        "protocol_error", False, "the device did not recognise the OTA magic bytes"
    ),
    Response.ERROR_UPDATE_PREPARE: DeviceError(
        "update_prepare_failed", False,
        "the device could not prepare its flash (is the image too big? restart the device)",
    ),
    Response.ERROR_AUTH_INVALID: DeviceError(
        "auth_failed", False, "the device refused the OTA password"
    ),
    Response.ERROR_WRITING_FLASH: DeviceError(
        "flash_write_failed", True, "the device failed to write the image to flash"
    ),
    Response.ERROR_UPDATE_END: DeviceError(
        "update_end_failed", True, "the device could not finish the update"
    ),
    Response.ERROR_INVALID_BOOTSTRAPPING: DeviceError(
        "invalid_bootstrapping", False,
        "the device needs a manual reset after its first serial flash",
    ),
    Response.ERROR_WRONG_CURRENT_FLASH_CONFIG: DeviceError(
        "wrong_current_flash_config", False,
        "the running firmware was built for another flash size; flash over USB",
    ),
    Response.ERROR_WRONG_NEW_FLASH_CONFIG: DeviceError(
        "wrong_new_flash_config", False,
        "the image was built for a flash size this device does not have",
    ),
    Response.ERROR_ESP8266_NOT_ENOUGH_SPACE: DeviceError(
        "not_enough_space", False, "the ESP8266 has no room for the image"
    ),
    Response.ERROR_ESP32_NOT_ENOUGH_SPACE: DeviceError(
        "not_enough_space", False, "the ESP32's OTA partition is too small for the image"
    ),
    Response.ERROR_NO_UPDATE_PARTITION: DeviceError(
        "no_update_partition", False, "the device has no OTA partition"
    ),
    Response.ERROR_MD5_MISMATCH: DeviceError(
        "checksum_mismatch", True, "the image the device received does not match its MD5"
    ),
    Response.ERROR_RP2040_NOT_ENOUGH_SPACE: DeviceError(
        "not_enough_space", False, "the RP2040 has no room for the image"
    ),
    Response.ERROR_SIGNATURE_INVALID: DeviceError(
        "signature_invalid", False, "the device refused the image's signature"
    ),
    Response.ERROR_UNSUPPORTED_OTA_TYPE: DeviceError(
        "unsupported_ota_type", False, "the device does not support this kind of update"
    ),
    Response.ERROR_PARTITION_TABLE_VERIFY: DeviceError(
        "partition_table_verify_failed", True, "the partition table could not be verified"
    ),
    Response.ERROR_PARTITION_TABLE_UPDATE: DeviceError(
        "partition_table_update_failed", False, "updating the partition table failed"
    ),
    Response.ERROR_BOOTLOADER_VERIFY: DeviceError(
        "bootloader_verify_failed", True, "the bootloader could not be verified"
    ),
    Response.ERROR_BOOTLOADER_UPDATE: DeviceError(
        "bootloader_update_failed", False, "updating the bootloader failed"
    ),
    Response.ERROR_VERSION_DOWNGRADE: DeviceError(
        "version_downgrade", False,
        "the device refuses an image that is not newer than the one it runs",
    ),
    Response.ERROR_ENCRYPTION_REQUIRED: DeviceError(
        "encryption_required", False, "the device accepts only encrypted OTA sessions"
    ),
    Response.ERROR_UNKNOWN: DeviceError(
        "device_error", True, "the device failed the update (unknown error)"
    ),
}  # fmt: skip
"""Every error byte the firmware sends. Retryable ones are worth a new upload within
bounds (a glitch in flash or on the way); the rest need a person or another image."""


class OtaRefusedError(RejectedError):
    """The device answered with an error byte (other than a wrong password or bad magic).

    ``response`` is the byte, ``retryable`` whether a new upload may succeed; ``wire_code``
    is the :data:`DEVICE_ERRORS` word for it (``checksum_mismatch`` has that ErrorCode).
    """

    def __init__(self, response: int, spec: DeviceError, *, stage: str) -> None:
        code = ErrorCode.CHECKSUM_MISMATCH if spec.wire_code == "checksum_mismatch" else None
        super().__init__(
            f"{spec.message} (0x{response:02X}, {stage})",
            code=code if code is not None else ErrorCode.REJECTED,
            wire_code=spec.wire_code,
        )
        self.response = response
        self.retryable = spec.retryable


def error_for(response: int, stage: str) -> AuthError | ProtocolError | OtaRefusedError:
    """The typed error for an error byte from the device (``stage``: what we waited for)."""
    spec = DEVICE_ERRORS.get(response)
    if response == Response.ERROR_AUTH_INVALID:
        assert spec is not None
        return AuthError(f"{spec.message} (0x82, {stage})")
    if response == Response.ERROR_MAGIC:
        assert spec is not None
        return ProtocolError(f"{spec.message} (0x80, {stage})")
    if spec is None:
        spec = DeviceError(f"device_error_0x{response:02x}", False, "the device failed the update")
    return OtaRefusedError(response, spec, stage=stage)


def random_hex(length: int) -> str:
    """A nonce: ``length`` random hex digits."""
    return secrets.token_hex(length // 2)


def auth_answer(method: str, password: str, nonce: str, cnonce: str) -> str:
    """hex(H(password + nonce + cnonce)), H being SHA-256 or MD5 as ``method`` says."""
    hasher = hashlib.sha256() if method == "sha256" else hashlib.md5()
    hasher.update(password.encode("utf-8"))
    hasher.update(nonce.encode("ascii"))
    hasher.update(cnonce.encode("ascii"))
    return hasher.hexdigest()
