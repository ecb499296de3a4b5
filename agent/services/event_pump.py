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
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.device import WaiterInterruptedError
from agent.protocol import VALID_EVENT_MASK
from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from agent.device import Device, EventWaiter

log = structlog.get_logger(__name__)


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
    """Counters of the pump; ``last_event_time`` is trio time, or None before any event."""

    mask: int
    waits: int
    events_received: int
    last_event_time: float | None
    subscribers: tuple[SubscriberStatistics, ...]


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

    def __init__(self, device: Device, *, leaving: Callable[[], bool] = lambda: False) -> None:
        """Create the pump on ``device``; ``leaving()`` tells whether the agent is leaving,
        after which no waiter is opened."""
        self._device = device
        self._leaving = leaving
        self._subscribers: list[Subscription] = []
        self._mask_changed = trio.Event()
        self._waits = 0
        self._events_received = 0
        self._last_event_time: float | None = None

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

        Leaving the block ends the subscription and shrinks the pump's mask.
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
        )

    async def drain(self) -> None:
        """Nothing to give back: the waiter's session closed when :meth:`run` ended."""
        await trio.lowlevel.checkpoint()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Wait and dispatch until cancelled; ready once the first waiter (if any) is set up."""
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
            async with self._device.open_event_waiter(mask) as waiter:
                log.info("event_waiter_opened", mask=f"{mask:#x}")
                if not started:
                    task_status.started()
                    started = True
                await self._pump(waiter)

    async def _pump(self, waiter: EventWaiter) -> None:
        """Dispatch events from ``waiter`` until the mask changes."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._interrupt_on_mask_change, waiter)
            while True:
                self._waits += 1
                try:
                    events = await waiter.wait()
                except WaiterInterruptedError:
                    break
                self._dispatch(events)
                if waiter.interrupted:
                    break
            nursery.cancel_scope.cancel()

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
