"""The host's guest-statistics state: the interval Main asks for and the reports it gets.

As in VMMDev: setting an interval that differs from the one the guest last *acknowledged*
stores it and raises STATISTICS_INTERVAL_CHANGE_REQUEST (0x80); setting the acknowledged value
again does nothing at all, not even store it. GET_STATISTICS_CHANGE_REQ returns the stored
interval and, when its ``event_ack`` is 0x80, records it as acknowledged. A VM reset forgets
the acknowledgement (the interval stays), so the next setting notifies again. Both requests
must have their exact size; the device checks that before the handlers run.

REPORT_GUEST_STATS hands the ``VBoxGuestStatistics`` to Main (``vmmdevReportStatistics``,
``Guest::i_setStatistic``), which keeps only eight figures, each only when the report's
``stat_caps`` has its bit: the three CPU loads per CPU id, each one published as the sum
over the VM's CPUs divided by their count (so a guest must report every CPU), and total,
available, ballooned and cache memory and the page file, in 4 KiB pages that
``IGuest::InternalGetStatistics`` hands out as KiB. A figure never reported stays out. The
CPU count is ``IMachine::CPUCount`` (with CPU hot-plug, the most the VM may have), fixed
while the VM runs, and a CPU id's loads stay until that id reports again: a CPU the guest
took offline keeps its last load in the average unless the guest reports it otherwise, and
one never reported counts 0 in all three (the three then add up to less than 100).

The performance collector (``VBoxManage metrics``, VBoxBalloonCtrl) reads none of that
directly. Main's statistics timer (``Guest::i_updateStats``), which runs at the interval, ticks
at once when an interval is set and then every interval; at each tick it hands the figures to
``CollectorGuest::updateStats`` with the bits set since the last tick, and clears them. The
collector takes the CPU loads only if all three CPU bits came in that window
(``VMSTATS_GUEST_CPULOAD``), and the memory figures only if all five memory bits did
(``VMSTATS_GUEST_RAMUSAGE``; its shared-memory bit Main sets itself), so a guest that leaves
one out (the balloon, say) has no ``Guest/RAM/Usage/*`` metrics at all.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final, NoReturn

import trio

from agent.host._log import host_log as _log
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import STAT_PAGE_SIZE, VMM_MAX_CPU_COUNT, Event, StatCap
from agent.protocol.messages import GUEST_STATISTICS_FIELDS
from agent.protocol.status import VINF_SUCCESS

if TYPE_CHECKING:
    from collections.abc import Callable

MAX_INTERVAL_S: Final = 0xFFFF_FFFF
"""The interval is a u32 of seconds."""
GUEST_CPUS: Final = min(os.cpu_count() or 1, VMM_MAX_CPU_COUNT)
"""The simulated guest's CPUs by default: the guest is this machine (its ``/proc/stat``)."""
KIB_PER_PAGE: Final = STAT_PAGE_SIZE // 1024
U32_MAX: Final = 0xFFFF_FFFF
"""Main's figures are ULONGs: a page count times 4 wraps there, and so does the sum of the
per-CPU loads."""
CPU_FIGURES: Final = (
    ("cpu_user", StatCap.CPU_LOAD_USER, "cpu_load_user"),
    ("cpu_kernel", StatCap.CPU_LOAD_KERNEL, "cpu_load_kernel"),
    ("cpu_idle", StatCap.CPU_LOAD_IDLE, "cpu_load_idle"),
)
"""Main's CPU figures (percent, averaged over the VM's CPUs): name, bit, report field."""
MEMORY_FIGURES: Final = (
    ("mem_total", StatCap.PHYS_MEM_TOTAL, "phys_mem_total"),
    ("mem_free", StatCap.PHYS_MEM_AVAIL, "phys_mem_avail"),
    ("mem_balloon", StatCap.PHYS_MEM_BALLOON, "phys_mem_balloon"),
    ("mem_cache", StatCap.MEM_SYSTEM_CACHE, "mem_system_cache"),
    ("page_total", StatCap.PAGE_FILE_SIZE, "page_file_size"),
)
"""Main's memory figures (KiB): name, bit, report field (4 KiB pages)."""
CPU_GROUP: Final = StatCap.CPU_LOAD_USER | StatCap.CPU_LOAD_KERNEL | StatCap.CPU_LOAD_IDLE
"""``VMSTATS_GUEST_CPULOAD``: the bits one window must carry for the collector's CPU loads."""
RAM_GROUP: Final = (
    StatCap.PHYS_MEM_TOTAL
    | StatCap.PHYS_MEM_AVAIL
    | StatCap.PHYS_MEM_BALLOON
    | StatCap.MEM_SYSTEM_CACHE
    | StatCap.PAGE_FILE_SIZE
)
"""``VMSTATS_GUEST_RAMUSAGE`` less the shared memory Main adds itself: the bits one window
must carry for the collector's memory figures."""


