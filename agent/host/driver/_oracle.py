"""The ioctl entry of Oracle's driver: ``vgdrvLinuxIOCtlSlow`` and ``VGDrvCommonIoCtl``.

Oracle's convention differs from mainline's in where a failure goes:

- The Linux entry returns an errno only for what it checks itself (EFAULT, EINVAL for a bad
  header version or a size that disagrees with the ioctl number, E2BIG above 16 MiB) and
  EINVAL for *every* failure ``VGDrvCommonIoCtl`` returns: a malformed header, a size that
  breaks the ioctl's ``REQ_CHECK_SIZES``, an unknown function (``VERR_NOT_SUPPORTED``
  inside). Nothing is copied back then.
- Everything a handler decides (including ``VERR_INVALID_PARAMETER`` for a bad argument,
  ``VERR_PERMISSION_DENIED``, ``VERR_INTERRUPTED``, ``VERR_TIMEOUT``) goes into ``hdr.rc``;
  the ioctl returns 0 and ``size_out`` bytes are copied back.
- Variable-size ioctls are recognised by ``_IOC_NR`` alone (``VBGL_IOCTL_CODE_STRIPPED`` is
  ``_IOC_NR`` on Linux): VMMDev requests (2, 3), HGCM calls (6, 7) and LOG (9).

Handlers shared with mainline raise the errno mainline would return; this entry reports the
status Oracle's handler returns for the same failure instead (:func:`status_for`).
"""

from __future__ import annotations

import errno
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from agent.host import _header_fields as H  # noqa: N812 - see the module
from agent.host.driver import _caps, _events, _hgcm, _misc
from agent.host.driver._load import ADDITIONS_VERSION
from agent.host.driver._policy import req_allowed
from agent.host.driver._request_sizes import check_request_size
from agent.host.driver._util import U32_MAX, DriverError, copy_in, copy_out, fail
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol._ioc import ioc_nr, ioc_size, iowr
from agent.protocol.constants import (
    AGC_FLAGS_VALID_MASK,
    GUEST_CAPABILITIES_MASK,
    HEADER_SIZE,
    HGCM_CALL_HEADER_SIZE,
    HGCM_MAX_LOCKED_BUFFERS,
    HGCM_MAX_PARMS,
    HGCM_MAX_USER_PARM,
    HGCM_PARM64_SIZE,
    IOC_VERSION,
    IOCTL_HDR_TYPE_DEFAULT,
    IOCTL_HDR_VERSION,
    IOCTL_TYPE,
    MAX_IOCTL_SIZE,
    TIMEOUT_INFINITE,
    Event,
    HgcmParmType,
    Ioctl,
    IoctlFunction,
)
from agent.protocol.status import (
    STATUS_CODES,
    VERR_INTERRUPTED,
    VERR_INVALID_PARAMETER,
    VERR_NOT_SUPPORTED,
    VERR_OUT_OF_RANGE,
    VERR_PERMISSION_DENIED,
    VERR_TIMEOUT,
    VERR_VERSION_MISMATCH,
    VINF_SUCCESS,
)
from agent.units import MS_PER_S

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.host.driver._session import DriverSession
    from agent.host.driver.oracle import OracleDriver
    from agent.host.memory import GuestMemory

    Handler = Callable[["OracleDriver", DriverSession, bytearray, GuestMemory], Awaitable[int]]

