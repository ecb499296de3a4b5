"""A large balloon on the simulated kernels: small memory, and a stop ends the walk.

Rules of this test module:
- a few GiB of guest RAM, never more: the walk takes well under a second;
- the memory figure is tracemalloc's (Python allocations only), taken around the walk;
- the walk's progress is read from the host between two of its chunks: a task that gets
  to run mid-walk proves the walk yields; each loop is bounded.
"""

from __future__ import annotations

import gc
import tracemalloc
from typing import Final

import pytest
import trio

from agent.host import SimulatedHost
from agent.protocol import ChangeFilterMask, CheckBalloon
from agent.protocol.constants import Event
from tests.host.conftest import Client, open_client

RAM_MB: Final = 4096
CHUNKS: Final = 3000
"""MiBs ballooned (below 90 % of ``RAM_MB``)."""
BYTES_PER_MIB: Final = 64
"""The most simulator memory one ballooned MiB may take: a chunk is the 8-byte address of
its first page in the driver's array and one byte in the host's, so this leaves room for
the arrays' growth; 256 page addresses as Python integers took about 11,500."""
MAX_POLLS: Final = 100_000


async def _walk(host: SimulatedHost, client: Client) -> None:
    """Set the target and let the driver walk to it (mainline in its work item, Oracle's in
    the CHECK_BALLOON that asks)."""
    host.set_balloon_target(CHUNKS)
    if host.personality == "oracle":
        await client.request(CheckBalloon())


async def _open(host: SimulatedHost) -> Client:
    client = await open_client(host)
    if host.personality == "mainline":  # the host tells the kernel only while one filters
        await client.request(ChangeFilterMask(Event.BALLOON_CHANGE_REQUEST, 0))
    return client


@pytest.mark.parametrize("personality", ["mainline", "oracle"])
async def test_a_ballooned_mib_takes_a_few_bytes(personality: str, autojump_clock: object) -> None:
    """The driver and the host keep a ballooned chunk in a few bytes, not 256 integers
    (a balloon of most of a 2 TiB VM took 24 GB and was killed)."""
    host = SimulatedHost(personality=personality, ram_mb=RAM_MB)
    async with trio.open_nursery() as vm:
        await vm.start(host.run)
        client = await _open(host)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await _walk(host, client)
            await trio.sleep(1)  # the virtual clock moves once the walk is over
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        vm.cancel_scope.cancel()
    assert host.vmmdev.balloon.chunks == CHUNKS
    assert grown / CHUNKS < BYTES_PER_MIB


@pytest.mark.parametrize("personality", ["mainline", "oracle"])
async def test_a_long_walk_lets_the_guest_run_and_a_stop_end_it(
    personality: str, autojump_clock: object
) -> None:
    """Between two chunks of the walk the rest of the guest runs (a signal reaches the
    agent); mainline's work item, the host's own, ends when the host stops."""
    host = SimulatedHost(personality=personality, ram_mb=RAM_MB)
    seen: list[int] = []
    async with trio.open_nursery() as test:
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            client = await _open(host)
            test.start_soon(_walk, host, client)
            for _ in range(MAX_POLLS):
                if host.vmmdev.balloon.chunks:
                    break
                await trio.lowlevel.checkpoint()
            seen.append(host.vmmdev.balloon.chunks)
            vm.cancel_scope.cancel()
        seen.append(host.vmmdev.balloon.chunks)
        test.cancel_scope.cancel()
    assert 0 < seen[0] < CHUNKS
    if personality == "mainline":
        assert seen[1] < CHUNKS
