"""Request throughput: keeplink's Link vs a raw asyncio client, same peer, same run.

    python -m bench.requests [--count 4000] [--rounds 3]

The peer is the jsonline device simulator in its own process (so the client side is what is
measured). The raw client writes hand-built ``req`` lines and reads ``ack`` lines with bare
asyncio streams: no correlation, no deadlines, no supervision; the floor keeplink is
compared to. Each round measures every mode once, interleaved; the table shows the median.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from bench.common import start_sim
from keeplink import Acknowledged, Link
from keeplink.drivers import JsonLineDriver

Measure = Callable[[int], Awaitable[float]]


async def raw_client(port: int, window: int) -> Measure:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'{"t":"hello","v":1}\n')
    await writer.drain()
    await reader.readline()  # welcome

    async def measure(count: int) -> float:
        begin = time.perf_counter()
        if window == 1:
            for seq in range(count):
                writer.write(b'{"t":"req","seq":%d,"op":"echo","args":{"n":%d}}\n' % (seq, seq))
                await writer.drain()
                await reader.readline()
        else:
            slots = asyncio.Semaphore(window)

            async def send_all() -> None:
                for seq in range(count):
                    await slots.acquire()
                    writer.write(b'{"t":"req","seq":%d,"op":"echo","args":{"n":%d}}\n' % (seq, seq))
                    await writer.drain()

            sender = asyncio.create_task(send_all())
            for _ in range(count):
                await reader.readline()
                slots.release()
            await sender
        return time.perf_counter() - begin

    measure.close = writer.close  # type: ignore[attr-defined]
    return measure


async def keeplink_client(port: int, window: int) -> tuple[Measure, Link[object]]:
    driver = JsonLineDriver(host="127.0.0.1", port=port, max_in_flight=window)
    link: Link[object] = Link(driver, name=f"bench-w{window}", heartbeat_s=None)  # type: ignore[arg-type]
    link.start()
    await asyncio.wait_for(link.wait_connected(), 30)

    async def measure(count: int) -> float:
        begin = time.perf_counter()
        if window == 1:
            for n in range(count):
                outcome = await link.request("echo", {"n": n}, timeout=30)
                assert isinstance(outcome, Acknowledged)
        else:
            per_worker = count // window

            async def worker() -> None:
                for n in range(per_worker):
                    outcome = await link.request("echo", {"n": n}, timeout=30)
                    assert isinstance(outcome, Acknowledged)

            await asyncio.gather(*(worker() for _ in range(window)))
        return time.perf_counter() - begin

    return measure, link


async def measure(*, count: int, rounds: int) -> dict[str, float]:
    """Requests/s per mode (median of ``rounds`` interleaved rounds)."""
    sim = await start_sim("--device-id", "bench")
    links: list[Link[object]] = []
    modes: dict[str, Measure] = {}
    try:
        for window in (1, 32):
            modes[f"raw asyncio, window {window}"] = await raw_client(sim.port, window)
            measure_fn, link = await keeplink_client(sim.port, window)
            links.append(link)
            modes[f"keeplink, window {window}"] = measure_fn
        times: dict[str, list[float]] = {name: [] for name in modes}
        for measure_fn in modes.values():  # warm-up
            await measure_fn(min(count, 500))
        for _ in range(rounds):
            for name, measure_fn in modes.items():
                times[name].append(await measure_fn(count))
    finally:
        for link in links:
            await link.stop()
        for measure_fn in modes.values():
            close = getattr(measure_fn, "close", None)
            if close is not None:
                close()
        await sim.stop()
    return {name: count / statistics.median(t) for name, t in times.items()}


async def main(count: int, rounds: int) -> None:
    rate = await measure(count=count, rounds=rounds)
    print(f"request throughput, {count} echo requests a round, median of {rounds} rounds")
    print(f"{'mode':<26} {'req/s':>10} {'vs raw':>8}  goal")
    goals = {1: 0.8, 32: 0.7}
    for window in (1, 32):
        raw = rate[f"raw asyncio, window {window}"]
        ours = rate[f"keeplink, window {window}"]
        print(f"{f'raw asyncio, window {window}':<26} {raw:>10.0f} {1.0:>8.2f}")
        ratio = ours / raw
        verdict = "met" if ratio >= goals[window] else "NOT met"
        print(
            f"{f'keeplink, window {window}':<26} {ours:>10.0f} {ratio:>8.2f}"
            f"  >= {goals[window]} ({verdict})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.rounds))
