"""``pass_mutex``: the driver's lock/unlock around code that does not sleep."""

from __future__ import annotations

import trio
import trio.testing

from agent.host.driver._util import pass_mutex


async def test_a_held_mutex_is_waited_for_until_its_holder_releases_it() -> None:
    mutex = trio.Lock()
    order: list[str] = []

    async def passer() -> None:
        await pass_mutex(mutex)
        order.append("passed")

    async with trio.open_nursery() as nursery:
        await mutex.acquire()
        nursery.start_soon(passer)
        await trio.testing.wait_all_tasks_blocked()
        order.append("released")
        mutex.release()
    assert order == ["released", "passed"]
    assert not mutex.locked()


async def test_a_free_mutex_is_passed_without_a_checkpoint() -> None:
    mutex = trio.Lock()
    reached = False
    with trio.CancelScope() as scope:
        scope.cancel()
        await pass_mutex(mutex)  # a checkpoint would raise Cancelled here
        reached = True
    assert reached
    assert not scope.cancelled_caught
