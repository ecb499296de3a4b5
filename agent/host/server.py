"""The simulated host's Unix-socket server: device sessions and control for other processes.

Protocol and framing: ``docs/simulator-socket.md`` and :mod:`agent.protocol.wire`.

Each connection starts with a HELLO. A ``device`` connection is one open device session:
its ioctls run concurrently, each in a task of its own, and replies go back tagged with the
request's sequence number, under a send lock. A CANCEL frame cancels that ioctl's task (the
host model ends the call as the driver does for a signal), which is answered as the driver
returns: EINTR where the signal ended the ioctl (mainline's interruptible waits), else its
reply (Oracle's driver answers VERR_INTERRUPTED in ``hdr.rc``, and a call the host finished
while its cancel failed completed). When the connection ends, for whatever reason, its tasks
are cancelled and the session is closed, so a vanished client releases its HGCM clients,
filter bits and capabilities; a request a delay holds in the port write is not cancelled, and
the session closes once it is released (``drop`` answers meanwhile, counting the session as
still closing, as it does a session whose close waits behind another session's held write:
it answers within :data:`DROP_GRACE_S`). A ``control`` connection runs control commands
(:mod:`agent.host.control`) one after the other, and logs each one it served
(``control_command``, or ``control_command_refused`` with the host's reason).

Nothing a client does ends the server. A failed ``accept(2)`` (descriptors short) is tried
again after :data:`ACCEPT_PAUSE_S`. A client gets an ERROR frame and is closed when it sends
a malformed frame, when its whole HELLO has not come :data:`HELLO_GRACE_S` after it
connected, or when a length prefix is longer than its connection's state admits (a HELLO's,
:data:`~agent.protocol.wire.MAX_HELLO_FRAME_SIZE`, until the HELLO; a CONTROL request's on
a control connection): that is refused as it arrives, before the body is buffered. A reply
the host cannot encode (it breaks a wire limit) is logged as the host's bug and ends only
that connection. Any other exception raised by the host model itself is a bug of the
simulator and ends the server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import TYPE_CHECKING, Final, NoReturn

import structlog
import trio

from agent.host._log import LOG_COMPONENT
from agent.host.control import execute_control
from agent.host.vmmdev import PORT_WRITER, PortWriter
from agent.protocol import AgentError
from agent.protocol.errors import SHOWN_SIZE, escaped, shown, shown_text
from agent.protocol.wire import (
    MAX_CONTROL_FRAME_SIZE,
    MAX_FRAME_SIZE,
    MAX_HELLO_FRAME_SIZE,
    Cancel,
    ControlReply,
    ControlRequest,
    ErrorFrame,
    FrameDecoder,
    Hello,
    IoctlReply,
    IoctlRequest,
    Role,
    WireError,
    WireLimitError,
    describe_frame,
    encode_frame,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.host.host import DriverSession, SimulatedHost
    from agent.protocol.wire import Frame, UserMemory

_log = structlog.get_logger(__name__, component=LOG_COMPONENT)

SOCKET_MODE: Final = 0o600
"""Permissions of the socket file: only its owner may drive the simulated VM."""
LISTEN_BACKLOG: Final = socket.SOMAXCONN
"""Connections waiting to be accepted (the kernel caps it at ``net.core.somaxconn``): many
agents and ``prop`` commands may connect at once."""
LOGGED_ARGUMENTS: Final = 8
"""How many of a control command's arguments its log line shows (more than any command
takes); how many more there were is said."""
SEND_GRACE_S: Final = 10.0
"""How long a frame may take to send before the client counts as gone."""
HELLO_GRACE_S: Final = 10.0
"""How long a client may take from its connect to its whole HELLO before the host sends
ERROR and closes the connection, so clients that never say HELLO cannot pin descriptors."""
ACCEPT_PAUSE_S: Final = 0.1
"""How long the server waits after ``accept(2)`` failed (descriptors or kernel memory short,
a security policy refusing it) before it tries again; the connection stays queued."""
DROP_GRACE_S: Final = 1.0
"""How long ``drop`` waits at most for the dropped sessions to close: one whose close waits
behind another session's write a delay holds (for the driver's session mutex) closes only
once that write is released, and ``drop`` counts it as still closing."""
RECEIVE_SIZE: Final = 256 << 10
"""Bytes asked of a connection's socket per receive."""
UNSENT_LIMIT: Final = MAX_FRAME_SIZE
"""Bytes of replies a device connection may hold unsent before its requests are no longer read.

A client that sends ioctls and does not read the replies is held as the kernel holds a process
whose threads are all busy: it cannot start more calls. Without the limit every reply waiting
for it stayed in the server's memory (a few seconds of 16 MiB LOG requests held gigabytes).
"""


