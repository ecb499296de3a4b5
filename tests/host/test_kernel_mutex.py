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
