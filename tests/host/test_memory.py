"""``DictMemory`` (regions by reference, guard gaps, reuse, EFAULT, ENOMEM) and ``IoctlMemory``."""

from __future__ import annotations

import errno
import itertools
import random

import pytest

from agent.host.memory import (
    GUARD_BYTES,
    USER_BASE,
    USER_LIMIT,
    USER_WINDOW,
    DictMemory,
    IoctlMemory,
)
from agent.protocol.constants import PAGE_SIZE

BASE = 0x10000


def test_regions_are_placed_in_order_with_a_guard_gap_and_written_through() -> None:
    memory = DictMemory(base=BASE, limit=BASE + 64 * PAGE_SIZE)
    first, second = bytearray(10), bytearray(b"abc")
    one, two = memory.map(first), memory.map(second, offset=5)
    assert one == BASE
    assert two == BASE + PAGE_SIZE + GUARD_BYTES + 5
    memory.write(one + 2, b"xy")
    assert first[2:4] == b"xy"
    assert memory.read(two, 3) == b"abc"


@pytest.mark.parametrize(("at", "size"), [(0, 11), (10, 1), (-1, 1)])
def test_access_outside_a_region_faults(at: int, size: int) -> None:
    memory = DictMemory(base=BASE, limit=BASE + 64 * PAGE_SIZE)
    address = memory.map(bytearray(10))
    with pytest.raises(OSError, match="bad address") as caught:
        memory.read(address + at, size)
    assert caught.value.errno == errno.EFAULT


def test_lock_maps_bytes_within_one_region_in_place() -> None:
    memory = DictMemory(base=BASE, limit=BASE + 64 * PAGE_SIZE)
    first, second = bytearray(10), bytearray(20)
    one, two = memory.map(first), memory.map(second, offset=7)
    assert memory.lock(one, 10) == (first, 0)
    assert memory.lock(two + 4, 16) == (second, 4)
    assert memory.lock(two + 4, 17) is None  # past the region's end
    assert memory.lock(one + 10, 1) is None  # in the guard gap
    assert memory.lock(BASE - 1, 1) is None  # below every region
    memory.unmap(one)
    assert memory.lock(one, 1) is None


def test_freed_space_is_reused_after_the_range_wraps_and_a_full_range_refuses() -> None:
    memory = DictMemory(base=BASE, limit=BASE + 4 * PAGE_SIZE)
    held = memory.map(bytearray(PAGE_SIZE))  # with its guard: two pages
    freed = memory.map(bytearray(1))
    memory.unmap(freed)
    again = memory.map(bytearray(1))  # nothing left past the top: wraps to the free page
    assert again == freed
    assert held == BASE
    with pytest.raises(OSError, match="exhausted") as caught:
        memory.map(bytearray(PAGE_SIZE))
    assert caught.value.errno == errno.ENOMEM


def test_ioctl_memory_gives_each_buffer_a_window_of_its_own_and_writes_through() -> None:
    first, second = bytearray(b"0123"), bytearray(3)
    memory = IoctlMemory([first, second])
    one, two = USER_BASE, USER_BASE + USER_WINDOW
    assert memory.read(one + 1, 2) == b"12"
    memory.write(two, b"xyz")
    assert second == b"xyz"


@pytest.mark.parametrize(("at", "size"), [(0, 5), (4, 1), (-1, 1), (USER_WINDOW, 1)])
def test_ioctl_memory_faults_outside_its_buffers(at: int, size: int) -> None:
    memory = IoctlMemory([bytearray(4)])
    address = USER_BASE
    with pytest.raises(OSError, match="bad address") as caught:
        memory.write(address + at, bytes(size))
    assert caught.value.errno == errno.EFAULT


def test_ioctl_memory_refuses_more_windows_than_the_user_range_holds() -> None:
    windows = (USER_LIMIT - USER_BASE) // USER_WINDOW
    IoctlMemory([bytearray(1)] * windows)
    with pytest.raises(OSError, match="exhausted") as caught:
        IoctlMemory([bytearray(1)] * (windows + 1))
    assert caught.value.errno == errno.ENOMEM


