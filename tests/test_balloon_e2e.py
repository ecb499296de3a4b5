"""The balloon end to end: the real agent process against a simulated host process.

Rules of this test module:
- ``python -m agent simulate`` (each personality) and ``python -m agent run`` talk over a
  Unix socket in a short /tmp directory; ``python -m agent host`` drives and inspects the
  host, as a user would.
- The agent's PSI file is a static file in the test directory (polled, never high), so the
  machine's own memory pressure cannot change the outcome.
- Every wait is bounded (``WAIT_S``) and polls a condition; every process is killed in
  teardown.
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
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

from tests.cli_support import wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

WAIT_S: Final = 30.0
PYTHON: Final = sys.executable
SHUTDOWN_TIMEOUT_S: Final = 5.0
MIB_KB: Final = 1024
KINDS: Final = {
    "mainline": ["--personality", "mainline"],
    "oracle": ["--personality", "oracle"],
    "oracle-r3": ["--personality", "oracle", "--r3-balloon"],
    "passthrough": ["--personality", "passthrough"],
}
AGENT_HOLDS: Final = {"oracle-r3", "passthrough"}
"""Where the chunks are the agent's own locked memory."""


class Vm:
    """A simulated host process and an agent process talking to it."""

    def __init__(
        self, workdir: Path, kind: str, *, retry_s: float = 0.2, agent_stdout: int | None = None
    ) -> None:
        """Start both; the agent logs to ``agent.log`` (stderr with it), or to descriptor
        ``agent_stdout`` with its stderr kept apart (``agent.stderr``). ``retry_s``: the
        balloon's first retry after a failure (the retries end at 1 s or at ``retry_s``,
        whichever is later)."""
        self.workdir = workdir
        self.socket = workdir / "host.sock"
        self._host_log = (workdir / "host.log").open("wb")
        self.host = subprocess.Popen(
            [PYTHON, "-m", "agent", "simulate", "--socket", str(self.socket), *KINDS[kind]],
            stdout=self._host_log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self.socket.exists, "the host socket")
        (workdir / "memory.pressure").write_text(
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        )
        config = workdir / "agent.toml"
        config.write_text(
            f"[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n"
            f'[log]\nformat = "json"\n'
            f'[balloon]\npsi_path = "{workdir / "memory.pressure"}"\n'
            f"retry_initial_s = {retry_s}\nretry_max_s = {max(retry_s, 1.0)}\n"
        )
        self._agent_log = (workdir / "agent.log").open("wb")
        self.agent = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "agent",
                "run",
                "--device",
                f"unix:{self.socket}",
                "--config",
                str(config),
            ],
            stdout=self._agent_log if agent_stdout is None else agent_stdout,
            stderr=subprocess.STDOUT if agent_stdout is None else subprocess.PIPE,
            text=True,
        )

    def command(self, *args: str) -> None:
        result = self._host(*args)
        assert result.returncode == 0, result.stderr

    def _host(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "agent", "host", "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )

    @property
    def chunks(self) -> int:
        result = self._host("status", "--json")
        assert result.returncode == 0, result.stderr
        status: dict[str, Any] = json.loads(result.stdout)
        chunks: int = status["balloon"]["chunks"]
        return chunks

    def wait_chunks(self, chunks: int) -> None:
        wait_until(lambda: self.chunks == chunks, f"{chunks} chunks at the host")

    def log_events(self) -> list[dict[str, Any]]:
        lines = (self.workdir / "agent.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.log_events() if line.get("event") == event]

    def agent_locked_kb(self) -> int:
        status = Path(f"/proc/{self.agent.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmLck:"))
        return int(line.split()[1])

    def stop_agent(self) -> float:
        """SIGTERM the agent; return how long it took to exit. It must exit 0 before any
        deadline of the stop (no drain, report or close given up on: no ``*_abandoned``
        line)."""
        started = time.monotonic()
        self.agent.send_signal(signal.SIGTERM)
        assert self.agent.wait(timeout=WAIT_S) == 0, (self.workdir / "agent.log").read_text()
        took = time.monotonic() - started
        events = [line.get("event", "") for line in self.log_events()]
        assert [event for event in events if event.endswith("_abandoned")] == []
        return took

    def close(self) -> None:
        for process in (self.agent, self.host):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=WAIT_S)
        self._agent_log.close()
        self._host_log.close()


@pytest.fixture(name="workdir")
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vbx-bal-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_vm(workdir: Path, kind: str, *, retry_s: float = 0.2) -> Iterator[Vm]:
    """A host of ``kind`` and a ready agent; both are killed at the end."""
    vm = Vm(workdir, kind, retry_s=retry_s)
    try:
        wait_until(lambda: bool(vm.logged("agent_ready")), "the agent to be ready")
        yield vm
    finally:
        vm.close()


