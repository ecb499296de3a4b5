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

One untimed bare pass runs first: a process's first GiB can cost far more than the next
ones (up to three times as much, seen on a 2-core test machine), and whichever side ran
first would pay for it. Then each
round times bare and engine back to back; the median of the rounds' ratios is the figure
(target: engine within 1.15x of bare). Each time is taken twice: wall-clock, the figure,
and this process's CPU time (user + system), which other processes on a shared machine
disturb far less; on a quiet machine the two agree.

``--phases`` then walks once more with every phase of a chunk's trip timed in CPU time
(the timers' own cost lands in the figures) and prints microseconds per chunk, inflate
plus deflate.

The balloon service stops a walk where ``MemAvailable`` (or the room left in this
process's memory cgroups, where less) would fall below its floor, ``min_available_mb``
(256 MiB by default). A walk this guest cannot give is refused before anything runs, with
the ``--mb`` it can; a walk that stops all the same, or takes longer than
:func:`walk_limit_s`, ends the bench with one line saying where it stopped and why.

    python bench/balloon.py [--mb N] [--mode allocated|owned] [--rounds N] [--phases]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from agent.device import Device, open_device
from agent.host import SimOpener, SimulatedHost
from agent.host._balloon import HostBalloon
from agent.host.vmmdev import VMMDev
from agent.protocol import BALLOON_CHUNK_SIZE, CheckBalloon
from agent.protocol.constants import Ioctl
from agent.services import EventPump
from agent.services.balloon import BalloonSection, BalloonService, PressureReading
from agent.services.balloon._cgroup import CgroupLimits, Headroom, memory_cgroups
from agent.services.balloon._chunks import MmapAllocator, _libc
from agent.services.balloon._pressure import MemInfo, PressureFileError

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.services.balloon._walker import ChunkWalker

TARGET_RATIO: Final = 1.15
RAM_MB: Final = 4096
SPARE_MB: Final = 64
"""MiB a walk leaves above the balloon's floor for what the rest of the guest (and this
process) may take meanwhile."""
LIMIT_S_PER_CHUNK: Final = 0.05
"""A walk's time limit per chunk, some forty times what a chunk takes on a 2-core test
machine (about 1.2 ms up and down), on top of :data:`LIMIT_BASE_S`."""
LIMIT_BASE_S: Final = 10.0


class WalkFailedError(Exception):
    """The walk stopped short of its goal, or took longer than its limit."""


def walk_limit_s(chunks: int) -> float:
    """How long a walk to or from ``chunks`` may take before the bench gives up."""
    return LIMIT_BASE_S + chunks * LIMIT_S_PER_CHUNK


def headroom_mb() -> int | None:
    """What the service checks its floor against: ``MemAvailable``, or the room left in this
    process's memory cgroups where less (None: unknown, so unchecked)."""

    def mem_available_mb() -> int | None:
        try:
            return MemInfo().available_mb()
        except PressureFileError:
            return None

    return Headroom(mem_available_mb, CgroupLimits(memory_cgroups()).least_room).mb()


def walk_refusal(mb: int, headroom: int | None, floor: int) -> str | None:
    """Why a walk of ``mb`` MiB cannot be made with ``headroom`` MiB and the balloon's
    ``floor``, or None if it can."""
    if headroom is None or mb + floor + SPARE_MB <= headroom:
        return None
    most = headroom - floor - SPARE_MB
    advice = f"pass --mb {most} or less" if most >= 1 else "too little for any walk"
    return (
        f"a {mb} MiB walk needs {mb + floor + SPARE_MB} MiB available (the balloon's floor,"
        f" min_available_mb, is {floor} and {SPARE_MB} are kept spare), this guest has"
        f" {headroom}: {advice}"
    )


class WalkWatch:
    """Given to the service as its ``status_changed``: ends a wait for a walk (its cancel
    scope) as soon as the walker reports a failure."""

    def __init__(self) -> None:
        self.walker: ChunkWalker | None = None
        self.scope: trio.CancelScope | None = None

    def __call__(self) -> None:
        """The service's status changed: look for a failure."""
        failed = self.walker is not None and self.walker.last_failure is not None
        if failed and self.scope is not None:
            self.scope.cancel()

    async def wait_held(self, chunks: int) -> None:
        """Wait until the walker holds ``chunks``.

        Raises:
            WalkFailedError: the walk stopped, or took longer than :func:`walk_limit_s`.
        """
        walker = self.walker
        assert walker is not None
        limit = walk_limit_s(abs(chunks - len(walker.held)))
        with trio.move_on_after(limit) as self.scope:
            await walker.wait_held(chunks)
            return
        where = f"the walk to {chunks} chunks stopped at {len(walker.held)}"
        reason = walker.last_failure or f"not there after {limit:.0f} s"
        msg = f"{where}: {reason}"
        raise WalkFailedError(msg)


class _Quiet:
    async def next_reading(self) -> PressureReading:
        await trio.sleep_forever()
        raise AssertionError


@dataclass
class Spent:
    """Seconds of wall-clock time and of this process's CPU time."""

    wall: float = 0.0
    cpu: float = 0.0

    @staticmethod
    def since(start: Spent) -> Spent:
        """The time spent from ``start`` (read from :meth:`now`) until now."""
        now = Spent.now()
        return Spent(now.wall - start.wall, now.cpu - start.cpu)

    @staticmethod
    def now() -> Spent:
        """Both clocks' readings now."""
        return Spent(time.perf_counter(), time.process_time())


def bare(chunks: int) -> Spent:
    """Map, keep out of forks, lock and unmap ``chunks`` x 1 MiB; return the time taken."""
    libc = _libc()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    protection = mmap.PROT_READ | mmap.PROT_WRITE
    started = Spent.now()
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
    return Spent.since(started)


async def engine(
    chunks: int, mode: str, walk_starts: Callable[[], None] = lambda: None
) -> tuple[Spent, Spent]:
    """Walk the service's balloon to ``chunks`` and back (``walk_starts`` is told when).

    Returns:
        the time taken, and the part of it spent in the simulated host (driver and VMMDev)
        answering the agent's ioctls.
    """
    host = (
        SimulatedHost(personality="oracle", r3_balloon=True, ram_mb=RAM_MB)
        if mode == "allocated"
        else SimulatedHost(personality="passthrough", ram_mb=RAM_MB)
    )
    in_host = Spent()
    host_ioctl = host.ioctl

    async def timed_ioctl(session: Any, code: int, *args: Any) -> None:
        if code == Ioctl.WAIT_FOR_EVENTS:  # the pump's wait blocks; it is no work
            await host_ioctl(session, code, *args)
            return
        # Bare clock reads: this timer runs twice a chunk, inside the engine's own figure.
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            await host_ioctl(session, code, *args)
        finally:
            in_host.wall += time.perf_counter() - wall
            in_host.cpu += time.process_time() - cpu

    setattr(host, "ioctl", timed_ioctl)  # noqa: B010 - instance attribute over the method
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        if mode == "allocated":
            await _hand_to_ring3(host)
        async with open_device(SimOpener(host)) as device:
            pump = EventPump(device)
            watch = WalkWatch()
            service = BalloonService(
                device, pump, BalloonSection(), pressure=_Quiet(), status_changed=watch
            )
            await nursery.start(pump.run)
            await nursery.start(service.run)
            watch.walker = service.walker
            assert watch.walker is not None, f"mode {service.mode} does not walk"
            in_host.wall = in_host.cpu = 0.0
            walk_starts()
            started = Spent.now()
            host.set_balloon_target(chunks)
            await watch.wait_held(chunks)
            host.set_balloon_target(0)
            await watch.wait_held(0)
            elapsed = Spent.since(started)
        nursery.cancel_scope.cancel()
    return elapsed, in_host


async def _hand_to_ring3(host: SimulatedHost) -> None:
    """Oracle's driver without its allocator leaves the balloon to ring 3 from its first
    inflate on: one CHECK_BALLOON that needs one (then a target of 0 again), so the service
    starts in allocated mode."""
    session = await SimOpener(host).open_session()
    for target in (1, 0):
        host.set_balloon_target(target)
        call = CheckBalloon().encode()
        await session.ioctl(call.code, call.buffer)
    await session.aclose()


def _timed(phases: Counter[str], phase: str, function: Callable[..., Any]) -> Any:
    """``function``, charging the CPU time of its calls to ``phase``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return function(*args, **kwargs)
        finally:
            phases[phase] += time.thread_time_ns() - started

    return timed


def _timed_async(
    phases: Counter[str], phase: str, function: Callable[..., Any], skip: Callable[..., bool]
) -> Any:
    """Coroutine function ``function``, charging its calls (but those ``skip`` names)."""

    async def timed(*args: Any) -> Any:
        if skip(*args):
            return await function(*args)
        started = time.thread_time_ns()
        try:
            return await function(*args)
        finally:
            phases[phase] += time.thread_time_ns() - started

    return timed


def _is_wait(_host: SimulatedHost, _session: object, code: int, *_args: object) -> bool:
    """WAIT_FOR_EVENTS: the pump's wait blocks; it is no work."""
    return code == Ioctl.WAIT_FOR_EVENTS


_SCHEDULE = "trio: schedule points, with what ran meanwhile"


def phase_breakdown(chunks: int, mode: str) -> None:
    """Walk once more with each phase timed; print CPU microseconds per chunk (up and down)."""
    phases: Counter[str] = Counter()
    wrapped = (
        (MmapAllocator, "allocate", "memory: mmap, MADV_DONTFORK, mlock"),
        (MmapAllocator, "release", "memory: munmap"),
        (MmapAllocator, "physical_pages", "agent: pagemap read, pages checked and packed"),
        (MemInfo, "available_mb", "agent: MemAvailable look"),
        (HostBalloon, "change", "host: ballooned-page bookkeeping"),
        (VMMDev, "process", "host: VMMDev request handling"),
    )
    for owner, name, phase in wrapped:
        setattr(owner, name, _timed(phases, phase, getattr(owner, name)))
    setattr(  # noqa: B010 - instrumentation
        Device, "request", _timed_async(phases, "device", Device.request, lambda *_: False)
    )
    setattr(  # noqa: B010 - instrumentation
        SimulatedHost, "ioctl", _timed_async(phases, "host", SimulatedHost.ioctl, _is_wait)
    )
    checkpoint = trio.lowlevel.checkpoint
    trio.lowlevel.checkpoint = _timed_async(phases, _SCHEDULE, checkpoint, lambda *_: False)
    try:
        walk, _ = trio.run(engine, chunks, mode, phases.clear)
    finally:
        trio.lowlevel.checkpoint = checkpoint
    host = phases.pop("host")
    phases["agent: device layer (encode, transport, decode)"] = phases.pop("device") - host
    schedule = phases[_SCHEDULE]
    phases["host: driver"] = host - schedule - phases["host: VMMDev request handling"]
    phases["host: VMMDev request handling"] -= phases["host: ballooned-page bookkeeping"]
    total = walk.cpu * 1e9
    phases["agent: walker, service and trio (the rest)"] = round(total) - sum(phases.values())
    print(f"  phases, CPU us per chunk (inflate + deflate), one walk of {walk.cpu * 1000:.0f} ms:")
    print("  (a phase that awaits also counts what other tasks ran while it waited: estimates)")
    for name, value in sorted(phases.items()):
        print(f"    {name:50s} {value / 1000 / chunks:7.1f}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def measure(chunks: int, mode: str, rounds: int, *, phases: bool) -> None:
    """Run both measurements, round after round, and print them."""
    print(f"  untimed warm-up (bare): {_ms(bare(chunks).wall)}")
    ratios: dict[str, list[float]] = {"wall": [], "cpu": [], "agent wall": [], "agent cpu": []}
    for number in range(1, rounds + 1):
        base = bare(chunks)
        spent, host = trio.run(engine, chunks, mode)
        ratios["wall"].append(spent.wall / base.wall)
        ratios["cpu"].append(spent.cpu / base.cpu)
        ratios["agent wall"].append((spent.wall - host.wall) / base.wall)
        ratios["agent cpu"].append((spent.cpu - host.cpu) / base.cpu)
        print(
            f"  round {number}: bare {_ms(base.wall)}, engine {_ms(spent.wall)} "
            f"(simulated host {_ms(host.wall)}, agent's side {_ms(spent.wall - host.wall)}): "
            f"{ratios['wall'][-1]:.2f}x; CPU: bare {_ms(base.cpu)}, engine {_ms(spent.cpu)} "
            f"(simulated host {_ms(host.cpu)}): {ratios['cpu'][-1]:.2f}x"
        )
    median = {name: statistics.median(values) for name, values in ratios.items()}
    verdict = "met" if median["wall"] <= TARGET_RATIO else "MISSED"
    print(
        f"  median ratio {median['wall']:.2f}x (CPU time: {median['cpu']:.2f}x)"
        f"  (target <= {TARGET_RATIO}x: {verdict})"
    )
    print(
        f"  agent's side alone / bare (median): {median['agent wall']:.2f}x "
        f"(CPU time: {median['agent cpu']:.2f}x)"
    )
    if phases:
        phase_breakdown(chunks, mode)


def main() -> None:
    """Check the arguments and that the guest can give the walk, then measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--mode", choices=("allocated", "owned"), default="allocated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--phases", action="store_true", help="time each phase of a chunk")
    args = parser.parse_args()
    if args.mb < 1:
        parser.error(f"--mb must be 1 or more, not {args.mb}")
    if args.rounds < 1:
        parser.error(f"--rounds must be 1 or more, not {args.rounds}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    refusal = walk_refusal(args.mb, headroom_mb(), BalloonSection().min_available_mb)
    if refusal is not None:
        sys.exit(f"bench/balloon.py: {refusal}")
    chunks = args.mb * (1 << 20) // BALLOON_CHUNK_SIZE
    print(f"balloon walk, {args.mb} MiB up and down ({chunks} chunks), mode {args.mode}:")
    try:
        measure(chunks, args.mode, args.rounds, phases=args.phases)
    except* WalkFailedError as failed:
        error: BaseException = failed
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        sys.exit(f"bench/balloon.py: {error}")


if __name__ == "__main__":
    main()
