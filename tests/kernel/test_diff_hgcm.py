"""Differential: HGCM connect, call (every parameter type and limit), disconnect, cancel."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from agent.host.hgcm_service import HostBuffer, HostU32
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import HGCM_MAX_USER_PARM, Event, HgcmParmType, Ioctl, RequestType
from agent.protocol.status import (
    VERR_ACCESS_DENIED,
    VERR_GENERAL_FAILURE,
    VERR_HGCM_TOO_MANY_CLIENT_CALLS,
    VERR_NOT_FOUND,
    VERR_NOT_IMPLEMENTED,
    VINF_SUCCESS,
)
from tests.host.conftest import ECHO, FN_ECHO, FN_HOLD
from tests.kernel.builders import ioctl, sessions
from tests.kernel.differential import FN_SUCCEED, assert_agree, differ, running

if TYPE_CHECKING:
    from agent.host import DriverSession
    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")

LOC_LOCALHOST_EXISTING: Final = 2
RESET_S: Final = 1.5
"""Bound on a reset with a call in flight: the new boot's load, not the driver's 2 s wait."""
FN_FAIL: Final = 3
T = HgcmParmType
Parm = tuple[int, int | bytes]
"""(type, value): an integer for U32/U64, the user bytes for LINADDR types."""


def connect(service: str, loc_type: int = LOC_LOCALHOST_EXISTING) -> bytearray:
    """An HGCM_CONNECT buffer."""
    buf = ioctl(156, 28)
    L.HgcmConnectIoctl.loc_type.set(buf, loc_type)
    name = service.encode()
    start = L.HgcmConnectIoctl.service_name.offset
    buf[start : start + len(name)] = name
    return buf


def disconnect(client_id: int) -> bytearray:
    """An HGCM_DISCONNECT buffer."""
    buf = ioctl(28, 24)
    L.HgcmDisconnectIoctl.client_id.set(buf, client_id)
    return buf


def call(
    client_id: int,
    function: int,
    parms: list[Parm],
    *,
    timeout_ms: int = 0xFFFFFFFF,
    count: int | None = None,
) -> tuple[int, bytearray, list[tuple[int, bytes]]]:
    """An HGCM_CALL_64 ioctl: its code, buffer and user buffers (address offset, bytes)."""
    size = L.HgcmCallIoctl.size + 16 * len(parms)
    buf = ioctl(size, size)
    L.HgcmCallIoctl.client_id.set(buf, client_id)
    L.HgcmCallIoctl.function.set(buf, function)
    L.HgcmCallIoctl.timeout_ms.set(buf, timeout_ms)
    L.HgcmCallIoctl.interruptible.set(buf, 1)
    L.HgcmCallIoctl.parm_count.set(buf, len(parms) if count is None else count)
    user = []
    for index, (kind, value) in enumerate(parms):
        at = L.HgcmCallIoctl.size + 16 * index
        L.HgcmParameter64.type.set(memoryview(buf)[at:], kind)
        if isinstance(value, bytes):
            L.HgcmParameter64.pointer_size.set(memoryview(buf)[at:], len(value))
            user.append((at + 8, value))
        elif kind == T.U64:
            L.HgcmParameter64.value64.set(memoryview(buf)[at:], value)
        else:
            L.HgcmParameter64.value32.set(memoryview(buf)[at:], value)
    return Ioctl.hgcm_call_64(size), buf, user


async def do_call(
    rig: Rig, label: str, session: DriverSession, *args: object, **kw: object
) -> None:
    """Perform :func:`call` as a step."""
    code, buf, user = call(*args, **kw)  # type: ignore[arg-type]
    await rig.ioctl(label, session, code, buf, user)


def complete_held(rig: Rig) -> None:
    """Complete the echo service's held ``(LINADDR_OUT, U32)`` call: 3 bytes out, 77."""
    held = rig.echo.held.pop()
    output, number = held.params
    assert isinstance(output, HostBuffer)
    assert isinstance(number, HostU32)
    output.data[:3] = b"out"
    output.size = 3
    number.value = 77
    held.complete(VINF_SUCCESS)


async def connected(rig: Rig, session: DriverSession, label: str = "connect") -> int:
    """Connect ``session`` to the echo service; return the client id."""
    step = await rig.ioctl(label, session, Ioctl.HGCM_CONNECT, connect(ECHO))
    return L.HgcmConnectIoctl.client_id.get(step.buffer)


