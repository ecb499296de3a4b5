"""Tests of the simulated VMMDev device, driven with raw request buffers.

Rules of this test module:

- Requests are built byte by byte (``vmmdev_request``) and submitted through the port
  handler synchronously; no driver is involved.
- Timing tests run under ``autojump_clock`` and assert exact virtual times.
- Every expected status is the one the real host's port handler gives.
"""

from __future__ import annotations

import math
import struct
from typing import Final

import pytest
import structlog
import trio
from hypothesis import given, strategies as st

from agent.host._faults import MAX_FAULT_COUNT
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    BALLOON_CHUNK_PAGES,
    MAX_VMMDEV_REQUEST_SIZE,
    Event,
    Facility,
    FacilityStatus,
    RequestType,
    StatCap,
)
from agent.protocol.status import (
    STATUS_CODES,
    VERR_ACCESS_DENIED,
    VERR_GENERAL_FAILURE,
    VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH,
    VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH,
    VERR_INVALID_PARAMETER,
    VERR_NOT_IMPLEMENTED,
    VERR_NOT_SUPPORTED,
    VERR_OUT_OF_RANGE,
    VERR_OUT_OF_RESOURCES,
    VERR_VERSION_MISMATCH,
    VINF_SUCCESS,
)
from agent.units import NS_PER_S
from tests.host.conftest import Device, make_device, user_state_request, vmmdev_request

T = RequestType
EXACT_SIZES: Final = {
    T.GET_MOUSE_STATUS: 36,
    T.SET_MOUSE_STATUS: 36,
    T.GET_HOST_VERSION: 40,
    T.GET_HOST_TIME: 32,
    T.GET_HYPERVISOR_INFO: 32,
    T.SET_HYPERVISOR_INFO: 32,
    T.ACKNOWLEDGE_EVENTS: 28,
    T.CTL_GUEST_FILTER_MASK: 32,
    T.REPORT_GUEST_INFO: 32,
    T.REPORT_GUEST_CAPABILITIES: 28,
    T.SET_GUEST_CAPABILITIES: 32,
    T.REPORT_GUEST_INFO2: 168,
    T.REPORT_GUEST_STATUS: 36,
    T.GET_MEMBALLOON_CHANGE_REQ: 36,
    T.GET_SESSION_ID: 32,
    T.WRITE_COREDUMP: 28,
    T.HEARTBEAT_CONFIGURE: 36,
    T.GET_STATISTICS_CHANGE_REQ: 32,
    T.REPORT_GUEST_STATS: 100,
    T.GET_CPU_HOTPLUG_REQ: 36,
    T.SET_CPU_HOTPLUG_STATUS: 28,
}
"""The checklist's exact sizes (linux-vboxguest.md §14)."""
CPU_CAPS: Final = StatCap.CPU_LOAD_IDLE | StatCap.CPU_LOAD_KERNEL | StatCap.CPU_LOAD_USER
RAM_CAPS: Final = (
    StatCap.PHYS_MEM_TOTAL
    | StatCap.PHYS_MEM_AVAIL
    | StatCap.PHYS_MEM_BALLOON
    | StatCap.MEM_SYSTEM_CACHE
    | StatCap.PAGE_FILE_SIZE
)
"""The memory figures Main's performance collector takes together."""


def irq(device: Device) -> bool:
    """Whether the device's interrupt line is raised."""
    return device.vmmdev.have_events


def flatlined(device: Device) -> bool:
    """Whether the host considers the guest flat-lined."""
    return device.vmmdev.heartbeat.flatlined


def balloon_change(pages: list[int], *, inflate: bool = True, count: int = 256) -> bytearray:
    """A CHANGE_MEMBALLOON request for ``pages``."""
    req = vmmdev_request(T.CHANGE_MEMBALLOON, L.MemBalloonChangeRequest.size)
    L.MemBalloonChangeRequest.pages.set(req, count)
    L.MemBalloonChangeRequest.inflate.set(req, int(inflate))
    base = L.MemBalloonChangeRequest.phys_page.offset
    for index, page in enumerate(pages):
        struct.pack_into("<Q", req, base + 8 * index, page)
    return req


def chunk(start: int) -> list[int]:
    """256 distinct page addresses from ``start``."""
    return [start + 4096 * i for i in range(BALLOON_CHUNK_PAGES)]


def filter_mask(device: Device, or_mask: int, not_mask: int) -> None:
    """Send CTL_GUEST_FILTER_MASK."""
    req = vmmdev_request(T.CTL_GUEST_FILTER_MASK, 32)
    L.MaskRequest.or_mask.set(req, or_mask)
    L.MaskRequest.not_mask.set(req, not_mask)
    assert device.send(req) == VINF_SUCCESS


def acknowledge(device: Device) -> int:
    """Send ACKNOWLEDGE_EVENTS and return the events."""
    req = vmmdev_request(T.ACKNOWLEDGE_EVENTS, 28)
    assert device.send(req) == VINF_SUCCESS
    return L.EventsRequest.events.get(req)


def read_balloon_target(device: Device) -> bytearray:
    """Send GET_MEMBALLOON_CHANGE_REQ acknowledging 0x40; return the answered request."""
    req = vmmdev_request(T.GET_MEMBALLOON_CHANGE_REQ, 36)
    L.MemBalloonInfoRequest.event_ack.set(req, Event.BALLOON_CHANGE_REQUEST)
    assert device.send(req) == VINF_SUCCESS
    return req


