"""Tests of the in-process transport and opener, and of host-level life-cycle control.

Rules of this test module:

- ``SimOpener``/``SimTransport`` against a running host (fixture ``host``); no threads.
- ``autojump_clock`` for anything that waits.
"""

from __future__ import annotations

import errno
from functools import partial
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from agent.device import open_device
from agent.host import DictMemory, SimOpener, SimTransport, SimulatedHost
from agent.host.memory import USER_BASE, USER_LIMIT, USER_WINDOW, IoctlMemory
from agent.protocol import (
    ChangeFilterMask,
    ChangeGuestCapabilities,
    DeviceUnavailableError,
    GetHostVersion,
    GetSessionId,
    HgcmBuffer,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCall,
    HgcmConnect,
    HgcmU32,
    Submission,
    UserBuffer,
    WaitForEvents,
)
from agent.protocol.constants import (
    ABANDON_AFTER_S,
    GIVE_BACK_S,
    PAGE_SIZE,
    Event,
    RequestType,
)
from agent.protocol.status import VERR_GENERAL_FAILURE
from tests.host.conftest import ECHO, FN_ECHO, FN_HOLD, Client, EchoService, open_client

if TYPE_CHECKING:
    from agent.protocol import Request

HELD_S: Final = 60.0
"""How long the host holds a delayed request: far beyond any grace."""
DEADLINE_S: Final = 0.2


async def _request_in(scope: trio.CancelScope, client: Client, request: Request[object]) -> None:
    """Perform ``request`` inside ``scope``."""
    with scope:
        await client.request(request)


