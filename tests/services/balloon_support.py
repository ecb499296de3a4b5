"""Helpers for the balloon tests: a simulated-address allocator, scripted pressure, a runner."""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.host.driver.oracle import OracleDriver
from agent.protocol import (
    BALLOON_CHUNK_PAGES,
    BALLOON_CHUNK_SIZE,
    CheckBalloon,
    ChunkPages,
    LocalProtocolError,
    VBoxStatusError,
)
from agent.protocol.constants import PAGE_SIZE
from agent.protocol.status import VERR_NO_MEMORY
from agent.services import EventPump, Leftovers
from agent.services.balloon import BalloonSection, BalloonService, PressureReading
from agent.services.balloon._chunks import ChunkError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

    from agent.device import Device, DeviceOpener
    from agent.protocol import Submission
    from agent.services._base import BalloonGauge, DrainTime
    from agent.services.balloon import PressureSource
    from agent.services.balloon._cgroup import CgroupRoom
    from agent.services.balloon._chunks import Chunk, ChunkAllocator
    from agent.services.balloon._handover import Handover, HostTarget
    from agent.services.balloon._walker import ChunkWalker

USER_CHUNKS_BASE: Final = 0x7E00_0000_0000
SIM_PAGES_BASE: Final = 1 << 40
"""Guest-physical pages the simulated allocator hands out (far from the kernel's pool)."""
POLL_S: Final = 0.01
MAX_POLLS: Final = 60_000


@dataclass
class SimChunks:
    """Chunks with the simulator's own addresses: no real memory is touched.

    ``fail_next`` makes the next allocations fail (ENOMEM); ``live`` are chunks not released.
    """

    free_pages: list[int] = field(default_factory=list)
    """Pages released, handed out again first (the last released first)."""
    live: dict[int, list[int]] = field(default_factory=dict)
    fail_next: int = 0
    _next: int = USER_CHUNKS_BASE
    _next_page: int = SIM_PAGES_BASE

    def allocate(self) -> int:
        if self.fail_next:
            self.fail_next -= 1
            raise ChunkError(12, "simulated allocation failure")
        address = self._next
        self._next += 2 * BALLOON_CHUNK_SIZE
        pages = []
        for _ in range(BALLOON_CHUNK_PAGES):
            if self.free_pages:
                pages.append(self.free_pages.pop())
            else:
                pages.append(self._next_page)
                self._next_page += PAGE_SIZE
        self.live[address] = pages
        return address

    def release(self, address: int) -> None:
        self.free_pages.extend(self.live.pop(address))

    def physical_pages(self, address: int) -> ChunkPages:
        try:
            return ChunkPages.of(self.live[address])
        except LocalProtocolError as exc:  # as the real allocator reports it
            raise ChunkError(0, str(exc)) from exc


class ScriptedPressure:
    """A pressure source the test feeds: each ``send`` is the next reading."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[PressureReading | OSError](16)
        self.waits = 0
        """Calls of ``next_reading`` so far (a watcher waiting counts once per reading)."""

    def send(self, stall_pct: float, *, high: bool) -> None:
        self._send.send_nowait(PressureReading(stall_pct, high=high, via="poll"))

    def fail(self, error: OSError) -> None:
        """The next reading raises ``error``, as a PSI file that became unreadable."""
        self._send.send_nowait(error)

    async def next_reading(self) -> PressureReading:
        self.waits += 1
        reading = await self._receive.receive()
        if isinstance(reading, OSError):
            raise reading
        return reading


class Quiet:
    """A pressure source that never reports."""

    async def next_reading(self) -> PressureReading:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover


@dataclass
class Running:
    """A simulated host with a balloon service running against it."""

    host: SimulatedHost
    device: Device
    service: BalloonService
    nursery: trio.Nursery

    @property
    def host_chunks(self) -> int:
        """The host's count of ballooned pages, in chunks, checked against its page states:
        an agent that inflated a chunk twice, deflated one it never inflated or unmapped
        one whose pages stayed ballooned leaves them apart, and fails here."""
        return host_chunks(self.host)

    @property
    def walker(self) -> ChunkWalker:
        """The service's chunk walker: the modes where the agent moves chunks have one."""
        walker = self.service.walker
        assert walker is not None, "no chunk walker in this balloon mode"
        return walker

    async def until(self, condition: Callable[[], bool]) -> None:
        """Poll ``condition`` on the (virtual) clock, at most ``MAX_POLLS`` times."""
        await until(condition)

    async def settle(self, chunks: int) -> None:
        """Wait until the host shows ``chunks``."""
        await self.until(lambda: self.host_chunks == chunks)


