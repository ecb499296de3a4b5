"""In-process transport to a :class:`SimulatedHost`: pure trio, no threads.

``SimTransport`` has the shape of ``agent.device.transport.Transport`` and ``SimOpener`` the
shape of ``DeviceOpener`` (structurally: the host layer never imports the device layer).
Every wait happens on trio primitives inside the host, so tests run under ``autojump_clock``.

Cancelling the task that awaits an ioctl cancels the simulated driver's call, as the signal
the character-device transport sends does: it ends what it may interrupt (a wait, an HGCM
call, which it cancels at the host) at once. What it may not interrupt it gives back as
soon as the host answers, which a simulated host does at once, unless a fault or a delay is
configured (a slow host: a request held in the port write, an HGCM connect the host does
not answer, a cancel the host refuses). So while none is, each call runs in its caller's
task, as fast as a function call; while one is, each call (and each close) runs in a task
of its own, as a guest thread in the driver (a trio system task: it outlives its caller, as
a thread in the kernel does, and what ends the call ends it), which the caller waits for.
A cancelled call that task does not give back is given up on as the character device gives
up on its thread, by the same rule (``ABANDON_AFTER_S`` after an explicit cancel, never
past the caller's deadline, at once when that deadline cancelled it, ``GIVE_BACK_S`` at
least; see :mod:`agent.protocol.constants`), with an ``ioctl_abandoned`` line (a warning
for the first of a run of one code, :mod:`agent.abandons`): the caller
leaves, and the task finishes the call host-side as a real host would. A close is waited
for until the caller's deadline, then left to its task too (``close_abandoned``). A close
while abandoned calls still run returns at once (``close_deferred``): as the kernel keeps
the file referenced by an ioctl in flight, the driver releases the session only once the
last of them returned (in its task), so what they did (an HGCM client a connect made) is
released too.

A call already running in its caller's task when a fault or delay is configured stays
there: the fault or delay reaches what the driver sends for it later, but the call is not
abandoned, and its cancelled caller waits as long as the driver does: up to the 2 s the
drivers wait after a refused cancel, and the whole of a delay on what the driver sends
after the signal (``set_delay(HGCM_CANCEL2, 30)`` while a call is held holds its cancelled
caller 30 s, where the socket transport and the character device give the call up after
``ABANDON_AFTER_S``). Abandoning it would take each driver (the mainline and Oracle models,
the real driver's thread) handing what it does after the signal, and its own cleanup of the
call, to a task of its own, and this transport deferring the session's release to that
task; running every call in a task of its own instead costs each ioctl a scheduling step
(several times an inline call's cost). Configure a fault or delay before the calls it is
meant to hold start.
"""

from __future__ import annotations

import contextvars
import errno
import os
import struct
from functools import partial
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

# By name, as in agent.host.driver._core: trio's module __getattr__ keeps trio.lowlevel.X
# from being specialised, and every ioctl passes this one.
from trio.lowlevel import checkpoint_if_cancelled

from agent.abandons import AbandonedCalls
from agent.host.memory import USER_BASE, USER_WINDOW, IoctlMemory
from agent.protocol.constants import ABANDON_AFTER_S, GIVE_BACK_S
from agent.protocol.errors import DeviceUnavailableError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from agent.host.driver import DriverSession
    from agent.host.host import SimulatedHost
    from agent.host.memory import GuestMemory
    from agent.protocol import Submission, UserBuffer

_log = structlog.get_logger(__name__)

_ADDRESS: Final = struct.Struct("<Q")
_NO_USER_MEMORY: Final[GuestMemory] = IoctlMemory()
"""The user memory of every ioctl without user buffers, shared: typed as ``GuestMemory``
(read and write only), so no buffer can be mapped into it and seen by a later ioctl."""


