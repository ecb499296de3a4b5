"""The guest-property client against the in-process simulated host.

Rules of this test module:
- a real ``SimulatedHost`` (each simulated driver) behind ``SimOpener``: pure trio, virtual
  clock (``autojump_clock``, a parameter of every test that waits for the host: pytest-trio
  ignores a clock named in ``usefixtures``), each test bounded by ``trio.fail_after`` on it;
- both sides are checked: what the client returns and what the host then holds;
- waits synchronise on ``wait_all_tasks_blocked`` (the wait is parked at the host).
"""

from __future__ import annotations

import contextlib
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.host.guest_props import GuestPropertyService
from agent.host.hgcm_service import HostBuffer, HostU32, HostU64
from agent.protocol import HOST_ERRORS, RemoteProtocolError
from agent.protocol.constants import (
    HGCM_MAX_USER_PARM,
    SHORT_CALL_TIMEOUT_MS,
    TIMEOUT_INFINITE,
    RequestType,
)
from agent.protocol.guest_props import (
    ENUM_TERMINATOR,
    MAX_GUEST_NOTIFICATIONS,
    MAX_PROPS,
    NILFLAG,
    RDONLYGUEST,
    SERVICE_NAME,
    GuestFunction,
    PropertyArgumentError,
)
from agent.protocol.host_text import host_bytes
from agent.protocol.status import (
    VERR_BUFFER_OVERFLOW,
    VERR_INTERRUPTED,
    VERR_PERMISSION_DENIED,
    VERR_TOO_MUCH_DATA,
    VINF_PERMISSION_DENIED,
    VINF_SUCCESS,
    status_name,
)
from agent.services.event_pump import EventPump
from agent.services.guest_props import (
    ENUM_BUFFER_SIZE,
    ENUM_SPARE_ROOM,
    ENUM_TRIES,
    FRUITLESS_WAITS,
    SIZE_RETRIES,
    GuestProperties,
    HgcmSizeError,
    PropertiesGrowingError,
    PropertyChange,
    PropertyWatch,
    open_guest_properties,
)
from agent.services.hgcm import (
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCallError,
    HgcmChannel,
    HgcmParam,
    HgcmU32,
    HgcmU64,
    open_hgcm_channel,
)
from tests.sim_support import OverflowAsking

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from agent.device import Device
    from agent.host.hgcm_service import HgcmCallHandle
    from agent.services.hgcm import HgcmReply, PreparedCall


@pytest.fixture(name="props")
async def _props(host: SimulatedHost) -> AsyncIterator[GuestProperties]:
    async with open_device(SimOpener(host)) as device, open_guest_properties(device) as props:
        yield props


