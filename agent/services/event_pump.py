"""``EventPump``: the one task that waits for host events and fans them out.

Subscribers get a :class:`Subscription` each, for as long as their
``with pump.subscribe(name, mask) as events:`` block lasts. The union of their masks is the
pump's wait mask, and so the filter mask of the pump's device session: the host is asked for
exactly the events somebody listens to.

Delivery is lossless and never blocks the pump. Events are bit flags, so a subscription is a
mailbox of pending bits: bits that arrive while the subscriber is busy are OR-ed into the
ones it has not received yet, and its next ``receive()`` returns them all at once. Such a
merge is counted as ``coalesced``; nothing is ever dropped and the mailbox never grows.

While the host is silent the pump sleeps in the driver (no timeout, no polling). When the
mask changes it interrupts its waiter and opens a new session with the new mask; events
raised in between stay pending at the host and the driver, so nothing is lost. Once the
agent is leaving (a stop, or an exit on a fatal error: every service's run is cancelled),
the pump opens no new session: a mask change still ends the waiter, and the pump then idles
until it is stopped. The subscribers left then are runs being cancelled, which need no
event, and a session opened while the agent stops would be work started during the stop.

A waiter the host or driver fails (the filter mask refused, a wait answered with a status or
a malformed reply, or stray interrupts past :data:`agent.device.STRAY_INTERRUPTS`) never
ends the pump: the failure is logged when it begins or changes cause, shown in ``STATUS=``
(:meth:`EventPump.failing`), and the waiter is opened again after a back-off
(:meth:`LastingFailure.retry_in`), or at once when the mask changes. The failure ends
(logged, and gone from ``STATUS=``) when a wait returns events, or once the new waiter's
wait is held :data:`WAIT_HELD_S` unanswered, as a healthy wait on a quiet host is (a failing
wait is answered at once, and a quiet host may raise no event for hours). Timers and
property publishing go on meanwhile; subscribers keep their subscriptions and simply hear
nothing.
Nothing is lost: events the host raised stay pending at the host (outside the filter) or in
the driver (not consumed) until a waiter takes them, and each subscriber then receives them
merged, as any bits that came while it was busy.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.device import WaiterInterruptedError
from agent.protocol import HOST_ERRORS, VALID_EVENT_MASK
from agent.records import record
from agent.services._lasting import LastingFailure

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from agent.device import Device, EventWaiter
    from agent.protocol import RemoteProtocolError, VBoxStatusError

log = structlog.get_logger(__name__)

WAIT_HELD_S: Final = 1.0
"""How long a wait after failed waits must be held by the driver, unanswered, to count as
blocked: the failure has ended (one wake-up per waiter opened while waits fail)."""


@record
class SubscriberStatistics:
    """Counters of one subscription.

    Attributes:
        posted: host events that carried bits of the subscriber's mask.
        delivered: ``receive()`` calls that returned bits.
        coalesced: events whose bits were merged into a delivery still pending.
    """

    name: str
    mask: int
    posted: int
    delivered: int
    coalesced: int


@record
class EventPumpStatistics:
    """Counters of the pump; ``last_event_time`` is trio time, or None before any event;
    ``failures``: waiters that could not be opened and waits that failed (each retried)."""

    mask: int
    waits: int
    events_received: int
    last_event_time: float | None
    subscribers: tuple[SubscriberStatistics, ...]
    failures: int = 0


@final
class Subscription:
    """The receiving end of one subscription: a mailbox of pending event bits."""

    def __init__(self, name: str, mask: int) -> None:
        self.name = name
        self.mask = mask
        self._pending = 0
        self._arrived = trio.Event()
        self._posted = 0
        self._delivered = 0
        self._coalesced = 0

    def statistics(self) -> SubscriberStatistics:
        """Return this subscription's counters."""
        return SubscriberStatistics(
            self.name, self.mask, self._posted, self._delivered, self._coalesced
        )

    async def receive(self) -> int:
        """Wait until bits are pending, then return (and clear) all of them.

        Cancellation loses nothing: bits stay pending until a ``receive`` returns them. Of
        concurrent receivers, the first to run takes the bits; the others wait on for more.
        """
        while True:
            if self._pending:
                await trio.lowlevel.checkpoint()
                if self._pending:  # another receiver may have taken them meanwhile
                    return self._take()
            else:
                await self._arrived.wait()
                if self._arrived.is_set():
                    self._arrived = trio.Event()

    def receive_nowait(self) -> int:
        """Return (and clear) the pending bits without waiting.

        Raises:
            trio.WouldBlock: no bits are pending.
        """
        if not self._pending:
            raise trio.WouldBlock
        return self._take()

    def _take(self) -> int:
        bits, self._pending = self._pending, 0
        self._delivered += 1
        return bits

    def _post(self, bits: int) -> None:
        self._posted += 1
        if self._pending:
            self._coalesced += 1
        self._pending |= bits
        self._arrived.set()


