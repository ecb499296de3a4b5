"""End to end: a log reader that is alive but does not read costs lines, never the agent.

Rules of this test module:
- Two real processes (``python -m agent simulate``, passthrough, heartbeat every 200 ms, and
  ``python -m agent run``) talk over a Unix socket in a short /tmp directory; the agent's
  stdout is a pipe whose read end the test holds open and never reads, its stderr a pipe the
  test reads. The test reads the host's state through the control socket (``call_control``).
- The agent's ``NOTIFY_SOCKET`` is a datagram socket of the test's: each SIGHUP's reload is
  waited for by its ``READY=1``, so the reloads fill the pipe one after the other, never
  merged, until the agent says on stderr that the stream is not reading.
- Every wait is bounded (``WAIT_S``) and polls a condition or waits on a socket; every
  process is killed in teardown.
"""

from __future__ import annotations

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
import trio

from agent.cli._exit import EX_IOERR
from agent.host.control import call_control
from agent.logconfig import NOT_READING
from tests.cli_support import Simulator, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator

WAIT_S: Final = 30.0
SHUTDOWN_TIMEOUT_S: Final = 2.0
HEARTBEAT_MS: Final = 200
BEATS: Final = 10
"""Beats the host must count while the agent's log is stalled."""
MAX_RELOADS: Final = 5000
STALLED: Final = f"vbox-agent: cannot write the output: {NOT_READING}"


def status(socket_path: Path) -> dict[str, Any]:
    """The host's ``status()`` through the control socket."""
    payload: dict[str, object] = {"command": "status"}
    result = trio.run(call_control, socket_path, payload)
    assert isinstance(result, dict)
    return result


def wait_notified(notify: socket.socket, wanted: bytes) -> None:
    """Receive sd_notify messages until one says ``wanted`` (for ``WAIT_S`` at most)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        notify.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            message = notify.recv(4096)
        except TimeoutError:
            pytest.fail(f"no {wanted!r} from the agent")
        if wanted in message.split(b"\n"):
            return


@pytest.fixture(name="workdir")
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vbx-log-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_log_reader_that_does_not_read_holds_nothing_up(workdir: Path) -> None:
    """The agent's stdout is a pipe nobody reads: once its lines fill it and the agent's
    queue, the agent says so once on stderr and drops lines; the heartbeat goes on, the
    balloon follows the host, and SIGTERM ends it within ``shutdown_timeout_s + 1 s`` with
    74, the log still stalled. What the pipe holds is whole lines."""
    sock = workdir / "host.sock"
    host = Simulator(
        str(sock),
        workdir / "host.log",
        "--personality",
        "passthrough",
        "--heartbeat-interval-ms",
        str(HEARTBEAT_MS),
    )
    (workdir / "memory.pressure").write_text(
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    config = workdir / "agent.toml"
    config.write_text(
        f"[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n"
        '[log]\nformat = "json"\n'
        f'[balloon]\npsi_path = "{workdir / "memory.pressure"}"\nmin_available_mb = 0\n'
        '[cpuhotplug]\nsysfs_root = "/nonexistent"\n'
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    read_end, write_end = os.pipe()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config), "--device", f"unix:{sock}"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": str(workdir / "notify")},
    )
    os.close(write_end)
    assert agent.stderr is not None
    try:
        wait_notified(notify, b"READY=1")
        for _ in range(MAX_RELOADS):
            agent.send_signal(signal.SIGHUP)
            wait_notified(notify, b"READY=1")
            if select.select([agent.stderr], [], [], 0)[0]:
                break
        assert agent.stderr.readline().decode().rstrip("\n") == STALLED
        beats = status(sock)["heartbeat"]["beats"]
        wait_until(lambda: status(sock)["heartbeat"]["beats"] >= beats + BEATS, "heartbeats")
        assert status(sock)["heartbeat"]["flatlined"] is False
        balloon: dict[str, object] = {"command": "balloon", "mb": 16}
        trio.run(call_control, sock, balloon)
        wait_until(lambda: status(sock)["balloon"]["acked_mb"] == 16, "the balloon acked")
        stopped = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=WAIT_S)
        assert (code, time.monotonic() - stopped < SHUTDOWN_TIMEOUT_S + 1) == (EX_IOERR, True)
        assert agent.stderr.read() == b""
        held = b"".join(iter(lambda: os.read(read_end, 65536), b""))  # to the end: it exited
        assert held.endswith(b"\n")
        assert all(line.startswith(b"{") for line in held.splitlines())
    finally:
        agent.kill()
        agent.wait(timeout=WAIT_S)
        agent.stderr.close()
        os.close(read_end)
        notify.close()
        host.kill()
