"""Tests of the Unix-socket transport (``agent.device.unix``) against a scripted host.

Rules of this test module:
- the real server (``serve_simulated_host``) runs in the test's own nursery, on a socket in a
  short private directory under /tmp (``sun_path`` holds 108 bytes; ``tmp_path`` may be longer);
- the host behind it is ``ScriptedHost``: ioctl numbers pick a behaviour, so each test sees
  exactly the concurrency it sets up (the real host is exercised in tests/host/test_server.py);
- real clock, every test bounded by ``fail_after(10)``, except the waits for a host that never
  comes and the give-up windows of a cancelled call (``ABANDON_AFTER_S``, ``GIVE_BACK_S``),
  which run on ``autojump_clock``: the host is a task of the test's own run and a Unix
  socket wakes its peer within the send or receive that makes it ready, so virtual time
  moves only when every task waits, while on the real clock a host reading 8 MiB under load
  can take longer than the 0.2 s window (trio binds a socket path on a worker thread, which
  autojump would jump over: listeners are bound before any deadline is set);
- nurseries are explicit in the test body; the server is stopped by cancelling its nursery.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
from functools import partial
from typing import TYPE_CHECKING

import pytest
import structlog
import trio
import trio.testing

from agent.device import open_device, unix
from agent.device.errors import DeviceLostError, DeviceUnavailableError, NotTheDeviceError
from agent.device.spec import (
    SocketOptions,
    cannot_be_the_device,
    check_socket_path,
    opener_for_spec,
    peer_uid,
)
from agent.device.unix import (
    HELLO_WAIT_S,
    HOST_BUSY_WAIT_S,
    HOST_START_WAIT_S,
    RECEIVE_SIZE,
    SEND_GRACE_S,
    USER_ADDRESS_BASE,
    VERSION_WAIT_S,
    UnixSocketOpener,
    UnixSocketTransport,
    cannot_be_a_host,
    untrusted_host,
)
from agent.host.server import serve_simulated_host
from agent.protocol import (
    Ioctl,
    Submission,
    UserBuffer,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import ABANDON_AFTER_S, GIVE_BACK_S, IOC_VERSION, PAGE_SIZE
from agent.protocol.wire import (
    ErrorFrame,
    FrameDecoder,
    Hello,
    IoctlReply,
    IoctlRequest,
    Role,
    encode_frame,
)
from tests.sim_support import garbage_host

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from agent.host.memory import GuestMemory
    from agent.protocol.wire import Frame

ECHO = 1  # each 16-byte slot of the buffer: u64 address, u64 size -> uppercase that memory
WAIT = 2  # blocks until INTERRUPT on the same session, then fails with EINTR
INTERRUPT = 3
FAIL = 4  # EINVAL
BLOCK = 5  # blocks until cancelled; records the cancellation
_SLOT = struct.Struct("<QQ")
LARGE_FRAME = 8 << 20
"""User memory far larger than a Unix socket's buffers: sending it waits for the host."""


class ScriptedSession:
    """One session of the scripted host."""

    def __init__(self, *, user_device: bool) -> None:
        self.user_device = user_device
        self.interrupted = trio.Event()
        self.closed = trio.Event()


class ScriptedHost:
    """A stand-in for ``SimulatedHost`` whose ioctls do what their number says."""

    def __init__(self) -> None:
        self.sessions: list[ScriptedSession] = []
        self.cancelled_calls = 0

    def open_session(self, *, user_device: bool = False) -> ScriptedSession:
        session = ScriptedSession(user_device=user_device)
        self.sessions.append(session)
        return session

    async def close_session(self, session: ScriptedSession) -> None:
        await trio.lowlevel.checkpoint()
        session.closed.set()

    async def ioctl(
        self, session: ScriptedSession, code: int, buffer: bytearray, memory: GuestMemory
    ) -> None:
        if code == Ioctl.DRIVER_VERSION_INFO:  # every session's first ioctl
            _answer_version(buffer)
        elif code == ECHO:
            for offset in range(0, len(buffer), _SLOT.size):
                address, size = _SLOT.unpack_from(buffer, offset)
                memory.write(address, memory.read(address, size).upper())
            buffer[-1] = 0xEE
        elif code == WAIT:
            await session.interrupted.wait()
            raise OSError(errno.EINTR, "interrupted")
        elif code == INTERRUPT:
            session.interrupted.set()
        elif code == BLOCK:
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled_calls += 1
        else:
            raise OSError(errno.EINVAL, "bad ioctl")
        await trio.lowlevel.checkpoint()


@pytest.fixture(name="socket_dir")
def _socket_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="vbx-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="host")
def _host() -> ScriptedHost:
    return ScriptedHost()


async def start_host(nursery: trio.Nursery, host: ScriptedHost, path: str) -> None:
    """Serve ``host`` at ``path`` in ``nursery`` and return once it listens."""
    await nursery.start(serve_simulated_host, host, path)


def raises_einval() -> pytest.RaisesExc[OSError]:
    """Expect the ``OSError`` of an ioctl the host refused with EINVAL."""
    return pytest.raises(OSError, match=rf"^\[Errno {errno.EINVAL}\] ")


def echo_call(*contents: bytes) -> tuple[bytearray, list[UserBuffer]]:
    """An ECHO buffer with one slot per user buffer (the size set, the address left 0)."""
    buffer = bytearray(_SLOT.size * len(contents))
    user_buffers = []
    for index, data in enumerate(contents):
        _SLOT.pack_into(buffer, index * _SLOT.size, 0, len(data))
        user_buffers.append(UserBuffer(index * _SLOT.size, bytearray(data)))
    return buffer, user_buffers


