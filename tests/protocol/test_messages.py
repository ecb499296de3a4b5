"""Typed requests: golden encodings, decoding, and every error they raise.

Rules of this test module:

- Expected bytes are built with ``struct.pack`` from the reference's offsets
  (linux-vboxguest.md §2, §5.3, §12.2), never with ``layouts``.
- Ioctl buffers start with ``rc = VERR_INTERNAL_ERROR`` (-225); VMMDev requests with
  ``rc = VERR_GENERAL_FAILURE`` (-1) and ``reserved1 = size``, as the codec documents.
- Replies are written by hand into the encoded buffer with ``struct.pack_into``.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from agent.protocol.balloon_pages import ChunkPages
from agent.protocol.constants import (
    HGCM_MAX_USER_PARM,
    MAX_IOCTL_SIZE,
    CpuEventType,
    CpuStatusType,
    Facility,
    FacilityStatus,
)
from agent.protocol.errors import LocalProtocolError, RemoteProtocolError, VBoxStatusError
from agent.protocol.messages import (
    AcquireGuestCapabilities,
    BalloonStatus,
    BalloonTarget,
    ChangeBalloon,
    ChangeBalloonProbe,
    ChangeFilterMask,
    ChangeGuestCapabilities,
    ChangeMemBalloon,
    CheckBalloon,
    CpuHotPlugEvent,
    DriverVersion,
    DriverVersionInfo,
    EventsReceived,
    GetCpuHotPlugRequest,
    GetHostTime,
    GetHostVersion,
    GetMemBalloonChangeRequest,
    GetSessionId,
    GetStatisticsChangeRequest,
    GuestCapabilities,
    GuestHeartbeat,
    GuestStatistics,
    HeartbeatConfigure,
    HeartbeatSettings,
    HgcmBuffer,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCall,
    HgcmCallError,
    HgcmConnect,
    HgcmConnected,
    HgcmData,
    HgcmDisconnect,
    HgcmReply,
    HgcmU32,
    HgcmU64,
    HostTime,
    HostVersion,
    InterruptAllWaits,
    IoctlCall,
    Log,
    PreparedHgcmCall,
    ReportGuestStats,
    ReportGuestStatus,
    Request,
    SessionId,
    SetCpuHotPlugStatus,
    StatisticsInterval,
    UserBuffer,
    WaitForEvents,
    WriteCoreDump,
)

PAGES = tuple(0x10_0000 + 0x1000 * index for index in range(256))
HGCM_CALL = HgcmCall(
    client_id=5,
    function=3,
    params=(
        HgcmU32(7),
        HgcmU64(1 << 40),
        HgcmBufferIn(b"ab\0"),
        HgcmBufferOut(16),
        HgcmBuffer(b"xyz"),
        HgcmBufferIn(b""),
    ),
    timeout_ms=500,
)


def ioctl_header(size_in: int, size_out: int, rc: int = -225) -> bytes:
    """Return ``struct vbg_ioctl_hdr`` as the agent sends it."""
    return struct.pack("<IIIiII", size_in, 0x10001, 0, rc, size_out, 0)


def request_header(size: int, request_type: int, rc: int = -1) -> bytes:
    """Return ``struct vmmdev_request_header`` as the passthrough recipe sends it."""
    return struct.pack("<IIIiII", size, 0x10001, request_type, rc, size, 0)


def _parm(type_: int, fmt: str, *values: int) -> bytes:
    return struct.pack("<I" + fmt, type_, *values).ljust(16, b"\0")


GOLDEN: list[tuple[str, Request[Any], int, bytes]] = [
    (
        "driver_version_info",
        DriverVersionInfo(),
        0xC02C5600,
        ioctl_header(40, 44) + struct.pack("<IIII", 0x10000, 0x10000, 0, 0) + bytes(4),
    ),
    (
        "wait_for_events",
        WaitForEvents(mask=0x42, timeout_ms=1000),
        0xC020560A,
        ioctl_header(32, 28) + struct.pack("<II", 1000, 0x42),
    ),
    (
        "wait_for_events_forever",
        WaitForEvents(mask=0x40),
        0xC020560A,
        ioctl_header(32, 28) + struct.pack("<II", 0xFFFFFFFF, 0x40),
    ),
    ("interrupt_all", InterruptAllWaits(), 0xC018560B, ioctl_header(24, 24)),
    (
        "change_filter_mask",
        ChangeFilterMask(or_mask=0x40, not_mask=0x2),
        0xC020560C,
        ioctl_header(32, 24) + struct.pack("<II", 0x40, 0x2),
    ),
    (
        "acquire_guest_caps",
        AcquireGuestCapabilities(or_mask=0x1, not_mask=0x6, flags=0x1),
        0xC024560D,
        ioctl_header(36, 24) + struct.pack("<III", 0x1, 0x1, 0x6),
    ),
    (
        "change_guest_caps",
        ChangeGuestCapabilities(or_mask=0x4, not_mask=0x1),
        0xC020560E,
        ioctl_header(32, 32) + struct.pack("<II", 0x4, 0x1),
    ),
    ("check_balloon", CheckBalloon(), 0xC0205611, ioctl_header(24, 32) + bytes(8)),
    (
        "change_balloon",
        ChangeBalloon(chunk_address=0x7F00_0010_0000, inflate=True),
        0xC0285612,
        ioctl_header(40, 24) + struct.pack("<Q", 0x7F00_0010_0000) + bytes(7) + b"\x01",
    ),
    (
        "change_balloon_deflate",
        ChangeBalloon(chunk_address=0x1000, inflate=False),
        0xC0285612,
        ioctl_header(40, 24) + struct.pack("<Q", 0x1000) + bytes(8),
    ),
    (
        "change_balloon_probe",
        ChangeBalloonProbe(),
        0xC0285612,
        ioctl_header(40, 24) + bytes(8) + b"\x01" + bytes(7),
    ),
    ("write_core_dump", WriteCoreDump(), 0xC01C5613, ioctl_header(28, 24) + bytes(4)),
    ("log", Log(b"hello"), 0x00005609, ioctl_header(29, 24) + b"hello"),
    (
        "hgcm_connect",
        HgcmConnect("VBoxGuestPropSvc"),
        0xC09C5604,
        ioctl_header(156, 28) + struct.pack("<I", 2) + b"VBoxGuestPropSvc".ljust(128, b"\0"),
    ),
    (
        "hgcm_disconnect",
        HgcmDisconnect(client_id=5),
        0xC01C5605,
        ioctl_header(28, 24) + struct.pack("<I", 5),
    ),
    (
        "hgcm_call",
        HGCM_CALL,
        0xC0885607,
        ioctl_header(136, 136)
        + struct.pack("<IIIBBH", 5, 3, 500, 1, 0, 6)
        + _parm(1, "I", 7)
        + _parm(2, "Q", 1 << 40)
        + _parm(5, "IQ", 3, 0)
        + _parm(6, "IQ", 16, 0)
        + _parm(4, "IQ", 3, 0)
        + _parm(5, "IQ", 0, 0),
    ),
    (
        "hgcm_call_prepared",
        HGCM_CALL.prepare(),
        0xC0885607,
        ioctl_header(136, 136)
        + struct.pack("<IIIBBH", 5, 3, 500, 1, 0, 6)
        + _parm(1, "I", 7)
        + _parm(2, "Q", 1 << 40)
        + _parm(5, "IQ", 3, 0)
        + _parm(6, "IQ", 16, 0)
        + _parm(4, "IQ", 3, 0)
        + _parm(5, "IQ", 0, 0),
    ),
    (
        "hgcm_call_no_params",
        HgcmCall(client_id=1, function=0),
        0xC0285607,
        ioctl_header(40, 40) + struct.pack("<IIIBBH", 1, 0, 0xFFFFFFFF, 1, 0, 0),
    ),
    ("get_host_version", GetHostVersion(), 0xC0285602, request_header(40, 4) + bytes(16)),
    (
        "get_host_time",
        GetHostTime(),
        0xC0205602,
        request_header(32, 10) + struct.pack("<Q", 0xFFFFFFFFFFFFFFFF),
    ),
    ("get_session_id", GetSessionId(), 0xC0205602, request_header(32, 217) + bytes(8)),
    (
        "set_cpu_hotplug_status",
        SetCpuHotPlugStatus(CpuStatusType.ENABLE),
        0xC01C5602,
        request_header(28, 211) + struct.pack("<I", 2),
    ),
    (
        "get_cpu_hotplug_req",
        GetCpuHotPlugRequest(),
        0xC0245602,
        request_header(36, 210) + struct.pack("<III", 1, 0xFFFFFFFF, 0xFFFFFFFF),
    ),
    (
        "report_guest_status",
        ReportGuestStatus(Facility.VBOX_SERVICE, FacilityStatus.ACTIVE, flags=0),
        0xC0245602,
        request_header(36, 59) + struct.pack("<III", 100, 50, 0),
    ),
    (
        "get_memballoon_change_req",
        GetMemBalloonChangeRequest(),
        0xC0245602,
        request_header(36, 111) + struct.pack("<III", 0, 0, 0x40),
    ),
    (
        "get_memballoon_change_req_no_ack",
        GetMemBalloonChangeRequest(acknowledge=False),
        0xC0245602,
        request_header(36, 111) + bytes(12),
    ),
    (
        "change_memballoon",
        ChangeMemBalloon(inflate=True, pages=ChunkPages.of(PAGES)),
        0x00005603,
        request_header(2080, 113) + struct.pack("<II256Q", 256, 1, *PAGES),
    ),
    (
        "heartbeat_configure",
        HeartbeatConfigure(enabled=True),
        0xC0245602,
        request_header(36, 220) + struct.pack("<QB", 0, 1) + bytes(3),
    ),
    ("guest_heartbeat", GuestHeartbeat(), 0xC0185602, request_header(24, 219)),
    (
        "get_statistics_change_req",
        GetStatisticsChangeRequest(),
        0xC0205602,
        request_header(32, 112) + struct.pack("<II", 0, 0x80),
    ),
    (
        "get_statistics_change_req_no_ack",
        GetStatisticsChangeRequest(acknowledge=False),
        0xC0205602,
        request_header(32, 112) + bytes(8),
    ),
    (
        "report_guest_stats",
        ReportGuestStats(GuestStatistics(*range(1, 20))),
        0xC0645602,
        request_header(100, 110) + struct.pack("<19I", *range(1, 20)),
    ),
]


def _set_rc(call: IoctlCall[Any], rc: int) -> None:
    struct.pack_into("<i", call.buffer, 12, rc)


def _answered(request: Request[Any], *writes: tuple[str, int, int]) -> IoctlCall[Any]:
    call = request.encode()
    _set_rc(call, 0)
    for fmt, offset, value in writes:
        struct.pack_into(fmt, call.buffer, offset, value)
    return call


class TestEncoding:
    """Golden bytes of every request."""

    @pytest.mark.parametrize(
        ("request_", "code", "expected"),
        [pytest.param(request, code, data, id=name) for name, request, code, data in GOLDEN],
    )
    def test_golden_bytes(self, request_: Request[Any], code: int, expected: bytes) -> None:
        """The request encodes to the reference's ioctl number and bytes."""
        call = request_.encode()
        assert call.code == code
        assert bytes(call.buffer) == expected
        assert call.request is request_

    def test_every_request_class_has_golden_bytes(self) -> None:
        """The golden table covers each request class at least once."""
        covered = {type(request).__name__ for _, request, _, _ in GOLDEN}
        from tests.strategies import REQUEST_STRATEGIES  # noqa: PLC0415

        assert covered == set(REQUEST_STRATEGIES)

    def test_hgcm_call_user_buffers(self) -> None:
        """Non-empty buffer parameters become user buffers at their address fields."""
        call = HGCM_CALL.encode()
        assert call.user_buffers == (
            UserBuffer(40 + 2 * 16 + 8, bytearray(b"ab\0")),
            UserBuffer(40 + 3 * 16 + 8, bytearray(16)),
            UserBuffer(40 + 4 * 16 + 8, bytearray(b"xyz")),
        )

    def test_other_requests_have_no_user_buffers(self) -> None:
        """Only HGCM calls point at user memory."""
        for _, request, _, _ in GOLDEN:
            if not isinstance(request, HgcmCall | PreparedHgcmCall):
                assert request.encode().user_buffers == ()

    def test_encode_returns_fresh_buffers(self) -> None:
        """Encoding twice gives two independent buffers."""
        request = WaitForEvents(mask=1)
        assert request.encode().buffer is not request.encode().buffer

    def test_prepared_call_encodes_fresh_memory(self) -> None:
        """Each encoding of a prepared call has a buffer and user memory of its own, as the
        call's own encoding does, whatever the driver wrote into an earlier one's."""
        prepared = HGCM_CALL.prepare()
        first = prepared.encode()
        first.buffer[:] = bytes(len(first.buffer))
        for user in first.user_buffers:
            user.data[:] = b"!" * len(user.data)
        second = prepared.encode()
        assert (bytes(second.buffer), second.user_buffers) == (
            bytes(HGCM_CALL.encode().buffer),
            HGCM_CALL.encode().user_buffers,
        )
        assert second.request is prepared
        assert prepared.call is HGCM_CALL

    def test_prepared_call_keeps_the_bytes_it_was_given(self) -> None:
        """An in buffer's bytes are taken when the call is prepared, not when it is made."""
        data = bytearray(b"ab\0")
        prepared = HgcmCall(1, 2, (HgcmBufferIn(data),)).prepare()  # type: ignore[arg-type]
        data[:] = b"xyz"
        assert prepared.encode().user_buffers == (UserBuffer(48, bytearray(b"ab\0")),)


