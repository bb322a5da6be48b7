"""The ESPHome driver's entities, sans-IO: which command fits which entity, and which state
update confirms which command.

Private to :mod:`keeplink.drivers.esphome`, which documents and re-exports what is public.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aioesphomeapi.model import (
    ButtonInfo,
    EntityInfo,
    EntityState,
    LightInfo,
    LightState,
    NumberInfo,
    SwitchInfo,
)

from keeplink._core.errors import InvalidRequestError
from keeplink._core.jsonline import StatePush
from keeplink.drivers._esphome_channel import Confirmed, EntityCommand, EsphomeFrame

MAX_AWAITING: Final = 32
"""Commands per entity waiting for their state: past this the oldest is forgotten (it
times out by its own deadline). A bound, so a device that never confirms grows nothing."""
FLOAT_TOLERANCE: Final = 1e-4
"""Numbers travel as 32-bit floats: 21.3 comes back as 21.2999992; closer than this is equal."""
OPS: Final = ("switch", "number", "light", "button")
_INFO_OF_OP: Final[dict[str, type[EntityInfo]]] = {
    "switch": SwitchInfo,
    "number": NumberInfo,
    "light": LightInfo,
    "button": ButtonInfo,
}


@dataclass(slots=True)
class _Awaiting:
    seq: int
    want: dict[str, Any] = field(default_factory=dict)


class Entities:
    """The last entity list a device gave (kept across reconnects, never wiped) and the
    commands waiting for the state that shows them applied."""

    def __init__(self) -> None:
        self.by_id: dict[str, EntityInfo] = {}
        self.object_ids: dict[int, str] = {}
        self.awaiting: dict[str, list[_Awaiting]] = {}

    def learn(self, entities: Iterable[EntityInfo]) -> None:
        """Take a new entity list (a handshake's)."""
        listed = [e for e in entities if e.object_id]
        self.by_id = {e.object_id: e for e in listed}
        self.object_ids = {e.key: e.object_id for e in listed}

    def entity(self, object_id: str) -> EntityInfo | None:
        """The entity with this object id, from the last entity list (None if unknown)."""
        return self.by_id.get(object_id)

    def entity_ids(self) -> list[str]:
        return list(self.by_id)

    def check_fits(self, frame: EntityCommand, info: EntityInfo) -> None:
        """Raise InvalidRequestError if the command does not fit the entity."""
        if not isinstance(info, _INFO_OF_OP[frame.op]):
            raise InvalidRequestError(
                f"esphome {frame.op}: {frame.entity!r} is a {entity_kind(info)}, not a {frame.op}"
            )
        if isinstance(info, NumberInfo) and frame.value is not None:
            low, high = float(info.min_value), float(info.max_value)
            # A device that leaves the range out sends 0..0: then there is nothing to check.
            if low < high and not low <= frame.value <= high:
                raise InvalidRequestError(
                    f"esphome number: {frame.value!r} is outside {frame.entity!r}'s "
                    f"range {low:g}..{high:g}"
                )

    def expect(self, frame: EntityCommand) -> None:
        """Note that ``frame`` waits for the state that shows it applied."""
        want: dict[str, Any] = {}
        if frame.op == "number":
            want["value"] = frame.value
        else:
            if frame.state is not None:
                want["state"] = frame.state
            if frame.brightness is not None and frame.state is not False:
                want["brightness"] = frame.brightness
        waiting = self.awaiting.setdefault(frame.entity, [])
        waiting.append(_Awaiting(frame.seq, want))
        del waiting[:-MAX_AWAITING]

    def on_state(self, state: EntityState) -> list[EsphomeFrame]:
        """The frames one state update makes: a Confirmed for each command it shows
        applied, then the StatePush. Pure apart from the waiting list it updates."""
        object_id = self.object_ids.get(state.key)
        if object_id is None:
            return []  # an entity we were not told about (listed after we asked)
        value = state_value(state)
        frames: list[EsphomeFrame] = []
        waiting = self.awaiting.get(object_id)
        if waiting:
            for entry in list(waiting):
                if _satisfied(entry.want, value):
                    waiting.remove(entry)
                    frames.append(Confirmed(seq=entry.seq, entity=object_id, state=value))
            if not waiting:
                del self.awaiting[object_id]
        frames.append(StatePush(values={object_id: value}))
        return frames


def entity_kind(info: EntityInfo) -> str:
    """``SwitchInfo`` → ``"switch"``, ``BinarySensorInfo`` → ``"binarysensor"``, …"""
    name = type(info).__name__
    return name.removesuffix("Info").lower()


def state_value(state: EntityState) -> Any:
    """A state update's value as plain data: a bool, a number, a string, None (missing),
    or for a light ``{"state", "brightness"}``; other kinds: their fields."""
    if isinstance(state, LightState):
        return {"state": state.state, "brightness": state.brightness}
    if getattr(state, "missing_state", False):
        return None
    fields = state.to_dict()
    if "state" in fields:
        return _plain(fields["state"])
    return {k: _plain(v) for k, v in fields.items() if k not in ("key", "device_id")}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def number_arg(op: str, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"esphome {op}: {name} must be a finite number, got {value!r}")
    return float(value)


def _satisfied(want: Mapping[str, Any], value: Any) -> bool:
    if "value" in want:
        return isinstance(value, int | float) and math.isclose(
            value, want["value"], rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE
        )
    if isinstance(value, dict):  # a light
        if "state" in want and value.get("state") != want["state"]:
            return False
        if "brightness" in want:
            got = value.get("brightness")
            return isinstance(got, int | float) and abs(got - want["brightness"]) <= 1e-3
        return True
    return "state" in want and value == want["state"]