class TestPortHandler:
    """Header checks, the additions gate, dispatch and size checks."""

    @pytest.mark.parametrize(("size", "version"), [(23, 0x10001), (24, 0x10000), (0, 0)])
    def test_bad_header_is_ignored(self, device: Device, size: int, version: int) -> None:
        """A header with size < 24 or a wrong version is not answered at all."""
        req = vmmdev_request(T.GET_HOST_VERSION, 40, header_size=size)
        L.RequestHeader.version.set(req, version)
        assert device.send(req) == VERR_GENERAL_FAILURE

    def test_oversized_request_is_not_supported(self, device: Device) -> None:
        """A request over 1 MiB gets VERR_NOT_SUPPORTED in its header."""
        req = vmmdev_request(T.GET_HOST_VERSION, 40, header_size=MAX_VMMDEV_REQUEST_SIZE + 1)
        assert device.send(req) == VERR_NOT_SUPPORTED

    def test_unreadable_body_is_ignored(self, device: Device) -> None:
        """A header claiming more bytes than guest memory holds is not answered."""
        req = vmmdev_request(T.GET_HOST_VERSION, 40, header_size=4096)
        assert device.send(req) == VERR_GENERAL_FAILURE

    @pytest.mark.parametrize(
        "request_type", [T.GET_HOST_VERSION, T.REPORT_GUEST_INFO2, T.WRITE_COREDUMP]
    )
    def test_gate_lets_early_requests_through(self, device: Device, request_type: int) -> None:
        """Before the additions report in, types 4, 58 and 218 are still handled."""
        rc = device.send(vmmdev_request(request_type, EXACT_SIZES[RequestType(request_type)]))
        assert rc != VERR_NOT_SUPPORTED

    @pytest.mark.parametrize(
        "request_type", [T.GET_SESSION_ID, T.ACKNOWLEDGE_EVENTS, T.HGCM_CONNECT, 9999]
    )
    def test_gate_refuses_everything_else(self, device: Device, request_type: int) -> None:
        """Before REPORT_GUEST_INFO every other request gets VERR_NOT_SUPPORTED."""
        assert device.send(vmmdev_request(request_type, 168)) == VERR_NOT_SUPPORTED

    def test_unknown_type_is_not_implemented(self, device: Device) -> None:
        """An unknown request type gets VERR_NOT_IMPLEMENTED once the gate is open."""
        device.report_additions()
        assert device.send(vmmdev_request(9999, 24)) == VERR_NOT_IMPLEMENTED
        assert device.send(vmmdev_request(T.LOG_STRING, 32)) == VERR_NOT_IMPLEMENTED

    @pytest.mark.parametrize(("request_type", "size"), list(EXACT_SIZES.items()))
    def test_exact_sizes(self, device: Device, request_type: int, size: int) -> None:
        """Each fixed-size request is refused one byte short and one byte long."""
        device.report_additions()
        for wrong in (size - 1, size + 1):
            assert device.send(vmmdev_request(request_type, wrong)) == VERR_INVALID_PARAMETER

    @pytest.mark.parametrize(
        ("request_type", "minimum"),
        [(T.HGCM_CONNECT, 168), (T.HGCM_DISCONNECT, 36), (T.HGCM_CALL64, 44), (T.HGCM_CANCEL2, 28)],
    )
    def test_hgcm_minimum_sizes(self, device: Device, request_type: int, minimum: int) -> None:
        """HGCM requests need at least their struct size."""
        device.report_additions()
        assert device.send(vmmdev_request(request_type, minimum - 1)) == VERR_INVALID_PARAMETER

    def test_guest_heartbeat_takes_any_size(self, device: Device) -> None:
        """GUEST_HEARTBEAT is a bare header but larger requests are fine too."""
        device.report_additions()
        assert device.send(vmmdev_request(T.GUEST_HEARTBEAT, 24)) == VINF_SUCCESS
        assert device.send(vmmdev_request(T.GUEST_HEARTBEAT, 64)) == VINF_SUCCESS

    @pytest.mark.parametrize("size", [24, 32, 4000])
    def test_idle_leaves_rc_alone(self, device: Device, size: int) -> None:
        """IDLE halts the vCPU and does not touch rc, whatever its size."""
        device.report_additions()
        assert device.send(vmmdev_request(T.IDLE, size)) == VERR_GENERAL_FAILURE

    def test_host_version(self, device: Device) -> None:
        """GET_HOST_VERSION reports a 7.0 host with PHYS_PAGE_LIST."""
        req = vmmdev_request(T.GET_HOST_VERSION, 40)
        assert device.send(req) == VINF_SUCCESS
        assert (L.HostVersionRequest.major.get(req), L.HostVersionRequest.minor.get(req)) == (7, 0)
        assert L.HostVersionRequest.features.get(req) & 0x1

    def test_fault_answers_without_executing(self, device: Device) -> None:
        """An injected fault answers the next N requests of its type, then the host works."""
        device.report_additions()
        device.vmmdev.add_fault(T.GET_SESSION_ID, VERR_ACCESS_DENIED, count=2)
        statuses = [device.send(vmmdev_request(T.GET_SESSION_ID, 32)) for _ in range(3)]
        assert statuses == [VERR_ACCESS_DENIED, VERR_ACCESS_DENIED, VINF_SUCCESS]

    @pytest.mark.parametrize("count", [0, MAX_FAULT_COUNT + 1, 99999999999999999999999])
    def test_fault_count_is_bounded(self, device: Device, count: int) -> None:
        """A fault for zero requests, or for more than MAX_FAULT_COUNT, is refused with the
        range; nothing is queued."""
        with pytest.raises(ValueError, match=rf"must be in \[1, {MAX_FAULT_COUNT}\], got {count}$"):
            device.vmmdev.add_fault(T.GET_SESSION_ID, -1, count=count)
        device.vmmdev.add_fault(T.GET_SESSION_ID, -1, count=MAX_FAULT_COUNT)
        assert device.vmmdev.faults.queued_faults() == [
            {
                "request": "GET_SESSION_ID",
                "status": "VERR_GENERAL_FAILURE",
                "remaining": MAX_FAULT_COUNT,
            }
        ]

    def test_queued_faults_are_listed_and_cleared(self, device: Device) -> None:
        """The queue lists each fault by request type, in the order they answer, with what
        is left of it; clearing one type drops only its faults, clearing all the rest, and
        each clear says how many answers it dropped. The host then answers as usual."""
        device.report_additions()
        faults = device.vmmdev.faults
        device.vmmdev.add_fault(T.GET_SESSION_ID, VERR_ACCESS_DENIED, count=3)
        device.vmmdev.add_fault(T.GET_SESSION_ID, VERR_NOT_SUPPORTED)
        device.vmmdev.add_fault(T.GET_HOST_VERSION, -4242)
        assert device.send(vmmdev_request(T.GET_SESSION_ID, 32)) == VERR_ACCESS_DENIED
        assert faults.queued_faults() == [
            {"request": "GET_HOST_VERSION", "status": "VERR_UNKNOWN(-4242)", "remaining": 1},
            {"request": "GET_SESSION_ID", "status": "VERR_ACCESS_DENIED", "remaining": 2},
            {"request": "GET_SESSION_ID", "status": "VERR_NOT_SUPPORTED", "remaining": 1},
        ]
        assert device.vmmdev.clear_faults(T.GET_SESSION_ID) == 3
        assert device.vmmdev.clear_faults(T.GET_SESSION_ID) == 0
        assert device.send(vmmdev_request(T.GET_SESSION_ID, 32)) == VINF_SUCCESS
        assert [f["request"] for f in faults.queued_faults()] == ["GET_HOST_VERSION"]
        assert device.vmmdev.clear_faults() == 1
        assert (faults.queued_faults(), faults.has_faults) == ([], False)
        assert device.send(vmmdev_request(T.GET_HOST_VERSION, 40)) == VINF_SUCCESS

    def test_active_delays_are_listed(self, device: Device) -> None:
        """Each delayed request type is listed with its delay until set to 0."""
        device.vmmdev.set_delay(T.GUEST_HEARTBEAT, 0.5)
        device.vmmdev.set_delay(T.GET_HOST_VERSION, 2)
        assert device.vmmdev.faults.active_delays() == {
            "GET_HOST_VERSION": 2,
            "GUEST_HEARTBEAT": 0.5,
        }
        device.vmmdev.set_delay(T.GET_HOST_VERSION, 0)
        assert device.vmmdev.faults.active_delays() == {"GUEST_HEARTBEAT": 0.5}

    async def test_delay_holds_the_port(self, device: Device, autojump_clock: object) -> None:
        """A delayed request type is answered after the configured virtual time."""
        device.vmmdev.set_delay(T.GET_HOST_VERSION, 1.5)
        req = vmmdev_request(T.GET_HOST_VERSION, 40)
        phys = device.ram.map(req)
        start = trio.current_time()
        await device.vmmdev.submit(phys)
        assert trio.current_time() - start == 1.5
        assert L.RequestHeader.rc.get(req) == VINF_SUCCESS

    @pytest.mark.parametrize(
        ("waited", "new_delay", "answered_after"),
        [(0.0, 0.0, 0.0), (3.0, 5.0, 5.0), (3.0, 2.0, 3.0), (3.0, 20.0, 20.0)],
        ids=["ended", "shortened", "already-waited-out", "lengthened"],
    )
    async def test_a_new_delay_moves_the_end_of_held_writes(
        self,
        device: Device,
        autojump_clock: trio.testing.MockClock,
        waited: float,
        new_delay: float,
        answered_after: float,
    ) -> None:
        """A delay changed while a write of its type is held applies to that write, from
        when it was written: 0 (or one it has waited out) answers it at once, another one
        moves its answer; ``held_requests`` counts it while it is held."""
        device.vmmdev.set_delay(T.GET_HOST_VERSION, 1000)
        req = vmmdev_request(T.GET_HOST_VERSION, 40)
        phys = device.ram.map(req)
        start = trio.current_time()
        answered: list[float] = []

        async def write() -> None:
            await device.vmmdev.submit(phys)
            answered.append(trio.current_time() - start)

        async with trio.open_nursery() as guest:
            guest.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            held = device.vmmdev.held_requests()
            autojump_clock.jump(waited)
            device.vmmdev.set_delay(T.GET_HOST_VERSION, new_delay)
        assert (held, answered) == ({"GET_HOST_VERSION": 1}, [answered_after])
        assert (L.RequestHeader.rc.get(req), device.vmmdev.held_requests()) == (VINF_SUCCESS, {})

    @pytest.mark.parametrize("bad", [math.nan, -1.0])
    async def test_a_bad_delay_changes_nothing(
        self, device: Device, autojump_clock: object, bad: float
    ) -> None:
        """A NaN or negative delay is refused before anything changed: the delay stays, and
        so does the end of the write it holds."""
        device.vmmdev.set_delay(T.GET_HOST_VERSION, 2)
        version = device.ram.map(vmmdev_request(T.GET_HOST_VERSION, 40))
        start = trio.current_time()
        async with trio.open_nursery() as guest:
            guest.start_soon(device.vmmdev.submit, version)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ValueError, match=f"not negative or NaN, got {bad}$"):
                device.vmmdev.set_delay(T.GET_HOST_VERSION, bad)
            delays = device.vmmdev.faults.active_delays()
        assert delays == {"GET_HOST_VERSION": 2}
        assert trio.current_time() - start == 2

    async def test_a_new_delay_of_another_type_leaves_held_writes_alone(
        self, device: Device, autojump_clock: object
    ) -> None:
        """Only the writes of the type whose delay changed move."""
        device.vmmdev.set_delay(T.GET_HOST_VERSION, 2)
        device.vmmdev.set_delay(T.GET_SESSION_ID, 2)
        version = device.ram.map(vmmdev_request(T.GET_HOST_VERSION, 40))
        start = trio.current_time()
        async with trio.open_nursery() as guest:
            guest.start_soon(device.vmmdev.submit, version)
            await trio.testing.wait_all_tasks_blocked()
            device.vmmdev.set_delay(T.GET_SESSION_ID, 0)
            assert device.vmmdev.held_requests() == {"GET_HOST_VERSION": 1}
        assert trio.current_time() - start == 2

    async def test_power_off_ends_a_held_write(
        self, device: Device, autojump_clock: object
    ) -> None:
        """A port write held by a delay ends, unhandled, when the VM powers off."""
        device.vmmdev.set_delay(T.GET_HOST_VERSION, 1e9)
        req = vmmdev_request(T.GET_HOST_VERSION, 40)
        L.RequestHeader.rc.set(req, VERR_GENERAL_FAILURE)
        phys = device.ram.map(req)
        start = trio.current_time()
        async with trio.open_nursery() as vm, trio.open_nursery() as guest:
            vm.start_soon(device.vmmdev.run)
            guest.start_soon(device.vmmdev.submit, phys)
            await trio.testing.wait_all_tasks_blocked()
            vm.cancel_scope.cancel()
        assert trio.current_time() == start
        assert L.RequestHeader.rc.get(req) == VERR_GENERAL_FAILURE

    async def test_no_write_is_held_once_the_vm_is_off(
        self, device: Device, autojump_clock: object
    ) -> None:
        """Once the VM powered off, a port write a delay would hold ends at once, unhandled,
        as the hold the power-off ended does."""
        device.vmmdev.set_delay(T.GET_HOST_VERSION, 1e9)
        req = vmmdev_request(T.GET_HOST_VERSION, 40)
        L.RequestHeader.rc.set(req, VERR_GENERAL_FAILURE)
        phys = device.ram.map(req)
        async with trio.open_nursery() as vm:
            vm.start_soon(device.vmmdev.run)
            await trio.testing.wait_all_tasks_blocked()
            vm.cancel_scope.cancel()
        start = trio.current_time()
        await device.vmmdev.submit(phys)
        assert trio.current_time() == start
        assert L.RequestHeader.rc.get(req) == VERR_GENERAL_FAILURE

    @given(st.binary(min_size=24, max_size=3000))
    def test_garbage_never_crashes(self, data: bytes) -> None:
        """Arbitrary bytes with a valid version never raise from the port handler."""
        device = make_device()
        device.report_additions()
        req = bytearray(data)
        L.RequestHeader.version.set(req, 0x10001)
        L.RequestHeader.size_.set(req, min(L.RequestHeader.size_.get(req), len(req)))
        device.send(req)