class TestDecoding:
    """Well-formed replies decode to typed values."""

    def test_driver_version(self) -> None:
        """The session, driver version and revision come from the out part."""
        call = _answered(DriverVersionInfo(), ("<I", 24, 0x10000), ("<I", 28, 0x10001))
        struct.pack_into("<I", call.buffer, 32, 7)
        assert call.request.decode(call) == DriverVersion(0x10000, 0x10001, 7)

    def test_events_received(self) -> None:
        """The consumed events come from offset 24."""
        call = _answered(WaitForEvents(mask=0x42), ("<I", 24, 0x40))
        assert call.request.decode(call) == EventsReceived(0x40)

    def test_no_events(self) -> None:
        """Success with no events (Oracle's wait that consumed an interrupt) decodes as 0."""
        call = _answered(WaitForEvents(mask=0x42), ("<I", 24, 0))
        assert call.request.decode(call) == EventsReceived(0)

    def test_empty_replies(self) -> None:
        """Requests without an answer decode to ``None`` once the header checks out."""
        for request in (
            InterruptAllWaits(),
            ChangeFilterMask(1, 0),
            AcquireGuestCapabilities(1, 0),
            ChangeBalloon(0x1000, inflate=True),
            WriteCoreDump(),
            Log(b"x"),
            HgcmDisconnect(3),
            ReportGuestStatus(Facility.VBOX_SERVICE, FacilityStatus.ACTIVE),
            ChangeMemBalloon(inflate=False, pages=ChunkPages.of(PAGES)),
            GuestHeartbeat(),
        ):
            call = _answered(request)
            assert request.decode(call) is None

    def test_informational_status_is_success(self) -> None:
        """A positive ``rc`` is not an error."""
        call = _answered(InterruptAllWaits())
        _set_rc(call, 2903)
        assert call.request.decode(call) is None

    def test_guest_capabilities(self) -> None:
        """Session and global capabilities come from offsets 24 and 28."""
        call = _answered(ChangeGuestCapabilities(4, 0), ("<I", 24, 4), ("<I", 28, 5))
        assert call.request.decode(call) == GuestCapabilities(4, 5)

    @pytest.mark.parametrize(("flag", "expected"), [(0, False), (1, True)])
    def test_balloon_status(self, flag: int, expected: bool) -> None:
        """Chunks come from offset 24 and the ring-3 flag from the byte at 28."""
        call = _answered(CheckBalloon(), ("<I", 24, 12), ("<B", 28, flag))
        assert call.request.decode(call) == BalloonStatus(12, expected)

    def test_hgcm_connected(self) -> None:
        """The client id overlays the location type at offset 24."""
        call = _answered(HgcmConnect("svc"), ("<I", 24, 0x1234))
        assert call.request.decode(call) == HgcmConnected(0x1234)

    def test_hgcm_reply(self) -> None:
        """Scalars are read back, out buffers are cut to the size the host reports."""
        call = _answered(HGCM_CALL, ("<I", 12, 3))
        struct.pack_into("<I", call.buffer, 40 + 4, 8)
        struct.pack_into("<Q", call.buffer, 56 + 4, 9)
        struct.pack_into("<I", call.buffer, 88 + 4, 5)
        call.user_buffers[1].data[:5] = b"hello"
        struct.pack_into("<I", call.buffer, 104 + 4, 2)
        call.user_buffers[2].data[:] = b"zyx"
        assert call.request.decode(call) == HgcmReply(
            3,
            (
                HgcmU32(8),
                HgcmU64(9),
                HgcmData(b"ab\0"),
                HgcmData(b"hello"),
                HgcmData(b"zy"),
                HgcmData(b""),
            ),
        )

    def test_host_version(self) -> None:
        """Version parts and features come from offsets 24..39."""
        call = GetHostVersion().encode()
        struct.pack_into("<iHHIII", call.buffer, 12, 0, 0, 0, 0, 0, 0)
        struct.pack_into("<HHIII", call.buffer, 24, 7, 1, 4, 165100, 0xF)
        version = call.request.decode(call)
        assert version == HostVersion(7, 1, 4, 165100, 0xF)
        assert str(version) == "7.1.4r165100"

    def test_host_time(self) -> None:
        """The time comes from the u64 at 24."""
        call = _answered(GetHostTime(), ("<Q", 24, 1_700_000_000_123))
        assert call.request.decode(call) == HostTime(1_700_000_000_123)

    def test_session_id(self) -> None:
        """The session id comes from the u64 at 24."""
        call = _answered(GetSessionId(), ("<Q", 24, 0xDEAD_BEEF_CAFE))
        assert call.request.decode(call) == SessionId(0xDEAD_BEEF_CAFE)

    def test_cpu_hotplug_event(self) -> None:
        """Event type, core and package come from offsets 24, 28 and 32."""
        answer = (("<I", 24, CpuEventType.UNPLUG), ("<I", 28, 3), ("<I", 32, 1))
        call = _answered(GetCpuHotPlugRequest(), *answer)
        event = call.request.decode(call)
        assert event == CpuHotPlugEvent(CpuEventType.UNPLUG, 3, 1)
        assert event.pending

    @pytest.mark.parametrize("kind", [CpuEventType.INVALID, CpuEventType.NONE])
    def test_cpu_hotplug_nothing_pending(self, kind: CpuEventType) -> None:
        """INVALID (nothing since the VM process started) and NONE (read) mean no event."""
        call = _answered(GetCpuHotPlugRequest(), ("<I", 24, kind))
        assert not call.request.decode(call).pending

    def test_balloon_target(self) -> None:
        """Target and RAM come from offsets 24 and 28."""
        call = _answered(GetMemBalloonChangeRequest(), ("<I", 24, 128), ("<I", 28, 4096))
        assert call.request.decode(call) == BalloonTarget(128, 4096)

    def test_statistics_interval(self) -> None:
        """The interval in seconds comes from the u32 at 24."""
        call = _answered(GetStatisticsChangeRequest(), ("<I", 24, 5))
        assert call.request.decode(call) == StatisticsInterval(5)

    def test_heartbeat_settings(self) -> None:
        """The interval comes from the 4-aligned u64 at 24."""
        call = _answered(HeartbeatConfigure(enabled=True), ("<Q", 24, 2_000_000_000))
        assert call.request.decode(call) == HeartbeatSettings(2_000_000_000)

    @pytest.mark.parametrize("interval_ns", [0, 1, 50_000_000])
    def test_heartbeat_off_takes_any_interval(self, interval_ns: int) -> None:
        """The reply to "off" decodes whatever interval it names: nothing depends on it, and
        a drain must not fail on it."""
        call = _answered(HeartbeatConfigure(enabled=False), ("<Q", 24, interval_ns))
        assert call.request.decode(call) == HeartbeatSettings(interval_ns)

    def test_heartbeat_interval_of_50ms_is_the_least(self) -> None:
        """50 ms, the least VMMDev accepts at VM start, decodes when switching on."""
        call = _answered(HeartbeatConfigure(enabled=True), ("<Q", 24, 50_000_000))
        assert call.request.decode(call) == HeartbeatSettings(50_000_000)


