"""``Device``: the async facade over the protocol codec and a transport.

One *main* session carries short requests (VMMDev requests, balloon checks, capability and
filter changes). Anything that blocks gets a session of its own, because a blocked ioctl
must be ended by something the driver honours:

- an :class:`EventWaiter` owns a session whose filter mask is the waiter's mask; it waits
  without a timeout and, when cancelled, ends its wait with INTERRUPT_ALL on its own
  descriptor. That is sticky on mainline and one-shot on Oracle's driver, so an
  interrupted waiter is closed, never reused; the other sessions are not affected.
- an :class:`HgcmClient` owns a session with one HGCM client on it, so long calls
  (property notifications) never hold up anything else.

Both drivers' error conventions end in one exception: a failure mainline returns as an
errno and one Oracle's driver puts in the header's ``rc`` both raise
:class:`~agent.protocol.VBoxStatusError` with the VBox status (``rc``, ``name``); the
errno, if any, is kept in its ``errno``.

Teardown (an interrupt, a disconnect, a close) must reach the driver even when its caller was
cancelled, so it runs shielded, but never for longer than ``CLEANUP_TIMEOUT_S`` nor past
:attr:`Device.cleanup_deadline`, which the daemon sets when it stops (lowering it reaches
teardown already begun, say by a reload just before): a call the driver does not finish by
then is abandoned with a ``device_cleanup_abandoned`` log line.
"""

from __future__ import annotations

import errno
import math
import weakref
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import structlog
import trio

from agent.device.errors import DeviceInUseError, DeviceLostError
from agent.protocol import (
    VALID_EVENT_MASK,
    AgentError,
    BalloonStatus,
    ChangeFilterMask,
    CheckBalloon,
    DriverVersion,
    DriverVersionInfo,
    EventsReceived,
    HgcmCall,
    HgcmConnect,
    HgcmDisconnect,
    HgcmParam,
    HgcmReply,
    InterruptAllWaits,
    PreparedHgcmCall,
    RemoteProtocolError,
    Request,
    Session,
    VBoxStatusError,
    WaitForEvents,
)
from agent.protocol.constants import SHORT_CALL_TIMEOUT_MS, TIMEOUT_INFINITE
from agent.protocol.status import VERR_HGCM_INVALID_CLIENT_ID, VERR_INTERRUPTED, VERR_TIMEOUT
from agent.records import record

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine
    from types import TracebackType

    from agent.device.transport import DeviceOpener, Transport
    from agent.protocol import Submission

log = structlog.get_logger(__name__)

R = TypeVar("R")

CLEANUP_TIMEOUT_S: Final = 2.0
"""How long one piece of teardown (an interrupt, a disconnect, a close) may take, shielded."""
STRAY_INTERRUPTS: Final = 3
"""Waits a waiter repeats after an interruption it did not ask for (a stray signal), or a
success with no events it did not ask for (which neither driver gives)."""
HGCM_CONNECT_TIMEOUT_S: Final = SHORT_CALL_TIMEOUT_MS / 1000
"""How long an HGCM connect, or the explicit disconnect, may wait for the host."""


@record
class DeviceStatistics:
    """Counters of one :class:`Device`."""

    requests: int
    failures: int
    open_sessions: int


class _Channel:
    """A transport with its session state: the unit every request goes through."""

    __slots__ = ("_device", "session", "transport")

    def __init__(self, device: Device, transport: Transport) -> None:
        self._device = device
        self.transport = transport
        self.session = Session()

    async def perform(self, request: Request[R], submission: Submission | None = None) -> R:
        """Encode, move and decode ``request``; a driver failure is a VBoxStatusError, but
        ENODEV, the device gone under an open session, is a DeviceLostError.

        Neither vboxguest driver fails an ioctl with ENODEV (mainline's status table has no
        status for it); a simulated host fails every session of the boot a VM reset ended
        with it, over any transport, and such a session never works again. An interruption
        (VERR_INTERRUPTED in ``rc``, Oracle's answer to the signal that cancels a call)
        raises ``Cancelled`` when the caller is being cancelled.
        ``submission`` goes to the transport, which marks it once the driver may have the call.
        """
        call = self.session.encode(request)
        self._device._requests += 1
        try:
            await self.transport.ioctl(
                call.code, call.buffer, call.user_buffers, submission=submission
            )
        except OSError as exc:
            self._device._failures += 1
            self.session.call_failed(call)
            if exc.errno == errno.ENODEV:
                msg = f"{request.operation} failed: the device is gone (ENODEV)"
                raise DeviceLostError(msg) from exc
            raise VBoxStatusError.from_errno(exc.errno or 0, request.operation) from exc
        except BaseException:
            self._device._failures += 1
            self.session.call_failed(call)
            raise
        try:
            return self.session.decode(call)
        except VBoxStatusError as exc:
            self._device._failures += 1
            if exc.rc == VERR_INTERRUPTED:
                await trio.lowlevel.checkpoint_if_cancelled()
            raise
        except Exception:
            self._device._failures += 1
            raise