class TestGuestInfo:
    """REPORT_GUEST_INFO and REPORT_GUEST_INFO2 validation."""

    @pytest.mark.parametrize(
        ("version", "rc"),
        [(0x00010004, VINF_SUCCESS), (0x00010000, VINF_SUCCESS), (0x00010005, -11), (0x20000, -11)],
    )
    def test_interface_version(self, device: Device, version: int, rc: int) -> None:
        """Only interface 1.x with x <= 4 opens the gate."""
        req = vmmdev_request(T.REPORT_GUEST_INFO, 32)
        L.GuestInfoRequest.interface_version.set(req, version)
        assert rc == device.send(req)
        assert (rc == VINF_SUCCESS) is device.vmmdev.guest.additions_ok
        assert VERR_VERSION_MISMATCH == -11

    def test_bad_report_after_a_good_one_shuts_the_additions_out(self, device: Device) -> None:
        """VMMDev recomputes the gate on every changed report: a bad one closes it again."""
        device.report_additions()
        req = vmmdev_request(T.REPORT_GUEST_INFO, 32)
        L.GuestInfoRequest.interface_version.set(req, 0x00020000)
        assert device.send(req) == VERR_VERSION_MISMATCH
        assert not device.vmmdev.guest.additions_ok
        assert device.send(vmmdev_request(T.GET_SESSION_ID, 32)) == VERR_NOT_SUPPORTED

    @pytest.mark.parametrize(
        ("version", "name", "rc", "kept"),
        [
            ((6, 0, 0), b"6.0.0\0" + b"\xaa" * 10, VINF_SUCCESS, ""),
            ((7, 0, 18), b"7.0.18_OSE\0", VINF_SUCCESS, "OSE"),
            ((7, 0, 18), b"7.0.18_RC2_Oracle\0", VINF_SUCCESS, "RC2_Oracle"),
            ((7, 0, 18), b"7.0.18_BETA\0", VINF_SUCCESS, "BETA"),
            ((7, 0, 18), b"7.0.18_Ubuntu 22\0", VERR_INVALID_PARAMETER, None),  # space
            ((7, 0, 18), b"7.0.18_OSE_x\0", VERR_INVALID_PARAMETER, None),  # no build tag first
            ((7, 0, 18), b"7.0.18_RC256_x\0", VERR_INVALID_PARAMETER, None),  # RC above 255
            ((7, 0, 18), b"7.0.18_RC++7_x\0", VINF_SUCCESS, "RC++7_x"),  # '+' signs parse
            ((7, 0, 18), b"7.0.18_RC-0_x\0", VERR_INVALID_PARAMETER, None),  # '-' does not
            ((7, 0, 18), b"7.0.18_RC--7_x\0", VINF_SUCCESS, "RC--7_x"),  # '-' toggles the sign
            ((7, 0, 18), b"7.0.18_RC-+7_x\0", VINF_SUCCESS, "RC-+7_x"),  # '+' makes it positive
            ((7, 0, 18), b"7.0.18_RC+-7_x\0", VERR_INVALID_PARAMETER, None),  # ends negative
            ((7, 0, 18), b"7.0.18_RC+_x\0", VERR_INVALID_PARAMETER, None),  # signs, no digits
            ((7, 0, 18), b"7.0.1\0", VERR_INVALID_PARAMETER, None),
            ((7, 0, 18), b"7.0.18r1\0", VERR_INVALID_PARAMETER, None),
            ((2, 0, 0), b"2.0.0\0", VERR_INVALID_PARAMETER, None),
            ((3, 0, 0), b"anything\0", VERR_INVALID_PARAMETER, None),  # prefix even when relaxed
            ((3, 0, 0), b"3.0.0 beta\0", VINF_SUCCESS, ""),  # relaxed: the rest is dropped
            ((4, 1, 49), b"4.1.49_RC1_a b\0", VINF_SUCCESS, "RC1"),  # relaxed: build tag kept
            ((6, 0, 0), b"6.0.0" + b"x" * 123, VERR_INVALID_PARAMETER, None),
            ((6, 256, 0), b"6.256.0\0", VERR_OUT_OF_RANGE, None),
            ((256, 0, 0), b"256.0.0\0", VERR_OUT_OF_RANGE, None),
            ((6, 0, 0x10000), b"6.0.65536\0", VERR_OUT_OF_RANGE, None),
        ],
    )
    def test_info2(
        self, device: Device, version: tuple[int, int, int], name: bytes, rc: int, kept: str | None
    ) -> None:
        """INFO2 needs major >= 3 (else an invalid parameter), a version packing into 8.8.16
        bits (else out of range), a NUL-terminated name starting with the version and, from
        4.1.50 on, nothing after it but "_" and build and/or publisher tags; the host keeps
        the tags."""
        req = vmmdev_request(T.REPORT_GUEST_INFO2, 168)
        L.GuestInfo2Request.additions_major.set(req, version[0])
        L.GuestInfo2Request.additions_minor.set(req, version[1])
        L.GuestInfo2Request.additions_build.set(req, version[2])
        req[40 : 40 + len(name)] = name
        assert rc == device.send(req)
        if kept is not None:
            assert device.vmmdev.guest.additions_name == kept


