"""The real agent process stops in time when the host stops answering.

Rules of this test module:
- Three kinds of real processes over a Unix socket in a short /tmp directory:
  ``vbox-agent simulate`` (the host), ``vbox-agent run --device unix:...`` (the agent, with
  ``NOTIFY_SOCKET`` pointing at a datagram socket of the test) and ``vbox-agent host``.
- Every wait is bounded and waits on a condition (a socket path, a datagram, an exit);
  every process is killed in teardown.
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
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

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


@pytest.fixture(name="host_socket")
def _host_socket(workdir: Path) -> Iterator[Path]:
    path = workdir / "host.sock"
    host = subprocess.Popen(
        [PYTHON, "-m", "agent", "simulate", "--socket", str(path), "--personality", "mainline"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert host.poll() is None, "the simulated host exited"
        assert time.monotonic() < deadline, "the host socket never appeared"
        time.sleep(0.02)
    yield path
    host.kill()
    host.wait(timeout=WAIT_S)


def _receive_until(notify: socket.socket, wanted: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        notify.settimeout(max(0.01, deadline - time.monotonic()))
        lines = notify.recv(4096).decode().split("\n")
        if wanted in lines:
            return


def _host(socket_path: Path, *args: str) -> None:
    subprocess.run(
        [PYTHON, "-m", "agent", "host", "--socket", str(socket_path), *args],
        capture_output=True,
        timeout=WAIT_S,
        check=True,
    )


def test_exit_in_time_when_a_host_request_never_completes(workdir: Path, host_socket: Path) -> None:
    """Facility reports hang at the host for 60 s; SIGTERM still ends the agent in time."""
    config = workdir / "agent.toml"
    config.write_text(
        f'[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n[log]\nformat = "json"\n'
    )
    notify_path = workdir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        agent = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "agent",
                "run",
                "--config",
                str(config),
                "--device",
                f"unix:{host_socket}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)),
        )
        try:
            _receive_until(notify, "READY=1")
            _host(host_socket, "delay", "REPORT_GUEST_STATUS", "60")
            began = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=EXIT_BOUND_S)
            took = time.monotonic() - began
        finally:
            agent.kill()
            stdout, stderr = agent.communicate(timeout=WAIT_S)
    assert code == 0, stderr.decode()
    assert took < EXIT_BOUND_S
    events = [json.loads(line)["event"] for line in stdout.decode().splitlines() if line]
    assert events.count("facility_report_abandoned") == 2  # Terminating and Terminated
    assert events[-1] == "agent_stopped"
