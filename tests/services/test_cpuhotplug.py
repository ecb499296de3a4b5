"""Tests of the cpuhotplug service against the in-process simulated host and a sysfs tree.

Rules of this test module:

- The host is a real ``SimulatedHost`` (``VBoxManage controlvm plugcpu`` is
  ``host.cpu_plug``); the guest's CPUs are a tree in ``tmp_path`` laid out as the kernel's
  (``devices/system/cpu/cpuN/{online,topology/...,firmware_node}`` and the ACPI devices the
  ``firmware_node`` links point to: one ``ACPI0004:nn`` container per CPU, as VirtualBox's
  CPU hot-plug SSDT declares them). The tree is files, so it does not react as the kernel
  would: a write is only recorded, and an offline CPU's topology is there already (the
  kernel shows it once the CPU is online; the service reads it only then).
- The service does its sysfs work on a worker thread, so tests that reach sysfs run on the
  real clock and wait for the service's status changes (``Watch``), never for a time;
  tests that stay off sysfs run on ``autojump_clock``. Every test is bounded by
  ``trio.fail_after``.
- A plug's looks for its CPU follow each other without the service's pause (an autouse
  fixture): only a test's own steps change the tree.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog.testing
import trio
import trio.testing
from pydantic import ValidationError

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.host._cpu_hotplug import HostCpuHotPlug
from agent.protocol import (
    VBoxStatusError,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import CpuEventType, RequestType
from agent.protocol.status import STATUS_CODES
from agent.services import EventPump, ServiceContext, _cpu_sysfs, cpuhotplug
from agent.services._cpu_sysfs import CpuSysfs
from agent.services.cpuhotplug import (
    MAX_REQUESTS_PER_WAKEUP,
    PLUG_TRIES,
    SPEC,
    CpuHotPlugSection,
    CpuHotPlugService,
    CpuHotPlugStatistics,
    cpu_sysfs,
    cpuhotplug_service,
)
from agent.services.registry import SERVICES
from testbed.unit_scheduling import UNIT
from tests.sim_support import HookedOpener, ReplyGarbler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from structlog.typing import EventDict

    from agent.host.transport import SimTransport

RESOURCE_BUSY = STATUS_CODES["VERR_RESOURCE_BUSY"]
ACPI_BUS = Path("devices/LNXSYSTM:00/LNXSYBUS:00")
"""Where VirtualBox's CPU containers appear (VBoxService looks under the same path)."""
RELEASE_S = 5.0
"""How long a test may be blocked in a FIFO's open before :func:`released` ends it."""
FIRMWARE_CPUS = 32
"""The CPUs VirtualBox's CPU hot-plug SSDT declares (0x00-0x1f), each in its own container."""


def acpi_cpu(n: int) -> Path:
    """CPU n's ACPI device under the sysfs root: ``LNXCPU:nn`` in its own processor container
    ``ACPI0004:nn`` (the SSDT's SCKn; Linux numbers both in hex, %02x)."""
    return ACPI_BUS / f"ACPI0004:{n:02x}" / f"LNXCPU:{n:02x}"


class Watch:
    """Wakes a test whenever the service says its status changed."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def changed(self) -> None:
        """The service's ``status_changed``."""
        self._changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, re-checking at every status change."""
        while not predicate():
            await self._changed.wait()
            self._changed = trio.Event()


@dataclass
class Guest:
    """The guest's CPUs in a sysfs tree under ``root``."""

    root: Path

    def cpu(
        self, n: int, *, online: bool | None, core: int | None = None, eject: bool = True
    ) -> Path:
        """Add ``cpuN``: ``online`` None means no online file (as cpu0); its topology (core
        ``core``, default N; package 0) is what the kernel shows once it is online; ``eject``
        gives it an ACPI device."""
        directory = self.root / "devices/system/cpu" / f"cpu{n}"
        directory.mkdir(parents=True)
        if online is not None:
            (directory / "online").write_text("1\n" if online else "0\n")
        topology = directory / "topology"
        topology.mkdir()
        (topology / "core_id").write_text(f"{n if core is None else core}\n")
        (topology / "physical_package_id").write_text("0\n")
        if eject:
            acpi = self.root / acpi_cpu(n)
            acpi.mkdir(parents=True)
            (acpi / "eject").write_text("")
            (directory / "firmware_node").symlink_to(os.path.relpath(acpi, directory))
        return directory

    def online(self, n: int) -> str:
        """What was last written to (or is in) ``cpuN/online``."""
        return (self.root / "devices/system/cpu" / f"cpu{n}" / "online").read_text().strip()

    def eject(self, n: int) -> Path:
        """The CPU's ACPI ``eject``."""
        return self.root / acpi_cpu(n) / "eject"

    def ejected(self, n: int) -> bool:
        """Whether "1" was written to the CPU's ACPI ``eject``."""
        return self.eject(n).read_text() == "1"


@pytest.fixture(name="guest")
def _guest(tmp_path: Path) -> Guest:
    """cpu0 (no online file, as the boot CPU), cpu1 online, cpu2 and cpu3 offline."""
    guest = Guest(tmp_path)
    guest.cpu(0, online=None)
    guest.cpu(1, online=True)
    guest.cpu(2, online=False)
    guest.cpu(3, online=False)
    return guest


@dataclass
class Running:
    """A running service on a running host."""

    host: SimulatedHost
    service: CpuHotPlugService
    watch: Watch

    def stats(self) -> CpuHotPlugStatistics:
        """The service's counters."""
        return self.service.statistics()

    def requests(self, request_type: RequestType) -> int:
        """How many requests of that type reached the host."""
        return self.host.vmmdev.request_counts[request_type]


