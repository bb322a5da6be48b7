"""Device records: upsert, round trip, read many at once."""

from __future__ import annotations

import dataclasses

import pytest

from keeplink._core.commands import DeviceRecord, new_command, transition
from keeplink._core.errors import InvalidRequestError
from keeplink.outbox.store import CommandStore
from keeplink.testing.store_suite._base import T0, S, StoreSuiteBase


class DeviceRecordSuite(StoreSuiteBase):
    """Device records round trip exactly and refuse what cannot be stored."""

    async def test_device_records_upsert_and_round_trip(self, store: CommandStore) -> None:
        assert await store.get_device("lamp") is None
        plain = DeviceRecord(device="lamp")
        await store.put_device(plain)
        assert await store.get_device("lamp") == plain

        parked = DeviceRecord(
            device="lamp",
            cycle=12,
            failed_cycles=3,
            parked_reason="3 presence cycles failed — «timeout»",
            parked_until=T0 + 3600.000001,
            failed_cycle=11,
        )
        await store.put_device(parked)
        got = await store.get_device("lamp")
        assert got == parked
        assert got is not None
        assert got.parked_until is not None
        assert got.parked_until.hex() == parked.parked_until.hex()  # type: ignore[union-attr]

        other = DeviceRecord(device="ünï 灯", failed_cycles=1)
        await store.put_device(other)
        await store.put_device(plain)  # un-parking writes the Nones back
        assert await store.get_device("lamp") == plain
        assert await store.get_device("ünï 灯") == other
        assert await store.get_device("LAMP") is None

    async def test_many_devices_read_at_once_answer_as_one_at_a_time(
        self, store: CommandStore
    ) -> None:
        """``depths`` and ``get_devices`` (one read for a whole device list) say what
        ``count`` and ``get_device`` say device by device."""
        devices = ["lamp", "fan", "ünï 灯", "never-seen"]
        for n in range(7):
            stored = await store.insert(
                new_command(device=devices[n % 3], op="set", args={}, now=T0)
            )
            if n % 2:
                sending = transition(stored, S.SENDING, now=T0 + 1, attempts=1)
                assert await store.update(sending, expect=S.QUEUED)
                if n == 5:
                    assert await store.update(
                        transition(sending, S.SUCCEEDED, now=T0 + 2), expect=S.SENDING
                    )
        await store.put_device(DeviceRecord(device="fan", cycle=4))
        await store.put_device(DeviceRecord(device="ünï 灯", failed_cycles=2))
        one_by_one = {
            d: (
                await store.count(device=d, states=[S.QUEUED]),
                await store.count(device=d, states=[S.SENDING]),
            )
            for d in devices
        }
        assert one_by_one == {"lamp": (2, 1), "fan": (1, 1), "ünï 灯": (1, 0), "never-seen": (0, 0)}
        assert await store.depths(devices) == one_by_one
        assert await store.depths([]) == {}
        records = {d: r for d in devices if (r := await store.get_device(d)) is not None}
        assert set(records) == {"fan", "ünï 灯"}
        assert await store.get_devices(devices) == records
        assert await store.get_devices([]) == {}

    def test_device_record_fields_are_all_covered(self) -> None:
        """If DeviceRecord grows a field, the stores must learn about it (and this list)."""
        assert [f.name for f in dataclasses.fields(DeviceRecord)] == [
            "device",
            "cycle",
            "failed_cycles",
            "failed_cycle",
            "parked_reason",
            "parked_until",
        ]

    async def test_device_records_refuse_unstorable_values(self, store: CommandStore) -> None:
        with pytest.raises(InvalidRequestError, match="parked_until must not be NaN"):
            await store.put_device(DeviceRecord(device="x", parked_until=float("nan")))
        with pytest.raises(InvalidRequestError, match="failed_cycles must be an integer"):
            await store.put_device(DeviceRecord(device="x", failed_cycles="2"))  # type: ignore[arg-type]
        assert await store.get_device("x") is None
