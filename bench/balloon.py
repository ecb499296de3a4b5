"""Balloon walk cost: 1 GiB through the agent's engine against the bare memory work.

In one run:

- *engine*: an in-process simulated host asks for a 1 GiB balloon, then for none; the
  balloon service walks there and back with real chunks (map, keep out of forks, lock,
  hand over; take back, unmap), each chunk a CHANGE_BALLOON (``allocated``:
  Oracle's driver with ``handle_in_r3``) or a CHANGE_MEMBALLOON with the pages read from
  pagemap (``owned``: passthrough);
- *bare*: the same memory work without the agent, the very calls the engine's allocator
  makes: map, keep out of forks, lock (which faults in, i.e. touches, every page for
  writing) and unmap 1024 x 1 MiB, all mapped before any is unmapped, as the walk does.

One untimed bare pass runs first: a process's first GiB costs more than the next (the
kernel sets up its page tables), and whichever side ran first would pay for it. Then each
round times bare and engine back to back; the median of the rounds' ratios is the figure
(target: engine within 1.15x of bare).

    python bench/balloon.py [--mb N] [--mode allocated|owned] [--rounds N]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import time
from typing import Any, Final

import structlog
import trio

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import BALLOON_CHUNK_SIZE
from agent.protocol.constants import Ioctl
from agent.services import EventPump
from agent.services.balloon import BalloonSection, BalloonService, PressureReading
from agent.services.balloon._chunks import _libc

TARGET_RATIO: Final = 1.15
RAM_MB: Final = 4096


class _Quiet:
    async def next_reading(self) -> PressureReading:
        await trio.sleep_forever()
        raise AssertionError


def bare(chunks: int) -> float:
    """Map, keep out of forks, lock and unmap ``chunks`` x 1 MiB; return the seconds taken."""
    libc = _libc()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    protection = mmap.PROT_READ | mmap.PROT_WRITE
    started = time.perf_counter()
    addresses = []
    for _ in range(chunks):
        address = libc.mmap(None, BALLOON_CHUNK_SIZE, protection, flags, -1, 0)
        libc.madvise(address, BALLOON_CHUNK_SIZE, mmap.MADV_DONTFORK)
        if libc.mlock(address, BALLOON_CHUNK_SIZE) != 0:
            msg = f"mlock failed: errno {ctypes.get_errno()} (RLIMIT_MEMLOCK?)"
            raise OSError(msg)
        addresses.append(address)
    for address in reversed(addresses):
        libc.munmap(address, BALLOON_CHUNK_SIZE)
    return time.perf_counter() - started


async def engine(chunks: int, mode: str) -> tuple[float, float]:
    """Walk the service's balloon to ``chunks`` and back.

    Returns:
        the seconds taken, and the part of them spent in the simulated host (driver and
        VMMDev) answering the agent's ioctls.
    """
    host = (
        SimulatedHost(personality="oracle", r3_balloon=True, ram_mb=RAM_MB)
        if mode == "allocated"
        else SimulatedHost(personality="passthrough", ram_mb=RAM_MB)
    )
    in_host = 0.0
    host_ioctl = host.ioctl

    async def timed_ioctl(session: Any, code: int, *args: Any) -> None:
        nonlocal in_host
        if code == Ioctl.WAIT_FOR_EVENTS:  # the pump's wait blocks; it is no work
            await host_ioctl(session, code, *args)
            return
        entered = time.perf_counter()
        try:
            await host_ioctl(session, code, *args)
        finally:
            in_host += time.perf_counter() - entered

    setattr(host, "ioctl", timed_ioctl)  # noqa: B010 - instance attribute over the method
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        async with open_device(SimOpener(host)) as device:
            pump = EventPump(device)
            service = BalloonService(device, pump, BalloonSection(), pressure=_Quiet())
            await nursery.start(pump.run)
            await nursery.start(service.run)
            walker = service.walker
            assert walker is not None, f"mode {service.mode} does not walk"
            started, in_host = time.perf_counter(), 0.0
            host.set_balloon_target(chunks)
            await walker.wait_held(chunks)
            host.set_balloon_target(0)
            await walker.wait_held(0)
            elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return elapsed, in_host


def main() -> None:
    """Run both measurements, round after round, and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--mode", choices=("allocated", "owned"), default="allocated")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    chunks = args.mb * (1 << 20) // BALLOON_CHUNK_SIZE
    print(f"balloon walk, {args.mb} MiB up and down ({chunks} chunks), mode {args.mode}:")
    warm_up_s = bare(chunks)
    print(f"  untimed warm-up (bare): {warm_up_s * 1000:.1f} ms")
    ratios, agent_ratios = [], []
    for number in range(1, args.rounds + 1):
        bare_s = bare(chunks)
        engine_s, host_s = trio.run(engine, chunks, args.mode)
        ratios.append(engine_s / bare_s)
        agent_ratios.append((engine_s - host_s) / bare_s)
        print(
            f"  round {number}: bare {bare_s * 1000:.1f} ms, engine {engine_s * 1000:.1f} ms "
            f"(simulated host {host_s * 1000:.1f} ms, agent's side {(engine_s - host_s) * 1000:.1f}"
            f" ms): {ratios[-1]:.2f}x, agent's side alone {agent_ratios[-1]:.2f}x"
        )
    ratio = statistics.median(ratios)
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"  median ratio {ratio:.2f}x  (target <= {TARGET_RATIO}x: {verdict})")
    print(f"  agent's side alone / bare (median): {statistics.median(agent_ratios):.2f}x")


if __name__ == "__main__":
    main()
