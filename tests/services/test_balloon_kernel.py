"""Kernel-driven ballooning, against the simulated in-tree driver and the real one.

The ``kernel`` personality runs the real Linux vboxguest code (its ``vbg_balloon_work``), so
this proves the agent's part: holding 0x40 in the filter is what makes the kernel balloon.
Real threads and time: every wait is bounded by ``WAIT_S``.
"""

from __future__ import annotations

import itertools
import re
import time
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import Event, RequestType
from agent.services import BalloonGauge, EventPump
from agent.services.balloon import BalloonMode, BalloonSection, BalloonService
from tests.services.balloon_support import Quiet, running_balloon, start_in_scope, until

if TYPE_CHECKING:
    from agent.device import Device
    from agent.protocol import BalloonStatus

WAIT_S: Final = 30.0
SLOW_CHUNK_S: Final = 0.05
"""How long the host takes over each chunk where a test needs the kernel mid-inflate."""
REPEATED_READS: Final = 3


def kernel_status(mb: int) -> str:
    """The status of a kernel balloon of ``mb`` MB, as a pattern."""
    return rf"balloon {mb} MB \(kernel\)"


async def test_kernel_reaches_the_target_while_the_agent_runs(personality: str) -> None:
    host = SimulatedHost(personality=personality, seed=1)
    gauge = BalloonGauge()
    with trio.fail_after(WAIT_S):
        async with running_balloon(personality=personality, host=host, gauge=gauge) as run:
            assert run.service.mode is BalloonMode.KERNEL
            run.host.set_balloon_target(48)
            await run.settle(48)
            run.host.set_balloon_target(8)
            await run.settle(8)
            # The real driver's worker counts a chunk out only after the host's answer
            # (vbg_balloon_work), so its count may still lag the host's by one here.
            await run.until(lambda: run.host.driver.balloon_chunks == 8)
            assert await gauge.read() == 8  # asks the driver for the size
            assert run.service.statistics().chunks == 8
            assert re.fullmatch(kernel_status(8), run.service.status())


async def test_the_gauge_reads_the_kernel_balloon(personality: str) -> None:
    """No event tells userspace that the kernel ballooned (its ISR keeps 0x40): reading the
    gauge asks the driver, whose CHECK_BALLOON only reports the kernel's count."""
    host = SimulatedHost(personality=personality, seed=1)
    gauge = BalloonGauge()
    with trio.fail_after(WAIT_S):
        async with running_balloon(personality=personality, host=host, gauge=gauge) as run:
            assert await gauge.read() == 0
            run.host.set_balloon_target(48)
            await run.until(lambda: run.host.driver.balloon_chunks == 48)
            assert await gauge.read() == 48
            assert re.fullmatch(kernel_status(48), run.service.status())
            assert run.host_chunks == 48  # the query moved nothing


class SlowCheck:
    """The device, whose CHECK_BALLOON answer is held back until ``release`` is set; with
    ``answers_late`` a cancelled call still returns its answer, the cancellation coming at
    the caller's next checkpoint (a blocking ioctl in a thread that is not abandoned)."""

    def __init__(self, device: Device, *, answers_late: bool) -> None:
        self._device = device
        self._answers_late = answers_late
        self.entered = trio.Event()
        self.release = trio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._device, name)

    async def check_balloon(self) -> BalloonStatus:
        status = await self._device.check_balloon()
        self.entered.set()
        try:
            await self.release.wait()
        except trio.Cancelled:
            if not self._answers_late:
                raise
        return status


@pytest.mark.parametrize("answers_late", [False, True], ids=["cancelled", "answered"])
async def test_a_refresh_in_flight_at_stop_leaves_the_drains_size_behind(
    personality: str, *, answers_late: bool
) -> None:
    """The guest statistics' refresh waits on a CHECK_BALLOON when the service stops: the
    gauge ends at what the drain's own read found, the kernel's 48 MB where the answer
    still arrives (a blocking ioctl), None (nobody knows) where the drain time cancels
    that call too, and stays there once the reader has its answer; the refresh left is
    the drain's, the running service's gone."""
    host = SimulatedHost(personality=personality, seed=1)
    gauge = BalloonGauge()
    read_done = trio.Event()

    async def statistics_report() -> None:  # what the guest statistics do before a report
        await gauge.read()
        read_done.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as outer:
            async with running_balloon(personality=personality, host=host, gauge=gauge) as run:
                assert run.service.mode is BalloonMode.KERNEL
                run.host.set_balloon_target(48)
                await run.until(lambda: run.host.driver.balloon_chunks == 48)
                slow = SlowCheck(run.device, answers_late=answers_late)
                run.service._device = slow  # type: ignore[assignment]
                outer.start_soon(statistics_report)
                await slow.entered.wait()
            left = 48 if answers_late else None
            assert (gauge.refresh, gauge.chunks) == (run.service._read_left, left)
            slow.release.set()  # a late answer, if nothing took it yet
            await read_done.wait()
        assert gauge.chunks == left  # a stopped service published nothing more