class TestLocalProtocolErrors:
    """Requests that break the ABI are refused when encoded."""

    @pytest.mark.parametrize(
        "request_",
        [
            pytest.param(DriverVersionInfo(req_version=-1), id="version-negative"),
            pytest.param(DriverVersionInfo(min_version=1 << 32), id="min-version-too-big"),
            pytest.param(WaitForEvents(mask=0x800), id="wait-mask-outside"),
            pytest.param(WaitForEvents(mask=-1), id="wait-mask-negative"),
            pytest.param(WaitForEvents(mask=1, timeout_ms=1 << 32), id="wait-timeout"),
            pytest.param(WaitForEvents(mask=1, timeout_ms=-1), id="wait-timeout-negative"),
            pytest.param(ChangeFilterMask(or_mask=0x800, not_mask=0), id="filter-or"),
            pytest.param(ChangeFilterMask(or_mask=0, not_mask=1 << 32), id="filter-not"),
            pytest.param(AcquireGuestCapabilities(0, 0, flags=2), id="acquire-flags"),
            pytest.param(AcquireGuestCapabilities(8, 0), id="acquire-or"),
            pytest.param(AcquireGuestCapabilities(0, 8), id="acquire-not"),
            pytest.param(ChangeGuestCapabilities(8, 0), id="caps-or"),
            pytest.param(ChangeGuestCapabilities(0, -1), id="caps-not"),
            pytest.param(ChangeBalloon(0, inflate=True), id="balloon-null"),
            pytest.param(ChangeBalloon(0x1001, inflate=True), id="balloon-unaligned"),
            pytest.param(ChangeBalloon(1 << 64, inflate=True), id="balloon-too-big"),
            pytest.param(WriteCoreDump(flags=1), id="core-dump-flags"),
            pytest.param(Log(b""), id="log-empty"),
            pytest.param(HgcmConnect(""), id="connect-empty"),
            pytest.param(HgcmConnect("a\0b"), id="connect-nul"),
            pytest.param(HgcmConnect("x" * 128), id="connect-128"),
            pytest.param(HgcmConnect("é" * 64), id="connect-128-utf8"),
            pytest.param(HgcmDisconnect(0), id="disconnect-0"),
            pytest.param(HgcmDisconnect(0xFFFFFFFF), id="disconnect-ffffffff"),
            pytest.param(HgcmDisconnect(-3), id="disconnect-negative"),
            pytest.param(HgcmDisconnect(1 << 32), id="disconnect-too-big"),
            pytest.param(HgcmCall(0, 1), id="call-client-0"),
            pytest.param(HgcmCall(0xFFFFFFFF, 1), id="call-client-ffffffff"),
            pytest.param(HgcmCall(1, 1 << 32), id="call-function"),
            pytest.param(HgcmCall(1, 1, timeout_ms=-1), id="call-timeout"),
            pytest.param(HgcmCall(1, 1, (HgcmU32(0),) * 33), id="call-33-params"),
            pytest.param(HgcmCall(1, 1, (HgcmU32(1 << 32),)), id="call-u32"),
            pytest.param(HgcmCall(1, 1, (HgcmU32(-1),)), id="call-u32-negative"),
            pytest.param(HgcmCall(1, 1, (HgcmU64(1 << 64),)), id="call-u64"),
            pytest.param(HgcmCall(1, 1, (HgcmU64(-1),)), id="call-u64-negative"),
            pytest.param(HgcmCall(1, 1, (HgcmBufferOut(-1),)), id="call-out-negative"),
            pytest.param(
                ReportGuestStatus(Facility.ALL, FacilityStatus.ACTIVE, flags=-1), id="status-flags"
            ),
            pytest.param(ReportGuestStats(GuestStatistics(threads=-1)), id="stats-negative"),
            pytest.param(
                ReportGuestStats(GuestStatistics(phys_mem_total=1 << 32)), id="stats-too-big"
            ),
            pytest.param(
                ReportGuestStatus(Facility.ALL, FacilityStatus.ACTIVE, flags=1 << 32),
                id="status-flags-too-big",
            ),
        ],
    )
    def test_refused(self, request_: Request[Any]) -> None:
        """Encoding raises ``LocalProtocolError``."""
        with pytest.raises(LocalProtocolError):
            request_.encode()

    @pytest.mark.parametrize(
        ("pages", "message"),
        [
            pytest.param(PAGES[:255], "256 distinct pages", id="255"),
            pytest.param((*PAGES[:255], PAGES[0]), "256 distinct pages", id="dup"),
            pytest.param((*PAGES[:255], 0x1001), "page 255 address 0x1001", id="unaligned"),
            pytest.param((*PAGES[:255], 0), "page 255 address 0x0 ", id="null"),
            pytest.param((-4096, *PAGES[1:]), "page 0 address -0x1000", id="negative"),
            pytest.param((*PAGES[:255], 1 << 64), "page 255 address 0x1", id="too-big"),
        ],
    )
    def test_chunk_pages_refused(self, pages: tuple[int, ...], message: str) -> None:
        """A chunk's pages are checked once, when they are packed; the message names the page."""
        with pytest.raises(LocalProtocolError, match=message):
            ChunkPages.of(pages)

    def test_chunk_pages_checked_when_given_packed(self) -> None:
        """Packed bytes are checked just the same."""
        assert ChunkPages(struct.pack("<256Q", *PAGES)).addresses == PAGES
        with pytest.raises(LocalProtocolError, match="page 3 address 0x103008"):
            ChunkPages(struct.pack("<256Q", *PAGES[:3], PAGES[3] + 8, *PAGES[4:]))
        with pytest.raises(LocalProtocolError, match="distinct"):
            ChunkPages(struct.pack("<255Q", *PAGES[:255]))

    def test_call_with_32_params_is_accepted(self) -> None:
        """32 parameters is the limit, not past it."""
        assert len(HgcmCall(1, 1, (HgcmU32(0),) * 32).encode().buffer) == 40 + 32 * 16

    def test_service_name_of_127_bytes_is_accepted(self) -> None:
        """127 bytes leave room for the NUL that ends the 128-byte field at offset 28."""
        buffer = HgcmConnect("x" * 127).encode().buffer
        assert bytes(buffer[28 : 28 + 128]) == b"x" * 127 + b"\0"

    def test_oversized_log_is_refused(self) -> None:
        """A message that would make the buffer exceed 16 MiB is refused."""
        with pytest.raises(LocalProtocolError):
            Log(bytes(MAX_IOCTL_SIZE - 24 + 1)).encode()

    def test_oversized_hgcm_buffer_is_refused(self) -> None:
        """A buffer parameter above 24 MiB is refused."""
        with pytest.raises(LocalProtocolError):
            HgcmCall(1, 1, (HgcmBufferOut(HGCM_MAX_USER_PARM + 1),)).encode()


