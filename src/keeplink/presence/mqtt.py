"""MQTT availability as a presence source (extra ``mqtt``).

    driver = MqttDriver("broker.lan", 1883, client_id="gw", devices=["plug-1"])
    source = MqttAvailability(driver, tracker)   # any PresenceSink

Each availability message the driver receives for one of its devices (the device's
retained ``online`` and its last will ``offline``) becomes a :attr:`Source.MQTT` claim with
no TTL: it holds until the device says otherwise. When the broker session ends the claims
are forgotten: with the broker gone, nothing it said about the devices still holds.
"""

from __future__ import annotations

from keeplink._core.presence import Source
from keeplink.drivers.mqtt import Availability, BrokerSessionEnded, MqttDriver
from keeplink.presence import PresenceSink

__all__ = ["MqttAvailability"]


class MqttAvailability:
    """Reports ``driver``'s availability messages to ``sink`` until :meth:`close`."""

    def __init__(self, driver: MqttDriver, sink: PresenceSink) -> None:
        self.driver = driver
        self.sink = sink
        self._remove = driver.on_availability(self._on_event)

    def _on_event(self, event: Availability | BrokerSessionEnded) -> None:
        if isinstance(event, Availability):
            self.sink.report(event.device, Source.MQTT, event.online)
            return
        for device in event.devices:
            self.sink.forget(device, Source.MQTT)

    def close(self) -> None:
        """Stop reporting (idempotent). Claims already made stay with the sink."""
        self._remove()

    def __repr__(self) -> str:
        return f"MqttAvailability({self.driver!r})"
