"""What every simulated vboxguest driver does: load, the ioctl entry, the ISR, close.

The ioctl entry follows ``vbg_misc_device_ioctl`` and ``vbg_core_ioctl`` (errno values, the
order of the checks, no copy-back on failure). Requests the driver sends to the host are
real VMMDev request buffers placed in guest "RAM" (a :class:`DictMemory` below 4 GiB) and
submitted through the device's port, as ``vbg_req_perform`` does.
"""

from __future__ import annotations

import errno
from collections import deque
from contextlib import suppress
from typing import TYPE_CHECKING, ClassVar, Final, NoReturn

import trio

# By name: trio's module has a __getattr__, which keeps trio.lowlevel.X from being
# specialised, so it is looked up the slow way on every call (and this is on every get).
from trio.lowlevel import cancel_shielded_checkpoint, checkpoint

from agent.host import _header_fields as H  # noqa: N812 - see the module
from agent.host._faults import request_name
from agent.host._log import host_log as _log
from agent.host.driver import _caps, _events, _hgcm, _misc
from agent.host.driver._load import FIXED_EVENTS, MOUSE_STATUS_SIZE, load
from agent.host.driver._policy import req_allowed
from agent.host.driver._session import BitTracker, DriverSession
from agent.host.driver._util import (
    FILL_BYTE,
    U32_MAX,
    KernelMutex,
    check_sizes,
    fail,
    lost_port_write,
)
from agent.protocol import (
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol._ioc import ioc_size, without_size
from agent.protocol.constants import (
    HEADER_SIZE,
    IOCTL_HDR_TYPE_DEFAULT,
    IOCTL_HDR_VERSION,
    MAX_IOCTL_SIZE,
    MAX_VMMDEV_REQUEST_SIZE,
    REQUEST_HEADER_VERSION,
    REQUESTOR_KERNEL,
    Event,
    Ioctl,
    RequestType,
)
from agent.protocol.status import (
    VERR_GENERAL_FAILURE,
    VERR_INTERNAL_ERROR,
    VINF_SUCCESS,
)
from agent.units import NS_PER_S

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.host.memory import DictMemory, GuestMemory
    from agent.host.vmmdev import VMMDev

    IoctlHandler = Callable[["Driver", DriverSession, bytearray, GuestMemory], Awaitable[None]]
    Route = tuple[IoctlHandler, bool, int]
    """An ioctl's handler, whether its header may have a ``type`` other than 0 (a VMMDev
    request's), and the size its number encodes (0: none)."""

LOG_HISTORY: Final = 64
"""LOG ioctl messages kept for inspection."""
VBG_LOG_LINE_MAX: Final = 127
"""Bytes of a LOG message mainline records: it formats ``%.*s`` (which also stops at a NUL)
into its 128-byte ``vbg_log_buf`` before printk."""
MAX_ROUTES: Final = 256
"""Ioctl numbers whose dispatch a driver remembers: every fixed one and many more sized ones
than the agent's requests and calls use (a size per request type or parameter count), few
enough that numbers a client makes up cannot grow the table; others are worked out each time."""
ISR_RETRY_S: Final = 0.01
"""After a failed ACKNOWLEDGE_EVENTS the (level-triggered) line fires again this much later."""
_HGCM: Final = int(Event.HGCM)
_MOUSE: Final = int(Event.MOUSE_POSITION_CHANGED)
_BALLOON: Final = int(Event.BALLOON_CHANGE_REQUEST)
"""Event bits as plain ints: IntFlag arithmetic would build a flag member per operation."""
_VMMDEV_REQUEST: Final = without_size(Ioctl.vmmdev_request(0))
_VMMDEV_REQUEST_BIG: Final = (Ioctl.VMMDEV_REQUEST_BIG, Ioctl.VMMDEV_REQUEST_BIG_ALT)
_HGCM_CALL_64: Final = without_size(Ioctl.hgcm_call_64(0))
_LOG_ALT: Final = without_size(Ioctl.log_alt(0))
"""Ioctl numbers without their size field, for the ioctls that carry one."""
_RC_SIZE_OUT: Final = L.run(L.IoctlHeader.rc, L.IoctlHeader.size_out).codec
"""The ioctl's answer (rc, size_out) in one pack, as in :mod:`agent.host._header_fields`."""


class Driver:
    """The shared driver model; personalities override the class variables and hooks."""

    personality: ClassVar[str]
    kernel_events: ClassVar[int] = _HGCM | _MOUSE | _BALLOON
    log_line_max: ClassVar[int] = VBG_LOG_LINE_MAX
    """Bytes of a LOG message the driver writes to the kernel log."""
    """Events the ISR keeps for the kernel: userspace waiters never receive them."""
    owns_heartbeat: ClassVar[bool] = True
    """Whether the driver configures the heartbeat at load and beats itself."""
    filter_as_session: ClassVar[bool] = True
    """Whether a session's filter change goes to the host with its requestor (else the
    kernel's, as at a close)."""
    acquire_refuses_set_caps: ClassVar[bool] = True
    """Whether acquiring a capability some session set is refused (mainline: EINVAL)."""
    acquire_reports_unknown_caps: ClassVar[bool] = False
    """Whether an ACQUIRE that changes nothing reports the capabilities again while the
    host's are unknown (mainline returns before it)."""
    legacy_cancel: ClassVar[bool] = True
    """Whether a CANCEL2 the host answers VERR_NOT_IMPLEMENTED is sent again as the legacy
    HGCM_CANCEL of the call's own request (``hgcm_cancel_call``)."""
    refused_call_copied_back: ClassVar[bool] = True
    """Whether a call VMMDev refused in its ``rc`` is copied back with that ``rc`` as its
    result (``vbg_hgcm_do_call``); else it returns that ``rc`` and copies nothing back."""
    trusted_requests: ClassVar[frozenset[int]] = frozenset()
    """Extra VMMDev request types trusted (non-vboxuser) sessions may pass through."""

    def __init__(self, vmmdev: VMMDev, ram: DictMemory) -> None:
        self.vmmdev = vmmdev
        self.ram = ram
        self.loaded = False
        self.lost = False
        self.sessions: set[DriverSession] = set()
        self.fixed_events = FIXED_EVENTS
        self.pending_events = 0
        self.event_wq = trio.lowlevel.ParkingLot()
        self.hgcm_wq = trio.lowlevel.ParkingLot()
        self.session_mutex = KernelMutex()
        self.cancel_req_mutex = KernelMutex()
        self.cancel_req = self.alloc_request(RequestType.HGCM_CANCEL2, L.HgcmCancel2Request.size)
        """The one CANCEL2 request, allocated at load and reused (its ``rc`` is the last answer)."""
        self.filter_tracker = BitTracker()
        self.event_filter_host = U32_MAX
        self.set_caps_tracker = BitTracker()
        self.guest_caps_host = U32_MAX
        self.acquire_mode_caps = 0
        self.acquired_caps = 0
        self.heartbeat_interval_ns = 0
        self.host_features = 0
        self.log_messages: deque[bytes] = deque(maxlen=LOG_HISTORY)
        self._routes: dict[int, Route] = {
            int(code): (handler, False, ioc_size(code))
            for code, handler in (
                (Ioctl.DRIVER_VERSION_INFO, _misc.driver_version_info),
                (Ioctl.HGCM_CONNECT, _hgcm.connect),
                (Ioctl.HGCM_DISCONNECT, _hgcm.disconnect),
                (Ioctl.WAIT_FOR_EVENTS, _events.wait_for_events),
                (Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS, _events.interrupt_all),
                (Ioctl.CHANGE_FILTER_MASK, _events.change_filter_mask),
                (Ioctl.ACQUIRE_GUEST_CAPABILITIES, _caps.acquire),
                (Ioctl.CHANGE_GUEST_CAPABILITIES, _caps.change),
                (Ioctl.CHECK_BALLOON, Driver._check_balloon_ioctl),
                (Ioctl.WRITE_CORE_DUMP, _misc.write_core_dump),
            )
        }
        """The fixed-size ioctls' routes; :meth:`_route` adds the others' as they are used."""

    # --- hooks -------------------------------------------------------------------------------

    @property
    def balloon_chunks(self) -> int:
        """Chunks the driver itself holds in the balloon."""
        return 0

    async def check_balloon(self, session: DriverSession, kbuf: bytearray) -> None:
        """CHECK_BALLOON (mainline): report the kernel's count; userspace does nothing."""
        del session
        L.CheckBalloonIoctl.balloon_chunks.set(kbuf, self.balloon_chunks)
        L.CheckBalloonIoctl.handle_in_r3.set(kbuf, 0)
        await checkpoint()

    def balloon_event(self) -> None:
        """The ISR took BALLOON_CHANGE_REQUEST for the kernel."""

    def start_background(self, nursery: trio.Nursery) -> None:
        """Start personality-specific kernel work (after load)."""

    async def session_closed(self, session: DriverSession) -> None:
        """Personality cleanup when a session closes (after the common cleanup)."""

    async def release_mouse_status(self, session: DriverSession) -> None:
        """Drop the session's mouse features at close (after its event filter)."""

    # --- requests to the host ------------------------------------------------------------------

    def alloc_request(
        self, request_type: int, size: int, requestor: int = REQUESTOR_KERNEL
    ) -> bytearray:
        """``vbg_req_alloc``: a request of ``size`` bytes filled with 0xAA and a fresh header."""
        req = bytearray([FILL_BYTE]) * size
        H.REQUEST_HEADER.pack_into(
            req, 0, size, REQUEST_HEADER_VERSION, request_type, VERR_GENERAL_FAILURE, 0, requestor
        )
        return req

    def mask_request(
        self, request_type: int, mask: int, requestor: int = REQUESTOR_KERNEL
    ) -> bytearray:
        """A ``vmmdev_mask`` request that sets ``mask`` absolutely (or = mask, not = ~mask)."""
        req = self.alloc_request(request_type, L.MaskRequest.size, requestor)
        L.MaskRequest.or_mask.set(req, mask)
        L.MaskRequest.not_mask.set(req, ~int(mask) & U32_MAX)  # an IntFlag would stop at 0x7FF
        return req

    async def perform(self, req: bytearray) -> int:
        """``vbg_req_perform``: place ``req`` in guest RAM, hit the port, return ``rc``.

        Raises:
            OSError: ENODEV, a VM reset ended this driver's boot (the request reaches no
                device).
        """
        if self.lost:
            await lost_port_write()
        phys = self.ram.map(req)
        try:
            vmmdev = self.vmmdev
            if vmmdev.faults.has_delays:
                await vmmdev.submit(phys)
            else:  # vmmdev.submit, inline without a delay: a coroutine less (the ISR's acks)
                vmmdev.process(phys)
        finally:
            self.ram.unmap(phys)
        rc: int = H.REQUEST_RC.unpack_from(req, H.REQUEST_RC_AT)[0]
        return rc

    # --- background ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Load the driver, then serve interrupts and kernel timers until cancelled.

        Raises:
            DriverLoadError: the load failed (before ``started``).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._isr_loop)
            await load(self)
            if self.owns_heartbeat and self.heartbeat_interval_ns > 0:
                nursery.start_soon(self._heartbeat_loop, self.heartbeat_interval_ns)
            self.start_background(nursery)
            task_status.started()
            await trio.sleep_forever()

    async def _isr_loop(self) -> NoReturn:
        """``vbg_core_isr``: acknowledge the host's events, route them, poll the mouse."""
        ack = self.alloc_request(RequestType.ACKNOWLEDGE_EVENTS, L.EventsRequest.size)
        mouse = self.alloc_request(RequestType.GET_MOUSE_STATUS, MOUSE_STATUS_SIZE)
        while True:
            await self.vmmdev.wait_for_irq()
            events = await self.acknowledge_events(ack)
            if events is None:
                await trio.sleep(ISR_RETRY_S)
                continue
            self.route_events(events)
            if events & _MOUSE:
                await self._mouse_event(mouse)

    async def acknowledge_events(self, ack: bytearray) -> int | None:
        """Acknowledge the host's events with the ISR's ACKNOWLEDGE_EVENTS request ``ack``:
        the events, or None when the host refused."""
        L.RequestHeader.rc.set(ack, VERR_INTERNAL_ERROR)
        L.EventsRequest.events.set(ack, 0)
        rc = await self.perform(ack)
        if rc < 0:
            _log.warning("isr_ack_failed", rc=rc)
            return None
        events: int = L.EventsRequest.events.get(ack)
        return events

    async def _mouse_event(self, req: bytearray) -> None:
        """``vbg_linux_mouse_event``: fetch the pointer position for the input device."""
        req[HEADER_SIZE:MOUSE_STATUS_SIZE] = bytes(MOUSE_STATUS_SIZE - HEADER_SIZE)
        await self.perform(req)

    def route_events(self, events: int) -> None:
        """Hand acknowledged events to the kernel's consumers and to userspace waiters.

        MOUSE_POSITION_CHANGED goes to the input device (see :meth:`_mouse_event`).
        """
        if events & _HGCM:
            self.hgcm_wq.unpark_all()
        if events & _BALLOON & self.kernel_events:
            self.balloon_event()
        user = events & ~self.kernel_events
        if user:
            self.post_events(user)

    def post_events(self, events: int) -> None:
        """Make ``events`` pending for userspace waiters and wake them if any is pending
        (``vbg_core_isr``); each waiter takes what matches when it runs."""
        self.pending_events |= events
        if self.pending_events:
            self.event_wq.unpark_all()

    async def _heartbeat_loop(self, interval_ns: int) -> NoReturn:
        """Beat once per host interval, drift-free, starting at once.

        Real mainline re-arms its timer with a relative expiry passed as an absolute jiffies
        value, so a mainline guest beats about once per tick (HZ times a second). The simulator
        beats at the interval, as Oracle's driver does; the host tolerates both.
        """
        beat = self.alloc_request(RequestType.GUEST_HEARTBEAT, HEADER_SIZE)
        start = trio.current_time()
        tick = 0
        while True:
            await trio.sleep_until(start + tick * interval_ns / NS_PER_S)
            await self.perform(beat)
            tick += 1

    # --- sessions ------------------------------------------------------------------------------

    def open_session(self, *, user_device: bool = False, uid: int = 0) -> DriverSession:
        """Open ``/dev/vboxguest`` (or ``/dev/vboxuser``) as ``uid``: after a reset ended the
        driver's boot the session is lost at once (its ioctls fail with ENODEV)."""
        session = DriverSession(user_device=user_device, uid=uid)
        session.lost = session.cancel_waiters = self.lost
        self.sessions.add(session)
        return session

    def shutdown(self) -> None:
        """The VM was reset under this driver: every session and waiter fails with ENODEV."""
        self.lost = True
        for session in self.sessions:
            session.lost = session.cancel_waiters = True
        self.event_wq.unpark_all()
        self.hgcm_wq.unpark_all()

    async def close_session(self, session: DriverSession) -> None:
        """``vbg_core_close_session``: release caps, filter bits and HGCM clients."""
        if session.closed:
            return
        session.closed = True
        if session.lost:
            return
        session.cancel_waiters = True
        self.event_wq.unpark_all()
        self.sessions.discard(session)
        with trio.CancelScope(shield=True):
            # Both drivers ignore what these return and clean up anyway (the host may refuse).
            with suppress(OSError):
                await _caps.acquire_session_caps(self, session, 0, U32_MAX, 0, termination=True)
            with suppress(OSError):
                await _caps.set_session_caps(self, session, 0, U32_MAX, termination=True)
            with suppress(OSError):
                await _events.set_session_event_filter(self, session, 0, U32_MAX, termination=True)
            try:
                await self.release_mouse_status(session)
                for client_id in session.hgcm_client_ids:
                    if client_id not in (0, U32_MAX):
                        await _hgcm.host_disconnect(self, client_id, REQUESTOR_KERNEL)
                await self.session_closed(session)
            except OSError:  # ENODEV: a reset ended the boot meanwhile, and all it held
                if not self.lost:
                    raise

    # --- the ioctl entry -------------------------------------------------------------------------

    async def ioctl(  # noqa: PLR0912 - vbg_misc_device_ioctl inline, see below
        self, session: DriverSession, code: int, buf: bytearray, memory: GuestMemory
    ) -> None:
        """Perform one ioctl on ``session``: ``buf`` is the user's buffer.

        Raises:
            OSError: the errno the driver returns; ``buf`` is then left untouched.
        """
        # A schedule point, not a cancellation point: a signal does not keep a system call
        # out of the driver, only its interruptible waits see one (the transport checked for
        # a cancellation before it marked the call issued).
        await cancel_shielded_checkpoint()
        if session.lost:
            raise fail(errno.ENODEV)
        if session.closed:
            raise fail(errno.EBADF)
        if not self.loaded:
            raise fail(errno.ENODEV)
        route = self._routes.get(code) or self._route(code)
        handler, any_type, encoded_size = route
        # Steps 1-7 of vbg_misc_device_ioctl, inline (every ioctl passes here): fetch and
        # check the header, copy the input (zero-padded to the larger size); then
        # vbg_core_ioctl's start: rc is VINF_SUCCESS and a size_out of 0 becomes size_in.
        if len(buf) < HEADER_SIZE:
            raise fail(errno.EFAULT)
        size_in, version, ioctl_type, size_out = H.IOCTL_CHECKED.unpack_from(buf)
        if version != IOCTL_HDR_VERSION:
            raise fail(errno.EINVAL)
        if size_in < HEADER_SIZE or (size_out != 0 and size_out < HEADER_SIZE):
            raise fail(errno.EINVAL)
        size = size_out if size_out > size_in else size_in  # noqa: FURB136 - max() parses its arguments
        if encoded_size not in (0, size):
            raise fail(errno.EINVAL)
        if size > MAX_IOCTL_SIZE:
            raise fail(errno.E2BIG)
        if len(buf) < size_in:
            raise fail(errno.EFAULT)
        kbuf = buf[:size_in]  # a copy
        if size > size_in:
            kbuf += bytes(size - size_in)
        _RC_SIZE_OUT.pack_into(kbuf, H.IOCTL_RC_AT, VINF_SUCCESS, size_out or size_in)
        # vbg_core_ioctl: only a VMMDev request may have a header type other than the default.
        if ioctl_type != IOCTL_HDR_TYPE_DEFAULT and not any_type:
            raise fail(errno.EINVAL)
        await handler(self, session, kbuf, memory)
        # copy_out, inline: size_out bytes of the kernel's copy go back (EFAULT if the
        # caller's buffer is shorter), in one copy.
        count = H.IOCTL_SIZE_OUT.unpack_from(kbuf, H.IOCTL_SIZE_OUT_AT)[0]
        copied = len(kbuf)
        if count > copied:  # noqa: PLR1730 - min() parses its arguments
            count = copied
        if len(buf) < count:
            raise fail(errno.EFAULT)
        buf[:count] = kbuf if count == copied else memoryview(kbuf)[:count]

    def _route(self, code: int) -> Route:
        """``vbg_core_ioctl``'s dispatch for ``code``, whose number carries its size (the
        fixed-size ioctls are in :attr:`_routes` from the start): remembered, unless unknown
        or :data:`MAX_ROUTES` are."""
        stripped = without_size(code)
        route: Route
        if stripped == _VMMDEV_REQUEST or code in _VMMDEV_REQUEST_BIG:
            route = (Driver._vmmdev_request, True, ioc_size(code))
        elif stripped == _HGCM_CALL_64:
            route = (_hgcm.call, False, ioc_size(code))
        elif stripped in (Ioctl.LOG, _LOG_ALT):  # LOG(s) is _IO('V', 9): a sized one is too
            route = (_misc.log, False, ioc_size(code))
        else:
            return (_unknown_ioctl(code), False, ioc_size(code))
        if len(self._routes) < MAX_ROUTES:
            self._routes[code] = route
        return route

    async def _check_balloon_ioctl(
        self, session: DriverSession, kbuf: bytearray, _memory: GuestMemory
    ) -> None:
        check_sizes(kbuf, HEADER_SIZE, L.CheckBalloonIoctl.size)
        await self.check_balloon(session, kbuf)

    async def _vmmdev_request(
        self, session: DriverSession, kbuf: bytearray, _memory: GuestMemory
    ) -> None:
        """``vbg_ioctl_vmmrequest``: the buffer is the request, handed over as it is."""
        size_in, _, request_type, _, size_out, _ = H.IOCTL_HEADER.unpack_from(kbuf)
        if size_in != size_out:
            raise fail(errno.EINVAL)
        if size_in > MAX_VMMDEV_REQUEST_SIZE:
            raise fail(errno.E2BIG)
        if request_type == 0:
            raise fail(errno.EINVAL)
        if not req_allowed(session, request_type, kbuf, self.trusted_requests):
            _log.info(
                "vmm_request_denied",
                request=request_name(request_type),
                session=session.described(),
            )
            raise fail(errno.EPERM)
        await self.perform(kbuf)


def _unknown_ioctl(code: int) -> IoctlHandler:
    """The handler of ``code``, an ioctl number the driver does not know: ENOTTY."""

    async def unknown(
        drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
    ) -> None:
        del drv, session, kbuf, memory
        _log.debug("unknown_ioctl", code=f"{code:#x}")
        raise fail(errno.ENOTTY)

    return unknown
