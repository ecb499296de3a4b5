"""The character-device transport: threads, limiter, descriptors, user memory, cancellation.

Rules of this test module:

- The transport runs for real: real worker threads, its own limiter, its EINTR policy and
  its cancellation. Only the system calls are injected (``tests.device.syscalls.Kernel``
  over :class:`FakeDriver`: a driver on the trio thread, interrupts as EINTR, user buffers
  at real addresses).
- The real signal path (``SIGURG`` into a thread blocked in a real system call) and the
  ``fcntl``/libc split run against pipes, since CI has no ``/dev/vboxguest``; the real
  device gets one smoke test, skipped without the node.
- Real clock, never ``autojump_clock`` (threads); every test is bounded by ``fail_after``. A
  test that times what the transport does while the test holds every worker thread in the
  "driver" takes ``clock`` (the real pace) and stills it there (:func:`_still`): virtual time
  that jumps to the next deadline, so the bound is the transport's alone, not the load's.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import itertools
import math
import os
import signal
import socket
import stat
import sys
import termios
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pydantic
import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from agent.config import OLD_MIN_IOCTL_THREADS, DeviceConfig
from agent.device import chardev, claimname
from agent.device.chardev import CharDevOpener, CharDevTransport
from agent.device.errors import DeviceLostError, DeviceUnavailableError, NotTheDeviceError
from agent.protocol import (
    ChangeBalloon,
    ChangeMemBalloon,
    ChunkPages,
    DriverVersion,
    GetHostVersion,
    HgcmBuffer,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCall,
    HgcmConnect,
    HgcmData,
    HgcmU32,
    InterruptAllWaits,
    Ioctl,
    LocalProtocolError,
    Request,
    Session,
    Submission,
    UserBuffer,
    WaitForEvents,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import (
    ABANDON_AFTER_S,
    HGCM_CALL_HEADER_SIZE,
    HGCM_PARM64_SIZE,
    SHORT_CALL_TIMEOUT_MS,
    HgcmParmType,
)
from agent.protocol.status import VERR_VERSION_MISMATCH
from tests.device.syscalls import CtypesMemory, Kernel

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from agent.protocol import IoctlCall

R = TypeVar("R")
BOUND = 5.0
"""Seconds any test may take."""
NOBODY = 65534
"""The uid of ``nobody``: the other user a test runs a holder of the claim name as."""
PROMPT = 1.0
"""Seconds within which a cancellation or close must take effect."""
POLL_S = 0.001
"""How often a test checks where a worker thread sleeps in the kernel."""
ECHO_FUNCTION = 1
"""Fake HGCM function: reverse every LINADDR buffer in place, return its length in param 0."""
BLOCK_FUNCTION = 2
"""Fake HGCM function: never completes unless cancelled."""
HAS_DEVICE = Path(chardev.DEFAULT_PATH).exists()
NO_DEVICE = f"{chardev.DEFAULT_PATH} does not exist (not a VirtualBox guest)"


# --- the guest side: real memory and a kernel made of injected system calls ---------------


@dataclass(eq=False)
class FakeSession:
    """One open fd of :class:`FakeDriver`."""

    cancel_waiters: bool = False
    clients: set[int] = field(default_factory=set)


class FakeDriver:
    """A few ioctls of the mainline driver, with ``SimulatedHost``'s entry points.

    Versions, waits with the sticky INTERRUPT_ALL, GET_HOST_VERSION, the EPERM passthrough
    policy for CHANGE_MEMBALLOON, ENOTTY for unknown ioctls and a two-function HGCM service
    that reaches user buffers only through ``memory``. Errors leave the buffer untouched.
    """

    def __init__(self) -> None:
        self.pending_events = 0
        self.cancelled_calls = 0
        self.refuse_version = False
        self.hold_requests: trio.Event | None = None
        """While set to an unset event, VMMDev requests wait in the driver for it."""
        self.hold_connects: trio.Event | None = None
        """While set to an unset event, HGCM connects wait in the driver for it."""
        self.closed: list[FakeSession] = []
        self._changed = trio.Event()
        self._client_ids = itertools.count(1)

    def open_session(self) -> FakeSession:
        """Open a session (an fd)."""
        return FakeSession()

    async def close_session(self, session: FakeSession) -> None:
        """Release the session."""
        await trio.lowlevel.checkpoint()
        self.closed.append(session)

    def raise_events(self, mask: int) -> None:
        """Make ``mask`` pending and wake the waiters."""
        self.pending_events |= mask
        self._wake()

    async def ioctl(
        self, session: FakeSession, code: int, buffer: bytearray, memory: CtypesMemory
    ) -> None:
        """Handle one ioctl like the kernel: an errno as ``OSError``, else ``rc`` in place."""
        await trio.lowlevel.checkpoint()
        work = bytearray(buffer)
        L.IoctlHeader.rc.set(work, 0)
        if code == Ioctl.DRIVER_VERSION_INFO:
            self._version(work)
        elif code == Ioctl.WAIT_FOR_EVENTS:
            await self._wait(session, work)
        elif code == Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS:
            session.cancel_waiters = True
            self._wake()
        elif code == Ioctl.HGCM_CONNECT:
            if self.hold_connects is not None:
                await self.hold_connects.wait()
            client_id = next(self._client_ids)
            session.clients.add(client_id)
            L.HgcmConnectIoctl.client_id.set(work, client_id)
        elif code == Ioctl.hgcm_call_64(len(work)):
            await self._hgcm_call(session, work, memory)
        elif code == Ioctl.vmmdev_request(len(work)) or code == Ioctl.VMMDEV_REQUEST_BIG:
            if self.hold_requests is not None:
                await self.hold_requests.wait()
            self._vmmdev_request(work)
        else:
            raise OSError(errno.ENOTTY, "unknown ioctl")
        buffer[:] = work

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _version(self, work: bytearray) -> None:
        if self.refuse_version:
            L.IoctlHeader.rc.set(work, VERR_VERSION_MISMATCH)
            L.DriverVersionInfo.session_version.set(work, 0xFFFFFFFF)
        else:
            L.DriverVersionInfo.session_version.set(work, 0x10000)
        L.DriverVersionInfo.driver_version.set(work, 0x10000)

    async def _wait(self, session: FakeSession, work: bytearray) -> None:
        mask = L.WaitForEventsIoctl.events_in.get(work)
        while not session.cancel_waiters and not self.pending_events & mask:
            await self._changed.wait()
        if session.cancel_waiters:
            raise OSError(errno.EINTR, "waits cancelled")
        events = self.pending_events & mask
        self.pending_events &= ~events
        L.WaitForEventsIoctl.events_out.set(work, events)

    def _vmmdev_request(self, work: bytearray) -> None:
        request_type = L.RequestHeader.request_type.get(work)
        if request_type != GetHostVersion.request_type:
            raise OSError(errno.EPERM, "denied passthrough")
        L.HostVersionRequest.major.set(work, 7)
        L.HostVersionRequest.minor.set(work, 1)
        L.RequestHeader.rc.set(work, 0)

    async def _hgcm_call(self, session: FakeSession, work: bytearray, memory: CtypesMemory) -> None:
        if L.HgcmCallIoctl.client_id.get(work) not in session.clients:
            raise OSError(errno.EINVAL, "not this session's client")
        if L.HgcmCallIoctl.function.get(work) == BLOCK_FUNCTION:
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled_calls += 1
        total = 0
        for index in range(L.HgcmCallIoctl.parm_count.get(work)):
            base = HGCM_CALL_HEADER_SIZE + HGCM_PARM64_SIZE * index
            view = memoryview(work)[base : base + HGCM_PARM64_SIZE]
            if L.HgcmParameter64.type.get(view) != HgcmParmType.LINADDR:
                continue
            size = L.HgcmParameter64.pointer_size.get(view)
            address = L.HgcmParameter64.pointer_linear_addr.get(view)
            memory.write(address, memory.read(address, size)[::-1])
            total += size
        if total:
            first = memoryview(work)[HGCM_CALL_HEADER_SIZE : HGCM_CALL_HEADER_SIZE + 16]
            L.HgcmParameter64.value32.set(first, total)


@pytest.fixture(name="kernel")
async def _kernel() -> Kernel[FakeDriver]:
    return Kernel(FakeDriver())


async def _call(
    transport: CharDevTransport,
    session: Session,
    request: Request[R],
    submission: Submission | None = None,
) -> R:
    """Encode ``request``, move it through ``transport`` and decode the reply."""
    call: IoctlCall[R] = session.encode(request)
    await transport.ioctl(call.code, call.buffer, call.user_buffers, submission=submission)
    return session.decode(call)


async def _wait_for_events(transport: CharDevTransport, events: list[int]) -> None:
    """A wait for event 0x10 on a session of its own (a blocking call); the mask it got goes
    into ``events``."""
    events.append((await _call(transport, Session(), WaitForEvents(0x10))).mask)


async def _host_version(transport: CharDevTransport) -> None:
    """A GET_HOST_VERSION on a session of its own (a short call), answered."""
    assert (await _call(transport, Session(), GetHostVersion())).major == 7


async def _open_connected(
    kernel: Kernel[FakeDriver], *, threads: int = chardev.DEFAULT_THREADS
) -> tuple[CharDevTransport, Session, int]:
    transport = await kernel.opener(threads=threads).open_session()
    session = Session()
    connected = await _call(transport, session, HgcmConnect("VBoxGuestPropSvc"))
    return transport, session, connected.client_id


_libc = ctypes.CDLL(None, use_errno=True)


def _read_ioctl(fd: int, code: int, buffer: bytearray) -> None:
    """An ``ioctl_fn`` blocking in ``read(2)`` through ctypes, which retries no EINTR."""
    view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    if _libc.read(fd, view, len(buffer)) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _version_then_read(fd: int, code: int, buffer: bytearray) -> None:
    """Answer the version handshake like the driver; block in ``read(2)`` for anything else."""
    if code != Ioctl.DRIVER_VERSION_INFO:
        _read_ioctl(fd, code, buffer)
        return
    L.IoctlHeader.rc.set(buffer, 0)
    L.DriverVersionInfo.session_version.set(buffer, 0x10000)


def raises_errno(code: int) -> pytest.RaisesExc[OSError]:
    """Expect an ``OSError`` carrying ``code``."""
    return pytest.raises(OSError, match=rf"^\[Errno {code}\] ")


@pytest.fixture(name="pipe")
def _pipe() -> Iterator[tuple[int, int]]:
    """A pipe: a read(2) of its read end blocks until the test writes or a signal comes; the
    transport under test closes that end."""
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    os.close(write_fd)


@pytest.fixture(name="clock")
def _clock() -> trio.testing.MockClock:
    """The real clock's pace, until a test stills it."""
    return trio.testing.MockClock(rate=1.0)


