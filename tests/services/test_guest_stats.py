"""Tests of the guest statistics service against the in-process simulated host.

Rules of this test module:
- The host is a real ``SimulatedHost`` behind ``SimOpener`` (pure trio, no threads), so the
  virtual clock (``autojump_clock``, an argument of every test) drives every report; each test
  is bounded by ``trio.fail_after`` on that clock.
- Reports are read back from the host's ``guest_stats`` (``host status``). ``/proc`` is this
  machine's, except where a test needs fixed figures and writes a fake tree in ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import structlog
import trio
import trio.testing

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import ReportGuestStats, RequestType, StatCap
from agent.protocol.constants import VMM_MAX_CPU_COUNT
from agent.protocol.status import STATUS_CODES
from agent.services import DrainTime, EventPump
from agent.services._base import BalloonGauge, ServiceContext
from agent.services._procstats import CPU_CAPS, ProcStats, ProcStatsError
from agent.services.balloon import BalloonSection, BalloonService
from agent.services.guest_stats import GuestStatsService
from tests.services.balloon_support import Quiet, SimChunks, start_in_scope
from tests.sim_support import HookedOpener, ReplyGarbler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

BOUND_S: Final = 600.0
PERSONALITIES: Final = ("mainline", "oracle", "passthrough")
IDLE_CPU: Final = (10, 0, 10, 900, 0, 0, 0, 0)
"""A ``cpuN`` line's counters (user nice system idle iowait irq softirq steal)..."""
IDLER_CPU: Final = (10, 0, 10, 1100, 0, 0, 0, 0)
"""... the same CPU 200 idle jiffies later ..."""
BUSY_CPU: Final = (160, 20, 60, 890, 50, 5, 5, 10)
"""... and (100, 0, 50, 800, 50, 0, 0, 0) 200 jiffies later: 45 % idle, 10 kernel, 40 user."""
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
"""Every memory bit, as a full ``/proc/meminfo`` gives them."""
RAM_GROUP: Final = (
    StatCap.PHYS_MEM_TOTAL
    | StatCap.PHYS_MEM_AVAIL
    | StatCap.PHYS_MEM_BALLOON
    | StatCap.MEM_SYSTEM_CACHE
    | StatCap.PAGE_FILE_SIZE
)
"""The memory bits one interval's reports must all carry for Main's performance collector
(``VMSTATS_GUEST_RAMUSAGE``, less the shared memory Main adds itself)."""


@asynccontextmanager
async def running(
    personality: str,
    *,
    proc: Path = Path("/proc"),
    gauge: BalloonGauge | None = None,
    cpus: int | None = None,
    user_device: bool = False,
    garbler: ReplyGarbler | None = None,
) -> AsyncIterator[tuple[SimulatedHost, GuestStatsService]]:
    """A host (with ``cpus`` CPUs, else this machine's), the pump and a started statistics
    service (reading ``gauge``, else one nobody writes; its sysfs the ``sys`` beside
    ``proc``, ``/sys`` for ``/proc``) on ``/dev/vboxguest`` (or ``/dev/vboxuser``;
    ``garbler`` garbles the host's replies on the former)."""
    host = (
        SimulatedHost(personality=personality, seed=1)
        if cpus is None
        else SimulatedHost(personality=personality, seed=1, cpus=cpus)
    )
    opener = (
        SimOpener(host, user_device=user_device)
        if garbler is None
        else HookedOpener(host, reply=garbler)
    )
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(opener) as device:
                pump = EventPump(device)
                context = ServiceContext(device, pump, balloon=gauge or BalloonGauge())
                service = GuestStatsService(context, proc=proc, sysfs=proc.parent / "sys")
                await nursery.start(pump.run)
                await nursery.start(service.run)
                yield host, service
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def agent_on(host: SimulatedHost) -> AsyncIterator[GuestStatsService]:
    """The pump and a started statistics service on ``host`` (already running), as an agent
    started on a VM that may have run one before; leaving stops them."""
    async with trio.open_nursery() as nursery, open_device(SimOpener(host)) as device:
        pump = EventPump(device)
        service = GuestStatsService(ServiceContext(device, pump))
        await nursery.start(pump.run)
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


def guest_stats(host: SimulatedHost) -> dict[str, object]:
    """The host's ``guest_stats`` (``host status``)."""
    state = host.status()["guest_stats"]
    assert isinstance(state, dict)
    return state


def last_report(host: SimulatedHost) -> dict[str, int]:
    """The latest report the host kept."""
    last = guest_stats(host)["last"]
    assert isinstance(last, dict)
    return last


def main_figures(host: SimulatedHost) -> dict[str, object]:
    """What Main keeps of the reports (``guest_stats``'s ``main``)."""
    main = guest_stats(host)["main"]
    assert isinstance(main, dict)
    return main


async def balloon_shown_around_a_stop(
    personality: str, *, stop_after_s: float
) -> tuple[tuple[object, int], tuple[object, int]]:
    """Run the balloon service and the statistics (every second) on ``personality``'s host,
    which takes 50 ms a chunk, to the host's 64 MB; after ``stop_after_s`` stop and drain
    the balloon service, as a reload that disables [balloon] does, and let the statistics
    run on for 30 s. Return Main's balloon figure (None: none yet) and the VM's balloon,
    both in KiB, at the stop and at the end."""
    host = SimulatedHost(personality=personality, seed=1)
    host.set_delay(RequestType.CHANGE_MEMBALLOON, 0.05)

    def figures() -> tuple[object, int]:
        return main_figures(host).get("mem_balloon"), host.vmmdev.balloon.chunks * 1024

    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(SimOpener(host)) as device:
                pump = EventPump(device)
                context = ServiceContext(device, pump)
                balloon = BalloonService(
                    device,
                    pump,
                    BalloonSection(),
                    allocator=SimChunks(),
                    pressure=Quiet(),
                    mem_available_mb=lambda: 1 << 20,
                    gauge=context.balloon,
                    drain_time=DrainTime(8.0),  # owned: half of it gives 64 chunks back
                )
                await nursery.start(pump.run)
                scope = trio.CancelScope()
                stopped = await start_in_scope(nursery, balloon, scope)
                await nursery.start(GuestStatsService(context).run)
                host.set_statistics_interval(1)
                host.set_balloon_target(64)
                await trio.sleep(stop_after_s)
                at_stop = figures()
                scope.cancel()
                await stopped.wait()
                await balloon.drain()
                await trio.sleep(30.0)
                at_end = figures()
                nursery.cancel_scope.cancel()
    return at_stop, at_end


