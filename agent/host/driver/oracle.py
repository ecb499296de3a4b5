"""Oracle's out-of-tree driver (``VBoxGuest.cpp``), with or without its kernel balloon allocator.

Its ioctl entry (:mod:`agent.host.driver._oracle`) reports a handler's failure as a VBox
status in ``hdr.rc`` and returns 0; only malformed calls and unknown functions fail with
EINVAL. The ISR hands events to the waits themselves, oldest first, taking each off the
wait list (:meth:`OracleDriver.post_events`). INTERRUPT_ALL_WAIT_FOR_EVENTS is one-shot: it
ends the session's waits still on that list, or, when there are none (a wait that was just
handed events included), the session's next wait (which returns success with the matching
pending events, possibly none).

The first session to call CHECK_BALLOON (or CHANGE_BALLOON) owns the balloon until it
closes; others get VERR_PERMISSION_DENIED in ``hdr.rc``. CHECK_BALLOON asks the host for
the target (acknowledging 0x40). The driver loads meaning to allocate and hand over the
chunks itself (``fUseKernelAPI``, ``vgdrvSetBalloonSizeKernel``), as on Linux: it stops at
the first failure, reports running out of memory as success and answers
``handle_in_r3 = 0``; while it does, it refuses CHANGE_BALLOON with VERR_PERMISSION_DENIED.
Built without that allocator (``r3_balloon``) it finds out at its first inflate (the
allocation is VERR_NOT_SUPPORTED): it clears ``fUseKernelAPI`` for good and answers that
CHECK_BALLOON, and every later one, with ``handle_in_r3 = 1``; before that (a target of 0,
of the maximum, or below the balloon) it answers 0 like the Linux build. Userspace then
allocates 1 MiB chunks and hands each to the driver with CHANGE_BALLOON (ioctl 18), which
locks it and tells the host the chunk's pages (``vgdrvSetBalloonSizeFromUser``) and keeps it
in the lowest free slot of its array. Closing the owner's session deflates the slots from the
chunk count less one down to 0 (``vgdrvCloseMemBalloon``; see
:meth:`OracleDriver.session_closed`). BALLOON_CHANGE_REQUEST is delivered to userspace
waiters; the heartbeat stays with the driver.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, ClassVar, Final

from trio.lowlevel import cancel_shielded_checkpoint

from agent.host._log import host_log as _log
from agent.host.driver import _oracle
from agent.host.driver._core import Driver
from agent.host.driver._load import MOUSE_STATUS_SIZE
from agent.host.driver._pages import PageAllocator, chunk_stack
from agent.host.driver._session import BitTracker, DriverSession
from agent.host.driver._util import U32_MAX, KernelMutex, lost_port_write
from agent.host.driver.mainline import change_memballoon
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.balloon_pages import CHUNK_PAGES, consecutive_pages
from agent.protocol.constants import (
    BALLOON_CHUNK_PAGES,
    HEADER_SIZE,
    HOST_FEATURE_FAST_IRQ_ACK,
    REQUESTOR_KERNEL,
    Event,
    Requestor,
    RequestType,
)
from agent.protocol.status import (
    STATUS_CODES,
    VERR_ALREADY_EXISTS,
    VERR_GENERAL_FAILURE,
    VERR_INTERNAL_ERROR,
    VERR_INVALID_PARAMETER,
    VERR_NO_MEMORY,
    VERR_NOT_FOUND,
    VERR_PERMISSION_DENIED,
    VINF_SUCCESS,
)

_CHANGE_BALLOON_IN: Final = struct.Struct(f"<Q{L.ChangeBalloonIoctl.padding.size}sB")
"""CHANGE_BALLOON's input members, which follow each other (address, padding, inflate flag),
in one unpack."""
_CHANGE_BALLOON_IN_AT: Final = L.ChangeBalloonIoctl.chunk_address.offset
_NO_PADDING: Final = bytes(L.ChangeBalloonIoctl.padding.size)
OUT_OF_MEMORY: Final = frozenset(
    {VERR_NO_MEMORY, STATUS_CODES["VERR_NO_PHYS_MEMORY"], STATUS_CODES["VERR_NO_CONT_MEMORY"]}
)
"""What CHECK_BALLOON reports as success after the kernel walk stopped on it."""
HALTED: Final = VERR_GENERAL_FAILURE
"""What a walk the VM's power-off ended returns: the ``rc`` its next request, never
handled, still holds (:meth:`Driver.alloc_request`'s), as a held write the power-off ends."""
_NIL_CHUNK: Final = b"\xff" * CHUNK_PAGES.size
"""The pages of a NIL memory object (``NIL_RTHCPHYS`` each), as a freed slot sends them."""
_MOUSE_STATUS_BODY: Final = struct.Struct("<Iii")
"""SET_MOUSE_STATUS after the header: the features, then the pointer's x and y (0)."""

if TYPE_CHECKING:
    from agent.host.driver._oracle import Wait
    from agent.host.memory import DictMemory, GuestMemory
    from agent.host.vmmdev import VMMDev

PRINTK_RECORD_MAX: Final = 1024
"""Bytes of text the kernel log keeps of one printk record (``PRINTKRB_RECORD_MAX``)."""


class OracleDriver(Driver):
    """Oracle's driver: a session-owned balloon, allocated by the kernel or by ring 3.

    Args:
        r3_balloon: the driver cannot allocate chunks itself (``fUseKernelAPI`` turns false
            at its first inflate).
    """

    personality: ClassVar[str] = "oracle"
    kernel_events: ClassVar[int] = int(Event.HGCM | Event.MOUSE_POSITION_CHANGED)
    log_line_max: ClassVar[int] = PRINTK_RECORD_MAX
    """No buffer of its own cuts the message; the kernel log keeps one record's worth."""
    filter_as_session: ClassVar[bool] = False
    """``vgdrvSetSessionEventFilter`` keeps VbglR0GRAlloc's kernel requestor."""
    acquire_refuses_set_caps: ClassVar[bool] = False
    """``vgdrvAcquireSessionCapabilities`` checks ``fSetModeGuestCaps``, which nothing sets."""
    acquire_reports_unknown_caps: ClassVar[bool] = True
    """``vgdrvAcquireSessionCapabilities`` tells the host when caps were added or removed
    or ``fGuestCapsHost`` is UINT32_MAX."""
    legacy_cancel: ClassVar[bool] = False
    """``vbglR0HGCMInternalDoCall`` sends CANCEL2 only: any refusal but VERR_NOT_FOUND and
    VERR_SEM_DESTROYED is followed by its 2 s poll for DONE, then the request is leaked."""
    refused_call_copied_back: ClassVar[bool] = False
    """``vbglR0HGCMInternalDoCall`` returns VMMDev's ``rc`` unless the call's result says
    the same, and ``VbglR0HGCMInternalCall`` then skips the copy-back."""

    def __init__(self, vmmdev: VMMDev, ram: DictMemory, *, r3_balloon: bool = False) -> None:
        super().__init__(vmmdev, ram)
        self.pages = PageAllocator(vmmdev.ram_mb * BALLOON_CHUNK_PAGES)
        self.kernel_allocator = not r3_balloon
        """Whether ``RTR0MemObjAllocPhysNC`` works (else VERR_NOT_SUPPORTED)."""
        self.use_kernel_api = True
        """``fUseKernelAPI``: set at load, cleared for good by an inflate without the
        allocator."""
        self.owner: DriverSession | None = None
        self.max_chunks = 0
        self.chunks: dict[int, int] = {}
        """User chunk address -> the guest pages locked for it (the first of 256 in a row)."""
        self.slots: list[int | None] = []
        """``paMemObj``: the user chunk in each slot by address (None: NIL, free). An inflate
        takes the lowest free slot, a deflate frees its chunk's."""
        self.kernel_chunks = chunk_stack()
        """Chunks the driver allocated itself (kernel API, each its first page's address),
        in inflate order."""
        self._balloon_mutex = KernelMutex()
        self.failed_assertions: list[str] = []
        """Each ``AssertMsgFailed`` a VBOX_STRICT build would stop at, where it is reached
        (the model is a release build: it returns the status and goes on)."""
        self.wait_list: list[Wait] = []
        """``WaitList``: the WAIT_FOR_EVENTS calls waiting, of every session, oldest first."""
        self.pending_cancel: set[DriverSession] = set()
        """Sessions whose cancel found no waiter (``fPendingCancelWaitEvents``)."""
        self.mouse_tracker = BitTracker()
        self.mouse_status_host = U32_MAX
        """What the host was last told (U32_MAX: unknown, the next change reports)."""

    def open_session(self, *, user_device: bool = False, uid: int = 0) -> DriverSession:
        """Open a node as ``uid``, with the requestor ``vgdrvLinuxOpen`` computes.

        User mode, root or user, and USER_DEVICE on /dev/vboxuser. There the VirtualBox group
        bit goes to a caller in the node's group when that group is 0: the test negates
        ``vgdrvLinuxIsGroupZero``, which (kernels >= 3.5) is true for a non-zero gid. On the
        model's root:root nodes that is root. Trust and console are not known (both 0).
        """
        session = super().open_session(user_device=user_device, uid=uid)
        requestor = Requestor.USERMODE | (Requestor.USR_ROOT if uid == 0 else Requestor.USR_USER)
        if user_device:
            requestor |= Requestor.USER_DEVICE
            if uid == 0:
                requestor |= Requestor.GRP_VBOX
        session.requestor = int(requestor)
        return session

    ioctl = _oracle.ioctl
    """Oracle's ioctl entry (:mod:`agent.host.driver._oracle`), as the method itself: every
    ioctl passes here, and a method that only called it was one more frame each time."""

    async def acknowledge_events(self, ack: bytearray) -> int | None:
        """``VGDrvCommonISR``: on a host with the fast IRQ acknowledge (``fHostFeatures``),
        read the fast port instead of sending ACKNOWLEDGE_EVENTS; its ``U32_MAX`` is a
        failure (VERR_INTERNAL_ERROR). Mainline always sends the request."""
        if not self.host_features & HOST_FEATURE_FAST_IRQ_ACK:
            return await super().acknowledge_events(ack)
        if self.lost:  # a reset ended the boot: the old ISR acknowledges nothing of the new
            await lost_port_write()
        events = self.vmmdev.read_fast_ack_port()
        if events == U32_MAX:
            _log.warning("isr_ack_failed", rc=VERR_INTERNAL_ERROR)
            return None
        return events

    async def close_session(self, session: DriverSession) -> None:
        """Close as the common code does, then forget the session's pending cancel."""
        await super().close_session(session)
        self.pending_cancel.discard(session)

    def post_events(self, events: int) -> None:
        """``vgdrvDispatchEventsLocked``: with the events already pending, hand each waiter
        on the wait list, oldest first, the events it waits for that are left (acquire-style
        ones only if its session may have them); it leaves the list and wakes. What no
        waiter took stays pending."""
        events |= self.pending_events
        woken = False
        for wait in list(self.wait_list):
            handled = _oracle.deliverable(self, wait.session, wait.mask & events)
            if handled:
                wait.result = handled
                events &= ~handled
                self.wait_list.remove(wait)
                woken = True
                if not events:
                    break
        self.pending_events = events
        if woken:
            self.event_wq.unpark_all()

    async def set_session_mouse_status(
        self, session: DriverSession, or_mask: int, not_mask: int, *, termination: bool
    ) -> int:
        """``vgdrvSetSessionMouseStatus``: count each feature's sessions, tell the host the
        union when it changed (as the session, or as the kernel at its close); a refused
        change is rolled back except at the close. Return the status."""
        async with self.session_mutex:
            previous = session.mouse_status
            wanted = (previous | or_mask) & ~not_mask & U32_MAX
            changed = previous ^ wanted
            if not changed:
                return VINF_SUCCESS
            mask_before = self.mouse_tracker.mask
            self.mouse_tracker.update(changed, previous)
            session.mouse_status = wanted
            features = self.mouse_tracker.mask
            unknown = self.mouse_status_host == U32_MAX
            if (features == mask_before and not unknown) or features == self.mouse_status_host:
                return VINF_SUCCESS
            self.mouse_status_host = features
            req = self.alloc_request(
                RequestType.SET_MOUSE_STATUS,
                MOUSE_STATUS_SIZE,
                REQUESTOR_KERNEL if termination else session.requestor,
            )
            _MOUSE_STATUS_BODY.pack_into(req, HEADER_SIZE, features, 0, 0)
            rc = await self.perform(req)
            if rc < 0:
                self.mouse_status_host = U32_MAX
                if not termination:
                    self.mouse_tracker.update(changed, wanted)
                    session.mouse_status = previous
            return rc

    async def release_mouse_status(self, session: DriverSession) -> None:
        """Drop the closing session's mouse features, as the kernel."""
        await self.set_session_mouse_status(session, 0, U32_MAX, termination=True)

    @property
    def balloon_chunks(self) -> int:
        """Chunks in the balloon (the driver's own or those userspace handed over)."""
        return len(self.chunks) + len(self.kernel_chunks)

    def _claim(self, session: DriverSession) -> bool:
        if self.owner is None:
            self.owner = session
        return self.owner is session

    async def check_balloon(self, session: DriverSession, kbuf: bytearray) -> None:
        """Query the host as the session (acknowledging 0x40); move the kernel's balloon or
        leave it to ring 3."""
        async with self._balloon_mutex:
            if not self._claim(session):
                L.IoctlHeader.rc.set(kbuf, VERR_PERMISSION_DENIED)
                return
            info = self.alloc_request(
                RequestType.GET_MEMBALLOON_CHANGE_REQ,
                L.MemBalloonInfoRequest.size,
                session.requestor,
            )
            L.MemBalloonInfoRequest.event_ack.set(info, Event.BALLOON_CHANGE_REQUEST)
            rc = await self.perform(info)
            if rc < 0:
                L.IoctlHeader.rc.set(kbuf, rc)
                return
            self.max_chunks = L.MemBalloonInfoRequest.phys_mem_chunks.get(info)
            chunks = L.MemBalloonInfoRequest.balloon_chunks.get(info)
            L.CheckBalloonIoctl.balloon_chunks.set(kbuf, chunks)
            L.CheckBalloonIoctl.handle_in_r3.set(kbuf, 0)
            L.CheckBalloonIoctl.padding.set(kbuf, b"")
            rc = await self._set_size_kernel(chunks, kbuf)
            # Out-of-memory is swallowed, whether the guest or the host ran out.
            if rc not in OUT_OF_MEMORY:
                L.IoctlHeader.rc.set(kbuf, rc)

    async def _set_size_kernel(self, target: int, kbuf: bytearray) -> int:
        """``vgdrvSetBalloonSizeKernel``: while the driver uses its allocator, walk its own
        chunks to ``target``; then answer ``handle_in_r3`` (left at 0 by the early returns)."""
        rc = VINF_SUCCESS
        if self.use_kernel_api:
            if target > self.max_chunks:
                return VERR_INVALID_PARAMETER
            if target == self.max_chunks:  # upstream's "nothing to do" compares with the max
                return VINF_SUCCESS
            rc = await self._walk_kernel(target)
        L.CheckBalloonIoctl.handle_in_r3.set(kbuf, int(not self.use_kernel_api))
        return rc

    async def _walk_kernel(self, target: int) -> int:
        """Inflate or deflate the driver's own chunks, stopping at the first failure or when
        the VM powers off (:data:`HALTED`); an inflate without the allocator hands the
        balloon to ring 3 instead (a success)."""
        while len(self.kernel_chunks) < target:
            if not self.kernel_allocator:
                self.use_kernel_api = False
                return VINF_SUCCESS
            rc, first = await self._balloon_new_chunk()
            if first is None:
                return rc
            self.kernel_chunks.append(first)
            if not await _between_chunks(self.vmmdev):
                return HALTED
        while len(self.kernel_chunks) > target:
            rc = await self._change(consecutive_pages(self.kernel_chunks[-1]), inflate=False)
            if rc < 0:
                return rc
            self.pages.free_chunk(self.kernel_chunks.pop())
            if not await _between_chunks(self.vmmdev):
                return HALTED
        return VINF_SUCCESS

    async def _balloon_new_chunk(self, requestor: int = REQUESTOR_KERNEL) -> tuple[int, int | None]:
        """Allocate a chunk's pages and hand them to the host: the status and the chunk's
        first page (None on a failure)."""
        first = self.pages.alloc_chunk()
        if first is None:
            return VERR_NO_MEMORY, None
        rc = await self._change(consecutive_pages(first), inflate=True, requestor=requestor)
        if rc < 0:
            self.pages.free_chunk(first)
            return rc, None
        return rc, first

    async def change_balloon_ioctl(
        self, session: DriverSession, kbuf: bytearray, memory: GuestMemory
    ) -> None:
        """CHANGE_BALLOON (sizes checked by the entry): lock a user chunk and balloon it, or
        deflate and unlock it."""
        del memory
        address, padding, inflate = _CHANGE_BALLOON_IN.unpack_from(kbuf, _CHANGE_BALLOON_IN_AT)
        if padding != _NO_PADDING:
            L.IoctlHeader.rc.set(kbuf, VERR_INVALID_PARAMETER)
            return
        async with self._balloon_mutex:
            if self.use_kernel_api or not self._claim(session):
                rc = VERR_PERMISSION_DENIED
            elif inflate:
                rc = await self._inflate(address, session.requestor)
            else:
                rc = await self._deflate(address, session.requestor)
        L.IoctlHeader.rc.set(kbuf, rc)

    async def _inflate(self, address: int, requestor: int) -> int:
        if self.max_chunks == 0 or len(self.chunks) >= self.max_chunks:
            return VERR_INVALID_PARAMETER
        if address in self.chunks:
            return VERR_ALREADY_EXISTS
        rc, first = await self._balloon_new_chunk(requestor)
        if first is None:
            return rc
        self.chunks[address] = first
        if None in self.slots:
            self.slots[self.slots.index(None)] = address
        else:
            self.slots.append(address)
        return VINF_SUCCESS

    async def _deflate(self, address: int, requestor: int = REQUESTOR_KERNEL) -> int:
        """Deflate the user chunk at ``address``: an empty balloon is VERR_INVALID_PARAMETER
        (``vgdrvSetBalloonSizeFromUser`` checks that first, with an assertion), an unknown
        chunk VERR_NOT_FOUND."""
        if not self.chunks:
            self._assertion_failed("vgdrvSetBalloonSizeFromUser: a deflate of an empty balloon")
            return VERR_INVALID_PARAMETER
        first = self.chunks.get(address)
        if first is None:
            return VERR_NOT_FOUND
        rc = await self._change(consecutive_pages(first), inflate=False, requestor=requestor)
        if rc >= 0:
            self.pages.free_chunk(self.chunks.pop(address))
            self.slots[self.slots.index(address)] = None
        return rc

    async def _change(
        self, pages: bytes, *, inflate: bool, requestor: int = REQUESTOR_KERNEL
    ) -> int:
        """CHANGE_MEMBALLOON for one chunk: as the kernel's (its own chunks, the close), or
        as the session whose user chunk it is (``vgdrvSetBalloonSizeFromUser``)."""
        req = self.alloc_request(
            RequestType.CHANGE_MEMBALLOON, L.MemBalloonChangeRequest.size, requestor
        )
        return await change_memballoon(self, req, pages, inflate=inflate)

    def _assertion_failed(self, where: str) -> None:
        self.failed_assertions.append(where)
        _log.warning(
            "driver_assertion_failed",
            where=where,
            note="a VBOX_STRICT build stops here; a release build returns the status",
        )

    async def session_closed(self, session: DriverSession) -> None:
        """The owner went away: deflate the chunks and free the balloon for others
        (``vgdrvCloseMemBalloon``).

        The walk goes down the slots from the chunk count less one to 0. After deflates out
        of order the chunks need not fill those slots: the order is then not the inflates'
        reverse, and where a freed slot lies below the count (so a chunk sits at the count
        or above, never reached) the walk sends its NIL object (pages ``NIL_RTHCPHYS``),
        which the host refuses as not page-aligned. The first chunk the host refuses ends
        the walk: it and the ones below it stay in the host's balloon. Upstream then frees
        its array of user chunks, so the model forgets them too (it goes on counting them,
        which the model does not).
        """
        async with self._balloon_mutex:
            if self.owner is not session:
                return
            for address in reversed(self.slots[: len(self.chunks)]):
                if address is None:
                    rc = await self._change(_NIL_CHUNK, inflate=False)
                else:
                    rc = await self._deflate(address)
                if rc < 0:
                    break
            self.chunks.clear()
            self.slots.clear()
            while self.kernel_chunks:
                if await self._change(consecutive_pages(self.kernel_chunks[-1]), inflate=False) < 0:
                    break  # upstream leaks the rest
                self.pages.free_chunk(self.kernel_chunks.pop())
                if not await _between_chunks(self.vmmdev):
                    break
            self.owner = None


async def _between_chunks(vmmdev: VMMDev) -> bool:
    """A schedule point between two chunks of a walk in an ioctl: the rest of the guest
    runs meanwhile (a long walk would otherwise stop it). Return whether the walk goes on:
    a signal does not stop it, as upstream's loops check for none, but a power-off does,
    as it ends the port writes a delay holds (the vCPUs halt)."""
    await cancel_shielded_checkpoint()
    return not vmmdev.powered_off
