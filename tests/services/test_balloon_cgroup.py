"""The room left in the agent's memory cgroups, read from fake cgroup trees."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final

import pytest
import trio
from structlog.testing import capture_logs

from agent.services.balloon import BalloonMode, BalloonSection
from agent.services.balloon._cgroup import (
    UNREAD_WARNINGS,
    CgroupLimits,
    CgroupRoom,
    memory_cgroups,
)

from .balloon_support import ScriptedPressure, SimChunks, running_balloon

if TYPE_CHECKING:
    from pathlib import Path

    from agent.host import SimulatedHost

MB: Final = 1 << 20
V2_MEMBERSHIP: Final = "0::/system.slice/vbox-agent.service\n"
V1_MEMBERSHIP: Final = (
    "12:pids:/system.slice/vbox-agent.service\n"
    "4:memory:/docker/abc\n"
    "1:name=systemd:/system.slice/vbox-agent.service\n"
    "0::/\n"
)


def _cgroup(directory: Path, **files: str) -> Path:
    """Make ``directory`` with ``files`` (``memory_max`` for ``memory.max``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")
    return directory


def cgroup_room(root: Path, membership: Path) -> CgroupRoom | None:
    """The room the service reads: the least over the cgroups ``membership`` names."""
    return CgroupLimits(memory_cgroups(root, membership)).least_room()


def _membership(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


class TestV2:
    """``memory.max - memory.current`` over the leaf and each ancestor."""

    def test_a_limit_at_the_leaf(self, tmp_path: Path) -> None:
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(512 * MB),
            memory_current=str(100 * MB),
        )
        _cgroup(root / "system.slice", memory_max="max", memory_current=str(900 * MB))
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        assert CgroupRoom(412, str(leaf)) == cgroup_room(root, membership)

    def test_a_limit_at_an_ancestor_leaves_less(self, tmp_path: Path) -> None:
        """A slice's limit counts everything under it, the agent's usage included."""
        root = tmp_path / "sys"
        _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(2048 * MB),
            memory_current=str(100 * MB),
        )
        slice_ = _cgroup(
            root / "system.slice", memory_max=str(1024 * MB), memory_current=str(800 * MB)
        )
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        assert CgroupRoom(224, str(slice_)) == cgroup_room(root, membership)

    def test_memory_high_below_memory_max_is_the_limit(self, tmp_path: Path) -> None:
        """``MemoryHigh=`` on the unit, no ``MemoryMax=``: past ``memory.high`` the kernel
        throttles the cgroup's tasks and cannot reclaim the locked chunks, so it is the limit;
        on the slice, ``memory.max`` below its ``memory.high`` is."""
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max="max",
            memory_high=str(512 * MB),
            memory_current=str(100 * MB),
        )
        _cgroup(
            root / "system.slice",
            memory_max=str(1024 * MB),
            memory_high=str(2048 * MB),
            memory_current=str(600 * MB),
        )
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        assert CgroupRoom(412, str(leaf)) == cgroup_room(root, membership)
        (root / "system.slice/memory.current").write_text(f"{700 * MB}\n")
        assert CgroupRoom(324, str(root / "system.slice")) == cgroup_room(root, membership)

    def test_memory_high_at_an_ancestor(self, tmp_path: Path) -> None:
        root = tmp_path / "sys"
        _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(2048 * MB),
            memory_high="max",
            memory_current=str(100 * MB),
        )
        slice_ = _cgroup(
            root / "system.slice",
            memory_max="max",
            memory_high=str(1024 * MB),
            memory_current=str(800 * MB),
        )
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        assert CgroupRoom(224, str(slice_)) == cgroup_room(root, membership)

    def test_no_limit_anywhere(self, tmp_path: Path) -> None:
        """``max`` everywhere, and the root without limit files: no room to respect."""
        root = tmp_path / "sys"
        _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max="max",
            memory_high="max",
            memory_current="4096",
        )
        _cgroup(root / "system.slice", memory_max="max", memory_current="8192")
        assert cgroup_room(root, _membership(tmp_path, V2_MEMBERSHIP)) is None

    def test_over_the_limit_is_no_room(self, tmp_path: Path) -> None:
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(100 * MB),
            memory_current=str(101 * MB),
        )
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        assert CgroupRoom(0, str(leaf)) == cgroup_room(root, membership)

    def test_unreadable_values_are_passed_over(self, tmp_path: Path) -> None:
        """A value that is no number, or a usage file missing beside its limit, is passed
        over with a warning naming the file; the other cgroups still count."""
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max="lots",
            memory_current=str(MB),
        )
        slice_ = _cgroup(root / "system.slice", memory_max=str(512 * MB))
        _cgroup(root, memory_max=str(256 * MB), memory_current=str(56 * MB))
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        with capture_logs() as logs:
            assert CgroupRoom(200, str(root)) == cgroup_room(root, membership)
        unread = [(e["log_level"], e["file"], e["reason"]) for e in logs]
        assert [
            ("warning", str(leaf / "memory.max"), "'lots' is no number of bytes"),
            ("warning", str(slice_ / "memory.current"), "not there"),
        ] == unread

    @pytest.mark.parametrize(("bad", "good_mb"), [("memory.high", 300), ("memory.max", 200)])
    @pytest.mark.parametrize(
        ("how", "reason"),
        [("text", "'bogus' is no number of bytes"), ("directory", "Is a directory")],
    )
    def test_an_unreadable_limit_leaves_the_other(
        self, tmp_path: Path, bad: str, good_mb: int, how: str, reason: str
    ) -> None:
        """A limit that cannot be read is passed over, not its directory: the other limit
        beside it still counts (else the balloon walked past ``memory.max`` into the OOM
        killer), with one warning naming the file and what is wrong."""
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(200 * MB),
            memory_high=str(300 * MB),
            memory_current="0",
        )
        leaf.joinpath("memory.max" if bad == "memory.high" else "memory.high").write_text(
            f"{good_mb * MB}\n"
        )
        (leaf / bad).unlink()
        if how == "text":
            (leaf / bad).write_text("bogus\n")
        else:
            (leaf / bad).mkdir()
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        with capture_logs() as logs:
            assert CgroupRoom(good_mb, str(leaf)) == cgroup_room(root, membership)
        [unread] = logs
        assert (unread["event"], unread["log_level"]) == ("balloon_cgroup_unread", "warning")
        assert (unread["file"], unread["reason"]) == (str(leaf / bad), reason)

    def test_an_unreadable_file_is_said_once_until_it_reads_again(self, tmp_path: Path) -> None:
        """Looks at a file that keeps failing say so once, one line says when it reads again;
        a file that keeps failing and reading again is warned about at most
        ``UNREAD_WARNINGS`` times, then at debug."""
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(512 * MB),
            memory_high="bogus",
            memory_current="0",
        )
        limits = CgroupLimits(memory_cgroups(root, _membership(tmp_path, V2_MEMBERSHIP)))
        with capture_logs() as logs:
            for _ in range(10):
                assert limits.least_room() == CgroupRoom(512, str(leaf))
            assert [(e["event"], e["log_level"]) for e in logs] == [
                ("balloon_cgroup_unread", "warning")
            ]
            logs.clear()
            (leaf / "memory.high").write_text(f"{256 * MB}\n")
            for _ in range(10):
                assert limits.least_room() == CgroupRoom(256, str(leaf))
            assert [(e["event"], e["log_level"], e["file"]) for e in logs] == [
                ("balloon_cgroup_read", "info", str(leaf / "memory.high"))
            ]
            logs.clear()
            for _ in range(2 * UNREAD_WARNINGS):
                for text in ("bogus", str(256 * MB)):
                    (leaf / "memory.high").write_text(text)
                    limits.least_room()
        levels = [(e["event"], e["log_level"]) for e in logs]
        assert levels.count(("balloon_cgroup_unread", "warning")) == UNREAD_WARNINGS - 1
        assert levels.count(("balloon_cgroup_read", "info")) == UNREAD_WARNINGS - 1
        assert len(levels) == 4 * UNREAD_WARNINGS

    def test_reclaimable_cache_is_room(self, tmp_path: Path) -> None:
        """File I/O fills ``memory.current`` up to the limit with page cache the kernel
        reclaims inside the cgroup before any OOM kill: ``inactive_file`` is room."""
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(320 * MB),
            memory_current=str(299 * MB),
            memory_stat=f"anon {2 * MB}\nfile {279 * MB}\ninactive_file {222 * MB}",
        )
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        assert CgroupRoom(21 + 222, str(leaf)) == cgroup_room(root, membership)

    def test_no_memory_stat_counts_the_whole_usage(self, tmp_path: Path) -> None:
        """``memory.stat`` missing, or without ``inactive_file``: limit less usage."""
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(320 * MB),
            memory_current=str(299 * MB),
            memory_stat=f"anon {2 * MB}\nfile {279 * MB}",
        )
        _cgroup(root / "system.slice", memory_max=str(330 * MB), memory_current=str(300 * MB))
        membership = _membership(tmp_path, V2_MEMBERSHIP)
        assert CgroupRoom(21, str(leaf)) == cgroup_room(root, membership)

    @pytest.mark.parametrize("figure", ["lots", "-4096", ""])
    def test_a_cache_figure_that_is_no_number_counts_the_whole_usage(
        self, tmp_path: Path, figure: str
    ) -> None:
        """An ``inactive_file`` line whose figure is no number is no cache of 0 bytes: the
        whole usage counts, with one warning naming ``memory.stat``, however often it looks."""
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "system.slice/vbox-agent.service",
            memory_max=str(320 * MB),
            memory_current=str(299 * MB),
            memory_stat=f"anon {2 * MB}\ninactive_file {figure}\nfile {279 * MB}",
        )
        limits = CgroupLimits(memory_cgroups(root, _membership(tmp_path, V2_MEMBERSHIP)))
        with capture_logs() as logs:
            for _ in range(3):
                assert limits.least_room() == CgroupRoom(21, str(leaf))
        unread = [(e["event"], e["log_level"], e["file"], e["reason"]) for e in logs]
        assert unread == [
            (
                "balloon_cgroup_unread",
                "warning",
                str(leaf / "memory.stat"),
                f"{figure!r} is no number of bytes",
            )
        ]
        assert logs[0]["passed_over"] == "the reclaimable cache (the whole usage counts)"

    def test_no_membership_file(self, tmp_path: Path) -> None:
        with capture_logs() as logs:
            assert cgroup_room(tmp_path, tmp_path / "missing") is None
        assert [entry["event"] for entry in logs] == ["balloon_cgroup_unread"]