def cpu_figures(host: SimulatedHost) -> tuple[object, object, object]:
    """Main's CPU figures: user, kernel, idle (percent of the VM's CPUs)."""
    main = main_figures(host)
    return main["cpu_user"], main["cpu_kernel"], main["cpu_idle"]


def mem_total_kib() -> int:
    """This machine's MemTotal in KiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    msg = "/proc/meminfo has no MemTotal"
    raise AssertionError(msg)


def write_proc(root: Path, *, cpus: tuple[tuple[int, ...], ...], processes: int) -> None:
    """A fake /proc with ``cpuN`` lines, fixed memory figures (kB) and ``processes``
    process directories; the ``cpu`` total line is nonsense on purpose (never read)."""
    root.mkdir(exist_ok=True)
    lines = ["cpu  9 9 9 9"] + [f"cpu{n} " + " ".join(map(str, c)) for n, c in enumerate(cpus)]
    (root / "stat").write_text("\n".join([*lines, "intr 1 2", ""]))
    (root / "loadavg").write_text("0.10 0.20 0.30 2/345 6789\n")
    (root / "meminfo").write_text(
        "MemTotal:        8000000 kB\nMemFree:          100 kB\nMemAvailable:    2000000 kB\n"
        "Buffers:           4000 kB\nCached:           40000 kB\nSwapTotal:       1000000 kB\n"
        "Committed_AS:    3000000 kB\nSReclaimable:      8000 kB\nSUnreclaim:        4000 kB\n"
        "KernelStack:       2000 kB\nPageTables:        2000 kB\n"
    )
    for pid in range(1, processes + 1):
        (root / str(pid)).mkdir(exist_ok=True)
    (root / "self").mkdir(exist_ok=True)


def write_possible(sysfs: Path, cpus: str) -> None:
    """A fake sysfs whose list of possible CPUs is ``cpus`` (``0-3``)."""
    directory = sysfs / "devices" / "system" / "cpu"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "possible").write_text(f"{cpus}\n")


class StatusLine:
    """The daemon's STATUS= line in small: the services' fragments, computed afresh at each
    ``changed()``, as the daemon does."""

    def __init__(self) -> None:
        self.services: tuple[BalloonService, GuestStatsService] | None = None
        self.text = ""
        self._changed = trio.Event()

    def changed(self) -> None:
        if self.services is not None:
            self.text = "; ".join(service.status() for service in self.services)
        self._changed.set()

    async def wait_changed(self) -> None:
        """Wait for the next ``changed()``."""
        self._changed = trio.Event()
        await self._changed.wait()


class TestReports:
    """The interval from the host, the reports and their figures."""

    @pytest.mark.parametrize("personality", PERSONALITIES)
    async def test_reports_follow_the_interval(
        self, autojump_clock: trio.abc.Clock, personality: str, tmp_path: Path
    ) -> None:
        """No reports at interval 0; one a second at 1; none again after 0.

        The fake /proc's jiffies never move, so each sample is one report without loads.
        """
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU, IDLE_CPU), processes=1)
        async with running(personality, proc=proc) as (host, service):
            await trio.sleep(10.0)
            assert guest_stats(host)["reports"] == 0
            assert service.status() == "statistics off"
            host.set_statistics_interval(1)
            await trio.sleep(5.5)
            assert guest_stats(host)["reports"] == 6
            assert service.status() == "statistics every 1 s"
            host.set_statistics_interval(0)
            await trio.sleep(10.0)
            assert guest_stats(host)["reports"] == 6
            assert guest_stats(host)["interval_s"] == 0

    async def test_memory_matches_this_machine(self, autojump_clock: trio.abc.Clock) -> None:
        """phys_mem_total x 4096 is MemTotal within one 4 KiB page; caps name the real fields."""
        async with running("passthrough") as (host, _):
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            report = last_report(host)
            assert 0 <= mem_total_kib() * 1024 - report["phys_mem_total"] * 4096 < 4096
            caps = StatCap(report["stat_caps"])
            assert MEMORY_CAPS | StatCap.THREADS | StatCap.PROCESSES in caps
            assert StatCap.HANDLES not in caps
            assert report["cpu_id"] == 0
            assert report["processes"] >= 1

    async def test_figures_from_proc(self, autojump_clock: trio.abc.Clock, tmp_path: Path) -> None:
        """Every field is computed from /proc as documented; CPU load only from the 2nd sample,
        then one report per CPU with that CPU's load; the service keeps the last it sent."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=((100, 0, 50, 800, 50, 0, 0, 0), IDLE_CPU), processes=3)
        async with running("mainline", proc=proc, cpus=2) as (host, service):
            host.set_statistics_interval(2)
            await trio.sleep(1.0)
            first = last_report(host)
            assert guest_stats(host)["reports"] == 1
            assert not StatCap(first["stat_caps"]) & CPU_CAPS
            write_proc(proc, cpus=(BUSY_CPU, IDLER_CPU), processes=3)
            reports = guest_stats(host)["reports"]
            await trio.sleep(2.0)
            assert guest_stats(host)["reports"] != reports  # sampled since
            report = last_report(host)
            main = guest_stats(host)["main"]
            sent = service.statistics().last
        assert sent is not None
        assert dataclasses.asdict(sent) == report  # the service's latest is the host's
        assert main == {
            "cpu_user": 20,
            "cpu_kernel": 5,
            "cpu_idle": 72,
            "mem_total": 8_000_000,
            "mem_free": 2_000_000,
            "mem_balloon": 0,
            "mem_cache": 44_000,
            "page_total": 1_000_000,
        }
        assert StatCap(report["stat_caps"]) & CPU_CAPS == CPU_CAPS
        assert (report["cpu_load_idle"], report["cpu_load_kernel"], report["cpu_load_user"]) == (
            100,
            0,
            0,
        )
        assert report | {"stat_caps": 0, "page_size": 0} == {
            "cpu_id": 1,
            "stat_caps": 0,
            "cpu_load_idle": 100,
            "cpu_load_kernel": 0,
            "cpu_load_user": 0,
            "threads": 345,
            "processes": 3,
            "handles": 0,
            "memory_load": 75,
            "page_size": 0,
            "phys_mem_total": 2_000_000,
            "phys_mem_avail": 500_000,
            "phys_mem_balloon": 0,
            "mem_commit_total": 750_000,
            "mem_kernel_total": 4_000,
            "mem_kernel_paged": 2_000,
            "mem_kernel_nonpaged": 2_000,
            "mem_system_cache": 11_000,
            "page_file_size": 250_000,
        }

    async def test_a_new_interval_measures_cpu_load_afresh(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """Reports switched off and on again: the first report after that has no CPU load
        (it would span the pause), the next one measures from it."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        async with running("mainline", proc=proc, cpus=1) as (host, _):
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            write_proc(proc, cpus=(IDLER_CPU,), processes=1)
            await trio.sleep(1.0)
            assert StatCap(last_report(host)["stat_caps"]) & CPU_CAPS == CPU_CAPS
            host.set_statistics_interval(0)
            await trio.sleep(10.0)
            write_proc(proc, cpus=((110, 0, 60, 1250, 0, 0, 0, 0),), processes=1)
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            assert not StatCap(last_report(host)["stat_caps"]) & CPU_CAPS
            write_proc(proc, cpus=((110, 0, 60, 1450, 0, 0, 0, 0),), processes=1)
            await trio.sleep(1.0)
            report = last_report(host)
        assert StatCap(report["stat_caps"]) & CPU_CAPS == CPU_CAPS
        loads = (report["cpu_load_idle"], report["cpu_load_kernel"], report["cpu_load_user"])
        assert loads == (100, 0, 0)

    async def test_a_cpu_gone_offline_is_reported_idle_once(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """CPU 1 busy, then offline (its line leaves /proc/stat, as after the cpuhotplug
        service ejected it): Main keeps each CPU id's last load and averages over the VM's
        CPUs, so one idle report for CPU 1 makes the idle VM read idle, and no more follow."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU, IDLE_CPU), processes=1)
        async with running("mainline", proc=proc, cpus=2) as (host, _):
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            write_proc(proc, cpus=(IDLER_CPU, (210, 0, 10, 900, 0, 0, 0, 0)), processes=1)
            await trio.sleep(1.0)
            assert cpu_figures(host) == (50, 0, 50)
            reports = guest_stats(host)["reports"]
            assert isinstance(reports, int)
            write_proc(proc, cpus=((10, 0, 10, 1300, 0, 0, 0, 0),), processes=1)
            await trio.sleep(1.0)
            last = last_report(host)
            assert (last["cpu_id"], last["cpu_load_idle"], last["cpu_load_user"]) == (1, 100, 0)
            for idle in range(1500, 2500, 200):  # CPU 0 idles on, alone
                write_proc(proc, cpus=((10, 0, 10, idle, 0, 0, 0, 0),), processes=1)
                await trio.sleep(1.0)
            assert cpu_figures(host) == (0, 0, 100)
            assert guest_stats(host)["reports"] == reports + 2 + 5

    async def test_cpus_not_plugged_read_idle(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """A hot-plug VM of 4 CPUs with 2 plugged, idle: Main divides by 4, so the 2 CPUs
        sysfs lists as possible but not online are reported idle and the VM reads 100 %
        idle, not 50."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU, IDLE_CPU), processes=1)
        write_possible(tmp_path / "sys", "0-3")
        async with running("mainline", proc=proc, cpus=4) as (host, _):
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            write_proc(proc, cpus=(IDLER_CPU, IDLER_CPU), processes=1)
            await trio.sleep(1.0)
            assert cpu_figures(host) == (0, 0, 100)
            assert guest_stats(host)["reports"] == 2 + 2

    @pytest.mark.parametrize("personality", PERSONALITIES)
    async def test_without_a_balloon_service_the_balloon_reads_0_and_is_left_alone(
        self, autojump_clock: trio.abc.Clock, personality: str
    ) -> None:
        """No count on the gauge (``[balloon] enable = false``): the reports carry a balloon
        of 0, all this agent ballooned, and ask no driver. On Oracle's driver CHECK_BALLOON
        would make the statistics the balloon's owner and inflate it to the host's target
        with the balloon service switched off."""
        async with running(personality) as (host, _):
            host.set_balloon_target(64)
            host.set_statistics_interval(1)
            await trio.sleep(3.0)
            balloon = host.status()["balloon"]
            assert isinstance(balloon, dict)
            assert balloon["chunks"] == 0
            assert StatCap.PHYS_MEM_BALLOON in StatCap(last_report(host)["stat_caps"])
            assert last_report(host)["phys_mem_balloon"] == 0
            assert main_figures(host)["mem_balloon"] == 0
            assert host.vmmdev.request_counts[RequestType.GET_MEMBALLOON_CHANGE_REQ] == 0

    @pytest.mark.parametrize("personality", PERSONALITIES)
    async def test_every_report_completes_mains_ram_group(
        self, autojump_clock: trio.abc.Clock, personality: str
    ) -> None:
        """Main's performance collector takes the guest's memory figures only from an
        interval whose reports carried all five memory bits: with no balloon service, from
        the first report on, each carries them all, so ``VBoxManage metrics`` and
        VBoxBalloonCtrl see the guest's memory (``Guest/RAM/Usage/*``)."""
        async with running(personality) as (host, _):
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            assert guest_stats(host)["reports"] == 1
            caps = StatCap(last_report(host)["stat_caps"])
            assert caps & RAM_GROUP == RAM_GROUP, f"missing {RAM_GROUP & ~caps!r}"
            await trio.sleep(1.0)  # Main's timer ticked (at 1 s) since
            metrics = guest_stats(host)["metrics"]
            assert isinstance(metrics, dict)
            assert metrics["mem_balloon"] == 0
            assert metrics["mem_total"] == main_figures(host)["mem_total"]

    @pytest.mark.parametrize("personality", PERSONALITIES)
    async def test_an_unknown_balloon_reads_as_last_reported(
        self, autojump_clock: trio.abc.Clock, personality: str
    ) -> None:
        """A gauge that comes to read None (a drain that could not tell what it left) leaves
        the figure the reports carried last, which Main would have kept, rather than ask the
        driver; the reports keep carrying it."""
        gauge = BalloonGauge()
        gauge.chunks = 10
        async with running(personality, gauge=gauge) as (host, _):
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            assert last_report(host)["phys_mem_balloon"] == 10 * 256
            gauge.chunks = None
            reports = guest_stats(host)["reports"]
            await trio.sleep(2.0)
            assert guest_stats(host)["reports"] != reports  # sampled since
            assert StatCap.PHYS_MEM_BALLOON in StatCap(last_report(host)["stat_caps"])
            assert last_report(host)["phys_mem_balloon"] == 10 * 256
            assert host.vmmdev.request_counts[RequestType.GET_MEMBALLOON_CHANGE_REQ] == 0

    @pytest.mark.parametrize(
        ("personality", "left_mb"), [("passthrough", 0), ("oracle", 64), ("mainline", 64)]
    )
    async def test_a_stopped_balloon_service_leaves_its_last_size(
        self, autojump_clock: trio.abc.Clock, personality: str, left_mb: int
    ) -> None:
        """A reload disables [balloon] while [statistics] runs on: the reports carry the size
        the drain left, so Main shows the balloon the VM has, not the one it had: none where
        the agent gave its chunks back (owned mode), the 64 MB the driver keeps (Oracle's
        until the process closes the device, the in-tree kernel's until the service runs
        again)."""
        at_stop, at_end = await balloon_shown_around_a_stop(personality, stop_after_s=30.0)
        assert at_stop == (64 * 1024, 64 * 1024)
        assert at_end == (left_mb * 1024, left_mb * 1024)

    async def test_a_kernel_balloon_inflating_at_the_stop_is_followed(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The same reload while the in-tree kernel still inflates to the 64 MB: its work
        item goes on to the target once 0x40 left the filter, so the size the drain read is
        part-way; every later report reads the kernel's count, and Main comes to show the
        64 MB the VM holds, not the part-way size for good."""
        (_, held), at_end = await balloon_shown_around_a_stop("mainline", stop_after_s=1.0)
        assert 0 < held < 64 * 1024
        assert at_end == (64 * 1024, 64 * 1024)

    async def test_balloon_service_count_wins(self, autojump_clock: trio.abc.Clock) -> None:
        """With a count on the balloon gauge, the report carries it and asks no driver."""
        gauge = BalloonGauge()
        gauge.chunks = 10
        async with running("oracle", gauge=gauge) as (host, _):
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            assert last_report(host)["phys_mem_balloon"] == 10 * 256
            assert StatCap.PHYS_MEM_BALLOON in StatCap(last_report(host)["stat_caps"])
            assert host.vmmdev.request_counts[RequestType.GET_MEMBALLOON_CHANGE_REQ] == 0

    async def test_the_kernel_balloon_is_read_for_every_report(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The in-tree driver balloons in the kernel and keeps 0x40 from userspace, so no event
        tells the agent: the balloon service reads the size as each report is sampled, and the
        report and the status (systemd's STATUS=) carry it from the next report on."""
        host = SimulatedHost(personality="mainline", seed=1)
        line = StatusLine()
        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                async with open_device(SimOpener(host)) as device:
                    pump = EventPump(device)
                    context = ServiceContext(device, pump, line.changed)
                    balloon = BalloonService(
                        device,
                        pump,
                        BalloonSection(),
                        pressure=Quiet(),
                        mem_available_mb=lambda: 1 << 20,
                        status_changed=line.changed,
                        gauge=context.balloon,
                    )
                    line.services = (balloon, GuestStatsService(context))
                    await nursery.start(pump.run)
                    for service in line.services:
                        await nursery.start(service.run)
                    host.set_statistics_interval(1)
                    await trio.testing.wait_all_tasks_blocked()
                    assert last_report(host)["phys_mem_balloon"] == 0
                    host.set_balloon_target(64)
                    await trio.testing.wait_all_tasks_blocked()
                    assert host.driver.balloon_chunks == 64  # no report since, no status change
                    await line.wait_changed()  # at the next report
                    await trio.testing.wait_all_tasks_blocked()
                    assert re.fullmatch(
                        r"balloon 64 MB \(kernel\); statistics every 1 s",
                        line.text,
                    )
                    assert last_report(host)["phys_mem_balloon"] == 64 * 256
                    nursery.cancel_scope.cancel()

    async def test_restore_reads_the_interval_again(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """After RESTORED the interval is read again: 0 (the restored VM's Main asks for none),
        so reports stop until the host asks again; then they start a new CPU interval (the
        first sample has no loads)."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        async with running("passthrough", proc=proc) as (host, service):
            host.set_statistics_interval(2)
            await trio.sleep(1.0)
            write_proc(proc, cpus=(BUSY_CPU,), processes=1)
            await trio.sleep(2.0)
            assert StatCap(last_report(host)["stat_caps"]) & CPU_CAPS == CPU_CAPS
            host.restore()
            await trio.sleep(10.0)
            assert service.statistics().rhythm.rereads == 2
            assert (service.status(), guest_stats(host)["reports"]) == ("statistics off", 2)
            host.set_statistics_interval(2)
            await trio.sleep(0.5)
            assert service.statistics().rhythm.rereads == 3
            assert guest_stats(host)["reports"] == 3
            assert not StatCap(last_report(host)["stat_caps"]) & CPU_CAPS

    async def test_interval_zero_is_taken_while_reports_are_slow(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """Reports the host answers after 1.5 s at an interval of 1 s (no deadline is ever
        ahead to wait for): the host's change to 0 is read once the report under way is
        answered, and reports stop."""
        write_proc(tmp_path, cpus=(IDLE_CPU,), processes=1)
        async with running("passthrough", proc=tmp_path) as (host, service):
            host.set_statistics_interval(1)
            await trio.sleep(0.5)
            host.set_delay(RequestType.REPORT_GUEST_STATS, 1.5)
            await trio.sleep(3.0)
            host.set_statistics_interval(0)
            await trio.sleep(1.5)
            assert service.status() == "statistics off"
            reports = guest_stats(host)["reports"]
            await trio.sleep(60.0)
            assert guest_stats(host)["reports"] == reports == 3

    @pytest.mark.parametrize("personality", PERSONALITIES)
    async def test_untrusted_session_is_refused_once(
        self, autojump_clock: trio.abc.Clock, personality: str
    ) -> None:
        """On /dev/vboxuser the drivers refuse the interval read (trusted requests only): the
        service says so in one line and its status, and stays up without reporting."""
        with structlog.testing.capture_logs() as logs:
            async with running(personality, user_device=True) as (host, service):
                host.set_statistics_interval(1)
                await trio.sleep(3.0)
                assert guest_stats(host)["reports"] == 0
                assert service.status() == "statistics refused by the driver"
        refused = [entry for entry in logs if entry["event"] == "statistics_refused_by_driver"]
        assert len(refused) == 1
        assert refused[0]["status"] == "VERR_PERMISSION_DENIED"
        assert "/dev/vboxuser" in refused[0]["device"]

    @pytest.mark.parametrize("refusal", ["VERR_PERMISSION_DENIED", "VERR_ACCESS_DENIED"])
    async def test_a_refusal_after_a_failed_first_read_settles_as_refused(
        self, autojump_clock: trio.abc.Clock, refusal: str
    ) -> None:
        """A first interval read that fails otherwise starts the service on no interval; a
        refusal before any read went through then means an untrusted session as it does at
        the first read: one line, the status, and the service stays up (its start was
        reported once: a second report would end the run and restart it)."""
        host = SimulatedHost(personality="mainline", seed=1)
        read = RequestType.GET_STATISTICS_CHANGE_REQ
        with trio.fail_after(BOUND_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                async with open_device(SimOpener(host)) as device:
                    pump = EventPump(device)
                    service = GuestStatsService(ServiceContext(device, pump))
                    await nursery.start(pump.run)
                    host.add_fault(read, STATUS_CODES["VERR_GENERAL_FAILURE"])
                    await nursery.start(service.run)
                    assert service.status() == "statistics off (failing)"
                    host.add_fault(read, STATUS_CODES[refusal])
                    host.set_statistics_interval(1)
                    await trio.sleep(3.0)
                    assert service.status() == "statistics refused by the driver"
                    assert guest_stats(host)["reports"] == 0
                    nursery.cancel_scope.cancel()
        refused = [entry for entry in logs if entry["event"] == "statistics_refused_by_driver"]
        assert [entry["status"] for entry in refused] == [refusal]

    async def test_a_restarted_run_refused_at_its_first_read_starts(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The supervisor runs the same instance again: a run whose first read is refused
        reports its start although the run before it had a read fail otherwise (its start
        waited forever before)."""
        host = SimulatedHost(personality="mainline", seed=1)
        read = RequestType.GET_STATISTICS_CHANGE_REQ
        with trio.fail_after(BOUND_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                async with open_device(SimOpener(host)) as device:
                    pump = EventPump(device)
                    service = GuestStatsService(ServiceContext(device, pump))
                    await nursery.start(pump.run)
                    host.add_fault(read, STATUS_CODES["VERR_GENERAL_FAILURE"])
                    async with trio.open_nursery() as first:
                        await first.start(service.run)
                        assert service.status() == "statistics off (failing)"
                        first.cancel_scope.cancel()
                    host.add_fault(read, STATUS_CODES["VERR_PERMISSION_DENIED"])
                    await nursery.start(service.run)
                    assert service.status() == "statistics refused by the driver"
                    nursery.cancel_scope.cancel()
        refused = [entry for entry in logs if entry["event"] == "statistics_refused_by_driver"]
        assert [entry["status"] for entry in refused] == ["VERR_PERMISSION_DENIED"]

    async def test_a_restarted_agent_whose_first_read_fails_reads_again(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The host asked for a report every 5 s long ago and the agent before acknowledged it,
        so no 0x80 is pending for a restarted agent. Its first interval read fails once
        (VERR_NO_MEMORY: both drivers copy the request into memory they allocate, which the
        balloon's pressure can fail); the read is tried again a second later and reports
        resume, with one warning and one line when it goes through."""
        host = SimulatedHost(personality="mainline", seed=1)
        read = RequestType.GET_STATISTICS_CHANGE_REQ
        with trio.fail_after(BOUND_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                host.set_statistics_interval(5)
                async with agent_on(host):  # the agent before: reads (acknowledges) 5 s
                    await trio.sleep(1.0)
                before = guest_stats(host)["reports"]
                assert isinstance(before, int)
                host.add_fault(read, STATUS_CODES["VERR_NO_MEMORY"])
                async with agent_on(host) as service:
                    assert service.status() == "statistics off (failing)"
                    await trio.sleep(1.5)
                    assert service.status() == "statistics every 5 s"
                    assert guest_stats(host)["reports"] == before + 1
                nursery.cancel_scope.cancel()
        unreadable = [entry for entry in logs if entry["event"] == "statistics_interval_unreadable"]
        assert [(entry["status"], entry["kept_s"]) for entry in unreadable] == [
            ("VERR_NO_MEMORY", None)
        ]
        again = [entry for entry in logs if entry["event"] == "statistics_interval_read_again"]
        assert [entry["failed_in_a_row"] for entry in again] == [1]

    async def test_a_read_failing_from_the_start_is_retried_on_a_back_off(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Interval reads that keep failing from the start are tried again after 1 s, then
        twice as long each time up to a minute (reads at 0, 1, 3, 7, 15, 31, 63, 123 and
        183 s); the host's change request during the back-off is read at once and ends the
        failure with one line. Once a read went through (0: no reports) nothing is read
        again until the host asks."""
        host = SimulatedHost(personality="mainline", seed=1)
        read = RequestType.GET_STATISTICS_CHANGE_REQ
        reads = host.vmmdev.request_counts
        with trio.fail_after(BOUND_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                host.add_fault(read, STATUS_CODES["VERR_NO_MEMORY"], 20)
                async with agent_on(host) as service:
                    await trio.sleep(200.0)
                    assert reads[read] == 9
                    assert service.status() == "statistics off (failing)"
                    host.clear_faults(read)
                    host.set_statistics_interval(5)
                    await trio.sleep(0.5)
                    assert reads[read] == 10
                    assert service.status() == "statistics every 5 s"
                    assert guest_stats(host)["reports"] == 1
                    host.set_statistics_interval(0)
                    await trio.sleep(300.0)
                    assert (reads[read], service.status()) == (11, "statistics off")
                nursery.cancel_scope.cancel()
        unreadable = [entry for entry in logs if entry["event"] == "statistics_interval_unreadable"]
        assert len(unreadable) == 1
        again = [entry for entry in logs if entry["event"] == "statistics_interval_read_again"]
        assert [entry["failed_in_a_row"] for entry in again] == [9]

    async def test_a_refusal_at_a_retry_settles_as_refused(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The retry of a first read that failed otherwise meets the driver's refusal, with no
        read gone through: an untrusted session, said once, and never tried again."""
        host = SimulatedHost(personality="mainline", seed=1)
        read = RequestType.GET_STATISTICS_CHANGE_REQ
        with trio.fail_after(BOUND_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                host.add_fault(read, STATUS_CODES["VERR_NO_MEMORY"])
                host.add_fault(read, STATUS_CODES["VERR_PERMISSION_DENIED"])
                async with agent_on(host) as service:
                    await trio.sleep(300.0)
                    assert service.status() == "statistics refused by the driver"
                    assert host.vmmdev.request_counts[read] == 2
                nursery.cancel_scope.cancel()
        refused = [entry for entry in logs if entry["event"] == "statistics_refused_by_driver"]
        assert [entry["status"] for entry in refused] == ["VERR_PERMISSION_DENIED"]

    @pytest.mark.parametrize(
        ("failure", "logged"),
        [
            ("VERR_PERMISSION_DENIED", ("status", "VERR_PERMISSION_DENIED")),
            ("VERR_GENERAL_FAILURE", ("status", "VERR_GENERAL_FAILURE")),
            ("malformed", ("malformed_reply", "reply header (size, version, type)")),
        ],
    )
    async def test_a_failed_read_after_the_first_keeps_the_interval(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path, failure: str, logged: tuple[str, str]
    ) -> None:
        """Once the interval was read, reads that fail at ten change requests in a row (a
        refusal, which no longer means an untrusted session; a host status; a malformed
        reply: more failures than the supervisor's restart budget) are counted and logged
        once, the service stays up and reports at the interval in force (at once after
        each request, as VBoxService); the next sound read applies, with one line."""
        write_proc(tmp_path, cpus=(IDLE_CPU,), processes=1)
        garbler = ReplyGarbler()
        read = RequestType.GET_STATISTICS_CHANGE_REQ
        with structlog.testing.capture_logs() as logs:
            async with running("passthrough", proc=tmp_path, garbler=garbler) as (host, service):
                host.set_statistics_interval(2)
                await trio.sleep(1.0)
                if failure == "malformed":
                    garbler.request_types.add(read)
                else:
                    host.add_fault(read, STATUS_CODES[failure], 10)
                for request in range(10):
                    host.set_statistics_interval(5 + request % 2)  # a change each time
                    await trio.sleep(1.5)
                    assert service.status() == "statistics every 2 s (failing)"
                assert guest_stats(host)["reports"] == 11
                assert service.statistics().failures == 10
                garbler.request_types.clear()
                host.set_statistics_interval(5)
                await trio.sleep(6.0)
                assert service.status() == "statistics every 5 s"
                assert guest_stats(host)["reports"] == 13
        unreadable = [entry for entry in logs if entry["event"] == "statistics_interval_unreadable"]
        assert len(unreadable) == 1
        key, text = logged
        assert text in unreadable[0][key]
        assert unreadable[0]["kept_s"] == 2.0
        again = [entry for entry in logs if entry["event"] == "statistics_interval_read_again"]
        assert [entry["failed_in_a_row"] for entry in again] == [10]
        assert not [entry for entry in logs if entry["event"] == "statistics_refused_by_driver"]

    async def test_malformed_report_replies_are_logged_once(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """A minute of report replies whose header names another request type (a broken
        host; more failures than the supervisor's restart budget) is counted report by
        report and logged once; the service reports on, and says once when reports go
        through again."""
        write_proc(tmp_path, cpus=(IDLE_CPU,), processes=1)
        garbler = ReplyGarbler()
        with structlog.testing.capture_logs() as logs:
            async with running("passthrough", proc=tmp_path, garbler=garbler) as (host, service):
                host.set_statistics_interval(1)
                await trio.sleep(0.5)
                garbler.request_types.add(RequestType.REPORT_GUEST_STATS)
                await trio.sleep(60.0)
                assert service.status() == "statistics every 1 s (failing)"
                garbler.request_types.clear()
                await trio.sleep(1.0)
                assert service.status() == "statistics every 1 s"
                assert (service.statistics().failures, garbler.garbled) == (60, 60)
        failed = [entry for entry in logs if entry["event"] == "statistics_report_failed"]
        assert len(failed) == 1
        assert "reply header (size, version, type)" in failed[0]["malformed_reply"]
        again = [entry for entry in logs if entry["event"] == "statistics_reported_again"]
        assert [entry["failed_in_a_row"] for entry in again] == [60]

    async def test_unreadable_proc_is_logged_once_and_counted(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """A missing /proc file skips each report: counted every time, logged once, shown in
        the status; once readable again, reports resume with one line saying so."""
        proc = tmp_path / "proc"
        with structlog.testing.capture_logs() as logs:
            async with running("passthrough", proc=proc) as (host, service):
                host.set_statistics_interval(1)
                await trio.sleep(2.5)
                assert guest_stats(host)["reports"] == 0
                assert service.statistics().failures == 3
                assert service.status() == "statistics every 1 s (failing)"
                write_proc(proc, cpus=(IDLE_CPU,), processes=1)
                await trio.sleep(1.0)
                assert guest_stats(host)["reports"] == 1
                assert service.statistics().failures == 3
                assert service.status() == "statistics every 1 s"
        unavailable = [entry for entry in logs if entry["event"] == "statistics_unavailable"]
        assert len(unavailable) == 1
        assert "proc" in unavailable[0]["error"]
        again = [entry for entry in logs if entry["event"] == "statistics_reported_again"]
        assert [entry["failed_in_a_row"] for entry in again] == [3]

    async def test_a_malformed_file_is_logged_once_while_its_text_changes(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """The same problem with other data at every tick (a /proc/loadavg without its
        running/total field, its figures moving) is one line, with the data in it."""
        write_proc(tmp_path, cpus=(IDLE_CPU,), processes=1)
        with structlog.testing.capture_logs() as logs:
            async with running("passthrough", proc=tmp_path) as (host, service):
                host.set_statistics_interval(1)
                await trio.sleep(0.5)  # the file changes between reports, never at one
                for tick in range(3):
                    (tmp_path / "loadavg").write_text(f"0.{tick}0 0.20 0.30\n")
                    await trio.sleep(1.0)
                assert service.statistics().failures == 3
        unavailable = [entry for entry in logs if entry["event"] == "statistics_unavailable"]
        assert len(unavailable) == 1
        assert "running/total" in unavailable[0]["error"]
        assert "0.00 0.20 0.30" in unavailable[0]["error"]

    async def test_refused_reports_are_logged_per_status(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """Reports the host refuses are logged once per status, not at every tick."""
        write_proc(tmp_path, cpus=(IDLE_CPU,), processes=1)
        with structlog.testing.capture_logs() as logs:
            async with running("passthrough", proc=tmp_path) as (host, service):
                host.set_statistics_interval(1)
                await trio.sleep(0.5)
                host.add_fault(RequestType.REPORT_GUEST_STATS, -1, 3)
                await trio.sleep(4.0)
                assert service.statistics().failures == 3
        failed = [entry for entry in logs if entry["event"] == "statistics_report_failed"]
        assert [entry["status"] for entry in failed] == ["VERR_GENERAL_FAILURE"]
        again = [entry for entry in logs if entry["event"] == "statistics_reported_again"]
        assert [entry["failed_in_a_row"] for entry in again] == [3]


class TestProcSample:
    """``ProcStats.sample`` on fake trees: which CPUs get a report."""

    def test_cpu_ids_from_64_are_left_out(self, tmp_path: Path) -> None:
        """Main keeps loads for CPU ids below VMM_MAX_CPU_COUNT (64); VBoxService skips the
        rest, and so does the agent."""
        proc = tmp_path / "proc"
        cpus = tuple(IDLE_CPU for _ in range(VMM_MAX_CPU_COUNT + 1))
        write_proc(proc, cpus=cpus, processes=1)
        stats = ProcStats(proc, tmp_path / "sys")
        assert [r.cpu_id for r in stats.sample(balloon_chunks=0)] == [0]
        write_proc(proc, cpus=tuple(IDLER_CPU for _ in cpus), processes=1)
        reports = stats.sample(balloon_chunks=0)
        assert [r.cpu_id for r in reports] == list(range(VMM_MAX_CPU_COUNT))
        assert {r.cpu_load_idle for r in reports} == {100}

    def test_an_offline_cpu_is_reported_idle_until_the_host_took_it(self, tmp_path: Path) -> None:
        """A CPU that had a load report and whose line then leaves /proc/stat is reported
        idle at every sample until the host takes that report (a failed send repeats it),
        whether or not its load report had an answer (one without may have reached the
        host); one that left before a load report of its own is not reported at all."""
        proc = tmp_path / "proc"
        stats = ProcStats(proc, tmp_path / "sys")
        write_proc(proc, cpus=(IDLE_CPU, IDLE_CPU, IDLE_CPU, IDLE_CPU), processes=1)
        stats.sample(balloon_chunks=0)
        write_proc(proc, cpus=(IDLER_CPU, BUSY_CPU, BUSY_CPU), processes=1)  # CPU 3 left
        for report in stats.sample(balloon_chunks=0)[:2]:  # CPU 2's send: no answer
            stats.sent(report)

        def loads() -> list[tuple[int, int, int, int]]:
            return [
                (r.cpu_id, r.cpu_load_idle, r.cpu_load_kernel, r.cpu_load_user)
                for r in stats.sample(balloon_chunks=0)
            ]

        write_proc(proc, cpus=((10, 0, 10, 1300, 0, 0, 0, 0),), processes=1)
        assert loads() == [(0, 100, 0, 0), (1, 100, 0, 0), (2, 100, 0, 0)]  # none of them sent
        write_proc(proc, cpus=((10, 0, 10, 1500, 0, 0, 0, 0),), processes=1)
        reports = stats.sample(balloon_chunks=0)
        assert [r.cpu_id for r in reports] == [0, 1, 2]
        for report in reports:
            stats.sent(report)
        write_proc(proc, cpus=((10, 0, 10, 1700, 0, 0, 0, 0),), processes=1)
        assert loads() == [(0, 100, 0, 0)]

    def test_a_cpu_reported_idle_whose_load_report_got_no_answer(self, tmp_path: Path) -> None:
        """CPU 1 was reported idle (offline), came online, and its first load report went
        without an answer (VERR_TIMEOUT or VERR_INTERRUPTED: the host may have taken it);
        once it goes offline again it is reported idle, not left at that load."""
        proc, sysfs = tmp_path / "proc", tmp_path / "sys"
        write_possible(sysfs, "0-1")
        stats = ProcStats(proc, sysfs)

        def sample(*cpus: tuple[int, ...], answered: bool = True) -> list[tuple[int, int]]:
            write_proc(proc, cpus=cpus, processes=1)
            reports = stats.sample(balloon_chunks=0)
            for report in reports if answered else ():
                stats.sent(report)
            return [(r.cpu_id, r.cpu_load_idle) for r in reports if r.stat_caps & CPU_CAPS]

        assert sample(IDLE_CPU) == [(1, 100)]  # offline, taken as idle
        assert sample(IDLER_CPU, IDLE_CPU) == [(0, 100)]  # CPU 1 online, no interval yet
        busy = (160, 20, 60, 1200, 50, 5, 5, 10)  # past both IDLE_CPU and IDLER_CPU
        assert sample(busy, busy, answered=False) == [(0, 38), (1, 59)]
        assert sample(busy) == [(1, 100)]
        assert sample(busy) == []

    def test_possible_cpus_offline_are_reported_idle_once_per_interval(
        self, tmp_path: Path
    ) -> None:
        """The CPUs below 64 that sysfs lists as possible and /proc/stat does not are
        reported idle until the host took that, and again after a new interval starts; one
        that comes online and leaves again after a load report is reported idle again."""
        proc, sysfs = tmp_path / "proc", tmp_path / "sys"
        write_possible(sysfs, "0-1,3,62-65")
        stats = ProcStats(proc, sysfs)

        def sample(*cpus: tuple[int, ...]) -> list[tuple[int, int, int]]:
            write_proc(proc, cpus=cpus, processes=1)
            reports = stats.sample(balloon_chunks=0)
            for report in reports:
                stats.sent(report)
            return [(r.cpu_id, r.cpu_load_idle, r.stat_caps & CPU_CAPS) for r in reports]

        idle = (100, CPU_CAPS)
        assert sample(IDLE_CPU) == [(cpu, *idle) for cpu in (1, 3, 62, 63)]
        assert sample(IDLER_CPU) == [(0, *idle)]
        assert sample(IDLER_CPU, IDLE_CPU) == [(0, 0, 0)]  # CPU 1 online, no interval yet
        assert sample(IDLER_CPU, IDLER_CPU) == [(1, *idle)]  # ... its load, then offline:
        assert sample(IDLER_CPU) == [(1, *idle)]
        stats.forget_cpu()
        assert sample(IDLER_CPU) == [(cpu, *idle) for cpu in (1, 3, 62, 63)]
        write_possible(sysfs, "0-x")  # malformed: none known
        stats.forget_cpu()
        assert sample(IDLER_CPU) == [(0, 0, 0)]

    def test_short_cpu_line_is_an_error(self, tmp_path: Path) -> None:
        """A ``cpuN`` line with fewer than four counters names itself in the error."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=((1, 2, 3),), processes=1)
        with pytest.raises(ProcStatsError, match=r"'cpu0' has fewer than 4 counters"):
            ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)

    def test_a_counter_going_back_starts_a_new_interval(self, tmp_path: Path) -> None:
        """CPU 0's idle time goes back while its total moves on (it went offline and online
        again): that sample has no load for it, and the next one measures from it."""
        proc = tmp_path / "proc"
        stats = ProcStats(proc, tmp_path / "sys")
        write_proc(proc, cpus=((10, 0, 10, 900, 500, 0, 0, 0),), processes=1)
        stats.sample(balloon_chunks=0)
        write_proc(proc, cpus=((2000, 0, 10, 300, 0, 0, 0, 0),), processes=1)
        (report,) = stats.sample(balloon_chunks=0)
        assert report.stat_caps & CPU_CAPS == 0
        write_proc(proc, cpus=((2050, 0, 60, 400, 0, 0, 0, 0),), processes=1)
        (report,) = stats.sample(balloon_chunks=0)
        assert report.stat_caps & CPU_CAPS == CPU_CAPS
        loads = (report.cpu_load_idle, report.cpu_load_kernel, report.cpu_load_user)
        assert loads == (50, 25, 25)

    def test_a_cpu_busy_all_the_time_has_its_load(self, tmp_path: Path) -> None:
        """A CPU with no idle time between two samples (its idle counter stands still) is
        measured: 0 % idle, not left out as a counter that did not move."""
        proc = tmp_path / "proc"
        stats = ProcStats(proc, tmp_path / "sys")
        write_proc(proc, cpus=((10, 0, 10, 900, 0, 0, 0, 0),), processes=1)
        stats.sample(balloon_chunks=0)
        write_proc(proc, cpus=((110, 0, 110, 900, 0, 0, 0, 0),), processes=1)
        (report,) = stats.sample(balloon_chunks=0)
        assert report.stat_caps & CPU_CAPS == CPU_CAPS
        loads = (report.cpu_load_idle, report.cpu_load_kernel, report.cpu_load_user)
        assert loads == (0, 50, 50)

    def test_memory_load_stays_a_percentage(self, tmp_path: Path) -> None:
        """MemAvailable above MemTotal (a container's made-up meminfo) is 0 % load, not a
        negative figure the report cannot carry."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        meminfo = proc / "meminfo"
        meminfo.write_text(
            meminfo.read_text().replace("MemAvailable:    2000000", "MemAvailable:    9000000")
        )
        (report,) = ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)
        assert report.memory_load == 0
        ReportGuestStats(report).encode()

    @pytest.mark.parametrize(
        ("name", "old", "new"),
        [
            ("stat", "cpu0 10 ", "cpu0 " + "9" * 5000 + " "),
            ("stat", "cpu0 ", "cpu" + "1" * 5000 + " "),
            ("meminfo", "MemTotal:        8000000", "MemTotal: " + "8" * 5000),
            ("loadavg", "2/345", "2/" + "3" * 5000),
            ("meminfo", "MemTotal:        8000000", "MemTotal: 1" + "0" * 20),  # 21 digits
        ],
    )
    def test_huge_number_is_a_proc_error(
        self, tmp_path: Path, name: str, old: str, new: str
    ) -> None:
        """A run of digits no kernel counter has (more than a u64's 20) is malformed
        ``/proc``, reported as such (not an error that would end the service)."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        path = proc / name
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
        with pytest.raises(ProcStatsError, match=name):
            ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)

    def test_loadavg_without_its_running_total_is_an_error(self, tmp_path: Path) -> None:
        """Three load averages and nothing after them: the missing field is malformed
        ``/proc``, not an IndexError that would end the service."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        (proc / "loadavg").write_text("0.10 0.20 0.30\n")
        with pytest.raises(ProcStatsError, match="no running/total field"):
            ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)

    def test_the_largest_counters_are_taken_and_clamped(self, tmp_path: Path) -> None:
        """A u64's 20 digits are a counter; a figure beyond the report's u32 is sent as the
        u32 maximum; a MemTotal of 0 is 0 % memory load."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        meminfo = proc / "meminfo"
        text = meminfo.read_text()
        meminfo.write_text(text.replace("MemTotal:        8000000", f"MemTotal: {2**64 - 1}"))
        (report,) = ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)
        assert report.phys_mem_total == 0xFFFF_FFFF
        ReportGuestStats(report).encode()
        meminfo.write_text(text.replace("MemTotal:        8000000", "MemTotal: 0"))
        (report,) = ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)
        assert (report.phys_mem_total, report.memory_load) == (0, 0)

    def test_a_cpu_line_of_four_counters_is_enough(self, tmp_path: Path) -> None:
        """user, nice, system and idle (what kernels before 2.6 print) give a load."""
        proc = tmp_path / "proc"
        stats = ProcStats(proc, tmp_path / "sys")
        write_proc(proc, cpus=((10, 0, 10, 900),), processes=1)
        stats.sample(balloon_chunks=0)
        write_proc(proc, cpus=((10, 0, 10, 1100),), processes=1)
        (report,) = stats.sample(balloon_chunks=0)
        loads = (report.cpu_load_idle, report.cpu_load_kernel, report.cpu_load_user)
        assert loads == (100, 0, 0)

    def test_a_malformed_counter_ends_the_line(self, tmp_path: Path) -> None:
        """A counter that is not a number ends the line's counters instead of shifting the
        later ones into its place."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=((1, 2, 3, 4),), processes=1)
        stat = proc / "stat"
        stat.write_text(stat.read_text().replace("cpu0 1 2 3 4", "cpu0 1 x 3 4 5"))
        with pytest.raises(ProcStatsError, match=r"'cpu0' has fewer than 4 counters"):
            ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)

    def test_a_kernel_without_memavailable_estimates_it(self, tmp_path: Path) -> None:
        """Before Linux 3.14 meminfo has no MemAvailable: available memory is MemFree +
        Buffers + Cached (as VBoxService reports it), not a failed sample."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        meminfo = proc / "meminfo"
        meminfo.write_text(meminfo.read_text().replace("MemAvailable:    2000000 kB\n", ""))
        (report,) = ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)
        assert report.stat_caps & MEMORY_CAPS == MEMORY_CAPS
        assert report.phys_mem_avail == (100 + 4000 + 40000) // 4
        assert report.memory_load == 99

    def test_missing_lines_leave_their_figures_out(self, tmp_path: Path) -> None:
        """A meminfo without the slab, stack and page table lines (a container's) still
        gives a report: the kernel figures' bits are clear, the others are there."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        meminfo = proc / "meminfo"
        kept = [
            line
            for line in meminfo.read_text().splitlines()
            if line.split(":")[0] not in {"SReclaimable", "KernelStack", "PageTables"}
        ]
        meminfo.write_text("\n".join(kept) + "\n")
        (report,) = ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)
        kernel = StatCap.MEM_KERNEL_TOTAL | StatCap.MEM_KERNEL_PAGED | StatCap.MEM_KERNEL_NONPAGED
        assert report.stat_caps & MEMORY_CAPS == MEMORY_CAPS & ~kernel
        assert (report.phys_mem_total, report.phys_mem_avail) == (2_000_000, 500_000)
        assert report.mem_kernel_total == 0

    def test_meminfo_without_memtotal_is_an_error(self, tmp_path: Path) -> None:
        """MemTotal is the one line a report cannot do without."""
        proc = tmp_path / "proc"
        write_proc(proc, cpus=(IDLE_CPU,), processes=1)
        meminfo = proc / "meminfo"
        meminfo.write_text(meminfo.read_text().replace("MemTotal:", "MemTotl:"))
        with pytest.raises(ProcStatsError, match="lacks MemTotal"):
            ProcStats(proc, tmp_path / "sys").sample(balloon_chunks=0)
