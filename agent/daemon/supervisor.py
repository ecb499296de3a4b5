"""``Supervisor``: runs services, drains them, restarts or replaces them, and stops them.

Each supervised service is one task (:meth:`Supervisor.start`) that goes through phases:
*run* (``service.run`` in a cancel scope of its own), then *drain* (``service.drain()`` under
a deadline, unshielded), then, unless it was told to stop, *run* again: the same service after
a failure (after a back-off), or its replacement (:meth:`Supervisor.replace`) at once. The
service is the supervisor's from the moment it is handed over: a stop that comes while it
still starts cancels that start and drains it like any other run, and whoever waits for the
start may give up waiting without cancelling anything. :meth:`Supervisor.stop_all` is for
good: a service handed over after it drains without running, and nothing is replaced.
Services do not depend on each other, so whoever waits for a start waits only until the
service started or failed its first start (it then backs off and is retried on its own):
one broken service never holds the others back.

Crash-only at the top: errors that mean the agent cannot go on (the device vanished, or we
broke the protocol) propagate and end the daemon with a non-zero exit, so systemd restarts
it. Any other failure of a service restarts that service after a backoff that doubles up
to a ceiling, counted from the failure: the failed run's drain is part of it (a reload's
new ``[daemon]`` applies to a backoff under way, counted from the failure too); more
failures than the budget within the window are fatal too (decided before the failed run's
drain, which is then one of the ending's). A host's refusal
(``agent.protocol.HOST_ERRORS``: a status, a malformed reply) of an optional feature is no
such failure: the services and the event pump count it, show it in their status and try
again on their own (``agent.services._lasting``), so what spends the budget is a bug of the
agent's own, which a restart may clear and which must not go on for ever. Before such an
end every service drains, as at a stop (within ``shutdown_timeout_s``), as VBoxService
stops its services after a failed start: the host's heartbeat check is switched off,
balloon chunks go back. Only a device that vanished skips that, having nobody left to give
back to. An ``on_ending`` hook runs alongside those drains (the daemon's ends the other
supervisor's services the same way, :meth:`Supervisor.end`), and the error propagates only
after it. A restart is counted when the service runs again (the same one after a failure,
or its replacement), not when its backoff begins.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from typing import TYPE_CHECKING, Final, Generic, NoReturn, Protocol, TypeVar, final

import structlog
import trio

from agent.device import DeviceLostError, DeviceUnavailableError
from agent.protocol import AgentError, LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.config import DaemonConfig

log = structlog.get_logger(__name__)

DEVICE_GONE: Final = (DeviceLostError, DeviceUnavailableError)
"""Fatal errors after which no drain can reach the host: they end the daemon at once."""
FATAL_ERRORS: Final = (*DEVICE_GONE, LocalProtocolError)
"""Errors no restart can fix: they end the daemon."""


class ServiceFailedError(AgentError):
    """A service failed more often than its restart budget allows."""


class Supervised(Protocol):
    """What the supervisor runs: a named task that starts, runs until cancelled, and drains."""

    @property
    def name(self) -> str:
        """Stable name, unique among the services of one supervisor."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Run until cancelled; call ``task_status.started()`` once ready."""
        ...

    async def drain(self) -> None:
        """Give back what the service holds; called after each end of :meth:`run`."""
        ...


T = TypeVar("T", bound=Supervised)


class _Phase(enum.Enum):
    RUN = "run"
    DRAIN = "drain"
    BACK_OFF = "back-off"


@final
class _Entry(Generic[T]):
    """One supervised service: what runs, what comes next, and the current phase's scope."""

    __slots__ = (
        "failures",
        "next",
        "phase",
        "running",
        "scope",
        "service",
        "started",
        "stop_deadline",
    )

    def __init__(self, service: T) -> None:
        self.service = service
        self.next: T | None = None
        self.stop_deadline: float | None = None
        self.failures: deque[float] = deque()
        """When the service failed, within the restart window."""
        self.started = trio.Event()
        """Set once the service first started or backs off after a failure, or when its
        supervision ended."""
        self.phase = _Phase.RUN
        self.running = False
        """The current run's service called ``task_status.started()``: false while it
        starts, and in the other phases."""
        self.scope = trio.CancelScope()
        """The current phase's scope; the first run's is made here, so that a stop or a
        replacement before the task runs reaches it."""

    def enter(self, phase: _Phase, deadline: float = float("inf")) -> trio.CancelScope:
        self.phase = phase
        self.running = False
        self.scope = trio.CancelScope(deadline=deadline)
        return self.scope