@final
class _GuestCall:
    """One call in a task of its own: ``done`` once it returned, failed or was cancelled."""

    __slots__ = ("_work", "done", "error", "finished", "scope", "then")

    def __init__(self, work: Callable[[], Awaitable[None]]) -> None:
        self._work = work
        self.scope = trio.CancelScope()
        """Cancelled as a signal interrupts the guest thread."""
        self.done = trio.Event()
        self.error: Exception | None = None
        self.finished = False
        """The call returned normally."""
        self.then: Callable[[], Awaitable[None]] | None = None
        """Run in the task once the call ended (outside ``scope``): set when abandoned."""

    def start(self) -> None:
        """Start the call in a task of its own, with the caller's context (its log fields)."""
        trio.lowlevel.spawn_system_task(self._run, context=contextvars.copy_context())

    async def _run(self) -> None:
        try:
            with self.scope:
                await self._work()
                self.finished = True
        except Exception as exc:  # noqa: BLE001 - the caller raises it
            self.error = exc
        finally:
            self.done.set()
        if self.then is not None:
            await self.then()

    def outcome(self) -> None:
        """Return, or raise what the call raised (ENODEV if the run ended it)."""
        if self.error is not None:
            raise self.error
        if not self.finished:
            raise OSError(errno.ENODEV, "the call's task ended with the run")


def _slow(host: SimulatedHost) -> bool:
    """Whether ``host`` may hold a call: a fault or a delay is configured."""
    faults = host.vmmdev.faults
    return faults.has_delays or faults.has_faults


def _abandon_at(cancelled: trio.Cancelled, deadline: float) -> float:
    """When a call its caller was cancelled on is given up: ``ABANDON_AFTER_S`` from now,
    never past ``deadline`` (the caller's when the call began), now if a deadline cancelled
    it; never sooner than ``GIVE_BACK_S``."""
    now = trio.current_time()
    if cancelled.source == "deadline":
        return now + GIVE_BACK_S
    return max(min(now + ABANDON_AFTER_S, deadline), now + GIVE_BACK_S)


