"""A large balloon on the simulated kernels: small memory, and a stop ends the walk.

Rules of this test module:
- a few GiB of guest RAM, never more: the walk takes well under a second;
- the memory figure is tracemalloc's (Python allocations only), taken around the walk;
- the walk's progress is read from the host between two of its chunks: a task that gets
  to run mid-walk proves the walk yields; each loop is bounded.
"""

from __future__ import annotations

import contextlib
import gc
import tracemalloc
from typing import TYPE_CHECKING, Final

import pytest
import trio

from agent.host import SimulatedHost
from agent.protocol import ChangeFilterMask, CheckBalloon
from agent.protocol.constants import Event
from agent.protocol.errors import VBoxStatusError
from tests.host.conftest import Client, open_client

if TYPE_CHECKING:
    from collections.abc import Callable

RAM_MB: Final = 4096
CHUNKS: Final = 3000
"""MiBs ballooned (below 90 % of ``RAM_MB``)."""
BYTES_PER_MIB: Final = 64
"""The most simulator memory one ballooned MiB may take: a chunk is the 8-byte address of
its first page in the driver's array and one byte in the host's, so this leaves room for
the arrays' growth; 256 page addresses as Python integers took about 11,500."""
MAX_POLLS: Final = 100_000
WAIT_S: Final = 60.0
"""Virtual seconds a test may take (the walk takes none: it never sleeps)."""


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
    agent); a host stop (the VM powers off) ends the walk short of the target, whether it
    is mainline's work item or Oracle's CHECK_BALLOON (which then fails)."""
    host = SimulatedHost(personality=personality, ram_mb=RAM_MB)
    seen: list[int] = []
    walked = trio.Event()
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as test:
            async with trio.open_nursery() as vm:
                await vm.start(host.run)
                client = await _open(host)
                test.start_soon(_walk_to_a_stop, host, client, walked)
                await _first_chunk(host)
                seen.append(host.vmmdev.balloon.chunks)
                vm.cancel_scope.cancel()
            await walked.wait()  # the agent's call is not cancelled: it returns
            seen.append(host.vmmdev.balloon.chunks)
    assert 0 < seen[0] <= seen[1] < CHUNKS


async def test_cancelling_the_agents_call_does_not_stop_oracles_walk(
    autojump_clock: object,
) -> None:
    """Oracle's walk checks for no signal: the agent's CHECK_BALLOON cancelled mid-walk
    still takes the balloon to the target while the VM runs."""
    host = SimulatedHost(personality="oracle", ram_mb=RAM_MB)
    async with trio.open_nursery() as vm:
        await vm.start(host.run)
        client = await _open(host)
        async with trio.open_nursery() as call:
            call.start_soon(_walk, host, client)
            await _first_chunk(host)
            call.cancel_scope.cancel()
        chunks = host.vmmdev.balloon.chunks
        vm.cancel_scope.cancel()
    assert chunks == CHUNKS


async def test_a_stop_ends_oracles_deflate_at_the_close(autojump_clock: object) -> None:
    """Closing the balloon's owner deflates the driver's chunks one at a time, as the
    kernel: a power-off meanwhile ends that walk too, the rest left in the balloon."""
    host = SimulatedHost(personality="oracle", ram_mb=RAM_MB)
    closed = trio.Event()

    async def close(client: Client) -> None:
        await client.transport.aclose()
        closed.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as test:
            async with trio.open_nursery() as vm:
                await vm.start(host.run)
                client = await _open(host)
                await _walk(host, client)
                test.start_soon(close, client)
                await _until_chunks(host, lambda chunks: chunks < CHUNKS)
                vm.cancel_scope.cancel()
            await closed.wait()
    assert 0 < host.vmmdev.balloon.chunks < CHUNKS


async def _walk_to_a_stop(host: SimulatedHost, client: Client, walked: trio.Event) -> None:
    """Walk until the host stops: Oracle's CHECK_BALLOON then fails (the walk's next
    request went unhandled)."""
    with contextlib.suppress(VBoxStatusError):
        await _walk(host, client)
    walked.set()


async def _first_chunk(host: SimulatedHost) -> None:
    """Return once the walk has ballooned a chunk (the walk yields between two)."""
    await _until_chunks(host, lambda chunks: chunks > 0)


async def _until_chunks(host: SimulatedHost, reached: Callable[[int], bool]) -> None:
    """Return once the host's balloon count is ``reached`` (the walk yields between two
    chunks), or after ``MAX_POLLS`` schedule points."""
    for _ in range(MAX_POLLS):
        if reached(host.vmmdev.balloon.chunks):
            return
        await trio.lowlevel.checkpoint()