@contextlib.contextmanager
def _still(clock: trio.testing.MockClock, *, jumping: bool = True) -> Iterator[None]:
    """Within the block, time stands still; ``jumping``, it jumps to the next deadline once
    every task waits (``autojump_clock``), which a test allows only while it holds every
    worker thread (one running would see time jump)."""
    clock.rate, clock.autojump_threshold = 0.0, 0.0 if jumping else math.inf
    try:
        yield
    finally:
        clock.rate, clock.autojump_threshold = 1.0, math.inf


def _ioctl_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "vbox-ioctl"]


CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)
"""A context variable the caller of an ioctl sets, as the daemon binds a service's name."""


async def _run_as(caller: str, scope: trio.CancelScope, call: Awaitable[object]) -> None:
    """Await ``call`` inside ``scope`` with :data:`CALLER` set to ``caller``."""
    CALLER.set(caller)
    await _run_in(scope, call)


async def _run_in(scope: trio.CancelScope, call: Awaitable[object]) -> None:
    """Await ``call`` inside ``scope``."""
    with scope:
        await call


async def _cancel_once_in_driver(
    kernel: Kernel[FakeDriver], call: Awaitable[object]
) -> trio.CancelScope:
    """Run ``call`` until it is inside the driver, cancel it there and return its scope once
    it has ended, which must be within ``PROMPT`` of the cancel."""
    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_in, scope, call)
        await kernel.wait_in_driver(1)
        scope.cancel()
        cancelled_at = trio.current_time()
    assert trio.current_time() - cancelled_at < PROMPT
    return scope


async def _threads_blocked_in_pipe_read(count: int) -> list[threading.Thread]:
    """Wait (bounded by ``PROMPT``) until ``count`` ioctl threads sleep in a pipe's read(2).

    The kernel names where a sleeping thread waits (``/proc/self/task/TID/wchan``): a thread
    blocked in the system call shows the pipe's read function there.
    """
    with trio.fail_after(PROMPT):
        while True:
            blocked = [thread for thread in _ioctl_threads() if _in_pipe_read(thread)]
            if len(blocked) == count:
                return blocked
            await trio.sleep(POLL_S)


def _in_pipe_read(thread: threading.Thread) -> bool:
    try:
        wchan = Path(f"/proc/self/task/{thread.native_id}/wchan").read_text()
    except FileNotFoundError:  # the thread has exited
        return False
    return wchan.endswith("pipe_read")


# --- tests ----------------------------------------------------------------------------------


