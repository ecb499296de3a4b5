"""The transport seam: how a ``Device`` moves ioctl buffers to a driver and back.

A transport is one open device session (one file descriptor of ``/dev/vboxguest``, one
connection to a simulated host). Its contract:

- ``ioctl(code, buffer, user_buffers)`` performs one ioctl. ``buffer`` is mutated in place
  with what the driver copied back. Each :class:`~agent.protocol.UserBuffer` names an 8-byte
  field of ``buffer`` where the transport stores the address of that buffer's memory; the
  driver reads the memory and writes results into ``UserBuffer.data``.
- A driver failure that returns an errno raises ``OSError`` with that errno (``EINVAL``,
  ``EPERM``, ``ENOTTY``, ``EINTR``, ``ETIMEDOUT``, ...), exactly as ``fcntl.ioctl`` does, and
  leaves ``buffer`` as it was. VBox status failures are not errors here: they travel in the
  buffer's ``rc`` and the protocol layer decodes them.
- Several ioctls may be in flight on one transport at once (a blocked wait and the interrupt
  that ends it).
- Cancelling the task that awaits ``ioctl`` makes the driver give the call up promptly (the
  character device signals its worker thread, so the driver cancels the call at the host
  and returns EINTR; the simulated transports cancel natively) and raises ``Cancelled``; a
  call that completed first returns normally, as does one the driver completed all the
  same (an HGCM call the host finished while its cancel failed) and one Oracle's driver
  answers with VERR_INTERRUPTED in ``rc`` (its answer to the signal): the caller's next
  checkpoint raises the cancellation (the ``Device`` checks for it on VERR_INTERRUPTED).
- ``submission``, if given, is marked ``issued`` once the call may have reached the driver
  (:class:`~agent.protocol.Submission`): a call cancelled before that, while it waited for
  a worker thread or for its turn to send, never reached the host, and the caller can tell.
- Deadlines bind the transport too: work it shields (a frame half sent, the signal that
  ends a blocked call, a close) never runs past the deadline in effect when the caller
  entered (``trio.current_effective_deadline()``, which inside a
  :meth:`Device.cleanup_scope <agent.device.Device.cleanup_scope>` is the device's cleanup
  deadline), and a cancelled call returns within a short bounded grace even if the driver
  does not end it: such a call is abandoned (with a log line), never waited for, so the
  daemon's stop stays within ``shutdown_timeout_s + 1 s``.
- A session whose other side vanished raises :class:`~agent.device.errors.DeviceLostError`.
- ``aclose()`` ends the session: the driver releases its HGCM clients and event filter.
- ``claim()`` holds the device for this process alone for as long as the session stays
  open, without waiting: False when another process holds it (on a character device, an
  exclusive ``flock(2)`` on the node and an abstract Unix socket name for the driver, so
  ``/dev/vboxuser`` or a copy of the node is the same device). The daemon claims its main
  session, so a second agent on the same device is refused before it changes anything.
- ``serve_claim()`` keeps the claim answerable while it is held, until cancelled: the name
  refuses a later agent only if that agent can connect and ask who holds it, so the holder
  accepts and closes whatever connects. It returns at once on a session that holds no name.

A :class:`DeviceOpener` opens new sessions, so the ``Device`` can give each blocking waiter
a session of its own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

import trio

from agent.protocol.constants import ABANDON_AFTER_S, GIVE_BACK_S

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.protocol import Submission, UserBuffer


def abandon_at(cancelled: trio.Cancelled, deadline: float) -> float:
    """When to give up a call its caller was cancelled on (by ``cancelled``), if the driver
    keeps it: :data:`ABANDON_AFTER_S` from now, never past ``deadline`` (the caller's, in
    effect when the call began), and at once if a deadline is what cancelled it; but not
    within :data:`GIVE_BACK_S`."""
    if cancelled.source == "deadline":
        return given_back_by(-math.inf)
    return given_back_by(min(trio.current_time() + ABANDON_AFTER_S, deadline))


def given_back_by(deadline: float) -> float:
    """``deadline``, or :data:`GIVE_BACK_S` from now if that is later."""
    return max(deadline, trio.current_time() + GIVE_BACK_S)


class Transport(Protocol):
    """One open device session."""

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        """Perform one ioctl; see the module docstring for the contract."""
        ...

    async def aclose(self) -> None:
        """Close the session. Idempotent."""
        ...

    async def claim(self) -> bool:
        """Hold the device for this process alone while the session is open; False if
        another process holds it. See the module docstring."""
        ...

    async def serve_claim(self) -> None:
        """Answer whoever asks who holds the claim until cancelled. See the module
        docstring."""
        ...


class DeviceOpener(Protocol):
    """Opens device sessions on one device."""

    @property
    def description(self) -> str:
        """Where the sessions lead, for logs and errors (``/dev/vboxguest``, ``unix:PATH``)."""
        ...

    @property
    def simulated(self) -> bool:
        """True when the sessions lead to a simulated host, not to this machine's driver:
        services then leave the machine itself (its CPUs, its clock) alone."""
        ...

    async def open_session(self) -> Transport:
        """Open a new session.

        Raises:
            DeviceUnavailableError: the device is missing or may not be opened.
            OSError: a shortage that may pass (out of descriptors or memory): the device
                is still there, and the caller may retry.
        """
        ...
