"""How a chunk the agent allocated reaches the host, per driver.

- Oracle's driver with ``handle_in_r3``: ``CHECK_BALLOON`` reads (and acknowledges) the
  target; ``CHANGE_BALLOON`` hands over the chunk's user address, the driver locks it.
- passthrough: ``GET_MEMBALLOON_CHANGE_REQ`` reads the target and guest RAM;
  ``CHANGE_MEMBALLOON`` carries the chunk's 256 guest-physical page addresses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import structlog
import trio

from agent.protocol import (
    HOST_ERRORS,
    ChangeBalloon,
    ChangeMemBalloon,
    GetMemBalloonChangeRequest,
    VBoxStatusError,
)
from agent.protocol.constants import PAGE_SIZE
from agent.protocol.status import (
    VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH,
    VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH,
    VERR_INVALID_PARAMETER,
    VERR_NOT_FOUND,
)
from agent.records import record

if TYPE_CHECKING:
    from agent.device import Device
    from agent.protocol import ChunkPages, Submission
    from agent.services.balloon._chunks import Chunk

log = structlog.get_logger("agent.services.balloon")


@record
class HostTarget:
    """What the host asks for, in chunks; ``max_chunks`` None where the driver keeps it."""

    chunks: int
    max_chunks: int | None


class Handover(Protocol):
    """Moves chunks between the agent and the host."""

    needs_pages: bool
    """Whether chunks must carry their guest-physical page addresses."""

    async def read_target(self) -> HostTarget:
        """Read (and acknowledge) the host's target."""
        ...

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        """Give ``chunk`` to the host; ``submission`` is marked issued once the request may
        have reached the driver (a call cancelled before that never reached the host).

        Raises:
            VBoxStatusError: the driver or host refused.
        """
        ...

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        """Take ``chunk`` back from the host; ``submission`` as for :meth:`inflate`."""
        ...

    def refusal_ballooned(self, rc: int) -> bool:
        """Whether an inflate refused with ``rc`` may have left the chunk's pages ballooned
        at the host (the agent then deflates it before it unmaps it)."""
        ...

    async def not_held(
        self, chunk: Chunk, rc: int, *, unconfirmed: bool, balloon_empty: bool
    ) -> bool:
        """Whether a deflate of ``chunk`` that failed with ``rc`` found the chunk out of the
        balloon (the agent then forgets it). ``unconfirmed``: whether the chunk's last
        inflate or deflate was cancelled once issued, its outcome unknown;
        ``balloon_empty``: whether the driver may hold none of the agent's chunks (every
        chunk held is unconfirmed). May ask the driver."""
        ...


class OracleHandover:
    """Oracle's driver, balloon handled in ring 3 (``handle_in_r3``)."""

    needs_pages = False

    def __init__(self, device: Device) -> None:
        self._device = device

    async def read_target(self) -> HostTarget:
        """``CHECK_BALLOON``: the driver asks the host (acknowledging 0x40)."""
        status = await self._device.check_balloon()
        return HostTarget(status.chunks, None)

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        """``CHANGE_BALLOON`` with inflate set: the driver locks the chunk and tells the host."""
        await self._device.request(ChangeBalloon(chunk.address, inflate=True), submission)

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        """``CHANGE_BALLOON`` with inflate clear."""
        await self._device.request(ChangeBalloon(chunk.address, inflate=False), submission)

    def refusal_ballooned(self, rc: int) -> bool:
        """Never as far as the agent can act on it: the driver sent the host's request.

        A real host marks the pages ballooned before GMM may refuse the inflate
        (VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH, with one vCPU), and ``vgdrvBalloonInflate`` then
        unlocks the chunk and forgets its address, so a deflate of the address would stop at
        the driver (VERR_NOT_FOUND) and never reach the host: the agent unmaps a chunk
        whose pages the host may keep ballooned, and cannot know it.
        """
        del rc
        return False

    async def not_held(
        self, chunk: Chunk, rc: int, *, unconfirmed: bool, balloon_empty: bool
    ) -> bool:
        """An address the driver does not know (VERR_NOT_FOUND), or VERR_INVALID_PARAMETER
        from a driver whose balloon is empty.

        A deflate again of a chunk whose deflate went through (its outcome unknown) gets
        the same answers: the driver forgot the address when it unlocked the chunk.
        ``unconfirmed`` adds nothing: the driver's own answers are never the host's.

        ``vgdrvSetBalloonSizeFromUser`` refuses a deflate with VERR_INVALID_PARAMETER when
        its balloon holds no chunk, before it looks for this one; the same status from the
        host's CHANGE_MEMBALLOON (passed on by ``vgdrvBalloonDeflate``) leaves the chunk in
        the driver. With any chunk known to be in the driver's balloon it is the host's;
        otherwise the driver is asked (:meth:`_driver_balloon_empty`).
        """
        del unconfirmed
        if rc == VERR_NOT_FOUND:
            return True
        if rc != VERR_INVALID_PARAMETER or not balloon_empty:
            return False
        return await self._driver_balloon_empty(chunk)

    async def _driver_balloon_empty(self, chunk: Chunk) -> bool:
        """Ask the driver whether its balloon is empty, changing nothing: a deflate of an
        address no chunk starts at (the second page of ``chunk``, inside the agent's own
        mapping; 0 would name a free slot, ``NIL_RTR3PTR``).

        ``vgdrvSetBalloonSizeFromUser`` answers it VERR_INVALID_PARAMETER while the balloon
        holds no chunk (as it answered the deflate of ``chunk``), and VERR_NOT_FOUND, from its
        search of the chunk array, once it holds one; neither reaches the host. A balloon
        that holds any chunk holds ``chunk``: lacking it, the driver would have answered the
        deflate of ``chunk`` with VERR_NOT_FOUND. Any other answer, a malformed reply too,
        counts as not empty (the chunk is kept and asked for again).

        A release build is what changes nothing: for an empty balloon the driver reaches
        ``AssertMsgFailed`` before it returns VERR_INVALID_PARAMETER, which stops a
        VBOX_STRICT build (why the mode probe no longer deflates an empty balloon). The
        probe only follows a deflate of ``chunk`` that got VERR_INVALID_PARAMETER, which a
        strict build would have stopped at already when it came from that empty-balloon
        path: it adds no way to fail there.
        """
        probe = ChangeBalloon(chunk.address + PAGE_SIZE, inflate=False)
        try:
            await self._device.request(probe)
        except HOST_ERRORS as exc:  # a malformed reply says nothing: not empty
            return isinstance(exc, VBoxStatusError) and exc.rc == VERR_INVALID_PARAMETER
        return False


