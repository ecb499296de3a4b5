"""``ChunkWalker`` on its own: when a ``MemAvailable`` reading may serve more than one chunk,
what a walk logs, and that a group of chunks mapped ahead never outlives its step."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from agent.protocol import VBoxStatusError
from agent.protocol.status import (
    VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH,
    VERR_INVALID_PARAMETER,
    VERR_NO_MEMORY,
)
from agent.services.balloon._backoff import Backoff
from agent.services.balloon._chunks import ChunkError
from agent.services.balloon._handover import HostTarget
from agent.services.balloon._walker import BATCH_CHUNKS, ChunkWalker

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.protocol import ChunkPages, Submission
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

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        del chunk
        self.inflates += 1
        if self.inflates == self.block_at:
            submission.issued = True  # held by the host: the driver has the call
            self.blocked.set()
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        del chunk, submission
        await trio.lowlevel.checkpoint()

    def refusal_ballooned(self, rc: int) -> bool:
        del rc
        return False

    async def not_held(
        self, chunk: Chunk, rc: int, *, unconfirmed: bool, balloon_empty: bool
    ) -> bool:
        del chunk, rc, unconfirmed, balloon_empty
        await trio.lowlevel.checkpoint()
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


async def test_a_walk_turned_back_logs_what_the_walk_back_moved(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The floor stops an inflate at 144 chunks; the target drops to 50: the walk back logs
    the 94 chunks it gave back, not the 50 between the goal and where the stopped walk began
    (the stopped walk, which reached no goal, logs no ``balloon_walk_done``)."""
    walker = ChunkWalker(
        BlockingHandover(block_at=0),
        CountingAllocator(),
        backoff=Backoff(1.0, 60.0),
        mem_available_mb=lambda: 400 - len(walker.held),
        min_available_mb=256,
    )
    with capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            walker.set_target(HostTarget(chunks=1000, max_chunks=None))
            while not walker.failures:
                await trio.testing.wait_all_tasks_blocked()
            assert len(walker.held) == 144
            walker.set_target(HostTarget(chunks=50, max_chunks=None))
            await walker.wait_held(50)
            nursery.cancel_scope.cancel()
    done = [(e["chunks"], e["moved"]) for e in logs if e["event"] == "balloon_walk_done"]
    assert done == [(50, -94)]


async def test_retries_that_move_some_chunks_are_one_run_of_failures(
    autojump_clock: trio.abc.Clock,
) -> None:
    """At the floor with a MiB freed every second, each retry inflates a few chunks and stops
    again: the chunks are kept, the backoff keeps growing, one warning for ten minutes; the run
    ends (one line, the status told) only once the walk reaches its goal."""
    freed = {"mb": 0}
    status_changes = [0]

    def available() -> int:
        return 400 + freed["mb"] + int(trio.current_time()) - len(walker.held)

    def status_changed() -> None:
        status_changes[0] += 1

    walker = ChunkWalker(
        BlockingHandover(block_at=0),
        CountingAllocator(),
        backoff=Backoff(1.0, 60.0),
        mem_available_mb=available,
        min_available_mb=256,
        status_changed=status_changed,
    )
    with capture_logs() as logs, trio.fail_after(3600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            walker.set_target(HostTarget(chunks=1800, max_chunks=None))
            await trio.sleep(600)
            assert 144 + 500 < len(walker.held) < 1800  # every retry kept what it moved
            stopped = [e for e in logs if e["event"] == "balloon_walk_stopped"]
            assert walker.last_failure == stopped[-1]["reason"]
            levels = [e["log_level"] for e in stopped]
            assert (levels[0], levels.count("warning")) == ("warning", 1)
            delays = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0] + [60.0] * (len(stopped) - 6)
            assert [e["retry_in_s"] for e in stopped] == delays
            assert not [e for e in logs if e["event"] == "balloon_walk_recovered"]
            changes = status_changes[0]
            freed["mb"] = 10_000
            await walker.wait_held(1800)
            nursery.cancel_scope.cancel()
    [recovered] = [e for e in logs if e["event"] == "balloon_walk_recovered"]
    assert (recovered["chunks"], recovered["failures"]) == (1800, len(stopped))
    assert walker.last_failure is None
    assert status_changes[0] > changes


class TrackingAllocator:
    """Hands out addresses and keeps the mapped ones; the ``fail_at``-th allocation fails."""

    def __init__(self, fail_at: int = 0) -> None:
        self.next = CHUNK_BYTES
        self.mapped: set[int] = set()
        self.allocations = 0
        self.fail_at = fail_at

    def allocate(self) -> int:
        self.allocations += 1
        if self.allocations == self.fail_at:
            raise ChunkError(errno.ENOMEM, "mmap of a 1 MiB chunk failed: no memory")
        self.next += CHUNK_BYTES
        self.mapped.add(self.next)
        return self.next

    def release(self, address: int) -> None:
        self.mapped.remove(address)

    def physical_pages(self, address: int) -> ChunkPages:
        raise NotImplementedError


