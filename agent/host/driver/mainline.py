"""The Linux in-tree driver (``drivers/virt/vboxguest``): kernel-owned balloon and heartbeat.

The ISR keeps BALLOON_CHANGE_REQUEST for itself and schedules the balloon work item, which
asks the host for the target and (de)inflates chunk by chunk with pages it allocates. The
host only sends that event while some session filters 0x40, so ballooning happens only
while a userspace agent asks for the event it will never receive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Final, NoReturn

import trio
from trio.lowlevel import checkpoint

from agent.host._log import host_log as _log
from agent.host.driver._core import Driver
from agent.host.driver._pages import PageAllocator, chunk_stack
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.balloon_pages import CHUNK_PAGES, consecutive_pages
from agent.protocol.constants import BALLOON_CHUNK_PAGES, Event, RequestType
from agent.protocol.status import status_name

if TYPE_CHECKING:
    from agent.host.memory import DictMemory
    from agent.host.vmmdev import VMMDev


class MainlineDriver(Driver):
    """Mainline Linux: passthrough policy of ``vbg_req_allowed``, balloon in the kernel."""

    personality: ClassVar[str] = "mainline"

    def __init__(self, vmmdev: VMMDev, ram: DictMemory) -> None:
        super().__init__(vmmdev, ram)
        self.pages = PageAllocator(vmmdev.ram_mb * BALLOON_CHUNK_PAGES)
        self.chunks = chunk_stack()
        """The chunks in the balloon, in inflate order (each its first page's address)."""
        self.max_chunks = 0
        self._balloon_kick = trio.Event()
        self._info = self.alloc_request(
            RequestType.GET_MEMBALLOON_CHANGE_REQ, L.MemBalloonInfoRequest.size
        )
        self._change = self.alloc_request(
            RequestType.CHANGE_MEMBALLOON, L.MemBalloonChangeRequest.size
        )

    @property
    def balloon_chunks(self) -> int:
        """Chunks the kernel holds in the balloon."""
        return len(self.chunks)

    def balloon_event(self) -> None:
        """``schedule_work``: run the balloon work (once more, if it is running)."""
        self._balloon_kick.set()

    def start_background(self, nursery: trio.Nursery) -> None:
        """Start the balloon work queue."""
        nursery.start_soon(self._balloon_worker)

    async def _balloon_worker(self) -> NoReturn:
        while True:
            await self._balloon_kick.wait()
            self._balloon_kick = trio.Event()
            await self.balloon_work()

    async def balloon_work(self) -> None:
        """``vbg_balloon_work``: move the balloon to the host's target; stop at the first error."""
        L.MemBalloonInfoRequest.event_ack.set(self._info, Event.BALLOON_CHANGE_REQUEST)
        rc = await self.perform(self._info)
        if rc < 0:
            _log.warning("balloon_query_failed", rc=status_name(rc))
            return
        if self.max_chunks == 0:
            self.max_chunks = L.MemBalloonInfoRequest.phys_mem_chunks.get(self._info)
        target = L.MemBalloonInfoRequest.balloon_chunks.get(self._info)
        if target > self.max_chunks:
            _log.warning("balloon_size_illegal", chunks=target, max_chunks=self.max_chunks)
            return
        # A work item runs as long as it needs, the kernel scheduling others between its
        # chunks: a checkpoint each, so that a stop ends a long walk at once.
        while len(self.chunks) < target:
            if not await self._inflate():
                return
            await checkpoint()
        while len(self.chunks) > target:
            if not await self._deflate():
                return
            await checkpoint()

    async def _inflate(self) -> bool:
        """``vbg_balloon_inflate``: take a chunk's pages (the kernel takes them one by one,
        the pool hands them out in one step: the same pages, and a shortfall gives back
        what was taken) and hand them to the host."""
        first = self.pages.alloc_chunk()
        if first is None:
            _log.warning("balloon_inflate_no_memory", chunks=len(self.chunks))
            return False
        rc = await self._change_chunk(first, inflate=True)
        if rc < 0:
            self.pages.free_chunk(first)
            _log.warning("balloon_inflate_failed", rc=status_name(rc))
            return False
        self.chunks.append(first)
        return True

    async def _deflate(self) -> bool:
        rc = await self._change_chunk(self.chunks[-1], inflate=False)
        if rc < 0:
            _log.warning("balloon_deflate_failed", rc=status_name(rc))
            return False
        self.pages.free_chunk(self.chunks.pop())
        return True

    async def _change_chunk(self, first: int, *, inflate: bool) -> int:
        return await change_memballoon(
            self, self._change, consecutive_pages(first), inflate=inflate
        )


async def change_memballoon(driver: Driver, req: bytearray, pages: bytes, *, inflate: bool) -> int:
    """Fill the CHANGE_MEMBALLOON request ``req`` with one chunk (its pages packed), perform it.

    Raises:
        ValueError: ``pages`` is not one packed chunk (the request keeps its size).
    """
    # Through a memoryview: a bytearray slice would take another length by resizing ``req``.
    memoryview(req)[_PAGES_AT : _PAGES_AT + CHUNK_PAGES.size] = pages
    _HEADER_SIZE.pack_into(req, _HEADER_SIZE_AT, L.MemBalloonChangeRequest.size)
    _COUNT_AND_FLAG.pack_into(req, _COUNT_AND_FLAG_AT, BALLOON_CHUNK_PAGES, inflate)
    return await driver.perform(req)


_PAGES_AT: Final = L.MemBalloonChangeRequest.phys_page.offset
_HEADER_SIZE: Final = L.MemBalloonChangeRequest.header_size.codec
_HEADER_SIZE_AT: Final = L.MemBalloonChangeRequest.header_size.offset
_COUNT_AND_FLAG: Final = L.BALLOON_CHANGE_COUNT_AND_FLAG.codec
_COUNT_AND_FLAG_AT: Final = L.BALLOON_CHANGE_COUNT_AND_FLAG.offset
"""The request's members as struct-and-offset pairs (one call each, the adjacent page count
and inflate flag in one pack): a chunk's every trip to the host fills them."""
