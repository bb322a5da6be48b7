"""Drivers: one module per protocol. :mod:`keeplink.drivers.jsonline` is the reference."""

from keeplink.drivers.jsonline import JsonLineCodec, JsonLineDriver, StatePush

__all__ = ["JsonLineCodec", "JsonLineDriver", "StatePush"]
