"""The ``timesync`` service against the in-process simulated host, on a fake guest clock.

Rules of this test module:
- a real ``SimulatedHost`` (its clock is this machine's, moved by ``vmmdev.time_offset_ms``)
  behind ``SimOpener``, with the event pump and a virtual clock (``autojump_clock``, a
  parameter of each test); each test is bounded by ``trio.fail_after``;
- the guest's clock is a ``FakeClock``: this machine's time moved by its own offset, which
  ``step`` moves at once and ``slew`` at the kernel's 0.5 ms per (virtual) second; no test
  here ever changes the machine's clock. The real ``SystemClock`` is only asked for the NTP
  state and, in a child without ``CAP_SYS_TIME``, refused;
- passes are awaited by statistics (``Running.wait_for``: bounded, on the virtual clock).
"""

from __future__ import annotations

import ctypes
import errno
import math
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Final, NoReturn

import pytest
import structlog.testing
import trio
import trio.testing
from pydantic import ValidationError

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import Event, RequestType
from agent.protocol.status import VERR_GENERAL_FAILURE, VERR_HGCM_SERVICE_NOT_FOUND
from agent.services import EventPump, ServiceContext
from agent.services._host_options import OPTION_PREFIX as VBOXSERVICE_OPTION
from agent.services._wallclock import AgentOwnClock, SystemClock
from agent.services.timesync import (
    DAEMON_RESYNC_GRACE_S,
    MAX_HOST_TIME_MS,
    MIN_HOST_TIME_MS,
    RETRY_AFTER_HIGH_LATENCY_S,
    Correction,
    Reading,
    TimesyncSection,
    TimesyncService,
    TimesyncStatistics,
    plan_correction,
    timesync_service,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
    from typing import Any

LIMIT_S: Final = 60
TIMESYNC_OPTION: Final = f"{VBOXSERVICE_OPTION}timesync-"
MS: Final = 1_000_000
"""Nanoseconds per millisecond."""
INTERVAL_S: Final = 10.0
SLEW_NS_PER_S: Final = 500_000
"""How fast the kernel slews: 0.5 ms a second."""
MINUTE_MS: Final = 60 * 1000
CHRONYD_SLEW_NS_PER_S: Final = 83_333_333
"""How fast chronyd slews at most (its maxslewrate, 83333.333 ppm): 83 ms a second."""
CHRONYD_POLL_S: Final = 64


class FakeClock:
    """The guest's clock: this machine's, ``offset_ns`` ahead; records what was done to it.

    A slew is made up at the kernel's rate over trio's (virtual) time, and a new one replaces
    what is left of the last, as ``adjtime`` does; ``synchronised`` is what a time daemon
    makes the kernel say. ``latencies_ns`` are added to the
    monotonic clock between the two readings of a pair (the service times each host reading),
    one per pair, to make readings slow.
    """

    def __init__(self, offset_ns: int = 0, *, synchronised: bool = False) -> None:
        self.offset_ns = offset_ns
        self.synchronised = synchronised
        self.latencies_ns: list[int] = []
        self.steps: list[int] = []
        self.slews: list[int] = []
        self.refusal: OSError | None = None
        self.slew_refusal: OSError | None = None
        self._slew_ns = 0
        self._slew_since = 0.0
        self._monotonic_readings = 0
        self._monotonic_extra_ns = 0

    def now_ns(self) -> int:
        return time.time_ns() + self.offset_ns + self._slewed_ns()

    def monotonic_ns(self) -> int:
        self._monotonic_readings += 1
        if self._monotonic_readings % 2 == 0 and self.latencies_ns:
            self._monotonic_extra_ns += self.latencies_ns.pop(0)
        return time.monotonic_ns() + self._monotonic_extra_ns

    def step(self, offset_ns: int) -> None:
        """Set the clock; like the kernel, drop a slew under way and the synchronised state
        (a time daemon's next update restores it)."""
        if self.refusal is not None:
            raise self.refusal
        self.steps.append(offset_ns)
        self.offset_ns += self._slewed_ns() + offset_ns
        self._slew_ns = 0
        self.synchronised = False

    def slew(self, offset_ns: int) -> None:
        if self.refusal is not None:
            raise self.refusal
        if self.slew_refusal is not None:
            raise self.slew_refusal
        self.slews.append(offset_ns)
        self.offset_ns += self._slewed_ns()
        self._slew_ns = offset_ns
        self._slew_since = trio.current_time()

    def ntp_synchronised(self) -> bool:
        return self.synchronised

    def _slewed_ns(self) -> int:
        if not self._slew_ns:
            return 0
        done = (trio.current_time() - self._slew_since) * SLEW_NS_PER_S
        return int(math.copysign(min(abs(self._slew_ns), done), self._slew_ns))


class Running:
    """A started service and what the test needs to drive it."""

    def __init__(self, service: TimesyncService, host: SimulatedHost) -> None:
        self.service = service
        self.host = host

    async def wait_for(
        self, what: Callable[[TimesyncStatistics], bool], *, passes: int = 10
    ) -> TimesyncStatistics:
        """Let virtual time pass, an interval at a time, until the statistics satisfy
        ``what`` (at most ``passes`` intervals)."""
        for _ in range(passes):
            await trio.testing.wait_all_tasks_blocked()
            statistics = self.service.statistics()
            if what(statistics):
                return statistics
            await trio.sleep(INTERVAL_S)
        pytest.fail(f"the statistics never got there: {self.service.statistics()}")


@asynccontextmanager
async def _running(
    host: SimulatedHost, clock: FakeClock, section: TimesyncSection
) -> AsyncIterator[Running]:
    async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
        pump = EventPump(device)
        service = TimesyncService(ServiceContext(device, pump), section, clock)
        await nursery.start(pump.run)
        await nursery.start(service.run)
        yield Running(service, host)
        nursery.cancel_scope.cancel()


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="wall_on_trio_time")
def _wall_on_trio_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's wall clock (``time.time_ns``, which the simulated host and
    :class:`FakeClock` both read) moves with trio's virtual clock inside the test's run, so
    the time a pass takes on a loaded machine does not enter the drift it measures."""
    real = time.time_ns
    start = real()

    def time_ns() -> int:
        try:
            return start + round(trio.current_time() * 1e9)
        except RuntimeError:  # outside trio (pytest's own timing)
            return real()

    monkeypatch.setattr(time, "time_ns", time_ns)


def _within(value_ns: int, expected_ms: float, slack_ms: float = 50) -> bool:
    return abs(value_ns / MS - expected_ms) <= slack_ms


def _drift(host_ahead_ms: int) -> Reading:
    return Reading(host_ahead_ms * MS, 1 * MS)


def _events(logs: Sequence[Mapping[str, Any]], *names: str) -> list[str]:
    return [entry["event"] for entry in logs if entry["event"] in names]


class TestPlan:
    """``plan_correction``: VBoxService's decision, reading by reading."""

    def test_a_drift_within_the_minimum_is_left_alone(self) -> None:
        plan = plan_correction(_drift(100), TimesyncSection(), set_now=False, restored=False)
        assert plan.correction is Correction.NONE

    def test_a_drift_over_the_minimum_is_slewed(self) -> None:
        plan = plan_correction(_drift(101), TimesyncSection(), set_now=False, restored=False)
        assert plan.correction is Correction.SLEW

    def test_the_minimum_grows_with_the_latency(self) -> None:
        """20 ms to read, factor 8: a 150 ms drift is within the 160 ms it may be off."""
        slow = Reading(150 * MS, 20 * MS)
        section = TimesyncSection()
        assert plan_correction(slow, section, set_now=False, restored=False).correction is (
            Correction.NONE
        )
        faster = TimesyncSection(latency_factor=7)
        assert plan_correction(slow, faster, set_now=False, restored=False).correction is (
            Correction.SLEW
        )

    def test_a_guest_ahead_needs_twice_the_minimum(self) -> None:
        """Against moving time backwards: 200 ms ahead is left, 201 ms slewed back."""
        section = TimesyncSection()
        left = plan_correction(_drift(-200), section, set_now=False, restored=False)
        assert left.correction is Correction.NONE
        slewed = plan_correction(_drift(-201), section, set_now=False, restored=False)
        assert slewed.correction is Correction.SLEW

    def test_over_the_set_threshold_the_clock_is_stepped(self) -> None:
        section = TimesyncSection(set_threshold_s=60)
        plan = plan_correction(_drift(60_001), section, set_now=False, restored=False)
        assert (plan.correction, plan.reason) == (Correction.STEP, "over set_threshold_s")
        within = plan_correction(_drift(60_000), section, set_now=False, restored=False)
        assert within.correction is Correction.SLEW

    def test_after_a_restore_any_drift_over_the_minimum_is_stepped(self) -> None:
        section = TimesyncSection()
        plan = plan_correction(_drift(101), section, set_now=False, restored=True)
        assert (plan.correction, plan.reason) == (Correction.STEP, "restored")
        small = plan_correction(_drift(100), section, set_now=False, restored=True)
        assert small.correction is Correction.NONE
        off = TimesyncSection(set_on_restore=False)
        assert plan_correction(_drift(101), off, set_now=False, restored=True).correction is (
            Correction.SLEW
        )

    def test_set_on_start_steps_whatever_the_drift(self) -> None:
        plan = plan_correction(_drift(0), TimesyncSection(), set_now=True, restored=False)
        assert (plan.correction, plan.reason) == (Correction.STEP, "set_on_start")


