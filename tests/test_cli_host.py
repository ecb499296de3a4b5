"""End-to-end tests of ``vbox-agent simulate`` and ``vbox-agent host`` as two real processes.

Rules of this test module:
- every command runs as its own ``python -m agent`` process; nothing is imported in-process
  but the CLI's constants;
- the socket lives in a short private directory under /tmp (``sun_path`` holds 108 bytes);
- every wait is bounded: subprocess timeouts, and a deadline for the socket to appear;
- the simulator is always reaped: terminated or killed in the fixture's teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Final

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

STARTUP_TIMEOUT_S: Final = 20.0
COMMAND_TIMEOUT_S: Final = 30.0


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m agent ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def host(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``vbox-agent host --socket PATH ARGS``."""
    return agent("host", "--socket", path, *args)


class Simulator:
    """A ``vbox-agent simulate`` process and its socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "--socket", path, "--ram-mb", "1024"],
            stdout=subprocess.DEVNULL,  # the host's logs; never read, so never a full pipe
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _accepts_connections(path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                _, stderr = self.process.communicate(timeout=COMMAND_TIMEOUT_S)
                pytest.fail(f"the simulator did not start: {stderr}")
            time.sleep(0.05)

    def stop(self, signum: int) -> int:
        """Send ``signum``, reap the process and return its exit code."""
        self.process.send_signal(signum)
        self.process.communicate(timeout=COMMAND_TIMEOUT_S)
        return self.process.returncode


def _accepts_connections(path: str) -> bool:
    """Whether something listens at the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


