"""A restore from before the services' start is not one after it, on every driver.

The host keeps a RESTORED that no session's filter admits pending and hands it over once a
filter does (VMMDev's ``fHostEventFlags``), so the event of a VM restored before the agent
started reaches the session monitor and timesync after their first read of the session id.
VBoxService takes the id its start reads as the baseline and tells a restore by a changed
id; so must they, while a restore after their start is still seen once.

Rules of this test module:
- Each test runs once per driver personality, the real Linux driver (``kernel``, on real
  threads) included, so every test runs on the real clock, bounded by ``trio.fail_after``.
- Waits end on events: a request the host handled, a status the service announced, a
  correction of the fake clock; never on a sleep.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import pytest
import structlog.testing
import trio

from agent.device import open_device
from agent.host import ALL_PERSONALITIES, SimOpener, SimulatedHost
from agent.protocol import RequestType
from agent.services import EventPump, ServiceContext, SessionMonitorStatistics
from agent.services.session_monitor import SessionMonitor
from agent.services.timesync import TimesyncSection, TimesyncService
from tests.conftest import KERNEL_PERSONALITY
from tests.services.test_timesync import FakeClock

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from agent.device import Device

WAIT_S: Final = 30.0
INTERVAL_S: Final = 0.5
"""Timesync's interval: a pass soon after the event the host kept, if that called for none."""
MS: Final = 1_000_000
"""Nanoseconds per millisecond."""
RESTORED_BEHIND_MS: Final = 10 * 60 * 1000
"""How much further behind the host's clock a restore after the start leaves the guest's
(on top of the 500 ms slewed at start, which the clock has hardly begun to make up)."""


@pytest.fixture(name="driver", params=ALL_PERSONALITIES)
def _driver(request: pytest.FixtureRequest) -> str:
    """Each driver personality; ``kernel`` needs the real driver's library."""
    name: str = request.param
    if name == KERNEL_PERSONALITY:
        request.getfixturevalue("kernel_library")
    return name


@asynccontextmanager
async def _restored_before_start(driver: str) -> AsyncIterator[tuple[SimulatedHost, Device]]:
    """A running host and an open device, the VM restored before any session asked for
    RESTORED (the host keeps the event pending)."""
    host = SimulatedHost(personality=driver)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        async with open_device(SimOpener(host)) as device:
            host.vmmdev.time_offset_ms = 500
            host.restore()
            yield host, device
        nursery.cancel_scope.cancel()


async def _handled(host: SimulatedHost, request_type: int, count: int) -> None:
    """Return once the host has handled ``count`` requests of ``request_type``."""
    counts = host.vmmdev.request_counts
    if counts[request_type] >= count:
        return
    reached = trio.Event()
    handle = host.vmmdev.process

    def process(phys: int) -> None:
        handle(phys)
        if counts[request_type] >= count:
            reached.set()

    host.vmmdev.process = process  # type: ignore[method-assign]
    try:
        await reached.wait()
    finally:
        del host.vmmdev.process


