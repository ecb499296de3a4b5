"""Tests of the Oracle driver personality: the session-owned, ring-3 balloon.

Rules of this test module:

- A running ``SimulatedHost(personality="oracle")`` (fixture ``host``), driven through
  ``SimTransport`` with encoded ``agent.protocol`` requests.
- Balloon chunks are plain user addresses: the simulated driver "locks" them by giving the
  host distinct guest pages of its own.
- Timing uses ``autojump_clock`` where the host must act in the background.
"""

from __future__ import annotations

import errno
from typing import Final

import pytest
import trio
import trio.testing

from agent.host import SimulatedHost
from agent.protocol import (
    ChangeBalloon,
    ChangeFilterMask,
    CheckBalloon,
    VBoxStatusError,
    WaitForEvents,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import Event, Ioctl, RequestType
from agent.protocol.status import (
    VERR_ALREADY_EXISTS,
    VERR_INVALID_PARAMETER,
    VERR_NOT_FOUND,
    VERR_NOT_SUPPORTED,
    VERR_PERMISSION_DENIED,
)
from tests.host.conftest import open_client

PERSONALITY: Final = "oracle"
CHUNK: Final = 0x7F00_1000_0000
MIB: Final = 1 << 20


async def status_of(coro: object) -> int:
    """Await a request expected to fail with a VBox status and return it."""
    with pytest.raises(VBoxStatusError) as info:
        await coro  # type: ignore[misc]
    return info.value.rc


class TestOracleBalloon:
    """CHECK_BALLOON ownership and CHANGE_BALLOON."""

    async def test_check_makes_the_owner(self, host: SimulatedHost) -> None:
        """The first caller owns the balloon; others get VERR_PERMISSION_DENIED."""
        owner, other = await open_client(host), await open_client(host)
        host.set_balloon_target(3)
        status = await owner.request(CheckBalloon())
        assert (status.chunks, status.handle_in_r3) == (3, True)
        assert host.vmmdev.balloon.acked_mb == 3
        assert await status_of(other.request(CheckBalloon())) == VERR_PERMISSION_DENIED
        assert await status_of(other.request(ChangeBalloon(CHUNK, True))) == VERR_PERMISSION_DENIED

    async def test_inflate_and_deflate(self, host: SimulatedHost) -> None:
        """Chunks go to the host as 256 distinct pages; repeats and unknowns are refused."""
        client = await open_client(host)
        host.set_balloon_target(2)
        await client.request(CheckBalloon())
        await client.request(ChangeBalloon(CHUNK, True))
        await client.request(ChangeBalloon(CHUNK + MIB, True))
        assert (host.vmmdev.balloon.chunks, len(host.vmmdev.balloon.pages)) == (2, 512)
        assert await status_of(client.request(ChangeBalloon(CHUNK, True))) == VERR_ALREADY_EXISTS
        await client.request(ChangeBalloon(CHUNK, False))
        assert await status_of(client.request(ChangeBalloon(CHUNK, False))) == VERR_NOT_FOUND
        assert host.vmmdev.balloon.chunks == 1

    async def test_change_needs_a_prior_check(self, host: SimulatedHost) -> None:
        """Without CHECK_BALLOON the maximum is unknown: VERR_INVALID_PARAMETER."""
        client = await open_client(host)
        assert await status_of(client.request(ChangeBalloon(CHUNK, True))) == VERR_INVALID_PARAMETER

    async def test_balloon_cannot_outgrow_guest_ram(self) -> None:
        """Inflating past the RAM's chunk count is VERR_INVALID_PARAMETER."""
        host = SimulatedHost(personality=PERSONALITY, ram_mb=4)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                client = await open_client(host)
                await client.request(CheckBalloon())
                for index in range(4):
                    await client.request(ChangeBalloon(CHUNK + index * MIB, True))
                assert (
                    await status_of(client.request(ChangeBalloon(CHUNK + 4 * MIB, True)))
                    == VERR_INVALID_PARAMETER
                )
                nursery.cancel_scope.cancel()

    async def test_padding_must_be_zero(self, host: SimulatedHost) -> None:
        """Non-zero padding is VERR_INVALID_PARAMETER; wrong sizes are EINVAL."""
        client = await open_client(host)
        await client.request(CheckBalloon())
        call = ChangeBalloon(CHUNK, True).encode()
        call.buffer[33] = 1
        await client.raw(call.code, call.buffer)
        assert L.IoctlHeader.rc.get(call.buffer) == VERR_INVALID_PARAMETER
        call = ChangeBalloon(CHUNK, True).encode()
        L.IoctlHeader.size_out.set(call.buffer, 40)
        with pytest.raises(OSError, match=r".") as info:
            await client.raw(Ioctl.CHANGE_BALLOON, call.buffer)
        assert info.value.errno == errno.EINVAL

    async def test_host_failure_is_reported(self, host: SimulatedHost) -> None:
        """A host refusing the chunk returns its status; nothing is kept."""
        client = await open_client(host)
        await client.request(CheckBalloon())
        host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NOT_SUPPORTED)
        assert await status_of(client.request(ChangeBalloon(CHUNK, True))) == VERR_NOT_SUPPORTED
        assert host.driver.balloon_chunks == 0

    async def test_owner_close_deflates(self, host: SimulatedHost) -> None:
        """Closing the owner deflates every chunk and frees the balloon for others."""
        owner = await open_client(host)
        await owner.request(CheckBalloon())
        for index in range(3):
            await owner.request(ChangeBalloon(CHUNK + index * MIB, True))
        await owner.transport.aclose()
        assert host.vmmdev.balloon.chunks == 0
        other = await open_client(host)
        assert (await other.request(CheckBalloon())).handle_in_r3

    async def test_balloon_event_reaches_userspace(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """BALLOON_CHANGE_REQUEST is delivered to waiters (the agent reacts to it)."""
        client = await open_client(host)
        await client.request(ChangeFilterMask(Event.BALLOON_CHANGE_REQUEST, 0))
        host.set_balloon_target(1)
        with trio.fail_after(60):
            reply = await client.request(WaitForEvents(Event.BALLOON_CHANGE_REQUEST))
        assert reply.mask == Event.BALLOON_CHANGE_REQUEST
        await trio.testing.wait_all_tasks_blocked()
        assert host.vmmdev.balloon.chunks == 0

    async def test_driver_keeps_the_heartbeat(
        self, host: SimulatedHost, autojump_clock: object
    ) -> None:
        """The Oracle driver beats by itself."""
        await trio.sleep(4.5)
        assert host.vmmdev.heartbeat.beats == 3