def host_chunks(host: SimulatedHost) -> int:
    """The count of ballooned pages ``host`` shows, in chunks, once it is checked to match
    the pages it shows ballooned."""
    balloon = host.status()["balloon"]
    assert isinstance(balloon, dict)
    chunks, pages = balloon["chunks"], balloon["pages"]
    assert isinstance(chunks, int)
    assert pages == chunks * BALLOON_CHUNK_PAGES, balloon
    return chunks


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` on the (virtual) clock, at most ``MAX_POLLS`` times."""
    for _ in range(MAX_POLLS):
        if condition():
            return
        await trio.sleep(POLL_S)
    msg = f"condition not met within {MAX_POLLS * POLL_S:g} s"
    raise AssertionError(msg)


async def hand_to_ring3(host: SimulatedHost) -> None:
    """Oracle's driver without its allocator: bring it to ring-3 ballooning as an earlier
    agent leaves it (a CHECK_BALLOON whose target needs an inflate, for good; then a target
    of 0 and the owner gone), so a service starts in allocated mode. Other drivers: nothing."""
    driver = host.driver
    if not isinstance(driver, OracleDriver) or driver.kernel_allocator:
        return
    session = await SimOpener(host).open_session()
    for target in (1, 0):
        host.set_balloon_target(target)
        call = CheckBalloon().encode()
        await session.ioctl(call.code, call.buffer)
        assert call.request.decode(call).handle_in_r3
    await session.aclose()


async def start_in_scope(
    nursery: trio.Nursery, service: BalloonService, scope: trio.CancelScope
) -> trio.Event:
    """Start ``service`` in ``nursery``, its run inside ``scope``; return the event its run's
    end sets."""
    stopped = trio.Event()

    async def run_service(task_status: trio.TaskStatus[None]) -> None:
        try:
            with scope:
                await service.run(task_status=task_status)
        finally:
            stopped.set()

    await nursery.start(run_service)
    return stopped


@asynccontextmanager
async def running_balloon(
    *,
    personality: str,
    section: BalloonSection | None = None,
    allocator: ChunkAllocator | None = None,
    pressure: PressureSource | None = None,
    mem_available_mb: Callable[[], int | None] = lambda: 1 << 20,
    cgroup_room: Callable[[], CgroupRoom | None] | None = None,
    host: SimulatedHost | None = None,
    before: Callable[[SimulatedHost], Awaitable[None]] | None = None,
    gauge: BalloonGauge | None = None,
    drain_s: float = math.inf,
    psi_file: bool = False,
    sysctl_root: Path | None = None,
    opener_for: Callable[[SimulatedHost], DeviceOpener] = SimOpener,
    status_changed: Callable[[], None] = lambda: None,
    drain_time: DrainTime | None = None,
    agent_stops: bool = False,
) -> AsyncIterator[Running]:
    """Run host, pump and service; on exit cancel the service and drain it, as the daemon does
    (within ``drain_s``, as the daemon's drain time). The agent opens its device through
    ``opener_for(host)``.

    ``before`` runs once the host runs, before the agent opens its device. With ``psi_file``
    the service watches ``section.psi_path`` itself (``pressure`` is not used). With
    ``agent_stops`` the drain is the whole agent's stop (its leftovers stopped with it); else
    only the service stops, the agent running on.
    """
    leftovers = Leftovers()
    host = host if host is not None else SimulatedHost(personality=personality)
    async with trio.open_nursery() as outer:
        await outer.start(host.run)
        if before is not None:
            await before(host)
        async with open_device(opener_for(host)) as device:
            pump = EventPump(device)
            service = BalloonService(
                device,
                pump,
                section if section is not None else BalloonSection(),
                allocator=allocator if allocator is not None else SimChunks(),
                pressure=None if psi_file else pressure if pressure is not None else Quiet(),
                mem_available_mb=mem_available_mb,
                cgroup_room=cgroup_room,
                gauge=gauge,
                sysctl_root=sysctl_root,
                status_changed=status_changed,
                drain_time=drain_time,
                agent_stopping=lambda: agent_stops,
                leftovers=leftovers,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                service_scope = trio.CancelScope()
                stopped = await start_in_scope(nursery, service, service_scope)
                yield Running(host, device, service, nursery)
                service_scope.cancel()
                await stopped.wait()
                if agent_stops:
                    leftovers.stop(trio.current_time() + drain_s)
                with trio.move_on_after(drain_s):
                    await service.drain()
                nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()


class HandoverWrapper:
    """Wraps a walker's handover and passes every call on; subclasses change one of them."""

    def __init__(self, handover: Handover) -> None:
        self._handover = handover
        self.needs_pages = handover.needs_pages

    async def read_target(self) -> HostTarget:
        return await self._handover.read_target()

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        await self._handover.inflate(chunk, submission)

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        await self._handover.deflate(chunk, submission)

    def refusal_ballooned(self, rc: int) -> bool:
        return self._handover.refusal_ballooned(rc)

    async def not_held(
        self, chunk: Chunk, rc: int, *, unconfirmed: bool, balloon_empty: bool
    ) -> bool:
        return await self._handover.not_held(
            chunk, rc, unconfirmed=unconfirmed, balloon_empty=balloon_empty
        )


class ErrnoOnce(HandoverWrapper):
    """The next calls of the named methods raise ``error`` (for a driver refusing the ioctl
    with an errno, what the device raises for it: ``VBoxStatusError.from_errno``), the rest
    go through."""

    def __init__(self, handover: Handover, error: BaseException, **calls: int) -> None:
        super().__init__(handover)
        self._error = error
        self.calls = calls

    def _fail(self, name: str) -> None:
        if self.calls.get(name, 0):
            self.calls[name] -= 1
            raise self._error

    async def read_target(self) -> HostTarget:
        self._fail("read_target")
        return await super().read_target()

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        self._fail("inflate")
        await super().inflate(chunk, submission)

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        self._fail("deflate")
        await super().deflate(chunk, submission)


class RefuseChunk(HandoverWrapper):
    """The host refuses to take back the chunk at ``address`` (VERR_NO_MEMORY, as a real
    device raises it); everything else goes through."""

    def __init__(self, handover: Handover, address: int) -> None:
        super().__init__(handover)
        self.address = address
        self.refusals = 0

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        if chunk.address == self.address:
            self.refusals += 1
            await trio.lowlevel.checkpoint()
            raise VBoxStatusError(VERR_NO_MEMORY, "VMMDEVREQ_CHANGE_MEMBALLOON")
        await super().deflate(chunk, submission)


class RecordRefusals(HandoverWrapper):
    """The status of every refused deflate goes to ``refusals``."""

    def __init__(self, handover: Handover, refusals: list[int]) -> None:
        super().__init__(handover)
        self.refusals = refusals

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        try:
            await super().deflate(chunk, submission)
        except VBoxStatusError as exc:
            self.refusals.append(exc.rc)
            raise