@final
class Device:
    """An open vboxguest device: the main session plus the sessions it hands out.

    Use :func:`open_device`; close with :meth:`aclose`.
    """

    def __init__(self, opener: DeviceOpener, main: Transport) -> None:
        self._opener = opener
        self._main = _Channel(self, main)
        self._requests = 0
        self._failures = 0
        self._open_sessions = 1
        self.driver_version: DriverVersion | None = None
        self._cleanup_deadline = math.inf
        self._teardowns: weakref.WeakSet[trio.CancelScope] = weakref.WeakSet()
        """The shielded scopes of teardown begun (:meth:`bound_teardown`), which a lower
        :attr:`cleanup_deadline` reaches too."""

    @property
    def oracle_driver(self) -> bool:
        """Whether the driver is Oracle's: it reports its revision (``VBOX_SVN_REV``) in the
        version handshake, where mainline reports 0."""
        return self.driver_version is not None and self.driver_version.driver_revision != 0

    @property
    def description(self) -> str:
        """Where the device's sessions lead (``/dev/vboxguest``, ``unix:PATH``, ...)."""
        return self._opener.description

    @property
    def simulated(self) -> bool:
        """True when the device is a simulated host (see ``DeviceOpener.simulated``)."""
        return self._opener.simulated

    def statistics(self) -> DeviceStatistics:
        """Return the request and session counters."""
        return DeviceStatistics(self._requests, self._failures, self._open_sessions)

    async def request(self, request: Request[R], submission: Submission | None = None) -> R:
        """Perform a short request on the main session and return its decoded reply.

        ``submission`` is marked issued once the request may have reached the driver, so a
        caller that was cancelled can tell whether the host may have acted on it.
        """
        return await self._main.perform(request, submission)

    async def claim(self) -> None:
        """Hold the device for this process alone while it is open (its main session's
        :meth:`~agent.device.transport.Transport.claim`: on a character device, an
        exclusive ``flock(2)`` on the node and a Unix socket name that stands for the
        driver, whichever node it was opened by); the daemon claims it before it changes
        anything, and runs :meth:`serve_claim` while it holds it.

        Raises:
            DeviceInUseError: another process holds it: another vbox-agent runs on it.
        """
        if not await self._main.transport.claim():
            msg = (
                f"{self.description} is in use by another vbox-agent (it holds the device's "
                "lock): one agent per device, stop the other first"
            )
            raise DeviceInUseError(msg)

    async def serve_claim(self) -> None:
        """Keep the claim answerable until cancelled: whatever connects to the name that
        stands for the driver is accepted and closed, so no queue of connections keeps a
        later agent from asking who holds it
        (:meth:`~agent.device.transport.Transport.serve_claim`). Returns at once without a
        claim to answer for (a simulated host)."""
        await self._main.transport.serve_claim()

    async def check_balloon(self) -> BalloonStatus:
        """Ask the driver about the balloon (``VBG_IOCTL_CHECK_BALLOON``)."""
        return await self.request(CheckBalloon())

    async def _open_channel(self) -> _Channel:
        transport = await self._opener.open_session()
        self._open_sessions += 1
        return _Channel(self, transport)

    @property
    def cleanup_deadline(self) -> float:
        """Trio time after which shielded teardown is abandoned (the daemon's stop sets it).

        Lowering it lowers the deadline of every teardown already begun as well: a stop
        bounds the teardown a reload or a restart began just before it.
        """
        return self._cleanup_deadline

    @cleanup_deadline.setter
    def cleanup_deadline(self, deadline: float) -> None:
        self._cleanup_deadline = deadline
        for scope in list(self._teardowns):
            scope.deadline = min(scope.deadline, deadline)

    def bound_teardown(self, scope: trio.CancelScope) -> None:
        """Bound ``scope``, teardown begun now, by ``CLEANUP_TIMEOUT_S`` from now and by
        :attr:`cleanup_deadline`, now and whenever it is lowered later."""
        scope.deadline = min(trio.current_time() + CLEANUP_TIMEOUT_S, self._cleanup_deadline)
        self._teardowns.add(scope)

    def cleanup_scope(self, what: str) -> _CleanupScope:
        """A shielded scope for teardown ``what``, bound by :meth:`bound_teardown`."""
        cleanup = _CleanupScope(what, self.description)
        self.bound_teardown(cleanup.scope)
        return cleanup

    async def _close_channel(self, channel: _Channel) -> None:
        with self.cleanup_scope("close session"):
            await channel.transport.aclose()
        self._open_sessions -= 1

    @asynccontextmanager
    async def open_event_waiter(self, mask: int) -> AsyncIterator[EventWaiter]:
        """Open a session that asks the host for ``mask`` and waits for those events."""
        if not mask or mask & ~VALID_EVENT_MASK:
            msg = f"event mask {mask:#x} must be non-zero and within {VALID_EVENT_MASK:#x}"
            raise ValueError(msg)
        channel = await self._open_channel()
        try:
            await channel.perform(ChangeFilterMask(mask, VALID_EVENT_MASK & ~mask))
            waiter = EventWaiter(self, channel, mask)
            yield waiter
        finally:
            await self._close_channel(channel)

    @asynccontextmanager
    async def open_hgcm_client(self, service: str) -> AsyncIterator[HgcmClient]:
        """Connect to an HGCM host service on a session of its own; disconnect on exit.

        A normal exit disconnects explicitly, under the caller's cancel scopes; a client the
        host no longer knows (VERR_HGCM_INVALID_CLIENT_ID) counts as disconnected. Any other
        exit (cancellation, an error) only closes the session: the driver disconnects the
        session's clients itself (as it does after a disconnect the host fails, which is
        logged, not raised: the caller's work is done), so no host round trip runs shielded
        past the caller's deadline.

        Both drivers wait for a connect or a disconnect without a timeout and let no signal
        end it, so each is given :data:`HGCM_CONNECT_TIMEOUT_S`: a connect the host does not
        answer by then fails with VERR_TIMEOUT, a disconnect is left to the session's close
        (on ``/dev/vboxguest`` the call's thread is abandoned and replaced, not held for good,
        and while ``HELD_CONNECTS_MAX`` connects are held so, a connect fails at once with
        VERR_TIMEOUT: see :mod:`agent.device.chardev`).

        Raises:
            VBoxStatusError: the host refused the connect, or did not answer it in time.
        """
        channel = await self._open_channel()
        try:
            with trio.move_on_after(HGCM_CONNECT_TIMEOUT_S) as connecting:
                connected = await channel.perform(HgcmConnect(service))
            if connecting.cancelled_caught:
                raise VBoxStatusError(VERR_TIMEOUT, f"VBG_IOCTL_HGCM_CONNECT to {service}")
            yield HgcmClient(
                channel, service, connected.client_id, give_ups_in_header=self.oracle_driver
            )
            with trio.move_on_after(HGCM_CONNECT_TIMEOUT_S) as disconnecting:
                try:
                    await channel.perform(HgcmDisconnect(connected.client_id))
                except VBoxStatusError as exc:
                    if exc.rc == VERR_HGCM_INVALID_CLIENT_ID:
                        log.debug(
                            "hgcm_client_already_gone",
                            service=service,
                            client_id=connected.client_id,
                        )
                    else:  # the caller's work is done: closing the session disconnects it
                        log.warning(
                            "hgcm_disconnect_failed",
                            service=service,
                            client_id=connected.client_id,
                            status=exc.name,
                            reason="closing the session disconnects the client",
                        )
            if disconnecting.cancelled_caught:
                log.warning(
                    "hgcm_disconnect_given_up",
                    service=service,
                    client_id=connected.client_id,
                    after_s=HGCM_CONNECT_TIMEOUT_S,
                    reason="the host did not answer; closing the session disconnects the client",
                )
        finally:
            await self._close_channel(channel)

    async def aclose(self) -> None:
        """Close the main session."""
        if self._main.transport is not None:
            await self._close_channel(self._main)