class TestSection:
    """``[timesync]``: VBoxService's defaults and bounds."""

    def test_defaults_are_vboxservices(self) -> None:
        section = TimesyncSection()
        assert (section.interval_s, section.min_adjust_ms, section.latency_factor) == (10, 100, 8)
        assert (section.max_latency_ms, section.set_threshold_s) == (250, 1200)
        assert (section.set_on_start, section.set_on_restore, section.defer_to_ntp) == (
            False,
            True,
            True,
        )

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("interval_s", 0.049),
            ("interval_s", 4294967.295),
            ("min_adjust_ms", -1),
            ("latency_factor", 0),
            ("latency_factor", 1025),
            ("max_latency_ms", 0),
            ("set_threshold_s", 7 * 24 * 3600 + 1),
        ],
    )
    def test_out_of_bounds_values_are_refused(self, key: str, value: float) -> None:
        with pytest.raises(ValidationError, match=key):
            TimesyncSection.model_validate({key: value})


@pytest.mark.usefixtures("wall_on_trio_time")
async def test_slews_until_in_sync_and_logs_the_streak_once(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """A host 500 ms ahead: the kernel makes it up at 0.5 ms/s, so each pass (every 100 s)
    hands it the drift then left, until within the minimum; one line when slewing starts,
    one when the clock is in sync."""
    host.vmmdev.time_offset_ms = 500
    with trio.fail_after(3000), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection(interval_s=100)) as running:
            statistics = await running.wait_for(
                lambda s: s.slews >= 1 and s.slews == s.passes - 1, passes=200
            )
            assert running.service.status() == "timesync ok"
            behind_ms = 500 - (clock.now_ns() - time.time_ns()) / MS
            assert 0 < behind_ms <= 101  # within the minimum; the last slew makes up the rest
    assert [round(slew / MS, -1) for slew in clock.slews] == list(range(500, 100, -50))
    assert statistics.steps == 0
    assert clock.steps == []
    assert _events(logs, "clock_slewing", "clock_in_sync") == ["clock_slewing", "clock_in_sync"]


async def test_a_restore_steps_at_once(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """After a restore the drift is stepped before the next interval: a saved VM is behind."""
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection(interval_s=3600)) as running:
            await running.wait_for(lambda s: s.passes == 1)
            host.vmmdev.time_offset_ms = 3 * 3600 * 1000  # saved for three hours
            started = trio.current_time()
            host.restore()
            statistics = await running.wait_for(lambda s: s.passes == 2)
            assert trio.current_time() == started
            assert (statistics.steps, statistics.slews) == (1, 0)
    assert len(clock.steps) == 1
    assert _within(clock.steps[0], 3 * 3600 * 1000)
    assert [entry["reason"] for entry in logs if entry["event"] == "clock_stepped"] == ["restored"]


@asynccontextmanager
async def _another_service_listening(host: SimulatedHost) -> AsyncIterator[ServiceContext]:
    """The device and the event pump, with another service subscribed to RESTORED (as the
    session monitor is in the daemon), so the pump takes a restore while timesync is down."""
    async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
        pump = EventPump(device)
        await nursery.start(pump.run)
        with pump.subscribe("session_monitor", Event.RESTORED):
            yield ServiceContext(device, pump)
        nursery.cancel_scope.cancel()


class Runs:
    """A service's first run, ended when the test says, and the run that follows it, on one
    context (as the supervisor restarts a service, or a reload rebuilds it)."""

    def __init__(
        self,
        context: ServiceContext,
        section: TimesyncSection,
        clock: FakeClock,
        nursery: trio.Nursery,
    ) -> None:
        self._context = context
        self._section = section
        self._clock = clock
        self._nursery = nursery
        self._first_run = trio.CancelScope()
        self.service = TimesyncService(context, section, clock)

    async def start_first(self) -> None:
        """Start the first run; return once it made its first pass."""

        async def run_once() -> None:
            with self._first_run:
                await self.service.run()

        self._nursery.start_soon(run_once)
        await trio.testing.wait_all_tasks_blocked()
        assert self.service.statistics().passes == 1

    async def end_first(self) -> None:
        """End the first run; return once every task is blocked again."""
        self._first_run.cancel()
        await trio.testing.wait_all_tasks_blocked()

    async def start_next(self, *, rebuilt: bool) -> TimesyncService:
        """Start the next run, on the same service or (``rebuilt``) on a new one; return it."""
        if rebuilt:
            self.service = TimesyncService(self._context, self._section, self._clock)
        await self._nursery.start(self.service.run)
        return self.service