class TestBalloonEndToEnd:
    """`vbox-agent host balloon N` against every driver personality."""

    @pytest.mark.parametrize("kind", list(KINDS))
    def test_follow_fault_and_stop(self, workdir: Path, kind: str) -> None:
        with running_vm(workdir, kind) as vm:
            assert vm.logged("balloon_mode"), "the mode is logged"
            vm.command("balloon", "64")
            vm.wait_chunks(64)
            if kind in AGENT_HOLDS:
                assert vm.agent_locked_kb() >= 64 * MIB_KB
            vm.command("balloon", "16")
            vm.wait_chunks(16)
            if kind in AGENT_HOLDS:
                assert vm.agent_locked_kb() < 64 * MIB_KB
            vm.command("fault", "CHANGE_MEMBALLOON", "VERR_GENERAL_FAILURE")
            vm.command("balloon", "48")
            if kind == "mainline":
                # The kernel stops at the failure and walks again only at the next 0x40.
                wait_until(lambda: vm.chunks == 16, "the kernel to stop")
                vm.command("balloon", "49")
                vm.wait_chunks(49)
            else:
                vm.wait_chunks(48)
                stopped = vm.logged("balloon_walk_stopped") or vm.logged("balloon_check_failed")
                assert stopped
                assert "VERR_GENERAL_FAILURE" in json.dumps(stopped[0])
            vm.stop_agent()
            assert vm.chunks == (49 if kind == "mainline" else 0)

    @pytest.mark.parametrize("kind", ["oracle-r3", "passthrough"])
    def test_sigterm_in_the_middle_of_a_512_mb_walk(self, workdir: Path, kind: str) -> None:
        """SIGTERM while a walk to 512 chunks holds 32 returns exactly those 32 and exits
        within the drain time (issue 8's criterion, on a real process). The walk is held
        there, not raced: after 32 chunks the next inflate fails once and the retry comes
        only after an hour, so no chunk moves until SIGTERM."""
        with running_vm(workdir, kind, retry_s=3600.0) as vm:
            vm.command("balloon", "32")
            vm.wait_chunks(32)
            vm.command("fault", "CHANGE_MEMBALLOON", "VERR_GENERAL_FAILURE")
            vm.command("balloon", "512")
            wait_until(lambda: bool(vm.logged("balloon_walk_stopped")), "the walk to stop")
            [stopped] = vm.logged("balloon_walk_stopped")
            assert (stopped["chunks"], stopped["goal"], stopped["retry_in_s"]) == (32, 512, 3600)
            assert vm.chunks == 32
            assert vm.stop_agent() < SHUTDOWN_TIMEOUT_S
            assert vm.chunks == 0
            assert [line["returned"] for line in vm.logged("balloon_drained")] == [32]


class TestLogReaderGone:
    """The agent's log is a pipe whose reader goes away while the balloon holds chunks."""

    def test_runs_on_and_returns_every_chunk_at_its_stop(self, workdir: Path) -> None:
        """The agent runs on without its log (the balloon still follows the host); SIGTERM
        then drains as always: every chunk goes back to the host, and the agent exits 74 with
        the one line it said when the log first failed (it exited 141 at once, silent,
        leaving the host its 64 chunks)."""
        read_end, write_end = os.pipe()
        vm = Vm(workdir, "passthrough", agent_stdout=write_end)
        os.close(write_end)
        try:
            _read_until(read_end, "agent_ready")
            vm.command("balloon", "64")
            vm.wait_chunks(64)
            os.close(read_end)
            vm.command("balloon", "32")  # logged: to a pipe nobody reads any more
            vm.wait_chunks(32)
            assert vm.agent.poll() is None
            vm.agent.send_signal(signal.SIGTERM)
            _, stderr = vm.agent.communicate(timeout=WAIT_S)
            assert (vm.agent.returncode, stderr) == (
                74,
                "vbox-agent: cannot write the output: Broken pipe\n",
            )
            assert vm.chunks == 0
        finally:
            vm.close()


def _read_until(fd: int, event: str) -> None:
    """Read the agent's log lines from ``fd`` until one says ``event`` (``WAIT_S`` at most)."""
    deadline = time.monotonic() + WAIT_S
    pending = b""
    while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        data = os.read(fd, 65536)
        if not data:
            break
        *lines, pending = (pending + data).split(b"\n")
        if any(line.startswith(b"{") and json.loads(line).get("event") == event for line in lines):
            return
    pytest.fail(f"the agent did not log {event}")
