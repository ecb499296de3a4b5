"""Guest statistics from ``/proc``: what a Linux guest can put in ``VBoxGuestStatistics``.

One sample reads ``/proc/stat``, ``/proc/meminfo``, ``/proc/loadavg`` and sysfs's list of
possible CPUs once and counts the process directories of ``/proc``; no subprocess, no
per-process file. It makes one report per CPU (``cpuN`` lines, N below ``VMM_MAX_CPU_COUNT``),
as VBoxService does: Main keeps the loads per CPU id and publishes their sum over the VM's
CPUs divided by the CPU count, so a single report of all CPUs' load would show a fraction of
it. Main keeps a CPU id's load until that id reports again, so a CPU that had a load report
and has left ``/proc/stat`` since (offline: ejected after the host's unplug, which the
``cpuhotplug`` service carries out, or taken offline by an admin) gets one more report, as
idle (100/0/0: a halted vCPU is idle to the host), instead of keeping its last load in the
VM's average for good; it is forgotten once the host took that report
(:meth:`ProcStats.sent`). A CPU has had a load report once a sample made one, answered or
not: a report that ends without an answer (VERR_TIMEOUT, VERR_INTERRUPTED) may still have
reached the host, and an idle report too many only says what an offline CPU is. Every
CPU below ``VMM_MAX_CPU_COUNT`` that sysfs lists as possible
(``devices/system/cpu/possible``) and that is not online is reported idle too, once per
interval read: VirtualBox's ACPI tables list all the VM's CPUs (``CPUCount``, with CPU
hot-plug the most it may have; those not plugged disabled), which Linux counts as possible,
and Main divides by that count, so an idle VM with CPUs unplugged from boot would otherwise
read only the online share idle. Where sysfs has no such list (a container's), only CPUs
that had a load report are reported when gone. Figures:

- CPU load (idle, kernel, user) of that CPU in percent of its jiffies between two samples:
  idle = idle + iowait, kernel = system + irq + softirq, user = user + nice, over the sum of
  those and steal. The first sample has no "last interval": it makes one report, CPU 0's,
  with no CPU bits (unless an offline CPU's idle report goes), and so does a sample in
  which no CPU's jiffies moved. A CPU whose counters went back (offline and online again,
  a container's made-up ``/proc/stat``) or whose line came gets no report from that
  sample: it starts its next interval.
- processes: the numeric directories of ``/proc``; threads: ``nr_threads`` of ``/proc/loadavg``.
- memory, in 4 KiB pages whatever the guest's page size: total (MemTotal), available
  (MemAvailable, or MemFree + Buffers + Cached on kernels before 3.14), commit
  (Committed_AS), kernel paged (SReclaimable) and non-paged (SUnreclaim + KernelStack +
  PageTables) and their sum, system cache (Buffers + Cached), page file (SwapTotal); memory
  load is the share of MemTotal not available, in percent. A figure whose lines a kernel
  (or a container's made-up meminfo) lacks stays out, its bit clear; only MemTotal is
  required. Every report of a sample carries the same memory figures.
- the balloon, in 4 KiB pages, from the caller (the balloon service's count).

Handles have no Linux meaning and stay unreported.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Final

from agent.protocol import GuestStatistics, StatCap
from agent.protocol.constants import STAT_PAGE_SIZE, VMM_MAX_CPU_COUNT
from agent.records import record

if TYPE_CHECKING:
    from pathlib import Path

KIB: Final = 1024
PERCENT: Final = 100
MEMINFO_FIGURES: Final = (
    ("phys_mem_total", StatCap.PHYS_MEM_TOTAL, ("MemTotal",)),
    ("mem_commit_total", StatCap.MEM_COMMIT_TOTAL, ("Committed_AS",)),
    (
        "mem_kernel_total",
        StatCap.MEM_KERNEL_TOTAL,
        ("SReclaimable", "SUnreclaim", "KernelStack", "PageTables"),
    ),
    ("mem_kernel_paged", StatCap.MEM_KERNEL_PAGED, ("SReclaimable",)),
    (
        "mem_kernel_nonpaged",
        StatCap.MEM_KERNEL_NONPAGED,
        ("SUnreclaim", "KernelStack", "PageTables"),
    ),
    ("mem_system_cache", StatCap.MEM_SYSTEM_CACHE, ("Buffers", "Cached")),
    ("page_file_size", StatCap.PAGE_FILE_SIZE, ("SwapTotal",)),
)
"""Report field, its bit and the ``/proc/meminfo`` lines (kB) it sums; a field whose lines
are not all there stays out of the report."""
AVAILABLE: Final = ("MemAvailable",)
AVAILABLE_ESTIMATE: Final = ("MemFree", "Buffers", "Cached")
"""Available memory where the kernel has no MemAvailable (before 3.14), as VBoxService
computes it."""
MEMINFO_KEYS: Final = frozenset(key for _, _, keys in MEMINFO_FIGURES for key in keys) | frozenset(
    AVAILABLE + AVAILABLE_ESTIMATE
)
"""The ``/proc/meminfo`` lines a report uses."""
CPU_CAPS: Final = StatCap.CPU_LOAD_IDLE | StatCap.CPU_LOAD_KERNEL | StatCap.CPU_LOAD_USER
IDLE: Final = (PERCENT, 0, 0)
"""The loads (idle, kernel, user) reported for an offline CPU."""
POSSIBLE_CPUS: Final = "devices/system/cpu/possible"
"""The kernel's list of the CPUs that may ever be online, under the sysfs root."""
_U32_MAX: Final = 0xFFFF_FFFF
_CPU_LINE_PREFIX: Final = "cpu"
MAX_COUNTER_DIGITS: Final = 20
"""The kernel prints u64 counters: a longer run of digits is not a counter (and Python
refuses to convert one of more than 4300 digits)."""