class TestOpen:
    """Opening a session: the open flags, the version handshake and one-line failures."""

    async def test_handshake_result_is_exposed(self, kernel: Kernel[FakeDriver]) -> None:
        """Each session agrees on interface version 1.0 and keeps the driver's answer."""
        with trio.fail_after(BOUND):
            transport = await kernel.opener().open_session()
            assert transport.driver_version == DriverVersion(0x10000, 0x10000, 0)
            assert kernel.opener().description == "/dev/vboxguest"
            await transport.aclose()
        assert kernel.sessions == {}

    async def test_refused_version_is_unavailable_and_closes_the_fd(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """A driver answering VERR_VERSION_MISMATCH fails the open and leaves no fd open."""
        kernel.driver.refuse_version = True
        with trio.fail_after(BOUND), pytest.raises(DeviceUnavailableError) as caught:
            await kernel.opener().open_session()
        message = str(caught.value)
        assert "/dev/vboxguest" in message
        assert "VERR_VERSION_MISMATCH" in message
        assert "incompatible" in message
        assert kernel.sessions == {}

    async def test_einval_handshake_is_incompatible(self) -> None:
        """A driver answering the handshake with EINVAL has an incompatible interface."""

        def ioctl_fn(fd: int, code: int, buffer: bytearray) -> None:
            raise OSError(errno.EINVAL, "bad version")

        closed: list[int] = []
        opener = CharDevOpener(
            "/dev/vboxguest",
            ioctl_fn=ioctl_fn,
            open_fn=lambda path, flags: 7,
            close_fn=closed.append,
            interrupt_fn=lambda thread: None,
        )
        with trio.fail_after(BOUND), pytest.raises(DeviceUnavailableError, match="EINVAL"):
            await opener.open_session()
        assert closed == [7]

    async def test_missing_node_names_the_fix(self, tmp_path: Path) -> None:
        """A missing node (a real ``os.open``) says to load the module or name the right node
        (a typo in ``--device`` or ``device.path`` is the other cause)."""
        path = tmp_path / "vboxguest"
        with trio.fail_after(BOUND), pytest.raises(DeviceUnavailableError) as caught:
            await CharDevOpener(str(path)).open_session()
        message = str(caught.value)
        assert message.startswith(str(path))
        assert "modprobe vboxguest" in message
        assert "(--device, or run's [device] path)" in message  # prop reads no config
        assert "\n" not in message

    async def test_a_path_is_shown_on_one_printable_line(self, tmp_path: Path) -> None:
        """A node whose name holds a newline, a terminal escape and an undecodable byte (an
        opener made without the spec's checks) is named escaped, on one line."""
        path = f"{tmp_path}/vbox\nfake line\x1b[2J\udcff"
        with trio.fail_after(BOUND), pytest.raises(DeviceUnavailableError) as caught:
            await CharDevOpener(path).open_session()
        assert str(caught.value).startswith(f"{tmp_path}/vbox\\nfake line\\x1b[2J\\xff does not")
        assert str(caught.value).isprintable()

    async def test_permission_denied_names_mode_owner_and_fix(self, tmp_path: Path) -> None:
        """EACCES names the node's mode and owner, root or the group, and /dev/vboxuser."""
        node = tmp_path / "vboxguest"
        node.touch(mode=0o600)
        node.chmod(0o600)

        def open_fn(path: str, flags: int) -> int:
            raise PermissionError(errno.EACCES, "Permission denied", path)

        opener = CharDevOpener(str(node), open_fn=open_fn)
        with trio.fail_after(BOUND), pytest.raises(DeviceUnavailableError) as caught:
            await opener.open_session()
        message = str(caught.value)
        st = node.stat()
        assert f"permission denied opening {node} (mode 0600, owner " in message
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert "run as root" in message
        assert "/dev/vboxuser" in message

    @pytest.mark.parametrize("code", [errno.ENXIO, errno.ENODEV])
    async def test_no_device_behind_node(self, code: int) -> None:
        """ENXIO and ENODEV mean no VirtualBox device is behind the node."""

        def open_fn(path: str, flags: int) -> int:
            raise OSError(code, os.strerror(code), path)

        with trio.fail_after(BOUND), pytest.raises(DeviceUnavailableError) as caught:
            await CharDevOpener("/dev/vboxguest", open_fn=open_fn).open_session()
        assert str(caught.value) == (
            "no VirtualBox device behind /dev/vboxguest (not running in VirtualBox?)"
        )

    @pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
    async def test_a_shortage_is_not_a_missing_device(self, code: int) -> None:
        """Out of descriptors or kernel memory, open(2) fails with an ordinary OSError (its
        errno kept, the path and the reason in one line), not DeviceUnavailableError: the
        device is still there, and the caller retries as after any failure."""

        def open_fn(path: str, flags: int) -> int:
            raise OSError(code, os.strerror(code))

        opener = CharDevOpener("/dev/vboxguest", open_fn=open_fn)
        with trio.fail_after(BOUND), raises_errno(code) as caught:
            await opener.open_session()
        assert not isinstance(caught.value, DeviceUnavailableError)
        assert str(caught.value) == (
            f"[Errno {code}] cannot open a session on /dev/vboxguest: {os.strerror(code)} "
            f"({errno.errorcode[code]}), a shortage that may pass, not a missing device"
        )

    @pytest.mark.parametrize(
        ("rc", "code", "name"),
        [(0, errno.ENOMEM, "ENOMEM"), (0, errno.EINTR, "EINTR"), (-8, 0, "VERR_NO_MEMORY")],
    )
    async def test_a_handshake_short_of_memory_is_not_a_missing_device(
        self, rc: int, code: int, name: str
    ) -> None:
        """A handshake the driver fails for want of kernel memory (an errno, or Oracle's
        VERR_NO_MEMORY in ``rc``) or to stray signals past the retries is an ordinary
        OSError naming the path, not DeviceUnavailableError; the fd is closed."""

        def ioctl_fn(fd: int, ioctl: int, buffer: bytearray) -> None:
            if code:
                raise OSError(code, os.strerror(code))
            L.IoctlHeader.rc.set(buffer, rc)

        closed: list[int] = []
        opener = CharDevOpener(
            "/dev/vboxguest",
            ioctl_fn=ioctl_fn,
            open_fn=lambda path, flags: 7,
            close_fn=closed.append,
            interrupt_fn=lambda thread: None,
        )
        with trio.fail_after(BOUND), raises_errno(code or errno.ENOMEM) as caught:
            await opener.open_session()
        assert not isinstance(caught.value, DeviceUnavailableError)
        assert f"version handshake on /dev/vboxguest failed ({name}), a shortage" in str(
            caught.value
        )
        assert closed == [7]

    @pytest.mark.parametrize("make", ["node", "file"])
    async def test_a_file_that_is_not_vboxguest(self, tmp_path: Path, make: str) -> None:
        """A node or a file that answers the handshake with ENOTTY (``--device /dev/null``,
        ``/etc/passwd``) is not the device, whatever loads later: a configuration mistake,
        named with its fix in one line."""
        path = "/dev/null" if make == "node" else str(tmp_path / "passwd")
        if make == "file":
            (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        with trio.fail_after(BOUND), pytest.raises(NotTheDeviceError) as caught:
            await CharDevOpener(path).open_session()
        assert str(caught.value) == (
            f"{path} is not a vboxguest device: it did not answer the vboxguest version "
            "handshake (ENOTTY); name the device node (--device, or run's [device] path)"
        )

    async def test_a_unix_socket_is_not_the_device(self, tmp_path: Path) -> None:
        """A Unix socket (a simulated host's, named without ``unix:``) fails ``open(2)`` with
        ENXIO, which is no missing VirtualBox: a configuration mistake, with the spelling
        that reaches the host."""
        path = tmp_path / "host.sock"
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            with trio.fail_after(BOUND), pytest.raises(NotTheDeviceError) as caught:
                await CharDevOpener(str(path)).open_session()
        assert str(caught.value) == (
            f"{path} is a Unix socket, not the vboxguest device: for a simulated host "
            f"listening there write unix:{path} (--device, or run's [device] path)"
        )

    @staticmethod
    def _sysfs(tmp_path: Path, node: str, target: str | None) -> str:
        """A sysfs root whose ``dev/char`` entry for ``node`` links to ``target``."""
        root = tmp_path / "sys"
        (root / "dev" / "char").mkdir(parents=True)
        if target is not None:
            rdev = os.stat(node).st_rdev
            entry = root / "dev" / "char" / f"{os.major(rdev)}:{os.minor(rdev)}"
            entry.symlink_to(f"../../devices/virtual/{target}")
        return str(root)

    @pytest.mark.parametrize("code", [errno.EINVAL, errno.EIO])
    async def test_another_drivers_node_is_not_the_device(self, tmp_path: Path, code: int) -> None:
        """A character device sysfs names as another device (``--device /dev/random``,
        whose driver answers the handshake with EINVAL) is not the device: no interface
        version was refused. The fd is closed."""

        def ioctl_fn(fd: int, ioctl: int, buffer: bytearray) -> None:
            raise OSError(code, os.strerror(code))

        closed: list[int] = []
        opener = CharDevOpener(
            "/dev/null",
            ioctl_fn=ioctl_fn,
            open_fn=lambda path, flags: 7,
            close_fn=closed.append,
            interrupt_fn=lambda thread: None,
            sysfs_root=self._sysfs(tmp_path, "/dev/null", "mem/random"),
        )
        with trio.fail_after(BOUND), pytest.raises(NotTheDeviceError) as caught:
            await opener.open_session()
        assert str(caught.value) == (
            "/dev/null is not a vboxguest device (it is random); name the device node "
            "(--device, or run's [device] path)"
        )
        assert closed == [7]

    async def test_another_drivers_node_without_a_device_is_not_the_device(
        self, tmp_path: Path
    ) -> None:
        """ENXIO from another driver's node (a serial port without its hardware) is no
        missing VirtualBox either."""

        def open_fn(path: str, flags: int) -> int:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO), path)

        sysfs = self._sysfs(tmp_path, "/dev/null", "tty/ttyS3")
        opener = CharDevOpener("/dev/null", open_fn=open_fn, sysfs_root=sysfs)
        with trio.fail_after(BOUND), pytest.raises(NotTheDeviceError, match=r"\(it is ttyS3\)"):
            await opener.open_session()

    @pytest.mark.parametrize("target", ["misc/vboxguest", "misc/vboxuser", None])
    async def test_a_vboxguest_node_or_an_unknown_one_is_incompatible(
        self, tmp_path: Path, target: str | None
    ) -> None:
        """Where sysfs names the node vboxguest or vboxuser (both drivers' misc devices), or
        has no entry for it, an EINVAL handshake is still the driver refusing the version."""

        def ioctl_fn(fd: int, ioctl: int, buffer: bytearray) -> None:
            raise OSError(errno.EINVAL, "bad version")

        opener = CharDevOpener(
            "/dev/null",
            ioctl_fn=ioctl_fn,
            open_fn=lambda path, flags: 7,
            close_fn=lambda fd: None,
            interrupt_fn=lambda thread: None,
            sysfs_root=self._sysfs(tmp_path, "/dev/null", target),
        )
        with trio.fail_after(BOUND), pytest.raises(DeviceUnavailableError) as caught:
            await opener.open_session()
        assert not isinstance(caught.value, NotTheDeviceError)
        assert "refused ioctl interface version 0x00010000 (EINVAL)" in str(caught.value)

    async def test_a_directory_is_not_the_device(self, tmp_path: Path) -> None:
        """A directory (EISDIR) cannot be the device: named with the reason and the fix."""
        with trio.fail_after(BOUND), pytest.raises(NotTheDeviceError) as caught:
            await CharDevOpener(str(tmp_path)).open_session()
        assert str(caught.value) == (
            f"{tmp_path} cannot be the vboxguest device: Is a directory (EISDIR); name the "
            "device node (--device, or run's [device] path)"
        )

    @pytest.mark.parametrize("kind", ["directory", "below a file", "loop", "file", "null"])
    async def test_what_stat_shows_is_refused_without_an_open(
        self, tmp_path: Path, kind: str
    ) -> None:
        """``cannot_be_the_node`` (check-config's check, no open) names each path the opener
        refuses as not the device: the open's own line where open(2) refuses it (a directory,
        a bad path), else what the node is (a regular file, another driver's node)."""
        sysfs = self._sysfs(tmp_path, "/dev/null", "mem/null")
        paths = {
            "directory": str(tmp_path),
            "below a file": f"{tmp_path / 'file'}/x",
            "loop": str(tmp_path / "loop"),
            "file": str(tmp_path / "file"),
            "null": "/dev/null",
        }
        (tmp_path / "file").write_text("")
        (tmp_path / "loop").symlink_to("loop")
        path = paths[kind]
        why = chardev.cannot_be_the_node(path, sysfs)
        with trio.fail_after(BOUND), pytest.raises(NotTheDeviceError) as caught:
            await CharDevOpener(path, sysfs_root=sysfs).open_session()
        if kind in ("file", "null"):  # the handshake's ENOTTY refuses these
            it_is = "a regular file" if kind == "file" else "null"
            assert (
                why == f"{path} is not a vboxguest device (it is {it_is}); {chardev.NAME_THE_NODE}"
            )
        else:
            assert why == str(caught.value)

    @pytest.mark.parametrize("target", ["misc/vboxguest", "misc/vboxuser", None])
    def test_a_missing_path_or_a_vboxguest_node_is_not_refused_without_an_open(
        self, tmp_path: Path, target: str | None
    ) -> None:
        """A node that does not exist yet (the module may load later), one sysfs names
        vboxguest or vboxuser, or one sysfs does not know: nothing proves it is not the
        device."""
        assert chardev.cannot_be_the_node(str(tmp_path / "vboxguest")) is None
        sysfs = self._sysfs(tmp_path, "/dev/null", target)
        assert chardev.cannot_be_the_node("/dev/null", sysfs) is None

    @pytest.mark.parametrize(
        "code", [errno.ENOENT, errno.ENXIO, errno.ENODEV, errno.EACCES, errno.EPERM]
    )
    async def test_a_device_that_may_come_is_not_a_wrong_path(self, code: int) -> None:
        """A missing node, no device behind it or no permission may change (the module
        loads later, udev sets the mode): unavailable, never :class:`NotTheDeviceError`."""

        def open_fn(path: str, flags: int) -> int:
            raise OSError(code, os.strerror(code), path)

        opener = CharDevOpener("/dev/vboxguest", open_fn=open_fn)
        with trio.fail_after(BOUND), pytest.raises(DeviceUnavailableError) as caught:
            await opener.open_session()
        assert not isinstance(caught.value, NotTheDeviceError)

    def test_fewer_than_four_threads_is_refused(self) -> None:
        """Three threads could not carry a blocked call, a short HGCM call, a VMMDev request
        and the interrupt that ends the blocked call."""
        with pytest.raises(ValueError, match="at least 4"):
            CharDevOpener(threads=3)
        with pytest.raises(ValueError, match="at least 4"):
            chardev.ThreadBudget(3)

    @pytest.mark.parametrize("threads", [chardev.MIN_THREADS - 2, chardev.MIN_THREADS])
    def test_config_accepts_what_the_transport_accepts(self, threads: int) -> None:
        """``device.ioctl_threads`` takes a thread count exactly when the transport does (the
        deprecated old minimum aside, which it reads as the transport's minimum)."""
        try:
            chardev.ThreadBudget(threads)
        except ValueError:
            with pytest.raises(pydantic.ValidationError, match="ioctl_threads"):
                DeviceConfig(ioctl_threads=threads)
        else:
            assert DeviceConfig(ioctl_threads=threads).ioctl_threads == threads
        old = DeviceConfig(ioctl_threads=OLD_MIN_IOCTL_THREADS).ioctl_threads
        assert old == chardev.MIN_THREADS == chardev.ThreadBudget(old).threads

    def test_config_default_is_the_transports(self) -> None:
        """Without ``device.ioctl_threads`` the agent gets the transport's own default."""
        assert DeviceConfig().ioctl_threads == chardev.DEFAULT_THREADS

    def test_signal_handler_is_installed_by_the_opener(self) -> None:
        """Creating the opener (once, at start) installs the handler; opening does not."""
        previous = signal.signal(chardev.INTERRUPT_SIGNAL, signal.SIG_DFL)
        try:
            CharDevOpener()
            assert signal.getsignal(chardev.INTERRUPT_SIGNAL) not in (
                signal.SIG_DFL,
                signal.SIG_IGN,
            )
        finally:
            signal.signal(chardev.INTERRUPT_SIGNAL, previous)