@final
class _CleanupScope:
    """``with`` a shielded cancel scope with a deadline; logs when teardown is abandoned."""

    __slots__ = ("_description", "_what", "scope")

    def __init__(self, what: str, description: str) -> None:
        self._what = what
        self._description = description
        self.scope = trio.CancelScope(shield=True)

    def __enter__(self) -> trio.CancelScope:
        return self.scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        handled = self.scope.__exit__(exc_type, exc_value, traceback)
        if self.scope.cancelled_caught:
            log.warning("device_cleanup_abandoned", what=self._what, device=self._description)
        return handled


class WaiterInterruptedError(AgentError):
    """The wait ended because :meth:`EventWaiter.interrupt` was called."""


@final
class EventWaiter:
    """Waits for host events on a session of its own; see :meth:`Device.open_event_waiter`."""

    def __init__(self, device: Device, channel: _Channel, mask: int) -> None:
        self._device = device
        self._channel = channel
        self._interrupt_requested = False
        self.mask = mask

    @property
    def interrupted(self) -> bool:
        """Whether this waiter was interrupted and can no longer wait."""
        return self._interrupt_requested

    async def wait(self) -> int:
        """Block until events of the mask are pending and return those consumed.

        No timeout and no polling: the call sleeps in the driver until the host raises an
        event. It ends early in two ways:

        - :meth:`interrupt` makes it raise :class:`WaiterInterruptedError`, unless events
          were consumed first, which are then returned (nothing is lost);
        - cancellation interrupts the session and raises ``Cancelled``; events consumed in
          that same instant are dropped, so cancel only to tear down. A driver that does
          not end the wait after the interrupt is given up on, as teardown is, and so is
          a wait whose interrupt failed (logged: ``event_wait_interrupt_failed``).

        Both drivers' interrupts count: mainline's EINTR, Oracle's VERR_INTERRUPTED, and
        Oracle's success with no events, which is how its wait consumes an interrupt sent
        before the wait reached the driver, once (``fPendingCancelWaitEvents``; mainline's
        wait never returns without events). So a success with no events is an interrupt
        only when :meth:`interrupt` was called. An interruption nobody asked for (a stray
        signal) or such a success nobody asked for repeats the wait, at most
        :data:`STRAY_INTERRUPTS` times; past that the wait fails: the status, or a
        :class:`~agent.protocol.RemoteProtocolError` for the successes.
        """
        strays = 0
        while True:
            try:
                received = await self._wait_once()
            except VBoxStatusError as exc:
                if exc.rc != VERR_INTERRUPTED:
                    raise
                if self._interrupt_requested:
                    raise WaiterInterruptedError(self.mask) from None
                strays += 1
                if strays > STRAY_INTERRUPTS:
                    raise
                continue
            if received.mask:
                return received.mask
            if self._interrupt_requested:
                raise WaiterInterruptedError(self.mask)
            strays += 1
            if strays > STRAY_INTERRUPTS:
                msg = (
                    f"WAIT_FOR_EVENTS: success with no events {strays} times in a row, "
                    "though no interrupt was asked for"
                )
                raise RemoteProtocolError(msg)

    async def _wait_once(self) -> EventsReceived:
        """One shielded WAIT_FOR_EVENTS; cancellation sends the interrupt that ends it.

        An interrupt that fails (the device lost, the session closing, the driver refusing
        it) is logged, not raised: the caller is being cancelled and its cancellation is
        what it sees, as with any teardown. Nothing else would end the wait, so it is then
        given up at once.
        """
        channel = self._channel
        finished = False
        wait_scope = trio.CancelScope(shield=True)

        async def interrupt_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not finished:
                    # One teardown budget for the interrupt and the end of the wait.
                    self._device.bound_teardown(wait_scope)
                    try:
                        await self.interrupt()
                    except Exception as exc:  # noqa: BLE001 - teardown: logged, not raised
                        log.warning(
                            "event_wait_interrupt_failed",
                            device=self._device.description,
                            error=str(exc),
                            reason="the wait is given up",
                        )
                        wait_scope.cancel()

        received: EventsReceived | None = None
        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_when_cancelled)
            try:
                with wait_scope:
                    received = await channel.perform(WaitForEvents(self.mask))
                if wait_scope.cancelled_caught:  # the nursery then re-raises our Cancelled
                    log.warning(
                        "device_cleanup_abandoned",
                        what="event wait",
                        device=self._device.description,
                    )
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the nursery
                error = exc
            finally:
                finished = True
                nursery.cancel_scope.cancel()
        # Raised here, not in the nursery, so callers see the error itself, not a group.
        if error is not None:
            raise error
        if received is None:  # pragma: no cover - either a reply or an error exists
            msg = "wait ended without a reply"
            raise RuntimeError(msg)
        return received

    async def interrupt(self) -> None:
        """End the current wait on this session (INTERRUPT_ALL); the waiter is then done.

        Shielded: once asked for, the interrupt reaches the driver even if the caller is
        cancelled meanwhile, or a blocked wait would never end.
        """
        if self._interrupt_requested:
            return
        # Set before sending: the woken wait may end before this call returns.
        self._interrupt_requested = True
        with self._device.cleanup_scope("interrupt"):
            await self._channel.perform(InterruptAllWaits())