async def test_connect_and_disconnect() -> None:
    """Connects by every requestor, unknown services and locations, disconnect rules."""

    async def script(rig: Rig) -> None:
        for label, session in sessions(rig):
            client = await connected(rig, session, f"{label} connect")
            await rig.ioctl(
                f"{label} disconnect", session, Ioctl.HGCM_DISCONNECT, disconnect(client)
            )
        session = rig.open()
        await rig.ioctl("unknown service", session, Ioctl.HGCM_CONNECT, connect("NoSuchSvc"))
        await rig.ioctl("location 1", session, Ioctl.HGCM_CONNECT, connect(ECHO, 1))
        await rig.ioctl("location 0", session, Ioctl.HGCM_CONNECT, connect(ECHO, 0))
        await rig.ioctl("empty name", session, Ioctl.HGCM_CONNECT, connect(""))
        buf = connect(ECHO)
        buf[28:156] = b"x" * 128
        await rig.ioctl("name without NUL", session, Ioctl.HGCM_CONNECT, buf)
        client = await connected(rig, session)
        other = rig.open()
        await rig.ioctl("other's client", other, Ioctl.HGCM_DISCONNECT, disconnect(client))
        await rig.ioctl("client 0", session, Ioctl.HGCM_DISCONNECT, disconnect(0))
        await rig.ioctl("client ~0", session, Ioctl.HGCM_DISCONNECT, disconnect(0xFFFFFFFF))
        await rig.ioctl("disconnect", session, Ioctl.HGCM_DISCONNECT, disconnect(client))
        await rig.ioctl("twice", session, Ioctl.HGCM_DISCONNECT, disconnect(client))
        await rig.ioctl("connect sizes", session, Ioctl.HGCM_CONNECT, ioctl(156, 24))

    assert_agree(await differ(script))


async def test_client_table_fills_up() -> None:
    """64 clients per session; the 65th connect fails; closing releases them all."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        for index in range(65):
            await connected(rig, session, f"connect {index}")
        rig.note("clients", rig.host.status()["hgcm_clients"])
        await rig.close("close", session)
        rig.note("clients", rig.host.status()["hgcm_clients"])

    assert_agree(await differ(script))


CALLS: Final[list[tuple[str, int, list[Parm]]]] = [
    ("in/out", FN_ECHO, [(T.LINADDR_IN, b"hello"), (T.LINADDR_OUT, bytes(16)), (T.U32, 0)]),
    ("both", FN_ECHO, [(T.LINADDR, b"abc" * 30), (T.LINADDR, b"z" * 90), (T.U32, 7)]),
    ("out short", FN_ECHO, [(T.LINADDR_IN, b"0123456789"), (T.LINADDR_OUT, bytes(4)), (T.U32, 0)]),
    (
        "pages",
        FN_ECHO,
        [(T.LINADDR_IN, bytes(range(256)) * 40), (T.LINADDR_OUT, bytes(10240)), (T.U32, 0)],
    ),
    (
        "request past a page",
        FN_ECHO,
        [(T.LINADDR_IN, b"0123456789"), (T.LINADDR_OUT, bytes(2 << 20)), (T.U32, 0)],
    ),
    ("empty in", FN_ECHO, [(T.LINADDR_IN, b""), (T.LINADDR_OUT, bytes(8)), (T.U32, 0)]),
    ("fail status", FN_FAIL, [(T.U32, (-42) & 0xFFFFFFFF)]),
    ("fail success", FN_FAIL, [(T.U32, 0), (T.U64, 5)]),
    ("no parameters", FN_SUCCEED, []),
    ("u64 and u32", FN_SUCCEED, [(T.U64, 0x1122334455667788), (T.U32, 0xFFFFFFFF)]),
]
"""(label, function, parameters) of calls the echo service answers at once."""


async def test_calls_with_every_parameter_type() -> None:
    """Echo calls through in, out and in/out buffers, 32/64-bit values, empty buffers."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        client = await connected(rig, session)
        for label, function, parms in CALLS:
            await do_call(rig, label, session, client, function, parms)

    assert_agree(await differ(script))


