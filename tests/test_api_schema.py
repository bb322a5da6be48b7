"""The HTTP API under bad input, against a real ``keeplink serve`` subprocess.

First each documented error with its status and code; then property-based runs that must
never see a 5xx and always see the ``{"code", "message"}`` shape on an error:

- schemathesis generates requests from the gateway's own OpenAPI document (valid ones and,
  in its negative mode, requests that break the schema: wrong types, missing fields);
- a hypothesis fuzzer sends what no schema describes: arbitrary bytes and JSON, fields of
  the wrong type, huge numbers, odd query strings.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

import requests
from gateway_procs import START_BOUND_S, TOKEN, Procs, write_config
from keeplink.gateway import schema as api_schema
from keeplink.testing import free_port

# Bounds: the whole file stays well under 40 s on a 2-core machine.
SCHEMA_EXAMPLES = 400
FUZZ_EXAMPLES = 300
RAW_EXAMPLES = 300
HTTP_TIMEOUT_S = 15.0


class Api:
    """The gateway under test: ``hall`` is online (its simulator runs), ``attic`` is away."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = TOKEN,
        body: Any = None,
        data: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if data is not None:
            headers["Content-Type"] = "application/json"
        return self.http.request(
            method,
            self.url + path,
            json=body,
            data=data,
            params=params,
            headers=headers,
            timeout=HTTP_TIMEOUT_S,
        )

    def submit(self, device: str, body: Any, **kwargs: Any) -> requests.Response:
        return self.call("POST", f"/api/devices/{device}/commands", body=body, **kwargs)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp_path = tmp_path_factory.mktemp("api")
    procs = Procs(tmp_path)
    try:
        ports = {"hall": free_port(), "attic": free_port()}
        procs.sim("hall", ports["hall"]).start_ready_sync()
        gateway = procs.gateway(write_config(tmp_path / "keeplink.toml", devices=ports))
        api = Api(gateway.start_ready_sync())
        deadline = time.monotonic() + START_BOUND_S
        while api.call("GET", "/api/devices/hall").json()["presence"] != "online":
            assert time.monotonic() < deadline, "hall never came online"
            time.sleep(0.05)
        yield api
        api.http.close()
        assert gateway.stop_sync() == 0
        assert "Traceback" not in gateway.stderr, gateway.stderr
    finally:
        procs.cleanup()


def assert_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


def wait_final(api: Api, command_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + START_BOUND_S
    while True:
        command: dict[str, Any] = api.call("GET", f"/api/commands/{command_id}").json()
        if command["state"] not in ("queued", "sending"):
            return command
        assert time.monotonic() < deadline, command
        time.sleep(0.05)


# ---------------------------------------------------------------------------- each error


def test_unknown_device_is_404_device_not_found(api: Api) -> None:
    body = assert_error(api.submit("nope", {"op": "set"}), 404, "device_not_found")
    assert "nope" in body["message"]
    assert_error(api.call("GET", "/api/devices/nope"), 404, "device_not_found")
    assert_error(
        api.call("GET", "/api/commands", params={"device": "nope"}), 404, "device_not_found"
    )


def test_unknown_command_is_404_command_not_found(api: Api) -> None:
    assert_error(api.call("GET", "/api/commands/" + "0" * 32), 404, "command_not_found")
    assert_error(api.call("DELETE", "/api/commands/" + "0" * 32), 404, "command_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"op": ""},
        {"op": 5},
        {"op": None},
        {"op": "set", "args": []},
        {"op": "set", "args": "x"},
        {"op": "set", "color": "red"},
        {"op": "set", "ttl_s": "soon"},
        {"op": "set", "ttl_s": True},
        {"op": "set", "max_attempts": 0},
        {"op": "set", "key": ""},
        {"op": "set", "idempotency_key": ""},
        [1, 2],
        "set",
    ],
    ids=repr,
)
def test_invalid_command_is_422_invalid_request(api: Api, body: Any) -> None:
    assert_error(api.submit("attic", body), 422, "invalid_request")


def test_invalid_filters_are_422(api: Api) -> None:
    for params in ({"state": "bogus"}, {"limit": "0"}, {"limit": "x"}, {"limit": "10001"}):
        assert_error(api.call("GET", "/api/commands", params=params), 422, "invalid_request")


@pytest.mark.parametrize("token", [None, "wrong", ""], ids=["none", "wrong", "empty"])
def test_writes_need_the_token_401_auth_failed(api: Api, token: str | None) -> None:
    assert_error(api.submit("attic", {"op": "set"}, token=token), 401, "auth_failed")
    queued = api.submit("attic", {"op": "set"}).json()["id"]
    assert_error(api.call("DELETE", f"/api/commands/{queued}", token=token), 401, "auth_failed")
    assert api.call("GET", f"/api/commands/{queued}").json()["state"] == "queued"
    # Reads need none.
    assert api.call("GET", "/api/devices", token=token).status_code == 200