@asynccontextmanager
async def _a_first_run(
    host: SimulatedHost, clock: FakeClock, section: TimesyncSection
) -> AsyncIterator[Runs]:
    """A first run of the service that has made its first pass, with another service
    listening for RESTORED while no run does; every run ends with the block."""
    async with _another_service_listening(host) as context, trio.open_nursery() as nursery:
        runs = Runs(context, section, clock, nursery)
        await runs.start_first()
        yield runs
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("rebuilt", [False, True], ids=["restarted", "rebuilt"])
@pytest.mark.parametrize("restored", [True, False], ids=["restored", "not-restored"])
async def test_a_restore_while_no_run_listened_is_stepped_by_the_next_run(
    autojump_clock: trio.abc.Clock,
    host: SimulatedHost,
    clock: FakeClock,
    rebuilt: bool,
    restored: bool,
) -> None:
    """The run ends (a failure the supervisor restarts after a back-off, or a reload that
    rebuilds the service on the daemon's context) and the VM is saved ten minutes and
    restored meanwhile: the next run reads a session id other than the one the service last
    acted on and steps at once, as VBoxService compares the id; without a restore the same
    drift is slewed."""
    section = TimesyncSection(interval_s=3600)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _a_first_run(host, clock, section) as runs:
            await runs.end_first()
            host.vmmdev.time_offset_ms = 10 * 60 * 1000
            if restored:
                host.restore()
            await trio.testing.wait_all_tasks_blocked()
            runs_again_at = trio.current_time()
            service = await runs.start_next(rebuilt=rebuilt)
            await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() == runs_again_at
            statistics = service.statistics()
    stepped = [entry["reason"] for entry in logs if entry["event"] == "clock_stepped"]
    noticed = _events(logs, "restored_while_not_listening")
    if restored:
        assert (stepped, noticed) == (["restored"], ["restored_while_not_listening"])
        assert _within(clock.steps[0], 10 * 60 * 1000)
    else:
        assert (stepped, noticed, statistics.slews) == ([], [], 1)


@pytest.mark.parametrize("rebuilt", [False, True], ids=["restarted", "rebuilt"])
async def test_a_session_id_unread_at_start_is_read_again_at_the_next_pass(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock, rebuilt: bool
) -> None:
    """The VM is saved ten minutes and restored while no run listened, and the next run's
    session read fails: its first pass slews, and the next one reads the id again, finds
    the restore and steps, as VBoxService, which reads the id at every pass; the run never
    read it again and left the ten minutes to adjtime (about 14 days). As after any
    restore's pass, the host's options are read again (a 30 s interval)."""
    section = TimesyncSection(interval_s=INTERVAL_S)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _a_first_run(host, clock, section) as runs:
            await runs.end_first()
            host.vmmdev.time_offset_ms = 10 * MINUTE_MS
            host.restore()
            await trio.testing.wait_all_tasks_blocked()
            host.add_fault(RequestType.GET_SESSION_ID, VERR_GENERAL_FAILURE)
            service = await runs.start_next(rebuilt=rebuilt)
            passes_before = service.statistics().passes
            await trio.sleep(INTERVAL_S / 2)
            assert service.statistics().slews == 1
            host.prop_set(f"{TIMESYNC_OPTION}interval", "30000")
            await trio.sleep(5 * INTERVAL_S)
            statistics = service.statistics()
    stepped = [entry["reason"] for entry in logs if entry["event"] == "clock_stepped"]
    assert (stepped, _events(logs, "restored_while_not_listening")) == (
        ["restored"],
        ["restored_while_not_listening"],
    )
    assert _within(clock.steps[0], 10 * MINUTE_MS)
    assert (statistics.slews, statistics.steps) == (1, 1)
    assert statistics.passes - passes_before == 3  # at 0 s, 10 s (the step), then 40 s
    applied = [entry for entry in logs if entry["event"] == "host_options_applied"]
    assert [entry["interval_s"] for entry in applied] == [30.0]
    assert _events(logs, "vm_session_unreadable", "vm_session_read_again") == [
        "vm_session_unreadable",
        "vm_session_read_again",
    ]


@pytest.mark.parametrize("rebuilt", [False, True], ids=["restarted", "rebuilt"])
async def test_a_session_id_unread_at_a_restore_is_not_taken_for_another_restore_later(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock, rebuilt: bool
) -> None:
    """The session read after a restore's event fails, and the event's pass steps; the run
    ends later with no restore since, and the next run adopts the id it reads: a drift
    over the minimum is slewed, where the pre-restore id the ledger kept made it step as
    after a restore (even backwards)."""
    section = TimesyncSection(interval_s=3600)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _a_first_run(host, clock, section) as runs:
            host.add_fault(RequestType.GET_SESSION_ID, VERR_GENERAL_FAILURE)
            host.vmmdev.time_offset_ms = 3600 * 1000
            host.restore()
            await trio.testing.wait_all_tasks_blocked()
            assert runs.service.statistics().steps == 1
            await runs.end_first()
            host.vmmdev.time_offset_ms += 500
            service = await runs.start_next(rebuilt=rebuilt)
            await trio.testing.wait_all_tasks_blocked()
            statistics = service.statistics()
    stepped = [entry["reason"] for entry in logs if entry["event"] == "clock_stepped"]
    assert (stepped, _events(logs, "restored_while_not_listening")) == (["restored"], [])
    assert statistics.slews == 1
    [slewed] = clock.slews
    assert _within(slewed, 500)


