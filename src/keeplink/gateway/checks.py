"""Reading typed values out of a TOML table: each problem is a ConfigError naming the file,
the key (``devices[1].port``) and what is wrong with the value."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any, Final, NoReturn

from keeplink._core.errors import ConfigError

__all__ = ["MIN_TOKEN_CHARS", "Checker"]

MIN_TOKEN_CHARS: Final = 16
"""A bearer token shorter than this is a placeholder or guessable; the generated one has 24."""
_LABEL: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class Checker:
    """Reads values from a TOML table, raising ConfigError with file and key on trouble."""

    def __init__(self, source: str, where: str, table: Mapping[str, Any], allowed: set[str]):
        self.source = source
        self.where = where
        self.table = table
        unknown = sorted(set(table) - allowed)
        if unknown:
            self.fail(unknown[0], f"unknown key; expected one of {', '.join(sorted(allowed))}")

    def fail(self, key: str, problem: str) -> NoReturn:
        prefix = f"{self.where}.{key}" if self.where else key
        raise ConfigError(f"{self.source}: {prefix}: {problem}")

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        if key not in self.table:
            if required:
                self.fail(key, "is required")
            return default
        value = self.table[key]
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {value!r}")
        if "\x00" in value:
            self.fail(key, "must not contain a NUL character")
        return str(value)

    def host(self, key: str, default: str) -> str:
        """An IP address or a DNS name (labels of letters, digits and '-', 63 at most)."""
        value = self.text(key, default) or default
        try:
            ipaddress.ip_address(value.strip("[]"))
        except ValueError:
            labels = value.rstrip(".").split(".")
            if len(value) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
                self.fail(key, f"must be an IP address or a host name, got {value[:80]!r}")
        return value.strip("[]")

    def token(self, key: str) -> str | None:
        value = self.text(key)
        if value is not None and len(value) < MIN_TOKEN_CHARS:
            self.fail(
                key,
                f"must be at least {MIN_TOKEN_CHARS} characters, got {len(value)} "
                "(a short token is easy to guess)",
            )
        return value

    def integer(self, key: str, default: int | None, lo: int, hi: int) -> int | None:
        if key not in self.table:
            return default
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(key, f"must be an integer in {lo}..{hi}, got {value!r}")
        return int(value)

    def debounce(self, key: str, default: float) -> float:
        """A debounce: a finite number of seconds, 0 or more."""
        if key not in self.table:
            return default
        value = self.table[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            self.fail(key, f"must be a number of seconds, 0 or more, got {value!r}")
        return float(value)

    def factor(self, key: str, default: float) -> float:
        """A growth factor: a finite number, at least 1."""
        if key not in self.table:
            return default
        value = self.table[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not value >= 1
        ):
            self.fail(key, f"must be a number >= 1, got {value!r}")
        return float(value)

    def seconds(self, key: str, default: float | None, *, allow_none: bool = False) -> float | None:
        if key not in self.table:
            return default
        value = self.table[key]
        if allow_none and value is False:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not value > 0
        ):
            hint = " (or false to turn it off)" if allow_none else ""
            self.fail(key, f"must be a positive number of seconds{hint}, got {value!r}")
        return float(value)
