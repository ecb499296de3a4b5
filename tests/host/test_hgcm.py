"""Tests of the host's HGCM framework through raw VMMDev HGCM requests.

Rules of this test module:

- A bare VMMDev (no driver) receives hand-built CONNECT/DISCONNECT/CALL/CANCEL2 requests
  whose buffers live in the device's guest memory; page lists name those buffers.
- ``EchoService`` (conftest) stands in for a real service; it completes at once or holds
  calls until the test completes them.
- Completion is checked in guest memory: result, DONE flag, written-back parameters.
"""

from __future__ import annotations

import struct

import pytest

from agent.host.hgcm import next_client_id
from agent.host.hgcm_service import HostBuffer, HostU32
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    HGCM_REQ_DONE,
    PAGE_SIZE,
    Event,
    HgcmLocationType,
    HgcmParmType,
    PageListDirection,
    Requestor,
    RequestType,
)
from agent.protocol.status import (
    STATUS_CODES,
    VERR_HGCM_INVALID_CLIENT_ID,
    VERR_HGCM_SERVICE_NOT_FOUND,
    VERR_HGCM_TOO_MANY_CLIENT_CALLS,
    VERR_HGCM_TOO_MANY_CLIENTS,
    VERR_INTERRUPTED,
    VERR_INVALID_FLAGS,
    VERR_INVALID_PARAMETER,
    VERR_NO_MEMORY,
    VERR_NOT_FOUND,
    VINF_HGCM_ASYNC_EXECUTE,
    VINF_SUCCESS,
)
from tests.host.conftest import (
    ECHO,
    FN_ECHO,
    FN_FAIL,
    FN_HOLD,
    Device,
    EchoService,
    make_device as _make_device,
    vmmdev_request,
)

P = L.HgcmParameter64


@pytest.fixture(name="hgcm")
def _hgcm(echo: EchoService) -> Device:
    device = _make_device()
    device.vmmdev.hgcm.register(echo)
    device.report_additions()
    return device


def submit(device: Device, req: bytearray) -> int:
    """Map ``req`` (it stays mapped: the host may complete it later) and hit the port."""
    phys = device.ram.map(req)
    device.vmmdev.process(phys)
    return phys


def connect(device: Device, name: bytes = ECHO.encode(), requestor: int = 0) -> bytearray:
    """Send HGCM_CONNECT for ``name`` with ``requestor`` in its header."""
    req = vmmdev_request(RequestType.HGCM_CONNECT, L.HgcmConnectRequest.size)
    L.HgcmConnectRequest.header_requestor.set(req, requestor)
    L.HgcmConnectRequest.loc_type.set(req, HgcmLocationType.LOCALHOST_EXISTING)
    L.HgcmConnectRequest.service_name.set(req, name + b"\0")
    submit(device, req)
    return req


def client(device: Device) -> int:
    """Connect to the echo service and return the client id."""
    req = connect(device)
    assert L.HgcmConnectRequest.result.get(req) == VINF_SUCCESS
    return L.HgcmConnectRequest.client_id.get(req)


def page_list_call(
    device: Device, client_id: int, function: int, buffers: list[tuple[bytearray, int]], *tail: int
) -> bytearray:
    """An HGCM_CALL64 with page-list buffer parameters (data, direction) then u32 values."""
    count = len(buffers) + len(tail)
    lists_at = 44 + 16 * count
    size = lists_at + 16 * len(buffers)
    req = vmmdev_request(RequestType.HGCM_CALL64, size)
    L.HgcmCallRequest.client_id.set(req, client_id)
    L.HgcmCallRequest.function.set(req, function)
    L.HgcmCallRequest.parm_count.set(req, count)
    for index, (data, direction) in enumerate(buffers):
        view = memoryview(req)[44 + 16 * index :]
        address = device.ram.map(data, offset=100)
        P.type.set(view, HgcmParmType.PAGELIST)
        P.page_list_size.set(view, len(data))
        P.page_list_offset.set(view, lists_at)
        struct.pack_into("<IHHQ", req, lists_at, direction, 100, 1, address - 100)
        lists_at += 16
    for index, value in enumerate(tail, start=len(buffers)):
        view = memoryview(req)[44 + 16 * index :]
        P.type.set(view, HgcmParmType.U32)
        P.value32.set(view, value & 0xFFFFFFFF)
    return req


def page_list_of(
    client_id: int, function: int, pages: list[int], *, size: int, first: int = 0, flags: int = 3
) -> bytearray:
    """An HGCM_CALL64 with one page-list parameter naming ``pages`` as they are given."""
    lists_at = 44 + 16
    req = vmmdev_request(RequestType.HGCM_CALL64, lists_at + 8 + 8 * len(pages))
    L.HgcmCallRequest.client_id.set(req, client_id)
    L.HgcmCallRequest.function.set(req, function)
    L.HgcmCallRequest.parm_count.set(req, 1)
    view = memoryview(req)[44:]
    P.type.set(view, HgcmParmType.PAGELIST)
    P.page_list_size.set(view, size)
    P.page_list_offset.set(view, lists_at)
    struct.pack_into(f"<IHH{len(pages)}Q", req, lists_at, flags, first, len(pages), *pages)
    return req


