"""PSI readings, MemAvailable and the ``[balloon]`` section."""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from typing import TYPE_CHECKING, Final

import pydantic
import pytest
import trio
from structlog.testing import capture_logs

from agent.services.balloon import BalloonSection, PsiMonitor
from agent.services.balloon._pressure import U64_MAX, MemInfo, PressureFileError
from tests.services.balloon_support import running_balloon
from tests.services.thrash_support import scratch_parent, thrashing

if TYPE_CHECKING:
    from pathlib import Path

REAL_PSI: Final = "/proc/pressure/memory"
PSI_TEXT: Final = (
    "some avg10=1.50 avg60=0.20 avg300=0.00 total={total}\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)


TRIGGER_STALL_US: Final = 200_000
TRIGGER_WINDOW_US: Final = 2_000_000
"""The trigger for a 10 % threshold over a 2 s interval: 200 ms of stall within 2 s."""
THRASH_WAIT_S: Final = 10


def _write_psi(path: Path, total_us: int) -> None:
    path.write_text(PSI_TEXT.format(total=total_us))


def _kernel_takes_a_trigger(path: str) -> bool:
    """Whether the kernel lets this process set a trigger on ``path``, probed with the format
    of the kernel's PSI documentation ("some STALL_US WINDOW_US") on a descriptor of its own."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, f"some {TRIGGER_STALL_US} {TRIGGER_WINDOW_US}".encode() + b"\0")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


class TestPsiMonitor:
    """Polling and trigger set-up."""

    async def test_polls_a_file_without_trigger_support(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """A regular file refuses the trigger; the stall share comes from ``total``."""
        psi = tmp_path / "memory.pressure"
        _write_psi(psi, 1_000)
        with (
            capture_logs() as logs,
            trio.fail_after(60),
            PsiMonitor(str(psi), interval_s=1.0, threshold_pct=10) as mon,
        ):
            assert [e["event"] for e in logs] == ["psi_trigger_unavailable"]
            _write_psi(psi, 1_000 + 500_000)  # 0.5 s of stall within the 1 s interval
            high = await mon.next_reading()
            assert high == type(high)(50.0, high=True, via="poll")
            low = await mon.next_reading()  # no more stall
            assert (low.stall_pct, low.high) == (0.0, False)
        assert psi.read_text() == PSI_TEXT.format(total=501_000)  # nothing written to it

    def test_file_without_psi_figures_is_refused(self, tmp_path: Path) -> None:
        bogus = tmp_path / "bogus"
        bogus.write_text("hello\n")
        with (
            pytest.raises(PressureFileError, match="not a PSI file"),
            PsiMonitor(str(bogus), interval_s=1.0, threshold_pct=10),
        ):
            pass

    def test_fifo_is_refused_without_blocking(self, tmp_path: Path) -> None:
        """A FIFO's open would wait for a writer (freezing the event loop): it is opened
        without blocking and refused as no regular file."""
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        refused: list[PressureFileError] = []

        def enter() -> None:
            try:
                with PsiMonitor(str(fifo), interval_s=1.0, threshold_pct=10):
                    pass
            except PressureFileError as exc:
                refused.append(exc)

        thread = threading.Thread(target=enter, daemon=True)
        thread.start()
        thread.join(timeout=10)
        blocked = thread.is_alive()
        if blocked:  # let the open return, so the thread ends
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            thread.join()
        assert not blocked
        assert [str(exc) for exc in refused] == [f"{fifo} is not a regular file (a PSI file is)"]

    async def test_leaving_closes_the_file(self, tmp_path: Path) -> None:
        """Each monitor closes what it opened when its block ends (a reload of the PSI
        settings starts a new one)."""
        psi = tmp_path / "memory.pressure"
        _write_psi(psi, 1_000)
        before = set(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with PsiMonitor(str(psi), interval_s=1.0, threshold_pct=10):
                assert set(os.listdir("/proc/self/fd")) > before
        assert set(os.listdir("/proc/self/fd")) <= before

    def test_refused_file_leaves_no_descriptor_open(self, tmp_path: Path) -> None:
        bogus = tmp_path / "bogus"
        bogus.write_text("hello\n")
        before = set(os.listdir("/proc/self/fd"))
        for _ in range(3):
            with (
                pytest.raises(PressureFileError, match="not a PSI file"),
                PsiMonitor(str(bogus), interval_s=1.0, threshold_pct=10),
            ):
                pass
        assert set(os.listdir("/proc/self/fd")) <= before

    def test_missing_file_is_refused(self, tmp_path: Path) -> None:
        """The error keeps the errno; its text, logged as the reason, is the message alone."""
        missing = tmp_path / "none"
        with (
            pytest.raises(PressureFileError) as info,
            PsiMonitor(str(missing), interval_s=1.0, threshold_pct=10),
        ):
            pass
        assert info.value.errno == errno.ENOENT
        assert str(info.value) == f"cannot open {missing}: No such file or directory"

    async def test_reads_the_real_pressure_file(self, autojump_clock: trio.abc.Clock) -> None:
        """This kernel's own PSI file: the trigger is set (the kernel then refuses a second
        one on the monitor's descriptor) exactly where the kernel takes one (probed here with
        the documented format), else the file is polled. A kernel without
        PSI fails the test saying so: a skip would hide a monitor that no longer reads it."""
        if not await trio.Path(REAL_PSI).exists():
            pytest.fail(f"{REAL_PSI} does not exist: this kernel has no PSI (CONFIG_PSI)")
        takes_a_trigger = _kernel_takes_a_trigger(REAL_PSI)
        before = set(os.listdir("/proc/self/fd"))
        # 2 s: without CAP_SYS_RESOURCE the kernel takes only whole multiples of 2 s windows.
        with (
            capture_logs() as logs,
            trio.fail_after(60),
            PsiMonitor(REAL_PSI, interval_s=2.0, threshold_pct=10) as mon,
        ):
            if takes_a_trigger:
                # The kernel keeps one trigger per descriptor: a second one is EBUSY.
                [psi_fd] = [
                    int(fd)
                    for fd in set(os.listdir("/proc/self/fd")) - before
                    if os.readlink(f"/proc/self/fd/{fd}") == REAL_PSI
                ]
                with pytest.raises(OSError, match="Device or resource busy") as busy:
                    os.write(psi_fd, f"some {TRIGGER_STALL_US} {TRIGGER_WINDOW_US}".encode())
                assert busy.value.errno == errno.EBUSY
            else:
                reading = await mon.next_reading()
                assert 0.0 <= reading.stall_pct <= 100.0
                assert reading.via == "poll"
        set_up = [entry for entry in logs if entry["event"].startswith("psi_trigger")]
        if takes_a_trigger:
            assert [(e["event"], e["stall_us"], e["window_us"]) for e in set_up] == [
                ("psi_trigger_set", TRIGGER_STALL_US, TRIGGER_WINDOW_US)
            ]
        else:
            assert [e["event"] for e in set_up] == ["psi_trigger_unavailable"]

    async def test_real_pressure_fires_the_trigger(self, tmp_path: Path) -> None:
        """Memory stall on this kernel wakes a monitor sleeping on its trigger: a process
        thrashing file pages in a scratch memory cgroup stalls for far more than the trigger's
        1 % of 2 s within a second or two. The monitor registers its descriptor for POLLPRI
        after writing the trigger: registered before, the kernel's poll found no trigger to wait
        on, and the monitor slept through any pressure."""
        parent = scratch_parent()
        if isinstance(parent, str):
            pytest.skip(parent)
        if not _kernel_takes_a_trigger(REAL_PSI):
            pytest.skip(f"this kernel takes no trigger on {REAL_PSI}")
        with (
            capture_logs() as logs,
            PsiMonitor(REAL_PSI, interval_s=2.0, threshold_pct=1.0) as mon,
        ):
            assert [e["event"] for e in logs] == ["psi_trigger_set"]
            with thrashing(tmp_path, *parent) as thrasher:
                with trio.move_on_after(THRASH_WAIT_S) as waited:
                    reading = await mon.next_reading()
                thrasher_ended = thrasher.poll()
        assert not waited.cancelled_caught, (
            f"no trigger within {THRASH_WAIT_S} s of thrashing (thrasher's exit status:"
            f" {thrasher_ended}); {REAL_PSI}: {await trio.Path(REAL_PSI).read_text()}"
        )
        assert (reading.high, reading.via) == (True, "trigger")

    async def test_trigger_wakes_the_monitor(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """The wait lasts until POLLPRI on the trigger fd (however long); the reading is the
        file's avg10."""
        psi = tmp_path / "memory.pressure"
        _write_psi(psi, 0)
        stand_in, kernel_side = socket.socketpair()  # OOB data raises POLLPRI, as a trigger
        with stand_in, kernel_side, PsiMonitor(str(psi), interval_s=2.0, threshold_pct=10) as mon:
            epoll = select.epoll()
            epoll.register(stand_in.fileno(), select.EPOLLPRI)
            mon._epoll = epoll
            with trio.move_on_after(60) as quiet:
                await mon.next_reading()
            assert quiet.cancelled_caught
            kernel_side.send(b"!", socket.MSG_OOB)
            with trio.fail_after(10):
                reading = await mon.next_reading()
            assert reading == type(reading)(1.5, high=True, via="trigger")


