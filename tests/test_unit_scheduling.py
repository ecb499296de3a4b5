"""``testbed.unit_scheduling``: the scheduling the unit asks systemd for, as tests apply it."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from testbed.unit_scheduling import (
    PLAIN,
    Scheduling,
    host_scheduling,
    realtime_slot,
    unit_scheduling,
)

if TYPE_CHECKING:
    from pathlib import Path


def unit(tmp_path: Path, service: str) -> Path:
    """A unit file whose ``[Service]`` section holds ``service``."""
    path = tmp_path / "x.service"
    path.write_text(f"[Unit]\nNice=5\n\n[Service]\n# Nice=7\n{service}\n[Install]\nNice=9\n")
    return path


class TestUnitScheduling:
    """Reading ``Nice=`` and ``CPUScheduling*=`` from a unit."""

    def test_the_shipped_unit(self) -> None:
        """The agent's unit asks for the lowest real-time priority, kept by its threads."""
        assert unit_scheduling() == Scheduling(policy="rr", priority=1)

    def test_only_service_settings_count_and_the_last_wins(self, tmp_path: Path) -> None:
        """Other sections and comments are ignored; a repeated key takes its last value."""
        path = unit(
            tmp_path,
            "Nice=-3\nCPUSchedulingPolicy=fifo\nCPUSchedulingPriority=4\n"
            "CPUSchedulingPriority=2\nCPUSchedulingResetOnFork=yes",
        )
        assert unit_scheduling(path) == Scheduling("fifo", 2, -3, reset_on_fork=True)

    def test_no_settings_is_plain(self, tmp_path: Path) -> None:
        """A unit that sets nothing leaves SCHED_OTHER at nice 0."""
        assert unit_scheduling(unit(tmp_path, "Type=notify")) == PLAIN

    @pytest.mark.parametrize(
        ("service", "message"),
        [
            ("CPUSchedulingPolicy=deadline", "CPUSchedulingPolicy=deadline is none of"),
            ("CPUSchedulingPolicy=rr", "needs a CPUSchedulingPriority="),
            ("CPUSchedulingResetOnFork=maybe", "CPUSchedulingResetOnFork=maybe is not a boolean"),
        ],
    )
    def test_values_systemd_refuses(self, tmp_path: Path, service: str, message: str) -> None:
        """A value systemd would refuse names the unit, the key and the value."""
        path = unit(tmp_path, service)
        with pytest.raises(ValueError, match=message) as caught:
            unit_scheduling(path)
        assert str(path) in str(caught.value)


class TestHostScheduling:
    """The simulated host runs above the agent."""

    def test_above_a_realtime_agent(self) -> None:
        """One FIFO priority higher; its children start at SCHED_OTHER."""
        host = host_scheduling(Scheduling("rr", 1))
        assert host == Scheduling("fifo", 2, reset_on_fork=True)

    def test_above_a_plain_agent(self) -> None:
        """Nice -10 beside an agent at nice 0, lower still beside a niced one."""
        assert host_scheduling(PLAIN).nice == -10
        assert host_scheduling(Scheduling(nice=-15)).nice == -16


def test_apply_to_a_process() -> None:
    """``apply`` sets the policy and nice of another process (a child waiting on its stdin)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        Scheduling(nice=3).apply(child.pid)
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == 3
        assert os.sched_getscheduler(child.pid) == os.SCHED_OTHER
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)


HOLD_LOCK = """
import fcntl, sys
with open(sys.argv[1], "a") as file:
    fcntl.flock(file, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()
"""


class TestRealtimeSlot:
    """One run at a time times real-time processes on a machine."""

    def test_taken_while_another_holds_it(self, tmp_path: Path) -> None:
        """A second holder waits ``wait_s`` and says whose slot it could not take; once the
        first gives it back, it is free at once."""
        lock = tmp_path / "rt.lock"
        with (
            realtime_slot(lock),
            pytest.raises(TimeoutError, match=f"^{lock}: another run"),
            realtime_slot(lock, wait_s=0),
        ):
            pass
        with realtime_slot(lock, wait_s=0):
            pass

    def test_a_holder_that_dies_gives_it_back(self, tmp_path: Path) -> None:
        """The kernel releases the lock of a process that ends (a killed test run)."""
        lock = tmp_path / "rt.lock"
        child = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(lock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"held\n"
            with pytest.raises(TimeoutError), realtime_slot(lock, wait_s=0):
                pass
        finally:
            child.kill()
            child.wait(timeout=10)
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
        with realtime_slot(lock, wait_s=0):
            pass