class HostSocketError(AgentError):
    """The server cannot listen at the path (in use, not a socket, no permission)."""


async def serve_simulated_host(
    host: SimulatedHost,
    socket_path: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``host`` on a Unix stream socket at ``socket_path`` until cancelled.

    Resource handling: the socket file is created with mode 0600 (under a umask, so it is
    never more open than that); a stale socket left by a dead host is replaced; the file is
    removed on exit unless another process replaced it meanwhile. ``task_status.started()``
    is called once the socket listens.

    Raises:
        HostSocketError: the path is taken by a live host or by something that is no socket,
            or cannot be bound.
    """
    path = os.fspath(socket_path)
    listener_socket = await _bind(path)
    identity = _identity(path)
    try:
        listener = _Listener(trio.SocketListener(listener_socket))
        server = _Server(host)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(server.serve_connection, stream)
    finally:
        listener_socket.close()
        if _identity(path) == identity:
            os.unlink(path)


async def _bind(path: str) -> trio.socket.SocketType:
    await clear_socket_path(path)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~SOCKET_MODE)
    try:
        await listener.bind(path)
    except OSError as exc:
        listener.close()
        raise _cannot_listen(path, exc) from exc
    finally:
        os.umask(old_umask)
    listener.listen(LISTEN_BACKLOG)
    return listener


async def clear_socket_path(path: str) -> None:
    """Make ``path`` free for a new host: nothing is there, or a stale socket (its host gone)
    was removed.

    Raises:
        HostSocketError: a live host listens there, something that is no socket is there, or
            the path cannot be checked or cleared.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:  # a file on the way (ENOTDIR), a symlink loop, no search permission
        raise _cannot_listen(path, exc) from exc
    if not stat.S_ISSOCK(mode):
        msg = f"{escaped(path)} exists and is not a socket; refusing to replace it"
        raise HostSocketError(msg)
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            await probe.connect(path)
        except ConnectionRefusedError:
            try:
                os.unlink(path)  # stale: its host is gone
            except OSError as exc:  # another user's, in a sticky directory (EPERM)
                raise _cannot_listen(path, exc) from exc
            return
        except OSError as exc:
            msg = f"cannot check the existing socket {escaped(path)}: {exc.strerror or exc}"
            raise HostSocketError(msg) from exc
    msg = f"a simulated host is already listening at {escaped(path)}"
    raise HostSocketError(msg)


def _cannot_listen(path: str, exc: OSError) -> HostSocketError:
    return HostSocketError(f"cannot listen at {escaped(path)}: {exc.strerror or exc}")


def _identity(path: str) -> tuple[int, int] | None:
    """The socket file's device and inode; None once nothing this process may see is there."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class _Listener:
    """Accepts connections; no failure of ``accept(2)`` ends the server (any process of the
    user may connect, so it would be anyone's to cause)."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self._listener = listener
        self._logged: set[int] = set()
        """The ``accept(2)`` errnos logged already (each is logged once)."""

    async def accept(self) -> trio.SocketStream:
        """Return the next connection. ``accept(2)`` failing (``EMFILE``, ``ENFILE``,
        ``ENOMEM``: trio passes over the errnos that dropped the connection) is tried again
        after :data:`ACCEPT_PAUSE_S`, each errno logged the first time
        (``host_accept_failed``), so a client that keeps connecting floods no log."""
        while True:
            try:
                return await self._listener.accept()
            except OSError as exc:
                code = exc.errno or 0
                if code not in self._logged:
                    self._logged.add(code)
                    _log.warning(
                        "host_accept_failed",
                        error=errno.errorcode.get(code, str(code)),
                        retry_in_s=ACCEPT_PAUSE_S,
                        repeats="not logged",
                    )
                await trio.sleep(ACCEPT_PAUSE_S)


class _Device:
    """One device connection as ``drop`` sees it: whether its session closed, and how many
    of its port writes a delay holds."""

    __slots__ = ("closed", "writer")

    def __init__(self, changed: Callable[[], object]) -> None:
        self.closed = False
        self.writer = PortWriter(changed)


class _Server:
    """The connections of one host, and the device connections ``drop`` may close."""

    def __init__(self, host: SimulatedHost) -> None:
        self._host = host
        self._devices: dict[trio.CancelScope, _Device] = {}
        self._devices_changed = trio.lowlevel.ParkingLot()
        """Unparked when a device session closes or a delay holds or releases a port write
        of a device connection."""

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Serve one client until it leaves or breaks the protocol; nothing it sends ends
        the server. A reply the host cannot encode (a host bug) is logged
        (``host_reply_unencodable``) and ends that connection alone, with an ERROR."""
        async with stream:
            connection = _Connection(stream)
            try:
                await self._serve(connection)
            except* WireLimitError as group:
                error = str(group.exceptions[0])
                _log.error("host_reply_unencodable", error=error)
                await connection.send_error(f"the host cannot encode its reply: {error}")

    async def _serve(self, connection: _Connection) -> None:
        try:
            with trio.move_on_after(HELLO_GRACE_S) as waiting:
                hello = await connection.receive()
            if waiting.cancelled_caught:
                await connection.send_error(f"no HELLO within {HELLO_GRACE_S} s")
                return
            if hello is None:
                return
            if not isinstance(hello, Hello) or hello.role is Role.HOST:
                await connection.send_error(
                    f"expected a device or control HELLO, got {describe_frame(hello)}"
                )
                return
            if hello.role is Role.DEVICE:
                connection.admit_frames_up_to(MAX_FRAME_SIZE)
                await self._serve_device(connection, user_device=hello.user_device)
            else:
                connection.admit_frames_up_to(MAX_CONTROL_FRAME_SIZE)
                await self._serve_control(connection)
        # Errors raised in the per-call tasks arrive wrapped in groups, hence except*.
        except* WireError as group:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await connection.send_error(str(group.exceptions[0]))
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client vanished; its session is closed below

    async def drop(self) -> dict[str, int]:
        """Close every device connection and wait until each one's session closed, or a
        delay holds a port write of it (a vCPU in a port write cannot leave it: that session
        closes once the host handled the write), or :data:`DROP_GRACE_S` passed (a close may
        wait behind another session's held write, for the driver's session mutex). Return
        how many connections were closed (``dropped``) and how many of their sessions had
        not finished closing (``closing``)."""
        dropped = list(self._devices.items())
        for scope, _ in dropped:
            scope.cancel()
        devices = [device for _, device in dropped]
        with trio.move_on_after(DROP_GRACE_S):
            # Bounded: each pass follows a session closing or a write held or released.
            while not all(device.closed or device.writer.held for device in devices):
                await self._devices_changed.park()
        return {
            "dropped": len(devices),
            "closing": sum(not device.closed for device in devices),
        }

    async def _serve_device(self, connection: _Connection, *, user_device: bool) -> None:
        try:
            session = self._host.open_session(user_device=user_device)
        except OSError as exc:  # the driver is not loaded: open(2) fails
            await connection.send_error(f"cannot open the device: {exc.strerror or exc}")
            return
        scope = trio.CancelScope()
        device = self._devices[scope] = _Device(self._devices_changed.unpark_all)
        PORT_WRITER.set(device.writer)  # for the writes of this task and the calls it starts
        try:
            with scope:
                await connection.send(Hello(Role.HOST))
                calls: dict[int, trio.CancelScope] = {}
                async with trio.open_nursery() as nursery:
                    while (frame := await connection.receive_within(UNSENT_LIMIT)) is not None:
                        if isinstance(frame, Cancel):
                            if (call := calls.get(frame.seq)) is not None:
                                call.cancel()
                            continue
                        if not isinstance(frame, IoctlRequest) or frame.seq in calls:
                            got = describe_frame(frame)
                            if isinstance(frame, IoctlRequest):
                                got += ", whose seq is in flight"
                            await connection.send_error(f"expected a new IOCTL request, got {got}")
                            break
                        calls[frame.seq] = trio.CancelScope()
                        nursery.start_soon(self._ioctl, connection, session, frame, calls, scope)
                    nursery.cancel_scope.cancel()
        finally:
            del self._devices[scope]
            with trio.CancelScope(shield=True):
                await self._host.close_session(session)
            device.closed = True
            self._devices_changed.unpark_all()

    async def _ioctl(
        self,
        connection: _Connection,
        session: DriverSession,
        request: IoctlRequest,
        calls: dict[int, trio.CancelScope],
        scope: trio.CancelScope,
    ) -> None:
        memory = _CallMemory(request.user_buffers)
        buffer = bytearray(request.buffer)
        try:
            with calls[request.seq]:
                await self._host.ioctl(session, request.code, buffer, memory)
        except OSError as exc:
            reply = IoctlReply(request.seq, exc.errno or errno.EIO)
        else:
            reply = IoctlReply(request.seq, 0, bytes(buffer), memory.contents())
        finally:
            interrupted = calls.pop(request.seq).cancelled_caught
        if interrupted:  # the CANCEL ended the ioctl, as a signal does (the driver decides)
            reply = IoctlReply(request.seq, errno.EINTR)
        try:
            await connection.send(reply)
        except trio.BrokenResourceError:
            scope.cancel()  # the client vanished: end the connection and close the session

    async def _serve_control(self, connection: _Connection) -> None:
        await connection.send(Hello(Role.HOST))
        while (frame := await connection.receive()) is not None:
            if not isinstance(frame, ControlRequest):
                await connection.send_error(
                    f"expected a CONTROL request, got {describe_frame(frame)}"
                )
                return
            answer = await execute_control(self._host, frame.payload, drop=self.drop)
            _log_control(frame.payload, answer)
            await connection.send(ControlReply(answer))


def _log_control(payload: dict[str, object], answer: dict[str, object]) -> None:
    """Log one control command served: its name, its arguments and what came of it, each
    as short as a reply quotes it (a client chooses them)."""
    command = _logged(payload.get("command"))
    given = [(name, value) for name, value in payload.items() if name != "command"]
    arguments = {shown_text(name): _logged(value) for name, value in given[:LOGGED_ARGUMENTS]}
    more = {"arguments_left_off": len(given) - LOGGED_ARGUMENTS} if given[LOGGED_ARGUMENTS:] else {}
    if answer.get("ok") is True:
        _log.info("control_command", command=command, arguments=arguments, **more)
    else:
        error = answer.get("error")
        _log.warning(
            "control_command_refused", command=command, arguments=arguments, error=error, **more
        )


def _logged(value: object) -> object:
    """A client's value for a log line: a short number as it is, text cut as
    :func:`shown_text` does, anything else (or a long number) as :func:`shown` quotes it."""
    if isinstance(value, str):
        return shown_text(value)
    if isinstance(value, int | float) and len(repr(value)) <= SHOWN_SIZE:
        return value
    return shown(value)


class _Connection:
    """Frames in and out of one client socket; sends are serialised by a lock."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(MAX_HELLO_FRAME_SIZE)
        self._send_lock = trio.Lock()
        self._unsent = 0
        self._sent_some = trio.Event()

    def admit_frames_up_to(self, max_frame_size: int) -> None:
        """Refuse a frame longer than ``max_frame_size`` from the next one on, as soon as
        its length prefix arrives (a connection starts at :data:`MAX_HELLO_FRAME_SIZE`)."""
        self._decoder.max_frame_size = max_frame_size

    async def receive_within(self, unsent_limit: int) -> Frame | None:
        """Like :meth:`receive`, once no more than ``unsent_limit`` bytes wait to be sent."""
        while self._unsent > unsent_limit:
            self._sent_some = trio.Event()
            await self._sent_some.wait()
        return await self.receive()

    async def receive(self) -> Frame | None:
        """Return the next frame, or ``None`` when the client closed the connection.

        Raises:
            WireError: the client sent a malformed frame.
            trio.BrokenResourceError: the connection broke.
        """
        while (frame := self._decoder.next_frame()) is None:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                return None
            self._decoder.feed(data)
        return frame

    async def send(self, frame: Frame) -> None:
        """Send one frame whole (shielded: a torn frame would desynchronise the client).

        Raises:
            trio.BrokenResourceError: the client vanished or stopped reading.
        """
        data = encode_frame(frame)
        self._unsent += len(data)
        try:
            await self._send_whole(data)
        finally:
            self._unsent -= len(data)
            self._sent_some.set()

    async def _send_whole(self, data: bytes) -> None:
        async with self._send_lock:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_GRACE_S) as cs:
                try:
                    await self._stream.send_all(data)
                except trio.ClosedResourceError as exc:
                    raise trio.BrokenResourceError(str(exc)) from exc
            if cs.cancelled_caught:
                msg = f"the client read nothing for {SEND_GRACE_S} s"
                raise trio.BrokenResourceError(msg)

    async def send_error(self, message: str) -> None:
        """Tell the client what was malformed; the caller then closes the connection."""
        with contextlib.suppress(trio.BrokenResourceError):
            await self.send(ErrorFrame(message))


class _CallMemory:
    """The user memory of one ioctl, at the addresses the client stored in the buffer."""

    def __init__(self, user_buffers: tuple[UserMemory, ...]) -> None:
        self._regions = [(memory.address, bytearray(memory.data)) for memory in user_buffers]

    def read(self, address: int, size: int) -> bytes:
        """Return ``size`` bytes at ``address``; ``EFAULT`` outside the call's buffers."""
        region, offset = self._locate(address, size)
        return bytes(region[offset : offset + size])

    def write(self, address: int, data: bytes | bytearray) -> None:
        """Store ``data`` at ``address``; ``EFAULT`` outside the call's buffers."""
        region, offset = self._locate(address, len(data))
        region[offset : offset + len(data)] = data

    def contents(self) -> tuple[bytes, ...]:
        """The buffers' contents now, in the request's order."""
        return tuple(bytes(region) for _, region in self._regions)

    def _locate(self, address: int, size: int) -> tuple[bytearray, int]:
        for start, region in self._regions:
            offset = address - start
            if offset >= 0 and offset + size <= len(region) and size >= 0:
                return region, offset
        raise OSError(errno.EFAULT, f"bad address {address:#x} (+{size})")