class TestIoctl:
    """Buffers in place, errnos as ``OSError`` and user memory at real addresses."""

    async def test_vmmdev_request_round_trips(self, kernel: Kernel[FakeDriver]) -> None:
        """A GET_HOST_VERSION passthrough comes back decoded."""
        with trio.fail_after(BOUND):
            transport = await kernel.opener().open_session()
            version = await _call(transport, Session(), GetHostVersion())
            await transport.aclose()
        assert (version.major, version.minor) == (7, 1)

    async def test_errno_propagates_and_leaves_buffer(self, kernel: Kernel[FakeDriver]) -> None:
        """ENOTTY (ioctl 18 on mainline) and EPERM (denied passthrough) raise as they are."""
        with trio.fail_after(BOUND):
            transport = await kernel.opener().open_session()
            for request, code in (
                (ChangeBalloon(0x10000, inflate=True), errno.ENOTTY),
                (
                    ChangeMemBalloon(
                        inflate=True, pages=ChunkPages.of(range(4096, 4096 * 257, 4096))
                    ),
                    errno.EPERM,
                ),
            ):
                call = request.encode()
                before = bytes(call.buffer)
                with raises_errno(code):
                    await transport.ioctl(call.code, call.buffer)
                assert bytes(call.buffer) == before
            await transport.aclose()

    async def test_hgcm_linaddr_buffers_use_real_memory(self, kernel: Kernel[FakeDriver]) -> None:
        """The driver reads and writes user buffers at the addresses the transport stored."""
        with trio.fail_after(BOUND):
            transport, session, client = await _open_connected(kernel)
            params = (HgcmU32(0), HgcmBuffer(b"abcdef"), HgcmBufferIn(b"in"), HgcmBufferOut(3))
            reply = await _call(transport, session, HgcmCall(client, ECHO_FUNCTION, params))
            await transport.aclose()
        assert reply.params == (
            HgcmU32(6),
            HgcmData(b"fedcba"),
            HgcmData(b"in"),
            HgcmData(b"\0\0\0"),
        )

    async def test_address_fields_are_restored_on_failure(self, kernel: Kernel[FakeDriver]) -> None:
        """A failed call leaves the buffer as it was, address fields included."""
        with trio.fail_after(BOUND):
            transport, _, client = await _open_connected(kernel)
            call = HgcmCall(client + 1, ECHO_FUNCTION, (HgcmBuffer(b"xy"),)).encode()
            before = bytes(call.buffer)
            with raises_errno(errno.EINVAL):
                await transport.ioctl(call.code, call.buffer, call.user_buffers)
            await transport.aclose()
        assert bytes(call.buffer) == before

    async def test_address_field_outside_the_buffer_is_refused(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """A user buffer whose address field lies outside the buffer is our own misuse."""
        with trio.fail_after(BOUND):
            transport = await kernel.opener().open_session()
            buffer = bytearray(24)
            with pytest.raises(LocalProtocolError, match="outside the 24-byte buffer"):
                await transport.ioctl(1, buffer, (UserBuffer(20, bytearray(b"x")),))
            await transport.aclose()
        assert buffer == bytearray(24)

    async def test_closed_transport_refuses_ioctls(self, kernel: Kernel[FakeDriver]) -> None:
        """After ``aclose`` (twice: idempotent) an ioctl raises ClosedResourceError."""
        with trio.fail_after(BOUND):
            transport = await kernel.opener().open_session()
            await transport.aclose()
            await transport.aclose()
            call = InterruptAllWaits().encode()
            with pytest.raises(trio.ClosedResourceError):
                await transport.ioctl(call.code, call.buffer)
        assert len(kernel.driver.closed) == 1


class TestWaits:
    """Blocking waits run concurrently with the ioctl that ends them, on one fd."""

    async def test_interrupt_all_ends_the_wait_on_its_fd_only(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """INTERRUPT_ALL ends one fd's wait with EINTR for good; another fd keeps waiting."""
        with trio.fail_after(BOUND):
            first = await kernel.opener().open_session()
            second = await kernel.opener().open_session()
            first_session, second_session = Session(), Session()
            first_ended = trio.Event()
            received: list[int] = []

            async def wait_first() -> None:
                with pytest.raises(InterruptedError):
                    await _call(first, first_session, WaitForEvents(0x10))
                first_ended.set()

            async def wait_second() -> None:
                events = await _call(second, second_session, WaitForEvents(0x10))
                received.append(events.mask)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_first)
                nursery.start_soon(wait_second)
                await kernel.wait_in_driver(2)
                await _call(first, first_session, InterruptAllWaits())
                with trio.fail_after(PROMPT):
                    await first_ended.wait()
                assert kernel.in_driver == 1
                kernel.driver.raise_events(0x10)
            assert received == [0x10]

            call = WaitForEvents(0x10).encode()  # the Session would refuse: ask the driver
            with trio.fail_after(PROMPT), pytest.raises(InterruptedError):
                await first.ioctl(call.code, call.buffer)
            assert kernel.codes.count(Ioctl.WAIT_FOR_EVENTS) == 3  # EINTR was not retried
            await first.aclose()
            await second.aclose()

    async def test_thread_budget_is_per_process(self, kernel: Kernel[FakeDriver]) -> None:
        """Blocking calls of all sessions share the budget; the last three threads are for
        short calls, VMMDev requests and interrupts."""
        with trio.fail_after(BOUND):
            opener = kernel.opener(threads=5)
            first, second = await opener.open_session(), await opener.open_session()
            done: list[int] = []

            async def wait(transport: CharDevTransport, mask: int) -> None:
                done.append((await _call(transport, Session(), WaitForEvents(mask))).mask)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, first, 1)
                nursery.start_soon(wait, second, 2)
                await kernel.wait_in_driver(2)
                with pytest.raises(chardev.IoctlThreadsExhaustedError, match="ioctl_threads"):
                    await _call(first, Session(), WaitForEvents(4))
                version = await _call(second, Session(), GetHostVersion())
                assert version.major == 7
                kernel.driver.raise_events(0x3)
            await first.aclose()
            await second.aclose()
        assert sorted(done) == [1, 2]
        assert kernel.peak == 3

    async def test_short_calls_in_flight_leave_blocking_calls_their_threads(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """With the default budget, a wait and a VMMDev request in the driver leave an HGCM
        call its thread: only blocking calls count against the reserved ones."""
        kernel.driver.hold_requests = trio.Event()
        with trio.fail_after(BOUND):
            transport, session, client = await _open_connected(kernel)
            events: list[int] = []

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_for_events, transport, events)
                nursery.start_soon(_host_version, transport)
                await kernel.wait_in_driver(2)
                call = HgcmCall(client, ECHO_FUNCTION, (HgcmU32(0), HgcmBuffer(b"ab")))
                reply = await _call(transport, session, call)
                assert reply.params == (HgcmU32(2), HgcmData(b"ba"))
                kernel.driver.hold_requests.set()
                kernel.driver.raise_events(0x10)
            await transport.aclose()
        assert events == [0x10]
        assert kernel.peak == 3

    async def test_smallest_budget_waits_beside_a_short_call(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """With the smallest budget, a wait starting while a short call is in the driver takes
        another thread; a second blocking call is refused, naming the setting."""
        kernel.driver.hold_requests = trio.Event()
        with trio.fail_after(BOUND):
            transport, session, client = await _open_connected(kernel, threads=chardev.MIN_THREADS)
            events: list[int] = []

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_host_version, transport)
                await kernel.wait_in_driver(1)
                nursery.start_soon(_wait_for_events, transport, events)
                await kernel.wait_in_driver(2)
                with pytest.raises(chardev.IoctlThreadsExhaustedError, match="ioctl_threads"):
                    await _call(transport, session, HgcmCall(client, ECHO_FUNCTION))
                kernel.driver.hold_requests.set()
                await kernel.wait_in_driver(1)
                kernel.driver.raise_events(0x10)
            await transport.aclose()
        assert events == [0x10]

    async def test_short_hgcm_calls_take_turns_beside_a_wait(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """With the smallest budget and a wait in the driver, HGCM calls with a short driver
        timeout take turns on the thread left to them beside the VMMDev requests' and the
        interrupt's; one with a longer timeout is blocking and refused."""
        with trio.fail_after(BOUND):
            transport, session, client = await _open_connected(kernel, threads=chardev.MIN_THREADS)
            events: list[int] = []
            replies: list[tuple[object, ...]] = []

            async def short(text: bytes) -> None:
                params = (HgcmU32(0), HgcmBuffer(text))
                call = HgcmCall(client, ECHO_FUNCTION, params, SHORT_CALL_TIMEOUT_MS)
                replies.append((await _call(transport, session, call)).params)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_for_events, transport, events)
                await kernel.wait_in_driver(1)
                async with trio.open_nursery() as calls:
                    for text in (b"ab", b"cd", b"ef"):
                        calls.start_soon(short, text)
                longer = HgcmCall(client, ECHO_FUNCTION, (), SHORT_CALL_TIMEOUT_MS + 1)
                with pytest.raises(chardev.IoctlThreadsExhaustedError, match="ioctl_threads"):
                    await _call(transport, session, longer)
                kernel.driver.raise_events(0x10)
            await transport.aclose()
        assert sorted(replies, key=repr) == [
            (HgcmU32(2), HgcmData(b"ba")),
            (HgcmU32(2), HgcmData(b"dc")),
            (HgcmU32(2), HgcmData(b"fe")),
        ]
        assert events == [0x10]
        assert kernel.peak == 2

    async def test_hgcm_calls_the_host_holds_leave_vmmdev_requests_a_thread(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """With the default budget, an event wait, every long HGCM call it allows and HGCM
        connects the host holds (neither driver times a connect out or lets a signal end it)
        leave a VMMDev request (a heartbeat) a thread: it completes while they are all held
        (it waited behind the connect for as long as the host held it)."""
        long_calls = chardev.DEFAULT_THREADS - chardev.RESERVED_THREADS
        with trio.fail_after(BOUND):
            transport, session, client = await _open_connected(
                kernel, threads=chardev.DEFAULT_THREADS
            )
            kernel.driver.hold_connects = connects = trio.Event()
            events: list[int] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_for_events, transport, events)
                for _ in range(long_calls):
                    nursery.start_soon(_call, transport, session, HgcmCall(client, BLOCK_FUNCTION))
                await kernel.wait_in_driver(1 + long_calls)
                for _ in range(2):
                    nursery.start_soon(_call, transport, Session(), HgcmConnect("VBoxGuestPropSvc"))
                await kernel.wait_in_driver(2 + long_calls)
                with trio.fail_after(PROMPT):
                    await _host_version(transport)
                assert kernel.in_driver == 2 + long_calls
                connects.set()
                kernel.driver.raise_events(0x10)
                await kernel.wait_in_driver(long_calls)
                nursery.cancel_scope.cancel()
            await transport.aclose()
        assert events == [0x10]


