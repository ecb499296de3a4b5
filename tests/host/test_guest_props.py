"""Guest calls of the simulated VBoxGuestPropSvc: GET, SET, DEL, ENUM, limits, permissions.

Rules of this test module:
- every call goes through the ``HgcmService`` interface with a ``FakeCall`` and is checked
  by the status it completes with and the parameters the service wrote;
- the service runs on a ``FakeClock``, so timestamps are exact;
- plain synchronous tests: the service needs no event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from agent.host.guest_props import (
    HOST_RESERVED_PREFIXES,
    MAX_PROPS,
    MAX_VALUE_SIZE,
    MAX_VALUE_SIZE_6_1,
    RDONLYGUEST,
    GuestFunction,
    GuestPropertyService,
)
from agent.host.guest_props._params import MAX_NAMES
from agent.host.hgcm_service import HgcmService, HostBuffer, HostParm, HostU32, HostU64
from agent.protocol.errors import VBoxStatusError
from agent.protocol.iprt_utf8 import VERR_CODE_POINT_ENDIAN_INDICATOR
from agent.protocol.status import (
    VERR_BUFFER_OVERFLOW,
    VERR_INVALID_PARAMETER,
    VERR_INVALID_UTF8_ENCODING,
    VERR_NOT_FOUND,
    VERR_NOT_IMPLEMENTED,
    VERR_PARSE_ERROR,
    VERR_PERMISSION_DENIED,
    VERR_TOO_MUCH_DATA,
    VINF_PERMISSION_DENIED,
    VINF_SUCCESS,
)

from .guest_props_support import (
    START_NS,
    FakeCall,
    FakeClock,
    del_call,
    enum_call,
    get_call,
    guest_set,
    notify_call,
    out,
    raw_in,
    run,
    set_call,
    string,
    strings,
    u32_value,
    u64_value,
)

if TYPE_CHECKING:
    from collections.abc import Callable


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="svc")
def _svc(clock: FakeClock) -> GuestPropertyService:
    return GuestPropertyService(clock=clock)


class TestInterface:
    def test_is_an_hgcm_service(self, svc: GuestPropertyService) -> None:
        """The service plugs into the framework under its upstream name and call limit."""
        service: HgcmService = svc
        assert service.name == "VBoxGuestPropSvc"
        assert service.max_calls_per_client == 16
        assert service.connect(7, 0) == VINF_SUCCESS

    @pytest.mark.parametrize("function", [0, 7, 8, 100])
    def test_unknown_function(self, svc: GuestPropertyService, function: int) -> None:
        """A function number outside 1..6 completes with VERR_NOT_IMPLEMENTED."""
        call = run(svc, FakeCall(1, function, [string("a")]))
        assert call.status == VERR_NOT_IMPLEMENTED

    @pytest.mark.parametrize(
        ("function", "count"),
        [
            (GuestFunction.GET_PROP, 3),
            (GuestFunction.GET_PROP, 5),
            (GuestFunction.SET_PROP, 1),
            (GuestFunction.SET_PROP, 4),
            (GuestFunction.SET_PROP_VALUE, 1),
            (GuestFunction.SET_PROP_VALUE, 4),
            (GuestFunction.DEL_PROP, 0),
            (GuestFunction.DEL_PROP, 2),
            (GuestFunction.ENUM_PROPS, 2),
            (GuestFunction.ENUM_PROPS, 4),
            (GuestFunction.GET_NOTIFICATION, 3),
            (GuestFunction.GET_NOTIFICATION, 5),
        ],
    )
    def test_wrong_parameter_count(
        self, svc: GuestPropertyService, function: int, count: int
    ) -> None:
        """A wrong parameter count completes with VERR_INVALID_PARAMETER."""
        params: list[HostParm] = [string("a") for _ in range(count)]
        assert run(svc, FakeCall(1, function, params)).status == VERR_INVALID_PARAMETER

    @pytest.mark.parametrize(
        "call",
        [
            FakeCall(1, GuestFunction.GET_PROP, [HostU32(0), out(64), HostU64(0), HostU32(0)]),
            FakeCall(1, GuestFunction.GET_PROP, [string("a"), HostU32(0), HostU64(0), HostU32(0)]),
            FakeCall(1, GuestFunction.GET_PROP, [string("a"), out(64), HostU32(0), HostU32(0)]),
            FakeCall(1, GuestFunction.GET_PROP, [string("a"), out(64), HostU64(0), HostU64(0)]),
            FakeCall(1, GuestFunction.SET_PROP, [string("a"), HostU32(1)]),
            FakeCall(1, GuestFunction.SET_PROP, [string("a"), string("b"), HostU32(0)]),
            FakeCall(1, GuestFunction.DEL_PROP, [HostU64(0)]),
            FakeCall(1, GuestFunction.ENUM_PROPS, [string(""), out(64), HostU64(0)]),
            FakeCall(1, GuestFunction.ENUM_PROPS, [HostU32(0), out(64), HostU32(0)]),
            FakeCall(
                1, GuestFunction.GET_NOTIFICATION, [string(""), HostU32(0), out(64), HostU32(0)]
            ),
            FakeCall(
                1, GuestFunction.GET_NOTIFICATION, [string(""), HostU64(0), HostU32(0), HostU32(0)]
            ),
            FakeCall(
                1, GuestFunction.GET_NOTIFICATION, [string(""), HostU64(0), out(64), HostU64(0)]
            ),
        ],
    )
    def test_wrong_parameter_type(self, svc: GuestPropertyService, call: FakeCall) -> None:
        """A parameter of the wrong type completes with VERR_INVALID_PARAMETER."""
        assert run(svc, call).status == VERR_INVALID_PARAMETER

    @pytest.mark.parametrize(
        "name",
        [raw_in(b""), raw_in(b"abc"), raw_in(b"ab\xffc\0"), raw_in(b"\xc0\xaf\0")],
        ids=["empty", "no-nul", "bad-utf8", "overlong-utf8"],
    )
    def test_bad_string(self, svc: GuestPropertyService, name: HostBuffer) -> None:
        """A string parameter must be a non-empty buffer with a NUL and UTF-8 before it."""
        assert run(svc, set_call(name, "v")).status == VERR_INVALID_PARAMETER

    def test_bytes_after_the_nul_are_not_text(self, svc: GuestPropertyService) -> None:
        """Only the bytes before the first NUL of a string must be UTF-8."""
        assert run(svc, set_call("a", raw_in(b"v\0\xff\xff"))).status == VINF_SUCCESS
        assert svc.host_get("a") == ("v", "", START_NS)

    @pytest.mark.parametrize("char", ["\ufffe", "\uffff"])
    def test_the_endian_indicators_are_refused(self, svc: GuestPropertyService, char: str) -> None:
        """IPRT's UTF-8 check refuses U+FFFE and U+FFFF (VERR_CODE_POINT_ENDIAN_INDICATOR):
        every string parameter holding one is VERR_INVALID_PARAMETER, a later ENUM_PROPS
        pattern that status itself. (Python's decoder takes them: they were stored, found
        and waited for.)"""
        name = f"/Guest/a{char}"
        assert run(svc, set_call(name, "v")).status == VERR_INVALID_PARAMETER
        assert run(svc, set_call("/Guest/a", f"x{char}")).status == VERR_INVALID_PARAMETER
        assert run(svc, set_call("/Guest/a", "x", f"TRANSIENT{char}")).status == (
            VERR_INVALID_PARAMETER
        )
        assert svc.host_enumerate("/Guest/*") == []
        assert run(svc, get_call(name)).status == VERR_INVALID_PARAMETER
        assert run(svc, del_call(name)).status == VERR_INVALID_PARAMETER
        assert run(svc, notify_call(f"/Guest/*{char}")).status == VERR_INVALID_PARAMETER
        assert run(svc, enum_call(f"{char}\0".encode())).status == VERR_INVALID_PARAMETER
        later = run(svc, enum_call(f"/Guest/*\0{char}\0\0".encode()))
        assert later.status == VERR_CODE_POINT_ENDIAN_INDICATOR

    @pytest.mark.parametrize(
        "text",
        [b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfd\xbf\xbf\xbf\xbf\xbf"],
        ids=["0x110000", "five-bytes", "six-bytes"],
    )
    def test_what_iprt_takes_is_kept_as_sent(self, svc: GuestPropertyService, text: bytes) -> None:
        """IPRT takes code points up to 0x7FFFFFFF (past U+10FFFF in four bytes, five- and
        six-byte sequences), which Python's decoder refuses: a name and value holding one
        are stored, matched by a pattern holding it, and given back byte for byte by
        GET_NOTIFICATION, GET_PROP and ENUM_PROPS. (They were VERR_INVALID_PARAMETER.)"""
        name, value = b"/Guest/" + text, b"v" + text
        wait_params: list[HostParm] = [raw_in(name + b"*\0"), HostU64(0), out(1024), HostU32(0)]
        wait = run(svc, FakeCall(2, GuestFunction.GET_NOTIFICATION, wait_params))
        assert wait.pending
        assert run(svc, set_call(raw_in(name + b"\0"), raw_in(value + b"\0"))).status == (
            VINF_SUCCESS
        )
        assert wait.status == VINF_SUCCESS
        assert strings(wait, 2) == [name, value, b"", b"0"]
        assert strings(run(svc, get_call(raw_in(name + b"\0"))), 1) == [value, b""]
        listed = run(svc, enum_call(b"/Guest/x\0" + name + b"\0\0"))
        assert strings(listed, 1)[:4] == [name, value, str(START_NS).encode(), b""]
        assert run(svc, del_call(raw_in(name + b"\0"))).status == VINF_SUCCESS
        assert svc.host_enumerate("/Guest/*") == []


class TestGetProp:
    def test_returns_value_flags_and_timestamp(self, svc: GuestPropertyService) -> None:
        """GET_PROP writes ``value\\0flags\\0``, its size and the timestamp."""
        svc.host_set("/Guest/a", "hello", "TRANSIENT")
        call = run(svc, get_call("/Guest/a"))
        assert call.status == VINF_SUCCESS
        assert strings(call, 1) == [b"hello", b"TRANSIENT"]
        assert len(b"hello\0TRANSIENT\0") == u32_value(call, 3)
        assert u64_value(call, 2) == START_NS

    def test_missing(self, svc: GuestPropertyService) -> None:
        """A missing property completes with VERR_NOT_FOUND."""
        call = run(svc, get_call("/Guest/none"))
        assert call.status == VERR_NOT_FOUND
        assert u32_value(call, 3) == 0

    @pytest.mark.parametrize(
        "make",
        [
            lambda: get_call("/Guest/a", size=0),
            lambda: enum_call(b"\0", size=0),
            lambda: notify_call("", size=0),
        ],
        ids=["GET_PROP", "ENUM_PROPS", "GET_NOTIFICATION"],
    )
    def test_empty_out_buffer_is_invalid(
        self, svc: GuestPropertyService, make: Callable[[], FakeCall]
    ) -> None:
        """An out buffer of size 0 is VERR_INVALID_PARAMETER (``HGCMSvcGetBuf``), no size."""
        svc.host_set("/Guest/a", "hello")
        call = run(svc, make())
        assert call.status == VERR_INVALID_PARAMETER
        assert u32_value(call, len(call.params) - 1) == 0

    @pytest.mark.parametrize("size", [1, 5, 15])
    def test_overflow_reports_size(self, svc: GuestPropertyService, size: int) -> None:
        """A short buffer gets VERR_BUFFER_OVERFLOW, the needed size, and no timestamp."""
        svc.host_set("/Guest/a", "hello", "TRANSIENT")
        call = run(svc, get_call("/Guest/a", size=size))
        assert call.status == VERR_BUFFER_OVERFLOW
        assert u32_value(call, 3) == 16
        assert u64_value(call, 2) == 0
        buffer = call.params[1]
        assert isinstance(buffer, HostBuffer)
        assert bytes(size) == bytes(buffer.data)

    def test_exact_fit(self, svc: GuestPropertyService) -> None:
        """A buffer of exactly the needed size is enough."""
        svc.host_set("/Guest/a", "")
        call = run(svc, get_call("/Guest/a", size=2))
        assert call.status == VINF_SUCCESS
        assert strings(call, 1) == [b"", b""]

    @pytest.mark.parametrize(
        "name",
        [
            raw_in(b"\0"),
            string("x" * 64),
            string("a*"),
            string("a?"),
            string("a|b"),
            raw_in(b"a\0*"),
        ],
        ids=["size-1", "size-65", "star", "question", "bar", "star-after-nul"],
    )
    def test_invalid_name(self, svc: GuestPropertyService, name: HostBuffer) -> None:
        """A name buffer outside 2..64 bytes or with ``*?|`` anywhere is VERR_INVALID_PARAMETER."""
        assert run(svc, get_call(name)).status == VERR_INVALID_PARAMETER

    def test_longest_name(self, svc: GuestPropertyService) -> None:
        """A 63-character name (64 bytes with its NUL) is valid."""
        assert guest_set(svc, "n" * 63, "v") == VINF_SUCCESS
        assert run(svc, get_call("n" * 63)).status == VINF_SUCCESS

    def test_names_are_checked_alike_every_time(self, svc: GuestPropertyService) -> None:
        """A name's check does not change with reads before it: a refused buffer stays
        refused, one that differs only past its NUL is checked on its own, and names read
        after more than ``MAX_NAMES`` others are checked and found as the first were."""
        svc.host_set("/Guest/a", "hello")
        for _ in range(2):
            assert run(svc, get_call(raw_in(b"/Guest/a\0*"))).status == VERR_INVALID_PARAMETER
            assert run(svc, get_call(raw_in(b"/Guest/a\0x"))).status == VINF_SUCCESS
        for index in range(MAX_NAMES + 2):
            assert run(svc, get_call(f"/Guest/n{index}")).status == VERR_NOT_FOUND
        assert run(svc, get_call("/Guest/a")).status == VINF_SUCCESS
        assert run(svc, get_call("/Guest/a|")).status == VERR_INVALID_PARAMETER


class TestSetProp:
    @pytest.mark.parametrize("function", [GuestFunction.SET_PROP, GuestFunction.SET_PROP_VALUE])
    def test_sets_value_and_flags(self, svc: GuestPropertyService, function: int) -> None:
        """Functions 2 and 3 both store the value and the parsed flags."""
        call = run(svc, set_call("/Guest/a", "v", " transient ,rdonlyhost", function))
        assert call.status == VINF_SUCCESS
        assert svc.host_get("/Guest/a") == ("v", "TRANSIENT, RDONLYHOST", START_NS)

    @pytest.mark.parametrize("function", [GuestFunction.SET_PROP, GuestFunction.SET_PROP_VALUE])
    def test_two_parameters_reset_flags(self, svc: GuestPropertyService, function: int) -> None:
        """The two-parameter form replaces the flags with NIL."""
        guest_set(svc, "/Guest/a", "v", "TRANSIENT")
        assert run(svc, set_call("/Guest/a", "w", None, function)).status == VINF_SUCCESS
        assert svc.host_get("/Guest/a") == ("w", "", START_NS + 1)

    def test_empty_value(self, svc: GuestPropertyService) -> None:
        """An empty value is a value."""
        assert guest_set(svc, "/Guest/a", "") == VINF_SUCCESS
        assert svc.host_get("/Guest/a") == ("", "", START_NS)

    def test_bad_flags(self, svc: GuestPropertyService) -> None:
        """Unknown flags complete with VERR_PARSE_ERROR and change nothing."""
        guest_set(svc, "/Guest/a", "v")
        assert guest_set(svc, "/Guest/a", "w", "TRANSIENT,BOGUS") == VERR_PARSE_ERROR
        assert svc.host_get("/Guest/a") == ("v", "", START_NS)

    @pytest.mark.parametrize(
        ("max_size", "size", "status"),
        [
            (1024, 1024, VINF_SUCCESS),
            (1024, 1025, VERR_TOO_MUCH_DATA),
            (MAX_VALUE_SIZE_6_1, 128, VINF_SUCCESS),
            (MAX_VALUE_SIZE_6_1, 129, VERR_TOO_MUCH_DATA),
        ],
    )
    def test_value_limit(self, clock: FakeClock, max_size: int, size: int, status: int) -> None:
        """The value buffer, NUL included, may hold the host's limit (7.0: 1024, 6.1: 128)."""
        svc = GuestPropertyService(clock=clock, max_value_size=max_size)
        assert status == run(svc, set_call("/Guest/a", "x" * (size - 1))).status

    def test_value_limit_counts_the_buffer(self, svc: GuestPropertyService) -> None:
        """The limit applies to the buffer size, not to the string in it."""
        value = raw_in(b"x\0" + bytes(1023))
        assert run(svc, set_call("/Guest/a", value)).status == VERR_TOO_MUCH_DATA

    def test_property_limit(self, svc: GuestPropertyService) -> None:
        """A 257th new property is VERR_TOO_MUCH_DATA; existing ones still change."""
        for index in range(MAX_PROPS):
            assert guest_set(svc, f"/Guest/{index}", "v") == VINF_SUCCESS
        assert guest_set(svc, "/Guest/more", "v") == VERR_TOO_MUCH_DATA
        assert svc.host_get("/Guest/more") is None
        assert guest_set(svc, "/Guest/0", "w") == VINF_SUCCESS
        assert run(svc, del_call("/Guest/1")).status == VINF_SUCCESS
        assert guest_set(svc, "/Guest/more", "v") == VINF_SUCCESS

    def test_property_limit_still_notifies(self, svc: GuestPropertyService) -> None:
        """As upstream, a refused 257th property wakes waiters with the name as deleted."""
        for index in range(MAX_PROPS):
            guest_set(svc, f"/Guest/{index}", "v")
        wait = run(svc, notify_call("/Guest/more"))
        guest_set(svc, "/Guest/more", "v")
        assert wait.status == VINF_SUCCESS
        assert strings(wait, 2) == [b"/Guest/more", b"", b"", b"1"]