class TestV1:
    """``memory.limit_in_bytes - memory.usage_in_bytes`` in the memory hierarchy."""

    def test_the_memory_controllers_path(self, tmp_path: Path) -> None:
        """Only the memory line counts: the pids hierarchy's path and the empty v2 one
        (a hybrid system) name no memory limits."""
        root = tmp_path / "sys"
        leaf = _cgroup(
            root / "memory/docker/abc",
            memory_limit_in_bytes=str(300 * MB),
            memory_usage_in_bytes=str(44 * MB),
        )
        _cgroup(
            root / "memory",
            memory_limit_in_bytes="9223372036854771712",  # v1's "no limit"
            memory_usage_in_bytes=str(3000 * MB),
        )
        _cgroup(root / "pids/system.slice/vbox-agent.service", memory_max=str(MB))
        membership = _membership(tmp_path, V1_MEMBERSHIP)
        assert CgroupRoom(256, str(leaf)) == cgroup_room(root, membership)

    def test_reclaimable_cache_is_room(self, tmp_path: Path) -> None:
        """``total_inactive_file`` (the hierarchy's, as the usage is) counts as room."""
        root = tmp_path / "sys"
        memory = _cgroup(
            root / "memory",
            memory_limit_in_bytes=str(1024 * MB),
            memory_usage_in_bytes=str(1000 * MB),
            memory_stat=f"inactive_file {MB}\ntotal_inactive_file {600 * MB}",
        )
        membership = _membership(tmp_path, V1_MEMBERSHIP)
        assert CgroupRoom(24 + 600, str(memory)) == cgroup_room(root, membership)

    def test_a_huge_limit_is_no_limit(self, tmp_path: Path) -> None:
        """v1 writes "no limit" as the largest page-aligned value, which depends on the page
        size: any limit of 2**62 bytes or more is none."""
        root = tmp_path / "sys"
        _cgroup(
            root / "memory",
            memory_limit_in_bytes="9223372036854710272",  # 64 KiB pages
            memory_usage_in_bytes=str(3000 * MB),
        )
        assert cgroup_room(root, _membership(tmp_path, V1_MEMBERSHIP)) is None

    def test_a_container_sees_its_cgroup_as_the_root(self, tmp_path: Path) -> None:
        """Without a cgroup namespace a container's /proc/self/cgroup names the host's path,
        which its own mount does not have: its root is the container's cgroup."""
        root = tmp_path / "sys"
        memory = _cgroup(
            root / "memory",
            memory_limit_in_bytes=str(1024 * MB),
            memory_usage_in_bytes=str(24 * MB),
        )
        membership = _membership(tmp_path, V1_MEMBERSHIP)
        assert CgroupRoom(1000, str(memory)) == cgroup_room(root, membership)


