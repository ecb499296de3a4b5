"""Differential: guest capabilities, set mode and acquire mode, across sessions and closes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import Event, Ioctl, RequestType
from agent.protocol.status import VERR_NOT_SUPPORTED
from tests.kernel.builders import ioctl, sessions
from tests.kernel.differential import assert_agree, differ

if TYPE_CHECKING:
    from agent.host import DriverSession
    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")

CONFIG: int = 0x1
SEAMLESS, WINDOWS, GRAPHICS = 0x1, 0x2, 0x4


async def change(rig: Rig, label: str, session: DriverSession, or_mask: int, not_mask: int) -> None:
    """CHANGE_GUEST_CAPABILITIES as a step."""
    buf = ioctl(32, 32)
    L.SetGuestCapsIoctl.or_mask.set(buf, or_mask)
    L.SetGuestCapsIoctl.not_mask.set(buf, not_mask)
    await rig.ioctl(label, session, Ioctl.CHANGE_GUEST_CAPABILITIES, buf)


async def acquire(
    rig: Rig, label: str, session: DriverSession, or_mask: int, not_mask: int, *, flags: int = 0
) -> None:
    """ACQUIRE_GUEST_CAPABILITIES as a step."""
    buf = ioctl(36, 24)
    L.AcquireGuestCapsIoctl.flags.set(buf, flags)
    L.AcquireGuestCapsIoctl.or_mask.set(buf, or_mask)
    L.AcquireGuestCapsIoctl.not_mask.set(buf, not_mask)
    await rig.ioctl(label, session, Ioctl.ACQUIRE_GUEST_CAPABILITIES, buf)


async def test_set_mode() -> None:
    """Set-mode capabilities: per-bit usage, invalid bits, closes, a host refusal."""

    async def script(rig: Rig) -> None:
        (_, a), (_, b), (_, c), (_, d) = sessions(rig)
        await change(rig, "a graphics", a, GRAPHICS, 0)
        await change(rig, "b graphics+windows", b, GRAPHICS | WINDOWS, 0)
        await change(rig, "c nothing", c, 0, 0)
        await change(rig, "d all, not all", d, 0x7, 0x7)
        await change(rig, "a invalid bit", a, 0x8, 0)
        await change(rig, "a invalid not bit", a, 0, 0x100)
        await change(rig, "a drop graphics", a, 0, GRAPHICS)
        rig.host.add_fault(RequestType.SET_GUEST_CAPABILITIES, VERR_NOT_SUPPORTED)
        await change(rig, "c refused", c, SEAMLESS, 0)
        await change(rig, "c again", c, SEAMLESS, 0)
        rig.note("host caps", rig.host.vmmdev.guest.capabilities)
        await rig.close("close b", b)
        await rig.close("close c", c)
        rig.note("host caps", rig.host.vmmdev.guest.capabilities)

    assert_agree(await differ(script))


async def test_acquire_mode() -> None:
    """Acquire mode: configuring, taking, conflicts with set mode and other sessions."""

    async def script(rig: Rig) -> None:
        (_, a), (_, b), (_, c), (_, d) = sessions(rig)
        await acquire(rig, "a config seamless", a, SEAMLESS, 0, flags=CONFIG)
        await acquire(rig, "a bad flags", a, SEAMLESS, 0, flags=0x2)
        await acquire(rig, "a bad bits", a, 0x10, 0)
        await change(rig, "b set seamless (acquire mode)", b, SEAMLESS, 0)
        await change(rig, "b set graphics", b, GRAPHICS, 0)
        await acquire(rig, "c graphics (set mode)", c, GRAPHICS, 0)
        await acquire(rig, "a take seamless", a, SEAMLESS, 0)
        await acquire(rig, "d take seamless too", d, SEAMLESS, 0)
        await acquire(rig, "a take again", a, SEAMLESS, 0)
        await acquire(rig, "a take windows (not configured)", a, WINDOWS, 0)
        rig.note("host caps", rig.host.vmmdev.guest.capabilities)
        await acquire(rig, "a drop seamless", a, 0, SEAMLESS)
        await acquire(rig, "d take seamless", d, SEAMLESS, 0)
        await rig.ioctl(
            "d seamless event", d, Ioctl.WAIT_FOR_EVENTS, _wait(Event.SEAMLESS_MODE_CHANGE_REQUEST)
        )
        await rig.close("close d", d)
        rig.note("host caps", rig.host.vmmdev.guest.capabilities)
        await acquire(rig, "a take after close", a, SEAMLESS, 0)
        await rig.close("close a", a)
        await acquire(rig, "b config after", b, WINDOWS, 0, flags=CONFIG)

    assert_agree(await differ(script))


async def test_changes_of_nothing_after_a_refused_report() -> None:
    """A refused report leaves the host's capabilities unknown; an ACQUIRE or a
    CHANGE_GUEST_CAPABILITIES that adds and removes nothing reports nothing all the same
    (``vbg_acquire_session_capabilities`` and ``vbg_set_session_capabilities`` return
    before ``vbg_set_host_capabilities``): the next real change reports them (Oracle's
    acquire reports them at once: ``tests/host/test_oracle.py``)."""

    async def script(rig: Rig) -> None:
        (_, a), (_, b), *_ = sessions(rig)
        await change(rig, "a graphics", a, GRAPHICS, 0)
        rig.host.add_fault(RequestType.SET_GUEST_CAPABILITIES, VERR_NOT_SUPPORTED)
        await change(rig, "a refused", a, SEAMLESS, 0)
        await acquire(rig, "b acquires nothing", b, 0, 0)
        await acquire(rig, "b drops what it lacks", b, 0, WINDOWS)
        await change(rig, "a changes nothing", a, GRAPHICS, 0)
        rig.note("host caps", rig.host.vmmdev.guest.capabilities)
        await change(rig, "b windows", b, WINDOWS, 0)
        rig.note("host caps", rig.host.vmmdev.guest.capabilities)

    results = await differ(script)
    assert_agree(results)
    quiet = ("b acquires nothing", "b drops what it lacks", "a changes nothing")
    assert [step.requests for step in results["kernel"] if step.label in quiet] == [()] * 3


def _wait(events: int) -> bytearray:
    buf = ioctl(32, 28)
    L.WaitForEventsIoctl.events_in.set(buf, events)
    L.WaitForEventsIoctl.timeout_ms.set(buf, 0)
    return buf
