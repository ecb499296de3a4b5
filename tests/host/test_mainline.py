"""Tests of the mainline driver personality through ``SimTransport``.

Rules of this test module:

- Each test runs a real ``SimulatedHost`` (fixture ``host``) with the driver loaded, plus
  the test echo service, and talks to it with encoded ``agent.protocol`` requests or, for
  malformed input, hand-built ioctl buffers.
- Timing runs under ``autojump_clock`` with exact virtual times; each test is bounded by
  ``trio.fail_after`` so a hang fails fast.
- Expected errnos and ``hdr.rc`` values are those of linux-vboxguest.md §5-§12.
"""

from __future__ import annotations

import errno
import struct
from functools import partial
from typing import Final

import pytest
import structlog.testing
import trio
import trio.testing

from agent.host import DriverLoadError, SimulatedHost
from agent.host.driver import _events, _hgcm
from agent.host.driver._core import MAX_ROUTES, VBG_LOG_LINE_MAX
from agent.host.driver.mainline import change_memballoon
from agent.host.hgcm_service import HostU32
from agent.host.memory import IoctlMemory
from agent.protocol import (
    ChangeFilterMask,
    CheckBalloon,
    DriverVersionInfo,
    GetSessionId,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCall,
    HgcmConnect,
    HgcmDisconnect,
    HgcmU32,
    HgcmU64,
    InterruptAllWaits,
    Log,
    VBoxStatusError,
    WaitForEvents,
    WriteCoreDump,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.balloon_pages import CHUNK_PAGES
from agent.protocol.constants import (
    HGCM_MAX_USER_PARM,
    MAX_IOCTL_SIZE,
    Event,
    Facility,
    FacilityStatus,
    HgcmParmType,
    Ioctl,
    RequestType,
)
from agent.protocol.messages import (
    AcquireGuestCapabilities,
    ChangeBalloon,
    ChangeGuestCapabilities,
    ioctl_buffer,
    vmmdev_request_buffer,
)
from agent.protocol.status import (
    VERR_ACCESS_DENIED,
    VERR_GENERAL_FAILURE,
    VERR_HGCM_SERVICE_NOT_FOUND,
    VERR_HGCM_TOO_MANY_CLIENT_CALLS,
    VERR_NOT_SUPPORTED,
    VERR_OUT_OF_RANGE,
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
    user_state_request,
    vmmdev_request,
)

PERSONALITY: Final = "mainline"
U32_MAX: Final = 0xFFFFFFFF
ANYONE_SAMPLE: Final = [
    RequestType.GET_HOST_VERSION,
    RequestType.GET_HOST_TIME,
    RequestType.GET_SESSION_ID,
    RequestType.REPORT_GUEST_STATUS,
    RequestType.GET_MOUSE_STATUS,
    RequestType.ACKNOWLEDGE_EVENTS,
]
TRUSTED_SAMPLE: Final = [
    RequestType.WRITE_COREDUMP,
    RequestType.REPORT_GUEST_STATS,
    RequestType.GET_STATISTICS_CHANGE_REQ,
    RequestType.GET_CPU_HOTPLUG_REQ,
]
DENIED: Final = [
    RequestType.REPORT_GUEST_INFO,
    RequestType.REPORT_GUEST_INFO2,
    RequestType.SET_GUEST_CAPABILITIES,
    RequestType.HGCM_CONNECT,
    RequestType.HGCM_CALL64,
    RequestType.GET_MEMBALLOON_CHANGE_REQ,
    RequestType.CHANGE_MEMBALLOON,
    RequestType.GUEST_HEARTBEAT,
    RequestType.HEARTBEAT_CONFIGURE,
    RequestType.GET_HYPERVISOR_INFO,
    RequestType.NT_BUG_CHECK,
    1234,
]
SIZES: Final[dict[int, int]] = {
    RequestType.GET_HOST_VERSION: 40,
    RequestType.GET_HOST_TIME: 32,
    RequestType.GET_SESSION_ID: 32,
    RequestType.REPORT_GUEST_STATUS: 36,
    RequestType.GET_MOUSE_STATUS: 36,
    RequestType.ACKNOWLEDGE_EVENTS: 28,
    RequestType.WRITE_COREDUMP: 28,
    RequestType.GET_MEMBALLOON_CHANGE_REQ: 36,
    RequestType.CHANGE_MEMBALLOON: 2080,
    RequestType.GUEST_HEARTBEAT: 24,
    RequestType.HEARTBEAT_CONFIGURE: 36,
}


async def passthrough(client: Client, request_type: int) -> bytearray:
    """Send a raw VMMDev request of ``request_type`` through VMMDEV_REQUEST."""
    size = SIZES.get(request_type, 32)
    buf = vmmdev_request(request_type, size)
    L.RequestHeader.reserved1.set(buf, size)
    code = Ioctl.vmmdev_request(size) if size < 1024 else Ioctl.VMMDEV_REQUEST_BIG
    return await client.raw(code, buf)


async def expect_errno(code: int, coro: object) -> None:
    """Await ``coro`` and check it raised ``OSError(code)``."""
    with pytest.raises(OSError, match=r".") as info:
        await coro  # type: ignore[misc]
    assert code == info.value.errno


async def poll(client: Client, mask: int) -> int | None:
    """WAIT_FOR_EVENTS with timeout 0: the events, or ``None`` on ETIMEDOUT."""
    try:
        return (await client.request(WaitForEvents(mask, timeout_ms=0))).mask
    except OSError as exc:
        if exc.errno != errno.ETIMEDOUT:
            raise
        return None


class TestLoad:
    """What the driver does at load."""

    async def test_boot_sequence(self, host: SimulatedHost) -> None:
        """Load reports the additions, the driver facility and the fixed filter."""
        counts = host.vmmdev.request_counts
        for request_type in (
            RequestType.GET_HOST_VERSION,
            RequestType.REPORT_GUEST_INFO2,
            RequestType.REPORT_GUEST_INFO,
            RequestType.CTL_GUEST_FILTER_MASK,
            RequestType.SET_GUEST_CAPABILITIES,
            RequestType.SET_MOUSE_STATUS,
            RequestType.REPORT_GUEST_STATUS,
        ):
            assert counts[request_type] == 1, request_type
        assert counts[RequestType.GET_MEMBALLOON_CHANGE_REQ] == 0
        status = host.status()
        assert status["additions_reported"]
        assert status["filter_mask"] == 0x202
        facilities = status["facilities"]
        assert isinstance(facilities, dict)
        assert facilities[str(Facility.VBOXGUEST_DRIVER)]["status"] == FacilityStatus.ACTIVE
        assert host.vmmdev.guest.additions_version is not None
        assert host.vmmdev.guest.additions_version[:3] == (6, 0, 0)
        assert host.vmmdev.guest.additions_name == ""  # "6.0.0": the version, no tags

    async def test_failed_host_version_stops_the_load(self) -> None:
        """A failing GET_HOST_VERSION makes the driver refuse to load."""
        host = SimulatedHost()
        host.add_fault(RequestType.GET_HOST_VERSION, VERR_NOT_SUPPORTED)
        with trio.fail_after(5), pytest.RaisesGroup(DriverLoadError, flatten_subgroups=True):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
        with pytest.raises(FileNotFoundError):
            host.open_session()

    async def test_info2_fallback(self) -> None:
        """An old host without INFO2 gets INFO first, then INFO2 again."""
        host = SimulatedHost()
        host.add_fault(RequestType.REPORT_GUEST_INFO2, -12)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                assert host.vmmdev.request_counts[RequestType.REPORT_GUEST_INFO2] == 2
                nursery.cancel_scope.cancel()


class TestIoctlEntry:
    """Header checks of ``vbg_misc_device_ioctl`` and ``vbg_core_ioctl``."""

    async def test_short_buffer_faults(self, host: SimulatedHost) -> None:
        """A buffer shorter than the header is EFAULT."""
        client = await open_client(host)
        await expect_errno(errno.EFAULT, client.raw(Ioctl.WAIT_FOR_EVENTS, bytearray(10)))

    @pytest.mark.parametrize(
        ("field", "value", "code"),
        [
            (L.IoctlHeader.version, 0x10000, errno.EINVAL),
            (L.IoctlHeader.size_in, 20, errno.EINVAL),
            (L.IoctlHeader.size_out, 20, errno.EINVAL),
            (L.IoctlHeader.size_out, 40, errno.EINVAL),
            (L.IoctlHeader.type, 4, errno.EINVAL),
            (L.IoctlHeader.size_out, 32, errno.EINVAL),
        ],
    )
    async def test_header_checks(
        self, host: SimulatedHost, field: L.IntField, value: int, code: int
    ) -> None:
        """Bad version, sizes, encoded size or type fail and leave the buffer untouched."""
        client = await open_client(host)
        buf = WaitForEvents(Event.RESTORED, timeout_ms=0).encode().buffer
        field.set(buf, value)
        before = bytes(buf)
        await expect_errno(code, client.raw(Ioctl.WAIT_FOR_EVENTS, buf))
        assert before == bytes(buf)

    async def test_too_big(self, host: SimulatedHost) -> None:
        """Buffers over 16 MiB are E2BIG, before anything is copied."""
        client = await open_client(host)
        buf = ioctl_buffer(24, 24)
        L.IoctlHeader.size_in.set(buf, MAX_IOCTL_SIZE + 1)
        await expect_errno(errno.E2BIG, client.raw(Ioctl.VMMDEV_REQUEST_BIG, buf))

    async def test_input_beyond_the_buffer_faults(self, host: SimulatedHost) -> None:
        """A size_in beyond the user's buffer is EFAULT."""
        client = await open_client(host)
        buf = ioctl_buffer(64, 64)[:40]
        await expect_errno(errno.EFAULT, client.raw(Ioctl.VMMDEV_REQUEST_BIG, buf))

    @pytest.mark.parametrize(
        "code",
        [Ioctl.CHANGE_BALLOON, Ioctl.hgcm_call_32(40), 0xC0185601, 0xC0185699],
    )
    async def test_unknown_ioctls(self, host: SimulatedHost, code: int) -> None:
        """CHANGE_BALLOON, 32-bit HGCM calls and unknown numbers are ENOTTY."""
        client = await open_client(host)
        buf = ioctl_buffer(24, 24) + bytearray(max(0, ((code >> 16) & 0x3FFF) - 24))
        L.IoctlHeader.size_in.set(buf, len(buf))
        L.IoctlHeader.size_out.set(buf, len(buf))
        await expect_errno(errno.ENOTTY, client.raw(code, buf))

    async def test_made_up_sizes_do_not_grow_the_driver(self, host: SimulatedHost) -> None:
        """Sized numbers a client makes up (each refused) leave at most ``MAX_ROUTES``
        remembered, and an ioctl the table has no room for still goes through."""
        client = await open_client(host)
        for size in range(64, 64 + 2 * MAX_ROUTES):
            buf = ioctl_buffer(24, 24)
            await expect_errno(errno.EINVAL, client.raw(Ioctl.vmmdev_request(size), buf))
        assert len(model_driver(host)._routes) == MAX_ROUTES
        await client.request(Log(b"a size not seen before"))
        assert model_driver(host).log_messages[-1] == b"a size not seen before"

    async def test_closed_session(self, host: SimulatedHost) -> None:
        """A closed transport answers EBADF."""
        client = await open_client(host)
        await client.transport.aclose()
        await client.transport.aclose()
        await expect_errno(errno.EBADF, client.request(GetSessionId()))

    async def test_driver_version(self, host: SimulatedHost) -> None:
        """Version 1.0 is agreed; a newer minimum is VERR_VERSION_MISMATCH in rc."""
        client = await open_client(host)
        reply = await client.request(DriverVersionInfo())
        assert (reply.session_version, reply.driver_version) == (0x10000, 0x10000)
        with pytest.raises(VBoxStatusError) as info:
            await client.request(DriverVersionInfo(0x10001, 0x10001))
        assert info.value.rc == VERR_VERSION_MISMATCH
        for req, minimum in ((0x10000, 0x10001), (0x20000, 0x10000)):
            await expect_errno(errno.EINVAL, client.request(DriverVersionInfo(req, minimum)))

    async def test_log_keeps_what_vbg_log_buf_holds(self, host: SimulatedHost) -> None:
        """A long LOG message is recorded as mainline prints it, cut to its 128-byte
        ``vbg_log_buf``: the simulator kept and logged every message whole (64 of 16 MiB
        held a gigabyte, each a 16 MiB log line)."""
        client = await open_client(host)
        await client.request(Log(b"y" * (1 << 20)))
        assert model_driver(host).log_messages[-1] == b"y" * VBG_LOG_LINE_MAX

    async def test_log(self, host: SimulatedHost) -> None:
        """LOG records the message; size_out other than 24 is EINVAL."""
        client = await open_client(host)
        await client.request(Log(b"hello host"))
        assert model_driver(host).log_messages[-1] == b"hello host"
        await client.request(Log(b"before\0after"))
        assert model_driver(host).log_messages[-1] == b"before"
        buf = Log(b"x").encode().buffer
        L.IoctlHeader.size_out.set(buf, 0)
        await expect_errno(errno.EINVAL, client.raw(Ioctl.LOG, buf))

    async def test_core_dump_from_vboxuser(self, host: SimulatedHost) -> None:
        """WRITE_CORE_DUMP is open to /dev/vboxuser; the host refuses by default."""
        client = await open_client(host, user_device=True, uid=1000)
        with pytest.raises(VBoxStatusError) as info:
            await client.request(WriteCoreDump())
        assert info.value.rc == VERR_ACCESS_DENIED


class TestInterrupts:
    """``vbg_core_isr``."""

    async def test_the_isr_sends_acknowledge_events(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """Mainline acknowledges with the request even though the host offers the fast
        port; a refused acknowledgement is tried again while the line stays up."""
        client = await open_client(host)
        mask = Event.MOUSE_CAPABILITIES_CHANGED
        await client.request(ChangeFilterMask(mask, 0))
        counts = host.vmmdev.request_counts
        before = counts[RequestType.ACKNOWLEDGE_EVENTS]
        host.add_fault(RequestType.ACKNOWLEDGE_EVENTS, VERR_NOT_SUPPORTED)
        host.raise_events(mask)
        assert (await client.request(WaitForEvents(mask, timeout_ms=10_000))).mask == mask
        assert counts[RequestType.ACKNOWLEDGE_EVENTS] == before + 2


class TestWaits:
    """``vbg_ioctl_wait_for_events``."""

    async def test_a_cancel_before_the_waiter_runs_wins(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """The waiter takes events only when it runs, and checks ``cancel_waiters`` first:
        a cancel right after the ISR ends the wait with EINTR and leaves the events pending
        for another session's wait (Oracle's driver hands them over in the ISR)."""
        client, other = await open_client(host), await open_client(host)
        driver = model_driver(host)
        mask = Event.STATISTICS_INTERVAL_CHANGE_REQUEST
        errors: list[int | None] = []
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                with pytest.raises(OSError, match=r".") as info:
                    await client.request(WaitForEvents(mask, timeout_ms=10_000))
                errors.append(info.value.errno)

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            driver.route_events(mask)
            cancel = InterruptAllWaits().encode().buffer
            await _events.interrupt_all(driver, client.transport.session, cancel, IoctlMemory())
        assert errors == [errno.EINTR]
        assert await poll(other, mask) == mask

    async def test_the_callers_cancel_leaves_the_events_pending(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """A signal (the caller's cancel) ends the wait even if the ISR ran before the
        waiter: nothing was consumed, so the events stay pending (Oracle's driver returns
        them instead)."""
        client = await open_client(host)
        driver = model_driver(host)
        mask = Event.STATISTICS_INTERVAL_CHANGE_REQUEST
        await client.request(ChangeFilterMask(mask, 0))
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                with scope:
                    await client.request(WaitForEvents(mask, timeout_ms=10_000))

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()  # the signal: the waiter's park is aborted; it has not run yet
            driver.route_events(mask)  # the ISR runs first
        assert scope.cancelled_caught
        assert await poll(client, mask) == mask


class TestPassthroughPolicy:
    """``vbg_req_allowed`` for /dev/vboxguest and /dev/vboxuser sessions."""

    @pytest.mark.parametrize("request_type", ANYONE_SAMPLE)
    @pytest.mark.parametrize("user_device", [False, True])
    async def test_anyone(self, host: SimulatedHost, request_type: int, user_device: bool) -> None:
        """Requests open to anyone reach the host from either node."""
        client = await open_client(host, user_device=user_device)
        buf = await passthrough(client, request_type)
        assert L.RequestHeader.rc.get(buf) != -1

    @pytest.mark.parametrize("request_type", TRUSTED_SAMPLE)
    async def test_trusted_only(self, host: SimulatedHost, request_type: int) -> None:
        """Trusted-only requests pass on /dev/vboxguest and are EPERM on /dev/vboxuser."""
        trusted = await open_client(host)
        await passthrough(trusted, request_type)
        user = await open_client(host, user_device=True)
        await expect_errno(errno.EPERM, passthrough(user, request_type))

    async def test_user_state_reaches_the_host(self, host: SimulatedHost) -> None:
        """REPORT_GUEST_USER_STATE is trusted-only, and the host takes it."""
        req = user_state_request()
        L.RequestHeader.reserved1.set(req, len(req))
        user = await open_client(host, user_device=True)
        await expect_errno(errno.EPERM, user.raw(Ioctl.vmmdev_request(len(req)), bytearray(req)))
        trusted = await open_client(host)
        await trusted.raw(Ioctl.vmmdev_request(len(req)), req)
        assert L.RequestHeader.rc.get(req) == VINF_SUCCESS
        assert [state.user for state in host.vmmdev.user_states] == [b"alice"]

    @pytest.mark.parametrize("request_type", DENIED)
    async def test_denied(self, host: SimulatedHost, request_type: int) -> None:
        """Kernel-only and unknown requests are EPERM even for root on /dev/vboxguest."""
        client = await open_client(host)
        await expect_errno(errno.EPERM, passthrough(client, request_type))

    async def test_a_denial_is_logged_readably(self, host: SimulatedHost) -> None:
        """The host's line names the request and says which session asked, in words (it
        gave the request's number and the session's Python repr)."""
        client = await open_client(host, user_device=True, uid=1000)
        with structlog.testing.capture_logs() as logs:
            await expect_errno(
                errno.EPERM, passthrough(client, RequestType.GET_STATISTICS_CHANGE_REQ)
            )
            await expect_errno(errno.EPERM, passthrough(client, 1234))
        denied = [
            (entry["request"], entry["session"])
            for entry in logs
            if entry["event"] == "vmm_request_denied"
        ]
        session = "/dev/vboxuser opened by uid 1000 (requestor 0x800e)"
        assert denied == [("GET_STATISTICS_CHANGE_REQ", session), ("1234", session)]

    @pytest.mark.parametrize(
        ("facility", "trusted", "user"),
        [
            (Facility.ALL, errno.EPERM, errno.EPERM),
            (Facility.VBOXGUEST_DRIVER, errno.EPERM, errno.EPERM),
            (Facility.VBOX_SERVICE, 0, errno.EPERM),
            (Facility.SEAMLESS, 0, 0),
            (0x1, 0, 0),
        ],
    )
    async def test_report_capabilities_quirk(
        self, host: SimulatedHost, facility: int, trusted: int, user: int
    ) -> None:
        """REPORT_GUEST_CAPABILITIES is judged by its caps read as a facility."""
        for user_device, expected in ((False, trusted), (True, user)):
            client = await open_client(host, user_device=user_device)
            buf = vmmdev_request_buffer(RequestType.REPORT_GUEST_CAPABILITIES, 28)
            L.GuestStatusRequest.facility.set(buf, facility)
            if expected:
                await expect_errno(expected, client.raw(Ioctl.vmmdev_request(28), buf))
            else:
                await client.raw(Ioctl.vmmdev_request(28), buf)
                assert L.RequestHeader.rc.get(buf) == VINF_SUCCESS

    async def test_header_quirks(
        self, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The host sees reserved1 = size_out and the user's reserved field as requestor."""
        seen: list[bytes] = []
        process = host.vmmdev.process

        def spy(phys: int) -> None:
            seen.append(host.ram.read(phys, 24))
            process(phys)

        monkeypatch.setattr(host.vmmdev, "process", spy)
        client = await open_client(host)
        buf = vmmdev_request_buffer(RequestType.GET_SESSION_ID, 32)
        L.IoctlHeader.reserved.set(buf, 0x1234)
        await client.raw(Ioctl.vmmdev_request(32), buf)
        header = seen[-1]
        assert struct.unpack_from("<II", header, 16) == (32, 0x1234)

    async def test_passthrough_checks(self, host: SimulatedHost) -> None:
        """size_in != size_out, type 0 and > 1 MiB are refused before the policy."""
        client = await open_client(host)
        buf = vmmdev_request_buffer(RequestType.GET_SESSION_ID, 32)
        L.IoctlHeader.size_out.set(buf, 28)
        await expect_errno(errno.EINVAL, client.raw(Ioctl.VMMDEV_REQUEST_BIG, buf))
        buf = vmmdev_request_buffer(RequestType.GET_SESSION_ID, 32)
        L.IoctlHeader.type.set(buf, 0)
        await expect_errno(errno.EINVAL, client.raw(Ioctl.vmmdev_request(32), buf))
        big = (1 << 20) + 8
        buf = vmmdev_request_buffer(RequestType.GET_SESSION_ID, big)
        await expect_errno(errno.E2BIG, client.raw(Ioctl.VMMDEV_REQUEST_BIG, buf))

    async def test_host_rc_comes_back(self, host: SimulatedHost) -> None:
        """A host failure is ioctl success with the VBox status in rc."""
        host.add_fault(RequestType.GET_SESSION_ID, VERR_ACCESS_DENIED)
        client = await open_client(host)
        with pytest.raises(VBoxStatusError) as info:
            await client.request(GetSessionId())
        assert info.value.rc == VERR_ACCESS_DENIED


class TestEvents:
    """Waits, interrupts, the per-session filter and the global pending set."""

    async def test_kernel_events_never_reach_userspace(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """HGCM, BALLOON and MOUSE_POSITION are consumed by the kernel."""
        client = await open_client(host)
        kernel = Event.HGCM | Event.BALLOON_CHANGE_REQUEST | Event.MOUSE_POSITION_CHANGED
        await client.request(ChangeFilterMask(kernel, 0))
        host.raise_events(kernel)
        await trio.testing.wait_all_tasks_blocked()
        assert None is await poll(client, kernel)

    async def test_pending_events_go_to_the_first_waiter(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """An event raised before anyone waits goes to exactly one waiter, in any session."""
        first, second = await open_client(host), await open_client(host)
        await first.request(ChangeFilterMask(Event.RESTORED, 0))
        host.raise_events(Event.RESTORED)
        await trio.testing.wait_all_tasks_blocked()
        assert await poll(second, Event.RESTORED | Event.VRDP) == Event.RESTORED
        assert None is await poll(first, Event.RESTORED)

    async def test_blocked_waiter_wakes(self, host: SimulatedHost, autojump_clock: object) -> None:
        """A waiter blocked without timeout wakes when its event arrives."""
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.VRDP, 0))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 5)
                async with trio.open_nursery() as inner:
                    inner.start_soon(self._raise_later, host)
                    reply = await client.request(WaitForEvents(Event.VRDP))
        assert reply.mask == Event.VRDP
        assert trio.current_time() == 5.0

    @staticmethod
    async def _raise_later(host: SimulatedHost) -> None:
        await trio.sleep(5)
        host.raise_events(Event.VRDP)

    async def test_timeout_at_the_exact_time(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """A 1500 ms wait ends with ETIMEDOUT after exactly 1.5 s."""
        client = await open_client(host)
        start = trio.current_time()
        await expect_errno(errno.ETIMEDOUT, client.request(WaitForEvents(Event.VRDP, 1500)))
        assert trio.current_time() - start == 1.5

    async def test_interrupt_is_sticky(self, host: SimulatedHost, autojump_clock: object) -> None:
        """INTERRUPT_ALL ends the wait with EINTR and every later wait on that session too."""
        waiter, other = await open_client(host), await open_client(host)
        await other.request(ChangeFilterMask(Event.VRDP, 0))
        results: list[int] = []

        async def wait(client: Client) -> None:
            try:
                await client.request(WaitForEvents(Event.VRDP))
            except OSError as exc:
                results.append(exc.errno or 0)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, waiter)
                nursery.start_soon(wait, other)
                await trio.testing.wait_all_tasks_blocked()
                await waiter.request(InterruptAllWaits())
                await trio.testing.wait_all_tasks_blocked()
                assert results == [errno.EINTR]
                host.raise_events(Event.VRDP)
        buf = WaitForEvents(Event.VRDP, 0).encode().buffer
        host.raise_events(Event.VRDP)
        await expect_errno(errno.EINTR, waiter.raw(Ioctl.WAIT_FOR_EVENTS, buf))

    async def test_filter_is_refcounted(self, host: SimulatedHost) -> None:
        """The host mask is 0x202 | the union of the sessions' filters."""
        first, second = await open_client(host), await open_client(host)
        await first.request(ChangeFilterMask(Event.RESTORED, 0))
        await second.request(ChangeFilterMask(Event.RESTORED | Event.VRDP, 0))
        assert host.status()["filter_mask"] == 0x202 | 0x110
        await second.transport.aclose()
        assert host.status()["filter_mask"] == 0x212
        await first.request(ChangeFilterMask(0, Event.RESTORED))
        assert host.status()["filter_mask"] == 0x202

    async def test_filter_checks_and_failure(self, host: SimulatedHost) -> None:
        """Bits outside 0x7FF are EINVAL; a host failure maps to errno and rolls back."""
        client = await open_client(host)
        buf = ChangeFilterMask(0, 0).encode().buffer
        L.ChangeFilterIoctl.or_mask.set(buf, 0x800)
        await expect_errno(errno.EINVAL, client.raw(Ioctl.CHANGE_FILTER_MASK, buf))
        host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_NOT_SUPPORTED)
        await expect_errno(errno.ENOSYS, client.request(ChangeFilterMask(Event.VRDP, 0)))
        assert model_driver(host).filter_tracker.mask == 0
        await client.request(ChangeFilterMask(Event.VRDP, 0))
        assert host.status()["filter_mask"] == 0x302


class TestCapabilities:
    """Set mode, acquire mode and the events acquire mode hides."""

    async def test_set_and_acquire(self, host: SimulatedHost, autojump_clock: object) -> None:
        """Set caps are reported; acquire-mode caps are exclusive and hide their event."""
        first, second = await open_client(host), await open_client(host)
        caps = await first.request(ChangeGuestCapabilities(0x1, 0))
        assert (caps.session_caps, caps.global_caps) == (0x1, 0x1)
        assert host.vmmdev.guest.capabilities == 0x1
        await expect_errno(errno.EINVAL, first.request(AcquireGuestCapabilities(0x1, 0)))
        await first.request(AcquireGuestCapabilities(0x4, 0, flags=1))
        await expect_errno(errno.EBUSY, second.request(ChangeGuestCapabilities(0x4, 0)))
        await first.request(AcquireGuestCapabilities(0x4, 0))
        await expect_errno(errno.EBUSY, second.request(AcquireGuestCapabilities(0x4, 0)))
        assert host.vmmdev.guest.capabilities == 0x5
        await second.request(ChangeFilterMask(Event.DISPLAY_CHANGE_REQUEST, 0))
        host.raise_events(Event.DISPLAY_CHANGE_REQUEST)
        await trio.testing.wait_all_tasks_blocked()
        assert None is await poll(second, Event.DISPLAY_CHANGE_REQUEST)
        assert await poll(first, Event.DISPLAY_CHANGE_REQUEST) == Event.DISPLAY_CHANGE_REQUEST
        await first.transport.aclose()
        assert host.vmmdev.guest.capabilities == 0


class TestHgcm:
    """HGCM connect, disconnect and calls through the driver."""

    async def test_call_round_trip(self, host: SimulatedHost) -> None:
        """User buffers go to the service and the results come back."""
        client = await open_client(host)
        connected = await client.request(HgcmConnect(ECHO))
        params = (HgcmBufferIn(b"ping\0"), HgcmBufferOut(16), HgcmU32(0))
        reply = await client.request(HgcmCall(connected.client_id, FN_ECHO, params))
        assert reply.status == VINF_SUCCESS
        # The host leaves the out-buffer's size as sent: all 16 bytes come back.
        assert reply.params[1].data == b"ping\0" + bytes(11)  # type: ignore[union-attr]
        assert HgcmU32(5) == reply.params[2]
        await client.request(HgcmDisconnect(connected.client_id))
        assert host.status()["hgcm_clients"] == 0

    async def test_made_up_signatures_do_not_grow_the_driver(
        self, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Parameter-type signatures a client makes up leave at most ``MAX_PLANS`` plans
        remembered, and a call whose signature the table has no room for still goes
        through, its buffers too."""
        monkeypatch.setattr(_hgcm, "_PLANS", {})
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        for signature in range(2 * _hgcm.MAX_PLANS):
            made_up = tuple(HgcmU64(0) if signature >> bit & 1 else HgcmU32(0) for bit in range(9))
            reply = await client.request(HgcmCall(client_id, FN_FAIL, (HgcmU32(0), *made_up)))
            assert reply.status == VINF_SUCCESS
        assert len(_hgcm._PLANS) == _hgcm.MAX_PLANS
        params = (HgcmBufferIn(b"ping\0"), HgcmBufferOut(16), HgcmU32(0))
        reply = await client.request(HgcmCall(client_id, FN_ECHO, params))
        assert reply.params[1].data == b"ping\0" + bytes(11)  # type: ignore[union-attr]
        assert HgcmU32(5) == reply.params[2]

    async def test_call_waits_for_a_held_session_mutex(self, host: SimulatedHost) -> None:
        """The client-id check runs under the session mutex: while another task holds it
        (a capability change waiting for the host, say), a call sleeps, then goes on."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        replies: list[object] = []

        async def call() -> None:
            params = (HgcmBufferIn(b"ping\0"), HgcmBufferOut(16), HgcmU32(0))
            replies.append(await client.request(HgcmCall(client_id, FN_ECHO, params)))

        async with trio.open_nursery() as nursery, model_driver(host).session_mutex:
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert replies == []
            assert host.status()["hgcm_pending_calls"] == 0
        assert len(replies) == 1

    async def test_unknown_service(self, host: SimulatedHost) -> None:
        """An unknown service is VERR_HGCM_SERVICE_NOT_FOUND in hdr.rc, client id 0."""
        client = await open_client(host)
        call = HgcmConnect("NoSuchService").encode()
        await client.raw(call.code, call.buffer)
        assert L.IoctlHeader.rc.get(call.buffer) == VERR_HGCM_SERVICE_NOT_FOUND
        assert L.HgcmConnectIoctl.client_id.get(call.buffer) == 0

    async def test_64_clients_per_session(self, host: SimulatedHost) -> None:
        """The 65th connect of one session is EMFILE; other sessions are unaffected."""
        client = await open_client(host)
        for _ in range(64):
            await client.request(HgcmConnect(ECHO))
        call = HgcmConnect(ECHO).encode()
        await expect_errno(errno.EMFILE, client.raw(call.code, call.buffer))
        other = await open_client(host)
        await other.request(HgcmConnect(ECHO))
        await client.transport.aclose()
        assert host.status()["hgcm_clients"] == 1

    async def test_a_connect_that_fails_in_the_driver_gives_its_slot_back(
        self, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A connect whose request fails with an errno (here ENOMEM: the driver could not
        allocate it) frees the slot it took, as ``vbg_ioctl_hgcm_connect`` does on every
        failure: the session still connects 64 clients."""
        client = await open_client(host)

        async def no_memory(*args: object) -> tuple[int, int]:
            raise OSError(errno.ENOMEM, "no memory for the request")

        with monkeypatch.context() as patch:
            patch.setattr(_hgcm, "host_connect", no_memory)
            call = HgcmConnect(ECHO).encode()
            await expect_errno(errno.ENOMEM, client.raw(call.code, call.buffer))
        for _ in range(64):
            await client.request(HgcmConnect(ECHO))
        assert host.status()["hgcm_clients"] == 64

    async def test_call_validation_order(self, host: SimulatedHost) -> None:
        """>32 parameters is E2BIG; bad ids, short buffers and kernel types are EINVAL."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        many = HgcmCall(client_id, FN_ECHO, tuple(HgcmU32(0) for _ in range(32))).encode()
        L.HgcmCallIoctl.parm_count.set(many.buffer, 33)
        await expect_errno(errno.E2BIG, client.raw(many.code, many.buffer))
        mutations: list[tuple[L.IntField, int, int]] = [
            (L.HgcmCallIoctl.client_id, 0, 0),
            (L.HgcmCallIoctl.client_id, 0, client_id + 100),
            (L.HgcmCallIoctl.parm_count, 0, 2),
            (L.HgcmParameter64.type, 40, HgcmParmType.PAGELIST),
            (L.IoctlHeader.size_out, 0, 24),
        ]
        for field, base, value in mutations:
            call = HgcmCall(client_id, FN_ECHO, (HgcmU32(0),)).encode()
            field.set(memoryview(call.buffer)[base:], value)
            await expect_errno(errno.EINVAL, client.raw(call.code, call.buffer))

    async def test_oversized_buffer_is_out_of_range(self, host: SimulatedHost) -> None:
        """A user buffer over 24 MiB is VERR_OUT_OF_RANGE in hdr.rc, not an errno."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        call = HgcmCall(client_id, FN_ECHO, (HgcmU32(0),)).encode()
        view = memoryview(call.buffer)[40:]
        L.HgcmParameter64.type.set(view, HgcmParmType.LINADDR_IN)
        L.HgcmParameter64.pointer_size.set(view, HGCM_MAX_USER_PARM + 1)
        await client.raw(call.code, call.buffer)
        assert L.IoctlHeader.rc.get(call.buffer) == VERR_OUT_OF_RANGE

    async def test_bad_user_address_faults(self, host: SimulatedHost) -> None:
        """A user buffer address that maps nothing is EFAULT."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        call = HgcmCall(client_id, FN_ECHO, (HgcmU32(0),)).encode()
        view = memoryview(call.buffer)[40:]
        L.HgcmParameter64.type.set(view, HgcmParmType.LINADDR)
        L.HgcmParameter64.pointer_size.set(view, 16)
        L.HgcmParameter64.pointer_linear_addr.set(view, 0xDEAD0000)
        await expect_errno(errno.EFAULT, client.raw(call.code, call.buffer))

    async def test_timeout_cancels_at_the_host(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """A held call times out with ETIMEDOUT at timeout_ms, cancelled at the host."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        start = trio.current_time()
        with trio.fail_after(60):
            await expect_errno(
                errno.ETIMEDOUT, client.request(HgcmCall(client_id, FN_HOLD, (), timeout_ms=2500))
            )
        assert trio.current_time() - start == 2.5
        assert len(echo.cancelled) == 1
        assert host.vmmdev.hgcm.pending_calls == 0

    async def test_interrupted_call_is_cancelled(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """Cancelling the calling task cancels the call at the host."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        with trio.move_on_after(3) as scope:
            await client.request(HgcmCall(client_id, FN_HOLD, ()))
        assert scope.cancelled_caught
        assert len(echo.cancelled) == 1
        assert host.vmmdev.request_counts[RequestType.HGCM_CANCEL2] == 1

    async def test_completion_after_a_wait(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """A call the service completes later returns its status and values."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id

        async def complete_later() -> None:
            await trio.sleep(7)
            param = echo.held[0].params[0]
            assert isinstance(param, HostU32)
            param.value = 99
            echo.held[0].complete(3)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(complete_later)
                reply = await client.request(HgcmCall(client_id, FN_HOLD, (HgcmU32(1),)))
        assert (3, (HgcmU32(99),)) == (reply.status, reply.params)

    async def test_pending_call_limit(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """The call that would make the per-client limit pending is -2909 in hdr.rc."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(echo.max_calls - 1):
                    nursery.start_soon(client.request, HgcmCall(client_id, FN_HOLD, ()))
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(VBoxStatusError) as info:
                    await client.request(HgcmCall(client_id, FN_HOLD, ()))
                assert info.value.rc == VERR_HGCM_TOO_MANY_CLIENT_CALLS
                for call in list(echo.held):
                    call.complete(VINF_SUCCESS)

    async def test_disconnect_checks(self, host: SimulatedHost) -> None:
        """Disconnecting 0, ~0 or another session's client is EINVAL."""
        client, other = await open_client(host), await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        for bad in (0, U32_MAX, client_id):
            buf = ioctl_buffer(28, 24)
            L.HgcmDisconnectIoctl.client_id.set(buf, bad)
            await expect_errno(errno.EINVAL, other.raw(Ioctl.HGCM_DISCONNECT, buf))

    async def test_a_signal_in_the_grace_after_a_timeout_does_not_end_it(
        self, personality: str
    ) -> None:
        """After a call's timeout, a cancel the host cannot find (VERR_NOT_FOUND) is followed
        by a grace wait for DONE that no signal ends (``vbg_hgcm_do_call``:
        ``wait_event_timeout``, 500 ms): a call the host completes in it returns its reply,
        a signal meanwhile notwithstanding. The real driver (``kernel``) is the reference."""
        echo = EchoService(max_calls=16)
        host = SimulatedHost(personality=personality, services=[echo])
        reply = await signal_in_the_grace_after_a_timeout(host, echo)
        assert reply is not None, "the signal ended the grace wait"
        assert (reply.status, reply.params) == (VINF_SUCCESS, (HgcmU32(77),))

    async def test_a_connect_cancelled_while_the_table_is_locked_is_the_sessions(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """A client the host connected goes into the session's table under ``mutex_lock``,
        which no signal interrupts: a connect cancelled while another task holds the mutex
        is the session's all the same, and the session's close disconnects it."""
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
        """A disconnect the host refused gives the client its slot back under ``mutex_lock``,
        which no signal interrupts: cancelled while another task holds the mutex, the client
        is still the session's, and the session's close disconnects it."""
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


class TestKernelBalloon:
    """The kernel-owned balloon and CHECK_BALLOON."""

    async def test_balloon_needs_a_filtering_session(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """Without a session filtering 0x40 the host never tells the driver."""
        host.set_balloon_target(8)
        await trio.sleep(1)
        assert host.vmmdev.balloon.chunks == 0
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.BALLOON_CHANGE_REQUEST, 0))
        await trio.sleep(1)
        assert host.vmmdev.balloon.chunks == 8
        assert tuple(vars_of(await client.request(CheckBalloon()))) == (8, False)
        assert None is await poll(client, Event.BALLOON_CHANGE_REQUEST)

    async def test_inflate_and_deflate(self, host: SimulatedHost, autojump_clock: object) -> None:
        """The driver follows the target chunk by chunk with distinct pages."""
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.BALLOON_CHANGE_REQUEST, 0))
        host.set_balloon_target(12)
        await trio.sleep(1)
        assert (host.vmmdev.balloon.chunks, host.vmmdev.balloon.pages) == (12, 12 * 256)
        host.set_balloon_target(3)
        await trio.sleep(1)
        assert host.vmmdev.balloon.chunks == 3
        balloon = host.status()["balloon"]
        assert isinstance(balloon, dict)
        assert (balloon["target_mb"], balloon["acked_mb"]) == (3, 3)

    async def test_a_chunk_other_than_one_page_array_is_not_sent(self, host: SimulatedHost) -> None:
        """CHANGE_MEMBALLOON's page array is filled in place: a chunk of another length
        raises before the request changes size or reaches the host."""
        driver = model_driver(host)
        size = L.MemBalloonChangeRequest.size
        req = driver.alloc_request(RequestType.CHANGE_MEMBALLOON, size)
        with pytest.raises(ValueError, match="memoryview"):
            await change_memballoon(driver, req, bytes(CHUNK_PAGES.size - 8), inflate=True)
        assert (len(req), host.vmmdev.request_counts[RequestType.CHANGE_MEMBALLOON]) == (size, 0)

    async def test_stops_at_the_first_error(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """A host refusing a chunk stops the work until the next event."""
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.BALLOON_CHANGE_REQUEST, 0))
        host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NOT_SUPPORTED)
        host.set_balloon_target(4)
        await trio.sleep(1)
        assert host.vmmdev.balloon.chunks == 0
        host.set_balloon_target(5)
        await trio.sleep(1)
        assert host.vmmdev.balloon.chunks == 5

    async def test_change_balloon_is_not_a_mainline_ioctl(self, host: SimulatedHost) -> None:
        """CHANGE_BALLOON (ioctl 18) is ENOTTY."""
        client = await open_client(host)
        await expect_errno(errno.ENOTTY, client.request(ChangeBalloon(0x7F00_0000_0000, True)))


def vars_of(status: object) -> tuple[object, ...]:
    """The fields of a slotted dataclass reply, in order."""
    return tuple(getattr(status, name) for name in status.__slots__)  # type: ignore[attr-defined]


class TestKernelHeartbeat:
    """The driver beats at the host interval by itself."""

    async def test_beats_at_the_interval(self, autojump_clock: object) -> None:
        """Beats come at 0, 2, 4, ... s and the guest never flat-lines."""
        host = SimulatedHost()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                await trio.sleep(10.5)
                heartbeat = host.status()["heartbeat"]
                assert isinstance(heartbeat, dict)
                assert (
                    heartbeat["enabled"],
                    heartbeat["beats"],
                    heartbeat["flatlined"],
                ) == (True, 6, False)
                assert heartbeat["max_gap_ns"] == 2_000_000_000
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("answers", "configures"),
        [
            pytest.param((-12,), 1, id="off-refused-so-no-on"),
            pytest.param((VINF_SUCCESS, -12), 2, id="on-refused"),
        ],
    )
    async def test_refused_configure_means_no_heartbeat(
        self, autojump_clock: object, answers: tuple[int, ...], configures: int
    ) -> None:
        """A refused configure ends the set-up there, as in ``vbg_heartbeat_init``: a refused
        first one (off) sends no second (on); either way the host's check stays off and the
        driver never beats."""
        host = SimulatedHost()
        for rc in answers:
            host.add_fault(RequestType.HEARTBEAT_CONFIGURE, rc, count=1)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                await trio.sleep(10)
                assert host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE] == configures
                assert (host.vmmdev.heartbeat.active, host.vmmdev.heartbeat.beats) == (False, 0)
                nursery.cancel_scope.cancel()