class HostGuestStats:
    """Guest statistics of one VM, as VMMDev and Main keep them.

    Args:
        raise_events: VMMDev's event notification.
        cpus: the VM's CPU count (Main divides the summed per-CPU loads by it).
    """

    __slots__ = (
        "_cpu_loads",
        "_period_s",
        "_raise_events",
        "_timer_set",
        "_window_caps",
        "acked_interval_s",
        "cpus",
        "interval_s",
        "last",
        "main",
        "metrics",
        "reports",
    )

    def __init__(self, raise_events: Callable[[int], None], *, cpus: int = GUEST_CPUS) -> None:
        if not 1 <= cpus <= VMM_MAX_CPU_COUNT:
            msg = f"guest CPUs must be in [1, {VMM_MAX_CPU_COUNT}], got {cpus}"
            raise ValueError(msg)
        self._raise_events = raise_events
        self.cpus = cpus
        self.interval_s = 0
        self.acked_interval_s = 0
        self.reports = 0
        self.last: dict[str, int] | None = None
        self.main: dict[str, int] = {}
        """Main's figures by name, each present once a report carried its bit."""
        self.metrics: dict[str, int] = {}
        """The collector's figures by name, each group present once a window carried it."""
        self._cpu_loads = {name: [0] * VMM_MAX_CPU_COUNT for name, _, _ in CPU_FIGURES}
        self._period_s = 0
        """Main's timer interval (``mStatUpdateInterval``), 0 while it is stopped."""
        self._window_caps = 0
        """The bits reported since the timer's last tick (``mVmValidStats``)."""
        self._timer_set = trio.lowlevel.ParkingLot()

    def set_interval(self, seconds: int) -> None:
        """Main asks for a report every ``seconds`` (0: none); notify if the guest has not seen it.

        Raises:
            ValueError: ``seconds`` is negative or above a u32.
        """
        if not 0 <= seconds <= MAX_INTERVAL_S:
            msg = f"statistics interval must be in range [0, {MAX_INTERVAL_S}] s, got {seconds}"
            raise ValueError(msg)
        if seconds != self._period_s:  # Main's timer, which VMMDev's check below leaves alone
            self._period_s = seconds
            self._timer_set.unpark_all()
        if seconds == self.acked_interval_s:
            return
        self.interval_s = seconds
        _log.info("statistics_interval_set", interval_s=seconds)
        self._raise_events(Event.STATISTICS_INTERVAL_CHANGE_REQUEST)

    def change_request(self, req: bytearray, _phys: int) -> int:
        """GET_STATISTICS_CHANGE_REQ: return the interval; ``event_ack`` 0x80 acknowledges it."""
        L.StatisticsChangeRequest.interval_s.set(req, self.interval_s)
        if L.StatisticsChangeRequest.event_ack.get(req) == Event.STATISTICS_INTERVAL_CHANGE_REQUEST:
            self.acked_interval_s = self.interval_s
        return VINF_SUCCESS

    def report(self, req: bytearray, _phys: int) -> int:
        """REPORT_GUEST_STATS: keep the report as the latest and update Main's figures."""
        values: dict[str, int] = {}
        for name in GUEST_STATISTICS_FIELDS:
            member: L.IntField = getattr(L.GuestStatsRequest, name)
            values[name] = member.get(req)
        self.last = values
        self.reports += 1
        self._window_caps |= values["stat_caps"]
        self._update_main(values)
        return VINF_SUCCESS

    def reset(self) -> None:
        """VM reset: the guest has acknowledged nothing any more (Main keeps its figures)."""
        self.acked_interval_s = 0

    def restore(self) -> None:
        """A saved state was loaded: neither interval is in VMMDev's saved state and the new
        VM process's Main starts with none and no figures, so the host asks for no reports
        until told again (which then notifies: nothing is acknowledged)."""
        self.interval_s = self.acked_interval_s = self._period_s = self._window_caps = 0
        self._timer_set.unpark_all()
        self.main.clear()
        self.metrics.clear()
        for loads in self._cpu_loads.values():
            loads[:] = [0] * VMM_MAX_CPU_COUNT

    def snapshot(self) -> dict[str, object]:
        """Return the state for ``host status`` (``last`` is None before any report)."""
        last = None if self.last is None else dict(self.last)
        return {
            "interval_s": self.interval_s,
            "reports": self.reports,
            "last": last,
            "main": dict(self.main),
            "metrics": dict(self.metrics),
        }

    async def run(self) -> NoReturn:
        """Main's statistics timer: while an interval is set, a tick at once and then one
        every interval; a new interval starts it again at once (``RTTimerLRStart`` with no
        delay, ``RTTimerLRChangeInterval`` on a running timer)."""
        while True:
            if not self._period_s:
                await self._timer_set.park()
                continue
            tick_at = trio.current_time()
            interval_kept = True
            while interval_kept:
                self._tick()
                tick_at += self._period_s
                with trio.move_on_at(tick_at) as timer:
                    await self._timer_set.park()
                interval_kept = timer.cancelled_caught

    def _update_main(self, report: dict[str, int]) -> None:
        """``Guest::i_setStatistic`` for each figure with its bit (a CPU id of 64 or more
        sets the VM's load as is; the per-CPU loads are summed in 32 bits)."""
        caps, cpu_id = report["stat_caps"], report["cpu_id"]
        for name, bit, field in CPU_FIGURES:
            if caps & bit:
                value = report[field]
                if cpu_id < VMM_MAX_CPU_COUNT:
                    loads = self._cpu_loads[name]
                    loads[cpu_id] = value
                    value = (sum(loads[: self.cpus]) & U32_MAX) // self.cpus
                self.main[name] = value
        for name, bit, field in MEMORY_FIGURES:
            if caps & bit:
                self.main[name] = report[field] * KIB_PER_PAGE & U32_MAX

    def _tick(self) -> None:
        """``Guest::i_updateStats`` into ``CollectorGuest::updateStats``: each group whose
        bits all came since the last tick replaces the collector's figures of it (the shared
        memory 0: the simulated host has no page fusion); the window starts afresh."""
        caps, self._window_caps = self._window_caps, 0
        if caps & CPU_GROUP == CPU_GROUP:
            self.metrics.update({name: self.main[name] for name, _, _ in CPU_FIGURES})
        if caps & RAM_GROUP == RAM_GROUP:
            self.metrics.update({name: self.main[name] for name, _, _ in MEMORY_FIGURES})
            self.metrics["mem_shared"] = 0
