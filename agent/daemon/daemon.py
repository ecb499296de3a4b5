"""``Daemon``: the process's root — device, services, readiness, signals, reload, shutdown.

Order of a run: handle signals (from here on SIGTERM/SIGINT stop and SIGHUP reloads, each
reload a task of its own, one at a time, a reload before READY being skipped) → open the
device (version handshake) and claim it (``Device.claim``: a second agent on the device
leaves here, before it changes anything) → serve the claim in a task beside the rest
(``Device.serve_claim``: whatever asks who holds the claim is accepted and closed, so no
queue of such connections keeps a later agent from asking), cancelled as the run ends, just
before the device closes. A failure of that task is logged (``claim_name_serve_failed``)
and ends it alone: the claim stays held, only no longer answered, which degrades it (a later
agent on another node may then rest on its node's lock) but is none of the errors after
which the agent cannot go on (crash-only, :mod:`agent.daemon.supervisor`), so the agent runs
on → report the facility as Init → start the event pump, then every enabled service of the
registry at once, each with ``Supervisor.start_soon`` (services do not depend on each
other), and wait for their first starts together, ``START_WAIT_S`` at most (a service
started or failed and backs off, retried under its restart budget while the others run; one
still starting at the bound goes on starting, named in ``STATUS=``) → facility Active,
``READY=1`` with the combined ``STATUS=`` line → wait for a shutdown request → the stop. A
stop requested during the start-up gives up the step in progress (a host that does not
answer, a notify queue with no room) and skips the rest, ``READY=1`` included:

1. the drain deadline ``D``, ``daemon.shutdown_timeout_s`` after the stop request, was fixed
   by the request (``STOPPING=1`` is sent once the drains began, within ``D``);
2. every service's ``run`` is cancelled and all their ``drain()`` calls run at once, under
   the one deadline ``D`` (services do not depend on each other; the event pump keeps
   running meanwhile, but opens no new waiter), and so does the last give-back of what
   services stopped earlier left behind (``ServiceContext.leftovers``: a drain a reload's
   disable cut short, given back in the background until now), while facility
   Terminating is reported (abandoned if the host does not answer within
   ``REPORT_TIMEOUT_S``); a drain still running at ``D`` is cancelled.
   A service still starting is one of them: the stop ends the daemon's wait for the starts
   (no service starts after the stop request), then cancels the start and drains it under
   ``D`` too;
3. the final phase, at most ``FINAL_PHASE_S`` from the end of the drains and never past
   ``D + FINAL_PHASE_S``: the event pump stops, facility Terminated;
4. the device is closed last, within ``CLOSE_S``.

The device's shielded teardown is bounded by the same ends
(:attr:`agent.device.Device.cleanup_deadline`), so the process ends within
``shutdown_timeout_s + FINAL_PHASE_S + CLOSE_S`` of the stop request, plus twice the
transports' ``GIVE_BACK_S`` at most (a call interrupted at one of those ends gets that long to
come back), under the promised second, whatever the driver or host does: a call that does
not end in time is abandoned with a log line.

A fatal error (see :mod:`agent.daemon.supervisor`), in a service or in the event pump, ends
the run once every service drained under one deadline, ``shutdown_timeout_s`` from the
error, unless the device is gone: no further service starts, facility Active and ``READY=1``
are not sent if not sent yet, SIGHUP is skipped, and systemd hears ``STOPPING=1`` with a
``STATUS=`` saying why; facility Failed follows, in the final phase, and the close within
``CLOSE_S``: the device's teardown is bounded by the same ends as at a stop. A stop requested
meanwhile sends and reports nothing more; a fatal error during a stop sends only the
``STATUS=`` (the stop sent ``STOPPING=1``). A lost device ends the run at once, with
``STOPPING=1`` (or, if sent already, ``STATUS=`` alone) saying it was lost: systemd shows
the last status until the next start.

Reload (SIGHUP): the file is read, parsed and checked on a worker thread, one per process,
while the event loop runs on (a file of 1 MiB takes about a second; a ``[device] path`` on
a mount that does not answer holds its ``stat`` for as long), and what it read is applied
on the loop. The daemon's own sections apply live where they can; each service gets its
new section through ``reconfigure``; one that answers False is drained and rebuilt; a change
of ``enable`` starts or stops the service. A service that cannot be built is logged and
left as it was (the old one runs on, or none starts), ``STATUS=`` says so, and the next
reload tries it again. An invalid file leaves everything as it was, and ``STATUS=`` begins
with :data:`REJECTED_PREFIX` until a reload reads a valid one; a ``[device] path`` that the
next start would refuse with 78 makes it invalid, as ``check-config`` finds it (unless the
agent runs on ``--device`` or a simulated host, which a start uses in its place). A reload
that a stop or a fatal error overtakes (while ``RELOADING=1`` or its ``READY=1`` waits for
room, or while the file is read) gives that step up, the reading's thread abandoned to its
file system, applies nothing and sends no ``READY=1``, so ``STOPPING=1`` stays the last
state sent and the stop waits for no file system; the supervisor, once told to stop every
service, starts and replaces none anyway. A reload's ``READY=1`` waits for room outside the
one-at-a-time turn: the next reload gives it up rather than wait for it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import structlog
import trio

from agent.config import ConfigError, load_config
from agent.daemon.facility import REQUEST_ERRORS, FacilityReporter
from agent.daemon.notify import Notifier
from agent.daemon.signals import handle_signals
from agent.daemon.supervisor import Supervisor
from agent.device import DeviceLostError, open_device
from agent.logconfig import LogOutputStatistics, configure_logging, log_output_statistics
from agent.protocol import FacilityStatus, GetHostVersion, GetSessionId
from agent.protocol.errors import shown_text
from agent.records import record
from agent.services import DrainTime, EventPump, Leftovers, ServiceContext
from agent.services.registry import SERVICES, section_models

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Container, Mapping, Sequence
    from pathlib import Path

    from agent.config import AgentConfig
    from agent.device import Device, DeviceOpener
    from agent.services import EventPumpStatistics, Service, ServiceSection, ServiceSpec, Statistics

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

FINAL_PHASE_S: Final = 0.5
"""Time the stop allows after the drains for the pump, facility Terminated and the close."""
CLOSE_S: Final = 0.25
"""Time the stop allows, after the final phase, to close the device's main session."""
REPORT_TIMEOUT_S: Final = 0.5
"""How long a facility status report may take before it is abandoned."""
STATUS_SEPARATOR: Final = "; "
"""Between the services' fragments in ``STATUS=``."""
EXITING_STATUS: Final = "exiting on an error: services draining"
"""``STATUS=`` from the moment a fatal error's drain begins."""
DEVICE_LOST_PREFIX: Final = "device lost: "
"""Begins the last ``STATUS=`` when the device is gone, followed by the transport's error."""
DEVICE_LOST_NOTICE_S: Final = 1.0
"""How long the ``STOPPING=1`` (or ``STATUS=``) saying the device is gone may wait for room in
the notify queue: the agent exits at once, which systemd sees anyway."""
START_WAIT_S: Final = 5.0
"""How long the start-up waits for the services' first starts, all started at once, before
facility Active and ``READY=1`` go out anyway. A service starts in milliseconds unless the
host keeps it waiting (an HGCM connect may take up to 30 s); one still starting then goes on
starting, and ``STATUS=`` reads ``<name> starting`` until it started. The unit's
``TimeoutStartSec=`` counts on this bound."""
STARTING_SUFFIX: Final = " starting"
"""A service's ``STATUS=`` fragment while its run has not started yet."""
OFF_SUFFIX: Final = " off"
"""After the name of a service that does not run, while what a stopped run of it left is
given back (``balloon off, 61 MB kept``)."""
REJECTED_PREFIX: Final = "last reload rejected: "
"""The first ``STATUS=`` fragment after a reload found the file invalid, until one finds it
valid: a SIGHUP sent by hand, or a file that changed after the unit's ``check-config``, ends
in no failed ``systemctl reload``."""