class TestSimTransport:
    """Addresses, user memory and closing."""

    async def test_user_buffers_get_distinct_addresses(self, host: SimulatedHost) -> None:
        """Each user buffer's address is stored in its field and results land in its data."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        call = client.session.encode(
            HgcmCall(client_id, FN_ECHO, (HgcmBuffer(b"abc"), HgcmBuffer(b"\0" * 8), HgcmU32(0)))
        )
        await client.transport.ioctl(call.code, call.buffer, call.user_buffers)
        addresses = [
            int.from_bytes(call.buffer[u.address_offset : u.address_offset + 8], "little")
            for u in call.user_buffers
        ]
        assert len(set(addresses)) == 2
        assert all(address % PAGE_SIZE == 0 for address in addresses)
        assert call.user_buffers[1].data.startswith(b"abc")

    async def test_concurrent_ioctls(self, host: SimulatedHost, autojump_clock: object) -> None:
        """A blocked wait and other requests share one transport."""
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.VRDP, 0))
        woken: list[int] = []

        async def wait() -> None:
            woken.append((await client.request(WaitForEvents(Event.VRDP))).mask)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                session = await client.request(GetSessionId())
                assert session.value == host.status()["session_id"]
                assert woken == []
                host.raise_events(Event.VRDP)
        assert woken == [Event.VRDP]

    async def test_close_releases_the_session(self, host: SimulatedHost) -> None:
        """Closing drops the session's clients; later ioctls are EBADF."""
        transport = await SimOpener(host).open_session()
        assert isinstance(transport, SimTransport)
        client = await open_client(host)
        await client.request(HgcmConnect(ECHO))
        await client.transport.aclose()
        assert host.status()["hgcm_clients"] == 0
        with pytest.raises(OSError, match=r".") as info:
            await client.request(GetSessionId())
        assert info.value.errno == errno.EBADF
        await transport.aclose()

    async def test_a_call_is_issued_as_the_driver_gets_it(
        self, host: SimulatedHost, echo: EchoService
    ) -> None:
        """A call the service holds, then cancelled, was issued; one on a closed session,
        refused before the driver, was not."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        held, refused = Submission(), Submission()
        call = client.session.encode(HgcmCall(client_id, FN_HOLD, ()))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(client.transport.ioctl, call.code, call.buffer, submission=held)
            )
            await trio.testing.wait_all_tasks_blocked()
            assert len(echo.held) == 1
            nursery.cancel_scope.cancel()
        assert held.issued
        await client.transport.aclose()
        with pytest.raises(OSError, match=r"Bad file descriptor"):
            await client.transport.ioctl(call.code, call.buffer, submission=refused)
        assert not refused.issued

    @pytest.mark.parametrize("personality", ["mainline", "oracle"])
    async def test_a_cancellation_drops_a_call_only_before_the_driver_has_it(
        self, personality: str
    ) -> None:
        """A caller cancelled before the transport issues the call never reaches the driver
        (as one waiting for a thread on the character device); a cancellation that meets the
        call at the driver's entry does not keep the request from the host, as a signal keeps
        no system call out of the kernel (only the driver's interruptible waits see it)."""
        host = SimulatedHost(personality=personality)
        counts = host.vmmdev.request_counts
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                transport = await SimOpener(host).open_session()
                assert isinstance(transport, SimTransport)
                before = counts[RequestType.GET_HOST_VERSION]
                submission = Submission()
                call = GetHostVersion().encode()
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await transport.ioctl(call.code, call.buffer, submission=submission)
                assert (scope.cancelled_caught, submission.issued) == (True, False)
                assert counts[RequestType.GET_HOST_VERSION] == before
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await host.ioctl(transport.session, call.code, call.buffer, IoctlMemory())
                assert counts[RequestType.GET_HOST_VERSION] == before + 1
                assert call.request.decode(call).major > 0
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_description(self, host: SimulatedHost) -> None:
        """The opener names the personality and the node."""
        assert "mainline" in SimOpener(host).description
        assert "/dev/vboxuser" in SimOpener(host, user_device=True).description

    async def test_one_version_everywhere(self, host: SimulatedHost) -> None:
        """GET_HOST_VERSION and the HostInfo properties name the same release, as on a real
        host (the properties said 7.0.20 r163906 next to VMMDev's 7.0.18 r162988)."""
        async with open_device(SimOpener(host)) as device:
            reply = await device.request(GetHostVersion())
        version = host.prop_get("/VirtualBox/HostInfo/VBoxVer")
        revision = host.prop_get("/VirtualBox/HostInfo/VBoxRev")
        assert version is not None
        assert revision is not None
        assert (version[0], revision[0]) == (
            f"{reply.major}.{reply.minor}.{reply.build}",
            str(reply.revision),
        )

    async def test_host_not_running(self) -> None:
        """Opening a session before the host runs fails as every opener does (exit 69)."""
        with pytest.raises(DeviceUnavailableError, match="simulated host is not running"):
            await SimOpener(SimulatedHost()).open_session()

    async def test_failure_leaves_the_buffer_as_it_was(self, host: SimulatedHost) -> None:
        """A failed call takes back the user-buffer addresses it stored in the buffer."""
        client = await open_client(host)
        call = HgcmCall(0x7777, 1, (HgcmBufferIn(b"abc\0"), HgcmBufferOut(8))).encode()
        before = bytes(call.buffer)
        with pytest.raises(OSError, match=r".") as info:
            await client.transport.ioctl(call.code, call.buffer, call.user_buffers)
        assert info.value.errno == errno.EINVAL
        assert bytes(call.buffer) == before

    async def test_user_memory_exhausted_leaves_the_buffer_as_it_was(
        self, host: SimulatedHost
    ) -> None:
        """More user buffers than the user address space has windows for: ENOMEM, and the
        addresses already stored for the first ones are taken back."""
        client = await open_client(host)
        windows = (USER_LIMIT - USER_BASE) // USER_WINDOW
        buffer = bytearray(b"\x5a" * 8 * (windows + 1))
        users = [UserBuffer(8 * index, bytearray(1)) for index in range(windows + 1)]
        with pytest.raises(OSError, match="exhausted") as info:
            await client.transport.ioctl(0, buffer, users)
        assert info.value.errno == errno.ENOMEM
        assert buffer == b"\x5a" * 8 * (windows + 1)

    def test_memory_faults(self) -> None:
        """Unknown addresses and overruns are EFAULT; unmapped space is reused."""
        memory = DictMemory()
        data = bytearray(b"0123456789")
        address = memory.map(data, offset=12)
        assert memory.read(address + 2, 3) == b"234"
        memory.write(address, b"ab")
        assert data.startswith(b"ab")
        for bad in ((address - 1, 1), (address + 8, 4), (0, 1)):
            with pytest.raises(OSError, match="bad address") as info:
                memory.read(*bad)
            assert info.value.errno == errno.EFAULT
        assert memory.read(0, 0) == b""
        memory.unmap(address)
        assert len(memory) == 0

    def test_memory_wraps_around(self) -> None:
        """A small address space reuses freed room and reports exhaustion."""
        memory = DictMemory(base=0x1000, limit=0x1000 + 6 * PAGE_SIZE)
        first = memory.map(bytearray(PAGE_SIZE))
        second = memory.map(bytearray(PAGE_SIZE))
        with pytest.raises(OSError, match="exhausted"):
            memory.map(bytearray(3 * PAGE_SIZE))
        memory.unmap(first)
        tail = memory.map(bytearray(PAGE_SIZE))
        assert first == memory.map(bytearray(PAGE_SIZE))
        assert len({first, second, tail}) == 3


class TestGivingUp:
    """A cancelled call the simulated driver holds is abandoned by the character device's
    rule, while its own task finishes it host-side; an interruptible one never is."""

    async def test_a_held_call_is_abandoned_after_the_grace_and_finished_by_the_host(
        self, host: SimulatedHost, autojump_clock: trio.abc.Clock
    ) -> None:
        """A request the host holds in the port write: its caller, cancelled, leaves after
        ABANDON_AFTER_S with a log line; the host handles the request when the hold ends."""
        client = await open_client(host)
        counts = host.vmmdev.request_counts
        before = counts[RequestType.GET_HOST_VERSION]
        host.set_delay(RequestType.GET_HOST_VERSION, HELD_S)
        with trio.fail_after(2 * HELD_S), capture_logs() as logs:
            scope = trio.CancelScope()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_request_in, scope, client, GetHostVersion())
                await trio.testing.wait_all_tasks_blocked()
                cancelled_at = trio.current_time()
                scope.cancel()
            assert trio.current_time() - cancelled_at == pytest.approx(ABANDON_AFTER_S)
            assert counts[RequestType.GET_HOST_VERSION] == before
            await trio.sleep_until(cancelled_at + HELD_S)  # the host's hold ends
            await trio.testing.wait_all_tasks_blocked()
        assert counts[RequestType.GET_HOST_VERSION] == before + 1
        assert [entry["event"] for entry in logs] == ["ioctl_abandoned"]

    async def test_a_held_call_its_deadline_cancels_is_abandoned_then(
        self, host: SimulatedHost, autojump_clock: trio.abc.Clock
    ) -> None:
        """Cancelled by its deadline, a held call is abandoned at that deadline."""
        client = await open_client(host)
        host.set_delay(RequestType.GET_HOST_VERSION, HELD_S)
        with trio.fail_after(2 * HELD_S), capture_logs() as logs:
            began = trio.current_time()
            with trio.move_on_after(DEADLINE_S) as scope:
                await client.request(GetHostVersion())
        assert scope.cancelled_caught
        assert trio.current_time() - began == pytest.approx(DEADLINE_S + GIVE_BACK_S)
        assert [entry["event"] for entry in logs] == ["ioctl_abandoned"]

    async def test_an_interruptible_call_comes_back_at_once(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: trio.abc.Clock
    ) -> None:
        """An HGCM call the service holds ends as its caller's deadline cancels it, and is
        cancelled at the host: nothing is abandoned."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        with trio.fail_after(2 * HELD_S), capture_logs() as logs:
            began = trio.current_time()
            with trio.move_on_after(DEADLINE_S):
                await client.request(HgcmCall(client_id, FN_HOLD, ()))
            assert trio.current_time() - began == DEADLINE_S
        assert len(echo.cancelled) == 1
        assert logs == []

    async def test_a_held_close_ends_at_the_callers_deadline(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: trio.abc.Clock
    ) -> None:
        """A close whose HGCM disconnect the host holds returns at the caller's deadline
        with a log line; the driver releases the client when the hold ends."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        host.set_delay(RequestType.HGCM_DISCONNECT, HELD_S)
        with trio.fail_after(2 * HELD_S), capture_logs() as logs:
            began = trio.current_time()
            with trio.CancelScope(deadline=began + DEADLINE_S):
                await client.transport.aclose()
            assert trio.current_time() - began == DEADLINE_S
            assert echo.disconnected == []
            await trio.sleep_until(began + HELD_S)  # the host's hold ends
            await trio.testing.wait_all_tasks_blocked()
        assert echo.disconnected == [client_id]
        assert [entry["event"] for entry in logs] == ["close_abandoned"]

    async def test_a_close_behind_an_abandoned_connect_waits_for_it_host_side(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: trio.abc.Clock
    ) -> None:
        """A close while an abandoned HGCM connect is still held returns at once; the driver
        releases the session once the connect returns, as the kernel does (the ioctl keeps
        the file referenced), so the client the connect made is disconnected, not leaked."""
        client = await open_client(host)
        host.set_delay(RequestType.HGCM_CONNECT, HELD_S)
        with trio.fail_after(2 * HELD_S), capture_logs() as logs:
            began = trio.current_time()
            with trio.move_on_after(DEADLINE_S):
                await client.request(HgcmConnect(ECHO))
            closing = trio.current_time()
            with trio.CancelScope(deadline=closing + DEADLINE_S):
                await client.transport.aclose()
            assert trio.current_time() == closing
            assert client.transport.session in host.driver.sessions
            await trio.sleep_until(began + HELD_S)  # the host's hold ends
            await trio.testing.wait_all_tasks_blocked()
        assert len(echo.connected) == 1
        assert echo.disconnected == echo.connected
        assert host.vmmdev.hgcm.client_count == 0
        assert client.transport.session not in host.driver.sessions
        events = [entry["event"] for entry in logs]
        assert events == ["ioctl_abandoned", "close_deferred", "hgcm_connected"]

    async def test_the_last_abandoned_call_to_return_releases_the_session(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: trio.abc.Clock
    ) -> None:
        """With two abandoned calls, the session stays open (its client connected) until
        the second returns too."""
        client = await open_client(host)
        host.set_delay(RequestType.HGCM_CONNECT, HELD_S)
        host.set_delay(RequestType.GET_HOST_VERSION, 2 * HELD_S)
        with trio.fail_after(3 * HELD_S), capture_logs():
            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                for request in (HgcmConnect(ECHO), GetHostVersion()):
                    nursery.start_soon(
                        _request_in, trio.CancelScope(deadline=began + DEADLINE_S), client, request
                    )
            await client.transport.aclose()
            await trio.sleep_until(began + HELD_S)  # the connect's hold ends
            await trio.testing.wait_all_tasks_blocked()
            assert client.transport.session in host.driver.sessions
            assert host.vmmdev.hgcm.client_count == 1
            await trio.sleep_until(began + 2 * HELD_S)  # the other's hold ends
            await trio.testing.wait_all_tasks_blocked()
        assert client.transport.session not in host.driver.sessions
        assert echo.disconnected == echo.connected
        assert host.vmmdev.hgcm.client_count == 0

    async def test_a_deferred_release_goes_on_past_a_refused_report(
        self, host: SimulatedHost, autojump_clock: trio.abc.Clock
    ) -> None:
        """A deferred release whose capability report the host refuses releases the session
        in the abandoned call's task all the same: the driver ignores the refusal at a
        close, as the kernel does."""
        client = await open_client(host)
        await client.request(ChangeGuestCapabilities(4, 0))
        host.set_delay(RequestType.GET_HOST_VERSION, HELD_S)
        with trio.fail_after(2 * HELD_S), capture_logs() as logs:
            began = trio.current_time()
            with trio.move_on_after(DEADLINE_S):
                await client.request(GetHostVersion())
            await client.transport.aclose()
            host.add_fault(RequestType.SET_GUEST_CAPABILITIES, VERR_GENERAL_FAILURE)
            await trio.sleep_until(began + HELD_S)  # the host's hold ends
            await trio.testing.wait_all_tasks_blocked()
        assert client.transport.session not in host.driver.sessions
        events = [entry["event"] for entry in logs]
        assert events == ["ioctl_abandoned", "close_deferred"]


