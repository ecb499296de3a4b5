"""``BalloonService``: the memory balloon on every driver, yielding to memory pressure.

``run`` subscribes to BALLOON_CHANGE_REQUEST (0x40) and RESTORED, decides the mode from the
device's answers (:mod:`._mode`, logged once; a probe that fails is retried with capped
backoff, one warning, the status saying why, one line once it goes through) and then:

- *kernel*: holds 0x40 in the filter so the kernel's balloon works; reads the size with
  ``CHECK_BALLOON`` (a pure query on the in-tree driver) at start, after a restore and,
  through the gauge's refresh, before every guest statistics report, after the drain too
  (the kernel keeps 0x40 to itself, so nothing else tells the agent the size changed, and
  nothing polls it; its work item finishes a change under way once 0x40 left the filter);
  the status shows the size last read, without its time (``statistics().read_at``);
- *triggered*: calls ``CHECK_BALLOON`` at start, on every 0x40 and after a restore; a failure
  is retried with capped backoff; under memory pressure or below the floor (``MemAvailable``
  alone: the driver's pages are charged to no cgroup of the agent's) the call is postponed,
  for at most ``pressure_cooldown_s`` (the same call reads and applies the host's target, a
  deflate as well as an inflate, which nothing tells apart before it; the driver allocates
  the whole target in one go and stops by itself where allocation fails). The mode probe's
  own call at start is one of them: on Oracle's driver it waits at the same gate, the service
  ready meanwhile. A build
  without the allocator answers ``handle_in_r3`` from its first inflate on: the first such
  answer switches the service to *allocated*;
- *allocated* / *owned*: reads the target on the same occasions and lets a
  :class:`ChunkWalker` move the balloon chunk by chunk with the agent's own memory. In owned
  mode the agent sends the pages' frames itself, read once per chunk, and Linux moves locked
  pages unless told not to: at every target read a setting under which it may
  (:func:`~._chunks.pages_may_move`: ``vm.compact_unevictable_allowed``,
  ``kernel.numa_balancing`` not 0) makes the goal 0, with one line naming the setting and the
  status saying why, until a later read finds it 0. A simulated host is not checked: the
  frames reach no hypervisor, so nothing can be corrupted. Owned mode also grows no further
  than the drain gives back in half of ``daemon.shutdown_timeout_s``, keeping what it holds
  while the whole time gives it back (:mod:`._budget`), which the service follows across
  reloads (:class:`~agent.services.DrainTime`).

Memory pressure (a PSI source) caps the walked balloon: each high reading gives back
``pressure_step_mb`` at once, and the cap holds until pressure stayed low for the hold time,
``pressure_cooldown_s`` at first. An episode starting within one cooldown after the last
hold ended doubles the hold (up to :data:`MAX_HOLD_FACTOR` times the cooldown), so pressure
and the host's target do not cycle every cooldown; a later episode starts at one cooldown
again. The floor works both ways: a high reading gives back at least what the headroom
(``MemAvailable``, or if less the room left in the memory cgroups the agent's locked chunks
are charged to: limit less usage not counting reclaimable cache) lacks below
``min_available_mb``, and
while the agent holds chunks the headroom is looked at every ``psi_interval_s`` (PSI may
report no stall, or be missing), a shortfall given back at once under the same hold; either
gives back only a shortfall of more than :data:`FLOOR_BAND_MB`, and then all of it. In
kernel mode pressure is not watched at all (the kernel owns the balloon).

``drain`` gives back every chunk the agent holds; on Oracle's driver closing the session
deflates whatever the driver holds. In owned mode nothing does, so a refused chunk is
passed over for the others and retried until the drain time runs out. The chunks a drain
could not give back while the agent runs on (a reload disabled or rebuilt the service, a
restart) go to the context's leftovers (:mod:`._kept`): given back in the background, and
again at the agent's stop within its drain time, unless a new start of the service takes
them over; in owned mode, what is left when the process exits stays ballooned at the host
while the kernel reuses the pages (logged at critical). In kernel and triggered modes the
driver holds the balloon and keeps it: one line says so (``balloon_left_to_driver``), a
warning where the agent runs on with nobody following the balloon (a reload disabled the
service), an info line when the whole agent stops, the ordinary end of every run (Oracle's
driver deflates at the close, the in-tree kernel's balloon waits for the next start).
"""

from __future__ import annotations

import math
import time
from contextlib import AsyncExitStack
from functools import partial
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.protocol import HOST_ERRORS, Event, VBoxStatusError
from agent.records import record
from agent.services._base import BalloonGauge, DrainTime
from agent.services._leftovers import Leftovers
from agent.services.balloon._backoff import Backoff, failure_text
from agent.services.balloon._cgroup import CgroupLimits, Headroom, memory_cgroups
from agent.services.balloon._incomplete import log_drain_incomplete
from agent.services.balloon._kept import KeptChunks
from agent.services.balloon._mode import CHUNK_MB, BalloonMode, detect_mode
from agent.services.balloon._pressure import MemInfo, PressureFileError, PsiMonitor

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from agent.device import Device
    from agent.protocol import RemoteProtocolError
    from agent.services.balloon._cgroup import CgroupRoom
    from agent.services.balloon._chunks import ChunkAllocator
    from agent.services.balloon._config import BalloonSection
    from agent.services.balloon._mode import Detected
    from agent.services.balloon._pressure import PressureReading, PressureSource
    from agent.services.balloon._walker import ChunkWalker
    from agent.services.event_pump import EventPump, Subscription

log = structlog.get_logger("agent.services.balloon")

