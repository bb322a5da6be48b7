"""The OpenAPI 3.1 document of the HTTP API, generated from :mod:`keeplink.gateway.models`
(``GET /api/openapi.json``): the schemas are the models' own, so the document cannot drift
from what the gateway accepts and answers.
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from keeplink import __version__
from keeplink.gateway.models import (
    MIN_ID_PREFIX,
    Command,
    CommandList,
    CommandsQuery,
    Device,
    DeviceHistory,
    DeviceList,
    Error,
    EventsQuery,
    Health,
    HistoryQuery,
    Reconnected,
    Submit,
    SubmitAccepted,
)

__all__ = ["openapi"]


_ANSWERS: Final = (
    Error,
    Command,
    CommandList,
    SubmitAccepted,
    Device,
    DeviceList,
    DeviceHistory,
    Reconnected,
    Health,
)


def _json(status: str, model: str, description: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model}"}
    return {status: {"description": description, "content": {"application/json": {"schema": ref}}}}


def _errors(*pairs: tuple[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, description in pairs:
        out |= _json(status, "Error", description)
    return out


def _query(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return [
        {"name": name, "in": "query", "required": False, "schema": prop}
        for name, prop in schema["properties"].items()
    ]


def _located(response: dict[str, Any]) -> dict[str, Any]:
    """A 202 answer with the ``Location`` of the command it stored."""
    ((status, body),) = response.items()
    location = {
        "description": "the stored command's own URL: /api/commands/{id}",
        "schema": {"type": "string"},
    }
    return {status: {**body, "headers": {"Location": location}}}


_AUTH: Final = ("401", "missing or bad token")
_BAD: Final = ("400", "malformed JSON or request")
_CAP: Final = ("413", "body too large")
_NO_COMMAND: Final = ("404", "unknown command: no command's id is this or starts with this prefix")
_AMBIGUOUS: Final = ("422", "the prefix starts more than one command's id (listed in the message)")


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document, generated from the models above."""
    _, defs = models_json_schema(
        [(m, "serialization") for m in _ANSWERS] + [(Submit, "validation")],
        ref_template="#/components/schemas/{model}",
    )
    read: list[dict[str, list[str]]] = [{"bearer": []}, {}]
    device = {"name": "device", "in": "path", "required": True, "schema": {"type": "string"}}
    command = {
        "name": "command",
        "in": "path",
        "required": True,
        "description": (
            f"the command's id, or a prefix of it of at least {MIN_ID_PREFIX} hex digits "
            "that starts no other command's id"
        ),
        "schema": {"type": "string"},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keeplink gateway",
            "version": __version__,
            "description": (
                "Writes need Authorization: Bearer <token>. Reads need the read token (or the "
                "write token) when the gateway has a read_token. Errors are always "
                '{"code", "message"}.'
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": defs["$defs"],
        },
        "paths": {
            "/api/devices": {
                "get": {
                    "summary": "All devices",
                    "security": read,
                    "responses": _json("200", "DeviceList", "devices") | _errors(_AUTH),
                }
            },
            "/api/devices/{device}": {
                "parameters": [device],
                "get": {
                    "summary": "One device: presence, link state, last error, queued count",
                    "security": read,
                    "responses": _json("200", "Device", "the device")
                    | _errors(_AUTH, ("404", "unknown device")),
                },
            },
            "/api/devices/{device}/history": {
                "parameters": [device],
                "get": {
                    "summary": "A device's last hours: presence and link spans, outages, "
                    "per-minute counters, last errors (kept in memory, bounded)",
                    "security": read,
                    "parameters": _query(HistoryQuery),
                    "responses": _json("200", "DeviceHistory", "the device's history")
                    | _errors(_AUTH, ("404", "unknown device"), ("422", "bad hours")),
                },
            },
            "/api/devices/{device}/commands": {
                "parameters": [device],
                "post": {
                    "summary": "Submit a durable command",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Submit"}}
                        },
                    },
                    "responses": _located(
                        _json("202", "SubmitAccepted", "stored; queued while away")
                    )
                    | _errors(
                        _BAD,
                        _AUTH,
                        ("404", "unknown device"),
                        _CAP,
                        (
                            "422",
                            "invalid op or args, or a command that could never be delivered "
                            "(the device's driver cannot carry it; a firmware image that is "
                            "not a readable file, or not of the given size): the message says "
                            "why, and nothing was stored",
                        ),
                        ("429", "the device's queue is full (queue_full)"),
                        ("503", "the store is unavailable or busy; nothing was stored"),
                    ),
                },
            },
            "/api/devices/{device}/reconnect": {
                "parameters": [device],
                "post": {
                    "summary": "Make a failed or backing-off link try again now",
                    "security": [{"bearer": []}],
                    "responses": _json("202", "Reconnected", "what was done")
                    | _errors(
                        _AUTH,
                        ("404", "unknown device"),
                        ("409", "another node of the fleet owns the device"),
                    ),
                },
            },
            "/api/devices/{device}/resume": {
                "parameters": [device],
                "post": {
                    "summary": "Deliver to a parked device now instead of at the end of its park",
                    "security": [{"bearer": []}],
                    "responses": _json("202", "Resumed", "what was done")
                    | _errors(
                        _AUTH,
                        ("404", "unknown device"),
                        ("409", "another node of the fleet owns the device"),
                    ),
                },
            },
            "/api/commands": {
                "get": {
                    "summary": "Commands, oldest first (order=newest for newest first)",
                    "security": read,
                    "parameters": _query(CommandsQuery),
                    "responses": _json("200", "CommandList", "commands")
                    | _errors(_AUTH, ("404", "unknown device"), ("422", "bad filter")),
                }
            },
            "/api/commands/{command}": {
                "parameters": [command],
                "get": {
                    "summary": "One command",
                    "security": read,
                    "responses": _json("200", "Command", "the command")
                    | _errors(_AUTH, _NO_COMMAND, _AMBIGUOUS),
                },
                "delete": {
                    "summary": "Cancel a queued or in-flight command",
                    "security": [{"bearer": []}],
                    "responses": _json("200", "Command", "the cancelled command")
                    | _errors(
                        _AUTH, _NO_COMMAND, ("409", "the command is already final"), _AMBIGUOUS
                    ),
                },
            },
            "/api/events": {
                "get": {
                    "summary": "WebSocket: every event of the fleet, as JSON text messages",
                    "security": read,
                    "parameters": _query(EventsQuery),
                    "responses": {"101": {"description": "switching to WebSocket"}}
                    | _errors(_AUTH, ("403", "foreign Origin"), ("422", "bad since")),
                }
            },
            "/healthz": {
                "get": {
                    "summary": "This node's health (no token needed)",
                    "responses": _json("200", "Health", "ok or degraded, with the reason"),
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics of this node (text exposition format)",
                    "security": read,
                    "responses": {
                        "200": {
                            "description": "the metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    }
                    | _errors(_AUTH),
                }
            },
            "/api/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "the OpenAPI 3.1 document of the API",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/": {
                "get": {
                    "summary": "The dashboard (one HTML page; gzipped when the client takes it)",
                    "responses": {
                        "200": {
                            "description": "the page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
    }
