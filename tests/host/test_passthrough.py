"""Tests of the passthrough driver personality: trusted userspace owns balloon and heartbeat.

Rules of this test module:

- A running ``SimulatedHost(personality="passthrough")`` (fixture ``host``), driven through
  ``SimTransport`` with the protocol's VMMDev request messages.
- Timing uses ``autojump_clock`` with exact virtual times.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from agent.protocol import (
    ChangeFilterMask,
    ChangeMemBalloon,
    CheckBalloon,
    ChunkPages,
    GetMemBalloonChangeRequest,
    GuestHeartbeat,
    HeartbeatConfigure,
    VBoxStatusError,
    WaitForEvents,
)
from agent.protocol.constants import Event
from agent.protocol.status import VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH
from tests.host.conftest import open_client

if TYPE_CHECKING:
    from agent.host import SimulatedHost

PERSONALITY: Final = "passthrough"
BASE: Final = 0x1_8000_0000


def pages(index: int) -> ChunkPages:
    """256 distinct page addresses for chunk ``index``."""
    start = BASE + index * (1 << 20)
    return ChunkPages.of(range(start, start + (1 << 20), 4096))


class TestPassthrough:
    """Balloon and heartbeat requests from trusted userspace."""

    @pytest.mark.parametrize(
        "message",
        [
            GetMemBalloonChangeRequest(),
            ChangeMemBalloon(True, pages(0)),
            HeartbeatConfigure(True),
            GuestHeartbeat(),
        ],
        ids=["111", "113", "220", "219"],
    )
    async def test_vboxuser_is_refused(self, host: SimulatedHost, message: object) -> None:
        """/dev/vboxuser sessions get EPERM for the delegated requests."""
        client = await open_client(host, user_device=True, uid=1000)
        with pytest.raises(OSError, match=r".") as info:
            await client.request(message)  # type: ignore[arg-type]
        assert info.value.errno == errno.EPERM

    async def test_agent_owns_the_balloon(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """The agent sees 0x40, reads the target and moves chunks itself; the host's own
        answers reach it (one vCPU: a chunk inflated twice is refused by GMM's count)."""
        host.vmmdev.balloon.cpus = 1
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.BALLOON_CHANGE_REQUEST, 0))
        host.set_balloon_target(2)
        with trio.fail_after(60):
            events = await client.request(WaitForEvents(Event.BALLOON_CHANGE_REQUEST))
        assert events.mask == Event.BALLOON_CHANGE_REQUEST
        target = await client.request(GetMemBalloonChangeRequest())
        assert (target.chunks, target.phys_mem_chunks) == (2, 2048)
        for index in range(target.chunks):
            await client.request(ChangeMemBalloon(True, pages(index)))
        assert host.vmmdev.balloon.chunks == 2
        with pytest.raises(VBoxStatusError) as info:
            await client.request(ChangeMemBalloon(True, pages(0)))
        assert info.value.rc == VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH
        await client.request(ChangeMemBalloon(False, pages(1)))
        assert (host.vmmdev.balloon.chunks, host.vmmdev.balloon.pages) == (1, 256)
        assert (
            (status := await client.request(CheckBalloon())).chunks,
            status.handle_in_r3,
        ) == (0, False)

    async def test_driver_leaves_the_heartbeat_alone(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """No driver beats; the agent configures the check and the host flat-lines it."""
        await trio.sleep(10)
        assert (host.vmmdev.heartbeat.active, host.vmmdev.heartbeat.beats) == (False, 0)
        client = await open_client(host)
        settings = await client.request(HeartbeatConfigure(True))
        assert settings.interval_ns == 2_000_000_000
        await trio.sleep(1)
        await client.request(GuestHeartbeat())
        await trio.sleep(4)
        await trio.testing.wait_all_tasks_blocked()
        heartbeat = host.vmmdev.heartbeat
        assert (heartbeat.flatlined, heartbeat.beats, heartbeat.flatline_count) == (True, 1, 1)
        await client.request(GuestHeartbeat())
        assert not heartbeat.flatlined

    async def test_kernel_does_not_balloon(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """With only a filter set, nothing is ballooned: the request waits for the agent."""
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.BALLOON_CHANGE_REQUEST, 0))
        host.set_balloon_target(5)
        await trio.sleep(5)
        assert host.vmmdev.balloon.chunks == 0
        events = await client.request(WaitForEvents(Event.BALLOON_CHANGE_REQUEST, timeout_ms=0))
        assert events.mask == Event.BALLOON_CHANGE_REQUEST
        assert (await client.request(GetMemBalloonChangeRequest())).chunks == 5
