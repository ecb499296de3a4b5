"""Differential: event filters, WAIT_FOR_EVENTS (timeouts, pending events, interruption)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import TIMEOUT_INFINITE, Event, Ioctl, RequestType
from agent.protocol.status import VERR_INVALID_PARAMETER, VERR_NOT_SUPPORTED
from tests.kernel.builders import ioctl, sessions
from tests.kernel.differential import assert_agree, differ

if TYPE_CHECKING:
    from agent.host import DriverSession
    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")


def change_filter(or_mask: int, not_mask: int) -> bytearray:
    """A CHANGE_FILTER_MASK buffer."""
    buf = ioctl(32, 24)
    L.ChangeFilterIoctl.or_mask.set(buf, or_mask)
    L.ChangeFilterIoctl.not_mask.set(buf, not_mask)
    return buf


def wait(events: int, timeout_ms: int) -> bytearray:
    """A WAIT_FOR_EVENTS buffer."""
    buf = ioctl(32, 28)
    L.WaitForEventsIoctl.events_in.set(buf, events)
    L.WaitForEventsIoctl.timeout_ms.set(buf, timeout_ms)
    return buf


async def filter_(
    rig: Rig, label: str, session: DriverSession, or_mask: int, not_mask: int
) -> None:
    """Change a session's filter as a step."""
    await rig.ioctl(label, session, Ioctl.CHANGE_FILTER_MASK, change_filter(or_mask, not_mask))


async def test_filters_of_several_sessions() -> None:
    """Per-bit usage across sessions: the host hears only real changes of the union."""

    async def script(rig: Rig) -> None:
        (_, a), (_, b), (_, c), (_, d) = sessions(rig)
        await filter_(rig, "a +restored", a, Event.RESTORED, 0)
        await filter_(rig, "b +restored", b, Event.RESTORED, 0)
        await filter_(rig, "a -restored", a, 0, Event.RESTORED)
        await filter_(rig, "b -restored", b, 0, Event.RESTORED)
        await filter_(rig, "c +balloon+stats", c, Event.BALLOON_CHANGE_REQUEST | 0x100, 0)
        await filter_(rig, "c same again", c, Event.BALLOON_CHANGE_REQUEST, 0)
        await filter_(rig, "d or and not", d, 0x3, 0x3)
        await filter_(rig, "d fixed bits", d, Event.HGCM | Event.MOUSE_POSITION_CHANGED, 0)
        await filter_(rig, "d clear all", d, 0, 0x7FF)
        await filter_(rig, "bit 11", d, 0x800, 0)
        await filter_(rig, "not bit 31", d, 0, 0x8000_0000)
        await filter_(rig, "all valid", a, 0x7FF, 0)
        rig.note("host filter", rig.host.vmmdev.guest_filter)
        await rig.close("close a", a)
        await rig.close("close c", c)
        rig.note("host filter", rig.host.vmmdev.guest_filter)
        for label, session in sessions(rig):
            await filter_(rig, f"{label} +mouse", session, Event.MOUSE_CAPABILITIES_CHANGED, 0)

    assert_agree(await differ(script))