async def test_a_restore_unread_and_unstepped_is_stepped_by_a_rebuilt_service(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """A restore's session read fails and so does its pass's reading of the host's clock;
    a reload rebuilds the service before any pass stepped. The ledger still holds the id
    from before the restore, so the rebuilt run steps the restore it finds. (The entry was
    dropped at the failed read, and the rebuilt run adopted the new id and slewed 10 min.)"""
    section = TimesyncSection(interval_s=3600)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _a_first_run(host, clock, section) as runs:
            host.add_fault(RequestType.GET_SESSION_ID, VERR_GENERAL_FAILURE)
            host.add_fault(RequestType.GET_HOST_TIME, VERR_GENERAL_FAILURE)
            host.vmmdev.time_offset_ms = 10 * MINUTE_MS
            host.restore()
            await trio.testing.wait_all_tasks_blocked()
            assert runs.service.statistics().steps == 0  # the restore's pass could not read
            await runs.end_first()
            await runs.start_next(rebuilt=True)  # a reload rebuilt it
            await trio.testing.wait_all_tasks_blocked()
    stepped = [entry["reason"] for entry in logs if entry["event"] == "clock_stepped"]
    assert stepped == ["restored"]
    assert _within(clock.steps[0], 10 * MINUTE_MS)


async def test_a_session_id_the_host_refuses_leaves_the_run_going(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """A refused session read at start is counted and logged, and the service reads the
    host's clock all the same; a restore's read that goes through ends it (one line)."""
    host.add_fault(RequestType.GET_SESSION_ID, VERR_GENERAL_FAILURE)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection(interval_s=3600)) as running:
            statistics = await running.wait_for(lambda s: s.passes == 1)
            assert statistics.failures == 1
            assert running.service.status() == "timesync ok"
            host.vmmdev.time_offset_ms = 3600 * 1000
            host.restore()
            statistics = await running.wait_for(lambda s: s.passes == 2)
            assert (statistics.steps, statistics.failures) == (1, 1)
    assert _events(logs, "vm_session_unreadable", "vm_session_read_again") == [
        "vm_session_unreadable",
        "vm_session_read_again",
    ]


async def test_a_restores_step_does_not_wait_for_the_hosts_options(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """A property service that holds HGCM connects 20 s: the restore's pass steps at once
    with the options in force, and the host's options are read after it (their 5 s interval
    then paces the passes)."""
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection(interval_s=3600)) as running:
            await running.wait_for(lambda s: s.passes == 1)
            host.set_delay(RequestType.HGCM_CONNECT, 20.0)
            host.prop_set(f"{TIMESYNC_OPTION}interval", "5000")
            host.vmmdev.time_offset_ms = 3600 * 1000
            restored_at = trio.current_time()
            host.restore()
            statistics = await running.wait_for(lambda s: s.passes == 2)
            assert trio.current_time() == restored_at
            assert (statistics.steps, statistics.slews) == (1, 0)
            await trio.sleep(20 + 5 - 0.1)  # the options' read, then their interval
            assert running.service.statistics().passes == 2
            await trio.sleep(0.2)
            await trio.testing.wait_all_tasks_blocked()
            assert running.service.statistics().passes == 3
    assert _within(clock.steps[0], 3600 * 1000)


async def test_a_restore_with_set_on_restore_off_slews(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    with trio.fail_after(LIMIT_S):
        async with _running(
            host, clock, TimesyncSection(interval_s=3600, set_on_restore=False)
        ) as running:
            await running.wait_for(lambda s: s.passes == 1)
            host.vmmdev.time_offset_ms = 1000
            host.restore()
            statistics = await running.wait_for(lambda s: s.passes == 2)
            assert (statistics.steps, statistics.slews) == (0, 1)


async def test_over_the_threshold_the_clock_is_stepped(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    host.vmmdev.time_offset_ms = -45 * 60 * 1000  # the guest 45 minutes ahead
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            await running.wait_for(lambda s: s.steps == 1)
    assert _within(clock.steps[0], -45 * 60 * 1000)
    stepped = [entry for entry in logs if entry["event"] == "clock_stepped"]
    assert [entry["reason"] for entry in stepped] == ["over set_threshold_s"]


async def test_set_on_start_steps_the_first_reading_only(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection(set_on_start=True)) as running:
            statistics = await running.wait_for(lambda s: s.passes >= 3)
            assert (statistics.steps, statistics.slews) == (1, 0)
    assert _within(clock.steps[0], 0)


async def test_a_slew_the_kernel_refuses_becomes_a_step(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """glibc refuses adjtime offsets beyond about 35 minutes (EINVAL): the clock is set."""
    clock.slew_refusal = OSError(errno.EINVAL, "Invalid argument")
    host.vmmdev.time_offset_ms = 2 * 3600 * 1000
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection(set_threshold_s=86400)) as running:
            await running.wait_for(lambda s: s.steps == 1)
    stepped = [entry for entry in logs if entry["event"] == "clock_stepped"]
    assert [entry["reason"] for entry in stepped] == ["slewing refused"]


async def test_a_time_daemon_keeps_small_drifts_and_a_restore_is_still_stepped(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """While the kernel says a daemon keeps the clock, nothing is slewed and the status says
    so on every pass, drift or not; a restore still steps; the daemon's end is logged."""
    clock = FakeClock(synchronised=True)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            await running.wait_for(lambda s: s.passes == 2)
            assert running.service.status() == "timesync: a time daemon keeps the clock"
            host.vmmdev.time_offset_ms = 500
            statistics = await running.wait_for(lambda s: s.passes == 4)
            assert (statistics.slews, statistics.steps, statistics.left_to_ntp) == (0, 0, 2)
            assert running.service.status() == "timesync: a time daemon keeps the clock"
            host.vmmdev.time_offset_ms = 3600 * 1000
            host.restore()
            await running.wait_for(lambda s: s.steps == 1)
            clock.synchronised = True  # the daemon's next update
            await running.wait_for(lambda s: s.passes == 6)
            assert running.service.status() == "timesync: a time daemon keeps the clock"
            clock.synchronised = False  # the daemon stopped (its estimate ran out)
            await running.wait_for(lambda s: s.passes == 7)
            assert running.service.status() == "timesync ok"
    assert clock.slews == []
    assert _events(logs, "clock_left_to_time_daemon", "time_daemon_gone") == [
        "clock_left_to_time_daemon",
        "time_daemon_gone",
    ]


async def test_after_its_own_step_it_waits_for_the_time_daemon_to_update(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """Setting the clock makes the kernel say "unsynchronised" until the daemon's next poll:
    for up to DAEMON_RESYNC_GRACE_S the agent does not slew against the daemon; a daemon
    that never comes back is then taken for gone."""
    clock = FakeClock(synchronised=True)
    interval_s = 512.0
    with trio.fail_after(4 * DAEMON_RESYNC_GRACE_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection(interval_s=interval_s)) as running:
            await running.wait_for(lambda s: s.passes == 1)
            host.vmmdev.time_offset_ms = 3600 * 1000
            host.restore()
            await running.wait_for(lambda s: s.steps == 1)
            stepped_at = trio.current_time()
            host.vmmdev.time_offset_ms += 500  # a drift to slew, were the daemon not there
            while trio.current_time() < stepped_at + DAEMON_RESYNC_GRACE_S - interval_s:
                await trio.sleep(interval_s)
                assert running.service.statistics().slews == 0
                assert running.service.status() == "timesync: a time daemon keeps the clock"
            await trio.sleep(2 * interval_s)
            assert running.service.statistics().slews >= 1
            assert running.service.status() == "timesync ok"
    assert _events(logs, "clock_left_to_time_daemon", "time_daemon_gone") == [
        "clock_left_to_time_daemon",
        "time_daemon_gone",
    ]


async def _time_daemon(clock: FakeClock, poll_s: float = 64.0) -> NoReturn:
    """A daemon on NTP time (this machine's), as systemd-timesyncd keeps it: at each poll it
    steps the clock back to it, and the kernel says "synchronised" again."""
    while True:
        await trio.sleep(poll_s)
        clock.offset_ns = 0
        clock.synchronised = True


@asynccontextmanager
async def _beside_a_time_daemon(
    host: SimulatedHost,
    clock: FakeClock,
    daemon: Callable[[FakeClock], Awaitable[object]] = _time_daemon,
) -> AsyncIterator[Running]:
    """The service with the default section, and ``daemon`` keeping ``clock``, both running
    until the block ends."""
    async with _running(host, clock, TimesyncSection()) as running, trio.open_nursery() as nursery:
        nursery.start_soon(daemon, clock)
        yield running
        nursery.cancel_scope.cancel()


async def test_a_host_clock_off_the_time_daemons_is_stepped_once_then_left_to_it(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """The host's clock is 30 minutes off the NTP time a daemon keeps: the agent steps once,
    finds the drift back over the threshold after the daemon's next update, says so once
    (with the drift) and leaves the clock to the daemon through its next ten polls, where it
    stepped 30 minutes at every pass after each of them."""
    clock = FakeClock(synchronised=True)
    host.vmmdev.time_offset_ms = 30 * MINUTE_MS
    with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
        async with _beside_a_time_daemon(host, clock) as running:
            await trio.sleep(640)
            statistics = running.service.statistics()
            status = running.service.status()
    assert len(clock.steps) == 1
    assert _within(clock.steps[0], 30 * MINUTE_MS)
    assert statistics.left_to_ntp >= 55  # every pass from the daemon's first update on
    assert status == "timesync: a time daemon keeps the clock; the host's disagrees"
    [disagrees] = [e for e in logs if e["event"] == "host_clock_disagrees_with_time_daemon"]
    assert disagrees["log_level"] == "warning"
    assert _within(round(disagrees["drift_ms"] * MS), 30 * MINUTE_MS)
    assert disagrees["set_threshold_s"] == 1200


async def test_restores_are_stepped_while_the_host_disagrees_with_the_time_daemon(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """While the host's clock disagrees with the daemon's, a restore is still stepped (the
    daemon corrects it at its next poll); the host back on NTP time, a reading within the
    minimum after the daemon's update is their agreement (one line), and the next
    disagreement gets its one step again."""
    clock = FakeClock(synchronised=True)
    host.vmmdev.time_offset_ms = 30 * MINUTE_MS
    disagreeing = "timesync: a time daemon keeps the clock; the host's disagrees"
    with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
        async with _beside_a_time_daemon(host, clock) as running:
            await trio.sleep(100)
            assert running.service.status() == disagreeing
            host.restore()
            await running.wait_for(lambda s: s.steps == 2)
            await trio.sleep(100)
            assert running.service.status() == disagreeing
            host.vmmdev.time_offset_ms = 0  # the host's clock on NTP time again
            await trio.sleep(100)
            assert running.service.status() == "timesync: a time daemon keeps the clock"
            host.vmmdev.time_offset_ms = 30 * MINUTE_MS
            await trio.sleep(100)
            assert running.service.status() == disagreeing
    stepped = [entry["reason"] for entry in logs if entry["event"] == "clock_stepped"]
    assert stepped == ["over set_threshold_s", "restored", "over set_threshold_s"]
    assert _events(
        logs, "host_clock_disagrees_with_time_daemon", "host_clock_agrees_with_time_daemon"
    ) == [
        "host_clock_disagrees_with_time_daemon",
        "host_clock_agrees_with_time_daemon",
        "host_clock_disagrees_with_time_daemon",
    ]


async def test_the_time_daemons_end_ends_the_disagreement(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """The daemon the host's clock disagreed with stops and the kernel says unsynchronised:
    the agent keeps the clock again and steps it to the host's."""
    clock = FakeClock(synchronised=True)
    host.vmmdev.time_offset_ms = 30 * MINUTE_MS
    with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_time_daemon, clock)
                await trio.sleep(100)
                nursery.cancel_scope.cancel()
            assert running.service.statistics().steps == 1
            clock.synchronised = False
            await running.wait_for(lambda s: s.steps == 2)
            assert running.service.status() == "timesync ok"
    assert _events(logs, "host_clock_disagrees_with_time_daemon", "time_daemon_gone") == [
        "host_clock_disagrees_with_time_daemon",
        "time_daemon_gone",
    ]


async def _slewing_time_daemon(clock: FakeClock, first_update_s: float) -> NoReturn:
    """A daemon on NTP time (this machine's), as chronyd keeps it once its makestep updates
    are spent: every ``CHRONYD_POLL_S`` from ``first_update_s`` on the kernel says
    "synchronised" again, and from then on the daemon slews toward NTP time at its fastest,
    a second at a time, until a step (the agent's) unsynchronises the clock."""
    await trio.sleep(first_update_s)
    seconds = 0
    while True:
        if clock.synchronised:
            offset = clock.offset_ns
            clock.offset_ns -= max(-CHRONYD_SLEW_NS_PER_S, min(CHRONYD_SLEW_NS_PER_S, offset))
        if seconds % CHRONYD_POLL_S == 0:
            clock.synchronised = True
        await trio.sleep(1)
        seconds += 1


@pytest.mark.parametrize(
    "first_update_s", [64.0, 69.5], ids=["update-between-passes", "update-just-before-a-pass"]
)
async def test_a_time_daemon_slewing_the_agents_step_back_is_not_fought(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, first_update_s: float
) -> None:
    """The host's clock is 30 minutes off the NTP time chronyd keeps, and the daemon slews
    the agent's one step back at 83 ms a second: no reading of that slew is the two
    agreeing, not even the one just after the daemon's update (within the minimum, when the
    update came half a second before a pass), so the agent says they disagree once the drift
    is back over the threshold (four hours on) and leaves the clock to the daemon, where it
    stepped again every four hours and never said so."""
    clock = FakeClock(synchronised=True)
    host.vmmdev.time_offset_ms = 30 * MINUTE_MS
    with trio.fail_after(6 * 3600), structlog.testing.capture_logs() as logs:
        daemon = partial(_slewing_time_daemon, first_update_s=first_update_s)
        async with _beside_a_time_daemon(host, clock, daemon) as running:
            await trio.sleep(71)
            first_drift_ms = running.service.statistics().last_drift_ms
            await trio.sleep(5 * 3600)
            statistics = running.service.statistics()
    assert first_drift_ms is not None
    assert (abs(first_drift_ms) < 100) is (first_update_s == 69.5)
    assert _events(logs, "clock_stepped") == ["clock_stepped"]
    assert statistics.last_drift_ms is not None
    assert statistics.last_drift_ms > 20 * MINUTE_MS
    assert _events(
        logs, "host_clock_disagrees_with_time_daemon", "host_clock_agrees_with_time_daemon"
    ) == ["host_clock_disagrees_with_time_daemon"]


async def test_a_reload_raising_the_threshold_leaves_the_disagreement(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """A reload raises set_threshold_s over the 30 minutes the host's clock and the daemon's
    disagree by: that does not make them agree (no line, the status stays), and the old
    threshold back, the drift is still the daemon's, not stepped again."""
    clock = FakeClock(synchronised=True)
    host.vmmdev.time_offset_ms = 30 * MINUTE_MS
    disagreeing = "timesync: a time daemon keeps the clock; the host's disagrees"
    with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
        async with _beside_a_time_daemon(host, clock) as running:
            await trio.sleep(100)
            assert running.service.status() == disagreeing
            assert running.service.reconfigure(TimesyncSection(set_threshold_s=3600))
            await trio.sleep(100)
            assert running.service.status() == disagreeing
            assert running.service.reconfigure(TimesyncSection())
            await trio.sleep(100)
            statistics = running.service.statistics()
    assert statistics.steps == 1
    assert _events(
        logs, "host_clock_disagrees_with_time_daemon", "host_clock_agrees_with_time_daemon"
    ) == ["host_clock_disagrees_with_time_daemon"]


async def test_a_restore_within_the_threshold_leaves_the_disagreement(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """The host's clock is 30 minutes behind the daemon's, and the VM comes back from 15
    minutes saved: the restore is stepped (15 minutes, within the threshold), which is not
    the two agreeing, so the 30 minutes back after the daemon's next update are left to it,
    not stepped again."""
    clock = FakeClock(synchronised=True)
    host.vmmdev.time_offset_ms = -30 * MINUTE_MS
    with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
        async with _beside_a_time_daemon(host, clock) as running:
            await trio.sleep(100)
            clock.offset_ns -= 15 * MINUTE_MS * MS  # saved 15 minutes
            host.restore()
            await running.wait_for(lambda s: s.steps == 2)
            await trio.sleep(200)
            status = running.service.status()
    assert _within(clock.steps[1], -15 * MINUTE_MS)
    stepped = [entry["reason"] for entry in logs if entry["event"] == "clock_stepped"]
    assert stepped == ["over set_threshold_s", "restored"]
    assert status == "timesync: a time daemon keeps the clock; the host's disagrees"
    assert _events(
        logs, "host_clock_disagrees_with_time_daemon", "host_clock_agrees_with_time_daemon"
    ) == ["host_clock_disagrees_with_time_daemon"]


@pytest.mark.usefixtures("wall_on_trio_time")
@pytest.mark.parametrize("refused", [False, True])
async def test_a_time_daemon_taking_over_cancels_the_agents_slew(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock, refused: bool
) -> None:
    """A slew of 1 s under way (33 minutes at 0.5 ms/s) when a daemon synchronises the
    clock: the agent hands over with ``adjtime`` 0, so the kernel stops moving the clock for
    it under the daemon, and says so in the hand-over line; a refused cancel is a warning
    there, and the kernel goes on."""
    host.vmmdev.time_offset_ms = 1000
    with trio.fail_after(3000), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            await running.wait_for(lambda s: s.slews == 1)
            clock.synchronised = True
            if refused:
                clock.refusal = PermissionError(errno.EPERM, "Operation not permitted")
            statistics = await running.wait_for(lambda s: s.left_to_ntp == 1)
            assert statistics.slews == 1
            handed_over_ns = clock.now_ns() - time.time_ns()
            await trio.sleep(1000)
            moved_ms = (clock.now_ns() - time.time_ns() - handed_over_ns) / MS
    [slew] = clock.slews[:1]
    assert _within(slew, 1000)
    [left] = [entry for entry in logs if entry["event"] == "clock_left_to_time_daemon"]
    if refused:
        assert clock.slews == [slew]
        assert moved_ms == 500  # 1000 s at 0.5 ms/s, the agent's slew going on
        assert left["log_level"] == "warning"
        assert left["agent_slew"] == "not cancelled (Operation not permitted)"
    else:
        assert clock.slews == [slew, 0]
        assert moved_ms == 0
        assert left["agent_slew"] == "cancelled"


@pytest.mark.usefixtures("wall_on_trio_time")
async def test_a_slew_already_made_up_is_not_cancelled(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """A slew of 150 ms is made up in 300 s: a daemon that takes over later is handed the
    clock without ``adjtime`` 0, which would cancel a slew of the daemon's own."""
    host.vmmdev.time_offset_ms = 150
    with trio.fail_after(LIMIT_S * 20), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection(interval_s=100)) as running:
            await running.wait_for(lambda s: s.slews == 1)
            await trio.sleep(350)
            clock.synchronised = True
            passes = running.service.statistics().passes
            await running.wait_for(lambda s: s.passes > passes, passes=20)
            assert running.service.status() == "timesync: a time daemon keeps the clock"
    assert len(clock.slews) == 1
    [left] = [entry for entry in logs if entry["event"] == "clock_left_to_time_daemon"]
    assert "agent_slew" not in left


async def test_a_reload_turning_defer_to_ntp_off_takes_the_clock_back(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """The daemon still keeps the clock: the reload says the agent takes it back, at once
    (status too), and never that the daemon is gone."""
    clock = FakeClock(synchronised=True)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            await running.wait_for(lambda s: s.passes == 1)
            assert running.service.reconfigure(TimesyncSection(defer_to_ntp=False))
            assert running.service.status() == "timesync ok"
            await running.wait_for(lambda s: s.passes == 3)
    names = ("clock_left_to_time_daemon", "clock_taken_from_time_daemon", "time_daemon_gone")
    assert _events(logs, *names) == ["clock_left_to_time_daemon", "clock_taken_from_time_daemon"]
    [taken] = [entry for entry in logs if entry["event"] == "clock_taken_from_time_daemon"]
    assert taken["reason"] == "defer_to_ntp off"


async def test_defer_to_ntp_off_slews_under_a_time_daemon(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    clock = FakeClock(synchronised=True)
    host.vmmdev.time_offset_ms = 500
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection(defer_to_ntp=False)) as running:
            statistics = await running.wait_for(lambda s: s.slews == 1)
            assert statistics.left_to_ntp == 0
            assert running.service.status() == "timesync ok"


async def test_slow_readings_are_retried_then_the_pass_is_given_up(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """Three readings of 250 ms or more: the pass is discarded (one line), the clock
    untouched; a fast reading at the next interval is used (one line). The second apart is
    the next test's."""
    clock.latencies_ns = [250 * MS, 300 * MS, 1000 * MS]
    host.vmmdev.time_offset_ms = 500
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            statistics = await running.wait_for(lambda s: s.discarded == 1)
            assert statistics.passes == 0
            assert clock.slews == []
            statistics = await running.wait_for(lambda s: s.passes == 1)
            assert statistics.slews == 1
    assert _events(logs, "host_time_readings_discarded", "host_time_readings_fast_again") == [
        "host_time_readings_discarded",
        "host_time_readings_fast_again",
    ]


async def test_a_slow_reading_then_a_fast_one_is_used(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    clock.latencies_ns = [400 * MS]
    host.vmmdev.time_offset_ms = 500
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection(interval_s=3600)) as running:
            await trio.sleep(RETRY_AFTER_HIGH_LATENCY_S - 0.1)
            assert running.service.statistics().passes == 0
            await trio.sleep(0.2)
            await trio.testing.wait_all_tasks_blocked()
            statistics = running.service.statistics()
            assert (statistics.passes, statistics.discarded, statistics.slews) == (1, 0, 1)


async def test_without_the_privilege_it_says_so_once_and_keeps_measuring(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """Refused corrections show in the status, logged once even with a pass in between that
    needed none; the first correction that works ends it."""
    clock.refusal = PermissionError(errno.EPERM, "Operation not permitted")
    host.vmmdev.time_offset_ms = 500
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            statistics = await running.wait_for(lambda s: s.passes == 2)
            assert statistics.failures == 2
            host.vmmdev.time_offset_ms = 0
            await running.wait_for(lambda s: s.passes == 3)
            host.vmmdev.time_offset_ms = 500
            await running.wait_for(lambda s: s.passes == 4)
            assert running.service.status() == (
                "timesync: not permitted to set the clock (needs CAP_SYS_TIME)"
            )
            clock.refusal = None
            await running.wait_for(lambda s: s.slews == 1)
            assert running.service.status() == "timesync ok"
    assert _events(logs, "clock_not_corrected", "clock_corrected_again") == [
        "clock_not_corrected",
        "clock_corrected_again",
    ]


async def test_a_host_without_the_clock_request_is_reported_once(
    autojump_clock: trio.abc.Clock, clock: FakeClock
) -> None:
    host = SimulatedHost(personality="mainline", host_time_enabled=False)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with _running(host, clock, TimesyncSection()) as running:
                statistics = await running.wait_for(lambda s: s.failures >= 3)
                assert statistics.passes == 0
                assert running.service.status() == (
                    "timesync: host clock unreadable (VERR_NOT_SUPPORTED)"
                )
                host.vmmdev.host_time_enabled = True
                await running.wait_for(lambda s: s.passes == 1)
                assert running.service.status() == "timesync ok"
            nursery.cancel_scope.cancel()
    assert _events(logs, "host_time_failed", "host_time_readable_again") == [
        "host_time_failed",
        "host_time_readable_again",
    ]
    assert clock.steps == clock.slews == []


@pytest.mark.parametrize(
    ("host_ms", "problem"),
    [
        (MAX_HOST_TIME_MS + 1, "host clock out of range"),
        (MIN_HOST_TIME_MS - 1, "host clock out of range"),
        (0, "host clock out of range"),
        ((1 << 64) - 1, "host clock reply broken"),
    ],
    ids=["after-2200", "before-1980", "1970", "left-unfilled"],
)
async def test_a_broken_host_clock_is_reported_and_ignored(
    autojump_clock: trio.abc.Clock,
    host: SimulatedHost,
    clock: FakeClock,
    host_ms: int,
    problem: str,
) -> None:
    """A reply no host gives (after 2200, before 1980: 1970, where the guest's clock would be
    stepped 56 years back), or the preset UINT64_MAX left as it was (the protocol layer
    refuses it), moves nothing and stops nothing."""
    host.vmmdev.host_time_ms = lambda: host_ms  # type: ignore[method-assign]
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            statistics = await running.wait_for(lambda s: s.failures >= 2)
            assert statistics.passes == 0
            assert running.service.status() == f"timesync: {problem}"
    assert clock.steps == clock.slews == []
    assert _events(logs, "host_time_invalid") == ["host_time_invalid"]


async def test_a_host_dated_back_to_1980_is_followed(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """A VM its host dates back (``--biossystemtimeoffset``) as far as the floor: the guest's
    clock is stepped there, as on any host."""
    host.vmmdev.host_time_ms = lambda: MIN_HOST_TIME_MS  # type: ignore[method-assign]
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection()) as running:
            statistics = await running.wait_for(lambda s: s.steps == 1)
            assert (statistics.failures, running.service.status()) == (0, "timesync ok")
    assert _within(clock.steps[0], MIN_HOST_TIME_MS - time.time_ns() / MS, slack_ms=1000)


async def test_the_hosts_options_apply_at_start_and_after_a_restores_pass(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """The host's set-threshold makes a 2 s drift a step; removed while the VM was saved, it
    still applies to the restore's pass (made with the options in force), and the config's
    20 minutes from the next pass on. A refused option is logged at each reading of the
    options (start, restore)."""
    host.prop_set(f"{TIMESYNC_OPTION}set-threshold", "1000")
    host.prop_set(f"{TIMESYNC_OPTION}max-latency", "many")
    host.vmmdev.time_offset_ms = 2000
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection(set_on_restore=False)) as running:
            statistics = await running.wait_for(lambda s: s.passes == 1)
            assert (statistics.steps, statistics.slews) == (1, 0)
            host.prop_delete(f"{TIMESYNC_OPTION}set-threshold")
            host.vmmdev.time_offset_ms = 4000
            host.restore()
            statistics = await running.wait_for(lambda s: s.passes == 2)
            assert (statistics.steps, statistics.slews) == (2, 0)
            host.vmmdev.time_offset_ms = 6000
            statistics = await running.wait_for(lambda s: s.passes == 3)
            assert (statistics.steps, statistics.slews) == (2, 1)
    applied = [entry for entry in logs if entry["event"] == "host_options_applied"]
    assert [{k: v for k, v in entry.items() if k.endswith("_s")} for entry in applied] == [
        {"set_threshold_s": 1.0},
        {},
    ]
    refused = [entry["problem"] for entry in logs if entry["event"] == "host_option_refused"]
    assert (
        refused == [f"{TIMESYNC_OPTION}max-latency = 'many': not a whole number in 1..3600000"] * 2
    )


async def test_the_hosts_shortest_interval_reads_every_50_ms(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """``--timesync-interval 50``, VBoxService's least, is taken: 20 readings a second."""
    host.prop_set(f"{TIMESYNC_OPTION}interval", "50")
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection()) as running:
            await trio.testing.wait_all_tasks_blocked()
            assert running.service.statistics().passes == 1
            await trio.sleep(1.025)
            assert running.service.statistics().passes == 21


async def test_host_global_interval_sets_the_timesync_interval(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """The host's ``--interval 30`` (s) is the interval where no ``--timesync-interval``
    is set, as in ``vgsvcTimeSyncInit``."""
    host.prop_set(f"{VBOXSERVICE_OPTION}interval", "30")
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection()) as running:
            await trio.testing.wait_all_tasks_blocked()
            assert running.service.statistics().passes == 1
            await trio.sleep(25)
            assert running.service.statistics().passes == 1  # main: 3 (every 10 s)
            await trio.sleep(10)
            assert running.service.statistics().passes == 2


async def test_the_hosts_timesync_interval_wins_over_its_global_one(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """``--timesync-interval 5000`` (ms) over ``--interval 30``: a reading every 5 s."""
    host.prop_set(f"{VBOXSERVICE_OPTION}interval", "30")
    host.prop_set(f"{TIMESYNC_OPTION}interval", "5000")
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection()) as running:
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(10.5)
            assert running.service.statistics().passes == 3


async def test_the_hosts_set_start_steps_the_first_reading(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    host.prop_set(f"{TIMESYNC_OPTION}set-start", "")
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection()) as running:
            statistics = await running.wait_for(lambda s: s.passes == 2)
            assert statistics.steps == 1


async def test_the_hosts_no_set_start_overrides_the_config(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    host.prop_set(f"{TIMESYNC_OPTION}no-set-start", "")
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection(set_on_start=True)) as running:
            statistics = await running.wait_for(lambda s: s.passes == 2)
            assert statistics.steps == 0


async def test_host_options_off_ignores_them(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    host.prop_set(f"{TIMESYNC_OPTION}set-threshold", "1000")
    host.vmmdev.time_offset_ms = 2000
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection(host_options=False)) as running:
            statistics = await running.wait_for(lambda s: s.passes == 1)
            assert (statistics.steps, statistics.slews) == (0, 1)
            assert running.service.reconfigure(TimesyncSection(host_options=True)) is False


@pytest.mark.parametrize("set_on_start", [True, False])
async def test_a_reload_of_set_on_start_needs_a_restart(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock, set_on_start: bool
) -> None:
    """``set_on_start`` is read as a run begins: a reload that changes it after the first
    reading is not applied live (the daemon then rebuilds the service, whose first reading
    follows it), never reported as applied while it changes nothing."""
    with trio.fail_after(LIMIT_S):
        section = TimesyncSection(set_on_start=not set_on_start)
        async with _running(host, clock, section) as running:
            await running.wait_for(lambda s: s.passes == 1)
            assert running.service.reconfigure(TimesyncSection(set_on_start=set_on_start)) is False


async def test_a_reload_applies_the_new_interval_to_the_wait_under_way(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    host.prop_set(f"{TIMESYNC_OPTION}min-adjust", "5000")
    with trio.fail_after(LIMIT_S):
        async with _running(host, clock, TimesyncSection(interval_s=3600)) as running:
            await running.wait_for(lambda s: s.passes == 1)
            assert running.service.reconfigure(TimesyncSection(interval_s=5)) is True
            await trio.sleep(4.9)
            assert running.service.statistics().passes == 1
            await trio.sleep(0.2)
            await trio.testing.wait_all_tasks_blocked()
            assert running.service.statistics().passes == 2
            host.vmmdev.time_offset_ms = 2000  # within the host's min-adjust, kept on reload
            await running.wait_for(lambda s: s.passes >= 3)
            assert running.service.statistics().slews == 0


async def test_a_restore_during_a_pass_is_read_again_as_a_restore(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """A restore while a slow reading waits its second: the reading is taken again after it,
    and stepped as a restore, not slewed first as an ordinary drift."""
    clock.latencies_ns = [400 * MS]
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection(interval_s=3600)) as running:
            await trio.sleep(RETRY_AFTER_HIGH_LATENCY_S / 2)
            host.vmmdev.time_offset_ms = 5 * 60 * 1000
            host.restore()
            statistics = await running.wait_for(lambda s: s.passes >= 1)
            assert (statistics.passes, statistics.steps, statistics.slews) == (1, 1, 0)
    assert [entry["reason"] for entry in logs if entry["event"] == "clock_stepped"] == ["restored"]


async def test_options_the_host_cannot_list_leave_the_config(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, clock: FakeClock
) -> None:
    """The property service refusing the client (here: no free client on the host) is one
    line; the service goes on with its config."""
    host.vmmdev.faults.add_fault(RequestType.HGCM_CONNECT, VERR_HGCM_SERVICE_NOT_FOUND)
    host.vmmdev.time_offset_ms = 500
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _running(host, clock, TimesyncSection()) as running:
            statistics = await running.wait_for(lambda s: s.slews == 1)
            assert statistics.failures == 0
    unreadable = [entry for entry in logs if entry["event"] == "host_options_unreadable"]
    assert len(unreadable) == 1
    assert "VERR_HGCM_SERVICE_NOT_FOUND" in unreadable[0]["error"]


CHILD: Final = """
import os, sys
from agent.services._wallclock import SystemClock
CAP_SYS_TIME = 25
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
status = open("/proc/self/status").read().split("CapEff:")[1].split()[0]
if int(status, 16) >> CAP_SYS_TIME & 1:
    sys.exit("still CAP_SYS_TIME after dropping root: refusing to touch the clock")
clock = SystemClock()
for name, call in (("slew", clock.slew), ("step", clock.step)):
    try:
        call(1_000_000)
    except PermissionError:
        print(name, "EPERM")
try:
    clock.slew(3600 * 1_000_000_000)
except OSError as exc:
    print("slew 1 h", __import__("errno").errorcode[exc.errno])
"""


def test_the_system_clock_is_refused_without_the_privilege() -> None:
    """In a child without CAP_SYS_TIME (checked first) the real calls reach libc and the
    kernel and are refused, so the machine's clock never moves; an hour is beyond adjtime's
    bound whoever asks."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["slew EPERM", "step EPERM", "slew 1 h EINVAL"]


STA_UNSYNC_OR_CLOCKERR: Final = 0x0040 | 0x1000
"""``linux/timex.h``: the clock is not synchronised, or has a hardware fault."""
TIMEX_STATUS_OFFSET: Final = 40
"""``struct timex``: modes, then offset, freq, maxerror and esterror (longs), then status."""


def test_the_system_clock_reads_the_ntp_state() -> None:
    """``ntp_synchronised`` agrees with the status word of the kernel's own ``struct timex``."""
    timex = ctypes.create_string_buffer(512)
    assert ctypes.CDLL(None).adjtimex(timex) >= 0
    status = int.from_bytes(timex.raw[TIMEX_STATUS_OFFSET : TIMEX_STATUS_OFFSET + 4], "little")
    assert SystemClock().ntp_synchronised() == (not status & STA_UNSYNC_OR_CLOCKERR)


def test_the_system_clock_times_readings_on_the_monotonic_clock() -> None:
    clock = SystemClock()
    before = time.monotonic_ns()
    assert before <= clock.monotonic_ns() <= time.monotonic_ns()


class TestOnASimulatedHost:
    """An agent following a simulated host corrects a clock of its own, never the machine's."""

    async def test_a_restore_moves_the_agents_clock_not_the_machines(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """The default clock on a simulated host: the restore's step is made and logged, the
        next reading finds no drift, and ``SystemClock`` was never asked (the guard of
        tests/conftest.py fails any step or slew of it)."""
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            pump = EventPump(device)
            service = timesync_service(ServiceContext(device, pump), TimesyncSection())
            await nursery.start(pump.run)
            await nursery.start(service.run)
            running = Running(service, host)
            with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
                await running.wait_for(lambda s: s.passes == 1)
                host.vmmdev.time_offset_ms = 3600 * 1000
                host.restore()
                await running.wait_for(lambda s: s.passes == 2)
                statistics = await running.wait_for(lambda s: s.passes == 3)
            nursery.cancel_scope.cancel()
        assert (statistics.steps, statistics.slews) == (1, 0)
        [stepped] = [entry for entry in logs if entry["event"] == "clock_stepped"]
        assert stepped["reason"] == "restored"

    def test_the_agents_clock_moves_by_its_corrections(self) -> None:
        """Steps and slews move its offset at once; no time daemon keeps it."""
        clock = AgentOwnClock()
        clock.step(3600 * 10**9)
        clock.slew(-(10**9))
        ahead_ns = clock.now_ns() - time.clock_gettime_ns(time.CLOCK_REALTIME)
        assert 3599 * 10**9 - 10**8 < ahead_ns <= 3599 * 10**9
        assert not clock.ntp_synchronised()
