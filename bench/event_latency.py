"""Event delivery latency, host to subscriber, in-process, against a bare trio relay.

The simulated host raises RESTORED; the agent's event pump (one waiter session, no
polling) hands it to a subscriber. Measures the wall time from the host raising the event
to the subscriber receiving it, over N events, and prints p50/p99/max.

The baseline, measured in the same run: the same hand-offs with nothing between them. A
relay task waits on a ``trio.Event`` (as the pump's wait waits for the host's wake-up) and
sets another (as the pump posts to the subscriber's mailbox), which the measuring task
waits on: two task wake-ups, the least any path from a host event through a pump task to a
subscriber takes. The ratio is what the simulated host, the device layer, the codec and the
pump add.

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
TARGET_P99_US: Final = 1000


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


class Relay:
    """A task that wakes on :attr:`raised` and sets :attr:`posted`, each renewed once used."""

    def __init__(self) -> None:
        self.raised = trio.Event()
        self.posted = trio.Event()

    async def run(self) -> None:
        """Pass every wake-up on, until cancelled."""
        while True:
            await self.raised.wait()
            self.raised = trio.Event()
            self.posted.set()


async def measure_bare(events: int) -> list[int]:
    """Return the latency of each wake-up through a :class:`Relay`, in nanoseconds."""
    relay = Relay()
    latencies: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.run)
        await trio.lowlevel.checkpoint()  # the relay waits before the first wake-up
        for _ in range(events):
            sent = time.perf_counter_ns()
            relay.raised.set()
            await relay.posted.wait()
            relay.posted = trio.Event()
            latencies.append(time.perf_counter_ns() - sent)
        nursery.cancel_scope.cancel()
    return latencies


def percentiles_us(latencies: list[int]) -> tuple[float, float, float, float]:
    """p50, p99, max and mean of ``latencies`` (ns) in microseconds."""
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    return p50 / 1000, p99 / 1000, ordered[-1] / 1000, statistics.fmean(ordered) / 1000


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--personality", default="passthrough")
    args = parser.parse_args()
    if args.events < 1:
        parser.error(f"--events must be 1 or more, not {args.events}")
    configure_logging(LogConfig(level=BENCH_LOG_LEVEL), stream=sys.stderr)
    agent = percentiles_us(trio.run(measure, args.events, args.personality))
    bare = percentiles_us(trio.run(measure_bare, args.events))
    print(f"event latency host->subscriber, {args.events} events, {args.personality}:")
    for name, (p50, p99, most, mean) in (("agent", agent), ("bare trio relay", bare)):
        print(
            f"  {name:16} p50 {p50:7.1f} us  p99 {p99:7.1f} us  max {most:8.1f} us  "
            f"mean {mean:7.1f} us"
        )
    print(f"  ratio agent/bare: p50 {agent[0] / bare[0]:.1f}x, p99 {agent[1] / bare[1]:.1f}x")
    verdict = "met" if agent[1] < TARGET_P99_US else "MISSED"
    print(f"  target p99 < {TARGET_P99_US} us: {verdict}")


if __name__ == "__main__":
    main()