class TestShortCalls:
    async def test_set_get_delete(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A set is visible to the host, flags in canonical order; a delete removes it."""
        with trio.fail_after(60):
            await props.set("/Guest/a", "héllo", "transreset,rdonlyhost")
            got = await props.get("/Guest/a")
            assert got is not None
            assert (got.value, got.flags) == ("héllo", "TRANSIENT, RDONLYHOST, TRANSRESET")
            assert host.prop_get("/Guest/a") == ("héllo", got.flags, got.timestamp)
            await props.delete("/Guest/a")
            assert await props.get("/Guest/a") is None
            assert host.prop_get("/Guest/a") is None
            await props.delete("/Guest/a")  # a missing property deletes fine

    async def test_callers_beyond_the_host_limit_queue(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """More concurrent gets than the host takes from one client wait for a slot."""
        host.prop_set("/Guest/a", "x")
        callers = 3 * props.channel.max_pending
        values: list[str] = []

        async def get() -> None:
            got = await props.get("/Guest/a")
            assert got is not None
            values.append(got.value)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(get)
        assert values == ["x"] * callers
        assert props.channel.pending == 0

    async def test_callers_cancelled_in_the_queue_take_no_slot(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A caller cancelled while it waits for a slot leaves every slot to the others,
        also one freed between its cancellation and its leaving the queue."""
        host.prop_set("/Guest/a", "x")
        slots = props.channel.max_pending
        host.set_delay(RequestType.HGCM_CALL64, 1.0)
        with trio.fail_after(60):
            for _ in range(3):  # a lost slot per round would leave too few for a full round
                async with trio.open_nursery() as nursery:
                    for _ in range(slots):
                        nursery.start_soon(props.get, "/Guest/a")
                    with trio.CancelScope() as queued:
                        queued_callers = trio.open_nursery()
                        async with queued_callers as waiting:
                            for _ in range(slots):
                                waiting.start_soon(props.get, "/Guest/a")
                            await trio.testing.wait_all_tasks_blocked()
                            await trio.sleep(1.0)  # the held calls end as the queue is cancelled
                            queued.cancel()
            began = trio.current_time()
            async with trio.open_nursery() as nursery:  # one held round: no slot was lost
                for _ in range(slots):
                    nursery.start_soon(props.get, "/Guest/a")
            assert trio.current_time() - began < 2.0
        assert props.channel.pending == 0

    async def test_set_replaces_flags(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """Every set replaces the flags; without flags they are reset."""
        with trio.fail_after(60):
            await props.set("/Guest/a", "1", "TRANSIENT")
            await props.set("/Guest/a", "2")
            stored = host.prop_get("/Guest/a")
            assert stored is not None
            assert stored[:2] == ("2", "")

    async def test_read_only_for_the_guest(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """RDONLYGUEST and host-reserved names refuse the guest with the status's name."""
        host.prop_set("/Guest/ro", "x", "RDONLYGUEST")
        with trio.fail_after(60):
            for name in ("/Guest/ro", "/VirtualBox/HostInfo/Mine"):
                with pytest.raises(HgcmCallError) as info:
                    await props.set(name, "y")
                assert (info.value.rc, info.value.name) == (
                    VERR_PERMISSION_DENIED,
                    "VERR_PERMISSION_DENIED",
                )
        assert host.prop_get("/VirtualBox/HostInfo/Mine") is None

    async def test_a_write_the_host_ignores_is_reported(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """With the host's global RDONLYGUEST a set and a delete succeed as no-ops with
        VINF_PERMISSION_DENIED, which the client returns (it returned nothing)."""
        host.prop_set("/Guest/kept", "1")
        service = host.vmmdev.hgcm.service(SERVICE_NAME)
        assert isinstance(service, GuestPropertyService)
        service.set_global_flags(RDONLYGUEST)
        with trio.fail_after(60):
            assert await props.set("/Guest/x", "1") == VINF_PERMISSION_DENIED
            assert await props.delete("/Guest/kept") == VINF_PERMISSION_DENIED
            service.set_global_flags(NILFLAG)
            assert await props.set("/Guest/x", "1") == VINF_SUCCESS
        assert host.prop_get("/Guest/kept") is not None

    async def test_property_cap(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """The service holds at most 256 properties; one more is VERR_TOO_MUCH_DATA."""
        with trio.fail_after(600):
            existing = len(await props.enumerate())
            for index in range(MAX_PROPS - existing):
                await props.set(f"/Guest/p{index}", "v")
            with pytest.raises(HgcmCallError) as info:
                await props.set("/Guest/one-more", "v")
            assert info.value.name == "VERR_TOO_MUCH_DATA"
            assert info.value.rc == VERR_TOO_MUCH_DATA
            await props.set("/Guest/p0", "replaced")  # existing names still change
            assert len(await props.enumerate()) == MAX_PROPS

    async def test_enumerate_with_patterns_and_growth(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """Patterns select; a listing larger than the first buffer is fetched whole."""
        big = "v" * 1000
        with trio.fail_after(60):
            for index in range(12):
                await props.set(f"/Test/big{index:02}", big)
            await props.set("/Test/small", "s", "TRANSIENT")
            listed = await props.enumerate(["/Test/big*", "/Test/sm?ll"])
            assert [prop.name for prop in listed] == [
                *(f"/Test/big{index:02}" for index in range(12)),
                "/Test/small",
            ]
            assert all(prop.value == big for prop in listed[:-1])
            assert (listed[-1].value, listed[-1].flags) == ("s", "TRANSIENT")
            assert await props.enumerate(["/Nothing/*"]) == []

    @pytest.mark.parametrize(
        ("name", "value", "flags", "message"),
        [
            ("", "v", None, "empty"),
            ("/a" * 32, "v", None, "limit is 63"),
            ("/a*", "v", None, "'\\*'"),
            ("/a|b", "v", None, "'\\|'"),
            ("/a", "v" * 1024, None, "limit is 1023"),
            ("/a", "v", "TRANSIENT,BOGUS", "unknown flag"),
            ("/a\0b", "v", None, "NUL"),
            ("/a", "x\uffff", None, "U\\+FFFF at character 2, .*\\(VERR_CODE_POINT_ENDIAN"),
            ("/a\ufffe", "v", None, "U\\+FFFE at character 3, which the host refuses"),
        ],
    )
    async def test_local_limits(
        self,
        props: GuestProperties,
        name: str,
        value: str,
        flags: str | None,
        message: str,
    ) -> None:
        """Bad names, values and flags never reach the host."""
        before = props.channel.calls
        with pytest.raises(PropertyArgumentError, match=message):
            await props.set(name, value, flags)
        assert props.channel.calls == before

    @pytest.mark.parametrize(
        ("name", "flags"),
        [("/" + "n" * 70_000, None), ("/n\0" + "n" * 5000, None), ("/n", "X" * 5000)],
    )
    async def test_a_huge_bad_argument_is_quoted_short(
        self, props: GuestProperties, name: str, flags: str | None
    ) -> None:
        """The error quotes the start of a huge bad name or flags and says its length (the
        whole argument was quoted, up to twice: a line of 70 kB)."""
        with pytest.raises(PropertyArgumentError) as info:
            await props.set(name, "v", flags)
        assert len(str(info.value)) < 400
        assert "characters)" in str(info.value)

    async def test_a_pattern_the_host_refuses_is_refused_here(self, props: GuestProperties) -> None:
        """A pattern holding U+FFFF, which IPRT's UTF-8 check refuses, never reaches the host
        (it was sent: VERR_INVALID_PARAMETER from ENUM_PROPS, a wait's the same)."""
        before = props.channel.calls
        with pytest.raises(PropertyArgumentError, match="U\\+FFFF at character 4"):
            await props.enumerate(["/W/\uffff*"])
        with pytest.raises(PropertyArgumentError, match="U\\+FFFF at character 4"):
            async with props.watch(["/W/\uffff*"]):
                pass
        assert props.channel.calls == before

    async def test_pattern_limit(self, props: GuestProperties) -> None:
        """An enumeration's pattern list over 1023 bytes is refused locally, and a watch's
        over what one HGCM buffer carries (the service checks no length of those)."""
        before = props.channel.calls
        with pytest.raises(PropertyArgumentError, match="limit is 1023"):
            await props.enumerate(["x" * 600, "y" * 600])
        with pytest.raises(PropertyArgumentError, match=f"limit is {HGCM_MAX_USER_PARM - 1}"):
            async with props.watch(["x" * HGCM_MAX_USER_PARM]):
                pass
        assert props.channel.calls == before

    @pytest.mark.parametrize("method", ["enumerate", "wait", "watch"])
    async def test_a_str_for_patterns_is_refused(
        self, autojump_clock: trio.abc.Clock, props: GuestProperties, method: str
    ) -> None:
        """A lone str where patterns belong raises TypeError naming the argument and sends
        nothing. (It was one pattern per character: ``enumerate("/W/x")`` listed nothing,
        ``watch("/W/*")`` followed every name.)"""
        before = props.channel.calls

        async def call() -> None:
            if method == "watch":
                async with props.watch("/W/*"):
                    pass
            else:
                await getattr(props, method)("/W/*")

        with trio.fail_after(60), pytest.raises(TypeError, match=r"^patterns must be a sequence"):
            await call()
        assert props.channel.calls == before


class _ListingService(GuestPropertyService):
    """Answers every ENUM_PROPS with ``listing``."""

    def __init__(self, listing: bytes) -> None:
        super().__init__()
        self._listing = listing

    def _enum_props(self, call: HgcmCallHandle) -> int:
        out, size = call.params[1], call.params[2]
        assert isinstance(out, HostBuffer)
        assert isinstance(size, HostU32)
        size.value = len(self._listing)
        if len(self._listing) > len(out.data):
            return VERR_BUFFER_OVERFLOW
        out.data[: len(self._listing)] = self._listing
        return VINF_SUCCESS


class _GrowingByOne(GuestPropertyService):
    """Has the host add a property before it answers each ENUM_PROPS: the race upstream's
    ``VbglR3GuestPropEnum`` leaves spare room for (the host, or another guest process,
    adding properties while the guest lists them).

    Attributes:
        sent: the buffer size of each ENUM_PROPS, in order.
        asked: the size each VERR_BUFFER_OVERFLOW asked for, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[int] = []
        self.asked: list[int] = []

    def _enum_props(self, call: HgcmCallHandle) -> int:
        out, size = call.params[1], call.params[2]
        assert isinstance(out, HostBuffer)
        assert isinstance(size, HostU32)
        self.sent.append(len(out.data))
        self.host_set(f"/Busy/{len(self.sent)}", "v" * 100)
        status = super()._enum_props(call)
        if status == VERR_BUFFER_OVERFLOW:
            self.asked.append(size.value)
        return status


class _NotificationService(GuestPropertyService):
    """Answers every GET_NOTIFICATION at once with ``data`` for a change stamped 12345."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = data

    def _get_notification(self, call: HgcmCallHandle) -> int:
        stamp, out, size = call.params[1], call.params[2], call.params[3]
        assert isinstance(stamp, HostU64)
        assert isinstance(out, HostBuffer)
        assert isinstance(size, HostU32)
        stamp.value = 12345
        out.data[: len(self._data)] = self._data
        size.value = len(self._data)
        return VINF_SUCCESS


class _EndingService(_ListingService):
    """Holds no property and ends the first ``ended`` waits at once with ``status`` (stamp
    0, a size of 100), then parks them as the service does."""

    def __init__(self, status: int, ended: int) -> None:
        super().__init__(ENUM_TERMINATOR)
        self._status = status
        self._ended = ended
        self.waits = 0

    def _get_notification(self, call: HgcmCallHandle) -> int | None:
        self.waits += 1
        if self.waits > self._ended:
            return super()._get_notification(call)
        stamp, size = call.params[1], call.params[3]
        assert isinstance(stamp, HostU64)
        assert isinstance(size, HostU32)
        stamp.value, size.value = 0, 100
        return self._status


class TestOddReplies:
    """A host's reply that breaks the format is a protocol error naming the field."""

    @pytest.mark.parametrize("digits", [21, 5000])
    async def test_a_timestamp_beyond_64_bits(
        self, autojump_clock: trio.abc.Clock, digits: int
    ) -> None:
        """A timestamp of 5000 digits raised Python's ValueError for long integer strings,
        which ``vbox-agent prop enum`` reported as a usage error (exit 64)."""
        with trio.fail_after(60):
            listing = b"/T/x\0v\0" + b"9" * digits + b"\0\0" + b"\0" * 4
            async with _props_on(_ListingService(listing)) as (_, props):
                with pytest.raises(RemoteProtocolError, match="is not a decimal u64"):
                    await props.enumerate()

    @pytest.mark.parametrize("end", [b"\0garbage\0\0\0", b"\0\0\0RDONLYGUEST\0", b"/T/y\0\0\0\0"])
    async def test_a_list_end_with_fields(self, autojump_clock: trio.abc.Clock, end: bytes) -> None:
        """The entry without a timestamp that ends the list must have empty fields, as
        upstream's VbglR3GuestPropEnumNext checks (VERR_PARSE_ERROR). (It was accepted.)"""
        with trio.fail_after(60):
            async with _props_on(_ListingService(b"/T/x\0v\x005\0\0" + end)) as (_, props):
                with pytest.raises(RemoteProtocolError, match="without a timestamp, which ends"):
                    await props.enumerate()

    async def test_an_entry_with_an_empty_name_is_a_property(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """An entry with an empty name and a timestamp is a property named "" (a guest may
        set one), not the end of the list, which alone has no timestamp. (It was read as an
        end with fields: every listing failed while such a property stood.)"""
        listing = b"\0boom\x0077\0RDONLYGUEST\0/T/x\0v\x005\0\0" + ENUM_TERMINATOR
        with trio.fail_after(60):
            async with _props_on(_ListingService(listing)) as (_, props):
                listed = await props.enumerate()
        assert [(p.name, p.value, p.flags, p.timestamp) for p in listed] == [
            ("", "boom", "RDONLYGUEST", 77),
            ("/T/x", "v", "", 5),
        ]

    @pytest.mark.parametrize("status", [VERR_INTERRUPTED, VERR_BUFFER_OVERFLOW])
    async def test_a_host_ending_every_wait(
        self, autojump_clock: trio.abc.Clock, status: int
    ) -> None:
        """A host that ends every wait at once without a change (VERR_INTERRUPTED, or
        VERR_BUFFER_OVERFLOW for the next new change) makes the watch give up after
        FRUITLESS_WAITS of them, naming the status. (``next()`` asked again at full CPU,
        forever.)"""
        service = _EndingService(status, FRUITLESS_WAITS)
        with trio.fail_after(60):
            async with _props_on(service) as (_, props):
                with pytest.raises(RemoteProtocolError, match=f"in a row .* {status_name(status)}"):
                    await props.wait(["/W/*"])
        assert service.waits == FRUITLESS_WAITS

    async def test_a_host_ending_some_waits(self, autojump_clock: trio.abc.Clock) -> None:
        """Fewer endings in a row than the limit are followed through to the change."""
        service = _EndingService(VERR_INTERRUPTED, FRUITLESS_WAITS - 1)
        got: list[PropertyChange] = []

        async def wait(props: GuestProperties) -> None:
            got.append(await props.wait(["/W/*"]))

        with trio.fail_after(60):
            async with _props_on(service) as (host, props), trio.open_nursery() as nursery:
                nursery.start_soon(wait, props)
                await trio.testing.wait_all_tasks_blocked()
                host.prop_set("/W/a", "1")
        assert [(change.name, change.value) for change in got] == [("/W/a", "1")]
        assert service.waits == FRUITLESS_WAITS

    @pytest.mark.parametrize("deleted", [b"junk", b"01", b"2", b"1 "])
    async def test_a_deleted_flag_other_than_0_or_1(
        self, autojump_clock: trio.abc.Clock, deleted: bytes
    ) -> None:
        """A change whose deleted field is neither empty nor '0' or '1' is refused, as
        upstream's VbglR3GuestPropWait does (VERR_PARSE_ERROR). (It was taken as a set.)"""
        service = _NotificationService(b"/W/x\0v\0\0" + deleted + b"\0")
        with trio.fail_after(60):
            async with _props_on(service) as (_, props):
                with pytest.raises(RemoteProtocolError, match=r"deleted flag .* is not '0' or '1'"):
                    await props.wait(["/W/*"])

    @pytest.mark.parametrize(
        ("data", "value", "deleted"),
        [
            (b"/W/x\0v\0\0" + b"0\0", "v", False),
            (b"/W/x\0v\0\0" + b"1\0", "", True),
            (b"/W/x\0v\0\0" + b"\0", "v", False),
            (b"/W/x\0v\0\0", "v", False),
        ],
        ids=["0", "1", "empty", "absent"],
    )
    async def test_a_deleted_flag_of_0_1_empty_or_absent(
        self, autojump_clock: trio.abc.Clock, data: bytes, value: str, deleted: bool
    ) -> None:
        """'1' is a delete; '0', an empty field or none (a host older than the field) a set
        with its value, as upstream's VbglR3GuestPropWait reads them."""
        service = _NotificationService(data)
        with trio.fail_after(60):
            async with _props_on(service) as (_, props), props.watch(["/W/*"]) as watch:
                change = await watch.next()
        assert (change.value, change.deleted) == (value, deleted)


async def _wait_once(props: GuestProperties) -> None:
    """A watch's first wait (a host that answers it at once)."""
    async with props.watch(["/W/*"]) as watch:
        await watch.next()


_OVERFLOW_CALLS: Final[dict[GuestFunction, Callable[[GuestProperties], Awaitable[object]]]] = {
    GuestFunction.GET_PROP: lambda props: props.get("/W/x"),
    GuestFunction.ENUM_PROPS: lambda props: props.enumerate(),
    GuestFunction.GET_NOTIFICATION: _wait_once,
}
"""A call of each function that may be answered VERR_BUFFER_OVERFLOW."""


class TestSizesAskedFor:
    """The size a VERR_BUFFER_OVERFLOW reply asks for is the host's to fill: one that no
    service can need is a malformed reply, and no call is made with it."""

    @pytest.mark.parametrize("function", list(_OVERFLOW_CALLS), ids=lambda f: f.name)
    @pytest.mark.parametrize("asked", [0x7FFF_FFFF, HGCM_MAX_USER_PARM + 1])
    async def test_a_size_no_hgcm_buffer_carries(
        self, autojump_clock: trio.abc.Clock, function: GuestFunction, asked: int
    ) -> None:
        """A size over the 24 MiB one HGCM buffer carries through either driver raised the
        channel's HgcmLimitError, a local error, which ends the daemon. (Found by review:
        ENUM_PROPS answered with 0x7FFFFFFF ended the agent at once.)"""
        service = OverflowAsking(function, lambda _: asked)
        with trio.fail_after(60):
            async with _props_on(service) as (_, props):
                with pytest.raises(HgcmSizeError) as info:
                    await _OVERFLOW_CALLS[function](props)
        assert str(info.value) == (
            f"{function.name}: the host answered VERR_BUFFER_OVERFLOW asking for a "
            f"{asked}-byte buffer, over the {HGCM_MAX_USER_PARM} bytes one HGCM buffer carries"
        )
        assert len(service.sent) == 1

    @pytest.mark.parametrize("function", list(_OVERFLOW_CALLS), ids=lambda f: f.name)
    @pytest.mark.parametrize("shortfall", [0, 1, None], ids=["same", "smaller", "zero"])
    async def test_a_size_the_buffer_already_had(
        self, autojump_clock: trio.abc.Clock, function: GuestFunction, shortfall: int | None
    ) -> None:
        """The service reports an overflow only for a buffer smaller than the size it needs:
        asking for no more than was sent is malformed at once. (The call was repeated with
        it until the retries ran out, or a size of 0 read as the host's refusal.)"""
        service = OverflowAsking(
            function, lambda sent: 0 if shortfall is None else sent - shortfall
        )
        with trio.fail_after(60):
            async with _props_on(service) as (_, props):
                with pytest.raises(
                    HgcmSizeError, match=r"no more than the \d+-byte buffer it was given"
                ):
                    await _OVERFLOW_CALLS[function](props)
        assert len(service.sent) == 1

    async def test_a_get_asking_for_more_every_time_is_given_up(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A host asking for a larger GET_PROP buffer at every try is asked SIZE_RETRIES
        times: no race grows one value."""
        service = OverflowAsking(GuestFunction.GET_PROP, lambda sent: sent + 1, times=100)
        with trio.fail_after(60):
            async with _props_on(service) as (_, props):
                with pytest.raises(HgcmSizeError, match=f"{SIZE_RETRIES} times in a row"):
                    await props.get("/W/x")
        assert len(service.sent) == SIZE_RETRIES

    async def test_a_list_that_grows_while_it_is_listed(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Properties added between two ENUM_PROPS fit the next call's spare room (it asked
        exactly the size the host reported, four times, then failed as a malformed reply)."""
        service = _GrowingByOne()
        with trio.fail_after(60):
            async with _props_on(service) as (host, props):
                for index in range(40):  # about 5 KiB: more than the first buffer holds
                    host.prop_set(f"/Pre/{index}", "x" * 100)
                listed = await props.enumerate()
        assert service.sent[1:] == [service.asked[0] + ENUM_SPARE_ROOM]
        assert [prop.name for prop in listed] == [name for name, *_ in service.host_enumerate()]
        assert "/Busy/2" in {prop.name for prop in listed}

    async def test_properties_outgrowing_every_buffer_are_given_up(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A list that outgrows even the spare room at every try is asked ENUM_TRIES times,
        then said to have kept growing: no malformed reply."""
        service = OverflowAsking(GuestFunction.ENUM_PROPS, lambda sent: sent + 1, times=100)
        with trio.fail_after(60):
            async with _props_on(service) as (_, props):
                with pytest.raises(PropertiesGrowingError) as info:
                    await props.enumerate()
        assert service.sent == [
            ENUM_BUFFER_SIZE + n * (1 + ENUM_SPARE_ROOM) for n in range(ENUM_TRIES)
        ]
        assert str(info.value) == (
            "ENUM_PROPS: the host's properties kept growing while they were listed: "
            f"{ENUM_TRIES} tries in a row outgrew the buffer (the last asked for "
            f"{service.sent[-1] + 1} bytes)"
        )

    async def test_a_size_past_the_property_limits_is_asked_for(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A size over what 256 properties at their limits take (about 286 KiB) is used:
        the properties a host loads from the VM's settings at power-on are held to none of
        the service's limits, so only what one HGCM buffer carries bounds the size."""
        asked = 1 << 20
        service = OverflowAsking(GuestFunction.ENUM_PROPS, lambda _: asked)
        with trio.fail_after(60):
            async with _props_on(service) as (host, props):
                host.prop_set("/Big/a", "1")
                assert [prop.name for prop in await props.enumerate(["/Big/*"])] == ["/Big/a"]
        assert service.sent == [ENUM_BUFFER_SIZE, asked + ENUM_SPARE_ROOM]

    @pytest.mark.parametrize("personality", ["mainline", "oracle", "passthrough"])
    async def test_a_size_whose_request_spans_pages(
        self, autojump_clock: trio.abc.Clock, personality: str
    ) -> None:
        """A 2 MiB size is asked for and listed: its buffer's page list (513 pages) makes
        the VMMDev request longer than a page, which VMMDev reads back rather than maps,
        and whose header keeps VMMDev's VINF_HGCM_ASYNC_EXECUTE as on the mapped path."""
        asked = 2 << 20
        service = OverflowAsking(GuestFunction.ENUM_PROPS, lambda _: asked)
        with trio.fail_after(60):
            async with _props_on(service, personality) as (host, props):
                host.prop_set("/Big/a", "1")
                assert [prop.name for prop in await props.enumerate(["/Big/*"])] == ["/Big/a"]
        assert service.sent == [ENUM_BUFFER_SIZE, asked + ENUM_SPARE_ROOM]

    async def test_the_spare_room_stops_at_what_one_hgcm_buffer_carries(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A size within the spare room of the 24 MiB one HGCM buffer carries is asked for
        with that buffer, not a larger one (the channel refuses that as a local error, which
        ends the daemon), whatever the host answers then."""
        service = OverflowAsking(GuestFunction.ENUM_PROPS, lambda _: HGCM_MAX_USER_PARM - 1)
        with trio.fail_after(60):
            async with _props_on(service) as (_, props):
                with contextlib.suppress(*HOST_ERRORS):
                    await props.enumerate()
        assert service.sent == [ENUM_BUFFER_SIZE, HGCM_MAX_USER_PARM]


async def _set_empty_name(props: GuestProperties, value: bytes) -> None:
    """Set the property named "" as any guest process may: with a two-byte name buffer,
    which the service takes (``GuestPropValidateName`` checks the buffer's size, 2..64)."""
    await _set_raw(props, b"\0", value)


async def _set_raw(props: GuestProperties, name: bytes, value: bytes) -> None:
    """Set ``name`` to ``value`` as any guest process may, with bytes the client would
    not send of its own accord."""
    reply = await props.channel.call(
        GuestFunction.SET_PROP_VALUE, HgcmBufferIn(name + b"\0"), HgcmBufferIn(value + b"\0")
    )
    assert reply.status == VINF_SUCCESS


BEYOND_UNICODE: Final = (b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80")
"""U+110000 and U+140000 in four bytes: IPRT takes them, Python's decoder does not."""


class TestWatch:
    async def test_wait_returns_the_next_matching_change(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A wait ignores other names and returns the matching change with its timestamp."""
        got: list[PropertyChange] = []

        async def wait() -> None:
            got.append(await props.wait(["/Guest/want*"]))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                host.prop_set("/Guest/other", "x")
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                host.prop_set("/Guest/wanted", "yes", "TRANSIENT")
        stored = host.prop_get("/Guest/wanted")
        assert stored is not None
        assert got == [PropertyChange("/Guest/wanted", "yes", "TRANSIENT", stored[2], False)]
        assert host.status()["hgcm_clients"] == 1  # the wait's channel is gone

    async def test_a_wait_takes_a_pattern_list_enum_props_would_not(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A wait's ``|``-separated list over 1023 bytes is sent and matched: the service
        checks no length of GET_NOTIFICATION's patterns, only of ENUM_PROPS', and the
        snapshot matches its listing here. (It was refused, as the snapshot sent the same
        list through ENUM_PROPS.)"""
        names = [f"/VirtualBox/GuestInfo/Net/{index}/V4/IP/waiting" for index in range(30)]
        patterns = ["|".join(names)]  # one ``prop wait`` PATTERN of alternatives
        assert len(patterns[0].encode()) > 1023
        host.prop_set(names[3], "before")
        host.prop_set("/Other", "x")
        got: list[PropertyChange] = []

        async def wait() -> None:
            got.append(await props.wait(patterns))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                host.prop_set("/Other", "y")
                host.prop_set(names[7], "10.0.2.15")
        assert [(change.name, change.value) for change in got] == [(names[7], "10.0.2.15")]

    async def test_text_python_cannot_decode_is_kept_byte_for_byte(
        self, autojump_clock: trio.abc.Clock, props: GuestProperties
    ) -> None:
        """Names and values the host holds with bytes Python cannot decode come back with
        those bytes (surrogate escapes), so two names the host holds apart stay apart. (They
        were decoded with U+FFFD for each: both names became '/w/\\ufffd\\ufffd\\ufffd\\ufffd'.)"""
        names = [b"/w/" + raw for raw in BEYOND_UNICODE]
        with trio.fail_after(60):
            for index, name in enumerate(names):
                await _set_raw(props, name, b"v" + BEYOND_UNICODE[index])
            listed = await props.enumerate(["/w/*"])
            await _set_raw(props, b"/w/value", b"v" + BEYOND_UNICODE[0])
            value = await props.get("/w/value")
        assert [(host_bytes(prop.name), host_bytes(prop.value)) for prop in listed] == [
            (name, b"v" + raw) for name, raw in zip(names, BEYOND_UNICODE, strict=True)
        ]
        assert value is not None
        assert host_bytes(value.value) == b"v" + BEYOND_UNICODE[0]

    async def test_a_property_named_empty_is_no_other_patterns_concern(
        self, autojump_clock: trio.abc.Clock, props: GuestProperties
    ) -> None:
        """A property named "" is listed, and a watch whose patterns do not match "" (as the
        host matches them) follows its own names. (Its listing entry was read as a malformed
        end of the list: every snapshot, and so every wait, failed while it stood.)"""
        with trio.fail_after(60):
            await _set_empty_name(props, b"boom")
            listed = await props.enumerate()
            assert [prop.value for prop in listed if not prop.name] == ["boom"]
            assert await props.enumerate(["/w/*"]) == []
            async with props.watch(["/w/*"]) as watch:
                await props.set("/w/a", "1")
                change = await watch.next()
        assert (change.name, change.value) == ("/w/a", "1")

    @pytest.mark.parametrize("unseen_deletes", [True, False])
    async def test_names_that_came_and_went_are_not_kept_for_ever(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        props: GuestProperties,
        unseen_deletes: bool,
    ) -> None:
        """A watch that follows properties coming and going under ever new names (a host
        tool's per-session names) keeps what it knows of gone names to the host queue's
        depth: 3 000 names set and deleted leave it knowing as little as 1 000 did. (It
        kept one entry per name ever deleted.)"""
        known_after: list[int] = []

        async def churn(watch: PropertyWatch, names: range) -> None:
            for index in names:
                name = f"/VirtualBox/HostInfo/Session/{index}"
                host.prop_set(name, "up")
                assert (await watch.next()).name == name
                host.prop_delete(name)
                change = await watch.next()
                assert (change.name, change.deleted) == (name, True)

        with trio.fail_after(600):
            async with props.watch(
                ["/VirtualBox/HostInfo/*"], unseen_deletes=unseen_deletes
            ) as watch:
                for start in (0, 1000, 2000):
                    await churn(watch, range(start, start + 1000))
                    known_after.append(len(watch._known) + len(watch._gone))
        # the properties the host has under the pattern, and the names gone of late
        assert known_after[0] < 1000
        assert known_after == [known_after[0]] * 3

    async def test_watch_reports_in_order_with_deletes(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """Changes arrive oldest first with rising timestamps, deletes marked."""
        changes = []
        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch:
                await props.set("/W/a", "1")
                changes.append(await watch.next())
                await props.set("/W/b", "2", "TRANSIENT")
                changes.append(await watch.next())
                await props.delete("/W/a")
                changes.append(await watch.next())
        assert [(c.name, c.value, c.flags, c.deleted) for c in changes] == [
            ("/W/a", "1", "", False),
            ("/W/b", "2", "TRANSIENT", False),
            ("/W/a", "", "", True),
        ]
        assert changes[0].timestamp < changes[1].timestamp < changes[2].timestamp

    async def test_catching_up_reports_a_set_since_deleted_as_a_delete(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """Changes made before the watch reads them come from the host's queue in order; the
        host marks a set as a delete when the property is gone by then (upstream does)."""
        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch:
                await props.set("/W/a", "1")
                await props.set("/W/b", "2")
                await props.delete("/W/a")
                await props.set("/W/c", "3")
                changes = [await watch.next() for _ in range(3)]
        assert [(c.name, c.value, c.deleted) for c in changes] == [
            ("/W/a", "", True),
            ("/W/b", "2", False),
            ("/W/c", "3", False),
        ]

    async def test_changes_before_the_watch_opened_are_not_reported(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """The watch starts at the host's newest change; older ones stay unreported."""
        with trio.fail_after(60):
            await props.set("/W/old", "1")
            await props.delete("/W/old")
            await props.set("/W/kept", "1")
            async with props.watch(["/W/*"]) as watch:
                await props.set("/W/new", "2")
                assert (await watch.next()).name == "/W/new"

    async def test_wait_skips_a_delete_made_before_it_began(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A property set and deleted after the newest one still standing, all before the
        wait began, is not reported as the wait's change (it returned at once before)."""
        with trio.fail_after(60):
            host.prop_set("/W/kept", "1")
            host.prop_set("/W/gone", "1")
            host.prop_delete("/W/gone")
            got: list[PropertyChange] = []

            async def wait() -> None:
                got.append(await props.wait(["/W/*"]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                host.prop_set("/W/new", "2")
        assert [(change.name, change.value, change.deleted) for change in got] == [
            ("/W/new", "2", False)
        ]

    async def test_wait_reports_the_delete_of_a_property_it_saw(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A property standing when the wait began is reported when deleted."""
        with trio.fail_after(60):
            host.prop_set("/W/old", "1")
            got: list[PropertyChange] = []

            async def wait() -> None:
                got.append(await props.wait(["/W/*"]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                host.prop_delete("/W/old")
        assert [(change.name, change.deleted) for change in got] == [("/W/old", True)]

    async def test_watch_follows_a_restore(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A restore re-sends the pending wait to a service that no longer knows the last
        timestamp seen: at the next matching change the host answers VWRN_NOT_FOUND, and the
        watch reports what changed meanwhile (from an enumeration), deletes included."""
        send, receive = trio.open_memory_channel[PropertyChange](16)

        async def follow(watch: PropertyWatch) -> None:
            async for change in watch:
                await send.send(change)

        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch, trio.open_nursery() as nursery:
                nursery.start_soon(follow, watch)
                await props.set("/W/gone", "x")
                assert (await receive.receive()).name == "/W/gone"
                await trio.testing.wait_all_tasks_blocked()
                host.restore()
                host.prop_delete("/W/gone")  # completes the re-sent wait: VWRN_NOT_FOUND
                host.prop_set("/W/b", "meanwhile")
                host.prop_set("/W/c", "after")
                seen = [await receive.receive() for _ in range(3)]
                await trio.testing.wait_all_tasks_blocked()
                assert receive.statistics().current_buffer_used == 0
                nursery.cancel_scope.cancel()
        assert {(c.name, c.value, c.deleted) for c in seen} == {
            ("/W/gone", "", True),
            ("/W/b", "meanwhile", False),
            ("/W/c", "after", False),
        }
        assert seen[-1].name == "/W/c"
        assert watch.resyncs == 1

    async def test_restore_then_delete_and_set_again_in_order(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """After a restore, a delete that completes the re-sent wait (VWRN_NOT_FOUND) and a
        set of the same name before the watch reads it: the delete is reported, then the
        new value the enumeration shows, each once (not the stale delete after the set)."""
        send, receive = trio.open_memory_channel[PropertyChange](16)

        async def follow(watch: PropertyWatch) -> None:
            async for change in watch:
                await send.send(change)

        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch, trio.open_nursery() as nursery:
                nursery.start_soon(follow, watch)
                await props.set("/W/x", "1")
                assert (await receive.receive()).value == "1"
                await trio.testing.wait_all_tasks_blocked()
                host.restore()
                host.prop_delete("/W/x")
                host.prop_set("/W/x", "2")
                seen = [await receive.receive(), await receive.receive()]
                await trio.testing.wait_all_tasks_blocked()
                queued = receive.statistics().current_buffer_used
                seen.extend(receive.receive_nowait() for _ in range(queued))
                nursery.cancel_scope.cancel()
        assert [(c.name, c.value, c.deleted) for c in seen] == [
            ("/W/x", "", True),
            ("/W/x", "2", False),
        ]
        assert host.prop_get("/W/x") is not None

    async def test_missed_delete_of_a_property_known_at_the_start(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A property standing when the watch opened, deleted while the watch was not
        reading and then pushed out of the host's queue by other changes: the resync's
        enumeration finds it gone and the watch reports the delete."""
        host.prop_set("/W/x", "1")
        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch:
                host.prop_delete("/W/x")
                for index in range(MAX_GUEST_NOTIFICATIONS):
                    host.prop_set("/Other/n", str(index))
                host.prop_set("/W/y", "1")
                changes = [await watch.next(), await watch.next()]
        assert {(c.name, c.deleted) for c in changes} == {("/W/x", True), ("/W/y", False)}
        assert watch.resyncs == 1

    async def test_watch_outlives_many_timed_out_waits(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """``next()`` bounded by a timeout, again and again, keeps working: the host sweeps
        each cancelled wait when the watch waits again, so none piles up on either side."""
        with trio.fail_after(600):
            async with props.watch(["/W/*"]) as watch:
                for _ in range(2 * props.channel.max_pending):
                    with trio.move_on_after(1):
                        await watch.next()
                await trio.testing.wait_all_tasks_blocked()
                assert host.status()["hgcm_pending_calls"] == 0
                host.prop_set("/W/a", "1")
                change = await watch.next()
        assert (change.name, change.value) == ("/W/a", "1")

    async def test_a_second_reader_is_refused(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A watch has one reader: a second task's ``next()`` fails at once. (Its wait
        would end the first reader's, an identical wait of the same client, and each
        reader's next wait the other's, endlessly.)"""
        outcome: list[str] = []

        async def second_reader(watch: PropertyWatch) -> None:
            try:
                await watch.next()
            except trio.BusyResourceError as exc:
                outcome.append(str(exc))

        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch, trio.open_nursery() as nursery:
                nursery.start_soon(watch.next)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(second_reader, watch)
                for _ in range(100):  # a livelock never lets the second reader end
                    await trio.lowlevel.checkpoint()
                    if outcome:
                        break
                nursery.cancel_scope.cancel()
        assert outcome == ["another task is already reading this property watch"]

    async def test_closing_the_watch_ends_a_read_in_another_task(
        self, autojump_clock: trio.abc.Clock, props: GuestProperties
    ) -> None:
        """A watch closed while another task waits in ``next()`` ends that wait with
        trio.ClosedResourceError, and a later ``next()`` raises it too: the close's disconnect
        ends the wait at the host (VERR_INTERRUPTED), which the watch does not ask again on the
        channel being closed. (It asked again on the client it had just disconnected, and
        the session refused: "HGCM client 2 is not connected in this session".)"""
        ended: list[str] = []

        async def read(watch: PropertyWatch) -> None:
            with pytest.raises(trio.ClosedResourceError):
                await watch.next()
            ended.append("closed")

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery, props.watch(["/W/*"]) as watch:
                nursery.start_soon(read, watch)
                await trio.testing.wait_all_tasks_blocked()
                waits = watch.channel.calls
            assert ended == ["closed"]
            assert waits == watch.channel.calls  # nothing sent after the close
            with pytest.raises(trio.ClosedResourceError):
                await watch.next()

    async def test_long_value_overflows_then_fits(self, autojump_clock: trio.abc.Clock) -> None:
        """A change larger than the buffer is fetched again with the size the host asks."""
        service = GuestPropertyService(max_value_size=4096)
        with trio.fail_after(60):
            async with _props_on(service) as (host, props), props.watch(["/W/*"]) as watch:
                await props.set("/W/first", "x")
                assert (await watch.next()).value == "x"
                host.prop_set("/W/long", "L" * 3000)
                change = await watch.next()
                assert (change.name, len(change.value)) == ("/W/long", 3000)
                got = await props.get("/W/long")
                assert got is not None
                assert got.value == "L" * 3000


class TestWaitEndings:
    """How the host ends a GET_NOTIFICATION early, seen through a raw channel."""

    @staticmethod
    def _wait_params(patterns: bytes) -> tuple[HgcmParam, ...]:
        return (HgcmBufferIn(patterns + b"\0"), HgcmU64(0), HgcmBufferOut(256), HgcmU32(0))

    async def test_newer_identical_wait_interrupts_the_older(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """The same client waiting again with the same patterns ends the first wait with
        VERR_INTERRUPTED; a wait with other patterns stays."""
        errors: list[str] = []

        async def wait(channel: HgcmChannel, patterns: bytes) -> None:
            try:
                await channel.call(GuestFunction.GET_NOTIFICATION, *self._wait_params(patterns))
            except HgcmCallError as exc:
                errors.append(f"{patterns.decode()} {exc.name}")

        with trio.fail_after(60):
            async with (
                open_device(SimOpener(host)) as device,
                open_hgcm_channel(device, SERVICE_NAME) as channel,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(wait, channel, b"/A/*")
                nursery.start_soon(wait, channel, b"/B/*")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(wait, channel, b"/A/*")
                await trio.testing.wait_all_tasks_blocked()
                assert errors == ["/A/* VERR_INTERRUPTED"]
                assert host.status()["hgcm_pending_calls"] == 2
                host.prop_set("/B/x", "1")
                host.prop_set("/A/x", "1")
        assert errors == ["/A/* VERR_INTERRUPTED"]

    async def test_disconnect_ends_the_waits(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """Cancelling a block with waits pending disconnects its client: nothing stays."""
        with trio.fail_after(60):
            async with open_device(SimOpener(host)) as device:
                with trio.CancelScope() as block:
                    async with (
                        open_hgcm_channel(device, SERVICE_NAME) as channel,
                        trio.open_nursery() as nursery,
                    ):
                        for patterns in (b"/A", b"/B", b"/C"):
                            nursery.start_soon(
                                channel.call,
                                GuestFunction.GET_NOTIFICATION,
                                *self._wait_params(patterns),
                            )
                        await trio.testing.wait_all_tasks_blocked()
                        assert host.status()["hgcm_pending_calls"] == 3
                        block.cancel()
                assert block.cancelled_caught
                assert host.status()["hgcm_pending_calls"] == 0
                assert host.status()["hgcm_clients"] == 0


class _ChangesDuringTheSnapshot(GuestPropertyService):
    """Sets ``/W/x`` right after answering the first ENUM_PROPS: a change made while a
    watch starts, after its snapshot's listing and before its first wait."""

    def __init__(self) -> None:
        super().__init__()
        self.enumerations = 0

    def _enum_props(self, call: HgcmCallHandle) -> int:
        status = super()._enum_props(call)
        self.enumerations += 1
        if self.enumerations == 1:
            self.host_set("/W/x", "new")
        return status


class _Clock:
    """The host's wall clock in ns, set by the test."""

    def __init__(self) -> None:
        self.now = 1_000 * 10**9

    def __call__(self) -> int:
        return self.now


async def _follow(watch: PropertyWatch, send: trio.MemorySendChannel[PropertyChange]) -> None:
    async for change in watch:
        await send.send(change)


class TestWatchRobustness:
    async def test_a_set_while_a_wait_starts_is_its_change(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A property set after the wait's listing, before its first GET_NOTIFICATION, is
        the change it returns, as a VBoxControl wait returns every set made after it.
        (Its snapshot listed twice, and a set between the two was skipped: the wait hung.)"""
        service = _ChangesDuringTheSnapshot()
        with trio.fail_after(60):
            async with _props_on(service) as (_, props):
                change = await props.wait(["/W/*"])
        assert service.enumerations == 1
        assert (change.name, change.value, change.deleted) == ("/W/x", "new", False)

    async def test_a_change_during_the_snapshot_is_known(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A property set while the watch starts, after its listing, is reported, then its
        delete. (Its snapshot listed twice, the matching names before the newest timestamp,
        and a set between the two was in neither: a wait for the delete hung.)"""
        service = _ChangesDuringTheSnapshot()
        with trio.fail_after(60):
            async with _props_on(service) as (host, props), props.watch(["/W/*"]) as watch:
                assert service.enumerations == 1
                first = await watch.next()
                host.prop_delete("/W/x")
                second = await watch.next()
        assert [(c.name, c.value, c.deleted) for c in (first, second)] == [
            ("/W/x", "new", False),
            ("/W/x", "", True),
        ]

    async def test_a_clock_going_back_loses_no_change(self, autojump_clock: trio.abc.Clock) -> None:
        """The host's timestamps follow its clock back, and a restored service counts from
        that clock again: every change still comes, once. (Changes older than the newest
        the watch had seen were dropped until the clock passed it again.)"""
        clock = _Clock()
        send, receive = trio.open_memory_channel[PropertyChange](16)
        with trio.fail_after(60):
            async with (
                _props_on(GuestPropertyService(clock=clock)) as (host, props),
                props.watch(["/W/*"]) as watch,
                trio.open_nursery() as following,
            ):
                following.start_soon(_follow, watch, send)
                seen = []
                clock.now += 10**9
                host.prop_set("/W/x", "1")
                seen.append(await receive.receive())
                clock.now -= 10 * 10**9  # the clock goes back
                host.prop_set("/W/x", "2")
                seen.append(await receive.receive())
                await trio.testing.wait_all_tasks_blocked()
                clock.now -= 100 * 10**9  # restored on a host whose clock is behind
                host.restore()
                for value in ("3", "4"):
                    clock.now += 10**9
                    host.prop_set("/W/x", value)
                    seen.append(await receive.receive())
                clock.now += 10**9
                host.prop_set("/W/y", "new")
                seen.append(await receive.receive())
                await trio.testing.wait_all_tasks_blocked()
                assert receive.statistics().current_buffer_used == 0
                following.cancel_scope.cancel()
        assert [(change.name, change.value) for change in seen] == [
            ("/W/x", "1"),
            ("/W/x", "2"),
            ("/W/x", "3"),
            ("/W/x", "4"),
            ("/W/y", "new"),
        ]

    async def test_a_watch_reconnects_when_the_host_drops_its_client(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """The host forgets the watch's client: the watch closes that channel, connects a
        new one and goes on; no session is left open and the block exits cleanly. (The old
        channel stayed open until the block ended, whose disconnect then raised
        VERR_HGCM_INVALID_CLIENT_ID, losing the change.)"""
        send, receive = trio.open_memory_channel[PropertyChange](16)
        with trio.fail_after(60):
            async with open_guest_properties(device) as props:
                async with props.watch(["/W/*"]) as watch, trio.open_nursery() as following:
                    following.start_soon(_follow, watch, send)
                    await trio.testing.wait_all_tasks_blocked()
                    sessions = device.statistics().open_sessions
                    dropped = watch.channel.client_id
                    host.vmmdev.hgcm.drop_client(dropped)
                    await trio.testing.wait_all_tasks_blocked()
                    assert watch.channel.client_id != dropped
                    assert device.statistics().open_sessions == sessions
                    assert host.status()["hgcm_clients"] == 2
                    host.prop_set("/W/a", "1")
                    change = await receive.receive()
                    following.cancel_scope.cancel()
                assert watch.resyncs == 1
                assert host.status()["hgcm_clients"] == 1
        assert (change.name, change.value) == ("/W/a", "1")
        assert device.statistics().open_sessions == 1

    @pytest.mark.parametrize("connect_delay_s", [5.0, 60.0], ids=["connects", "times-out"])
    async def test_a_watch_closed_while_it_reconnects_leaves_no_channel(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        device: Device,
        connect_delay_s: float,
    ) -> None:
        """A watch closed while its reader connects a new channel (the host dropped the
        client, and is slow to connect) closes that channel once it is connected, and the
        read ends with trio.ClosedResourceError; so does a connect that fails after the
        close (the host answers it after HGCM_CONNECT_TIMEOUT_S). (The reader swapped the
        channel in after the close and went on reading through it: a session nobody
        closed, a reader that never ended; a failed connect ended it with the host's
        VERR_TIMEOUT.)"""
        ended: list[str] = []

        async def read(watch: PropertyWatch) -> None:
            with pytest.raises(trio.ClosedResourceError):
                await watch.next()
            ended.append("closed")

        with trio.fail_after(60):
            async with open_guest_properties(device) as props:
                sessions = device.statistics().open_sessions
                async with trio.open_nursery() as nursery, props.watch(["/W/*"]) as watch:
                    nursery.start_soon(read, watch)
                    await trio.testing.wait_all_tasks_blocked()
                    host.set_delay(RequestType.HGCM_CONNECT, connect_delay_s)
                    host.vmmdev.hgcm.drop_client(watch.channel.client_id)
                    await trio.testing.wait_all_tasks_blocked()  # the reader is connecting
                assert ended == ["closed"]
                assert device.statistics().open_sessions == sessions
                assert host.status()["hgcm_clients"] == 1

    async def test_a_wait_goes_on_when_the_host_drops_every_client(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """With the short calls' client gone too, a wait's resync goes through its own new
        channel and returns the change; closing the dead short-call channel succeeds."""
        got: list[PropertyChange] = []
        with trio.fail_after(60):
            async with open_guest_properties(device) as props:
                async with trio.open_nursery() as nursery:

                    async def wait() -> None:
                        got.append(await props.wait(["/W/*"]))

                    nursery.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    for client_id in (props.channel.client_id, props.channel.client_id + 1):
                        host.vmmdev.hgcm.drop_client(client_id)
                    await trio.testing.wait_all_tasks_blocked()
                    host.prop_set("/W/a", "1")
                with pytest.raises(HgcmCallError, match="VERR_HGCM_INVALID_CLIENT_ID"):
                    await props.get("/W/a")
        assert [(change.name, change.value) for change in got] == [("/W/a", "1")]
        assert host.status()["hgcm_clients"] == 0
        assert device.statistics().open_sessions == 1


@asynccontextmanager
async def _props_on(
    service: GuestPropertyService, personality: str = "mainline"
) -> AsyncIterator[tuple[SimulatedHost, GuestProperties]]:
    """A simulated host (driver ``personality``) with ``service``, and a property client of it."""
    host = SimulatedHost(services=[service], personality=personality)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        async with open_device(SimOpener(host)) as device, open_guest_properties(device) as props:
            yield host, props
        nursery.cancel_scope.cancel()


class _DropDuringEnumeration(GuestPropertyService):
    """Drops the calling client while answering the next ENUM_PROPS once ``drop`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.drop: SimulatedHost | None = None

    def _enum_props(self, call: HgcmCallHandle) -> int:
        if self.drop is not None:
            self.drop.vmmdev.hgcm.drop_client(call.client_id)
            self.drop = None
        return super()._enum_props(call)


class TestWatchNews:
    async def test_a_set_to_the_same_value_is_news(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A host poking a trigger property with the value it has queues a change, which a
        wait returns, as VBoxControl's does. (The watch compared contents and dropped it.)"""
        host.prop_set("/W/trigger", "go")
        got: list[PropertyChange] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    got.append(await props.wait(["/W/*"]))

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                host.prop_set("/W/trigger", "go")
        assert [(change.name, change.value) for change in got] == [("/W/trigger", "go")]

    async def test_a_watch_reports_every_set_of_the_same_value(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """Each queued set is a change, also one read after the watch went on from it."""
        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch:
                host.prop_set("/W/a", "1")
                host.prop_set("/W/a", "1")
                host.prop_set("/W/a", "1")
                got = [(await watch.next()).value for _ in range(3)]
        assert got == ["1", "1", "1"]

    async def test_a_restore_under_a_parked_wait_loses_no_change(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A wait parked across a restore completes (VWRN_NOT_FOUND) with a new change: the
        wait returns it though the property went back to its old value at once. (The
        answer was dropped and the snapshot showed the old value: the wait hung.)"""
        clock = _Clock()
        got: list[PropertyChange] = []
        with trio.fail_after(60):
            async with _props_on(GuestPropertyService(clock=clock)) as (host, props):
                host.prop_set("/W/a", "1")
                async with trio.open_nursery() as nursery:

                    async def wait() -> None:
                        got.append(await props.wait(["/W/*"]))

                    nursery.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    clock.now += 10**9
                    host.restore()
                    clock.now += 10**9
                    host.prop_set("/W/a", "2")
                    host.prop_set("/W/a", "1")
        assert [(change.name, change.value) for change in got] == [("/W/a", "2")]

    async def test_a_burst_before_the_first_wait_loses_no_change(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """More than 256 changes between the snapshot and the first wait: the oldest change
        the host holds is news when it is newer than the snapshot's."""
        host.prop_set("/W/a", "1")
        with trio.fail_after(60):
            async with props.watch(["/W/*"], unseen_deletes=False) as watch:
                for index in range(300):
                    host.prop_set("/Other/n", str(index))
                host.prop_set("/W/a", "2")
                host.prop_set("/W/a", "1")
                change = await watch.next()
        assert (change.name, change.value) == ("/W/a", "2")

    @pytest.mark.parametrize("restore", [True, False], ids=["restore", "burst"])
    async def test_a_resync_reports_no_older_value_after_a_newer(
        self, autojump_clock: trio.abc.Clock, restore: bool
    ) -> None:
        """After missed changes the queue is replayed from its oldest change: one older than
        what the snapshot showed is not reported after it. (The watch reported 3, 2, 3.)"""
        clock = _Clock()
        got: list[str] = []
        with trio.fail_after(60):
            async with _props_on(GuestPropertyService(clock=clock)) as (host, props):
                host.prop_set("/W/a", "init")
                async with props.watch(["/W/*"]) as watch:
                    if restore:
                        clock.now += 10**9
                        host.restore()
                    else:
                        for index in range(260):
                            clock.now += 1000
                            host.prop_set("/Other/n", str(index))
                    for value in ("1", "2", "3"):
                        clock.now += 10**9
                        host.prop_set("/W/a", value)
                    while not got or got[-1] != "3":
                        got.append((await watch.next()).value)
                    with trio.move_on_after(5):
                        got.append((await watch.next()).value)
                assert watch.resyncs >= 1
        assert got == sorted(set(got))
        assert got[-1] == "3"


class TestWatchMarks:
    @pytest.mark.parametrize("delete", [False, True], ids=["set", "delete"])
    async def test_a_change_stamped_one_past_the_mark_is_news(
        self, autojump_clock: trio.abc.Clock, delete: bool
    ) -> None:
        """On a coarse clock the host stamps a property's next change one past the stamp
        of the last (upstream's getCurrentTimestamp): after a resync that marked the
        property, that change is reported. (It was taken for the marked change, which the
        host may date one later, and skipped: a delete was lost and ``next()`` hung.)"""
        clock = _Clock()  # moved by the test only: else every stamp is the last one + 1
        with trio.fail_after(60):
            async with (
                _props_on(GuestPropertyService(clock=clock)) as (host, props),
                props.watch(["/W/*"]) as watch,
            ):
                clock.now += 10**9  # past the start-up stamps (T, T+1, T+2, ...), then still
                for index in range(MAX_GUEST_NOTIFICATIONS):  # the queue forgets the place
                    host.prop_set("/Other/n", str(index))
                host.prop_set("/W/p", "1")
                first = await watch.next()  # VWRN_NOT_FOUND: a resync marks /W/p
                assert watch.resyncs == 1
                if delete:
                    host.prop_delete("/W/p")
                else:
                    host.prop_set("/W/p", "2")
                second = await watch.next()
        assert (first.value, first.deleted) == ("1", False)
        assert (second.value, second.deleted) == (("", True) if delete else ("2", False))
        assert second.timestamp == first.timestamp + 1

    async def test_a_property_named_empty_is_followed_where_the_patterns_match_it(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A watch whose patterns match "" (``*``) follows the property named "" as any
        other, its change stamped one past the mark too, whose stamp it reads with the
        two-byte name buffer. (The read was refused here as an empty name.)"""
        clock = _Clock()  # moved by the test only: else every stamp is the last one + 1
        with trio.fail_after(60):
            async with _props_on(GuestPropertyService(clock=clock)) as (_, props):
                clock.now += 10**9  # past the start-up stamps, then still
                await _set_empty_name(props, b"1")
                (marked,) = [prop for prop in await props.enumerate() if not prop.name]
                async with props.watch(["*"]) as watch:  # the snapshot marks ""
                    await _set_empty_name(props, b"2")
                    change = await watch.next()
        assert (change.name, change.value, change.deleted) == ("", "2", False)
        assert change.timestamp == marked.timestamp + 1

    @pytest.mark.parametrize("length", [57, 8], ids=["over-63-once-replaced", "short"])
    async def test_a_name_python_cannot_decode_is_read_back_as_the_host_holds_it(
        self, autojump_clock: trio.abc.Clock, length: int
    ) -> None:
        """A marked property whose name holds bytes Python cannot decode has its stamp read
        with the name's bytes as the host holds them, and its change is reported under that
        name. (The name was decoded with a U+FFFD for each byte and read back so: 57 bytes
        became 65, over the limit, and ``next()`` raised PropertyArgumentError, so ``prop
        wait`` exited 64; a shorter one was looked up under a name the host does not hold.)"""
        name = b"/w/" + b"a" * (length - 7) + BEYOND_UNICODE[0]
        assert len(name) == length
        clock = _Clock()  # moved by the test only: else every stamp is the last one + 1
        with trio.fail_after(60):
            async with _props_on(GuestPropertyService(clock=clock)) as (_, props):
                clock.now += 10**9  # past the start-up stamps, then still
                await _set_raw(props, name, b"1")
                async with props.watch(["/w/*"]) as watch:  # the snapshot marks the name
                    await _set_raw(props, name, b"2")  # stamped one past: the stamp is read
                    change = await watch.next()
        assert (host_bytes(change.name), change.value, change.deleted) == (name, "2", False)


class TestWatchOpening:
    async def test_a_change_queued_after_a_newer_stamp_is_not_repeated(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A change made before the watch opened but queued after the newest stamp (one
        stamped lower: upstream's start-up stamps on a coarse clock, or a clock gone back)
        is one the snapshot showed; the property's next change, stamped one higher, is
        news. (The watch, finding the newest stamp in the queue, took every mark up to it
        as passed and reported the old change.)"""
        clock = _Clock()
        with trio.fail_after(60):
            async with _props_on(GuestPropertyService(clock=clock)) as (host, props):
                clock.now += 10**9
                host.prop_set("/Other/a", "1")  # the newest stamp
                clock.now -= 10 * 10**9
                await props.set("/W/p", "1")  # stamped lower, queued after it
                async with props.watch(["/W/*"]) as watch:
                    await props.set("/W/p", "2")  # the clock has not moved: stamped + 1
                    got = [await watch.next()]
                    with trio.move_on_after(5):
                        got.append(await watch.next())
        assert [(change.name, change.value) for change in got] == [("/W/p", "2")]
        assert watch.resyncs == 0

    async def test_upstream_start_up_stamps(self, autojump_clock: trio.abc.Clock) -> None:
        """On a clock that has not moved since power-on the host's queue is not in stamp
        order (initialize stamps C, C+1, C+2, then C+1.., power-on C+2..C+4, a guest write
        C+3): the write before the watch opened is not reported, the one after (C+4) is."""
        clock = _Clock()
        send, receive = trio.open_memory_channel[PropertyChange](16)
        with trio.fail_after(60):
            async with _props_on(GuestPropertyService(clock=clock)) as (host, props):
                await props.set("/W/p", "1")
                async with props.watch(["/W/*"]) as watch, trio.open_nursery() as following:
                    following.start_soon(_follow, watch, send)
                    await trio.testing.wait_all_tasks_blocked()
                    await props.set("/W/p", "2")
                    change = await receive.receive()
                    await trio.testing.wait_all_tasks_blocked()
                    assert receive.statistics().current_buffer_used == 0
                    following.cancel_scope.cancel()
                stored = host.prop_get("/W/p")
        assert stored is not None
        assert (change.name, change.value, change.timestamp) == ("/W/p", "2", stored[2])


class TestWatchChannel:
    async def test_a_timeout_during_a_reconnect_leaves_the_watch_working(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A ``next()`` whose deadline expires while the watch closes the dropped channel
        (a slow disconnect) leaves the new one in place. (The watch had dropped its channel
        before connecting a new one, and every later ``next()`` raised RuntimeError.)"""
        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch:
                dropped = watch.channel.client_id
                host.set_delay(RequestType.HGCM_DISCONNECT, 2.0)
                host.vmmdev.hgcm.drop_client(dropped)
                with trio.move_on_after(1) as scope:
                    await watch.next()
                assert scope.cancelled_caught
                host.set_delay(RequestType.HGCM_DISCONNECT, 0)
                host.prop_set("/W/a", "1")
                change = await watch.next()
                assert watch.channel.client_id != dropped
        assert (change.name, change.value) == ("/W/a", "1")

    async def test_the_watch_enumerates_with_the_short_timeout(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        props: GuestProperties,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The watch's ENUM_PROPS (one a snapshot) are short calls (a driver timeout), its
        waits are not: the device counts calls without one as blocking."""
        timeouts: list[tuple[int, int]] = []
        call_prepared = HgcmChannel.call_prepared

        async def recording(self: HgcmChannel, prepared: PreparedCall) -> HgcmReply:
            timeouts.append((prepared.function, prepared.request.call.timeout_ms))
            return await call_prepared(self, prepared)

        monkeypatch.setattr(HgcmChannel, "call_prepared", recording)
        with trio.fail_after(60):
            async with props.watch(["/W/*"]) as watch:
                host.prop_set("/W/a", "1")
                await watch.next()
        assert timeouts == [
            (GuestFunction.ENUM_PROPS, SHORT_CALL_TIMEOUT_MS),
            (GuestFunction.GET_NOTIFICATION, TIMEOUT_INFINITE),
        ]

    async def test_a_drop_during_a_resync_reconnects(self, autojump_clock: trio.abc.Clock) -> None:
        """The host drops the watch's client while answering a resync's enumeration: the
        watch connects again and repeats the snapshot. (The failure ended the watch.)"""
        service = _DropDuringEnumeration()
        with trio.fail_after(60):
            async with _props_on(service) as (host, props), props.watch(["/W/*"]) as watch:
                for index in range(300):
                    host.prop_set("/Other/n", str(index))
                host.prop_set("/W/a", "1")
                dropped = watch.channel.client_id
                service.drop = host
                first = await watch.next()
                host.prop_set("/W/b", "2")
                second = await watch.next()
                assert watch.channel.client_id != dropped
                assert host.status()["hgcm_clients"] == 2
        assert [(c.name, c.value) for c in (first, second)] == [("/W/a", "1"), ("/W/b", "2")]

    async def test_a_clock_stepped_back_after_a_resync_loses_no_change(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """After missed changes the watch replays the host's queue with the snapshot's
        marks; a change made once the clock went back is dated before its property's mark but is
        news all the same. (It was skipped as one the snapshot showed.)"""
        clock = _Clock()
        with trio.fail_after(60):
            async with _props_on(GuestPropertyService(clock=clock)) as (host, props):
                host.prop_set("/W/a", "init")
                async with props.watch(["/W/*"]) as watch:
                    for index in range(300):  # the queue forgets the snapshot's place
                        host.prop_set("/Other/n", str(index))
                    clock.now += 10**9
                    host.prop_set("/W/b", "x")  # the oldest matching change it holds
                    first = await watch.next()
                    clock.now -= 100 * 10**9
                    host.prop_set("/W/a", "1")
                    second = await watch.next()
                    assert watch.resyncs == 1
        assert [(c.name, c.value) for c in (first, second)] == [("/W/b", "x"), ("/W/a", "1")]


async def _settle(rounds: int) -> None:
    """Let the watch run ``rounds`` times until every task waits (a second on between)."""
    for _ in range(rounds):
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)


def _seen(got: list[PropertyChange]) -> list[tuple[str, str]]:
    return [(change.name, change.value) for change in got]


class TestWatchGaps:
    async def test_a_restore_is_reported_at_once_with_a_pump(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """With the event pump, the RESTORED event makes the watch resync at once: a change
        queued before the restore, which the new service instance's queue lacks, is reported
        without another change, in order, and once. (It came only after the next matching
        change, and after it.)"""
        got: list[PropertyChange] = []
        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                pump = EventPump(device)
                await nursery.start(pump.run)
                async with (
                    open_guest_properties(device) as props,
                    props.watch(["/W/*"], pump=pump) as watch,
                    trio.open_nursery() as reading,
                ):
                    reading.start_soon(_collect, watch, got)
                    await trio.testing.wait_all_tasks_blocked()
                    host.prop_set("/W/a", "1")  # completes the pending wait
                    host.prop_set("/W/b", "2")  # queued, not yet asked for
                    host.restore()  # a new instance: its queue is empty
                    await _settle(3)
                    assert _seen(got) == [("/W/a", "1"), ("/W/b", "2")]
                    assert watch.resyncs == 1
                    host.prop_set("/W/z", "later")
                    await _settle(2)
                    reading.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
        assert _seen(got) == [("/W/a", "1"), ("/W/b", "2"), ("/W/z", "later")]
        assert [change.timestamp for change in got] == sorted(change.timestamp for change in got)

    async def test_a_resync_of_a_long_pattern_list_reports_its_names_alone(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """A watch whose pattern list is over ENUM_PROPS' 1023 bytes resyncs after a restore
        and reports what its patterns match, nothing else: the snapshot matches its listing
        here. (It sent the list through ENUM_PROPS, so the watch was refused.)"""
        names = [f"/W/{index:02}/{'x' * 40}" for index in range(30)]
        got: list[PropertyChange] = []
        with trio.fail_after(3600):
            async with trio.open_nursery() as nursery:
                pump = EventPump(device)
                await nursery.start(pump.run)
                async with (
                    open_guest_properties(device) as props,
                    props.watch(["|".join(names)], pump=pump) as watch,
                    trio.open_nursery() as reading,
                ):
                    reading.start_soon(_collect, watch, got)
                    await trio.testing.wait_all_tasks_blocked()
                    host.prop_set(names[0], "1")  # completes the pending wait
                    host.prop_set(names[1], "2")  # queued, not yet asked for
                    host.prop_set("/W/other", "3")  # queued, matched by no pattern
                    host.restore()  # a new instance: its queue is empty
                    await _settle(3)
                    assert watch.resyncs == 1
                    reading.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
        assert _seen(got) == [(names[0], "1"), (names[1], "2")]

    @pytest.mark.parametrize("gap", ["restore", "eviction"])
    async def test_missed_changes_come_before_the_change_that_shows_them(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties, gap: str
    ) -> None:
        """Without a pump the watch learns of a restore, or of a cursor evicted from the
        host's queue, only from the next matching change (VWRN_NOT_FOUND): the snapshot's
        differences are reported before it, by timestamp, and nothing twice. (``/W/b`` came
        after ``/W/z``, with an older timestamp.)"""
        got: list[PropertyChange] = []
        with trio.fail_after(3600):
            async with props.watch(["/W/*"]) as watch, trio.open_nursery() as nursery:
                nursery.start_soon(_collect, watch, got)
                await trio.testing.wait_all_tasks_blocked()
                host.prop_set("/W/a", "1")
                host.prop_set("/W/b", "2")
                if gap == "restore":
                    host.restore()
                else:
                    for index in range(MAX_GUEST_NOTIFICATIONS + 44):
                        host.prop_set("/X/noise", str(index))
                await _settle(3)
                assert _seen(got) == [("/W/a", "1")]  # the gap the protocol cannot see
                host.prop_set("/W/z", "later")
                await _settle(3)
                nursery.cancel_scope.cancel()
        assert _seen(got) == [("/W/a", "1"), ("/W/b", "2"), ("/W/z", "later")]
        assert [change.timestamp for change in got] == sorted(change.timestamp for change in got)
        assert watch.resyncs == 1

    async def test_a_resync_reports_by_timestamp(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, props: GuestProperties
    ) -> None:
        """A resync's sets come oldest first, whatever the order of the listing, and its
        deletes (which have no timestamp) after them. (Sets came in listing order.)"""
        got: list[PropertyChange] = []
        with trio.fail_after(3600):
            host.prop_set("/W/gone", "x")
            async with props.watch(["/W/*"]) as watch, trio.open_nursery() as nursery:
                nursery.start_soon(_collect, watch, got)
                await trio.testing.wait_all_tasks_blocked()
                host.prop_set("/W/a", "1")  # completes the pending wait
                await trio.testing.wait_all_tasks_blocked()
                host.prop_set("/W/c", "3")
                host.prop_set("/W/b", "2")
                host.prop_delete("/W/gone")
                host.restore()
                host.prop_set("/W/z", "later")
                await _settle(5)
                nursery.cancel_scope.cancel()
        assert [(change.name, change.deleted) for change in got] == [
            ("/W/a", False),
            ("/W/c", False),
            ("/W/b", False),
            ("/W/z", False),
            ("/W/gone", True),
        ]
        assert watch.resyncs == 1

    async def test_an_overflow_stamped_as_the_cursor_is_not_skipped(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A change too large for the buffer, stamped as the watch's cursor (a coarse clock,
        or one gone back), cannot be asked for again: the host would answer with the change
        after it. The watch resyncs instead. (The retry waited for the next change.)"""
        clock = _Clock()
        got: list[PropertyChange] = []
        service = GuestPropertyService(clock=clock, max_value_size=4096)
        with trio.fail_after(3600):
            async with _props_on(service) as (host, props):
                clock.now += 10**9
                host.prop_set("/Other/x", "1")  # the newest stamp: the watch's cursor
                clock.now -= 1
                host.prop_set("/Other/y", "1")
                async with props.watch(["/W/*"]) as watch, trio.open_nursery() as nursery:
                    nursery.start_soon(_collect, watch, got)
                    await trio.testing.wait_all_tasks_blocked()
                    clock.now += 1
                    host.prop_set("/W/long", "L" * 2000)
                    await _settle(2)
                    nursery.cancel_scope.cancel()
        assert _seen(got) == [("/W/long", "L" * 2000)]


async def _collect(watch: PropertyWatch, got: list[PropertyChange]) -> None:
    while True:
        got.append(await watch.next())
