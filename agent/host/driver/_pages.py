"""Guest-physical pages the simulated kernel hands out (``alloc_page``) for the balloon."""

from __future__ import annotations

from typing import Final

from agent.protocol.constants import PAGE_SIZE

GUEST_RAM_BASE: Final = 1 << 32
"""Balloon pages come from guest RAM placed above 4 GiB (below it sit request buffers)."""


class PageAllocator:
    """Hands out distinct page addresses from a fixed pool; freed pages are reused."""

    __slots__ = ("_end", "_free", "_next")

    def __init__(self, page_count: int, base: int = GUEST_RAM_BASE) -> None:
        self._next = base
        self._end = base + page_count * PAGE_SIZE
        self._free: list[int] = []

    def alloc(self) -> int | None:
        """Return a free page address, or ``None`` when the pool is empty (-ENOMEM)."""
        if self._free:
            return self._free.pop()
        if self._next >= self._end:
            return None
        page = self._next
        self._next += PAGE_SIZE
        return page

    def alloc_many(self, count: int) -> list[int] | None:
        """Return ``count`` free page addresses, or ``None`` (taking none) if there are fewer."""
        if len(self._free) + (self._end - self._next) // PAGE_SIZE < count:
            return None
        reused = min(count, len(self._free))
        pages = self._free[len(self._free) - reused :]
        del self._free[len(self._free) - reused :]
        fresh_end = self._next + (count - reused) * PAGE_SIZE
        pages.extend(range(self._next, fresh_end, PAGE_SIZE))
        self._next = fresh_end
        return pages

    def free(self, pages: list[int]) -> None:
        """Give ``pages`` back."""
        self._free.extend(pages)
