"""Device sessions on a simulated host in another process, over a Unix stream socket.

One connection is one device session (one open file descriptor of the driver). The framing
is :mod:`agent.protocol.wire`; the protocol is described in ``docs/simulator-socket.md``.

Several ioctls may be in flight on one connection (a blocked WAIT_FOR_EVENTS and the
INTERRUPT_ALL that ends it), so each request carries a sequence number and replies may come
back in any order. The transport has no reader task, hence needs no nursery from its
owner: every ``ioctl`` sends its frame under a send lock, then waits for its reply. The
first waiter with no reader running becomes the reader: it receives frames and hands each
reply to the waiter it belongs to, until its own reply arrives; then it steps down and wakes
the other waiters, one of which takes over. The frame decoder is shared, so bytes a reader
received stay buffered for the next one.

Cancellation:

- while waiting for a reply: the transport sends a CANCEL frame and the host interrupts the
  call (a blocked wait ends, an HGCM call is cancelled at the host), as the driver does when
  a signal interrupts the calling thread, then answers it as that driver returns: EINTR, or
  a reply (Oracle's driver puts VERR_INTERRUPTED in ``rc``; an HGCM call the host finished
  while its cancel failed completed), which is returned as the other transports return it
  (the caller's next checkpoint raises the cancellation). The answer is waited for by the
  character device's rule (:func:`~agent.device.transport.abandon_at`): a call not
  answered by then is abandoned (``ioctl_abandoned``, :mod:`agent.abandons`) and its reply
  dropped when it comes (a reply tagged with a sequence number not handed out yet is a
  broken host, which is lost). Nothing of the stream is torn (trio's ``receive_some`` never
  loses received bytes to a cancellation), so the connection stays usable.
- while waiting for the send lock (another call's frame is being sent): nothing was sent
  and the call's :class:`~agent.protocol.Submission` stays unissued; it is issued as the
  frame's sending begins.
- while sending: a frame that was not sent at all is simply not sent (the call is not
  issued). A half-sent frame would desynchronise the stream, so its rest is sent shielded
  from cancellation, for as long as the character device waits for a call it interrupted
  (``ABANDON_AFTER_S`` after an explicit cancel, ``GIVE_BACK_S`` after a deadline, never
  past the deadline in effect when the call began, see :func:`~agent.device.transport.abandon_at`);
  a frame that is whole by then is followed by a CANCEL frame, as a call waiting for its
  reply is (above). A host that has
  not taken the frame by then, or within ``SEND_GRACE_S`` of its start, is declared lost
  and the connection is closed. The cancel (or a deadline set later, as the daemon's stop
  sets one) bounds the send whenever it comes.
- the CANCEL frame itself is sent shielded for at most ``CANCEL_GRACE_S`` (it is a few bytes:
  a host that cannot take them is not reading and is declared lost), and never past the
  call's give-up time: the finishing of a half-sent frame, the CANCEL frame and the wait
  for the host's answer share one window, fixed when the cancellation first reached the
  call, so an abandoned call never holds its caller longer than that.

A host that goes away (EOF, a broken socket, a malformed or ERROR frame, a reply whose sizes
differ from its request's) makes every pending and later ``ioctl`` raise
:class:`DeviceLostError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from agent.abandons import AbandonedCalls
from agent.device.errors import DeviceLostError, DeviceUnavailableError, NotTheDeviceError
from agent.device.spec import NOT_THE_DEVICE_ERRNOS, check_socket_path, peer_uid, shown_path
from agent.device.transport import abandon_at, given_back_by
from agent.protocol import DriverVersionInfo, LocalProtocolError, RemoteProtocolError
from agent.protocol.constants import PAGE_SIZE
from agent.protocol.errors import shown_text
from agent.protocol.wire import (
    Cancel,
    ErrorFrame,
    FrameDecoder,
    Hello,
    IoctlReply,
    IoctlRequest,
    Role,
    UserMemory,
    WireError,
    WireLimitError,
    describe_frame,
    encode_frame,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.protocol import DriverVersion, Submission, UserBuffer
    from agent.protocol.wire import Frame

_log = structlog.get_logger(__name__)

USER_ADDRESS_BASE: Final = 0x7F00_0000_0000
"""Synthetic address of an ioctl's first user buffer; the next ones follow page by page."""
SEND_GRACE_S: Final = 10.0
"""How long a frame may take to send before the host counts as gone (it reads constantly)."""
CANCEL_GRACE_S: Final = 0.25
"""How long sending a CANCEL frame may hold a cancelled caller before the host counts as gone."""
RECEIVE_SIZE: Final = 256 << 10
"""Bytes asked of the socket per receive."""
HOST_START_WAIT_S: Final = 5.0
"""How long the first session waits for a host whose socket is missing or refuses."""
HELLO_WAIT_S: Final = 5.0
"""How long a new session waits for the host's HELLO (a live host answers at once)."""
VERSION_WAIT_S: Final = 5.0
"""How long a new session waits for the host's answer to the driver version query, its first
ioctl (a live host answers at once; one that answered HELLO may still be hung)."""
HOST_BUSY_WAIT_S: Final = 5.0
"""How long a session waits for a host whose listen backlog is full (connections pile up)."""
HOST_START_POLL_S: Final = 0.05
"""How often a session waiting for a starting host tries to connect again."""
SHORTAGE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""Errnos of a new connection that say this process or the system is short of descriptors
or memory for now: an ordinary failure a service retries, never a missing host."""
_PEER_CLOSED: Final = frozenset({errno.EPIPE, errno.ECONNRESET})
"""Errnos of a send or receive on a connection whose other end was closed."""
_SEQ_MASK: Final = 0xFFFFFFFF
_ADDRESS: Final = struct.Struct("<Q")


class _Pending:
    """An ioctl waiting for its reply; ``wake`` is set when the reply came or the reader left."""

    __slots__ = ("give_up_at", "reply", "sent", "wake")

    def __init__(self) -> None:
        self.reply: IoctlReply | None = None
        self.wake = trio.Event()
        self.sent = False
        """The request frame went out whole: the host has the call."""
        self.give_up_at: float | None = None
        """When the call is given up, fixed when its caller's cancellation first reached it
        (while its frame was still going out): every later step shares that one window."""


@final
class UnixSocketTransport:
    """One device session on a simulated host. Open it with :class:`UnixSocketOpener`."""

    def __init__(
        self, stream: trio.SocketStream, path: str, abandons: AbandonedCalls | None = None
    ) -> None:
        """Wrap ``stream``, a session of the host at ``path``; ``abandons`` logs abandoned
        calls for every session of the opener (:class:`~agent.abandons.AbandonedCalls`)."""
        self._stream = stream
        self._abandons = abandons if abandons is not None else AbandonedCalls()
        self._path = shown_path(path)
        """The host's socket, as messages show it."""
        self._decoder = FrameDecoder()
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._seq = 0
        self._reading = False
        self._lost: str | None = None
        self._closed = False
        self.driver_version: DriverVersion | None = None
        """The host's answer to the version query, set by the opener."""

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        """Perform one ioctl on the host (see :mod:`agent.device.transport`).

        Raises:
            OSError: the driver returned an errno; ``E2BIG`` for a call too large for a frame.
            DeviceLostError: the host went away or broke the protocol (a malformed frame,
                a reply whose sizes differ from the request's).
            trio.ClosedResourceError: the session was closed.
        """
        self._check_usable()
        wire_buffer, memories = _place_user_buffers(buffer, user_buffers)
        seq = self._next_seq()
        try:
            frame = encode_frame(IoctlRequest(seq, code, wire_buffer, memories))
        except WireLimitError as exc:
            raise OSError(errno.E2BIG, f"ioctl {code:#x} too large for the socket: {exc}") from exc
        deadline = trio.current_effective_deadline()
        pending = self._pending[seq] = _Pending()
        try:
            try:
                await self._send(frame, submission, pending)
                reply = await self._wait_reply(pending)
            except trio.Cancelled as cancelled:
                if not pending.sent:  # the host has nothing of the call to cancel
                    raise
                answer = await self._answer_after_cancel(
                    (code, buffer), seq, pending, cancelled, deadline
                )
                if answer is None:
                    raise
                reply = answer
        finally:
            del self._pending[seq]
        self._abandons.given_back(code, buffer)
        if reply.errno:
            raise OSError(reply.errno, os.strerror(reply.errno))
        mismatch = _size_mismatch(reply, buffer, user_buffers)
        if mismatch:
            await self._lose(f"broke the protocol: its reply to ioctl {code:#x} has {mismatch}")
            raise DeviceLostError(self._lost)
        buffer[:] = reply.buffer
        for user_buffer, data in zip(user_buffers, reply.user_buffers, strict=True):
            user_buffer.data[:] = data

    async def claim(self) -> bool:
        """True: nothing is locked. The socket protocol carries no lock: a simulated host is a
        test bed, and which agents run against it is for its user to arrange (two of them
        undo each other's work there as on a VM)."""
        await trio.lowlevel.checkpoint()
        return True

    async def serve_claim(self) -> None:
        """Return: no claim to answer for."""
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Close the session; the host releases its HGCM clients and filter. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._wake_all()
        await trio.aclose_forcefully(self._stream)

    async def _handshake(self, *, user_device: bool) -> None:
        """Say HELLO as a device session and wait for the host's HELLO.

        Raises:
            DeviceUnavailableError: the host refused the session or is not a simulated host.
        """
        try:
            await self._send(encode_frame(Hello(Role.DEVICE, user_device=user_device)))
            frame = await self._receive_frame()
        except DeviceLostError as exc:
            raise DeviceUnavailableError(str(exc)) from exc
        if frame != Hello(Role.HOST):
            msg = f"simulated host at {self._path} refused the session: {_refusal(frame)}"
            raise DeviceUnavailableError(msg)

    async def _ask_version(self) -> DriverVersion:
        """Ask the driver version as the session's first ioctl and return the answer.

        A caller that stops waiting closes the session: nothing is cancelled on the host
        (no CANCEL frame, no give-back time), as a session the opener throws away needs none.

        Raises:
            DeviceUnavailableError: the host went away, refused the query or broke it.
            VBoxStatusError: the driver refused our interface version.
        """
        request = DriverVersionInfo()
        call = request.encode()
        seq = self._next_seq()
        try:
            await self._send(encode_frame(IoctlRequest(seq, call.code, bytes(call.buffer), ())))
            frame = await self._receive_frame()
        except DeviceLostError as exc:
            raise DeviceUnavailableError(str(exc)) from exc
        problem = f"simulated host at {self._path} refused the driver version query"
        if not isinstance(frame, IoctlReply) or frame.seq != seq:
            msg = f"{problem}: {_refusal(frame)}"
            raise DeviceUnavailableError(msg)
        if frame.errno:
            msg = f"{problem}: {errno.errorcode.get(frame.errno, frame.errno)}"
            raise DeviceUnavailableError(msg)
        call.buffer[:] = frame.buffer
        try:
            return request.decode(call)
        except RemoteProtocolError as exc:
            msg = f"{problem}: {exc}"
            raise DeviceUnavailableError(msg) from exc

    async def _answer_after_cancel(
        self,
        call: tuple[int, bytearray],
        seq: int,
        pending: _Pending,
        cancelled: trio.Cancelled,
        deadline: float,
    ) -> IoctlReply | None:
        """Send CANCEL for ``seq`` (``call``: its ioctl code and buffer), then wait for the
        host's answer to it until :func:`~agent.device.transport.abandon_at`; return the
        answer unless it is EINTR (the call was interrupted) or did not come (abandoned; the
        host is gone, or slow)."""
        give_up = (
            abandon_at(cancelled, deadline)
            if pending.give_up_at is None
            else given_back_by(pending.give_up_at)
        )
        began = trio.current_time()
        reply: IoctlReply | None = None
        # One window for the CANCEL frame and the answer: each step taking its own would
        # add up past ABANDON_AFTER_S.
        with trio.CancelScope(shield=True, deadline=give_up) as waiting:
            if pending.reply is None:  # else the call's reply came already: it completed
                with trio.move_on_after(CANCEL_GRACE_S):
                    await self._cancel_on_host(seq)
            try:
                reply = await self._wait_reply(pending)
            except (DeviceLostError, trio.ClosedResourceError):  # gone, or closed meanwhile
                return None
        if waiting.cancelled_caught:
            self._abandons.abandoned(
                *call,
                after_s=round(trio.current_time() - began, 3),
                reason="the simulated host did not answer the cancelled call; its reply is dropped",
            )
            return None
        return None if reply is None or reply.errno == errno.EINTR else reply

    async def _cancel_on_host(self, seq: int) -> None:
        """Tell the host to abandon ioctl ``seq``, as a signal makes the driver end a wait.

        A session lost or closed meanwhile (the CANCEL may wait for another call's frame)
        has nothing left to cancel."""
        if self._closed or self._lost is not None:
            return
        with contextlib.suppress(DeviceLostError, trio.ClosedResourceError):
            await self._send(encode_frame(Cancel(seq)))

    def _check_usable(self) -> None:
        if self._closed:
            msg = "the device session is closed"
            raise trio.ClosedResourceError(msg)
        if self._lost is not None:
            raise DeviceLostError(self._lost)

    def _is_ahead(self, seq: int) -> bool:
        """Whether ``seq`` is later than the last one handed out (modulo 2**32): never sent."""
        return 0 < (seq - self._seq) & _SEQ_MASK <= _SEQ_MASK >> 1

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & _SEQ_MASK
        while self._seq in self._pending:
            self._seq = (self._seq + 1) & _SEQ_MASK
        return self._seq

    async def _send(
        self,
        frame: bytes,
        submission: Submission | None = None,
        pending: _Pending | None = None,
    ) -> None:
        """Send ``frame`` whole, or not at all if cancelled before its first byte left;
        ``pending.sent`` once it is whole (see the module docstring: cancellation).

        Raises:
            DeviceLostError: the host took too little of the frame in time, or failed.
        """
        async with self._send_lock:
            self._check_usable()
            await trio.lowlevel.checkpoint_if_cancelled()
            if submission is not None:
                submission.issued = True
            view = memoryview(frame)
            began = trio.current_time()
            entered_with = trio.current_effective_deadline()
            sent = 0
            try:
                with trio.move_on_at(began + SEND_GRACE_S):
                    while sent < len(view):
                        sent += await self._send_some(view[sent:])
            except trio.Cancelled as cancelled:
                if not sent:  # nothing went out: the host never saw the call
                    if submission is not None:
                        submission.issued = False
                    raise
                give_up_at = abandon_at(cancelled, entered_with)
                if pending is not None:
                    pending.give_up_at = give_up_at
                finish_by = min(give_up_at, began + SEND_GRACE_S)
                with trio.CancelScope(shield=True, deadline=finish_by):
                    while sent < len(view):
                        sent += await self._send_some(view[sent:])
                if sent < len(view):
                    took = trio.current_time() - began
                    await self._lose(f"is gone: it took no whole frame in {took:.3g} s")
                    raise DeviceLostError(self._lost) from None
                if pending is not None:
                    pending.sent = True
                raise
            if sent < len(view):
                await self._lose(f"is gone: it took no frame for {SEND_GRACE_S:.3g} s")
                raise DeviceLostError(self._lost)
            if pending is not None:
                pending.sent = True

    async def _send_some(self, data: memoryview) -> int:
        """Send what the socket takes of ``data`` (waiting until it takes something).

        Raises:
            DeviceLostError: the connection broke or was closed.
        """
        try:
            return await self._stream.socket.send(data)
        except OSError as exc:
            if exc.errno in _PEER_CLOSED:
                await self._lose("is gone: it closed the connection")
            else:
                await self._lose(f"is gone: sending failed: {exc.strerror or exc}")
            raise DeviceLostError(self._lost) from exc
        except trio.ClosedResourceError as exc:
            await self._lose(f"is gone: sending failed: {exc}")
            raise DeviceLostError(self._lost) from exc

    async def _wait_reply(self, pending: _Pending) -> IoctlReply:
        while pending.reply is None:
            self._check_usable()
            if self._reading:
                pending.wake = trio.Event()
                await pending.wake.wait()
                continue
            self._reading = True
            try:
                await self._read_until(pending)
            finally:
                self._reading = False
                self._wake_all()
        return pending.reply

    async def _read_until(self, pending: _Pending) -> None:
        while pending.reply is None:
            frame = await self._receive_frame()
            if isinstance(frame, IoctlReply):
                waiter = self._pending.get(frame.seq)
                if waiter is not None:
                    waiter.reply = frame
                    waiter.wake.set()
                elif self._is_ahead(frame.seq):
                    await self._lose(
                        f"broke the protocol: it replied to ioctl seq {frame.seq}, "
                        "which was never sent"
                    )
                    raise DeviceLostError(self._lost)
                continue  # a reply to a cancelled caller is dropped
            if isinstance(frame, ErrorFrame):
                await self._lose(f"is gone: it reported an error: {shown_text(frame.message)}")
            else:
                await self._lose(
                    f"broke the protocol: it sent {describe_frame(frame)}, unexpected here"
                )
            raise DeviceLostError(self._lost)

    async def _receive_frame(self) -> Frame:
        while True:
            try:
                frame = self._decoder.next_frame()
            except WireError as exc:
                await self._lose(f"sent a malformed frame: {exc}")
                raise DeviceLostError(self._lost) from exc
            if frame is not None:
                return frame
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except trio.BrokenResourceError as exc:
                await self._lose(f"is gone: {_broken('receiving', exc)}")
                raise DeviceLostError(self._lost) from exc
            except trio.ClosedResourceError:
                self._check_usable()
                raise
            if not data:
                await self._lose("is gone: it closed the connection")
                raise DeviceLostError(self._lost)
            self._decoder.feed(data)

    async def _lose(self, what: str) -> None:
        """Drop the connection: the host ``what`` ("is gone: ...", "sent a malformed ...")."""
        if self._lost is None:
            self._lost = f"simulated host at {self._path} {what}"
        self._wake_all()
        await trio.aclose_forcefully(self._stream)

    def _wake_all(self) -> None:
        for waiter in self._pending.values():
            waiter.wake.set()


