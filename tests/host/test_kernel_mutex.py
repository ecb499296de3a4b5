"""``KernelMutex``: the simulated driver's sleeping lock, which sleeps only when contended."""

from __future__ import annotations

import trio
import trio.testing

from agent.host.driver._util import KernelMutex


async def test_uncontended_lock_takes_no_checkpoint() -> None:
    """Taking a free mutex is no schedule point (the ioctl entry already had one)."""
    mutex = KernelMutex()
    with trio.testing.assert_no_checkpoints():
        async with mutex:
            pass


async def test_contended_lock_sleeps_and_serves_waiters_in_order() -> None:
    """A held mutex makes others sleep; they get it one after the other, in arrival order."""
    mutex = KernelMutex()
    order: list[int] = []

    async def waiter(number: int) -> None:
        async with mutex:
            order.append(number)

    async with trio.open_nursery() as nursery, mutex:
        for number in range(3):
            nursery.start_soon(waiter, number)
            await trio.testing.wait_all_tasks_blocked()
        assert order == []
    assert order == [0, 1, 2]


async def test_a_released_mutex_goes_to_its_first_waiter_before_a_newcomer() -> None:
    """Releasing hands the mutex to the sleeper: the releasing task, asking again at once,
    sleeps behind it instead of jumping the queue."""
    mutex = KernelMutex()
    order: list[str] = []

    async def waiter() -> None:
        async with mutex:
            order.append("waiter")

    async with trio.open_nursery() as nursery:
        async with mutex:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
        async with mutex:
            order.append("newcomer")
    assert order == ["waiter", "newcomer"]


async def test_a_cancelled_waiter_takes_nothing_and_blocks_no_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A sleeper cancelled before its turn never holds the mutex; the next one gets it, and
    the mutex is free (no schedule point) once that one leaves."""
    mutex = KernelMutex()
    order: list[str] = []

    async def waiter(name: str, scope: trio.CancelScope) -> None:
        with scope:
            async with mutex:
                order.append(name)

    first, second = trio.CancelScope(), trio.CancelScope()
    with trio.fail_after(60):  # a mutex handed to the cancelled waiter would never come free
        async with trio.open_nursery() as nursery, mutex:
            nursery.start_soon(waiter, "first", first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter, "second", second)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
            await trio.testing.wait_all_tasks_blocked()
    assert (order, first.cancelled_caught) == (["second"], True)
    with trio.testing.assert_no_checkpoints():
        async with mutex:
            pass