def test_regions_never_overlap_through_maps_and_unmaps_in_any_order() -> None:
    """Many maps and unmaps (the highest region's too, and after the range wrapped): no
    region starts within another's guard, and each region's bytes are its own."""
    rng = random.Random(8)  # noqa: S311 - a fixed sequence of sizes, not a secret
    limit = BASE + 48 * PAGE_SIZE
    memory = DictMemory(base=BASE, limit=limit)
    live: dict[int, bytearray] = {}
    refused: set[int | None] = set()
    for step in range(2000):
        if live and (rng.random() < 0.45 or len(live) > 12):
            address = max(live) if rng.random() < 0.3 else rng.choice(list(live))
            memory.unmap(address)
            del live[address]
            continue
        data = bytearray([step % 251 + 1]) * rng.choice([0, 1, 100, PAGE_SIZE, 3 * PAGE_SIZE])
        try:
            address = memory.map(data, offset=rng.choice([0, 0, 7, PAGE_SIZE - 1]))
        except OSError as exc:
            refused.add(exc.errno)
        else:
            live[address] = data
        regions = sorted(live.items())
        for (address, data), (after, _) in itertools.pairwise(regions):
            assert address + len(data) + GUARD_BYTES <= after
        assert all(BASE <= address < limit for address in live)
        assert len(memory) == len(live)
        for address, data in regions:
            if data:
                assert memory.read(address + len(data) - 1, 1) == data[-1:]
    assert refused <= {errno.ENOMEM}


def _model_region(live: dict[int, bytearray], address: int, size: int) -> tuple[bytearray, int]:
    """The region ``[address, address + size)`` lies in, found by scanning, or EFAULT."""
    for start, data in live.items():
        if start <= address and address + size <= start + len(data) and size >= 0:
            return data, address - start
    raise OSError(errno.EFAULT, "bad address")


def test_reads_and_writes_anywhere_match_a_scan_of_the_regions() -> None:
    """Reads and writes at a region's start, inside it, across its end, with sizes 0 and
    below, and between regions give the bytes (or EFAULT) a plain scan of the live regions
    gives, through maps and unmaps."""
    rng = random.Random(7)  # noqa: S311 - a fixed sequence of accesses, not a secret
    memory = DictMemory(base=BASE, limit=BASE + 4096 * PAGE_SIZE)
    live: dict[int, bytearray] = {}
    for step in range(3000):
        if live and (rng.random() < 0.2 or len(live) > 40):
            address = rng.choice(list(live))
            memory.unmap(address)
            del live[address]
        if rng.random() < 0.3 or not live:
            data = bytearray(rng.randbytes(rng.choice([1, 24, 100, PAGE_SIZE + 3])))
            live[memory.map(data, offset=rng.choice([0, 0, 5]))] = data
            continue
        start = rng.choice(list(live))
        address = start + rng.choice([0, 0, 1, 24, len(live[start]) - 1, len(live[start]), -1])
        size = rng.choice([0, 1, 4, len(live[start]), len(live[start]) + 1, -1])
        try:
            region, offset = _model_region(live, address, size)
        except OSError:
            region, offset = bytearray(), -1
        if step % 2:
            payload = rng.randbytes(max(size, 0))
            if offset < 0 and size > 0:
                with pytest.raises(OSError, match="bad address"):
                    memory.write(address, payload)
                continue
            memory.write(address, payload)
            if size > 0:
                assert region[offset : offset + size] == payload
        elif offset < 0 and size != 0:
            with pytest.raises(OSError, match="bad address"):
                memory.read(address, size)
        else:
            assert memory.read(address, size) == region[offset : offset + max(size, 0)]


def test_unmap_all_forgets_each_region_and_ignores_unknown_addresses() -> None:
    memory = DictMemory(base=BASE, limit=BASE + 64 * PAGE_SIZE)
    first, second, kept = (memory.map(bytearray(10)) for _ in range(3))
    memory.unmap_all([second, first, BASE + 1])
    assert len(memory) == 1
    assert memory.lock(first, 1) is None
    assert memory.lock(second, 1) is None
    assert memory.read(kept + 9, 1) == b"\0"  # found by bisection after the change