async def test_call_limits_and_bad_parameters() -> None:
    """Parameter counts, kinds userspace may not pass, huge and unmapped buffers, clients."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        c = await connected(rig, session)
        await do_call(rig, "32 parameters", session, c, FN_FAIL, [(T.U32, 0)] * 32)
        await do_call(rig, "33 parameters", session, c, FN_FAIL, [(T.U32, 0)] * 33)
        await do_call(rig, "count above size", session, c, FN_FAIL, [(T.U32, 0)], count=2)
        await do_call(rig, "count below size", session, c, FN_FAIL, [(T.U32, 0)] * 2, count=1)
        for kind in (
            T.INVALID,
            T.PHYSADDR,
            T.LINADDR_KERNEL,
            T.LINADDR_KERNEL_IN,
            T.LINADDR_KERNEL_OUT,
            T.PAGELIST,
            11,
            99,
        ):
            await do_call(rig, f"type {kind}", session, c, FN_FAIL, [(kind, 0)])
        code, buf, user = call(
            c, FN_ECHO, [(T.LINADDR_IN, b"x"), (T.LINADDR_OUT, bytes(4)), (T.U32, 0)]
        )
        L.HgcmParameter64.pointer_size.set(memoryview(buf)[40:], HGCM_MAX_USER_PARM + 1)
        await rig.ioctl("over 24 MiB", session, code, buf, user)
        code, buf, _ = call(
            c, FN_ECHO, [(T.LINADDR_IN, b"x"), (T.LINADDR_OUT, bytes(4)), (T.U32, 0)]
        )
        L.HgcmParameter64.pointer_linear_addr.set(memoryview(buf)[40:], 0x1234)
        await rig.ioctl("unmapped in", session, code, buf, [])
        code, buf, user = call(
            c, FN_ECHO, [(T.LINADDR_IN, b"x" * 8), (T.LINADDR_OUT, bytes(4)), (T.U32, 0)]
        )
        L.HgcmParameter64.pointer_size.set(memoryview(buf)[40:], 100_000)
        await rig.ioctl("in runs past its buffer", session, code, buf, user)
        await do_call(rig, "client 0", session, 0, FN_FAIL, [(T.U32, 0)])
        await do_call(rig, "unknown client", session, c + 100, FN_FAIL, [(T.U32, 0)])
        other = rig.open()
        await do_call(rig, "other's client", other, c, FN_FAIL, [(T.U32, 0)])
        code, buf, _ = call(c, FN_FAIL, [(T.U32, 0)])
        L.IoctlHeader.size_out.set(buf, 40)
        await rig.ioctl("size_out differs", session, code, buf)
        code, buf, _ = call(c, FN_FAIL, [(T.U32, 0)])
        await rig.ioctl("header only", session, Ioctl.hgcm_call_64(40), buf[:40])

    assert_agree(await differ(script))


async def test_timeouts_and_cancellation() -> None:
    """A held call times out or is interrupted: CANCEL2 at the host, the errno to the caller."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        c = await connected(rig, session)
        await do_call(rig, "timeout", session, c, FN_HOLD, [(T.U32, 1)], timeout_ms=20)
        await do_call(rig, "timeout 0", session, c, FN_HOLD, [(T.U32, 2)], timeout_ms=0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancelled_call, rig, session, c)
            await rig.settle(lambda: len(rig.echo.held) == 1)
            nursery.cancel_scope.cancel()
        rig.note("held calls", len(rig.echo.held))
        await do_call(rig, "still works", session, c, FN_FAIL, [(T.U32, 0)])
        rig.note("pending at host", rig.host.status()["hgcm_pending_calls"])

    assert_agree(await differ(script))