class TestCancellation:
    """Cancelling or closing ends blocked calls promptly and leaves no thread behind."""

    async def test_cancelling_a_blocked_hgcm_call_cancels_it_in_the_driver(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """The caller's cancel interrupts the worker thread and raises Cancelled promptly; the
        call was issued (the driver had it)."""
        submission = Submission()
        with trio.fail_after(BOUND):
            transport, session, client = await _open_connected(kernel)
            scope = await _cancel_once_in_driver(
                kernel, _call(transport, session, HgcmCall(client, BLOCK_FUNCTION), submission)
            )
            assert scope.cancelled_caught
            assert submission.issued
            assert kernel.driver.cancelled_calls == 1
            assert kernel.in_driver == 0
            reply = await _call(transport, session, HgcmCall(client, ECHO_FUNCTION, (HgcmU32(0),)))
            assert reply.params == (HgcmU32(0),)
            await transport.aclose()

    async def test_cancel_before_a_thread_is_free_never_runs_the_call(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """A call cancelled while waiting for the limiter never reaches the driver, and its
        submission says so; the next call is issued."""
        budget = chardev.ThreadBudget(chardev.MIN_THREADS)
        limiter = budget.limiter
        with trio.fail_after(BOUND):
            transport, session, _ = await _open_connected(kernel)
            transport = CharDevTransport(
                next(iter(kernel.sessions)), budget=budget, ioctl_fn=kernel.ioctl
            )
            holders = [object() for _ in range(budget.threads)]
            for holder in holders:
                await limiter.acquire_on_behalf_of(holder)
            calls = len(kernel.codes)
            queued, issued = Submission(), Submission()
            with trio.move_on_after(0.05) as scope:
                await _call(transport, session, GetHostVersion(), queued)
            assert scope.cancelled_caught
            for holder in holders:
                limiter.release_on_behalf_of(holder)
            assert len(kernel.codes) == calls
            assert not queued.issued
            await _call(transport, session, GetHostVersion(), issued)
            assert len(kernel.codes) == calls + 1
            assert issued.issued

    async def test_aclose_interrupts_blocked_calls_and_leaves_no_thread(
        self, kernel: Kernel[FakeDriver]
    ) -> None:
        """Closing with calls blocked ends them with EINTR promptly, then closes the fd."""
        with trio.fail_after(BOUND):
            transport, session, client = await _open_connected(kernel)
            errors: list[type[BaseException]] = []

            async def blocked(request: Request[object]) -> None:
                with pytest.raises(InterruptedError) as caught:
                    await _call(transport, session, request)
                errors.append(caught.type)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked, HgcmCall(client, BLOCK_FUNCTION))
                nursery.start_soon(blocked, WaitForEvents(0x10))
                await kernel.wait_in_driver(2)
                assert len(_ioctl_threads()) == 2
                with trio.fail_after(PROMPT):
                    await transport.aclose()
                assert kernel.sessions == {}
        assert errors == [InterruptedError, InterruptedError]
        assert kernel.driver.cancelled_calls == 1
        assert _ioctl_threads() == []

    async def test_a_call_the_driver_keeps_is_abandoned(self) -> None:
        """A call that ignores interrupts is given up after a bound, with a log line, once."""
        entered, release, finished = threading.Event(), threading.Event(), threading.Event()
        signals: list[int] = []

        def stubborn(fd: int, code: int, buffer: bytearray) -> None:
            entered.set()
            release.wait()
            finished.set()

        transport = CharDevTransport(
            3, ioctl_fn=stubborn, close_fn=lambda fd: None, interrupt_fn=signals.append
        )
        with trio.fail_after(BOUND):
            scope = trio.CancelScope()
            with capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    call = transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))
                    nursery.start_soon(_run_in, scope, call)
                    assert await trio.to_thread.run_sync(entered.wait, PROMPT)
                    scope.cancel()
                    cancelled_at = trio.current_time()
            assert scope.cancelled_caught
            assert trio.current_time() - cancelled_at < ABANDON_AFTER_S + PROMPT
            assert [entry["event"] for entry in logs] == ["ioctl_abandoned"]
            assert len(signals) > 0
            release.set()
            assert await trio.to_thread.run_sync(finished.wait, PROMPT)
            with trio.fail_after(ABANDON_AFTER_S + chardev.CLOSE_TIMEOUT + PROMPT):
                await transport.aclose()

    async def test_aclose_abandons_a_call_the_driver_keeps(self) -> None:
        """Closing does not wait for an uninterruptible call beyond the bound."""
        release, entered = threading.Event(), threading.Event()

        def stubborn(fd: int, code: int, buffer: bytearray) -> None:
            entered.set()
            release.wait()

        transport = CharDevTransport(
            3, ioctl_fn=stubborn, close_fn=lambda fd: None, interrupt_fn=lambda thread: None
        )
        try:
            with trio.fail_after(BOUND):
                async with trio.open_nursery() as nursery:

                    async def blocked() -> None:
                        with pytest.raises(InterruptedError):
                            await transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))

                    nursery.start_soon(blocked)
                    assert await trio.to_thread.run_sync(entered.wait, PROMPT)
                    with trio.fail_after(ABANDON_AFTER_S + PROMPT):
                        await transport.aclose()
        finally:
            release.set()

    async def test_stray_eintr_is_retried_a_bounded_number_of_times(self) -> None:
        """EINTR the transport did not cause is retried, but not forever; the submission
        counts the retried attempts (the driver may have cancelled each at the host)."""
        attempts: list[int] = []

        def flaky(fd: int, code: int, buffer: bytearray) -> None:
            attempts.append(code)
            if len(attempts) < 3:
                raise InterruptedError(errno.EINTR, "stray signal")

        def always(fd: int, code: int, buffer: bytearray) -> None:
            attempts.append(code)
            raise InterruptedError(errno.EINTR, "stray signal")

        with trio.fail_after(BOUND):
            transport = CharDevTransport(3, ioctl_fn=flaky, close_fn=lambda fd: None)
            submission = Submission()
            await transport.ioctl(1, bytearray(24), submission=submission)
            assert attempts == [1, 1, 1]
            assert submission.retried == 2
            attempts.clear()
            transport = CharDevTransport(3, ioctl_fn=always, close_fn=lambda fd: None)
            submission = Submission()
            with pytest.raises(InterruptedError):
                await transport.ioctl(1, bytearray(24), submission=submission)
            assert len(attempts) == chardev.EINTR_RETRIES + 1
            assert submission.retried == chardev.EINTR_RETRIES