class TestEvents:
    """Pending events, the filter, the interrupt line and acknowledgement."""

    def test_events_wait_for_the_additions(self, device: Device) -> None:
        """Events raised before the additions report stay pending without an interrupt."""
        device.vmmdev.raise_events(Event.RESTORED)
        assert not irq(device)
        device.report_additions()
        filter_mask(device, Event.RESTORED, 0)
        assert irq(device)
        assert acknowledge(device) == Event.RESTORED

    def test_masked_events_stay_pending(self, device: Device) -> None:
        """An event outside the filter is kept and delivered when the filter includes it."""
        device.report_additions()
        device.vmmdev.raise_events(Event.VRDP)
        assert not irq(device)
        assert acknowledge(device) == 0
        filter_mask(device, Event.VRDP, 0)
        assert irq(device)
        assert acknowledge(device) == Event.VRDP
        assert not irq(device)
        assert device.vmmdev.pending_events == 0

    def test_filter_change_is_deferred_while_events_are_deliverable(self, device: Device) -> None:
        """With events deliverable, a filter change waits for the next acknowledgement."""
        device.report_additions()
        filter_mask(device, Event.RESTORED, 0)
        device.vmmdev.raise_events(Event.RESTORED | Event.VRDP)
        filter_mask(device, Event.VRDP, Event.RESTORED)
        assert device.vmmdev.guest_filter == Event.RESTORED
        assert acknowledge(device) == Event.VRDP
        assert device.vmmdev.guest_filter == Event.VRDP
        assert device.vmmdev.pending_events == Event.RESTORED

    def test_hgcm_bit_cannot_be_cleared(self, device: Device) -> None:
        """The NOT mask never clears the HGCM bit."""
        device.report_additions()
        filter_mask(device, 0x7FF, 0)
        filter_mask(device, 0, 0xFFFFFFFF)
        assert device.vmmdev.guest_filter == Event.HGCM

    def test_line_rises_only_on_a_new_deliverable_event(self, device: Device) -> None:
        """Raising more events while some are deliverable keeps the line as it is."""
        device.report_additions()
        filter_mask(device, Event.RESTORED | Event.VRDP, 0)
        device.vmmdev.raise_events(Event.RESTORED)
        device.vmmdev.raise_events(Event.VRDP)
        assert acknowledge(device) == Event.RESTORED | Event.VRDP

    def test_fast_port_read_acknowledges(self, device: Device) -> None:
        """Reading the fast port is ACKNOWLEDGE_EVENTS without a request: the events, the
        line lowered, nothing counted as a request."""
        device.report_additions()
        filter_mask(device, Event.RESTORED, 0)
        device.vmmdev.raise_events(Event.RESTORED | Event.VRDP)
        assert device.vmmdev.read_fast_ack_port() == Event.RESTORED
        assert not irq(device)
        assert device.vmmdev.pending_events == Event.VRDP
        assert device.vmmdev.request_counts[T.ACKNOWLEDGE_EVENTS] == 0

    @pytest.mark.parametrize("interface", [None, 0x0001_0003])
    def test_fast_port_needs_the_additions(self, device: Device, interface: int | None) -> None:
        """Before the additions reported (or with the legacy 1.03 interface) the port reads
        0xFFFFFFFF and acknowledges nothing."""
        device.vmmdev.raise_events(Event.RESTORED)
        if interface is not None:
            req = vmmdev_request(T.REPORT_GUEST_INFO, 32)
            L.GuestInfoRequest.interface_version.set(req, interface)
            assert device.send(req) == VINF_SUCCESS
        assert device.vmmdev.read_fast_ack_port() == 0xFFFF_FFFF
        assert device.vmmdev.pending_events == Event.RESTORED

    def test_reset_keeps_only_display_change(self, device: Device) -> None:
        """A VM reset clears the filter and every pending event but DISPLAY_CHANGE_REQUEST."""
        device.report_additions()
        device.vmmdev.raise_events(Event.RESTORED | Event.DISPLAY_CHANGE_REQUEST)
        old = device.vmmdev.session_id
        device.vmmdev.reset()
        assert device.vmmdev.pending_events == Event.DISPLAY_CHANGE_REQUEST
        assert device.vmmdev.guest_filter == 0
        assert not device.vmmdev.guest.additions_ok
        assert old != device.vmmdev.session_id


class TestHostRequests:
    """Time, session id, capabilities, facilities and core dumps."""

    async def test_host_time(self, device: Device) -> None:
        """GET_HOST_TIME returns milliseconds since the epoch."""
        device.report_additions()
        req = vmmdev_request(T.GET_HOST_TIME, 32)
        assert device.send(req) == VINF_SUCCESS
        assert L.HostTimeRequest.time_ms.get(req) > 1_600_000_000_000

    def test_host_time_disabled(self) -> None:
        """A host with time sync off answers VERR_NOT_SUPPORTED."""
        device = make_device(host_time_enabled=False)
        device.report_additions()
        assert device.send(vmmdev_request(T.GET_HOST_TIME, 32)) == VERR_NOT_SUPPORTED

    def test_session_id_changes_on_restore(self, device: Device) -> None:
        """The session id is stable until a restore."""
        device.report_additions()
        ids = []
        for restore in (False, False, True):
            if restore:
                device.vmmdev.restore()
            req = vmmdev_request(T.GET_SESSION_ID, 32)
            assert device.send(req) == VINF_SUCCESS
            ids.append(L.SessionIdRequest.session_id.get(req))
        assert ids[0] == ids[1] != ids[2]

    def test_capabilities(self, device: Device) -> None:
        """SET_GUEST_CAPABILITIES applies or/not; the legacy report adds GRAPHICS."""
        device.report_additions()
        req = vmmdev_request(T.SET_GUEST_CAPABILITIES, 32)
        L.MaskRequest.or_mask.set(req, 0x3)
        L.MaskRequest.not_mask.set(req, 0x1)
        assert device.send(req) == VINF_SUCCESS
        assert device.vmmdev.guest.capabilities == 0x2
        legacy = vmmdev_request(T.REPORT_GUEST_CAPABILITIES, 28)
        assert device.send(legacy) == VINF_SUCCESS
        assert device.vmmdev.guest.capabilities == 0x4

    @pytest.mark.parametrize(
        ("facility", "status", "rc"),
        [
            (Facility.VBOX_SERVICE, FacilityStatus.ACTIVE, VINF_SUCCESS),
            (0, FacilityStatus.ACTIVE, VERR_INVALID_PARAMETER),
            (0x7FFFFFFF, FacilityStatus.ACTIVE, VERR_INVALID_PARAMETER),
            (Facility.VBOX_SERVICE, 0x10000, VERR_OUT_OF_RANGE),
        ],
    )
    def test_guest_status(self, device: Device, facility: int, status: int, rc: int) -> None:
        """Facilities must be 1..ALL and statuses fit 16 bits."""
        device.report_additions()
        assert rc == report_status(device, facility, status)

    def test_facility_table_is_bounded(self, device: Device) -> None:
        """At 32 entries an inactive non-fixed one is expunged, else the table is full."""
        device.report_additions()
        for facility in range(2000, 2027):
            assert report_status(device, facility, FacilityStatus.ACTIVE) == VINF_SUCCESS
        assert report_status(device, 3000, FacilityStatus.ACTIVE) == VERR_OUT_OF_RESOURCES
        assert report_status(device, 2000, FacilityStatus.INACTIVE) == VINF_SUCCESS
        assert report_status(device, 3000, FacilityStatus.ACTIVE) == VINF_SUCCESS
        assert "2000" not in device.vmmdev.facilities.snapshot()

    def test_facility_table_expunges_the_highest_inactive_entry(self, device: Device) -> None:
        """Of several inactive entries, the full table drops the highest-numbered one."""
        device.report_additions()
        for facility in (2001, 2005, *range(2010, 2035)):
            report_status(device, facility, FacilityStatus.ACTIVE)
        for facility in (2001, 2005):
            assert report_status(device, facility, FacilityStatus.INACTIVE) == VINF_SUCCESS
        assert report_status(device, 3000, FacilityStatus.ACTIVE) == VINF_SUCCESS
        table = device.vmmdev.facilities.snapshot()
        assert ("2001" in table, "2005" in table) == (True, False)

    def test_facility_all_updates_every_entry(self, device: Device) -> None:
        """Facility ALL sets every entry's status."""
        device.report_additions()
        report_status(device, Facility.ALL, FacilityStatus.TERMINATED)
        statuses = {e["status"] for e in device.vmmdev.facilities.snapshot().values()}
        assert {FacilityStatus.TERMINATED} == statuses

    def test_reset_makes_facilities_inactive_and_keeps_their_flags(self, device: Device) -> None:
        """A VM reset sets every facility inactive and leaves the flags it last reported."""
        device.report_additions()
        assert device.vmmdev.facilities.report(Facility.VBOX_SERVICE, 50, 7) == VINF_SUCCESS
        device.vmmdev.reset()
        entry = device.vmmdev.facilities.entries[Facility.VBOX_SERVICE]
        assert (entry.status, entry.flags) == (FacilityStatus.INACTIVE, 7)

    def test_core_dump_needs_permission(self) -> None:
        """WRITE_COREDUMP is refused unless core dumps are enabled for the VM."""
        assert make_device().send(vmmdev_request(T.WRITE_COREDUMP, 28)) == VERR_ACCESS_DENIED
        allowed = make_device(core_dump_enabled=True)
        assert allowed.send(vmmdev_request(T.WRITE_COREDUMP, 28)) == VINF_SUCCESS
        assert allowed.vmmdev.core_dumps == 1

    def test_hypervisor_info(self, device: Device) -> None:
        """The host has no hypervisor window: GET answers size 0 and leaves the start alone;
        setting a window is retried by the guest, unfixing (start 0) or an empty one is
        accepted."""
        device.report_additions()
        get = vmmdev_request(T.GET_HYPERVISOR_INFO, 32)
        struct.pack_into("<II", get, 24, 0x1234_5000, 0x40_0000)
        assert device.send(get) == VINF_SUCCESS
        assert struct.unpack_from("<II", get, 24) == (0x1234_5000, 0)
        for start, size, rc in (
            (0x1000_0000, 0x40_0000, STATUS_CODES["VERR_TRY_AGAIN"]),
            (0x1000_0000, 0, VINF_SUCCESS),
            (0, 0x40_0000, VINF_SUCCESS),
        ):
            req = vmmdev_request(T.SET_HYPERVISOR_INFO, 32)
            struct.pack_into("<II", req, 24, start, size)
            assert rc == device.send(req), (start, size)