class TestDelProp:
    def test_deletes(self, svc: GuestPropertyService) -> None:
        """DEL_PROP removes the property."""
        guest_set(svc, "/Guest/a", "v")
        assert run(svc, del_call("/Guest/a")).status == VINF_SUCCESS
        assert svc.host_get("/Guest/a") is None

    def test_missing_is_success_without_notification(self, svc: GuestPropertyService) -> None:
        """Deleting a missing property succeeds and wakes nobody."""
        wait = run(svc, notify_call())
        assert run(svc, del_call("/Guest/none")).status == VINF_SUCCESS
        assert wait.pending

    def test_invalid_name(self, svc: GuestPropertyService) -> None:
        """The name rules of GET_PROP apply."""
        assert run(svc, del_call("a*")).status == VERR_INVALID_PARAMETER


class TestPermissions:
    def test_rdonlyguest_property(self, svc: GuestPropertyService) -> None:
        """The guest may neither change nor delete an RDONLYGUEST property."""
        svc.host_set("/Guest/a", "v", "RDONLYGUEST")
        assert guest_set(svc, "/Guest/a", "w") == VERR_PERMISSION_DENIED
        assert run(svc, del_call("/Guest/a")).status == VERR_PERMISSION_DENIED
        assert svc.host_get("/Guest/a") == ("v", "RDONLYGUEST", START_NS)

    def test_readonly_property(self, svc: GuestPropertyService) -> None:
        """READONLY includes RDONLYGUEST."""
        svc.host_set("/Guest/a", "v", "READONLY")
        assert guest_set(svc, "/Guest/a", "w") == VERR_PERMISSION_DENIED

    @pytest.mark.parametrize("prefix", HOST_RESERVED_PREFIXES)
    def test_reserved_prefix_refuses_guest(self, svc: GuestPropertyService, prefix: str) -> None:
        """A guest write under a host-reserved prefix is refused even for a new name."""
        assert guest_set(svc, prefix + "x", "v") == VERR_PERMISSION_DENIED
        assert svc.host_get(prefix + "x") is None

    def test_reserved_prefix_delete_of_missing(self, svc: GuestPropertyService) -> None:
        """Deleting a missing reserved name succeeds: only existing flags are checked."""
        assert run(svc, del_call("/VirtualBox/HostInfo/x")).status == VINF_SUCCESS

    @pytest.mark.parametrize("prefix", HOST_RESERVED_PREFIXES)
    def test_reserved_prefix_host_write(self, svc: GuestPropertyService, prefix: str) -> None:
        """A host write under a reserved prefix gets RDONLYGUEST added."""
        svc.host_set(prefix + "x", "v", "TRANSIENT")
        assert svc.host_get(prefix + "x") == ("v", "TRANSIENT, RDONLYGUEST", START_NS)
        assert run(svc, del_call(prefix + "x")).status == VERR_PERMISSION_DENIED

    def test_reserved_prefix_is_case_sensitive(self, svc: GuestPropertyService) -> None:
        """Only the exact prefix is reserved."""
        assert guest_set(svc, "/virtualbox/hostinfo/x", "v") == VINF_SUCCESS

    def test_global_rdonlyguest(self, svc: GuestPropertyService) -> None:
        """With the global RDONLYGUEST flag guest writes succeed with +10 and do nothing."""
        svc.host_set("/Guest/a", "v")
        svc.set_global_flags(RDONLYGUEST)
        wait = run(svc, notify_call())
        assert guest_set(svc, "/Guest/a", "w") == VINF_PERMISSION_DENIED
        assert guest_set(svc, "/Guest/new", "w") == VINF_PERMISSION_DENIED
        assert guest_set(svc, "/VirtualBox/HostInfo/x", "w") == VINF_PERMISSION_DENIED
        assert run(svc, del_call("/Guest/a")).status == VINF_PERMISSION_DENIED
        assert run(svc, del_call("/Guest/none")).status == VINF_SUCCESS
        assert svc.host_get("/Guest/a") == ("v", "", START_NS)
        assert svc.host_get("/Guest/new") is None
        assert wait.pending

    def test_property_flag_beats_global_flag(self, svc: GuestPropertyService) -> None:
        """An RDONLYGUEST property stays VERR_PERMISSION_DENIED under the global flag."""
        svc.host_set("/Guest/a", "v", "RDONLYGUEST")
        svc.set_global_flags(RDONLYGUEST)
        assert guest_set(svc, "/Guest/a", "w") == VERR_PERMISSION_DENIED

    def test_global_flag_cleared(self, svc: GuestPropertyService) -> None:
        """Clearing the global flags lets the guest write again."""
        svc.set_global_flags(RDONLYGUEST)
        svc.set_global_flags(0)
        assert guest_set(svc, "/Guest/a", "w") == VINF_SUCCESS

    def test_guest_may_set_rdonlyhost(self, svc: GuestPropertyService) -> None:
        """The guest can lock a property against the host."""
        guest_set(svc, "/Guest/a", "v", "RDONLYHOST")
        with pytest.raises(VBoxStatusError, match="VERR_PERMISSION_DENIED"):
            svc.host_set("/Guest/a", "w")
        assert guest_set(svc, "/Guest/a", "w") == VINF_SUCCESS


