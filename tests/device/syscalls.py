"""The character-device transport's system calls, injected: a kernel made of a driver model.

:class:`Kernel` gives :class:`~agent.device.chardev.CharDevOpener` its ``open_fn``,
``close_fn``, ``ioctl_fn``, ``interrupt_fn``, ``lock_fn`` (``flock(2)`` on its one node) and
``claim_name_fn`` (``bind(2)`` of the claim name in :class:`AbstractNames`, which kernels of
nodes of one driver share, or the real one of a name of the test's own, so no test binds the
real name).
Each ioctl, issued by a real worker thread, runs the driver on the trio thread
(``trio.from_thread.run`` with the token, so the driver runs outside the caller's cancel
scopes, as a kernel does); an interrupt of a worker thread cancels the call that thread is
blocked in, which the driver answers as it answers a signal: mainline's interruptible waits
end with EINTR, Oracle's driver returns 0 with VERR_INTERRUPTED in ``hdr.rc``. User buffers
travel as real addresses, read and written through :class:`CtypesMemory` as
``copy_*_user`` would. The driver is any object with ``SimulatedHost``'s entry points, the
simulated host itself included.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import threading
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import trio
import trio.testing

from agent.device.chardev import DEFAULT_THREADS, CharDevOpener

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.device.claimname import ClaimedName

S = TypeVar("S")
DEVICE_PATH = "/dev/vboxguest"


class CtypesMemory:
    """``GuestMemory`` over this process's own memory, as the kernel's copy_*_user sees it."""

    def read(self, address: int, size: int) -> bytes:
        """Return ``size`` bytes at the real address ``address``."""
        return ctypes.string_at(address, size)

    def write(self, address: int, data: bytes | bytearray) -> None:
        """Store ``data`` at the real address ``address``."""
        ctypes.memmove(address, bytes(data), len(data))


class Driver(Protocol[S]):
    """What :class:`Kernel` calls: ``SimulatedHost``'s session and ioctl entry points."""

    def open_session(self) -> S: ...

    async def close_session(self, session: S) -> None: ...

    async def ioctl(
        self, session: S, code: int, buffer: bytearray, memory: CtypesMemory
    ) -> None: ...


D = TypeVar("D", bound="Driver[Any]")


class AbstractNames:
    """The abstract Unix socket names of one network namespace, as far as a claim uses
    them: the claim name, bound by at most one socket."""

    def __init__(self) -> None:
        self._bound = False

    def bound(self) -> bool:
        """Whether a socket holds the claim name."""
        return self._bound

    async def bind(self) -> ClaimedName:
        """``bind(2)`` of the claim name; returns it, served by nobody (no socket)."""
        await trio.lowlevel.checkpoint()
        if self._bound:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self._bound = True
        return _BoundName(self._release)

    def _release(self) -> None:
        self._bound = False


class _BoundName:
    """The claim name as :meth:`AbstractNames.bind` bound it."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    async def serve(self) -> None:
        """Nobody can connect to it: wait until cancelled."""
        await trio.sleep_forever()

    def release(self) -> None:
        """Unbind the name. Idempotent."""
        release, self._release = self._release, None
        if release is not None:
            release()


class Kernel(Generic[D]):
    """The injected system calls: fds lead to driver sessions, interrupts become signals."""

    def __init__(
        self,
        driver: D,
        *,
        path: str = DEVICE_PATH,
        names: AbstractNames | None = None,
        claim_name_fn: Callable[[], Awaitable[ClaimedName]] | None = None,
    ) -> None:
        """A kernel with one node, ``path``, of ``driver``; kernels of one guest share
        ``names`` (by default a network namespace of its own). ``claim_name_fn``, if given,
        binds the claim name instead of ``names`` (a real ``bind(2)`` of a test's own name)."""
        self.driver = driver
        self.path = path
        self.names = names if names is not None else AbstractNames()
        self._claim_name_fn = claim_name_fn if claim_name_fn is not None else self.names.bind
        self.sessions: dict[int, Any] = {}
        self.in_driver = 0
        self.peak = 0
        self.codes: list[int] = []
        self._token = trio.lowlevel.current_trio_token()
        self._fds = itertools.count(100)
        self._blocked: dict[int, trio.CancelScope] = {}
        self._moved = trio.Event()
        self.locked_by: int | None = None
        """The fd holding the node's ``flock(2)``, as the kernel keeps it on the inode."""

    async def wait_in_driver(self, count: int) -> None:
        """Wait until exactly ``count`` ioctls are inside the driver, and it is idle."""
        while self.in_driver != count:
            await self._moved.wait()
        await trio.testing.wait_all_tasks_blocked()

    def _count(self, delta: int) -> None:
        self.in_driver += delta
        self.peak = max(self.peak, self.in_driver)
        self._moved.set()
        self._moved = trio.Event()

    def opener(self, *, threads: int = DEFAULT_THREADS) -> CharDevOpener:
        """Return an opener whose system calls lead here."""
        return CharDevOpener(
            self.path,
            threads=threads,
            ioctl_fn=self.ioctl,
            open_fn=self.open,
            close_fn=self.close,
            interrupt_fn=self.interrupt,
            lock_fn=self.lock,
            claim_name_fn=self._claim_name_fn,
        )

    def open(self, path: str, flags: int) -> int:
        """``open(2)``: a new session."""
        assert path == self.path
        assert flags == os.O_RDWR | os.O_CLOEXEC
        fd = next(self._fds)
        self.sessions[fd] = self.new_session()
        return fd

    def new_session(self) -> object:
        """The driver's session for an ``open(2)`` of the node."""
        return self.driver.open_session()

    def close(self, fd: int) -> None:
        """``close(2)``, from a worker thread: the driver releases the session."""
        session = self.sessions.pop(fd)
        if self.locked_by == fd:  # the last close of the open file drops its lock
            self.locked_by = None
        trio.from_thread.run(self.driver.close_session, session, trio_token=self._token)

    def lock(self, fd: int) -> None:
        """``flock(fd, LOCK_EX | LOCK_NB)``: every fd opened here is one open file of one node,
        so one of them holds the lock until it is closed."""
        if fd not in self.sessions:
            raise OSError(errno.EBADF, "bad fd")
        if self.locked_by not in (None, fd):
            raise BlockingIOError(errno.EWOULDBLOCK, "locked by another open file")
        self.locked_by = fd

    def ioctl(self, fd: int, code: int, buffer: bytearray) -> None:
        """``ioctl(2)``, from a worker thread: blocks until the driver answers."""
        session = self.sessions.get(fd)
        if session is None:
            raise OSError(errno.EBADF, "bad fd")
        self.codes.append(code)
        thread = threading.get_ident()
        trio.from_thread.run(self._in_driver, thread, session, code, buffer, trio_token=self._token)

    def interrupt(self, thread: int) -> None:
        """A signal to ``thread``: the call it is blocked in ends as the driver ends it."""
        scope = self._blocked.get(thread)
        if scope is not None:
            scope.cancel()

    def stray_signal(self) -> None:
        """A signal the transport did not send, to every thread inside the driver."""
        for scope in self._blocked.values():
            scope.cancel()

    async def _in_driver(self, thread: int, session: object, code: int, buffer: bytearray) -> None:
        self._count(1)
        try:
            with trio.CancelScope() as scope:
                self._blocked[thread] = scope
                await self.driver.ioctl(session, code, buffer, CtypesMemory())
                return
            raise OSError(errno.EINTR, "interrupted by a signal")
        finally:
            del self._blocked[thread]
            self._count(-1)
