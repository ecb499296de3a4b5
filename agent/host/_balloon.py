"""The host's side of the memory balloon: the target, its acknowledgement and ballooned pages."""

from __future__ import annotations

from typing import Final

from agent.protocol.balloon_pages import chunk_frames
from agent.protocol.constants import BALLOON_CHUNK_PAGES
from agent.protocol.status import (
    VERR_ALREADY_EXISTS,
    VERR_INVALID_PARAMETER,
    VERR_NOT_FOUND,
    VINF_SUCCESS,
)

BALLOON_MAX_NUMERATOR: Final = 9
BALLOON_MAX_DENOMINATOR: Final = 10
"""``VMMDEV_MAX_MEMORY_BALLOON``: the balloon may not reach 9/10 of guest RAM."""


class HostBalloon:
    """Balloon state of one VM.

    ``target_mb`` is what the host asks for, ``acked_mb`` what the guest last acknowledged
    with GET_MEMBALLOON_CHANGE_REQ (event_ack 0x40), ``frames`` the page frame numbers of
    the ballooned guest pages.

    A guest deflates a chunk with the very page array it inflated it with, so each inflated
    array is kept with its frames (``_arrays``) for as long as all of them stay ballooned: a
    deflate that sends a known array takes its frames from there instead of unpacking and
    checking the 256 addresses again. A deflate of any other array is checked page by page
    and forgets the kept arrays, whose frames it may have taken.
    """

    __slots__ = ("_arrays", "acked_mb", "chunks", "frames", "ram_mb", "target_mb")

    def __init__(self, ram_mb: int) -> None:
        self.ram_mb = ram_mb
        self.target_mb = 0
        self.acked_mb = 0
        self.chunks = 0
        self.frames: set[int] = set()
        self._arrays: dict[bytes, set[int]] = {}

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

    def change(self, inflate: bool, packed_pages: bytes | bytearray | memoryview) -> int:
        """(De)balloon one chunk, its 256 page addresses packed; return the VBox status.

        The addresses must be page-aligned and distinct (VERR_INVALID_PARAMETER); an inflated
        page must not be ballooned yet (VERR_ALREADY_EXISTS), a deflated one must be
        (VERR_NOT_FOUND). A refused chunk changes nothing.
        """
        array = bytes(packed_pages)
        if not inflate and array in self._arrays:
            self.frames -= self._arrays.pop(array)
            self.chunks -= 1
            return VINF_SUCCESS
        frames = chunk_frames(array)
        if frames is None or len(frames) != BALLOON_CHUNK_PAGES:
            return VERR_INVALID_PARAMETER
        if inflate:
            if not self.frames.isdisjoint(frames):
                return VERR_ALREADY_EXISTS
            self.frames |= frames
            self._arrays[array] = frames
            self.chunks += 1
        else:
            if not self.frames.issuperset(frames):
                return VERR_NOT_FOUND
            self.frames -= frames
            self._arrays.clear()  # some may have lost frames to this array
            self.chunks -= 1
        return VINF_SUCCESS

    def reset(self) -> None:
        """VM reset: guest memory is fresh, nothing is ballooned, nothing acknowledged.

        The target stays; forgetting the acknowledgement (VMMDev zeroes
        ``cMbMemoryBalloonLast``) makes the next setting notify the guest again.
        """
        self.acked_mb = 0
        self.frames.clear()
        self._arrays.clear()
        self.chunks = 0