class StubbornConnects:
    """A transport on the smallest budget whose HGCM connects and disconnects stay in the
    "driver" until ``release`` (uninterruptible, the host never answering); ``arrived`` gets
    one item per call that entered it, ``all_back`` is set once no abandoned call is left, and
    ``signalled`` records when each interrupt was sent."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self._arrived_in, self.arrived = trio.open_memory_channel[None](math.inf)
        self.budget = chardev.ThreadBudget(chardev.MIN_THREADS)
        self.all_back = trio.Event()
        self.signalled: list[float] = []
        count_back = self.budget.abandoned_returned

        def returned() -> None:
            count_back()
            if self.budget.abandoned == 0:
                self.all_back.set()

        monkeypatch.setattr(self.budget, "abandoned_returned", returned)
        self.transport = CharDevTransport(
            3,
            budget=self.budget,
            ioctl_fn=self._keep,
            close_fn=lambda fd: None,
            interrupt_fn=lambda _: self.signalled.append(trio.current_time()),
        )

    def _keep(self, fd: int, code: int, buffer: bytearray) -> None:
        if code in (Ioctl.HGCM_CONNECT, Ioctl.HGCM_DISCONNECT):
            trio.from_thread.run_sync(self._arrived_in.send_nowait, None)
            self.release.wait()


class TestAbandonedCalls:
    """Calls the driver keeps: their threads are replaced up to a bound, then the device is lost."""

    async def test_a_call_two_tasks_give_up_on_is_abandoned_once(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The cancelled caller and a concurrent ``aclose`` both wait out the same stubborn
        call: it counts as abandoned once, and its return gives the replacement back."""
        stubborn = StubbornConnects(monkeypatch)
        budget, transport = stubborn.budget, stubborn.transport
        caller_scope = trio.CancelScope()

        async def caller() -> None:
            with caller_scope:
                await transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))

        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(caller)
                    await stubborn.arrived.receive()
                    caller_scope.cancel()
                    nursery.start_soon(transport.aclose)
                assert (budget.abandoned, budget.limiter.total_tokens) == (1, 5)
                stubborn.release.set()
                await stubborn.all_back.wait()
                assert (budget.abandoned, budget.limiter.total_tokens) == (0, 4)
        finally:
            stubborn.release.set()
        assert [entry["event"] for entry in logs].count("ioctl_abandoned") == 1

    async def test_abandoned_threads_are_replaced_up_to_the_budget(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Each abandoned call's thread is replaced (up to the budget again), so later calls
        still run; past that every ioctl fails at once with DeviceLostError; threads that come
        back give their replacements back and the transport works again. (Disconnects: no
        connect starts while HELD_CONNECTS_MAX abandoned ones are in the driver.)"""
        stubborn = StubbornConnects(monkeypatch)
        budget, transport, arrived = stubborn.budget, stubborn.transport, stubborn.arrived
        release, all_back = stubborn.release, stubborn.all_back

        async def abandon(calls: int) -> None:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    for _ in range(calls):
                        nursery.start_soon(transport.ioctl, Ioctl.HGCM_DISCONNECT, bytearray(28))
                    for _ in range(calls):
                        await arrived.receive()
                    scope.cancel()
            assert scope.cancelled_caught

        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                await abandon(2)
                assert (budget.abandoned, budget.limiter.total_tokens) == (2, 6)
                with trio.fail_after(PROMPT):
                    await transport.ioctl(Ioctl.DRIVER_VERSION_INFO, bytearray(44))
                await abandon(2)
                assert (budget.abandoned, budget.limiter.total_tokens) == (4, 8)
                await abandon(1)
                assert (budget.abandoned, budget.limiter.total_tokens) == (5, 8)
                with pytest.raises(DeviceLostError, match="5 ioctls and 0 closes were abandoned"):
                    await transport.ioctl(Ioctl.DRIVER_VERSION_INFO, bytearray(44))
                release.set()
                await all_back.wait()
                assert budget.limiter.total_tokens == 4
                await transport.ioctl(Ioctl.DRIVER_VERSION_INFO, bytearray(44))
                await transport.aclose()
        finally:
            release.set()
        abandoned = [entry for entry in logs if entry["event"] == "ioctl_abandoned"]
        assert [entry["thread_replaced"] for entry in abandoned] == [True] * 4 + [False]
        assert [entry["abandoned"] for entry in abandoned] == [1, 2, 3, 4, 5]
        returns = [entry for entry in logs if entry["event"] == "abandoned_ioctl_returned"]
        assert len(returns) == 5


class TestLateInterrupts:
    """An abandoned call is signalled again, with backoff, until it returns, but only for
    LATE_INTERRUPTS_S: its thread may have lost every earlier signal before it entered the
    kernel, where only a signal ends an interruptible wait the host does not answer."""

    @pytest.mark.parametrize("cancel", ["explicit", "deadline"])
    async def test_a_call_late_into_the_driver_is_interrupted_after_it_was_abandoned(
        self, monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int], cancel: str
    ) -> None:
        """A thread held back from its system call (as one waiting for the GIL) until its
        caller gave the call up loses every signal sent till then; it then waits in a read(2)
        nobody answers, as in an HGCM call without timeout. A late SIGURG ends it, and the
        thread budget and the abandoned count are back where they started."""
        chardev.install_interrupt_handler()
        read_fd, _ = pipe
        taken, held_back = threading.Event(), threading.Event()
        budget = chardev.ThreadBudget(chardev.DEFAULT_THREADS)
        back = trio.Event()
        count_back = budget.abandoned_returned

        def returned() -> None:
            count_back()
            back.set()

        monkeypatch.setattr(budget, "abandoned_returned", returned)

        def late_read(fd: int, code: int, buffer: bytearray) -> None:
            taken.set()
            held_back.wait()  # a signal now is lost: the wait is retried (PEP 475)
            _read_ioctl(fd, code, buffer)

        transport = CharDevTransport(read_fd, budget=budget, ioctl_fn=late_read)
        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                scope = trio.CancelScope()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_run_in, scope, transport.ioctl(0, bytearray(24)))
                    assert await trio.to_thread.run_sync(taken.wait, PROMPT)
                    if cancel == "deadline":
                        scope.deadline = trio.current_time()
                    else:
                        scope.cancel()
                assert scope.cancelled_caught
                assert (budget.abandoned, budget.limiter.total_tokens) == (1, 6)
                held_back.set()
                await back.wait()
                assert (budget.abandoned, budget.limiter.total_tokens) == (0, 5)
                await transport.aclose()
        finally:
            held_back.set()
        events = [entry["event"] for entry in logs]
        assert events == ["ioctl_abandoned", "abandoned_ioctl_returned"]

    async def test_late_interrupts_stop_at_their_bound(
        self, monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock
    ) -> None:
        """A call no signal ends is still signalled after it was abandoned, until
        LATE_INTERRUPTS_S later and not after, with one debug line; it keeps its place in the
        budget until it returns. (The still clock runs the bound while the test holds the
        only worker thread.)"""
        stubborn = StubbornConnects(monkeypatch)
        budget, transport, sent = stubborn.budget, stubborn.transport, stubborn.signalled
        callers: list[str | None] = []
        signal_fn = transport._interrupt_fn

        def signal_noting_caller(thread: int) -> None:
            callers.append(CALLER.get())
            signal_fn(thread)

        transport._interrupt_fn = signal_noting_caller
        try:
            with trio.fail_after(BOUND + 2 * chardev.LATE_INTERRUPTS_S), capture_logs() as logs:
                scope = trio.CancelScope()
                with contextlib.ExitStack() as still:
                    async with trio.open_nursery() as nursery:
                        call = transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))
                        nursery.start_soon(_run_as, "svc", scope, call)
                        await stubborn.arrived.receive()
                        still.enter_context(_still(clock))
                        scope.cancel()
                    abandoned_at = trio.current_time()
                    assert sent
                    assert max(sent) < abandoned_at
                    # the clock jumps from signal to signal, then to the end of the sleep
                    await trio.sleep(2 * chardev.LATE_INTERRUPTS_S)
                late = [at - abandoned_at for at in sent if at > abandoned_at]
                assert (budget.abandoned, budget.limiter.total_tokens) == (1, 5)
                stubborn.release.set()
                await stubborn.all_back.wait()
                assert budget.limiter.total_tokens == chardev.MIN_THREADS
        finally:
            stubborn.release.set()
        assert len(late) > 1
        assert chardev.LATE_INTERRUPTS_S / 2 < late[-1] <= chardev.LATE_INTERRUPTS_S
        [ended] = [entry for entry in logs if entry["event"] == "late_interrupts_ended"]
        assert ended["signals"] == len(late)
        # Every signal, the late ones too, is sent in the caller's context (its log fields).
        assert callers == ["svc"] * len(sent)


class HeldClose:
    """A ``close_fn`` the driver holds (it disconnects HGCM clients there, waiting for the
    host) until ``release``; ``entered`` and ``finished`` tell where it is."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self, fd: int) -> None:
        self.entered.set()
        self.release.wait()
        self.finished.set()


class TestCallersDeadline:
    """Shielded interrupts, abandonments and the close never outlast the caller's deadline."""

    async def test_abandoned_closes_count_against_the_budget(self) -> None:
        """Each close(2) the driver keeps past the caller's deadline keeps a thread: they
        count with abandoned ioctls, so past the budget the transport fails with
        DeviceLostError rather than let threads pile up past systemd's TasksMax."""
        held = HeldClose()
        budget = chardev.ThreadBudget(chardev.MIN_THREADS)
        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                for fd in range(100, 100 + chardev.MIN_THREADS + 1):
                    budget.check_usable()
                    transport = CharDevTransport(
                        fd, budget=budget, ioctl_fn=lambda fd, code, buf: None, close_fn=held
                    )
                    with trio.CancelScope(deadline=trio.current_time()):  # deadline passed
                        await transport.aclose()
                assert budget.closes_held == chardev.MIN_THREADS + 1
                with pytest.raises(DeviceLostError, match="0 ioctls and 5 closes"):
                    budget.check_usable()
        finally:
            held.release.set()
        abandoned = [entry["closes_held"] for entry in logs if entry["event"] == "close_abandoned"]
        assert abandoned == [1, 2, 3, 4, 5]

    async def test_a_call_its_deadline_cancels_is_abandoned_then(
        self, monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock
    ) -> None:
        """A call the driver keeps is abandoned when its caller's deadline cancels it, not
        ABANDON_AFTER_S later, with the usual log line and a replacement thread."""
        stubborn = StubbornConnects(monkeypatch)
        budget, transport = stubborn.budget, stubborn.transport
        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                scope = trio.CancelScope()
                with contextlib.ExitStack() as still:
                    async with trio.open_nursery() as nursery:
                        call = transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))
                        nursery.start_soon(_run_in, scope, call)
                        await stubborn.arrived.receive()
                        still.enter_context(_still(clock))
                        expired_at = scope.deadline = trio.current_time()
                    assert trio.current_time() - expired_at < ABANDON_AFTER_S
                assert (budget.abandoned, budget.limiter.total_tokens) == (1, 5)
                stubborn.release.set()
                await stubborn.all_back.wait()
        finally:
            stubborn.release.set()
        assert [entry["event"] for entry in logs].count("ioctl_abandoned") == 1

    async def test_a_cancelled_call_is_abandoned_by_the_deadline_it_began_with(
        self, monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock
    ) -> None:
        """Cancelled explicitly, a call the driver keeps is abandoned ABANDON_AFTER_S later
        at most, and never past the deadline its caller had when it began. (The call has
        PROMPT to enter the driver; the still clock then moves to ABANDON_AFTER_S / 4 before
        that deadline.)"""
        stubborn = StubbornConnects(monkeypatch)
        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                deadline = trio.current_time() + PROMPT
                scope = trio.CancelScope(deadline=deadline)
                with contextlib.ExitStack() as still:
                    async with trio.open_nursery() as nursery:
                        call = stubborn.transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))
                        nursery.start_soon(_run_in, scope, call)
                        await stubborn.arrived.receive()
                        still.enter_context(_still(clock))
                        clock.jump(deadline - ABANDON_AFTER_S / 4 - trio.current_time())
                        scope.cancel()
                    assert trio.current_time() - deadline < ABANDON_AFTER_S / 2
                stubborn.release.set()
                await stubborn.all_back.wait()
        finally:
            stubborn.release.set()
        assert [entry["event"] for entry in logs].count("ioctl_abandoned") == 1

    async def test_aclose_abandons_calls_at_the_callers_deadline(
        self, monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock
    ) -> None:
        """Closing under a deadline gives up a call the driver keeps at that deadline."""
        stubborn = StubbornConnects(monkeypatch)
        transport = stubborn.transport
        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                async with trio.open_nursery() as nursery:

                    async def blocked() -> None:
                        with pytest.raises(InterruptedError):
                            await transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))

                    nursery.start_soon(blocked)
                    await stubborn.arrived.receive()
                    with _still(clock):
                        expired_at = trio.current_time()
                        with trio.CancelScope(deadline=expired_at):
                            await transport.aclose()
                        assert trio.current_time() - expired_at < ABANDON_AFTER_S
                stubborn.release.set()
                await stubborn.all_back.wait()
        finally:
            stubborn.release.set()
        assert [entry["event"] for entry in logs].count("ioctl_abandoned") == 1

    async def test_a_held_close_ends_at_the_callers_deadline(
        self, clock: trio.testing.MockClock
    ) -> None:
        """A close(2) the driver holds is given up at the caller's deadline, well before
        CLOSE_TIMEOUT, with a ``close_abandoned`` line; it still completes later. (Time
        stands still until the close is held, then jumps.)"""
        held = HeldClose()
        transport = CharDevTransport(3, ioctl_fn=lambda fd, code, buffer: None, close_fn=held)
        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                with _still(clock, jumping=False):
                    deadline = trio.current_time() + chardev.CLOSE_TIMEOUT / 10
                    async with trio.open_nursery() as nursery:
                        scope = trio.CancelScope(deadline=deadline)
                        nursery.start_soon(_run_in, scope, transport.aclose())
                        assert await trio.to_thread.run_sync(held.entered.wait, PROMPT)
                        clock.autojump_threshold = 0.0
                    assert trio.current_time() - deadline < chardev.CLOSE_TIMEOUT / 2
                assert not held.finished.is_set()
                held.release.set()
                assert await trio.to_thread.run_sync(held.finished.wait, PROMPT)
        finally:
            held.release.set()
        events = [entry["event"] for entry in logs]
        # The close's return is counted out of the budget once trio hears of it.
        assert events in (["close_abandoned"], ["close_abandoned", "abandoned_close_returned"])

    async def test_a_cancelled_caller_still_closes_the_fd(self) -> None:
        """``aclose`` from a cancelled caller returns at once, yet close(2) runs."""
        held = HeldClose()
        held.release.set()
        transport = CharDevTransport(3, ioctl_fn=lambda fd, code, buffer: None, close_fn=held)
        with trio.fail_after(BOUND):
            with trio.CancelScope() as scope:
                scope.cancel()
                await transport.aclose()
            assert await trio.to_thread.run_sync(held.finished.wait, PROMPT)
            with pytest.raises(trio.ClosedResourceError):
                await transport.ioctl(Ioctl.DRIVER_VERSION_INFO, bytearray(44))


