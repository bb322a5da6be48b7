"""Each device's executors: the ops its driver delivers otherwise than as one request.

The outbox knows one executor per op; the gateway's devices may need different ones for the
same op (an ESPHome device's ``firmware`` goes over espota2 to its OTA port, a jsonline
device's as ``ota.*`` requests on its link). :class:`ByDevice` is the outbox's executor of
such an op and hands each command to the device's own, as the driver registry made it
(:attr:`~keeplink.gateway.drivers.DriverSpec.executors`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from keeplink._core.commands import Command
from keeplink._core.errors import InvalidRequestError
from keeplink._core.outcomes import Outcome
from keeplink._link import Link
from keeplink.gateway.config import GatewayConfig
from keeplink.gateway.drivers import REGISTRY
from keeplink.outbox import DeliveryContext, Executor

__all__ = ["ByDevice", "Checked", "device_executors"]


@runtime_checkable
class Checked(Protocol):
    """An executor that can tell at submit whether a command could ever be delivered."""

    async def check(self, link: Link[Any], args: Mapping[str, Any]) -> None: ...


class ByDevice:
    """The outbox's executor of one op: each command goes to its device's own executor."""

    def __init__(self, op: str, by_device: Mapping[str, Executor]) -> None:
        self.op = op
        self.by_device = dict(by_device)

    async def __call__(self, link: Link[Any], command: Command, ctx: DeliveryContext) -> Outcome:
        """Raises InvalidRequestError (the command fails for good) for a device whose
        driver has no executor of this op."""
        executor = self.by_device.get(ctx.device)
        if executor is None:
            raise InvalidRequestError(f"the device {ctx.device!r} takes no {self.op!r} command")
        return await executor(link, command, ctx)


def device_executors(config: GatewayConfig) -> dict[str, ByDevice]:
    """``op -> ByDevice`` for every op some device's driver delivers with an executor."""
    table: dict[str, dict[str, Executor]] = {}
    for device in config.devices:
        for op, executor in REGISTRY[device.driver].executors(device).items():
            table.setdefault(op, {})[device.id] = executor
    return {op: ByDevice(op, by_device) for op, by_device in table.items()}