@final
class HgcmClient:
    """One HGCM client connected to a host service; see :meth:`Device.open_hgcm_client`.

    Attributes:
        give_ups_in_header: whether the driver reports a call it gave up on (its timeout,
            VERR_TIMEOUT; a signal, VERR_INTERRUPTED) in the header, where the service's
            status comes, so that both raise :class:`~agent.protocol.HgcmCallError`
            (Oracle's driver); mainline's driver returns an errno instead, which raises a
            plain :class:`~agent.protocol.VBoxStatusError`.
    """

    def __init__(
        self, channel: _Channel, service: str, client_id: int, *, give_ups_in_header: bool
    ) -> None:
        self._channel = channel
        self.service = service
        self.client_id = client_id
        self.give_ups_in_header = give_ups_in_header

    def call(
        self,
        function: int,
        params: tuple[HgcmParam, ...],
        *,
        timeout_ms: int = TIMEOUT_INFINITE,
        submission: Submission | None = None,
    ) -> Coroutine[Any, Any, HgcmReply]:
        """Call ``function``: await the result for the reply; a failing service status raises.

        ``timeout_ms`` is the driver's backstop: the host call is cancelled after it.
        ``submission`` is marked issued once the call may have reached the driver, so a
        caller that was cancelled can tell whether the host may still count the call.
        """
        return self.call_prepared(self.prepare(function, params, timeout_ms=timeout_ms), submission)

    def prepare(
        self, function: int, params: tuple[HgcmParam, ...], *, timeout_ms: int = TIMEOUT_INFINITE
    ) -> PreparedHgcmCall:
        """Check and lay out a call of ``function`` once, for :meth:`call_prepared`.

        Raises:
            LocalProtocolError: the call breaks the ABI (see ``HgcmCall.encode``).
        """
        return PreparedHgcmCall(HgcmCall(self.client_id, function, params, timeout_ms))

    def call_prepared(
        self, prepared: PreparedHgcmCall, submission: Submission | None = None
    ) -> Coroutine[Any, Any, HgcmReply]:
        """Make a call :meth:`prepare` prepared, as :meth:`call` does.

        A plain function returning the session's ``perform`` coroutine, so that no frame of
        its own lies between the caller and the transport, whose checkpoint suspends and
        resumes every frame above it on every call.
        """
        return self._channel.perform(prepared, submission)


@asynccontextmanager
async def open_device(opener: DeviceOpener) -> AsyncIterator[Device]:
    """Open the device's main session, agree on the ioctl version and yield the Device.

    Raises:
        DeviceUnavailableError: the device cannot be opened.
        VBoxStatusError: the driver refused our interface version.
    """
    transport = await opener.open_session()
    device = Device(opener, transport)
    try:
        device.driver_version = await device.request(DriverVersionInfo())
        yield device
    finally:
        await device.aclose()
