"""The host's side of the memory balloon: the target, its acknowledgement and ballooned pages."""

from __future__ import annotations

import struct
from typing import Final

from agent.host._log import host_log
from agent.host._mib_set import MiBSet
from agent.protocol.balloon_pages import (
    CHUNK_PAGES,
    PAGE_SHIFT,
    aligned_chunk_index,
    every_page,
)
from agent.protocol.constants import BALLOON_CHUNK_PAGES, PAGE_SIZE
from agent.protocol.status import (
    VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH,
    VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH,
    VERR_INVALID_PARAMETER,
    VINF_SUCCESS,
    status_name,
)

BALLOON_MAX_NUMERATOR: Final = 9
BALLOON_MAX_DENOMINATOR: Final = 10
"""``VMMDEV_MAX_MEMORY_BALLOON``: the balloon may not reach 9/10 of guest RAM."""
HANDY_PAGES: Final = 128
"""``PGM_HANDY_PAGES``: the pages PGM keeps allocated ahead from GMM's base account for the
guest's next page faults, which GMM's reservation for the VM adds to its RAM
(``MMR3ReserveHandyPages``, ``MMR3InitPaging``) and its allocated pages count
(``GMMR0AllocateHandyPages``): the model takes the set as full, as PGM refills it."""
_FIRST: Final = struct.Struct("<Q")
"""The first page's address of a packed chunk."""
_PAGE_BITS: Final = every_page(~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF)
"""Every address's page bits, its offset bits clear (a packed chunk read as one integer)."""


def _frames_of(index: int) -> range:
    """The page frame numbers of the chunk-aligned MiB number ``index``."""
    return range(index * BALLOON_CHUNK_PAGES, (index + 1) * BALLOON_CHUNK_PAGES)


