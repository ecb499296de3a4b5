"""Tests of the service framework through the daemon: a throw-away service in the registry.

Rules of this test module:
- ``Gadget`` is a service defined here and added to the daemon only through its ``registry``
  argument, with its own ``[gadget]`` section; no daemon code knows it.
- The host is an in-process ``SimulatedHost`` behind ``SimOpener`` (pure trio) and sd_notify
  is off, so the virtual clock (``autojump_clock``) drives every wait and drain times are
  asserted exactly; each test is bounded by ``trio.fail_after`` on that clock.
- Synchronisation uses the gadgets' trio Events; sleeps only stand for a service's own work.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

import pytest
import structlog.testing
import trio
import trio.testing
from pydantic import Field

from agent.config import AgentConfig, load_config
from agent.daemon import Daemon, ServiceFailedError, Supervisor
from agent.daemon.daemon import FINAL_PHASE_S, START_WAIT_S
from agent.daemon.facility import FacilityReporter
from agent.daemon.notify import SEND_TIMEOUT_S, STATE_SEND_TIMEOUT_S, Notifier
from agent.device import Device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import (
    Event,
    Facility,
    FacilityStatus,
    GetHostVersion,
    GetSessionId,
    LocalProtocolError,
    Request,
    RequestType,
)
from agent.protocol.status import VERR_GENERAL_FAILURE
from agent.services import EventPump, ServiceContext, ServiceSection, ServiceSpec
from agent.services.registry import SERVICES, section_models

if TYPE_CHECKING:
    from collections.abc import Iterator, MutableMapping
    from pathlib import Path

log = structlog.get_logger(__name__)

LIMIT_S: Final = 120.0
VRDP: Final = int(Event.VRDP)
REFUSED_FILTER_AS: Final = {"mainline": "VERR_UNRESOLVED_ERROR", "oracle": "VERR_GENERAL_FAILURE"}
"""How a host's VERR_GENERAL_FAILURE for the filter reads back: mainline answers EPROTO, which
no one status stands for; Oracle's driver passes the status through in ``hdr.rc``."""


class GadgetSection(ServiceSection):
    """``[gadget]``: ``interval_s`` applies live, ``label`` needs a restart."""

    interval_s: float = Field(default=2.0, gt=0)
    label: str = "one"
    drain_s: float = Field(default=0.0, ge=0)
    start_s: float = Field(default=0.0, ge=0)
    start_fails: bool = False


@dataclass(frozen=True, slots=True)
class GadgetStatistics:
    events: int


class Gadget:
    """Subscribes to VRDP events, counts them, and needs ``drain_s`` to give back its work."""

    name: Final = "gadget"

    def __init__(self, context: ServiceContext, section: GadgetSection) -> None:
        self.context = context
        self.section = section
        self.started = trio.Event()
        self.draining = trio.Event()
        self.drained = trio.Event()
        self.drain_cancelled = False
        self.agent_stopping: bool | None = None
        """What ``context.agent_stopping()`` answered as the last drain began."""
        self.stopping_at_drains: list[bool] = []
        """What it answered as each drain began (a failed run is drained before a restart)."""
        self.events = 0
        self.nursery: trio.Nursery | None = None
        BUILT.append(self)
        log.info("gadget_built")

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        with self.context.pump.subscribe(self.name, VRDP) as events:
            await trio.sleep(self.section.start_s)  # the service's own start-up work
            if self.section.start_fails:
                msg = "the gadget could not start"
                raise OSError(msg)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                task_status.started()
                self.started.set()
                while True:
                    await events.receive()
                    self.events += 1
                    self.context.status_changed()

    async def drain(self) -> None:
        self.agent_stopping = self.context.agent_stopping()
        self.stopping_at_drains.append(self.agent_stopping)
        self.draining.set()
        try:
            await trio.sleep(self.section.drain_s)  # the service's own clean-up work
            await self.context.device.request(GetSessionId())  # the device still answers
        except trio.Cancelled:
            self.drain_cancelled = True
            raise
        self.drained.set()

    def reconfigure(self, section: GadgetSection) -> bool:
        if section.model_copy(update={"interval_s": self.section.interval_s}) != self.section:
            return False
        self.section = section
        log.info("gadget_reconfigured")
        if self.nursery is not None:  # as the balloon restarts its pressure watch
            self.nursery.start_soon(self._log_from_a_task)
        return True

    async def _log_from_a_task(self) -> None:
        await trio.lowlevel.checkpoint()
        log.info("gadget_task_ran")

    def status(self) -> str:
        return f"gadget {self.section.label} {self.section.interval_s:g} s, {self.events} events"

    def statistics(self) -> GadgetStatistics:
        return GadgetStatistics(self.events)


BUILT: list[Gadget] = []
GADGET: Final = ServiceSpec("gadget", GadgetSection, Gadget)
REGISTRY: Final = (*SERVICES, GADGET)


class BreakerSection(ServiceSection):
    """``[breaker]``: when it breaks the protocol, and whether before its start completes."""

    break_after_s: float = Field(default=1.0, ge=0)
    while_starting: bool = False


class Breaker:
    """Starts, then breaks the protocol after ``break_after_s``: an error that ends the agent."""

    name: Final = "breaker"

    def __init__(self, context: ServiceContext, section: BreakerSection) -> None:
        del context
        self.section = section

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        if not self.section.while_starting:
            task_status.started()
        await trio.sleep(self.section.break_after_s)  # its own work, until it goes wrong
        msg = "the breaker broke the protocol"
        raise LocalProtocolError(msg)

    async def drain(self) -> None:
        await trio.lowlevel.checkpoint()

    def reconfigure(self, section: BreakerSection) -> bool:
        del section
        return True

    def status(self) -> str:
        return "breaker"

    def statistics(self) -> GadgetStatistics:
        return GadgetStatistics(0)


BREAKER: Final = ServiceSpec("breaker", BreakerSection, Breaker)


class HeldSection(ServiceSection):
    """``[held]``: nothing to set."""


class Held:
    """Holds its start until the test sets ``release`` (a host that keeps it waiting)."""

    name: Final = "held"

    def __init__(self, context: ServiceContext, section: HeldSection) -> None:
        del context, section
        self.release = trio.Event()
        self.started = trio.Event()
        HELD.append(self)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        await self.release.wait()
        task_status.started()
        self.started.set()
        await trio.sleep_forever()

    async def drain(self) -> None:
        await trio.lowlevel.checkpoint()

    def reconfigure(self, section: HeldSection) -> bool:
        del section
        return True

    def status(self) -> str:
        return "held running"

    def statistics(self) -> GadgetStatistics:
        return GadgetStatistics(0)


HELD: list[Held] = []
HELD_SPEC: Final = ServiceSpec("held", HeldSection, Held)


class FragileSection(ServiceSection):
    """``[fragile]``: ``label`` needs a restart, and ``"boom"`` cannot be built."""

    label: str = "one"


class Fragile:
    """Third-party code whose constructor raises for one setting, as a plug-in's may."""

    name: Final = "fragile"

    def __init__(self, context: ServiceContext, section: FragileSection) -> None:
        del context
        if section.label == "boom":
            msg = "cannot build with this label"
            raise OSError(msg)
        self.section = section
        self.drained = trio.Event()
        FRAGILE_BUILT.append(self)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        task_status.started()
        await trio.sleep_forever()

    async def drain(self) -> None:
        await trio.lowlevel.checkpoint()
        self.drained.set()

    def reconfigure(self, section: FragileSection) -> bool:
        return section == self.section

    def status(self) -> str:
        return f"fragile {self.section.label}"

    def statistics(self) -> GadgetStatistics:
        return GadgetStatistics(0)


