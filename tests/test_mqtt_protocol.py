"""The MQTT driver's sans-IO parts: packet framing over mqtt5, keepalive decisions, packet
ids, the publish window and the errors for what a broker says. No sockets, no clock."""

from __future__ import annotations

import mqtt5
import pytest

from keeplink._core.errors import (
    AuthError,
    ConfigError,
    ErrorCode,
    InvalidRequestError,
    LinkBrokenError,
    ProtocolError,
)
from keeplink._core.jsonline import Malformed
from keeplink.drivers.mqtt import Publish
from keeplink.drivers.mqtt._protocol import (
    Keepalive,
    KeepaliveAction,
    MqttCodec,
    PacketIds,
    PublishWindow,
    connack_error,
    publish_packet,
    session_error,
    suback_failure,
)

Q1 = mqtt5.QoS.AT_LEAST_ONCE
WAIT, PING, DEAD = KeepaliveAction.WAIT, KeepaliveAction.PING, KeepaliveAction.DEAD

# ---------------------------------------------------------------------------- codec

PACKETS: list[mqtt5.Packet] = [
    mqtt5.ConnAckPacket(receive_max=20),
    mqtt5.SubAckPacket(1, [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE]),
    mqtt5.PublishPacket("plug/availability", b"online", qos=Q1, retain=True, packet_id=7),
    mqtt5.PublishPacket("plug/resp", b"x" * 300, qos=Q1, packet_id=8),  # two length bytes
    mqtt5.PubAckPacket(2),
    mqtt5.PingRespPacket(),
    mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER),
]


def test_packets_split_anywhere_decode_whole_and_in_order() -> None:
    wire = b"".join(packet.write() for packet in PACKETS)
    for step in (1, 2, 3, 7, len(wire)):
        codec = MqttCodec()
        got: list[object] = []
        for at in range(0, len(wire), step):
            got.extend(codec.feed(wire[at : at + step]))
        assert got == PACKETS, f"fed {step} byte(s) at a time"


def test_a_bad_packet_is_malformed_and_the_next_one_still_decodes() -> None:
    codec = MqttCodec()
    bad = b"\x20\x02\x00\x00"  # a CONNACK without its properties' length
    items = codec.feed(bad + mqtt5.PingRespPacket().write())
    assert isinstance(items[0], Malformed) and items[0].sample == bad, items
    assert items[1:] == [mqtt5.PingRespPacket()]


def test_a_3_1_1_brokers_refusal_of_mqtt_5_reads_as_unsupported_protocol_version() -> None:
    assert MqttCodec().feed(b"\x20\x02\x00\x01") == [
        mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION)
    ]


def test_a_length_longer_than_four_bytes_stops_decoding_for_good() -> None:
    codec = MqttCodec()
    items = codec.feed(b"\x30\xff\xff\xff\xff\x01")
    assert len(items) == 1 and isinstance(items[0], Malformed), items
    assert "over 4 bytes" in items[0].reason
    assert codec.feed(mqtt5.PingRespPacket().write()) == []  # no resynchronising MQTT


def test_a_publish_mqtt5_cannot_send_is_an_invalid_request() -> None:
    for topic in ("plug/#", "a/+/b", ""):
        with pytest.raises(InvalidRequestError, match="cannot publish"):
            publish_packet(Publish(topic=topic, payload=b"{}"), 1)
    with pytest.raises(InvalidRequestError):
        publish_packet(Publish(topic="a", payload=b"{}", qos=3), 1)


# ---------------------------------------------------------------------------- keepalive


def test_keepalive_pings_after_a_quiet_period_and_gives_up_one_period_later() -> None:
    keepalive = Keepalive(30, now=0.0)
    assert keepalive.due() == 30.0
    assert keepalive.decide(29.9) is WAIT
    assert keepalive.decide(30.0) is PING
    assert keepalive.ping_outstanding and keepalive.due() == 60.0
    assert keepalive.decide(59.9) is WAIT  # the PINGRESP is on its way
    keepalive.received(45.0)  # it came
    assert not keepalive.ping_outstanding
    assert keepalive.due() == 60.0  # 30 s after our ping, the last thing we sent
    assert keepalive.decide(60.0) is PING
    assert keepalive.decide(89.9) is WAIT
    assert keepalive.decide(90.0) is DEAD  # a period without a word after the ping


def test_any_packet_from_the_broker_answers_a_ping() -> None:
    keepalive = Keepalive(10, now=0.0)
    assert keepalive.decide(10.0) is PING
    keepalive.received(12.0)  # a PUBLISH, not the PINGRESP: the broker is alive all the same
    assert keepalive.decide(19.9) is WAIT
    assert keepalive.decide(20.0) is PING  # due 10 s after the ping we sent


def test_sending_alone_does_not_hold_off_the_ping_to_a_silent_broker() -> None:
    keepalive = Keepalive(30, now=0.0)
    for at in (10.0, 20.0, 29.0):
        keepalive.sent(at)  # publishes go out, nothing comes back
    assert keepalive.due() == 30.0
    assert keepalive.decide(30.0) is PING