@asynccontextmanager
async def running(
    root: Path | None,
    *,
    personality: str = "mainline",
    user_device: bool = False,
    fault: int = 0,
    fault_count: int = 1,
    garbler: ReplyGarbler | None = None,
) -> AsyncIterator[Running]:
    """Start a host (SET_CPU_HOTPLUG_STATUS answering ``fault`` ``fault_count`` times, if
    given), the pump and the service on ``root`` (None: ``auto``, the section's default);
    drain the service at the end, as the daemon does. ``garbler`` garbles the host's replies
    (as root, on ``/dev/vboxguest``)."""
    host = SimulatedHost(personality=personality, seed=7)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        if fault:
            host.add_fault(RequestType.SET_CPU_HOTPLUG_STATUS, fault, fault_count)
        opener: SimOpener | HookedOpener = (
            SimOpener(host, user_device=user_device, uid=1000 if user_device else 0)
            if garbler is None
            else HookedOpener(host, reply=garbler)
        )
        async with open_device(opener) as device:
            watch = Watch()
            pump = EventPump(device)
            service = cpuhotplug_service(
                ServiceContext(device, pump, watch.changed),
                CpuHotPlugSection(sysfs_root="auto" if root is None else str(root)),
            )
            await nursery.start(pump.run)
            async with trio.open_nursery() as inner:
                await inner.start(service.run)
                yield Running(host, service, watch)
                inner.cancel_scope.cancel()
            await service.drain()
        nursery.cancel_scope.cancel()


