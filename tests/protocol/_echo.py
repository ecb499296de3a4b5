"""A tiny test-only "echo driver": answers an encoded request from the request's own fields.

``answer(call)`` writes a well-formed reply into ``call.buffer`` (and the user buffers) the
way the driver and host would, and returns the reply ``decode`` should produce. Offsets
are the reference's numbers written with ``struct``, not the layouts, so the round trip
also checks the layouts.
"""

from __future__ import annotations

import struct
from typing import Any

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
    HeartbeatConfigure,
    HeartbeatSettings,
    HgcmBuffer,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCall,
    HgcmConnect,
    HgcmConnected,
    HgcmData,
    HgcmDisconnect,
    HgcmReply,
    HgcmU32,
    HgcmU64,
    HgcmValue,
    HostTime,
    HostVersion,
    InterruptAllWaits,
    IoctlCall,
    Log,
    PreparedHgcmCall,
    ReportGuestStats,
    ReportGuestStatus,
    SessionId,
    SetCpuHotPlugStatus,
    StatisticsInterval,
    WaitForEvents,
    WriteCoreDump,
)

_VMMDEV = (
    GetHostVersion,
    GetHostTime,
    GetSessionId,
    ReportGuestStatus,
    GetMemBalloonChangeRequest,
    ChangeMemBalloon,
    HeartbeatConfigure,
    GuestHeartbeat,
    GetStatisticsChangeRequest,
    ReportGuestStats,
    SetCpuHotPlugStatus,
    GetCpuHotPlugRequest,
)
_EMPTY_IOCTLS = (
    InterruptAllWaits,
    ChangeFilterMask,
    AcquireGuestCapabilities,
    ChangeBalloon,
    ChangeBalloonProbe,
    WriteCoreDump,
    Log,
    HgcmDisconnect,
)


def set_rc(buf: bytearray, rc: int) -> None:
    """Write ``rc`` into the header (ioctl and VMMDev headers both keep it at offset 12)."""
    struct.pack_into("<i", buf, 12, rc)


def host_writes(data: bytes | bytearray) -> bytes:
    """Return what the echo host writes into a LINADDR buffer: the bytes reversed."""
    return bytes(reversed(data))


def answer(call: IoctlCall[Any], *, status: int = 0) -> Any:  # noqa: PLR0911 - a branch per type
    """Fill ``call.buffer`` with a well-formed reply and return the expected decode result."""
    request = call.request
    buf = call.buffer
    set_rc(buf, status)
    if isinstance(request, _VMMDEV):
        return _answer_vmmdev(request, buf)
    if isinstance(request, _EMPTY_IOCTLS):
        return None
    if isinstance(request, DriverVersionInfo):
        struct.pack_into("<III", buf, 24, request.req_version, request.min_version, 0)
        return DriverVersion(request.req_version, request.min_version, 0)
    if isinstance(request, WaitForEvents):
        struct.pack_into("<I", buf, 24, request.mask)
        return EventsReceived(request.mask)
    if isinstance(request, ChangeGuestCapabilities):
        session = request.or_mask & ~request.not_mask
        struct.pack_into("<II", buf, 24, session, session | 0x4)
        return GuestCapabilities(session, session | 0x4)
    if isinstance(request, CheckBalloon):
        struct.pack_into("<IB", buf, 24, 17, 1)
        return BalloonStatus(17, handle_in_r3=True)
    if isinstance(request, HgcmConnect):
        client_id = len(request.service) + 1
        struct.pack_into("<I", buf, 24, client_id)
        return HgcmConnected(client_id)
    if isinstance(request, PreparedHgcmCall):
        request = request.call
    if isinstance(request, HgcmCall):
        return HgcmReply(status, _answer_hgcm_call(request, call))
    msg = f"the echo driver does not know {type(request).__name__}"
    raise AssertionError(msg)


def _answer_hgcm_call(request: HgcmCall, call: IoctlCall[Any]) -> tuple[HgcmValue, ...]:
    buf = call.buffer
    user = iter(call.user_buffers)
    values: list[HgcmValue] = []
    for index, param in enumerate(request.params):
        base = 40 + 16 * index
        if isinstance(param, HgcmU32):
            new = param.value ^ 0xFFFFFFFF
            struct.pack_into("<I", buf, base + 4, new)
            values.append(HgcmU32(new))
        elif isinstance(param, HgcmU64):
            new = param.value ^ 0xFFFFFFFFFFFFFFFF
            struct.pack_into("<Q", buf, base + 4, new)
            values.append(HgcmU64(new))
        elif isinstance(param, HgcmBufferIn):
            if param.data:
                next(user)
            values.append(HgcmData(param.data))
        elif isinstance(param, HgcmBufferOut):
            written = bytes(range(param.size // 2))
            if param.size:
                next(user).data[: len(written)] = written
            struct.pack_into("<I", buf, base + 4, len(written))
            values.append(HgcmData(written))
        else:
            assert isinstance(param, HgcmBuffer)
            if param.data:
                memory = next(user).data
                memory[:] = host_writes(memory)
            values.append(HgcmData(host_writes(param.data)))
    return tuple(values)


def _answer_vmmdev(request: object, buf: bytearray) -> Any:  # noqa: PLR0911 - a branch per type
    if isinstance(request, GetHostVersion):
        struct.pack_into("<HHIII", buf, 24, 7, 1, 4, 165100, 0x1)
        return HostVersion(7, 1, 4, 165100, 0x1)
    if isinstance(request, GetHostTime):
        struct.pack_into("<Q", buf, 24, 1_700_000_000_000)
        return HostTime(1_700_000_000_000)
    if isinstance(request, GetSessionId):
        struct.pack_into("<Q", buf, 24, 0x1234_5678_9ABC)
        return SessionId(0x1234_5678_9ABC)
    if isinstance(request, GetMemBalloonChangeRequest):
        chunks = 64 if request.acknowledge else 0
        struct.pack_into("<II", buf, 24, chunks, 2048)
        return BalloonTarget(chunks, 2048)
    if isinstance(request, HeartbeatConfigure):
        interval = 2_000_000_000 if request.enabled else 1
        struct.pack_into("<Q", buf, 24, interval)
        return HeartbeatSettings(interval)
    if isinstance(request, GetStatisticsChangeRequest):
        seconds = 5 if request.acknowledge else 0
        struct.pack_into("<I", buf, 24, seconds)
        return StatisticsInterval(seconds)
    if isinstance(request, GetCpuHotPlugRequest):
        struct.pack_into("<III", buf, 24, 3, 2, 0)
        return CpuHotPlugEvent(3, 2, 0)
    return None