def test_traffic_both_ways_defers_the_ping() -> None:
    keepalive = Keepalive(30, now=0.0)
    keepalive.sent(20.0)
    keepalive.received(25.0)
    assert keepalive.due() == 50.0
    assert keepalive.decide(49.0) is WAIT


# ---------------------------------------------------------------------------- packet ids


def test_packet_ids_skip_those_in_use_and_wrap_at_65535() -> None:
    ids = PacketIds()
    assert [ids.take() for _ in range(3)] == [1, 2, 3]
    assert ids.release(2) and not ids.release(2)
    assert not ids.release(99)  # an acknowledgement for nothing we sent
    ids = PacketIds()
    taken = [ids.take() for _ in range(PacketIds.LIMIT)]
    assert taken == list(range(1, PacketIds.LIMIT + 1))
    with pytest.raises(ProtocolError):
        ids.take()
    ids.release(4)
    assert ids.take() == 4  # wrapped, skipping the 65,534 still in use


def test_the_publish_window_holds_publishes_past_the_brokers_receive_maximum() -> None:
    ids = PacketIds()
    window = PublishWindow(ids, receive_max=2)
    a, b, c, d = (Publish(topic=f"{n}/cmd", payload=b"{}", ack_seq=i) for i, n in enumerate("abcd"))
    assert window.offer(a) == 1 and window.offer(b) == 2
    assert window.offer(c) is None and window.offer(d) is None  # they wait for room
    assert len(window) == 2
    assert window.acked(1) == (a, [(3, c)])
    assert window.acked(1) == (None, [])  # acknowledged twice: the second is nobody's
    assert window.acked(2) == (b, [(4, d)])  # ids go round: a freed one comes back last
    window.withdraw(3)
    assert len(window) == 1 and len(ids) == 1
    window.clear()
    assert len(window) == 0 and len(ids) == 0


# ---------------------------------------------------------------------------- errors

WHERE = "MQTT broker 127.0.0.1:1883"


@pytest.mark.parametrize(
    ("reason", "kind", "code"),
    [
        (mqtt5.ConnAckReasonCode.BAD_USER_NAME_OR_PASSWORD, AuthError, ErrorCode.AUTH_FAILED),
        (mqtt5.ConnAckReasonCode.NOT_AUTHORIZED, AuthError, ErrorCode.AUTH_FAILED),
        (mqtt5.ConnAckReasonCode.BANNED, AuthError, ErrorCode.AUTH_FAILED),
        (mqtt5.ConnAckReasonCode.CLIENT_ID_NOT_VALID, ConfigError, ErrorCode.CONFIG_ERROR),
        (mqtt5.ConnAckReasonCode.UNSUPPORTED_PROTOCOL_VERSION, ConfigError, ErrorCode.CONFIG_ERROR),
        (mqtt5.ConnAckReasonCode.SERVER_BUSY, LinkBrokenError, ErrorCode.CONNECTION_FAILED),
        (
            mqtt5.ConnAckReasonCode.SERVER_UNAVAILABLE,
            LinkBrokenError,
            ErrorCode.CONNECTION_FAILED,
        ),
    ],
    ids=lambda v: v.name if isinstance(v, mqtt5.ConnAckReasonCode) else None,
)
def test_a_refusing_connack_is_classified(
    reason: mqtt5.ConnAckReasonCode, kind: type[Exception], code: ErrorCode
) -> None:
    err = connack_error(reason, WHERE)
    assert type(err) is kind and err.code is code, err
    assert reason.name.lower() in err.message and WHERE in err.message


def test_the_brokers_disconnect_says_why_the_session_ended() -> None:
    timeout = session_error(WHERE, reason=mqtt5.DisconnectReasonCode.KEEP_ALIVE_TIMEOUT)
    assert timeout.code is ErrorCode.TIMEOUT
    taken = session_error(WHERE, reason=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER)
    assert taken.code is ErrorCode.CONNECTION_FAILED
    assert "session_taken_over" in taken.message and "same client id" in taken.message
    assert session_error(WHERE).code is ErrorCode.CONNECTION_FAILED


def test_a_refused_subscription_is_an_auth_error_for_the_acl_and_a_protocol_error_else() -> None:
    granted = mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE
    topics = ["a/availability", "a/resp"]
    assert suback_failure(topics, [granted, granted], WHERE) is None
    acl = suback_failure(topics, [granted, mqtt5.SubAckReasonCode.NOT_AUTHORIZED], WHERE)
    assert isinstance(acl, AuthError) and "'a/resp'" in acl.message
    other = suback_failure(topics, [mqtt5.SubAckReasonCode.QUOTA_EXCEEDED, granted], WHERE)
    assert isinstance(other, ProtocolError) and "'a/availability'" in other.message
    assert isinstance(suback_failure(topics, [granted], WHERE), ProtocolError)  # one short
