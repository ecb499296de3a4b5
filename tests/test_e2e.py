"""End to end: the real agent process against a simulated host in another process.

Rules of this test module:
- Two real processes (``python -m agent simulate`` and ``python -m agent run``) talk over
  a Unix socket in a short /tmp directory; ``python -m agent host`` inspects the host.
- Every wait is bounded (``WAIT_S``) and every process is killed in teardown.
- Agent log lines are JSON (stdout is a pipe), read line by line.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from testbed.realdriver import ENV_LIBRARY
from tests.conftest import KERNEL_PERSONALITY

if TYPE_CHECKING:
    from collections.abc import Iterator

WAIT_S = 20.0
PYTHON = sys.executable


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


class AgentProcess:
    """The agent under test, with its JSON log lines."""

    def __init__(self, socket_path: Path, workdir: Path) -> None:
        self.notify_path = workdir / "notify.sock"
        self.process = subprocess.Popen(
            [PYTHON, "-m", "agent", "run", "--device", f"unix:{socket_path}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.events: list[dict[str, Any]] = []
        self._pending = b""

    def finish(self) -> tuple[int, str]:
        """Kill the agent if it still runs; return its exit code and stderr, closing pipes."""
        if self.process.poll() is None:
            self.process.kill()
        _, stderr = self.process.communicate(timeout=WAIT_S)
        return self.process.returncode, stderr.decode()

    def read_until(self, event: str) -> dict[str, Any]:
        """Return the first log line whose event is ``event``, reading as needed."""
        deadline = time.monotonic() + WAIT_S
        while True:
            for line in self.events:
                if line.get("event") == event:
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"agent never logged {event!r}; saw {[e['event'] for e in self.events]}"
                )
            assert self.process.stdout is not None
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    pytest.fail(f"agent exited before logging {event!r}")
                self._pending += chunk
                *lines, self._pending = self._pending.split(b"\n")
                self.events.extend(json.loads(line) for line in lines if line.strip())


@pytest.fixture(name="workdir")
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vbx-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="host_socket")
def _host_socket(workdir: Path, personality: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A ``simulate`` process of each personality under test (``tests/conftest.py``)."""
    socket_path = workdir / "host.sock"
    env = dict(os.environ)
    if personality == KERNEL_PERSONALITY:
        env[ENV_LIBRARY] = str(request.getfixturevalue("kernel_library"))
    with (workdir / "host.log").open("wb") as log:
        host = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "agent",
                "simulate",
                "--socket",
                str(socket_path),
                "--personality",
                personality,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    _wait_for(socket_path.exists, "the host socket")
    yield socket_path
    exited = host.poll()
    host.kill()
    host.wait(timeout=WAIT_S)
    assert exited is None, (workdir / "host.log").read_text()[-3000:]


@pytest.fixture(name="agent")
def _agent(host_socket: Path, workdir: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(host_socket, workdir)
    yield agent
    agent.finish()


def _host(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "agent", "host", "--socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


def _status(socket_path: Path) -> dict[str, Any]:
    result = _host(socket_path, "status", "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


class TestTwoProcesses:
    """The agent and the simulated host as separate processes."""

    def test_host_sees_what_the_agent_did(
        self, agent: AgentProcess, host_socket: Path, personality: str
    ) -> None:
        """Once ready, the host shows the agent's facility Active and its event filter."""
        agent.read_until("agent_ready")
        status = _status(host_socket)
        assert status["personality"] == personality
        assert status["facilities"]["100"]["status"] == 50
        assert status["filter_mask"] & 0x10

    def test_restore_reaches_the_agent(self, agent: AgentProcess, host_socket: Path) -> None:
        """``host restore`` makes the agent log the new session id the host reports."""
        agent.read_until("agent_ready")
        assert _host(host_socket, "restore").returncode == 0
        restored = agent.read_until("vm_restored")
        assert int(restored["session_id"], 16) == _status(host_socket)["session_id"]

    def test_sigterm_stops_the_agent_cleanly(self, agent: AgentProcess, host_socket: Path) -> None:
        """SIGTERM ends the agent with exit 0 well within 5 s, facility Terminated."""
        agent.read_until("agent_ready")
        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        assert agent.process.wait(timeout=WAIT_S) == 0
        assert time.monotonic() - started < 5.0
        status = _status(host_socket)
        assert status["facilities"]["100"]["status"] == 101
        assert status["hgcm_clients"] == 0

    def test_agent_killed_releases_its_sessions(
        self, agent: AgentProcess, host_socket: Path
    ) -> None:
        """A vanished agent leaves no event filter bits behind at the host."""
        agent.read_until("agent_ready")
        agent.process.kill()
        agent.process.wait(timeout=WAIT_S)
        _wait_for(lambda: not _status(host_socket)["filter_mask"] & 0x10, "the filter release")

    def test_vanished_host_ends_the_agent(self, workdir: Path) -> None:
        """Killing the host makes the agent exit promptly with EX_UNAVAILABLE (69)."""
        socket_path = workdir / "gone.sock"
        host = subprocess.Popen(
            [PYTHON, "-m", "agent", "simulate", "--socket", str(socket_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for(socket_path.exists, "the host socket")
            agent = AgentProcess(socket_path, workdir)
            try:
                agent.read_until("agent_ready")
                host.kill()
                host.wait(timeout=WAIT_S)
                assert agent.process.wait(timeout=WAIT_S) == 69
            finally:
                code, stderr = agent.finish()
            assert code == 69
            assert "vbox-agent:" in stderr
        finally:
            if host.poll() is None:
                host.kill()
                host.wait(timeout=WAIT_S)

    def test_missing_device_exits_69(self, workdir: Path) -> None:
        """No host listening: one line naming the socket, exit 69."""
        result = subprocess.run(
            [PYTHON, "-m", "agent", "run", "--device", f"unix:{workdir / 'none.sock'}"],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
        assert result.returncode == 69
        assert "none.sock" in result.stderr


class TestSimulateDemo:
    """The README's first command."""

    def test_run_simulate_plays_the_demo(self) -> None:
        """``run --simulate --duration`` shows the agent at work and exits 0."""
        result = subprocess.run(
            [PYTHON, "-m", "agent", "run", "--simulate", "--duration", "6"],
            capture_output=True,
            text=True,
            timeout=WAIT_S + 10,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        events = [json.loads(line)["event"] for line in result.stdout.splitlines() if line]
        assert "agent_ready" in events
        assert "scenario_step" in events
        assert events[-1] == "agent_stopped"

    def test_failing_host_exits_69(self, workdir: Path) -> None:
        """A simulated VM whose driver fails to load after a reset: exit 69, as no device."""
        scenario = workdir / "failing.toml"
        scenario.write_text(
            "[[steps]]\nat = 0.5\naction = 'fault'\nrequest = 'GET_HOST_VERSION'\n"
            "status = 'VERR_NOT_SUPPORTED'\n\n"
            "[[steps]]\nat = 0.5\naction = 'reset'\n"
        )
        result = subprocess.run(
            [PYTHON, "-m", "agent", "run", "--simulate", "--scenario", str(scenario)],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )
        assert result.returncode == 69, result.stderr
        assert "GET_HOST_VERSION VERR_NOT_SUPPORTED" in result.stderr
