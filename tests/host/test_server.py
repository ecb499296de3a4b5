"""Tests of the simulated host's Unix-socket server (``agent.host.server``) with the real host.

Rules of this test module:
- server and client run in one trio test process, over a socket in a short private directory
  under /tmp (``sun_path`` holds 108 bytes; ``tmp_path`` may be longer);
- ioctls are built and read with the real protocol layer (``Session.encode``/``decode``), so
  the bytes are exactly what the agent sends;
- real clock; every test is bounded by ``fail_after(10)``; nurseries are explicit and the
  server is stopped by cancelling its nursery.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import socket
import stat
import struct
import tempfile
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import structlog
import trio
import trio.testing

from agent.device import open_device
from agent.device.errors import DeviceLostError
from agent.device.unix import UnixSocketOpener, UnixSocketTransport
from agent.host import SimulatedHost, server
from agent.host.control import ControlCommandError, HostUnreachableError, call_control
from agent.host.guest_props import SERVICE_NAME, GuestFunction
from agent.host.server import HostSocketError, serve_simulated_host
from agent.protocol import (
    ChangeFilterMask,
    Event,
    GetHostVersion,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCall,
    HgcmConnect,
    HgcmParam,
    HgcmReply,
    HgcmU32,
    HgcmU64,
    InterruptAllWaits,
    Log,
    Request,
    Session,
    WaitForEvents,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import RequestType
from agent.protocol.status import VERR_GENERAL_FAILURE, VERR_INTERRUPTED, VINF_SUCCESS
from agent.protocol.wire import (
    MAX_CONTROL_FRAME_SIZE,
    MAX_HELLO_FRAME_SIZE,
    MAX_HELLO_SIZE,
    MAX_JSON_SIZE,
    ControlReply,
    ControlRequest,
    ErrorFrame,
    FrameDecoder,
    FrameKind,
    Hello,
    IoctlReply,
    IoctlRequest,
    Role,
    encode_frame,
)
from tests.host.conftest import ECHO, FN_HOLD, EchoService, until
from tests.sim_support import garbage_host

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterator

    from agent.protocol.wire import Frame

R = TypeVar("R")


@pytest.fixture(name="socket_path")
def _socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(dir="/tmp", prefix="vbx-")
    yield os.path.join(directory, "host.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(name="host")
def _host() -> SimulatedHost:
    return SimulatedHost(personality="mainline")


@pytest.fixture(name="threaded_host", params=["mainline", "kernel"])
def _threaded_host(request: pytest.FixtureRequest) -> SimulatedHost:
    """A mainline host, and a kernel one (its port writes come from the real driver's threads)."""
    if request.param == "kernel":
        request.getfixturevalue("kernel_library")
    return SimulatedHost(personality=request.param)


async def start(nursery: trio.Nursery, host: SimulatedHost, path: str) -> None:
    """Run ``host`` and its server in ``nursery``; return once the socket listens."""
    await nursery.start(host.run)
    await nursery.start(serve_simulated_host, host, path)


async def request(session: Session, transport: UnixSocketTransport, req: Request[R]) -> R:
    """Encode ``req``, perform it through ``transport`` and decode the reply."""
    call = session.encode(req)
    try:
        await transport.ioctl(call.code, call.buffer, call.user_buffers)
    except BaseException:
        session.call_failed(call)
        raise
    return session.decode(call)


async def raw_exchange(path: str, data: bytes) -> list[Frame]:
    """Send ``data`` on a fresh connection; return every frame the host sends until EOF."""
    stream = await trio.open_unix_socket(path)
    frames: list[Frame] = []
    async with stream:
        await stream.send_all(data)
        decoder = FrameDecoder()
        while chunk := await stream.receive_some(4096):
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    return frames


async def receive_frames(stream: trio.SocketStream, count: int) -> list[Frame]:
    """Read frames from ``stream`` until ``count`` arrived."""
    decoder = FrameDecoder()
    frames: list[Frame] = []
    while len(frames) < count:
        data = await stream.receive_some(4096)
        assert data, f"EOF after {frames}"
        decoder.feed(data)
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    return frames


class TestDeviceSessions:
    """Device connections carry real ioctls."""

    async def test_host_version(self, socket_path: str, host: SimulatedHost) -> None:
        """GET_HOST_VERSION travels encoded by the protocol layer and decodes."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                version = await request(Session(), transport, GetHostVersion())
                assert version.major >= 6
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_a_vm_reset_loses_the_device(self, socket_path: str, host: SimulatedHost) -> None:
        """After a VM reset the old boot's sessions get ENODEV over the socket too, which the
        device layer raises as DeviceLostError (the connection itself stays up)."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                async with open_device(UnixSocketOpener(socket_path)) as device:
                    await host.reset()
                    with pytest.raises(DeviceLostError) as info:
                        await device.request(GetHostVersion())
                nursery.cancel_scope.cancel()
        assert str(info.value) == "VMMDEVREQ_GET_HOST_VERSION failed: the device is gone (ENODEV)"

    async def test_wait_ended_by_interrupt_all(self, socket_path: str, host: SimulatedHost) -> None:
        """A blocked WAIT_FOR_EVENTS ends with EINTR when INTERRUPT_ALL arrives on its session."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                failures: list[int | None] = []

                async def wait() -> None:
                    try:
                        await request(session, transport, WaitForEvents(Event.RESTORED))
                    except OSError as exc:
                        failures.append(exc.errno)

                async with trio.open_nursery() as waiters:
                    waiters.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    await request(session, transport, InterruptAllWaits())
                assert failures == [errno.EINTR]
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_cancelled_wait_leaves_no_orphan(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """A cancelled wait ends at the host too, so the next wait gets the event."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                await request(session, transport, ChangeFilterMask(Event.RESTORED, 0))
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(request, session, transport, WaitForEvents(Event.RESTORED))
                    await trio.testing.wait_all_tasks_blocked()  # the wait is at the host
                    waiters.cancel_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert host.status()["sessions"] == 1
                host.raise_events(Event.RESTORED)
                received = await request(session, transport, WaitForEvents(Event.RESTORED))
                assert received.mask & Event.RESTORED
                await transport.aclose()
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize("personality", ["mainline", "oracle"])
    async def test_an_interrupted_call_is_answered_as_its_driver_returns(
        self, socket_path: str, personality: str
    ) -> None:
        """A CANCEL ends a held HGCM call as a signal does in the driver (which cancels it at
        the host), and the reply is what that driver's ioctl returns: mainline's EINTR (the
        client raises the cancellation), Oracle's 0 with VERR_INTERRUPTED in ``hdr.rc``
        and the header copied back (``VGDrvCommonIoCtl``; the client returns it)."""
        echo = EchoService()
        host = SimulatedHost(personality=personality, services=[echo])
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                client_id = (await request(session, transport, HgcmConnect(ECHO))).client_id
                call = session.encode(HgcmCall(client_id, FN_HOLD, (HgcmU32(1),)))
                returned: list[int] = []
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as calls:

                        async def held() -> None:
                            await transport.ioctl(call.code, call.buffer, call.user_buffers)
                            returned.append(L.IoctlHeader.rc.get(call.buffer))

                        calls.start_soon(held)
                        await trio.testing.wait_all_tasks_blocked()  # the call is at the host
                        assert len(echo.held) == 1
                        scope.cancel()
                assert returned == ([VERR_INTERRUPTED] if personality == "oracle" else [])
                assert (len(echo.cancelled), echo.held) == (1, [])
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_hgcm_call_with_user_buffers(self, socket_path: str, host: SimulatedHost) -> None:
        """A guest-property GET_PROP reads the name and writes the value through user buffers."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                await call_control(
                    socket_path, {"command": "prop_set", "name": "/VM/x", "value": "hello"}
                )
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                client = await request(session, transport, HgcmConnect(SERVICE_NAME))
                params = (
                    HgcmBufferIn(b"/VM/x\0"),
                    HgcmBufferOut(64),
                    HgcmU64(0),
                    HgcmU32(0),
                )
                reply = await request(
                    session, transport, HgcmCall(client.client_id, GuestFunction.GET_PROP, params)
                )
                assert reply.params[1].data.startswith(b"hello\0")  # type: ignore[union-attr]
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_vanished_client_releases_its_session(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """A client that disappears mid-wait loses its HGCM clients and filter bits."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                before = host.status()
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                await request(session, transport, HgcmConnect(SERVICE_NAME))
                await request(session, transport, ChangeFilterMask(Event.RESTORED, 0))
                busy = host.status()
                assert isinstance(clients := before["hgcm_clients"], int)
                assert busy["hgcm_clients"] == clients + 1
                assert isinstance(mask := busy["filter_mask"], int)
                assert mask & Event.RESTORED

                async def wait() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await request(session, transport, WaitForEvents(Event.RESTORED))

                async with trio.open_nursery() as waiters:
                    waiters.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    await transport.aclose()
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert host.status() == before
                nursery.cancel_scope.cancel()

    async def test_a_close_the_host_refuses_leaves_the_host_serving(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """A client that goes while the host refuses the filter reset (``host fault
        CTL_GUEST_FILTER_MASK VERR_GENERAL_FAILURE --count 3``) loses its HGCM clients all
        the same, as the kernel ignores the refusal, and the host serves on."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                before = host.status()
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                await request(session, transport, HgcmConnect(SERVICE_NAME))
                await request(session, transport, ChangeFilterMask(Event.RESTORED, 0))
                host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_GENERAL_FAILURE, count=3)
                await transport.aclose()
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert host.status()["hgcm_clients"] == before["hgcm_clients"]
                transport = await UnixSocketOpener(socket_path).open_session()
                assert (await request(Session(), transport, GetHostVersion())).features & 1
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_power_off_ends_a_close_held_by_delayed_disconnects(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """A client that goes while the host holds HGCM_DISCONNECT (``host delay
        HGCM_DISCONNECT 3``) leaves the server closing its session, one held disconnect after
        the other; powering the host off ends the one held and holds none of the rest, so
        the host stops at once."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                for _ in range(2):
                    await request(session, transport, HgcmConnect(SERVICE_NAME))
                host.set_delay(RequestType.HGCM_DISCONNECT, 3.0)
                await transport.aclose()
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                stopped_at = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() - stopped_at < 1.0

    async def test_reset_connection_does_not_stop_the_host(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """A client that closes with the host's replies unread (ECONNRESET) leaves it serving."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                before = host.status()
                wait = Session().encode(WaitForEvents(Event.RESTORED))
                stream = await trio.open_unix_socket(socket_path)
                await stream.send_all(
                    encode_frame(Hello(Role.DEVICE))
                    + encode_frame(IoctlRequest(1, wait.code, bytes(wait.buffer), ()))
                )
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                await stream.aclose()  # the host's HELLO is unread: the kernel resets
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                assert host.status() == before
                transport = await UnixSocketOpener(socket_path).open_session()
                assert (await request(Session(), transport, GetHostVersion())).features & 1
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_a_client_that_reads_no_replies_is_held_back(
        self, socket_path: str, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client sending ioctls without reading the replies is no longer read once its
        unsent replies pass UNSENT_LIMIT, so the host holds a bounded amount for it (every
        request was read and answered into memory: gigabytes within SEND_GRACE_S); when
        it goes, the host serves on."""
        monkeypatch.setattr(server, "UNSENT_LIMIT", 1 << 20)
        size = 256 << 10
        log = Session().encode(Log(b"x" * (size - 24)))
        run = host.ioctl
        calls = 0

        async def counted(*args: Any) -> None:
            nonlocal calls
            calls += 1
            await run(*args)

        monkeypatch.setattr(host, "ioctl", counted)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                stream = await trio.open_unix_socket(socket_path)

                async def flood() -> None:
                    await stream.send_all(encode_frame(Hello(Role.DEVICE)))
                    for seq in range(1, 41):
                        request = IoctlRequest(seq, log.code, bytes(log.buffer), ())
                        await stream.send_all(encode_frame(request))

                async with trio.open_nursery() as client:
                    client.start_soon(flood)
                    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                    assert 4 <= calls <= 12
                    client.cancel_scope.cancel()
                await stream.aclose()
                transport = await UnixSocketOpener(socket_path).open_session()
                assert (await request(Session(), transport, GetHostVersion())).features & 1
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_drop_loses_device_connections(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """The drop control command closes device connections; their calls see DeviceLostError."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                lost: list[DeviceLostError] = []

                async def wait() -> None:
                    try:
                        await request(session, transport, WaitForEvents(Event.RESTORED))
                    except DeviceLostError as exc:
                        lost.append(exc)

                async with trio.open_nursery() as waiters:
                    waiters.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    result = await call_control(socket_path, {"command": "drop"})
                assert result == {"dropped": 1, "closing": 0}
                assert len(lost) == 1
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_drop_answers_while_a_delay_holds_a_session(
        self, socket_path: str, threaded_host: SimulatedHost
    ) -> None:
        """A drop answers at once when a delay holds a request of a connection in the
        port write, counting that connection as still closing (``status`` shows the held
        request); ending the delay releases the write, then the session closes and the
        client's connection ends."""
        host = threaded_host
        version = RequestType.GET_HOST_VERSION

        async def control(**payload: object) -> object:
            return await call_control(socket_path, payload)

        async def status() -> dict[str, Any]:
            result = await control(command="status")
            assert isinstance(result, dict)
            return result

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                await control(command="delay", request=version, seconds=1000.0)
                async with trio.open_nursery() as guest:
                    guest.start_soon(_lose, request(Session(), transport, GetHostVersion()))
                    await until(lambda: host.vmmdev.port_writes_held == 1)  # driver threads
                    dropped = await control(command="drop")
                    held = await status()
                    await control(command="delay", request=version, seconds=0)
                released = await status()  # the connection ended once the session closed
                await transport.aclose()
                nursery.cancel_scope.cancel()
        assert dropped == {"dropped": 1, "closing": 1}
        assert (held["held_requests"], held["sessions"]) == ({"GET_HOST_VERSION": 1}, 1)
        assert (released["held_requests"], released["sessions"]) == ({}, 0)

    async def test_drop_answers_while_a_close_waits_behind_a_held_write(
        self, socket_path: str, host: SimulatedHost, mock_clock: trio.testing.MockClock
    ) -> None:
        """A session whose close waits for the driver's session mutex, which another
        session's held filter change keeps, does not hold up a drop: it answers after
        ``DROP_GRACE_S``, counting both sessions as closing, and both close once the
        delay ends. The clock autojumps once the server listens (trio binds the socket in
        a thread, which the jumps would not wait for)."""
        mask = RequestType.CTL_GUEST_FILTER_MASK

        async def control(**payload: object) -> object:
            return await call_control(socket_path, payload)

        change = ChangeFilterMask(or_mask=int(Event.DISPLAY_CHANGE_REQUEST), not_mask=0)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                mock_clock.autojump_threshold = 0
                holder = await UnixSocketOpener(socket_path).open_session()
                waiter = await UnixSocketOpener(socket_path).open_session()
                await control(command="delay", request=mask, seconds=1000.0)
                async with trio.open_nursery() as guest:
                    guest.start_soon(_lose, request(Session(), holder, change))  # holds the mutex
                    await until(lambda: host.vmmdev.port_writes_held == 1)
                    asked = trio.current_time()
                    dropped = await control(command="drop")
                    waited = trio.current_time() - asked
                    await control(command="delay", request=mask, seconds=0)
                released = await control(command="status")
                await holder.aclose()
                await waiter.aclose()
                nursery.cancel_scope.cancel()
        assert dropped == {"dropped": 2, "closing": 2}
        assert waited == pytest.approx(server.DROP_GRACE_S)
        assert isinstance(released, dict)
        assert released["sessions"] == 0


async def _lose(call: Awaitable[object]) -> None:
    """Await ``call``, which the drop ends with DeviceLostError."""
    with pytest.raises(DeviceLostError):
        await call


class TestRobustness:
    """The server survives misbehaving clients."""

    async def test_garbage_gets_an_error_frame(self, socket_path: str, host: SimulatedHost) -> None:
        """Garbage gets an ERROR frame and a closed connection; the server serves on."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                [error] = await raw_exchange(socket_path, b"\x05\x00\x00\x00\x09garbage")
                assert error == ErrorFrame("unknown frame kind 9")
                [error] = await raw_exchange(socket_path, struct.pack("<I", 1 << 30))
                assert isinstance(error, ErrorFrame)
                hello = encode_frame(Hello(Role.DEVICE))
                frames = await raw_exchange(socket_path, hello + hello)
                assert frames[0] == Hello(Role.HOST)
                assert isinstance(frames[1], ErrorFrame)
                assert "expected a new IOCTL request" in frames[1].message
                control = encode_frame(Hello(Role.CONTROL))
                frames = await raw_exchange(socket_path, control + hello)
                assert [Hello(Role.HOST)] == frames[:1]
                assert isinstance(frames[1], ErrorFrame)
                transport = await UnixSocketOpener(socket_path).open_session()
                await request(Session(), transport, GetHostVersion())
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_a_failed_accept_is_tried_again(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """``accept(2)`` failing for want of descriptors (a real EMFILE) is logged once and
        tried again after ``ACCEPT_PAUSE_S``; the connection it left queued is then served
        (the error ended the simulator)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with trio.fail_after(10), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                client = socket.socket(socket.AF_UNIX)
                client.connect(socket_path)
                lowest_free = os.dup(client.fileno())
                os.close(lowest_free)
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
                try:
                    await trio.testing.wait_all_tasks_blocked()
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                failed = [log for log in logs if log["event"] == "host_accept_failed"]
                assert [log["error"] for log in failed] == ["EMFILE"]
                async with trio.SocketStream(trio.socket.from_stdlib_socket(client)) as stream:
                    hello = encode_frame(Hello(Role.CONTROL))
                    await stream.send_all(hello + encode_frame(ControlRequest({"command": "x"})))
                    frames = await receive_frames(stream, 2)
                assert frames[0] == Hello(Role.HOST)
                assert isinstance(frames[1], ControlReply)
                assert frames[1].payload["ok"] is False
                nursery.cancel_scope.cancel()

    async def test_a_client_without_a_hello_is_closed(
        self, socket_path: str, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A client that sends nothing, or only part of its HELLO, gets an ERROR and is
        closed ``HELLO_GRACE_S`` after it connected (such clients held their descriptors
        until the host ran out of them)."""
        monkeypatch.setattr(server, "HELLO_GRACE_S", 0.2)
        part = encode_frame(Hello(Role.CONTROL))[:-3]
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                for sent in (b"", part):
                    started = trio.current_time()
                    [error] = await raw_exchange(socket_path, sent)
                    assert error == ErrorFrame("no HELLO within 0.2 s")
                    assert trio.current_time() - started >= 0.2
                await call_control(socket_path, {"command": "status"})
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("hello", "frame", "named"),
        [
            (Role.DEVICE, IoctlReply(1, 0, b"x" * (2 << 20)), "IOCTL_REPLY"),
            (Role.CONTROL, ErrorFrame("y" * MAX_JSON_SIZE), "ERROR"),
        ],
    )
    async def test_a_huge_unexpected_frame_is_named_not_echoed(
        self, socket_path: str, host: SimulatedHost, hello: Role, frame: Frame, named: str
    ) -> None:
        """A large frame of the wrong kind gets a short ERROR naming its kind; the server
        serves on (echoing it made an ERROR frame over its limit and ended the simulator)."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                data = encode_frame(Hello(hello)) + encode_frame(frame)
                frames = await raw_exchange(socket_path, data)
                assert frames[0] == Hello(Role.HOST)
                assert isinstance(frames[1], ErrorFrame)
                assert named in frames[1].message
                assert len(frames[1].message) < 100
                await call_control(socket_path, {"command": "status"})
                nursery.cancel_scope.cancel()

    async def test_a_huge_hello_field_is_not_echoed(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """A HELLO whose role is a long string gets a short ERROR; the server serves on."""
        body = json.dumps({"wire": 1, "role": "r" * (MAX_HELLO_SIZE - 100)}).encode()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                data = struct.pack("<IB", len(body) + 1, FrameKind.HELLO) + body
                [error] = await raw_exchange(socket_path, data)
                assert isinstance(error, ErrorFrame)
                assert "HELLO role" in error.message
                assert len(error.message) < 300
                await call_control(socket_path, {"command": "status"})
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("hello", "kind", "limit"),
        [
            (None, FrameKind.HELLO, MAX_HELLO_FRAME_SIZE),
            (Role.CONTROL, FrameKind.CONTROL_REQUEST, MAX_CONTROL_FRAME_SIZE),
        ],
        ids=["before-hello", "control"],
    )
    async def test_a_length_over_the_connection_s_limit_is_refused_at_once(
        self, socket_path: str, host: SimulatedHost, hello: Role | None, kind: int, limit: int
    ) -> None:
        """A length prefix longer than the connection's state admits (a HELLO's before the
        HELLO, a CONTROL frame's on a control connection) gets an ERROR before any of its
        body comes (the host buffered up to 64 MiB of it first)."""
        sent = b"" if hello is None else encode_frame(Hello(hello))
        sent += struct.pack("<IB", limit + 1, kind)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                frames = await raw_exchange(socket_path, sent)
                assert frames[-1] == ErrorFrame(f"frame length {limit + 1} is outside 1..{limit}")
                await call_control(socket_path, {"command": "status"})
                nursery.cancel_scope.cancel()

    async def test_a_device_connection_takes_frames_over_the_control_limit(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """An ioctl frame longer than a CONTROL frame may be reaches the driver model on a
        device connection (a 2 MiB LOG request is answered)."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                await request(Session(), transport, Log(b"x" * (2 << 20)))
                await transport.aclose()
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("payload", "problem"),
        [
            ({"command": "delay", "request": 219, "seconds": 10**400}, "seconds"),
            ({"command": "fault", "request": 219, "status": 1 << 40, "count": 1}, "status"),
        ],
    )
    async def test_control_values_out_of_range_are_refused(
        self, socket_path: str, host: SimulatedHost, payload: dict[str, object], problem: str
    ) -> None:
        """Numbers no host accepts are refused with one line; the host runs on (an integer
        too large for a float ended it, a status beyond 32 bits ended it when the fault fired)."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                with pytest.raises(ControlCommandError, match=problem):
                    await call_control(socket_path, payload)
                await call_control(socket_path, {"command": "status"})
                nursery.cancel_scope.cancel()

    async def test_an_infinite_delay_is_refused(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """JSON's 1e400 is an infinite float: refused (accepted, it held that request type
        until power-off and logged a non-JSON ``Infinity``)."""
        body = b'{"command":"delay","request":219,"seconds":1e400}'
        request = struct.pack("<IB", len(body) + 1, FrameKind.CONTROL_REQUEST) + body
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                stream = await trio.open_unix_socket(socket_path)
                async with stream:
                    await stream.send_all(encode_frame(Hello(Role.CONTROL)) + request)
                    decoder = FrameDecoder()
                    frames: list[Frame] = []
                    while len(frames) < 2:
                        decoder.feed(await stream.receive_some(4096))
                        while (frame := decoder.next_frame()) is not None:
                            frames.append(frame)
                assert frames[1] == ControlReply(
                    {
                        "ok": False,
                        "error": "control command 'delay' needs seconds as a finite float",
                    }
                )
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        "payload",
        [
            {"command": "x" * (MAX_JSON_SIZE - 30)},
            {"command": "cpu", "action": "p" * (MAX_JSON_SIZE - 60), "core": 1, "package": 0},
        ],
        ids=["unknown-command", "cpu-action"],
    )
    async def test_a_huge_refused_command_is_not_echoed(
        self, socket_path: str, host: SimulatedHost, payload: dict[str, object]
    ) -> None:
        """A refused command whose name or action fills a CONTROL body gets a short error;
        the server serves on (echoed whole, the answer broke MAX_JSON_SIZE and ended it)."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                with pytest.raises(ControlCommandError) as refused:
                    await call_control(socket_path, payload)
                assert len(str(refused.value)) < 300
                await call_control(socket_path, {"command": "status"})
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("payload", "event"),
        [
            ({"command": "x" * (MAX_JSON_SIZE - 30)}, "control_command_refused"),
            (
                {"command": "prop_set", "name": "/a", "value": "v" * (MAX_JSON_SIZE - 100)},
                "control_command_refused",
            ),
            ({"command": "status", "junk": "j" * (MAX_JSON_SIZE - 100)}, "control_command"),
            ({"command": "status", "k" * (MAX_JSON_SIZE - 100): 0}, "control_command"),
            ({"command": "status", "n": [0] * (MAX_JSON_SIZE // 4)}, "control_command"),
            ({"command": "status", **{f"k{i}": i for i in range(10_000)}}, "control_command"),
        ],
        ids=["unknown-command", "prop_set-value", "extra-argument", "key", "list", "many-keys"],
    )
    async def test_a_huge_command_is_logged_short(
        self, socket_path: str, host: SimulatedHost, payload: dict[str, object], event: str
    ) -> None:
        """The log line of a command whose name, an argument, its key or their number fills
        a CONTROL body is as short as a reply quotes it, and says how many arguments it
        left off (logged whole, it was up to MAX_JSON_SIZE; just over the log's line limit,
        none at all)."""
        with trio.fail_after(20), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                with contextlib.suppress(ControlCommandError):
                    await call_control(socket_path, payload)
                nursery.cancel_scope.cancel()
        [line] = [log for log in logs if log["event"].startswith("control_command")]
        assert line["event"] == event
        assert len(json.dumps(line)) < 2000
        given = len(payload) - 1
        assert len(line["arguments"]) == min(given, server.LOGGED_ARGUMENTS)
        assert line.get("arguments_left_off", 0) == max(given - server.LOGGED_ARGUMENTS, 0)

    @pytest.mark.parametrize(
        "payload",
        [
            {"command": "balloon", "mb": 1},
            {"command": "prop_set", "name": "/a", "value": "v", "flags": ""},
            {"command": "prop_get", "name": "/a"},
            {"command": "prop_delete", "name": "/a"},
            {"command": "event", "mask": 1},
            {"command": "cpu", "action": "plug", "core": 1, "package": 0},
            {"command": "stats_interval", "seconds": 1},
            {"command": "fault", "request": 219, "status": -1, "count": 1},
            {"command": "fault_clear", "request": 219},
            {"command": "delay", "request": 219, "seconds": 0.0},
        ],
        ids=lambda payload: str(payload["command"]),
    )
    async def test_no_refusal_echoes_a_huge_argument(
        self, socket_path: str, host: SimulatedHost, payload: dict[str, object]
    ) -> None:
        """Each argument of each command, given as a string that fills a CONTROL body, is
        refused in one short line."""
        huge = "x" * (MAX_JSON_SIZE - 200)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                for name in payload.keys() - {"command"}:
                    with pytest.raises(ControlCommandError) as refused:
                        await call_control(socket_path, {**payload, name: huge})
                    assert len(str(refused.value)) < 400, name
                nursery.cancel_scope.cancel()

    async def test_an_answer_too_large_to_send_ends_only_its_connection(
        self, socket_path: str, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An answer over the wire's limits (a host bug) is logged and gets that client an
        ERROR; the server serves the next one (the encoder's error ended it)."""
        huge = {"x": "y" * MAX_JSON_SIZE}
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                with monkeypatch.context() as patched:
                    patched.setattr(host, "status", lambda: huge)
                    with (
                        structlog.testing.capture_logs() as logs,
                        pytest.raises(HostUnreachableError, match="cannot encode its reply"),
                    ):
                        await call_control(socket_path, {"command": "status"})
                [logged] = [log for log in logs if log["event"] == "host_reply_unencodable"]
                assert "MAX_JSON_SIZE" in logged["error"]
                status = await call_control(socket_path, {"command": "status"})
                assert isinstance(status, dict)
                nursery.cancel_scope.cancel()

    async def test_control_errors(self, socket_path: str, host: SimulatedHost) -> None:
        """Refused and unknown control commands answer with one-line errors."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                with pytest.raises(ControlCommandError, match="unknown control command"):
                    await call_control(socket_path, {"command": "explode"})
                with pytest.raises(ControlCommandError, match="needs mb as int"):
                    await call_control(socket_path, {"command": "balloon", "mb": "x"})
                with pytest.raises(ControlCommandError, match="90%"):
                    await call_control(socket_path, {"command": "balloon", "mb": 1 << 20})
                with pytest.raises(ControlCommandError, match="not set"):
                    await call_control(socket_path, {"command": "prop_get", "name": "/nope"})
                await call_control(socket_path, {"command": "balloon", "mb": 128})
                status = await call_control(socket_path, {"command": "status"})
                assert isinstance(status, dict)
                nursery.cancel_scope.cancel()

    async def test_a_property_read_only_for_the_host_is_refused(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """A host delete or set of a property the guest made read-only for the host
        (RDONLYHOST, READONLY) is refused on one line with the service's status, as
        VBoxGuestPropSvc answers the host; the host serves on and the guest's session, HGCM
        client and properties stay (the refusal escaped as a PermissionError: ``simulate``
        exited 70 and every agent lost its device)."""
        refusals: list[tuple[dict[str, object], str]] = [
            (
                {"command": "prop_delete", "name": "/Guest/ro"},
                "deleting guest property /Guest/ro (read-only for the host) failed: "
                "VERR_PERMISSION_DENIED (-10)",
            ),
            (
                {"command": "prop_set", "name": "/Guest/d", "value": "w"},
                "setting guest property /Guest/d (read-only for the host) failed: "
                "VERR_PERMISSION_DENIED (-10)",
            ),
        ]
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                session = Session()
                client = (await request(session, transport, HgcmConnect(SERVICE_NAME))).client_id

                async def guest_call(function: int, *params: HgcmParam) -> HgcmReply:
                    call = HgcmCall(client, function, params)
                    return await request(session, transport, call)

                for name, flags in ((b"/Guest/ro", b"RDONLYHOST"), (b"/Guest/d", b"READONLY")):
                    texts = (name, b"v", flags)
                    reply = await guest_call(
                        GuestFunction.SET_PROP, *(HgcmBufferIn(text + b"\0") for text in texts)
                    )
                    assert reply.status == VINF_SUCCESS
                for payload, line in refusals:
                    with pytest.raises(ControlCommandError) as info:
                        await call_control(socket_path, payload)
                    assert str(info.value) == line
                reply = await guest_call(
                    GuestFunction.GET_PROP,
                    HgcmBufferIn(b"/Guest/d\0"),
                    HgcmBufferOut(64),
                    HgcmU64(0),
                    HgcmU32(0),
                )
                assert reply.params[1].data.startswith(b"v\0READONLY\0")  # type: ignore[union-attr]
                assert host.prop_get("/Guest/ro") is not None
                await transport.aclose()
                nursery.cancel_scope.cancel()


class TestFaultCommands:
    """Faults and delays over the control socket: queued, shown in ``status``, cleared."""

    async def test_status_lists_faults_and_delays_until_cleared(
        self, socket_path: str, host: SimulatedHost
    ) -> None:
        """``status`` shows the queued faults and the active delays; ``fault_clear`` with a
        request drops that type's faults, without one every fault, answering how many
        answers it dropped; a delay of 0 ends the delay."""
        change, session = RequestType.CHANGE_MEMBALLOON, RequestType.GET_SESSION_ID

        async def control(**payload: object) -> object:
            return await call_control(socket_path, payload)

        async def status() -> dict[str, Any]:
            result = await control(command="status")
            assert isinstance(result, dict)
            return result

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                assert ((await status())["faults"], (await status())["delays"]) == ([], {})
                await control(command="fault", request=change, status=-8, count=2)
                await control(command="fault", request=session, status=-10, count=1)
                await control(command="delay", request=RequestType.GUEST_HEARTBEAT, seconds=0.5)
                shown = await status()
                assert shown["faults"] == [
                    {"request": "CHANGE_MEMBALLOON", "status": "VERR_NO_MEMORY", "remaining": 2},
                    {
                        "request": "GET_SESSION_ID",
                        "status": "VERR_PERMISSION_DENIED",
                        "remaining": 1,
                    },
                ]
                assert shown["delays"] == {"GUEST_HEARTBEAT": 0.5}
                assert await control(command="fault_clear", request=change) == {"cleared": 2}
                assert [f["request"] for f in (await status())["faults"]] == ["GET_SESSION_ID"]
                assert await control(command="fault_clear") == {"cleared": 1}
                assert await control(command="fault_clear") == {"cleared": 0}
                await control(command="delay", request=RequestType.GUEST_HEARTBEAT, seconds=0)
                assert ((await status())["faults"], (await status())["delays"]) == ([], {})
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("payload", "problem"),
        [
            ({"command": "fault", "request": 219, "status": -1, "count": 0}, "[1, 4294967295]"),
            (
                {
                    "command": "fault",
                    "request": 219,
                    "status": -1,
                    "count": 99999999999999999999999,
                },
                "[1, 4294967295], got 99999999999999999999999",
            ),
            ({"command": "fault_clear", "request": "GUEST_HEARTBEAT"}, "needs request as int"),
            ({"command": "fault_clear", "request": 9999}, "9999"),
        ],
    )
    async def test_bad_fault_commands_are_refused(
        self, socket_path: str, host: SimulatedHost, payload: dict[str, object], problem: str
    ) -> None:
        """A count outside [1, MAX_FAULT_COUNT], or a clear naming no request type, is one
        line; nothing is queued and the host runs on."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                with pytest.raises(ControlCommandError) as refused:
                    await call_control(socket_path, payload)
                assert problem in str(refused.value)
                assert host.status()["faults"] == []
                nursery.cancel_scope.cancel()


class TestControlClient:
    """``call_control`` waits a bounded time for a host that is starting."""

    async def test_waits_for_a_starting_host(self, socket_path: str, host: SimulatedHost) -> None:
        """A command sent before the host listens is served once it does, and logged there."""
        results: list[object] = []
        done = trio.Event()

        async def call_early() -> None:
            command = {"command": "balloon", "mb": 64}
            results.append(await call_control(socket_path, command, start_wait_s=5))
            done.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call_early)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()
                with structlog.testing.capture_logs() as logs:
                    await start(nursery, host, socket_path)
                    await done.wait()
                nursery.cancel_scope.cancel()
        assert results == [None]
        assert host.status()["balloon"]["target_mb"] == 64  # type: ignore[index]
        served = [line for line in logs if line["event"] == "control_command"]
        assert served == [
            {
                "component": "simulated-host",
                "event": "control_command",
                "command": "balloon",
                "arguments": {"mb": 64},
                "log_level": "info",
            }
        ]

    async def test_gives_up_after_the_wait(
        self, socket_path: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """No host within ``start_wait_s``: HostUnreachableError saying how long it waited."""
        with pytest.raises(HostUnreachableError) as info:
            await call_control(socket_path, {"command": "status"}, start_wait_s=5)
        assert trio.current_time() >= 5
        # as `prop` and `run` say it (tests/device/test_unix.py)
        assert str(info.value) == (
            f"no simulated host at {socket_path} (No such file or directory; waited 5 s for it "
            f"to start): start one with `vbox-agent simulate --socket {socket_path}`"
        )

    async def test_a_path_not_utf8_is_named_as_every_command_names_it(
        self, socket_path: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A path byte that is not UTF-8 is named ``\\x85``, as ``prop``, ``run`` and
        ``simulate`` name it (tests/device/test_unix.py), not as Python's surrogate escape
        ``\\udc85``: the command it suggests names the same path."""
        directory = os.path.dirname(socket_path)
        path = os.path.join(directory, os.fsdecode(b"h\x85.sock"))
        shown = f"{directory}/h\\x85.sock"
        with pytest.raises(HostUnreachableError) as missing:
            await call_control(path, {"command": "status"}, start_wait_s=5)
        assert str(missing.value) == (
            f"no simulated host at {shown} (No such file or directory; waited 5 s for it "
            f"to start): start one with `vbox-agent simulate --socket {shown}`"
        )
        os.mkdir(path)
        with pytest.raises(HostUnreachableError) as taken:
            await call_control(path, {"command": "status"})
        assert str(taken.value) == f"no simulated host at {shown}: it exists and is not a socket"

    async def test_a_malformed_frame_is_said(self, socket_path: str) -> None:
        """A host whose answer is no frame sent a malformed frame (it 'dropped the control
        connection')."""
        with trio.fail_after(10):
            async with garbage_host(socket_path):
                with pytest.raises(HostUnreachableError) as info:
                    await call_control(socket_path, {"command": "status"})
        assert str(info.value).startswith(
            f"simulated host at {socket_path} sent a malformed frame: "
        )

    async def test_no_wait_for_a_file_that_is_not_a_socket(
        self, socket_path: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A path that exists and is not a socket never becomes a host: no wait."""
        os.mkdir(socket_path)
        with pytest.raises(HostUnreachableError, match="it exists and is not a socket"):
            await call_control(socket_path, {"command": "status"}, start_wait_s=5)
        assert trio.current_time() == 0

    async def test_permission_denied_says_whose_socket(
        self, socket_path: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
    ) -> None:
        """A socket the caller may not connect to (another user's host; root is never refused,
        so the refusal is injected) fails at once, saying so instead of "no simulated host"."""

        async def refuse(_: str) -> trio.SocketStream:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(trio, "open_unix_socket", refuse)
        with pytest.raises(HostUnreachableError) as info:
            await call_control(socket_path, {"command": "status"}, start_wait_s=5)
        assert str(info.value) == (
            f"permission denied connecting to {socket_path} (a simulated host's socket is only "
            "for the user who started it)"
        )
        assert trio.current_time() == 0

    async def test_no_wait_by_default(self, socket_path: str) -> None:
        """Without ``start_wait_s`` a missing host fails at once."""
        with trio.fail_after(1), pytest.raises(HostUnreachableError, match="no simulated host"):
            await call_control(socket_path, {"command": "status"})


class TestSocketFile:
    """The socket file is private, replaces stale ones and is removed on exit."""

    async def test_mode_and_removal(self, socket_path: str, host: SimulatedHost) -> None:
        """The socket is mode 0600 while serving and gone afterwards."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                mode = (await trio.Path(socket_path).lstat()).st_mode
                assert stat.S_ISSOCK(mode)
                assert stat.S_IMODE(mode) == 0o600
                nursery.cancel_scope.cancel()
            assert not await trio.Path(socket_path).exists()

    async def test_stale_socket_is_replaced(self, socket_path: str, host: SimulatedHost) -> None:
        """A socket nobody listens on is replaced."""
        stale = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await stale.bind(socket_path)
        stale.close()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                version = await request(Session(), transport, GetHostVersion())
                assert version.major >= 6
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_live_socket_is_refused(self, socket_path: str, host: SimulatedHost) -> None:
        """A second server on a live socket fails and leaves the first one serving."""
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start(nursery, host, socket_path)
                with pytest.raises(HostSocketError, match="already listening"):
                    await serve_simulated_host(host, socket_path)
                transport = await UnixSocketOpener(socket_path).open_session()
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_non_socket_is_refused(self, socket_path: str, host: SimulatedHost) -> None:
        """A regular file at the path is never replaced."""
        await trio.Path(socket_path).write_text("keep me")
        with pytest.raises(HostSocketError, match="not a socket"):
            await serve_simulated_host(host, socket_path)
        assert await trio.Path(socket_path).read_text() == "keep me"

    @pytest.mark.parametrize(
        ("make", "strerror"),
        [
            pytest.param("file", "Not a directory", id="through-a-regular-file"),
            pytest.param("loop", "Too many levels of symbolic links", id="symlink-loop"),
        ],
    )
    async def test_unusable_path_is_one_error(
        self, socket_path: str, host: SimulatedHost, make: str, strerror: str
    ) -> None:
        """A path the server cannot even look at is a HostSocketError naming the reason."""
        directory = os.path.dirname(socket_path)
        if make == "file":
            await trio.Path(directory, "file").write_text("")
            path = os.path.join(directory, "file", "host.sock")
        else:
            os.symlink("b", os.path.join(directory, "a"))
            os.symlink("a", os.path.join(directory, "b"))
            path = os.path.join(directory, "a", "host.sock")
        with pytest.raises(HostSocketError) as raised:
            await serve_simulated_host(host, path)
        assert str(raised.value) == f"cannot listen at {path}: {strerror}"

    async def test_unreadable_path_is_one_error(
        self, socket_path: str, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No search permission on the way (an unprivileged user and /root) is a HostSocketError."""

        def lstat(path: str) -> os.stat_result:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

        with monkeypatch.context() as patch:
            patch.setattr(os, "lstat", lstat)
            with pytest.raises(HostSocketError) as raised:
                await serve_simulated_host(host, socket_path)
        assert str(raised.value) == f"cannot listen at {socket_path}: Permission denied"

    async def test_stale_socket_it_may_not_remove_is_one_error(
        self, socket_path: str, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another user's stale socket in a sticky directory (EPERM) is a HostSocketError."""
        stale = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await stale.bind(socket_path)
        stale.close()

        def unlink(path: str) -> None:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)

        with monkeypatch.context() as patch:
            patch.setattr(os, "unlink", unlink)
            with pytest.raises(HostSocketError) as raised:
                await serve_simulated_host(host, socket_path)
        assert str(raised.value) == f"cannot listen at {socket_path}: Operation not permitted"
