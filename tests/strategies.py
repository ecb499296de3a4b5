"""Hypothesis strategies for every request type of ``agent.protocol.messages``.

Each strategy draws only valid requests (encoding them never raises); ``requests()`` draws
any of them. Sizes stay small so property tests run in a few seconds.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from agent.protocol.balloon_pages import ChunkPages
from agent.protocol.constants import (
    AGC_FLAGS_VALID_MASK,
    GUEST_CAPABILITIES_MASK,
    HGCM_MAX_PARMS,
    PAGE_SIZE,
    VALID_EVENT_MASK,
    Facility,
    FacilityStatus,
)
from agent.protocol.messages import (
    GUEST_STATISTICS_FIELDS,
    AcquireGuestCapabilities,
    ChangeBalloon,
    ChangeBalloonProbe,
    ChangeFilterMask,
    ChangeGuestCapabilities,
    ChangeMemBalloon,
    CheckBalloon,
    DriverVersionInfo,
    GetCpuHotPlugRequest,
    GetHostTime,
    GetHostVersion,
    GetMemBalloonChangeRequest,
    GetSessionId,
    GetStatisticsChangeRequest,
    GuestHeartbeat,
    GuestStatistics,
    HeartbeatConfigure,
    HgcmBuffer,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCall,
    HgcmConnect,
    HgcmDisconnect,
    HgcmParam,
    HgcmU32,
    HgcmU64,
    InterruptAllWaits,
    Log,
    ReportGuestStats,
    ReportGuestStatus,
    Request,
    SetCpuHotPlugStatus,
    WaitForEvents,
    WriteCoreDump,
)

u32s = st.integers(0, 0xFFFFFFFF)
u64s = st.integers(0, 0xFFFFFFFFFFFFFFFF)
client_ids = st.integers(1, 0xFFFFFFFE)
event_masks = st.integers(1, VALID_EVENT_MASK)
page_addresses = st.integers(1, (1 << 52) - 1).map(lambda page: page * PAGE_SIZE)


def driver_version_infos() -> st.SearchStrategy[DriverVersionInfo]:
    """Version requests with any 32-bit versions."""
    return st.builds(DriverVersionInfo, req_version=u32s, min_version=u32s)


def wait_for_events() -> st.SearchStrategy[WaitForEvents]:
    """Waits on a non-empty valid event mask with any timeout."""
    return st.builds(WaitForEvents, mask=event_masks, timeout_ms=u32s)


def interrupt_all_waits() -> st.SearchStrategy[InterruptAllWaits]:
    """The interrupt request (it has no fields)."""
    return st.just(InterruptAllWaits())


def change_filter_masks() -> st.SearchStrategy[ChangeFilterMask]:
    """Filter changes within the valid event mask."""
    masks = st.integers(0, VALID_EVENT_MASK)
    return st.builds(ChangeFilterMask, or_mask=masks, not_mask=masks)


def acquire_guest_capabilities() -> st.SearchStrategy[AcquireGuestCapabilities]:
    """Capability acquisitions with valid flags and masks."""
    caps = st.integers(0, GUEST_CAPABILITIES_MASK)
    flags = st.integers(0, AGC_FLAGS_VALID_MASK)
    return st.builds(AcquireGuestCapabilities, or_mask=caps, not_mask=caps, flags=flags)


def change_guest_capabilities() -> st.SearchStrategy[ChangeGuestCapabilities]:
    """Capability changes within the capability mask."""
    caps = st.integers(0, GUEST_CAPABILITIES_MASK)
    return st.builds(ChangeGuestCapabilities, or_mask=caps, not_mask=caps)


def check_balloons() -> st.SearchStrategy[CheckBalloon]:
    """The balloon query (it has no fields)."""
    return st.just(CheckBalloon())


def change_balloons() -> st.SearchStrategy[ChangeBalloon]:
    """Oracle balloon changes of one page-aligned chunk."""
    return st.builds(ChangeBalloon, chunk_address=page_addresses, inflate=st.booleans())


def write_core_dumps() -> st.SearchStrategy[WriteCoreDump]:
    """The core dump request (flags must be zero)."""
    return st.just(WriteCoreDump())


def logs() -> st.SearchStrategy[Log]:
    """Log messages of 1..200 arbitrary bytes."""
    return st.builds(Log, message=st.binary(min_size=1, max_size=200))


def service_names() -> st.SearchStrategy[str]:
    """Service names of 1..127 UTF-8 bytes without NUL."""
    text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=40)
    return text.filter(lambda name: len(name.encode()) < 128)


def hgcm_connects() -> st.SearchStrategy[HgcmConnect]:
    """Connects to any valid service name."""
    return st.builds(HgcmConnect, service=service_names())


def hgcm_disconnects() -> st.SearchStrategy[HgcmDisconnect]:
    """Disconnects of any valid client id."""
    return st.builds(HgcmDisconnect, client_id=client_ids)


def hgcm_params() -> st.SearchStrategy[HgcmParam]:
    """One HGCM parameter of any kind; buffers hold at most 64 bytes."""
    data = st.binary(max_size=64)
    return st.one_of(
        st.builds(HgcmU32, value=u32s),
        st.builds(HgcmU64, value=u64s),
        st.builds(HgcmBufferIn, data=data),
        st.builds(HgcmBufferOut, size=st.integers(0, 64)),
        st.builds(HgcmBuffer, data=data),
    )


def hgcm_calls(max_params: int = HGCM_MAX_PARMS) -> st.SearchStrategy[HgcmCall]:
    """HGCM calls with up to ``max_params`` parameters."""
    return st.builds(
        HgcmCall,
        client_id=client_ids,
        function=u32s,
        params=st.lists(hgcm_params(), max_size=max_params).map(tuple),
        timeout_ms=u32s,
    )


def report_guest_statuses() -> st.SearchStrategy[ReportGuestStatus]:
    """Facility reports with any known facility and state."""
    return st.builds(
        ReportGuestStatus,
        facility=st.sampled_from(Facility),
        status=st.sampled_from(FacilityStatus),
        flags=u32s,
    )


def _chunk(start_and_stride: tuple[int, int]) -> tuple[int, ...]:
    start, stride = start_and_stride
    return tuple((start + index * stride) * PAGE_SIZE for index in range(256))


def change_mem_balloons() -> st.SearchStrategy[ChangeMemBalloon]:
    """Balloon chunks of 256 distinct page addresses."""
    pages = st.tuples(st.integers(1, 1 << 30), st.integers(1, 64)).map(_chunk).map(ChunkPages.of)
    return st.builds(ChangeMemBalloon, inflate=st.booleans(), pages=pages)


def report_guest_stats() -> st.SearchStrategy[ReportGuestStats]:
    """A statistics report with any u32 in every field."""
    fields = dict.fromkeys(GUEST_STATISTICS_FIELDS, u32s)
    return st.builds(ReportGuestStats, stats=st.builds(GuestStatistics, **fields))


def vmmdev_requests() -> st.SearchStrategy[Request[Any]]:
    """Any VMMDev passthrough request."""
    return st.one_of(
        st.just(GetHostVersion()),
        st.just(GetHostTime()),
        st.just(GetSessionId()),
        report_guest_statuses(),
        st.builds(GetMemBalloonChangeRequest, acknowledge=st.booleans()),
        change_mem_balloons(),
        st.builds(HeartbeatConfigure, enabled=st.booleans()),
        st.just(GuestHeartbeat()),
        st.builds(GetStatisticsChangeRequest, acknowledge=st.booleans()),
        report_guest_stats(),
        set_cpu_hotplug_statuses(),
        st.just(GetCpuHotPlugRequest()),
    )


def set_cpu_hotplug_statuses() -> st.SearchStrategy[SetCpuHotPlugStatus]:
    """Enable, disable, or any other u32 (the host answers VERR_INVALID_PARAMETER)."""
    return st.builds(SetCpuHotPlugStatus, status=u32s)


def requests() -> st.SearchStrategy[Request[Any]]:
    """Any valid request of any type."""
    return st.one_of(
        driver_version_infos(),
        wait_for_events(),
        interrupt_all_waits(),
        change_filter_masks(),
        acquire_guest_capabilities(),
        change_guest_capabilities(),
        check_balloons(),
        change_balloons(),
        write_core_dumps(),
        logs(),
        hgcm_connects(),
        hgcm_disconnects(),
        hgcm_calls(max_params=8),
        vmmdev_requests(),
    )


REQUEST_STRATEGIES: dict[str, st.SearchStrategy[Request[Any]]] = {
    "DriverVersionInfo": driver_version_infos(),
    "WaitForEvents": wait_for_events(),
    "InterruptAllWaits": interrupt_all_waits(),
    "ChangeFilterMask": change_filter_masks(),
    "AcquireGuestCapabilities": acquire_guest_capabilities(),
    "ChangeGuestCapabilities": change_guest_capabilities(),
    "CheckBalloon": check_balloons(),
    "ChangeBalloon": change_balloons(),
    "ChangeBalloonProbe": st.just(ChangeBalloonProbe()),
    "WriteCoreDump": write_core_dumps(),
    "Log": logs(),
    "HgcmConnect": hgcm_connects(),
    "HgcmDisconnect": hgcm_disconnects(),
    "HgcmCall": hgcm_calls(max_params=8),
    "PreparedHgcmCall": hgcm_calls(max_params=8).map(HgcmCall.prepare),
    "GetHostVersion": st.just(GetHostVersion()),
    "GetHostTime": st.just(GetHostTime()),
    "GetSessionId": st.just(GetSessionId()),
    "ReportGuestStatus": report_guest_statuses(),
    "GetMemBalloonChangeRequest": st.builds(GetMemBalloonChangeRequest, acknowledge=st.booleans()),
    "ChangeMemBalloon": change_mem_balloons(),
    "HeartbeatConfigure": st.builds(HeartbeatConfigure, enabled=st.booleans()),
    "GuestHeartbeat": st.just(GuestHeartbeat()),
    "GetStatisticsChangeRequest": st.builds(GetStatisticsChangeRequest, acknowledge=st.booleans()),
    "ReportGuestStats": report_guest_stats(),
    "SetCpuHotPlugStatus": set_cpu_hotplug_statuses(),
    "GetCpuHotPlugRequest": st.just(GetCpuHotPlugRequest()),
}
"""One strategy per request class, by class name (the fuzz tests parametrize over it)."""
