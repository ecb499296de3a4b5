"""The host's side of the memory balloon: the target, its acknowledgement and ballooned pages."""

from __future__ import annotations

from typing import Final

from agent.protocol.balloon_pages import aligned_chunk_index, chunk_frames
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


def _frames_of(index: int) -> range:
    """The page frame numbers of the chunk-aligned MiB number ``index``."""
    return range(index * BALLOON_CHUNK_PAGES, (index + 1) * BALLOON_CHUNK_PAGES)


class HostBalloon:
    """Balloon state of one VM.

    ``target_mb`` is what the host asks for, ``acked_mb`` what the guest last acknowledged
    with GET_MEMBALLOON_CHANGE_REQ (event_ack 0x40).

    Every ballooned page is tracked, in one of two forms, never both:

    - ``_whole``: chunk-aligned MiBs of guest-physical memory ballooned whole by one chunk of
      consecutive pages (a kernel's freshly allocated chunk, which Oracle's driver hands over
      and mainline's often builds), kept as one number each instead of 256 integers;
    - ``_frames``: the page frame numbers of every other ballooned page. A chunk whose pages
      fall in a MiB kept whole first moves that MiB's 256 frames here, so the per-page checks
      below see each page.

    A guest deflates a chunk with the very page array it inflated it with, so each array kept
    in ``_frames`` is remembered with its frames (``_arrays``) for as long as all of them stay
    ballooned: a deflate that sends a known array takes its frames from there instead of
    unpacking and checking the 256 addresses again. A deflate of any other array is checked
    page by page and forgets the kept arrays, whose frames it may have taken.

    An inflate builds no set of the array's own: it checks the frames against ``_frames``
    (``isdisjoint``), adds them, and tells a repeated page by the count it added, taking them
    all out again (none was ballooned before) when that falls short. At 1 GiB ``_frames``
    holds a quarter of a million frames, in memory nothing else touches, so each pass over it
    is what an inflate costs; a separate set was one more pass and 256 more insertions.
    """

    __slots__ = ("_arrays", "_frames", "_whole", "acked_mb", "chunks", "ram_mb", "target_mb")

    def __init__(self, ram_mb: int) -> None:
        self.ram_mb = ram_mb
        self.target_mb = 0
        self.acked_mb = 0
        self.chunks = 0
        self._whole: set[int] = set()
        self._frames: set[int] = set()
        self._arrays: dict[bytes, tuple[int, ...]] = {}

    @property
    def max_mb(self) -> int:
        """The cap Main enforces: targets must stay below it."""
        return self.ram_mb * BALLOON_MAX_NUMERATOR // BALLOON_MAX_DENOMINATOR

    @property
    def pages(self) -> int:
        """How many guest pages are ballooned."""
        return len(self._whole) * BALLOON_CHUNK_PAGES + len(self._frames)

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
        if not inflate:
            kept = self._arrays.pop(array, None)
            if kept is not None:
                self._frames.difference_update(kept)
                self.chunks -= 1
                return VINF_SUCCESS
        index = aligned_chunk_index(array)
        if index is not None:
            return self._change_whole(inflate, index)
        return self._change_frames(inflate, array)

    def _change_frames(self, inflate: bool, array: bytes) -> int:
        """(De)balloon a chunk page by page: the checks of :meth:`change`, frame by frame."""
        frames = chunk_frames(array)
        if frames is None:
            return VERR_INVALID_PARAMETER
        self._split(frames)
        ballooned = self._frames
        if inflate:
            if not ballooned.isdisjoint(frames):
                return VERR_INVALID_PARAMETER if _repeats(frames) else VERR_ALREADY_EXISTS
            before = len(ballooned)
            ballooned.update(frames)
            if len(ballooned) - before != BALLOON_CHUNK_PAGES:  # a page is repeated
                ballooned.difference_update(frames)  # none of them was ballooned before
                return VERR_INVALID_PARAMETER
            self._arrays[array] = frames
            self.chunks += 1
        else:
            if _repeats(frames):
                return VERR_INVALID_PARAMETER
            if not ballooned.issuperset(frames):
                return VERR_NOT_FOUND
            ballooned.difference_update(frames)
            self._arrays.clear()  # some may have lost frames to this array
            self.chunks -= 1
        return VINF_SUCCESS

    def _change_whole(self, inflate: bool, index: int) -> int:
        """(De)balloon the chunk-aligned MiB number ``index``, whose pages a chunk names in
        order: the same checks as :meth:`change`, on the MiB at once where it is kept whole."""
        if inflate:
            # (isdisjoint would walk the 256 frames even with nothing kept page by page)
            page_by_page = self._frames and not self._frames.isdisjoint(_frames_of(index))
            if index in self._whole or page_by_page:
                return VERR_ALREADY_EXISTS
            self._whole.add(index)
            self.chunks += 1
            return VINF_SUCCESS
        if index in self._whole:
            self._whole.remove(index)
        else:  # ballooned page by page, if at all
            frames = _frames_of(index)
            if not self._frames.issuperset(frames):
                return VERR_NOT_FOUND
            self._frames.difference_update(frames)
            self._arrays.clear()  # some may have lost frames to this chunk
        self.chunks -= 1
        return VINF_SUCCESS

    def _split(self, frames: tuple[int, ...]) -> None:
        """Move the MiBs kept whole that ``frames`` touch into ``_frames``, page by page."""
        if not self._whole:
            return
        touched = {frame // BALLOON_CHUNK_PAGES for frame in frames} & self._whole
        for index in touched:
            self._whole.remove(index)
            self._frames.update(_frames_of(index))

    def restore(self) -> None:
        """A saved state was loaded: VMMDev does not save ``cMbMemoryBalloonLast``, so the new
        VM process's device has nothing acknowledged and the next setting notifies again.

        The ballooned pages stay (PGM saves them) and so does the target (Main hands it to
        the new device).
        """
        self.acked_mb = 0

    def reset(self) -> None:
        """VM reset: guest memory is fresh, nothing is ballooned, nothing acknowledged.

        The target stays; forgetting the acknowledgement (VMMDev zeroes
        ``cMbMemoryBalloonLast``) makes the next setting notify the guest again.
        """
        self.acked_mb = 0
        self._whole.clear()
        self._frames.clear()
        self._arrays.clear()
        self.chunks = 0


def _repeats(frames: tuple[int, ...]) -> bool:
    """Whether a page appears twice in a chunk."""
    return len(set(frames)) != len(frames)
