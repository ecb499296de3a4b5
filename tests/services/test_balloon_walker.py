"""``ChunkWalker`` on its own: when a ``MemAvailable`` reading may serve more than one chunk,
and what a walk logs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing
from structlog.testing import capture_logs

from agent.services.balloon._backoff import Backoff
from agent.services.balloon._handover import HostTarget
from agent.services.balloon._walker import ChunkWalker

if TYPE_CHECKING:
    from agent.protocol import ChunkPages
    from agent.services.balloon._chunks import Chunk

CHUNK_BYTES = 1 << 20


class BlockingHandover:
    """Takes chunks at once, except the ``block_at``-th, whose inflate sleeps until cancelled."""

    needs_pages = False

    def __init__(self, block_at: int) -> None:
        self.block_at = block_at
        self.inflates = 0
        self.blocked = trio.Event()

    async def read_target(self) -> HostTarget:
        raise NotImplementedError

    async def inflate(self, chunk: Chunk) -> None:
        del chunk
        self.inflates += 1
        if self.inflates == self.block_at:
            self.blocked.set()
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def deflate(self, chunk: Chunk) -> None:
        del chunk
        await trio.lowlevel.checkpoint()

    def never_held(self, rc: int) -> bool:
        del rc
        return False


class CountingAllocator:
    """Hands out addresses; holds no memory."""

    def __init__(self) -> None:
        self.next = CHUNK_BYTES

    def allocate(self) -> int:
        self.next += CHUNK_BYTES
        return self.next

    def release(self, address: int) -> None:
        del address

    def physical_pages(self, address: int) -> ChunkPages:
        raise NotImplementedError


async def test_a_restarted_walk_reads_memavailable_afresh(autojump_clock: trio.abc.Clock) -> None:
    """A walk cancelled mid-chunk (the service restarting) does not carry its last reading
    over: the first chunk after the restart reads MemAvailable and stops at the floor."""
    available = {"mb": 10_000}
    reads: list[int] = []
    read_after_restart = trio.Event()

    def mem_available() -> int:
        reads.append(available["mb"])
        if len(reads) > 1:
            read_after_restart.set()
        return available["mb"]

    handover = BlockingHandover(block_at=2)
    walker = ChunkWalker(
        handover,
        CountingAllocator(),
        backoff=Backoff(1.0, 60.0),
        mem_available_mb=mem_available,
        min_available_mb=256,
    )
    walker.set_target(HostTarget(chunks=3, max_chunks=None))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            await handover.blocked.wait()
            nursery.cancel_scope.cancel()
        assert reads == [10_000]  # one reading served both chunks so far
        available["mb"] = 200  # meanwhile the guest used its memory: below the floor
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            await read_after_restart.wait()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert (len(walker.held), walker.failures, handover.inflates) == (2, 1, 2)


async def test_a_walk_that_reaches_its_goal_is_logged_once() -> None:
    """Each walk logs ``balloon_walk_done`` with the chunks it moved; a wake-up that finds
    the balloon at its goal logs nothing."""
    walker = ChunkWalker(
        BlockingHandover(block_at=0),
        CountingAllocator(),
        backoff=Backoff(1.0, 60.0),
        mem_available_mb=lambda: 10_000,
        min_available_mb=256,
    )
    with capture_logs() as logs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            walker.set_target(HostTarget(chunks=3, max_chunks=None))
            await walker.wait_held(3)
            walker.wake()  # nothing to walk
            await trio.testing.wait_all_tasks_blocked()
            walker.set_target(HostTarget(chunks=1, max_chunks=None))
            await walker.wait_held(1)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    done = [(e["chunks"], e["moved"]) for e in logs if e["event"] == "balloon_walk_done"]
    assert done == [(3, 3), (1, -2)]
