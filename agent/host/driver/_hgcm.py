"""HGCM ioctls: CONNECT and DISCONNECT (64 client slots per session) and CALL.

A call is rebuilt as the driver does: user buffers are copied into bounce buffers in guest
RAM and described by page lists appended to the VMMDev request; the driver waits for the
host's DONE flag (woken by the ISR on the HGCM event), cancels at the host on timeout or
interruption, and copies results back to user memory.
"""

from __future__ import annotations

import enum
import errno
import functools
import math
import struct
from typing import TYPE_CHECKING, Final, final

import trio

from agent.host import _header_fields as H  # noqa: N812 - see the module
from agent.host.driver._util import FILL_BYTE, U32_MAX, check_sizes, fail, lost_port_write
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    HGCM_CALL_HEADER_SIZE,
    HGCM_MAX_PARMS,
    HGCM_MAX_USER_PARM,
    HGCM_PARM64_SIZE,
    HGCM_REQ_CANCELLED,
    HGCM_REQ_DONE,
    PAGE_SIZE,
    REQUEST_HEADER_VERSION,
    TIMEOUT_INFINITE,
    USER_HGCM_PARM_TYPES,
    HgcmParmType,
    PageListDirection,
    RequestType,
)
from agent.protocol.status import (
    STATUS_CODES,
    VERR_GENERAL_FAILURE,
    VERR_INVALID_PARAMETER,
    VERR_NOT_FOUND,
    VERR_NOT_IMPLEMENTED,
    VERR_OUT_OF_RANGE,
    VINF_HGCM_ASYNC_EXECUTE,
)
from agent.units import MS_PER_S

if TYPE_CHECKING:
    from agent.host.driver._core import Driver
    from agent.host.driver._session import DriverSession
    from agent.host.memory import GuestMemory

CLIENT_SLOT_BUSY: Final = U32_MAX
CANCEL_GRACE_NOT_FOUND_S: Final = 0.5
"""How long to wait for DONE after a cancel the host could not find (VERR_NOT_FOUND)."""
CANCEL_GRACE_OTHER_S: Final = 2.0
"""How long to wait for DONE after any other failed cancel."""
VERR_SEM_DESTROYED: Final = STATUS_CODES["VERR_SEM_DESTROYED"]
PAGE_LIST_HEADER_SIZE: Final = 8
PAGE_ADDRESS_SIZE: Final = 8
_ONE_PAGE_LIST_SIZE: Final = PAGE_LIST_HEADER_SIZE + PAGE_ADDRESS_SIZE
_EMPTY_BUFFER_LIST_SIZE: Final = _ONE_PAGE_LIST_SIZE
"""What the driver reserves in the request for an empty buffer: a one-page list's size."""
_BUFFER_TYPES: Final[dict[int, int]] = {
    int(HgcmParmType.LINADDR): int(PageListDirection.BOTH),
    int(HgcmParmType.LINADDR_IN): int(PageListDirection.TO_HOST),
    int(HgcmParmType.LINADDR_OUT): int(PageListDirection.FROM_HOST),
}
"""The buffer types and their page lists' directions, as plain ints."""
_P = L.HgcmParameter64
_LINADDR_IN: Final = int(HgcmParmType.LINADDR_IN)
_LINADDR_OUT: Final = int(HgcmParmType.LINADDR_OUT)
_PAGELIST: Final = int(HgcmParmType.PAGELIST)
"""Enum members read once, as plain ints: an enum attribute lookup costs more than what it
is used for, and a comparison of two exact ints is the interpreter's fast one."""
_USER_PARM_TYPES: Final = frozenset(map(int, USER_HGCM_PARM_TYPES))
"""The parameter types a user call may pass, as plain ints and bound here, not imported: a
method call on an imported name is not specialised (see :mod:`agent.host._header_fields`)."""
_CALL_HEADERS: Final = H.picked(
    L.HgcmCallIoctl.hdr_size_in,
    L.HgcmCallIoctl.hdr_size_out,
    L.HgcmCallIoctl.client_id,
    L.HgcmCallIoctl.function,
    L.HgcmCallIoctl.timeout_ms,
    L.HgcmCallIoctl.parm_count,
)
"""The members of the ioctl header and of the call the checks read (sizes, client, function,
timeout, count), in one unpack once the buffer is known to hold them."""
_CALL_REQUEST: Final = L.run(
    L.HgcmCallRequest.flags,
    L.HgcmCallRequest.result,
    L.HgcmCallRequest.client_id,
    L.HgcmCallRequest.function,
    L.HgcmCallRequest.parm_count,
)
"""The HGCM call request after its request header: flags, result, client, function, count."""
_RC_FLAGS_RESULT: Final = struct.Struct(
    H.REQUEST_RC.format
    + f"{H.HGCM_FLAGS_AT - H.REQUEST_RC_AT - H.REQUEST_RC.size}x"
    + L.run(L.HgcmRequestHeader.flags, L.HgcmRequestHeader.result).codec.format.lstrip("<")
)
"""A request's ``rc``, then (past the header's last two members) its HGCM flags and result."""
_BUFFER_PARM: Final = L.run(_P.type, _P.pointer_size, _P.pointer_linear_addr).codec
"""A parameter (at offset 0 of its 16 bytes) as a buffer: type, size, address."""
_PARM_ARRAYS: Final = tuple(
    struct.Struct("<" + _BUFFER_PARM.format.lstrip("<") * count)
    for count in range(HGCM_MAX_PARMS + 1)
)
"""Arrays of 0..32 parameters, each read as a buffer (a value's bytes fill the same words)."""
_REQUEST_PARMS_AT: Final = L.HgcmCallRequest.size
"""Where the VMMDev request's parameters start."""
_UNION_FILL: Final = 0xAAAAAAAA << 32
"""A page list's parameter is packed as a buffer's (type, size, address word): its offset
fills the low half of the address word, and the union's last word, the high half, stays
as ``vbg_req_alloc`` filled it (four bytes 0xAA)."""


