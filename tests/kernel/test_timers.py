"""The heartbeat and statistics services on the real Linux driver (``kernel`` personality).

Real threads and real time (the library's timers run on CLOCK_MONOTONIC): every wait is
bounded by ``WAIT_S`` and ends on an event the host's port handler sets once its counters
reach the expected value, never on a sleep.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import structlog
import trio

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import RequestType
from agent.services import EventPump
from agent.services._base import ServiceContext
from agent.services.guest_stats import GuestStatsService
from agent.services.heartbeat import HeartbeatSection, HeartbeatService

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

WAIT_S: Final = 10.0
INTERVAL_NS: Final = 100_000_000


@asynccontextmanager
async def services(library: Path) -> AsyncIterator[SimulatedHost]:
    """The real driver behind a host with a 100 ms heartbeat, and both services running."""
    del library
    host = SimulatedHost(personality="kernel", heartbeat_interval_ns=INTERVAL_NS, seed=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        async with open_device(SimOpener(host)) as device:
            pump = EventPump(device)
            context = ServiceContext(device, pump)
            await nursery.start(pump.run)
            await nursery.start(HeartbeatService(context, HeartbeatSection()).run)
            await nursery.start(GuestStatsService(context).run)
            yield host
            nursery.cancel_scope.cancel()


async def wait_until(host: SimulatedHost, condition: Callable[[], bool]) -> None:
    """Wait (at most ``WAIT_S``) until ``condition`` holds after a request the host handled."""
    reached = trio.Event()
    handle = host.vmmdev.process

    def process(phys: int) -> None:
        handle(phys)
        if condition():
            reached.set()

    host.vmmdev.process = process  # type: ignore[method-assign]
    try:
        with trio.fail_after(WAIT_S):
            await reached.wait()
    finally:
        del host.vmmdev.process


def counter(host: SimulatedHost, section: str, key: str) -> int:
    """An integer of ``host status``."""
    part = host.status()[section]
    assert isinstance(part, dict)
    value = part[key]
    assert isinstance(value, int)
    return value


async def test_kernel_beats_reach_the_host_and_the_service_stays_out(
    kernel_library: Path,
) -> None:
    """The real driver refuses the agent's configure (EPERM) and its own beats reach the host."""
    with structlog.testing.capture_logs() as logs:
        async with services(kernel_library) as host:
            configures = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
            beats = counter(host, "heartbeat", "beats")
            await wait_until(host, lambda: counter(host, "heartbeat", "beats") >= beats + 5)
            assert host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE] == configures
            state = host.vmmdev.heartbeat
            assert (state.active, state.flatlined) == (True, False)
    assert [entry["event"] for entry in logs].count("heartbeat_kept_by_driver") == 1


async def test_statistics_reach_the_host_through_the_real_driver(kernel_library: Path) -> None:
    """Mainline lets the trusted session read the interval and report."""
    async with services(kernel_library) as host:
        host.set_statistics_interval(1)
        await wait_until(host, lambda: counter(host, "guest_stats", "reports") >= 2)


async def test_refused_off_sends_no_on(kernel_library: Path) -> None:
    """The real driver stops its heartbeat set-up at a refused first configure (off): one
    HEARTBEAT_CONFIGURE in all, and the host's check stays off (as the simulated drivers)."""
    del kernel_library
    host = SimulatedHost(personality="kernel", heartbeat_interval_ns=INTERVAL_NS, seed=1)
    host.add_fault(RequestType.HEARTBEAT_CONFIGURE, -12, count=1)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            await nursery.start(host.run)
        assert host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE] == 1
        assert host.vmmdev.heartbeat.active is False
        nursery.cancel_scope.cancel()