def _size_mismatch(reply: IoctlReply, buffer: bytearray, user_buffers: Sequence[UserBuffer]) -> str:
    """How the sizes of ``reply`` differ from the request's (``""`` when they match)."""
    if len(reply.buffer) != len(buffer):
        return f"{len(reply.buffer)} bytes for a {len(buffer)}-byte buffer"
    sent = [len(user_buffer.data) for user_buffer in user_buffers]
    got = [len(data) for data in reply.user_buffers]
    if got != sent:
        return f"user buffers of {got} bytes for {sent}"
    return ""


def _place_user_buffers(
    buffer: bytearray, user_buffers: Sequence[UserBuffer]
) -> tuple[bytes, tuple[UserMemory, ...]]:
    """Return a copy of ``buffer`` with synthetic addresses stored, and the user memory.

    Addresses are page-aligned and distinct; the caller's buffer is left as it was until
    the host's reply (which carries the addresses back) arrives.
    """
    wire_buffer = bytearray(buffer)
    memories = []
    address = USER_ADDRESS_BASE
    for user_buffer in user_buffers:
        if not 0 <= user_buffer.address_offset <= len(buffer) - _ADDRESS.size:
            msg = f"user buffer address field at {user_buffer.address_offset} is outside the buffer"
            raise LocalProtocolError(msg)
        _ADDRESS.pack_into(wire_buffer, user_buffer.address_offset, address)
        memories.append(UserMemory(address, bytes(user_buffer.data)))
        pages = max(1, -(-len(user_buffer.data) // PAGE_SIZE))
        address += pages * PAGE_SIZE
    return bytes(wire_buffer), tuple(memories)


@final
class UnixSocketOpener:
    """Opens device sessions on the simulated host listening at ``path``.

    Args:
        path: the host's socket (``vbox-agent simulate --socket PATH``).
        user_device: open sessions as ``/dev/vboxuser`` would (untrusted userspace).
        start_wait_s: how long the first session waits for a host that is starting.

    Raises:
        ValueError: ``path`` cannot name a Unix socket (see :func:`check_socket_path`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        user_device: bool = False,
        start_wait_s: float = HOST_START_WAIT_S,
    ) -> None:
        self._path = check_socket_path(os.fspath(path))
        self._shown = shown_path(self._path)
        self._user_device = user_device
        self._start_wait_s = start_wait_s
        self._host_seen = False
        self._abandons = AbandonedCalls()

    @property
    def description(self) -> str:
        """``unix:PATH``."""
        return f"unix:{self._shown}"

    @property
    def simulated(self) -> bool:
        """True: a socket leads to a simulated host (``vbox-agent simulate``)."""
        return True

    async def open_session(self) -> UnixSocketTransport:
        """Connect, say HELLO, ask the driver version and return the new session.

        Until a first session is opened, a missing or refusing socket may be a host that is
        still starting (``vbox-agent simulate ... &`` a moment ago): the opener logs that it
        waits and tries again every ``HOST_START_POLL_S`` for up to ``start_wait_s``
        seconds. Once a host answered, a failure to connect means it is gone, and a path that
        exists and is not a socket, or where no socket can be, can never be a host: no wait.
        A host whose listen backlog is full is busy, not gone: any session waits up to
        ``HOST_BUSY_WAIT_S`` for it.

        A host that accepted the connection must be run by this process's effective uid or
        by root (:func:`untrusted_host`; nothing is sent to another's), answer HELLO
        within ``HELLO_WAIT_S`` and the driver version query within ``VERSION_WAIT_S``
        (one that answered HELLO may still be hung); a session not answered in time is
        closed, nothing is cancelled on the host.

        Raises:
            NotTheDeviceError: the path exists and is not a socket (a regular file, a
                directory), or no socket can be there (:data:`NOT_THE_DEVICE_ERRNOS`: below
                a regular file, a symbolic link loop): a mistake no retry mends, as a path
                that cannot be the device.
            DeviceUnavailableError: nothing listens at the path, the host is run by another
                user, or it refused or did not answer.
            VBoxStatusError: the driver refused our interface version.
            OSError: no socket for want of descriptors or memory (:data:`SHORTAGE_ERRNOS`),
                which may pass: the host is not gone.
        """
        stream = await self._connect()
        transport = UnixSocketTransport(stream, self._path, self._abandons)
        try:
            await self._greet(transport)
        except BaseException:
            await transport.aclose()
            raise
        self._host_seen = True
        return transport

    async def _greet(self, transport: UnixSocketTransport) -> None:
        """Say HELLO on the new session and ask the driver version, each within its wait."""
        with trio.move_on_after(HELLO_WAIT_S) as hello_wait:
            await transport._handshake(user_device=self._user_device)
        if hello_wait.cancelled_caught:
            msg = f"simulated host at {self._shown} did not answer HELLO within {HELLO_WAIT_S:g} s"
            raise DeviceUnavailableError(msg)
        with trio.move_on_after(VERSION_WAIT_S) as version_wait:
            transport.driver_version = await transport._ask_version()
        if version_wait.cancelled_caught:
            msg = (
                f"{self.description} did not answer the driver version query within "
                f"{VERSION_WAIT_S:g} s"
            )
            raise DeviceUnavailableError(msg)

    async def _connect(self) -> trio.SocketStream:
        wait_s = 0.0 if self._host_seen else self._start_wait_s
        started = trio.current_time()
        waiting = False
        while True:
            try:
                stream = await trio.open_unix_socket(self._path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if (refusal := cannot_be_a_host(self._path)) is not None:  # 78, no retry
                    raise NotTheDeviceError(refusal) from exc
                if trio.current_time() - started >= wait_s:
                    waited = f"; waited {wait_s:g} s for it to start" if waiting else ""
                    raise self._unavailable(exc, waited) from exc
                if not waiting:
                    _log.info("waiting_for_simulated_host", path=self._path, limit_s=wait_s)
                    waiting = True
                await trio.sleep(HOST_START_POLL_S)
                continue
            except OSError as exc:
                if exc.errno in SHORTAGE_ERRNOS:
                    msg = (
                        f"cannot open a session on {self._shown}: {exc.strerror or exc}, a "
                        "shortage that may pass, not a missing host"
                    )
                    raise OSError(exc.errno, msg) from exc
                if exc.errno in NOT_THE_DEVICE_ERRNOS:  # 78, no retry
                    raise NotTheDeviceError(_no_socket_there(self._path, exc)) from exc
                raise self._unavailable(exc, "") from exc
            if _is_connected(stream):
                uid = peer_uid(stream.socket)
                if (refusal := untrusted_host(self._shown, uid, os.geteuid())) is not None:
                    await trio.aclose_forcefully(stream)
                    raise DeviceUnavailableError(refusal)
                if waiting:
                    _log.info("simulated_host_answered", path=self._path, uid=uid)
                return stream
            await trio.aclose_forcefully(stream)
            if trio.current_time() - started >= max(wait_s, HOST_BUSY_WAIT_S):
                msg = (
                    f"simulated host at {self._shown} is busy: it took no new connection "
                    f"for {max(wait_s, HOST_BUSY_WAIT_S):g} s (its listen backlog is full)"
                )
                raise DeviceUnavailableError(msg)
            await trio.sleep(HOST_START_POLL_S)

    def _unavailable(self, exc: OSError, waited: str) -> DeviceUnavailableError:
        if isinstance(exc, PermissionError):
            return DeviceUnavailableError(
                f"permission denied connecting to {self._shown} (a simulated host's socket "
                "is only for the user who started it)"
            )
        reason = exc.strerror or str(exc)
        return DeviceUnavailableError(
            f"no simulated host at {self._shown} ({reason}{waited}): "
            f"start one with `vbox-agent simulate --socket {self._shown}`"
        )


def _broken(action: str, exc: trio.BrokenResourceError) -> str:
    """Why ``action`` failed: the host closed its end (EPIPE, ECONNRESET), or the OS's reason."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.errno in _PEER_CLOSED:
        return "it closed the connection"
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
    return f"{action} failed: {reason}"


def _is_connected(stream: trio.SocketStream) -> bool:
    """Whether ``stream`` reached the host: a connect to a full listen backlog fails with
    EAGAIN, which ``trio.open_unix_socket`` returns as a socket that is not connected."""
    try:
        stream.socket.getpeername()
    except OSError:
        return False
    return True


def untrusted_host(path: str, host_uid: int, own_uid: int) -> str | None:
    """Return why a session must not trust the simulated host at ``path``, run by
    ``host_uid``, as an agent running as ``own_uid``; None when it may.

    A host feeds the agent properties, events and balloon requests (on ``oracle`` the agent
    locks memory for them), and whoever creates the socket first is its host: only one
    run by the agent's own user or by root is trusted.
    """
    if host_uid in (own_uid, 0):
        return None
    who = "root" if own_uid == 0 else f"uid {own_uid} or root"
    return (
        f"refusing the simulated host at {path}: it runs as uid {host_uid}, and an agent "
        f"running as uid {own_uid} trusts only a host run by {who} (start "
        f"`vbox-agent simulate --socket {path}` as {who})"
    )


def cannot_be_a_host(path: str) -> str | None:
    """Return why no simulated host can ever listen at ``path``: it exists and is not a
    socket, or ``stat`` fails as :data:`NOT_THE_DEVICE_ERRNOS` (no socket can be there;
    ``vbox-agent check-config`` refuses such a ``unix:`` path, as ``run`` does); None when
    one may (a missing socket included: the host may start later)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return None
    except OSError as exc:
        return _no_socket_there(path, exc) if exc.errno in NOT_THE_DEVICE_ERRNOS else None
    return f"no simulated host at {shown_path(path)}: it exists and is not a socket"


def _no_socket_there(path: str, exc: OSError) -> str:
    """Why no socket can be at ``path``, whose ``stat`` or ``connect`` failed with ``exc``
    (one of :data:`NOT_THE_DEVICE_ERRNOS`)."""
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return (
        f"no simulated host at {shown_path(path)}: no socket can be there "
        f"({exc.strerror or exc}, {name})"
    )


def _refusal(frame: Frame) -> str:
    """Why the host's answer to a session's opening step is a refusal: the message of its
    ERROR frame (cut short), or what it sent instead of the expected answer."""
    if isinstance(frame, ErrorFrame):
        return shown_text(frame.message)
    return f"it answered {describe_frame(frame)}"
