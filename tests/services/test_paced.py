"""Tests of the host-paced timing engine (``Metronome``) on trio's virtual clock.

Rules of this test module:
- Every test takes ``autojump_clock`` and asserts exact virtual times: the engine's timing
  logic alone, with a recording tick and an interval the test sets, no device involved.
- Events come through a memory channel, as a pump subscription delivers them.
- Synchronisation uses ``wait_all_tasks_blocked`` and virtual sleeps; every test is bounded
  by ``trio.fail_after`` on the virtual clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import structlog
import trio
import trio.testing

from agent.services._paced import Metronome

BOUND_S = 600.0
"""Virtual seconds any test may take."""


@dataclass
class Rhythm:
    """A fake host pace: the interval to report and a record of tick times."""

    interval: float | None = 2.0
    tick_duration: float = 0.0
    slow_ticks: dict[int, float] = field(default_factory=dict)
    ticks: list[float] = field(default_factory=list)
    reads: int = 0

    async def read_interval(self) -> float | None:
        """Report the current interval."""
        self.reads += 1
        await trio.lowlevel.checkpoint()
        return self.interval

    async def tick(self) -> None:
        """Record the time, then take ``tick_duration`` (or a slow tick's own duration)."""
        self.ticks.append(trio.current_time())
        await trio.sleep(self.slow_ticks.get(len(self.ticks), self.tick_duration))


def offsets(rhythm: Rhythm, start: float) -> list[float]:
    """Tick times relative to ``start``, rounded to the microsecond."""
    return [round(t - start, 6) for t in rhythm.ticks]


async def run_for(rhythm: Rhythm, seconds: float, *, late_after_s: float = 0.1) -> Metronome:
    """Run a metronome for ``seconds`` of virtual time with no events."""
    metronome = Metronome(rhythm.read_interval, rhythm.tick, late_after_s=late_after_s)
    send, receive = trio.open_memory_channel[int](4)
    with trio.fail_after(BOUND_S), send, receive:
        async with trio.open_nursery() as nursery:
            await nursery.start(metronome.run, receive)
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
    return metronome


class TestMetronome:
    """Absolute deadlines, late ticks, re-reads and "off"."""

    async def test_ticks_on_absolute_deadlines_without_drift(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A tick that takes 0.3 s does not shift the next one: ticks stay on the 2 s grid."""
        rhythm = Rhythm(interval=2.0, tick_duration=0.3)
        start = trio.current_time()
        metronome = await run_for(rhythm, 9.0)
        assert offsets(rhythm, start) == [0.0, 2.0, 4.0, 6.0, 8.0]
        stats = metronome.statistics()
        assert (stats.ticks, stats.late, stats.skipped, stats.max_lateness_s) == (5, 0, 0, 0.0)

    async def test_late_tick_is_sent_once_then_the_grid_resumes(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A tick stuck for 5.5 s is followed by one late tick at once, not by a burst."""
        rhythm = Rhythm(interval=2.0, slow_ticks={1: 5.5})
        start = trio.current_time()
        with structlog.testing.capture_logs() as logs:
            metronome = await run_for(rhythm, 11.0)
        assert offsets(rhythm, start) == [0.0, 5.5, 6.0, 8.0, 10.0]
        stats = metronome.statistics()
        assert (stats.late, stats.skipped, stats.max_lateness_s) == (1, 1, 1.5)
        late = [entry for entry in logs if entry["event"] == "tick_late"]
        assert late == [
            {
                "event": "tick_late",
                "log_level": "warning",
                "lateness_ms": 1500.0,
                "skipped": 1,
                "interval_s": 2.0,
            }
        ]

    async def test_small_lateness_is_not_logged(self, autojump_clock: trio.abc.Clock) -> None:
        """A tick overrunning its successor's deadline by less than the threshold is quiet."""
        rhythm = Rhythm(interval=1.0, slow_ticks={1: 1.05})
        start = trio.current_time()
        with structlog.testing.capture_logs() as logs:
            metronome = await run_for(rhythm, 2.5, late_after_s=0.1)
        assert offsets(rhythm, start) == [0.0, 1.05, 2.0]
        assert metronome.statistics().late == 0
        assert not [entry for entry in logs if entry["event"] == "tick_late"]

    async def test_event_rereads_the_interval_and_restarts_the_rhythm(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """After an event the new interval applies, starting with a tick at once."""
        rhythm = Rhythm(interval=2.0)
        metronome = Metronome(rhythm.read_interval, rhythm.tick, late_after_s=0.1)
        send, receive = trio.open_memory_channel[int](4)
        start = trio.current_time()
        with trio.fail_after(BOUND_S), send, receive:
            async with trio.open_nursery() as nursery:
                await nursery.start(metronome.run, receive)
                await trio.sleep(3.0)
                rhythm.interval = 0.5
                send.send_nowait(0x10)
                await trio.sleep(1.2)
                nursery.cancel_scope.cancel()
        assert offsets(rhythm, start) == [0.0, 2.0, 3.0, 3.5, 4.0]
        assert (rhythm.reads, metronome.statistics().rereads) == (2, 1)
        assert metronome.interval_s == 0.5

    async def test_no_interval_means_no_ticks_until_an_event(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """With the interval off the metronome sleeps; an event switching it on starts it."""
        rhythm = Rhythm(interval=None)
        metronome = Metronome(rhythm.read_interval, rhythm.tick, late_after_s=0.1)
        send, receive = trio.open_memory_channel[int](4)
        start = trio.current_time()
        with trio.fail_after(BOUND_S), send, receive:
            async with trio.open_nursery() as nursery:
                await nursery.start(metronome.run, receive)
                await trio.sleep(100.0)
                assert rhythm.ticks == []
                assert metronome.statistics().interval_s is None
                rhythm.interval = 10.0
                send.send_nowait(0x80)
                await trio.sleep(25.0)
                rhythm.interval = None
                send.send_nowait(0x80)
                await trio.sleep(100.0)
                nursery.cancel_scope.cancel()
        assert offsets(rhythm, start) == [100.0, 110.0, 120.0]

    async def test_events_during_a_tick_are_not_lost(self, autojump_clock: trio.abc.Clock) -> None:
        """An event that arrives while a tick is running is handled right after it."""
        rhythm = Rhythm(interval=5.0, slow_ticks={2: 1.0})
        metronome = Metronome(rhythm.read_interval, rhythm.tick, late_after_s=0.1)
        send, receive = trio.open_memory_channel[int](4)
        start = trio.current_time()
        with trio.fail_after(BOUND_S), send, receive:
            async with trio.open_nursery() as nursery:
                await nursery.start(metronome.run, receive)
                await trio.sleep(5.5)
                send.send_nowait(0x10)
                await trio.testing.wait_all_tasks_blocked()
                assert rhythm.reads == 1
                await trio.sleep(0.6)
                assert rhythm.reads == 2
                nursery.cancel_scope.cancel()
        assert offsets(rhythm, start) == [0.0, 5.0, 6.0]

    async def test_an_event_is_taken_while_ticks_overrun_the_interval(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Ticks that take 1.5 intervals leave no deadline ahead to wait for; an event that
        arrives during one is still taken right after it (the host's "off" here), as
        VBoxService looks for its event at the top of every loop."""
        rhythm = Rhythm(interval=1.0, tick_duration=1.5)
        metronome = Metronome(rhythm.read_interval, rhythm.tick, late_after_s=10.0)
        send, receive = trio.open_memory_channel[int](4)
        start = trio.current_time()
        with trio.fail_after(BOUND_S), send, receive:
            async with trio.open_nursery() as nursery:
                await nursery.start(metronome.run, receive)
                await trio.sleep(3.2)
                rhythm.interval = None
                send.send_nowait(0x80)
                await trio.sleep(100.0)
                nursery.cancel_scope.cancel()
        assert offsets(rhythm, start) == [0.0, 1.5, 3.0]
        assert (rhythm.reads, metronome.statistics().rereads) == (2, 1)
        assert metronome.interval_s is None

    async def test_a_run_of_late_ticks_is_one_warning_and_one_end(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Ten ticks that each take 1.25 intervals make eight late ticks in 12.5 s: each is
        counted, the first is one warning, and one line says so once ticks have kept time
        for a minute after the last; a later late tick begins a new run."""
        rhythm = Rhythm(interval=1.0, slow_ticks=dict.fromkeys(range(1, 11), 1.25))
        rhythm.slow_ticks[100] = 2.5
        start = trio.current_time()
        with structlog.testing.capture_logs() as logs:
            metronome = await run_for(rhythm, 110.0, late_after_s=0.1)
        assert offsets(rhythm, start)[:12] == [
            0,
            1.25,
            2.5,
            3.75,
            5,
            6.25,
            7.5,
            8.75,
            10,
            11.25,
            12.5,
            13,
        ]
        assert metronome.statistics().late == 9
        assert [(e["event"], e.get("lateness_ms"), e.get("late_ticks")) for e in logs] == [
            ("tick_late", 250.0, None),
            ("ticks_on_time_again", None, 8),
            ("tick_late", 500.0, None),
        ]
        assert logs[1]["max_lateness_ms"] == 750.0

    @pytest.mark.parametrize("interval", [0.0, -1.0, float("inf"), float("nan")])
    async def test_nonsense_interval_is_an_error(
        self, autojump_clock: trio.abc.Clock, interval: float
    ) -> None:
        """An interval that is not a positive number fails the run with one clear message."""
        rhythm = Rhythm(interval=interval)
        with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="positive number")):
            await run_for(rhythm, 1.0)

    def test_threshold_must_be_positive(self) -> None:
        """A zero late threshold is refused."""
        rhythm = Rhythm()
        with pytest.raises(ValueError, match="late_after_s must be positive"):
            Metronome(rhythm.read_interval, rhythm.tick, late_after_s=0)