@final
class Supervisor(Generic[T]):
    """Starts services, drains every run that ends, restarts failed ones, stops on request.

    Args:
        config: restart policy and the drain time (``shutdown_timeout_s``); may be replaced
            on reload.
        on_change: called when a service starts or ends (the daemon refreshes ``STATUS=``).
        on_ending: awaited with the drain deadline when a fatal error begins to end the
            supervisor (or :meth:`end` does), while the services drain, and cancelled at that
            deadline; the error propagates once it returned (an error of the hook's own is
            logged, not raised).
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        on_change: Callable[[], None] | None = None,
        on_ending: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._config = config
        self._reconfigured = trio.lowlevel.ParkingLot()
        """Woken when the config is replaced: a back-off under way re-arms with it."""
        self._on_change = on_change
        self._on_ending = on_ending
        self._entries: dict[str, _Entry[T]] = {}
        self._restarts: dict[str, int] = {}
        self._ending: float | None = None
        """The drain deadline once a fatal error ends the supervisor (:meth:`_end`, :meth:`end`)."""
        self._stopped: float | None = None
        """The earliest deadline of :meth:`stop_all` (a stop, or an ending): from then on
        nothing new runs."""
        self._failed: set[str] = set()
        """Services whose fatal error waits for the others' drains."""
        self._left = trio.lowlevel.ParkingLot()
        """Woken whenever a service's supervision ends."""

    @property
    def config(self) -> DaemonConfig:
        """The restart policy and drain time in force."""
        return self._config

    @config.setter
    def config(self, config: DaemonConfig) -> None:
        """Apply a new policy at once: a back-off under way waits out the new delay,
        counted from the failure (so a shorter one may restart the service now)."""
        self._config = config
        self._reconfigured.unpark_all()

    @property
    def ending(self) -> bool:
        """Whether a fatal error is ending the supervisor (its services are draining)."""
        return self._ending is not None

    def restarts(self) -> dict[str, int]:
        """Return how often each service ran again (after failures or replaced); a
        back-off that a stop ended is no restart."""
        return dict(self._restarts)

    def services(self) -> list[T]:
        """The services supervised now (running, draining or backing off), in start order."""
        return [entry.service for entry in self._entries.values()]

    def stopping(self) -> set[str]:
        """The services told to stop whose supervision has not ended (draining, mostly)."""
        return {name for name, entry in self._entries.items() if entry.stop_deadline is not None}

    def retrying(self) -> dict[str, int]:
        """The services backing off after a failure, with their failures in the window."""
        return {
            name: len(entry.failures)
            for name, entry in self._entries.items()
            if entry.phase is _Phase.BACK_OFF
        }

    def starting(self) -> list[str]:
        """The services whose run has not started yet (first start or a restart), in
        start order."""
        return [
            name
            for name, entry in self._entries.items()
            if entry.phase is _Phase.RUN and not entry.running
        ]

    def current(self, name: str) -> T | None:
        """The service that runs under ``name`` next, unless it is stopping or gone.

        While a replacement waits for the old run's drain, that is the replacement: a new
        section is for it, not for the service on its way out.
        """
        entry = self._entries.get(name)
        if entry is None or entry.stop_deadline is not None:
            return None
        return entry.service if entry.next is None else entry.next

    def replace(self, name: str, service: T) -> bool:
        """Drain the service ``name`` and run ``service`` in its place; False if none runs.

        A service stopped alone (:meth:`stop`) is replaced too: the stop is called off once
        its drain ends. After :meth:`stop_all` nothing is replaced: the service on its way
        out drains and ends, and ``service`` never runs.
        """
        entry = self._entries.get(name)
        if entry is None:
            return False
        if self._stopped is not None:
            return True
        entry.next = service
        entry.stop_deadline = None
        if entry.phase is not _Phase.DRAIN:
            entry.scope.cancel()
        return True

    def stop(self, name: str, deadline: float) -> None:
        """Cancel service ``name``'s run, let it drain until ``deadline``, then end its task."""
        entry = self._entries.get(name)
        if entry is None:
            return
        entry.next = None
        if entry.stop_deadline is None or deadline < entry.stop_deadline:
            entry.stop_deadline = deadline
        if entry.phase is _Phase.DRAIN:
            entry.scope.deadline = min(entry.scope.deadline, deadline)
        else:
            entry.scope.cancel()

    def stop_all(self, deadline: float) -> None:
        """:meth:`stop` every service, all draining at once until the one ``deadline``.

        For good: a service handed over later drains at once without running, and nothing
        is replaced.
        """
        if self._stopped is None or deadline < self._stopped:
            self._stopped = deadline
        for name in list(self._entries):
            self.stop(name, deadline)

    async def end(self, deadline: float) -> None:
        """End as a fatal error does, for one outside: every service drains until ``deadline``.

        Nothing new runs from now on. Returns once every service's supervision ended, or at
        ``deadline``; a service's own fatal error still propagates from its task.
        """
        async with trio.open_nursery() as nursery:
            self._begin_ending(nursery, deadline)
        await self._wait_ended(deadline)

    async def start(self, nursery: trio.Nursery, service: T) -> None:
        """Supervise ``service`` as a task of ``nursery``; return once it first started.

        Or once it failed (its first start, or soon after it) and backs off: the supervisor
        retries it on its own, and the caller need not wait for that. Cancelling this wait
        leaves the service to the supervisor: a stop then cancels its start and drains it,
        under the stop's deadline, as it does every run.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.start_soon(nursery, service).wait()

    def start_soon(self, nursery: trio.Nursery, service: T) -> trio.Event:
        """Supervise ``service`` as a task of ``nursery``; a stop reaches it from now on.

        After :meth:`stop_all` (a stop, or an ending) the service is drained at once under
        that deadline and never runs.

        Returns:
            An event set once the service first started or backs off after a failure, or
            when its supervision ended.
        """
        if service.name in self._entries:
            msg = f"service {service.name} is already supervised"
            raise ValueError(msg)
        entry = _Entry(service)
        self._entries[service.name] = entry
        if self._stopped is not None:
            self.stop(service.name, self._stopped)
        nursery.start_soon(self._supervise, entry)
        return entry.started

    async def _supervise(self, entry: _Entry[T]) -> None:
        """Run ``entry``'s service (and its replacements) until stopped."""
        try:
            await self._run_phases(entry)
        finally:
            entry.started.set()
            del self._entries[entry.service.name]
            self._left.unpark_all()
            self._changed()

    async def _run_phases(self, entry: _Entry[T]) -> None:
        scope = entry.scope
        while True:
            name = entry.service.name
            failure: BaseException | None = None
            fatal: BaseException | None = None
            try:
                # Every task of the service's run (and any it starts) logs with its name.
                with scope, structlog.contextvars.bound_contextvars(service=name):
                    async with trio.open_nursery() as nursery:
                        await nursery.start(entry.service.run)
                        entry.running = True
                        entry.started.set()
                        log.info("service_started", service=name)
                        self._changed()
                    failure = RuntimeError(f"{name}: run() returned")
            except* DEVICE_GONE:
                raise
            except* FATAL_ERRORS as group:
                fatal = group
            except* Exception as group:  # noqa: BLE001 - any other failure restarts the service
                failure = group.exceptions[0] if len(group.exceptions) == 1 else group
            failed_at = trio.current_time()
            if fatal is not None:
                await self._end(entry, fatal)
            if entry.stop_deadline is not None or entry.next is not None:
                failure = None  # it stops or is replaced: no failure to count
            if failure is not None:
                # Counted before the drain: past the budget, the run drains for the ending,
                # so the service can tell (ServiceContext.agent_stopping) that the agent exits.
                try:
                    self._count_failure(entry, failure, failed_at)
                except ServiceFailedError as exc:
                    await self._end(entry, exc)
            await self._drain(entry)
            if failure is not None and entry.stop_deadline is None and entry.next is None:
                with entry.enter(_Phase.BACK_OFF):
                    await self._back_off(entry, failure, failed_at)
            if entry.stop_deadline is not None:
                log.info("service_stopped", service=name)
                return
            if entry.next is not None:
                entry.service, entry.next = entry.next, None
                entry.failures.clear()
                log.info("service_replaced", service=name)
            # Runs again now (no checkpoint before its run is called): that is the restart.
            self._restarts[name] = self._restarts.get(name, 0) + 1
            scope = entry.enter(_Phase.RUN)
            self._changed()  # starting again: no longer retrying, nor the run replaced

    async def _end(self, entry: _Entry[T], error: BaseException) -> NoReturn:
        """Stop every service, let all drain (``entry`` too), raise ``error``.

        The drains (and ``on_ending``) share one deadline, ``shutdown_timeout_s`` from the
        first fatal error; a service started meanwhile is drained without running.
        """
        now = trio.current_time()
        async with trio.open_nursery() as nursery:
            deadline = self._begin_ending(nursery, now + self.config.shutdown_timeout_s)
            log.error(
                "services_draining_before_exit",
                service=entry.service.name,
                error=repr(error),
                drain_s=round(deadline - now, 3),
            )
            await self._drain(entry)
        # Counted as failed only once drained: the others raise (and so cancel every task
        # left) when all that remain are failed, which must not cut this drain short.
        self._failed.add(entry.service.name)
        self._left.unpark_all()
        await self._wait_ended(deadline)
        raise error

    def _begin_ending(self, nursery: trio.Nursery, deadline: float) -> float:
        """Stop every service for the ending; the first call fixes its deadline and starts
        ``on_ending`` in ``nursery``. Return the ending's deadline."""
        if self._ending is None:
            self._ending = deadline
            if self._on_ending is not None:
                nursery.start_soon(self._run_on_ending, self._on_ending, deadline)
        self.stop_all(self._ending)
        return self._ending

    @staticmethod
    async def _run_on_ending(hook: Callable[[float], Awaitable[None]], deadline: float) -> None:
        """Await ``hook`` until ``deadline``; its own failure is logged, never raised in
        place of the error that ends the supervisor."""
        with trio.move_on_at(deadline):
            try:
                await hook(deadline)
            except Exception as exc:  # noqa: BLE001 - the fatal error must be the one to end us
                log.error("on_ending_failed", error=repr(exc))

    async def _wait_ended(self, deadline: float) -> None:
        """Wait until every service left is one whose fatal error waits too, or ``deadline``."""
        with trio.move_on_at(deadline):
            while not self._failed.issuperset(self._entries):
                await self._left.park()

    async def _drain(self, entry: _Entry[T]) -> None:
        """Await the service's drain until the stop deadline, or the drain time from now."""
        name = entry.service.name
        deadline = entry.stop_deadline
        if deadline is None:
            deadline = trio.current_time() + self.config.shutdown_timeout_s
        began = trio.current_time()
        # What the drain logs is named as what the run logs is.
        with (
            entry.enter(_Phase.DRAIN, deadline) as scope,
            structlog.contextvars.bound_contextvars(service=name),
        ):
            try:
                await entry.service.drain()
            except Exception as exc:  # noqa: BLE001 - a failed drain must not stop the others
                log.warning("service_drain_failed", service=name, error=repr(exc))
                return
        took_ms = round((trio.current_time() - began) * 1000)
        if scope.cancelled_caught:
            log.warning("service_drain_abandoned", service=name, after_ms=took_ms)
        else:
            log.info("service_drained", service=name, took_ms=took_ms)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _count_failure(self, entry: _Entry[T], error: BaseException, now: float) -> None:
        """Count the failure (at ``now``) within the restart window; past the budget, give up.

        Raises:
            ServiceFailedError: more failures than ``restart_budget`` within the window.
        """
        name, failures = entry.service.name, entry.failures
        failures.append(now)
        while failures and failures[0] < now - self.config.restart_window_s:
            failures.popleft()
        if len(failures) > self.config.restart_budget:
            log.error("service_gave_up", service=name, failures=len(failures), error=repr(error))
            msg = (
                f"service {name} failed {len(failures)} times within "
                f"{self.config.restart_window_s:g} s: {error!r}"
            )
            raise ServiceFailedError(msg) from error

    async def _back_off(self, entry: _Entry[T], error: BaseException, failed_at: float) -> None:
        """Wait until the delay, counted from ``failed_at``, is over (the failed run's drain
        was part of it); longer the more failures the window counts.

        Backing off, the service no longer holds up whoever waits for its start.
        """
        name, failures = entry.service.name, len(entry.failures)
        delay = self._backoff(failures)
        log.warning(
            "service_failed",
            service=name,
            error=repr(error),
            retry_in_s=max(failed_at + delay - trio.current_time(), 0.0),
            failures=failures,
        )
        entry.started.set()
        self._changed()
        while True:  # each turn follows one reload that replaced the policy
            with trio.move_on_at(failed_at + delay):
                await self._reconfigured.park()
                new_delay = self._backoff(failures)
                if new_delay != delay:
                    delay = new_delay
                    left = max(failed_at + delay - trio.current_time(), 0.0)
                    log.info("service_retry_rescheduled", service=name, retry_in_s=left)
                continue
            return

    def _backoff(self, failures: int) -> float:
        config = self.config
        return _backoff_delay(
            config.restart_backoff_initial_s, config.restart_backoff_max_s, failures
        )


def _backoff_delay(initial: float, ceiling: float, failures: int) -> float:
    """``initial`` doubled once per failure after the first, at most ``ceiling``.

    The exponent stops where the delay reaches the ceiling (for finite positive settings,
    never beyond about 2100 doublings), so however many failures a large restart budget
    lets through, no float overflows.
    """
    doublings = failures - 1
    if doublings >= math.ceil(math.log2(ceiling) - math.log2(initial)):
        return ceiling
    return min(math.ldexp(initial, doublings), ceiling)
