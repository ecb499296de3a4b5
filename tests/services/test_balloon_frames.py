"""Owned mode holds no chunk while Linux may move a locked page to another frame.

Rules of this test module:
- The kernel settings come from a ``/proc/sys`` tree in ``tmp_path`` (``sysctl_root``, or
  standing in for ``PROC_SYS``); the machine's own are never read (a simulated host without
  a tree is not checked at all).
- The service runs against the simulated passthrough driver with simulated chunks, on
  virtual time (``autojump_clock``); waits are ``wait_all_tasks_blocked`` and the walker's
  ``wait_held``, each test bounded by ``trio.fail_after`` on that clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from agent.host import SimulatedHost
from agent.services.balloon import BalloonMode, _chunks
from agent.services.balloon._chunks import PageMover, pages_may_move
from tests.services.balloon_support import SimChunks, running_balloon
from tests.services.test_cpuhotplug import MachineOpener

if TYPE_CHECKING:
    from pathlib import Path

COMPACTION: Final = "vm/compact_unevictable_allowed"
NUMA: Final = "kernel/numa_balancing"
BOUND_S: Final = 60.0


def sysctls(root: Path, values: dict[str, str]) -> Path:
    """A ``/proc/sys`` tree under ``root`` holding ``values`` (by path, ``vm/...``)."""
    for name, value in values.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


class TestPagesMayMove:
    """Which settings let locked pages move, read from a ``/proc/sys`` tree."""

    def test_no_compaction_of_locked_pages_and_no_numa_balancing_keep_them(
        self, tmp_path: Path
    ) -> None:
        """Both at 0: nothing named moves a locked page."""
        root = sysctls(tmp_path, {COMPACTION: "0", NUMA: "0"})
        assert pages_may_move(root) is None

    def test_a_kernel_without_numa_balancing_has_no_such_file(self, tmp_path: Path) -> None:
        """numa_balancing exists only where the kernel has the feature."""
        assert pages_may_move(sysctls(tmp_path, {COMPACTION: "0"})) is None

    @pytest.mark.parametrize(
        ("values", "expected"),
        [
            (
                {COMPACTION: "1", NUMA: "0"},
                PageMover(
                    "vm.compact_unevictable_allowed",
                    "1",
                    "memory compaction may move locked pages to other frames",
                ),
            ),
            (
                {NUMA: "0"},
                PageMover(
                    "vm.compact_unevictable_allowed",
                    None,
                    "memory compaction may move locked pages to other frames",
                ),
            ),
            (
                {COMPACTION: "0", NUMA: "1"},
                PageMover(
                    "kernel.numa_balancing",
                    "1",
                    "NUMA balancing may move locked pages to another node's frames",
                ),
            ),
        ],
    )
    def test_a_setting_that_moves_pages_is_named(
        self, tmp_path: Path, values: dict[str, str], expected: PageMover
    ) -> None:
        """Compaction of locked pages on (the kernel's default), its file unreadable (a
        missing one too: an unseen /proc/sys looks the same), or NUMA balancing on."""
        assert expected == pages_may_move(sysctls(tmp_path, values))

    def test_the_status_form_names_the_setting_and_the_value_it_needs(self) -> None:
        """``str()`` is what the status shows."""
        mover = PageMover("vm.compact_unevictable_allowed", "1", "compaction")
        assert str(mover) == "vm.compact_unevictable_allowed is 1, needs 0"
        unread = PageMover("vm.compact_unevictable_allowed", None, "compaction")
        assert str(unread) == "vm.compact_unevictable_allowed cannot be read, needs 0"


class TestOwnedRefusal:
    """The balloon service on the passthrough driver, with the settings of a tree."""

    async def test_refuses_while_compaction_moves_locked_pages_then_follows_again(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """Compaction of locked pages on: the host's 64 MB are refused (no chunk taken, one
        warning naming the setting and the fix, the status saying why), the service runs
        on; at 0 the next request is walked; back at 1 every chunk is given back."""
        root = sysctls(tmp_path, {COMPACTION: "1"})
        chunks = SimChunks()
        with trio.fail_after(BOUND_S), capture_logs() as logs:
            async with running_balloon(
                personality="passthrough", allocator=chunks, sysctl_root=root
            ) as run:
                assert run.service.mode is BalloonMode.OWNED
                walker = run.walker
                run.host.set_balloon_target(64)
                await trio.testing.wait_all_tasks_blocked()
                assert (run.host_chunks, len(chunks.live), walker.inflated) == (0, 0, 0)
                assert run.service.status() == (
                    "balloon 0/64 MB (owned, refused: vm.compact_unevictable_allowed is 1, needs 0)"
                )
                refused = [entry for entry in logs if entry["event"] == "balloon_refused"]
                assert len(refused) == 1
                assert refused[0]["log_level"] == "warning"
                assert refused[0]["setting"] == "vm.compact_unevictable_allowed"
                assert refused[0]["value"] == "1"
                assert "sysctl -w vm.compact_unevictable_allowed=0" in refused[0]["fix"]

                sysctls(root, {COMPACTION: "0"})
                run.host.set_balloon_target(32)
                await walker.wait_held(32)
                assert run.host_chunks == 32
                assert run.service.status() == "balloon 32/32 MB (owned)"

                sysctls(root, {COMPACTION: "1"})
                run.host.set_balloon_target(48)
                await walker.wait_held(0)
                assert (run.host_chunks, len(chunks.live)) == (0, 0)
        events = [entry["event"] for entry in logs]
        assert events.count("balloon_refused") == 2
        assert events.count("balloon_refusal_lifted") == 1

    async def test_on_a_real_device_the_machines_settings_are_read(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a tree, a device that is this machine's driver has ``/proc/sys`` read (here
        a tree standing in for it, which says 1): the balloon is refused."""
        monkeypatch.setattr(_chunks, "PROC_SYS", sysctls(tmp_path, {COMPACTION: "1"}))
        with trio.fail_after(BOUND_S):
            async with running_balloon(personality="passthrough", opener_for=MachineOpener) as run:
                run.host.set_balloon_target(16)
                await trio.testing.wait_all_tasks_blocked()
                assert run.host_chunks == 0
                assert "refused: vm.compact_unevictable_allowed is 1" in run.service.status()

    async def test_a_simulated_host_is_not_checked(self, autojump_clock: trio.abc.Clock) -> None:
        """Without a tree, a simulated host's balloon is walked whatever this machine's
        settings say (its frames reach no hypervisor), and a line says so once."""
        with trio.fail_after(BOUND_S), capture_logs() as logs:
            async with running_balloon(personality="passthrough") as run:
                walker = run.walker
                run.host.set_balloon_target(16)
                await walker.wait_held(16)
                run.host.set_balloon_target(8)
                await walker.wait_held(8)
                assert run.host_chunks == 8
        unchecked = [entry for entry in logs if entry["event"] == "balloon_frames_unchecked"]
        assert len(unchecked) == 1
        assert not [entry for entry in logs if entry["event"] == "balloon_refused"]

    async def test_allocated_mode_is_not_checked(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path
    ) -> None:
        """Oracle's driver pins the chunks it is handed: no setting holds that balloon back."""
        root = sysctls(tmp_path, {COMPACTION: "1"})
        with trio.fail_after(BOUND_S):
            async with running_balloon(
                personality="",
                host=SimulatedHost(personality="oracle", r3_balloon=True),
                sysctl_root=root,
            ) as run:
                run.host.set_balloon_target(16)  # the first inflate hands the balloon over
                await trio.testing.wait_all_tasks_blocked()
                assert run.service.mode is BalloonMode.ALLOCATED
                walker = run.walker
                await walker.wait_held(16)
                assert walker.refusal is None
                assert run.host_chunks == 16
