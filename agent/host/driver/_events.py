"""Event ioctls: WAIT_FOR_EVENTS, INTERRUPT_ALL_WAIT_FOR_EVENTS, CHANGE_FILTER_MASK.

Pending events are device-global: the first waiter (in any session) whose mask matches
consumes them. A session's filter only decides what the host is asked to deliver.
"""

from __future__ import annotations

import errno
import math
from typing import TYPE_CHECKING, Final

import trio

from agent.host.driver._util import U32_MAX, check_sizes, fail, fail_status
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    HEADER_SIZE,
    REQUESTOR_KERNEL,
    TIMEOUT_INFINITE,
    VALID_EVENT_MASK,
    Event,
    GuestCapability,
    RequestType,
)
from agent.units import MS_PER_S

if TYPE_CHECKING:
    from agent.host.driver._core import Driver
    from agent.host.driver._session import DriverSession
    from agent.host.memory import GuestMemory

_ACQUIRE_GATED: Final = (
    (GuestCapability.GRAPHICS, Event.DISPLAY_CHANGE_REQUEST),
    (GuestCapability.SEAMLESS, Event.SEAMLESS_MODE_CHANGE_REQUEST),
)
"""A capability in acquire mode hides its event from sessions that did not acquire it."""


def allowed_events(drv: Driver, session: DriverSession) -> int:
    """Return the events ``session`` may consume (``vbg_get_allowed_event_mask_for_session``)."""
    allowed = VALID_EVENT_MASK
    for cap, event in _ACQUIRE_GATED:
        if drv.acquire_mode_caps & cap and not session.acquired_guest_caps & cap:
            allowed &= ~event
    return allowed


async def wait_for_events(
    drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> None:
    """Block until an event of the mask is pending (ETIMEDOUT, EINTR if interrupted)."""
    del memory
    layout = L.WaitForEventsIoctl
    check_sizes(kbuf, layout.size, layout.events_out.end)
    timeout_ms = layout.timeout_ms.get(kbuf)
    mask = layout.events_in.get(kbuf)
    layout.events_out.set(kbuf, 0)
    deadline = (
        math.inf if timeout_ms == TIMEOUT_INFINITE else trio.current_time() + timeout_ms / MS_PER_S
    )
    while not (session.cancel_waiters or drv.pending_events & mask & allowed_events(drv, session)):
        if trio.current_time() >= deadline:
            raise fail(errno.ETIMEDOUT)
        with trio.move_on_at(deadline):
            await drv.event_wq.park()
    if session.lost:
        raise fail(errno.ENODEV)
    if session.cancel_waiters:
        raise fail(errno.EINTR)
    events = drv.pending_events & mask & allowed_events(drv, session)
    drv.pending_events &= ~events
    layout.events_out.set(kbuf, events)


async def interrupt_all(
    drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> None:
    """End every wait of this session, now and for the rest of its life."""
    del memory
    check_sizes(kbuf, HEADER_SIZE, HEADER_SIZE)
    session.cancel_waiters = True
    drv.event_wq.unpark_all()
    await trio.lowlevel.checkpoint()


async def change_filter_mask(
    drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> None:
    """Add and remove events this session asks the host for."""
    del memory
    layout = L.ChangeFilterIoctl
    check_sizes(kbuf, layout.size, HEADER_SIZE)
    or_mask, not_mask = layout.or_mask.get(kbuf), layout.not_mask.get(kbuf)
    if (or_mask | not_mask) & ~VALID_EVENT_MASK:
        raise fail(errno.EINVAL)
    await set_session_event_filter(drv, session, or_mask, not_mask, termination=False)


async def set_session_event_filter(
    drv: Driver, session: DriverSession, or_mask: int, not_mask: int, *, termination: bool
) -> None:
    """``vbg_set_session_event_filter``: refcount per bit, tell the host the union.

    Raises:
        OSError: the host refused the new mask (the session's change is rolled back, except
            at termination).
    """
    async with drv.session_mutex:
        previous = session.event_filter
        wanted = (previous | or_mask) & ~not_mask & U32_MAX
        changed = previous ^ wanted
        if not changed:
            return
        drv.filter_tracker.update(changed, previous)
        session.event_filter = wanted
        host_mask = drv.fixed_events | drv.filter_tracker.mask
        if host_mask == drv.event_filter_host:
            return
        req = drv.mask_request(
            RequestType.CTL_GUEST_FILTER_MASK,
            host_mask,
            session.requestor if drv.filter_as_session and not termination else REQUESTOR_KERNEL,
        )
        rc = await drv.perform(req)
        if rc >= 0:
            drv.event_filter_host = host_mask
            return
        drv.event_filter_host = U32_MAX
        if not termination:
            drv.filter_tracker.update(changed, wanted)
            session.event_filter = previous
        raise fail_status(rc)
