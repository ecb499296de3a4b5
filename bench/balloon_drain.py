"""Owned-balloon drain cost: a drain with one refusal against a plain one, in the same run.

An in-process simulated host (passthrough) gives the agent a balloon of ``--chunks``
chunks; the service stops and drains it. Each round drains it twice, back to back: plainly,
and with the host refusing the drain's first deflate once (the newest chunk, passed over and
given back last, after :data:`~agent.services.balloon._walker.DRAIN_RETRY_INITIAL_S`). The
figure is the median over the rounds of the second drain's time, less that retry delay,
over the first's: one refusal should cost its retry and nothing more (target: within
:data:`TARGET_RATIO`). A drain whose cost per chunk grew with the chunks held above or below
it shows here as a ratio growing with ``--chunks``. The plain drain's rate (chunks a second)
is printed too.

No memory is locked: the chunks are addresses and page numbers only, so the figures are the
agent's and the simulated host's work per chunk.

    python bench/balloon_drain.py [--chunks N] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Final

import structlog
import trio
import trio.testing

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import BALLOON_CHUNK_PAGES, ChunkPages, RequestType
from agent.protocol.constants import PAGE_SIZE
from agent.protocol.status import VERR_NO_MEMORY
from agent.services import EventPump
from agent.services.balloon import BalloonSection, BalloonService, PressureReading
from agent.services.balloon._walker import DRAIN_RETRY_INITIAL_S

TARGET_RATIO: Final = 1.2
CHUNK_BYTES: Final = 1 << 20
SPARE_MB: Final = 1024
"""Guest RAM beyond the balloon (the simulated host's maximum leaves some to the guest)."""


class PagesOnly:
    """Chunks that are an address and 256 page numbers each: nothing is mapped."""

    def __init__(self) -> None:
        self._next = 1 << 40

    def allocate(self) -> int:
        self._next += CHUNK_BYTES
        return self._next

    def release(self, address: int) -> None:
        del address

    def physical_pages(self, address: int) -> ChunkPages:
        return ChunkPages.of([address + n * PAGE_SIZE for n in range(BALLOON_CHUNK_PAGES)])


class _Quiet:
    async def next_reading(self) -> PressureReading:
        await trio.sleep_forever()
        raise AssertionError


async def drain_s(chunks: int, *, refuse_once: bool) -> float:
    """Walk a service's owned balloon to ``chunks``, stop it and time its drain."""
    host = SimulatedHost(personality="passthrough", ram_mb=chunks + SPARE_MB)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        async with open_device(SimOpener(host)) as device:
            pump = EventPump(device)
            service = BalloonService(
                device,
                pump,
                BalloonSection(),
                allocator=PagesOnly(),
                pressure=_Quiet(),
                mem_available_mb=lambda: None,
            )
            await nursery.start(pump.run)
            with trio.CancelScope() as running:
                nursery.start_soon(service.run)
                await service.mode_known.wait()
                walker = service.walker
                assert walker is not None
                host.set_balloon_target(chunks)
                await walker.wait_held(chunks)
                running.cancel()
            assert walker is not None
            await trio.testing.wait_all_tasks_blocked()
            if refuse_once:
                host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
            started = time.perf_counter()
            await service.drain()
            elapsed = time.perf_counter() - started
            assert not walker.held, f"{len(walker.held)} chunks kept"
        nursery.cancel_scope.cancel()
    return elapsed


def main() -> None:
    """Drain plainly and with one refusal, round after round, and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.chunks < 1 or args.rounds < 1:
        parser.error("--chunks and --rounds must be 1 or more")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    print(f"owned balloon drain, {args.chunks} chunks:")
    ratios = []
    for number in range(1, args.rounds + 1):
        plain = trio.run(lambda: drain_s(args.chunks, refuse_once=False))
        refused = trio.run(lambda: drain_s(args.chunks, refuse_once=True))
        ratios.append((refused - DRAIN_RETRY_INITIAL_S) / plain)
        print(
            f"  round {number}: plain {plain * 1000:.0f} ms ({args.chunks / plain:.0f} chunks/s),"
            f" one refusal {refused * 1000:.0f} ms (less the {DRAIN_RETRY_INITIAL_S:g} s retry"
            f" delay: {ratios[-1]:.2f}x)"
        )
    median = statistics.median(ratios)
    verdict = "met" if median <= TARGET_RATIO else "MISSED"
    print(f"  median ratio {median:.2f}x (target <= {TARGET_RATIO}x: {verdict})")


if __name__ == "__main__":
    main()