class TestStatusErrors:
    """Well-formed replies with ``rc < 0``."""

    @pytest.mark.parametrize(
        "request_", [pytest.param(request, id=name) for name, request, _, _ in GOLDEN]
    )
    def test_negative_rc_raises_status_error(self, request_: Request[Any]) -> None:
        """``VBoxStatusError`` carries the rc, its name and the operation."""
        call = request_.encode()
        _set_rc(call, -37)
        with pytest.raises(VBoxStatusError) as info:
            request_.decode(call)
        assert (info.value.rc, info.value.name) == (-37, "VERR_NOT_SUPPORTED")
        assert info.value.operation == request_.operation

    def test_hgcm_call_error_carries_the_reply(self) -> None:
        """A failed HGCM call raises ``HgcmCallError`` with the parameters the host returned."""
        request = HgcmCall(1, 2, (HgcmU32(0), HgcmBufferOut(8)))
        call = request.encode()
        _set_rc(call, -41)
        struct.pack_into("<I", call.buffer, 40 + 4, 100)
        struct.pack_into("<I", call.buffer, 56 + 4, 0)
        with pytest.raises(HgcmCallError) as info:
            request.decode(call)
        assert info.value.rc == -41
        assert info.value.name == "VERR_BUFFER_OVERFLOW"
        assert info.value.reply == HgcmReply(-41, (HgcmU32(100), HgcmData(b"")))

    def test_malformed_failed_hgcm_call_is_a_protocol_error(self) -> None:
        """A failed call whose parameters are malformed raises ``RemoteProtocolError``."""
        request = HgcmCall(1, 2, (HgcmU32(0),))
        call = request.encode()
        _set_rc(call, -41)
        struct.pack_into("<I", call.buffer, 40, 2)
        with pytest.raises(RemoteProtocolError):
            request.decode(call)