async def test_filter_change_refused_by_the_host() -> None:
    """A host error on the filter request: errno, rollback, and the next change."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        rig.host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_NOT_SUPPORTED)
        await filter_(rig, "refused", session, Event.RESTORED, 0)
        rig.host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_INVALID_PARAMETER)
        await filter_(rig, "refused otherwise", session, Event.RESTORED, 0)
        await filter_(rig, "again", session, Event.RESTORED, 0)
        await filter_(rig, "remove", session, 0, Event.RESTORED)

    assert_agree(await differ(script))


async def test_waits_with_timeouts_and_pending_events() -> None:
    """Timeouts, an empty mask, events pending before the wait, events outside the mask."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        await filter_(rig, "filter", session, Event.RESTORED | Event.DISPLAY_CHANGE_REQUEST, 0)
        await rig.ioctl("timeout 0", session, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 0))
        await rig.ioctl("timeout 5", session, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 5))
        await rig.ioctl("empty mask", session, Ioctl.WAIT_FOR_EVENTS, wait(0, 5))
        await rig.raise_events("raise restored", Event.RESTORED)
        await rig.ioctl(
            "other mask", session, Ioctl.WAIT_FOR_EVENTS, wait(Event.DISPLAY_CHANGE_REQUEST, 0)
        )
        await rig.ioctl(
            "take it", session, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, TIMEOUT_INFINITE)
        )
        await rig.ioctl("gone", session, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 0))
        await rig.raise_events("raise two", Event.RESTORED | Event.DISPLAY_CHANGE_REQUEST)
        await rig.ioctl("both", session, Ioctl.WAIT_FOR_EVENTS, wait(0x7FF, 0))
        await rig.raise_events("raise unfiltered", Event.VRDP)
        await rig.ioctl("unfiltered", session, Ioctl.WAIT_FOR_EVENTS, wait(Event.VRDP, 0))
        await rig.raise_events("raise kernel's", Event.MOUSE_POSITION_CHANGED)
        await rig.ioctl(
            "kernel's", session, Ioctl.WAIT_FOR_EVENTS, wait(Event.MOUSE_POSITION_CHANGED, 0)
        )
        await rig.ioctl("bit 11", session, Ioctl.WAIT_FOR_EVENTS, wait(0x800, 0))
        await rig.ioctl("short", session, Ioctl.WAIT_FOR_EVENTS, ioctl(28, 28))
        rig.note("pending at host", rig.host.vmmdev.pending_events)

    assert_agree(await differ(script))


async def test_events_go_to_one_waiter() -> None:
    """An event pending for two sessions is consumed by the first that waits."""

    async def script(rig: Rig) -> None:
        a, b = rig.open(), rig.open(uid=1000)
        await filter_(rig, "a", a, Event.RESTORED, 0)
        await filter_(rig, "b", b, Event.RESTORED, 0)
        await rig.raise_events("raise", Event.RESTORED)
        await rig.ioctl("a waits", a, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 0))
        await rig.ioctl("b waits", b, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 0))

    assert_agree(await differ(script))


async def test_interrupt_all() -> None:
    """INTERRUPT_ALL ends a blocked wait and every later one on that session only."""

    async def script(rig: Rig) -> None:
        a, b = rig.open(), rig.open()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                rig.ioctl,
                "blocked",
                a,
                Ioctl.WAIT_FOR_EVENTS,
                wait(Event.RESTORED, TIMEOUT_INFINITE),
            )
            await trio.testing.wait_all_tasks_blocked()
            await rig.ioctl("interrupt", a, Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS, ioctl(24, 24))
        rig.steps[-2:] = sorted(rig.steps[-2:], key=lambda step: step.label)  # concurrent steps
        await rig.ioctl("later wait", a, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 0))
        await rig.ioctl("other session", b, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 0))
        await rig.ioctl("interrupt idle", b, Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS, ioctl(24, 24))
        await rig.ioctl("after idle interrupt", b, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 0))

    assert_agree(await differ(script))


async def test_event_during_a_wait() -> None:
    """An event raised while one waiter blocks wakes it; a second waiter times out."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        await filter_(rig, "filter", session, Event.RESTORED, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                rig.ioctl,
                "blocked",
                session,
                Ioctl.WAIT_FOR_EVENTS,
                wait(Event.RESTORED, TIMEOUT_INFINITE),
            )
            await trio.testing.wait_all_tasks_blocked()
            await rig.raise_events("raise", Event.RESTORED)
        rig.steps[-2:] = sorted(rig.steps[-2:], key=lambda step: step.label)  # concurrent steps
        await rig.ioctl("second", session, Ioctl.WAIT_FOR_EVENTS, wait(Event.RESTORED, 10))

    assert_agree(await differ(script))
