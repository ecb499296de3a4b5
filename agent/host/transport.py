"""In-process transport to a :class:`SimulatedHost`: pure trio, no threads.

``SimTransport`` has the shape of ``agent.device.transport.Transport`` and ``SimOpener`` the
shape of ``DeviceOpener`` (structurally: the host layer never imports the device layer).
Every wait happens on trio primitives inside the host, so tests run under ``autojump_clock``.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING, Final, final

import trio

from agent.host.memory import IoctlMemory
from agent.protocol.errors import DeviceUnavailableError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.host.driver import DriverSession
    from agent.host.host import SimulatedHost
    from agent.host.memory import GuestMemory
    from agent.protocol import Submission, UserBuffer

_ADDRESS: Final = struct.Struct("<Q")
_NO_USER_MEMORY: Final[GuestMemory] = IoctlMemory()
"""The user memory of every ioctl without user buffers, shared: typed as ``GuestMemory``
(read and write only), so no buffer can be mapped into it and seen by a later ioctl."""


@final
class SimTransport:
    """One open session (file descriptor) on a simulated host."""

    __slots__ = ("_closed", "_host", "_session")

    def __init__(self, host: SimulatedHost, session: DriverSession) -> None:
        self._host = host
        self._session = session
        self._closed = False

    @property
    def session(self) -> DriverSession:
        """The driver session behind this transport."""
        return self._session

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        """Perform one ioctl: map the user buffers, store their addresses, call the driver.

        A failure leaves ``buffer`` as it was (the addresses stored in it are taken back).
        ``submission`` is issued as the driver is called: nothing here waits before that.

        Raises:
            OSError: the driver's errno (``EBADF`` after :meth:`aclose`).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if submission is not None:
            submission.issued = True
        if not user_buffers:
            await self._host.ioctl(self._session, code, buffer, _NO_USER_MEMORY)
            return
        memory = IoctlMemory()
        original = bytes(buffer)
        try:
            for user in user_buffers:
                _ADDRESS.pack_into(buffer, user.address_offset, memory.map(user.data))
            await self._host.ioctl(self._session, code, buffer, memory)
        except BaseException:
            buffer[:] = original  # the driver copies nothing back on failure
            raise

    async def aclose(self) -> None:
        """Close the session (idempotent); the driver releases what it held."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._host.close_session(self._session)


@final
class SimOpener:
    """Opens sessions on a simulated host, as ``/dev/vboxguest`` (or ``/dev/vboxuser``)."""

    __slots__ = ("_host", "_uid", "_user_device")

    def __init__(self, host: SimulatedHost, *, user_device: bool = False, uid: int = 0) -> None:
        self._host = host
        self._user_device = user_device
        self._uid = uid

    @property
    def description(self) -> str:
        """Where sessions lead, for logs and errors."""
        node = "vboxuser" if self._user_device else "vboxguest"
        return f"simulated {self._host.personality} host (/dev/{node})"

    @property
    def simulated(self) -> bool:
        """True."""
        return True

    async def open_session(self) -> SimTransport:
        """Open a new session.

        Raises:
            DeviceUnavailableError: the host is not running (its driver is not loaded).
        """
        await trio.lowlevel.checkpoint()
        try:
            session = self._host.open_session(user_device=self._user_device, uid=self._uid)
        except FileNotFoundError as exc:
            msg = f"cannot open {self.description}: {exc.strerror}"
            raise DeviceUnavailableError(msg) from exc
        return SimTransport(self._host, session)