class PassthroughHandover:
    """A driver that passes the VMMDev balloon requests of trusted userspace through."""

    needs_pages = True

    def __init__(self, device: Device) -> None:
        self._device = device
        self._count_short_logged = False
        """Whether a short host count for a chunk the host took was logged as a warning."""

    async def read_target(self) -> HostTarget:
        """``GET_MEMBALLOON_CHANGE_REQ``, acknowledging 0x40."""
        target = await self._device.request(GetMemBalloonChangeRequest(acknowledge=True))
        return HostTarget(target.chunks, target.phys_mem_chunks)

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        """``CHANGE_MEMBALLOON`` with the chunk's pages."""
        await self._device.request(ChangeMemBalloon(inflate=True, pages=_pages(chunk)), submission)

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        """``CHANGE_MEMBALLOON`` with inflate clear."""
        await self._device.request(ChangeMemBalloon(inflate=False, pages=_pages(chunk)), submission)

    def refusal_ballooned(self, rc: int) -> bool:
        """VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH: the host marked every page ballooned before
        GMM refused to count them (``pgmR3PhysChangeMemBalloonRendezvous``), so they stay
        ballooned; the host's other refusals come before it touches a page."""
        return rc == VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH

    async def not_held(
        self, chunk: Chunk, rc: int, *, unconfirmed: bool, balloon_empty: bool
    ) -> bool:
        """The pages are out of the balloon when the host's count fell short
        (VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH).

        The host (``pgmR3PhysChangeMemBalloonRendezvous``) first sets every page of a deflate
        back to a zero page, without checking that it was ballooned, and only then has GMM
        take the 256 pages off the VM's count of ballooned pages, which fails when the count
        is lower (``GMMR0BalloonedPages``). The pages are back either way, so no retry could
        succeed: the chunk is given up. Of a chunk whose inflate or deflate has an unknown
        outcome that is the expected answer (never ballooned, or back already); of one the
        host took, the host's count was off, which is logged (a warning the first time, then
        at debug level). The host answers this with one vCPU only: with more it queues the
        change and answers success before it runs, so every deflate succeeds.
        """
        del balloon_empty  # the request goes to the host as it is
        await trio.lowlevel.checkpoint()
        if rc != VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH:
            return False
        if not unconfirmed:
            (log.debug if self._count_short_logged else log.warning)(
                "balloon_host_count_short",
                chunk=f"{chunk.address:#x}",
                note="the host took this chunk, yet counted fewer than its pages as "
                "ballooned; they are back in the guest all the same, so the chunk is given up",
            )
            self._count_short_logged = True
        return True


def _pages(chunk: Chunk) -> ChunkPages:
    """The chunk's pages, which the walker reads for every chunk where ``needs_pages``."""
    if chunk.pages is None:
        msg = f"chunk {chunk.address:#x} was built without its pages"
        raise ValueError(msg)
    return chunk.pages