VERR_INVALID_HANDLE: Final = STATUS_CODES["VERR_INVALID_HANDLE"]
VERR_INVALID_POINTER: Final = STATUS_CODES["VERR_INVALID_POINTER"]
VERR_RESOURCE_BUSY: Final = STATUS_CODES["VERR_RESOURCE_BUSY"]
VERR_TOO_MANY_OPEN_FILES: Final = STATUS_CODES["VERR_TOO_MANY_OPEN_FILES"]
VERR_WRONG_ORDER: Final = STATUS_CODES["VERR_WRONG_ORDER"]
SET_MOUSE_STATUS_SIZE: Final = HEADER_SIZE + 4
SET_MOUSE_STATUS: Final = iowr(IOCTL_TYPE, 15, SET_MOUSE_STATUS_SIZE)
"""``VBGL_IOCTL_SET_MOUSE_STATUS`` (Oracle's only; the agent has no use for it): a u32 of
``VMMDEV_MOUSE_*`` features after the header, nothing back."""
ACQUIRE_STYLE_EVENTS: Final = int(Event.DISPLAY_CHANGE_REQUEST | Event.SEAMLESS_MODE_CHANGE_REQUEST)
"""``VBOXGUEST_ACQUIRE_STYLE_EVENTS``: the events a session may be denied (acquire mode)."""
MOUSE_GUEST_MASK: Final = 0x95
"""``VMMDEV_MOUSE_GUEST_MASK``: can-absolute, needs-host-cursor, new protocol, full state."""
_U32: Final = struct.Struct("<I")
ADDITIONS_REVISION: Final = ADDITIONS_VERSION[3]
"""``VBOX_SVN_REV``, which Oracle's driver reports as its revision (mainline's reports 0)."""

_STATUS_FOR_ERRNO: Final = {
    errno.EINVAL: VERR_INVALID_PARAMETER,
    errno.E2BIG: VERR_INVALID_PARAMETER,
    errno.EBUSY: VERR_RESOURCE_BUSY,
    errno.EMFILE: VERR_TOO_MANY_OPEN_FILES,
    errno.EPERM: VERR_PERMISSION_DENIED,
    errno.EINTR: VERR_INTERRUPTED,
    errno.ETIMEDOUT: VERR_TIMEOUT,
    errno.EFAULT: VERR_INVALID_POINTER,
}
"""Oracle's status for a failure a shared (mainline) handler reports with this errno."""
_PARM_KIND_SIZE: Final = L.run(L.HgcmParameter64.type, L.HgcmParameter64.pointer_size)
"""A call parameter's type and the word after it (a buffer's size)."""
_VALUE_TYPES: Final = frozenset({HgcmParmType.U32, HgcmParmType.U64})
_BUFFER_TYPES: Final = frozenset(
    {HgcmParmType.LINADDR, HgcmParmType.LINADDR_IN, HgcmParmType.LINADDR_OUT}
)


def status_for(exc: OSError) -> int:
    """Return the status Oracle's handler returns where mainline's raised ``exc``.

    Raises:
        OSError: ``exc`` itself for an errno no handler failure maps to (ENODEV: the VM
            was reset under the session).
    """
    if isinstance(exc, DriverError) and exc.status is not None:
        return exc.status
    if exc.errno not in _STATUS_FOR_ERRNO:
        raise exc
    return _STATUS_FOR_ERRNO[exc.errno]


@dataclass(eq=False)
class Wait:
    """One WAIT_FOR_EVENTS in progress (``VBOXGUESTWAIT``) on the driver's ``wait_list``.

    ``result`` is ``fResEvents``: 0 while it waits, the events the ISR's dispatch handed it
    (it then leaves the list), or ``U32_MAX``, the cancel's mark (VERR_INTERRUPTED).
    """

    session: DriverSession
    mask: int
    result: int = 0


# --- the Linux entry -----------------------------------------------------------------------------