HOST_MOUSE_BITS: Final = 0x120
"""HOST_RECHECKS_NEEDS_HOST_CURSOR and HOST_SUPPORTS_FULL_STATE_PROTOCOL, set by the
device's constructor."""


def mouse_status(device: Device, request_type: int = T.GET_MOUSE_STATUS, features: int = 0) -> int:
    """Send GET_MOUSE_STATUS (or SET_MOUSE_STATUS with ``features``); return the features."""
    req = vmmdev_request(request_type, 36)
    struct.pack_into("<I", req, 24, features)
    assert device.send(req) == VINF_SUCCESS
    return int(struct.unpack_from("<I", req, 24)[0])


class TestMouseStatus:
    """``vmmdevReqHandler_Get/SetMouseStatus``: one capability word, host and guest bits."""

    def test_host_bits_are_always_reported(self, device: Device) -> None:
        """Before the guest sets anything the word holds the constructor's host bits."""
        device.report_additions()
        assert mouse_status(device) == HOST_MOUSE_BITS

    def test_set_replaces_only_the_guest_bits(self, device: Device) -> None:
        """SET keeps the host's bits and drops what is outside VMMDEV_MOUSE_GUEST_MASK."""
        device.report_additions()
        mouse_status(device, T.SET_MOUSE_STATUS, 0xFFFF_FFFF)
        assert mouse_status(device) == HOST_MOUSE_BITS | 0x95
        mouse_status(device, T.SET_MOUSE_STATUS, 0x11)
        assert mouse_status(device) == HOST_MOUSE_BITS | 0x11
        mouse_status(device, T.SET_MOUSE_STATUS, 0)
        assert mouse_status(device) == HOST_MOUSE_BITS

    def test_reset_clears_only_the_guest_bits(self, device: Device) -> None:
        """A VM reset forgets the guest's bits; the host's stay."""
        device.report_additions()
        mouse_status(device, T.SET_MOUSE_STATUS, 0x11)
        device.vmmdev.reset()
        device.report_additions()
        assert mouse_status(device) == HOST_MOUSE_BITS


VERR_TOO_MUCH_DATA: Final = STATUS_CODES["VERR_TOO_MUCH_DATA"]
VERR_INVALID_UTF8_ENCODING: Final = STATUS_CODES["VERR_INVALID_UTF8_ENCODING"]
VERR_CODE_POINT_SURROGATE: Final = STATUS_CODES["VERR_CODE_POINT_SURROGATE"]
VERR_CODE_POINT_ENDIAN_INDICATOR: Final = STATUS_CODES["VERR_CODE_POINT_ENDIAN_INDICATOR"]
GET_MOUSE_STATUS_EX: Final = 223


def shortened(req: bytearray, size: int) -> bytearray:
    """``req`` cut to ``size`` bytes, its header saying so."""
    short = req[:size]
    L.RequestHeader.size_.set(short, size)
    return short


class TestOtherRequests:
    """The dispatcher's remaining requests the agent can meet: REPORT_GUEST_USER_STATE,
    NT_BUG_CHECK, GET_MOUSE_STATUS_EX."""

    def test_user_state_is_taken(self, device: Device) -> None:
        """A well-formed report reaches Main: user, domain, state and details."""
        device.report_additions()
        req = user_state_request(b"alice\0", b"corp\0", b"\x01\x02")
        assert device.send(req) == VINF_SUCCESS
        (report,) = device.vmmdev.user_states
        assert (report.user, report.domain, report.state, report.details) == (
            b"alice",
            b"corp",
            1,
            b"\x01\x02",
        )

    @pytest.mark.parametrize(
        ("req", "rc"),
        [
            (shortened(user_state_request(), 43), VERR_INVALID_PARAMETER),
            (user_state_request(padding=2048), VERR_TOO_MUCH_DATA),
            (user_state_request(sizes=(257, 0, 0), padding=300), VERR_TOO_MUCH_DATA),
            (user_state_request(sizes=(6, 257, 0), padding=300), VERR_TOO_MUCH_DATA),
            (user_state_request(sizes=(6, 0, 1025), padding=1100), VERR_TOO_MUCH_DATA),
            (user_state_request(sizes=(0, 0, 0), padding=2048), VERR_TOO_MUCH_DATA),
            (user_state_request(sizes=(0, 0, 0)), VERR_INVALID_PARAMETER),
            (user_state_request(sizes=(7, 0, 0)), VERR_INVALID_PARAMETER),
            (user_state_request(b"alice"), VERR_INVALID_PARAMETER),
            (user_state_request(b"al\xffce\0"), VERR_INVALID_UTF8_ENCODING),
            (user_state_request(b"\xc1\x81\0"), VERR_INVALID_UTF8_ENCODING),
            (user_state_request(b"\xed\xa0\x80\0"), VERR_CODE_POINT_SURROGATE),
            (user_state_request(b"\xef\xbf\xbe\0"), VERR_CODE_POINT_ENDIAN_INDICATOR),
            (user_state_request(b"bob\0", b"c\xe0\0"), VERR_INVALID_UTF8_ENCODING),
            (user_state_request(b"bob\0", sizes=(4, 1, 0)), VERR_INVALID_PARAMETER),
            (user_state_request(b"bob\0", b"corp\0", sizes=(4, 5, 1)), VERR_INVALID_PARAMETER),
        ],
        ids=[
            "short",
            "over-2k",
            "user-256",
            "domain-256",
            "details-1k",
            "size-before-empty-user",
            "empty-user",
            "user-past-end",
            "user-unterminated",
            "bad-utf8",
            "overlong",
            "surrogate",
            "endian-indicator",
            "bad-domain",
            "domain-past-end",
            "details-past-end",
        ],
    )
    def test_user_state_checks(self, device: Device, req: bytearray, rc: int) -> None:
        """``vmmdevReqHandler_ReportGuestUserState``'s checks, in its order; nothing reaches
        Main on a failure."""
        device.report_additions()
        assert device.send(req) == rc
        assert not device.vmmdev.user_states

    def test_user_state_takes_what_iprt_takes(self, device: Device) -> None:
        """IPRT's UTF-8 allows five-byte sequences (beyond Unicode); the domain may be
        empty (its size 0)."""
        device.report_additions()
        assert device.send(user_state_request(b"\xf8\x88\x80\x80\x80\0")) == VINF_SUCCESS
        assert device.vmmdev.user_states[0].domain is None

    @pytest.mark.parametrize(("size", "rc"), [(24, VINF_SUCCESS), (64, VINF_SUCCESS), (32, -2)])
    def test_nt_bug_check_sizes(self, device: Device, size: int, rc: int) -> None:
        """A bare header or the whole report; any other size is VERR_INVALID_PARAMETER."""
        device.report_additions()
        req = vmmdev_request(T.NT_BUG_CHECK, size)
        if size == 64:
            struct.pack_into("<5Q", req, 24, 0xEF, 1, 2, 3, 4)
        assert device.send(req) == rc
        expected = {24: [(0, 0, 0, 0, 0)], 64: [(0xEF, 1, 2, 3, 4)], 32: []}[size]
        assert list(device.vmmdev.bug_checks) == expected

    def test_reports_kept_are_bounded(self, device: Device) -> None:
        """Only the latest 64 reports of each kind are kept, however many the guest sends."""
        device.report_additions()
        for _ in range(65):
            assert device.send(vmmdev_request(T.NT_BUG_CHECK, 24)) == VINF_SUCCESS
            assert device.send(user_state_request()) == VINF_SUCCESS
        assert (len(device.vmmdev.bug_checks), len(device.vmmdev.user_states)) == (64, 64)

    @pytest.mark.parametrize("size", [47, 49])
    def test_mouse_status_ex_needs_its_size(self, device: Device, size: int) -> None:
        """GET_MOUSE_STATUS_EX is exactly 48 bytes."""
        device.report_additions()
        assert device.send(vmmdev_request(GET_MOUSE_STATUS_EX, size)) == VERR_INVALID_PARAMETER

    def test_mouse_status_ex(self, device: Device) -> None:
        """GET_MOUSE_STATUS's answer, then no wheel movement and no buttons."""
        device.report_additions()
        mouse_status(device, T.SET_MOUSE_STATUS, 0x91)
        req = vmmdev_request(GET_MOUSE_STATUS_EX, 48)
        req[24:48] = b"\xff" * 24
        assert device.send(req) == VINF_SUCCESS
        assert struct.unpack_from("<Iiiiii", req, 24) == (HOST_MOUSE_BITS | 0x91, 0, 0, 0, 0, 0)