def report_requestor_info(device: Device) -> None:
    """REPORT_GUEST_INFO2 with VBOXGSTINFO2_F_REQUESTOR_INFO: requestor bits count."""
    req = vmmdev_request(RequestType.REPORT_GUEST_INFO2, L.GuestInfo2Request.size)
    L.GuestInfo2Request.additions_major.set(req, 7)
    L.GuestInfo2Request.additions_features.set(req, 1)
    req[40:46] = b"7.0.0\0"
    assert device.send(req) == VINF_SUCCESS


def complete_held(echo: EchoService, *, value: int, status: int) -> None:
    """Give the first call the service holds ``value`` as its first (32-bit) parameter and
    complete it with ``status``."""
    held = echo.held[0]
    first = held.params[0]
    assert isinstance(first, HostU32)
    first.value = value
    held.complete(status)


def done(req: bytearray) -> bool:
    """Whether the host set DONE on ``req``."""
    return bool(L.HgcmRequestHeader.flags.get(req) & HGCM_REQ_DONE)


class TestConnect:
    """Connecting and disconnecting clients."""

    def test_connect_completes_asynchronously(self, hgcm: Device, echo: EchoService) -> None:
        """CONNECT answers 2903, then writes the client id and result and sets DONE."""
        req = connect(hgcm)
        assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE
        assert done(req)
        assert echo.connected == [L.HgcmConnectRequest.client_id.get(req)]
        assert hgcm.vmmdev.pending_events & Event.HGCM

    def test_unknown_service_is_a_result(self, hgcm: Device) -> None:
        """An unknown service is VERR_HGCM_SERVICE_NOT_FOUND as the HGCM result."""
        req = connect(hgcm, b"NoSuchSvc")
        assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE
        assert L.HgcmConnectRequest.result.get(req) == VERR_HGCM_SERVICE_NOT_FOUND
        assert done(req)
        assert L.HgcmConnectRequest.client_id.get(req) == 0

    def test_client_ids_are_unique_and_non_zero(self, hgcm: Device) -> None:
        """Every connect gets a fresh non-zero id."""
        ids = [client(hgcm) for _ in range(10)]
        assert 0 not in ids
        assert len(set(ids)) == 10
        assert hgcm.vmmdev.hgcm.client_count == 10

    @pytest.mark.parametrize(
        ("current", "following"), [(1, 2), (0x7FFF_FFFE, 0x7FFF_FFFF), (0x7FFF_FFFF, 1)]
    )
    def test_client_ids_wrap_below_main_s_own_handles(self, current: int, following: int) -> None:
        """Client ids run 1 .. 0x7FFFFFFF and wrap to 1; 0x80000000 and up are Main's own."""
        assert next_client_id(current) == following

    def test_service_refusal_is_a_result(self, hgcm: Device, echo: EchoService) -> None:
        """A service refusing the client answers its status as the result."""
        echo.refuse = STATUS_CODES["VERR_ACCESS_DENIED"]
        req = connect(hgcm)
        assert echo.refuse == L.HgcmConnectRequest.result.get(req)
        assert hgcm.vmmdev.hgcm.client_count == 0

    @pytest.mark.parametrize("loc_type", [HgcmLocationType.INVALID, 7])
    def test_location_type_is_not_checked(self, hgcm: Device, loc_type: int) -> None:
        """VMMDev makes every location "existing local service": any type connects."""
        req = vmmdev_request(RequestType.HGCM_CONNECT, L.HgcmConnectRequest.size)
        L.HgcmConnectRequest.loc_type.set(req, loc_type)
        L.HgcmConnectRequest.service_name.set(req, ECHO.encode() + b"\0")
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE
        assert (done(req), L.HgcmConnectRequest.result.get(req)) == (True, VINF_SUCCESS)

    def test_empty_name_is_an_unknown_service(self, hgcm: Device) -> None:
        """An empty (terminated) name is looked up like any other and not found."""
        req = connect(hgcm, b"")
        assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE
        assert L.HgcmConnectRequest.result.get(req) == VERR_HGCM_SERVICE_NOT_FOUND

    def test_unterminated_name(self, hgcm: Device) -> None:
        """A service name without NUL is an invalid parameter."""
        req = vmmdev_request(RequestType.HGCM_CONNECT, L.HgcmConnectRequest.size)
        L.HgcmConnectRequest.loc_type.set(req, HgcmLocationType.LOCALHOST)
        req[36:164] = b"x" * 128
        assert hgcm.send(req) == VERR_INVALID_PARAMETER

    def test_client_limit_per_category(self, hgcm: Device, echo: EchoService) -> None:
        """With requestor info reported, a service takes 1024 root clients; the next is
        VERR_HGCM_TOO_MANY_CLIENTS as the result, while a kernel client still connects and
        a disconnect makes room."""
        report_requestor_info(hgcm)
        root = Requestor.USERMODE | Requestor.USR_ROOT
        for _ in range(1024):
            assert L.HgcmConnectRequest.result.get(connect(hgcm, requestor=root)) == 0
        refused = connect(hgcm, requestor=root)
        assert L.RequestHeader.rc.get(refused) == VINF_HGCM_ASYNC_EXECUTE
        assert L.HgcmConnectRequest.result.get(refused) == VERR_HGCM_TOO_MANY_CLIENTS
        assert L.HgcmConnectRequest.client_id.get(refused) == 0
        kernel = connect(hgcm, requestor=Requestor.USR_DRV)
        assert L.HgcmConnectRequest.result.get(kernel) == VINF_SUCCESS
        req = vmmdev_request(RequestType.HGCM_DISCONNECT, 36)
        L.HgcmDisconnectRequest.client_id.set(req, echo.connected[0])
        submit(hgcm, req)
        assert L.HgcmConnectRequest.result.get(connect(hgcm, requestor=root)) == VINF_SUCCESS

    def test_legacy_clients_count_as_kernel_clients(self, hgcm: Device) -> None:
        """Without requestor info every client is legacy: a kernel client (2048 of them),
        whatever its header says."""
        root = Requestor.USERMODE | Requestor.USR_ROOT
        for _ in range(2048):
            assert L.HgcmConnectRequest.result.get(connect(hgcm, requestor=root)) == 0
        refused = connect(hgcm, requestor=root)
        assert L.HgcmConnectRequest.result.get(refused) == VERR_HGCM_TOO_MANY_CLIENTS

    def test_first_hgcm_command_enables_the_hgcm_event(self, hgcm: Device) -> None:
        """The filter gains the HGCM bit with the first HGCM request."""
        assert not hgcm.vmmdev.guest_filter & Event.HGCM
        connect(hgcm)
        assert hgcm.vmmdev.guest_filter & Event.HGCM
        assert hgcm.vmmdev.have_events

    def test_disconnect(self, hgcm: Device, echo: EchoService) -> None:
        """DISCONNECT drops the client; a second one is accepted and its result names an
        invalid client (Main's HGCM thread finds no client)."""
        client_id = client(hgcm)
        for expected in (VINF_SUCCESS, VERR_HGCM_INVALID_CLIENT_ID):
            req = vmmdev_request(RequestType.HGCM_DISCONNECT, 36)
            L.HgcmDisconnectRequest.client_id.set(req, client_id)
            submit(hgcm, req)
            assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE
            assert (done(req), L.HgcmDisconnectRequest.result.get(req)) == (True, expected)
        assert [client_id] == echo.disconnected

    def test_disconnect_of_client_zero(self, hgcm: Device) -> None:
        """Client id 0 is refused at once with an invalid parameter."""
        client(hgcm)
        req = vmmdev_request(RequestType.HGCM_DISCONNECT, 36)
        assert hgcm.send(req) == VERR_INVALID_PARAMETER

    def test_calls_pending_at_disconnect_stay_the_guests(
        self, hgcm: Device, echo: EchoService
    ) -> None:
        """A call still pending when its client disconnects is completed like any other:
        the service's completion is written back with DONE and the HGCM event."""
        client_id = client(hgcm)
        call = page_list_call(hgcm, client_id, FN_HOLD, [])
        submit(hgcm, call)
        req = vmmdev_request(RequestType.HGCM_DISCONNECT, 36)
        L.HgcmDisconnectRequest.client_id.set(req, client_id)
        submit(hgcm, req)
        assert (done(req), hgcm.vmmdev.hgcm.pending_calls) == (True, 1)
        hgcm.vmmdev.pending_events = 0
        echo.held[0].complete(VERR_INTERRUPTED)
        assert (done(call), L.HgcmCallRequest.result.get(call)) == (True, VERR_INTERRUPTED)
        assert hgcm.vmmdev.hgcm.pending_calls == 0
        assert hgcm.vmmdev.pending_events & Event.HGCM


