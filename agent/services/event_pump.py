"""``EventPump``: the one task that waits for host events and fans them out.

Subscribers get a bounded memory channel each, for as long as their
``with pump.subscribe(name, mask) as events:`` block lasts. The union of
their masks is the pump's wait mask, and so the filter mask of the pump's device session:
the host is asked for exactly the events somebody listens to. The pump never blocks on a
subscriber: a full channel drops the event for that subscriber, counts it and logs it.

While the host is silent the pump sleeps in the driver (no timeout, no polling). When the
mask changes it interrupts its waiter and opens a new session with the new mask; events
raised in between stay pending at the host and the driver, so nothing is lost.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.device import WaiterInterruptedError
from agent.protocol import VALID_EVENT_MASK

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from agent.device import Device, EventWaiter

log = structlog.get_logger(__name__)

DEFAULT_QUEUE_SIZE: Final = 16
"""Events a subscriber may have unread before further ones are dropped for it."""


@dataclass(frozen=True, slots=True)
class SubscriberStatistics:
    """Counters of one subscription."""

    name: str
    mask: int
    delivered: int
    dropped: int


@dataclass(frozen=True, slots=True)
class EventPumpStatistics:
    """Counters of the pump; ``last_event_time`` is trio time, or None before any event."""

    mask: int
    waits: int
    events_received: int
    last_event_time: float | None
    subscribers: tuple[SubscriberStatistics, ...]


class _Subscriber:
    __slots__ = ("delivered", "dropped", "mask", "name", "send")

    def __init__(self, name: str, mask: int, send: trio.MemorySendChannel[int]) -> None:
        self.name = name
        self.mask = mask
        self.send = send
        self.delivered = 0
        self.dropped = 0


@final
class EventPump:
    """Waits for host events on its own session and fans them out to subscribers."""

    name: Final = "event-pump"

    def __init__(self, device: Device, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._device = device
        self.queue_size = queue_size
        self._subscribers: list[_Subscriber] = []
        self._mask_changed = trio.Event()
        self._waits = 0
        self._events_received = 0
        self._last_event_time: float | None = None

    @property
    def queue_size(self) -> int:
        """Channel capacity of subscriptions made from now on."""
        return self._queue_size

    @queue_size.setter
    def queue_size(self, value: int) -> None:
        if value < 1:
            msg = f"queue_size must be at least 1, got {value}"
            raise ValueError(msg)
        self._queue_size = value

    @property
    def mask(self) -> int:
        """The union of the subscribers' masks: what the pump waits for."""
        union = 0
        for subscriber in self._subscribers:
            union |= subscriber.mask
        return union

    @contextmanager
    def subscribe(self, name: str, mask: int) -> Iterator[trio.MemoryReceiveChannel[int]]:
        """Receive every event of ``mask`` (each item: the event bits) inside the block.

        Leaving the block ends the subscription and shrinks the pump's mask.
        """
        if mask <= 0 or mask & ~VALID_EVENT_MASK:
            msg = f"subscriber {name!r}: event mask {mask:#x} must be within {VALID_EVENT_MASK:#x}"
            raise ValueError(msg)
        send, receive = trio.open_memory_channel[int](self.queue_size)
        subscriber = _Subscriber(name, mask, send)
        self._change_subscribers(lambda subs: [*subs, subscriber])
        try:
            with send, receive:
                yield receive
        finally:
            self._change_subscribers(lambda subs: [s for s in subs if s is not subscriber])

    def _change_subscribers(self, change: Callable[[list[_Subscriber]], list[_Subscriber]]) -> None:
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
            subscribers=tuple(
                SubscriberStatistics(s.name, s.mask, s.delivered, s.dropped)
                for s in self._subscribers
            ),
        )

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Wait and dispatch until cancelled; ready once the first waiter (if any) is set up."""
        structlog.contextvars.bind_contextvars(service=self.name)
        started = False
        while True:
            mask = self.mask
            self._mask_changed = trio.Event()
            if not mask:
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
            if not wanted:
                continue
            try:
                subscriber.send.send_nowait(wanted)
            except trio.WouldBlock:
                subscriber.dropped += 1
                log.warning(
                    "event_dropped",
                    subscriber=subscriber.name,
                    mask=f"{wanted:#x}",
                    dropped=subscriber.dropped,
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The subscriber stopped reading; its block's exit unsubscribes it.
                subscriber.dropped += 1
            else:
                subscriber.delivered += 1