class TestEnumProps:
    @staticmethod
    def _entries(call: FakeCall) -> list[list[bytes]]:
        parts = strings(call, 1)
        assert parts[-4:] == [b"", b"", b"", b""]
        body = parts[:-4]
        return [body[index : index + 4] for index in range(0, len(body), 4)]

    def test_lists_all(self, svc: GuestPropertyService, clock: FakeClock) -> None:
        """An empty pattern lists every property as name, value, decimal ns, flags."""
        svc.host_set("/Guest/b", "2", "TRANSRESET")
        clock.now += 1000
        svc.host_set("/Guest/a", "1")
        call = run(svc, enum_call(b"\0"))
        assert call.status == VINF_SUCCESS
        assert [
            [b"/Guest/a", b"1", str(START_NS + 1000).encode(), b""],
            [b"/Guest/b", b"2", str(START_NS).encode(), b"TRANSIENT, TRANSRESET"],
        ] == self._entries(call)
        expected = b"/Guest/a\x001\x00%d\x00\x00" % (START_NS + 1000)
        expected += b"/Guest/b\x002\x00%d\x00TRANSIENT, TRANSRESET\x00" % START_NS
        assert len(expected) + 4 == u32_value(call, 2)

    def test_empty_store(self, svc: GuestPropertyService) -> None:
        """With nothing to list the output is the four-NUL terminator."""
        call = run(svc, enum_call(b"\0", size=4))
        assert call.status == VINF_SUCCESS
        assert u32_value(call, 2) == 4

    @pytest.mark.parametrize(
        ("patterns", "names"),
        [
            (b"/Guest/a*\0", [b"/Guest/a1", b"/Guest/a2"]),
            (b"/Guest/?2\0", [b"/Guest/a2", b"/Guest/b2"]),
            (b"/Guest/a1|/Guest/b*\0", [b"/Guest/a1", b"/Guest/b2"]),
            (b"/Guest/a1\0/Guest/b*\0\0", [b"/Guest/a1", b"/Guest/b2"]),
            (b"nothing\0", []),
        ],
        ids=["star", "question", "bar", "double-nul", "none"],
    )
    def test_patterns(self, svc: GuestPropertyService, patterns: bytes, names: list[bytes]) -> None:
        """Patterns use ``*`` and ``?`` and are separated by ``|`` or inner NULs."""
        for name in ("/Guest/a1", "/Guest/a2", "/Guest/b2"):
            svc.host_set(name, "v")
        call = run(svc, enum_call(patterns))
        assert call.status == VINF_SUCCESS
        assert names == [entry[0] for entry in self._entries(call)]

    def test_overflow(self, svc: GuestPropertyService) -> None:
        """A short buffer gets VERR_BUFFER_OVERFLOW and the needed size; what fits is written."""
        svc.host_set("/Guest/a", "1")
        svc.host_set("/Guest/b", "2")
        entry = len(b"/Guest/a\x001\x00%d\x00\x00" % START_NS)
        call = run(svc, enum_call(b"\0", size=entry + 3))
        assert call.status == VERR_BUFFER_OVERFLOW
        assert 2 * entry + 4 == u32_value(call, 2)
        buffer = call.params[1]
        assert isinstance(buffer, HostBuffer)
        assert buffer.data.startswith(b"/Guest/a\x001\x00")
        assert bytes(3) == bytes(buffer.data[entry:])

    def test_no_room_for_terminator(self, svc: GuestPropertyService) -> None:
        """Entries that fit without the terminator still give VERR_BUFFER_OVERFLOW."""
        svc.host_set("/Guest/a", "1")
        entry = len(b"/Guest/a\x001\x00%d\x00\x00" % START_NS)
        assert run(svc, enum_call(b"\0", size=entry + 3)).status == VERR_BUFFER_OVERFLOW
        assert run(svc, enum_call(b"\0", size=entry + 4)).status == VINF_SUCCESS

    def test_pattern_limit(self, svc: GuestPropertyService) -> None:
        """A pattern buffer over 1024 bytes is VERR_TOO_MUCH_DATA."""
        assert run(svc, enum_call(b"*" * 1023 + b"\0")).status == VINF_SUCCESS
        assert run(svc, enum_call(b"*" * 1024 + b"\0")).status == VERR_TOO_MUCH_DATA

    def test_bad_utf8_after_inner_nul(self, svc: GuestPropertyService) -> None:
        """Every pattern of a NUL-separated list must be UTF-8: the first is checked as a
        parameter, the later ones by enumProps itself, with IPRT's own status."""
        assert run(svc, enum_call(b"\xff\0\0")).status == VERR_INVALID_PARAMETER
        assert run(svc, enum_call(b"a\0\xff\0\0")).status == VERR_INVALID_UTF8_ENCODING

    @pytest.mark.parametrize(
        ("patterns", "status"),
        [
            (b"/Guest/a1\0/Guest/b*", VERR_BUFFER_OVERFLOW),
            (b"/Guest/a1\0\xff", VERR_INVALID_UTF8_ENCODING),
            (b"/Guest/a1\0/Guest/b*\0c", VERR_BUFFER_OVERFLOW),
            (b"/Guest/a1\0/Guest/b*\0\xc3\0", VERR_INVALID_UTF8_ENCODING),
            (b"/Guest/a1\0x", VERR_BUFFER_OVERFLOW),
        ],
        ids=["unterminated", "unterminated-bad-utf8", "third-unterminated", "third-bad", "last"],
    )
    def test_a_later_pattern_must_end_with_a_nul(
        self, svc: GuestPropertyService, patterns: bytes, status: int
    ) -> None:
        """After an inner NUL every pattern is checked as a NUL-terminated UTF-8 string in
        the rest of the buffer; the call fails without listing or touching the size (the
        unterminated last pattern was matched without its last byte)."""
        svc.host_set("/Guest/a1", "v")
        call = enum_call(patterns)
        size = call.params[2]
        assert isinstance(size, HostU32)
        size.value = 77
        assert run(svc, call).status == status
        assert u32_value(call, 2) == 77
        buffer = call.params[1]
        assert isinstance(buffer, HostBuffer)
        assert not any(buffer.data)


