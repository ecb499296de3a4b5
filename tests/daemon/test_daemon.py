"""Tests of the daemon root: readiness, facility status, signals, reload and restores.

Rules of this test module:
- The host is a real in-process ``SimulatedHost``; sd_notify goes to a real datagram
  socket under a short /tmp directory or to a ``WatchdogRecorder``. Tests of a schedule run
  on the autojump clock (a datagram is read at the virtual instant it was sent), the others
  on the real clock; each is bounded by ``trio.fail_after``.
- Signals are real (``signal.raise_signal``); the tests check the old handlers return.
"""

from __future__ import annotations

import errno
import shutil
import signal
import tempfile
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn
from unittest import mock

import pytest
import structlog.testing
import trio
import trio.testing

from agent.config import LISTED_PROBLEMS, AgentConfig, load_config
from agent.daemon import Daemon, daemon as daemon_module
from agent.daemon.daemon import DEVICE_LOST_PREFIX, STATUS_SEPARATOR
from agent.daemon.notify import SEND_RETRY_S, SEND_TIMEOUT_S, STATE_SEND_TIMEOUT_S, Notifier
from agent.device import DeviceLostError, DeviceUnavailableError
from agent.host import SimOpener, SimulatedHost
from agent.host.guest_props import GuestFunction
from agent.protocol import (
    Facility,
    FacilityStatus,
    LocalProtocolError,
    ReportGuestStatus,
    RequestType,
)
from agent.protocol.constants import GIVE_BACK_S
from agent.protocol.session import Session
from agent.protocol.status import VERR_GENERAL_FAILURE
from agent.services import EventPump, SessionMonitorStatistics
from agent.services.timesync import TimesyncSection
from tests.daemon.test_notify import fill_queue
from tests.sim_support import HookedOpener, OverflowAsking, ReplyGarbler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator, Mapping

    from pydantic import BaseModel

LIMIT_S = 10.0
SERVICE = str(int(Facility.VBOX_SERVICE))
FIVE_SECONDS: Final = "[daemon]\nshutdown_timeout_s = 5\n"
"""A config file that sets a value other than the default."""
BUSY_S: Final = 3 * SEND_TIMEOUT_S
"""How long systemd reads nothing from a full notify queue: longer than a STATUS= waits."""


@pytest.fixture(name="short_dir")
def _short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vbx-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