class ScriptedHandover(BlockingHandover):
    """BlockingHandover whose ``refuse_at``-th inflate fails with VERR_NO_MEMORY and whose
    ``on_inflate`` runs before each inflate (with its number)."""

    def __init__(self, *, block_at: int = 0, refuse_at: int = 0) -> None:
        super().__init__(block_at)
        self.refuse_at = refuse_at
        self.on_inflate: Callable[[int], None] = lambda _number: None

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        self.on_inflate(self.inflates + 1)
        if self.inflates + 1 == self.refuse_at:
            self.inflates += 1
            await trio.lowlevel.checkpoint()
            raise VBoxStatusError(VERR_NO_MEMORY, "VBGL_IOCTL_CHANGE_BALLOON")
        await super().inflate(chunk, submission)


def _walker(handover: BlockingHandover, allocator: TrackingAllocator) -> ChunkWalker:
    return ChunkWalker(
        handover,
        allocator,
        backoff=Backoff(1.0, 60.0),
        mem_available_mb=lambda: 100_000,
        min_available_mb=256,
    )


def _mapped_is_held(walker: ChunkWalker, allocator: TrackingAllocator) -> bool:
    return allocator.mapped == {chunk.address for chunk in walker.held}


async def test_a_lower_target_mid_group_unmaps_the_chunks_it_no_longer_wants() -> None:
    """A group is mapped ahead of its handovers; a new, lower target met halfway hands over no
    more of it and unmaps the rest, and a deflate unmaps every chunk it took back."""
    allocator = TrackingAllocator()
    handover = ScriptedHandover()
    walker = _walker(handover, allocator)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            handover.on_inflate = lambda number: (
                walker.set_target(HostTarget(chunks=3, max_chunks=None)) if number == 3 else None
            )
            walker.set_target(HostTarget(chunks=12, max_chunks=None))
            await walker.wait_held(3)
            assert allocator.allocations > 3  # the group was mapped ahead
            assert _mapped_is_held(walker, allocator)
            walker.set_target(HostTarget(chunks=40, max_chunks=None))
            await walker.wait_held(40)
            walker.set_target(HostTarget(chunks=1, max_chunks=None))
            await walker.wait_held(1)
            assert _mapped_is_held(walker, allocator)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("refuse_at", "fail_at"), [(5, 0), (0, 5)])
async def test_a_failure_mid_group_keeps_the_chunks_before_it(
    autojump_clock: trio.abc.Clock, refuse_at: int, fail_at: int
) -> None:
    """A chunk the host refuses, or one that cannot be mapped, stops the walk after the four
    before it; the rest of the group is unmapped, and the failure is retried."""
    allocator = TrackingAllocator(fail_at=fail_at)
    handover = ScriptedHandover(refuse_at=refuse_at)
    walker = _walker(handover, allocator)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            walker.set_target(HostTarget(chunks=10, max_chunks=None))
            await trio.testing.wait_all_tasks_blocked()
            assert (len(walker.held), walker.failures) == (4, 1)
            assert _mapped_is_held(walker, allocator)
            await walker.wait_held(10)  # the retry after the backoff
            assert _mapped_is_held(walker, allocator)
            nursery.cancel_scope.cancel()


async def test_a_walk_cancelled_mid_group_keeps_only_what_the_host_may_hold() -> None:
    """Cancelled while the host takes its third chunk, the walk keeps that one (the host may
    hold it) and unmaps the group's chunks it never handed over."""
    allocator = TrackingAllocator()
    handover = ScriptedHandover(block_at=3)
    walker = _walker(handover, allocator)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            walker.set_target(HostTarget(chunks=10, max_chunks=None))
            await handover.blocked.wait()
            nursery.cancel_scope.cancel()
    assert len(walker.held) == 3
    assert _mapped_is_held(walker, allocator)