def report_status(device: Device, facility: int, status: int) -> int:
    """Send REPORT_GUEST_STATUS."""
    req = vmmdev_request(T.REPORT_GUEST_STATUS, 36)
    L.GuestStatusRequest.facility.set(req, facility)
    L.GuestStatusRequest.status.set(req, status)
    return device.send(req)


class TestBalloon:
    """The target, its acknowledgement and CHANGE_MEMBALLOON validation."""

    def test_target_notifies_only_when_it_differs_from_the_acknowledged(
        self, device: Device
    ) -> None:
        """0x40 is raised for a new target, not for the acknowledged one."""
        device.report_additions()
        filter_mask(device, Event.BALLOON_CHANGE_REQUEST, 0)
        device.vmmdev.set_balloon_target(100)
        assert acknowledge(device) == Event.BALLOON_CHANGE_REQUEST
        req = read_balloon_target(device)
        assert (
            L.MemBalloonInfoRequest.balloon_chunks.get(req),
            L.MemBalloonInfoRequest.phys_mem_chunks.get(req),
        ) == (100, 2048)
        assert device.vmmdev.balloon.acked_mb == 100
        device.vmmdev.set_balloon_target(100)
        assert acknowledge(device) == 0

    def test_reset_forgets_the_acknowledgement(self, device: Device) -> None:
        """After a VM reset the acknowledged target counts as unseen: setting it notifies."""
        device.report_additions()
        device.vmmdev.set_balloon_target(100)
        read_balloon_target(device)
        device.vmmdev.reset()
        device.report_additions()
        filter_mask(device, Event.BALLOON_CHANGE_REQUEST, 0)
        device.vmmdev.set_balloon_target(100)
        assert acknowledge(device) == Event.BALLOON_CHANGE_REQUEST

    def test_restore_forgets_the_acknowledgement(self, device: Device) -> None:
        """``cMbMemoryBalloonLast`` is not in VMMDev's saved state: the restored VM's device
        starts with none, so the target the guest acknowledged before, set again, notifies;
        the target itself stays (Main hands it to the new device)."""
        device.report_additions()
        filter_mask(device, Event.BALLOON_CHANGE_REQUEST, 0)
        device.vmmdev.set_balloon_target(100)
        assert acknowledge(device) == Event.BALLOON_CHANGE_REQUEST
        read_balloon_target(device)
        device.vmmdev.restore()
        assert device.vmmdev.balloon.target_mb == 100
        device.vmmdev.set_balloon_target(100)
        assert acknowledge(device) == Event.BALLOON_CHANGE_REQUEST

    def test_query_without_ack_leaves_the_acknowledgement(self, device: Device) -> None:
        """Only event_ack 0x40 records the acknowledgement."""
        device.report_additions()
        device.vmmdev.set_balloon_target(10)
        assert device.send(vmmdev_request(T.GET_MEMBALLOON_CHANGE_REQ, 36)) == VINF_SUCCESS
        assert device.vmmdev.balloon.acked_mb == 0

    @pytest.mark.parametrize("mb", [-1, 1843, 2048])
    def test_target_cap(self, device: Device, mb: int) -> None:
        """Targets at or above 90 % of RAM (1843 of 2048 MB) are refused as Main does."""
        with pytest.raises(ValueError, match=r"must be in range \[0, 1842\] MB"):
            device.vmmdev.set_balloon_target(mb)

    @pytest.mark.parametrize("mb", [0, 1842])
    def test_target_range_ends(self, device: Device, mb: int) -> None:
        """Both ends of the range the refusal names are accepted."""
        device.vmmdev.set_balloon_target(mb)
        assert device.vmmdev.balloon.target_mb == mb

    @pytest.mark.parametrize("cpus", [1, 2])
    def test_inflate_and_deflate(self, cpus: int) -> None:
        """A chunk inflated and deflated twice: its pages are ballooned once, GMM counts the
        second inflate only while its reservation allows (not here: one vCPU is refused) and
        refuses the second deflate (the count is 0); several vCPUs answer success to all."""
        device = make_device(cpus=cpus)
        device.report_additions()
        balloon = device.vmmdev.balloon
        seen = cpus == 1  # several vCPUs: queued, success answered before it runs
        assert device.send(balloon_change(chunk(0x1000_0000))) == VINF_SUCCESS
        assert (balloon.chunks, balloon.pages) == (1, 256)
        again = device.send(balloon_change(chunk(0x1000_0000)))
        assert again == (VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH if seen else VINF_SUCCESS)
        assert (balloon.chunks, balloon.pages) == (1, 256)
        assert device.send(balloon_change(chunk(0x1000_0000), inflate=False)) == VINF_SUCCESS
        again = device.send(balloon_change(chunk(0x1000_0000), inflate=False))
        assert again == (VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH if seen else VINF_SUCCESS)
        assert (balloon.chunks, balloon.pages) == (0, 0)

    def test_page_states_and_count_part(self) -> None:
        """A chunk sharing one page with a ballooned one adds 255 pages, and GMM refuses to
        count 256 (a guest that touched all its memory leaves it no spare page), its pages
        ballooned all the same; a deflate naming one page never ballooned is counted whole,
        leaving that page's neighbour ballooned and counted as nothing (one vCPU, which sees
        the statuses)."""
        device = make_device(cpus=1)
        device.report_additions()
        balloon = device.vmmdev.balloon
        first = chunk(0x1000_0000)
        assert device.send(balloon_change(first)) == VINF_SUCCESS
        overlapping = [*chunk(0x3000_0000)[:-1], first[100]]
        assert device.send(balloon_change(overlapping)) == VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH
        assert (balloon.chunks, balloon.pages) == (1, 511)
        straddling = [*first[:-1], 0x5000_0000]
        assert device.send(balloon_change(straddling, inflate=False)) == VINF_SUCCESS
        assert (balloon.chunks, balloon.pages) == (0, 256)
        refused = device.send(balloon_change(overlapping, inflate=False))
        assert refused == VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH
        assert (balloon.chunks, balloon.pages) == (0, 1)

    def test_bad_chunks(self) -> None:
        """A wrong page count or size, or a first page off its page boundary, is an invalid
        parameter; later pages off theirs name the page they fall in, and a page named
        twice is ballooned once (``PGMR3PhysChangeMemBalloon`` checks the first only), which
        leaves GMM 255 pages to count 256 by: refused, the pages ballooned all the same."""
        device = make_device(cpus=1)
        device.report_additions()
        balloon = device.vmmdev.balloon
        pages = chunk(0x2000_0000)
        assert device.send(balloon_change(pages, count=255)) == VERR_INVALID_PARAMETER
        for offset in (8, 0x800, 1):
            misaligned = [pages[0] + offset, *pages[1:]]
            assert device.send(balloon_change(misaligned)) == VERR_INVALID_PARAMETER
        longer = balloon_change(pages) + bytearray(8)
        L.RequestHeader.size_.set(longer, len(longer))
        assert device.send(longer) == VERR_INVALID_PARAMETER
        short = vmmdev_request(T.CHANGE_MEMBALLOON, 40)
        L.MemBalloonChangeRequest.pages.set(short, 1)
        assert device.send(short) == VERR_INVALID_PARAMETER
        assert (balloon.chunks, balloon.pages) == (0, 0)
        loose = [*pages[:128], pages[128] + 1, *pages[129:255], pages[0]]
        assert device.send(balloon_change(loose)) == VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH
        assert (balloon.chunks, balloon.pages) == (0, 255)