FRAGILE_BUILT: list[Fragile] = []
FRAGILE: Final = ServiceSpec("fragile", FragileSection, Fragile)
SHUTDOWN_TIMEOUT_S: Final = 2.0
SLOW_GADGET: Final = (
    f"[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S:g}\n[gadget]\ndrain_s = 30\n"
)
"""A gadget whose drain needs far longer than the drain time."""


@pytest.fixture(autouse=True)
def _clear_built() -> None:
    BUILT.clear()
    HELD.clear()
    FRAGILE_BUILT.clear()


def _daemon(host: SimulatedHost, path: Path, text: str, notifier: Notifier | None = None) -> Daemon:
    path.write_text(text)
    config = load_config(path, section_models(REGISTRY))
    return Daemon(
        config,
        SimOpener(host),
        config_path=path,
        notifier=notifier or Notifier(None),
        registry=REGISTRY,
    )


class FullQueueNotifier(Notifier):
    """sd_notify whose ``STOPPING=1`` meets a full queue: the send retries for as long as
    the notifier allows before it gives up."""

    def __init__(self) -> None:
        super().__init__(None)

    async def stopping(self, status: str | None = None) -> None:
        del status
        await trio.sleep(STATE_SEND_TIMEOUT_S)


class RecordingNotifier(Notifier):
    """sd_notify that records what the daemon tells systemd, one string per message."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[str] = []

    async def ready(self, status: str | None = None) -> None:
        self.sent.append("READY=1")

    async def reloading(self) -> None:
        self.sent.append("RELOADING=1")

    async def stopping(self, status: str | None = None) -> None:
        self.sent.append(f"STOPPING=1 STATUS={status}")


class SlowQueueNotifier(RecordingNotifier):
    """:class:`RecordingNotifier` whose ``RELOADING=1`` and ``READY=1`` each wait for room
    in a full notify queue as long as such a send may (``SEND_TIMEOUT_S``,
    ``STATE_SEND_TIMEOUT_S``), or ``READY=1`` until systemd reads again ``ready_room_s``
    later; set events say when each began."""

    def __init__(self, *, ready_room_s: float = STATE_SEND_TIMEOUT_S) -> None:
        super().__init__()
        self.reloading_began = trio.Event()
        self.ready_began = trio.Event()
        self._ready_room_s = ready_room_s

    async def ready(self, status: str | None = None) -> None:
        self.ready_began.set()
        await trio.sleep(self._ready_room_s)
        await super().ready(status)

    async def reloading(self) -> None:
        self.reloading_began.set()
        await trio.sleep(SEND_TIMEOUT_S)
        await super().reloading()


class HeldReloadingNotifier(RecordingNotifier):
    """:class:`RecordingNotifier` whose ``RELOADING=1`` waits for ``room`` (systemd's queue
    stays full until the test lets it go)."""

    def __init__(self) -> None:
        super().__init__()
        self.reloading_began = trio.Event()
        self.room = trio.Event()

    async def reloading(self) -> None:
        self.reloading_began.set()
        await self.room.wait()
        await super().reloading()


class HeldReloadReadyNotifier(RecordingNotifier):
    """:class:`RecordingNotifier` whose ``READY=1`` after a ``RELOADING=1`` waits for room
    that never comes (systemd's queue stays full); ``reload_ready_began`` is set as the
    first such wait begins (a test may replace it to hear of the next)."""

    def __init__(self) -> None:
        super().__init__()
        self.reload_ready_began = trio.Event()

    async def ready(self, status: str | None = None) -> None:
        if "RELOADING=1" in self.sent:
            self.reload_ready_began.set()
            await trio.sleep_forever()
        await super().ready(status)


class ReadyStatusNotifier(RecordingNotifier):
    """:class:`RecordingNotifier` that records the ``STATUS=`` sent with ``READY=1``."""

    async def ready(self, status: str | None = None) -> None:
        self.sent.append(f"READY=1 STATUS={status}")


class StatusRecordingNotifier(RecordingNotifier):
    """:class:`RecordingNotifier` that records each ``STATUS=`` update too."""

    def __init__(self) -> None:
        super().__init__()
        self.status_sent = trio.lowlevel.ParkingLot()
        """Woken by each ``STATUS=``."""

    async def status(self, text: str) -> None:
        self.sent.append(f"STATUS={text}")
        self.status_sent.unpark_all()

    async def wait_status(self, fragment: str, *, present: bool = True) -> str:
        """The first ``STATUS=`` from now on with ``fragment`` (or, ``present`` False,
        without it)."""
        seen = len(self.sent)
        while True:
            for line in self.sent[seen:]:
                if line.startswith("STATUS=") and (fragment in line) == present:
                    return line
            seen = len(self.sent)
            await self.status_sent.park()


class ReadyAndStatusNotifier(ReadyStatusNotifier):
    """:class:`ReadyStatusNotifier` that records each ``STATUS=`` update too."""

    async def status(self, text: str) -> None:
        self.sent.append(f"STATUS={text}")


async def _breaking_pump_run(
    pump: EventPump, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """In place of ``EventPump.run``: starts, then breaks the protocol 3 s later."""
    del pump
    task_status.started()
    await trio.sleep(3.0)
    msg = "the event waiter's answer broke the protocol"
    raise LocalProtocolError(msg)


def _breaking(host: SimulatedHost, text: str, notifier: Notifier, path: Path) -> Daemon:
    """A daemon with the breaker before the gadget, configured by ``text``."""
    registry = (*SERVICES, BREAKER, GADGET)
    path.write_text(text)
    config = load_config(path, section_models(registry))
    return Daemon(config, SimOpener(host), config_path=path, notifier=notifier, registry=registry)


@contextmanager
def _ends_on_protocol_error() -> Iterator[list[MutableMapping[str, Any]]]:
    """Bounded by ``LIMIT_S``, the block must end the agent with a LocalProtocolError;
    yields the log lines captured meanwhile."""
    with (
        structlog.testing.capture_logs() as logs,
        trio.fail_after(LIMIT_S),
        pytest.RaisesGroup(LocalProtocolError, flatten_subgroups=True),
    ):
        yield logs


class TestThrowAwayService:
    """A service added through the registry alone is started, reloaded and stopped."""

    async def test_started_with_its_section(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """The daemon builds it from its own section, runs it, and reports its status."""
        daemon = _daemon(host, tmp_path / "agent.toml", '[gadget]\nlabel = "red"\n')
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                assert gadget.section == GadgetSection(label="red")
                assert gadget.started.is_set()
                host.raise_events(VRDP)
                await trio.testing.wait_all_tasks_blocked()
                stats = daemon.statistics()
                assert stats.services["gadget"] == GadgetStatistics(events=1)
                assert stats.status.endswith("; gadget red 2 s, 1 events")
                daemon.request_shutdown("test")
        assert gadget.drained.is_set()

    async def test_disabled_is_not_built(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """``enable = false`` keeps it from being built at all."""
        daemon = _daemon(host, tmp_path / "agent.toml", "[gadget]\nenable = false\n")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                assert BUILT == []
                assert set(daemon.statistics().services) == {spec.name for spec in SERVICES}
                daemon.request_shutdown("test")

    async def test_reload_applies_live_restarts_and_toggles(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """Live: same instance; restart-only: drained and rebuilt; ``enable``: stop, start."""
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[gadget]\ninterval_s = 2\n")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [first] = BUILT

                path.write_text("[gadget]\ninterval_s = 5\n")
                await daemon.reload()
                assert (BUILT, first.section.interval_s) == ([first], 5.0)
                await trio.testing.wait_all_tasks_blocked()
                assert "gadget one 5 s" in daemon.statistics().status

                path.write_text('[gadget]\ninterval_s = 5\nlabel = "two"\n')
                with structlog.testing.capture_logs() as logs:
                    await daemon.reload()
                [_, second] = BUILT
                # A rebuild is the reload doing its job: no warning for it.
                assert {
                    "event": "service_needs_restart",
                    "service": "gadget",
                    "log_level": "info",
                } in logs
                await second.started.wait()
                assert first.drained.is_set()
                assert second.section.label == "two"
                assert daemon.statistics().restarts == {"gadget": 1}

                path.write_text("[gadget]\nenable = false\n")
                signal.raise_signal(signal.SIGHUP)
                await second.drained.wait()
                await trio.testing.wait_all_tasks_blocked()
                assert "gadget" not in daemon.statistics().services

                path.write_text('[gadget]\nlabel = "three"\n')
                await daemon.reload()
                [_, _, third] = BUILT
                await third.started.wait()
                assert daemon.statistics().reloads == 4
                daemon.request_shutdown("test")
        assert third.drained.is_set()

    async def test_a_drain_knows_whether_the_whole_agent_stops(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """``agent_stopping`` reads False in the drain of a gadget a reload disables (the
        agent runs on), True in the drain of one the agent's stop ends."""
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                path.write_text("[gadget]\nenable = false\n")
                await daemon.reload()
                [disabled] = BUILT
                await disabled.drained.wait()
                path.write_text("")
                await daemon.reload()
                [_, enabled] = BUILT
                await enabled.started.wait()
                daemon.request_shutdown("test")
        assert (disabled.agent_stopping, enabled.agent_stopping) == (False, True)

    async def test_a_drain_before_a_fatal_exit_knows_the_agent_stops(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A fatal error in another service ends the agent: the gadget's drain reads
        ``agent_stopping`` True."""
        daemon = _breaking(host, "", Notifier(None), tmp_path / "agent.toml")
        with _ends_on_protocol_error():
            await daemon.run()
        [gadget] = BUILT
        assert (gadget.drained.is_set(), gadget.agent_stopping) == (True, True)

    @pytest.mark.parametrize(("budget", "stopping"), [(0, [True]), (1, [False, True])])
    async def test_a_drain_before_giving_up_knows_the_agent_stops(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        tmp_path: Path,
        budget: int,
        stopping: list[bool],
    ) -> None:
        """A gadget whose start fails past its restart budget ends the agent (exit 70): the
        drain of that last failed run reads ``agent_stopping`` True, as the agent exits after
        it; the drain of a failed run the budget restarts reads False (the agent runs on)."""
        text = f"[daemon]\nrestart_budget = {budget}\n[gadget]\nstart_fails = true\n"
        daemon = _daemon(host, tmp_path / "agent.toml", text)
        with (
            trio.fail_after(LIMIT_S),
            pytest.RaisesGroup(ServiceFailedError, flatten_subgroups=True),
        ):
            await daemon.run()
        [gadget] = BUILT
        assert gadget.stopping_at_drains == stopping

    async def test_a_service_disabled_by_a_reload_leaves_the_status(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A service disabled by a reload reads ``stopping`` at once (its own status would
        say it still works), and once it has drained, a STATUS= without it is sent."""
        notifier = StatusRecordingNotifier()
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[gadget]\ndrain_s = 2\n", notifier)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                path.write_text("[gadget]\nenable = false\n")
                await daemon.reload()
                stopping = await notifier.wait_status("; gadget stopping")
                drained_by_then = gadget.drained.is_set()
                await gadget.drained.wait()
                await trio.testing.wait_all_tasks_blocked()
                after = notifier.sent[-1]
                daemon.request_shutdown("test")
        assert not drained_by_then
        assert stopping.startswith("STATUS=vm session ")
        assert stopping.endswith("; gadget stopping")
        assert after.startswith("STATUS=vm session ")
        assert "gadget" not in after

    async def test_a_service_a_reload_enables_keeps_its_registry_place_in_the_status(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A service a reload enables has its STATUS= fragment where the registry puts it,
        before the gadget's (last in the registry), whatever order the runs began in. (It
        went last: the fragments followed the supervisor's start order.)"""
        notifier = StatusRecordingNotifier()
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[network]\nenable = false\n", notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                path.write_text("")
                await daemon.reload()
                enabled = await notifier.wait_status("network starting")
                daemon.request_shutdown("test")
        assert enabled.index("network starting") < enabled.index("; gadget one")

    async def test_reload_during_a_restart_drain_reaches_the_replacement(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A reload while the old gadget drains for a rebuild is for the rebuilt one: going
        back to the old label (which the old one would take live) rebuilds it again, and the
        gadget that runs has the file's last section."""
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[gadget]\ndrain_s = 4\n")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [first] = BUILT
                path.write_text('[gadget]\ndrain_s = 4\nlabel = "two"\n')
                await daemon.reload()
                await first.draining.wait()
                path.write_text("[gadget]\ndrain_s = 4\ninterval_s = 7\n")
                await daemon.reload()
                running = BUILT[-1]
                await running.started.wait()
                assert first.section == GadgetSection(drain_s=4)
                assert running.section == GadgetSection(drain_s=4, interval_s=7)
                daemon.request_shutdown("test")


class TestStartUp:
    """Every service starts at once, and READY=1 waits ``START_WAIT_S`` at most for them."""

    async def test_a_held_start_delays_no_other_and_ready_by_the_bound(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A service first in the registry whose start is held: every other service starts
        at once, READY=1 follows ``START_WAIT_S`` after the start-up began with a STATUS=
        naming it as starting, and once it started STATUS= shows it running."""
        registry = (HELD_SPEC, *SERVICES)
        notifier = ReadyAndStatusNotifier()
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier, registry=registry)
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                began = trio.current_time()
                await nursery.start(daemon.run)
                ready_after = trio.current_time() - began
                [held] = HELD
                assert not held.started.is_set()
                held.release.set()
                await held.started.wait()
                await trio.testing.wait_all_tasks_blocked()
                daemon.request_shutdown("test")
        assert ready_after == pytest.approx(START_WAIT_S)
        events = [(e["event"], e.get("service")) for e in logs]
        ready = events.index(("agent_ready", None))
        started = {name for event, name in events[:ready] if event == "service_started"}
        assert started == {"event-pump", *(spec.name for spec in SERVICES)}
        warning = {
            "event": "services_still_starting",
            "services": ["held"],
            "waited_s": START_WAIT_S,
            "log_level": "warning",
        }
        assert warning in logs
        assert notifier.sent[0].startswith("READY=1 STATUS=held starting; vm session ")
        assert notifier.sent[1].startswith("STATUS=held running; vm session ")

    async def test_a_host_holding_hgcm_connects_delays_ready_by_the_bound_only(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A host that holds every HGCM connect (the services' own 30 s connect timeout each,
        one after the other, held READY=1 back for 90 s): the services that need none start
        at once, and READY=1 goes out ``START_WAIT_S`` after the start-up began, STATUS=
        naming those still starting."""
        host.set_delay(int(RequestType.HGCM_CONNECT), 200.0)
        notifier = ReadyStatusNotifier()
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                began = trio.current_time()
                await nursery.start(daemon.run)
                ready_after = trio.current_time() - began
                daemon.request_shutdown("test")
        assert ready_after == pytest.approx(START_WAIT_S)
        [waiting] = [e["services"] for e in logs if e["event"] == "services_still_starting"]
        assert {"properties", "network", "users"} <= set(waiting)
        events = [(e["event"], e.get("service")) for e in logs]
        ready = events.index(("agent_ready", None))
        started = {name for event, name in events[:ready] if event == "service_started"}
        assert started == {"event-pump", *(s.name for s in SERVICES if s.name not in waiting)}
        [ready_line] = notifier.sent[:1]
        assert all(f"{name} starting" in ready_line for name in waiting)

    async def test_a_service_a_reload_enables_is_starting_until_it_started(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A reload enables a service whose start takes 100 s: STATUS= names it as starting
        at once, as at start-up, and shows it running once it started."""
        notifier = StatusRecordingNotifier()
        daemon = _daemon(host, tmp_path / "agent.toml", "[gadget]\nenable = false\n", notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                (tmp_path / "agent.toml").write_text("[gadget]\nstart_s = 100\n")
                await daemon.reload()
                starting = await notifier.wait_status("gadget")
                began = trio.current_time()
                running = await notifier.wait_status("gadget one")
                daemon.request_shutdown("test")
        assert starting.endswith("; gadget starting")
        assert running.endswith("; gadget one 2 s, 0 events")
        assert trio.current_time() - began >= 100

    async def test_a_restart_after_its_back_off_is_starting_until_it_started(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A service that fails its 100 s start: once its back-off ends, STATUS= says it is
        starting again, not failed and retrying, until its next start ends."""
        notifier = StatusRecordingNotifier()
        text = "[gadget]\nstart_s = 100\nstart_fails = true\n"
        daemon = _daemon(host, tmp_path / "agent.toml", text, notifier)
        with trio.fail_after(LIMIT_S * 4):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await notifier.wait_status("gadget failed, retrying (1x)")
                failed = trio.current_time()
                after = await notifier.wait_status("retrying (1x)", present=False)
                retried = trio.current_time()
                daemon.request_shutdown("test")
        assert after.endswith("; gadget starting")
        assert retried - failed < 100


class TestEventPumpFailures:
    """The event pump's failures show in ``STATUS=``: the host's as the pump's own retries,
    a local bug's as the supervisor's restarts, as a service's do."""

    async def test_a_refused_filter_is_in_the_status_and_restarts_nothing(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """The host refuses the pump's new filter (a reload enabled the gadget, whose events
        the pump must now wait for) until the test lets it through: ``STATUS=`` puts the
        pump's failure first while it retries, leaves it out once it runs again, and the
        pump was never restarted (a hundred refusals used to end the agent, exit 70)."""
        notifier = StatusRecordingNotifier()
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[gadget]\nenable = false\n", notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_GENERAL_FAILURE, 100)
                path.write_text("")
                await daemon.reload()
                refused = await notifier.wait_status("event pump: event filter refused")
                await trio.sleep(30.0)  # past the 5 restarts the budget allowed
                host.clear_faults(RequestType.CTL_GUEST_FILTER_MASK)
                running = await notifier.wait_status("event pump", present=False)
                restarts = daemon.statistics().restarts
                daemon.request_shutdown("test")
        assert refused.startswith(
            f"STATUS=event pump: event filter refused ({REFUSED_FILTER_AS[host.personality]}),"
            " retrying; vm session "
        )
        assert "; gadget one 2 s, 0 events" in running
        assert restarts == {}

    async def test_a_pump_backing_off_is_in_the_status(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A bug of the pump's own (here in its log line for a new waiter) until the test
        mends it: the supervisor restarts the pump, ``STATUS=`` puts its failures first
        while it backs off, and leaves them out once it runs again."""
        notifier = StatusRecordingNotifier()
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[gadget]\nenable = false\n", notifier)
        opened = EventPump._opened

        def broken(pump: EventPump, mask: int) -> None:
            del pump, mask
            msg = "a bug"
            raise RuntimeError(msg)

        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                monkeypatch.setattr(EventPump, "_opened", broken)
                path.write_text("")
                await daemon.reload()
                once = await notifier.wait_status("event pump failed, retrying (1x)")
                twice = await notifier.wait_status("event pump failed, retrying (2x)")
                monkeypatch.setattr(EventPump, "_opened", opened)
                running = await notifier.wait_status("event pump", present=False)
                restarts = daemon.statistics().restarts
                daemon.request_shutdown("test")
        assert once.startswith("STATUS=event pump failed, retrying (1x); vm session ")
        assert twice.startswith("STATUS=event pump failed, retrying (2x); vm session ")
        assert "; gadget one 2 s, 0 events" in running
        assert restarts == {"event-pump": 2}


class TestHostRefusesAFeature:
    """A host that keeps refusing one optional feature at start never ends the agent."""

    @pytest.mark.parametrize(
        ("request_type", "fragment"),
        [
            (
                RequestType.SET_CPU_HOTPLUG_STATUS,
                "cpuhotplug: not available (VERR_GENERAL_FAILURE)",
            ),
            (RequestType.HEARTBEAT_CONFIGURE, "heartbeat not armed (VERR_GENERAL_FAILURE)"),
            (
                RequestType.CTL_GUEST_FILTER_MASK,
                "event pump: event filter refused (VERR_UNRESOLVED_ERROR), retrying",
            ),
        ],
    )
    async def test_the_agent_runs_on_and_the_other_services_work(
        self, autojump_clock: trio.abc.Clock, request_type: RequestType, fragment: str
    ) -> None:
        """Every such request refused for two minutes (the repros' ``host fault ...
        VERR_GENERAL_FAILURE --count 1000``: exit 70 after 31 s): the agent is still up,
        nothing was restarted, ``STATUS=`` names the refusal, the other services work (the
        properties are published, the heartbeat beats unless it is the one refused), and
        once the host takes the request again the feature follows within a minute."""
        host = SimulatedHost(personality="passthrough", seed=3)
        notifier = StatusRecordingNotifier()
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=notifier)
        with structlog.testing.capture_logs() as logs, trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)  # the driver loaded: as ``host fault`` then
                host.add_fault(request_type, VERR_GENERAL_FAILURE, 1000)
                async with trio.open_nursery() as agent:
                    await agent.start(daemon.run)
                    await trio.sleep(120.0)
                    refused_status = daemon.statistics().status
                    restarts = daemon.statistics().restarts
                    beats = host.status()["heartbeat"]["beats"]  # type: ignore[index]
                    published = host.prop_get("/VirtualBox/GuestAdd/VBoxAgent/Version")
                    host.clear_faults(request_type)
                    await notifier.wait_status(fragment, present=False)
                    daemon.request_shutdown("test")
                nursery.cancel_scope.cancel()
        assert fragment in refused_status
        assert restarts == {}
        assert published is not None
        assert (beats == 0) == (request_type == RequestType.HEARTBEAT_CONFIGURE)
        refusals = {
            "event_filter_refused",
            "cpu_hotplug_unavailable",
            "heartbeat_not_armed",
        }
        assert len([e for e in logs if e["event"] in refusals]) == 1
        assert not [e for e in logs if e["event"] in {"service_failed", "service_gave_up"}]


class TestBuildFails:
    """A service the start or a reload cannot build leaves the agent running: the old one
    runs on (or none, if it was being started or enabled), the status says why, and the
    next reload tries again."""

    @staticmethod
    def _fragile(host: SimulatedHost, path: Path, text: str, notifier: Notifier) -> Daemon:
        registry = (*SERVICES, FRAGILE, GADGET)
        path.write_text(text)
        config = load_config(path, section_models(registry))
        return Daemon(
            config, SimOpener(host), config_path=path, notifier=notifier, registry=registry
        )

    async def test_a_failed_build_at_start_leaves_the_others_running(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """Not buildable at start: the others start, READY=1 names it not started, a reload
        with a good section starts it, and the stop drains every service as usual."""
        notifier = StatusRecordingNotifier()
        path = tmp_path / "agent.toml"
        daemon = self._fragile(host, path, '[fragile]\nlabel = "boom"\n', notifier)
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                started = daemon.statistics()
                path.write_text('[fragile]\nlabel = "two"\n')
                await daemon.reload()
                await trio.testing.wait_all_tasks_blocked()
                [fragile] = FRAGILE_BUILT
                enabled = daemon.statistics()
                daemon.request_shutdown("test")
        assert "fragile" not in started.services
        assert "gadget" in started.services
        assert "fragile not started: OSError: cannot build with this label" in (
            started.status.split("; ")
        )
        assert any(sent.startswith("READY=1") for sent in notifier.sent)
        builds = [e for e in logs if e["event"] == "service_build_failed"]
        assert [e["outcome"] for e in builds] == ["the service stays stopped"]
        assert "fragile two" in enabled.status.split("; ")
        assert fragile.drained.is_set()
        assert "agent_stopped" in [e["event"] for e in logs]

    async def test_a_failed_rebuild_keeps_the_old_service(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """The old service keeps running with its section, the gadget after it in the
        registry still gets its new one, and a later reload with a good section rebuilds."""
        notifier = StatusRecordingNotifier()
        path = tmp_path / "agent.toml"
        daemon = self._fragile(host, path, "[gadget]\ninterval_s = 2\n", notifier)
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [old] = FRAGILE_BUILT
                [gadget] = BUILT
                path.write_text('[fragile]\nlabel = "boom"\n[gadget]\ninterval_s = 5\n')
                await daemon.reload()
                await trio.testing.wait_all_tasks_blocked()
                assert gadget.section.interval_s == 5.0
                assert [old] == FRAGILE_BUILT
                assert not old.drained.is_set()
                failed = daemon.statistics().status
                path.write_text('[fragile]\nlabel = "two"\n[gadget]\ninterval_s = 5\n')
                await daemon.reload()
                await old.drained.wait()
                await trio.testing.wait_all_tasks_blocked()
                [_, new] = FRAGILE_BUILT
                rebuilt = daemon.statistics().status
                daemon.request_shutdown("test")
        assert {
            "event": "service_build_failed",
            "service": "fragile",
            "error": "OSError('cannot build with this label')",
            "outcome": "the service runs on with its previous settings",
            "log_level": "error",
        } in logs
        error = "fragile one (new settings not applied: OSError: cannot build with this label)"
        assert error in failed.split("; ")
        assert f"STATUS={failed}" in notifier.sent
        assert "fragile two" in rebuilt.split("; ")
        assert new.drained.is_set()
        assert daemon.statistics().reloads == 2

    async def test_a_failed_enable_stays_stopped_and_is_tried_again(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """Enabled by a reload but not buildable: nothing runs, the status says so, and a
        SIGHUP with the same file tries again; then the agent stops as usual."""
        notifier = StatusRecordingNotifier()
        path = tmp_path / "agent.toml"
        daemon = self._fragile(host, path, "[fragile]\nenable = false\n", notifier)
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                path.write_text('[fragile]\nlabel = "boom"\n')
                await daemon.reload()
                await trio.testing.wait_all_tasks_blocked()
                failed = daemon.statistics()
                await daemon.reload()
                daemon.request_shutdown("test")
        assert FRAGILE_BUILT == []
        assert "fragile" not in failed.services
        assert "fragile not started: OSError: cannot build with this label" in (
            failed.status.split("; ")
        )
        builds = [e for e in logs if e["event"] == "service_build_failed"]
        assert [e["outcome"] for e in builds] == ["the service stays stopped"] * 2
        assert "service_enabled" not in [e["event"] for e in logs]
        assert "agent_stopped" in [e["event"] for e in logs]


class TestStopComesFirst:
    """A stop requested while the daemon waits for something else: nothing holds it up, the
    drain deadline counts from the request, so the exit comes within shutdown_timeout_s
    + 1 s of it (SHUTDOWN_TIMEOUT_S here, drains cut at 2 s, nothing slow after them)."""

    async def test_sigterm_while_a_reload_waits_for_the_notify_queue(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """SIGTERM while a SIGHUP's RELOADING=1 waits for room: the signal is handled at
        once (the reload is a task of its own), and the drains end 2 s after it."""
        notifier = SlowQueueNotifier()
        daemon = _daemon(host, tmp_path / "agent.toml", SLOW_GADGET, notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                signal.raise_signal(signal.SIGHUP)
                await notifier.reloading_began.wait()
                began = trio.current_time()
                signal.raise_signal(signal.SIGTERM)
            stopped = trio.current_time() - began
        assert BUILT[0].drain_cancelled
        assert stopped == pytest.approx(SHUTDOWN_TIMEOUT_S)

    async def test_a_stop_while_ready_waits_for_the_notify_queue(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A stop while READY=1 waits for room gives that send up: READY=1 is never sent,
        and the drains end 2 s after the request."""
        notifier = SlowQueueNotifier()
        daemon = _daemon(host, tmp_path / "agent.toml", SLOW_GADGET, notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await notifier.ready_began.wait()
                began = trio.current_time()
                daemon.request_shutdown("test")
            stopped = trio.current_time() - began
        assert (notifier.sent, daemon.statistics().ready) == (["STOPPING=1 STATUS=None"], False)
        assert BUILT[0].drain_cancelled
        assert stopped == pytest.approx(SHUTDOWN_TIMEOUT_S)

    @pytest.mark.parametrize(
        "held", [FacilityStatus.INIT, FacilityStatus.ACTIVE], ids=lambda status: status.name
    )
    async def test_a_stop_while_the_host_holds_a_facility_report(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        held: FacilityStatus,
    ) -> None:
        """A stop while the host holds the facility Init (or Active) report gives the report
        up at once: no further service starts, READY=1 is never sent, and the drains of
        the services started (before Active) end 2 s after the request (with none, at once)."""
        reaching = trio.Event()
        report = FacilityReporter.report

        async def holding(reporter: FacilityReporter, status: FacilityStatus) -> None:
            if status is held:
                reaching.set()
                await trio.sleep_forever()  # the host never answers this one
            await report(reporter, status)

        monkeypatch.setattr(FacilityReporter, "report", holding)
        notifier = RecordingNotifier()
        daemon = _daemon(host, tmp_path / "agent.toml", SLOW_GADGET, notifier)
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await reaching.wait()
                began = trio.current_time()
                daemon.request_shutdown("test")
            stopped = trio.current_time() - began
        abandoned = {"event": "facility_report_abandoned", "status": held.name}
        assert any(abandoned.items() <= e.items() for e in logs)
        assert (notifier.sent, daemon.statistics().ready) == (["STOPPING=1 STATUS=None"], False)
        started = held is FacilityStatus.ACTIVE
        assert [gadget.drain_cancelled for gadget in BUILT] == ([True] if started else [])
        assert stopped == pytest.approx(SHUTDOWN_TIMEOUT_S if started else 0.0)

    async def test_a_stop_while_the_host_holds_the_version_query(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A stop while the host holds the answer to the host version query (a call the
        driver gives up when cancelled) ends the run at once: the query is given up and
        nothing else starts."""
        reaching = trio.Event()
        request = Device.request

        async def holding(device: Device, message: Request[Any]) -> object:
            if isinstance(message, GetHostVersion):
                reaching.set()
                await trio.sleep_forever()  # the host never answers
            return await request(device, message)

        monkeypatch.setattr(Device, "request", holding)
        daemon = _daemon(host, tmp_path / "agent.toml", SLOW_GADGET)
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await reaching.wait()
                daemon.request_shutdown("test")
        assert trio.current_time() == 0.0
        reported = [e["status"] for e in logs if e["event"] == "facility_status_reported"]
        assert (reported, BUILT) == (["TERMINATING", "TERMINATED"], [])

    async def test_a_stop_while_reloading_applies_nothing(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A stop while a reload's RELOADING=1 waits for room (a reload overtaken by a stop
        from elsewhere, ``--duration`` say): the reload gives the message up (it would follow
        STOPPING=1), applies nothing (it would rebuild the gadget after every service was
        told to stop) and sends no READY=1; the daemon ends when the drains do. No room ever
        comes: a RELOADING=1 still waiting for it would hold the daemon up."""
        notifier = HeldReloadingNotifier()
        path = tmp_path / "agent.toml"
        daemon = _daemon(
            host, path, "[daemon]\nshutdown_timeout_s = 5\n[gadget]\ndrain_s = 1\n", notifier
        )
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                path.write_text('[daemon]\nshutdown_timeout_s = 5\n[gadget]\nlabel = "two"\n')
                nursery.start_soon(daemon.reload)
                await notifier.reloading_began.wait()
                daemon.request_shutdown("test")
        assert (BUILT, gadget.drained.is_set(), trio.current_time()) == ([gadget], True, 1.0)
        assert notifier.sent == ["READY=1", "STOPPING=1 STATUS=None"]
        skipped = [e["reason"] for e in logs if e["event"] == "config_reload_skipped"]
        assert skipped == ["the agent is starting or stopping"]
        assert "config_reloaded" not in [e["event"] for e in logs]

    async def test_a_stop_gives_up_a_reloads_ready(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A stop while a reload's READY=1 waits for room gives that READY=1 up: STOPPING=1
        is the last state systemd hears, and the daemon does not wait for room that never
        comes."""
        notifier = HeldReloadReadyNotifier()
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[daemon]\nshutdown_timeout_s = 5\n", notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                nursery.start_soon(daemon.reload)
                await notifier.reload_ready_began.wait()
                daemon.request_shutdown("test")
        assert notifier.sent == ["READY=1", "RELOADING=1", "STOPPING=1 STATUS=None"]

    async def test_reloads_run_one_at_a_time(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A reload while one runs waits for it; a third while the second waits is merged
        into the second, which reads the file after it."""
        notifier = HeldReloadingNotifier()
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "", notifier)
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                nursery.start_soon(daemon.reload)
                await notifier.reloading_began.wait()
                nursery.start_soon(daemon.reload)
                await trio.testing.wait_all_tasks_blocked()
                path.write_text('[gadget]\nlabel = "two"\n')
                await daemon.reload()  # merged: returns at once
                assert notifier.sent == ["READY=1"]
                notifier.room.set()
                await trio.testing.wait_all_tasks_blocked()
                daemon.request_shutdown("test")
        assert notifier.sent == [
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "STOPPING=1 STATUS=None",
        ]
        assert [gadget.section.label for gadget in BUILT] == ["one", "two"]
        assert [e["event"] for e in logs].count("config_reload_merged") == 1

    async def test_a_reload_does_not_wait_for_the_last_ones_ready(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A reload while the last one's READY=1 waits for room applies its file at once and
        gives that READY=1 up: its own RELOADING=1 and READY=1 follow. (It waited for the
        READY=1, up to STATE_SEND_TIMEOUT_S, so its file applied 30 s late.)"""
        notifier = HeldReloadReadyNotifier()
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "", notifier)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                path.write_text('[gadget]\nlabel = "two"\n')
                nursery.start_soon(daemon.reload)
                await notifier.reload_ready_began.wait()
                notifier.reload_ready_began = trio.Event()
                path.write_text('[gadget]\nlabel = "three"\n')
                nursery.start_soon(daemon.reload)
                await notifier.reload_ready_began.wait()  # once the second one applied
                daemon.request_shutdown("test")
        assert [gadget.section.label for gadget in BUILT] == ["one", "two", "three"]
        assert notifier.sent == ["READY=1", "RELOADING=1", "RELOADING=1", "STOPPING=1 STATUS=None"]


class TestDrain:
    """The stop: one drain deadline, then cancellation."""

    async def test_drain_in_progress_finishes_within_the_drain_time(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A drain of 3 s under a 5 s deadline completes; the daemon ends right after it."""
        path = tmp_path / "agent.toml"
        text = "[daemon]\nshutdown_timeout_s = 5\n[gadget]\ndrain_s = 3\n"
        daemon = _daemon(host, path, text)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                signal.raise_signal(signal.SIGTERM)
                await gadget.draining.wait()
                began = trio.current_time()
            stopped = trio.current_time() - began
        assert gadget.drained.is_set()
        assert not gadget.drain_cancelled
        assert stopped == pytest.approx(3.0)

    async def test_stop_during_a_restart_drain(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A stop while a reload's drain runs lets that drain finish by the stop's deadline."""
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[daemon]\nshutdown_timeout_s = 5\n[gadget]\ndrain_s = 4\n")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                path.write_text(
                    '[daemon]\nshutdown_timeout_s = 5\n[gadget]\ndrain_s = 4\nlabel = "b"\n'
                )
                await daemon.reload()
                await gadget.draining.wait()
                await trio.sleep(2)
                daemon.request_shutdown("test")
            ended = trio.current_time()
        assert gadget.drained.is_set()
        assert not BUILT[1].started.is_set()  # the stop called the replacement off
        assert ended == pytest.approx(4.0)

    async def test_drain_past_the_deadline_is_cancelled(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A drain that needs 30 s is cancelled at the 2 s deadline; the run ends in time."""
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[daemon]\nshutdown_timeout_s = 2\n[gadget]\ndrain_s = 30\n")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                began = trio.current_time()
                daemon.request_shutdown("test")
            stopped = trio.current_time() - began
        assert gadget.drain_cancelled
        assert not gadget.drained.is_set()
        assert 2.0 <= stopped <= 2.0 + FINAL_PHASE_S

    async def test_a_slow_stopping_message_does_not_delay_the_deadline(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """The drain deadline counts from the stop request, not from STOPPING=1's send,
        which a full notify queue can hold for longer than the drains may take."""
        path = tmp_path / "agent.toml"
        text = "[daemon]\nshutdown_timeout_s = 2\n[gadget]\ndrain_s = 30\n"
        daemon = _daemon(host, path, text, FullQueueNotifier())
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                began = trio.current_time()
                daemon.request_shutdown("test")
            stopped = trio.current_time() - began
        assert BUILT[0].drain_cancelled
        assert 2.0 <= stopped <= 2.0 + FINAL_PHASE_S

    async def test_an_exit_on_failure_drains_every_service_first(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """A service past its restart budget ends the agent only after every service drained,
        as at a stop: where the agent keeps the heartbeat, the host's check is off, so the
        host does not flat-line the guest while the agent is down; the facility says Failed."""
        host = SimulatedHost(personality="passthrough", seed=1)
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[daemon]\nrestart_budget = 0\n[gadget]\nstart_fails = true\n")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                with pytest.RaisesGroup(ServiceFailedError, flatten_subgroups=True):
                    await daemon.run()
                await trio.sleep(10.0)  # past the host's flat-line timeout (4 s)
                heartbeat = host.status()["heartbeat"]
                facilities = host.status()["facilities"]
                nursery.cancel_scope.cancel()
        assert isinstance(heartbeat, dict)
        assert isinstance(facilities, dict)
        assert (heartbeat["enabled"], heartbeat["flatline_count"]) == (False, 0)
        assert facilities[str(int(Facility.VBOX_SERVICE))]["status"] == FacilityStatus.FAILED
        assert BUILT[0].drained.is_set()

    async def test_an_error_during_start_up_is_never_announced_as_ready(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A started service that ends the agent while a later one still starts: the
        remaining start-up is given up, and neither READY=1 nor facility Active is sent
        before the exit (the facility goes from Init to Failed)."""
        registry = (*SERVICES, BREAKER, GADGET)
        path = tmp_path / "agent.toml"
        path.write_text("[gadget]\nstart_s = 5\n")
        config = load_config(path, section_models(registry))
        daemon = Daemon(config, SimOpener(host), notifier=Notifier(None), registry=registry)
        with _ends_on_protocol_error() as logs:
            await daemon.run()
        reported = [e["status"] for e in logs if e["event"] == "facility_status_reported"]
        assert reported == ["INIT", "FAILED"]
        assert not daemon.statistics().ready
        [gadget] = BUILT
        assert gadget.drained.is_set()

    async def test_a_failure_during_a_start_ends_the_start_up(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A service that ends the agent before its start completed: the services started
        beside it (all start at once) drain, and neither READY=1 nor facility Active is
        sent."""
        text = "[breaker]\nwhile_starting = true\n"
        daemon = _breaking(host, text, Notifier(None), tmp_path / "agent.toml")
        with _ends_on_protocol_error() as logs:
            await daemon.run()
        reported = [e["status"] for e in logs if e["event"] == "facility_status_reported"]
        assert reported == ["INIT", "FAILED"]
        assert not daemon.statistics().ready
        [gadget] = BUILT
        assert gadget.drained.is_set()

    async def test_a_failure_while_active_is_reported_is_never_ready(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A fatal error while the host still takes the facility Active report (slow here):
        READY=1 is never sent, the agent never ready."""
        notifier = RecordingNotifier()
        text = "[breaker]\nbreak_after_s = 0.1\n"
        daemon = _breaking(host, text, notifier, tmp_path / "agent.toml")
        host.set_delay(int(RequestType.REPORT_GUEST_STATUS), 0.3)
        with _ends_on_protocol_error() as logs:
            await daemon.run()
        assert notifier.sent == ["STOPPING=1 STATUS=exiting on an error: services draining"]
        assert not daemon.statistics().ready
        assert "agent_ready" not in [e["event"] for e in logs]

    async def test_a_pump_failure_is_seen_before_the_services_end(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The event pump's fatal error while the facility Active report is in flight; the
        services' end, which comes one scheduling step later, is held back here until the
        host answered: a SIGHUP meanwhile is skipped and READY=1 is never sent."""
        services_end = Supervisor.end
        held, answered = trio.Event(), trio.Event()

        async def end(supervisor: Supervisor[Any], deadline: float) -> None:
            held.set()
            await answered.wait()
            await services_end(supervisor, deadline)

        reporter_report = FacilityReporter.report

        async def report(reporter: FacilityReporter, status: FacilityStatus) -> None:
            await reporter_report(reporter, status)
            if status is FacilityStatus.ACTIVE:
                answered.set()

        async def breaking_run(
            pump: EventPump, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> NoReturn:
            del pump
            task_status.started()
            await trio.sleep(0.1)  # the pump's own work, until the host's answer is broken
            msg = "the event waiter's answer broke the protocol"
            raise LocalProtocolError(msg)

        monkeypatch.setattr(Supervisor, "end", end)
        monkeypatch.setattr(FacilityReporter, "report", report)
        monkeypatch.setattr(EventPump, "run", breaking_run)
        notifier = RecordingNotifier()
        daemon = _daemon(host, tmp_path / "agent.toml", "", notifier)
        host.set_delay(int(RequestType.REPORT_GUEST_STATUS), 0.3)
        with _ends_on_protocol_error() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await held.wait()
                await daemon.reload()
        skipped = [e["reason"] for e in logs if e["event"] == "config_reload_skipped"]
        assert skipped == ["the agent is exiting on an error"]
        assert notifier.sent == ["STOPPING=1 STATUS=exiting on an error: services draining"]
        assert not daemon.statistics().ready

    async def test_sighup_during_a_fatal_drain_is_skipped(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A reload while the agent drains to exit on an error changes nothing and tells
        systemd nothing: it said STOPPING=1 and why once the drain began."""
        notifier = RecordingNotifier()
        path = tmp_path / "agent.toml"
        text = "[daemon]\nshutdown_timeout_s = 5\n[gadget]\ndrain_s = 4\n"
        daemon = _breaking(host, text, notifier, path)
        with _ends_on_protocol_error() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                await gadget.draining.wait()
                path.write_text('[gadget]\nlabel = "two"\n[heartbeat]\nenable = false\n')
                await daemon.reload()
        assert notifier.sent == [
            "READY=1",
            "STOPPING=1 STATUS=exiting on an error: services draining",
        ]
        skipped = {
            "event": "config_reload_skipped",
            "reason": "the agent is exiting on an error",
            "log_level": "warning",
        }
        assert skipped in logs
        assert "config_reloaded" not in [e["event"] for e in logs]
        assert (BUILT, gadget.drained.is_set()) == ([gadget], True)

    async def test_a_fatal_error_gives_up_a_ready_waiting_for_room(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A fatal error (at 0.1 s) while the start's READY=1 waits for room (systemd reads
        again at 3 s, within the drain): READY=1 is given up, never sent after STOPPING=1,
        and the agent is not logged ready. (It went once systemd read, and systemd took the
        exiting agent for started.)"""
        notifier = SlowQueueNotifier(ready_room_s=3.0)
        text = "[daemon]\nshutdown_timeout_s = 5\n[breaker]\nbreak_after_s = 0.1\n"
        text += "[gadget]\ndrain_s = 4\n"
        daemon = _breaking(host, text, notifier, tmp_path / "agent.toml")
        with _ends_on_protocol_error() as logs:
            await daemon.run()
        assert notifier.sent == ["STOPPING=1 STATUS=exiting on an error: services draining"]
        assert "agent_ready" not in [e["event"] for e in logs]
        assert not daemon.statistics().ready

    async def test_a_fatal_error_in_the_event_pump_drains_every_service(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The event pump's fatal error ends the agent as a service's does: every service
        drains first (within shutdown_timeout_s), and the facility says Failed."""
        monkeypatch.setattr(EventPump, "run", _breaking_pump_run)
        notifier = RecordingNotifier()
        text = "[daemon]\nshutdown_timeout_s = 5\n[gadget]\ndrain_s = 1\n"
        daemon = _daemon(host, tmp_path / "agent.toml", text, notifier)
        with _ends_on_protocol_error() as logs:
            await daemon.run()
        [gadget] = BUILT
        assert (gadget.drained.is_set(), gadget.drain_cancelled) == (True, False)
        assert notifier.sent[-1] == "STOPPING=1 STATUS=exiting on an error: services draining"
        reported = [e["status"] for e in logs if e["event"] == "facility_status_reported"]
        assert reported == ["INIT", "ACTIVE", "FAILED"]
        assert trio.current_time() == pytest.approx(4.0)

    @pytest.mark.parametrize("source", ["service", "pump"])
    async def test_an_exit_on_an_error_is_bounded_like_a_stop(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        source: str,
    ) -> None:
        """A fatal error at 3 s (a service's or the pump's), a drain cut at D = 5 s and a host
        that never answers the facility Failed report (a call the driver can cancel): the
        report is abandoned at the end of the final phase, so the process exits within
        shutdown_timeout_s + 1 s of the error."""
        blocked = FacilityReporter.report

        async def report(reporter: FacilityReporter, status: FacilityStatus) -> None:
            if status is FacilityStatus.FAILED:
                await trio.sleep_forever()
            await blocked(reporter, status)

        monkeypatch.setattr(FacilityReporter, "report", report)
        text = "[daemon]\nshutdown_timeout_s = 2\n[gadget]\ndrain_s = 10\n"
        path = tmp_path / "agent.toml"
        if source == "pump":
            monkeypatch.setattr(EventPump, "run", _breaking_pump_run)
            daemon = _daemon(host, path, text, Notifier(None))
        else:
            daemon = _breaking(host, text + "[breaker]\nbreak_after_s = 3\n", Notifier(None), path)
        with _ends_on_protocol_error() as logs:
            await daemon.run()
        abandoned = {"event": "device_cleanup_abandoned", "what": "facility Failed report"}
        assert any(abandoned.items() <= e.items() for e in logs)
        assert trio.current_time() == pytest.approx(3.0 + 2.0 + FINAL_PHASE_S)

    async def test_a_stop_during_a_fatal_drain_reports_nothing_more(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """SIGTERM while the agent drains to exit on an error: the drains keep their deadline,
        and neither a second STOPPING=1 nor facility Terminating is sent before Failed."""
        notifier = RecordingNotifier()
        text = "[daemon]\nshutdown_timeout_s = 5\n[gadget]\ndrain_s = 4\n"
        daemon = _breaking(host, text, notifier, tmp_path / "agent.toml")
        with _ends_on_protocol_error() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                await gadget.draining.wait()
                daemon.request_shutdown("SIGTERM")
        assert notifier.sent == [
            "READY=1",
            "STOPPING=1 STATUS=exiting on an error: services draining",
        ]
        reported = [e["status"] for e in logs if e["event"] == "facility_status_reported"]
        assert reported == ["INIT", "ACTIVE", "FAILED"]
        assert (gadget.drained.is_set(), trio.current_time()) == (True, 5.0)

    async def test_a_fatal_error_during_a_stop_sends_only_why(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The event pump's fatal error (at 3 s) while a stop's drains run: systemd, told
        STOPPING=1 by the stop, hears only the STATUS= saying why."""
        monkeypatch.setattr(EventPump, "run", _breaking_pump_run)
        notifier = StatusRecordingNotifier()
        text = "[daemon]\nshutdown_timeout_s = 10\n[gadget]\ndrain_s = 5\n"
        daemon = _daemon(host, tmp_path / "agent.toml", text, notifier)
        with _ends_on_protocol_error():
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                daemon.request_shutdown("test")
        assert [m for m in notifier.sent if m.startswith("STOPPING=1")] == [
            "STOPPING=1 STATUS=None"
        ]
        assert "STATUS=exiting on an error: services draining" in notifier.sent

    async def test_stop_during_start_up(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A stop while a service still starts cuts the start short and drains it, as the
        started ones are drained."""
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[daemon]\nshutdown_timeout_s = 5\n[gadget]\nstart_s = 100\n")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await trio.testing.wait_all_tasks_blocked()
                [gadget] = BUILT
                assert not gadget.started.is_set()
                daemon.request_shutdown("test")
            ended = trio.current_time()
        assert ended < FINAL_PHASE_S  # the start-up was not waited for
        assert not gadget.started.is_set()
        assert gadget.drained.is_set()
        assert not daemon.statistics().ready

    async def test_stop_during_a_failed_start_lets_its_drain_finish(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A stop while a service drains after a failed start lets that drain finish within
        the drain time, instead of cancelling it with the start-up."""
        path = tmp_path / "agent.toml"
        text = "[daemon]\nshutdown_timeout_s = 5\n[gadget]\nstart_fails = true\ndrain_s = 3\n"
        daemon = _daemon(host, path, text)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await trio.testing.wait_all_tasks_blocked()
                [gadget] = BUILT
                await gadget.draining.wait()
                daemon.request_shutdown("test")
            ended = trio.current_time()
        assert gadget.drained.is_set()
        assert not gadget.drain_cancelled
        assert ended == pytest.approx(3.0)

    async def test_stop_while_a_rebuilt_service_starts(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A stop while a reload's replacement still starts cancels that start and drains
        the replacement."""
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "[daemon]\nshutdown_timeout_s = 5\n")
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                path.write_text(
                    '[daemon]\nshutdown_timeout_s = 5\n[gadget]\nstart_s = 100\nlabel = "b"\n'
                )
                await daemon.reload()
                await trio.testing.wait_all_tasks_blocked()
                [first, second] = BUILT
                assert first.drained.is_set()
                assert not second.started.is_set()
                daemon.request_shutdown("test")
            ended = trio.current_time()
        assert not second.started.is_set()
        assert second.drained.is_set()
        assert ended < FINAL_PHASE_S

    async def test_a_service_failing_its_start_holds_back_no_other(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """A service first in the registry that fails its start: every other service starts
        and READY=1 follows before its first retry, with a STATUS= that tells it apart; a
        reload meanwhile is applied (here it disables the broken service)."""
        registry = (GADGET, *SERVICES)
        path = tmp_path / "agent.toml"
        path.write_text("[gadget]\nstart_fails = true\n")
        config = load_config(path, section_models(registry))
        notifier = ReadyStatusNotifier()
        daemon = Daemon(
            config, SimOpener(host), config_path=path, notifier=notifier, registry=registry
        )
        with structlog.testing.capture_logs() as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                status = daemon.statistics().status
                path.write_text("[gadget]\nenable = false\n")
                await daemon.reload()
                await trio.testing.wait_all_tasks_blocked()
                after = daemon.statistics()
                daemon.request_shutdown("test")
        events = [(e["event"], e.get("service")) for e in logs]
        ready = events.index(("agent_ready", None))
        started = {name for event, name in events[:ready] if event == "service_started"}
        assert started == {"event-pump", *(spec.name for spec in SERVICES)}
        assert [e for e in events[:ready] if e[0] == "service_failed"] == [
            ("service_failed", "gadget")
        ]
        assert status.startswith("gadget failed, retrying (1x); vm session ")
        assert notifier.sent[0] == f"READY=1 STATUS={status}"
        assert ("service_stopped", "gadget") in events[ready:]
        assert "gadget" not in after.services
        assert "gadget" not in after.status

    async def test_what_a_service_logs_from_a_reload_is_named(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
    ) -> None:
        """Every line a service's code logs carries ``service``: built, in ``reconfigure``
        (which runs in the reload's task) and in a task it starts from there, as the
        balloon restarts its pressure watch (cpuhotplug's ``cpu_sysfs_unreadable`` too)."""
        path = tmp_path / "agent.toml"
        daemon = _daemon(host, path, "")
        merged = [structlog.contextvars.merge_contextvars]
        with structlog.testing.capture_logs(processors=merged) as logs, trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                path.write_text(
                    f'[gadget]\ninterval_s = 5\n[cpuhotplug]\nsysfs_root = "{tmp_path}/none"\n'
                )
                await daemon.reload()
                await trio.testing.wait_all_tasks_blocked()
                daemon.request_shutdown("test")
        named = {
            e["event"]: e.get("service")
            for e in logs
            if e["event"] in {"gadget_built", "gadget_reconfigured", "gadget_task_ran"}
            or e["event"] == "cpu_sysfs_unreadable"
        }
        assert named == {
            "gadget_built": "gadget",
            "gadget_reconfigured": "gadget",
            "gadget_task_ran": "gadget",
            "cpu_sysfs_unreadable": "cpuhotplug",
        }
        assert "agent_ready" in [e["event"] for e in logs if "service" not in e]

    async def test_built_in_config_runs_the_registry_defaults(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """``AgentConfig()`` (no file) builds every service with its section's defaults."""
        daemon = Daemon(AgentConfig(), SimOpener(host), notifier=Notifier(None), registry=REGISTRY)
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                [gadget] = BUILT
                assert gadget.section == GadgetSection()
                daemon.request_shutdown("test")
