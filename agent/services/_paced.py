"""``Metronome``: the one timing engine for periodic work whose pace the host decides.

The host says how often (the heartbeat interval, the statistics interval) and may change its
mind; the metronome keeps that rhythm:

- deadlines are absolute (``deadline += interval``), so the time a tick takes never adds up
  to drift;
- a tick whose deadline has passed is sent once, at once; deadlines overrun by whole
  intervals are skipped, never sent as a burst, and the rhythm resumes on the original grid;
- the interval is read from the host at start and read again whenever one of the
  subscription's events arrives (a restore, the host's own change request); the first tick
  of a new interval goes out at once;
- an interval of ``None`` means "off": the metronome then sleeps until the next event.

Stopping is cancelling :meth:`Metronome.run`; giving back host state (switching the heartbeat
off) is the owning service's ``drain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol, final

import structlog
import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = structlog.get_logger(__name__)

_MS_PER_S = 1000


class EventSource(Protocol):
    """A subscription of the event pump: ``receive()`` returns the next event bits."""

    async def receive(self) -> int:
        """Wait for and return the next event bits."""
        ...


@dataclass(frozen=True, slots=True)
class MetronomeStatistics:
    """What the metronome did.

    Attributes:
        interval_s: the interval in force, or None while the host wants no ticks.
        ticks: ticks sent.
        late: ticks sent more than the late threshold after their deadline.
        skipped: deadlines overrun by a whole interval, and therefore not sent.
        max_lateness_s: the latest a tick was sent after its deadline.
        rereads: how often the interval was read again after an event.
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
        self._interval = await self._checked_interval()
        task_status.started()
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
            lateness = trio.current_time() - deadline
            await self._tick()
            self._ticks += 1
            self._max_lateness = max(self._max_lateness, lateness)
            if lateness > self.late_after_s:
                self._late += 1
                log.warning(
                    "tick_late",
                    lateness_ms=round(lateness * _MS_PER_S, 1),
                    skipped=skipped,
                    interval_s=interval,
                )
            deadline += interval
            overrun = trio.current_time() - deadline
            skipped = math.floor(overrun / interval) if overrun > 0 else 0
            deadline += skipped * interval
            self._skipped += skipped