@pytest.fixture(name="socket_path")
def _socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(dir="/tmp", prefix="vbx-")
    yield os.path.join(directory, "host.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(name="simulator")
def _simulator(socket_path: str) -> Iterator[Simulator]:
    simulator = Simulator(socket_path)
    yield simulator
    if simulator.process.returncode is None:
        simulator.stop(signal.SIGKILL)


class TestHostCommands:
    """``vbox-agent host`` controls a running simulator."""

    def test_balloon_and_status(self, simulator: Simulator) -> None:
        """The balloon target set by one process shows in the status another reads."""
        assert host(simulator.path, "balloon", "512").returncode == 0
        status = host(simulator.path, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["balloon"]["target_mb"] == 512
        plain = host(simulator.path, "status")
        assert "personality: passthrough" in plain.stdout.splitlines()
        assert '"target_mb": 512' in plain.stdout

    def test_stats_interval_shows_in_status(self, simulator: Simulator) -> None:
        """The statistics interval set from the command line shows in ``guest_stats``."""
        assert host(simulator.path, "stats-interval", "7").returncode == 0
        status = json.loads(host(simulator.path, "status", "--json").stdout)
        assert status["guest_stats"] == {"interval_s": 7, "reports": 0, "last": None}
        for bad in ("-1", "4294967296", "soon"):
            result = host(simulator.path, "stats-interval", bad)
            assert result.returncode == 64, (bad, result.stderr)
            assert "SECONDS must be an integer in [0, 4294967295]" in result.stderr

    def test_balloon_too_big(self, simulator: Simulator) -> None:
        """A target of 90 % of RAM or more is refused with one line and exit 1."""
        refused = host(simulator.path, "balloon", "1000")
        assert refused.returncode == 1
        assert len(refused.stderr.strip().splitlines()) == 1

    def test_properties(self, simulator: Simulator) -> None:
        """Properties set from the command line read back, with flags in --json."""
        assert host(simulator.path, "prop", "set", "/VM/x", "hello").returncode == 0
        assert host(simulator.path, "prop", "get", "/VM/x").stdout == "hello\n"
        assert (
            host(simulator.path, "prop", "set", "/VM/y", "v", "--flags", "TRANSIENT").returncode
            == 0
        )
        got = json.loads(host(simulator.path, "prop", "get", "/VM/y", "--json").stdout)
        assert got["value"] == "v"
        assert "TRANSIENT" in got["flags"]
        assert host(simulator.path, "prop", "delete", "/VM/x").returncode == 0
        missing = host(simulator.path, "prop", "get", "/VM/x")
        assert missing.returncode == 1
        assert "/VM/x" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1

    def test_events_faults_delays(self, simulator: Simulator) -> None:
        """Events, faults, delays, restore and drop are accepted; bad names exit 64."""
        for args in (
            ("event", "RESTORED"),
            ("event", "0x10"),
            ("fault", "CHANGE_MEMBALLOON", "VERR_NO_MEMORY", "--count", "2"),
            ("fault", "113", "-8"),
            ("delay", "GUEST_HEARTBEAT", "0.5"),
            ("restore",),
        ):
            result = host(simulator.path, *args)
            assert result.returncode == 0, (args, result.stderr)
        assert host(simulator.path, "drop").stdout == "dropped 0 device connection(s)\n"
        for args in (
            ("event", "NOPE"),
            ("fault", "NOPE", "VERR_NO_MEMORY"),
            ("fault", "CHANGE_MEMBALLOON", "VERR_NOPE"),
            ("fault", "CHANGE_MEMBALLOON", "VERR_NO_MEMORY", "--count", "0"),
            ("delay", "GUEST_HEARTBEAT", "-1"),
            ("balloon", "lots"),
        ):
            result = host(simulator.path, *args)
            assert result.returncode == 64, (args, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1


class TestSimulatorLifecycle:
    """The simulator starts, refuses bad arguments, and stops cleanly."""

    def test_sigterm_exits_zero_and_removes_the_socket(self, simulator: Simulator) -> None:
        """SIGTERM ends the simulator with exit 0 and no socket left behind."""
        assert simulator.stop(signal.SIGTERM) == 0
        assert not os.path.exists(simulator.path)

    def test_sigint_exits_zero(self, simulator: Simulator) -> None:
        """SIGINT ends the simulator with exit 0 too."""
        assert simulator.stop(signal.SIGINT) == 0
        assert not os.path.exists(simulator.path)

    def test_killed_simulator(self, simulator: Simulator) -> None:
        """After kill -9, a client call fails with one line and exit 69."""
        assert simulator.stop(signal.SIGKILL) == -signal.SIGKILL
        result = host(simulator.path, "status")
        assert result.returncode == 69
        assert simulator.path in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1

    def test_second_simulator_on_a_live_socket(self, simulator: Simulator) -> None:
        """A second simulator on the same socket exits 69 and the first keeps serving."""
        second = agent("simulate", "--socket", simulator.path)
        assert second.returncode == 69
        assert "already listening" in second.stderr
        assert host(simulator.path, "status").returncode == 0

    def test_stale_socket_after_kill_is_replaced(self, simulator: Simulator) -> None:
        """A new simulator replaces the socket a killed one left behind."""
        simulator.stop(signal.SIGKILL)
        assert os.path.exists(simulator.path)
        replacement = Simulator(simulator.path)
        try:
            assert host(simulator.path, "status").returncode == 0
        finally:
            assert replacement.stop(signal.SIGTERM) == 0

    def test_no_simulator(self, socket_path: str) -> None:
        """Without a simulator the host command exits 69 with one line."""
        result = host(socket_path, "status")
        assert result.returncode == 69
        assert "no simulated host" in result.stderr

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (("--ram-mb", "0"), "--ram-mb must be an integer >= 1"),
            (("--heartbeat-interval-ms", "10"), "--heartbeat-interval-ms must be an integer >= 50"),
            (("--ram-mb", "many"), "--ram-mb must be an integer"),
        ],
    )
    def test_usage_errors(self, socket_path: str, args: tuple[str, ...], message: str) -> None:
        """Bad simulator arguments exit 64 with a clear message and create no socket."""
        result = agent("simulate", "--socket", socket_path, *args)
        assert result.returncode == 64
        assert message in result.stderr
        assert not os.path.exists(socket_path)