class TestGuestStats:
    """The statistics interval, its acknowledgement and the reports Main keeps."""

    def query(self, device: Device, *, ack: bool = True) -> int:
        """Send GET_STATISTICS_CHANGE_REQ and return the interval."""
        req = vmmdev_request(T.GET_STATISTICS_CHANGE_REQ, 32)
        L.StatisticsChangeRequest.event_ack.set(req, Event.STATISTICS_INTERVAL_CHANGE_REQUEST * ack)
        assert device.send(req) == VINF_SUCCESS
        return L.StatisticsChangeRequest.interval_s.get(req)

    def test_interval_notifies_until_acknowledged(self, device: Device) -> None:
        """0x80 comes for an interval the guest has not acknowledged, never for the same one."""
        device.report_additions()
        filter_mask(device, Event.STATISTICS_INTERVAL_CHANGE_REQUEST, 0)
        device.vmmdev.set_statistics_interval(5)
        assert acknowledge(device) == Event.STATISTICS_INTERVAL_CHANGE_REQUEST
        assert self.query(device, ack=False) == 5
        device.vmmdev.set_statistics_interval(5)
        assert acknowledge(device) == Event.STATISTICS_INTERVAL_CHANGE_REQUEST
        assert self.query(device) == 5
        device.vmmdev.set_statistics_interval(5)
        assert acknowledge(device) == 0

    def test_acknowledged_value_is_not_even_stored(self, device: Device) -> None:
        """Going back to the acknowledged interval before the guest looked keeps the newer one."""
        device.report_additions()
        device.vmmdev.set_statistics_interval(1)
        assert self.query(device) == 1
        device.vmmdev.set_statistics_interval(3)
        device.vmmdev.set_statistics_interval(1)
        assert self.query(device) == 3

    def test_reset_forgets_the_acknowledgement(self, device: Device) -> None:
        """After a reset the same interval notifies again."""
        device.report_additions()
        device.vmmdev.set_statistics_interval(2)
        assert self.query(device) == 2
        device.vmmdev.reset()
        device.report_additions()
        filter_mask(device, Event.STATISTICS_INTERVAL_CHANGE_REQUEST, 0)
        device.vmmdev.set_statistics_interval(2)
        assert acknowledge(device) == Event.STATISTICS_INTERVAL_CHANGE_REQUEST

    @pytest.mark.parametrize("seconds", [-1, 1 << 32])
    def test_interval_must_fit_a_u32(self, device: Device, seconds: int) -> None:
        """Negative or oversized intervals are refused with one line."""
        with pytest.raises(ValueError, match=r"statistics interval must be in range"):
            device.vmmdev.set_statistics_interval(seconds)

    @pytest.mark.parametrize("seconds", [0xFFFF_FFFF, 0])
    def test_interval_may_be_any_u32(self, device: Device, seconds: int) -> None:
        """The largest u32 and 0 (no reports) are intervals the host takes."""
        device.vmmdev.set_statistics_interval(seconds)
        assert device.vmmdev.guest_stats.interval_s == seconds

    def test_report_is_kept_field_by_field(self, device: Device) -> None:
        """Every u32 of the report lands under its snake-case name; reports are counted."""
        device.report_additions()
        assert device.vmmdev.guest_stats.snapshot() == {
            "interval_s": 0,
            "reports": 0,
            "last": None,
            "main": {},
            "metrics": {},
        }
        req = vmmdev_request(T.REPORT_GUEST_STATS, 100)
        struct.pack_into("<19I", req, 24, *range(100, 119))
        assert device.send(req) == VINF_SUCCESS
        assert device.send(req) == VINF_SUCCESS
        state = device.vmmdev.guest_stats.snapshot()
        assert state["reports"] == 2
        assert state["last"] == {
            "cpu_id": 100,
            "stat_caps": 101,
            "cpu_load_idle": 102,
            "cpu_load_kernel": 103,
            "cpu_load_user": 104,
            "threads": 105,
            "processes": 106,
            "handles": 107,
            "memory_load": 108,
            "page_size": 109,
            "phys_mem_total": 110,
            "phys_mem_avail": 111,
            "phys_mem_balloon": 112,
            "mem_commit_total": 113,
            "mem_kernel_total": 114,
            "mem_kernel_paged": 115,
            "mem_kernel_nonpaged": 116,
            "mem_system_cache": 117,
            "page_file_size": 118,
        }

    def test_restore_asks_for_no_statistics(self, device: Device) -> None:
        """Neither interval is in VMMDev's saved state and the restored VM's Main starts with
        none: after a restore the guest reads 0, and the same interval set again notifies."""
        device.report_additions()
        filter_mask(device, Event.STATISTICS_INTERVAL_CHANGE_REQUEST, 0)
        device.vmmdev.set_statistics_interval(5)
        assert acknowledge(device) == Event.STATISTICS_INTERVAL_CHANGE_REQUEST
        assert self.query(device) == 5
        self.report(device, 0, StatCap.PHYS_MEM_TOTAL, phys_mem_total=1)
        device.vmmdev.restore()
        assert self.query(device) == 0
        assert device.vmmdev.guest_stats.main == {}
        device.vmmdev.set_statistics_interval(5)
        assert acknowledge(device) == Event.STATISTICS_INTERVAL_CHANGE_REQUEST

    def report(self, device: Device, cpu_id: int, caps: StatCap, **fields: int) -> None:
        """Send one REPORT_GUEST_STATS with ``caps`` and the named fields (others 0)."""
        req = vmmdev_request(T.REPORT_GUEST_STATS, 100)
        L.GuestStatsRequest.cpu_id.set(req, cpu_id)
        L.GuestStatsRequest.stat_caps.set(req, caps)
        for name, value in fields.items():
            member: L.IntField = getattr(L.GuestStatsRequest, name)
            member.set(req, value)
        assert device.send(req) == VINF_SUCCESS

    def test_main_averages_cpu_loads_over_the_vm_cpus(self) -> None:
        """Main keeps each CPU's load and publishes the sum over the VM's CPUs divided by
        their count: a 4-CPU guest that reports only CPU 0 shows a quarter of its load."""
        device = make_device(cpus=4)
        device.report_additions()
        loads = {"cpu_load_idle": 20, "cpu_load_kernel": 30, "cpu_load_user": 50}
        self.report(device, 0, CPU_CAPS, **loads)
        assert device.vmmdev.guest_stats.main == {"cpu_user": 12, "cpu_kernel": 7, "cpu_idle": 5}
        for cpu in (1, 2, 3):
            self.report(device, cpu, CPU_CAPS, **loads)
        assert device.vmmdev.guest_stats.main == {"cpu_user": 50, "cpu_kernel": 30, "cpu_idle": 20}
        self.report(device, 64, StatCap.CPU_LOAD_USER, cpu_load_user=99)
        assert device.vmmdev.guest_stats.main["cpu_user"] == 99

    def test_main_sums_cpu_loads_in_32_bits(self) -> None:
        """``Guest::i_setStatistic`` adds the per-CPU loads in a ULONG: a sum past 2^32
        wraps before the division by the CPU count."""
        device = make_device(cpus=2)
        device.report_additions()
        self.report(device, 0, StatCap.CPU_LOAD_IDLE, cpu_load_idle=0xFFFF_FFFF)
        assert device.vmmdev.guest_stats.main["cpu_idle"] == 0x7FFF_FFFF
        self.report(device, 1, StatCap.CPU_LOAD_IDLE, cpu_load_idle=3)
        assert device.vmmdev.guest_stats.main["cpu_idle"] == 1

    def test_main_keeps_only_figures_whose_bit_is_set(self, device: Device) -> None:
        """A field without its stat_caps bit changes nothing; memory pages become KiB; Main
        keeps no threads, processes, handles, memory load, commit or kernel memory."""
        device.report_additions()
        self.report(
            device,
            0,
            StatCap.PHYS_MEM_TOTAL | StatCap.THREADS,
            phys_mem_total=1000,
            phys_mem_avail=500,
            threads=7,
        )
        assert device.vmmdev.guest_stats.main == {"mem_total": 4000}
        everything = StatCap(sum(StatCap)) & ~CPU_CAPS
        self.report(
            device,
            0,
            everything,
            phys_mem_total=2000,
            phys_mem_avail=600,
            phys_mem_balloon=256,
            mem_system_cache=30,
            page_file_size=0xFFFF_FFFF,
        )
        assert device.vmmdev.guest_stats.main == {
            "mem_total": 8000,
            "mem_free": 2400,
            "mem_balloon": 1024,
            "mem_cache": 120,
            "page_total": 0xFFFF_FFFC,
        }

    async def test_metrics_take_a_group_only_from_one_window_with_all_its_bits(
        self, autojump_clock: object
    ) -> None:
        """Main's timer ticks as the interval is set and every interval after; each tick
        hands the collector the bits of the reports since the last one, and it takes the
        CPU loads only with all three bits, the memory figures only with all five (the
        balloon's too), whatever ``main`` holds meanwhile."""
        device = make_device(cpus=1)
        device.report_additions()
        loads = {"cpu_load_idle": 20, "cpu_load_kernel": 30, "cpu_load_user": 50}
        memory = {
            "phys_mem_total": 1000,
            "phys_mem_avail": 500,
            "phys_mem_balloon": 256,
            "mem_system_cache": 30,
            "page_file_size": 7,
        }
        stats = device.vmmdev.guest_stats
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.vmmdev.run)
            await trio.testing.wait_all_tasks_blocked()
            stats.set_interval(1)  # ticks at 0, 1, 2, ...
            no_balloon = RAM_CAPS & ~StatCap.PHYS_MEM_BALLOON
            self.report(device, 0, CPU_CAPS | no_balloon, **loads, **memory)
            await trio.sleep(1.5)
            assert stats.metrics == {"cpu_user": 50, "cpu_kernel": 30, "cpu_idle": 20}
            assert stats.main["mem_total"] == 4000
            self.report(device, 0, StatCap.PHYS_MEM_BALLOON, phys_mem_balloon=256)
            await trio.sleep(1.0)  # the tick at 2 s: the rest came in the window before
            assert "mem_total" not in stats.metrics
            self.report(device, 0, no_balloon, **memory)
            await trio.sleep(0.25)
            self.report(device, 0, StatCap.PHYS_MEM_BALLOON, phys_mem_balloon=256)
            await trio.sleep(0.5)  # the tick at 3 s: one window with all five bits
            assert stats.metrics == {
                "cpu_user": 50,
                "cpu_kernel": 30,
                "cpu_idle": 20,
                "mem_total": 4000,
                "mem_free": 2000,
                "mem_balloon": 1024,
                "mem_cache": 120,
                "page_total": 28,
                "mem_shared": 0,
            }
            assert stats.snapshot()["metrics"] == stats.metrics
            nursery.cancel_scope.cancel()

    async def test_metrics_follow_the_timer(self, autojump_clock: object) -> None:
        """No tick without an interval; a new one ticks at once; a restore empties the
        collector's figures and stops the timer."""
        device = make_device(cpus=1)
        device.report_additions()
        stats = device.vmmdev.guest_stats
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.vmmdev.run)
            self.report(device, 0, RAM_CAPS, phys_mem_total=1)
            await trio.sleep(100)
            assert stats.metrics == {}
            stats.set_interval(100)
            await trio.testing.wait_all_tasks_blocked()
            assert stats.metrics["mem_total"] == 4
            self.report(device, 0, RAM_CAPS, phys_mem_total=2)
            stats.set_interval(50)
            await trio.testing.wait_all_tasks_blocked()
            assert stats.metrics["mem_total"] == 8
            device.vmmdev.restore()
            self.report(device, 0, RAM_CAPS, phys_mem_total=3)
            await trio.sleep(100)
            assert stats.metrics == {}
            nursery.cancel_scope.cancel()

    @pytest.mark.parametrize("cpus", [0, 65])
    def test_cpu_count_is_checked(self, cpus: int) -> None:
        """A VM has 1 to 64 CPUs (VMM_MAX_CPU_COUNT)."""
        with pytest.raises(ValueError, match=r"guest CPUs must be in \[1, 64\]"):
            make_device(cpus=cpus)

    @pytest.mark.parametrize("cpus", [1, 64])
    def test_one_to_64_cpus_are_taken(self, cpus: int) -> None:
        """The fewest and the most CPUs a VM may have."""
        assert make_device(cpus=cpus).vmmdev.guest_stats.cpus == cpus