@record
class DaemonStatistics:
    """What the daemon is doing, for tests and benchmarks.

    Attributes:
        ready: the start-up completed: READY=1 was sent, and no stop came first.
        reloads: configurations applied by SIGHUP.
        status: the current ``STATUS=`` text.
        events: the event pump's counters (None before it exists).
        services: each supervised service's snapshot, by name.
        restarts: restarts (after failures, or replaced on reload) by service name, the
            event pump's (after failures) under ``event-pump``.
        log: the log lines the stream refused (the agent runs on without them).
    """

    ready: bool
    reloads: int
    status: str
    events: EventPumpStatistics | None
    services: Mapping[str, Statistics]
    restarts: Mapping[str, int]
    log: LogOutputStatistics


@final
class Daemon:
    """Runs the agent against one device until asked to stop.

    Args:
        config: the configuration to start with.
        opener: opens the device's sessions.
        config_path: the file SIGHUP re-reads (None: reloads are skipped).
        device_from_file: the device is the file's ``device.path``, so a reload refuses a
            path the next start would refuse with 78, as ``check-config`` does (False: it
            came from ``--device``, or a simulated host, and no start reads the path).
        notifier: sd_notify (default: from the environment).
        registry: the services to build (default: :data:`agent.services.registry.SERVICES`).
    """

    def __init__(
        self,
        config: AgentConfig,
        opener: DeviceOpener,
        *,
        config_path: Path | None = None,
        device_from_file: bool = True,
        notifier: Notifier | None = None,
        registry: Sequence[ServiceSpec[Any]] = SERVICES,
    ) -> None:
        self.config = config
        self._opener = opener
        self._config_path = config_path
        self._device_from_file = device_from_file
        self._notifier = notifier if notifier is not None else Notifier.from_environ()
        self._registry = tuple(registry)
        self._supervisor: Supervisor[Service[Any]] = Supervisor(
            config.daemon, on_change=self._status_changed, on_ending=self._exiting
        )
        # The services sit inside the pump's nursery: the pump's fatal error ends them first.
        self._pump_supervisor: Supervisor[EventPump] = Supervisor(
            config.daemon, on_change=self._status_changed, on_ending=self._supervisor.end
        )
        self._drain_time = DrainTime(config.daemon.shutdown_timeout_s)
        self._shutdown = trio.Event()
        self._drain_deadline = float("inf")
        """``D``: ``shutdown_timeout_s`` from the stop request."""
        self._startup = trio.CancelScope()
        """The start-up step in progress (:meth:`_start_up_step`), which a stop cuts short."""
        self._start_ready = trio.CancelScope()
        """Around the start's READY=1 waiting for room, which a fatal error gives up too."""
        self._opening = trio.CancelScope()
        """Around the device's opening and the run: a shutdown cancels it until the device is
        open (``_device_open``); after that the stop is ``_serve``'s."""
        self._device_open = False
        self._watchdog_scope = trio.CancelScope()
        self._probe_refused = False
        """The last watchdog probe was refused (logged once, until one succeeds)."""
        self._status_dirty = trio.Event()
        self._status = ""
        self._pump: EventPump | None = None
        self._context: ServiceContext | None = None
        self._leftovers = Leftovers(self._status_changed)
        """What services stopped while the agent runs on left at the host: given back in
        the background, and at the stop under ``D`` as the drains are."""
        self._services_nursery: trio.Nursery | None = None
        self._ready = False
        self._stopping = False
        """``STOPPING=1`` is sent, or was: by a stop once its drains began, by a fatal error's
        drain, or as the device was lost."""
        self._reloads = 0
        self._reloading = trio.Lock()
        self._reload_waiting = False
        """A reload waits for the one running: a further one is merged into it."""
        self._reload_step = trio.CancelScope()
        """Around a reload's step in flight (:meth:`_in_reload_step`): RELOADING=1 or
        READY=1, or the file's reading on its thread. A stop or a fatal error gives it up,
        so neither notice follows STOPPING=1 and nothing read is applied."""
        self._config_reader = trio.CapacityLimiter(1)
        """The thread a reload reads the file on: one per process, which a reading a stop
        abandoned keeps until it returns."""
        self._reload_rejected: str | None = None
        """Why the last reload's file was rejected (:attr:`ConfigError.summary`), shown first
        in ``STATUS=`` until a reload reads a valid file."""
        self._build_failures: dict[str, str] = {}
        """Services a reload could not build, with the error: shown in ``STATUS=``, and the
        next reload tries them again."""

    def statistics(self) -> DaemonStatistics:
        """Return readiness, reloads, STATUS text and the services' statistics."""
        return DaemonStatistics(
            ready=self._ready,
            reloads=self._reloads,
            status=self._status,
            events=None if self._pump is None else self._pump.statistics(),
            services={s.name: s.statistics() for s in self._supervisor.services()},
            restarts={**self._pump_supervisor.restarts(), **self._supervisor.restarts()},
            log=log_output_statistics(),
        )

    @property
    def device_opened(self) -> bool:
        """Whether the device opened (a stop may end the run before it does)."""
        return self._device_open

    def request_shutdown(self, reason: str) -> None:
        """Begin a clean shutdown (idempotent); a start-up in progress is cut short.

        The drain deadline ``D`` is fixed now. Whatever step of the start-up runs is given
        up (the host version query, a facility report, ``READY=1`` waiting for room) and
        none follows: the daemon stops waiting for the service that is starting and starts
        no other; the stop then cancels that start and drains the service with the others.
        """
        if not self._shutdown.is_set():
            log.info("shutdown_requested", reason=reason)
            self._shutdown.set()
            self._drain_deadline = trio.current_time() + self.config.daemon.shutdown_timeout_s
            self._startup.cancel()
            self._reload_step.cancel()
            if not self._device_open:
                self._opening.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_shutdown`, SIGTERM or SIGINT; ready after READY=1.

        The signals are handled from the start, before the device opens (a wait of up to
        5 s for a simulated host): SIGTERM or SIGINT then ends the run at once, and SIGHUP
        is a reload skipped until READY=1. Their default actions would end the process.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(handle_signals, self)
            try:
                with self._opening:
                    await self._run_on_device(task_status)
            except* DeviceLostError as lost:
                await self._device_lost(lost)
                raise
            nursery.cancel_scope.cancel()
        log.info("agent_stopped")

    async def _run_on_device(self, task_status: trio.TaskStatus[None]) -> None:
        async with open_device(self._opener) as device:
            await device.claim()  # a second agent leaves before it changes anything
            self._device_open = True
            async with trio.open_nursery() as claimed:
                claimed.start_soon(_serve_claim, device)  # so later agents can ask who holds it
                await self._run_claimed(device, task_status)
                claimed.cancel_scope.cancel()

    async def _run_claimed(self, device: Device, task_status: trio.TaskStatus[None]) -> None:
        with self._start_up_step():
            await self._log_device(device)
        facility = FacilityReporter(device)
        await _report(facility, FacilityStatus.INIT, self._start_up_step(REPORT_TIMEOUT_S))
        try:
            await self._serve(device, facility, task_status)
        except Exception:
            final = _begin_final_phase(device)
            with device.cleanup_scope("facility Failed report"):
                await facility.report_failed()
            device.cleanup_deadline = final + CLOSE_S
            raise

    async def _serve(
        self, device: Device, facility: FacilityReporter, task_status: trio.TaskStatus[None]
    ) -> None:
        pump = EventPump(device, leaving=self._leaving, status_changed=self._status_changed)
        self._pump = pump
        self._context = ServiceContext(
            device,
            pump,
            self._status_changed,
            agent_stopping=self._leaving,
            drain_time=self._drain_time,
            leftovers=self._leftovers,
        )
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as pump_nursery:
                with self._start_up_step():
                    await self._pump_supervisor.start(pump_nursery, pump)
                async with trio.open_nursery() as leftovers:
                    leftovers.start_soon(self._leftovers.serve)
                    try:  # a drain cut short during the stop still leaves its remnant
                        async with trio.open_nursery() as services:
                            self._services_nursery = services
                            with self._start_up_step():
                                await self._start_services(services)
                            await self._announce_ready(device, facility, nursery)
                            task_status.started()
                            await self._shutdown.wait()
                            await self._stop_services(device, facility, services)
                    finally:
                        self._leftovers.close()
                self._services_nursery = None
                final = _begin_final_phase(device)
                self._pump_supervisor.stop_all(final)
            await _report(facility, FacilityStatus.TERMINATED, trio.CancelScope(deadline=final))
            device.cleanup_deadline = final + CLOSE_S
            nursery.cancel_scope.cancel()

    async def _start_services(self, services: trio.Nursery) -> None:
        """Hand every enabled service to the supervisor at once, then wait for their first
        starts together, ``START_WAIT_S`` at most: a service still starting then goes on
        starting (``STATUS=`` names it) while the start-up goes on to ``READY=1``."""
        if self._leaving():  # a stop, or a fatal error: the agent exits once all drained
            await trio.lowlevel.checkpoint()
            return
        built = [
            self._try_build(spec, section, outcome="the service stays stopped")
            for spec in self._registry
            if (section := self._section(self.config, spec)).enable
        ]
        waits = [
            self._supervisor.start_soon(services, service)
            for service in built
            if service is not None
        ]
        with trio.move_on_after(START_WAIT_S):
            for started in waits:
                await started.wait()
        starting = self._supervisor.starting()
        if starting and not self._leaving():
            log.warning("services_still_starting", services=starting, waited_s=START_WAIT_S)

    async def _announce_ready(
        self, device: Device, facility: FacilityReporter, nursery: trio.Nursery
    ) -> None:
        """Facility Active, then ``READY=1``: neither once the agent stops or exits on an
        error (which may begin while the Active report is in flight); a stop gives up
        either one in flight."""
        if self._leaving():
            return
        await _report(facility, FacilityStatus.ACTIVE, self._start_up_step(REPORT_TIMEOUT_S))
        if self._leaving():
            return
        self._status = self._status_text()
        with self._start_up_step(), self._start_ready:
            await self._notifier.ready(self._status)
        if self._leaving():
            return
        self._ready = True
        log.info("agent_ready", services=[s.name for s in self._supervisor.services()])
        nursery.start_soon(self._publish_status)
        interval = self._notifier.watchdog_interval()
        if interval is not None:
            nursery.start_soon(self._watchdog, device, interval)

    async def _stop_services(
        self, device: Device, facility: FacilityReporter, services: trio.Nursery
    ) -> None:
        """Every service drains while facility Terminating is reported, then STOPPING=1.

        ``D`` counts from the stop request (nothing it waits for in the start-up holds the
        stop up): STOPPING=1 is sent after the drains began, within ``D``, so a notify queue
        that holds the message for a while delays neither. A fatal error's drain already
        running keeps its own deadline if earlier, and nothing is reported: systemd heard
        STOPPING=1 then, and facility Failed follows.
        """
        self._watchdog_scope.cancel()
        now = trio.current_time()
        deadline = self._drain_deadline
        self._supervisor.stop_all(deadline)
        self._leftovers.stop(deadline)
        if self._ending():
            return
        self._stopping = True
        # The device's own teardown inside a drain may run into the final phase, not past it.
        device.cleanup_deadline = deadline + FINAL_PHASE_S
        terminating = trio.CancelScope(deadline=min(deadline, now + REPORT_TIMEOUT_S))
        services.start_soon(_report, facility, FacilityStatus.TERMINATING, terminating)
        log.info("services_draining", drain_s=self.config.daemon.shutdown_timeout_s)
        with trio.move_on_at(deadline):
            await self._notifier.stopping()

    async def _exiting(self, deadline: float) -> None:
        """A fatal error's drain began: the watchdog ends and the device's teardown is bound,
        as at a stop; STOPPING=1 (unless a stop sent it) and why. The supervisor bounds this
        call by ``deadline``."""
        if self._context is not None:
            device = self._context.device
            device.cleanup_deadline = min(device.cleanup_deadline, deadline + FINAL_PHASE_S)
        self._watchdog_scope.cancel()
        self._start_ready.cancel()
        self._reload_step.cancel()
        self._status = self._status_text()
        self._leftovers.stop(deadline)
        await self._say_stopping()
        await self._leftovers.wait_given_back()  # the error propagates only after this

    async def _device_lost(self, lost: BaseExceptionGroup[DeviceLostError]) -> None:
        """The device is gone and the agent exits: ``STOPPING=1`` (unless sent already) and
        why, the status systemd shows until the next start, ``DEVICE_LOST_NOTICE_S`` at most."""
        error: BaseException = lost
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        self._status = f"{DEVICE_LOST_PREFIX}{error}"
        with trio.move_on_after(DEVICE_LOST_NOTICE_S):
            await self._say_stopping()

    async def _say_stopping(self) -> None:
        """``STOPPING=1`` with the status, or the status alone once ``STOPPING=1`` was sent."""
        if self._stopping:
            await self._notifier.status(self._status)
        else:
            self._stopping = True
            await self._notifier.stopping(self._status)

    def _start_up_step(self, seconds: float = math.inf) -> trio.CancelScope:
        """A scope for the next step of the start-up, ``seconds`` at most: the stop cancels
        it (at once if requested already)."""
        self._startup = trio.CancelScope(deadline=trio.current_time() + seconds)
        if self._shutdown.is_set():
            self._startup.cancel()
        return self._startup

    def _leaving(self) -> bool:
        """Whether the agent exits once its services drained (a stop, or a fatal error); the
        services ask it through ``ServiceContext.agent_stopping``."""
        return self._shutdown.is_set() or self._ending()

    def _ending(self) -> bool:
        """Whether a fatal error ends the agent: the event pump's supervisor ends one
        scheduling step before the services' one it ends."""
        return self._pump_supervisor.ending or self._supervisor.ending

    def _section(self, config: AgentConfig, spec: ServiceSpec[Any]) -> ServiceSection:
        section: ServiceSection = config.service_section(spec.name, spec.section)
        return section

    def _build(self, spec: ServiceSpec[Any], section: ServiceSection) -> Service[Any]:
        if self._context is None:  # pragma: no cover - services are built while serving
            msg = "services are built only while the daemon serves"
            raise RuntimeError(msg)
        with structlog.contextvars.bound_contextvars(service=spec.name):
            return spec.build(self._context, section)

    def _status_changed(self) -> None:
        self._status_dirty.set()

    def _status_text(self) -> str:
        if self._ending():
            return EXITING_STATUS
        retrying = self._supervisor.retrying()
        stopping = self._supervisor.stopping()
        starting = set(self._supervisor.starting())
        fragments = []
        if self._reload_rejected is not None:
            fragments.append(
                f"{REJECTED_PREFIX}{shown_text(self._reload_rejected)}: previous config in effect"
            )
        pump_failures = self._pump_supervisor.retrying().get(EventPump.name)
        if pump_failures is not None:  # no service hears the host meanwhile
            fragments.append(f"event pump failed, retrying ({pump_failures}x)")
        elif self._pump is not None and (failing := self._pump.failing()) is not None:
            fragments.append(f"event pump: {failing}, retrying")
        supervised = {service.name: service for service in self._supervisor.services()}
        for spec in self._registry:  # whatever order the start and the reloads ran them in
            service = supervised.get(spec.name)
            error = self._build_failures.get(spec.name)
            # What a stopped run left (e.g. balloon chunks its drain kept) follows whatever
            # the service's fragment reads, until it is given back or a new run takes it.
            left = self._leftovers.status(spec.name)
            if service is None:
                if error is None and left is None:
                    continue
                off = f"{spec.name}{OFF_SUFFIX}"
                text = off if error is None else f"{spec.name} not started: {error}"
                unapplied = ""
            else:
                text = _run_status(service, retrying, stopping, starting)
                unapplied = "" if error is None else f" (new settings not applied: {error})"
            kept = f", {left}" if left is not None else ""
            fragments.append(f"{text}{kept}{unapplied}")
        return STATUS_SEPARATOR.join(fragments) if fragments else "no services running"

    async def _publish_status(self) -> None:
        """Send ``STATUS=`` whenever a service reports a change (no change, no wake-up).

        A text the notify queue had no room for goes with the notifier's next message (the
        next watchdog ping, or the next change in its place), with no retry of its own.
        """
        while True:
            await self._status_dirty.wait()
            self._status_dirty = trio.Event()
            text = self._status_text()
            if text != self._status:
                self._status = text
                await self._notifier.status(text)

    async def _log_device(self, device: Device) -> None:
        try:
            with trio.fail_after(REPORT_TIMEOUT_S):
                version = await device.request(GetHostVersion())
        except (*REQUEST_ERRORS, trio.TooSlowError) as exc:
            log.warning("host_version_unavailable", error=str(exc) or "timed out")
            return
        log.info(
            "device_opened",
            device=device.description,
            host_version=str(version),
            host_features=f"{version.features:#x}",
        )

    async def _watchdog(self, device: Device, interval: float) -> None:
        """Ping systemd's watchdog while a cheap request still goes through the device.

        Ends when the stop begins (systemd's stop timeout applies from then on), so no probe
        is left in flight to hold up the final phase.
        """
        with self._watchdog_scope:
            await self._ping_watchdog(device, interval)

    async def _ping_watchdog(self, device: Device, interval: float) -> None:
        """Every ``interval`` on a fixed schedule, probe the device and ping once it answers.

        The probe of one interval may answer until the next one begins: consecutive pings
        are then less than two intervals (``WATCHDOG_USEC``) apart. An interval whose probe
        got no answer sends no ping; its probe is given up as the next interval begins. A
        lost device ends the agent (``DeviceLostError`` goes up).
        """
        next_start = trio.current_time()
        while True:
            next_start += interval
            window = next_start - trio.current_time()
            answered = False
            with trio.move_on_at(next_start):
                await self._probe(device)
                answered = True
                await self._notifier.watchdog()
            if not answered:
                log.error("watchdog_probe_timed_out", timeout_s=round(window, 3))
            await trio.sleep_until(next_start)

    async def _probe(self, device: Device) -> None:
        """Return once the device answered GET_SESSION_ID: a refusal (a status, a malformed
        reply) came back through the device and the event loop too, so it counts, logged
        once until a probe succeeds again (``watchdog_probe_answered``)."""
        try:
            await device.request(GetSessionId())
        except REQUEST_ERRORS as exc:
            if not self._probe_refused:
                self._probe_refused = True
                log.warning(
                    "watchdog_probe_refused", error=str(exc), outcome="answered: the ping goes"
                )
            return
        if self._probe_refused:
            self._probe_refused = False
            log.info("watchdog_probe_answered")

    async def reload(self) -> None:
        """Re-read the config file: apply what can change live, keep the old one if invalid.

        One reload at a time: a call while another runs waits for it, and a call while one
        already waits returns at once (that one reads the file after this call). A stop or a
        fatal error that begins while ``RELOADING=1`` is sent applies nothing, and no
        ``READY=1`` follows. The ``READY=1`` ending a reload waits for room outside the turn:
        the next reload gives it up (its own ``RELOADING=1`` and ``READY=1`` follow) rather
        than wait for it.
        """
        if self._reload_waiting:
            log.info("config_reload_merged", reason="a reload waiting to run reads the file")
            await trio.lowlevel.checkpoint()
            return
        self._reload_waiting = True
        try:
            await self._reloading.acquire()
        finally:
            self._reload_waiting = False
        began = False
        try:
            self._reload_step.cancel()  # the last reload's READY=1, if it still waits for room
            if began := not self._reload_skipped():
                await self._reload()
        finally:
            self._reloading.release()
            if began:
                await self._in_reload_step(partial(self._notifier.ready, None))

    async def _reload(self) -> None:
        await self._in_reload_step(self._notifier.reloading)
        if not self._reload_skipped():
            new = await self._in_reload_step(self._read_config)
            if not self._reload_skipped() and new is not None:  # no stop while it read
                self._apply(new)

    async def _in_reload_step(self, step: Callable[[], Awaitable[_T]]) -> _T | None:
        """Run one step of a reload (a notice, the file's reading) unless the agent is
        leaving; a stop or a fatal error that begins meanwhile gives it up (None): a notice
        waiting for room, or the reading's thread, abandoned to a file system that holds it."""
        if self._leaving():
            return None
        self._reload_step = trio.CancelScope()
        with self._reload_step:
            return await step()
        return None

    def _reload_skipped(self) -> bool:
        """Whether a reload must not apply now (logged): not ready yet, or leaving."""
        if self._ending():
            log.warning("config_reload_skipped", reason="the agent is exiting on an error")
            return True
        if not self._ready or self._shutdown.is_set():
            log.warning("config_reload_skipped", reason="the agent is starting or stopping")
            return True
        return False

    async def _read_config(self) -> AgentConfig | None:
        """The file's config, or None if it is rejected (logged, and shown in ``STATUS=``).

        It is read, parsed and checked on a worker thread (:attr:`_config_reader`), so the
        event loop runs on meanwhile: a file of 1 MiB takes about a second, and a
        ``[device] path`` on a mount that does not answer holds its ``stat`` for as long.
        """
        if self._config_path is None:
            log.warning("config_reload_skipped", reason="the agent runs without a config file")
            await trio.lowlevel.checkpoint()
            return None
        load = partial(
            load_config,
            self._config_path,
            section_models(self._registry),
            check_device=self._device_from_file,
        )
        try:
            config = await _load_off_the_loop(load, self._config_reader)
        except ConfigError as exc:
            log.error(
                "config_reload_rejected",
                path=str(self._config_path),
                errors=exc.listed,
                outcome="the running config stays in effect",
            )
            self._reload_rejected = exc.summary
            self._status_changed()
            return None
        if self._reload_rejected is not None:
            self._reload_rejected = None
            self._status_changed()
        for warning in config.warnings:  # as `run` logs them at start
            log.warning("config_deprecated", path=str(self._config_path), warning=warning)
        return config

    def _apply(self, new: AgentConfig) -> None:
        old = self.config
        needs_restart = ["device"] if new.device != old.device else []
        if needs_restart:
            # The device stays open as it is: the config keeps the [device] in use, so every
            # reload until the next start says again that the file's one waits.
            log.warning("config_change_needs_restart", sections=needs_restart)
            new = new.model_copy(update={"device": old.device})
        self.config = new
        changed = [name for name in ("daemon", "log") if getattr(old, name) != getattr(new, name)]
        if "log" in changed:
            configure_logging(new.log)
        if "daemon" in changed:
            self._supervisor.config = new.daemon
            self._pump_supervisor.config = new.daemon
            self._drain_time.set(new.daemon.shutdown_timeout_s)
        for spec in self._registry:
            before, after = self._section(old, spec), self._section(new, spec)
            if before != after:
                changed.append(spec.name)
                self._reconfigure(spec, after)
            elif spec.name in self._build_failures:
                self._reconfigure(spec, after)  # the last reload could not build it
        if changed:
            self._reloads += 1
        # What applied, and what waits for the next start (logged just before).
        log.info("config_reloaded", changed=changed, needs_restart=needs_restart)

    def _reconfigure(self, spec: ServiceSpec[Any], section: ServiceSection) -> None:
        """Give service ``spec`` its new section: start, stop, apply live or rebuild it.

        What the service logs meanwhile, and every task it starts from here, is named as its
        run is (the supervisor binds ``service`` there), though this is the reload's task.
        """
        with structlog.contextvars.bound_contextvars(service=spec.name):
            self._reconfigure_bound(spec, section)

    def _reconfigure_bound(self, spec: ServiceSpec[Any], section: ServiceSection) -> None:
        name = spec.name
        if self._build_failures.pop(name, None) is not None:
            self._status_changed()
        if not section.enable:
            deadline = trio.current_time() + self.config.daemon.shutdown_timeout_s
            self._supervisor.stop(name, deadline)
            self._status_changed()
            log.info("service_disabled", service=name)
            return
        service = self._supervisor.current(name)
        if service is None:
            built = self._try_build(spec, section, outcome="the service stays stopped")
            if built is not None:
                self._launch(built)
                self._status_changed()  # "<name> starting" until it started
                log.info("service_enabled", service=name)
            return
        try:
            applied = service.reconfigure(section)
        except Exception as exc:  # noqa: BLE001 - a broken reconfigure means a restart
            log.error("service_reconfigure_failed", service=name, error=repr(exc))
            applied = False
        if applied:
            log.info("service_reconfigured", service=name)
            self._status_changed()
        else:
            # Routine, not a fault: the service cannot take this section live, so a new one
            # is built from it (service_drained and service_replaced follow).
            log.info("service_needs_restart", service=name)
            outcome = "the service runs on with its previous settings"
            built = self._try_build(spec, section, outcome=outcome)
            if built is not None:
                self._supervisor.replace(name, built)

    def _try_build(
        self, spec: ServiceSpec[Any], section: ServiceSection, *, outcome: str
    ) -> Service[Any] | None:
        """Build a service at start or for a reload; None (logged, and shown in ``STATUS=``)
        if it fails.

        A constructor is synchronous and reaches neither the device nor the session, so no
        error of its own can mean that the agent cannot go on: like a start failure the
        supervisor retries, it is that service's alone, and the start or the reload goes on
        for the others. The next reload tries again.
        """
        try:
            return self._build(spec, section)
        except Exception as exc:  # noqa: BLE001 - plug-ins are third-party code
            log.error("service_build_failed", service=spec.name, error=repr(exc), outcome=outcome)
            self._build_failures[spec.name] = f"{type(exc).__name__}: {exc}"
            self._status_changed()
            return None

    def _launch(self, service: Service[Any]) -> None:
        if (
            not self._supervisor.replace(service.name, service)
            and self._services_nursery is not None
        ):
            self._supervisor.start_soon(self._services_nursery, service)


async def _load_off_the_loop(
    load: Callable[[], AgentConfig], limiter: trio.CapacityLimiter
) -> AgentConfig:
    """``load()`` on a worker thread under ``limiter``, the event loop running on meanwhile; a
    cancel abandons the thread to its file system (it keeps its token until it returns)."""
    return await trio.to_thread.run_sync(
        load, limiter=limiter, thread_name="config-reload", abandon_on_cancel=True
    )


async def _serve_claim(device: Device) -> None:
    """Run :meth:`Device.serve_claim <agent.device.Device.serve_claim>` until cancelled; its
    failure is logged (``claim_name_serve_failed``) and ends this task alone.

    The claim is still held (the node's lock and the bound name go with the device's close),
    only no longer answered: a later agent is refused as long as the name's queue has room,
    and, once it is full, rests on its node's lock (``claim_name_untrusted``). That is a
    degraded claim, not an agent that cannot go on, so no fatal error is made of it.
    """
    try:
        await device.serve_claim()
    except Exception as exc:  # the claim stays held: the agent runs on
        log.error(
            "claim_name_serve_failed",
            error=repr(exc),
            exc_info=exc,
            outcome="the claim stays held; a flood of connections to its name may now hide "
            "it from a later agent on another node",
        )


def _begin_final_phase(device: Device) -> float:
    """Bound the device's teardown by the final phase, ``FINAL_PHASE_S`` from now and never
    past the drains' bound (``D + FINAL_PHASE_S``); return the phase's end."""
    final = min(trio.current_time() + FINAL_PHASE_S, device.cleanup_deadline)
    device.cleanup_deadline = final
    return final


async def _report(
    facility: FacilityReporter, status: FacilityStatus, scope: trio.CancelScope
) -> None:
    """Report the facility ``status`` in ``scope``; log it when the scope abandons it."""
    with scope:
        await facility.report(status)
    if scope.cancelled_caught:
        log.warning("facility_report_abandoned", status=status.name)


def _run_status(
    service: Service[Any],
    retrying: Mapping[str, int],
    stopping: Container[str],
    starting: Container[str],
) -> str:
    """The ``STATUS=`` fragment of a supervised service, as far as its runs go."""
    name = service.name
    if name in stopping:  # its status may say what it no longer does
        return f"{name} stopping"
    if name in retrying:
        return f"{name} failed, retrying ({retrying[name]}x)"
    if name in starting:
        return f"{name}{STARTING_SUFFIX}"
    return service.status()
