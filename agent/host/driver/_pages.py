"""Guest-physical pages the simulated kernel hands out (``alloc_page``) for the balloon.

The pool hands out a chunk's 256 pages at once, consecutive, and a chunk is kept as the
address of its first page: one 8-byte entry in the drivers' arrays, never 256 Python
integers, so the simulator's memory stays small whatever it balloons (a chunk's pages are
packed only for the CHANGE_MEMBALLOON that carries them, see
:func:`~agent.protocol.balloon_pages.consecutive_pages`).
"""

from __future__ import annotations

from array import array
from typing import Final

from agent.protocol.constants import BALLOON_CHUNK_PAGES, PAGE_SIZE

GUEST_RAM_BASE: Final = 1 << 32
"""Balloon pages come from guest RAM placed above 4 GiB (below it sit request buffers)."""
CHUNK_BYTES: Final = BALLOON_CHUNK_PAGES * PAGE_SIZE


def chunk_stack() -> array[int]:
    """An empty array of chunks, each its first page's address (8 bytes a chunk)."""
    return array("Q")


class PageAllocator:
    """Hands out distinct chunks of 256 consecutive pages from a fixed pool; freed chunks
    are handed out again first, the last freed first."""

    __slots__ = ("_end", "_free_chunks", "_next")

    def __init__(self, page_count: int, base: int = GUEST_RAM_BASE) -> None:
        self._next = base
        self._end = base + page_count * PAGE_SIZE
        self._free_chunks = chunk_stack()

    def alloc_chunk(self) -> int | None:
        """Return the first address of 256 free consecutive pages, or ``None`` (taking
        none) if the pool has fewer left (-ENOMEM)."""
        if self._free_chunks:
            return self._free_chunks.pop()
        if self._end - self._next < CHUNK_BYTES:
            return None
        first = self._next
        self._next += CHUNK_BYTES
        return first

    def free_chunk(self, first: int) -> None:
        """Give back the chunk :meth:`alloc_chunk` handed out as ``first``."""
        self._free_chunks.append(first)
