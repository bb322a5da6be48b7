"""The gateway's config: every problem is one line on stderr naming the file, the key and
what is wrong, ``keeplink serve`` exits 2 and nothing starts. Run as a user would."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from pathlib import Path

import pytest

from keeplink import ConfigError
from keeplink.gateway.config import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_QUEUED,
    parse_config,
)

START_BOUND_S = 30.0
"""A safety bound for the subprocess to give up (slow CI machines), never a timing rule."""

LONG = "0123456789abcdef"  # 16 characters: the shortest token accepted
GW = '[gateway]\nlisten = "127.0.0.1:0"\nstore = "memory:"\n'
DEV = '[[devices]]\nid = "hall"\ndriver = "jsonline"\nport = 7001\n'
MODBUS = '[[devices]]\nid = "meter"\ndriver = "modbus"\nport = 502\nunit = 1\n'
MQTT = '[[devices]]\nid = "plug"\ndriver = "mqtt"\nport = 1883\n'

# (config text, the key the error must name, a pattern for what is wrong)
BAD_CONFIGS: dict[str, tuple[str, str, str]] = {
    "listen-superscript-port": (
        '[gateway]\nlisten = "127.0.0.1:\u00b2"\n',
        "gateway.listen",
        "port must be 0..65535",
    ),
    "listen-no-port": ('[gateway]\nlisten = "127.0.0.1"\n', "gateway.listen", "host:port"),
    "listen-hostname": (
        '[gateway]\nlisten = "example.com:80"\n',
        "gateway.listen",
        "not an IP address",
    ),
    "listen-in-use": (
        '[gateway]\nlisten = "BUSY"\nstore = "memory:"\n',
        "gateway.listen",
        "in use",
    ),
    "listen-not-bindable": (
        f'[gateway]\nlisten = "192.0.2.7:0"\nstore = "memory:"\nread_token = "{LONG}"\n',
        "gateway.listen",
        "cannot listen on 192.0.2.7:0",
    ),
    "store-nul": (
        '[gateway]\nlisten = "127.0.0.1:0"\nstore = "sqlite:////tmp/\\u0000x.db"\n',
        "gateway.store",
        "NUL",
    ),
    "device-host-nul": (
        GW + DEV + 'host = "\\u0000"\n',
        "devices[0].host",
        "NUL",
    ),
    "device-host-label-too-long": (
        GW + DEV + f'host = "{"a" * 300}"\n',
        "devices[0].host",
        "IP address or a host name",
    ),
    "device-host-bad-chars": (
        GW + DEV + 'host = "dev ice/1"\n',
        "devices[0].host",
        "IP address or a host name",
    ),
    "token-short": (GW + 'token = "change-me"\n', "gateway.token", "at least 16 characters"),
    "token-empty": (GW + 'token = ""\n', "gateway.token", "non-empty string"),
    "token-number": (GW + "token = 1234567890123456\n", "gateway.token", "string"),
    "read-token-short": (GW + 'read_token = "x"\n', "gateway.read_token", "at least 16"),
    "read-token-missing-off-loopback": (
        '[gateway]\nlisten = "0.0.0.0:0"\nstore = "memory:"\n',
        "gateway.read_token",
        "required when gateway.listen is not a loopback address",
    ),
    "read-token-equals-token": (
        GW + f'token = "{LONG}"\nread_token = "{LONG}"\n',
        "gateway.read_token",
        "must differ",
    ),
    "ttl-zero": (GW + "ttl_s = 0\n", "gateway.ttl_s", "positive number of seconds"),
    "ttl-text": (GW + 'ttl_s = "1h"\n', "gateway.ttl_s", "positive number of seconds"),
    "ttl-nan": (GW + "ttl_s = nan\n", "gateway.ttl_s", "positive number of seconds"),
    "ttl-inf": (GW + "ttl_s = inf\n", "gateway.ttl_s", "positive number of seconds"),
    "max-clients-zero": (GW + "max_clients = 0\n", "gateway.max_clients", "integer in 1.."),
    "header-timeout-negative": (
        GW + "header_timeout_s = -1\n",
        "gateway.header_timeout_s",
        "positive number",
    ),
    "idle-timeout-bool": (GW + "idle_timeout_s = true\n", "gateway.idle_timeout_s", "positive"),
    "store-scheme": ('[gateway]\nstore = "redis://x"\n', "gateway.store", "must be a sqlite"),
    "store-cannot-open": (
        '[gateway]\nlisten = "127.0.0.1:0"\nstore = "sqlite:////nonexistent-dir/x.db"\n',
        "gateway.store",
        "cannot open",
    ),
    "lease-short": (GW + "lease_s = 0.1\n", "gateway.lease_s", "at least 0.5 seconds"),
    "gateway-unknown-key": (GW + 'lisen = "x"\n', "gateway.lisen", "unknown key"),
    "top-unknown-key": ("[gatway]\n", "gatway", "unknown key"),
    "gateway-not-table": ("gateway = 5\n", "gateway", "must be a table"),
    "devices-not-array": ("devices = 3\n", "devices", "array of tables"),
    "device-not-table": ("devices = [1]\n", "devices[0]", "must be a table"),
    "device-id-missing": (
        GW + '[[devices]]\ndriver = "jsonline"\nport = 1\n',
        "devices[0].id",
        "is required",
    ),
    "device-id-chars": (GW + DEV.replace('"hall"', '"h a"'), "devices[0].id", "letters"),
    "device-id-duplicate": (GW + DEV + DEV, "devices[1].id", "duplicate id"),
    "device-driver": (GW + DEV.replace("jsonline", "zigbee"), "devices[0].driver", "one of"),
    "device-port": (GW + DEV.replace("7001", "70000"), "devices[0].port", "1..65535"),
    "device-port-missing": (GW + DEV.replace("port = 7001\n", ""), "devices[0].port", "required"),
    "device-seq-bits": (GW + DEV + "seq_bits = 12\n", "devices[0].seq_bits", "8, 16 or 32"),
    "device-max-in-flight-over-seq": (
        GW + DEV + "seq_bits = 8\nmax_in_flight = 1000\n",
        "devices[0].max_in_flight",
        "at most 256",
    ),
    "device-heartbeat": (GW + DEV + "heartbeat_s = 0\n", "devices[0].heartbeat_s", "positive"),
    "device-backoff-not-table": (GW + DEV + "backoff = 5\n", "devices[0].backoff", "table"),
    "device-backoff-key": (
        GW + DEV + "backoff = { initial = 1 }\n",
        "devices[0].backoff.initial",
        "unknown key",
    ),
    "device-backoff-order": (
        GW + DEV + "backoff = { initial_s = 10, cap_s = 1 }\n",
        "devices[0].backoff",
        "cap",
    ),
    "device-hub-slots": (GW + DEV + "hub_slots = 0\n", "devices[0].hub_slots", "1..64"),
    "device-max-queued-zero": (GW + DEV + "max_queued = 0\n", "devices[0].max_queued", "1.."),
    "device-max-queued-float": (
        GW + DEV + "max_queued = 1.5\n",
        "devices[0].max_queued",
        "integer",
    ),
    "device-unknown-key": (GW + DEV + "colour = 1\n", "devices[0].colour", "unknown key"),
    "modbus-unit-missing": (
        GW + MODBUS.replace("unit = 1\n", ""),
        "devices[0].unit",
        "required for a modbus",
    ),
    "jsonline-unit": (GW + DEV + "unit = 1\n", "devices[0].unit", "only modbus devices"),
    "options-not-table": (GW + DEV + "options = 3\n", "devices[0].options", "must be a table"),
    "jsonline-option": (
        GW + DEV + "options = { tls = true }\n",
        "devices[0].options.tls",
        "the jsonline driver takes no options",
    ),
    "modbus-option": (
        GW + MODBUS + "options = { probe_s = 5 }\n",
        "devices[0].options.probe_s",
        "takes one of probe_interval_s",
    ),
    "modbus-option-type": (
        GW + MODBUS + 'options = { probe_interval_s = "x" }\n',
        "devices[0].options.probe_interval_s",
        "positive number of seconds",
    ),
    "mqtt-option": (
        GW + MQTT + "options = { qos = 1 }\n",
        "devices[0].options.qos",
        "takes one of availability_topic, client_id, command_topic, keepalive_s",
    ),
    "mqtt-option-range": (
        GW + MQTT + "options = { keepalive_s = 0 }\n",
        "devices[0].options.keepalive_s",
        "1..65535",
    ),
    "mqtt-option-type": (
        GW + MQTT + "options = { username = 5 }\n",
        "devices[0].options.username",
        "non-empty string",
    ),
    "mqtt-option-refused-by-driver": (
        GW + MQTT + 'options = { command_topic = "plugs/cmd" }\n',
        "devices[0].options",
        r"needs exactly one \{device\} field",
    ),
    "hub-options-differ": (
        GW
        + MQTT
        + 'options = { client_id = "a" }\n'
        + MQTT.replace("plug", "lamp")
        + 'options = { client_id = "b" }\n',
        "devices[1].options",
        r"shares one link to 127\.0\.0\.1:1883 with devices\[0\]",
    ),
    "debounce-online-negative": (
        GW + DEV + "debounce_online_s = -1\n",
        "devices[0].debounce_online_s",
        "number of seconds, 0 or more, got -1",
    ),
    "debounce-offline-text": (
        GW + DEV + 'debounce_offline_s = "5s"\n',
        "devices[0].debounce_offline_s",
        "number of seconds, 0 or more",
    ),
    "debounce-offline-inf": (
        GW + MODBUS + "debounce_offline_s = inf\n",
        "devices[0].debounce_offline_s",
        "0 or more, got inf",
    ),
    "debounce-online-bool": (
        GW + MQTT + "debounce_online_s = true\n",
        "devices[0].debounce_online_s",
        "0 or more, got True",
    ),
    "presence-unknown": (
        GW + DEV + 'presence = "ping"\n',
        "devices[0].presence",
        'must be "link" or "mdns", got \'ping\'',
    ),
    "presence-not-text": (GW + DEV + "presence = 1\n", "devices[0].presence", "string"),
    "mdns-service-without-mdns": (
        GW + DEV + 'mdns_service = "_keeplink._tcp"\n',
        "devices[0].mdns_service",
        'only for presence = "mdns"',
    ),
    "mdns-service-not-a-type": (
        GW + DEV + 'presence = "mdns"\nmdns_service = "hall.local"\n',
        "devices[0].mdns_service",
        "must be a service type like '_keeplink._tcp'",
    ),
    "mdns-service-bad-service-name": (
        GW + DEV + 'presence = "mdns"\nmdns_service = "_this-is-far-too-long._tcp"\n',
        "devices[0].mdns_service",
        "1..15 letters",
    ),
    "mdns-service-instance-too-long": (
        GW + DEV + f'presence = "mdns"\nmdns_service = "{"h" * 64}._keeplink._tcp"\n',
        "devices[0].mdns_service",
        "1..63 bytes",
    ),
    "modbus-token": (GW + MODBUS + f'token = "{LONG}"\n', "devices[0].token", "does not use it"),
    "modbus-heartbeat": (GW + MODBUS + "heartbeat_s = 5\n", "devices[0].heartbeat_s", "modbus"),
    "mqtt-seq-bits": (GW + MQTT + "seq_bits = 8\n", "devices[0].seq_bits", "does not use"),
    "mqtt-max-in-flight": (GW + MQTT + "max_in_flight = 4\n", "devices[0].max_in_flight", "mqtt"),
    "mqtt-hub": (GW + MQTT + 'hub = "ble"\n', "devices[0].hub", "does not use it"),
    "hub-link-backoff-differs": (
        GW
        + MODBUS
        + MODBUS.replace("meter", "meter2").replace("unit = 1", "unit = 2")
        + "[devices.backoff]\ncap_s = 5\n",
        "devices[1].backoff",
        r"shares one link to 127.0.0.1:502 with devices\[0\], made with its backoff",
    ),
    "hub-link-auth-retry-differs": (
        GW + MQTT + MQTT.replace("plug", "plug2") + "auth_retry_s = 60\n",
        "devices[1].auth_retry_s",
        "give both the same auth_retry_s",
    ),
    "hub-link-window-differs": (
        GW
        + MODBUS
        + "max_in_flight = 2\n"
        + MODBUS.replace("meter", "meter2").replace("unit = 1", "unit = 2"),
        "devices[1].max_in_flight",
        "made with its max_in_flight",
    ),
    "hub-slots-differ": (
        GW
        + DEV
        + 'hub = "ble"\nhub_slots = 2\n'
        + DEV.replace("hall", "porch").replace("7001", "7002")
        + 'hub = "ble"\n',
        "devices[1].hub_slots",
        "hub 'ble' has one slot pool, made with devices\\[0\\]'s hub_slots \\(2\\)",
    ),
    "backoff-factor-below-one": (
        GW + DEV + "[devices.backoff]\nfactor = 0.5\n",
        "devices[0].backoff.factor",
        "must be a number >= 1, got 0.5",
    ),
    "not-toml": ("[gateway\n", "not valid TOML", "line 1"),
}


async def _serve(config: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "keeplink", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), START_BOUND_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(("text", "key", "problem"), BAD_CONFIGS.values(), ids=BAD_CONFIGS)
async def test_a_bad_config_is_one_line_naming_file_and_key_and_exit_2(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    config = tmp_path / "keeplink.toml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config.write_text(text.replace("BUSY", f"127.0.0.1:{busy.getsockname()[1]}"))
        code, out, err = await _serve(config)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert code == 2, err
    line = lines[0]
    assert f"{config}: {key}" in line if key != "not valid TOML" else str(config) in line, line
    assert key in line, line
    assert re.search(problem, line), line
    assert "keeplink gateway on" not in out  # nothing started


async def test_a_missing_config_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "nowhere.toml"
    code, _, err = await _serve(config)
    assert code == 2, err
    assert err.splitlines() == [f"keeplink: [config_error] {config}: cannot read the config "
                                "file: No such file or directory"]  # fmt: skip


def test_two_devices_with_one_id_are_refused_naming_the_second() -> None:
    hall = {"id": "hall", "driver": "jsonline", "port": 7001}
    other = {"id": "hall", "driver": "modbus", "port": 502, "unit": 1}
    devices = [hall, {**hall, "id": "porch"}, other]
    with pytest.raises(ConfigError) as caught:  # two [[devices]] with one id are refused
        parse_config({"devices": devices}, source="keeplink.toml")
    assert caught.value.message == "keeplink.toml: devices[2].id: duplicate id 'hall'"


def test_new_keys_default_to_no_read_token_no_ttl_and_10000_queued() -> None:
    config = parse_config({"devices": [{"id": "hall", "driver": "jsonline", "port": 7001}]})
    assert config.read_token is None
    assert config.ttl_s is None
    assert config.max_clients is None
    assert config.header_timeout_s == DEFAULT_HEADER_TIMEOUT_S == 10.0
    assert config.idle_timeout_s == DEFAULT_IDLE_TIMEOUT_S == 20.0
    assert config.devices[0].max_queued == DEFAULT_MAX_QUEUED == 10_000


def test_new_keys_are_read_as_given() -> None:
    config = parse_config(
        {
            "gateway": {
                "listen": "0.0.0.0:8470",
                "token": "w" * 16,
                "read_token": "r" * 40,
                "ttl_s": 90,
                "max_clients": 50,
                "header_timeout_s": 2.5,
                "idle_timeout_s": 30,
            },
            "devices": [
                {"id": "hall", "driver": "jsonline", "port": 7001, "max_queued": 1},
                {"id": "plug", "driver": "mqtt", "port": 1883,
                 "options": {"client_id": "gw", "keepalive_s": 10}},
                {"id": "meter", "driver": "modbus", "port": 502, "unit": 3,
                 "options": {"probe_interval_s": 2}},
            ],
        }
    )  # fmt: skip
    assert config.read_token == "r" * 40
    assert config.ttl_s == 90.0 and isinstance(config.ttl_s, float)
    assert (config.max_clients, config.header_timeout_s, config.idle_timeout_s) == (50, 2.5, 30)
    assert [d.max_queued for d in config.devices] == [1, 10_000, 10_000]
    assert config.devices[1].options == {"client_id": "gw", "keepalive_s": 10}
    assert config.devices[2].options == {"probe_interval_s": 2.0}


def test_devices_sharing_a_link_may_repeat_its_options_or_leave_them_out() -> None:
    meter = {"driver": "modbus", "port": 502, "options": {"probe_interval_s": 2}}
    config = parse_config(
        {
            "devices": [
                {"id": "a", "unit": 1, **meter},
                {"id": "b", "unit": 2, **meter},
                {"id": "c", "unit": 3, "driver": "modbus", "port": 502},
                {"id": "d", "unit": 4, "driver": "modbus", "port": 503,
                 "options": {"probe_interval_s": 5}},
            ]
        }
    )  # fmt: skip
    assert [d.options for d in config.devices] == [
        {"probe_interval_s": 2.0}, {"probe_interval_s": 2.0}, {}, {"probe_interval_s": 5.0}
    ]  # fmt: skip


def test_presence_keys_default_to_the_link_and_a_1_s_and_3_s_debounce() -> None:
    config = parse_config(
        {"devices": [{"id": "hall", "driver": "jsonline", "port": 7001},
                     {"id": "porch", "driver": "jsonline", "port": 7002, "presence": "mdns"}]}
    )  # fmt: skip
    hall, porch = config.devices
    assert (hall.debounce_online_s, hall.debounce_offline_s) == (1.0, 3.0)
    assert (hall.presence, hall.mdns_service, hall.mdns_type) == ("link", None, None)
    # presence = "mdns" without mdns_service: the keeplink service type, found by its id.
    assert (porch.presence, porch.mdns_service) == ("mdns", "_keeplink._tcp.local.")
    assert (porch.mdns_type, porch.mdns_instance) == ("_keeplink._tcp.local.", None)


@pytest.mark.parametrize(
    ("given", "service", "instance"),
    [
        ("_keeplink._tcp", "_keeplink._tcp.local.", None),
        ("_thermo._udp.local", "_thermo._udp.local.", None),
        ("_Keeplink._TCP.Local.", "_keeplink._tcp.local.", None),  # DNS names ignore case
        ("Hall Thermostat._keeplink._tcp", "_keeplink._tcp.local.", "Hall Thermostat"),
        ("hall.v2._keeplink._tcp.local.", "_keeplink._tcp.local.", "hall.v2"),
    ],
)
def test_presence_keys_are_read_as_given(given: str, service: str, instance: str | None) -> None:
    device = {"id": "hall", "driver": "jsonline", "port": 7001, "presence": "mdns",
              "mdns_service": given, "debounce_online_s": 0, "debounce_offline_s": 2.5}  # fmt: skip
    (hall,) = parse_config({"devices": [device]}).devices
    assert (hall.debounce_online_s, hall.debounce_offline_s) == (0.0, 2.5)
    assert hall.mdns_type == service
    assert hall.mdns_instance == (None if instance is None else f"{instance}.{service}")


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.5.6.7:0", "[::1]:0", "localhost:0"])
def test_reads_may_stay_open_on_loopback(listen: str) -> None:
    assert parse_config({"gateway": {"listen": listen}}).read_token is None


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.0.2.7:80"])
def test_reads_need_a_token_off_loopback(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"<config>: gateway\.read_token: is required"):
        parse_config({"gateway": {"listen": listen}})