class TestTimestamps:
    def test_same_clock_reading(self, svc: GuestPropertyService) -> None:
        """Changes within one clock tick get consecutive timestamps."""
        guest_set(svc, "/Guest/a", "1")
        guest_set(svc, "/Guest/b", "2")
        guest_set(svc, "/Guest/a", "3")
        assert [stamp for _, _, stamp, _ in svc.host_enumerate("/Guest/*")] == [
            START_NS + 2,
            START_NS + 1,
        ]

    def test_clock_going_back_is_followed(
        self, svc: GuestPropertyService, clock: FakeClock
    ) -> None:
        """A reading older than the last timestamp is used as it is (``getCurrentTimestamp``
        follows the clock back; the simulator bumped it to last + 1, an order upstream does
        not keep)."""
        guest_set(svc, "/Guest/a", "1")
        clock.now -= 10**9
        guest_set(svc, "/Guest/b", "2")
        assert svc.host_get("/Guest/b") == ("2", "", START_NS - 10**9)

    def test_an_obsolete_reading_is_bumped(
        self, svc: GuestPropertyService, clock: FakeClock
    ) -> None:
        """After bumps in a row, a reading no older than the bumps made is still bumped;
        an older one is followed."""
        for value in "123":
            guest_set(svc, "/Guest/a", value)  # START_NS, + 1, + 2: two bumps
        clock.now = START_NS + 1
        guest_set(svc, "/Guest/b", "b")
        clock.now = START_NS - 10
        guest_set(svc, "/Guest/c", "c")
        stamps = {name: stamp for name, _, stamp, _ in svc.host_enumerate("/Guest/*")}
        assert stamps == {
            "/Guest/a": START_NS + 2,
            "/Guest/b": START_NS + 3,
            "/Guest/c": START_NS - 10,
        }

    def test_a_restored_service_counts_from_the_clock(
        self, svc: GuestPropertyService, clock: FakeClock
    ) -> None:
        """A restored service starts again (``mPrevTimestamp`` 0): on a host whose clock is
        behind, its changes are older than the properties it restored."""
        guest_set(svc, "/Guest/a", "1")
        clock.now -= 100 * 10**9
        svc.restore()
        guest_set(svc, "/Guest/b", "2")
        assert svc.host_get("/Guest/a") == ("1", "", START_NS)
        restored_b = svc.host_get("/Guest/b")
        assert restored_b is not None
        # The readings after the restart (its own properties, then b) are bumped only by
        # the few changes made at that one reading.
        assert START_NS - 100 * 10**9 <= restored_b[2] < START_NS - 100 * 10**9 + 100

    def test_a_change_dated_as_the_last_queued_one_is_queued_one_later(
        self, svc: GuestPropertyService, clock: FakeClock
    ) -> None:
        """``doNotifications`` dates a change one later when the last one queued has its
        timestamp; the property keeps the clock's. (A refused set takes a timestamp too.)"""
        guest_set(svc, "/Guest/a", "1")
        svc.host_set("/Guest/ro", "x", "RDONLYGUEST")  # START_NS + 1
        clock.now = START_NS - 10
        assert guest_set(svc, "/Guest/ro", "y") == VERR_PERMISSION_DENIED  # START_NS - 10
        clock.now = START_NS + 1
        guest_set(svc, "/Guest/c", "3")
        assert svc.host_get("/Guest/c") == ("3", "", START_NS + 1)
        call = run(svc, notify_call("/Guest/c", timestamp=START_NS + 1))
        assert call.status == VINF_SUCCESS
        assert u64_value(call, 1) == START_NS + 2

    def test_a_refused_set_takes_a_timestamp(self, svc: GuestPropertyService) -> None:
        """SET_PROP takes its timestamp before it checks anything (``setProperty``), so a
        refused set uses one up; DEL_PROP takes one only when it deletes."""
        guest_set(svc, "/Guest/a", "1")  # START_NS
        svc.host_set("/Guest/ro", "v", "RDONLYGUEST")  # START_NS + 1
        refused = [
            FakeCall(1, GuestFunction.SET_PROP, [string("/Guest/b")]),
            set_call("/Guest/b*", "x"),
            set_call("/Guest/b", "x" * MAX_VALUE_SIZE),
            set_call("/Guest/b", "x", "NOPE"),
            set_call("/Guest/ro", "x"),
        ]
        assert [run(svc, call).status for call in refused] == [
            VERR_INVALID_PARAMETER,
            VERR_INVALID_PARAMETER,
            VERR_TOO_MUCH_DATA,
            VERR_PARSE_ERROR,
            VERR_PERMISSION_DENIED,
        ]
        assert run(svc, del_call("/Guest/b*")).status == VERR_INVALID_PARAMETER
        assert run(svc, del_call("/Guest/none")).status == VINF_SUCCESS
        assert run(svc, del_call("/Guest/ro")).status == VERR_PERMISSION_DENIED
        guest_set(svc, "/Guest/b", "2")
        assert svc.host_get("/Guest/b") == ("2", "", START_NS + 2 + len(refused))

    def test_clock_going_forward(self, svc: GuestPropertyService, clock: FakeClock) -> None:
        """A later clock reading is used as it is."""
        guest_set(svc, "/Guest/a", "1")
        clock.now += 5
        guest_set(svc, "/Guest/b", "2")
        assert svc.host_get("/Guest/b") == ("2", "", START_NS + 5)