class ReusedFdNumbers(StubbornConnects):
    """:class:`StubbornConnects` on fd numbers as ``open(2)`` gives them (the lowest free
    one), each naming its session; HGCM disconnects are kept until ``release_disconnects``.
    A call looks its fd number up only once released, as a thread descheduled between taking
    the call and entering ``ioctl(2)`` would, and ``landed`` records the session it names
    then. ``closed`` lists the numbers closed; ``back`` gets the abandoned count each time
    an abandoned call comes back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sessions: dict[int, str] = {}
        self.closed: list[int] = []
        self.landed: list[tuple[str, int]] = []
        self.release_disconnects = threading.Event()
        super().__init__(monkeypatch)
        self.transport = self.open("old")
        self._back_in, self.back = trio.open_memory_channel[int](math.inf)
        count_back = self.budget.abandoned_returned

        def returned() -> None:
            count_back()
            self._back_in.send_nowait(self.budget.abandoned)

        monkeypatch.setattr(self.budget, "abandoned_returned", returned)

    def open(self, name: str) -> CharDevTransport:
        """Open the session ``name`` on the lowest free fd number."""
        fd = next(fd for fd in itertools.count(3) if fd not in self.sessions)
        self.sessions[fd] = name
        return CharDevTransport(
            fd,
            budget=self.budget,
            ioctl_fn=self._keep,
            close_fn=self._close,
            interrupt_fn=lambda _: None,
        )

    def _close(self, fd: int) -> None:
        if fd not in self.sessions:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        del self.sessions[fd]
        self.closed.append(fd)

    def _keep(self, fd: int, code: int, buffer: bytearray) -> None:
        if code == Ioctl.HGCM_DISCONNECT:
            trio.from_thread.run_sync(self._arrived_in.send_nowait, None)
            self.release_disconnects.wait()
        else:
            super()._keep(fd, code, buffer)
        self.landed.append((self.sessions.get(fd, "EBADF"), code))


async def _ignoring_failure(transport: CharDevTransport) -> None:
    """A held HGCM connect whose failure (its transport closed under it) nobody reads."""
    with contextlib.suppress(OSError):
        await transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))


class TestDeferredClose:
    """While abandoned calls may still use the fd number, ``aclose`` leaves the fd open; the
    last of them to return closes it, once, as the kernel releases a file after its ioctls."""

    async def test_a_failed_interrupt_still_closes_the_fd(self) -> None:
        """An interrupt the system refuses fails ``aclose``, yet the fd is not lost: the
        call still in the driver closes it when it returns."""
        closed = threading.Event()
        entered = threading.Event()
        release = threading.Event()

        def keep(fd: int, code: int, buffer: bytearray) -> None:
            entered.set()
            release.wait()

        def refused(thread: int) -> None:
            raise ProcessLookupError(errno.ESRCH, "no such thread")

        transport = CharDevTransport(
            7, ioctl_fn=keep, close_fn=lambda fd: closed.set(), interrupt_fn=refused
        )
        try:
            with trio.fail_after(BOUND):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_ignoring_failure, transport)
                    assert await trio.to_thread.run_sync(entered.wait, PROMPT)
                    with pytest.raises(ProcessLookupError):
                        await transport.aclose()
                    release.set()
                assert await trio.to_thread.run_sync(closed.wait, PROMPT)
        finally:
            release.set()

    async def test_an_abandoned_call_never_reaches_a_reused_fd_number(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A call whose thread missed its signal before entering ioctl(2) is abandoned at its
        caller's deadline and the session closed: the next session gets another fd number,
        the call reaches its own session, and its return closes the fd."""
        fds = ReusedFdNumbers(monkeypatch)
        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                scope = trio.CancelScope()
                async with trio.open_nursery() as nursery:
                    call = fds.transport.ioctl(Ioctl.HGCM_CONNECT, bytearray(156))
                    nursery.start_soon(_run_in, scope, call)
                    await fds.arrived.receive()
                    scope.deadline = trio.current_time()
                with trio.fail_after(PROMPT):
                    await fds.transport.aclose()
                new = fds.open("new")
                fds.release.set()
                assert await fds.back.receive() == 0
                await new.ioctl(Ioctl.DRIVER_VERSION_INFO, bytearray(44))
        finally:
            fds.release.set()
        assert fds.landed == [("old", Ioctl.HGCM_CONNECT), ("new", Ioctl.DRIVER_VERSION_INFO)]
        assert (fds.closed, fds.sessions) == ([3], {4: "new"})
        assert [entry["event"] for entry in logs] == [
            "ioctl_abandoned",
            "close_deferred",
            "deferred_close_done",
            "abandoned_ioctl_returned",
        ]

    async def test_the_last_abandoned_call_back_closes_the_fd_once(
        self, monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock
    ) -> None:
        """``aclose`` at its caller's deadline abandons a connect and a disconnect the driver
        keeps and returns at once without closing; the first call back leaves the fd open,
        the last closes it, once, and the budget is whole again."""
        fds = ReusedFdNumbers(monkeypatch)
        budget, transport = fds.budget, fds.transport

        async def kept(code: int, size: int) -> None:
            with pytest.raises(InterruptedError):
                await transport.ioctl(code, bytearray(size))

        try:
            with trio.fail_after(BOUND), capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(kept, Ioctl.HGCM_CONNECT, 156)
                    nursery.start_soon(kept, Ioctl.HGCM_DISCONNECT, 28)
                    for _ in range(2):
                        await fds.arrived.receive()
                    with _still(clock):
                        expired_at = trio.current_time()
                        with trio.CancelScope(deadline=expired_at):
                            await transport.aclose()
                        assert trio.current_time() - expired_at < ABANDON_AFTER_S
                assert (budget.abandoned, budget.limiter.total_tokens) == (2, 6)
                assert fds.closed == []
                fds.release_disconnects.set()
                assert await fds.back.receive() == 1
                assert fds.closed == []
                fds.release.set()
                assert await fds.back.receive() == 0
                assert (budget.abandoned, budget.limiter.total_tokens) == (0, 4)
                await transport.aclose()
        finally:
            fds.release_disconnects.set()
            fds.release.set()
        assert (fds.closed, fds.sessions) == ([3], {})
        events = [entry["event"] for entry in logs]
        assert events.count("ioctl_abandoned") == 2
        assert [entry["in_driver"] for entry in logs if entry["event"] == "close_deferred"] == [2]
        assert events.count("deferred_close_done") == 1


def _claim_name(tmp_path: Path) -> bytes:
    """An abstract name of the test's own, so no test binds :data:`claimname.CLAIM_NAME` (a
    run on a VirtualBox guest whose agent holds it would fail, and the agent with it)."""
    return b"\0vbox-agent-test/%d/%s" % (os.getpid(), tmp_path.name.encode())


def _claiming(path: Path, name: bytes) -> CharDevTransport:
    """A session of ``path`` whose claim binds ``name`` with the real ``bind(2)``."""
    return CharDevTransport(
        os.open(path, os.O_RDWR | os.O_CLOEXEC),
        claim_name_fn=partial(claimname.bind_claim_name, name),
    )


@contextlib.contextmanager
def _listening_as(uid: int, name: bytes) -> Iterator[None]:
    """A child process of ``uid`` (and that gid) listening on the abstract ``name`` while the
    block runs (forked: the interpreter may live where ``uid`` cannot read it)."""
    ready_read, ready_write = os.pipe()
    stop_read, stop_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(ready_read)
            os.close(stop_write)
            os.setgid(uid)
            os.setuid(uid)
            holder = socket.socket(socket.AF_UNIX)
            holder.bind(name)
            holder.listen()
            os.write(ready_write, b"r")
            os.read(stop_read, 1)
        finally:
            os._exit(0)
    os.close(ready_write)
    os.close(stop_read)
    try:
        with os.fdopen(ready_read, "rb") as ready:
            assert ready.read(1) == b"r", "the holder did not start"
        yield
    finally:
        os.close(stop_write)
        os.waitpid(pid, 0)