@final
class EventPump:
    """Waits for host events on its own session and fans them out to subscribers."""

    name: Final = "event-pump"

    def __init__(
        self,
        device: Device,
        *,
        leaving: Callable[[], bool] = lambda: False,
        status_changed: Callable[[], None] = lambda: None,
    ) -> None:
        """Create the pump on ``device``; ``leaving()`` tells whether the agent is leaving,
        after which no waiter is opened; ``status_changed()`` is called when
        :meth:`failing` changes."""
        self._device = device
        self._leaving = leaving
        self._status_changed = status_changed
        self._subscribers: list[Subscription] = []
        self._mask_changed = trio.Event()
        self._waits = 0
        self._events_received = 0
        self._last_event_time: float | None = None
        self._opens = LastingFailure("event_filter_accepted_again")
        """Waiters that could not be opened (the filter mask refused)."""
        self._waits_failed = LastingFailure("event_waits_answered_again")
        """Waits that failed; one that returns events, or is held :data:`WAIT_HELD_S`, ends
        such a run."""

    @property
    def mask(self) -> int:
        """The union of the subscribers' masks: what the pump waits for."""
        union = 0
        for subscriber in self._subscribers:
            union |= subscriber.mask
        return union

    @contextmanager
    def subscribe(self, name: str, mask: int) -> Iterator[Subscription]:
        """Receive every event bit of ``mask`` inside the block (see :class:`Subscription`).

        Bits the host kept from before (raised while no filter admitted them) come too, so
        a subscriber that reads the host's state at its start tells such an event by that
        state (a RESTORED by the VM session id). Leaving the block ends the subscription and
        shrinks the pump's mask.
        """
        if mask <= 0 or mask & ~VALID_EVENT_MASK:
            msg = f"subscriber {name!r}: event mask {mask:#x} must be within {VALID_EVENT_MASK:#x}"
            raise ValueError(msg)
        subscription = Subscription(name, mask)
        self._change_subscribers(lambda subs: [*subs, subscription])
        try:
            yield subscription
        finally:
            self._change_subscribers(lambda subs: [s for s in subs if s is not subscription])

    def _change_subscribers(
        self, change: Callable[[list[Subscription]], list[Subscription]]
    ) -> None:
        before = self.mask
        self._subscribers = change(self._subscribers)
        if self.mask != before:
            self._mask_changed.set()

    def statistics(self) -> EventPumpStatistics:
        """Return the pump's counters."""
        return EventPumpStatistics(
            mask=self.mask,
            waits=self._waits,
            events_received=self._events_received,
            last_event_time=self._last_event_time,
            subscribers=tuple(s.statistics() for s in self._subscribers),
            failures=self._opens.total + self._waits_failed.total,
        )

    def failing(self) -> str | None:
        """What fails while the pump retries (``event filter refused (VERR_...)``, ``event
        waits failing (malformed reply)``), or None."""
        if (cause := self._opens.cause) is not None:
            return f"event filter refused ({cause})"
        if (cause := self._waits_failed.cause) is not None:
            return f"event waits failing ({cause})"
        return None

    async def drain(self) -> None:
        """Nothing to give back: the waiter's session closed when :meth:`run` ended."""
        await trio.lowlevel.checkpoint()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Wait and dispatch until cancelled; ready once the first waiter (if any) is set up
        or failed (it is then opened again after a back-off)."""
        started = False
        while True:
            mask = self.mask
            self._mask_changed = trio.Event()
            if not mask or self._leaving():
                if not started:
                    task_status.started()
                    started = True
                await self._mask_changed.wait()
                continue
            try:
                async with self._device.open_event_waiter(mask) as waiter:
                    self._opened(mask)
                    if not started:
                        task_status.started()
                        started = True
                    failure = await self._pump(waiter)
            except HOST_ERRORS as exc:
                failure = exc
                if self._opens.host_failed("event_filter_refused", exc, mask=f"{mask:#x}"):
                    self._status_changed()
                retry_s = self._opens.retry_in()
            else:
                if failure is None:
                    continue
                if self._waits_failed.host_failed("event_wait_failed", failure, mask=f"{mask:#x}"):
                    self._status_changed()
                retry_s = self._waits_failed.retry_in()
            if not started:
                task_status.started()
                started = True
            with trio.move_on_after(retry_s):  # or at once for a new mask
                await self._mask_changed.wait()

    def _opened(self, mask: int) -> None:
        """Log the new waiter (at debug while its waits fail: one per retry)."""
        recovered = self._opens.succeeded()
        if self._waits_failed.cause is None:
            log.info("event_waiter_opened", mask=f"{mask:#x}")
        else:
            log.debug("event_waiter_opened", mask=f"{mask:#x}")
        if recovered:
            self._status_changed()

    async def _pump(self, waiter: EventWaiter) -> VBoxStatusError | RemoteProtocolError | None:
        """Dispatch events from ``waiter`` until the mask changes (None) or a wait fails
        (its error)."""
        failure: VBoxStatusError | RemoteProtocolError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._interrupt_on_mask_change, waiter)
            if self._waits_failed.cause is not None:
                nursery.start_soon(self._waits_answered_when_held)
            while True:
                self._waits += 1
                try:
                    events = await waiter.wait()
                except WaiterInterruptedError:
                    break
                except HOST_ERRORS as exc:
                    failure = exc
                    break
                self._waits_answered()
                self._dispatch(events)
                if waiter.interrupted:
                    break
            nursery.cancel_scope.cancel()
        return failure

    async def _waits_answered_when_held(self) -> None:
        """End the run of failed waits once the wait under way is held :data:`WAIT_HELD_S`
        (cancelled with the waiter, so a wait that fails first leaves the run going on)."""
        await trio.sleep(WAIT_HELD_S)
        self._waits_answered()

    def _waits_answered(self) -> None:
        if self._waits_failed.succeeded():
            self._status_changed()

    async def _interrupt_on_mask_change(self, waiter: EventWaiter) -> None:
        await self._mask_changed.wait()
        await waiter.interrupt()

    def _dispatch(self, events: int) -> None:
        self._events_received += 1
        self._last_event_time = trio.current_time()
        log.debug("events_received", mask=f"{events:#x}")
        for subscriber in self._subscribers:
            wanted = events & subscriber.mask
            if wanted:
                subscriber._post(wanted)
