"""The owned balloon against a host whose page states and count part, as a real host's do.

A real host marks a chunk's pages (un)ballooned before GMM counts the chunk, and with one vCPU
answers GMM's refusal after the pages changed (``pgmR3PhysChangeMemBalloonRendezvous``). The
host's count here is set off by hand, as a guest that inflated a chunk twice leaves it.
Virtual time (``autojump_clock``) drives every wait; each test is bounded by
``trio.fail_after`` on that clock.
"""

from __future__ import annotations

import errno
from typing import Final

import trio

from agent.host import SimulatedHost
from agent.protocol import VBoxStatusError
from agent.protocol.constants import BALLOON_CHUNK_PAGES
from tests.services.balloon_support import ErrnoOnce, SimChunks, running_balloon

LIMIT_S: Final = 300.0


async def _count_two_chunks_over(host: SimulatedHost) -> None:
    host.vmmdev.balloon.counted_pages = 2 * BALLOON_CHUNK_PAGES


async def test_a_refused_inflate_is_taken_back_before_its_chunk_is_unmapped(
    autojump_clock: trio.abc.Clock,
) -> None:
    """GMM refuses the first inflates (its count is two chunks over the pages), after the
    host marked their pages ballooned: the agent deflates each such chunk before it unmaps
    it, which also brings the count down to the pages. The walk then reaches the target
    with the pages ballooned exactly those of the chunks the agent holds, counted once, and
    gives them all back."""
    host = SimulatedHost(personality="passthrough", cpus=1)
    chunks = SimChunks()
    balloon = host.vmmdev.balloon
    with trio.fail_after(LIMIT_S):
        async with running_balloon(
            personality="", host=host, allocator=chunks, before=_count_two_chunks_over
        ) as run:
            host.set_balloon_target(4)
            await run.until(lambda: balloon.chunks == 4)
            held = 4 * BALLOON_CHUNK_PAGES
            assert (len(chunks.live), balloon.pages, balloon.counted_pages) == (4, held, held)
            host.set_balloon_target(0)
            await run.settle(0)
            await run.until(lambda: not chunks.live)
            assert (balloon.pages, balloon.counted_pages) == (0, 0)


async def test_a_refused_inflate_whose_deflate_fails_stays_held(
    autojump_clock: trio.abc.Clock,
) -> None:
    """As above, but the driver refuses the deflate that would take the refused chunk back
    (EIO, before the host sees it): the chunk's pages stay ballooned, so the agent holds it,
    unconfirmed and mapped, and gives it back with the balloon. No page ends up ballooned
    whose chunk the agent unmapped; the count, two chunks over at the start and one chunk
    nearer after the deflate that did reach the host, stays where the host put it."""
    host = SimulatedHost(personality="passthrough", cpus=1)
    chunks = SimChunks()
    balloon = host.vmmdev.balloon
    with trio.fail_after(LIMIT_S):
        async with running_balloon(
            personality="", host=host, allocator=chunks, before=_count_two_chunks_over
        ) as run:
            walker = run.walker
            eio = VBoxStatusError.from_errno(errno.EIO, "VMMDEVREQ_CHANGE_MEMBALLOON")
            walker.handover = ErrnoOnce(walker.handover, eio, deflate=1)
            host.set_balloon_target(1)
            await run.until(lambda: len(walker.held) == 1)
            [chunk] = walker.held
            assert (walker.unconfirmed, list(chunks.live)) == ({chunk.address}, [chunk.address])
            assert (balloon.pages, balloon.counted_pages) == (BALLOON_CHUNK_PAGES, 512)
            host.set_balloon_target(0)
            await run.until(lambda: not chunks.live)
            assert (walker.held, balloon.pages, balloon.counted_pages) == ([], 0, 256)