EVENTS: Final = Event.BALLOON_CHANGE_REQUEST | Event.RESTORED
_WATCH_FIELDS: Final = frozenset({"psi_path", "psi_interval_s", "pressure_threshold_pct"})
"""Settings a reload applies by restarting the pressure watch alone (the chunks stay)."""
DRAIN_READ_S: Final = 0.5
"""Kernel mode: how long the drain waits for the kernel's balloon size (a diagnostic)."""
MAX_HOLD_FACTOR: Final = 16
"""The longest pressure hold, in cooldowns, that repeated episodes double it to."""
FLOOR_BAND_MB: Final = 16
"""MiB the headroom may lack below ``min_available_mb`` before the balloon gives back (half
the floor where that is less, so a small floor still gives back before nothing is left): the
walk stops within a chunk above the floor, and an ordinary wobble of ``MemAvailable`` there
would otherwise give back, hold and walk back to the floor again and again."""
TRIGGERED_NOTE: Final = (
    "CHECK_BALLOON reads and applies the host's target; the driver allocates all of it in one "
    "go and stops by itself where allocation fails; postponed for at most pressure_cooldown_s"
)


@record
class BalloonStatistics:
    """The balloon as the agent sees it (sizes in 1 MiB chunks).

    ``chunks`` is what the balloon holds as far as the agent knows: the chunks the agent holds
    (allocated/owned), the kernel's count as last read (kernel), None in triggered mode
    (Oracle's driver answers ``CHECK_BALLOON`` with the host's target, which it applies,
    never with what it holds). ``target`` is the host's last target (triggered: that
    answer); in kernel mode, where only the kernel reads it, the size last read.
    ``cap`` is the pressure cap. ``read_at``: in kernel mode, when the size was last read
    (wall-clock seconds), else None. ``drain_cap``: in owned mode, the most chunks the balloon
    grows to, what the drain gives back in its share of ``daemon.shutdown_timeout_s`` at
    ``drain_rate``, the rate (chunks a second) measured in this run (None: not owned mode, or
    no bound: too fast to measure); chunks held above it stay while the whole drain time
    gives them back (:mod:`._budget`); ``drain_capped``: whether the drain budget holds the
    balloon below the target now.
    """

    mode: str | None
    target: int
    chunks: int | None
    cap: int | None
    inflated: int
    deflated: int
    failures: int
    pressure_events: int
    postponed: bool
    read_at: float | None
    drain_cap: int | None
    drain_rate: float | None
    drain_capped: bool