async def ioctl(
    drv: OracleDriver, session: DriverSession, code: int, buf: bytearray, memory: GuestMemory
) -> None:
    """``vgdrvLinuxIOCtlSlow``: errno for the entry's own checks, EINVAL for common failures.

    A signal (the caller's cancellation) that ends an interruptible wait, a WAIT_FOR_EVENTS
    or an HGCM call (which is first cancelled at the host), is no failure of the ioctl:
    the handler returns VERR_INTERRUPTED, ``VGDrvCommonIoCtl`` stores it in ``hdr.rc`` and
    the header is copied back with 0 returned. The call so returns normally and its caller's
    next checkpoint raises the cancellation, in-process, over the socket server and through
    a character device alike.
    """
    await trio.lowlevel.cancel_shielded_checkpoint()  # a signal does not keep the call out
    if session.lost:
        raise fail(errno.ENODEV)
    if session.closed:
        raise fail(errno.EBADF)
    if not drv.loaded:
        raise fail(errno.ENODEV)
    kbuf = _copy_in(code, buf)
    if await _common_ioctl(drv, session, code, kbuf, memory) < 0:
        raise fail(errno.EINVAL)
    copy_out(kbuf, buf)


def _copy_in(code: int, buf: bytearray) -> bytearray:
    if len(buf) < HEADER_SIZE:
        raise fail(errno.EFAULT)
    size_in, version, _, _, size_out, _ = H.IOCTL_HEADER.unpack_from(buf)
    if version != IOCTL_HDR_VERSION:
        raise fail(errno.EINVAL)
    size = max(size_in, size_out)
    if size > MAX_IOCTL_SIZE:
        raise fail(errno.E2BIG)
    if size_in < HEADER_SIZE or ioc_size(code) not in (0, size):
        raise fail(errno.EINVAL)
    if len(buf) < size_in:
        raise fail(errno.EFAULT)
    return copy_in(buf, size_in, size)


# --- VGDrvCommonIoCtl -------------------------------------------------------------------------


async def _common_ioctl(
    drv: OracleDriver, session: DriverSession, code: int, kbuf: bytearray, memory: GuestMemory
) -> int:
    """Return the function's own status; handlers' statuses go to ``hdr.rc``."""
    size_in, _, request_type, _, size_out, _ = H.IOCTL_HEADER.unpack_from(kbuf)
    if size_out == 0:
        size_out = size_in
        H.IOCTL_SIZE_OUT.pack_into(kbuf, H.IOCTL_SIZE_OUT_AT, size_out)
    if not (HEADER_SIZE <= size_in <= len(kbuf) and HEADER_SIZE <= size_out <= len(kbuf)):
        return VERR_INVALID_PARAMETER
    variable = _VARIABLE.get(ioc_nr(code))
    if variable is not None:
        return await variable(drv, session, kbuf, memory)
    if request_type != 0:
        return VERR_INVALID_PARAMETER
    fixed = _FIXED.get(code)
    if fixed is None:
        H.IOCTL_RC.pack_into(kbuf, H.IOCTL_RC_AT, VERR_NOT_SUPPORTED)
        return VERR_NOT_SUPPORTED
    expected_in, expected_out, handler = fixed
    if size_in != expected_in or size_out != expected_out:
        return _refuse(kbuf)
    H.IOCTL_RC.pack_into(kbuf, H.IOCTL_RC_AT, await handler(drv, session, kbuf, memory))
    return VINF_SUCCESS


