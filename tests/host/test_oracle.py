"""Tests of the Oracle driver personality: its error convention, events, policy and balloon.

Rules of this test module:

- A running ``SimulatedHost(personality="oracle")`` (fixture ``host``), driven through
  ``SimTransport`` with encoded ``agent.protocol`` requests.
- Balloon chunks are plain user addresses: the simulated driver "locks" them by giving the
  host distinct guest pages of its own.
- Timing uses ``autojump_clock`` where the host must act in the background.
"""

from __future__ import annotations

import errno
from functools import partial
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from agent.host import SimulatedHost
from agent.host.driver import _oracle
from agent.host.driver._load import MOUSE_STATUS_SIZE
from agent.host.driver._request_sizes import REQUEST_SIZES, check_request_size
from agent.host.driver._session import session_requestor
from agent.host.driver._util import U32_MAX
from agent.host.driver.oracle import OracleDriver
from agent.host.memory import IoctlMemory
from agent.protocol import (
    AcquireGuestCapabilities,
    ChangeBalloon,
    ChangeBalloonProbe,
    ChangeFilterMask,
    ChangeGuestCapabilities,
    CheckBalloon,
    DriverVersionInfo,
    HgcmBuffer,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCall,
    HgcmConnect,
    HgcmDisconnect,
    HgcmU32,
    InterruptAllWaits,
    Log,
    VBoxStatusError,
    WaitForEvents,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol._ioc import ioc, iowr
from agent.protocol.constants import (
    HEADER_SIZE,
    HGCM_CALL_HEADER_SIZE,
    HGCM_MAX_USER_PARM,
    HGCM_PARM64_SIZE,
    IOCTL_HDR_VERSION,
    IOCTL_TYPE,
    REQUESTOR_KERNEL,
    TIMEOUT_INFINITE,
    Event,
    Facility,
    GuestCapability,
    HgcmParmType,
    Ioctl,
    Requestor,
    RequestType,
)
from agent.protocol.messages import _VmmdevRequest, ioctl_buffer
from agent.protocol.status import (
    STATUS_CODES,
    VERR_ALREADY_EXISTS,
    VERR_BUFFER_OVERFLOW,
    VERR_GENERAL_FAILURE,
    VERR_HGCM_SERVICE_NOT_FOUND,
    VERR_HGCM_TOO_MANY_CLIENT_CALLS,
    VERR_INTERRUPTED,
    VERR_INVALID_PARAMETER,
    VERR_NOT_FOUND,
    VERR_NOT_IMPLEMENTED,
    VERR_NOT_SUPPORTED,
    VERR_OUT_OF_RANGE,
    VERR_PERMISSION_DENIED,
    VERR_TIMEOUT,
    VERR_VERSION_MISMATCH,
    VINF_SUCCESS,
)
from tests.host.conftest import (
    ECHO,
    FN_ECHO,
    FN_FAIL,
    FN_HOLD,
    Client,
    EchoService,
    cancel_while_the_table_is_locked,
    model_driver,
    open_client,
    signal_in_the_grace_after_a_timeout,
    until,
    vmmdev_request,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from agent.protocol import HgcmReply, IoctlCall

PERSONALITY: Final = "oracle"
CHUNK: Final = 0x7F00_1000_0000
MIB: Final = 1 << 20


VERR_INVALID_HANDLE: Final = STATUS_CODES["VERR_INVALID_HANDLE"]
VERR_IO_BAD_LENGTH: Final = STATUS_CODES["VERR_IO_BAD_LENGTH"]
VERR_TOO_MANY_OPEN_FILES: Final = STATUS_CODES["VERR_TOO_MANY_OPEN_FILES"]
VERR_WRONG_ORDER: Final = STATUS_CODES["VERR_WRONG_ORDER"]
UNTOUCHED: Final = 0x5A
"""Filler of buffers whose bytes must come back unchanged."""


async def status_of(coro: object) -> int:
    """Await a request expected to fail with a VBox status and return it."""
    with pytest.raises(VBoxStatusError) as info:
        await coro  # type: ignore[misc]
    return info.value.rc


async def expect_einval(client: Client, code: int, buffer: bytearray) -> None:
    """The ioctl fails with EINVAL and copies nothing back."""
    before = bytes(buffer)
    with pytest.raises(OSError, match=r".") as info:
        await client.raw(code, buffer)
    assert info.value.errno == errno.EINVAL
    assert bytes(buffer) == before


async def wait_raw(client: Client, mask: int, timeout_ms: int) -> tuple[int, int]:
    """WAIT_FOR_EVENTS by hand; return ``(hdr.rc, events)`` (the ioctl itself succeeds)."""
    call = WaitForEvents(mask, timeout_ms=timeout_ms).encode()
    await client.raw(call.code, call.buffer)
    return L.IoctlHeader.rc.get(call.buffer), L.WaitForEventsIoctl.events_out.get(call.buffer)


class _BeforeStep(trio.abc.Instrument):
    """Run ``action`` once, just before ``task``'s next step (an ISR between a signal and
    the thread it woke)."""

    def __init__(self, task: trio.lowlevel.Task, action: Callable[[], object]) -> None:
        self.task = task
        self.action = action

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        """Act before ``task``'s step, then leave the run."""
        if task is self.task:
            trio.lowlevel.remove_instrument(self)
            self.action()


def _only_child(nursery: trio.Nursery) -> trio.lowlevel.Task:
    (task,) = nursery.child_tasks
    return task


def _guest_call_task() -> trio.lowlevel.Task:
    """The system task a slow host's call runs in (``SimTransport``, ``_GuestCall``)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    (task,) = (
        task
        for nursery in root.child_nurseries
        for task in nursery.child_tasks
        if task.name.endswith("._GuestCall._run")
    )
    return task


async def call_rc(client: Client, call: IoctlCall[HgcmReply]) -> int:
    """Perform an HGCM call ioctl (with its user buffers) and return ``hdr.rc``."""
    await client.transport.ioctl(call.code, call.buffer, call.user_buffers)
    return L.IoctlHeader.rc.get(call.buffer)


def oversized(call: IoctlCall[HgcmReply], index: int, kind: int = HgcmParmType.LINADDR_IN) -> None:
    """Make parameter ``index`` of an encoded call a ``kind`` parameter of 24 MiB + 1."""
    view = memoryview(call.buffer)[HGCM_CALL_HEADER_SIZE + HGCM_PARM64_SIZE * index :]
    L.HgcmParameter64.type.set(view, kind)
    L.HgcmParameter64.pointer_size.set(view, HGCM_MAX_USER_PARM + 1)


async def passthrough(client: Client, request_type: int, size: int = 32) -> bytearray:
    """Send a zeroed VMMDev request of ``request_type`` through VMMDEV_REQUEST."""
    buf = vmmdev_request(request_type, size)
    L.RequestHeader.reserved1.set(buf, size)
    code = Ioctl.vmmdev_request(size) if size < 1024 else Ioctl.VMMDEV_REQUEST_BIG
    return await client.raw(code, buf)


def _record_requestors(host: SimulatedHost, *types: int) -> list[tuple[int, int]]:
    """Record the type and requestor of the requests of ``types`` the host gets from now on."""
    seen: list[tuple[int, int]] = []
    process = host.vmmdev.process

    def record(phys: int) -> None:
        header = bytearray(host.vmmdev.memory.read(phys, HEADER_SIZE))
        request_type = L.RequestHeader.request_type.get(header)
        if request_type in types:
            seen.append((request_type, L.RequestHeader.requestor.get(header)))
        process(phys)

    host.vmmdev.process = record  # type: ignore[method-assign]
    return seen


NIL_PHYS: Final = (1 << 64) - 1
"""``NIL_RTHCPHYS``, what ``RTR0MemObjGetPagePhysAddr`` gives for a NIL object's pages."""
_FIRST_PAGE_AT: Final = L.MemBalloonChangeRequest.phys_page.offset


def _first_pages_by_chunk(host: SimulatedHost) -> dict[int, int]:
    """Each user chunk the oracle driver holds: its address -> its first page."""
    driver = model_driver(host)
    assert isinstance(driver, OracleDriver)
    return dict(driver.chunks)


def _record_first_pages(host: SimulatedHost) -> list[int]:
    """Record the first page of each CHANGE_MEMBALLOON the host gets from now on."""
    seen: list[int] = []
    process = host.vmmdev.process

    def record(phys: int) -> None:
        header = host.vmmdev.memory.read(phys, HEADER_SIZE)
        if L.RequestHeader.request_type.get(header) == RequestType.CHANGE_MEMBALLOON:
            page = host.vmmdev.memory.read(phys + _FIRST_PAGE_AT, 8)
            seen.append(int.from_bytes(page, "little"))
        process(phys)

    host.vmmdev.process = record  # type: ignore[method-assign]
    return seen


class TestHeaderRc:
    """Handlers report failures in hdr.rc with the ioctl succeeding; malformed calls are EINVAL."""

    async def test_handler_failure_is_in_rc(self, host: SimulatedHost) -> None:
        """A bad filter mask is VERR_INVALID_PARAMETER in hdr.rc, not an errno."""
        client = await open_client(host)
        call = ChangeFilterMask(0, 0).encode()
        L.ChangeFilterIoctl.or_mask.set(call.buffer, 1 << 31)
        await client.raw(call.code, call.buffer)
        assert L.IoctlHeader.rc.get(call.buffer) == VERR_INVALID_PARAMETER

    async def test_wrong_sizes_are_einval(self, host: SimulatedHost) -> None:
        """REQ_CHECK_SIZES failures make the entry return EINVAL, buffer untouched."""
        client = await open_client(host)
        call = WaitForEvents(Event.MOUSE_CAPABILITIES_CHANGED).encode()
        L.IoctlHeader.size_out.set(call.buffer, 32)
        await expect_einval(client, call.code, call.buffer)
        change = ChangeFilterMask(Event.HGCM, 0).encode()
        L.IoctlHeader.size_out.set(change.buffer, 32)
        await expect_einval(client, change.code, change.buffer)

    @pytest.mark.parametrize("code", [0xC018_5699, 0xC018_5614])
    async def test_unknown_ioctls_are_einval(self, host: SimulatedHost, code: int) -> None:
        """Unknown functions (VERR_NOT_SUPPORTED inside) fail with EINVAL, not ENOTTY."""
        client = await open_client(host)
        buf = bytearray([UNTOUCHED]) * HEADER_SIZE
        L.IoctlHeader.size_in.set(buf, HEADER_SIZE)
        L.IoctlHeader.version.set(buf, 0x10001)
        L.IoctlHeader.size_out.set(buf, HEADER_SIZE)
        L.IoctlHeader.type.set(buf, 0)
        await expect_einval(client, code, buf)

    async def test_version_mismatch_fills_the_reply(self, host: SimulatedHost) -> None:
        """A foreign major version is VERR_VERSION_MISMATCH in rc with the driver's version."""
        client = await open_client(host)
        call = DriverVersionInfo(req_version=0x0002_0000, min_version=0x0002_0000).encode()
        await client.raw(call.code, call.buffer)
        assert L.IoctlHeader.rc.get(call.buffer) == VERR_VERSION_MISMATCH
        assert L.DriverVersionInfo.session_version.get(call.buffer) == 0xFFFF_FFFF
        assert L.DriverVersionInfo.driver_version.get(call.buffer) == 0x0001_0000
        call = DriverVersionInfo(req_version=0x0001_0000, min_version=0x0001_0001).encode()
        await client.raw(call.code, call.buffer)
        assert L.IoctlHeader.rc.get(call.buffer) == VERR_INVALID_PARAMETER

    async def test_hgcm_failures_are_statuses(self, host: SimulatedHost) -> None:
        """Unknown client ids are VERR_INVALID_HANDLE; the 65th client VERR_TOO_MANY_OPEN_FILES."""
        client = await open_client(host)
        for _ in range(64):
            await client.request(HgcmConnect(ECHO))
        connect = HgcmConnect(ECHO).encode()
        await client.raw(connect.code, connect.buffer)
        assert L.IoctlHeader.rc.get(connect.buffer) == VERR_TOO_MANY_OPEN_FILES
        disconnect = HgcmDisconnect(0x7777).encode()
        await client.raw(disconnect.code, disconnect.buffer)
        assert L.IoctlHeader.rc.get(disconnect.buffer) == VERR_INVALID_HANDLE
        call = HgcmCall(0x7777, FN_ECHO, (HgcmU32(0),)).encode()
        await client.raw(call.code, call.buffer)
        assert L.IoctlHeader.rc.get(call.buffer) == VERR_INVALID_HANDLE

    async def test_the_65th_client_is_connected_then_dropped(
        self, host: SimulatedHost, echo: EchoService
    ) -> None:
        """``vgdrvIoCtl_HGCMConnect`` connects at the host before it looks for a free slot:
        with none left the new client is disconnected again as the session
        (VERR_TOO_MANY_OPEN_FILES, id 0), and a connect the host refuses answers with the
        host's status."""
        client = await open_client(host, uid=1000)
        for _ in range(64):
            await client.request(HgcmConnect(ECHO))
        disconnects = _record_requestors(host, RequestType.HGCM_DISCONNECT)
        connect = HgcmConnect(ECHO).encode()
        await client.raw(connect.code, connect.buffer)
        assert L.IoctlHeader.rc.get(connect.buffer) == VERR_TOO_MANY_OPEN_FILES
        assert L.HgcmConnectIoctl.client_id.get(connect.buffer) == 0
        assert len(echo.connected) == 65
        assert echo.disconnected == echo.connected[-1:]
        caller = Requestor.USERMODE | Requestor.USR_USER  # the session's, not the kernel's
        assert disconnects == [(RequestType.HGCM_DISCONNECT, caller)]
        assert host.status()["hgcm_clients"] == 64
        unknown = HgcmConnect("NoSuchSvc").encode()
        await client.raw(unknown.code, unknown.buffer)
        assert L.IoctlHeader.rc.get(unknown.buffer) == VERR_HGCM_SERVICE_NOT_FOUND

    async def test_client_id_zero_matches_a_free_slot(self, host: SimulatedHost) -> None:
        """The driver looks an id up in the session's table, where a free slot holds 0: while
        one is free, client 0 passes that check and is refused further on
        (VERR_INVALID_PARAMETER: ``VbglR0HGCMInternalDisconnect`` before any request, the
        host for a call); with the table full it is an invalid handle like any unknown id."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id

        async def statuses() -> tuple[int, int]:
            disconnect = HgcmDisconnect(client_id).encode()
            L.HgcmDisconnectIoctl.client_id.set(disconnect.buffer, 0)
            await client.raw(disconnect.code, disconnect.buffer)
            call = HgcmCall(client_id, FN_ECHO, (HgcmU32(0),)).encode()
            L.HgcmCallIoctl.client_id.set(call.buffer, 0)
            await client.raw(call.code, call.buffer)
            return L.IoctlHeader.rc.get(disconnect.buffer), L.IoctlHeader.rc.get(call.buffer)

        assert await statuses() == (VERR_INVALID_PARAMETER, VERR_INVALID_PARAMETER)
        assert host.status()["hgcm_clients"] == 1
        for _ in range(63):
            await client.request(HgcmConnect(ECHO))
        assert await statuses() == (VERR_INVALID_HANDLE, VERR_INVALID_HANDLE)

    async def test_a_user_call_locks_at_most_ten_buffers(self, host: SimulatedHost) -> None:
        """``VbglR0HGCMInternalPreprocessCall`` walks the parameters once, in order: ten
        non-empty buffers pass (empty ones do not count), the eleventh is
        VERR_INVALID_PARAMETER before its size is looked at, and a buffer over 24 MiB, or a
        type userspace may not pass, fails where it stands (mainline checks every type first)."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        succeed = HgcmU32(VINF_SUCCESS)
        ten = (HgcmBufferIn(b"x"),) * 10
        empty = (HgcmBufferIn(b""), HgcmBufferOut(0))
        passes = HgcmCall(client_id, FN_FAIL, (succeed, *ten, *empty)).encode()
        assert await call_rc(client, passes) == VINF_SUCCESS
        eleven = HgcmCall(client_id, FN_FAIL, (succeed, *ten, HgcmBufferIn(b"x"))).encode()
        assert await call_rc(client, eleven) == VERR_INVALID_PARAMETER
        late = HgcmCall(client_id, FN_FAIL, (succeed, *ten, HgcmU32(0))).encode()
        oversized(late, 11)
        assert await call_rc(client, late) == VERR_INVALID_PARAMETER
        early = HgcmCall(client_id, FN_FAIL, (succeed, HgcmU32(0), *ten)).encode()
        oversized(early, 1)
        assert await call_rc(client, early) == VERR_OUT_OF_RANGE
        before_a_bad_type = HgcmCall(client_id, FN_FAIL, (succeed, HgcmU32(0), HgcmU32(0))).encode()
        oversized(before_a_bad_type, 1)
        oversized(before_a_bad_type, 2, HgcmParmType.PAGELIST)
        assert await call_rc(client, before_a_bad_type) == VERR_OUT_OF_RANGE
        after_a_bad_type = HgcmCall(client_id, FN_FAIL, (succeed, HgcmU32(0), HgcmU32(0))).encode()
        oversized(after_a_bad_type, 1, HgcmParmType.PAGELIST)
        oversized(after_a_bad_type, 2)
        assert await call_rc(client, after_a_bad_type) == VERR_INVALID_PARAMETER

    async def test_a_32_bit_call_is_refused_to_user_callers(
        self, host: SimulatedHost, echo: EchoService
    ) -> None:
        """A 64-bit build dispatches HGCM_CALL_32 (``_IOC_NR`` 6) as HGCM_CALL with 12-byte
        parameters (``vgdrvIoCtl_HGCMCallInner`` with ``f32bit``): the count, the buffer's
        room for them (``size_out`` becomes their size) and the client are checked, then
        ``VbglR0HGCMInternalCall32`` refuses a user caller (VERR_WRONG_ORDER), all in
        ``hdr.rc`` with the ioctl returning 0; nothing reaches the host. A header too short
        for a call is EINVAL."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        seen = _record_requestors(host, RequestType.HGCM_CALL32, RequestType.HGCM_CALL64)

        async def call32(target: int, count: int, size: int) -> tuple[int, int]:
            buf = bytearray([UNTOUCHED]) * size
            L.IoctlHeader.size_in.set(buf, size)
            L.IoctlHeader.version.set(buf, IOCTL_HDR_VERSION)
            L.IoctlHeader.type.set(buf, 0)
            L.IoctlHeader.size_out.set(buf, size)
            L.HgcmCallIoctl.client_id.set(buf, target)
            L.HgcmCallIoctl.parm_count.set(buf, count)
            await client.raw(Ioctl.hgcm_call_32(size), buf)
            return L.IoctlHeader.rc.get(buf), L.IoctlHeader.size_out.get(buf)

        two = HGCM_CALL_HEADER_SIZE + 2 * L.HgcmParameter32.size  # too short for two of 16 bytes
        assert await call32(client_id, 2, two) == (VERR_WRONG_ORDER, two)
        assert await call32(0x7777, 2, two) == (VERR_INVALID_HANDLE, two)
        assert await call32(client_id, 3, two) == (VERR_INVALID_PARAMETER, two)
        assert (await call32(client_id, 33, two))[0] == VERR_INVALID_PARAMETER
        assert (seen, echo.held, echo.cancelled) == ([], [], [])
        header_only = ioctl_buffer(HEADER_SIZE, HEADER_SIZE)
        await expect_einval(client, Ioctl.hgcm_call_32(HEADER_SIZE), header_only)

    async def test_a_call_vmmdev_refuses_leaves_the_callers_buffers(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """A call VMMDev refuses in the request's ``rc`` (the service's pending-call limit;
        the result stays VINF_SUCCESS): ``vbglR0HGCMInternalDoCall`` returns that ``rc``, so
        ``VbglR0HGCMInternalCall`` copies nothing back; it is ``hdr.rc``, and the caller's
        buffers are as it left them (mainline copies the bounce buffers back, zeros for an
        out buffer)."""
        echo.max_calls = 2  # room for one pending call
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.request, HgcmCall(client_id, FN_HOLD, ()))
                await until(lambda: bool(echo.held))
                parms = (HgcmBufferIn(b"abc"), HgcmBufferOut(8), HgcmU32(7), HgcmBuffer(b"both"))
                call = HgcmCall(client_id, FN_ECHO, parms).encode()
                out, both = call.user_buffers[1].data, call.user_buffers[2].data
                out[:] = bytes([UNTOUCHED]) * len(out)
                assert await call_rc(client, call) == VERR_HGCM_TOO_MANY_CLIENT_CALLS
                assert (bytes(out), bytes(both)) == (bytes([UNTOUCHED]) * 8, b"both")
                echo.held.pop().complete(VINF_SUCCESS)


class TestHgcmAndSignals:
    """What a signal (the caller's cancellation) does to HGCM ioctls."""

    async def test_a_signal_ends_a_held_call_with_verr_interrupted_in_the_header(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """The signal ends a held call's wait: the driver cancels the call at the host and
        ``vbglR0HGCMInternalDoCall`` returns VERR_INTERRUPTED, which ``VGDrvCommonIoCtl``
        stores in ``hdr.rc``: the ioctl returns 0, the header copied back, and the caller's
        next checkpoint raises."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        call = HgcmCall(client_id, FN_HOLD, (HgcmU32(1),)).encode()
        statuses: list[int] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def held() -> None:
                    statuses.append(await call_rc(client, call))
                    await trio.lowlevel.checkpoint()
                    pytest.fail("the cancellation did not surface at the next checkpoint")

                nursery.start_soon(held)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        assert statuses == [VERR_INTERRUPTED]
        assert (len(echo.cancelled), echo.held) == (1, [])

    async def test_a_signal_in_the_grace_after_a_timeout_does_not_end_it(self) -> None:
        """After a call's timeout, a cancel the host cannot find (VERR_NOT_FOUND) is followed
        by ``vbglR0HGCMInternalDoCall``'s grace, a poll with ``RTThreadSleep`` that no signal
        ends: a call the host completes in it returns its reply."""
        echo = EchoService(max_calls=16)
        host = SimulatedHost(personality=PERSONALITY, services=[echo])
        reply = await signal_in_the_grace_after_a_timeout(host, echo)
        assert reply is not None, "the signal ended the grace wait"
        assert (reply.status, reply.params) == (VINF_SUCCESS, (HgcmU32(77),))

    async def test_a_connect_cancelled_while_the_table_is_locked_is_the_sessions(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """``vgdrvIoCtl_HGCMConnect`` stores the client the host connected in the session's
        table under a spinlock, which no signal interrupts: a connect cancelled while
        another task holds the table is the session's all the same, and the session's
        close disconnects it."""
        client = await open_client(host)
        with trio.fail_after(60):
            await cancel_while_the_table_is_locked(
                host, RequestType.HGCM_CONNECT, partial(client.request, HgcmConnect(ECHO))
            )
            [client_id] = echo.connected
            assert client_id in client.transport.session.hgcm_client_ids
            await client.transport.aclose()
        assert echo.disconnected == [client_id]

    async def test_a_refused_disconnect_cancelled_while_the_table_is_locked_keeps_its_client(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """``vgdrvIoCtl_HGCMDisconnect`` gives a client the host did not disconnect its slot
        back under the spinlock: cancelled while another task holds the table, the client is
        still the session's, and the session's close disconnects it."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        host.add_fault(RequestType.HGCM_DISCONNECT, VERR_GENERAL_FAILURE)
        with trio.fail_after(60):
            await cancel_while_the_table_is_locked(
                host,
                RequestType.HGCM_DISCONNECT,
                partial(client.request, HgcmDisconnect(client_id)),
            )
            assert echo.disconnected == []
            assert client_id in client.transport.session.hgcm_client_ids
            await client.transport.aclose()
        assert echo.disconnected == [client_id]

    @pytest.mark.parametrize(
        ("timeout_ms", "waited", "status"),
        [(100, 0.1, VERR_TIMEOUT), (TIMEOUT_INFINITE, 0.0, VERR_INTERRUPTED)],
        ids=["timeout", "signal"],
    )
    async def test_a_cancel2_the_host_does_not_implement_leaks_the_call(
        self,
        host: SimulatedHost,
        echo: EchoService,
        autojump_clock: object,
        *,
        timeout_ms: int,
        waited: float,
        status: int,
    ) -> None:
        """``vbglR0HGCMInternalDoCall`` sends CANCEL2 only (mainline sends a legacy
        HGCM_CANCEL after VERR_NOT_IMPLEMENTED): that refusal is followed by its 2 s poll for
        DONE, then the request is leaked and the wait's status returned, VERR_TIMEOUT after
        the timeout, VERR_INTERRUPTED after a signal. The host still holds the call, and its
        completion later lands in the leaked request."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        cancels = _record_requestors(host, RequestType.HGCM_CANCEL2, RequestType.HGCM_CANCEL)
        call = HgcmCall(client_id, FN_HOLD, (HgcmU32(1),), timeout_ms=timeout_ms).encode()
        statuses: list[int] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def held() -> None:
                    statuses.append(await call_rc(client, call))
                    nursery.cancel_scope.cancel()

                start = trio.current_time()
                nursery.start_soon(held)
                await trio.testing.wait_all_tasks_blocked()
                assert len(echo.held) == 1
                host.add_fault(RequestType.HGCM_CANCEL2, VERR_NOT_IMPLEMENTED)
                if timeout_ms == TIMEOUT_INFINITE:
                    nursery.cancel_scope.cancel()  # the signal
            took = trio.current_time() - start
        assert statuses == [status]
        assert took == pytest.approx(waited + 2.0, abs=1e-9)
        assert [request_type for request_type, _ in cancels] == [RequestType.HGCM_CANCEL2]
        assert (echo.cancelled, len(echo.held), host.vmmdev.hgcm.pending_calls) == ([], 1, 1)
        echo.held.pop().complete(VINF_SUCCESS)
        assert host.vmmdev.hgcm.pending_calls == 0


class TestLog:
    """``vgdrvIoCtl_Log``: LogRel for trusted sessions, the debug-only Log for vboxuser."""

    async def test_trusted_messages_reach_the_kernel_log(self, host: SimulatedHost) -> None:
        """A /dev/vboxguest session's message goes to the release log (printk)."""
        client = await open_client(host)
        await client.request(Log(b"hello\0ignored"))
        assert list(model_driver(host).log_messages) == [b"hello"]

    async def test_vboxuser_messages_go_nowhere(self, host: SimulatedHost) -> None:
        """A /dev/vboxuser session's message succeeds, but the release build drops it."""
        client = await open_client(host, user_device=True)
        await client.request(Log(b"hello"))
        assert list(model_driver(host).log_messages) == []

    async def test_any_code_numbered_9_is_log(self, host: SimulatedHost) -> None:
        """``VBGL_IOCTL_CODE_STRIPPED`` is ``_IOC_NR``: a LOG number's direction, type and size
        (one that matches the buffer) do not matter."""
        client = await open_client(host)
        for code in (ioc(0, "V", 9, 30), ioc(2, "W", 9, 30), ioc(3, "V", 9, 0)):
            buf = ioctl_buffer(30, HEADER_SIZE)
            buf[HEADER_SIZE:] = b"hello\0"
            await client.raw(code, buf)
            assert L.IoctlHeader.rc.get(buf) == VINF_SUCCESS
        assert list(model_driver(host).log_messages) == [b"hello"] * 3


SET_MOUSE_STATUS: Final = iowr(IOCTL_TYPE, 15, 28)
"""``VBGL_IOCTL_SET_MOUSE_STATUS``: a u32 of VMMDEV_MOUSE_* flags after the header."""
CAN_ABSOLUTE: Final = 0x01
SEAMLESS: Final = int(GuestCapability.SEAMLESS)
GRAPHICS: Final = int(GuestCapability.GRAPHICS)
VERR_RESOURCE_BUSY: Final = STATUS_CODES["VERR_RESOURCE_BUSY"]
NEW_PROTOCOL: Final = 0x10


async def set_mouse_status(client: Client, features: int) -> int:
    """VBGL_IOCTL_SET_MOUSE_STATUS by hand; return ``hdr.rc``."""
    buf = ioctl_buffer(28, HEADER_SIZE)
    buf[HEADER_SIZE:28] = features.to_bytes(4, "little")
    await client.raw(SET_MOUSE_STATUS, buf)
    return L.IoctlHeader.rc.get(buf)


class TestMouseStatus:
    """``vgdrvIoCtl_SetMouseStatus``: each session's mouse features, their union on the host."""

    async def test_sessions_features_are_united(self, host: SimulatedHost) -> None:
        """The host gets the union of the sessions' features; a close drops the session's."""
        first, second = await open_client(host), await open_client(host, user_device=True)
        assert await set_mouse_status(first, CAN_ABSOLUTE) == VINF_SUCCESS
        assert await set_mouse_status(second, NEW_PROTOCOL) == VINF_SUCCESS
        assert host.vmmdev.guest.mouse_features == CAN_ABSOLUTE | NEW_PROTOCOL
        await first.transport.aclose()
        assert host.vmmdev.guest.mouse_features == NEW_PROTOCOL
        assert await set_mouse_status(second, 0) == VINF_SUCCESS
        assert host.vmmdev.guest.mouse_features == 0

    async def test_host_only_features_are_invalid(self, host: SimulatedHost) -> None:
        """Bits outside VMMDEV_MOUSE_GUEST_MASK are VERR_INVALID_PARAMETER in hdr.rc."""
        client = await open_client(host)
        assert await set_mouse_status(client, 0x2) == VERR_INVALID_PARAMETER
        assert host.vmmdev.guest.mouse_features == 0

    async def test_a_refused_change_is_rolled_back(self, host: SimulatedHost) -> None:
        """When the host refuses SET_MOUSE_STATUS the session's features and their union
        are as before, so the same change asked again is sent again."""
        first, second = await open_client(host), await open_client(host)
        assert await set_mouse_status(first, CAN_ABSOLUTE) == VINF_SUCCESS
        driver = model_driver(host)
        assert isinstance(driver, OracleDriver)
        sent = _record_requestors(host, RequestType.SET_MOUSE_STATUS)
        host.add_fault(RequestType.SET_MOUSE_STATUS, VERR_NOT_SUPPORTED)
        assert await set_mouse_status(second, NEW_PROTOCOL) == VERR_NOT_SUPPORTED
        assert second.transport.session.mouse_status == 0
        assert driver.mouse_tracker.mask == CAN_ABSOLUTE
        assert host.vmmdev.guest.mouse_features == CAN_ABSOLUTE
        assert await set_mouse_status(second, NEW_PROTOCOL) == VINF_SUCCESS
        assert len(sent) == 2
        assert host.vmmdev.guest.mouse_features == CAN_ABSOLUTE | NEW_PROTOCOL

    async def test_the_request_is_the_sessions(self, host: SimulatedHost) -> None:
        """SET_MOUSE_STATUS goes to the host as the session's; the close's as the kernel's."""
        seen: list[tuple[int, int]] = []
        process = host.vmmdev.process

        def record(phys: int) -> None:
            req = bytearray(host.vmmdev.memory.read(phys, MOUSE_STATUS_SIZE))
            if L.RequestHeader.request_type.get(req) == RequestType.SET_MOUSE_STATUS:
                features = int.from_bytes(req[HEADER_SIZE : HEADER_SIZE + 4], "little")
                seen.append((features, L.RequestHeader.requestor.get(req)))
            process(phys)

        host.vmmdev.process = record  # type: ignore[method-assign]
        client = await open_client(host, uid=1000)
        await set_mouse_status(client, CAN_ABSOLUTE)
        await set_mouse_status(client, CAN_ABSOLUTE)
        await client.transport.aclose()
        caller = session_requestor(user_device=False, uid=1000)
        assert seen == [(CAN_ABSOLUTE, caller), (0, REQUESTOR_KERNEL)]

    async def test_wrong_sizes_are_einval(self, host: SimulatedHost) -> None:
        """REQ_CHECK_SIZES: in 28, out 24."""
        client = await open_client(host)
        buf = ioctl_buffer(28, 28)
        await expect_einval(client, iowr(IOCTL_TYPE, 15, 28), buf)


async def acquire_caps(client: Client, or_mask: int, not_mask: int, flags: int = 0) -> int:
    """ACQUIRE_GUEST_CAPABILITIES by hand; return ``hdr.rc``."""
    call = AcquireGuestCapabilities(0, 0).encode()
    L.AcquireGuestCapsIoctl.flags.set(call.buffer, flags)
    L.AcquireGuestCapsIoctl.or_mask.set(call.buffer, or_mask)
    L.AcquireGuestCapsIoctl.not_mask.set(call.buffer, not_mask)
    await client.raw(call.code, call.buffer)
    return L.IoctlHeader.rc.get(call.buffer)


async def change_caps(client: Client, or_mask: int, not_mask: int) -> tuple[int, int, int]:
    """CHANGE_GUEST_CAPABILITIES by hand; return ``(hdr.rc, session caps, global caps)``."""
    call = ChangeGuestCapabilities(or_mask, not_mask).encode()
    await client.raw(call.code, call.buffer)
    layout = L.SetGuestCapsIoctl
    buf = call.buffer
    return L.IoctlHeader.rc.get(buf), layout.session_caps.get(buf), layout.global_caps.get(buf)


class TestCapabilities:
    """``vgdrvAcquireSessionCapabilities`` and ``vgdrvSetSessionCapabilities``."""

    async def test_acquire_ignores_unknown_bits_to_release(self, host: SimulatedHost) -> None:
        """Only the mask to acquire is checked; unknown bits in the one to release are
        ignored (\"The fNotMask no need to have all values valid\")."""
        client = await open_client(host)
        assert await acquire_caps(client, SEAMLESS, 0x8) == VINF_SUCCESS
        assert await acquire_caps(client, 0x8, 0) == VERR_INVALID_PARAMETER

    async def test_acquire_flags_beyond_config_mode_are_invalid(self, host: SimulatedHost) -> None:
        """Only the config-acquire-mode flag (1) may be given: 2 is VERR_INVALID_PARAMETER,
        with a valid mask, and nothing is acquired."""
        client, other = await open_client(host), await open_client(host)
        assert await acquire_caps(client, SEAMLESS, 0, flags=2) == VERR_INVALID_PARAMETER
        assert await change_caps(other, SEAMLESS, 0) == (VINF_SUCCESS, SEAMLESS, SEAMLESS)

    async def test_acquire_takes_a_capability_another_session_set(
        self, host: SimulatedHost
    ) -> None:
        """Oracle's set-mode conflict check reads a mask nothing fills
        (``fSetModeGuestCaps``), so acquiring a capability another session set succeeds;
        from then on setting it is busy."""
        setter, taker = await open_client(host), await open_client(host)
        assert await change_caps(setter, SEAMLESS, 0) == (VINF_SUCCESS, SEAMLESS, SEAMLESS)
        assert await acquire_caps(taker, SEAMLESS, 0) == VINF_SUCCESS
        assert await change_caps(setter, SEAMLESS, 0) == (VERR_RESOURCE_BUSY, SEAMLESS, SEAMLESS)

    async def test_an_acquire_that_changes_nothing_reports_caps_the_host_lost(
        self, host: SimulatedHost
    ) -> None:
        """A refused report leaves the host's capabilities unknown (``fGuestCapsHost`` is
        UINT32_MAX): ``vgdrvAcquireSessionCapabilities`` then reports them even when it
        adds and removes nothing, and once the host took them, such an acquire sends
        nothing (mainline returns before it either way)."""
        client = await open_client(host)
        assert await change_caps(client, GRAPHICS, 0) == (VINF_SUCCESS, GRAPHICS, GRAPHICS)
        reports = _record_requestors(host, RequestType.SET_GUEST_CAPABILITIES)
        host.add_fault(RequestType.SET_GUEST_CAPABILITIES, VERR_GENERAL_FAILURE)
        assert await change_caps(client, SEAMLESS, 0) == (
            VERR_GENERAL_FAILURE,
            GRAPHICS,
            GRAPHICS,
        )
        assert model_driver(host).guest_caps_host == U32_MAX
        assert await acquire_caps(client, 0, 0) == VINF_SUCCESS
        assert await acquire_caps(client, 0, 0) == VINF_SUCCESS
        assert len(reports) == 2  # the refused one and the acquire's
        assert host.vmmdev.guest.capabilities == GRAPHICS
        assert model_driver(host).guest_caps_host == GRAPHICS

    async def test_change_reports_the_caps_even_when_refused(self, host: SimulatedHost) -> None:
        """The session's and all sessions' capabilities come back with a refusal too; the
        global ones are the acquired and set ones, not the host's last report."""
        setter, taker = await open_client(host), await open_client(host)
        assert await acquire_caps(taker, GRAPHICS, 0) == VINF_SUCCESS
        assert await change_caps(setter, SEAMLESS, 0) == (
            VINF_SUCCESS,
            SEAMLESS,
            SEAMLESS | GRAPHICS,
        )
        assert await change_caps(setter, GRAPHICS, 0) == (
            VERR_RESOURCE_BUSY,
            SEAMLESS,
            SEAMLESS | GRAPHICS,
        )


class TestEvents:
    """WAIT_FOR_EVENTS and the one-shot INTERRUPT_ALL_WAIT_FOR_EVENTS."""

    async def test_empty_mask_is_an_invalid_parameter(self, host: SimulatedHost) -> None:
        """Mask 0: VERR_INVALID_PARAMETER in hdr.rc, events 0, the ioctl succeeds."""
        client = await open_client(host)
        assert await wait_raw(client, 0, 0) == (VERR_INVALID_PARAMETER, 0)

    async def test_filter_changes_go_to_the_host_as_the_kernels(self, host: SimulatedHost) -> None:
        """``vgdrvSetSessionEventFilter`` sends CTL_GUEST_FILTER_MASK with the kernel's
        requestor, the session's own change too (mainline sends the session's)."""
        seen = _record_requestors(host, RequestType.CTL_GUEST_FILTER_MASK)
        client = await open_client(host, uid=1000)
        await client.request(ChangeFilterMask(Event.MOUSE_CAPABILITIES_CHANGED, 0))
        assert seen == [(RequestType.CTL_GUEST_FILTER_MASK, REQUESTOR_KERNEL)]

    async def test_timeout_is_in_rc(self, host: SimulatedHost, autojump_clock: object) -> None:
        """Nothing pending: VERR_TIMEOUT in hdr.rc after the timeout (0 = at once)."""
        client = await open_client(host)
        mask = Event.MOUSE_CAPABILITIES_CHANGED
        assert await wait_raw(client, mask, 0) == (VERR_TIMEOUT, 0)
        start = trio.current_time()
        assert await wait_raw(client, mask, 1500) == (VERR_TIMEOUT, 0)
        assert trio.current_time() - start == pytest.approx(1.5)

    async def test_cancel_without_waiter_ends_the_next_wait(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """The cancel is remembered, consumed by the next wait (success, no events), once."""
        client = await open_client(host)
        mask = Event.MOUSE_CAPABILITIES_CHANGED
        await client.request(ChangeFilterMask(mask, 0))
        await client.request(InterruptAllWaits())
        assert await wait_raw(client, mask, 1000) == (VINF_SUCCESS, 0)
        assert await wait_raw(client, mask, 1000) == (VERR_TIMEOUT, 0)

    async def test_pending_events_come_with_the_consumed_cancel(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """A wait consuming the cancel still returns the matching pending events."""
        client = await open_client(host)
        mask = Event.MOUSE_CAPABILITIES_CHANGED
        await client.request(ChangeFilterMask(mask, 0))
        await client.request(InterruptAllWaits())
        host.raise_events(mask)
        await trio.testing.wait_all_tasks_blocked()
        assert await wait_raw(client, mask, 1000) == (VINF_SUCCESS, mask)
        assert await wait_raw(client, mask, 0) == (VERR_TIMEOUT, 0)

    async def test_the_isr_reads_the_fast_port(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """The host offers VMMDEV_HVF_FAST_IRQ_ACK, so ``VGDrvCommonISR`` reads the port:
        no ACKNOWLEDGE_EVENTS is sent, and faults and delays on it change nothing."""
        client = await open_client(host)
        mask = Event.MOUSE_CAPABILITIES_CHANGED
        await client.request(ChangeFilterMask(mask, 0))
        host.add_fault(RequestType.ACKNOWLEDGE_EVENTS, VERR_GENERAL_FAILURE, 3)
        host.set_delay(RequestType.ACKNOWLEDGE_EVENTS, 60)
        start = trio.current_time()
        host.raise_events(mask)
        assert await wait_raw(client, mask, 10_000) == (VINF_SUCCESS, mask)
        assert trio.current_time() == start
        assert host.vmmdev.request_counts[RequestType.ACKNOWLEDGE_EVENTS] == 0
        assert host.clear_faults(RequestType.ACKNOWLEDGE_EVENTS) == 3

    async def test_events_handed_over_win_over_a_later_cancel(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """The ISR's dispatch (``vgdrvDispatchEventsLocked``) gives a waiter its events and
        takes it off the wait list at once, so a cancel before the waiter runs does not
        reach it (``vgdrvIoCtl_CancelAllWaitEvents`` walks the list only): the wait returns
        the events, and the cancel is left for the session's next wait."""
        client = await open_client(host)
        driver = model_driver(host)
        assert isinstance(driver, OracleDriver)
        mask = Event.STATISTICS_INTERVAL_CHANGE_REQUEST
        results: list[tuple[int, int]] = []
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                results.append(await wait_raw(client, mask, 10_000))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            driver.route_events(mask)
            cancel = InterruptAllWaits().encode().buffer
            session = client.transport.session
            await _oracle._interrupt_all(driver, session, cancel, IoctlMemory())
        assert results == [(VINF_SUCCESS, mask)]
        assert session in driver.pending_cancel
        assert driver.pending_events == 0
        assert await wait_raw(client, mask, 1000) == (VINF_SUCCESS, 0)

    @pytest.mark.parametrize("own_task", [False, True], ids=["in_caller", "own_task"])
    async def test_events_handed_over_win_over_the_callers_cancel(
        self, host: SimulatedHost, autojump_clock: object, *, own_task: bool
    ) -> None:
        """The caller's cancel is a signal: it ends the sleep (``RTSemEventMultiWaitNoResume``
        returns VERR_INTERRUPTED), but if the ISR handed the wait events before the waiting
        thread ran, ``vgdrvIoCtl_WaitForEvents`` returns them with VINF_SUCCESS: the call
        completed, so it returns normally and the caller's next checkpoint raises. The same
        whether the call runs in its caller's task or (a slow host) in one of its own."""
        client = await open_client(host)
        driver = model_driver(host)
        mask = Event.STATISTICS_INTERVAL_CHANGE_REQUEST
        await client.request(ChangeFilterMask(mask, 0))
        if own_task:
            host.set_delay(RequestType.REPORT_GUEST_STATS, 1)
        results: list[tuple[int, int]] = []
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                with scope:
                    results.append(await wait_raw(client, mask, 10_000))
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            waiter = _guest_call_task() if own_task else _only_child(nursery)
            trio.lowlevel.add_instrument(_BeforeStep(waiter, lambda: driver.route_events(mask)))
            scope.cancel()  # the signal: the waiter's park is aborted; the ISR runs before it
        assert results == [(VINF_SUCCESS, mask)]
        assert scope.cancelled_caught
        assert driver.pending_events == 0

    @pytest.mark.parametrize("own_task", [False, True], ids=["in_caller", "own_task"])
    async def test_a_cancel_before_the_isr_leaves_the_events_pending(
        self, host: SimulatedHost, autojump_clock: object, *, own_task: bool
    ) -> None:
        """A wait its caller's cancel ended before the ISR ran returns VERR_INTERRUPTED in
        ``hdr.rc`` (the ioctl succeeds; the caller's next checkpoint raises) and is off the
        wait list: the dispatch passes it by and the events stay pending for the next wait."""
        client = await open_client(host)
        driver = model_driver(host)
        mask = Event.STATISTICS_INTERVAL_CHANGE_REQUEST
        await client.request(ChangeFilterMask(mask, 0))
        if own_task:
            host.set_delay(RequestType.REPORT_GUEST_STATS, 1)
        results: list[tuple[int, int]] = []
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                with scope:
                    results.append(await wait_raw(client, mask, 10_000))
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()  # the waiter ran: VERR_INTERRUPTED
            driver.route_events(mask)
        assert results == [(VERR_INTERRUPTED, 0)]
        assert scope.cancelled_caught
        assert driver.pending_events == mask
        assert await wait_raw(client, mask, 0) == (VINF_SUCCESS, mask)

    async def test_dispatch_serves_the_oldest_waiter_first(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """Each waiter, oldest first, takes what it waits for of what is left; the rest
        stays pending for a later wait."""
        first, second = await open_client(host), await open_client(host)
        driver = model_driver(host)
        both = Event.STATISTICS_INTERVAL_CHANGE_REQUEST | Event.VRDP
        results: dict[str, tuple[int, int]] = {}
        async with trio.open_nursery() as nursery:

            async def wait(name: str, client: Client, mask: int) -> None:
                results[name] = await wait_raw(client, mask, 10_000)

            nursery.start_soon(wait, "first", first, Event.STATISTICS_INTERVAL_CHANGE_REQUEST)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait, "second", second, both)
            await trio.testing.wait_all_tasks_blocked()
            driver.route_events(both | Event.RESTORED)
        assert results == {
            "first": (VINF_SUCCESS, Event.STATISTICS_INTERVAL_CHANGE_REQUEST),
            "second": (VINF_SUCCESS, Event.VRDP),
        }
        assert driver.pending_events == Event.RESTORED

    async def test_cancel_ends_a_blocked_wait_only(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """A waiting call ends with VERR_INTERRUPTED; nothing is left for the next wait."""
        client, other = await open_client(host), await open_client(host)
        mask = Event.MOUSE_CAPABILITIES_CHANGED
        results: list[tuple[int, int]] = []
        async with trio.open_nursery() as nursery:

            async def wait(target: Client) -> None:
                results.append(await wait_raw(target, mask, 10_000))

            nursery.start_soon(wait, client)
            nursery.start_soon(wait, other)
            await trio.testing.wait_all_tasks_blocked()
            await client.request(InterruptAllWaits())
            await trio.testing.wait_all_tasks_blocked()
            assert results == [(VERR_INTERRUPTED, 0)]
            nursery.cancel_scope.cancel()
        assert await wait_raw(client, mask, 1000) == (VERR_TIMEOUT, 0)


_T = RequestType
ALL_USERS: Final = frozenset(
    {
        _T.GET_MOUSE_STATUS,
        _T.SET_MOUSE_STATUS,
        _T.SET_POINTER_SHAPE,
        _T.GET_HOST_VERSION,
        _T.IDLE,
        _T.GET_HOST_TIME,
        _T.SET_POWER_STATUS,
        _T.ACKNOWLEDGE_EVENTS,
        _T.CTL_GUEST_FILTER_MASK,
        _T.REPORT_GUEST_STATUS,
        _T.GET_DISPLAY_CHANGE_REQ,
        _T.VIDEMODE_SUPPORTED,
        _T.GET_HEIGHT_REDUCTION,
        _T.GET_DISPLAY_CHANGE_REQ2,
        _T.VIDEMODE_SUPPORTED2,
        _T.VIDEO_ACCEL_ENABLE,
        _T.VIDEO_ACCEL_FLUSH,
        _T.VIDEO_SET_VISIBLE_REGION,
        _T.VIDEO_UPDATE_MONITOR_POSITIONS,
        _T.GET_DISPLAY_CHANGE_REQEX,
        _T.GET_DISPLAY_CHANGE_REQ_MULTI,
        _T.GET_SEAMLESS_CHANGE_REQ,
        _T.GET_VRDPCHANGE_REQ,
        _T.LOG_STRING,
        _T.GET_SESSION_ID,
    }
)
"""Upstream's ``kLevel_AllUsers`` (``VBoxGuest.cpp`` of VirtualBox 7.1), written out here
apart from the model's table: any session, through either node."""
TRUSTED_USERS: Final = frozenset(
    {
        _T.QUERY_CREDENTIALS,
        _T.REPORT_CREDENTIALS_JUDGEMENT,
        _T.REGISTER_SHARED_MODULE,
        _T.UNREGISTER_SHARED_MODULE,
        _T.WRITE_COREDUMP,
        _T.GET_CPU_HOTPLUG_REQ,
        _T.SET_CPU_HOTPLUG_STATUS,
        _T.CHECK_SHARED_MODULES,
        _T.GET_PAGE_SHARING_STATUS,
        _T.DEBUG_IS_PAGE_SHARED,
        _T.REPORT_GUEST_STATS,
        _T.REPORT_GUEST_USER_STATE,
        _T.GET_STATISTICS_CHANGE_REQ,
    }
)
"""Upstream's ``kLevel_TrustedUsers``: sessions without ``fUserSession`` (on Linux, all but
``/dev/vboxuser``'s). Every other type is for kernel sessions (``kLevel_OnlyVBoxGuest``:
the balloon's two requests among them) or for none (``kLevel_NoOne``, the default)."""
_SIZED: Final = sorted(
    (request_type, size)
    for request_type, size in REQUEST_SIZES.items()
    if request_type != RequestType.REPORT_GUEST_CAPABILITIES
)
"""Each type with a structure size, which reaches the policy (the others fail the size check
first), but REPORT_GUEST_CAPABILITIES, whose level depends on the request."""


class TestVmmdevRequestPolicy:
    """``vgdrvCheckIfVmmReqIsAllowed``: refusals are VERR_PERMISSION_DENIED in hdr.rc."""

    @pytest.mark.parametrize(
        ("request_type", "size"),
        [
            (RequestType.GET_STATISTICS_CHANGE_REQ, L.StatisticsChangeRequest.size),
            (RequestType.REPORT_GUEST_STATS, L.GuestStatsRequest.size),
            (RequestType.GET_CPU_HOTPLUG_REQ, L.CpuHotPlugRequest.size),
        ],
    )
    async def test_trusted_pass_through(
        self, host: SimulatedHost, request_type: int, size: int
    ) -> None:
        """/dev/vboxguest sessions reach the host; /dev/vboxuser sessions are refused."""
        trusted = await open_client(host)
        host.add_fault(request_type, VERR_NOT_SUPPORTED)
        buf = await passthrough(trusted, request_type, size)
        assert L.RequestHeader.rc.get(buf) == VERR_NOT_SUPPORTED
        user = await open_client(host, user_device=True)
        buf = await passthrough(user, request_type, size)
        assert L.RequestHeader.rc.get(buf) == VERR_PERMISSION_DENIED

    @pytest.mark.parametrize(
        ("request_type", "size"),
        [
            (RequestType.GET_MEMBALLOON_CHANGE_REQ, L.MemBalloonInfoRequest.size),
            (RequestType.CHANGE_MEMBALLOON, L.MemBalloonChangeRequest.size),
            (RequestType.GUEST_HEARTBEAT, HEADER_SIZE),
            (RequestType.HEARTBEAT_CONFIGURE, 36),
            (RequestType.SET_GUEST_CAPABILITIES, L.MaskRequest.size),
            (RequestType.HGCM_CONNECT, L.HgcmConnectRequest.size),
        ],
    )
    @pytest.mark.parametrize("user_device", [False, True])
    async def test_kernel_only_requests(
        self, host: SimulatedHost, request_type: int, size: int, user_device: bool
    ) -> None:
        """Balloon and heartbeat requests are the kernel's: refused to every user session."""
        client = await open_client(host, user_device=user_device)
        buf = await passthrough(client, request_type, size)
        assert L.RequestHeader.rc.get(buf) == VERR_PERMISSION_DENIED

    @pytest.mark.parametrize(
        ("request_type", "size"), _SIZED, ids=[getattr(t, "name", str(t)) for t, _ in _SIZED]
    )
    async def test_each_type_at_upstreams_level(
        self, host: SimulatedHost, request_type: int, size: int
    ) -> None:
        """Request by request, who reaches the host (answering with its fault) and who is
        refused, through /dev/vboxguest and /dev/vboxuser."""
        host.add_fault(request_type, VERR_NOT_SUPPORTED, count=2)
        outcomes = []
        for user_device in (False, True):
            client = await open_client(host, user_device=user_device)
            buf = await passthrough(client, request_type, size)
            outcomes.append(L.RequestHeader.rc.get(buf))
        reached, refused = VERR_NOT_SUPPORTED, VERR_PERMISSION_DENIED
        if request_type in ALL_USERS:
            assert outcomes == [reached, reached]
        elif request_type in TRUSTED_USERS:
            assert outcomes == [reached, refused]
        else:
            assert outcomes == [refused, refused]

    @pytest.mark.parametrize(
        ("facility", "refused"),
        [
            (Facility.ALL, [True, True]),
            (Facility.VBOXGUEST_DRIVER, [True, True]),
            (Facility.VBOX_SERVICE, [False, True]),
            (Facility.SEAMLESS, [False, False]),
            (0x1, [False, False]),
        ],
    )
    async def test_report_capabilities_level(
        self, host: SimulatedHost, facility: int, refused: list[bool]
    ) -> None:
        """REPORT_GUEST_CAPABILITIES is judged by the u32 at offset 24 read as a facility:
        the driver's own two kernel-only, VBoxService's trusted, any other anyone's."""
        size = REQUEST_SIZES[RequestType.REPORT_GUEST_CAPABILITIES]
        host.add_fault(RequestType.REPORT_GUEST_CAPABILITIES, VERR_NOT_SUPPORTED, count=2)
        outcomes = []
        for user_device in (False, True):
            client = await open_client(host, user_device=user_device)
            buf = vmmdev_request(RequestType.REPORT_GUEST_CAPABILITIES, size)
            L.RequestHeader.reserved1.set(buf, size)
            L.GuestStatusRequest.facility.set(buf, facility)
            await client.raw(Ioctl.vmmdev_request(size), buf)
            outcomes.append(L.RequestHeader.rc.get(buf) == VERR_PERMISSION_DENIED)
        assert outcomes == refused

    @pytest.mark.parametrize("user_device", [False, True])
    async def test_short_request_is_invalid_before_the_policy(
        self, host: SimulatedHost, user_device: bool
    ) -> None:
        """A request shorter than its type's structure (``vmmdevGetRequestSize``) is
        VERR_INVALID_PARAMETER, checked before the policy and without reaching the host."""
        client = await open_client(host, user_device=user_device)
        host.add_fault(RequestType.REPORT_GUEST_STATS, VERR_NOT_SUPPORTED)
        buf = await passthrough(client, RequestType.REPORT_GUEST_STATS, 32)
        assert L.RequestHeader.rc.get(buf) == VERR_INVALID_PARAMETER
        trusted = await open_client(host)
        size = L.GuestStatsRequest.size
        buf = await passthrough(trusted, RequestType.REPORT_GUEST_STATS, size)
        assert L.RequestHeader.rc.get(buf) == VERR_NOT_SUPPORTED  # the fault was still there

    @pytest.mark.parametrize("size", [28, 40])
    async def test_fixed_type_of_another_size(self, host: SimulatedHost, size: int) -> None:
        """``VbglGR0Verify``: a fixed-size type is exactly its structure (the header's size is
        the buffer's); shorter is VERR_INVALID_PARAMETER, longer VERR_IO_BAD_LENGTH."""
        client = await open_client(host)
        buf = await passthrough(client, RequestType.GET_SESSION_ID, size)
        assert L.RequestHeader.rc.get(buf) == (
            VERR_INVALID_PARAMETER if size < L.SessionIdRequest.size else VERR_IO_BAD_LENGTH
        )

    @pytest.mark.parametrize(
        "request_type",
        [
            RequestType.WRITE_COREDUMP,
            RequestType.REPORT_CREDENTIALS_JUDGEMENT,
            RequestType.VIDEMODE_SUPPORTED2,
            RequestType.HGCM_CANCEL2,
            999,
        ],
    )
    async def test_types_without_a_size_are_bad_lengths(
        self, host: SimulatedHost, request_type: int
    ) -> None:
        """Types ``vmmdevGetRequestSize`` does not know (size 0) and that are not variable:
        VERR_IO_BAD_LENGTH for every session, before the policy."""
        for user_device in (False, True):
            client = await open_client(host, user_device=user_device)
            buf = await passthrough(client, request_type, 28)
            assert L.RequestHeader.rc.get(buf) == VERR_IO_BAD_LENGTH

    async def test_only_variable_types_may_be_large(self, host: SimulatedHost) -> None:
        """Over 1 MiB a variable-size type is VERR_BUFFER_OVERFLOW, a fixed one a bad length;
        a variable one may be longer than its structure (then the policy decides)."""
        client = await open_client(host)
        big = (1 << 20) + 8
        buf = await passthrough(client, RequestType.LOG_STRING, big)
        assert L.RequestHeader.rc.get(buf) == VERR_BUFFER_OVERFLOW
        buf = await passthrough(client, RequestType.GET_SESSION_ID, big)
        assert L.RequestHeader.rc.get(buf) == VERR_IO_BAD_LENGTH
        buf = await passthrough(client, RequestType.CHANGE_MEMBALLOON, 4096)
        assert L.RequestHeader.rc.get(buf) == VERR_PERMISSION_DENIED  # sizes passed

    def test_the_agents_requests_have_oracles_sizes(self) -> None:
        """Every VMMDev request the agent passes through has the size Oracle's driver wants."""
        requests = _VmmdevRequest.__subclasses__()
        assert len(requests) >= 10
        for cls in requests:
            assert check_request_size(cls.request_type, cls.layout_size) == VINF_SUCCESS, cls

    @pytest.mark.parametrize(
        ("user_device", "uid", "expected"),
        [
            (False, 0, Requestor.USERMODE | Requestor.USR_ROOT),
            (False, 1000, Requestor.USERMODE | Requestor.USR_USER),
            (True, 1000, Requestor.USERMODE | Requestor.USR_USER | Requestor.USER_DEVICE),
            (
                True,
                0,
                Requestor.USERMODE
                | Requestor.USR_ROOT
                | Requestor.USER_DEVICE
                | Requestor.GRP_VBOX,
            ),
        ],
    )
    async def test_requestor_of_a_session(
        self, host: SimulatedHost, user_device: bool, uid: int, expected: int
    ) -> None:
        """``vgdrvLinuxOpen``: user-mode, root or user, USER_DEVICE on /dev/vboxuser; the
        VirtualBox group on /dev/vboxuser when its node's group is 0 and the caller is in it
        (``vgdrvLinuxIsGroupZero`` is true for a non-zero gid), so root on the model's
        root:root node (0x808B); trust and console not known (0)."""
        seen = _record_requestors(host, RequestType.GET_SESSION_ID)
        client = await open_client(host, user_device=user_device, uid=uid)
        await passthrough(client, RequestType.GET_SESSION_ID)
        assert seen == [(RequestType.GET_SESSION_ID, expected)]

    async def test_reply_comes_back_only_on_success(self, host: SimulatedHost) -> None:
        """Success copies the host's reply back; a failure leaves the request with its rc."""
        client = await open_client(host)
        buf = await passthrough(client, RequestType.GET_SESSION_ID)
        assert L.RequestHeader.rc.get(buf) == VINF_SUCCESS
        assert L.SessionIdRequest.session_id.get(buf) != 0
        assert L.RequestHeader.reserved1.get(buf) == 32
        host.add_fault(RequestType.GET_SESSION_ID, VERR_NOT_SUPPORTED)
        buf = await passthrough(client, RequestType.GET_SESSION_ID)
        assert L.RequestHeader.rc.get(buf) == VERR_NOT_SUPPORTED
        assert L.SessionIdRequest.session_id.get(buf) == 0
        assert L.RequestHeader.requestor.get(buf) == 0

    async def test_request_ioctls_are_known_by_number_alone(self, host: SimulatedHost) -> None:
        """``VBGL_IOCTL_CODE_STRIPPED`` is ``_IOC_NR``: any code with number 2 or 3 carries one."""
        client = await open_client(host)
        for code in (Ioctl.VMMDEV_REQUEST_BIG, Ioctl.VMMDEV_REQUEST_BIG_ALT, 0x0000_5602):
            buf = vmmdev_request(RequestType.GET_SESSION_ID, 32)
            L.RequestHeader.reserved1.set(buf, 32)
            await client.raw(code, buf)
            assert L.RequestHeader.rc.get(buf) == VINF_SUCCESS

    async def test_malformed_requests_are_einval(self, host: SimulatedHost) -> None:
        """Type 0 or size_in != size_out fail the entry with EINVAL."""
        client = await open_client(host)
        buf = vmmdev_request(RequestType.GET_SESSION_ID, 32)
        L.RequestHeader.reserved1.set(buf, 24)
        await expect_einval(client, Ioctl.vmmdev_request(32), buf)
        buf = vmmdev_request(RequestType.INVALID_REQUEST, 32)
        L.RequestHeader.reserved1.set(buf, 32)
        await expect_einval(client, Ioctl.vmmdev_request(32), buf)


class TestOracleKernelBalloon:
    """The default Linux build: CHECK_BALLOON moves the driver's own balloon."""

    async def test_check_inflates_and_deflates_in_the_kernel(self, host: SimulatedHost) -> None:
        owner, other = await open_client(host), await open_client(host)
        host.set_balloon_target(3)
        status = await owner.request(CheckBalloon())
        assert (status.chunks, status.handle_in_r3) == (3, False)
        assert (host.vmmdev.balloon.chunks, host.vmmdev.balloon.acked_mb) == (3, 3)
        host.set_balloon_target(1)
        await owner.request(CheckBalloon())
        assert host.vmmdev.balloon.chunks == 1
        assert await status_of(other.request(CheckBalloon())) == VERR_PERMISSION_DENIED

    async def test_change_balloon_is_refused(self, host: SimulatedHost) -> None:
        """With the kernel allocator even the owner may not hand over chunks."""
        owner = await open_client(host)
        await owner.request(CheckBalloon())
        assert await status_of(owner.request(ChangeBalloon(CHUNK, True))) == VERR_PERMISSION_DENIED

    async def test_padding_is_checked_before_the_kernel_api(self, host: SimulatedHost) -> None:
        """``vgdrvIoCtl_ChangeMemoryBalloon`` refuses a non-zero padding before it tests
        ``fUseKernelAPI`` (VERR_PERMISSION_DENIED) or claims the balloon."""
        client = await open_client(host)
        assert await status_of(client.request(ChangeBalloonProbe())) == VERR_INVALID_PARAMETER
        driver = host.driver
        assert isinstance(driver, OracleDriver)
        assert (driver.owner, driver.use_kernel_api) == (None, True)

    async def test_host_failure_stops_the_walk(self, host: SimulatedHost) -> None:
        """The first refused chunk ends the walk with its status; the next check goes on."""
        owner = await open_client(host)
        await owner.request(CheckBalloon())
        host.set_balloon_target(2)
        await owner.request(CheckBalloon())
        host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NOT_SUPPORTED)
        host.set_balloon_target(5)
        assert await status_of(owner.request(CheckBalloon())) == VERR_NOT_SUPPORTED
        assert host.vmmdev.balloon.chunks == 2
        await owner.request(CheckBalloon())
        assert host.vmmdev.balloon.chunks == 5

    async def test_owner_close_deflates_the_kernel_chunks(self, host: SimulatedHost) -> None:
        """Closing the owning session gives back every chunk the kernel took for it."""
        owner = await open_client(host)
        host.set_balloon_target(4)
        await owner.request(CheckBalloon())
        assert (host.vmmdev.balloon.chunks, host.driver.balloon_chunks) == (4, 4)
        await owner.transport.aclose()
        assert host.vmmdev.balloon.chunks == 0
        assert host.driver.balloon_chunks == 0

    async def test_close_goes_on_past_refused_releases(self, host: SimulatedHost) -> None:
        """``VGDrvCommonCloseSession`` ignores what dropping the session's capabilities and
        filter returns: with the host refusing both, the clients are disconnected and the
        balloon the session owned is deflated all the same."""
        owner = await open_client(host)
        await owner.request(ChangeFilterMask(Event.VRDP, 0))
        await owner.request(ChangeGuestCapabilities(GuestCapability.GRAPHICS, 0))
        await owner.request(HgcmConnect(ECHO))
        host.set_balloon_target(2)
        await owner.request(CheckBalloon())
        host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_GENERAL_FAILURE, count=3)
        host.add_fault(RequestType.SET_GUEST_CAPABILITIES, VERR_GENERAL_FAILURE)
        await owner.transport.aclose()
        assert host.status()["hgcm_clients"] == 0
        assert host.vmmdev.balloon.chunks == 0


async def hand_to_ring3(host: SimulatedHost) -> None:
    """Bring a driver without the kernel allocator to ring-3 ballooning as upstream does: a
    CHECK_BALLOON whose target needs an inflate; then back to a target of 0, the owner gone."""
    client = await open_client(host)
    host.set_balloon_target(1)
    assert (await client.request(CheckBalloon())).handle_in_r3
    host.set_balloon_target(0)
    await client.request(CheckBalloon())
    await client.transport.aclose()


class TestOracleWithoutAllocator:
    """A build without the kernel allocator loads like the Linux build (``fUseKernelAPI``)
    and hands the balloon to ring 3 at its first inflate, for good."""

    async def test_ring3_from_the_first_inflate(self) -> None:
        """Before any inflate CHECK_BALLOON answers ``handle_in_r3 = 0`` and CHANGE_BALLOON
        is refused as on the Linux build; a target that needs an inflate gets 1 and no chunk
        (the allocation is VERR_NOT_SUPPORTED), and so does every later answer."""
        host = SimulatedHost(personality=PERSONALITY, r3_balloon=True)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                owner = await open_client(host)
                status = await owner.request(CheckBalloon())
                assert (status.chunks, status.handle_in_r3) == (0, False)
                assert await status_of(owner.request(ChangeBalloon(CHUNK, True))) == (
                    VERR_PERMISSION_DENIED
                )
                host.set_balloon_target(3)
                status = await owner.request(CheckBalloon())
                assert (status.chunks, status.handle_in_r3) == (3, True)
                assert (host.vmmdev.balloon.chunks, host.vmmdev.balloon.acked_mb) == (0, 3)
                await owner.request(ChangeBalloon(CHUNK, True))
                assert host.vmmdev.balloon.chunks == 1
                host.set_balloon_target(0)
                assert (await owner.request(CheckBalloon())).handle_in_r3
                await owner.transport.aclose()
                other = await open_client(host)  # the driver's state, not the owner's
                assert (await other.request(CheckBalloon())).handle_in_r3
                nursery.cancel_scope.cancel()

    async def test_a_reset_boots_the_same_build(self) -> None:
        """A reset reboots the same guest: its driver again lacks the allocator, and starts
        on the kernel API until its own first inflate hands the balloon to ring 3."""
        host = SimulatedHost(personality=PERSONALITY, r3_balloon=True)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                await hand_to_ring3(host)
                await host.reset()
                assert not host.driver.kernel_allocator  # type: ignore[attr-defined]
                assert host.driver.use_kernel_api  # type: ignore[attr-defined]
                owner = await open_client(host)
                host.set_balloon_target(2)
                status = await owner.request(CheckBalloon())
                assert (status.chunks, status.handle_in_r3) == (2, True)
                assert host.vmmdev.balloon.chunks == 0
                nursery.cancel_scope.cancel()

    async def test_a_deflate_keeps_the_kernel_api(self) -> None:
        """Only an inflate finds the allocator missing: a target below the balloon (an
        empty one: none) answers 0 and CHANGE_BALLOON stays refused."""
        host = SimulatedHost(personality=PERSONALITY, r3_balloon=True)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                owner = await open_client(host)
                for _ in range(2):
                    assert not (await owner.request(CheckBalloon())).handle_in_r3
                assert await status_of(owner.request(ChangeBalloon(CHUNK, False))) == (
                    VERR_PERMISSION_DENIED
                )
                assert host.driver.use_kernel_api  # type: ignore[attr-defined]
                nursery.cancel_scope.cancel()


class TestOracleBalloon:
    """A build without the kernel allocator, handed to ring 3: chunks via CHANGE_BALLOON."""

    @pytest.fixture(name="host")
    async def _r3_host(self) -> AsyncIterator[SimulatedHost]:
        host = SimulatedHost(personality=PERSONALITY, seed=1, r3_balloon=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            await hand_to_ring3(host)
            yield host
            nursery.cancel_scope.cancel()

    async def test_balloon_requests_carry_the_callers_requestor(self, host: SimulatedHost) -> None:
        """The balloon query and a user chunk's change go to the host as the calling
        session's (``pSession->fRequestor``); the close's deflate as the kernel's."""
        seen = _record_requestors(
            host, RequestType.GET_MEMBALLOON_CHANGE_REQ, RequestType.CHANGE_MEMBALLOON
        )
        client = await open_client(host, uid=1000)
        caller = session_requestor(user_device=False, uid=1000)
        host.set_balloon_target(1)
        await client.request(CheckBalloon())
        await client.request(ChangeBalloon(CHUNK, True))
        await client.transport.aclose()
        assert seen == [
            (RequestType.GET_MEMBALLOON_CHANGE_REQ, caller),
            (RequestType.CHANGE_MEMBALLOON, caller),
            (RequestType.CHANGE_MEMBALLOON, REQUESTOR_KERNEL),
        ]

    async def test_check_makes_the_owner(self, host: SimulatedHost) -> None:
        """The first caller owns the balloon; others get VERR_PERMISSION_DENIED."""
        owner, other = await open_client(host), await open_client(host)
        host.set_balloon_target(3)
        status = await owner.request(CheckBalloon())
        assert (status.chunks, status.handle_in_r3) == (3, True)
        assert host.vmmdev.balloon.acked_mb == 3
        assert await status_of(other.request(CheckBalloon())) == VERR_PERMISSION_DENIED
        assert await status_of(other.request(ChangeBalloon(CHUNK, True))) == VERR_PERMISSION_DENIED

    async def test_inflate_and_deflate(self, host: SimulatedHost) -> None:
        """Chunks go to the host as 256 distinct pages; repeats and unknowns are refused."""
        client = await open_client(host)
        host.set_balloon_target(2)
        await client.request(CheckBalloon())
        await client.request(ChangeBalloon(CHUNK, True))
        await client.request(ChangeBalloon(CHUNK + MIB, True))
        assert (host.vmmdev.balloon.chunks, host.vmmdev.balloon.pages) == (2, 512)
        assert await status_of(client.request(ChangeBalloon(CHUNK, True))) == VERR_ALREADY_EXISTS
        await client.request(ChangeBalloon(CHUNK, False))
        assert await status_of(client.request(ChangeBalloon(CHUNK, False))) == VERR_NOT_FOUND
        assert host.vmmdev.balloon.chunks == 1

    async def test_deflating_an_empty_balloon(self, host: SimulatedHost) -> None:
        """With no chunk in the balloon a deflate is VERR_INVALID_PARAMETER, not unknown,
        after an assertion (which stops a VBOX_STRICT build)."""
        client = await open_client(host)
        await client.request(CheckBalloon())
        assert await status_of(client.request(ChangeBalloon(CHUNK, False))) == (
            VERR_INVALID_PARAMETER
        )
        driver = host.driver
        assert isinstance(driver, OracleDriver)
        assert len(driver.failed_assertions) == 1

    async def test_padding_is_checked_first(self, host: SimulatedHost) -> None:
        """A non-zero padding is refused before the balloon is claimed or looked at: no
        owner made, an owner's chunks kept, another's session not denied, no assertion on
        an empty balloon."""
        driver = host.driver
        assert isinstance(driver, OracleDriver)
        owner, other = await open_client(host), await open_client(host)
        assert await status_of(owner.request(ChangeBalloonProbe())) == VERR_INVALID_PARAMETER
        assert [driver.owner] == [None]  # (a list: no narrowing for the checks after the claim)
        await owner.request(CheckBalloon())
        await owner.request(ChangeBalloon(CHUNK, True))
        for client in (owner, other):
            assert await status_of(client.request(ChangeBalloonProbe())) == VERR_INVALID_PARAMETER
        assert (driver.owner, list(driver.chunks), driver.failed_assertions) == (
            owner.transport.session,
            [CHUNK],
            [],
        )

    async def test_change_makes_the_owner(self, host: SimulatedHost) -> None:
        """Once the driver balloons from ring 3, CHANGE_BALLOON too makes its caller the
        owner (the maximum known from the CHECK_BALLOON that handed it over)."""
        client, other = await open_client(host), await open_client(host)
        await client.request(ChangeBalloon(CHUNK, True))
        assert host.vmmdev.balloon.chunks == 1
        assert await status_of(other.request(CheckBalloon())) == VERR_PERMISSION_DENIED

    async def test_balloon_cannot_outgrow_guest_ram(self) -> None:
        """Inflating past the RAM's chunk count is VERR_INVALID_PARAMETER."""
        host = SimulatedHost(personality=PERSONALITY, ram_mb=4, r3_balloon=True)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                await hand_to_ring3(host)
                client = await open_client(host)
                await client.request(CheckBalloon())
                for index in range(4):
                    await client.request(ChangeBalloon(CHUNK + index * MIB, True))
                assert (
                    await status_of(client.request(ChangeBalloon(CHUNK + 4 * MIB, True)))
                    == VERR_INVALID_PARAMETER
                )
                nursery.cancel_scope.cancel()

    async def test_padding_must_be_zero(self, host: SimulatedHost) -> None:
        """Non-zero padding is VERR_INVALID_PARAMETER; wrong sizes are EINVAL."""
        client = await open_client(host)
        await client.request(CheckBalloon())
        call = ChangeBalloon(CHUNK, True).encode()
        call.buffer[33] = 1
        await client.raw(call.code, call.buffer)
        assert L.IoctlHeader.rc.get(call.buffer) == VERR_INVALID_PARAMETER
        call = ChangeBalloon(CHUNK, True).encode()
        L.IoctlHeader.size_out.set(call.buffer, 40)
        with pytest.raises(OSError, match=r".") as info:
            await client.raw(Ioctl.CHANGE_BALLOON, call.buffer)
        assert info.value.errno == errno.EINVAL

    async def test_host_failure_is_reported(self, host: SimulatedHost) -> None:
        """A host refusing the chunk returns its status; nothing is kept."""
        client = await open_client(host)
        await client.request(CheckBalloon())
        host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NOT_SUPPORTED)
        assert await status_of(client.request(ChangeBalloon(CHUNK, True))) == VERR_NOT_SUPPORTED
        assert host.driver.balloon_chunks == 0

    async def test_owner_close_deflates(self, host: SimulatedHost) -> None:
        """Closing the owner deflates every chunk and frees the balloon for others."""
        owner = await open_client(host)
        await owner.request(CheckBalloon())
        for index in range(3):
            await owner.request(ChangeBalloon(CHUNK + index * MIB, True))
        await owner.transport.aclose()
        assert host.vmmdev.balloon.chunks == 0
        other = await open_client(host)
        assert (await other.request(CheckBalloon())).handle_in_r3

    async def test_owner_close_stops_at_a_refused_deflate(self, host: SimulatedHost) -> None:
        """``vgdrvCloseMemBalloon`` gives up at the first chunk the host will not take back:
        it and the chunks below it stay ballooned (upstream leaks them)."""
        owner = await open_client(host)
        await owner.request(CheckBalloon())
        for index in range(3):
            await owner.request(ChangeBalloon(CHUNK + index * MIB, True))
        host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NOT_SUPPORTED)
        await owner.transport.aclose()
        assert host.vmmdev.balloon.chunks == 3
        other = await open_client(host)
        assert (await other.request(CheckBalloon())).handle_in_r3

    async def test_owner_close_walks_the_slots_down(self, host: SimulatedHost) -> None:
        """An inflate takes the lowest free slot of ``paMemObj`` and the close deflates slots
        ``cChunks - 1`` down to 0, so after a deflate out of order the close's order is not
        the inflates' reversed (a, b, c in; a out; d in, to a's slot: c, b, d)."""
        owner = await open_client(host)
        await owner.request(CheckBalloon())
        a, b, c, d = (CHUNK + index * MIB for index in range(4))
        for address in (a, b, c):
            await owner.request(ChangeBalloon(address, True))
        await owner.request(ChangeBalloon(a, False))
        await owner.request(ChangeBalloon(d, True))
        first_page = _first_pages_by_chunk(host)
        deflated = _record_first_pages(host)
        await owner.transport.aclose()
        assert deflated == [first_page[c], first_page[b], first_page[d]]
        assert host.vmmdev.balloon.chunks == 0

    async def test_owner_close_stops_at_a_freed_slot(self, host: SimulatedHost) -> None:
        """A slot below ``cChunks`` freed by a deflate holds NIL: the close sends it (pages
        NIL_RTHCPHYS, not page-aligned), the host refuses, and the walk ends there, leaving
        the chunks of the slots below and at ``cChunks`` and up in the balloon."""
        owner = await open_client(host)
        await owner.request(CheckBalloon())
        a, b, c = (CHUNK + index * MIB for index in range(3))
        for address in (a, b, c):
            await owner.request(ChangeBalloon(address, True))
        await owner.request(ChangeBalloon(a, False))
        first_page = _first_pages_by_chunk(host)
        deflated = _record_first_pages(host)
        await owner.transport.aclose()
        assert deflated == [first_page[b], NIL_PHYS]
        assert host.vmmdev.balloon.chunks == 1  # c's, in slot 2
        other = await open_client(host)
        assert (await other.request(CheckBalloon())).handle_in_r3

    async def test_balloon_event_reaches_userspace(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """BALLOON_CHANGE_REQUEST is delivered to waiters (the agent reacts to it)."""
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.BALLOON_CHANGE_REQUEST, 0))
        host.set_balloon_target(1)
        with trio.fail_after(60):
            reply = await client.request(WaitForEvents(Event.BALLOON_CHANGE_REQUEST))
        assert reply.mask == Event.BALLOON_CHANGE_REQUEST
        await trio.testing.wait_all_tasks_blocked()
        assert host.vmmdev.balloon.chunks == 0

    async def test_driver_keeps_the_heartbeat(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """The Oracle driver beats by itself."""
        await trio.sleep(4.5)
        assert host.vmmdev.heartbeat.beats == 3