def test_cancel_of_a_finished_command_is_409_conflict(api: Api) -> None:
    answer = api.submit("attic", {"op": "set", "args": {"v": 1}})
    assert answer.status_code == 202
    command_id = answer.json()["id"]
    cancelled = api.call("DELETE", f"/api/commands/{command_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    body = assert_error(api.call("DELETE", f"/api/commands/{command_id}"), 409, "conflict")
    assert "already cancelled" in body["message"]

    delivered = api.submit("hall", {"op": "echo", "args": {"v": 2}}).json()["id"]
    assert wait_final(api, delivered)["state"] == "succeeded"
    assert_error(api.call("DELETE", f"/api/commands/{delivered}"), 409, "conflict")


@pytest.mark.parametrize(
    "data",
    [b"{", b"", b"{'op': 'set'}", b'{"op": "set",}', b"NaN", b'{"op": "set", "ttl_s": NaN}'],
    ids=repr,
)
def test_malformed_json_is_400(api: Api, data: bytes) -> None:
    body = assert_error(api.submit("attic", None, data=data), 400, "invalid_request")
    assert "malformed JSON" in body["message"]


def test_bad_utf8_and_too_large_bodies(api: Api) -> None:
    assert_error(api.submit("attic", None, data=b'{"op": "\xff"}'), 400, "invalid_request")
    huge = json.dumps({"op": "set", "args": {"x": "a" * 300_000}}).encode()
    response = api.submit("attic", None, data=huge)
    assert response.status_code in (413, 422), response.text
    assert set(response.json()) == {"code", "message"}


def test_unknown_endpoints_and_methods_answer_the_error_shape(api: Api) -> None:
    assert_error(api.call("GET", "/api/nothing"), 404, "invalid_request")
    assert_error(api.call("PUT", "/api/devices"), 405, "invalid_request")
    assert_error(api.call("GET", "/api/events"), 400, "invalid_request")  # not a WebSocket


# ---------------------------------------------------------------------------- properties


def check_response(response: requests.Response, what: str) -> None:
    """Never a 5xx; an error always has the ``{code, message}`` shape; JSON otherwise
    (but for the two answers that are not: the metrics' text and the dashboard's page)."""
    status = response.status_code
    assert status < 500, f"{what} -> {status}: {response.text[:500]}"
    if status >= 400:
        body = response.json()
        assert isinstance(body, dict), (what, body)
        assert isinstance(body.get("code"), str) and body["code"], (what, body)
        assert isinstance(body.get("message"), str), (what, body)
    elif what.startswith(("GET /metrics ", "GET / ")):
        assert response.text, what  # Prometheus text, the dashboard's HTML
    else:
        response.json()


def _live_document(api: Api) -> dict[str, Any]:
    with urllib.request.urlopen(f"{api.url}/api/openapi.json", timeout=HTTP_TIMEOUT_S) as r:
        document: dict[str, Any] = json.loads(r.read())
    return document


@pytest.fixture(scope="module")
def schema(api: Api) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_dict(_live_document(api))


def test_openapi_document_names_every_route(api: Api) -> None:
    document = _live_document(api)
    assert document["openapi"] == "3.1.0"
    paths = document["paths"]
    for path, method in [
        ("/api/devices", "get"),
        ("/api/devices/{device}", "get"),
        ("/api/devices/{device}/commands", "post"),
        ("/api/devices/{device}/reconnect", "post"),
        ("/api/devices/{device}/resume", "post"),
        ("/api/devices/{device}/history", "get"),
        ("/api/commands", "get"),
        ("/api/commands/{command}", "get"),
        ("/api/commands/{command}", "delete"),
        ("/api/events", "get"),
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/api/openapi.json", "get"),
        ("/", "get"),
    ]:
        assert method in paths[path], (path, method)


def test_openapi_document_is_generated_from_the_models(api: Api) -> None:
    """What is served is what the models say: one declaration of each shape."""
    document = _live_document(api)
    assert document == json.loads(json.dumps(api_schema.openapi()))
    submit = document["components"]["schemas"]["Submit"]
    assert submit["additionalProperties"] is False
    assert submit["required"] == ["op"]
    assert submit["properties"]["max_attempts"]["maximum"] == 1000


def _strategies(schema: schemathesis.BaseSchema, command_id: str) -> st.SearchStrategy[Any]:
    submit = schema["/api/devices/{device}/commands"]["POST"]
    one = schema["/api/commands/{command}"]
    parts = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        parts.append(schema.as_strategy(mode))  # everything, random path parameters
        for device in ("attic", "hall"):  # bodies that reach the validation and the store
            parts.append(submit.as_strategy(mode, path_parameters={"device": device}))
        for method in ("GET", "DELETE"):  # a real command: 200, then 409 once cancelled
            parts.append(one[method].as_strategy(mode, path_parameters={"command": command_id}))
        parts.append(schema["/api/commands"]["GET"].as_strategy(mode, query={"device": "attic"}))
    return st.one_of(parts)


def test_schema_generated_requests_never_5xx(api: Api, schema: schemathesis.BaseSchema) -> None:
    command_id = api.submit("attic", {"op": "set"}).json()["id"]
    cases = _strategies(schema, command_id)
    statuses: dict[tuple[str, str, int], int] = {}

    @settings(
        max_examples=SCHEMA_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
    )
    @given(case=cases, token=st.sampled_from([TOKEN, None, "wrong"]))
    def run(case: Any, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        response = case.call(
            base_url=api.url, session=api.http, headers=headers, timeout=HTTP_TIMEOUT_S
        )
        label = f"{case.method} {case.formatted_path}"
        key = (case.method, case.path, response.status_code)
        statuses[key] = statuses.get(key, 0) + 1
        check_response(response, f"{label} {case.body!r:.300}\n{case.as_curl_command()}")

    run()
    # Whether a random run reaches past the front door is luck: the explicit cases below
    # show that cases made from this schema do. Here, only that nothing was a 5xx.
    assert sum(statuses.values()) >= 1, statuses


def test_schema_made_cases_reach_the_store_and_the_validation(
    api: Api, schema: schemathesis.BaseSchema
) -> None:
    """Requests built from the served schema, one per answer past the front door: a stored
    command (202), each kind of body the validation refuses (422), a command read (200),
    listed (200) and cancelled (200, then 409)."""
    command_id = api.submit("attic", {"op": "set"}).json()["id"]
    submit = schema["/api/devices/{device}/commands"]["POST"]
    one = schema["/api/commands/{command}"]
    listing = schema["/api/commands"]["GET"]
    attic = {"device": "attic"}
    command = {"command": command_id}
    cases: list[tuple[Any, int]] = [
        (submit.Case(path_parameters=attic, body={"op": "set"}), 202),
        (submit.Case(path_parameters=attic, body={"op": "set", "args": {"n": 1}}), 202),
        (submit.Case(path_parameters=attic, body={}), 422),
        (submit.Case(path_parameters=attic, body={"op": 5}), 422),
        (submit.Case(path_parameters=attic, body={"op": "set", "max_attempts": 0}), 422),
        (submit.Case(path_parameters=attic, body={"op": "set", "surprise": 1}), 422),
        (submit.Case(path_parameters=attic, body=[]), 422),
        (one["GET"].Case(path_parameters=command), 200),
        (listing.Case(query=attic), 200),
        (one["DELETE"].Case(path_parameters=command), 200),
        (one["DELETE"].Case(path_parameters=command), 409),
    ]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for case, status in cases:
        response = case.call(
            base_url=api.url, session=api.http, headers=headers, timeout=HTTP_TIMEOUT_S
        )
        what = f"{case.method} {case.formatted_path} {case.body!r:.300}"
        check_response(response, what)
        assert response.status_code == status, f"{what} -> {response.status_code}, not {status}"


# A hypothesis fuzzer for what no schema describes.

HUGE = st.sampled_from(
    [10**400, -(10**400), 2**63, -(2**63) - 1, 2**64, 1e308, -1e308, 5e-324, 10**19]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("op", "args", "key", "ttl_s", "max_attempts", "idempotency_key", "priority")
SUBMITS = st.fixed_dictionaries(
    {"op": st.one_of(st.sampled_from(["set", "echo", "get"]), JSON)},
    optional=dict.fromkeys(FIELDS[1:], JSON),
)
BODIES = st.one_of(
    SUBMITS.map(lambda body: json.dumps(body).encode()),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
)
QUERY_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["queued", "queued,failed", "", "0", "-1", "10000", "1e3", str(10**40)]),
)


def test_fuzzed_bodies_and_queries_never_5xx(api: Api) -> None:
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(
        device=st.sampled_from(["attic", "hall"]),
        data=BODIES,
        params=st.dictionaries(
            st.sampled_from(["device", "state", "limit", "since"]), QUERY_TEXT, max_size=3
        ),
        token=st.sampled_from([TOKEN, None, "wrong"]),
    )
    def run(device: str, data: bytes, params: dict[str, str], token: str | None) -> None:
        response = api.submit(device, None, data=data, token=token)
        check_response(response, f"POST {device} {data!r:.300}")
        if response.status_code == 202:
            assert response.json()["device"] == device
        response = api.call("GET", "/api/commands", params=params, token=token)
        check_response(response, f"GET /api/commands {params!r}")

    run()


@pytest.mark.parametrize("limit", ["²", "١٢", "1²", "9" * 40])
def test_a_limit_that_is_not_an_ascii_number_is_a_422(api: Api, limit: str) -> None:
    """Unicode digits pass str.isdigit() but not int(): once a 500 and a traceback."""
    answer = api.call("GET", "/api/commands", params={"limit": limit})
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "invalid_request"


# A raw-HTTP fuzzer: what no HTTP client library would send.

VERBS = st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT", b"HEAD", b"OPTIONS", b"PATCH"])
ROUTES = st.sampled_from(
    [
        b"/api/devices",
        b"/api/devices/hall",
        b"/api/devices/attic/commands",
        b"/api/devices/hall/reconnect",
        b"/api/commands?limit=5",
        b"/api/commands?state=queued&order=newest",
        b"/api/events",
        b"/metrics",
        b"/healthz",
        b"/",
    ]
)
PRINTABLE = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
HEADER_NAMES = st.sampled_from(
    [b"Authorization", b"Content-Type", b"Host", b"Origin", b"Expect", b"Accept", b"X-A"]
)
GOOD_HEADERS = st.lists(
    st.one_of(
        st.tuples(HEADER_NAMES, PRINTABLE.map(str.encode)),
        st.just((b"Authorization", ("Bearer " + TOKEN).encode())),
        st.just((b"Content-Type", b"application/json")),
    ),
    max_size=4,
)
RAW_BYTES = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
BAD_HEADERS = st.lists(
    st.one_of(
        st.tuples(HEADER_NAMES, RAW_BYTES),
        st.tuples(RAW_BYTES.filter(lambda b: b":" not in b and b), RAW_BYTES),
        st.just((b"X-Long", b"v" * 9000)),
    ),
    min_size=1,
    max_size=4,
)
# Half the requests are well formed (they reach the app with odd values), half are not.
REQUESTS = st.one_of(
    st.tuples(VERBS, ROUTES, GOOD_HEADERS),
    st.tuples(
        st.one_of(VERBS, st.binary(min_size=1, max_size=12).filter(lambda b: b" " not in b)),
        st.one_of(
            ROUTES,
            st.binary(max_size=40).map(lambda b: b"/" + urllib.parse.quote_from_bytes(b).encode()),
            st.binary(max_size=40).map(lambda b: b"/" + b.translate(None, b" \r\n")),
        ),
        BAD_HEADERS,
    ),
)
RAW_BODIES = st.one_of(BODIES, st.just(b""))


def _raw_exchange(url: str, request: bytes) -> bytes:
    host, _, port = url.removeprefix("http://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(request)  # framed by its Content-Length; the server closes after it
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_raw_http_fuzz_never_5xx_and_errors_are_json(api: Api) -> None:
    answered: dict[int, int] = {}

    @settings(
        max_examples=RAW_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(request=REQUESTS, body=RAW_BODIES)
    def run(request: tuple[bytes, bytes, list[tuple[bytes, bytes]]], body: bytes) -> None:
        method, path, headers = request
        lines = [method + b" " + path + b" HTTP/1.1"]
        if not any(name.lower() == b"host" for name, _ in headers):
            lines.append(b"Host: 127.0.0.1")
        lines += [name + b": " + value for name, value in headers]
        lines += [b"Content-Length: %d" % len(body), b"Connection: close"]
        raw = b"\r\n".join(lines) + b"\r\n\r\n" + body
        answer = _raw_exchange(api.url, raw)
        if not answer:
            return  # closed without a word: only for what is not HTTP at all (counted below)
        head, _, content = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        answered[status] = answered.get(status, 0) + 1
        assert status < 500, (raw[:300], answer[:500])
        if status >= 400 and method != b"HEAD":
            error = json.loads(content)
            assert set(error) == {"code", "message"}, (raw[:300], error)

    run()
    print("raw fuzz answers by status:", dict(sorted(answered.items())))
    assert sum(answered.values()) >= RAW_EXAMPLES * 0.9, answered  # almost all were answered
    assert any(400 <= status < 500 for status in answered), answered