@pytest.fixture(autouse=True)
def _looks_one_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plug's looks follow each other at once: the tree is files that change only when a
    test changes them (by its own steps, never by the time), so the pause between looks
    (``PLUG_RETRY_S``, real time on the tests that reach sysfs) decided nothing and cost
    every plug of a CPU offline before monitoring began half a second."""
    monkeypatch.setattr(cpuhotplug, "PLUG_RETRY_S", 0.0)


def events_named(logs: list[EventDict], name: str) -> list[EventDict]:
    """The captured log entries of one event."""
    return [entry for entry in logs if entry["event"] == name]


def record_writes(
    monkeypatch: pytest.MonkeyPatch,
    *,
    refuse: tuple[str, str] | None = None,
    error: int = errno.EBUSY,
) -> list[tuple[str, str]]:
    """Record the service's sysfs writes as (directory, value), in order; the write
    ``refuse`` names is recorded and refused with ``error``, as the kernel may refuse one."""
    writes: list[tuple[str, str]] = []
    write = _cpu_sysfs._write

    def recording(path: Path, value: str) -> None:
        writes.append((path.parent.name, value))
        if (path.parent.name, value) == refuse:
            raise OSError(error, os.strerror(error))
        write(path, value)

    monkeypatch.setattr(_cpu_sysfs, "_write", recording)
    return writes


class TestSpec:
    def test_is_registered_with_its_section(self) -> None:
        """The registry lists it; ``[cpuhotplug]`` is on by default, as VBoxService, with
        ``sysfs_root = "auto"`` (``/sys`` on a real device, see TestSimulatedHostDefault)."""
        assert SPEC in SERVICES
        assert (SPEC.name, SPEC.section) == ("cpuhotplug", CpuHotPlugSection)
        assert CpuHotPlugSection() == CpuHotPlugSection(enable=True, sysfs_root="auto")

    @pytest.mark.parametrize("root", ["sys", "", "/sys\0"])
    def test_sysfs_root_must_be_absolute(self, root: str) -> None:
        """A relative or empty root is refused with what is allowed."""
        with pytest.raises(ValidationError, match="must be 'auto' or an absolute path"):
            CpuHotPlugSection(sysfs_root=root)

    async def test_reload_moves_to_another_tree(self, guest: Guest, tmp_path: Path) -> None:
        """A new ``sysfs_root`` applies live, from the next event on."""
        other = Guest(tmp_path / "other")
        other.cpu(6, online=False)
        with trio.fail_after(10):
            async with running(guest.root) as run:
                assert run.service.reconfigure(CpuHotPlugSection(sysfs_root=str(other.root)))
                run.host.cpu_plug(6)
                await run.watch.until(lambda: run.stats().plugged == 1)
        assert other.online(6) == "1"
        assert (guest.online(2), guest.online(3)) == ("0", "0")


class TestPlugAndUnplug:
    async def test_plug_and_unplug_reach_the_right_cpu(
        self, guest: Guest, personality: str
    ) -> None:
        """Plug: the first offline CPU comes online. Unplug: the CPU with the host's core id
        goes offline and is ejected. One log line each, with the host's ids and the CPU."""
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root, personality=personality) as run:
                assert run.host.status()["cpu_hotplug"]["monitored"] is True  # type: ignore[index]
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().plugged == 1)
                assert (guest.online(2), guest.online(3)) == ("1", "0")
                run.host.cpu_unplug(1)
                await run.watch.until(lambda: run.stats().unplugged == 1)
                assert guest.online(1) == "0"
                assert guest.ejected(1)
                assert run.service.status() == "cpuhotplug: 1 plugged, 1 unplugged"
        [plugged] = events_named(logs, "cpu_plugged")
        assert (plugged["cpu"], plugged["core"], plugged["package"]) == ("cpu2", 2, 0)
        [unplugged] = events_named(logs, "cpu_unplugged")
        assert (unplugged["cpu"], unplugged["core"], unplugged["package"]) == ("cpu1", 1, 0)
        assert run.stats() == CpuHotPlugStatistics(
            monitoring=False, events=2, plugged=1, unplugged=1, failures=0
        )

    async def test_plug_of_a_cpu_already_online_writes_nothing(self, guest: Guest) -> None:
        """An online CPU with the host's ids (the kernel or udev was quicker) is the plugged
        one: no offline CPU is brought online in its place."""
        guest.cpu(4, online=True, core=9)
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.cpu_plug(9)
                await run.watch.until(lambda: run.stats().plugged == 1)
        assert (guest.online(2), guest.online(3)) == ("0", "0")
        assert events_named(logs, "cpu_plugged")[0]["cpu"] == "cpu4"

    @pytest.mark.parametrize(
        ("setup", "core", "problem", "cpu5_online"),
        [
            (None, 7, "no online CPU has core 7 package 0", None),
            (None, 0, "cpu0 cannot go offline (it has no online file)", None),
            ("no_eject", 5, "cpu5 has no ACPI eject: it stays online, the host keeps it", "1"),
            (
                "read_only_eject",
                5,
                "cpu5's ACPI eject is read-only here: it stays online, the host keeps it",
                "1",
            ),
            (
                "eject_fails",
                5,
                "cpu5's ACPI eject failed (No space left on device): it is back online",
                "1",
            ),
            ("refuses", 5, "cpu5 refused to go offline: No space left on device", "1"),
        ],
    )
    async def test_an_unplug_that_cannot_happen_is_one_line(
        self, guest: Guest, setup: str | None, core: int, problem: str, cpu5_online: str | None
    ) -> None:
        """A core nobody has, cpu0, a CPU without ACPI eject, one whose eject cannot be
        written (a sysctl that is read-only even for root stands for a read-only /sys) or
        fails (ENOSPC), a CPU whose online write fails: one warning line, a CPU the host
        still owns is online, and the service goes on (a plug works)."""
        with pytest.MonkeyPatch.context() as monkeypatch:
            if setup == "no_eject":
                guest.cpu(5, online=True, eject=False)
            elif setup == "read_only_eject":
                guest.cpu(5, online=True)
                guest.eject(5).unlink()
                guest.eject(5).symlink_to("/proc/sys/kernel/osrelease")
            elif setup == "eject_fails":
                guest.cpu(5, online=True)
                record_writes(monkeypatch, refuse=("firmware_node", "1"), error=errno.ENOSPC)
            elif setup == "refuses":
                guest.cpu(5, online=True)
                record_writes(monkeypatch, refuse=("cpu5", "0"), error=errno.ENOSPC)
            with trio.fail_after(10), structlog.testing.capture_logs() as logs:
                async with running(guest.root) as run:
                    run.host.cpu_unplug(core)
                    await run.watch.until(lambda: run.stats().failures == 1)
                    assert run.service.status() == "cpuhotplug: 0 plugged, 0 unplugged, 1 failed"
                    run.host.cpu_plug(2)
                    await run.watch.until(lambda: run.stats().plugged == 1)
        [failed] = events_named(logs, "cpu_unplug_failed")
        assert failed["log_level"] == "warning"
        assert (failed["problem"], failed["core"], failed["package"]) == (problem, core, 0)
        assert guest.online(2) == "1"
        if cpu5_online is not None:
            assert guest.online(5) == cpu5_online

    async def test_plug_passes_over_an_offline_cpu_with_other_ids(self, guest: Guest) -> None:
        """cpu2 (offline, core 2) comes online, shows other ids and goes offline again; cpu3
        is the plugged one. One line says both."""
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.cpu_plug(3)
                await run.watch.until(lambda: run.stats().plugged == 1)
        assert (guest.online(2), guest.online(3)) == ("0", "1")
        [plugged] = events_named(logs, "cpu_plugged")
        assert (plugged["cpu"], plugged["core"]) == ("cpu3", 3)
        assert plugged["passed_over"] == ["cpu2 has core 2 package 0, offline again"]

    async def test_plug_prefers_a_cpu_new_since_monitoring_started(self, guest: Guest) -> None:
        """cpu2 and cpu3 were offline before the service started (an admin's choice); the
        plugged CPU's directory (cpu4) appears later and is the only one brought online."""
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                guest.cpu(4, online=False)
                run.host.cpu_plug(4)
                await run.watch.until(lambda: run.stats().plugged == 1)
        assert (guest.online(2), guest.online(3), guest.online(4)) == ("0", "0", "1")
        [plugged] = events_named(logs, "cpu_plugged")
        assert plugged["cpu"] == "cpu4"
        assert "passed_over" not in plugged

    async def test_an_admins_offline_cpu_waits_for_the_last_look(
        self, guest: Guest, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The kernel adds the plugged CPU's directory (cpu4) only after the service's first
        look: cpu2 and cpu3, offline before monitoring started, are not brought online in
        the meantime; cpu4 is the only CPU written to."""
        writes = record_writes(monkeypatch)
        names = CpuSysfs._names
        listings: list[list[str]] = []

        def kernel_adds_cpu4_late(sysfs: CpuSysfs) -> list[str]:
            listings.append(names(sysfs))
            if len(listings) == 2:  # the plug's first look (the first: monitoring's start)
                guest.cpu(4, online=False)
            return listings[-1]

        monkeypatch.setattr(CpuSysfs, "_names", kernel_adds_cpu4_late)
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.cpu_plug(4)
                await run.watch.until(lambda: run.stats().plugged == 1)
        assert "cpu4" not in listings[1]
        assert writes == [("cpu4", "1")]
        [plugged] = events_named(logs, "cpu_plugged")
        assert "passed_over" not in plugged

    async def test_an_admins_offline_cpu_stays_off_when_the_new_one_is_refused(
        self, guest: Guest, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The plugged CPU's directory (cpu4) is there but the kernel refuses to bring it
        online (EBUSY, as with hot-plug disabled): every look tries cpu4 alone, and cpu2 and
        cpu3, offline before monitoring started, are never brought online; the failure
        names cpu4's refusal."""
        writes = record_writes(monkeypatch, refuse=("cpu4", "1"))
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                guest.cpu(4, online=False)
                run.host.cpu_plug(4)
                await run.watch.until(lambda: run.stats().failures == 1)
        assert writes == [("cpu4", "1")] * PLUG_TRIES
        assert (guest.online(2), guest.online(3), guest.online(4)) == ("0", "0", "0")
        [failed] = events_named(logs, "cpu_plug_failed")
        assert failed["problem"] == "cpu4 refused to come online: Device or resource busy"

    async def test_an_admins_offline_cpu_stays_off_when_the_new_one_refuses_late(
        self, guest: Guest, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The kernel adds the plugged CPU's directory (cpu4) only at the last look, and
        refuses to bring it online there: cpu2 and cpu3, offline before monitoring started,
        are still not tried (the new CPU was there, they would come online for nothing)."""
        writes = record_writes(monkeypatch, refuse=("cpu4", "1"))
        names = CpuSysfs._names
        listings: list[list[str]] = []

        def kernel_adds_cpu4_at_the_last_look(sysfs: CpuSysfs) -> list[str]:
            if len(listings) == PLUG_TRIES:  # the first listing: monitoring's start
                guest.cpu(4, online=False)
            listings.append(names(sysfs))
            return listings[-1]

        monkeypatch.setattr(CpuSysfs, "_names", kernel_adds_cpu4_at_the_last_look)
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.cpu_plug(4)
                await run.watch.until(lambda: run.stats().failures == 1)
        assert "cpu4" in listings[-1]
        assert writes == [("cpu4", "1")]
        [failed] = events_named(logs, "cpu_plug_failed")
        assert failed["problem"] == "cpu4 refused to come online: Device or resource busy"

    async def test_a_passed_over_cpu_that_stays_online_is_a_warning(
        self, guest: Guest, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """At the last look cpu2 comes online, has other ids and refuses to go offline
        again: besides the failed plug, one warning names it (the admin's CPU is online)."""
        writes = record_writes(monkeypatch, refuse=("cpu2", "0"))
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.cpu_plug(9)
                await run.watch.until(lambda: run.stats().failures == 1)
        assert writes == [("cpu2", "1"), ("cpu2", "0"), ("cpu3", "1"), ("cpu3", "0")]
        assert (guest.online(2), guest.online(3)) == ("1", "0")
        stays = "cpu2 has core 2 package 0, stays online: offline refused: Device or resource busy"
        [failed] = events_named(logs, "cpu_plug_failed")
        assert failed["passed_over"] == [stays, "cpu3 has core 3 package 0, offline again"]
        [warning] = events_named(logs, "cpu_passed_over_stays_online")
        assert warning["log_level"] == "warning"
        assert (warning["cpu"], warning["problem"], warning["core"]) == ("cpu2", stays, 9)

    async def test_a_cpu_passed_over_is_tried_last_at_the_next_plug(self, guest: Guest) -> None:
        """cpu4 appears, but the host plugs core 3: cpu4 (new) and cpu2 are passed over.
        When cpu5 appears for the next plug, cpu4 is an offline CPU like cpu2 (tried after
        the new one), so cpu5 comes online with nothing passed over."""
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                guest.cpu(4, online=False)
                run.host.cpu_plug(3)
                await run.watch.until(lambda: run.stats().plugged == 1)
                guest.cpu(5, online=False)
                run.host.cpu_plug(5)
                await run.watch.until(lambda: run.stats().plugged == 2)
        assert [guest.online(n) for n in (2, 3, 4, 5)] == ["0", "1", "0", "1"]
        first, second = events_named(logs, "cpu_plugged")
        assert (first["cpu"], first["passed_over"]) == (
            "cpu3",
            [
                "cpu4 has core 4 package 0, offline again",
                "cpu2 has core 2 package 0, offline again",
            ],
        )
        assert second["cpu"] == "cpu5"
        assert "passed_over" not in second

    async def test_plug_of_a_core_no_offline_cpu_has(self, guest: Guest) -> None:
        """Each offline CPU comes online once, shows other ids and goes offline again; the
        plug fails after PLUG_TRIES looks with one line naming them and the ids not found."""
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.cpu_plug(9)
                await run.watch.until(lambda: run.stats().failures == 1)
        assert (guest.online(2), guest.online(3)) == ("0", "0")
        [failed] = events_named(logs, "cpu_plug_failed")
        assert failed["problem"] == "core 9 package 0 not found among 2 offline CPUs tried"
        assert failed["passed_over"] == [
            "cpu2 has core 2 package 0, offline again",
            "cpu3 has core 3 package 0, offline again",
        ]

    async def test_plug_with_no_offline_cpu(self, tmp_path: Path) -> None:
        """Looked for PLUG_TRIES times, then one line; nothing is written."""
        guest = Guest(tmp_path)
        guest.cpu(0, online=None)
        guest.cpu(1, online=True)
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.cpu_plug(4)
                await run.watch.until(lambda: run.stats().failures == 1)
        [failed] = events_named(logs, "cpu_plug_failed")
        assert failed["problem"] == f"no offline CPU appeared within {PLUG_TRIES} looks"
        assert guest.online(1) == "1"

    async def test_a_failing_host_request_is_one_line(self, guest: Guest) -> None:
        """GET_CPU_HOTPLUG_REQ failing: one line; the next event is taken as usual (the host's
        one slot then holds the later plug, and the CPU with its ids comes online for it)."""
        failure = STATUS_CODES["VERR_GENERAL_FAILURE"]
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.add_fault(RequestType.GET_CPU_HOTPLUG_REQ, failure)
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().failures == 1)
                run.host.cpu_plug(3)
                await run.watch.until(lambda: run.stats().plugged == 1)
        [failed] = events_named(logs, "cpu_hotplug_request_failed")
        assert failed["status"] == "VERR_GENERAL_FAILURE"
        [plugged] = events_named(logs, "cpu_plugged")
        assert (plugged["cpu"], plugged["core"]) == ("cpu3", 3)
        assert (guest.online(2), guest.online(3)) == ("0", "1")

    async def test_malformed_request_replies_are_one_line(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """GET_CPU_HOTPLUG_REQ answered with a header naming another request type (a broken
        host), at ten plugs in a row (more failures than the supervisor's restart budget):
        counted each time, one line, the service stays; the next sound read is taken."""
        garbler = ReplyGarbler()
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running(None, garbler=garbler) as run:
                garbler.request_types.add(RequestType.GET_CPU_HOTPLUG_REQ)
                for core in range(1, 11):
                    run.host.cpu_plug(core)
                    await run.watch.until(lambda: run.stats().failures == core)  # noqa: B023
                garbler.request_types.clear()
                run.host.cpu_plug(11)
                await run.watch.until(lambda: run.stats().left_alone == 1)
                assert (run.stats().failures, garbler.garbled) == (10, 10)
        [failed] = events_named(logs, "cpu_hotplug_request_failed")
        assert "reply header (size, version, type)" in failed["malformed_reply"]
        [again] = events_named(logs, "cpu_hotplug_requests_read_again")
        assert again["failed_in_a_row"] == 10
        [left_alone] = events_named(logs, "cpu_change_left_alone")
        assert left_alone["core"] == 11


class TestUnknownEvents:
    async def test_a_run_of_them_is_counted_and_said_when_it_begins_and_ends(
        self, guest: Guest, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Twelve events of a type nobody knows (7) in a row, more than the ten VBoxService
        logs: each counted (the status says it), one warning when they begin, one line with
        their number when a known event (a plug, carried out) ends them."""
        get_request = HostCpuHotPlug.get_request
        garbling = [True]

        def of_unknown_type(self: HostCpuHotPlug, req: bytearray, phys: int) -> int:
            status = get_request(self, req, phys)
            if garbling[0] and L.CpuHotPlugRequest.event_type.get(req) == CpuEventType.PLUG:
                L.CpuHotPlugRequest.event_type.set(req, 7)
            return status

        monkeypatch.setattr(HostCpuHotPlug, "get_request", of_unknown_type)
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                for n in range(1, 13):
                    run.host.cpu_plug(2)
                    await run.watch.until(lambda: run.stats().failures == n)  # noqa: B023
                garbling[0] = False
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().plugged == 1)
                assert run.service.status() == "cpuhotplug: 1 plugged, 0 unplugged, 12 failed"
        assert (run.stats().events, run.stats().failures) == (13, 12)
        [unknown] = events_named(logs, "cpu_hotplug_event_unknown")
        assert unknown["log_level"] == "warning"
        assert (unknown["event_type"], unknown["core"], unknown["failures"]) == (7, 2, 1)
        [again] = events_named(logs, "cpu_hotplug_events_known_again")
        assert again["failed_in_a_row"] == 12
        assert guest.online(2) == "1"


class TestUnreadableSysfs:
    """A ``sysfs_root`` whose CPU directory cannot be listed."""

    @pytest.mark.parametrize(
        ("make", "errno_name", "reason"),
        [
            (None, "ENOENT", "No such file or directory"),
            ("file", "ENOTDIR", "Not a directory"),
        ],
    )
    async def test_is_said_at_start_and_named_by_each_failed_request(
        self, tmp_path: Path, make: str | None, errno_name: str, reason: str
    ) -> None:
        """A root that is missing, or a file: one warning at start naming the setting, the
        root, the errno and the directory; the status says it; a plug and an unplug each
        fail naming the directory, and the service goes on. A restore checks again without
        saying it twice."""
        root = tmp_path / "nonexistent"
        if make == "file":
            root.mkdir()
            (root / "devices").write_text("")
        unreadable = f"cannot read {root / 'devices/system/cpu'}: {reason}"
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(root) as run:
                assert run.service.status() == f"cpuhotplug: CPUs unreadable ({unreadable})"
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().failures == 1)
                run.host.cpu_unplug(1)
                await run.watch.until(lambda: run.stats().failures == 2)
                run.host.restore()
                await run.watch.until(lambda: run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == 2)
                assert run.stats().monitoring is True
        [warning] = events_named(logs, "cpu_sysfs_unreadable")
        assert warning["log_level"] == "warning"
        assert (warning["setting"], warning["sysfs_root"], warning["errno"]) == (
            "[cpuhotplug] sysfs_root",
            str(root),
            errno_name,
        )
        assert warning["reason"] == unreadable
        [plug] = events_named(logs, "cpu_plug_failed")
        [unplug] = events_named(logs, "cpu_unplug_failed")
        assert (plug["cpu"], plug["problem"]) == (None, unreadable)
        assert (unplug["cpu"], unplug["problem"]) == (None, unreadable)

    async def test_a_reload_checks_the_new_root(self, guest: Guest, tmp_path: Path) -> None:
        """A reload to a missing root warns at once and the status says it; a reload back
        to a readable tree clears the status, and a plug works there."""
        missing = tmp_path / "missing"
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                assert events_named(logs, "cpu_sysfs_unreadable") == []
                assert run.service.reconfigure(CpuHotPlugSection(sysfs_root=str(missing)))
                [warning] = events_named(logs, "cpu_sysfs_unreadable")
                assert warning["sysfs_root"] == str(missing)
                assert run.service.status().startswith("cpuhotplug: CPUs unreadable (cannot")
                assert run.service.reconfigure(CpuHotPlugSection(sysfs_root=str(guest.root)))
                assert run.service.status() == "cpuhotplug: 0 plugged, 0 unplugged"
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().plugged == 1)
        assert len(events_named(logs, "cpu_sysfs_unreadable")) == 1
        assert guest.online(2) == "1"


@contextmanager
def released(fifo: Path) -> Iterator[None]:
    """Bound a test that may block in ``open(fifo)``: if it is still running after
    ``RELEASE_S``, a thread puts a regular file "1" in the FIFO's place and opens the FIFO's
    other end (which ends an open in progress), so that a regression fails instead of
    hanging the run."""
    done = threading.Event()

    def release() -> None:
        if done.wait(RELEASE_S):
            return
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is in an open of it
            return
        try:
            fifo.unlink()
            fifo.write_text("1\n")
            os.write(fd, b"1\n")
        finally:
            os.close(fd)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class TestNotAnAttribute:
    """A FIFO (or another file that is no regular file) under ``sysfs_root``: an open of it
    would block the event loop until someone writes to it, SIGTERM included."""

    def test_remember_does_not_block_and_warns_once_naming_the_file(self, guest: Guest) -> None:
        """``cpu1/online`` a FIFO: remember() returns at once, and the FIFO is one warning
        naming it, however often it is read; the CPU counts as one without ``online``."""
        fifo = guest.root / "devices/system/cpu/cpu1/online"
        fifo.unlink()
        os.mkfifo(fifo)
        sysfs = CpuSysfs(guest.root)
        with released(fifo), structlog.testing.capture_logs() as logs:
            assert sysfs.remember() is None
            assert sysfs.remember() is None
        [warning] = events_named(logs, "cpu_sysfs_not_an_attribute")
        assert warning["log_level"] == "warning"
        assert (warning["setting"], warning["path"], warning["problem"]) == (
            "[cpuhotplug] sysfs_root",
            str(fifo),
            "a FIFO, not a sysfs attribute",
        )
        assert stat.S_ISFIFO(fifo.stat().st_mode)  # never held: released() left it as it is

    async def test_a_reload_onto_such_a_tree_keeps_the_service_going(
        self, guest: Guest, tmp_path: Path
    ) -> None:
        """A reload to a tree whose cpu2's ``online`` is a FIFO returns at once with one
        warning naming it, and the service goes on: a plug reaches cpu3."""
        other = Guest(tmp_path / "other")
        other.cpu(2, online=None)
        other.cpu(3, online=False)
        fifo = other.root / "devices/system/cpu/cpu2/online"
        os.mkfifo(fifo)
        with released(fifo), trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                assert run.service.reconfigure(CpuHotPlugSection(sysfs_root=str(other.root)))
                [warning] = events_named(logs, "cpu_sysfs_not_an_attribute")
                assert warning["path"] == str(fifo)
                run.host.cpu_plug(3)
                await run.watch.until(lambda: run.stats().plugged == 1)
        assert other.online(3) == "1"
        assert len(events_named(logs, "cpu_sysfs_not_an_attribute")) == 1


class TestMonitoring:
    async def test_idle_service_sends_nothing(
        self, autojump_clock: trio.abc.Clock, guest: Guest
    ) -> None:
        """Enable, one read of the host's slot (INVALID in a new VM), then nothing for an hour."""
        with trio.fail_after(7200):
            async with running(guest.root) as run:
                await trio.sleep(3600)
                assert run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == 1
                assert run.requests(RequestType.GET_CPU_HOTPLUG_REQ) == 1
                assert run.service.status() == "cpuhotplug: 0 plugged, 0 unplugged"

    async def test_restore_enables_monitoring_again(
        self, autojump_clock: trio.abc.Clock, guest: Guest
    ) -> None:
        """The host forgets monitoring at a restore; the service enables it again at once."""
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running(guest.root) as run:
                run.host.restore()
                assert run.host.vmmdev.cpu_hotplug.monitored is False
                await run.watch.until(lambda: run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == 2)
                assert run.host.status()["cpu_hotplug"]["monitored"] is True  # type: ignore[index]
        monitoring = events_named(logs, "cpu_hotplug_monitoring")
        assert [entry["restored"] for entry in monitoring] == [False, True]

    async def test_stop_disables_monitoring(
        self, autojump_clock: trio.abc.Clock, guest: Guest
    ) -> None:
        """After the drain the host refuses Main's unplug again, as without an agent."""
        with trio.fail_after(60):
            async with running(guest.root) as run:
                pass
            assert run.host.vmmdev.cpu_hotplug.monitored is False
            assert run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == 2
            with pytest.raises(VBoxStatusError) as refused:
                run.host.cpu_unplug(2)
            assert refused.value.rc == RESOURCE_BUSY
            assert run.stats().monitoring is False

    async def test_a_stop_during_the_enable_disables_monitoring(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A stop while the Enable is still in the host (answered after 1 s) sends Disable
        at the drain all the same: the host acts on the Enable whoever waits for its answer,
        and VBoxService's VbglR3CpuHotPlugTerm always disables."""
        host = SimulatedHost(personality="mainline", seed=7)
        host.set_delay(RequestType.SET_CPU_HOTPLUG_STATUS, 1.0)
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                async with open_device(SimOpener(host)) as device:
                    pump = EventPump(device)
                    await nursery.start(pump.run)
                    service = CpuHotPlugService(ServiceContext(device, pump), None)
                    with trio.move_on_after(0.5):  # the daemon's stop, during the start
                        await service.run()
                    await service.drain()
                    await trio.sleep(2.0)
                    assert host.vmmdev.cpu_hotplug.monitored is False
                    assert host.vmmdev.request_counts[RequestType.SET_CPU_HOTPLUG_STATUS] == 2
                    assert service.statistics().monitoring is False
                nursery.cancel_scope.cancel()
        assert len(events_named(logs, "cpu_hotplug_monitoring_stopped")) == 1

    async def test_a_refused_enable_is_not_disabled(
        self, autojump_clock: trio.abc.Clock, guest: Guest
    ) -> None:
        """An Enable the host refused switched nothing on: the drain sends no Disable."""
        not_implemented = STATUS_CODES["VERR_NOT_IMPLEMENTED"]
        with trio.fail_after(60):
            async with running(guest.root, fault=not_implemented) as run:
                pass
            assert run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == 1

    @pytest.mark.parametrize(
        "case",
        [
            ("mainline", False, STATUS_CODES["VERR_NOT_IMPLEMENTED"], "VERR_NOT_IMPLEMENTED"),
            ("mainline", True, 0, "VERR_PERMISSION_DENIED"),
            ("oracle", True, 0, "VERR_PERMISSION_DENIED"),
            ("passthrough", True, 0, "VERR_PERMISSION_DENIED"),
        ],
    )
    async def test_refused_monitoring_is_said_once_and_waits_for_a_restore(
        self, autojump_clock: trio.abc.Clock, guest: Guest, case: tuple[str, bool, int, str]
    ) -> None:
        """A host without the request, or a driver that keeps it from /dev/vboxuser: the
        status says so, one warning, no request for an hour; a restore tries again."""
        personality, user_device, fault, status = case
        with trio.fail_after(7200), structlog.testing.capture_logs() as logs:
            async with running(
                guest.root, personality=personality, user_device=user_device, fault=fault
            ) as run:
                assert run.service.status() == f"cpuhotplug: not available ({status})"
                await trio.sleep(3600)
                assert run.requests(RequestType.GET_CPU_HOTPLUG_REQ) == 0
                assert run.host.vmmdev.cpu_hotplug.monitored is False
                run.host.restore()
                await trio.testing.wait_all_tasks_blocked()
                if user_device:  # the driver still refuses: not said again
                    assert run.service.status() == f"cpuhotplug: not available ({status})"
                else:  # the fault was one answer: the restored host takes the request
                    assert run.service.status() == "cpuhotplug: 0 plugged, 0 unplugged"
        [unavailable] = events_named(logs, "cpu_hotplug_unavailable")
        assert unavailable["status"] == status
        assert unavailable["log_level"] == "warning"

    async def test_a_malformed_enable_reply_is_said_once_and_waits_for_a_restore(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """An Enable answered with a header naming another request type (a broken host):
        one warning, the status says so, the service stays and reads nothing; a restore
        tries again (still malformed: not said again), and once the reply is sound the
        service follows the host."""
        garbler = ReplyGarbler()
        garbler.request_types.add(RequestType.SET_CPU_HOTPLUG_STATUS)
        with trio.fail_after(7200), structlog.testing.capture_logs() as logs:
            async with running(None, garbler=garbler) as run:
                assert run.service.status() == "cpuhotplug: not available (malformed reply)"
                run.host.restore()
                await run.watch.until(lambda: run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == 2)
                await trio.sleep(3600)
                assert run.requests(RequestType.GET_CPU_HOTPLUG_REQ) == 0
                garbler.request_types.clear()
                run.host.restore()
                await run.watch.until(lambda: run.stats().monitoring)
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().left_alone == 1)
        [unavailable] = events_named(logs, "cpu_hotplug_unavailable")
        assert "reply header (size, version, type)" in unavailable["malformed_reply"]

    async def test_any_other_refusal_is_said_once_and_retried_on_a_back_off(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A host answering the Enable with VERR_GENERAL_FAILURE (the service re-raised it:
        six restarts within a minute ended the agent, exit 70): one warning, the status says
        so, the service stays up; it asks again 1, 2, 4 and 8 s later, and once the host
        takes the Enable it follows the host, with one line saying so."""
        general_failure = STATUS_CODES["VERR_GENERAL_FAILURE"]
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with running(None, fault=general_failure, fault_count=4) as run:
                assert run.service.status() == "cpuhotplug: not available (VERR_GENERAL_FAILURE)"
                began = trio.current_time()
                asked_at = []
                for count in range(2, 6):

                    def asked(count: int = count) -> bool:
                        return run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == count

                    await run.watch.until(asked)
                    asked_at.append(trio.current_time() - began)
                assert asked_at == pytest.approx([1.0, 3.0, 7.0, 15.0])
                assert run.stats().monitoring
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().left_alone == 1)
                assert run.stats().failures == 0
        [unavailable] = events_named(logs, "cpu_hotplug_unavailable")
        assert (unavailable["status"], unavailable["failures"]) == ("VERR_GENERAL_FAILURE", 1)
        [again] = events_named(logs, "cpu_hotplug_available_again")
        assert again["failed_in_a_row"] == 4

    async def test_a_refusal_is_tried_again_at_a_restore_and_the_back_off_is_capped(
        self, autojump_clock: trio.abc.Clock, guest: Guest
    ) -> None:
        """A host that keeps refusing: a restore asks again at once; the waits double up to
        a minute, so an hour costs about 65 requests and one log line; the drain sends no
        Disable, since no Enable switched anything on."""
        general_failure = STATUS_CODES["VERR_GENERAL_FAILURE"]
        with trio.fail_after(7200), structlog.testing.capture_logs() as logs:
            async with running(guest.root, fault=general_failure, fault_count=1000) as run:
                run.host.restore()
                await run.watch.until(lambda: run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == 2)
                await trio.sleep(3600)
                asked = run.requests(RequestType.SET_CPU_HOTPLUG_STATUS)
                assert 60 <= asked <= 70
                assert run.service.status() == "cpuhotplug: not available (VERR_GENERAL_FAILURE)"
                assert run.requests(RequestType.GET_CPU_HOTPLUG_REQ) == 0
            assert run.requests(RequestType.SET_CPU_HOTPLUG_STATUS) == asked
        assert len(events_named(logs, "cpu_hotplug_unavailable")) == 1


class TestUnendingHost:
    """A host whose slot holds a new event each time the guest reads one (it plugs again)."""

    @pytest.mark.parametrize("events", [MAX_REQUESTS_PER_WAKEUP, MAX_REQUESTS_PER_WAKEUP + 1])
    async def test_unending_only_when_one_more_read_has_an_event(
        self, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch, events: int
    ) -> None:
        """MAX_REQUESTS_PER_WAKEUP events then NONE: all taken, nothing reported. One event
        more: it is taken too, and the host is reported as unending (one line)."""
        get_request = HostCpuHotPlug.get_request
        refills = [0]

        def plugging_again(self: HostCpuHotPlug, req: bytearray, phys: int) -> int:
            status = get_request(self, req, phys)
            if refills[0] > 0:
                refills[0] -= 1
                self.notify(CpuEventType.PLUG, 2, 0)
            return status

        monkeypatch.setattr(HostCpuHotPlug, "get_request", plugging_again)
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running(None) as run:
                refills[0] = events - 1
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().left_alone == events)
                await trio.testing.wait_all_tasks_blocked()
        unending = events_named(logs, "cpu_hotplug_events_unending")
        if events > MAX_REQUESTS_PER_WAKEUP:
            assert [entry["taken"] for entry in unending] == [events]
        else:
            assert unending == []
        assert (run.stats().events, run.stats().failures) == (events, len(unending))


NAMESPACE_CHECK = """
import json, os, sys
from pathlib import Path
root, others = Path(sys.argv[1]), sys.argv[2:]
cpus = root / "devices/system/cpu"
writable = {
    name: [os.access(cpus / name / f, os.W_OK) for f in ("online", "firmware_node/eject")]
    for name in sorted(os.listdir(cpus))
}
print(json.dumps({"cpus": writable, "others": [os.access(root / o, os.W_OK) for o in others]}))
"""
"""Run in the namespace: which of each CPU's online and eject files, and of ``others``, are
writable."""


def unit_writable_paths() -> list[str]:
    """The unit's ``ReadWritePaths=`` entries, in order (``-`` kept)."""
    return [
        entry
        for line in UNIT.read_text().splitlines()
        if line.startswith("ReadWritePaths=")
        for entry in line.removeprefix("ReadWritePaths=").split()
    ]


def namespace_unavailable() -> str | None:
    """Why this process cannot make a private mount namespace (None if it can)."""
    if os.geteuid() != 0:
        return "needs root for the mount namespace"
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("mount") is None or shutil.which("sh") is None:
        return "needs unshare and mount (util-linux) and sh"
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, check=False)
    if probe.returncode:
        return f"unshare -m refused: {probe.stderr.decode(errors='replace').strip()}"
    return None


class TestUnitWritablePaths:
    """The unit's ``ProtectKernelTunables=yes`` makes /sys read-only and its
    ``ReadWritePaths=`` re-opens parts of it: modelled in a private mount namespace over a
    scratch tree laid out as /sys (never the real one), as systemd mounts them."""

    def test_every_cpus_online_and_eject_are_writable(self, tmp_path: Path) -> None:
        """With the 32 CPUs of VirtualBox's firmware, each CPU's online and ACPI eject files
        are writable and another ACPI device on the bus is not; a missing optional path is
        skipped, a missing required one would fail (as the unit's start would). Without a
        mount namespace (root, as CI runs) the test fails saying why: a skip would hide a
        unit that no longer starts."""
        reason = namespace_unavailable()
        if reason is not None:
            pytest.fail(f"cannot model the unit's mounts: {reason}")
        guest = Guest(tmp_path / "sys")
        guest.cpu(0, online=None)
        for n in range(1, FIRMWARE_CPUS):
            guest.cpu(n, online=True)
        other = ACPI_BUS / "PNP0A03:00" / "power_state"
        (guest.root / other).parent.mkdir(parents=True)
        (guest.root / other).write_text("D0\n")
        root = str(guest.root)
        steps = [f"mount --bind {root} {root}", f"mount -o remount,bind,ro {root}"]
        for entry in unit_writable_paths():
            path = root + entry.removeprefix("-").removeprefix("/sys")
            bind = f"mount --bind '{path}' '{path}' && mount -o remount,bind,rw '{path}'"
            if entry.startswith("-"):
                steps.append(f"if [ -e '{path}' ]; then {bind}; fi")
            else:
                steps.append(f"[ -e '{path}' ] || exit 3; {bind}")
        steps.append(f"exec '{sys.executable}' -c \"$0\" '{root}' '{other}'")
        unshare, sh = shutil.which("unshare"), shutil.which("sh")
        assert unshare is not None
        assert sh is not None
        script = "\n".join(steps)
        done = subprocess.run(
            [unshare, "-m", "--propagation", "private", sh, "-ec", script, NAMESPACE_CHECK],
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        found = json.loads(done.stdout)
        expected = {f"cpu{n}": [n != 0, True] for n in range(FIRMWARE_CPUS)}
        assert found == {"cpus": expected, "others": [False]}


class MachineOpener:
    """A simulated host presented as this machine's own driver (``simulated`` is False)."""

    def __init__(self, host: SimulatedHost) -> None:
        self._inner = SimOpener(host)
        self.description = "this machine's driver (a simulated host underneath)"
        self.simulated = False

    async def open_session(self) -> SimTransport:
        return await self._inner.open_session()


class TestSimulatedHostDefault:
    """With ``sysfs_root = "auto"``, a simulated host's requests never change this machine's
    CPUs."""

    async def test_requests_are_logged_and_the_cpus_left_alone(self) -> None:
        """Plug and unplug are taken from the host (it sees them done) and logged, and no
        CPU is touched: the guard of tests/conftest.py fails any write under /sys."""
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(None) as run:
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().left_alone == 1)
                run.host.cpu_unplug(1)
                await run.watch.until(lambda: run.stats().left_alone == 2)
                status = run.service.status()
        assert status == "cpuhotplug: simulated host, 2 requests, CPUs left alone"
        assert (run.stats().plugged, run.stats().unplugged, run.stats().failures) == (0, 0, 0)
        requests = [e["request"] for e in events_named(logs, "cpu_change_left_alone")]
        assert requests == ["plug", "unplug"]
        [monitoring] = events_named(logs, "cpu_hotplug_monitoring")
        assert monitoring["cpus"] == "left alone (simulated host)"

    async def test_a_failing_host_request_is_in_the_status(self, personality: str) -> None:
        """GET_CPU_HOTPLUG_REQ failing: one warning, and the status counts the failure beside
        the requests left alone, as it does on a tree of CPUs; the next plug is taken."""
        failure = STATUS_CODES["VERR_GENERAL_FAILURE"]
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with running(None, personality=personality) as run:
                run.host.add_fault(RequestType.GET_CPU_HOTPLUG_REQ, failure)
                run.host.cpu_plug(2)
                await run.watch.until(lambda: run.stats().failures == 1)
                failed_once = run.service.status()
                run.host.cpu_plug(3)
                await run.watch.until(lambda: run.stats().left_alone == 1)
                taken = run.service.status()
        assert failed_once == "cpuhotplug: simulated host, 0 requests, CPUs left alone, 1 failed"
        assert taken == "cpuhotplug: simulated host, 1 requests, CPUs left alone, 1 failed"
        [failed] = events_named(logs, "cpu_hotplug_request_failed")
        assert (failed["log_level"], failed["status"]) == ("warning", "VERR_GENERAL_FAILURE")

    async def test_a_real_device_gets_the_machines_cpus(self) -> None:
        """The same section on this machine's driver names /sys; a root set on purpose wins
        on a simulated host too."""
        host = SimulatedHost(seed=7)
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(MachineOpener(host)) as device:
                sysfs = cpu_sysfs(CpuHotPlugSection(), device)
                assert sysfs is not None
                assert sysfs.cpus == Path("/sys/devices/system/cpu")
            async with open_device(SimOpener(host)) as device:
                assert cpu_sysfs(CpuHotPlugSection(), device) is None
                chosen = cpu_sysfs(CpuHotPlugSection(sysfs_root="/sys"), device)
                assert chosen is not None
                assert chosen.cpus == Path("/sys/devices/system/cpu")
            nursery.cancel_scope.cancel()