@dataclass
class ChargedChunks(SimChunks):
    """Simulated chunks charged to a fake cgroup's ``memory.current``, as the kernel charges
    each chunk the agent locks."""

    usage: Path | None = None
    base_mb: int = 0

    def allocate(self) -> int:
        address = super().allocate()
        self._charge()
        return address

    def release(self, address: int) -> None:
        super().release(address)
        self._charge()

    def _charge(self) -> None:
        assert self.usage is not None
        self.usage.write_text(f"{(self.base_mb + len(self.live)) * MB}\n")


@pytest.mark.parametrize("memory_high", [None, "max", "bogus"])
async def test_the_cgroup_limit_stops_the_walk_before_the_target(
    autojump_clock: trio.abc.Clock, tmp_path: Path, memory_high: str | None
) -> None:
    """MemAvailable leaves room for the whole target, the agent's cgroup does not: the walk
    stops where one more chunk would leave less than the floor under the cgroup's limit
    (past it, the cgroup's OOM killer would end the agent inside mlock), with one line. A
    ``memory.high`` beside it that cannot be read leaves that limit in force, said once in
    the whole walk (not at every chunk)."""
    root = tmp_path / "sys"
    leaf = _cgroup(root / "system.slice/vbox-agent.service", memory_max=str(600 * MB))
    if memory_high is not None:
        (leaf / "memory.high").write_text(f"{memory_high}\n")
    chunks = ChargedChunks(usage=leaf / "memory.current", base_mb=40)
    chunks.release(chunks.allocate())  # 40 MB in use before the balloon
    membership = _membership(tmp_path, V2_MEMBERSHIP)
    with trio.fail_after(600), capture_logs() as logs:
        async with running_balloon(
            personality="passthrough",
            section=BalloonSection(min_available_mb=256),
            allocator=chunks,
            mem_available_mb=lambda: 4096,
            cgroup_room=CgroupLimits(memory_cgroups(root, membership)).least_room,
        ) as run:
            run.host.set_balloon_target(1024)
            await run.until(lambda: run.walker.failures >= 1)
            # 600 - 40 - 304 leaves 256 MB under the limit: the 305th chunk would not.
            assert run.host_chunks == 304
    [bounded] = [entry for entry in logs if entry["event"] == "balloon_floor_cgroup"]
    assert (bounded["cgroup"], bounded["mem_available_mb"]) == (str(leaf), 4096)
    unread = [(e["log_level"], e["file"]) for e in logs if e["event"] == "balloon_cgroup_unread"]
    assert unread == ([("warning", str(leaf / "memory.high"))] if memory_high == "bogus" else [])


