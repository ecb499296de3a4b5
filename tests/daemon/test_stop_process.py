"""The real agent process stops in time when the host stops answering, even mid-start.

Rules of this test module:
- Three kinds of real processes over a Unix socket in a short /tmp directory:
  ``vbox-agent simulate`` (the host), ``vbox-agent run --device unix:...`` (the agent, with
  ``NOTIFY_SOCKET`` pointing at a datagram socket of the test) and ``vbox-agent host``.
- Every wait is bounded and waits on a condition (a socket path, a datagram, an exit);
  every process is killed in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

from agent.protocol import Facility, FacilityStatus

if TYPE_CHECKING:
    from collections.abc import Iterator

WAIT_S: Final = 20.0
PYTHON: Final = sys.executable
SHUTDOWN_TIMEOUT_S: Final = 1.0
EXIT_BOUND_S: Final = SHUTDOWN_TIMEOUT_S + 1.0
"""What the daemon promises: exit within ``shutdown_timeout_s + 1 s``."""


@pytest.fixture(name="workdir")
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vbx-stop-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _simulated_host(path: Path, personality: str) -> Iterator[Path]:
    """A ``vbox-agent simulate`` process listening at ``path``, killed on exit."""
    host = subprocess.Popen(
        [PYTHON, "-m", "agent", "simulate", "--socket", str(path), "--personality", personality],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while not path.exists():
            assert host.poll() is None, "the simulated host exited"
            assert time.monotonic() < deadline, "the host socket never appeared"
            time.sleep(0.02)
        yield path
    finally:
        host.kill()
        host.wait(timeout=WAIT_S)


@pytest.fixture(name="host_socket")
def _host_socket(workdir: Path) -> Iterator[Path]:
    with _simulated_host(workdir / "host.sock", "mainline") as path:
        yield path


@pytest.fixture(name="passthrough_socket")
def _passthrough_socket(workdir: Path) -> Iterator[Path]:
    with _simulated_host(workdir / "host.sock", "passthrough") as path:
        yield path


def _start_agent(workdir: Path, host_socket: Path, config_text: str) -> subprocess.Popen[bytes]:
    """``vbox-agent run`` on ``host_socket`` with ``config_text``, JSON lines on stdout."""
    config = workdir / "agent.toml"
    config.write_text(f'{config_text}[log]\nformat = "json"\n')
    return subprocess.Popen(
        [PYTHON, "-m", "agent", "run", "--config", str(config), "--device", f"unix:{host_socket}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, NOTIFY_SOCKET=str(workdir / "notify.sock")),
    )


def _read_until(agent: subprocess.Popen[bytes], event: str) -> bytes:
    """Read the agent's stdout up to the end of the line logging ``event``; return it all."""
    assert agent.stdout is not None
    read = b""
    deadline = time.monotonic() + WAIT_S
    while not any(json.loads(line)["event"] == event for line in read.split(b"\n")[:-1]):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the agent never logged {event}"
        ready, _, _ = select.select([agent.stdout], [], [], remaining)
        if ready:
            chunk = os.read(agent.stdout.fileno(), 65536)
            assert chunk, f"the agent exited before logging {event}"
            read += chunk
    return read


def _events(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.decode().splitlines() if line]


def _receive_until(notify: socket.socket, wanted: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        notify.settimeout(max(0.01, deadline - time.monotonic()))
        lines = notify.recv(4096).decode().split("\n")
        if wanted in lines:
            return


def _exit(agent: subprocess.Popen[bytes], began: float) -> tuple[int, float]:
    """Wait for ``agent`` to exit (``WAIT_S`` at most: the test's assert judges the bound,
    not this wait); return its exit code and the seconds from ``began`` to the exit, read
    as the exit happens (its pidfd turns readable), not at ``Popen.wait``'s next poll, up to
    50 ms later."""
    pidfd = os.pidfd_open(agent.pid)
    try:
        exited, _, _ = select.select([pidfd], [], [], WAIT_S)
        took = time.monotonic() - began
    finally:
        os.close(pidfd)
    assert exited, f"the agent did not exit within {WAIT_S:g} s"
    return agent.wait(timeout=WAIT_S), took


def _host(socket_path: Path, *args: str) -> str:
    return subprocess.run(
        [PYTHON, "-m", "agent", "host", "--socket", str(socket_path), *args],
        capture_output=True,
        timeout=WAIT_S,
        check=True,
        text=True,
    ).stdout


def test_exit_in_time_when_a_host_request_never_completes(workdir: Path, host_socket: Path) -> None:
    """Facility reports hang at the host for 60 s; SIGTERM still ends the agent in time."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(workdir / "notify.sock"))
        agent = _start_agent(
            workdir, host_socket, f"[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n"
        )
        try:
            _receive_until(notify, "READY=1")
            _host(host_socket, "delay", "REPORT_GUEST_STATUS", "60")
            began = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            code, took = _exit(agent, began)
        finally:
            agent.kill()
            stdout, stderr = agent.communicate(timeout=WAIT_S)
    assert code == 0, stderr.decode()
    assert took < EXIT_BOUND_S
    events = [json.loads(line)["event"] for line in stdout.decode().splitlines() if line]
    assert events.count("facility_report_abandoned") == 2  # Terminating and Terminated
    assert events[-1] == "agent_stopped"


def test_exit_in_time_when_stopped_while_a_start_waits_for_the_host(
    workdir: Path, passthrough_socket: Path
) -> None:
    """The host holds the heartbeat's configure requests for 60 s; SIGTERM during the
    heartbeat's start cancels the start, its drain asks the host to switch the check off
    and is abandoned at the drain deadline, and the agent still ends in time."""
    _host(passthrough_socket, "delay", "HEARTBEAT_CONFIGURE", "60")
    # The heartbeat is the first subscriber: the pump opens its waiter once it has begun.
    text = (
        f"[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n[session_monitor]\nenable = false\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(workdir / "notify.sock"))
        agent = _start_agent(workdir, passthrough_socket, text)
        try:
            before = _read_until(agent, "event_waiter_opened")
            began = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            code, took = _exit(agent, began)
        finally:
            agent.kill()
            stdout, stderr = agent.communicate(timeout=WAIT_S)
    assert code == 0, stderr.decode()
    assert took < EXIT_BOUND_S
    events = _events(before + stdout)
    assert not any(entry["event"] == "agent_ready" for entry in events)
    abandoned = [entry for entry in events if entry["event"] == "service_drain_abandoned"]
    assert [entry["service"] for entry in abandoned] == ["heartbeat"]
    assert events[-1]["event"] == "agent_stopped"
    status = json.loads(_host(passthrough_socket, "status", "--json"))
    assert (
        status["facilities"][str(int(Facility.VBOX_SERVICE))]["status"] == FacilityStatus.TERMINATED
    )
