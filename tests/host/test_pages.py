"""The simulated kernel's page pool: chunks of 256 consecutive pages."""

from __future__ import annotations

from agent.host.driver._pages import CHUNK_BYTES, GUEST_RAM_BASE, PageAllocator
from agent.protocol.constants import BALLOON_CHUNK_PAGES


def test_fresh_chunks_are_consecutive_pages() -> None:
    pool = PageAllocator(2 * BALLOON_CHUNK_PAGES)
    assert (pool.alloc_chunk(), pool.alloc_chunk()) == (
        GUEST_RAM_BASE,
        GUEST_RAM_BASE + CHUNK_BYTES,
    )
    assert pool.alloc_chunk() is None


def test_a_freed_chunk_comes_back_whole() -> None:
    pool = PageAllocator(BALLOON_CHUNK_PAGES)
    chunk = pool.alloc_chunk()
    assert chunk is not None
    pool.free_chunk(chunk)
    assert pool.alloc_chunk() == chunk
    assert pool.alloc_chunk() is None


def test_a_pool_short_of_a_chunk_hands_out_none() -> None:
    """255 pages left make no chunk: the refusal takes none of them."""
    pool = PageAllocator(2 * BALLOON_CHUNK_PAGES - 1)
    assert pool.alloc_chunk() == GUEST_RAM_BASE
    assert pool.alloc_chunk() is None
    assert pool.alloc_chunk() is None