class TestHeartbeat:
    """Configure, beats and flat-line detection on virtual time."""

    def configure(self, device: Device, *, enabled: bool) -> int:
        """Send HEARTBEAT_CONFIGURE and return the interval."""
        req = vmmdev_request(T.HEARTBEAT_CONFIGURE, 36)
        L.HeartbeatRequest.enabled.set(req, int(enabled))
        assert device.send(req) == VINF_SUCCESS
        return L.HeartbeatRequest.interval_ns.get(req)

    async def test_flatline_after_the_timeout(self, autojump_clock: object) -> None:
        """Without beats the guest is flat-lined exactly at the 4 s timeout, once."""
        device = make_device()
        device.report_additions()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.vmmdev.run)
            start = trio.current_time()
            assert self.configure(device, enabled=True) == 2 * NS_PER_S
            await trio.sleep(3.999)
            assert not flatlined(device)
            await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()
            assert flatlined(device)
            assert trio.current_time() - start == 4.0
            await trio.sleep(10)
            assert device.vmmdev.heartbeat.flatline_count == 1
            device.send(vmmdev_request(T.GUEST_HEARTBEAT, 24))
            assert not flatlined(device)
            assert device.vmmdev.heartbeat.max_gap_ns == 14 * NS_PER_S
            nursery.cancel_scope.cancel()

    async def test_beats_keep_the_guest_alive(self, autojump_clock: object) -> None:
        """Beats every 3 s re-arm the timer; the gap is tracked in ns."""
        device = make_device()
        device.report_additions()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.vmmdev.run)
            self.configure(device, enabled=True)
            for _ in range(5):
                await trio.sleep(3)
                device.send(vmmdev_request(T.GUEST_HEARTBEAT, 24))
            await trio.testing.wait_all_tasks_blocked()
            state = device.vmmdev.heartbeat.snapshot()
            assert (
                state["flatlined"],
                state["beats"],
                state["max_gap_ns"],
            ) == (False, 5, 3 * NS_PER_S)
            nursery.cancel_scope.cancel()

    async def test_disabled_check_never_flatlines(self, autojump_clock: object) -> None:
        """Disabling the check stops the timer; configuring the same state changes nothing."""
        device = make_device(heartbeat_interval_ns=NS_PER_S)
        device.report_additions()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.vmmdev.run)
            assert self.configure(device, enabled=False) == NS_PER_S
            self.configure(device, enabled=True)
            self.configure(device, enabled=False)
            await trio.sleep(60)
            assert not flatlined(device)
            nursery.cancel_scope.cancel()

    async def test_off_keeps_the_flatline_until_a_beat(self, autojump_clock: object) -> None:
        """Switching the check off stops the timer but ends no flat-line; on again, the next
        beat ends it and the timer does not count it twice (vmmDevReqHandler_HeartbeatConfigure
        touches only the timer and the active flag)."""
        device = make_device(heartbeat_interval_ns=NS_PER_S)
        device.report_additions()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.vmmdev.run)
            self.configure(device, enabled=True)
            await trio.sleep(5)
            assert flatlined(device)
            self.configure(device, enabled=False)
            self.configure(device, enabled=True)
            await trio.sleep(5)
            assert (flatlined(device), device.vmmdev.heartbeat.flatline_count) == (True, 1)
            device.send(vmmdev_request(T.GUEST_HEARTBEAT, 24))
            assert not flatlined(device)
            nursery.cancel_scope.cancel()

    async def test_unchanged_configure_is_logged(
        self, device: Device, autojump_clock: object
    ) -> None:
        """Asking for the state the check is in answers the interval and logs it, once each."""
        device.report_additions()
        with structlog.testing.capture_logs() as logs:
            assert self.configure(device, enabled=False) == 2 * NS_PER_S
            self.configure(device, enabled=True)
            self.configure(device, enabled=True)
        events = [(entry["event"], entry.get("enabled")) for entry in logs]
        assert events == [
            ("heartbeat_configure_unchanged", False),
            ("heartbeat_armed", None),
            ("heartbeat_configure_unchanged", True),
        ]

    async def test_reset_leaves_an_unconfigured_check_off(self, autojump_clock: object) -> None:
        """A VM reset never switches on a check the guest did not configure."""
        device = make_device()
        device.report_additions()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.vmmdev.run)
            device.vmmdev.reset()
            device.report_additions()
            await trio.sleep(60)
            assert (device.vmmdev.heartbeat.active, flatlined(device)) == (False, False)
            nursery.cancel_scope.cancel()

    async def test_reset_stops_the_timer_of_an_active_check(self, autojump_clock: object) -> None:
        """An active check stays on across a reset but flat-lines only after a new beat's timer."""
        device = make_device()
        device.report_additions()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.vmmdev.run)
            self.configure(device, enabled=True)
            await trio.sleep(1)
            device.vmmdev.reset()
            await trio.sleep(60)
            assert (device.vmmdev.heartbeat.active, flatlined(device)) == (True, False)
            nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("interval", "timeout"),
        [
            (10_000_000, None),
            (49_999_999, 200_000_000),
            (NS_PER_S, NS_PER_S),
            (NS_PER_S, NS_PER_S + 10_000_000),
            (NS_PER_S, 50_000_000),
            (50_000_000, 99_999_999),
            (2**63, None),
        ],
    )
    def test_bad_configuration(self, interval: int, timeout: int | None) -> None:
        """Intervals below 50 ms, timeouts below 100 ms or not above interval + 10 ms, and
        a default timeout (twice the interval) beyond VMMDev's u64 are refused."""
        with pytest.raises(ValueError, match="heartbeat"):
            make_device(heartbeat_interval_ns=interval, heartbeat_timeout_ns=timeout)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("interval", "timeout", "kept"),
        [
            (50_000_000, 100_000_000, 100_000_000),
            (NS_PER_S, NS_PER_S + 10_000_001, NS_PER_S + 10_000_001),
            ((2**64 - 1) // 2, None, 2**64 - 2),
        ],
    )
    def test_configuration_at_the_limits(
        self, interval: int, timeout: int | None, kept: int
    ) -> None:
        """The smallest interval and timeout, a timeout just above interval + 10 ms and the
        largest interval whose default timeout (twice it) fits in a u64 are taken."""
        device = make_device(heartbeat_interval_ns=interval, heartbeat_timeout_ns=timeout)  # type: ignore[arg-type]
        heartbeat = device.vmmdev.heartbeat
        assert (heartbeat.interval_ns, heartbeat.timeout_ns) == (interval, kept)