_IN_PAGE: Final = PAGE_SIZE - 1
"""The mask of an address's offset in its page."""
_FILL: Final = bytearray((FILL_BYTE,))
"""What ``vbg_req_alloc`` fills a new request with, a byte to repeat (never changed)."""


class _Outcome(enum.Enum):
    DONE = enum.auto()
    CANCELLED = enum.auto()
    LEAKED = enum.auto()


# --- connect / disconnect ----------------------------------------------------------------------


async def connect(
    drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> None:
    """Connect to a host service; ``hdr.rc`` carries the host's answer (-2900 if unknown).

    The slot taken first is given back on every failure, an errno (ENODEV: the device was
    lost meanwhile) as well as a refusal in ``hdr.rc``, as ``vbg_ioctl_hgcm_connect`` does.
    """
    del memory
    check_sizes(kbuf, L.HgcmConnectIoctl.size, L.HgcmConnectIoctl.client_id.end)
    async with drv.session_mutex:
        try:
            slot = session.hgcm_client_ids.index(0)
        except ValueError:
            raise fail(errno.EMFILE) from None
        session.hgcm_client_ids[slot] = CLIENT_SLOT_BUSY
    client_id = 0
    try:
        status, client_id = await host_connect(drv, kbuf, session.requestor)
    finally:  # the new client, or a free slot whatever failed (``mutex_lock`` is not interruptible)
        with trio.CancelScope(shield=True):
            async with drv.session_mutex:
                session.hgcm_client_ids[slot] = client_id
    L.IoctlHeader.rc.set(kbuf, status)
    L.HgcmConnectIoctl.client_id.set(kbuf, client_id)


async def host_connect(drv: Driver, kbuf: bytearray, requestor: int) -> tuple[int, int]:
    """``vbg_hgcm_connect`` to the location the connect ioctl ``kbuf`` names (copied as it is):
    return the host's status and the client id (0 unless connected)."""
    req = drv.alloc_request(RequestType.HGCM_CONNECT, L.HgcmConnectRequest.size, requestor)
    L.HgcmConnectRequest.flags.set(req, 0)
    loc_at = L.HgcmConnectRequest.loc_type.offset
    src_at = L.HgcmConnectIoctl.loc_type.offset
    req[loc_at : loc_at + L.HgcmServiceLocation.size] = kbuf[
        src_at : src_at + L.HgcmServiceLocation.size
    ]
    L.HgcmConnectRequest.client_id.set(req, 0)
    status = await _perform_uninterruptible(drv, req)
    return status, L.HgcmConnectRequest.client_id.get(req) if status >= 0 else 0


async def disconnect(
    drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> None:
    """Disconnect one of this session's clients.

    Its slot holds ``CLIENT_SLOT_BUSY`` while the host is asked, then is freed, or given the
    client back if the host refused, under an uninterruptible lock (``mutex_lock``; Oracle's
    ``vgdrvIoCtl_HGCMDisconnect`` under its spinlock): a signal meanwhile never leaves the
    slot busy, which would hide a client still connected from the session's close.
    """
    del memory
    check_sizes(kbuf, L.HgcmDisconnectIoctl.size, L.HgcmDisconnectIoctl.client_id.offset)
    client_id = L.HgcmDisconnectIoctl.client_id.get(kbuf)
    if client_id in (0, U32_MAX):
        raise fail(errno.EINVAL)
    async with drv.session_mutex:
        try:
            slot = session.hgcm_client_ids.index(client_id)
        except ValueError:
            raise fail(errno.EINVAL) from None
        session.hgcm_client_ids[slot] = CLIENT_SLOT_BUSY
    status = await host_disconnect(drv, client_id, session.requestor)
    with trio.CancelScope(shield=True):
        async with drv.session_mutex:
            session.hgcm_client_ids[slot] = 0 if status >= 0 else client_id
    L.IoctlHeader.rc.set(kbuf, status)


async def host_disconnect(drv: Driver, client_id: int, requestor: int) -> int:
    """``vbg_hgcm_disconnect``: return the host's status."""
    req = drv.alloc_request(RequestType.HGCM_DISCONNECT, L.HgcmDisconnectRequest.size, requestor)
    L.HgcmDisconnectRequest.flags.set(req, 0)
    L.HgcmDisconnectRequest.client_id.set(req, client_id)
    return await _perform_uninterruptible(drv, req)


async def _perform_uninterruptible(drv: Driver, req: bytearray) -> int:
    """Submit an HGCM request and wait, untimed and uninterruptible, for DONE (ENODEV once
    a VM reset ended the driver's boot)."""
    if drv.lost:
        await lost_port_write()
    phys = drv.ram.map(req)
    try:
        with trio.CancelScope(shield=True):
            await drv.vmmdev.submit(phys)
            rc = L.RequestHeader.rc.get(req)
            if rc == VINF_HGCM_ASYNC_EXECUTE:
                await _wait_done(drv, req)
    finally:
        drv.ram.unmap(phys)
    return L.HgcmRequestHeader.result.get(req) if rc >= 0 else rc


# --- call --------------------------------------------------------------------------------------


class _TooBigError(Exception):
    """A user buffer exceeds VBG_MAX_HGCM_USER_PARM (-E2BIG inside the driver)."""


class _RefusedError(Exception):
    """VMMDev refused the call in its ``rc`` (its result another status), and the driver
    returns that ``rc`` without copying back (Oracle's: ``Driver.refused_call_copied_back``)."""

    def __init__(self, rc: int) -> None:
        super().__init__(rc)
        self.rc = rc


async def call(drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory) -> None:
    """``vbg_ioctl_hgcm_call`` (native 64-bit parameters), checks in the driver's order, then
    ``vbg_hgcm_call``: bounce, build, perform and copy back the call.

    A call VMMDev refuses in the request's ``rc`` is copied back with that ``rc`` as its
    result; on Oracle's driver (``Driver.refused_call_copied_back``) its ``rc`` is the
    status and the caller's parameters and buffers stay as they were, unless the host put
    the same status in the result too (``vbglR0HGCMInternalDoCall`` then takes it as the
    call's own).
    """
    target, timeout_ms, parms, plan = _checked_call(kbuf)
    client_id = target[0]
    if drv.session_mutex.locked:
        async with drv.session_mutex:
            known = client_id in session.hgcm_client_ids
    else:  # a free lock is taken and given back around the look-up without a schedule point
        known = client_id in session.hgcm_client_ids
    if not known:
        raise fail(errno.EINVAL)
    buffers: list[tuple[int, bytearray | None]] = []
    """Per buffer parameter: its place in ``parms``, its bounce buffer to copy back."""
    placed: list[int] = []
    """What sits in guest RAM, to free: the bounce buffers, then the request."""
    ram = drv.ram
    try:
        req = _prepare(
            drv, session, parms, memory, plan=plan, target=target, buffers=buffers, placed=placed
        )
        # vbg_hgcm_do_call's submission, inline (every call passes here): the host
        # completes most calls before the port write returns; only the others wait, in
        # _wait_call, which then owns the request (it frees it unless it leaks it).
        if drv.lost:  # a reset ended the boot while the call waited for the session mutex
            await lost_port_write()
        phys = ram.map(req)
        placed.append(phys)
        vmmdev = drv.vmmdev
        if vmmdev.faults.has_delays:
            await vmmdev.submit(phys)
        else:  # vmmdev.submit, inline without a delay: a coroutine less per call
            vmmdev.process(phys)
        # rc, then DONE (_done, inline) and the result the host wrote before it, in one read.
        rc, flags, status = _RC_FLAGS_RESULT.unpack_from(req, H.REQUEST_RC_AT)
        if rc < 0:  # the request failed
            status = _refused(drv, req, rc, status)
        elif rc == VINF_HGCM_ASYNC_EXECUTE and not flags & HGCM_REQ_DONE:
            placed.pop()
            error = await _wait_call(drv, req, phys, timeout_ms)
            if error:
                raise fail(error)
            status = H.HGCM_RESULT.unpack_from(req, H.HGCM_RESULT_AT)[0]
        _copy_back(kbuf, req, parms, buffers, memory)
    except _TooBigError:
        status = VERR_OUT_OF_RANGE
    except _RefusedError as refused:
        status = refused.rc
    finally:
        # After the copy-back, as vbg_hgcm_call frees the request, then the bounce buffers.
        ram.unmap_all(placed)
    H.IOCTL_RC.pack_into(kbuf, H.IOCTL_RC_AT, status)


def _refused(drv: Driver, req: bytearray, rc: int, result: int) -> int:
    """The status of a call VMMDev refused with ``rc``, its result then ``result``: ``rc``,
    put in the result to be copied back.

    Raises:
        _RefusedError: on Oracle's driver, unless ``result`` is ``rc`` too.
    """
    if result != rc and not drv.refused_call_copied_back:
        raise _RefusedError(rc)
    H.HGCM_RESULT.pack_into(req, H.HGCM_RESULT_AT, rc)
    return rc


def _checked_call(kbuf: bytearray) -> tuple[tuple[int, int], int, tuple[int, ...], _Plan]:
    """The ioctl's own checks, in order; return the target (client, function), the timeout,
    the parameters (each read as a buffer: type, size, address) and their plan."""
    if len(kbuf) < HGCM_CALL_HEADER_SIZE:  # then size_in is below it too
        raise fail(errno.EINVAL)
    size_in, size_out, client_id, function, timeout_ms, count = _CALL_HEADERS.unpack_from(kbuf)
    if size_in < HGCM_CALL_HEADER_SIZE or size_in != size_out:
        raise fail(errno.EINVAL)
    if count > HGCM_MAX_PARMS:
        raise fail(errno.E2BIG)
    if client_id in (0, U32_MAX):
        raise fail(errno.EINVAL)
    needed = HGCM_CALL_HEADER_SIZE + HGCM_PARM64_SIZE * count
    if size_in < needed:
        raise fail(errno.EINVAL)
    H.IOCTL_SIZE_OUT.pack_into(kbuf, H.IOCTL_SIZE_OUT_AT, needed)
    parms = _PARM_ARRAYS[count].unpack_from(kbuf, HGCM_CALL_HEADER_SIZE)
    types = parms[0::3]
    plan = _PLANS.get(types)  # only valid types have a plan
    if plan is None:
        if not _USER_PARM_TYPES.issuperset(types):
            raise fail(errno.EINVAL)
        plan = _plan(types)
    return (client_id, function), timeout_ms, parms, plan


_Plan = tuple[tuple[int, int, int], ...]
"""Per buffer parameter of a call, in order: its place in the parameters' words (its type's),
its type and its page list's direction."""
MAX_PLANS: Final = 256
"""Parameter-type signatures whose plan is remembered: far more than the agent's calls use,
few enough that signatures a client makes up cannot grow the table; others are worked out
each time."""
_PLANS: Final[dict[tuple[int, ...], _Plan]] = {}
"""The plans of the signatures seen, by their parameters' types (all valid)."""


def _plan(types: tuple[int, ...]) -> _Plan:
    """The plan of a call whose parameters have ``types`` (all valid), remembered while
    :data:`MAX_PLANS` are not."""
    plan = tuple(
        (3 * index, kind, _BUFFER_TYPES[kind])
        for index, kind in enumerate(types)
        if kind in _BUFFER_TYPES
    )
    if len(_PLANS) < MAX_PLANS:
        _PLANS[types] = plan
    return plan


def _prepare(
    drv: Driver,
    session: DriverSession,
    parms: tuple[int, ...],
    memory: GuestMemory,
    *,
    plan: _Plan,
    target: tuple[int, int],
    buffers: list[tuple[int, bytearray | None]],
    placed: list[int],
) -> bytearray:
    """``hgcm_call_preprocess`` then ``hgcm_call_init_call``, in one pass over the buffer
    parameters (``plan``) of the call to ``target`` (client id, function); ``buffers``
    gets each buffer parameter's place in ``parms`` and the bounce buffer to copy back
    (None for an empty or LINADDR_IN buffer).

    Per buffer parameter, in parameter order as the driver does: E2BIG over
    ``VBG_MAX_HGCM_USER_PARM``, then the bounce buffer is allocated in guest RAM, then the
    user's bytes are copied in (EFAULT; zeros for LINADDR_OUT); an empty buffer gets no
    bounce buffer and stays a linear address of size 0. The VMMDev request then gets a
    page list per bounce buffer. The request is packed at once, its header (as
    ``vbg_req_alloc`` sets it) to its end: the parameters as the user gave them but for
    the buffers', with a codec for the call's shape (its page lists' lengths). The request
    keeps room for a one-page list per empty buffer, unused at its end, as the driver
    sizes it: ``kvmalloc(0)`` is ``ZERO_SIZE_PTR``, 16 bytes into a page, and
    ``hgcm_call_add_pagelist_size`` counts one page for it.
    """
    count = len(parms) // 3
    words = list(parms)
    """The parameters' words as the request gets them: a buffer's become a page list's."""
    shape = [count]
    lists: list[int] = []
    lists_at = _REQUEST_PARMS_AT + HGCM_PARM64_SIZE * count
    spare = 0
    ram = drv.ram
    for at, kind, direction in plan:  # the buffers: a value goes as the user gave it
        size = words[at + 1]
        if not size:  # an empty buffer: a linear address, 0
            words[at + 2] = 0
            spare += _EMPTY_BUFFER_LIST_SIZE
            buffers.append((at, None))
            continue
        if size > HGCM_MAX_USER_PARM:
            raise _TooBigError
        bounce = bytearray(size)
        phys = ram.map(bounce)
        placed.append(phys)
        if kind == _LINADDR_OUT:
            buffers.append((at, bounce))
        else:
            bounce[:] = memory.read(words[at + 2], size)
            buffers.append((at, None if kind == _LINADDR_IN else bounce))
        words[at] = _PAGELIST
        words[at + 2] = lists_at | _UNION_FILL
        in_page = phys & _IN_PAGE
        pages = (size + in_page + _IN_PAGE) // PAGE_SIZE
        shape.append(pages)
        if pages == 1:
            lists += (direction, in_page, 1, phys - in_page)
            lists_at += _ONE_PAGE_LIST_SIZE
        else:
            first_page = phys - in_page
            lists += (direction, in_page, pages)
            lists += range(first_page, first_page + pages * PAGE_SIZE, PAGE_SIZE)
            lists_at += PAGE_LIST_HEADER_SIZE + PAGE_ADDRESS_SIZE * pages
    # vbg_req_alloc, inline (a call less per call): filled with 0xAA, then packed.
    size = lists_at + spare
    req = _FILL * size
    last = _LAST
    if shape != last.shape:
        last.codec = _request_codec(tuple(shape))
        last.shape = shape
    last.codec.pack_into(
        req, 0, size, REQUEST_HEADER_VERSION, H.HGCM_CALL64, VERR_GENERAL_FAILURE, 0,
        session.requestor, 0, 0, *target, count, *words, *lists,
    )  # fmt: skip
    return req


@functools.lru_cache(maxsize=64)
def _request_codec(shape: tuple[int, ...]) -> struct.Struct:
    """An HGCM call request, its header to its end, for a call of ``shape``: its number of
    parameters, then the pages of each page list."""
    count, *pages = shape
    parts = [H.REQUEST_HEADER.format, _CALL_REQUEST.codec.format.lstrip("<")]
    parts.append(_BUFFER_PARM.format.lstrip("<") * count)
    parts += (L.page_list_codec(length).format.lstrip("<") for length in pages)
    return struct.Struct("".join(parts))


@final
class _LastCodec:
    """The shape :func:`_prepare` last packed and its codec: calls mostly come in runs of
    one shape, and comparing two lists costs less than a tuple and its hash for the cache."""

    __slots__ = ("codec", "shape")

    def __init__(self) -> None:
        self.shape: list[int] = [0]
        self.codec = _request_codec((0,))


_LAST: Final = _LastCodec()


def _copy_back(
    kbuf: bytearray,
    req: bytearray,
    parms: tuple[int, ...],
    buffers: list[tuple[int, bytearray | None]],
    memory: GuestMemory,
) -> None:
    """``hgcm_call_copy_back_result``: values, the host's sizes, and out buffers' bytes.

    The request's parameters are read in one unpack and the user's written in one pack:
    values as the host left them, buffers with the user's type and address and the host's
    size.
    """
    codec = _PARM_ARRAYS[len(parms) // 3]
    result = list(codec.unpack_from(req, _REQUEST_PARMS_AT))
    for at, bounce in buffers:
        result[at] = parms[at]
        address = result[at + 2] = parms[at + 2]
        if bounce is not None:
            size = result[at + 1]
            memory.write(address, bounce if size == len(bounce) else bounce[:size])
    codec.pack_into(kbuf, HGCM_CALL_HEADER_SIZE, *result)


# --- waiting and cancelling ------------------------------------------------------------------


def _done(req: bytearray) -> bool:
    flags: int = H.HGCM_FLAGS.unpack_from(req, H.HGCM_FLAGS_AT)[0]
    return bool(flags & HGCM_REQ_DONE)


async def _wait_done(drv: Driver, req: bytearray) -> None:
    while not _done(req):
        if drv.lost:
            raise fail(errno.ENODEV)
        await drv.hgcm_wq.park()


async def _wait_call(drv: Driver, req: bytearray, phys: int, timeout_ms: int) -> int:
    """The rest of ``vbg_hgcm_do_call`` for a user caller's call at ``phys`` that the host
    did not finish at once: wait for it, then free the request unless it is leaked; return
    0 or an errno.

    The timeout runs from the submission, as the driver's wait does (the caller submitted
    just before).

    A trio cancellation plays the signal: a call already done returns (the wait checks its
    condition before the signal), any other is cancelled at the host, then the cancellation
    propagates, unless the cancel failed and the host completed the call during the grace
    wait: that call returns 0 and its results are copied back, as both drivers do (the
    caller's next checkpoint raises the cancellation). A request whose cancel failed and
    that never completed is leaked, as the kernel does, because the host may still write
    to it.

    The cancel and its grace wait are shielded after a timeout as after a signal: no signal
    ends them (``vbg_hgcm_do_call``'s grace is ``wait_event_timeout``, Oracle's
    ``vbglR0HGCMInternalDoCall`` polls with ``RTThreadSleep``), so a call the host completes
    in the grace returns 0 with its results, and a signal that came meanwhile is the
    caller's next checkpoint's.
    """
    leaked = False
    try:
        deadline = (
            math.inf
            if timeout_ms == TIMEOUT_INFINITE
            else trio.current_time() + timeout_ms / MS_PER_S
        )
        try:
            with trio.move_on_at(deadline):
                await _wait_done(drv, req)
        except trio.Cancelled:
            if _done(req):
                return 0
            with trio.CancelScope(shield=True):
                outcome = await _cancel(drv, req, phys)
            leaked = outcome is _Outcome.LEAKED
            if outcome is not _Outcome.DONE:
                raise
            return 0  # the host finished it in the grace: a completed call
        if _done(req):
            return 0
        with trio.CancelScope(shield=True):
            outcome = await _cancel(drv, req, phys)
        leaked = outcome is _Outcome.LEAKED
        return 0 if outcome is _Outcome.DONE else errno.ETIMEDOUT
    finally:
        if not leaked:
            drv.ram.unmap(phys)


async def _cancel(drv: Driver, req: bytearray, phys: int) -> _Outcome:
    """``hgcm_cancel_call`` plus the grace wait for a call the host could not cancel.

    Mainline sends a CANCEL2 the host does not implement again as the legacy HGCM_CANCEL;
    Oracle's ``vbglR0HGCMInternalDoCall`` sends CANCEL2 only (``Driver.legacy_cancel``), so
    there that refusal, like any but VERR_NOT_FOUND and VERR_SEM_DESTROYED, means the 2 s
    grace, then the leak: the host goes on holding the call.
    """
    async with drv.cancel_req_mutex:
        cancel = drv.cancel_req
        L.HgcmCancel2Request.phys_req_to_cancel.set(cancel, phys)
        rc = await drv.perform(cancel)
        if rc == VERR_NOT_IMPLEMENTED and drv.legacy_cancel:
            flags = L.HgcmRequestHeader.flags.get(req) | HGCM_REQ_CANCELLED
            L.HgcmRequestHeader.flags.set(req, flags)
            L.RequestHeader.request_type.set(req, RequestType.HGCM_CANCEL)
            if drv.lost:
                await lost_port_write()
            await drv.vmmdev.submit(phys)
            rc = L.RequestHeader.rc.get(req)
            rc = VERR_NOT_FOUND if rc == VERR_INVALID_PARAMETER else rc
    if rc >= 0:
        flags = L.HgcmRequestHeader.flags.get(req) | HGCM_REQ_CANCELLED
        L.HgcmRequestHeader.flags.set(req, flags)
        return _Outcome.CANCELLED
    grace = (
        CANCEL_GRACE_NOT_FOUND_S
        if rc in (VERR_NOT_FOUND, VERR_SEM_DESTROYED)
        else CANCEL_GRACE_OTHER_S
    )
    with trio.move_on_after(grace):
        await _wait_done(drv, req)
    return _Outcome.DONE if _done(req) else _Outcome.LEAKED
