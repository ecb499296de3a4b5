"""The real chunk path: anonymous mappings, locked, out of forks, unmapped when given back.

These tests allocate a few real 1 MiB chunks in this process (small counts, within the
default 8 MiB ``RLIMIT_MEMLOCK``) and read ``/proc/self/smaps`` and ``VmLck`` to see them.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from typing import TYPE_CHECKING, Final

import pytest
import trio
from structlog.testing import capture_logs

from agent.host import SimulatedHost
from agent.protocol import BALLOON_CHUNK_PAGES, BALLOON_CHUNK_SIZE
from agent.protocol.constants import PAGE_SIZE
from agent.services.balloon._chunks import ChunkError, MmapAllocator, has_ipc_lock
from tests.services.balloon_support import running_balloon

if TYPE_CHECKING:
    from pathlib import Path

CHUNKS: Final = 4
MEMLOCK_LIMIT: Final = 4 * BALLOON_CHUNK_SIZE
_RANGE: Final = re.compile(r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) (?P<perms>\S+)")


def locked_kb() -> int:
    """``VmLck`` of this process."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    msg = "no VmLck line in /proc/self/status"
    raise AssertionError(msg)


def pagemap_entries(address: int) -> bytes:
    """This process's raw pagemap entries for the chunk at ``address``."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // PAGE_SIZE * 8)
        return pagemap.read(BALLOON_CHUNK_PAGES * 8)


def mapping(address: int) -> dict[str, str] | None:
    """The smaps entry holding ``address``: perms, VmFlags... (None if unmapped).

    The kernel merges adjacent chunks with the same flags into one entry.
    """
    entry: dict[str, str] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            match = _RANGE.match(line)
            if match:
                if entry is not None:
                    return entry
                if int(match["start"], 16) <= address < int(match["end"], 16):
                    entry = {"perms": match["perms"]}
            elif entry is not None and ":" in line:
                key, _, value = line.partition(":")
                entry[key] = value.strip()
    return entry


class TestMmapAllocator:
    """What one real chunk looks like in the process."""

    def test_chunk_is_locked_out_of_forks_and_unmapped_on_release(self) -> None:
        allocator = MmapAllocator()
        before = locked_kb()
        addresses = [allocator.allocate() for _ in range(CHUNKS)]
        try:
            assert locked_kb() - before == CHUNKS * BALLOON_CHUNK_SIZE // 1024
            for address in addresses:
                entry = mapping(address)
                assert entry is not None
                assert entry["perms"] == "rw-p"
                flags = entry["VmFlags"].split()
                assert "lo" in flags  # locked
                assert "dc" in flags  # MADV_DONTFORK
                assert entry["Rss"] == entry["Size"]  # faulted in
        finally:
            for address in addresses:
                allocator.release(address)
        assert locked_kb() == before
        assert all(mapping(address) is None for address in addresses)

    def test_chunks_are_kept_out_of_huge_pages(self) -> None:
        """khugepaged copies small pages into a new huge page, moving them to other frames:
        every chunk is marked ``nh`` (MADV_NOHUGEPAGE), adjacent ones merged or not."""
        allocator = MmapAllocator()
        addresses = [allocator.allocate() for _ in range(CHUNKS)]
        try:
            for address in addresses:
                entry = mapping(address)
                assert entry is not None
                assert "nh" in entry["VmFlags"].split()
                assert entry["AnonHugePages"] == "0 kB"
        finally:
            for address in addresses:
                allocator.release(address)

    def test_physical_pages_come_from_pagemap(self) -> None:
        allocator = MmapAllocator()
        address = allocator.allocate()
        try:
            pages = allocator.physical_pages(address)
            raw_entries = pagemap_entries(address)
        finally:
            allocator.release(address)
        addresses = pages.addresses
        assert len(set(addresses)) == BALLOON_CHUNK_PAGES
        assert all(page > 0 and page % PAGE_SIZE == 0 for page in addresses)
        frames = {
            entry & ((1 << 55) - 1)
            for entry in struct.unpack(f"<{BALLOON_CHUNK_PAGES}Q", raw_entries)
        }
        assert {page // PAGE_SIZE for page in addresses} == frames

    def test_the_flag_bits_of_an_entry_are_no_part_of_its_frame(self, tmp_path: Path) -> None:
        """Bits 55-62 (soft-dirty, exclusively mapped, write-protected, file or shared,
        swapped) may be set beside the present bit: a page's address is bits 0-54 only."""
        allocator = MmapAllocator(pagemap_path=str(tmp_path / "pagemap"))
        address = allocator.allocate()
        try:
            flags = (1 << 63) | (0xFF << 55)
            entries = [flags | (0x1000 + index) for index in range(BALLOON_CHUNK_PAGES)]
            with (tmp_path / "pagemap").open("wb") as pagemap:  # sparse: only this chunk
                pagemap.seek(address // PAGE_SIZE * 8)
                pagemap.write(struct.pack(f"<{BALLOON_CHUNK_PAGES}Q", *entries))
            pages = allocator.physical_pages(address)
        finally:
            allocator.release(address)
        expected = [(0x1000 + index) * PAGE_SIZE for index in range(BALLOON_CHUNK_PAGES)]
        assert list(pages.addresses) == expected

    @pytest.mark.parametrize(
        ("entry", "reason"),
        [
            pytest.param(
                1 << 63,
                "address 0x0 is zero or not page-aligned; reading frames needs CAP_SYS_ADMIN",
                id="hidden-frame",
            ),
            pytest.param(0x1234, "not present", id="not-present"),
            pytest.param(1 << 63 | 1 << 53, "out of range", id="beyond-64-bits"),
        ],
    )
    def test_unusable_pagemap_entries_are_a_chunk_error(
        self, tmp_path: Path, entry: int, reason: str
    ) -> None:
        """Frames hidden (no CAP_SYS_ADMIN), absent or impossible stop the chunk."""
        allocator = MmapAllocator(pagemap_path=str(tmp_path / "pagemap"))
        address = allocator.allocate()
        try:
            entries = [(1 << 63) | (0x1000 + index) for index in range(BALLOON_CHUNK_PAGES)]
            entries[7] = entry
            with (tmp_path / "pagemap").open("wb") as pagemap:  # sparse: only this chunk
                pagemap.seek(address // PAGE_SIZE * 8)
                pagemap.write(struct.pack(f"<{BALLOON_CHUNK_PAGES}Q", *entries))
            with pytest.raises(ChunkError, match=reason):
                allocator.physical_pages(address)
        finally:
            allocator.release(address)

    def test_unreadable_pagemap_is_a_chunk_error(self, tmp_path: pytest.TempPathFactory) -> None:
        allocator = MmapAllocator(pagemap_path=f"{tmp_path}/missing")
        address = allocator.allocate()
        try:
            with pytest.raises(ChunkError, match="cannot read"):
                allocator.physical_pages(address)
        finally:
            allocator.release(address)


class TestCapability:
    """``CAP_IPC_LOCK`` lifts ``RLIMIT_MEMLOCK``; the mode line says whether it is effective."""

    @pytest.mark.parametrize(
        ("cap_eff", "expected"),
        [("0000000000004000", True), ("000001ffffffbfff", False), ("0000000000000000", False)],
    )
    def test_reads_bit_14_of_cap_eff(self, tmp_path: Path, cap_eff: str, expected: bool) -> None:
        status = tmp_path / "status"
        status.write_text(f"Name:\tagent\nCapInh:\t0000000000004000\nCapEff:\t{cap_eff}\n")
        assert has_ipc_lock(str(status)) is expected

    async def test_mode_line_shows_limit_and_capability(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        host = SimulatedHost(personality="passthrough")
        with trio.fail_after(60), capture_logs() as logs:
            async with running_balloon(personality="", host=host):
                pass
        [line] = [line for line in logs if line["event"] == "balloon_mode"]
        assert "memlock_limit_mb" in line
        assert line["memlock_unlimited_by_capability"] is has_ipc_lock()


LOCK_UNTIL_REFUSED: Final = f"""
import resource
from agent.services.balloon._chunks import ChunkError, MmapAllocator
resource.setrlimit(resource.RLIMIT_MEMLOCK, ({MEMLOCK_LIMIT}, {MEMLOCK_LIMIT}))
allocator = MmapAllocator()
try:
    for _ in range({MEMLOCK_LIMIT // BALLOON_CHUNK_SIZE + 1}):
        allocator.allocate()
except ChunkError as exc:
    print(exc)
"""
"""Lock chunks past a lowered limit, in a child process (this one keeps its own limit)."""


@pytest.mark.skipif(
    has_ipc_lock() and shutil.which("setpriv") is None,
    reason="CAP_IPC_LOCK lifts the limit, and setpriv, which drops it in the child, is missing",
)
def test_a_refusal_by_rlimit_memlock_names_the_limit() -> None:
    """mlock past ``RLIMIT_MEMLOCK`` without ``CAP_IPC_LOCK``: the failure names the limit and
    what lifts it (it read "Cannot allocate memory", like a guest out of memory)."""
    command = [sys.executable, "-c", LOCK_UNTIL_REFUSED]
    if has_ipc_lock():  # root, say: drop the capability in the child
        command = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", *command]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout == (
        "mlock of a 1 MiB chunk failed: RLIMIT_MEMLOCK of 4 MiB reached"
        " (LimitMEMLOCK=infinity or CAP_IPC_LOCK lifts it)\n"
    )


class TestServiceWithRealChunks:
    """The whole service with real chunks: nothing stays mapped or locked after the stop."""

    @pytest.mark.parametrize("kind", ["oracle-r3", "passthrough"])
    async def test_nothing_left_after_stop(self, autojump_clock: trio.abc.Clock, kind: str) -> None:
        host = (
            SimulatedHost(personality="oracle", r3_balloon=True)
            if kind == "oracle-r3"
            else SimulatedHost(personality="passthrough")
        )
        allocator = MmapAllocator()
        before = locked_kb()
        with trio.fail_after(60):
            async with running_balloon(personality="", host=host, allocator=allocator) as run:
                run.host.set_balloon_target(CHUNKS)
                await run.settle(CHUNKS)
                walker = run.walker
                addresses = [chunk.address for chunk in walker.held]
                assert len(addresses) == CHUNKS
                assert locked_kb() - before == CHUNKS * BALLOON_CHUNK_SIZE // 1024
                assert all(mapping(address) is not None for address in addresses)
            assert run.host_chunks == 0
        assert locked_kb() == before
        assert all(mapping(address) is None for address in addresses)
