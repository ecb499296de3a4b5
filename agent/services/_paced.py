"""``Metronome``: the one timing engine for periodic work whose pace the host decides.

The host says how often (the heartbeat interval, the statistics interval) and may change its
mind; the metronome keeps that rhythm:

- deadlines are absolute (``deadline += interval``), so the time a tick takes never adds up
  to drift;
- a tick whose deadline has passed is sent once, at once; deadlines overrun by whole
  intervals are skipped, never sent as a burst, and the rhythm resumes on the original grid;
- the interval is read from the host at start and read again whenever one of the
  subscription's events arrives (a restore, the host's own change request); the first tick
  of a new interval goes out at once. An event that arrived during a tick is taken before
  the next tick, also when ticks take longer than the interval and no deadline is ever
  ahead to wait for (VBoxService checks for its event at the top of every loop);
- an interval of ``None`` means "off": the metronome then sleeps until the next event;
- a service that must read again on its own (the host refused or failed the read) wraps its
  subscription in :class:`RetryWakeups`, which also wakes the metronome at the retry time
  the service sets (none, and no wake-up, while nothing failed);
- a tick later than the threshold is counted; the first of a run of late ticks is logged
  (``tick_late``), and once ticks have kept time for ``LATE_RUN_ENDS_AFTER_S`` one line
  (``ticks_on_time_again``) says how many were late and by how much at most: a host that
  answers slowly for hours is two lines, not one per tick.

Stopping is cancelling :meth:`Metronome.run`; giving back host state (switching the heartbeat
off) is the owning service's ``drain``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final, NoReturn, Protocol, final

import structlog
import trio

from agent.records import record
from agent.units import MS_PER_S

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = structlog.get_logger(__name__)

LATE_RUN_ENDS_AFTER_S: Final = 60.0
"""Ticks on time for this long after the last late one end a run of late ticks."""


class EventSource(Protocol):
    """A subscription of the event pump: ``receive()`` returns the next event bits."""

    async def receive(self) -> int:
        """Wait for and return the next event bits."""
        ...

    def receive_nowait(self) -> int:
        """Return the pending event bits, or raise ``trio.WouldBlock`` if there are none."""
        ...


@final
class RetryWakeups:
    """A subscription that also returns (with no bits) once ``due()`` has passed: the
    metronome then reads the interval again. ``due()`` is ``math.inf`` while no retry is
    wanted, so nothing wakes up meanwhile; events pass through as they arrive."""

    def __init__(self, events: EventSource, due: Callable[[], float]) -> None:
        self._events = events
        self._due = due

    async def receive(self) -> int:
        """The next event bits, or 0 at the retry's time (a cancelled receive keeps them)."""
        with trio.move_on_at(self._due()):
            return await self._events.receive()
        return 0

    def receive_nowait(self) -> int:
        """The pending event bits (``trio.WouldBlock`` if none)."""
        return self._events.receive_nowait()


@record
class MetronomeStatistics:
    """What the metronome did.

    Attributes:
        interval_s: the interval in force, or None while the host wants no ticks.
        ticks: ticks sent.
        late: ticks sent more than the late threshold after their deadline.
        skipped: deadlines overrun by a whole interval, and therefore not sent.
        max_lateness_s: the latest a tick was sent after its deadline.
        rereads: how often the interval was read again after an event or a retry.
    """

    interval_s: float | None
    ticks: int
    late: int
    skipped: int
    max_lateness_s: float
    rereads: int


@final
class Metronome:
    """Calls ``tick`` on the host's rhythm, as ``read_interval`` reports it.

    Args:
        read_interval: asks the host (configuring it where needed) and returns the interval
            in seconds, or None for "no ticks"; called at start and after every event.
        tick: one unit of work (a beat, a report).
        late_after_s: a tick sent more than this after its deadline is logged as late.
    """

    def __init__(
        self,
        read_interval: Callable[[], Awaitable[float | None]],
        tick: Callable[[], Awaitable[None]],
        *,
        late_after_s: float,
    ) -> None:
        if late_after_s <= 0:
            msg = f"late_after_s must be positive, got {late_after_s}"
            raise ValueError(msg)
        self._read_interval = read_interval
        self._tick = tick
        self.late_after_s = late_after_s
        self._interval: float | None = None
        self._ticks = 0
        self._late = 0
        self._skipped = 0
        self._max_lateness = 0.0
        self._rereads = 0
        self._late_run = 0
        """Late ticks since the run of late ticks began (0: ticks keep time)."""
        self._late_run_worst = 0.0
        self._last_late_at = 0.0
        self._ready = False

    @property
    def ready(self) -> bool:
        """Whether this run reported ready (its first interval read returned): a service
        whose run ends in a refusal reports ready itself only if the metronome did not, as a
        task may report it once."""
        return self._ready

    @property
    def interval_s(self) -> float | None:
        """The interval in force (None: off, or not read yet)."""
        return self._interval

    def statistics(self) -> MetronomeStatistics:
        """Return the counters."""
        return MetronomeStatistics(
            self._interval,
            self._ticks,
            self._late,
            self._skipped,
            self._max_lateness,
            self._rereads,
        )

    async def run(
        self, events: EventSource, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Read the interval, report ready, then tick until cancelled.

        Each event from ``events`` makes the metronome read the interval again.
        """
        self._ready = False  # per run: a supervisor runs the service again
        self._interval = await self._checked_interval()
        task_status.started()
        self._ready = True
        while True:
            if self._interval is None:
                await events.receive()
            else:
                await self._keep_time(events, self._interval)
            self._rereads += 1
            self._interval = await self._checked_interval()

    async def _checked_interval(self) -> float | None:
        interval = await self._read_interval()
        if interval is not None and not 0 < interval < math.inf:
            msg = f"the interval must be a positive number of seconds, got {interval}"
            raise ValueError(msg)
        return interval

    async def _keep_time(self, events: EventSource, interval: float) -> None:
        """Tick every ``interval`` from now until an event arrives."""
        deadline = trio.current_time()
        skipped = 0
        while True:
            with trio.move_on_at(deadline):
                await events.receive()
                return
            try:  # a passed deadline cancels the receive before it looks for pending bits
                events.receive_nowait()
            except trio.WouldBlock:
                pass
            else:
                return
            sent_at = trio.current_time()
            lateness = sent_at - deadline
            await self._tick()
            self._ticks += 1
            self._max_lateness = max(self._max_lateness, lateness)
            self._note_lateness(sent_at, lateness, skipped, interval)
            deadline += interval
            overrun = trio.current_time() - deadline
            skipped = math.floor(overrun / interval) if overrun > 0 else 0
            deadline += skipped * interval
            self._skipped += skipped

    def _note_lateness(
        self, sent_at: float, lateness: float, skipped: int, interval: float
    ) -> None:
        """Count a late tick; log the first of a run of them, and the run's end."""
        if lateness > self.late_after_s:
            self._late += 1
            if not self._late_run:
                log.warning(
                    "tick_late",
                    lateness_ms=round(lateness * MS_PER_S, 1),
                    skipped=skipped,
                    interval_s=interval,
                )
            self._late_run += 1
            self._late_run_worst = max(self._late_run_worst, lateness)
            self._last_late_at = sent_at
        elif self._late_run and sent_at - self._last_late_at >= LATE_RUN_ENDS_AFTER_S:
            log.info(
                "ticks_on_time_again",
                late_ticks=self._late_run,
                max_lateness_ms=round(self._late_run_worst * MS_PER_S, 1),
            )
            self._late_run = 0
            self._late_run_worst = 0.0
