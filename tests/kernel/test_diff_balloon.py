"""Differential: the kernel's balloon (driven by event 0x40) and CHECK_BALLOON."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import Event, Ioctl, RequestType
from agent.protocol.status import VERR_NO_MEMORY, VERR_NOT_SUPPORTED
from tests.kernel.builders import ioctl, sessions
from tests.kernel.differential import assert_agree, differ

if TYPE_CHECKING:
    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")


async def balloon(rig: Rig, label: str, mb: int, *, chunks: int, changes: int) -> None:
    """Set the host's target; wait until the driver holds ``chunks`` after ``changes``
    CHANGE_MEMBALLOON requests in all, then record the step."""
    step = rig.begin(label)
    rig.host.set_balloon_target(mb)
    counts = rig.host.vmmdev.request_counts
    await rig.settle(
        lambda: (
            rig.host.driver.balloon_chunks == chunks
            and counts[RequestType.CHANGE_MEMBALLOON] == changes
            and rig.host.vmmdev.balloon.acked_mb == mb
        )
    )
    rig.finish(step)
    rig.note(f"{label}: host chunks", rig.host.vmmdev.balloon.chunks)


def filter_balloon(or_mask: int, not_mask: int) -> bytearray:
    """CHANGE_FILTER_MASK for the balloon event."""
    buf = ioctl(32, 24)
    L.ChangeFilterIoctl.or_mask.set(buf, or_mask)
    L.ChangeFilterIoctl.not_mask.set(buf, not_mask)
    return buf


async def test_balloon_follows_the_host_while_filtered() -> None:
    """With 0x40 filtered the kernel inflates and deflates chunk by chunk; CHECK_BALLOON."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        await rig.ioctl("check", session, Ioctl.CHECK_BALLOON, ioctl(24, 32))
        await rig.ioctl(
            "filter 0x40",
            session,
            Ioctl.CHANGE_FILTER_MASK,
            filter_balloon(Event.BALLOON_CHANGE_REQUEST, 0),
        )
        await balloon(rig, "inflate 5", 5, chunks=5, changes=5)
        await balloon(rig, "deflate to 2", 2, chunks=2, changes=8)
        for label, each in sessions(rig):
            await rig.ioctl(f"check {label}", each, Ioctl.CHECK_BALLOON, ioctl(24, 32))
        await rig.ioctl("check sizes", session, Ioctl.CHECK_BALLOON, ioctl(24, 24))
        await balloon(rig, "deflate all", 0, chunks=0, changes=10)

    assert_agree(await differ(script))


async def test_balloon_errors_stop_the_work() -> None:
    """A refused chunk stops the work item; the next event resumes it."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        await rig.ioctl(
            "filter 0x40",
            session,
            Ioctl.CHANGE_FILTER_MASK,
            filter_balloon(Event.BALLOON_CHANGE_REQUEST, 0),
        )
        rig.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
        await balloon(rig, "first chunk refused", 3, chunks=0, changes=1)
        await balloon(rig, "again", 4, chunks=4, changes=5)
        rig.host.add_fault(RequestType.GET_MEMBALLOON_CHANGE_REQ, VERR_NOT_SUPPORTED)
        step = rig.begin("query refused")
        rig.host.set_balloon_target(1)
        await rig.settle(
            lambda: rig.host.vmmdev.request_counts[RequestType.GET_MEMBALLOON_CHANGE_REQ] == 3
        )
        rig.finish(step)
        rig.note("chunks", rig.host.driver.balloon_chunks)

    assert_agree(await differ(script))


async def test_no_balloon_without_the_filter() -> None:
    """Without a session filtering 0x40 the host's request never reaches the kernel."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        step = rig.begin("target without filter")
        rig.host.set_balloon_target(3)
        rig.finish(step)
        rig.note("pending at host", rig.host.vmmdev.pending_events)
        await rig.ioctl(
            "filter 0x40 delivers it",
            session,
            Ioctl.CHANGE_FILTER_MASK,
            filter_balloon(Event.BALLOON_CHANGE_REQUEST, 0),
            until=lambda: rig.host.driver.balloon_chunks == 3,
        )
        await rig.close("close: the filter goes, the balloon stays", session)
        rig.note("chunks", rig.host.driver.balloon_chunks)

    assert_agree(await differ(script))
