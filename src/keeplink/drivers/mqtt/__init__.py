"""The MQTT driver: one link to a broker, many devices behind it (a hub link).

    presence = PresenceTracker()
    driver = MqttDriver(
        "broker.lan", 1883,
        client_id="keeplink-gw1",
        devices=["plug-1", "plug-2"],
        response_topic="{device}/resp",
    )
    MqttAvailability(driver, presence)  # keeplink.presence.mqtt: availability → presence
    async with Link(driver, name="broker", heartbeat_s=None) as link:
        await link.wait_connected()
        outcome = await link.request("set", {"device": "plug-1", "on": True}, timeout=5)

The link supervises the broker connection: every session is a fresh TCP (or TLS)
connection on keeplink's :class:`~keeplink.StreamChannel`, with MQTT packets read and
written by the sans-IO :mod:`mqtt5` codec. Keepalive is MQTT's own (``keepalive_s``), run
by the channel on the driver's clock: the driver has no heartbeat frame, so construct the
link with ``heartbeat_s=None``. A broker that stops answering PINGREQ is dropped within
about two keepalive periods, and that ends the channel like any other disconnect.

Why :mod:`mqtt5`: it is maintained, typed, sans-IO (bytes in, packets out), and what
aiomqtt 3 is built on. It speaks MQTT 5 only, so keeplink's session with the broker is
MQTT 5: Mosquitto (1.6 and later), EMQX, HiveMQ, VerneMQ and the large clouds' brokers take
it, and the devices keep speaking whatever they speak (3.1.1 mostly), since the broker
carries messages between versions. A broker that only knows 3.1.1 answers our CONNECT
the 3.1.1 way, and the link fails with a ConfigError that says so. MQTT 5 also says why a
broker refuses or ends a session (bad credentials, session taken over, keepalive
timeout), which keeplink's errors carry.

Wire contract, per configured device ``D`` (topics are the format strings, ``{device}`` → D;
QoS 1 both ways):

``availability_topic`` (device → us, retained, plus the device's last will)
    ``payload_online`` or ``payload_offline`` (anything else counts as offline). Told to
    the listeners of :meth:`MqttDriver.on_availability` as :class:`Availability`; when
    the broker session ends, they are told :class:`BrokerSessionEnded`: with the broker
    gone, what the messages said no longer holds.
``command_topic`` (us → device)
    ``{"op": OP, "args": ARGS, "key": IDEMPOTENCY_KEY or null, "cid": SEQ}``, UTF-8 JSON.
    ``ARGS`` is the request's args as given, ``device`` included. A device that sees a
    ``key`` again must acknowledge without applying it twice (delivery is at least once).
``response_topic`` (device → us, only when configured)
    ``{"cid": SEQ, "ok": true, "result": {...}}`` or
    ``{"cid": SEQ, "ok": false, "code": "CODE", "msg": "..."}``; other members are side data
    (e.g. ``"rssi": -61``). Correlation is by ``cid`` in the payload only. MQTT 5
    correlation data is not used: the payload field works with every device firmware, and
    3.1.1 is what most devices speak.

Without a response topic, a request is acknowledged when the broker's PUBACK arrives: the
broker has the command, which says nothing about the device having it (a PUBACK that
refuses it, e.g. ``not_authorized``, rejects the request with that code). The channel
puts a :class:`Delivered` frame carrying the request's sequence number into the incoming
stream, so the link's correlator resolves it like any reply. Sending returns once the
packet is written, without waiting for the PUBACK: a late PUBACK times one request out,
and never counts as a send timeout, which would close the session of every device behind
the broker.

A request on the link itself names its device in ``args["device"]`` (one of ``devices``);
anything else is an InvalidRequestError before a byte is sent. Through an
:class:`~keeplink.outbox.Outbox`, naming the device once is enough:
``outbox.submit("plug-1", "set", {"on": True})`` on a device attached with
``outbox.attach("plug-1", link, hub=True)`` is delivered with ``args["device"]`` filled in
from :meth:`MqttDriver.device_args`. Args that name the device themselves still work, and
args that name another device are refused at submit (an InvalidRequestError, nothing
stored).
"""

from __future__ import annotations

from keeplink.drivers.mqtt._channel import MqttChannel
from keeplink.drivers.mqtt._driver import MqttDriver
from keeplink.drivers.mqtt._frames import (
    Availability,
    BrokerSessionEnded,
    Delivered,
    Message,
    MqttFrame,
    Publish,
    Response,
    Subscribe,
)

__all__ = [
    "Availability",
    "BrokerSessionEnded",
    "Delivered",
    "Message",
    "MqttChannel",
    "MqttDriver",
    "MqttFrame",
    "Publish",
    "Response",
    "Subscribe",
]