class TestHostControl:
    """Restore, reset and guest-property control on a running host."""

    async def test_restore_keeps_hgcm_calls(
        self, host: SimulatedHost, echo: EchoService, autojump_clock: object
    ) -> None:
        """A call pending across a restore is re-submitted and completes afterwards."""
        client = await open_client(host)
        client_id = (await client.request(HgcmConnect(ECHO))).client_id
        old_id = (await client.request(GetSessionId())).value
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                async def restore_then_complete() -> None:
                    await trio.testing.wait_all_tasks_blocked()
                    host.restore()
                    echo.held[0].complete(5)

                nursery.start_soon(restore_then_complete)
                reply = await client.request(HgcmCall(client_id, FN_HOLD, ()))
        assert reply.status == 5
        assert old_id != (await client.request(GetSessionId())).value

    async def test_reset_loses_sessions(self, host: SimulatedHost, autojump_clock: object) -> None:
        """After a reset old sessions fail with ENODEV and new ones work."""
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.VRDP, 0))
        errors: list[int] = []

        async def wait() -> None:
            try:
                await client.request(WaitForEvents(Event.VRDP))
            except OSError as exc:
                errors.append(exc.errno or 0)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                await host.reset()
        assert errors == [errno.ENODEV]
        await client.transport.aclose()
        fresh = await open_client(host)
        await fresh.request(GetSessionId())
        assert host.status()["hgcm_clients"] == 0

    async def test_properties_and_events(self, host: SimulatedHost) -> None:
        """Property control goes to the property service; bad event masks are refused."""
        host.prop_set("/Test/Name", "value")
        found = host.prop_get("/Test/Name")
        assert found is not None
        assert found[0] == "value"
        host.prop_delete("/Test/Name")
        assert host.prop_get("/Test/Name") is None
        for mask in (0, 0x800):
            with pytest.raises(ValueError, match="event mask"):
                host.raise_events(mask)

    async def test_without_property_service(self) -> None:
        """A host without the property service says so."""
        with pytest.raises(LookupError, match="no guest property service"):
            SimulatedHost(services=()).prop_get("/x")

    async def test_running_twice(self, host: SimulatedHost) -> None:
        """A host runs once at a time."""
        with (
            pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="already running")),
            trio.fail_after(5),
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)

    def test_bad_options(self) -> None:
        """Unknown personalities and non-positive RAM are refused."""
        with pytest.raises(ValueError, match="personality"):
            SimulatedHost(personality="windows")
        with pytest.raises(ValueError, match="RAM"):
            SimulatedHost(ram_mb=0)

    async def test_reset_needs_a_running_host(self) -> None:
        """reset() outside run() is an error."""
        with pytest.raises(RuntimeError, match="not running"):
            await SimulatedHost().reset()


def test_user_buffer_shape() -> None:
    """UserBuffer is what the transport maps (a guard against protocol drift)."""
    assert UserBuffer(8, bytearray(1)).address_offset == 8
