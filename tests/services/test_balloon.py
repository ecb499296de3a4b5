"""The balloon service against the in-process simulated host, in every driver's mode.

Virtual time (``autojump_clock``) drives every wait; each test is bounded by
``trio.fail_after`` on that clock. Waits for the host's state poll it on that clock.
"""

from __future__ import annotations

import pytest
import trio

from agent.host import SimulatedHost
from agent.protocol import RequestType
from agent.protocol.status import VERR_NO_MEMORY
from agent.services.balloon import BalloonMode, BalloonSection
from tests.services.balloon_support import ScriptedPressure, SimChunks, running_balloon

WALKING = [("oracle-r3", BalloonMode.ALLOCATED), ("passthrough", BalloonMode.OWNED)]


def _host(kind: str) -> SimulatedHost:
    if kind == "oracle-r3":
        return SimulatedHost(personality="oracle", r3_balloon=True)
    return SimulatedHost(personality=kind)


class TestModes:
    """The mode comes from the driver's answers."""

    @pytest.mark.parametrize(
        ("kind", "mode"),
        [
            ("mainline", BalloonMode.KERNEL),
            ("oracle", BalloonMode.TRIGGERED),
            ("oracle-r3", BalloonMode.ALLOCATED),
            ("passthrough", BalloonMode.OWNED),
        ],
    )
    async def test_mode_from_driver(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind)) as run:
                assert run.service.mode is mode


class TestFollowsTarget:
    """`host balloon N` moves the host's chunk count to N, in every mode."""

    @pytest.mark.parametrize("kind", ["mainline", "oracle", "oracle-r3", "passthrough"])
    async def test_inflate_then_deflate(self, autojump_clock: trio.abc.Clock, kind: str) -> None:
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind)) as run:
                run.host.set_balloon_target(64)
                await run.settle(64)
                run.host.set_balloon_target(16)
                await run.settle(16)
                run.service.status()  # in kernel mode this asks the driver for the size
                await run.until(lambda: run.service.statistics().chunks == 16)
                assert "16" in run.service.status()

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_new_target_redirects_a_walk(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """A target arriving mid-walk turns the walk around at once."""
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind)) as run:
                walker = run.service.walker
                assert walker is not None
                run.host.set_delay(RequestType.CHANGE_MEMBALLOON, 0.01)
                run.host.set_balloon_target(200)
                await run.until(lambda: run.host_chunks >= 10)
                run.host.set_balloon_target(5)
                await run.settle(5)
                assert walker.inflated < 200

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_stop_gives_every_chunk_back(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        chunks = SimChunks()
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind), allocator=chunks) as run:
                run.host.set_balloon_target(32)
                await run.settle(32)
            assert run.host_chunks == 0
        assert not chunks.live

    async def test_oracle_session_close_deflates_kernel_chunks(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        with trio.fail_after(60):
            async with running_balloon(personality="oracle") as run:
                run.host.set_balloon_target(32)
                await run.settle(32)
            assert run.host_chunks == 0


class TestFailures:
    """A failed step stops the walk; the target is reached later."""

    @pytest.mark.parametrize("kind", ["oracle", "oracle-r3", "passthrough"])
    async def test_host_fault_on_chunk_n(self, autojump_clock: trio.abc.Clock, kind: str) -> None:
        with trio.fail_after(120):
            async with running_balloon(personality="", host=_host(kind)) as run:
                run.host.set_balloon_target(10)
                await run.settle(10)
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
                run.host.set_balloon_target(64)
                await run.until(lambda: run.service.statistics().failures == 1)
                assert run.host_chunks == 10
                await run.settle(64)

    async def test_mainline_kernel_stops_and_needs_a_new_target(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The in-tree kernel stops at the failure and only walks again at the next 0x40."""
        with trio.fail_after(120):
            async with running_balloon(personality="mainline") as run:
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
                run.host.set_balloon_target(64)
                await trio.sleep(30)
                assert run.host_chunks == 0
                run.host.set_balloon_target(65)
                await run.settle(65)

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_allocation_failure_is_retried(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        chunks = SimChunks()
        with trio.fail_after(120):
            async with running_balloon(personality="", host=_host(kind), allocator=chunks) as run:
                chunks.fail_next = 3
                run.host.set_balloon_target(8)
                await run.settle(8)
                assert run.service.statistics().failures == 3


class TestPressure:
    """PSI readings deflate, hold, and let the balloon grow back."""

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_deflate_hold_reinflate(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        pressure = ScriptedPressure()
        section = BalloonSection(pressure_step_mb=16, pressure_cooldown_s=30.0)
        with trio.fail_after(600):
            async with running_balloon(
                personality="", host=_host(kind), section=section, pressure=pressure
            ) as run:
                run.host.set_balloon_target(64)
                await run.settle(64)
                pressed = trio.current_time()
                pressure.send(40.0, high=True)
                await run.settle(48)
                pressure.send(0.5, high=False)
                await trio.sleep(20)
                assert run.host_chunks == 48
                await run.settle(64)
                assert trio.current_time() - pressed >= section.pressure_cooldown_s

    async def test_floor_stops_inflation(self, autojump_clock: trio.abc.Clock) -> None:
        available = {"mb": 200}
        section = BalloonSection(min_available_mb=256)

        def mem_available() -> int:
            return available["mb"]

        with trio.fail_after(120):
            async with running_balloon(
                personality="passthrough", section=section, mem_available_mb=mem_available
            ) as run:
                walker = run.service.walker
                assert walker is not None
                run.host.set_balloon_target(64)
                await run.until(lambda: run.service.statistics().failures >= 1)
                assert run.host_chunks == 0
                available["mb"] = 10_000
                await run.settle(64)