async def test_a_cancel2_the_host_does_not_implement_is_sent_again_as_the_legacy_cancel() -> None:
    """``hgcm_cancel_call``: a CANCEL2 the host answers VERR_NOT_IMPLEMENTED is followed by
    the legacy HGCM_CANCEL of the call's own request, which cancels it at the host at once
    (Oracle's driver has no such fallback: ``tests/host/test_oracle.py``)."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        c = await connected(rig, session)
        rig.host.add_fault(RequestType.HGCM_CANCEL2, VERR_NOT_IMPLEMENTED)
        await do_call(rig, "timeout", session, c, FN_HOLD, [(T.U32, 1)], timeout_ms=20)
        rig.note("pending at host", rig.host.status()["hgcm_pending_calls"])

    results = await differ(script)
    assert_agree(results)
    (timeout,) = (step for step in results["kernel"] if step.label == "timeout")
    sent = [request.split()[0] for request in timeout.requests]
    assert (timeout.errno, sent) == (
        errno.ETIMEDOUT,
        ["HGCM_CALL64", "HGCM_CANCEL2", "HGCM_CANCEL"],
    )
    assert timeout.service == ("call fn=2 ['u32:0x1']", "cancel fn=2")


async def test_a_call_the_host_refuses_in_its_rc_is_copied_back() -> None:
    """A call VMMDev refuses in the request's ``rc`` (the service's pending-call limit):
    ``vbg_hgcm_do_call`` makes that ``rc`` the call's result and the call is copied back, so
    an out buffer gets its bounce buffer's zeros (Oracle's driver copies nothing back:
    ``tests/host/test_oracle.py``)."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        client = await connected(rig, session)
        async with trio.open_nursery() as nursery:
            for index in range(rig.echo.max_calls - 1):
                nursery.start_soon(
                    do_call, rig, f"held {index}", session, client, FN_HOLD, [(T.U32, index)]
                )
            await rig.settle(lambda: len(rig.echo.held) == rig.echo.max_calls - 1)
            parms = [(T.LINADDR_IN, b"abc"), (T.LINADDR_OUT, b"\x5a" * 8), (T.U32, 7)]
            await do_call(rig, "refused", session, client, FN_ECHO, parms)
            nursery.cancel_scope.cancel()

    results = await differ(script)
    for steps in results.values():
        (refused,) = (step for step in steps if step.label == "refused")
        assert L.IoctlHeader.rc.get(refused.buffer) == VERR_HGCM_TOO_MANY_CLIENT_CALLS
        assert refused.user == (b"abc", bytes(8))
    assert_agree(results)


async def _cancelled_call(rig: Rig, session: DriverSession, client: int) -> None:
    await do_call(rig, "interrupted", session, client, FN_HOLD, [(T.LINADDR_OUT, bytes(8))])


async def test_a_reset_leaves_nothing_of_the_old_boot_at_the_host(personality: str) -> None:
    """A VM reset with a call in flight is over at once: the host then sees the new boot's
    load, as at boot, and nothing of the old boot (a real reset leaves no driver thread to
    send a CANCEL2, whose refusal the real driver would wait 2 s for); the call fails ENODEV."""
    async with running(personality) as rig:
        boot = rig.steps[0].requests
        session = rig.open()
        c = await connected(rig, session)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(do_call, rig, "held", session, c, FN_HOLD, [])
            await rig.settle(lambda: len(rig.echo.held) == 1)
            step = rig.begin("reset")
            with trio.fail_after(RESET_S):
                await rig.host.reset()
            reset = rig.finish(step)
        held = next(step for step in rig.steps if step.label == "held")
    assert (reset.requests, held.errno) == (boot, errno.ENODEV)