class NotifyReader:
    """The systemd side of sd_notify: collects every datagram."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock

    async def next(self) -> set[str]:
        """The lines of the next message, which must come within ``LIMIT_S``."""
        with trio.fail_after(LIMIT_S):
            data = await self._sock.recv(4096)
        return set(data.decode().split("\n"))

    async def until(self, line: str) -> set[str]:
        """The first message holding ``line``, which must come within ``LIMIT_S``."""
        with trio.fail_after(LIMIT_S):
            while True:
                message = await self.next()
                if line in message:
                    return message

    async def until_status(self, fragment: str) -> str:
        """The first ``STATUS=`` line holding ``fragment`` (one service's part), within
        ``LIMIT_S``."""
        with trio.fail_after(LIMIT_S):
            while True:
                for line in await self.next():
                    if line.startswith("STATUS=") and fragment in line:
                        return line


REFUSED: Final = "VMMDEVREQ_GET_SESSION_ID failed: VERR_GENERAL_FAILURE (-1)"


class WatchdogRecorder(Notifier):
    """sd_notify that sends nothing and records when each ``WATCHDOG=1`` would go."""

    def __init__(self, *, watchdog_usec: int) -> None:
        super().__init__(None, watchdog_usec=watchdog_usec)
        self.pings: list[float] = []

    async def watchdog(self) -> None:
        self.pings.append(trio.current_time())  # sent at once, then a checkpoint, as Notifier
        await trio.lowlevel.checkpoint()


class StatusRecorder(Notifier):
    """sd_notify that sends nothing and records each status line, READY=1's included."""

    def __init__(self) -> None:
        super().__init__(None)
        self.statuses: list[str] = []

    async def ready(self, status: str | None = None) -> None:
        self.statuses.extend([] if status is None else [status])
        await trio.lowlevel.checkpoint()

    async def status(self, text: str) -> None:
        self.statuses.append(text)
        await trio.lowlevel.checkpoint()


@pytest.fixture(name="notify")
async def _notify(short_dir: Path) -> AsyncIterator[tuple[Notifier, NotifyReader]]:
    path = short_dir / "notify.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await sock.bind(str(path))
    notifier = Notifier(str(path))
    yield notifier, NotifyReader(sock)
    await notifier.aclose()
    sock.close()


@asynccontextmanager
async def _ready_on_file(
    host: SimulatedHost,
    notify: tuple[Notifier, NotifyReader],
    path: Path,
    text: str,
    *,
    device_from_file: bool = True,
) -> AsyncIterator[tuple[Daemon, NotifyReader]]:
    """A daemon on the config file ``path`` (holding ``text``) once it is READY; stopped at the
    block's end."""
    notifier, reader = notify
    await trio.Path(path).write_text(text)
    daemon = Daemon(
        AgentConfig(),
        SimOpener(host),
        config_path=path,
        device_from_file=device_from_file,
        notifier=notifier,
    )
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            await reader.until("READY=1")
            yield daemon, reader
            daemon.request_shutdown("test")


class HeldReading:
    """The daemon's ``load_config``, held on the thread it runs on until the test lets it go:
    a file system that does not answer (a ``[device] path`` on a hung mount)."""

    def __init__(self) -> None:
        self.reading = threading.Event()
        self.go_on = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(
        self, path: Path, sections: Mapping[str, type[BaseModel]], *, check_device: bool
    ) -> AgentConfig:
        self.threads.append(threading.current_thread())
        self.reading.set()
        if not self.go_on.wait(LIMIT_S):
            msg = "the reading was never let go: the event loop waited for it"
            raise TimeoutError(msg)
        return load_config(path, sections, check_device=check_device)

    async def wait_reading(self) -> None:
        assert await trio.to_thread.run_sync(self.reading.wait, LIMIT_S), "never read"


def _leaves(exc: BaseException | None) -> Iterator[BaseException]:
    """The exceptions in ``exc`` and the groups inside it."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    elif exc is not None:
        yield exc


def _facility(host: SimulatedHost) -> int:
    facilities = host.status()["facilities"]
    assert isinstance(facilities, dict)
    status = facilities[SERVICE]["status"]
    assert isinstance(status, int)
    return status


class TestDaemonLifecycle:
    """Start, readiness, shutdown."""

    async def test_ready_then_stopping(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader]
    ) -> None:
        """READY=1 comes after the services start and STOPPING=1 on shutdown."""
        notifier, reader = notify
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                ready = await reader.until("READY=1")
                status = next(line for line in ready if line.startswith("STATUS="))
                assert f"vm session {host.status()['session_id']:#x}, 0 restores" in status
                fragments = status.removeprefix("STATUS=").split(STATUS_SEPARATOR)
                assert len(fragments) == len(daemon.statistics().services)  # none holds it
                assert daemon.statistics().ready
                assert _facility(host) == FacilityStatus.ACTIVE
                daemon.request_shutdown("test")
            assert "STOPPING=1" in await reader.next()
        assert _facility(host) == FacilityStatus.TERMINATED

    async def test_a_lost_device_says_so_with_stopping(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader]
    ) -> None:
        """The device lost while the agent runs ends it with ``STOPPING=1`` and a status
        saying why, which systemd shows until the next start."""
        notifier, reader = notify
        lost = trio.Event()
        why = "the host went away"

        async def gone(code: int) -> None:
            await trio.lowlevel.checkpoint()
            if lost.is_set():
                raise DeviceLostError(why)

        daemon = Daemon(AgentConfig(), HookedOpener(host, before=gone), notifier=notifier)

        async def lose_the_device() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await reader.until("READY=1")
                lost.set()
                host.restore()  # the event pump's next wait meets the lost device

        with trio.fail_after(LIMIT_S), pytest.raises(BaseExceptionGroup) as raised:
            await lose_the_device()  # every request made meanwhile meets it: one error each
        assert raised.value.split(DeviceLostError)[1] is None
        stopping = await reader.until("STOPPING=1")
        assert f"STATUS={DEVICE_LOST_PREFIX}{why}" in stopping

    async def test_a_reset_names_the_request_that_found_the_device_gone(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader]
    ) -> None:
        """A VM reset ends the agent with the DeviceLostError of the request that met it (the
        event pump's wait), not that of the Failed report the exit then sends, which is a
        warning."""
        notifier, reader = notify
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)

        async def reset_while_running() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await reader.until("READY=1")
                await host.reset()

        with (
            structlog.testing.capture_logs() as logs,
            trio.fail_after(LIMIT_S),
            pytest.raises(BaseExceptionGroup) as raised,
        ):
            await reset_while_running()
        matched, others = raised.value.split(DeviceLostError)
        causes = [str(leaf) for leaf in _leaves(matched)]
        assert (others, any("WAIT_FOR_EVENTS" in cause for cause in causes)) == (None, True)
        assert not [cause for cause in causes if "REPORT_GUEST_STATUS" in cause]
        not_reported = [e["status"] for e in logs if e["event"] == "facility_status_not_reported"]
        assert not_reported == ["FAILED"]

    async def test_an_error_stays_the_cause_when_its_failed_report_finds_no_device(
        self, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A fatal error that is not the device's (exit 70) stays the cause when the Failed
        report then meets a lost device: a DeviceLostError would make it exit 69."""
        go, broken = trio.Event(), trio.Event()
        failed = Session().encode(ReportGuestStatus(Facility.VBOX_SERVICE, FacilityStatus.FAILED))

        async def breaking_run(
            pump: EventPump, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> NoReturn:
            del pump
            task_status.started()
            await go.wait()
            broken.set()
            msg = "the event waiter's answer broke the protocol"
            raise LocalProtocolError(msg)

        async def gone(code: int) -> None:
            await trio.lowlevel.checkpoint()
            if broken.is_set() and code == failed.code:
                raise OSError(errno.ENODEV, "No such device")

        monkeypatch.setattr(EventPump, "run", breaking_run)
        daemon = Daemon(AgentConfig(), HookedOpener(host, before=gone), notifier=Notifier(None))
        with (
            structlog.testing.capture_logs() as logs,
            trio.fail_after(LIMIT_S),
            pytest.RaisesGroup(LocalProtocolError, flatten_subgroups=True),
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                go.set()
        not_reported = [e["status"] for e in logs if e["event"] == "facility_status_not_reported"]
        assert not_reported == ["FAILED"]

    async def test_sigterm_stops_cleanly(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader]
    ) -> None:
        """SIGTERM ends ``run`` normally and the old handler is back afterwards."""
        notifier, reader = notify
        before = signal.getsignal(signal.SIGTERM)
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                started = trio.current_time()
                signal.raise_signal(signal.SIGTERM)
            stopped_in = trio.current_time() - started
        assert stopped_in < AgentConfig().daemon.shutdown_timeout_s
        assert before == signal.getsignal(signal.SIGTERM)
        await reader.until("STOPPING=1")  # fails after LIMIT_S if it never comes

    async def test_watchdog_pings_while_the_device_answers(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, short_dir: Path
    ) -> None:
        """With WATCHDOG_USEC set, WATCHDOG=1 arrives on the socket every half interval from
        READY=1 on (virtual time: a datagram is read at the instant it was sent)."""
        path = short_dir / "watchdog.sock"
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        await sock.bind(str(path))
        notifier = Notifier(str(path), watchdog_usec=2_000_000)  # a ping a second
        reader = NotifyReader(sock)
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        pings: list[float] = []
        try:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    await reader.until("READY=1")
                    ready_at = trio.current_time()
                    for _ in range(4):
                        await reader.until("WATCHDOG=1")
                        pings.append(trio.current_time() - ready_at)
                    daemon.request_shutdown("test")
        finally:
            await notifier.aclose()
            sock.close()
        assert pings == [0.0, 1.0, 2.0, 3.0]

    async def test_a_refused_probe_still_pings(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A GET_SESSION_ID probe the host refuses came back through the device and the
        event loop: WATCHDOG=1 goes on schedule, the refusal is logged once, and so is the
        first probe answered again."""
        notifier = WatchdogRecorder(watchdog_usec=2_000_000)  # a ping a second
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await trio.sleep(2.5)
                host.add_fault(RequestType.GET_SESSION_ID, VERR_GENERAL_FAILURE, 2)
                await trio.sleep(3.0)  # the probes at 3 s and 4 s are refused
                daemon.request_shutdown("test")
        assert notifier.pings == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        probes = [e for e in logs if e["event"].startswith("watchdog_probe")]
        assert [(e["event"], e["log_level"], e.get("error")) for e in probes] == [
            ("watchdog_probe_refused", "warning", REFUSED),
            ("watchdog_probe_answered", "info", None),
        ]

    async def test_pings_keep_their_schedule_and_stop_while_the_probe_hangs(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A probe answered late in its interval pings then, and the next probe still goes
        at the next whole interval; a probe the host holds past its interval sends no ping
        and is given up as the next interval begins, and the pings go on once the host
        answers again."""
        notifier = WatchdogRecorder(watchdog_usec=2_000_000)  # a ping a second
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await trio.sleep(0.5)
                host.set_delay(RequestType.GET_SESSION_ID, 0.5)
                await trio.sleep(2.25)  # the probes at 1 s and 2 s answer after 0.5 s
                host.set_delay(RequestType.GET_SESSION_ID, 5.0)
                await trio.sleep(2.75)  # the probes at 3 s, 4 s and 5 s are held
                host.set_delay(RequestType.GET_SESSION_ID, 0)  # which answers them
                await trio.sleep(1.0)
                daemon.request_shutdown("test")
        # the probe given up at 4 s takes GIVE_BACK_S to come back, so the next one starts
        # then; it is given up at 5 s, and the one after it is answered when the delay ends
        assert notifier.pings == pytest.approx([0.0, 1.5, 2.5, 5.5, 6.0])
        probes = [e for e in logs if e["event"].startswith("watchdog_probe")]
        assert [(e["event"], e["log_level"], e.get("timeout_s")) for e in probes] == [
            ("watchdog_probe_timed_out", "error", 1.0),
            ("watchdog_probe_timed_out", "error", round(1.0 - GIVE_BACK_S, 3)),
        ]

    async def test_a_malformed_probe_reply_still_pings(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A GET_SESSION_ID reply that breaks the ABI came back as a refusal does: logged
        once, and WATCHDOG=1 goes on schedule."""
        garbler = ReplyGarbler()
        notifier = WatchdogRecorder(watchdog_usec=2_000_000)  # a ping a second
        daemon = Daemon(AgentConfig(), HookedOpener(host, reply=garbler), notifier=notifier)
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await trio.sleep(0.5)
                garbler.request_types.add(RequestType.GET_SESSION_ID)
                await trio.sleep(2.0)  # the probes at 1 s and 2 s are garbled
                garbler.request_types.clear()
                await trio.sleep(1.0)
                daemon.request_shutdown("test")
        assert notifier.pings == [0.0, 1.0, 2.0, 3.0]
        assert garbler.garbled == 2
        probes = [e["event"] for e in logs if e["event"].startswith("watchdog_probe")]
        assert probes == ["watchdog_probe_refused", "watchdog_probe_answered"]

    async def test_a_property_size_no_guest_can_give_ends_nothing(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """An ENUM_PROPS answered VERR_BUFFER_OVERFLOW with a size of 0x7FFFFFFF is a
        malformed reply: the services that list properties log it once and go on, and the
        daemon runs until it is told to stop. (The size reached the channel's limit check,
        whose local error ended the daemon at once.)"""
        huge = OverflowAsking(GuestFunction.ENUM_PROPS, lambda _: 0x7FFF_FFFF, times=1000)
        host = SimulatedHost(services=[huge])
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=Notifier(None))
        with trio.fail_after(120), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as vm:
                await vm.start(host.run)
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    await trio.sleep(60)
                    daemon.request_shutdown("test")
                vm.cancel_scope.cancel()
        unlisted = [e for e in logs if e["event"] == "owned_properties_unlisted"]
        assert [e["malformed_reply"] for e in unlisted] == [
            "ENUM_PROPS: the host answered VERR_BUFFER_OVERFLOW asking for a 2147483647-byte "
            "buffer, over the 25165824 bytes one HGCM buffer carries"
        ]
        assert "agent_stopped" in [e["event"] for e in logs]
        assert len(huge.sent) > 1  # asked again at later passes

    async def test_a_malformed_facility_reply_cuts_no_stop_short(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """REPORT_GUEST_STATUS replies that break the ABI during a stop are logged: every
        service still drains and the run ends cleanly."""
        garbler = ReplyGarbler()
        daemon = Daemon(AgentConfig(), HookedOpener(host, reply=garbler), notifier=Notifier(None))
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                running = set(daemon.statistics().services)
                garbler.request_types.add(RequestType.REPORT_GUEST_STATUS)
                daemon.request_shutdown("test")
        not_reported = [e["status"] for e in logs if e["event"] == "facility_status_not_reported"]
        assert not_reported == ["TERMINATING", "TERMINATED"]
        drained = {e["service"] for e in logs if e["event"] == "service_drained"}
        assert drained == {*running, "event-pump"}
        assert "agent_stopped" in [e["event"] for e in logs]

    async def test_missing_device_is_fatal(self, notify: tuple[Notifier, NotifyReader]) -> None:
        """A device that cannot be opened ends ``run`` with DeviceUnavailableError."""
        notifier, _ = notify

        class Missing:
            description = "/dev/missing"

            async def open_session(self) -> SimOpener:
                msg = "cannot open /dev/missing"
                raise DeviceUnavailableError(msg)

        daemon = Daemon(AgentConfig(), Missing(), notifier=notifier)  # type: ignore[arg-type]
        with trio.fail_after(LIMIT_S), pytest.RaisesGroup(DeviceUnavailableError):
            await daemon.run()

    async def test_signals_while_the_device_opens(
        self, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """Signals are handled before the device is open (a simulated host may take 5 s to
        appear): SIGHUP is a skipped reload, not the end of the process; SIGTERM ends the run
        at once, cleanly."""
        notifier, _ = notify
        opening = trio.Event()

        class Slow:
            description = "/dev/slow"

            async def open_session(self) -> SimOpener:
                opening.set()
                await trio.sleep_forever()

        path = short_dir / "agent.toml"
        path.write_text("")
        daemon = Daemon(AgentConfig(), Slow(), config_path=path, notifier=notifier)  # type: ignore[arg-type]
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await opening.wait()
                signal.raise_signal(signal.SIGHUP)
                await trio.testing.wait_all_tasks_blocked()
                signal.raise_signal(signal.SIGTERM)
        assert [(entry["event"], entry.get("signal")) for entry in logs] == [
            ("signal_received", "SIGHUP"),
            ("config_reload_skipped", None),
            ("signal_received", "SIGTERM"),
            ("shutdown_requested", None),
            ("agent_stopped", None),
        ]


class TestFullNotifyQueue:
    """systemd does not read its notify socket for a while (PID 1 busy on a boot), so its
    queue is full. On the virtual clock, as the notifier's wait for room is on trio's."""

    async def test_ready_waits_for_room(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        notify: tuple[Notifier, NotifyReader],
        short_dir: Path,
    ) -> None:
        """READY=1 that finds the queue full goes once systemd reads again, seconds later,
        and the start-up ends then, with nothing to warn of. (It was dropped after a second
        with a debug line while ``agent_ready`` was logged: under Type=notify, systemd
        stopped the agent at TimeoutStartSec= and restarted it, again and again.)"""
        notifier, reader = notify
        filled = fill_queue(str(short_dir / "notify.sock"))
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        caught_up = trio.Event()

        async def catch_up() -> None:
            await trio.sleep(BUSY_S)  # systemd reads nothing meanwhile
            for _ in range(filled):
                await reader.next()
            caught_up.set()

        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(catch_up)
                began = trio.current_time()
                await nursery.start(daemon.run)
                assert trio.current_time() - began >= BUSY_S
                await caught_up.wait()
                await reader.until("READY=1")
                daemon.request_shutdown("test")
        assert "sd_notify_failed" not in [line["event"] for line in logs]

    async def test_a_ready_systemd_never_takes_is_a_warning_before_agent_ready(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        notify: tuple[Notifier, NotifyReader],
        short_dir: Path,
    ) -> None:
        """READY=1 that finds no room for its whole budget is a warning naming the socket
        and why, before ``agent_ready``: the journal does not read as if systemd had been
        told. (Only a debug line said so.)"""
        notifier, _ = notify
        address = str(short_dir / "notify.sock")
        fill_queue(address)
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        with (
            structlog.testing.capture_logs() as logs,
            trio.fail_after(STATE_SEND_TIMEOUT_S + LIMIT_S),
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                daemon.request_shutdown("test")
        events = [line["event"] for line in logs]
        failed = logs[events.index("sd_notify_failed")]
        assert events.index("sd_notify_failed") < events.index("agent_ready")
        assert failed["message"].startswith("READY=1\nSTATUS=")
        assert (failed["log_level"], failed["socket"], failed["error"]) == (
            "warning",
            address,
            f"no room in the socket's queue for {STATE_SEND_TIMEOUT_S:g} s",
        )

    async def test_an_unsent_status_goes_with_the_next_ping(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, short_dir: Path
    ) -> None:
        """A STATUS= that found the queue full for its whole budget is not taken as sent:
        the latest text goes with the next WATCHDOG=1 once systemd reads again. (It was
        recorded as sent before the send, so systemd showed the one before it until the
        services' state changed.)"""
        path = short_dir / "watchdog.sock"
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        await sock.bind(str(path))
        notifier = Notifier(str(path), watchdog_usec=4 * 1_000_000 * int(BUSY_S))
        reader = NotifyReader(sock)
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        try:
            with trio.fail_after(LIMIT_S):
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    ready_at = trio.current_time()
                    fill_queue(str(path))
                    host.restore()
                    new_id = host.status()["session_id"]
                    assert isinstance(new_id, int)
                    await trio.sleep(BUSY_S)  # systemd reads nothing meanwhile
                    status = await reader.until_status(f"vm session {new_id:#x}, 1 restores")
                    got_at = trio.current_time() - ready_at
                    assert status == "STATUS=" + daemon.statistics().status
                    daemon.request_shutdown("test")
        finally:
            await notifier.aclose()
            sock.close()
        assert got_at == pytest.approx(notifier.watchdog_interval())

    async def test_an_unsent_status_does_not_poll(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        notify: tuple[Notifier, NotifyReader],
        short_dir: Path,
    ) -> None:
        """After a STATUS= found the queue full, an idle agent tries the socket no more
        while systemd reads nothing: the tries of the sends' budgets, then none. (It tried
        every SEND_RETRY_S for as long as the queue stayed full.)"""
        notifier, reader = notify
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        tries = 0
        with trio.fail_after(LIMIT_S * 10):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await reader.until("READY=1")
                sock = notifier._socket  # the socket the notifier sends on
                assert sock is not None

                def counted(data: bytes, address: str) -> int:
                    nonlocal tries
                    tries += 1
                    return sock.sendto(data, address)

                notifier._socket = mock.Mock(wraps=sock, sendto=counted)
                fill_queue(str(short_dir / "notify.sock"))
                host.restore()  # a few changes of the services' state
                await trio.sleep(SEND_TIMEOUT_S * 5)  # their sends' budgets end
                after_the_budget = tries
                await trio.sleep(60)  # idle, and systemd reads nothing
                assert tries == after_the_budget
                daemon.request_shutdown("test")
        assert 1 <= after_the_budget <= 3 * (SEND_TIMEOUT_S / SEND_RETRY_S + 1)


class TestReload:
    """SIGHUP re-reads the config file."""

    async def test_invalid_config_keeps_the_old_one(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """A broken file is rejected: RELOADING=1, READY=1, and the config stays; the error
        line names every problem and says the running config stays in effect."""
        path = short_dir / "agent.toml"
        with structlog.testing.capture_logs() as logs:
            async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, reader):
                path.write_text("[daemon]\nshutdown_timeout_s = 0\n[session_monitor]\nx = 1\n")
                signal.raise_signal(signal.SIGHUP)
                reloading = await reader.until("RELOADING=1")
                assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
                await reader.until("READY=1")
                assert AgentConfig() == daemon.config
                assert daemon.statistics().reloads == 0
        [rejected] = [entry for entry in logs if entry["event"] == "config_reload_rejected"]
        assert rejected["log_level"] == "error"
        assert rejected["outcome"] == "the running config stays in effect"
        assert [line.split(" = ")[0] for line in rejected["errors"]] == [
            f"{path}: daemon.shutdown_timeout_s",
            f"{path}: session_monitor.x",
        ]

    async def test_a_reload_gives_the_services_the_new_drain_time(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """The services' drain time (which bounds the owned balloon) follows a reload of
        ``daemon.shutdown_timeout_s``, and wakes whoever waits for a change."""
        path = short_dir / "agent.toml"
        async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, _):
            context = daemon._context  # what every service is built with
            assert context is not None
            drain_time = context.drain_time
            assert drain_time.seconds == 5
            changed = False

            async def wait_changed() -> None:
                nonlocal changed
                await drain_time.wait_changed()
                changed = True

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_changed)
                await trio.testing.wait_all_tasks_blocked()
                path.write_text("[daemon]\nshutdown_timeout_s = 9\n")
                await daemon.reload()
            assert (drain_time.seconds, changed) == (9, True)

    async def test_a_rejection_of_hundreds_of_problems_lists_the_first(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """A file of hundreds of problems is rejected with the first ``LISTED_PROBLEMS`` and
        how many more: one line of them all (about 190 characters each) was longer than the
        log stream takes, and never reached the journal."""
        path = short_dir / "agent.toml"
        with structlog.testing.capture_logs() as logs:
            async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, _):
                path.write_text("".join(f"[section_{n}]\nkey = 1\n" for n in range(400)))
                await daemon.reload()
                assert daemon.config.daemon.shutdown_timeout_s == 5
        [rejected] = [entry for entry in logs if entry["event"] == "config_reload_rejected"]
        *listed, more = rejected["errors"]
        assert [line.split(" = ")[0] for line in listed] == [
            f"{path}: section_{n}" for n in range(LISTED_PROBLEMS)
        ]
        assert more == f"and {400 - LISTED_PROBLEMS} more problems (check-config lists them all)"

    async def test_the_file_is_read_off_the_event_loop(
        self,
        host: SimulatedHost,
        notify: tuple[Notifier, NotifyReader],
        short_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A reload reads, parses and checks the file on a worker thread while the event loop
        runs on (here: the test lets the reading go from the loop), and applies it on the
        loop once read. On the loop, 1 MiB of tables held it over a second (no heartbeat, no
        ``WATCHDOG=1``), and a ``[device] path`` on a hung mount for ever."""
        held = HeldReading()
        monkeypatch.setattr(daemon_module, "load_config", held)
        path = short_dir / "agent.toml"
        async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, _):
            path.write_text("[daemon]\nshutdown_timeout_s = 2\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.reload)
                await held.wait_reading()
                assert daemon.config.daemon.shutdown_timeout_s == 5
                held.go_on.set()
            assert daemon.config.daemon.shutdown_timeout_s == 2
        [thread] = held.threads
        assert thread is not threading.main_thread()

    async def test_a_stop_gives_up_a_reading_the_file_system_holds(
        self,
        host: SimulatedHost,
        notify: tuple[Notifier, NotifyReader],
        short_dir: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A stop while a reload's reading is held (a hung mount) gives it up at once: the
        thread is abandoned to it, the agent stops within its budget (the thread would have
        held it ``LIMIT_S``) and nothing is applied."""
        held = HeldReading()
        monkeypatch.setattr(daemon_module, "load_config", held)
        path = short_dir / "agent.toml"
        try:
            with structlog.testing.capture_logs() as logs:
                async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, _):
                    path.write_text("[daemon]\nshutdown_timeout_s = 2\n")
                    signal.raise_signal(signal.SIGHUP)  # the reload is the signal task's
                    await held.wait_reading()
                    stop = trio.current_time()
                # The block's end requested the stop and waited for the run to end.
                assert trio.current_time() - stop < daemon.config.daemon.shutdown_timeout_s
                assert not held.go_on.is_set()
        finally:
            held.go_on.set()
        assert daemon.config.daemon.shutdown_timeout_s == 5
        events = [entry["event"] for entry in logs]
        assert "config_reloaded" not in events
        assert events.index("shutdown_requested") < events.index("config_reload_skipped")

    async def test_a_rejected_reload_shows_in_the_status_until_a_valid_one(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """``systemctl reload`` only sends SIGHUP and reports success: ``STATUS=`` says the
        last reload was rejected, naming the file and the first key, until a reload reads a
        valid file."""
        path = short_dir / "agent.toml"
        async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, reader):
            path.write_text("[daemon]\nshutdown_timeout_s = 0\n[session_monitor]\nx = 1\n")
            await daemon.reload()
            line = await reader.until_status("last reload rejected")
            assert line.startswith(
                f"STATUS=last reload rejected: {path}: daemon.shutdown_timeout_s and 1 more "
                "problem: previous config in effect; "
            )
            path.write_text("[balloon\n")
            await daemon.reload()
            line = await reader.until_status("invalid TOML")
            assert line.startswith(f"STATUS=last reload rejected: {path}: line 1, column 9: ")
            path.write_text(FIVE_SECONDS)
            await daemon.reload()
            with trio.fail_after(LIMIT_S):
                while "last reload rejected" in (line := await reader.until_status("")):
                    pass
            assert "last reload rejected" not in daemon.statistics().status

    async def test_a_device_path_the_next_start_refuses_is_rejected(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """A ``[device] path`` that ``run`` refuses with 78 (a directory) is rejected as
        ``check-config`` rejects it, beside the file's other problems, and ``STATUS=`` says
        so: applied, the reload said ``reloaded`` and the next start failed for good (the
        unit does not restart after 78)."""
        path = short_dir / "agent.toml"
        with structlog.testing.capture_logs() as logs:
            async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, reader):
                path.write_text(
                    f'[device]\npath = "{short_dir}"\n[daemon]\nshutdown_timeout_s = 2\n'
                )
                await daemon.reload()
                line = await reader.until_status("last reload rejected")
                assert line.startswith(f"STATUS=last reload rejected: {path}: device.path: ")
                assert daemon.config.daemon.shutdown_timeout_s == 5
                assert daemon.statistics().reloads == 0
        [rejected] = [entry for entry in logs if entry["event"] == "config_reload_rejected"]
        assert rejected["errors"] == [
            f'{path}: device.path = "{short_dir}": {short_dir} cannot be the vboxguest '
            "device: Is a directory (EISDIR); name the device node (--device, or run's "
            "[device] path)"
        ]
        assert "config_reloaded" not in [entry["event"] for entry in logs]

    async def test_a_device_path_no_start_reads_is_not_checked(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """On a device given apart from the file (``run --device``, ``--simulate``) the
        file's ``device.path`` is never opened: a directory there is applied as any change
        of ``[device]`` (waiting for a start that will not read it either), not rejected."""
        path = short_dir / "agent.toml"
        with structlog.testing.capture_logs() as logs:
            async with _ready_on_file(host, notify, path, FIVE_SECONDS, device_from_file=False) as (
                daemon,
                _,
            ):
                path.write_text(
                    f'[device]\npath = "{short_dir}"\n[daemon]\nshutdown_timeout_s = 2\n'
                )
                await daemon.reload()
                assert daemon.config.daemon.shutdown_timeout_s == 2
        events = [entry["event"] for entry in logs]
        assert "config_reload_rejected" not in events
        assert "config_reloaded" in events

    async def test_daemon_section_is_applied(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """A changed [daemon] section applies at once, without restarting any service."""
        path = short_dir / "agent.toml"
        async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, _):
            path.write_text("[daemon]\nshutdown_timeout_s = 2\n")
            await daemon.reload()
            assert daemon.config.daemon.shutdown_timeout_s == 2
            assert daemon.statistics().reloads == 1
            assert daemon.statistics().restarts == {}

    async def test_a_deprecated_value_is_applied_with_its_warning(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """A reload reads ``device.ioctl_threads = 3`` as 4 and says so in one
        ``config_deprecated`` line, as ``run`` does at start (the reload logged nothing)."""
        path = short_dir / "agent.toml"
        with structlog.testing.capture_logs() as logs:
            async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, _):
                path.write_text("[device]\nioctl_threads = 3\n")
                await daemon.reload()
        [deprecated] = [entry for entry in logs if entry["event"] == "config_deprecated"]
        assert deprecated["log_level"] == "warning"
        assert deprecated["path"] == str(path)
        assert deprecated["warning"].startswith(f"{path}: device.ioctl_threads = 3: deprecated")

    async def test_nesting_too_deep_is_rejected(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """A file nested deeper than tomllib recurses is a rejected reload, not the end of
        the daemon (its RecursionError escaped the reload)."""
        path = short_dir / "agent.toml"
        with structlog.testing.capture_logs() as logs:
            async with _ready_on_file(host, notify, path, FIVE_SECONDS) as (daemon, _):
                path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
                await daemon.reload()
                assert AgentConfig() == daemon.config
        [rejected] = [entry for entry in logs if entry["event"] == "config_reload_rejected"]
        assert rejected["errors"] == [
            f"{path}: line 1, column 5: invalid TOML: arrays or tables nested too deeply"
        ]

    async def test_device_section_waits_for_a_restart(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader], short_dir: Path
    ) -> None:
        """A changed [device] is not applied: the running config keeps the device in use and
        each reload says so again (the first one took the file's section as applied), and
        its summary names it as waiting for a restart, not as applied."""
        path = short_dir / "agent.toml"
        text = "[device]\nioctl_threads = 6\n"
        with structlog.testing.capture_logs() as logs:
            async with _ready_on_file(host, notify, path, text) as (daemon, _):
                await daemon.reload()
                await daemon.reload()
                assert daemon.config.device == AgentConfig().device
                assert daemon.statistics().reloads == 0
        warnings = [entry for entry in logs if entry["event"] == "config_change_needs_restart"]
        assert [entry["sections"] for entry in warnings] == [["device"], ["device"]]
        reloaded = [entry for entry in logs if entry["event"] == "config_reloaded"]
        assert [(entry["changed"], entry["needs_restart"]) for entry in reloaded] == [
            ([], ["device"]),
            ([], ["device"]),
        ]


class TestRestore:
    """The session monitor follows VM restores."""

    async def test_restore_is_noticed(
        self, host: SimulatedHost, notify: tuple[Notifier, NotifyReader]
    ) -> None:
        """After a host restore the monitor has read the new session id, and STATUS says so."""
        notifier, reader = notify
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await reader.until("READY=1")
                host.restore()
                new_id = host.status()["session_id"]
                assert isinstance(new_id, int)
                await reader.until_status(f"vm session {new_id:#x}, 1 restores")
                stats = daemon.statistics().services["session_monitor"]
                assert isinstance(stats, SessionMonitorStatistics)
                assert (stats.restores, stats.session_id) == (1, new_id)
                daemon.request_shutdown("test")

    async def test_status_never_shows_a_restore_from_before_the_start(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """The host keeps the RESTORED of a restore before the agent's start and hands it to
        the monitor after its first read; while the read it calls for is slow (1 s), the
        daemon publishes the services' start (``READY=1``), and no status shows a restore:
        that read finds the start's id, so none is counted, shown and taken back."""
        counts = host.vmmdev.request_counts
        slow_reads = [1]

        async def after(code: int) -> None:
            del code
            if counts[RequestType.GET_SESSION_ID] > slow_reads[-1]:
                slow_reads.append(counts[RequestType.GET_SESSION_ID])
                await trio.sleep(1.0)

        notifier = StatusRecorder()
        config = AgentConfig(services={"timesync": TimesyncSection(enable=False)})
        host.restore()  # before the agent: no filter admits RESTORED, the host keeps it
        restored = host.status()["session_id"]
        assert isinstance(restored, int)
        daemon = Daemon(config, HookedOpener(host, after=after), notifier=notifier)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await trio.sleep(8)  # the kept event's read and every start-up change done
                stats = daemon.statistics().services["session_monitor"]
                daemon.request_shutdown("test")
        assert slow_reads == [1, 2]  # the kept event's read was held
        assert stats == SessionMonitorStatistics(restored, 0)
        shown = [text for text in notifier.statuses if "vm session 0x" in text]
        assert shown
        assert all(f"vm session {restored:#x}, 0 restores" in text for text in shown), shown