async def test_an_unknown_memavailable_is_looked_for_before_every_chunk_of_a_group() -> None:
    """Without MemAvailable (the floor unchecked) a group does not end before each look: all
    16 chunks of the first group are mapped, each after a look, before the first handover."""
    looks: list[int] = []
    allocator = TrackingAllocator()
    handover = ScriptedHandover()
    mapped_at_first_handover: list[int] = []
    handover.on_inflate = lambda number: (
        mapped_at_first_handover.append(len(allocator.mapped)) if number == 1 else None
    )

    def unknown() -> None:
        looks.append(allocator.allocations)

    walker = ChunkWalker(
        handover,
        allocator,
        backoff=Backoff(1.0, 60.0),
        mem_available_mb=unknown,
        min_available_mb=256,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            walker.set_target(HostTarget(chunks=BATCH_CHUNKS, max_chunks=None))
            await walker.wait_held(BATCH_CHUNKS)
            nursery.cancel_scope.cancel()
    assert mapped_at_first_handover == [BATCH_CHUNKS]
    assert looks == list(range(BATCH_CHUNKS))  # one look before each chunk's mapping


class InvalidParameterDeflates(BlockingHandover):
    """BlockingHandover whose deflates fail with VERR_INVALID_PARAMETER, as Oracle's driver
    answers for an empty balloon; ``not_held`` trusts it only for an empty balloon and
    records what the walker told it."""

    def __init__(self, block_at: int) -> None:
        super().__init__(block_at)
        self.empty: list[bool] = []

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        del chunk, submission
        await trio.lowlevel.checkpoint()
        raise VBoxStatusError(VERR_INVALID_PARAMETER, "VBGL_IOCTL_CHANGE_BALLOON")

    async def not_held(
        self, chunk: Chunk, rc: int, *, unconfirmed: bool, balloon_empty: bool
    ) -> bool:
        del chunk, unconfirmed
        self.empty.append(balloon_empty)
        await trio.lowlevel.checkpoint()
        return rc == VERR_INVALID_PARAMETER and balloon_empty


@pytest.mark.parametrize(("block_at", "empty", "kept"), [(1, True, 0), (2, False, 2)])
async def test_the_driver_may_hold_none_only_while_every_chunk_is_unconfirmed(
    block_at: int, *, empty: bool, kept: int
) -> None:
    """A walk toward 2 chunks stops as the ``block_at``-th inflate has been issued: that chunk
    is held, its outcome unknown. The drain's deflate is told that the driver's balloon may
    be empty only when no chunk held is known to be in it (the first inflate went through
    with ``block_at`` 2), so a status meaning "empty balloon" forgets that chunk then and
    keeps it otherwise."""
    allocator = TrackingAllocator()
    handover = InvalidParameterDeflates(block_at)
    walker = _walker(handover, allocator)
    walker.set_target(HostTarget(chunks=2, max_chunks=None))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            await handover.blocked.wait()
            nursery.cancel_scope.cancel()
        assert len(walker.unconfirmed) == 1
        assert len(walker.held) == block_at
        assert kept == await walker.drain()
    assert (handover.empty, len(walker.held)) == ([empty], kept)
    assert _mapped_is_held(walker, allocator)


class BallooningRefusals(BlockingHandover):
    """Every inflate is refused after the host marked its pages ballooned (GMM's
    VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH) and every deflate with VERR_NO_MEMORY; the call
    named ``block_in`` ("deflate" or "not_held") of the ``block_at``-th deflate sleeps until
    cancelled."""

    def __init__(self, block_in: str, block_at: int = 1) -> None:
        super().__init__(0)
        self.block_in = block_in
        self.block_at = block_at
        self.deflates = 0

    async def _maybe_block(self, call: str) -> None:
        if call == self.block_in and self.deflates == self.block_at:
            self.blocked.set()
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        del chunk
        submission.issued = True
        await trio.lowlevel.checkpoint()
        raise VBoxStatusError(VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH, "VMMDEVREQ_CHANGE_MEMBALLOON")

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        del chunk
        self.deflates += 1
        submission.issued = True
        await self._maybe_block("deflate")
        raise VBoxStatusError(VERR_NO_MEMORY, "VMMDEVREQ_CHANGE_MEMBALLOON")

    def refusal_ballooned(self, rc: int) -> bool:
        return rc == VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH

    async def not_held(
        self, chunk: Chunk, rc: int, *, unconfirmed: bool, balloon_empty: bool
    ) -> bool:
        del chunk, rc, unconfirmed, balloon_empty
        await self._maybe_block("not_held")
        return False


@pytest.mark.parametrize("block_in", ["deflate", "not_held"])
async def test_a_refused_inflate_cancelled_while_taken_back_stays_held_and_mapped(
    block_in: str,
) -> None:
    """An inflate refused with its pages left ballooned is deflated before its chunk is
    unmapped; cancelled anywhere in that deflate (the handover's ``not_held`` included), the
    chunk is held, unconfirmed and still mapped, never given to the kernel with its pages
    ballooned."""
    allocator = TrackingAllocator()
    handover = BallooningRefusals(block_in)
    walker = _walker(handover, allocator)
    walker.set_target(HostTarget(chunks=1, max_chunks=None))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            await handover.blocked.wait()
            nursery.cancel_scope.cancel()
    assert len(walker.held) == 1
    assert walker.unconfirmed == {walker.held[0].address}
    assert _mapped_is_held(walker, allocator)


async def test_a_deflate_cancelled_while_its_refusal_is_read_keeps_the_chunk() -> None:
    """A refused deflate whose ``not_held`` is cancelled keeps its chunk held and mapped (the
    next deflate asks again)."""
    allocator = TrackingAllocator()
    handover = BallooningRefusals("not_held", block_at=2)
    walker = _walker(handover, allocator)
    walker.set_target(HostTarget(chunks=1, max_chunks=None))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.run)
            await trio.testing.wait_all_tasks_blocked()  # the refused chunk held, unconfirmed
            assert len(walker.held) == 1
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(walker.drain)
            await handover.blocked.wait()
            nursery.cancel_scope.cancel()
    assert len(walker.held) == 1
    assert _mapped_is_held(walker, allocator)
