"""A thermostat client library on keeplink (``client.py``) and a program that runs it
(``__main__.py``: ``python -m examples.thermostat --help``)."""

from .client import (
    MAX_TARGET_C,
    MIN_TARGET_C,
    Mode,
    TargetResult,
    Thermostat,
    ThermostatError,
    ThermostatState,
)

__all__ = [
    "MAX_TARGET_C",
    "MIN_TARGET_C",
    "Mode",
    "TargetResult",
    "Thermostat",
    "ThermostatError",
    "ThermostatState",
]
