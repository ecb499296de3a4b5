"""Guest-physical pages the simulated kernel hands out (``alloc_page``) for the balloon.

Pages go out one by one (mainline's balloon) or a chunk at a time (Oracle's), a chunk as the
packed array of its 256 addresses that CHANGE_MEMBALLOON carries, so a chunk's pages are
never unpacked into Python integers on their way to the host and back.
"""

from __future__ import annotations

from typing import Final

from agent.protocol.balloon_pages import CHUNK_PAGES, consecutive_pages
from agent.protocol.constants import BALLOON_CHUNK_PAGES, PAGE_SIZE

GUEST_RAM_BASE: Final = 1 << 32
"""Balloon pages come from guest RAM placed above 4 GiB (below it sit request buffers)."""


class PageAllocator:
    """Hands out distinct page addresses from a fixed pool; freed pages are reused.

    Pages freed as a chunk are kept as that chunk and handed out again as a whole first.
    """

    __slots__ = ("_end", "_free", "_free_chunks", "_next")

    def __init__(self, page_count: int, base: int = GUEST_RAM_BASE) -> None:
        self._next = base
        self._end = base + page_count * PAGE_SIZE
        self._free: list[int] = []
        self._free_chunks: list[bytes] = []

    def alloc(self) -> int | None:
        """Return a free page address, or ``None`` when the pool is empty (-ENOMEM)."""
        if not self._free and self._free_chunks:
            self._free.extend(CHUNK_PAGES.unpack(self._free_chunks.pop()))
        if self._free:
            return self._free.pop()
        if self._next >= self._end:
            return None
        page = self._next
        self._next += PAGE_SIZE
        return page

    def alloc_chunk(self) -> bytes | None:
        """Return 256 free pages packed as CHANGE_MEMBALLOON carries them, or ``None``
        (taking none) if there are fewer."""
        if self._free_chunks:
            return self._free_chunks.pop()
        fresh = (self._end - self._next) // PAGE_SIZE
        if len(self._free) + fresh < BALLOON_CHUNK_PAGES:
            return None
        if not self._free:
            chunk = consecutive_pages(self._next)
            self._next += BALLOON_CHUNK_PAGES * PAGE_SIZE
            return chunk
        reused = min(BALLOON_CHUNK_PAGES, len(self._free))
        pages = self._free[len(self._free) - reused :]
        del self._free[len(self._free) - reused :]
        fresh_end = self._next + (BALLOON_CHUNK_PAGES - reused) * PAGE_SIZE
        pages.extend(range(self._next, fresh_end, PAGE_SIZE))
        self._next = fresh_end
        return CHUNK_PAGES.pack(*pages)

    def free(self, pages: list[int]) -> None:
        """Give ``pages`` back."""
        self._free.extend(pages)

    def free_chunk(self, chunk: bytes) -> None:
        """Give back the pages of a chunk :meth:`alloc_chunk` handed out."""
        self._free_chunks.append(chunk)
