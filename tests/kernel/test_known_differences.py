"""The documented differences between the simulated ``mainline`` and the real driver.

Each test pins one difference (``docs/personalities.md``, "Known differences"), so that a
change on either side shows up here instead of slipping through.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Final

import pytest
import trio

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import Ioctl
from tests.kernel.builders import ioctl
from tests.kernel.differential import differ, running

if TYPE_CHECKING:
    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")

TICK_BEATS: Final = 10
"""Heartbeats the real driver sends long before the host's first interval (2 s) ends."""
WITHIN_S: Final = 1.0


async def test_real_driver_beats_on_every_tick() -> None:
    """The real 6.12 driver re-arms its heartbeat timer with a relative expiry used as an
    absolute one, so it beats on every tick; the model beats once per host interval."""
    async with running("kernel") as rig:
        with trio.fail_after(WITHIN_S):
            await rig.settle(lambda: rig.host.vmmdev.heartbeat.beats >= TICK_BEATS)
    async with running("mainline") as rig:
        assert rig.host.vmmdev.heartbeat.beats == 1


async def test_only_the_real_driver_serves_32_bit_hgcm_calls() -> None:
    """Debian's kernel (CONFIG_COMPAT) serves HGCM_CALL_32 to 64-bit callers; the model, whose
    users never send it, answers ENOTTY. Here: no such client, so the real one says EINVAL."""

    async def script(rig: Rig) -> None:
        buf = ioctl(40, 40)
        L.HgcmCallIoctl.client_id.set(buf, 1)
        await rig.ioctl("32-bit call", rig.open(), Ioctl.hgcm_call_32(40), buf)

    results = await differ(script)
    assert results["mainline"][-1].errno == errno.ENOTTY
    assert results["kernel"][-1].errno == errno.EINVAL
