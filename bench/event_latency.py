"""Event delivery latency, host to subscriber, in-process.

The simulated host raises RESTORED; the agent's event pump (one waiter session, no
polling) hands it to a subscriber. Measures the wall time from the host raising the event
to the subscriber receiving it, over N events, and prints p50/p99/max.

    python bench/event_latency.py [--events N] [--personality P]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Final

import trio

from agent.config import LogConfig
from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.logconfig import configure_logging
from agent.protocol import Event
from agent.services import EventPump

BENCH_LOG_LEVEL: Final = "warning"
"""Only warnings are logged (to stderr): per-event debug lines would cost time in the
measured path and clutter the figures on stdout."""


async def measure(events: int, personality: str) -> list[int]:
    """Return the latency of each event in nanoseconds."""
    host = SimulatedHost(personality=personality)
    latencies: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        async with open_device(SimOpener(host)) as device:
            pump = EventPump(device)
            with pump.subscribe("bench", Event.RESTORED) as subscription:
                await nursery.start(pump.run)
                for _ in range(events):
                    sent = time.perf_counter_ns()
                    host.raise_events(Event.RESTORED)
                    await subscription.receive()
                    latencies.append(time.perf_counter_ns() - sent)
        nursery.cancel_scope.cancel()
    return latencies


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--personality", default="passthrough")
    args = parser.parse_args()
    configure_logging(LogConfig(level=BENCH_LOG_LEVEL), stream=sys.stderr)
    latencies = trio.run(measure, args.events, args.personality)
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] / 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] / 1000
    print(f"event latency host->subscriber, {len(ordered)} events, {args.personality}:")
    print(
        f"  p50 {p50:.1f} us  p99 {p99:.1f} us  max {ordered[-1] / 1000:.1f} us  "
        f"mean {statistics.fmean(ordered) / 1000:.1f} us"
    )
    print(f"  target p99 < 1000 us: {'met' if p99 < 1000 else 'MISSED'}")


if __name__ == "__main__":
    main()