async def test_the_gauge_follows_the_kernel_past_the_drain(personality: str) -> None:
    """The service stops while the kernel inflates to the host's 64 MB: 0x40 leaves the
    filter, but the work item already running goes on to the target (``vbg_balloon_work``),
    so the drain reads a size part-way. The drain leaves a refresh that asks the driver
    again (a pure query: it moves nothing), so later reads follow the kernel to 64."""
    host = SimulatedHost(personality=personality, seed=1)
    host.set_delay(RequestType.CHANGE_MEMBALLOON, SLOW_CHUNK_S)
    gauge = BalloonGauge()
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(SimOpener(host)) as device:
                pump = EventPump(device)
                service = BalloonService(
                    device,
                    pump,
                    BalloonSection(),
                    pressure=Quiet(),
                    mem_available_mb=lambda: 1 << 20,
                    gauge=gauge,
                )
                await nursery.start(pump.run)
                scope = trio.CancelScope()
                stopped = await start_in_scope(nursery, service, scope)
                host.set_balloon_target(64)
                await until(lambda: host.driver.balloon_chunks > 0)
                scope.cancel()
                await stopped.wait()
                await service.drain()
                left = gauge.chunks
                await until(lambda: host.driver.balloon_chunks == 64)
                assert await gauge.read() == 64
                assert host.vmmdev.balloon.chunks == 64  # the reads moved nothing
                nursery.cancel_scope.cancel()
    assert left is not None
    assert left < 64


async def test_kernel_does_not_balloon_without_the_agent(personality: str) -> None:
    """Nobody filters 0x40: the event stays pending at the host and the kernel never sees it."""
    host = SimulatedHost(personality=personality, seed=1)
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            host.set_balloon_target(16)
            await trio.testing.wait_all_tasks_blocked()  # the driver's tasks had their turn
            assert not host.vmmdev.have_events  # no interrupt: nothing reaches the driver
            status = host.status()
            filter_mask, pending = status["filter_mask"], status["pending_events"]
            assert isinstance(filter_mask, int)
            assert isinstance(pending, int)
            assert not filter_mask & Event.BALLOON_CHANGE_REQUEST
            assert pending & Event.BALLOON_CHANGE_REQUEST
            assert status["balloon"] == {
                "target_mb": 16,
                "acked_mb": 0,
                "max_mb": 1843,
                "chunks": 0,
                "pages": 0,
            }
            nursery.cancel_scope.cancel()


DRIVER_CATCH_UP_READS: Final = 1000
"""Reads of the driver's count, a millisecond apart, before the test's own reads."""


async def test_a_size_already_logged_is_read_at_debug(personality: str) -> None:
    """Each read that finds a new size is one info line; reads that find it again are debug."""
    host = SimulatedHost(personality=personality, seed=1)
    gauge = BalloonGauge()
    with trio.fail_after(WAIT_S), capture_logs() as logs:
        async with running_balloon(personality=personality, host=host, gauge=gauge) as run:
            run.host.set_balloon_target(8)
            await run.settle(8)
            # The real driver counts a chunk once the host's answer is back: the host may
            # show 8 while the driver's count is 7 for a moment.
            for _ in range(DRIVER_CATCH_UP_READS):
                if await gauge.read() == 8:  # asks the driver for the size
                    break
                await trio.sleep(0.001)
            for _ in range(REPEATED_READS):
                assert await gauge.read() == 8
    checked = [entry for entry in logs if entry["event"] == "balloon_checked"]
    news = [entry["chunks"] for entry in checked if entry["log_level"] == "info"]
    assert news[-1] == 8
    assert all(before != after for before, after in itertools.pairwise(news))
    repeats = [entry for entry in checked if entry["log_level"] == "debug"]
    assert len(repeats) >= REPEATED_READS
    assert {entry["chunks"] for entry in repeats[-REPEATED_READS:]} == {8}


async def test_the_status_reads_nothing() -> None:
    """Computing the status reads nothing (no event tells the agent that the kernel's
    balloon moved), so a status recomputed on every change it reports, as the daemon does,
    starts no chain of reads: one read per gauge refresh. It shows the size last read and
    changes with it only: a read that finds the size again (one before every statistics
    report) changes nothing systemd shows; when it was read is in the statistics.

    On the real clock: a chain of reads keeps a task always runnable, which would stop the
    autojump clock's time and hang the test instead of failing it at ``WAIT_S``."""
    host = SimulatedHost(personality="mainline", seed=1)
    gauge = BalloonGauge()
    services: list[BalloonService] = []
    texts: list[str] = []

    def status_changed() -> None:  # the daemon's STATUS= recomputes every fragment
        texts.extend(service.status() for service in services)

    with trio.fail_after(WAIT_S):
        async with running_balloon(
            personality="mainline", host=host, gauge=gauge, status_changed=status_changed
        ) as run:
            services.append(run.service)
            run.host.set_balloon_target(48)
            await run.until(lambda: run.host.driver.balloon_chunks == 48)
            reads, changes = run.service.reads, len(texts)
            assert await gauge.read() == 48
            await trio.testing.wait_all_tasks_blocked()
            assert (run.service.reads, len(texts)) == (reads + 1, changes + 1)
            assert re.fullmatch(kernel_status(48), texts[-1])
            before = time.time()
            assert await gauge.read() == 48  # the same size again
            await trio.testing.wait_all_tasks_blocked()
            assert (run.service.reads, len(texts)) == (reads + 2, changes + 1)
            read_at = run.service.statistics().read_at
            assert read_at is not None
            assert before <= read_at <= time.time()
            for _ in range(REPEATED_READS):
                assert re.fullmatch(kernel_status(48), run.service.status())
            await trio.testing.wait_all_tasks_blocked()
            assert run.service.reads == reads + 2
