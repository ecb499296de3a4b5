"""Guest statistics from ``/proc``: what a Linux guest can put in ``VBoxGuestStatistics``.

One sample reads ``/proc/stat``, ``/proc/meminfo`` and ``/proc/loadavg`` once and counts the
process directories of ``/proc``; no subprocess, no per-process file. Figures:

- CPU load (idle, kernel, user) in percent of the jiffies between two samples, from the
  ``cpu`` line (all CPUs together): idle = idle + iowait, kernel = system + irq + softirq,
  user = user + nice, over the sum of those and steal. The first sample has no "last
  interval", so its report carries no CPU bits.
- processes: the numeric directories of ``/proc``; threads: ``nr_threads`` of ``/proc/loadavg``.
- memory, in 4 KiB pages whatever the guest's page size: total (MemTotal), available
  (MemAvailable), commit (Committed_AS), kernel paged (SReclaimable) and non-paged (SUnreclaim
  + KernelStack + PageTables) and their sum, system cache (Buffers + Cached), page file
  (SwapTotal); memory load is the share of MemTotal not available, in percent.
- the balloon, in 4 KiB pages, from the caller (the balloon service's count).

Handles have no Linux meaning and stay unreported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from agent.protocol import GuestStatistics, StatCap
from agent.protocol.constants import STAT_PAGE_SIZE

if TYPE_CHECKING:
    from pathlib import Path

KIB: Final = 1024
PERCENT: Final = 100
MEMINFO_KEYS: Final = (
    "MemTotal",
    "MemAvailable",
    "Buffers",
    "Cached",
    "SwapTotal",
    "Committed_AS",
    "SReclaimable",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
)
"""The ``/proc/meminfo`` lines a report uses (values in kB)."""
MEMORY_CAPS: Final = (
    StatCap.MEMORY_LOAD
    | StatCap.PHYS_MEM_TOTAL
    | StatCap.PHYS_MEM_AVAIL
    | StatCap.MEM_COMMIT_TOTAL
    | StatCap.MEM_KERNEL_TOTAL
    | StatCap.MEM_KERNEL_PAGED
    | StatCap.MEM_KERNEL_NONPAGED
    | StatCap.MEM_SYSTEM_CACHE
    | StatCap.PAGE_FILE_SIZE
)
CPU_CAPS: Final = StatCap.CPU_LOAD_IDLE | StatCap.CPU_LOAD_KERNEL | StatCap.CPU_LOAD_USER
_U32_MAX: Final = 0xFFFF_FFFF


class ProcStatsError(Exception):
    """``/proc`` could not be read or did not have the expected shape."""


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """Cumulative jiffies of all CPUs, grouped as the report needs them."""

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
    """

    def __init__(self, proc: Path) -> None:
        self._proc = proc
        self._last_cpu: CpuTimes | None = None
        self._page_size = os.sysconf("SC_PAGE_SIZE")

    def forget_cpu(self) -> None:
        """Start a new CPU interval: the next report has no CPU load."""
        self._last_cpu = None

    def sample(self, *, balloon_chunks: int | None) -> GuestStatistics:
        """Read ``/proc`` once and return a report (``balloon_chunks`` in 1 MiB chunks).

        Raises:
            ProcStatsError: a file is missing or malformed.
        """
        try:
            cpu = _cpu_times(self._read("stat"))
            memory = _meminfo(self._read("meminfo"))
            threads = _threads(self._read("loadavg"))
            processes = sum(1 for entry in os.scandir(self._proc) if entry.name.isdigit())
        except OSError as exc:
            msg = f"cannot read {exc.filename or self._proc}: {exc.strerror or exc}"
            raise ProcStatsError(msg) from exc
        caps = MEMORY_CAPS | StatCap.THREADS | StatCap.PROCESSES
        loads = (0, 0, 0)
        last, self._last_cpu = self._last_cpu, cpu
        if last is not None and cpu.total > last.total:
            loads = _loads(last, cpu)
            caps |= CPU_CAPS
        balloon = 0
        if balloon_chunks is not None:
            balloon = balloon_chunks * (1 << 20) // STAT_PAGE_SIZE
            caps |= StatCap.PHYS_MEM_BALLOON
        total, available = memory["MemTotal"], memory["MemAvailable"]
        paged = memory["SReclaimable"]
        nonpaged = memory["SUnreclaim"] + memory["KernelStack"] + memory["PageTables"]
        return GuestStatistics(
            stat_caps=int(caps),
            cpu_load_idle=loads[0],
            cpu_load_kernel=loads[1],
            cpu_load_user=loads[2],
            threads=_u32(threads),
            processes=_u32(processes),
            memory_load=(total - available) * PERCENT // total if total else 0,
            page_size=self._page_size,
            phys_mem_total=_pages(total),
            phys_mem_avail=_pages(available),
            phys_mem_balloon=_u32(balloon),
            mem_commit_total=_pages(memory["Committed_AS"]),
            mem_kernel_total=_pages(paged + nonpaged),
            mem_kernel_paged=_pages(paged),
            mem_kernel_nonpaged=_pages(nonpaged),
            mem_system_cache=_pages(memory["Buffers"] + memory["Cached"]),
            page_file_size=_pages(memory["SwapTotal"]),
        )

    def _read(self, name: str) -> str:
        return (self._proc / name).read_text(encoding="ascii", errors="replace")


def _cpu_times(text: str) -> CpuTimes:
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(part) for part in parts[1:9] if part.isdigit()]
            if len(values) < 4:
                break
            user, nice, system, idle, *rest = values
            iowait, irq, softirq, steal = (*rest, 0, 0, 0, 0)[:4]
            return CpuTimes(idle + iowait, system + irq + softirq, user + nice, steal)
    msg = "/proc/stat has no usable 'cpu' line"
    raise ProcStatsError(msg)


def _meminfo(text: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in MEMINFO_KEYS:
            value = rest.split()
            if value and value[0].isdigit():
                found[key] = int(value[0])
    missing = [key for key in MEMINFO_KEYS if key not in found]
    if missing:
        msg = f"/proc/meminfo lacks {', '.join(missing)}"
        raise ProcStatsError(msg)
    return found


def _threads(text: str) -> int:
    fields = text.split()
    running_total = fields[3] if len(fields) > 3 else ""
    _, _, total = running_total.partition("/")
    if not total.isdigit():
        msg = f"/proc/loadavg has no running/total field: {text.strip()!r}"
        raise ProcStatsError(msg)
    return int(total)


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
