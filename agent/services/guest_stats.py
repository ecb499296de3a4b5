"""``statistics``: report guest statistics to the host at the interval it asks for.

The host (Main's ``IGuest::statisticsUpdateInterval``, set by ``VBoxManage metrics setup`` or
the host's balloon control) raises STATISTICS_INTERVAL_CHANGE_REQUEST (0x80) when it wants a
new interval. The service reads the interval with GET_STATISTICS_CHANGE_REQ, acknowledging the
event, at start, at every 0x80 and after every restore; while the interval is not zero it
sends REPORT_GUEST_STATS on that rhythm through the :class:`Metronome`: each tick reads one
``/proc`` sample (:mod:`agent.services._procstats`) and sends one report per CPU, as
VBoxService does (Main averages the loads over the VM's CPUs), and one idle report for an
offline CPU (Main would keep its last load, or count one never reported as 0 % idle). Every
report carries a balloon figure: Main's performance collector publishes the guest's memory
figures (``Guest/RAM/Usage/*``, which ``VBoxManage metrics`` and VBoxBalloonCtrl read) only
from an interval whose reports carried all of them, the balloon's included, as VBoxService's
always do. The figure is the balloon service's count (``ServiceContext.balloon``), read before
each sample: where the in-tree driver balloons in the kernel (which keeps event 0x40 from
userspace) the balloon service refreshes it then with CHECK_BALLOON, a pure query there.
Once the balloon service stopped the count is what its drain left (0 once every chunk is
back; the chunks a cut-short drain left to be given back in the background, which the gauge
follows down to 0, as ``STATUS=`` reads ``balloon off, 61 MB kept``; the in-tree kernel's
count, still read before each sample, as the kernel finishes a change begun before the
stop), so the host does not go on showing a balloon that is gone, or a size the kernel moved
on from. While nobody knows one (no balloon service has run yet, disabled or still
starting, or the size it left is unknown) the reports carry the last figure this service reported, 0
before any, which is what Main would keep (with no balloon service since the agent started,
the agent ballooned nothing; an in-tree kernel's balloon an earlier agent left is not seen),
rather than ask the driver: on Oracle's driver CHECK_BALLOON is no query, it makes the caller
the balloon's owner and moves the balloon to the host's target. Mainline and Oracle's
driver let trusted sessions (``/dev/vboxguest``) send both requests, so this works
on every real guest; a session the driver does not trust (``/dev/vboxuser``) has its interval
reads refused, which the service logs once (``statistics_refused_by_driver``) before it stays
idle, rather than fail and be restarted until its restart budget ends the daemon; so does a
refusal that follows a first read that failed otherwise, as long as no read went through. A
report that fails (``/proc`` unreadable, the host refusing it or answering with a malformed
reply) is counted, and logged when such failures begin and change cause and when a report
goes through again (``statistics_reported_again``), not at every tick. An interval read that
fails the same ways (any other time) is counted and logged alike
(``statistics_interval_unreadable``, then ``statistics_interval_read_again``) and the
interval in force stays, as VBoxService keeps its own when the query fails. Where that leaves
the service off (before the first read succeeds, or after the host asked for none) the read
is also tried again on a back-off (:meth:`LastingFailure.retry_in`, 1 s doubling to 60 s):
a restarted agent finds no 0x80 pending, as the agent before it acknowledged the interval,
and would otherwise report nothing until the host changed it (VBoxService's weakness). While
an interval is in force reports go on, and the next 0x80 or restore reads it again. Config
section: ``[statistics]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.protocol import (
    HOST_ERRORS,
    Event,
    GetStatisticsChangeRequest,
    ReportGuestStats,
    VBoxStatusError,
)
from agent.protocol.status import VERR_ACCESS_DENIED, VERR_PERMISSION_DENIED
from agent.records import record
from agent.services._base import ServiceContext, ServiceSection, ServiceSpec
from agent.services._lasting import LastingFailure
from agent.services._paced import Metronome, RetryWakeups
from agent.services._procstats import ProcStats, ProcStatsError

if TYPE_CHECKING:
    from agent.device import Device
    from agent.protocol import GuestStatistics
    from agent.services._paced import MetronomeStatistics
    from agent.services.event_pump import EventPump

log = structlog.get_logger(__name__)

NAME: Final = "statistics"
PROC: Final = Path("/proc")
SYSFS: Final = Path("/sys")
LATE_AFTER_S: Final = 1.0
"""A report sent more than a second after its deadline is late (counted; the first of a run
of late reports is logged)."""
EVENTS: Final = Event.RESTORED | Event.STATISTICS_INTERVAL_CHANGE_REQUEST
DRIVER_REFUSALS: Final = frozenset({VERR_PERMISSION_DENIED, VERR_ACCESS_DENIED})
"""Statuses meaning "this session may not send statistics" (mainline's EPERM is the first)."""


class StatisticsSection(ServiceSection):
    """``[statistics]``: guest statistics for the host; the host sets the interval."""


@record
class GuestStatsStatistics:
    """What the statistics service sent.

    Attributes:
        failures: samples not read (``/proc`` unreadable), reports the host refused or
            answered with a malformed reply, and interval reads that failed the same ways.
        last: the latest report sent, or None.
        rhythm: the metronome's counters (reports are its ticks).
    """

    failures: int
    last: GuestStatistics | None
    rhythm: MetronomeStatistics


@final
class GuestStatsService:
    """Reports ``/proc`` statistics at the host's interval."""

    name: Final = NAME

    def __init__(self, context: ServiceContext, *, proc: Path = PROC, sysfs: Path = SYSFS) -> None:
        self._device: Device = context.device
        self._pump: EventPump = context.pump
        self._status_changed = context.status_changed
        self._balloon = context.balloon
        self._proc = ProcStats(proc, sysfs)
        self._metronome = Metronome(self._read_interval, self._report, late_after_s=LATE_AFTER_S)
        self._failures = LastingFailure("statistics_reported_again")
        self._read_failures = LastingFailure("statistics_interval_read_again")
        self._last: GuestStatistics | None = None
        self._balloon_reported = 0
        """The balloon (chunks) of the last report the host took, for a gauge reading None."""
        self._interval_read = False
        """An interval read went through: a refusal then no longer means an untrusted session."""
        self._refused = False
        self._retry_at = math.inf
        """When a failed read that left the service off is tried again (inf: none is)."""

    def statistics(self) -> GuestStatsStatistics:
        """Return the report counters and the latest report."""
        return GuestStatsStatistics(
            self._failures.total + self._read_failures.total,
            self._last,
            self._metronome.statistics(),
        )

    def status(self) -> str:
        """``statistics every 5 s``, ``statistics off``, either with `` (failing)``, or
        ``statistics refused by the driver``."""
        if self._refused:
            return "statistics refused by the driver"
        interval = self._metronome.interval_s
        failing = self._failures.cause is not None or self._read_failures.cause is not None
        rhythm = "statistics off" if interval is None else f"statistics every {interval:g} s"
        return f"{rhythm} (failing)" if failing else rhythm

    def reconfigure(self, section: StatisticsSection) -> bool:
        """Nothing to apply: the host sets the interval."""
        del section
        return True

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Read the interval, report on it, and read it again at 0x80 and after restores."""
        try:
            with self._pump.subscribe(self.name, EVENTS) as events:
                wakeups = RetryWakeups(events, lambda: self._retry_at)
                await self._metronome.run(wakeups, task_status=task_status)
        except VBoxStatusError as exc:  # only a driver's refusal before any read went through
            self._refused = True  # this session is not trusted
            self._status_changed()
            log.warning(
                "statistics_refused_by_driver",
                status=exc.name,
                device=self._device.description,
                hint="only a trusted session (/dev/vboxguest, as root) may send statistics",
            )
        if not self._metronome.ready:  # refused at the first read, not at a retry
            task_status.started()
        await trio.sleep_forever()

    async def drain(self) -> None:
        """Nothing to give back: the host keeps no state for the reporter."""
        await trio.lowlevel.checkpoint()

    async def _read_interval(self) -> float | None:
        """The host's interval; the one in force if the read fails, tried again on a back-off
        if that is off (a driver refusing a read before any went through is raised: the
        session is not trusted, whether the first read was refused or failed otherwise)."""
        try:
            seconds = (await self._device.request(GetStatisticsChangeRequest())).seconds
        except HOST_ERRORS as exc:
            refused = isinstance(exc, VBoxStatusError) and exc.rc in DRIVER_REFUSALS
            if refused and not self._interval_read:
                raise
            kept = self._metronome.interval_s
            if self._read_failures.host_failed("statistics_interval_unreadable", exc, kept_s=kept):
                self._status_changed()
            # Off, nothing but the host's next change (if any) would read it again.
            retry_in = math.inf if kept is not None else self._read_failures.retry_in()
            self._retry_at = trio.current_time() + retry_in
            return kept
        self._retry_at = math.inf
        self._interval_read = True
        self._read_failures.succeeded()
        log.info("statistics_interval_read", interval_s=seconds)
        self._proc.forget_cpu()
        self._status_changed()
        return float(seconds) if seconds else None

    async def _report(self) -> None:
        balloon_chunks = await self._balloon.read()  # refreshed first in kernel mode
        if balloon_chunks is None:  # unknown: what Main holds from this service stays
            balloon_chunks = self._balloon_reported
        try:
            reports = self._proc.sample(balloon_chunks=balloon_chunks)
        except ProcStatsError as exc:
            self._failed("statistics_unavailable", exc.problem, error=str(exc))
            return
        for stats in reports:
            try:
                await self._device.request(ReportGuestStats(stats))
            except HOST_ERRORS as exc:
                if self._failures.host_failed("statistics_report_failed", exc, cpu_id=stats.cpu_id):
                    self._status_changed()
                return
            self._proc.sent(stats)
            self._last = stats
            self._balloon_reported = balloon_chunks
        if self._failures.succeeded():
            self._status_changed()

    def _failed(self, event: str, cause: str, **details: object) -> None:
        """Count a failed report; the status shows a failure that begins or changes cause."""
        if self._failures.failed(event, cause, **details):
            self._status_changed()


def _build(context: ServiceContext, section: StatisticsSection) -> GuestStatsService:
    del section
    return GuestStatsService(context)


SPEC: Final = ServiceSpec(NAME, StatisticsSection, _build)