@final
class BalloonService:
    """The balloon service; build it through :data:`SPEC` or directly in tests.

    Args:
        allocator: where the agent's chunks come from (default: locked anonymous mmaps).
        pressure: PSI readings (default: a :class:`PsiMonitor` on ``section.psi_path``).
        mem_available_mb: ``MemAvailable`` in MiB, None if unknown (default: /proc/meminfo).
        cgroup_room: the room left in the agent's memory cgroups, limit less usage not
            counting reclaimable cache (default: :meth:`~._cgroup.CgroupLimits.least_room`
            of the cgroups :func:`~._cgroup.memory_cgroups` names now, unless
            ``mem_available_mb`` is given: then none, that figure is all there is). Where the
            agent locks the chunks (allocated, owned), the floor is checked against the less of
            the two; where the driver allocates them (triggered mode, the mode probe) against
            ``MemAvailable`` alone: those are kernel pages, charged to no cgroup of the agent's.
        status_changed: called whenever :meth:`status` would read differently.
        gauge: where the balloon's size is published for other services (once drained, the
            size left behind; None where unknown).
        sysctl_root: where owned mode reads the settings that let Linux move locked pages
            (default: ``/proc/sys`` on a real device; none, so unchecked, on a simulated
            host).
        agent_stopping: whether the whole agent stops, asked by the drain (default: never,
            only the service stops; see :attr:`ServiceContext.agent_stopping`).
        drain_time: how long the drain may take (``daemon.shutdown_timeout_s``, kept current
            across reloads), which bounds the owned balloon (:mod:`._budget`).
        leftovers: where a drain cut short while the agent runs on leaves the chunks it
            kept, and where a new start takes them over (default: this instance's own; see
            :attr:`ServiceContext.leftovers`).
    """

    name: Final = "balloon"

    def __init__(
        self,
        device: Device,
        pump: EventPump,
        section: BalloonSection,
        *,
        allocator: ChunkAllocator | None = None,
        pressure: PressureSource | None = None,
        mem_available_mb: Callable[[], int | None] | None = None,
        cgroup_room: Callable[[], CgroupRoom | None] | None = None,
        status_changed: Callable[[], None] = lambda: None,
        gauge: BalloonGauge | None = None,
        sysctl_root: Path | None = None,
        agent_stopping: Callable[[], bool] = lambda: False,
        drain_time: DrainTime | None = None,
        leftovers: Leftovers | None = None,
    ) -> None:
        self._device, self._leftovers = device, leftovers or Leftovers()
        self._drain_time = drain_time if drain_time is not None else DrainTime()
        self._agent_stopping = agent_stopping
        self._sysctl_root = sysctl_root
        self._frames_unchecked_logged = self._meminfo_warned = False  # said once each
        self._gauge = gauge if gauge is not None else BalloonGauge()
        self._status_changed = status_changed
        self._pump = pump
        self._section = section
        self._allocator = allocator
        self._pressure = pressure
        self._headroom = Headroom(
            mem_available_mb or self._read_mem_available,
            cgroup_room
            or (None if mem_available_mb else CgroupLimits(memory_cgroups()).least_room),
        )
        self._mode: BalloonMode | None = None
        self._walker: ChunkWalker | None = None
        self._mode_of_walker: BalloonMode | None = None
        self._probe_backoff = Backoff(section.retry_initial_s, section.retry_max_s)
        """The mode probe's retries while it fails (another session owns the balloon)."""
        self._read_backoff = Backoff(section.retry_initial_s, section.retry_max_s)
        self._floor_backoff = Backoff(section.retry_initial_s, section.retry_max_s)
        """Triggered mode: when to look at MemAvailable again while it is below the floor."""
        self._chunks = self._target = 0
        """The driver's last CHECK_BALLOON answer (kernel and triggered modes): the kernel's
        count on the in-tree driver, the host's target on Oracle's, which applies it."""
        self._unanswered = False
        """A CHECK_BALLOON that may move Oracle's driver's balloon (triggered mode, or the
        mode probe's where it may) went without an answer that names its target (cancelled,
        or a triggered read failed): the driver may have applied the host's pending target,
        or part of it."""
        self._read_at = 0.0
        """Kernel mode: when the size was last read (wall-clock seconds)."""
        self._read_pending = True
        self._read_done = trio.Event()
        """Set when the next read to start has ended, or when the service stops (a gauge
        refresh waits on it: every read runs in the service's own task)."""
        self._poke = trio.Event()
        self._release_at = math.inf
        self._hold = trio.CancelScope()
        """The wait that ends at ``_release_at`` (a reload may move its deadline)."""
        self._nursery: trio.Nursery | None = None
        self._watch: trio.CancelScope | None = None
        """The running pressure watch's scope (None while none runs: not started, kernel)."""
        self._postponed_since: float | None = None
        """Triggered mode: when the pending CHECK_BALLOON was first held back (None: it is not)."""
        self._hold_factor = 1
        """The current pressure hold, in cooldowns (doubled by episodes in quick succession)."""
        self._eased_at = -math.inf
        """When the last pressure hold ended."""
        self._pressure_events = self._read_failures = 0
        self._read_failure: str | None = None
        """Why the last target read (or trigger) failed; None once one went through."""
        self._meminfo = MemInfo()
        self.mode_known = trio.Event()
        """Set once the mode is decided (for tests)."""
        self.reads = 0
        """Successful target reads (CHECK_BALLOON / GET_MEMBALLOON_CHANGE_REQ) so far."""

    # --- the framework's interface ---------------------------------------------------------

    @property
    def mode(self) -> BalloonMode | None:
        """The mode, once decided."""
        return self._mode

    @property
    def walker(self) -> ChunkWalker | None:
        """The chunk walker (allocated and owned modes)."""
        return self._walker

    def status(self) -> str:
        """``balloon 64/128 MB (allocated)``; in kernel mode the size last read.

        It changes with the balloon's state only, as ``STATUS=`` should: not when a read finds
        the same size again (the kernel mode's read time is in :meth:`statistics`).

        It reads nothing: no event tells the agent that the kernel's balloon moved, so a
        status that asked for a read would follow every change it found with another read.
        A read of the target that fails, and a walk that fails, say why until one goes
        through (``, target read failing: VBG_IOCTL_CHECK_BALLOON: VERR_NO_MEMORY``,
        ``, failing: VBG_IOCTL_CHANGE_BALLOON: VERR_NO_MEMORY``); so does a mode probe that
        fails (``balloon mode undecided (probe failing: VBG_IOCTL_CHECK_BALLOON:
        VERR_PERMISSION_DENIED)``), where ``balloon setting up`` is a first probe under way.
        """
        mode = self._mode
        failure = self._read_failure
        if mode is None:
            if failure is None:
                return "balloon setting up"
            return f"balloon mode undecided (probe failing: {failure})"
        unread = f", target read failing: {failure}" if failure is not None else ""
        if mode is BalloonMode.KERNEL:
            return f"balloon {self._chunks * CHUNK_MB} MB (kernel{unread})"
        if mode is BalloonMode.TRIGGERED:
            # The driver's answer is the target it applied; what it holds it does not say.
            postponed = ", postponed" if self._postponed_since is not None else ""
            return f"balloon target {self._chunks * CHUNK_MB} MB (triggered{postponed}{unread})"
        walker = self._walker
        assert walker is not None  # noqa: S101 - set together with the mode
        capped = f", capped at {walker.cap * CHUNK_MB} MB" if walker.cap is not None else ""
        drain_cap = walker.drain_cap
        if walker.drain_capped and drain_cap is not None:
            capped += f", drain cap {drain_cap * CHUNK_MB} MB"
        refused = f", refused: {walker.refusal}" if walker.refusal is not None else ""
        failing = f", failing: {walker.last_failure}" if walker.last_failure is not None else ""
        held, target = len(walker.held) * CHUNK_MB, walker.target * CHUNK_MB
        return f"balloon {held}/{target} MB ({mode}{capped}{refused}{unread}{failing})"

    def statistics(self) -> BalloonStatistics:
        """Return the sizes and counters."""
        walker = self._walker
        budget = walker.budget if walker is not None else None
        return BalloonStatistics(
            mode=None if self._mode is None else str(self._mode),
            target=walker.target if walker is not None else self._target,
            chunks=self._size_fields().get("chunks"),
            cap=walker.cap if walker is not None else None,
            inflated=walker.inflated if walker is not None else 0,
            deflated=walker.deflated if walker is not None else 0,
            failures=self._read_failures + (walker.failures if walker is not None else 0),
            pressure_events=self._pressure_events,
            postponed=self._postponed_since is not None,
            read_at=self._read_at if self._mode is BalloonMode.KERNEL else None,
            drain_cap=budget.chunks if budget is not None else None,
            drain_rate=budget.rate if budget is not None else None,
            drain_capped=walker.drain_capped if walker is not None else False,
        )

    def reconfigure(self, section: BalloonSection) -> bool:
        """Apply every setting live; the PSI settings restart the pressure watch alone.

        A walk stopped (or a trigger postponed, or a mode probe refused) by the floor or a
        failure is retried at once, under the new settings, rather than when its old backoff
        ends; a pressure hold in
        place ends after the new cooldown (and survives a restarted watch).
        """
        old = self._section
        changed = {
            name
            for name in type(section).model_fields
            if getattr(section, name) != getattr(old, name)
        }
        self._section = section
        if changed & _WATCH_FIELDS and self._watch is not None:
            self._watch.cancel()
            self._start_watch()
        for backoff in self._backoffs():
            backoff.initial, backoff.maximum = section.retry_initial_s, section.retry_max_s
            backoff.retry_now()
        if self._walker is not None:
            self._walker.min_available_mb = section.min_available_mb
            self._walker.wake()
        self._poke.set()
        if self._release_at != math.inf:  # the hold in place ends after the new cooldown
            cooldown_change = section.pressure_cooldown_s - old.pressure_cooldown_s
            self._release_at += cooldown_change * self._hold_factor
            self._hold.deadline = self._release_at
        log.info("balloon_reconfigured", changed=sorted(changed))
        return True

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Decide the mode, then follow the host's target until cancelled."""
        self._read_pending = True
        self._release_at = math.inf
        self._postponed_since = None
        with self._pump.subscribe(self.name, EVENTS) as events:
            async with trio.open_nursery() as nursery:
                try:
                    await self._run_in(nursery, events, task_status)
                finally:  # a reload from now on restarts no watch; the gauge reads no more
                    self._nursery = self._watch = None
                    if self._gauge.refresh == self._refresh_gauge:
                        self._gauge.refresh = None
                    self._read_done.set()  # a waiting refresh returns (the drain reads again)

    async def _run_in(
        self, nursery: trio.Nursery, events: Subscription, task_status: trio.TaskStatus[None]
    ) -> NoReturn:
        nursery.start_soon(self._forward_events, events)
        # Ready after the first probe, even a refused one (another session may own the
        # balloon): the probe is retried here without holding the daemon up.
        await self._decide_mode(task_status)
        if self._mode is BalloonMode.KERNEL:
            log.info(
                "balloon_pressure_unwatched",
                reason="the kernel owns the balloon: no PSI trigger, no polling",
            )
            self._gauge.refresh = self._refresh_gauge
        else:
            self._nursery = nursery
            self._start_watch()
        if self._walker is not None:
            self._start_walker(nursery, self._walker)
        await self._follow()

    async def drain(self) -> None:
        """Give back every chunk the agent holds; say so where the driver keeps its own (in
        kernel mode read afresh: nothing tells the agent that the kernel ballooned).

        The gauge keeps the size left behind, which the guest statistics go on reporting
        (Main would keep showing the last one reported): 0 after a complete drain, the chunks
        still held after a partial one, the target Oracle's driver last applied; in kernel
        mode the kernel's count, read afresh here and, through a refresh left on the gauge,
        before every later report (the kernel's work item finishes a change already under
        way after 0x40 left the filter); None where that is unknown (a read that failed, a
        CHECK_BALLOON that went without an answer naming its target)."""
        walker = self._walker
        if walker is None:
            left: int | None = None
            if self._mode is BalloonMode.KERNEL:  # the reading may be old: a pure query
                self._gauge.refresh = self._read_left
                with trio.move_on_after(DRAIN_READ_S):  # else unknown (logged: the last reading)
                    try:
                        left = self._chunks = (await self._device.check_balloon()).chunks
                    except HOST_ERRORS as exc:
                        log.debug("balloon_check_failed", **_failure_fields(exc))
            elif self._mode is BalloonMode.TRIGGERED and not self._unanswered:
                left = self._chunks  # kept until this process closes the device
            self._leave_to_driver()
            self._gauge.chunks = left
            return
        held = len(walker.held)
        try:
            # Owned mode: nothing else gives the chunks back (no driver deflates them on
            # close), so refusals are retried until the drain time runs out.
            kept = await walker.drain(persist=self._mode is BalloonMode.OWNED)
        except trio.Cancelled:  # the drain time (daemon.shutdown_timeout_s) ran out
            self._drain_incomplete(walker, held, "the drain time ran out")
            raise
        except BaseException as exc:  # keep track of what is still held, whatever went wrong
            self._drain_incomplete(walker, held, f"{type(exc).__name__}: {exc}")
            raise
        if kept:  # still in the balloon: the gauge keeps counting them
            self._drain_incomplete(walker, held, walker.last_failure)
        else:
            self._publish(0)
            log.info("balloon_drained", returned=held)

    def _leave_to_driver(self) -> None:
        """Kernel and triggered modes: one line when the driver keeps a balloon the agent
        cannot give back: a warning where the agent runs on without anybody following it (a
        reload disabled the service, or it restarts after a failure), an info line when the
        whole agent stops (the driver then deflates at the close, or the next start follows
        it on). A CHECK_BALLOON that went unanswered on Oracle's driver (the mode probe's
        too) leaves a balloon of unknown size, up to the host's pending target."""
        unanswered = self._unanswered
        if self._chunks == 0 and not unanswered:
            return
        stopping = self._agent_stopping()
        emit = log.info if stopping else log.warning
        if self._mode is BalloonMode.KERNEL:
            emit(
                "balloon_left_to_driver",
                mode=str(self._mode),
                chunks=self._chunks,
                reason="the in-tree driver keeps the chunks its kernel ballooned, and with"
                " the service stopped 0x40 leaves the event filter: no later"
                " request of the host, a deflate neither, reaches the kernel until the service"
                " runs again (nor does the driver deflate at unload)",
                until="the agent's next start" if stopping else "the service runs again",
            )
        elif self._mode is BalloonMode.TRIGGERED or unanswered:
            size: dict[str, object] = {"target": self._chunks}
            if unanswered:
                size = {
                    "target": None,
                    "size": "unknown: a CHECK_BALLOON got no answer naming its target, so"
                    " the driver may hold up to the host's pending target",
                }
            emit(
                "balloon_left_to_driver",
                mode="undecided" if self._mode is None else str(self._mode),
                **size,
                reason="Oracle's driver keeps the chunks it allocated for this target until"
                " this process closes the device, which deflates them; until then no"
                " CHECK_BALLOON applies the host's later requests",
                until="this process closes the device, as it exits"
                if stopping
                else "the service runs again or this process exits",
            )

    def _drain_incomplete(self, walker: ChunkWalker, held: int, reason: str | None) -> None:
        mode = self._mode
        assert mode is not None  # noqa: S101 - set together with the walker
        # Handed over, the leftovers alone own the chunks until a new start takes them over.
        # At the stop only in owned mode, where they persist: Oracle's driver deflates at
        # the close.
        handed_over = (mode is BalloonMode.OWNED or not self._agent_stopping()) and self._leave(
            walker
        )
        if handed_over:
            # Undecided as at a first start: a restart probes again, then takes them over.
            self._walker, self._mode, self._mode_of_walker = None, None, None
        log_drain_incomplete(walker, mode, began_with=held, reason=reason, handed_over=handed_over)

    def _leave(self, walker: ChunkWalker) -> bool:
        """Hand ``walker``'s chunks to the leftovers; False if the stop's deadline passed."""
        assert self._mode is not None  # noqa: S101 - set together with the walker
        backoff = Backoff(self._section.retry_initial_s, self._section.retry_max_s)
        kept = KeptChunks(walker, self._mode, backoff, self._status_changed)
        return self._leftovers.leave(self.name, kept)

    # --- mode and target --------------------------------------------------------------------

    async def _decide_mode(self, task_status: trio.TaskStatus[None]) -> None:
        """Probe until the driver answers; ready after the first probe, or as soon as one
        waits (a refused probe is retried, a held-back CHECK_BALLOON waits) without holding
        the daemon up. A reload ends a retry's wait at once."""
        started = False

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        backoff = self._probe_backoff
        backoff.succeeded()
        while True:
            try:
                detected = await detect_mode(self._device, partial(self._gate_probe, ready))
            except HOST_ERRORS as exc:  # e.g. another session owns Oracle's balloon
                self._unanswered = False  # refused before it moved anything: not ours
                self._read_failures += 1
                _check_failed(exc, backoff)
                self._read_failed(failure_text(exc))
                ready()
                while trio.current_time() < backoff.retry_at:
                    await self._wait_for_poke(backoff.retry_at)
            else:
                # The chunks a stopped run left: taken over once their give-back ended.
                left = self._leftovers
                kept = await left.take(self.name) if detected.mode.agent_holds_chunks else None
                recovered = backoff.succeeded()
                self._read_failure = None  # the mode's status follows (_adopt)
                self._adopt(detected, kept if isinstance(kept, KeptChunks) else None)
                if recovered:
                    log.info("balloon_check_recovered", **self._size_fields())
                ready()
                return

    async def _gate_probe(self, ready: Callable[[], None], may_allocate: bool) -> None:
        """Hold the probe's CHECK_BALLOON back as any triggered one where it may move the
        kernel's balloon; from here on an event is news that call's answer may lack."""
        if may_allocate:
            while (look_again := self._postpone_check()) is not None:
                ready()
                await self._wait_for_poke(look_again)
        self._read_pending = False
        self._unanswered = may_allocate  # the call goes now; its answer (_adopt) clears it

    async def _wait_for_poke(self, deadline: float) -> None:
        """Wait until ``deadline`` or a poke (an event, a reload, pressure easing)."""
        self._poke = trio.Event()
        with trio.move_on_at(deadline):
            await self._poke.wait()

    def _adopt(self, detected: Detected, kept: KeptChunks | None) -> None:
        mode = detected.mode
        self._mode = mode
        self._unanswered = False
        self._chunks = self._target = detected.chunks
        self._read_at = time.time()
        # Events during the probe (after its CHECK_BALLOON went) still ask for a read.
        self._read_pending = self._read_pending or mode.agent_holds_chunks
        if self._walker is not None and self._mode_of_walker is mode:
            self._walker.cap = None  # a restart after a failure: keep the chunks still held
        elif mode.agent_holds_chunks:
            self._walker = self._new_walker(mode, kept)
            self._mode_of_walker = mode
        if self._walker is not None:  # the probe read the target; the agent holds its chunks
            sizes = {"chunks": len(self._walker.held), "target": detected.chunks}
        else:
            sizes = self._size_fields()
        memlock = _memlock_fields() if mode.agent_holds_chunks else {}
        log.info("balloon_mode", mode=str(mode), **sizes, **memlock)
        self.mode_known.set()
        self._publish(len(self._walker.held) if self._walker is not None else detected.chunks)
        self._status_changed()

    def _new_walker(self, mode: BalloonMode, kept: KeptChunks | None) -> ChunkWalker:
        # Imported only here: in the kernel and triggered modes (the driver holds the
        # chunks) the agent loads none of the chunk code.
        from agent.services.balloon._budget import DrainBudget  # noqa: PLC0415
        from agent.services.balloon._chunks import MmapAllocator  # noqa: PLC0415
        from agent.services.balloon._handover import (  # noqa: PLC0415
            OracleHandover,
            PassthroughHandover,
        )
        from agent.services.balloon._walker import ChunkWalker  # noqa: PLC0415

        if kept is not None:  # released only by the allocator that mapped them
            allocator = kept.walker.allocator
        else:
            allocator = self._allocator if self._allocator is not None else MmapAllocator()
        handover = (
            OracleHandover(self._device)
            if mode is BalloonMode.ALLOCATED
            else PassthroughHandover(self._device)
        )
        walker = ChunkWalker(
            handover,
            allocator,
            backoff=Backoff(self._section.retry_initial_s, self._section.retry_max_s),
            mem_available_mb=self._headroom.mb,
            min_available_mb=self._section.min_available_mb,
            status_changed=self._status_changed,
            resized=self._publish,
            budget=DrainBudget(self._drain_time) if mode is BalloonMode.OWNED else None,
        )
        if kept is not None:
            walker.held, walker.unconfirmed = kept.walker.held, kept.walker.unconfirmed
            log.info("balloon_chunks_taken_over", chunks=len(walker.held))
        return walker

    async def _forward_events(self, events: Subscription) -> NoReturn:
        while True:
            bits = await events.receive()
            log.debug("balloon_event", bits=f"{bits:#x}")
            self._request_read()

    def _request_read(self) -> None:
        self._read_pending = True
        self._read_backoff.retry_now()
        self._poke.set()

    async def _follow(self) -> NoReturn:
        """Read the target (or trigger the driver) whenever an event asked for it."""
        backoff = self._read_backoff
        while True:
            look_again = backoff.retry_at if self._read_pending else math.inf
            if self._read_pending and trio.current_time() >= backoff.retry_at:
                postponed_until = (
                    self._postpone_check() if self._mode is BalloonMode.TRIGGERED else None
                )
                if postponed_until is not None:
                    look_again = postponed_until
                else:
                    done, self._read_done = self._read_done, trio.Event()
                    try:
                        await self._read()
                    finally:
                        done.set()
                    continue
            await self._wait_for_poke(look_again)

    async def _read(self) -> None:
        """Read the target (or trigger the driver) once; a failure leaves the read pending,
        retried after the backoff."""
        self._read_pending = False
        try:
            await self._read_target()
        except HOST_ERRORS as exc:  # a status (or a driver errno as one), a malformed reply
            self._read_pending = True
            self._read_failures += 1
            _check_failed(exc, self._read_backoff)
            self._read_failed(failure_text(exc))
        else:
            self.reads += 1
            if self._read_backoff.succeeded():
                log.info("balloon_check_recovered", **self._size_fields())
            self._read_failed(None)

    def _read_failed(self, failure: str | None) -> None:
        """Note why the target read failed (None: it went through); the status says it."""
        if failure != self._read_failure:
            self._read_failure = failure
            self._status_changed()

    async def _refresh_gauge(self) -> None:
        """Kernel mode: the gauge's refresh, awaited by its reader (the guest statistics,
        before each report): ask ``_follow`` for a read and wait until one that started
        after this call has ended, or the service stopped.

        The read runs in the service's task, not the reader's: an answer still on its way
        when the service stops arrives before its drain (which sets the gauge to the size it
        leaves behind), never after it.
        """
        done = self._read_done
        self._request_read()
        await done.wait()

    async def _read_left(self) -> None:
        """Kernel mode, once drained: the gauge's refresh, a CHECK_BALLOON (a pure query on
        the in-tree driver) in the reader's own task, the service being gone; a read that
        fails leaves the gauge as it was. Only the drain installs it: on Oracle's driver the
        call would make this session the balloon's owner and move the balloon."""
        try:
            self._gauge.chunks = (await self._device.check_balloon()).chunks
        except HOST_ERRORS as exc:
            log.debug("balloon_check_failed", **_failure_fields(exc))

    async def _read_target(self) -> None:
        if self._walker is not None:
            target = await self._walker.handover.read_target()
            self._target = target.chunks
            self._walker.set_target(target)
            if self._mode is BalloonMode.OWNED:  # before the walker's next step
                self._check_frames(self._walker)
            log.info(
                "balloon_target",
                target=target.chunks,
                max_chunks=target.max_chunks,
                chunks=len(self._walker.held),
            )
            return
        self._unanswered = self._mode is BalloonMode.TRIGGERED
        status = await self._device.check_balloon()
        self._unanswered = False
        if status.handle_in_r3 and self._mode is BalloonMode.TRIGGERED:
            self._hand_to_agent(status.chunks)
            return
        self._target = status.chunks
        self._publish(status.chunks)
        changed = status.chunks != self._chunks
        self._chunks = status.chunks
        if self._mode is BalloonMode.KERNEL:
            self._read_at = time.time()
        if changed:
            self._status_changed()
        # A size the log already shows is no news: repeated reads stay at debug.
        (log.info if changed else log.debug)(
            "balloon_checked", mode=str(self._mode), **self._size_fields()
        )

    def _check_frames(self, walker: ChunkWalker) -> None:
        """Owned mode: refuse the balloon while Linux may move a locked page to another frame.

        The host would keep the chunk's old frames ballooned while the guest reuses them, and
        a deflate would name the wrong pages. One line when a refusal begins, changes or ends.
        """
        from agent.services.balloon._chunks import PROC_SYS, pages_may_move  # noqa: PLC0415

        root = self._sysctl_root
        if root is None and self._device.simulated:
            if not self._frames_unchecked_logged:
                self._frames_unchecked_logged = True
                log.info(
                    "balloon_frames_unchecked",
                    reason="a simulated host: the chunks' frames reach no hypervisor",
                )
            return
        mover = pages_may_move(root if root is not None else PROC_SYS)
        refusal = None if mover is None else str(mover)
        if refusal == walker.refusal:
            return
        walker.refuse(refusal)
        self._status_changed()
        if mover is None:
            log.info("balloon_refusal_lifted", chunks=len(walker.held), target=walker.target)
            return
        log.warning(
            "balloon_refused",
            setting=mover.setting,
            value=mover.value,
            reason=f"{mover.moves}: the host would keep the old frames ballooned while the"
            " guest reuses them",
            fix=f"sysctl -w {mover.setting}=0, kept in /etc/sysctl.d/; read again at the host's"
            " next balloon request and at every start",
            chunks=len(walker.held),
        )

    def _hand_to_agent(self, target: int) -> None:
        """Oracle's driver found no allocator of its own at its first inflate and leaves the
        balloon to ring 3 from now on (VBoxService reads ``handle_in_r3`` on every refresh
        too): walk to ``target`` with the agent's chunks, capped at none during a pressure
        hold."""
        from agent.services.balloon._handover import HostTarget  # noqa: PLC0415

        mode = BalloonMode.ALLOCATED
        walker = self._walker = self._new_walker(mode, None)
        self._mode = self._mode_of_walker = mode
        self._target = target
        walker.set_target(HostTarget(target, None))
        if self._release_at != math.inf:
            walker.lower_cap(0)
        log.info(
            "balloon_mode",
            mode=str(mode),
            chunks=0,
            target=target,
            previous=str(BalloonMode.TRIGGERED),
            reason="CHECK_BALLOON answered handle_in_r3: the driver has no allocator of its own",
            **_memlock_fields(),
        )
        assert self._nursery is not None  # noqa: S101 - set in triggered mode
        self._start_walker(self._nursery, walker)
        self._publish(0)
        self._status_changed()

    def _postpone_check(self) -> float | None:
        """Where CHECK_BALLOON moves the kernel's balloon (triggered mode, and the mode
        probe's call on Oracle's driver): hold it back under pressure or below the floor, for
        at most ``pressure_cooldown_s``; return when to look again, or None to call it now.

        The same call applies a deflate the host asks for, and a balloon below the floor
        keeps MemAvailable there: an unbounded wait could hold the memory for ever. Nothing
        tells a deflate from an inflate before the call (Oracle's driver keeps the query that
        only reads the target, GET_MEMBALLOON_CHANGE_REQ, to kernel sessions), so both wait.
        The floor is ``MemAvailable``'s alone: the driver allocates kernel pages, which the
        agent's memory cgroups are not charged for.
        """
        section = self._section
        available = self._headroom.mem_available_mb()
        pressure = self._release_at != math.inf
        at_floor = available is not None and available < section.min_available_mb
        now = trio.current_time()
        since = self._postponed_since
        figures = {
            "pressure": pressure,
            "mem_available_mb": available,
            "min_available_mb": section.min_available_mb,
        }
        if not (pressure or at_floor):
            self._floor_backoff.succeeded()
            if since is not None:
                self._postponed_since = None
                self._status_changed()
                log.info("balloon_check_resumed", **figures)
            return None
        if since is None:
            since = self._postponed_since = now
            self._status_changed()
            log.info(
                "balloon_check_postponed",
                at_most_s=section.pressure_cooldown_s,
                note=TRIGGERED_NOTE,
                **figures,
            )
        deadline = since + section.pressure_cooldown_s
        if now >= deadline:
            self._floor_backoff.succeeded()
            self._postponed_since = None
            self._status_changed()
            log.info("balloon_check_forced", postponed_s=round(now - since, 3), **figures)
            return None
        if not at_floor:
            return deadline  # or when the pressure eases (a poke)
        # Nothing wakes us when memory frees up: look again after a backoff.
        self._floor_backoff.failed(now)
        return min(deadline, self._floor_backoff.retry_at)

    # --- memory pressure --------------------------------------------------------------------

    def _start_watch(self) -> None:
        """Start the pressure watch under the current section, in a scope a reload cancels."""
        assert self._nursery is not None  # noqa: S101 - set before the first watch
        self._watch = trio.CancelScope()
        self._nursery.start_soon(self._watch_pressure, self._watch)

    async def _watch_pressure(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._watch_readings()

    async def _watch_readings(self) -> None:
        async with AsyncExitStack() as stack:
            source = self._pressure if self._pressure is not None else self._open_psi(stack)
            while source is not None:
                with trio.move_on_at(self._release_at) as self._hold:
                    try:
                        reading = await source.next_reading()
                    except PressureFileError as exc:  # e.g. its cgroup was removed
                        log.warning("balloon_pressure_off", reason=str(exc))
                        break
                if self._hold.cancelled_caught:
                    self._ease()
                elif reading.high:
                    self._press(reading)
        # No more readings: a hold in place (or one the floor starts) ends after its cooldown.
        while True:
            with trio.move_on_at(self._release_at) as self._hold:
                await trio.sleep_forever()
            self._ease()

    def _open_psi(self, stack: AsyncExitStack) -> PsiMonitor | None:
        """Open the PSI file the section names, closed with ``stack``; None (one line) if it
        cannot be used."""
        section = self._section
        monitor = PsiMonitor(
            section.psi_path,
            interval_s=section.psi_interval_s,
            threshold_pct=section.pressure_threshold_pct,
        )
        try:
            return stack.enter_context(monitor)
        except PressureFileError as exc:
            log.warning("balloon_pressure_off", reason=str(exc))
            return None

    def _press(self, reading: PressureReading) -> None:
        section = self._section
        self._pressure_events += 1
        walker = self._walker
        available = self._headroom.mem_available_mb() if walker is None else self._headroom.mb()
        episode = self._release_at == math.inf
        hold_s = self._hold_on()
        figures = {
            "stall_pct": reading.stall_pct,
            "threshold_pct": section.pressure_threshold_pct,
            "via": reading.via,
            "mem_available_mb": available,
        }
        if walker is None:  # triggered: the postponement starts with the episode
            (log.info if episode else log.debug)(
                "balloon_pressure",
                **figures,
                action=f"postpone CHECK_BALLOON for at most {section.pressure_cooldown_s:g} s",
            )
            return
        cap = self._lower_cap(walker, section.pressure_step_mb // CHUNK_MB, available)
        # Sustained pressure at the same cap is no news: repeats stay at debug.
        (log.info if walker.cap != cap else log.debug)(
            "balloon_pressure",
            **figures,
            chunks=len(walker.held),
            target=walker.target,
            action=f"deflate to {walker.cap} and hold for {hold_s:g} s",
        )

    def _hold_on(self) -> float:
        """Hold the cap (or a postponement) for the current hold from now on, a new episode
        damped (:meth:`_damp`); return the hold's length. The cooldown ends it (one line)."""
        now = trio.current_time()
        if self._release_at == math.inf:
            self._damp(now)
        hold_s = self._section.pressure_cooldown_s * self._hold_factor
        self._release_at = self._hold.deadline = now + hold_s
        return hold_s

    def _shortfall(self, available: int | None) -> int:
        """Chunks to give back for ``available`` MiB to reach ``min_available_mb`` again, none
        while it lacks at most :data:`FLOOR_BAND_MB` (or half the floor, if less)."""
        floor = self._section.min_available_mb
        if available is None or available >= floor - min(FLOOR_BAND_MB, floor // 2):
            return 0
        return -((available - floor) // CHUNK_MB)

    def _lower_cap(self, walker: ChunkWalker, step: int, available: int | None) -> int | None:
        """Lower the walker's cap by ``step`` chunks, and at least as far as gives ``available``
        MiB back up to ``min_available_mb``; return the cap before."""
        held, cap = len(walker.held), walker.cap
        base = held if cap is None else min(cap, held)
        walker.lower_cap(max(0, min(base - step, held - self._shortfall(available))))
        return cap

    def _start_walker(self, nursery: trio.Nursery, walker: ChunkWalker) -> None:
        nursery.start_soon(walker.run)
        nursery.start_soon(self._keep_floor, walker)
        if walker.budget is not None:
            nursery.start_soon(self._follow_drain_time, walker)

    async def _follow_drain_time(self, walker: ChunkWalker) -> NoReturn:
        """Owned mode: a reload that changes the drain time moves the drain cap at once."""
        while True:
            await self._drain_time.wait_changed()
            walker.wake()

    async def _keep_floor(self, walker: ChunkWalker) -> NoReturn:
        """While the agent holds chunks, look at the headroom every ``psi_interval_s`` and
        give back what it lacks below ``min_available_mb`` (more than :data:`FLOOR_BAND_MB`)
        at once, held as a pressure cap: the rest of the guest may take that memory without
        a stall PSI reports, or where there is no PSI at all."""
        while True:
            await walker.wait_holding()
            await trio.sleep(self._section.psi_interval_s)
            available = self._headroom.mb()
            if not self._shortfall(available):
                continue
            hold_s = self._hold_on()
            cap = self._lower_cap(walker, 0, available)
            # A deflate on its way (or refused) at the same cap is no news: debug.
            (log.info if walker.cap != cap else log.debug)(
                "balloon_below_floor",
                mem_available_mb=available,
                min_available_mb=self._section.min_available_mb,
                chunks=len(walker.held),
                target=walker.target,
                action=f"deflate to {walker.cap} and hold for {hold_s:g} s",
            )

    def _damp(self, now: float) -> None:
        """A new episode: double the hold if it starts within a cooldown of the last one's
        end, else go back to one cooldown; one line when the factor changes."""
        cooldown = self._section.pressure_cooldown_s
        since_eased = now - self._eased_at
        factor = min(2 * self._hold_factor, MAX_HOLD_FACTOR) if since_eased <= cooldown else 1
        if factor != self._hold_factor:
            self._hold_factor = factor
            log.info(
                "balloon_pressure_hold",
                hold_s=cooldown * factor,
                cooldowns=factor,
                max_cooldowns=MAX_HOLD_FACTOR,
                since_last_hold_s=round(since_eased, 3) if since_eased != math.inf else None,
                reason="pressure again within a cooldown of the last hold"
                if factor > 1
                else "a quiet cooldown since the last hold",
            )

    def _ease(self) -> None:
        self._release_at = math.inf
        self._eased_at = trio.current_time()
        walker = self._walker
        log.info(
            "balloon_pressure_eased",
            hold_s=self._section.pressure_cooldown_s * self._hold_factor,
            **self._size_fields(),
            action="grow toward the target" if walker is not None else "resume CHECK_BALLOON",
        )
        if walker is not None:
            walker.cap = None
            walker.wake()
        self._poke.set()

    # --- helpers ------------------------------------------------------------------------------

    def _size_fields(self) -> dict[str, int]:
        """The balloon's sizes for a log line, each named for what it is: ``chunks`` what the
        balloon holds as far as the agent knows (its own chunks; in kernel mode the kernel's
        count), ``target`` the host's target where the agent knows it (in triggered mode the
        driver's answer, the target it applied: it never says what it holds)."""
        walker = self._walker
        if walker is not None:
            return {"chunks": len(walker.held), "target": walker.target}
        if self._mode is BalloonMode.KERNEL:
            return {"chunks": self._chunks}
        return {"target": self._chunks}

    def _publish(self, chunks: int) -> None:
        self._gauge.chunks = chunks

    def _backoffs(self) -> list[Backoff]:
        backoffs = [self._probe_backoff, self._read_backoff, self._floor_backoff]
        if self._walker is not None:
            backoffs.append(self._walker.backoff)
        return backoffs

    def _read_mem_available(self) -> int | None:
        try:
            return self._meminfo.available_mb()
        except PressureFileError as exc:
            if not self._meminfo_warned:
                self._meminfo_warned = True
                log.warning("balloon_floor_unchecked", reason=str(exc))
            return None


def _memlock_fields() -> dict[str, object]:
    """``RLIMIT_MEMLOCK`` in MiB (or "unlimited"), which bounds the chunks the agent locks
    unless ``CAP_IPC_LOCK`` is effective, and whether it is."""
    from agent.services.balloon._chunks import has_ipc_lock, memlock_limit  # noqa: PLC0415

    limit = memlock_limit()
    return {
        "memlock_limit_mb": "unlimited" if limit is None else limit >> 20,
        "memlock_unlimited_by_capability": has_ipc_lock(),
    }


def _check_failed(exc: VBoxStatusError | RemoteProtocolError, backoff: Backoff) -> None:
    """Back off after a failed balloon check: a warning the first time, then debug lines.

    A malformed reply (a target above the guest's RAM, say) changes nothing: the target
    stays as last read, as the in-tree driver and Oracle's leave their balloon on an illegal
    size and VBoxService's balloon loop goes on.
    """
    first = backoff.failures == 0
    delay = backoff.failed(trio.current_time())
    (log.warning if first else log.debug)(
        "balloon_check_failed", **_failure_fields(exc), retry_in_s=round(delay, 3)
    )


def _failure_fields(exc: VBoxStatusError | RemoteProtocolError) -> dict[str, str]:
    """A failed request for a log line: its ``operation`` and ``status``, or for a reply that
    breaks the ABI the decoder's message, which names the request (``malformed_reply``)."""
    if isinstance(exc, VBoxStatusError):
        return {"operation": exc.operation, "status": exc.name}
    return {"malformed_reply": str(exc)}
