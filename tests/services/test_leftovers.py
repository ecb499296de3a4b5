"""``Leftovers``: remnants given back in the background, taken over, and given back at the stop.

Rules of this test module: a scripted remnant whose give-backs wait for the test (events, no
sleeps); pure trio under ``autojump_clock``, bounded by ``fail_after``.
"""

from __future__ import annotations

from typing import Final

import structlog.testing
import trio
import trio.testing

from agent.services import Leftovers

LIMIT_S: Final = 10.0


class Scripted:
    """A remnant whose give-back waits for ``answer`` (set it to let one end), or raises
    ``error`` once; records how each call ended, and whether the agent was stopping then."""

    def __init__(self, error: Exception | None = None) -> None:
        self.answer = trio.Event()
        self.error = error
        self.calls: list[tuple[bool, str]] = []
        self.began = trio.lowlevel.ParkingLot()

    def status(self) -> str:
        return "3 kept"

    async def give_back(self, stopping: trio.Event) -> None:
        self.began.unpark_all()
        if self.error is not None:
            error, self.error = self.error, None
            self.calls.append((stopping.is_set(), "raised"))
            raise error
        try:
            await self.answer.wait()
        except trio.Cancelled:
            self.calls.append((stopping.is_set(), "cancelled"))
            raise
        self.calls.append((stopping.is_set(), "returned"))


async def test_a_remnant_goes_back_in_the_background(autojump_clock: trio.abc.Clock) -> None:
    """Left before the daemon serves: given back once served, then gone from the status."""
    changes: list[str | None] = []
    gone = trio.Event()

    def status_changed() -> None:
        changes.append(leftovers.status("gadget"))
        if changes[-1] is None:
            gone.set()

    leftovers = Leftovers(status_changed)
    remnant = Scripted()
    leftovers.leave("gadget", remnant)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(leftovers.serve)
            remnant.answer.set()
            await gone.wait()
            leftovers.stop(trio.current_time() + 1.0)
            leftovers.close()
    assert remnant.calls == [(False, "returned")]
    assert changes == ["3 kept", None]


async def test_a_take_over_cancels_the_background_give_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A new start takes the remnant over: its background give-back is cancelled, and the
    stop then has nothing to give back."""
    leftovers = Leftovers()
    remnant = Scripted()
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(leftovers.serve)
            leftovers.leave("gadget", remnant)
            await remnant.began.park()
            assert await leftovers.take("gadget") is remnant
            assert (await leftovers.take("gadget"), leftovers.status("gadget")) == (None, None)
            await trio.testing.wait_all_tasks_blocked()
            leftovers.stop(trio.current_time() + 1.0)
            leftovers.close()
    assert remnant.calls == [(False, "cancelled")]


async def test_the_stop_gives_back_until_its_deadline(autojump_clock: trio.abc.Clock) -> None:
    """The give-back under way goes on through the stop, told the agent stops, and is cut
    at the stop's deadline; ``serve`` returns then."""
    leftovers = Leftovers()
    remnant = Scripted()
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(leftovers.serve)
            leftovers.leave("gadget", remnant)
            await remnant.began.park()
            stopped = trio.current_time()
            leftovers.stop(stopped + 1.0)
            leftovers.close()
            await leftovers.wait_given_back()
            assert trio.current_time() == stopped + 1.0
    assert remnant.calls == [(True, "cancelled")]
    assert leftovers.status("gadget") is None


async def test_a_give_back_that_raises_is_tried_again_at_the_stop(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A plug-in's give-back raises: one error line, the remnant stays in the status, and
    the stop tries it again; the agent never sees the error."""
    leftovers = Leftovers()
    remnant = Scripted(error=OSError("boom"))
    named = [structlog.contextvars.merge_contextvars]
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs(processors=named) as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(leftovers.serve)
            leftovers.leave("gadget", remnant)
            await remnant.began.park()
            await trio.sleep(1.0)  # nothing retries it meanwhile
            assert leftovers.status("gadget") == "3 kept"
            remnant.answer.set()
            leftovers.stop(trio.current_time() + 1.0)
            leftovers.close()
    assert remnant.calls == [(False, "raised"), (True, "returned")]
    [failed] = [entry for entry in logs if entry["event"] == "leftovers_give_back_failed"]
    assert (failed["service"], failed["error"]) == ("gadget", "OSError('boom')")


class InFlight(Scripted):
    """A remnant whose request in flight goes on after a cancel until ``answer`` (a deflate
    whose late reply counts), then ends."""

    async def give_back(self, stopping: trio.Event) -> None:
        self.began.unpark_all()
        with trio.CancelScope(shield=True):
            await self.answer.wait()
        self.calls.append((stopping.is_set(), "answered"))
        await trio.lowlevel.checkpoint()  # a take-over's cancel ends it here


async def test_a_take_over_waits_until_the_give_back_ended(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The take-over returns only once the cancelled give-back's request in flight ended:
    never two owners of one remnant."""
    leftovers = Leftovers()
    remnant = InFlight()
    taken = trio.Event()

    async def take() -> None:
        assert await leftovers.take("gadget") is remnant
        taken.set()

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(leftovers.serve)
            leftovers.leave("gadget", remnant)
            await remnant.began.park()
            nursery.start_soon(take)
            await trio.testing.wait_all_tasks_blocked()
            assert not taken.is_set()  # the request in flight still runs
            remnant.answer.set()
            await taken.wait()
            assert leftovers.status("gadget") is None
            leftovers.stop(trio.current_time() + 1.0)
            leftovers.close()
    assert remnant.calls == [(False, "answered")]


async def test_a_take_over_cancelled_leaves_the_remnant_to_give_back(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A take-over cancelled while the give-back ends: the remnant stays, and is given back
    again once that give-back ended."""
    leftovers = Leftovers()
    remnant = InFlight()
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(leftovers.serve)
            leftovers.leave("gadget", remnant)
            await remnant.began.park()
            with trio.move_on_after(1.0) as gave_up:
                await leftovers.take("gadget")
            assert gave_up.cancelled_caught
            assert leftovers.status("gadget") == "3 kept"
            remnant.answer.set()  # the first ends; the second goes through at once
            await trio.testing.wait_all_tasks_blocked()
            assert leftovers.status("gadget") is None
            leftovers.stop(trio.current_time() + 1.0)
            leftovers.close()
    assert remnant.calls == [(False, "answered"), (False, "answered")]


async def test_a_remnant_left_during_the_stop_goes_back_until_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A drain that ends after the stop came (a reload's, with its own deadline) still
    leaves its remnant, given back until the stop's deadline; past it, nothing is held."""
    leftovers = Leftovers()
    remnant = Scripted()
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(leftovers.serve)
            stopped = trio.current_time()
            leftovers.stop(stopped + 2.0)
            await trio.sleep(1.0)
            assert leftovers.leave("gadget", remnant)
            await remnant.began.park()
            remnant.answer.set()
            await leftovers.wait_given_back()
            await trio.sleep(1.0)
            assert not leftovers.leave("late", Scripted())
            leftovers.close()
    assert remnant.calls == [(True, "returned")]
    assert leftovers.status("late") is None
