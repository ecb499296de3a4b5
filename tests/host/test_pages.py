"""The simulated kernel's page pool: single pages and packed 256-page chunks."""

from __future__ import annotations

from agent.host.driver._pages import GUEST_RAM_BASE, PageAllocator
from agent.protocol.balloon_pages import CHUNK_PAGES
from agent.protocol.constants import BALLOON_CHUNK_PAGES, PAGE_SIZE

CHUNK_BYTES = BALLOON_CHUNK_PAGES * PAGE_SIZE


def pages_of(chunk: bytes | None) -> list[int]:
    assert chunk is not None
    return list(CHUNK_PAGES.unpack(chunk))


def test_fresh_chunks_are_consecutive_pages() -> None:
    pool = PageAllocator(2 * BALLOON_CHUNK_PAGES)
    first, second = pool.alloc_chunk(), pool.alloc_chunk()
    assert pages_of(first) == list(range(GUEST_RAM_BASE, GUEST_RAM_BASE + CHUNK_BYTES, PAGE_SIZE))
    assert pages_of(second) == [page + CHUNK_BYTES for page in pages_of(first)]
    assert pool.alloc_chunk() is None


def test_a_freed_chunk_comes_back_whole() -> None:
    pool = PageAllocator(BALLOON_CHUNK_PAGES)
    chunk = pool.alloc_chunk()
    assert chunk is not None
    pool.free_chunk(chunk)
    assert pool.alloc_chunk() == chunk
    assert pool.alloc_chunk() is None


def test_single_pages_and_chunks_share_the_pool() -> None:
    """A freed chunk serves single pages; freed single pages and fresh ones make a chunk."""
    pool = PageAllocator(BALLOON_CHUNK_PAGES + 10)
    chunk = pool.alloc_chunk()
    assert chunk is not None
    pool.free_chunk(chunk)
    page = pool.alloc()
    assert page in pages_of(chunk)
    mixed = pages_of(pool.alloc_chunk())  # the other 255 pages and the first fresh one
    assert sorted(mixed) == sorted({*pages_of(chunk)} - {page} | {GUEST_RAM_BASE + CHUNK_BYTES})
    assert pool.alloc_chunk() is None  # 9 pages left: a refused chunk takes none of them
    assert None not in [pool.alloc() for _ in range(9)]
    assert pool.alloc() is None