def _malformed(request: Request[Any], fmt: str, offset: int, value: int) -> IoctlCall[Any]:
    call = request.encode()
    _set_rc(call, 0)
    struct.pack_into(fmt, call.buffer, offset, value)
    return call


class TestRemoteProtocolErrors:
    """Replies that break the ABI raise ``RemoteProtocolError``."""

    @pytest.mark.parametrize(
        ("request_", "fmt", "offset", "value"),
        [
            pytest.param(InterruptAllWaits(), "<I", 0, 28, id="ioctl-size-in"),
            pytest.param(InterruptAllWaits(), "<I", 4, 0x10000, id="ioctl-version"),
            pytest.param(WaitForEvents(1), "<I", 16, 32, id="ioctl-size-out"),
            pytest.param(DriverVersionInfo(), "<I", 24, 0x20000, id="foreign-session-version"),
            pytest.param(DriverVersionInfo(), "<I", 24, 0xFFFFFFFF, id="session-mismatch"),
            pytest.param(WaitForEvents(0x42), "<I", 24, 0x43, id="events-outside-mask"),
            pytest.param(ChangeGuestCapabilities(1, 0), "<I", 24, 8, id="session-caps"),
            pytest.param(CheckBalloon(), "<B", 28, 2, id="handle-in-r3"),
            pytest.param(HgcmConnect("svc"), "<I", 24, 0, id="client-id-0"),
            pytest.param(HgcmConnect("svc"), "<I", 24, 0xFFFFFFFF, id="client-id-ffffffff"),
            pytest.param(HGCM_CALL, "<H", 38, 5, id="parm-count"),
            pytest.param(HGCM_CALL, "<I", 40, 2, id="parm-type"),
            pytest.param(HGCM_CALL, "<I", 72 + 4, 4, id="in-size-above-capacity"),
            pytest.param(HGCM_CALL, "<I", 88 + 4, 17, id="out-size-above-capacity"),
            pytest.param(HGCM_CALL, "<I", 120 + 4, 1, id="empty-buffer-grows"),
            pytest.param(GetHostVersion(), "<I", 0, 44, id="vmmdev-size"),
            pytest.param(GetHostVersion(), "<I", 4, 0x10002, id="vmmdev-version"),
            pytest.param(GetHostVersion(), "<I", 8, 5, id="vmmdev-type"),
            pytest.param(GetHostTime(), "<Q", 24, 0xFFFFFFFFFFFFFFFF, id="time-unset"),
            pytest.param(GetMemBalloonChangeRequest(), "<I", 24, 1, id="target-above-ram"),
            pytest.param(HeartbeatConfigure(enabled=True), "<Q", 24, 0, id="zero-interval"),
            pytest.param(
                HeartbeatConfigure(enabled=True), "<Q", 24, 49_999_999, id="interval-below-50ms"
            ),
        ],
    )
    def test_malformed_field(
        self, request_: Request[Any], fmt: str, offset: int, value: int
    ) -> None:
        """One broken field makes decoding raise ``RemoteProtocolError``."""
        call = _malformed(request_, fmt, offset, value)
        with pytest.raises(RemoteProtocolError):
            request_.decode(call)

    @pytest.mark.parametrize(
        "request_", [pytest.param(request, id=name) for name, request, _, _ in GOLDEN]
    )
    @pytest.mark.parametrize("delta", [-1, 1])
    def test_wrong_buffer_length(self, request_: Request[Any], delta: int) -> None:
        """A reply buffer one byte short or long is refused."""
        call = request_.encode()
        _set_rc(call, 0)
        buffer = call.buffer[:delta] if delta < 0 else call.buffer + b"\0"
        with pytest.raises(RemoteProtocolError):
            request_.decode(IoctlCall(call.code, buffer, request_, call.user_buffers))

    def test_empty_buffer(self) -> None:
        """An empty reply buffer is refused before any field is read."""
        request = GetHostVersion()
        with pytest.raises(RemoteProtocolError):
            request.decode(IoctlCall(0, bytearray(), request))