class CorrectedClock(FakeClock):
    """A :class:`FakeClock` that counts its corrections and tells each."""

    def __init__(self) -> None:
        super().__init__()
        self.corrections = 0
        self._corrected = trio.Event()

    def step(self, offset_ns: int) -> None:
        super().step(offset_ns)
        self._correct()

    def slew(self, offset_ns: int) -> None:
        super().slew(offset_ns)
        self._correct()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once ``condition`` holds, looked at after each correction."""
        while not condition():
            await self._corrected.wait()
            self._corrected = trio.Event()

    def _correct(self) -> None:
        self.corrections += 1
        self._corrected.set()


def _session_id(host: SimulatedHost) -> int:
    value = host.status()["session_id"]
    assert isinstance(value, int)
    return value


async def test_the_monitor_counts_only_the_restore_after_its_start(driver: str) -> None:
    """The monitor reads the restored VM's id at its start and then takes the event the host
    kept for no restore (no ``vm_restored`` from an id to itself); a restore after the
    start is counted and logged once."""
    after_start: list[int] = []
    new_id_read = trio.Event()

    def status_changed() -> None:
        if monitor.statistics().session_id in after_start:
            new_id_read.set()

    with trio.fail_after(WAIT_S), structlog.testing.capture_logs() as logs:
        async with _restored_before_start(driver) as (host, device):
            pump = EventPump(device)
            monitor = SessionMonitor(ServiceContext(device, pump, status_changed))
            first = _session_id(host)
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await nursery.start(monitor.run)
                await _handled(host, RequestType.GET_SESSION_ID, 2)  # the kept event's read
                host.restore()
                after_start.append(_session_id(host))
                await new_id_read.wait()
                statistics = monitor.statistics()
                nursery.cancel_scope.cancel()
    [second] = after_start
    assert SessionMonitorStatistics(second, 1) == statistics
    lines = [
        (line["event"], line.get("old_session_id"), line["session_id"])
        for line in logs
        if line["event"] in {"vm_session_read", "vm_restored"}
    ]
    assert [
        ("vm_session_read", None, f"{first:#x}"),
        ("vm_restored", f"{first:#x}", f"{second:#x}"),
    ] == lines


async def test_the_monitor_counts_a_restore_during_its_restart_back_off(driver: str) -> None:
    """A restore while the monitor's run is down (the supervisor backing off) is heard by no
    run of it, and the host keeps its event for the next run: that run's first read finds
    another id than the last read, one restore, and the kept event is none; a restore after
    it is the second."""
    restored = trio.Event()

    def status_changed() -> None:
        if monitor.statistics().restores == 2:
            restored.set()

    with trio.fail_after(WAIT_S), structlog.testing.capture_logs() as logs:
        async with _restored_before_start(driver) as (host, device):
            pump = EventPump(device)
            monitor = SessionMonitor(ServiceContext(device, pump, status_changed))
            first = _session_id(host)
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                # Wait for the run to end, as the supervisor does, not only for its cancel: a
                # read the host answered before the cancel still returns (the driver completes
                # it) and the run settles it, which a next run started meanwhile would see as
                # the older id landing after its own read.
                async with trio.open_nursery() as first_run:
                    await first_run.start(monitor.run)
                    await _handled(host, RequestType.GET_SESSION_ID, 2)  # the kept event's read
                    first_run.cancel_scope.cancel()
                host.restore()  # the run ended: the supervisor backs off
                second = _session_id(host)
                await nursery.start(monitor.run)  # the same monitor runs again
                assert SessionMonitorStatistics(second, 1) == monitor.statistics()
                await _handled(host, RequestType.GET_SESSION_ID, 4)  # the kept event's read
                host.restore()
                third = _session_id(host)
                await restored.wait()
                statistics = monitor.statistics()
                nursery.cancel_scope.cancel()
    assert SessionMonitorStatistics(third, 2) == statistics
    lines = [
        (line["event"], line.get("old_session_id"), line["session_id"])
        for line in logs
        if line["event"] in {"vm_session_read", "vm_restored"}
    ]
    assert [
        ("vm_session_read", None, f"{first:#x}"),
        ("vm_restored", f"{first:#x}", f"{second:#x}"),
        ("vm_restored", f"{second:#x}", f"{third:#x}"),
    ] == lines


async def test_timesync_slews_at_start_and_steps_the_restore_after_it(driver: str) -> None:
    """A fresh timesync slews the 500 ms the restore before its start left, as VBoxService
    does with the id its start read, instead of stepping it for the event the host kept
    (up to a pass after that event's read); a restore after the start is stepped, once."""
    clock = CorrectedClock()
    section = TimesyncSection(interval_s=INTERVAL_S)
    with trio.fail_after(WAIT_S), structlog.testing.capture_logs() as logs:
        async with _restored_before_start(driver) as (host, device):
            pump = EventPump(device)
            service = TimesyncService(ServiceContext(device, pump), section, clock)
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await nursery.start(service.run)
                await _handled(host, RequestType.GET_SESSION_ID, 2)  # the kept event's read
                corrections = clock.corrections  # then a correction, or a step already made
                await clock.wait_until(lambda: clock.corrections > corrections or bool(clock.steps))
                steps_before_the_restore = list(clock.steps)
                host.vmmdev.time_offset_ms += RESTORED_BEHIND_MS
                host.restore()
                await clock.wait_until(lambda: bool(clock.steps))
                nursery.cancel_scope.cancel()
    assert steps_before_the_restore == []
    assert all(_within(slew, 500) for slew in clock.slews)
    assert [_within(step, RESTORED_BEHIND_MS + 500) for step in clock.steps] == [True]
    stepped = [line["reason"] for line in logs if line["event"] == "clock_stepped"]
    assert stepped == ["restored"]


def _within(value_ns: int, expected_ms: float) -> bool:
    return abs(value_ns / MS - expected_ms) <= 50