class TestIoctl:
    """Ioctls travel to the host and back."""

    async def test_user_buffers_round_trip(self, socket_dir: str, host: ScriptedHost) -> None:
        """User memory reaches the host at page-aligned distinct addresses and comes back."""
        path = os.path.join(socket_dir, "h.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                transport = await UnixSocketOpener(path).open_session()
                buffer, user_buffers = echo_call(b"abc", b"x" * 5000, b"")
                await transport.ioctl(ECHO, buffer, user_buffers)
                assert [bytes(u.data) for u in user_buffers] == [b"ABC", b"X" * 5000, b""]
                addresses = [_SLOT.unpack_from(buffer, i * 16)[0] for i in range(3)]
                assert addresses[:2] == [USER_ADDRESS_BASE, USER_ADDRESS_BASE + PAGE_SIZE]
                assert addresses[2] == USER_ADDRESS_BASE + 3 * PAGE_SIZE
                assert buffer[-1] == 0xEE
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_errno(self, socket_dir: str, host: ScriptedHost) -> None:
        """A driver errno raises OSError and leaves the buffer as it was."""
        path = os.path.join(socket_dir, "h.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                transport = await UnixSocketOpener(path).open_session()
                buffer, user_buffers = echo_call(b"abc")
                before = bytes(buffer)
                with pytest.raises(OSError, match="Invalid argument") as caught:
                    await transport.ioctl(FAIL, buffer, user_buffers)
                assert caught.value.errno == errno.EINVAL
                assert before == bytes(buffer)
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_wait_ended_by_interrupt_on_same_session(
        self, socket_dir: str, host: ScriptedHost
    ) -> None:
        """A blocked wait and the interrupt that ends it share one connection."""
        path = os.path.join(socket_dir, "h.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                transport = await UnixSocketOpener(path).open_session()
                outcome: list[int | None] = []

                async def wait() -> None:
                    try:
                        await transport.ioctl(WAIT, bytearray(8))
                    except OSError as exc:
                        outcome.append(exc.errno)

                async with trio.open_nursery() as waiters:
                    waiters.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    await transport.ioctl(INTERRUPT, bytearray(8))
                assert outcome == [errno.EINTR]
                assert len(host.sessions) == 1
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_many_concurrent_calls(self, socket_dir: str, host: ScriptedHost) -> None:
        """Concurrent calls on one session each get their own reply."""
        path = os.path.join(socket_dir, "h.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                transport = await UnixSocketOpener(path).open_session()
                results: dict[int, bytes] = {}

                async def echo(index: int) -> None:
                    buffer, user_buffers = echo_call(f"call {index}".encode() * (index + 1))
                    await transport.ioctl(ECHO, buffer, user_buffers)
                    results[index] = bytes(user_buffers[0].data)

                async with trio.open_nursery() as callers:
                    for index in range(30):
                        callers.start_soon(echo, index)
                expected = {i: f"CALL {i}".encode() * (i + 1) for i in range(30)}
                assert expected == results
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_too_large_for_a_frame(self, socket_dir: str, host: ScriptedHost) -> None:
        """A call above the frame limit fails with E2BIG and the session stays usable."""
        path = os.path.join(socket_dir, "h.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                transport = await UnixSocketOpener(path).open_session()
                buffer, user_buffers = echo_call(*[bytes(24 << 20)] * 3)
                with pytest.raises(OSError, match="MAX_FRAME_SIZE") as caught:
                    await transport.ioctl(ECHO, buffer, user_buffers)
                assert caught.value.errno == errno.E2BIG
                buffer, user_buffers = echo_call(b"ok")
                await transport.ioctl(ECHO, buffer, user_buffers)
                assert user_buffers[0].data == b"OK"
                await transport.aclose()
                nursery.cancel_scope.cancel()


class TestCancellation:
    """A cancelled ioctl is abandoned at the host and the session stays usable."""

    async def test_cancelled_call_is_cancelled_at_the_host(
        self, socket_dir: str, host: ScriptedHost
    ) -> None:
        """The host cancels the call, which was issued; later calls on the session still
        work."""
        path = os.path.join(socket_dir, "h.sock")
        submission = Submission()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                transport = await UnixSocketOpener(path).open_session()
                scope = trio.CancelScope()
                async with trio.open_nursery() as callers:
                    ioctl = partial(transport.ioctl, submission=submission)
                    callers.start_soon(_call_in, scope, ioctl, BLOCK)
                    await trio.testing.wait_all_tasks_blocked()  # the call is at the host
                    scope.cancel()
                assert scope.cancelled_caught
                assert submission.issued
                buffer, user_buffers = echo_call(b"after")
                await transport.ioctl(ECHO, buffer, user_buffers)
                assert user_buffers[0].data == b"AFTER"
                assert host.cancelled_calls == 1
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_cancelled_reader_hands_over(self, socket_dir: str, host: ScriptedHost) -> None:
        """When the task reading replies is cancelled, another waiter takes over."""
        path = os.path.join(socket_dir, "h.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                transport = await UnixSocketOpener(path).open_session()
                outcome: list[int | None] = []

                async def wait() -> None:
                    try:
                        await transport.ioctl(WAIT, bytearray(8))
                    except OSError as exc:
                        outcome.append(exc.errno)

                reader_scope = trio.CancelScope()
                async with trio.open_nursery() as callers:
                    callers.start_soon(_call_in, reader_scope, transport.ioctl, BLOCK)
                    await trio.testing.wait_all_tasks_blocked()
                    callers.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    reader_scope.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                    await transport.ioctl(INTERRUPT, bytearray(8))
                assert outcome == [errno.EINTR]
                await transport.aclose()
                nursery.cancel_scope.cancel()

    async def test_a_call_cancelled_before_its_frame_is_sent_is_not_issued(
        self, socket_dir: str
    ) -> None:
        """A call cancelled while another call's frame holds the send lock (the host is not
        reading) sends nothing, and its submission says so: the host sees only the other
        call and the next one. The call whose frame was being sent is issued."""
        path = os.path.join(socket_dir, "slow.sock")
        listener = await _listening(path, backlog=1)
        reading = trio.Event()
        codes: list[int] = []

        def refuse(request: IoctlRequest) -> IoctlReply:
            codes.append(request.code)
            return IoctlReply(request.seq, errno.EINVAL)

        sending, held_back = Submission(), Submission()

        async def send_a_large_frame() -> None:
            large = [UserBuffer(0, bytearray(LARGE_FRAME))]
            with raises_einval():
                await transport.ioctl(FAIL, bytearray(16), large, submission=sending)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(_answering_host, listener, refuse, reading=reading))
                transport = await UnixSocketOpener(path).open_session()
                scope = trio.CancelScope()
                async with trio.open_nursery() as callers:
                    callers.start_soon(send_a_large_frame)
                    await trio.testing.wait_all_tasks_blocked()  # the socket's buffer is full
                    ioctl = partial(transport.ioctl, submission=held_back)
                    callers.start_soon(_call_in, scope, ioctl, ECHO)
                    await trio.testing.wait_all_tasks_blocked()  # it waits to send
                    scope.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                    reading.set()
                assert scope.cancelled_caught
                assert (sending.issued, held_back.issued) == (True, False)
                with raises_einval():
                    await transport.ioctl(INTERRUPT, bytearray(8))
                assert codes == [FAIL, INTERRUPT]
                await transport.aclose()
                nursery.cancel_scope.cancel()
        listener.close()

    @pytest.mark.parametrize("how", ["cancel", "deadline"])
    async def test_a_cancel_while_sending_bounds_the_send(
        self, socket_dir: str, autojump_clock: trio.abc.Clock, how: str
    ) -> None:
        """A call whose frame a host that stopped reading took only in part ends when it is
        cancelled, or a deadline set on its scope meanwhile passes (as the daemon's stop
        sets one), within the grace the character device gives a call it interrupted: the
        host is lost (it took SEND_GRACE_S, 10 s, fixed when the send began)."""
        path = os.path.join(socket_dir, "deaf.sock")
        listener = await _listening(path, backlog=1)
        reading = trio.Event()
        large = [UserBuffer(0, bytearray(LARGE_FRAME))]
        scope = trio.CancelScope()

        async def send_a_large_frame() -> None:
            with scope, pytest.raises(DeviceLostError, match="took no whole frame"):
                await transport.ioctl(FAIL, bytearray(16), large)

        with trio.fail_after(SEND_GRACE_S + 5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(_answering_host, listener, _refuse, reading=reading))
                transport = await UnixSocketOpener(path).open_session()
                async with trio.open_nursery() as callers:
                    callers.start_soon(send_a_large_frame)
                    await trio.testing.wait_all_tasks_blocked()  # the socket's buffer is full
                    began = trio.current_time()
                    if how == "cancel":
                        scope.cancel()
                    else:
                        scope.deadline = began
                took = trio.current_time() - began
                assert took == pytest.approx(ABANDON_AFTER_S if how == "cancel" else GIVE_BACK_S)
                with pytest.raises(DeviceLostError, match="took no whole frame"):
                    await transport.ioctl(INTERRUPT, bytearray(8))
                reading.set()
                await transport.aclose()
                nursery.cancel_scope.cancel()
        listener.close()

    async def test_a_frame_finished_after_the_cancel_is_cancelled_at_the_host(
        self, socket_dir: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A call cancelled while its frame is half sent, whose host then takes the rest in
        time, sends the rest and a CANCEL: the caller is cancelled (the host answers the
        call EINTR, as one it interrupted), the stream stays whole and the next call is
        answered."""
        path = os.path.join(socket_dir, "slow.sock")
        listener = await _listening(path, backlog=1)
        reading = trio.Event()
        codes: list[int] = []

        def refuse(request: IoctlRequest) -> IoctlReply:
            codes.append(request.code)
            interrupted = request.code == FAIL
            return IoctlReply(request.seq, errno.EINTR if interrupted else errno.EINVAL)

        large = [UserBuffer(0, bytearray(LARGE_FRAME))]
        issued = Submission()
        scope = trio.CancelScope()

        async def send_a_large_frame() -> None:
            with scope:
                await transport.ioctl(FAIL, bytearray(16), large, submission=issued)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(_answering_host, listener, refuse, reading=reading))
                transport = await UnixSocketOpener(path).open_session()
                async with trio.open_nursery() as callers:
                    callers.start_soon(send_a_large_frame)
                    await trio.testing.wait_all_tasks_blocked()  # the socket's buffer is full
                    began = trio.current_time()
                    scope.cancel()
                    reading.set()
                assert scope.cancelled_caught
                assert trio.current_time() == began  # answered, not given up
                assert issued.issued
                with raises_einval():
                    await transport.ioctl(INTERRUPT, bytearray(8))
                assert codes == [FAIL, INTERRUPT]
                await transport.aclose()
                nursery.cancel_scope.cancel()
        listener.close()

    async def test_a_half_sent_call_and_its_cancel_share_one_window(
        self, socket_dir: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A call cancelled while its frame is half sent, whose host takes the rest late and
        never answers, is given up ABANDON_AFTER_S after the cancel: finishing the frame,
        the CANCEL frame and the wait for the answer share that one window (each took a
        window of its own: 0.35 s with the host 0.15 s late)."""
        path = os.path.join(socket_dir, "late.sock")
        listener = await _listening(path, backlog=1)
        reading = trio.Event()
        large = [UserBuffer(0, bytearray(LARGE_FRAME))]
        scope = trio.CancelScope()

        async def send_a_large_frame() -> None:
            with scope:
                await transport.ioctl(FAIL, bytearray(16), large)

        async def read_late() -> None:
            await trio.sleep(ABANDON_AFTER_S * 3 / 4)
            reading.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(_answering_host, listener, None, reading=reading))
                transport = await UnixSocketOpener(path).open_session()
                async with trio.open_nursery() as callers:
                    callers.start_soon(send_a_large_frame)
                    await trio.testing.wait_all_tasks_blocked()  # the socket's buffer is full
                    began = trio.current_time()
                    scope.cancel()
                    callers.start_soon(read_late)
                assert scope.cancelled_caught
                assert trio.current_time() - began == pytest.approx(ABANDON_AFTER_S)
                await transport.aclose()
                nursery.cancel_scope.cancel()
        listener.close()

    async def test_a_call_whose_session_closes_while_its_cancel_waits_is_cancelled(
        self, socket_dir: str
    ) -> None:
        """A call waiting for its reply, cancelled while another call's large frame holds the
        send lock, whose session is closed while its CANCEL waits for that lock, is cancelled:
        a closed session has nothing left to cancel (the CANCEL's send raised
        ClosedResourceError out of the caller's ioctl)."""
        path = os.path.join(socket_dir, "deaf.sock")
        listener = await _listening(path, backlog=1)
        scope = trio.CancelScope()
        outcome: list[BaseException | None] = []

        async def blocked_call() -> None:
            try:
                await _call_in(scope, transport.ioctl, BLOCK)
            except BaseException as exc:  # noqa: BLE001 (the outcome is the test's subject)
                outcome.append(exc)
            else:
                outcome.append(None)

        async def send_a_large_frame() -> None:
            large = [UserBuffer(0, bytearray(LARGE_FRAME))]
            with pytest.raises(DeviceLostError):
                await transport.ioctl(FAIL, bytearray(16), large)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(_answering_host, listener, None, reading=trio.Event()))
                transport = await UnixSocketOpener(path).open_session()
                async with trio.open_nursery() as callers:
                    callers.start_soon(blocked_call)
                    await trio.testing.wait_all_tasks_blocked()  # its frame is in the socket
                    callers.start_soon(send_a_large_frame)
                    await trio.testing.wait_all_tasks_blocked()  # it holds the send lock
                    scope.cancel()
                    await trio.testing.wait_all_tasks_blocked()  # the CANCEL waits for the lock
                    await transport.aclose()
                nursery.cancel_scope.cancel()
        listener.close()
        assert outcome == [None]
        assert scope.cancelled_caught


def _refuse(request: IoctlRequest) -> IoctlReply:
    """Answer ``request`` with EINVAL."""
    return IoctlReply(request.seq, errno.EINVAL)


async def _call_in(scope: trio.CancelScope, ioctl: object, code: int) -> None:
    """Run ``ioctl(code, buffer)`` inside ``scope``."""
    with scope:
        await ioctl(code, bytearray(8))  # type: ignore[operator]


class TestLifecycle:
    """Opening, closing and losing sessions."""

    async def test_description(self) -> None:
        """The opener describes itself as unix:PATH."""
        assert UnixSocketOpener("/run/h.sock").description == "unix:/run/h.sock"

    async def test_missing_socket(self, socket_dir: str, autojump_clock: trio.abc.Clock) -> None:
        """No socket: it logs that it waits, gives up after the limit and says how to start one."""
        path = os.path.join(socket_dir, "missing.sock")
        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(DeviceUnavailableError, match="vbox-agent simulate --socket"),
        ):
            await UnixSocketOpener(path).open_session()
        assert trio.current_time() >= HOST_START_WAIT_S
        assert logs == [
            {
                "event": "waiting_for_simulated_host",
                "path": path,
                "limit_s": HOST_START_WAIT_S,
                "log_level": "info",
            }
        ]

    async def test_refused_connection(
        self, socket_dir: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A stale socket nobody listens on: DeviceUnavailableError naming the path and wait."""
        path = os.path.join(socket_dir, "stale.sock")
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.close()
        with pytest.raises(DeviceUnavailableError, match=f"no simulated host at {path}") as info:
            await UnixSocketOpener(path).open_session()
        # as `vbox-agent host` says it (tests/host/test_server.py)
        assert str(info.value) == (
            f"no simulated host at {path} (Connection refused; waited "
            f"{HOST_START_WAIT_S:g} s for it to start): start one with "
            f"`vbox-agent simulate --socket {path}`"
        )

    async def test_permission_denied_says_whose_socket(
        self, socket_dir: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
    ) -> None:
        """A socket the caller may not connect to (another user's host; root is never refused,
        so the refusal is injected) fails at once, saying so instead of "start one"."""
        path = os.path.join(socket_dir, "theirs.sock")

        async def refuse(_: str) -> trio.SocketStream:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(trio, "open_unix_socket", refuse)
        with pytest.raises(DeviceUnavailableError) as info:
            await UnixSocketOpener(path).open_session()
        assert str(info.value) == (
            f"permission denied connecting to {path} (a simulated host's socket is only for "
            "the user who started it)"
        )
        assert trio.current_time() == 0

    async def test_a_shortage_is_not_a_missing_host(
        self, socket_dir: str, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
    ) -> None:
        """Out of descriptors (EMFILE on socket(2)), the open fails at once with an ordinary
        OSError naming the path, not DeviceUnavailableError: the host is still there."""
        path = os.path.join(socket_dir, "host.sock")

        async def out_of_descriptors(_: str) -> trio.SocketStream:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(trio, "open_unix_socket", out_of_descriptors)
        with pytest.raises(OSError, match=rf"^\[Errno {errno.EMFILE}\] ") as info:
            await UnixSocketOpener(path).open_session()
        assert not isinstance(info.value, DeviceUnavailableError)
        assert f"cannot open a session on {path}: " in str(info.value)
        assert trio.current_time() == 0

    @pytest.mark.parametrize("kind", ["directory", "file"])
    async def test_no_wait_for_a_file_that_is_not_a_socket(
        self, socket_dir: str, autojump_clock: trio.abc.Clock, kind: str
    ) -> None:
        """A path that exists and is not a socket never becomes a host: it fails at once,
        as a path that cannot be the device (exit 78, which the unit does not restart)."""
        path = os.path.join(socket_dir, kind)
        if kind == "directory":
            os.mkdir(path)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        with pytest.raises(NotTheDeviceError, match="it exists and is not a socket"):
            await UnixSocketOpener(path).open_session()
        assert trio.current_time() == 0

    def test_only_a_path_that_is_no_socket_cannot_be_a_host(self, socket_dir: str) -> None:
        """``cannot_be_a_host`` (check-config's check, no connect) names a path that exists
        and is not a socket, as the opener does above; a socket or a missing path may yet
        become one (the opener waits or says unavailable: 69)."""
        file = os.path.join(socket_dir, "file")
        os.close(os.open(file, os.O_WRONLY | os.O_CREAT, 0o600))
        assert (
            cannot_be_a_host(file) == f"no simulated host at {file}: it exists and is not a socket"
        )
        listening = os.path.join(socket_dir, "h.sock")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(listening)
            assert cannot_be_a_host(listening) is None
        assert cannot_be_a_host(os.path.join(socket_dir, "missing")) is None

    @pytest.mark.parametrize("error", [errno.ENOTDIR, errno.ELOOP], ids=errno.errorcode.get)
    async def test_no_wait_where_no_socket_can_be(
        self, socket_dir: str, autojump_clock: trio.abc.Clock, error: int
    ) -> None:
        """A path below a regular file (ENOTDIR) or in a symbolic link loop (ELOOP) never
        becomes a host: check-config's check names it, and the open fails at once as a path
        that cannot be the device (78), as the character device's open does on the same
        errnos. Both took it for a host that may come: the open said 'start one with
        vbox-agent simulate' (69, which the unit restarts forever) and check-config passed."""
        if error == errno.ENOTDIR:
            file = os.path.join(socket_dir, "file")
            os.close(os.open(file, os.O_WRONLY | os.O_CREAT, 0o600))
            path = os.path.join(file, "h.sock")
        else:
            path = os.path.join(socket_dir, "loop")
            os.symlink(path, path)
        spec = f"unix:{path}"
        why = (
            f"no simulated host at {path}: no socket can be there "
            f"({os.strerror(error)}, {errno.errorcode[error]})"
        )
        assert cannot_be_the_device(spec) == why
        with pytest.raises(NotTheDeviceError) as info:
            await opener_for_spec(spec, ioctl_threads=5).open_session()
        assert str(info.value) == why
        assert trio.current_time() == 0

    async def test_waits_for_a_starting_host(self, socket_dir: str, host: ScriptedHost) -> None:
        """A session asked for before the host listens opens once it does."""
        path = os.path.join(socket_dir, "h.sock")
        opened: list[UnixSocketTransport] = []
        done = trio.Event()

        async def open_early() -> None:
            opened.append(await UnixSocketOpener(path).open_session())
            done.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                with structlog.testing.capture_logs() as logs:
                    nursery.start_soon(open_early)
                    await trio.testing.wait_all_tasks_blocked()
                    assert [line["event"] for line in logs] == ["waiting_for_simulated_host"]
                    await start_host(nursery, host, path)
                    await done.wait()
                assert logs[-1]["event"] == "simulated_host_answered"
                assert logs[-1]["uid"] == os.geteuid()  # SO_PEERCRED: this process runs it
                await opened[0].aclose()
                nursery.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("host_uid", "own_uid", "refusal"),
        [
            (1000, 1000, None),
            (0, 1000, None),
            (0, 0, None),
            (
                1000,
                0,
                "refusing the simulated host at /tmp/h.sock: it runs as uid 1000, and an agent "
                "running as uid 0 trusts only a host run by root (start `vbox-agent simulate "
                "--socket /tmp/h.sock` as root)",
            ),
            (
                1001,
                1000,
                "refusing the simulated host at /tmp/h.sock: it runs as uid 1001, and an agent "
                "running as uid 1000 trusts only a host run by uid 1000 or root (start "
                "`vbox-agent simulate --socket /tmp/h.sock` as uid 1000 or root)",
            ),
        ],
    )
    def test_only_the_own_user_or_root_may_host(
        self, host_uid: int, own_uid: int, refusal: str | None
    ) -> None:
        """A host run by the agent's own user or by root is trusted; another user's is not,
        and the refusal names its uid and who may run the host."""
        assert refusal == untrusted_host("/tmp/h.sock", host_uid, own_uid)

    async def test_a_host_run_by_another_user_is_refused(
        self, socket_dir: str, host: ScriptedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A session whose host runs as neither the agent's user nor root (the uid it reads
        is shifted: the real one is this process's, which may host) fails at once, before
        its HELLO, with 69's DeviceUnavailableError: any local user who created the socket
        first was the host of a root agent, feeding it events and balloon requests."""
        path = os.path.join(socket_dir, "theirs.sock")
        read: list[int] = []

        def another_user(sock: SocketOptions) -> int:
            read.append(peer_uid(sock))
            return os.geteuid() + 1

        monkeypatch.setattr(unix, "peer_uid", another_user)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                with pytest.raises(DeviceUnavailableError) as info:
                    await UnixSocketOpener(path).open_session()
                await trio.testing.wait_all_tasks_blocked()
                assert host.sessions == []  # it said no HELLO
                nursery.cancel_scope.cancel()
        assert read == [os.geteuid()]
        assert str(info.value) == untrusted_host(path, os.geteuid() + 1, os.geteuid())

    async def test_no_wait_once_a_host_answered(
        self, socket_dir: str, host: ScriptedHost, autojump_clock: trio.abc.Clock
    ) -> None:
        """After a first session, a host that is gone fails the next open at once."""
        path = os.path.join(socket_dir, "h.sock")
        opener = UnixSocketOpener(path)
        async with trio.open_nursery() as server:
            await start_host(server, host, path)
            first = await opener.open_session()
            server.cancel_scope.cancel()
        await first.aclose()
        before = trio.current_time()
        with pytest.raises(DeviceUnavailableError, match="no simulated host"):
            await opener.open_session()
        assert trio.current_time() == before

    @pytest.mark.parametrize(
        ("path", "problem"),
        [
            ("", "is empty"),
            ("/tmp/" + "x" * 103, "at most 107"),
            ("/tmp/a\0b", r"'/tmp/a\\x00b' contains a control character \(\\x00\)"),
            ("/tmp/a\nb", r"'/tmp/a\\nb' contains a control character \(\\n\)"),
            ("/tmp/a\x1fb", r"control character \(\\x1f\)"),
            ("/tmp/a\x7fb", r"control character \(\\x7f\)"),
            ("/tmp/a\x80b", r"control character \(\\x80\)"),
            ("/tmp/a\x9fb", r"control character \(\\x9f\)"),
        ],
    )
    def test_unusable_path(self, path: str, problem: str) -> None:
        """A path no Unix socket can have is refused when the opener is made."""
        with pytest.raises(ValueError, match=problem):
            UnixSocketOpener(path)

    @pytest.mark.parametrize("path", ["/tmp/a b", "/tmp/a~b", "/tmp/a\xa0b", "/tmp/\u00e9t\u00e9"])
    def test_printable_path(self, path: str) -> None:
        """Only C0, DEL and C1 are control characters: the characters around them pass."""
        assert check_socket_path(path) == path

    async def test_user_device_and_close(self, socket_dir: str, host: ScriptedHost) -> None:
        """The HELLO carries user_device; aclose closes the host session and is idempotent."""
        path = os.path.join(socket_dir, "h.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await start_host(nursery, host, path)
                transport = await UnixSocketOpener(path, user_device=True).open_session()
                await transport.aclose()
                await transport.aclose()
                with pytest.raises(trio.ClosedResourceError):
                    await transport.ioctl(ECHO, bytearray(16))
                await host.sessions[0].closed.wait()
                assert host.sessions[0].user_device
                nursery.cancel_scope.cancel()

    async def test_host_vanishes(self, socket_dir: str, host: ScriptedHost) -> None:
        """A host that goes away fails the pending and every later call with DeviceLostError."""
        path = os.path.join(socket_dir, "h.sock")
        with trio.fail_after(10):
            async with trio.open_nursery() as outer, trio.open_nursery() as server:
                await start_host(server, host, path)
                transport = await UnixSocketOpener(path).open_session()
                lost: list[str] = []

                async def wait() -> None:
                    try:
                        await transport.ioctl(WAIT, bytearray(8))
                    except DeviceLostError as exc:
                        lost.append(str(exc))

                outer.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                server.cancel_scope.cancel()
            assert len(lost) == 1
            assert f"simulated host at {path} is gone" in lost[0]
            with pytest.raises(DeviceLostError):
                await transport.ioctl(ECHO, bytearray(16))
            assert not await trio.Path(path).exists()
            await transport.aclose()

    async def test_host_sends_garbage(self, socket_dir: str) -> None:
        """A malformed frame from the host counts as losing it (after HELLO: the session
        does not open)."""
        path = os.path.join(socket_dir, "raw.sock")
        with trio.fail_after(10):
            async with garbage_host(path):
                with pytest.raises(DeviceUnavailableError) as info:
                    await UnixSocketOpener(path).open_session()
        # what it did, not that it is gone (it said 'is gone: it sent a malformed frame')
        assert str(info.value).startswith(f"simulated host at {path} sent a malformed frame: ")

    async def test_host_that_closed_its_end(self, socket_dir: str) -> None:
        """A host that closed the connection is named as such, not by the OS's EPIPE."""
        path = os.path.join(socket_dir, "raw.sock")
        listener = await _listening(path, backlog=1)
        closed = trio.Event()

        async def closing_host() -> None:
            connection, _ = await listener.accept()
            with connection:
                await _greet(connection)
            closed.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(closing_host)
                transport = await UnixSocketOpener(path).open_session()
                await closed.wait()
                with pytest.raises(DeviceLostError) as info:
                    await transport.ioctl(ECHO, bytearray(16))
                await transport.aclose()
        listener.close()
        assert str(info.value) == f"simulated host at {path} is gone: it closed the connection"

    async def test_refused_hello(self, socket_dir: str) -> None:
        """A host that answers HELLO with ERROR makes open_session fail with its message."""
        path = os.path.join(socket_dir, "raw.sock")
        listener = await _listening(path, backlog=1)

        async def refusing_host() -> None:
            connection, _ = await listener.accept()
            with connection:
                decoder = FrameDecoder()
                while decoder.next_frame() is None:
                    decoder.feed(await connection.recv(4096))
                await connection.send(encode_frame(ErrorFrame("no sessions today")))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refusing_host)
                with pytest.raises(DeviceUnavailableError, match="no sessions today"):
                    await UnixSocketOpener(path).open_session()
        listener.close()

    @pytest.mark.parametrize(
        ("answer", "told"),
        [
            (IoctlReply(1, 0, b"x" * (1 << 20)), "it answered an IOCTL_REPLY frame (seq 1)"),
            (ErrorFrame("no\n" + "z" * (1 << 19)), "refused the session: no\\nzzz"),
        ],
    )
    async def test_a_huge_answer_to_hello_is_named_in_one_line(
        self, socket_dir: str, answer: Frame, told: str
    ) -> None:
        """A host answering HELLO with a large frame or a long, multi-line ERROR is refused in
        one short line (the frame's repr, a megabyte, was the message)."""
        path = os.path.join(socket_dir, "raw.sock")
        listener = await _listening(path, backlog=1)

        async def odd_host() -> None:
            connection, _ = await listener.accept()
            with connection:
                await connection.recv(RECEIVE_SIZE)  # the client's HELLO
                await trio.SocketStream(connection).send_all(encode_frame(answer))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(odd_host)
                with pytest.raises(DeviceUnavailableError) as info:
                    await UnixSocketOpener(path).open_session()
        listener.close()
        message = str(info.value)
        assert told in message
        assert "\n" not in message
        assert len(message) < 300


class TestBrokenHost:
    """A host that breaks the protocol is named in one line, and nothing hangs."""

    async def test_a_host_that_never_says_hello(
        self, socket_dir: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A host that accepts and never answers HELLO is unavailable after HELLO_WAIT_S
        (the session waited for it forever: ``prop`` and ``run`` hung silently)."""
        path = os.path.join(socket_dir, "mute.sock")
        listener = await _listening(path, backlog=1)

        async def mute_host() -> None:
            connection, _ = await listener.accept()
            with connection:
                await trio.sleep_forever()

        with trio.fail_after(HELLO_WAIT_S + 60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mute_host)
                started = trio.current_time()
                with pytest.raises(DeviceUnavailableError) as info:
                    await UnixSocketOpener(path).open_session()
                assert trio.current_time() - started == pytest.approx(HELLO_WAIT_S)
                nursery.cancel_scope.cancel()
        listener.close()
        assert str(info.value) == (
            f"simulated host at {path} did not answer HELLO within {HELLO_WAIT_S:g} s"
        )

    async def test_a_host_that_answers_hello_and_no_ioctl(
        self, socket_dir: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A host that answers HELLO and then nothing (hung) is unavailable once the new
        session's version query went unanswered for VERSION_WAIT_S, to the tick: the session
        is closed, the query not cancelled (no CANCEL, no give-back time, no
        ``ioctl_abandoned`` line after the error). ``prop`` and ``run`` waited for it
        forever."""
        path = os.path.join(socket_dir, "hung.sock")
        listener = await _listening(path, backlog=1)

        received: list[Frame] = []

        async def hung_host() -> None:
            connection, _ = await listener.accept()
            decoder = FrameDecoder()
            with connection:
                while data := await connection.recv(RECEIVE_SIZE):  # until the session closes
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        received.append(frame)
                        if isinstance(frame, Hello):
                            await connection.send(encode_frame(Hello(Role.HOST)))

        with trio.fail_after(VERSION_WAIT_S + 60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hung_host)
                started = trio.current_time()
                with pytest.raises(DeviceUnavailableError) as info:
                    async with open_device(UnixSocketOpener(path)):
                        pytest.fail("the device opened")
                took = trio.current_time() - started
        listener.close()
        assert took == VERSION_WAIT_S
        assert [type(frame) for frame in received] == [Hello, IoctlRequest]  # no CANCEL
        assert logs == []
        assert str(info.value) == (
            f"unix:{path} did not answer the driver version query within {VERSION_WAIT_S:g} s"
        )

    @pytest.mark.parametrize(
        ("answer", "why"),
        [
            (lambda request: IoctlReply(request.seq, errno.EINVAL), "EINVAL"),
            (lambda request: ErrorFrame("not now"), "not now"),
            (
                lambda request: IoctlReply(request.seq + 1, 0),
                "it answered an IOCTL_REPLY frame (seq 2)",
            ),
        ],
        ids=["errno", "error", "another seq"],
    )
    async def test_a_refused_version_query_opens_no_session(
        self, socket_dir: str, answer: Callable[[IoctlRequest], Frame], why: str
    ) -> None:
        """A host that answers the new session's version query with an errno, an ERROR or
        a reply to another call refused it: no session, one line saying so."""
        path = os.path.join(socket_dir, "refusing.sock")
        listener = await _listening(path, backlog=1)

        async def refusing_host() -> None:
            connection, _ = await listener.accept()
            with connection:
                await _greet(connection, answer)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refusing_host)
                with pytest.raises(DeviceUnavailableError) as info:
                    await UnixSocketOpener(path).open_session()
        listener.close()
        assert str(info.value) == (
            f"simulated host at {path} refused the driver version query: {why}"
        )

    @pytest.mark.parametrize(
        ("answer", "why"),
        [
            (
                lambda frame: IoctlReply(frame.seq, 0, frame.buffer[:-4]),
                "its reply to ioctl 0x4 has 12 bytes for a 16-byte buffer",
            ),
            (
                lambda frame: IoctlReply(frame.seq + 5, 0, frame.buffer),
                "it replied to ioctl seq 7, which was never sent",  # 1: the version query
            ),
        ],
        ids=["wrong size", "seq never sent"],
    )
    async def test_a_broken_reply_loses_the_host(
        self, socket_dir: str, answer: Callable[[IoctlRequest], IoctlReply], why: str
    ) -> None:
        """A reply whose buffer differs in size from the request's, or one tagged with a seq
        the session never sent, is a broken host: the session is lost, this call and the
        next. (The first raised WireError, which ``run`` and ``prop`` reported as an internal
        failure, exit 70, naming no host; the second was dropped as if its caller had been
        cancelled, and the call waited forever.)"""
        path = os.path.join(socket_dir, "broken.sock")
        listener = await _listening(path, backlog=1)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_answering_host, listener, answer)
                transport = await UnixSocketOpener(path).open_session()
                with pytest.raises(DeviceLostError) as info:
                    await transport.ioctl(FAIL, bytearray(16))
                with pytest.raises(DeviceLostError):
                    await transport.ioctl(FAIL, bytearray(16))
                await transport.aclose()
                nursery.cancel_scope.cancel()
        listener.close()
        # a host that answers wrongly broke the protocol: it is not gone (it said so)
        assert str(info.value) == f"simulated host at {path} broke the protocol: {why}"

    async def test_a_host_whose_backlog_is_full(
        self, socket_dir: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A host that accepts no connection while its listen backlog is full is busy: the
        session waits HOST_BUSY_WAIT_S for it and then says so (the connect's EAGAIN came
        back as a socket that was not connected: 'is gone: sending failed: Transport
        endpoint is not connected', at once)."""
        path = os.path.join(socket_dir, "busy.sock")
        listener = await _listening(path, backlog=0)
        queued = [trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)]
        await queued[0].connect(path)  # the backlog is full from now on
        with trio.fail_after(HOST_BUSY_WAIT_S + 60):
            started = trio.current_time()
            with pytest.raises(DeviceUnavailableError) as info:
                await UnixSocketOpener(path, start_wait_s=0).open_session()
            assert trio.current_time() - started == pytest.approx(HOST_BUSY_WAIT_S, abs=0.1)
        assert str(info.value) == (
            f"simulated host at {path} is busy: it took no new connection for "
            f"{HOST_BUSY_WAIT_S:g} s (its listen backlog is full)"
        )
        for sock in queued:
            sock.close()
        listener.close()

    async def test_a_busy_host_is_waited_for(
        self, socket_dir: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """A session waits while the host's backlog is full and starts once it accepts."""
        path = os.path.join(socket_dir, "busy.sock")
        listener = await _listening(path, backlog=0)
        queued = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await queued.connect(path)  # the backlog is full from now on
        opened: list[UnixSocketTransport] = []

        async def open_session() -> None:
            opened.append(await UnixSocketOpener(path).open_session())

        with trio.fail_after(HOST_BUSY_WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(open_session)
                await trio.testing.wait_all_tasks_blocked()  # it tried and waits to retry
                first, _ = await listener.accept()  # the queued one leaves the backlog
                connection, _ = await listener.accept()  # the session's next attempt
                with first, connection:
                    await _greet(connection)
                    await trio.testing.wait_all_tasks_blocked()
            assert len(opened) == 1
            await opened[0].aclose()
        queued.close()
        listener.close()


async def _answering_host(
    listener: trio.socket.SocketType,
    answer: Callable[[IoctlRequest], IoctlReply] | None,
    *,
    reading: trio.Event | None = None,
) -> None:
    """A host on ``listener`` that greets one session (HELLO and the driver version query),
    then answers each ioctl with ``answer(request)`` (never, without ``answer``) until the
    session closes; with ``reading``, it reads nothing after the greeting until that is set."""
    connection, _ = await listener.accept()
    stream = trio.SocketStream(connection)
    decoder = FrameDecoder()
    async with stream:
        while True:
            while (frame := decoder.next_frame()) is None:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:  # the session closed its end
                    return
                decoder.feed(data)
            if isinstance(frame, Hello):
                await stream.send_all(encode_frame(Hello(Role.HOST)))
            elif isinstance(frame, IoctlRequest) and frame.code == Ioctl.DRIVER_VERSION_INFO:
                await stream.send_all(encode_frame(_version_reply(frame)))
                if reading is not None:
                    await reading.wait()
            elif isinstance(frame, IoctlRequest) and answer is not None:
                await stream.send_all(encode_frame(answer(frame)))


def _version_reply(request: IoctlRequest) -> IoctlReply:
    """Answer the driver version query ``request`` as a host speaking version 1.0 does."""
    buffer = bytearray(request.buffer)
    _answer_version(buffer)
    return IoctlReply(request.seq, 0, bytes(buffer))


def _answer_version(buffer: bytearray) -> None:
    """Write a version 1.0 driver's answer into the version query's ``buffer``."""
    L.DriverVersionInfo.session_version.set(buffer, IOC_VERSION)
    L.IoctlHeader.rc.set(buffer, 0)


async def _greet(
    connection: trio.socket.SocketType,
    answer: Callable[[IoctlRequest], Frame] = _version_reply,
) -> None:
    """Answer a new session's HELLO and its driver version query (with ``answer``, by
    default as a version 1.0 driver) on ``connection``."""
    decoder = FrameDecoder()
    for _ in range(2):
        while (frame := decoder.next_frame()) is None:
            data = await connection.recv(RECEIVE_SIZE)
            assert data, "the session closed before its greeting"
            decoder.feed(data)
        assert isinstance(frame, Hello | IoctlRequest)
        reply = Hello(Role.HOST) if isinstance(frame, Hello) else answer(frame)
        await connection.send(encode_frame(reply))


async def _listening(path: str, *, backlog: int) -> trio.socket.SocketType:
    """A Unix stream socket bound at ``path`` and listening, for a test's own host."""
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(backlog)
    return listener