async def _vmmdev_request_ioctl(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    del memory
    hdr = L.IoctlHeader
    if hdr.type.get(kbuf) == 0 or hdr.size_in.get(kbuf) != hdr.size_out.get(kbuf):
        return _refuse(kbuf)
    hdr.rc.set(kbuf, await _vmmdev_request(drv, session, kbuf))
    return VINF_SUCCESS


async def _log_ioctl(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_Log``: a trusted session's message goes to the release log (the kernel
    log); a /dev/vboxuser session's to ``Log``, which release builds compile out."""
    if L.IoctlHeader.type.get(kbuf) != IOCTL_HDR_TYPE_DEFAULT:
        return VERR_INVALID_PARAMETER
    if L.IoctlHeader.size_out.get(kbuf) != HEADER_SIZE:
        return _refuse(kbuf)
    if session.user_device:
        L.IoctlHeader.rc.set(kbuf, VINF_SUCCESS)
        await trio.lowlevel.checkpoint()
        return VINF_SUCCESS
    return await _shared(_misc.log, drv, session, kbuf, memory)


async def _hgcm_call_ioctl(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    if not _hgcm_call_header(kbuf):
        return VERR_INVALID_PARAMETER
    L.IoctlHeader.rc.set(kbuf, await _hgcm_call(drv, session, kbuf, memory))
    return VINF_SUCCESS


async def _hgcm_call_32_ioctl(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """HGCM_CALL_32, which a 64-bit build dispatches as HGCM_CALL with 12-byte parameters
    (``vgdrvIoCtl_HGCMCallInner`` with ``f32bit``): the count, the size and the client are
    checked as there, then ``VbglR0HGCMInternalCall32`` refuses every user caller
    (``AssertReturn`` on kernel mode, VERR_WRONG_ORDER) before it reads a parameter."""
    del drv, memory
    if not _hgcm_call_header(kbuf):
        return VERR_INVALID_PARAMETER
    status = _hgcm_call_target(session, kbuf, L.HgcmParameter32.size)
    L.IoctlHeader.rc.set(kbuf, VERR_WRONG_ORDER if status == VINF_SUCCESS else status)
    return VINF_SUCCESS


def _hgcm_call_header(kbuf: bytearray) -> bool:
    """``VGDrvCommonIoCtl``'s checks of an HGCM call's header: the default type (else
    VERR_INVALID_PARAMETER, rc untouched), room for the call's own members and equal sizes
    (else ``REQ_CHECK_EXPR``'s refusal)."""
    hdr = L.IoctlHeader
    if hdr.type.get(kbuf) != IOCTL_HDR_TYPE_DEFAULT:
        return False
    size_in = hdr.size_in.get(kbuf)
    if size_in < HGCM_CALL_HEADER_SIZE or size_in != hdr.size_out.get(kbuf):
        _refuse(kbuf)
        return False
    return True


def _refuse(kbuf: bytearray) -> int:
    """``REQ_CHECK_*``: ``return pReqHdr->rc = VERR_INVALID_PARAMETER``."""
    L.IoctlHeader.rc.set(kbuf, VERR_INVALID_PARAMETER)
    return VERR_INVALID_PARAMETER


async def _shared(
    handler: Callable[[OracleDriver, DriverSession, bytearray, GuestMemory], Awaitable[None]],
    drv: OracleDriver,
    session: DriverSession,
    kbuf: bytearray,
    memory: GuestMemory,
) -> int:
    """Run a handler shared with mainline; a raised errno becomes Oracle's status in rc."""
    L.IoctlHeader.rc.set(kbuf, VINF_SUCCESS)
    try:
        await handler(drv, session, kbuf, memory)
    except OSError as exc:
        L.IoctlHeader.rc.set(kbuf, status_for(exc))
    return VINF_SUCCESS


def _adapt(
    handler: Callable[[OracleDriver, DriverSession, bytearray, GuestMemory], Awaitable[None]],
) -> Handler:
    async def adapted(
        drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
    ) -> int:
        await _shared(handler, drv, session, kbuf, memory)
        return L.IoctlHeader.rc.get(kbuf)

    return adapted


# --- handlers of Oracle's own ------------------------------------------------------------------


async def _driver_version_info(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_DriverVersionInfo``: the outputs are written whatever the outcome; the
    revision is the build's ``VBOX_SVN_REV``."""
    del drv, session, memory
    layout = L.DriverVersionInfo
    requested, minimum = layout.req_version.get(kbuf), layout.min_version.get(kbuf)
    if minimum > requested or minimum >> 16 != requested >> 16:
        rc = VERR_INVALID_PARAMETER
    elif minimum <= IOC_VERSION and minimum >> 16 == IOC_VERSION >> 16:
        rc = VINF_SUCCESS
    else:
        rc = VERR_VERSION_MISMATCH
    layout.session_version.set(kbuf, IOC_VERSION if rc == VINF_SUCCESS else U32_MAX)
    layout.driver_version.set(kbuf, IOC_VERSION)
    layout.driver_revision.set(kbuf, ADDITIONS_REVISION)
    layout.out_reserved1.set(kbuf, 0)
    layout.out_reserved2.set(kbuf, 0)
    await trio.lowlevel.checkpoint()
    return rc


async def _wait_for_events(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_WaitForEvents``: an empty mask is invalid; pending events that match,
    or a pending cancel, end the wait at once (success, the cancel consumed); else it joins
    the wait list for the ISR's dispatch (:meth:`OracleDriver.post_events`).

    A cancel that found no waiter (:func:`_interrupt_all`) thus ends this wait with success
    and whatever matching events are pending, possibly none. Events handed to the wait win
    over a cancel, a timeout or a close that comes after them, and over the caller's cancel
    (:func:`_sleep`): the call completes with them, and the caller's next checkpoint raises.
    """
    del memory
    layout = L.WaitForEventsIoctl
    timeout_ms, mask = layout.timeout_ms.get(kbuf), layout.events_in.get(kbuf)
    layout.events_out.set(kbuf, 0)
    if mask == 0:
        return VERR_INVALID_PARAMETER
    if session.lost:
        raise fail(errno.ENODEV)
    matches = deliverable(drv, session, drv.pending_events & mask)
    if matches or session in drv.pending_cancel:
        drv.pending_events &= ~matches
        drv.pending_cancel.discard(session)
        layout.events_out.set(kbuf, matches)
        return VINF_SUCCESS
    deadline = (
        math.inf if timeout_ms == TIMEOUT_INFINITE else trio.current_time() + timeout_ms / MS_PER_S
    )
    wait = Wait(session, mask)
    rc = await _sleep(drv, wait, deadline)
    if rc == VINF_SUCCESS:
        layout.events_out.set(kbuf, wait.result)
    return rc


def deliverable(drv: OracleDriver, session: DriverSession, events: int) -> int:
    """``events`` without the acquire-style ones ``session`` may not have: what the wait's
    own check and the ISR's dispatch (:meth:`OracleDriver.post_events`) may hand it."""
    if events & ACQUIRE_STYLE_EVENTS:
        events &= _events.allowed_events(drv, session)
    return events


async def _sleep(drv: OracleDriver, wait: Wait, deadline: float) -> int:
    """Sleep on the wait list until the ISR hands ``wait`` events (in ``wait.result``), a
    cancel, the deadline or the session's loss ends it; return the wait's status.

    The caller's cancel is the signal that ends the sleep (``RTSemEventMultiWaitNoResume``
    returns VERR_INTERRUPTED): VERR_INTERRUPTED is returned, unless the ISR handed the wait
    events before this task ran, which are returned with success all the same.
    """
    session = wait.session
    drv.wait_list.append(wait)
    try:
        while not wait.result:
            if session.lost:
                raise fail(errno.ENODEV)
            if session.cancel_waiters:
                return VERR_INTERRUPTED
            if trio.current_time() >= deadline:
                return VERR_TIMEOUT
            with trio.move_on_at(deadline):
                await drv.event_wq.park()
    except trio.Cancelled:
        if wait.result in (0, U32_MAX):
            return VERR_INTERRUPTED
    finally:
        if wait in drv.wait_list:
            drv.wait_list.remove(wait)
    return VERR_INTERRUPTED if wait.result == U32_MAX else VINF_SUCCESS


async def _interrupt_all(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_CancelAllWaitEvents``: end this session's waits still on the wait list,
    or, with none there, the session's next wait. A wait the ISR already handed events is
    off the list: it returns them, and the cancel is left pending."""
    del kbuf, memory
    cancelled = [wait for wait in drv.wait_list if wait.session is session]
    for wait in cancelled:
        wait.result = U32_MAX
        drv.wait_list.remove(wait)
    if cancelled:
        drv.event_wq.unpark_all()
    else:
        drv.pending_cancel.add(session)
    await trio.lowlevel.checkpoint()
    return VINF_SUCCESS


async def _hgcm_connect(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_HGCMConnect``: connect at the host first, then take a free slot of the
    session's table; with none left, disconnect the new client again and answer
    VERR_TOO_MANY_OPEN_FILES with client id 0 (mainline refuses before asking the host).

    The table is updated under the session's spinlock, which no signal interrupts: a client
    the host connected is the session's (its close disconnects it) whatever its caller does.
    """
    del memory
    status, client_id = await _hgcm.host_connect(drv, kbuf, session.requestor)
    if status >= 0:
        with trio.CancelScope(shield=True):
            async with drv.session_mutex:
                slots = session.hgcm_client_ids
                free = slots.index(0) if 0 in slots else None
                if free is not None:
                    slots[free] = client_id
        if free is None:
            await _hgcm.host_disconnect(drv, client_id, session.requestor)
            status, client_id = VERR_TOO_MANY_OPEN_FILES, 0
    L.HgcmConnectIoctl.client_id.set(kbuf, client_id)
    return status


async def _hgcm_disconnect(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_HGCMDisconnect``: an id this session does not hold is an invalid handle.

    The table's free slots hold 0, so client 0 passes while one is free and
    ``VbglR0HGCMInternalDisconnect`` refuses it, sending nothing.
    """
    client_id = L.HgcmDisconnectIoctl.client_id.get(kbuf)
    if client_id == U32_MAX or client_id not in session.hgcm_client_ids:
        return VERR_INVALID_HANDLE
    if client_id == 0:
        return VERR_INVALID_PARAMETER
    return await _adapt(_hgcm.disconnect)(drv, session, kbuf, memory)


async def _hgcm_call(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_HGCMCallInner``: parameter count, size and client id, then
    ``VbglR0HGCMInternalCall``: the parameters' checks (:func:`_preprocess`), then the call."""
    status = _hgcm_call_target(session, kbuf, HGCM_PARM64_SIZE)
    if status < 0:
        return status
    status = _preprocess(kbuf, L.HgcmCallIoctl.parm_count.get(kbuf))
    if status < 0:
        return status
    try:
        return await _adapt(_hgcm.call)(drv, session, kbuf, memory)
    except trio.Cancelled:
        return VERR_INTERRUPTED  # the signal: see ioctl()


def _hgcm_call_target(session: DriverSession, kbuf: bytearray, parm_size: int) -> int:
    """``vgdrvIoCtl_HGCMCallInner``'s own checks for parameters of ``parm_size`` bytes: the
    count, the buffer's room for them (``size_out`` becomes what they take), then the
    client among the session's; return VINF_SUCCESS or the status."""
    count = L.HgcmCallIoctl.parm_count.get(kbuf)
    if count > HGCM_MAX_PARMS:
        return VERR_INVALID_PARAMETER
    needed = HGCM_CALL_HEADER_SIZE + parm_size * count
    if len(kbuf) < needed:
        return VERR_INVALID_PARAMETER
    L.IoctlHeader.size_out.set(kbuf, needed)
    client_id = L.HgcmCallIoctl.client_id.get(kbuf)
    if client_id == U32_MAX or client_id not in session.hgcm_client_ids:
        return VERR_INVALID_HANDLE  # client 0 passes while a slot is free; the host refuses it
    return VINF_SUCCESS


def _preprocess(kbuf: bytearray, count: int) -> int:
    """``vbglR0HGCMInternalPreprocessCall`` for a user caller: one pass over the parameters,
    in order, each failing where it stands.

    Values pass; any type but a linear buffer is VERR_INVALID_PARAMETER; a non-empty buffer
    takes one of :data:`HGCM_MAX_LOCKED_BUFFERS` places (none left: VERR_INVALID_PARAMETER,
    whatever its size), then may be at most 24 MiB (VERR_OUT_OF_RANGE). Mainline instead
    checks every type before any size and has no limit on the number of buffers.
    """
    locked = 0
    for index in range(count):
        kind, size = _PARM_KIND_SIZE.get(kbuf, HGCM_CALL_HEADER_SIZE + HGCM_PARM64_SIZE * index)
        if kind in _VALUE_TYPES:
            continue
        if kind not in _BUFFER_TYPES:
            return VERR_INVALID_PARAMETER
        if not size:
            continue
        if locked == HGCM_MAX_LOCKED_BUFFERS:
            return VERR_INVALID_PARAMETER
        if size > HGCM_MAX_USER_PARM:
            return VERR_OUT_OF_RANGE
        locked += 1
    return VINF_SUCCESS


async def _vmmdev_request(drv: OracleDriver, session: DriverSession, kbuf: bytearray) -> int:
    """``vgdrvIoCtl_VMMDevRequest``: check the sizes (:mod:`~agent.host.driver._request_sizes`),
    then the policy; copy, stamp the requestor, perform, copy back.

    The policy is mainline's (:func:`~agent.host.driver._policy.req_allowed`, no extra
    types): ``vgdrvCheckIfVmmReqIsAllowed`` puts each request at the level mainline's
    ``vbg_req_allowed`` does for a user session (all users, trusted users only, or none:
    its kernel-only level, which takes in both balloon requests, passes no user session).

    The reply is copied back only when the host succeeded; otherwise the caller's request
    stays as sent, with the failure in ``rc``.
    """
    size = L.RequestHeader.size_.get(kbuf)
    request_type = L.RequestHeader.request_type.get(kbuf)
    rc = check_request_size(request_type, size)
    if rc < 0:
        return rc
    if not req_allowed(session, request_type, kbuf, frozenset()):
        return VERR_PERMISSION_DENIED
    copy = bytearray(kbuf[:size])
    L.RequestHeader.reserved1.set(copy, 0)
    L.RequestHeader.requestor.set(copy, session.requestor)
    rc = await drv.perform(copy)
    if rc >= 0:
        kbuf[:size] = copy
        L.RequestHeader.reserved1.set(kbuf, size)
    return rc


async def _acquire_caps(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_GuestCapsAcquire``: the flags and the mask to acquire are checked; bits
    of the mask to release that no capability has are ignored."""
    del memory
    layout = L.AcquireGuestCapsIoctl
    flags, or_mask = layout.flags.get(kbuf), layout.or_mask.get(kbuf)
    if or_mask & ~GUEST_CAPABILITIES_MASK or flags & ~AGC_FLAGS_VALID_MASK:
        return VERR_INVALID_PARAMETER
    not_mask = layout.not_mask.get(kbuf) & GUEST_CAPABILITIES_MASK
    try:
        await _caps.acquire_session_caps(drv, session, or_mask, not_mask, flags, termination=False)
    except OSError as exc:
        return status_for(exc)
    return VINF_SUCCESS


async def _change_caps(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_SetCapabilities``: once the masks pass, the session's capabilities and
    all sessions' (acquired and set) come back, the change refused or not."""
    del memory
    layout = L.SetGuestCapsIoctl
    or_mask, not_mask = layout.or_mask.get(kbuf), layout.not_mask.get(kbuf)
    if (or_mask | not_mask) & ~GUEST_CAPABILITIES_MASK:
        return VERR_INVALID_PARAMETER
    rc = VINF_SUCCESS
    try:
        await _caps.set_session_caps(drv, session, or_mask, not_mask, termination=False)
    except OSError as exc:
        rc = status_for(exc)
    layout.session_caps.set(kbuf, session.set_guest_caps)
    layout.global_caps.set(kbuf, drv.acquired_caps | drv.set_caps_tracker.mask)
    return rc


async def _set_mouse_status(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_SetMouseStatus``: only the features a guest may set; the session's
    features become exactly these."""
    del memory
    (features,) = _U32.unpack_from(kbuf, HEADER_SIZE)
    if features & ~MOUSE_GUEST_MASK:
        return VERR_INVALID_PARAMETER
    return await drv.set_session_mouse_status(
        session, features, ~features & U32_MAX, termination=False
    )


async def _check_balloon(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_CheckMemoryBalloon``: the personality's balloon answers."""
    del memory
    L.IoctlHeader.rc.set(kbuf, VINF_SUCCESS)
    await drv.check_balloon(session, kbuf)
    return L.IoctlHeader.rc.get(kbuf)


async def _change_balloon(
    drv: OracleDriver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> int:
    """``vgdrvIoCtl_ChangeMemoryBalloon``: the personality's balloon answers."""
    H.IOCTL_RC.pack_into(kbuf, H.IOCTL_RC_AT, VINF_SUCCESS)
    try:
        await drv.change_balloon_ioctl(session, kbuf, memory)
    except OSError as exc:
        return status_for(exc)
    rc: int = H.IOCTL_RC.unpack_from(kbuf, H.IOCTL_RC_AT)[0]
    return rc


_FIXED: Final[dict[int, tuple[int, int, Handler]]] = {
    Ioctl.DRIVER_VERSION_INFO: (40, L.DriverVersionInfo.size, _driver_version_info),
    Ioctl.WAIT_FOR_EVENTS: (L.WaitForEventsIoctl.size, 28, _wait_for_events),
    Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS: (HEADER_SIZE, HEADER_SIZE, _interrupt_all),
    Ioctl.CHANGE_FILTER_MASK: (
        L.ChangeFilterIoctl.size,
        HEADER_SIZE,
        _adapt(_events.change_filter_mask),
    ),
    Ioctl.HGCM_CONNECT: (L.HgcmConnectIoctl.size, 28, _hgcm_connect),
    Ioctl.HGCM_DISCONNECT: (L.HgcmDisconnectIoctl.size, HEADER_SIZE, _hgcm_disconnect),
    Ioctl.ACQUIRE_GUEST_CAPABILITIES: (L.AcquireGuestCapsIoctl.size, HEADER_SIZE, _acquire_caps),
    Ioctl.CHANGE_GUEST_CAPABILITIES: (
        L.SetGuestCapsIoctl.size,
        L.SetGuestCapsIoctl.size,
        _change_caps,
    ),
    Ioctl.CHECK_BALLOON: (HEADER_SIZE, L.CheckBalloonIoctl.size, _check_balloon),
    Ioctl.CHANGE_BALLOON: (L.ChangeBalloonIoctl.size, HEADER_SIZE, _change_balloon),
    Ioctl.WRITE_CORE_DUMP: (L.WriteCoreDumpIoctl.size, HEADER_SIZE, _adapt(_misc.write_core_dump)),
    SET_MOUSE_STATUS: (SET_MOUSE_STATUS_SIZE, HEADER_SIZE, _set_mouse_status),
}
"""Fixed-size ioctls: ``(size_in, size_out, handler)`` (``REQ_CHECK_SIZES``)."""
_VARIABLE: Final[dict[int, Handler]] = {
    IoctlFunction.VMMDEV_REQUEST: _vmmdev_request_ioctl,
    IoctlFunction.VMMDEV_REQUEST_BIG: _vmmdev_request_ioctl,
    IoctlFunction.HGCM_CALL_32: _hgcm_call_32_ioctl,
    IoctlFunction.HGCM_CALL_64: _hgcm_call_ioctl,
    IoctlFunction.LOG: _log_ioctl,
}
"""Variable-size ioctls by ``_IOC_NR``: they check their own header and return their status."""