class TestCall:
    """Calls, parameters, completion, limits and cancellation."""

    def test_page_list_buffers_round_trip(self, hgcm: Device) -> None:
        """In-buffers reach the service; out-buffers and values are written back."""
        client_id = client(hgcm)
        src, dst = bytearray(b"hello world"), bytearray(64)
        req = page_list_call(
            hgcm,
            client_id,
            FN_ECHO,
            [(src, PageListDirection.TO_HOST), (dst, PageListDirection.FROM_HOST)],
            0,
        )
        submit(hgcm, req)
        assert done(req)
        assert L.HgcmCallRequest.result.get(req) == VINF_SUCCESS
        assert dst.startswith(b"hello world")
        assert P.page_list_size.get(memoryview(req)[60:]) == 64  # VMMDev leaves it
        assert P.value32.get(memoryview(req)[76:]) == 11

    def test_only_the_bytes_the_service_produced_are_copied_back(
        self, hgcm: Device, echo: EchoService
    ) -> None:
        """A service that fills part of an out-buffer and says so (``size``) has only that
        part copied to the guest; the request keeps the buffer's size as the guest sent it."""
        dst = bytearray(b"." * 16)
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [(dst, PageListDirection.BOTH)])
        submit(hgcm, req)
        buffer = echo.held[0].params[0]
        assert isinstance(buffer, HostBuffer)
        buffer.data[:] = b"x" * 16
        buffer.size = 3
        echo.held[0].complete(VINF_SUCCESS)
        assert bytes(dst) == b"xxx" + b"." * 13
        assert P.page_list_size.get(memoryview(req)[44:]) == 16

    def test_failing_status_is_the_result(self, hgcm: Device) -> None:
        """The service's failure travels in ``result`` with DONE."""
        req = page_list_call(hgcm, client(hgcm), FN_FAIL, [], VERR_NOT_FOUND)
        submit(hgcm, req)
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, VERR_NOT_FOUND)

    def test_unknown_client(self, hgcm: Device) -> None:
        """A call for an unknown client is refused at once."""
        req = page_list_call(hgcm, 4242, FN_ECHO, [])
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_HGCM_INVALID_CLIENT_ID

    def test_client_zero(self, hgcm: Device) -> None:
        """A call for client 0 is an invalid parameter (``HGCMGuestCall``)."""
        client(hgcm)
        req = page_list_call(hgcm, 0, FN_ECHO, [])
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER

    def test_parameters_are_checked_before_the_client(self, hgcm: Device) -> None:
        """VMMDev reads the parameters before Main looks the client up: a bad parameter of a
        call for an unknown client is an invalid parameter."""
        req = page_list_call(hgcm, 4242, FN_ECHO, [], 0)
        P.type.set(memoryview(req)[44:], HgcmParmType.INVALID)
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER

    @pytest.mark.parametrize("count", [32, 33])
    def test_parameter_count_limit(self, hgcm: Device, count: int) -> None:
        """At most 32 parameters (``VMMDEV_MAX_HGCM_PARMS``), even in a request with room."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [], *range(count))
        submit(hgcm, req)
        expected = VINF_HGCM_ASYNC_EXECUTE if count == 32 else VERR_INVALID_PARAMETER
        assert L.RequestHeader.rc.get(req) == expected

    def test_parameter_array_must_fit(self, hgcm: Device) -> None:
        """A parameter count beyond the request's size is an invalid parameter."""
        req = page_list_call(hgcm, client(hgcm), FN_ECHO, [])
        L.HgcmCallRequest.parm_count.set(req, 3)
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER

    @pytest.mark.parametrize(
        "kind", [HgcmParmType.LINADDR_KERNEL, HgcmParmType.PHYSADDR, HgcmParmType.INVALID]
    )
    def test_unsupported_parameter_types(self, hgcm: Device, kind: int) -> None:
        """Kernel, physical and invalid parameter types are refused."""
        req = page_list_call(hgcm, client(hgcm), FN_ECHO, [], 0)
        P.type.set(memoryview(req)[44:], kind)
        P.pointer_size.set(memoryview(req)[44:], 8)
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER

    def test_page_list_outside_the_request(self, hgcm: Device) -> None:
        """A page list offset past the request is refused."""
        req = page_list_call(hgcm, client(hgcm), FN_ECHO, [(bytearray(4), 1)])
        P.page_list_offset.set(memoryview(req)[44:], 4000)
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER

    @pytest.mark.parametrize("scattered", [False, True])
    def test_page_list_spanning_pages(
        self, hgcm: Device, echo: EchoService, scattered: bool
    ) -> None:
        """A buffer over several pages is read from each page in list order, whether the
        pages follow each other or not, and written back the same way."""
        size = PAGE_SIZE - 50
        if scattered:  # two regions, the higher one first in the list
            low, high = bytearray(b"a" * PAGE_SIZE), bytearray(b"b" * PAGE_SIZE)
            pages = [hgcm.ram.map(high), hgcm.ram.map(low)]
            regions = [high, low]
        else:
            both = bytearray(b"a" * PAGE_SIZE + b"b" * PAGE_SIZE)
            start = hgcm.ram.map(both)
            pages = [start, start + PAGE_SIZE]
            regions = [both]

        def listed() -> bytes:
            """The listed pages' bytes, in list order, from the buffer's offset on."""
            return b"".join(regions)[100 : 100 + size]

        req = page_list_of(client(hgcm), FN_HOLD, pages, size=size, first=100)
        submit(hgcm, req)
        buffer = echo.held[0].params[0]
        assert isinstance(buffer, HostBuffer)
        assert bytes(buffer.data) == listed()
        buffer.data[:] = (bytes(range(256)) * 16)[:size]
        echo.held[0].complete(VINF_SUCCESS)
        assert listed() == (bytes(range(256)) * 16)[:size]

    @pytest.mark.parametrize(
        ("case", "expected"),
        [
            ((3 | 4, 0, 8, 0), VERR_INVALID_FLAGS),  # a bit outside TO_HOST | FROM_HOST
            ((0, 0, 8, 0), VERR_INVALID_FLAGS),  # no direction at all
            ((3, PAGE_SIZE, 8, 0), VERR_INVALID_PARAMETER),  # first page's offset past the page
            ((3, 100, 2 * PAGE_SIZE - 99, 0), VERR_INVALID_PARAMETER),  # one byte too many
            ((3, 0, 8, 8), VERR_INVALID_PARAMETER),  # the second page is not page-aligned
            ((3, 0, (128 << 20) + 1, 0), VERR_INVALID_PARAMETER),  # over VMMDEV_MAX_HGCM_DATA_SIZE
            ((3, 100, 2 * PAGE_SIZE - 100, 0), VINF_HGCM_ASYNC_EXECUTE),  # all fits
        ],
    )
    def test_page_list_checks(
        self, hgcm: Device, case: tuple[int, int, int, int], expected: int
    ) -> None:
        """Direction flags (VERR_INVALID_FLAGS), the first page's offset, the size, the bytes
        the pages hold and every page's alignment are checked before the service sees the
        call. ``case`` is the list's flags, first page's offset, size and second page's
        misalignment."""
        flags, first, size, shift = case
        start = hgcm.ram.map(bytearray(2 * PAGE_SIZE))
        pages = [start, start + PAGE_SIZE + shift]
        req = page_list_of(client(hgcm), FN_HOLD, pages, size=size, first=first, flags=flags)
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == expected

    @pytest.mark.parametrize(
        ("shift", "expected"), [(0, VINF_HGCM_ASYNC_EXECUTE), (8, VERR_INVALID_PARAMETER)]
    )
    def test_one_page_list_must_name_an_aligned_page(
        self, hgcm: Device, shift: int, expected: int
    ) -> None:
        """A list of one page is checked like a longer one: an unaligned page is refused."""
        start = hgcm.ram.map(bytearray(2 * PAGE_SIZE))
        req = page_list_of(client(hgcm), FN_HOLD, [start + shift], size=8, flags=3)
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == expected

    @pytest.mark.parametrize(
        ("size", "expected"),
        [(128 << 20, VERR_NO_MEMORY), ((128 << 20) - (512 << 10), VINF_HGCM_ASYNC_EXECUTE)],
    )
    def test_call_cost_limit(self, hgcm: Device, size: int, expected: int) -> None:
        """A buffer may name 128 MiB, but the call's whole cost (command, page array,
        buffer) must stay within 128 MiB too, else VERR_NO_MEMORY."""
        pages = [0x4000_0000 + PAGE_SIZE * index for index in range(-(-size // PAGE_SIZE))]
        req = page_list_of(client(hgcm), FN_HOLD, pages, size=size, flags=2)
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == expected

    def test_page_list_inside_the_parameters(self, hgcm: Device) -> None:
        """A page list must start after the parameter array (VMMDev's ``offExtra``): here it
        points at a 64-bit parameter whose bytes read as a good out-list of one page."""
        page = hgcm.ram.map(bytearray(PAGE_SIZE))
        req = vmmdev_request(RequestType.HGCM_CALL64, 44 + 2 * 16)
        L.HgcmCallRequest.client_id.set(req, client(hgcm))
        L.HgcmCallRequest.function.set(req, FN_HOLD)
        L.HgcmCallRequest.parm_count.set(req, 2)
        first, second = memoryview(req)[44:], memoryview(req)[60:]
        P.type.set(first, HgcmParmType.PAGELIST)
        P.page_list_size.set(first, 8)
        P.page_list_offset.set(first, 60)
        P.type.set(second, HgcmParmType.U64)  # = flags FROM_HOST
        P.value64.set(second, (page << 32) | (1 << 16))  # offset 0, 1 page, then the address
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER

    def test_page_list_of_no_pages(self, hgcm: Device) -> None:
        """A page list must name at least one page, even for an empty buffer."""
        req = page_list_of(client(hgcm), FN_HOLD, [], size=0)
        req.extend(bytes(8))  # room for the first address, as sizeof(HGCMPageListInfo) wants
        L.RequestHeader.size_.set(req, len(req))
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER

    def test_page_list_longer_than_the_request(self, hgcm: Device) -> None:
        """A page count whose addresses would run past the request is refused."""
        start = hgcm.ram.map(bytearray(PAGE_SIZE))
        req = page_list_of(client(hgcm), FN_HOLD, [start], size=8)
        struct.pack_into("<H", req, 60 + 6, 2)  # page_count 2, room for 1
        submit(hgcm, req)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER

    def test_pending_call_limit(self, hgcm: Device, echo: EchoService) -> None:
        """A limit of N leaves room for N - 1 pending calls (GuestCall counts, then checks)."""
        client_id = client(hgcm)
        for _ in range(echo.max_calls - 1):
            req = page_list_call(hgcm, client_id, FN_HOLD, [])
            submit(hgcm, req)
            assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE
        extra = page_list_call(hgcm, client_id, FN_HOLD, [])
        submit(hgcm, extra)
        assert L.RequestHeader.rc.get(extra) == VERR_HGCM_TOO_MANY_CLIENT_CALLS
        echo.held.pop().complete(VINF_SUCCESS)
        again = page_list_call(hgcm, client_id, FN_HOLD, [])
        submit(hgcm, again)
        assert L.RequestHeader.rc.get(again) == VINF_HGCM_ASYNC_EXECUTE

    def test_held_call_completes_later(self, hgcm: Device, echo: EchoService) -> None:
        """A held call is answered 2903 and gets DONE only when the service completes it."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [])
        submit(hgcm, req)
        assert (L.RequestHeader.rc.get(req), done(req)) == (VINF_HGCM_ASYNC_EXECUTE, False)
        echo.held[0].complete(7)
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, 7)
        with pytest.raises(RuntimeError, match="twice"):
            echo.held[0].complete(0)

    def test_completing_a_freed_request_writes_nothing(
        self, hgcm: Device, echo: EchoService
    ) -> None:
        """A call whose request (across a page boundary, so not mapped in place) the guest
        freed meanwhile completes without a write (nor an error); the call is gone and the
        HGCM event is still raised."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [])
        phys = hgcm.ram.map(req, offset=PAGE_SIZE - 8)
        hgcm.vmmdev.process(phys)
        hgcm.ram.unmap(phys)
        hgcm.vmmdev.pending_events = 0
        echo.held[0].complete(VINF_SUCCESS)
        assert (done(req), L.HgcmRequestHeader.result.get(req)) == (False, 0)
        assert hgcm.vmmdev.hgcm.pending_calls == 0
        assert hgcm.vmmdev.pending_events & Event.HGCM

    def test_call_within_a_page_completes_in_place(self, hgcm: Device, echo: EchoService) -> None:
        """A request within one page is mapped (VMMDev locks it): completion writes its
        values, result and DONE there and nothing else, so what the guest changed since
        stays; the mapping outlives the guest's free."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [], 5)
        hgcm.ram.unmap(submit(hgcm, req))
        L.RequestHeader.requestor.set(req, 0x1234)
        complete_held(echo, value=9, status=7)
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, 7)
        assert P.value32.get(memoryview(req)[44:]) == 9
        assert L.RequestHeader.requestor.get(req) == 0x1234
        assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE

    @pytest.mark.parametrize(("short", "locked"), [(1, True), (0, False)], ids=["inside", "at-end"])
    def test_request_ending_at_a_page_end_is_not_locked(
        self, hgcm: Device, echo: EchoService, short: int, locked: bool
    ) -> None:
        """VMMDev locks a request when its end, one past its last byte, is on the page it
        starts on: one ending exactly at a page end is read back instead. Told apart by a
        free before completion, which only the lock outlives."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [], 5)
        phys = hgcm.ram.map(req, offset=PAGE_SIZE - len(req) - short)
        hgcm.vmmdev.process(phys)
        hgcm.ram.unmap(phys)
        echo.held[0].complete(7)
        assert done(req) is locked

    @pytest.mark.parametrize("offset", [0, PAGE_SIZE - 8], ids=["locked", "unlocked"])
    @pytest.mark.parametrize(
        ("request_type", "result"),
        [(RequestType.SET_MOUSE_STATUS, VERR_INVALID_PARAMETER), (RequestType.HGCM_CANCEL, 7)],
        ids=["other-type", "legacy-cancel"],
    )
    def test_completion_checks_the_request_type(
        self, hgcm: Device, echo: EchoService, offset: int, request_type: int, result: int
    ) -> None:
        """Completion reads the request's type from guest memory and stores the values only
        when it is still the call's own: the legacy cancel's type (HGCMCancel, which the
        guest writes over the call's) gets the result and DONE; any other type the result
        VERR_INVALID_PARAMETER and DONE. Mapped or read back alike."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [], 5)
        hgcm.vmmdev.process(hgcm.ram.map(req, offset=offset))
        L.RequestHeader.request_type.set(req, request_type)
        complete_held(echo, value=9, status=7)
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, result)
        assert P.value32.get(memoryview(req)[44:]) == 5
        assert L.RequestHeader.request_type.get(req) == request_type

    def test_call_across_pages_is_written_back_whole(self, hgcm: Device, echo: EchoService) -> None:
        """A request that crosses a page boundary is not mapped: completion reads it back
        whole, puts the value and result in that copy and writes it back with DONE, so
        what the guest changed since sending stays, as on the mapped path."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [], 5)
        hgcm.vmmdev.process(hgcm.ram.map(req, offset=PAGE_SIZE - 8))
        assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE
        L.RequestHeader.requestor.set(req, 0x1234)
        complete_held(echo, value=9, status=7)
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, 7)
        assert P.value32.get(memoryview(req)[44:]) == 9
        assert L.RequestHeader.requestor.get(req) == 0x1234

    @pytest.mark.parametrize("offset", [0, PAGE_SIZE - 8], ids=["locked", "unlocked"])
    def test_call_completed_at_once_reads_async_execute(self, hgcm: Device, offset: int) -> None:
        """VMMDev writes VINF_HGCM_ASYNC_EXECUTE to the guest's ``rc`` before the service
        runs, and completion keeps the header as guest memory holds it: a call the service
        completes at once reads 2903 with DONE, its result, values and output, whether it
        was mapped in place or (across a page boundary) read back. The ``rc`` the guest sent
        (the drivers preset VERR_GENERAL_FAILURE) never stays."""
        src, dst = bytearray(b"hello"), bytearray(8)
        req = page_list_call(
            hgcm,
            client(hgcm),
            FN_ECHO,
            [(src, PageListDirection.TO_HOST), (dst, PageListDirection.FROM_HOST)],
            0,
        )
        hgcm.vmmdev.process(hgcm.ram.map(req, offset=offset))
        assert L.RequestHeader.rc.get(req) == VINF_HGCM_ASYNC_EXECUTE
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, VINF_SUCCESS)
        assert P.value32.get(memoryview(req)[76:]) == 5
        assert dst == b"hello\0\0\0"

    def test_cancel2(self, hgcm: Device, echo: EchoService) -> None:
        """CANCEL2 finds the call by address; its later completion writes nothing."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [])
        phys = submit(hgcm, req)
        handle = echo.held[0]
        statuses = []
        for _ in range(2):
            cancel = vmmdev_request(RequestType.HGCM_CANCEL2, 28)
            L.HgcmCancel2Request.phys_req_to_cancel.set(cancel, phys)
            statuses.append(hgcm.send(cancel))
        assert statuses == [VINF_SUCCESS, VERR_NOT_FOUND]
        assert [handle] == echo.cancelled
        assert handle.cancelled
        handle.complete(VINF_SUCCESS)
        assert not done(req)

    def test_cancelled_call_counts_until_completed(self, hgcm: Device, echo: EchoService) -> None:
        """A cancelled call holds its slot of the per-client limit until the service ends it."""
        client_id = client(hgcm)
        phys = [
            submit(hgcm, page_list_call(hgcm, client_id, FN_HOLD, []))
            for _ in range(echo.max_calls - 1)
        ]
        cancel = vmmdev_request(RequestType.HGCM_CANCEL2, 28)
        L.HgcmCancel2Request.phys_req_to_cancel.set(cancel, phys[0])
        assert hgcm.send(cancel) == VINF_SUCCESS
        refused = page_list_call(hgcm, client_id, FN_HOLD, [])
        submit(hgcm, refused)
        assert L.RequestHeader.rc.get(refused) == VERR_HGCM_TOO_MANY_CLIENT_CALLS
        echo.held[0].complete(VERR_INTERRUPTED)
        accepted = page_list_call(hgcm, client_id, FN_HOLD, [])
        submit(hgcm, accepted)
        assert L.RequestHeader.rc.get(accepted) == VINF_HGCM_ASYNC_EXECUTE

    @pytest.mark.parametrize("phys", [0, 0xFFFFFFFF])
    def test_cancel2_bad_address(self, hgcm: Device, phys: int) -> None:
        """CANCEL2 of address 0 or NIL is an invalid parameter."""
        cancel = vmmdev_request(RequestType.HGCM_CANCEL2, 28)
        L.HgcmCancel2Request.phys_req_to_cancel.set(cancel, phys)
        assert hgcm.send(cancel) == VERR_INVALID_PARAMETER

    def test_legacy_cancel(self, hgcm: Device, echo: EchoService) -> None:
        """HGCM_CANCEL re-sent at the call's own address cancels it; unknown is invalid."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [])
        phys = submit(hgcm, req)
        L.RequestHeader.request_type.set(req, RequestType.HGCM_CANCEL)
        hgcm.vmmdev.process(phys)
        assert L.RequestHeader.rc.get(req) == VINF_SUCCESS
        hgcm.vmmdev.process(phys)
        assert L.RequestHeader.rc.get(req) == VERR_INVALID_PARAMETER
        assert len(echo.cancelled) == 1


class TestLifeCycle:
    """Restore and reset."""

    def test_restore_resubmits_pending_calls(self, hgcm: Device, echo: EchoService) -> None:
        """A restore keeps the client and hands the pending call to the service again."""
        client_id = client(hgcm)
        src = bytearray(b"abc")
        req = page_list_call(hgcm, client_id, FN_HOLD, [(src, PageListDirection.BOTH)])
        submit(hgcm, req)
        old = echo.held[0]
        hgcm.vmmdev.restore()
        assert echo.resets == 1
        assert [client_id, client_id] == echo.connected
        new = echo.held[0]
        assert new is not old
        buffer = new.params[0]
        assert isinstance(buffer, HostBuffer)
        assert bytes(buffer.data) == b"abc"
        old.complete(1)
        assert not done(req)
        buffer.data[:] = b"xyz"
        new.complete(VINF_SUCCESS)
        assert done(req)
        assert src == b"xyz"
        assert hgcm.vmmdev.pending_events & Event.RESTORED

    def test_restore_frees_the_slots_of_cancelled_calls(
        self, hgcm: Device, echo: EchoService
    ) -> None:
        """A call the guest cancelled stops counting against its client's limit at a restore
        (the restarted service holds none of the old calls), and its late completion writes
        nothing; the pending calls re-submitted count again."""
        client_id = client(hgcm)
        reqs = [page_list_call(hgcm, client_id, FN_HOLD, []) for _ in range(echo.max_calls - 1)]
        phys = [submit(hgcm, req) for req in reqs]
        cancel = vmmdev_request(RequestType.HGCM_CANCEL2, 28)
        L.HgcmCancel2Request.phys_req_to_cancel.set(cancel, phys[0])
        assert hgcm.send(cancel) == VINF_SUCCESS
        hgcm.vmmdev.restore()
        accepted = page_list_call(hgcm, client_id, FN_HOLD, [])
        submit(hgcm, accepted)
        assert L.RequestHeader.rc.get(accepted) == VINF_HGCM_ASYNC_EXECUTE
        echo.cancelled[0].complete(VINF_SUCCESS)
        assert not done(reqs[0])
        refused = page_list_call(hgcm, client_id, FN_HOLD, [])
        submit(hgcm, refused)
        assert L.RequestHeader.rc.get(refused) == VERR_HGCM_TOO_MANY_CLIENT_CALLS

    def test_restore_resubmits_the_call_as_submitted(self, hgcm: Device, echo: EchoService) -> None:
        """A restore re-submits a pending call from what the host kept of it, not from the
        request in guest memory, which the guest may have changed since."""
        client_id = client(hgcm)
        req = page_list_call(hgcm, client_id, FN_HOLD, [], 7)
        submit(hgcm, req)
        L.HgcmCallRequest.parm_count.set(req, 2)  # in guest memory: one parameter too many
        hgcm.vmmdev.restore()
        assert [[HostU32(7)]] == [held.params for held in echo.held]
        echo.held[0].complete(VINF_SUCCESS)
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, VINF_SUCCESS)

    def test_restore_answers_a_call_it_cannot_resubmit(
        self, hgcm: Device, echo: EchoService
    ) -> None:
        """A call whose client did not come back is answered with the failure in ``rc`` and
        ``result``, DONE and the HGCM event, so the guest does not wait for good."""
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [])
        submit(hgcm, req)
        hgcm.vmmdev.pending_events = 0
        echo.refuse = STATUS_CODES["VERR_ACCESS_DENIED"]
        hgcm.vmmdev.restore()
        assert echo.held == []
        assert L.RequestHeader.rc.get(req) == VERR_HGCM_INVALID_CLIENT_ID
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, VERR_HGCM_INVALID_CLIENT_ID)
        assert hgcm.vmmdev.pending_events & Event.HGCM

    def test_restore_answers_a_call_whose_buffer_is_gone(
        self, hgcm: Device, echo: EchoService
    ) -> None:
        """A call whose in-buffer can no longer be read is answered with the failure."""
        src = bytearray(b"abc")
        req = page_list_call(hgcm, client(hgcm), FN_HOLD, [(src, PageListDirection.TO_HOST)])
        submit(hgcm, req)
        page = struct.unpack_from("<Q", req, 60 + 8)[0]
        hgcm.ram.unmap(page + 100)  # page_list_call maps each buffer 100 bytes into a page
        hgcm.vmmdev.restore()
        assert echo.held == []
        assert (done(req), L.HgcmCallRequest.result.get(req)) == (True, VERR_INVALID_PARAMETER)

    def test_reset_disconnects_everyone(self, hgcm: Device, echo: EchoService) -> None:
        """A reset disconnects every client and drops every pending call."""
        ids = [client(hgcm) for _ in range(3)]
        submit(hgcm, page_list_call(hgcm, ids[0], FN_HOLD, []))
        hgcm.vmmdev.reset()
        assert ids == echo.disconnected
        assert (hgcm.vmmdev.hgcm.client_count, hgcm.vmmdev.hgcm.pending_calls) == (0, 0)
        assert echo.resets == 1

    def test_duplicate_service(self, hgcm: Device, echo: EchoService) -> None:
        """Registering a second service of the same name is refused."""
        with pytest.raises(ValueError, match="already registered"):
            hgcm.vmmdev.hgcm.register(echo)