class TestClaim:
    """``claim``: the default lock, a real exclusive ``flock(2)``, on a file standing for the
    node (every open of a node shares its inode, as every open of a file does), and the real
    ``bind(2)`` of an abstract name of the test's own standing for the driver's."""

    async def test_one_open_file_holds_the_node_until_it_is_closed(self, tmp_path: Path) -> None:
        """The first claim holds; a claim through another open file fails without waiting
        until the first is closed; an open without a claim (VBoxControl, ``prop``) works."""
        node = tmp_path / "vboxguest"
        node.touch()
        name = _claim_name(tmp_path)
        first, second = (_claiming(node, name) for _ in range(2))
        with trio.fail_after(BOUND):
            try:
                assert await first.claim()
                assert await first.claim()  # again on the same open file: still its own
                assert not await second.claim()
                await first.aclose()
                assert await second.claim()
            finally:
                await first.aclose()
                await second.aclose()

    async def test_another_node_of_the_driver_is_refused_by_the_name(self, tmp_path: Path) -> None:
        """Two nodes of one device (``mknod`` with its major:minor, as ``/dev/vboxuser`` is
        another node of the driver) are two inodes, whose ``flock(2)`` locks are separate:
        the claim name refuses the second until the first session closes."""
        rdev = os.stat("/dev/null").st_rdev
        nodes = (tmp_path / "vboxguest", tmp_path / "copy")
        try:
            for node in nodes:
                os.mknod(node, 0o600 | stat.S_IFCHR, rdev)
        except PermissionError:
            pytest.skip("mknod needs CAP_MKNOD")
        name = _claim_name(tmp_path)
        first, second = (_claiming(node, name) for node in nodes)
        with trio.fail_after(BOUND):
            try:
                assert await first.claim()
                assert not await second.claim()
                await first.aclose()
                assert await second.claim()
            finally:
                await first.aclose()
                await second.aclose()

    async def test_the_name_held_by_another_agent_refuses_the_claim(self, tmp_path: Path) -> None:
        """A socket listening on the name as this user (or root) is another agent's: the
        claim fails, though the node's lock was free; that lock goes with the session, and
        the name with its socket."""
        node = tmp_path / "vboxguest"
        node.touch()
        name = _claim_name(tmp_path)
        refused, later = _claiming(node, name), _claiming(node, name)
        with trio.fail_after(BOUND):
            try:
                with socket.socket(socket.AF_UNIX) as holder:
                    holder.bind(name)
                    holder.listen()
                    assert not await refused.claim()
                await refused.aclose()
                assert await later.claim()
            finally:
                await refused.aclose()
                await later.aclose()

    async def test_a_name_held_without_listening_refuses_nothing(self, tmp_path: Path) -> None:
        """No agent holds the name without listening, and any process may bind it: the
        claim holds by the node's lock alone, and says so."""
        node = tmp_path / "vboxguest"
        node.touch()
        name = _claim_name(tmp_path)
        claiming, second = _claiming(node, name), _claiming(node, name)
        with trio.fail_after(BOUND), socket.socket(socket.AF_UNIX) as squatter:
            squatter.bind(name)
            try:
                with capture_logs() as logs:
                    assert await claiming.claim()
                assert not await second.claim()  # the node's lock
            finally:
                await claiming.aclose()
                await second.aclose()
        assert [(log["event"], log["holder_uid"], log["reason"]) for log in logs] == [
            ("claim_name_untrusted", None, "its holder does not answer")
        ]

    @pytest.mark.skipif(os.geteuid() != 0, reason="a holder of another uid needs root to start")
    async def test_a_name_held_by_another_user_refuses_nothing(self, tmp_path: Path) -> None:
        """Another user listening on the name (any local user could, to keep the agent from
        starting) is no agent: the claim holds by the node's lock, naming the holder's uid."""
        node = tmp_path / "vboxguest"
        node.touch()
        name = _claim_name(tmp_path)
        claiming = _claiming(node, name)
        try:
            with _listening_as(NOBODY, name), capture_logs() as logs:
                assert await claiming.claim()
        finally:
            await claiming.aclose()
        assert [(log["event"], log["holder_uid"], log["reason"]) for log in logs] == [
            ("claim_name_untrusted", NOBODY, "held by another user")
        ]

    async def test_the_claims_socket_names_its_user(self, tmp_path: Path) -> None:
        """An agent that asks who holds the name reads the holder's uid (``SO_PEERCRED``)
        from its connection, still after the holder accepted and closed it."""
        name = _claim_name(tmp_path)
        held = await claimname.bind_claim_name(name)
        try:
            with socket.socket(socket.AF_UNIX) as asking, trio.fail_after(BOUND):
                asking.connect(name)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(held.serve)
                    await trio.lowlevel.wait_readable(asking)
                    assert asking.recv(1) == b""  # accepted and closed
                    nursery.cancel_scope.cancel()
                ucred = asking.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            assert int.from_bytes(ucred[4:8], sys.byteorder) == os.geteuid()
        finally:
            held.release()

    async def test_a_name_that_cannot_be_bound_fails_the_claim(self, tmp_path: Path) -> None:
        """Another failure of ``bind(2)`` (a sandbox without ``AF_UNIX``) is no other agent:
        the device is unavailable, with the reason."""
        node = tmp_path / "vboxguest"
        node.touch()

        async def refused() -> claimname.ClaimedName:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))

        transport = CharDevTransport(os.open(node, os.O_RDWR | os.O_CLOEXEC), claim_name_fn=refused)
        with trio.fail_after(BOUND):
            try:
                with pytest.raises(DeviceUnavailableError, match="Address family not supported"):
                    await transport.claim()
            finally:
                await transport.aclose()

    async def test_a_closed_session_claims_nothing(self, tmp_path: Path) -> None:
        """A claim after the close is a mistake of the caller's, not a lock held elsewhere."""
        node = tmp_path / "vboxguest"
        node.touch()
        transport = _claiming(node, _claim_name(tmp_path))
        await transport.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await transport.claim()


class TestRealSignals:
    """The default interrupt: SIGURG into a thread blocked in a real system call."""

    async def test_cancel_interrupts_a_real_system_call(self, pipe: tuple[int, int]) -> None:
        """Cancelling the caller signals its thread; the read returns EINTR; Cancelled follows."""
        read_fd, write_fd = pipe
        transport = CharDevTransport(read_fd, ioctl_fn=_read_ioctl)
        chardev.install_interrupt_handler()
        with trio.fail_after(BOUND):
            scope = trio.CancelScope()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run_in, scope, transport.ioctl(0, bytearray(24)))
                await _threads_blocked_in_pipe_read(count=1)
                scope.cancel()
                cancelled_at = trio.current_time()
            assert trio.current_time() - cancelled_at < PROMPT
            assert scope.cancelled_caught
            os.write(write_fd, b"x")
            buffer = bytearray(24)
            await transport.ioctl(0, buffer)
            assert buffer[0:1] == b"x"
            await transport.aclose()

    async def test_aclose_interrupts_a_real_system_call(self, pipe: tuple[int, int]) -> None:
        """``aclose`` signals a thread blocked in the kernel and closes the fd promptly."""
        read_fd, _ = pipe
        opener = CharDevOpener(
            "pipe", open_fn=lambda path, flags: read_fd, ioctl_fn=_version_then_read
        )
        with trio.fail_after(BOUND):
            transport = await opener.open_session()
            errors: list[type[BaseException]] = []

            async def blocked() -> None:
                with pytest.raises(InterruptedError) as caught:
                    await transport.ioctl(0, bytearray(24))
                errors.append(caught.type)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(blocked)
                [thread] = await _threads_blocked_in_pipe_read(count=1)
                assert thread.name == "vbox-ioctl"
                with trio.fail_after(PROMPT):
                    await transport.aclose()
        assert errors == [InterruptedError]
        assert _ioctl_threads() == []
        with raises_errno(errno.EBADF):
            os.fstat(read_fd)


class TestNativeIoctl:
    """The real ioctl: libc through ctypes for every buffer, errno either way, EINTR raised."""

    async def test_every_buffer_takes_the_libc_path(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """FIONREAD on a pipe fills a buffer of any size through libc ``ioctl``."""
        used: list[object] = []
        real = chardev.foreign_call

        def spy(function: Callable[..., int], *args: object) -> int:
            used.append(function)
            return real(function, *args)

        monkeypatch.setattr(chardev, "foreign_call", spy)
        read_fd, write_fd = os.pipe()
        sizes = (32, 1024, 1025, 16 << 10)
        try:
            os.write(write_fd, b"12345")
            transport = CharDevTransport(read_fd)
            with trio.fail_after(BOUND):
                for size in sizes:
                    buffer = bytearray(size)
                    await transport.ioctl(termios.FIONREAD, buffer)
                    assert int.from_bytes(buffer[:4], "little") == 5
                with raises_errno(errno.ENOTTY):
                    await transport.ioctl(Ioctl.vmmdev_request(2080), bytearray(2080))
                with raises_errno(errno.ENOTTY):
                    await transport.ioctl(Ioctl.DRIVER_VERSION_INFO, bytearray(44))
                await transport.aclose()
        finally:
            os.close(write_fd)
        assert used == [chardev._libc_ioctl] * (len(sizes) + 2)

    async def test_the_libc_path_raises_eintr(self) -> None:
        """A read(2) blocked in a worker thread through the same primitive ends with
        InterruptedError when the interrupt signal arrives, instead of being retried (as
        ``fcntl.ioctl`` retries EINTR from Python 3.14 on)."""
        chardev.install_interrupt_handler()
        read_fd, write_fd = os.pipe()
        buffer = bytearray(8)
        view = (ctypes.c_char * len(buffer)).from_buffer(buffer)

        def blocked_read() -> int:
            return chardev.foreign_call(_libc.read, read_fd, view, len(buffer))

        async def reader() -> None:
            with pytest.raises(InterruptedError):
                await trio.to_thread.run_sync(
                    blocked_read, thread_name="vbox-ioctl", abandon_on_cancel=True
                )

        try:
            with trio.fail_after(BOUND):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    [thread] = await _threads_blocked_in_pipe_read(count=1)
                    assert thread.ident is not None
                    chardev.signal_thread(thread.ident)
        finally:
            os.write(write_fd, b"x" * len(buffer))  # a retried read would end here
            os.close(write_fd)
            os.close(read_fd)


@pytest.mark.device
@pytest.mark.skipif(
    not HAS_DEVICE, reason=f"{chardev.DEFAULT_PATH} does not exist (not a VirtualBox guest)"
)
class TestRealDevice:
    """The real driver: open, version handshake, close."""

    async def test_open_handshake_close(self) -> None:
        """``/dev/vboxguest`` opens, agrees on interface version 1.0 and closes."""
        with trio.fail_after(BOUND):
            transport = await CharDevOpener().open_session()
            assert transport.driver_version is not None
            assert transport.driver_version.session_version == 0x10000
            await transport.aclose()