class TestFiguresTheKernelDoesNotWrite:
    """A ``some`` line whose figures the kernel would not write (``avg10`` as ``%lu.%02lu`` up
    to 100.00, ``total`` a u64) is a :class:`PressureFileError`, at open and mid-run, so the
    balloon switches pressure off with one line instead of failing."""

    @pytest.mark.parametrize(
        ("figures", "wrong"),
        [
            ("avg10=. avg60=0.00 avg300=0.00 total=5", "avg10=."),
            ("avg10=1.2.3 avg60=0.00 avg300=0.00 total=5", "avg10=1.2.3"),
            ("avg10=1.5 avg60=0.00 avg300=0.00 total=5", "avg10=1.5"),
            ("avg10=100.01 avg60=0.00 avg300=0.00 total=5", "avg10=100.01"),
            (f"avg10=0.00 avg60=0.00 avg300=0.00 total={U64_MAX + 1}", f"total={U64_MAX + 1}"),
            (f"avg10=0.00 avg60=0.00 avg300=0.00 total={'9' * 400}", f"total={'9' * 24}..."),
        ],
    )
    async def test_refused_at_open(self, tmp_path: Path, figures: str, wrong: str) -> None:
        psi = tmp_path / "memory.pressure"
        psi.write_text(f"some {figures}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
        with (
            pytest.raises(PressureFileError) as info,
            PsiMonitor(str(psi), interval_s=1.0, threshold_pct=10),
        ):
            pass
        assert info.value.errno == errno.EINVAL
        assert str(info.value).startswith(f"{psi} has {wrong}, not a ")

    async def test_a_total_past_a_u64_mid_run(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """The largest figures the kernel writes are read; one past them is an error (a total
        of hundreds of digits made the stall share overflow a float)."""
        psi = tmp_path / "memory.pressure"
        psi.write_text("some avg10=100.00 avg60=0.00 avg300=0.00 total=0\n")
        with trio.fail_after(60), PsiMonitor(str(psi), interval_s=1.0, threshold_pct=10) as mon:
            psi.write_text(f"some avg10=100.00 avg60=0.00 avg300=0.00 total={U64_MAX}\n")
            reading = await mon.next_reading()
            assert reading == type(reading)(100.0, high=True, via="poll")
            psi.write_text(f"some avg10=100.00 avg60=0.00 avg300=0.00 total={10**400}\n")
            with pytest.raises(PressureFileError, match="not a count of microseconds"):
                await mon.next_reading()

    @pytest.mark.parametrize("kind", ["oracle", "passthrough"])
    @pytest.mark.parametrize("when", ["start", "mid-run"])
    @pytest.mark.parametrize(
        "bad",
        [
            ("some avg10=. avg60=0.00 avg300=0.00 total=5", "avg10=."),
            ("some avg10=1.2.3 avg60=0.00 avg300=0.00 total=5", "avg10=1.2.3"),
            (f"some avg10=0.00 avg60=0.00 avg300=0.00 total={'1' * 400}", f"total={'1' * 24}..."),
        ],
    )
    async def test_the_balloon_works_on_without_pressure(
        self,
        autojump_clock: trio.abc.Clock,
        tmp_path: Path,
        kind: str,
        when: str,
        bad: tuple[str, str],
    ) -> None:
        """Such a file at the balloon's start, or later, is one ``balloon_pressure_off``
        warning naming what is wrong; the balloon keeps its chunks and follows the host (it
        failed at every start, and after six failures the daemon exited)."""
        some, wrong = bad
        psi = tmp_path / "memory.pressure"
        psi.write_text(some if when == "start" else PSI_TEXT.format(total=0))
        section = BalloonSection(psi_path=str(psi), psi_interval_s=1.0)
        with trio.fail_after(600), capture_logs() as logs:
            async with running_balloon(personality=kind, section=section, psi_file=True) as run:
                run.host.set_balloon_target(16)
                await run.settle(16)
                psi.write_text(some)
                await run.until(lambda: any(e["event"] == "balloon_pressure_off" for e in logs))
                assert run.host_chunks == 16
                run.host.set_balloon_target(32)
                await run.settle(32)
                assert "failed" not in run.service.status()
        [off] = [entry for entry in logs if entry["event"] == "balloon_pressure_off"]
        assert off["log_level"] == "warning"
        assert off["reason"].startswith(f"{psi} has {wrong}, not a ")


class TestMemAvailable:
    def test_reads_mem_available(self, tmp_path: Path) -> None:
        meminfo = tmp_path / "meminfo"
        meminfo.write_text("MemTotal:  2048000 kB\nMemAvailable:    1048576 kB\n")
        assert MemInfo(str(meminfo)).available_mb() == 1024

    def test_every_look_reads_afresh(self, tmp_path: Path) -> None:
        """The descriptor stays open, yet a changed file is read anew."""
        meminfo = tmp_path / "meminfo"
        meminfo.write_text("MemAvailable:    1048576 kB\n")
        reader = MemInfo(str(meminfo))
        assert reader.available_mb() == 1024
        meminfo.write_text("MemAvailable:     524288 kB\n")
        assert reader.available_mb() == 512

    def test_unreadable_file_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(PressureFileError, match="cannot read"):
            MemInfo(str(tmp_path / "missing")).available_mb()

    def test_missing_line_is_an_error(self, tmp_path: Path) -> None:
        meminfo = tmp_path / "meminfo"
        meminfo.write_text("MemTotal:  2048000 kB\n")
        with pytest.raises(PressureFileError, match="MemAvailable"):
            MemInfo(str(meminfo)).available_mb()

    def test_reads_this_machine(self) -> None:
        assert MemInfo().available_mb() > 0


class TestSection:
    def test_defaults(self) -> None:
        section = BalloonSection()
        assert section.psi_path == REAL_PSI
        assert section.enable

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("psi_path", "relative/path", "absolute path"),
            ("psi_path", "/proc/pressure/memory\0", "NUL"),
            ("psi_interval_s", 0.1, "greater than or equal to 0.5"),
            ("psi_interval_s", 11.0, "less than or equal to 10"),
            ("pressure_threshold_pct", 0, "greater than 0"),
            ("pressure_step_mb", 0, "greater than or equal to 1"),
            ("min_available_mb", -1, "greater than or equal to 0"),
            ("retry_max_s", 0.5, "retry_initial_s"),
            ("pressure_cooldown_s", float("nan"), "finite"),
        ],
    )
    def test_bad_values(self, field: str, value: object, message: str) -> None:
        with pytest.raises(pydantic.ValidationError, match=message):
            BalloonSection.model_validate({field: value})