def _frames(packed: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """The frame of the page each address of a packed chunk falls in, in order (as
    ``pgmPhysGetPage`` finds it: the offset bits are ignored)."""
    whole = int.from_bytes(packed, "little") & _PAGE_BITS
    return CHUNK_PAGES.unpack((whole >> PAGE_SHIFT).to_bytes(CHUNK_PAGES.size, "little"))


class HostBalloon:
    """Balloon state of one VM.

    ``target_mb`` is what the host asks for, ``acked_mb`` what the guest last acknowledged
    with GET_MEMBALLOON_CHANGE_REQ (event_ack 0x40).

    What is ballooned is kept twice, as the real host keeps it, and the two can disagree:

    - PGM's page states (:attr:`pages`): which guest pages are ballooned;
    - GMM's count of the VM's ballooned pages (:attr:`counted_pages`; PGM's
      ``cBalloonedPages`` moves with it), which every change GMM accepts moves by the
      chunk's 256 pages, whatever happened to them.

    CHANGE_MEMBALLOON (``PGMR3PhysChangeMemBalloon``, ``pgmR3PhysChangeMemBalloonRendezvous``)
    checks only that the first address is page-aligned (VERR_INVALID_PARAMETER); every
    address names the page it falls in. An inflate marks each page ballooned (one ballooned
    already, or named twice, stays so: ``pgmPhysFreePage`` frees nothing and succeeds); a
    deflate marks each one not ballooned, ballooned or not. Then GMM
    (``GMMR0BalloonedPages``) takes the 256 pages into its count: an inflate fails with
    VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH when the VM's allocated pages, its count and the 256
    would exceed its reservation, a deflate with VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH when
    the count is below 256. A failure leaves the count as it was, the page states changed.
    GMM's reservation for the VM's base memory is its RAM plus PGM's :data:`HANDY_PAGES`
    (``MMR3InitPaging``, ``MMR3ReserveHandyPages``), and its allocated pages are the RAM
    pages the guest touched (a ballooned page is freed) plus the handy pages PGM holds: PGM
    takes those from GMM too (``GMMR0AllocateHandyPages``), refilling the set to all 128 once
    it is down to 32. How many it holds at a given moment depends on the guest's page faults,
    which the model does not have (nor ROM pages, taken from the same account), so it takes
    the set as full: no spare page, the least GMM allows, as every
    allocation checks the same bound (allocated and counted within the reservation). With
    every page not ballooned taken as allocated (a guest that has touched all its memory),
    GMM refuses an inflate that would count more pages than are ballooned: inflating a chunk
    twice is refused the second time, and so is a chunk of which one page is ballooned
    already, or that names a page twice; a real host with handy pages in use would count
    such a chunk while it has the spare pages.

    With more than one vCPU (``cpus``) the host queues the change (``VMR3ReqCallNoWait``)
    and answers the guest success before it runs: a failure then reaches only the host's log
    (``balloon_change_failed``, which says whether the guest saw the status). The change is
    applied here at once.

    Not modelled: a real host ends its walk, silently, at the first page that is not guest
    RAM. The simulator has no map of guest-physical memory (its kernels' balloon pages lie
    above 4 GiB, whatever the RAM size): every page counts as RAM.

    The page states take one of two forms, never both for a page:

    - ``_whole``: chunk-aligned MiBs of guest-physical memory ballooned whole by one chunk of
      consecutive pages (every chunk the simulated kernels allocate), kept as one byte each
      (:class:`~agent.host._mib_set.MiBSet`) instead of 256 integers, so the largest balloon
      takes a few MiB of the simulator's memory;
    - ``_frames``: the page frame numbers of every other ballooned page. A chunk whose pages
      fall in a MiB kept whole first moves that MiB's 256 frames here.

    At 1 GiB ``_frames`` may hold a quarter of a million frames, so a change of scattered
    pages costs one pass of its 256 frames over that set. A guest deflates a chunk with the
    very array it inflated it with, so the frames of each array inflated are kept
    (``_arrays``) until that deflate, which then takes them from there instead of unpacking
    the 256 addresses again.
    """

    __slots__ = (
        "_arrays",
        "_frames",
        "_whole",
        "acked_mb",
        "counted_pages",
        "cpus",
        "ram_mb",
        "target_mb",
    )

    def __init__(self, ram_mb: int, *, cpus: int) -> None:
        self.ram_mb = ram_mb
        self.cpus = cpus
        self.target_mb = 0
        self.acked_mb = 0
        self.counted_pages = 0
        """GMM's count of the VM's ballooned pages."""
        self._whole = MiBSet()
        self._frames: set[int] = set()
        self._arrays: dict[bytes, tuple[int, ...]] = {}

    @property
    def max_mb(self) -> int:
        """The cap Main enforces: targets must stay below it."""
        return self.ram_mb * BALLOON_MAX_NUMERATOR // BALLOON_MAX_DENOMINATOR

    @property
    def pages(self) -> int:
        """How many guest pages are ballooned (PGM's page states)."""
        return len(self._whole) * BALLOON_CHUNK_PAGES + len(self._frames)

    @property
    def chunks(self) -> int:
        """GMM's count, in chunks (every change moves it by one)."""
        return self.counted_pages // BALLOON_CHUNK_PAGES

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
        """(De)balloon one chunk, its 256 page addresses packed; return the status the guest
        sees (see the class docstring)."""
        if _FIRST.unpack_from(packed_pages)[0] % PAGE_SIZE:
            return VERR_INVALID_PARAMETER
        index = aligned_chunk_index(packed_pages)
        if index is not None:
            self._mark_whole(inflate, index)
        else:
            self._mark_frames(inflate, self._frames_of_array(inflate, bytes(packed_pages)))
        rc = self._count(inflate)
        if rc == VINF_SUCCESS:
            return rc
        seen = self.cpus == 1
        host_log.warning(
            "balloon_change_failed",
            inflate=inflate,
            rc=status_name(rc),
            seen_by_guest=seen,
            pages=self.pages,
            counted_pages=self.counted_pages,
        )
        return rc if seen else VINF_SUCCESS

    def _mark_whole(self, inflate: bool, index: int) -> None:
        """Mark the pages of the chunk-aligned MiB number ``index`` (un)ballooned: at once
        where it is kept whole or not at all."""
        frames = self._frames
        if inflate:
            if index in self._whole:
                return
            # (isdisjoint would walk the 256 frames even with nothing kept page by page)
            if frames and not frames.isdisjoint(_frames_of(index)):
                frames.update(_frames_of(index))  # partly ballooned already: kept by page
            else:
                self._whole.add(index)
        elif index in self._whole:
            self._whole.remove(index)
        elif frames:
            frames.difference_update(_frames_of(index))

    def _frames_of_array(self, inflate: bool, array: bytes) -> tuple[int, ...]:
        """The frames ``array`` names: kept from its inflate for its deflate, which sends
        the same array (any other deflate forgets the kept ones, which a guest that deflates
        other arrays than it inflated would otherwise pile up)."""
        kept = self._arrays.pop(array, None) if not inflate else None
        if kept is not None:
            return kept
        frames = _frames(array)
        if inflate:
            self._arrays[array] = frames
        else:
            self._arrays.clear()
        return frames

    def _mark_frames(self, inflate: bool, frames: tuple[int, ...]) -> None:
        """Mark the pages ``frames`` (un)ballooned, page by page."""
        self._split(frames)
        if inflate:
            self._frames.update(frames)
        else:
            self._frames.difference_update(frames)

    def _count(self, inflate: bool) -> int:
        """GMM's check and count of one chunk's pages (``GMMR0BalloonedPages``)."""
        if inflate:
            ram_pages = self.ram_mb * BALLOON_CHUNK_PAGES
            reserved = ram_pages + HANDY_PAGES
            allocated = max(ram_pages - self.pages, 0) + HANDY_PAGES
            if allocated + self.counted_pages + BALLOON_CHUNK_PAGES > reserved:
                return VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH
            self.counted_pages += BALLOON_CHUNK_PAGES
        else:
            if self.counted_pages < BALLOON_CHUNK_PAGES:
                return VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH
            self.counted_pages -= BALLOON_CHUNK_PAGES
        return VINF_SUCCESS

    def _split(self, frames: tuple[int, ...]) -> None:
        """Move the MiBs kept whole that ``frames`` touch into ``_frames``, page by page."""
        if not self._whole:
            return
        whole = self._whole
        touched = [i for i in {frame // BALLOON_CHUNK_PAGES for frame in frames} if i in whole]
        for index in touched:
            self._whole.remove(index)
            self._frames.update(_frames_of(index))

    def restore(self) -> None:
        """A saved state was loaded: VMMDev does not save ``cMbMemoryBalloonLast``, so the new
        VM process's device has nothing acknowledged and the next setting notifies again.

        The ballooned pages stay (PGM's saved state records them), the count with them in
        this model, and so does the target (Main hands it to the new device).
        """
        self.acked_mb = 0

    def reset(self) -> None:
        """VM reset: guest memory is fresh, nothing is ballooned, GMM's count is reset
        (``pgmR3PhysRamReset``), nothing is acknowledged.

        The target stays; forgetting the acknowledgement (VMMDev zeroes
        ``cMbMemoryBalloonLast``) makes the next setting notify the guest again.
        """
        self.acked_mb = 0
        self._whole.clear()
        self._frames.clear()
        self._arrays.clear()
        self.counted_pages = 0
