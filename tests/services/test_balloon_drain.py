"""The owned balloon's drain: what a refusal costs it, and the cap that keeps the balloon
within what the drain can give back in time.

Virtual time (``autojump_clock``) drives every wait; each test is bounded by
``trio.fail_after`` on that clock.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import structlog.testing
import trio

from agent.config import DaemonConfig
from agent.protocol import RequestType
from agent.protocol.status import VERR_NO_MEMORY
from agent.services import DrainTime
from agent.services.balloon._budget import DEFAULT_RATE, DRAIN_SHARE, DrainBudget
from agent.services.balloon._chunks import Chunk
from tests.services.balloon_support import HandoverWrapper, SimChunks, running_balloon

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.protocol import Submission
    from agent.services.balloon._handover import Handover
    from tests.services.balloon_support import Running

CHUNKS = 200


class RecordDeflates(HandoverWrapper):
    """Every deflate the walker asks for goes to ``deflates`` (the chunk's address), refused
    or not."""

    def __init__(self, handover: Handover) -> None:
        super().__init__(handover)
        self.deflates: list[int] = []

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        self.deflates.append(chunk.address)
        await super().deflate(chunk, submission)


async def test_one_refusal_costs_one_retry_and_nothing_more(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """The host refuses the drain's first deflate once: every other chunk goes back, newest
    first, then that one, each asked for once more; and no chunk is looked for among the
    others (the old drain compared each later chunk with every one below it: quadratic)."""
    compared = 0
    equal = Chunk.__eq__

    def counted(self: Chunk, other: object) -> bool:
        nonlocal compared
        compared += 1
        return equal(self, other)

    monkeypatch.setattr(Chunk, "__eq__", counted)
    chunks = SimChunks()
    with trio.fail_after(60):
        async with running_balloon(
            personality="passthrough", allocator=chunks, drain_s=10.0
        ) as run:
            run.host.set_balloon_target(CHUNKS)
            await run.settle(CHUNKS)
            walker = run.walker
            newest_first = [chunk.address for chunk in reversed(walker.held)]
            walker.handover = recorder = RecordDeflates(walker.handover)
            run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
            compared = 0
        assert (run.host_chunks, chunks.live) == (0, {})
    assert recorder.deflates == [*newest_first, newest_first[0]]
    assert compared == 0


CHUNK_S = 1 / 64
"""What the slow simulated host takes for each CHANGE_MEMBALLOON: 64 chunks a second."""


def test_the_default_drain_time_is_the_daemons() -> None:
    assert DrainTime().seconds == DaemonConfig().shutdown_timeout_s


def test_the_budget_follows_the_measured_rate_and_the_drain_time() -> None:
    """The default rate before any step; the first step sets the rate, later ones move it by
    their weight; inflates stand in until 16 deflated chunks were timed, whose average
    then sets it; the cap follows the drain time."""
    drain_time = DrainTime(4.0)
    budget = DrainBudget(drain_time)
    expected = math.floor(4.0 * DRAIN_SHARE * DEFAULT_RATE)
    assert (budget.chunks, budget.measured_by) == (expected, None)
    budget.record(4, 0.0625, deflate=False)  # 64 chunks a second, however few
    assert (budget.rate, budget.chunks, budget.measured_by) == (64, 128, "inflate")
    budget.record(16, 0.125, deflate=False)  # 128 a second, at a quarter's weight
    seconds_per_chunk = 1 / 64 + (1 / 128 - 1 / 64) / 4
    assert budget.rate == pytest.approx(1 / seconds_per_chunk)
    budget.record(8, 1.0, deflate=True)  # fewer than 16 deflated: the inflates' figure
    assert budget.rate == pytest.approx(1 / seconds_per_chunk)
    assert budget.measured_by == "inflate"
    budget.record(8, 0.0, deflate=True)  # 16 in 1 s: their average sets it
    assert (budget.rate, budget.chunks, budget.measured_by) == (16, 32, "deflate")
    budget.record(16, 16.0, deflate=False)  # inflates no longer count
    assert budget.rate == 16
    budget.record(64, 0.5, deflate=True)  # a full-weight step sets it
    assert (budget.rate, budget.chunks) == (128, 256)
    drain_time.set(8.0)
    assert budget.chunks == 512
    budget.record(0, 1.0, deflate=True)  # nothing moved: nothing measured
    assert budget.chunks == 512


async def test_the_owned_balloon_holds_what_the_drain_gives_back_in_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A host that takes 1/64 s a chunk asks for 1000 chunks, which a drain of 5 s could not
    give back: the balloon stops at what half the drain time gives back at the measured
    rate (160), says so once (target, cap, rate, the setting that raises it) and in its
    status and statistics, and a stop gives every chunk back within the drain time."""
    drain_time = DrainTime(5.0)
    chunks = SimChunks()
    with trio.fail_after(120), structlog.testing.capture_logs() as logs:
        async with running_balloon(
            personality="passthrough",
            allocator=chunks,
            drain_s=drain_time.seconds,
            drain_time=drain_time,
        ) as run:
            run.host.set_delay(RequestType.CHANGE_MEMBALLOON, CHUNK_S)
            run.host.set_balloon_target(1000)
            await run.until(lambda: run.walker.drain_capped or run.host_chunks == 1000)
            statistics = run.service.statistics()
            rate = statistics.drain_rate
            assert rate == pytest.approx(64)
            assert rate is not None
            cap = math.floor(5.0 * DRAIN_SHARE * rate)
            assert cap in (159, 160)
            assert (run.host_chunks, len(run.walker.held), statistics.drain_cap) == (cap, cap, cap)
            assert f", drain cap {cap} MB" in run.service.status()
            stopping = trio.current_time()
        assert (run.host_chunks, chunks.live) == (0, {})
        assert trio.current_time() - stopping <= drain_time.seconds
    [capped] = [e for e in logs if e["event"] == "balloon_drain_cap"]
    assert capped["log_level"] == "warning"
    assert (capped["target"], capped["cap"], capped["drain_s"]) == (1000, cap, 5.0)
    assert capped["rate_chunks_s"] == pytest.approx(64, abs=0.1)
    assert "daemon.shutdown_timeout_s" in capped["fix"]
    assert not [e for e in logs if e["event"] == "balloon_drain_incomplete"]


async def test_a_longer_drain_time_raises_the_cap_and_a_lower_target_lifts_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A reload that doubles the drain time doubles the cap at once (no new warning); one
    that halves it gives back what no longer fits; a target under the cap ends it (one
    line); a target crossing the cap again logs at debug only (each crossing was a new
    warning)."""
    drain_time = DrainTime(5.0)
    with trio.fail_after(120), structlog.testing.capture_logs() as logs:
        async with running_balloon(
            personality="passthrough", drain_s=20.0, drain_time=drain_time
        ) as run:
            run.host.set_delay(RequestType.CHANGE_MEMBALLOON, CHUNK_S)
            run.host.set_balloon_target(1000)
            await run.until(lambda: run.walker.drain_capped)
            first = len(run.walker.held)
            drain_time.set(10.0)
            await run.until(lambda: len(run.walker.held) >= 2 * first - 1)
            assert run.walker.drain_capped
            drain_time.set(2.5)
            await run.until(lambda: len(run.walker.held) <= first // 2 + 1)
            assert run.walker.drain_capped
            run.host.set_balloon_target(10)
            await run.until(lambda: run.host_chunks == 10 and not run.walker.drain_capped)
            assert ", drain cap" not in run.service.status()
            assert not run.service.statistics().drain_capped
            # A host moving its target across the cap again: debug lines, no new warning.
            for _ in range(3):
                run.host.set_balloon_target(1000)
                await run.until(lambda: run.walker.drain_capped)
                run.host.set_balloon_target(10)
                await run.until(lambda: run.host_chunks == 10 and not run.walker.drain_capped)
    capping = [
        (e["event"], e["log_level"]) for e in logs if e["event"].startswith("balloon_drain_cap")
    ]
    assert capping == [
        ("balloon_drain_cap", "warning"),
        ("balloon_drain_cap_lifted", "info"),
        *[("balloon_drain_cap", "debug"), ("balloon_drain_cap_lifted", "debug")] * 3,
    ]


class SlowInflatesAfter(HandoverWrapper):
    """Inflates after the first ``fast`` ones take ``extra_s`` longer (a host that slows
    down, or a loaded guest: an inflate step measured slower than the ones before)."""

    def __init__(self, handover: Handover, *, fast: int, extra_s: float) -> None:
        super().__init__(handover)
        self.fast = fast
        self.extra_s = extra_s

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        if self.fast:
            self.fast -= 1
        else:
            await trio.sleep(self.extra_s)
        await super().inflate(chunk, submission)


async def test_a_slower_inflate_at_the_cap_gives_nothing_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The first time the cap binds, the inflates still stand in for the rate: the last
    step before the cap, twice as slow, pulls the cap below the chunks the walk took. They
    still fit the whole drain time, so none goes back (the old walk turned back, gave 16
    back, then took them again once the deflates measured the rate); the warning and the
    status name the cap, the chunks held above it."""
    with trio.fail_after(120), structlog.testing.capture_logs() as logs:
        async with running_balloon(personality="passthrough", drain_s=10.0) as run:
            await run.service.mode_known.wait()
            walker = run.walker
            walker.handover = SlowInflatesAfter(walker.handover, fast=144, extra_s=CHUNK_S)
            run.host.set_delay(RequestType.CHANGE_MEMBALLOON, CHUNK_S)
            run.host.set_balloon_target(1000)
            await run.until(lambda: walker.drain_capped)
            held = len(walker.held)
            assert held in (159, 160)  # what the fast steps' cap let the walk take
            assert (walker.deflated, run.host_chunks) == (0, held)
            budget = walker.budget
            assert budget is not None
            cap, kept = budget.chunks, budget.kept
            assert budget.measured_by == "inflate"
            assert cap is not None
            assert kept is not None
            assert cap < held <= kept
            assert f"balloon {held}/1000 MB (owned, drain cap {cap} MB)" in run.service.status()
            assert run.service.statistics().drain_cap == cap
    [capped] = [e for e in logs if e["event"] == "balloon_drain_cap"]
    assert (capped["cap"], capped["chunks"]) == (cap, held)


async def _measured_by_hand(run: Running, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """The walker's budget measures none of the walk's steps (a host without delay takes no
    time on the virtual clock): return its ``record``, through which the test measures."""
    await run.service.mode_known.wait()
    budget = run.walker.budget
    assert budget is not None
    record = budget.record

    def unmeasured(chunks: int, seconds: float, *, deflate: bool) -> None:
        del chunks, seconds, deflate

    monkeypatch.setattr(budget, "record", unmeasured)
    return record


def _figures(run: Running) -> tuple[int, int | None, int | None]:
    """The chunks held, the cap and the top of the band."""
    budget = run.walker.budget
    assert budget is not None
    return len(run.walker.held), budget.chunks, budget.kept


async def test_a_rate_that_falls_by_less_than_half_gives_nothing_back(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """At the cap, 320 chunks at 128 a second (5 s): deflates measured at two thirds of that
    lower the cap to 213 but the 320 still fit the whole 5 s (426): nothing goes back (the
    old cap gave back 107). At a quarter (32 a second) they no longer fit (160): they go
    back to the cap, 80, not to the band's top; a warning only the first time."""
    with trio.fail_after(60), structlog.testing.capture_logs() as logs:
        async with running_balloon(personality="passthrough", drain_time=DrainTime(5.0)) as run:
            record = await _measured_by_hand(run, monkeypatch)
            record(64, 64 / 128, deflate=False)
            run.host.set_balloon_target(1000)
            await run.until(lambda: run.walker.drain_capped)
            assert run.host_chunks == len(run.walker.held) == 320
            record(16, 16 * 3 / 256, deflate=True)  # 85.3 chunks a second
            run.walker.wake()
            await trio.sleep(1)
            assert (run.walker.deflated, run.host_chunks) == (0, 320)
            assert _figures(run) == (320, 213, 426)
            assert ", drain cap 213 MB" in run.service.status()
            record(64, 64 / 32, deflate=True)  # a full-weight step: 32 chunks a second
            run.walker.wake()
            await run.until(lambda: run.host_chunks == 80)
            await trio.sleep(1)
            assert (run.host_chunks, *_figures(run)) == (80, 80, 80, 160)
            assert run.walker.drain_capped
    assert [e["event"] for e in logs if e["event"].startswith("balloon_drain_cap")] == [
        "balloon_drain_cap"
    ]


async def test_a_reload_gives_back_only_what_the_whole_drain_time_cannot(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """At the cap, 320 chunks at 128 a second (5 s): a reload to 4 s lowers the cap to 256,
    and the 320 still fit 4 s (512): none goes back (the old cap gave back 64). Halving it
    to 2 s (256 fit) gives back down to the cap, 128, at once."""
    drain_time = DrainTime(5.0)
    with trio.fail_after(60):
        async with running_balloon(personality="passthrough", drain_time=drain_time) as run:
            record = await _measured_by_hand(run, monkeypatch)
            record(64, 64 / 128, deflate=False)
            run.host.set_balloon_target(1000)
            await run.until(lambda: run.walker.drain_capped)
            drain_time.set(4.0)
            await trio.sleep(1)
            assert (run.walker.deflated, run.host_chunks) == (0, 320)
            assert _figures(run) == (320, 256, 512)
            drain_time.set(2.0)
            await run.until(lambda: run.host_chunks == 128)
            await trio.sleep(1)
            assert (run.host_chunks, *_figures(run)) == (128, 128, 128, 256)
            assert ", drain cap 128 MB" in run.service.status()