async def test_a_call_the_host_completes_while_its_cancel_fails_returns_its_results() -> None:
    """An interrupted call whose CANCEL2 the host does not find (VERR_NOT_FOUND) and that the
    host completes within the driver's grace wait: the ioctl returns 0 with the results
    copied back, as ``vbg_hgcm_do_call`` returns a call that became done in its grace wait."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        client = await connected(rig, session)
        parms = [(T.LINADDR_OUT, bytes(8)), (T.U32, 5)]
        interrupt = trio.CancelScope()

        async def raced() -> None:
            with interrupt:
                await do_call(rig, "raced", session, client, FN_HOLD, parms)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(raced)
            await rig.settle(lambda: len(rig.echo.held) == 1)
            rig.host.add_fault(RequestType.HGCM_CANCEL2, VERR_NOT_FOUND)
            interrupt.cancel()
            await rig.settle(lambda: not rig.host.vmmdev.faults.has_faults)  # CANCEL2 sent
            complete_held(rig)
        rig.note("pending at host", rig.host.status()["hgcm_pending_calls"])

    results = await differ(script)
    assert_agree(results)
    for steps in results.values():
        (raced,) = (step for step in steps if step.label == "raced")
        assert raced.errno == 0
        assert raced.user == (b"out" + bytes(5),)
        assert L.HgcmParameter64.value32.get(raced.buffer[L.HgcmCallIoctl.size + 16 :]) == 77


async def test_close_with_clients_and_held_calls() -> None:
    """Closing a session disconnects its clients at the host (and cancels nothing twice)."""

    async def script(rig: Rig) -> None:
        session = rig.open(uid=1000)
        first = await connected(rig, session)
        await connected(rig, session, "second")
        await rig.ioctl("disconnect first", session, Ioctl.HGCM_DISCONNECT, disconnect(first))
        await rig.close("close", session)
        rig.note("disconnected", rig.echo.disconnected)

    assert_agree(await differ(script))


async def test_close_goes_on_past_refused_releases() -> None:
    """At a close the driver ignores what dropping the session's capabilities and filter
    returns (``vbg_core_close_session``): with the host refusing both, the session's
    clients are still disconnected, and the next filter change reaches the host again."""

    async def script(rig: Rig) -> None:
        session, other = rig.open(), rig.open()
        filter_ = ioctl(32, 24)
        L.ChangeFilterIoctl.or_mask.set(filter_, Event.VRDP)
        await rig.ioctl("filter", session, Ioctl.CHANGE_FILTER_MASK, bytearray(filter_))
        caps = ioctl(32, 32)
        L.SetGuestCapsIoctl.or_mask.set(caps, 0x4)
        await rig.ioctl("caps", session, Ioctl.CHANGE_GUEST_CAPABILITIES, caps)
        await connected(rig, session)
        rig.host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_GENERAL_FAILURE, count=3)
        rig.host.add_fault(RequestType.SET_GUEST_CAPABILITIES, VERR_GENERAL_FAILURE)
        await rig.close("close", session)
        rig.note("disconnected", rig.echo.disconnected)
        rig.host.clear_faults(RequestType.CTL_GUEST_FILTER_MASK)
        await rig.ioctl("other's filter", other, Ioctl.CHANGE_FILTER_MASK, filter_)

    assert_agree(await differ(script))


async def test_restore_with_a_held_call() -> None:
    """A VM restore while a call is held: the host re-submits it; RESTORED reaches a waiter."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        c = await connected(rig, session)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancelled_call, rig, session, c)
            await rig.settle(lambda: len(rig.echo.held) == 1)
            step = rig.begin("restore")
            rig.host.restore()
            await rig.settle(lambda: len(rig.echo.held) == 1)
            rig.finish(step)
            rig.note("held calls", len(rig.echo.held))
            nursery.cancel_scope.cancel()
        rig.note("pending at host", rig.host.status()["hgcm_pending_calls"])

    assert_agree(await differ(script))


async def test_calls_from_every_requestor() -> None:
    """The requestor each kind of session stamps on its HGCM requests."""

    async def script(rig: Rig) -> None:
        for label, session in sessions(rig):
            client = await connected(rig, session, f"{label} connect")
            await do_call(rig, f"{label} call", session, client, FN_SUCCEED, [(T.U32, 1)])

    assert_agree(await differ(script))


async def test_held_call_completes_later() -> None:
    """A call the service answers later: the waiter wakes on the HGCM event, output copied."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        client = await connected(rig, session)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                do_call,
                rig,
                "held",
                session,
                client,
                FN_HOLD,
                [(T.LINADDR_OUT, bytes(8)), (T.U32, 5)],
            )
            await rig.settle(lambda: len(rig.echo.held) == 1)
            complete_held(rig)

    assert_agree(await differ(script))


async def test_service_refusals_and_call_limit() -> None:
    """A service refusing a client; a client's calls beyond the service's pending limit."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        rig.echo.refuse = VERR_ACCESS_DENIED
        await rig.ioctl("refused", session, Ioctl.HGCM_CONNECT, connect(ECHO))
        rig.echo.refuse = 0
        client = await connected(rig, session)
        room = rig.echo.max_calls - 1  # the host counts the new call before comparing
        async with trio.open_nursery() as nursery:
            for index in range(room):
                nursery.start_soon(
                    do_call, rig, f"held {index}", session, client, FN_HOLD, [(T.U32, index)]
                )
            await rig.settle(lambda: len(rig.echo.held) == room)
            await do_call(rig, "one too many", session, client, FN_HOLD, [(T.U32, 9)])
            nursery.cancel_scope.cancel()
        rig.note("held after cancel", len(rig.echo.held))

    results = await differ(script)
    for steps in results.values():  # the interrupted calls were never answered: no steps
        assert [step.label for step in steps][-2:] == ["one too many", "held after cancel: 0"]
    assert_agree(results)