async def test_triggered_mode_checks_mem_available_alone(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """Oracle's driver allocates the chunks itself, kernel pages charged to no cgroup of the
    agent's: a limit on the agent's unit that leaves less room than the floor holds back
    neither the start's CHECK_BALLOON, nor an inflate, nor the host asking for its memory
    back, and the pressure line names MemAvailable."""
    root = tmp_path / "sys"
    _cgroup(
        root / "system.slice/vbox-agent.service",
        memory_max=str(128 * MB),
        memory_current=str(64 * MB),
    )
    membership = _membership(tmp_path, V2_MEMBERSHIP)
    pressure = ScriptedPressure()

    async def target_before_start(host: SimulatedHost) -> None:
        host.set_balloon_target(16)

    with trio.fail_after(120), capture_logs() as logs:
        async with running_balloon(
            personality="oracle",
            section=BalloonSection(min_available_mb=256),
            pressure=pressure,
            mem_available_mb=lambda: 4096,
            cgroup_room=partial(cgroup_room, root, membership),
            before=target_before_start,
        ) as run:
            start = trio.current_time()
            assert run.service.mode is BalloonMode.TRIGGERED
            await run.settle(16)
            run.host.set_balloon_target(32)
            await run.settle(32)
            run.host.set_balloon_target(0)
            await run.settle(0)
            assert trio.current_time() - start < 1.0
            pressure.send(50.0, high=True)
            await run.until(lambda: run.service.statistics().pressure_events == 1)
    events = [entry["event"] for entry in logs]
    assert "balloon_check_postponed" not in events
    assert "balloon_floor_cgroup" not in events
    [pressed] = [entry for entry in logs if entry["event"] == "balloon_pressure"]
    assert pressed["mem_available_mb"] == 4096