class ProcStatsError(Exception):
    """``/proc`` could not be read or did not have the expected shape.

    Attributes:
        problem: what was wrong, without the data that showed it (which may change at every
            read while the problem stays the same).
    """

    def __init__(self, problem: str, data: str = "") -> None:
        super().__init__(f"{problem}: {data}" if data else problem)
        self.problem = problem


@record
class CpuTimes:
    """Cumulative jiffies of one CPU, grouped as the report needs them."""

    idle: int
    kernel: int
    user: int
    steal: int

    @property
    def total(self) -> int:
        """All jiffies counted."""
        return self.idle + self.kernel + self.user + self.steal


class ProcStats:
    """Samples ``/proc`` and builds reports; keeps the CPU times of the previous sample.

    Args:
        proc: the proc file system's mount point (a fake tree in tests).
        sysfs: the sysfs mount point (a fake tree in tests).
    """

    def __init__(self, proc: Path, sysfs: Path) -> None:
        self._proc = proc
        self._possible_file = sysfs / POSSIBLE_CPUS
        self._last_cpus: dict[int, CpuTimes] = {}
        self._loaded: set[int] = set()
        """The CPU ids whose load the host may hold (a sample made a load report of theirs)."""
        self._idle: set[int] = set()
        """The offline CPU ids the host holds as idle, since the last :meth:`forget_cpu`."""
        self._page_size = os.sysconf("SC_PAGE_SIZE")

    def forget_cpu(self) -> None:
        """Start a new CPU interval: the next sample measures no CPU's load, and reports
        the offline CPUs idle again (a restored VM's Main starts with every CPU at 0)."""
        self._last_cpus = {}
        self._idle = set()

    def sent(self, stats: GuestStatistics) -> None:
        """Note a report of the last sample that the host took: an offline CPU's idle report,
        which it holds instead of that CPU's last load (a load report counts from its sample
        on, answered or not)."""
        if stats.stat_caps & CPU_CAPS and stats.cpu_id not in self._last_cpus:
            self._loaded.discard(stats.cpu_id)
            self._idle.add(stats.cpu_id)

    def sample(self, *, balloon_chunks: int) -> tuple[GuestStatistics, ...]:
        """Read ``/proc`` once; return its reports in CPU id order, one per CPU with a load
        and one (idle) per offline CPU the host does not hold as idle yet, or one without
        CPU figures where there are none.

        ``balloon_chunks`` is in 1 MiB chunks, always reported: Main's performance
        collector takes none of the memory figures from a report without it.

        Raises:
            ProcStatsError: a file is missing or malformed.
        """
        try:
            cpus = _cpu_times(self._read("stat"))
            memory = _meminfo(self._read("meminfo"))
            threads = _threads(self._read("loadavg"))
            processes = sum(1 for entry in os.scandir(self._proc) if entry.name.isdigit())
        except OSError as exc:
            msg = f"cannot read {exc.filename or self._proc}: {exc.strerror or exc}"
            raise ProcStatsError(msg) from exc
        caps = StatCap.THREADS | StatCap.PROCESSES | StatCap.PHYS_MEM_BALLOON
        figures = {"phys_mem_balloon": _u32(balloon_chunks * (1 << 20) // STAT_PAGE_SIZE)}
        for field, bit, keys in MEMINFO_FIGURES:
            kib = _sum(memory, keys)
            if kib is not None:
                figures[field] = _pages(kib)
                caps |= bit
        total = memory["MemTotal"]
        available = _sum(memory, AVAILABLE)
        if available is None:
            available = _sum(memory, AVAILABLE_ESTIMATE)
        if available is not None:
            figures["phys_mem_avail"] = _pages(available)
            figures["memory_load"] = _percent(total - available, total)
            caps |= StatCap.PHYS_MEM_AVAIL | StatCap.MEMORY_LOAD
        common = GuestStatistics(
            stat_caps=int(caps),
            threads=_u32(threads),
            processes=_u32(processes),
            page_size=self._page_size,
            **figures,
        )
        last, self._last_cpus = self._last_cpus, cpus
        loads = {
            cpu_id: _loads(last[cpu_id], now)
            for cpu_id, now in cpus.items()
            if cpu_id in last and _advanced(last[cpu_id], now)
        }
        self._loaded |= loads.keys()  # the host may take a report that gets no answer
        self._idle -= loads.keys()
        offline = (self._possible() | self._loaded) - cpus.keys() - self._idle
        loads.update(dict.fromkeys(offline, IDLE))
        reports = tuple(_with_loads(common, cpu_id, loads[cpu_id]) for cpu_id in sorted(loads))
        return reports or (common,)

    def _read(self, name: str) -> str:
        return (self._proc / name).read_text(encoding="ascii", errors="replace")

    def _possible(self) -> frozenset[int]:
        """The possible CPUs below ``VMM_MAX_CPU_COUNT``; none where sysfs has no list."""
        try:
            text = self._possible_file.read_text(encoding="ascii", errors="replace")
        except OSError:
            return frozenset()
        return _cpu_list(text)


def _cpu_list(text: str) -> frozenset[int]:
    """The ids below ``VMM_MAX_CPU_COUNT`` of a kernel CPU list (``0-3,6``); none if it is
    malformed."""
    ids: set[int] = set()
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        start, end = _counter(first), _counter(last or first)
        if start is None or end is None:
            return frozenset()
        ids.update(range(start, min(end + 1, VMM_MAX_CPU_COUNT)))
    return frozenset(ids)


def _cpu_times(text: str) -> dict[int, CpuTimes]:
    """Each ``cpuN`` line's times by N, for N below ``VMM_MAX_CPU_COUNT``."""
    cpus: dict[int, CpuTimes] = {}
    for line in text.splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith(_CPU_LINE_PREFIX):
            continue
        number = _counter(parts[0].removeprefix(_CPU_LINE_PREFIX))
        if number is None or number >= VMM_MAX_CPU_COUNT:
            continue
        values: list[int] = []
        for part in parts[1:9]:  # the leading counters; a malformed one ends them
            value = _counter(part)
            if value is None:
                break
            values.append(value)
        if len(values) < 4:
            msg = f"/proc/stat line {parts[0]!r} has fewer than 4 counters"
            raise ProcStatsError(msg)
        user, nice, system, idle, *rest = values
        iowait, irq, softirq, steal = (*rest, 0, 0, 0, 0)[:4]
        cpus[number] = CpuTimes(idle + iowait, system + irq + softirq, user + nice, steal)
    if not cpus:
        msg = "/proc/stat has no usable 'cpuN' line"
        raise ProcStatsError(msg)
    return cpus


def _with_loads(
    common: GuestStatistics, cpu_id: int, loads: tuple[int, int, int]
) -> GuestStatistics:
    idle, kernel, user = loads
    return dataclasses.replace(
        common,
        cpu_id=cpu_id,
        stat_caps=common.stat_caps | CPU_CAPS,
        cpu_load_idle=idle,
        cpu_load_kernel=kernel,
        cpu_load_user=user,
    )


def _meminfo(text: str) -> dict[str, int]:
    """The report's ``/proc/meminfo`` lines by name; MemTotal must be one of them."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in MEMINFO_KEYS:
            fields = rest.split()
            value = _counter(fields[0]) if fields else None
            if value is not None:
                found[key] = value
    if "MemTotal" not in found:
        msg = "/proc/meminfo lacks MemTotal"
        raise ProcStatsError(msg)
    return found


def _sum(memory: dict[str, int], keys: tuple[str, ...]) -> int | None:
    """The sum of the ``keys`` lines, or None when one is missing."""
    if not all(key in memory for key in keys):
        return None
    return sum(memory[key] for key in keys)


def _threads(text: str) -> int:
    fields = text.split()
    running_total = fields[3] if len(fields) > 3 else ""
    total = _counter(running_total.partition("/")[2])
    if total is None:
        msg = "/proc/loadavg has no running/total field"
        raise ProcStatsError(msg, repr(text.strip()[:80]))
    return total


def _counter(text: str) -> int | None:
    """``text`` as a kernel counter (ASCII digits, at most a u64's), or None."""
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_COUNTER_DIGITS:
        return None
    return int(text)


def _advanced(last: CpuTimes, now: CpuTimes) -> bool:
    """Whether ``now`` is a later sample of the same counters: none went back, some moved.

    A counter goes back when the CPU went offline and online again in between (older kernels
    restart its idle time) or when a container's ``/proc/stat`` is made up (lxcfs); the
    interval is then meaningless, and ``now`` is only the next one's start.
    """
    return (
        now.idle >= last.idle
        and now.kernel >= last.kernel
        and now.user >= last.user
        and now.steal >= last.steal
        and now.total > last.total
    )


def _percent(part: int, whole: int) -> int:
    """``part`` in percent of ``whole``, within 0-100 (0 when ``whole`` is 0)."""
    return min(max(part * PERCENT // whole, 0), PERCENT) if whole > 0 else 0


def _loads(last: CpuTimes, now: CpuTimes) -> tuple[int, int, int]:
    span = now.total - last.total
    return (
        (now.idle - last.idle) * PERCENT // span,
        (now.kernel - last.kernel) * PERCENT // span,
        (now.user - last.user) * PERCENT // span,
    )


def _pages(kib: int) -> int:
    return _u32(kib * KIB // STAT_PAGE_SIZE)


def _u32(value: int) -> int:
    return min(max(value, 0), _U32_MAX)