@final
class SimTransport:
    """One open session (file descriptor) on a simulated host."""

    __slots__ = (
        "_abandoned",
        "_abandons",
        "_abandons_warned",
        "_closed",
        "_host",
        "_release_deferred",
        "_session",
    )

    def __init__(
        self,
        host: SimulatedHost,
        session: DriverSession,
        abandons: AbandonedCalls | None = None,
    ) -> None:
        """Wrap ``session``; ``abandons`` logs abandoned calls for every session of the
        opener (:class:`~agent.abandons.AbandonedCalls`)."""
        self._host = host
        self._session = session
        self._closed = False
        self._abandons = abandons if abandons is not None else AbandonedCalls()
        self._abandoned = 0
        """Abandoned calls still running: each holds the session open, as a file reference."""
        self._abandons_warned = False
        """One of them was logged at warning: so is the close they defer."""
        self._release_deferred = False
        """Closed while calls were abandoned: the last of them releases the session."""

    @property
    def session(self) -> DriverSession:
        """The driver session behind this transport."""
        return self._session

    async def claim(self) -> bool:
        """True: nothing is locked. An in-process host is its process's own (``run
        --simulate`` builds one per run), so no other agent can reach it."""
        await trio.lowlevel.checkpoint()
        return True

    async def serve_claim(self) -> None:
        """Return: no claim to answer for."""
        await trio.lowlevel.checkpoint()

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
        ``submission`` is issued as the driver is called: a caller cancelled before that
        never reaches the driver, and past it the call goes through as a system call does (the
        driver's entry is no cancellation point; its interruptible waits are).
        A cancelled call the driver holds is abandoned (see the module docstring).

        Raises:
            OSError: the driver's errno (``EBADF`` after :meth:`aclose`).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        # The last moment the call may be dropped, as a cancelled caller never gets a worker
        # thread on the character device: past it the driver has the call.
        await checkpoint_if_cancelled()
        if submission is not None:
            submission.issued = True
        memory = _NO_USER_MEMORY
        original: bytes | None = None
        host = self._host
        try:
            if user_buffers:
                original = bytes(buffer)
                mapped: list[bytearray] = []
                address = USER_BASE  # the windows of IoctlMemory, in order
                for user in user_buffers:
                    mapped.append(user.data)
                    _ADDRESS.pack_into(buffer, user.address_offset, address)
                    address += USER_WINDOW
                memory = IoctlMemory(mapped)
            # The driver's ioctl, in this task; in one of its own while the host is slow
            # (_slow, inline: this runs for every ioctl).
            faults = host.vmmdev.faults
            if faults.has_delays or faults.has_faults:
                await self._in_task(
                    partial(host.ioctl, self._session, code, buffer, memory), code, buffer
                )
            else:
                await host.ioctl(self._session, code, buffer, memory)
        except BaseException:
            if original is not None:
                buffer[:] = original  # the driver copies nothing back on failure
            raise
        self._abandons.given_back(code, buffer)

    async def _in_task(
        self, work: Callable[[], Awaitable[None]], code: int, buffer: bytearray
    ) -> None:
        """Run ``work`` in a task of its own and wait for it; abandon it if cancelled and
        held (see the module docstring)."""
        deadline = trio.current_effective_deadline()
        call = _GuestCall(work)
        call.start()
        try:
            await call.done.wait()
        except trio.Cancelled as cancelled:
            call.scope.cancel()  # as a signal: the driver ends what it may interrupt
            began = trio.current_time()
            with trio.CancelScope(shield=True, deadline=_abandon_at(cancelled, deadline)):
                await call.done.wait()
            if not call.done.is_set():
                self._abandoned += 1
                call.then = self._abandoned_call_returned
                self._abandons_warned |= self._abandons.abandoned(
                    code,
                    buffer,
                    after_s=round(trio.current_time() - began, 3),
                    reason="the simulated driver did not give the call back; its task finishes it",
                )
            elif call.finished:
                return  # it completed first: the caller's next checkpoint raises
            elif call.error is not None:
                raise call.error from None
            raise
        call.outcome()

    async def _abandoned_call_returned(self) -> None:
        """An abandoned call returned: the last one releases a session closed meanwhile."""
        self._abandoned -= 1
        if self._abandoned or not self._release_deferred:
            return
        await self._host.close_session(self._session)

    async def aclose(self) -> None:
        """Close the session (idempotent); the driver releases what it held.

        Shielded, but not past the caller's deadline: a close the driver does not finish by
        then (it disconnects the session's HGCM clients, waiting for the host) is left to
        its task, with a ``close_abandoned`` line. While abandoned calls still run it
        returns at once, with a ``close_deferred`` line (at warning if one of them was
        logged at warning): the last of them releases the session when it returns.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._abandoned:
            self._release_deferred = True
            (_log.warning if self._abandons_warned else _log.debug)(
                "close_deferred",
                abandoned=self._abandoned,
                reason="abandoned calls still hold the session; the last to return releases it",
            )
            await trio.lowlevel.checkpoint()
            return
        if not _slow(self._host):
            with trio.CancelScope(shield=True):
                await self._host.close_session(self._session)
            return
        deadline = max(trio.current_effective_deadline(), trio.current_time() + GIVE_BACK_S)
        call = _GuestCall(partial(self._host.close_session, self._session))
        call.start()
        began = trio.current_time()
        with trio.CancelScope(shield=True, deadline=deadline):
            await call.done.wait()
        if call.done.is_set():
            call.outcome()
            return
        _log.warning(
            "close_abandoned",
            after_s=round(trio.current_time() - began, 3),
            reason="the simulated driver did not finish the close in time; its task finishes it",
        )


@final
class SimOpener:
    """Opens sessions on a simulated host, as ``/dev/vboxguest`` (or ``/dev/vboxuser``)."""

    __slots__ = ("_abandons", "_host", "_uid", "_user_device")

    def __init__(self, host: SimulatedHost, *, user_device: bool = False, uid: int = 0) -> None:
        self._host = host
        self._abandons = AbandonedCalls()
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
        return SimTransport(self._host, session, self._abandons)
