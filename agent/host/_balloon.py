"""The host's side of the memory balloon: the target, its acknowledgement and ballooned pages."""

from __future__ import annotations

import functools
import operator
import struct
from typing import TYPE_CHECKING, Final

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import BALLOON_CHUNK_PAGES, PAGE_SIZE
from agent.protocol.status import (
    VERR_ALREADY_EXISTS,
    VERR_INVALID_PARAMETER,
    VERR_NOT_FOUND,
    VINF_SUCCESS,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

BALLOON_MAX_NUMERATOR: Final = 9
BALLOON_MAX_DENOMINATOR: Final = 10
"""``VMMDEV_MAX_MEMORY_BALLOON``: the balloon may not reach 9/10 of guest RAM."""
_CHUNK_PAGES: Final = struct.Struct(f"<{BALLOON_CHUNK_PAGES}Q")


class HostBalloon:
    """Balloon state of one VM.

    ``target_mb`` is what the host asks for, ``acked_mb`` what the guest last acknowledged
    with GET_MEMBALLOON_CHANGE_REQ (event_ack 0x40), ``pages`` the ballooned guest pages.
    """

    __slots__ = ("acked_mb", "chunks", "pages", "ram_mb", "target_mb")

    def __init__(self, ram_mb: int) -> None:
        self.ram_mb = ram_mb
        self.target_mb = 0
        self.acked_mb = 0
        self.chunks = 0
        self.pages: set[int] = set()

    @property
    def max_mb(self) -> int:
        """The cap Main enforces: targets must stay below it."""
        return self.ram_mb * BALLOON_MAX_NUMERATOR // BALLOON_MAX_DENOMINATOR

    def set_target(self, mb: int) -> bool:
        """Apply a management request; return whether the guest must be notified (0x40).

        The host only changes the target when it differs from the acknowledged value
        (so re-setting the acknowledged value while another is pending changes nothing).

        Raises:
            ValueError: ``mb`` is negative or at least ``max_mb`` (90 % of RAM), as Main
                refuses it; the message gives the accepted range.
        """
        if not 0 <= mb < self.max_mb:
            msg = (
                f"invalid memory balloon size: {mb} MB (must be in range [0, {self.max_mb - 1}] "
                f"MB: below 90% of {self.ram_mb} MB RAM, which is {self.max_mb} MB)"
            )
            raise ValueError(msg)
        if mb == self.acked_mb:
            return False
        self.target_mb = mb
        return True

    def change(self, inflate: bool, pages: Sequence[int]) -> int:
        """(De)balloon one chunk of guest pages; return the VBox status."""
        unique = set(pages)
        if len(unique) != len(pages) or functools.reduce(operator.or_, pages, 0) % PAGE_SIZE:
            return VERR_INVALID_PARAMETER
        if inflate:
            if not self.pages.isdisjoint(unique):
                return VERR_ALREADY_EXISTS
            self.pages.update(unique)
            self.chunks += 1
        else:
            if not self.pages.issuperset(unique):
                return VERR_NOT_FOUND
            self.pages.difference_update(unique)
            self.chunks -= 1
        return VINF_SUCCESS

    def reset(self) -> None:
        """VM reset: guest memory is fresh, nothing is ballooned."""
        self.pages.clear()
        self.chunks = 0


def read_chunk_pages(req: bytes | bytearray) -> list[int]:
    """Return the 256 page addresses of a CHANGE_MEMBALLOON request."""
    return list(_CHUNK_PAGES.unpack_from(req, L.MemBalloonChangeRequest.phys_page.offset))
