"""Helpers for tests that run ``vbox-agent`` commands as real processes.

- every command runs as its own ``python -m agent`` process;
- the simulator is ready when it says so: ``simulate`` prints ``simulated host listening at
  PATH`` on stderr once its socket listens, and ``Simulator`` waits for that line (bounded by
  ``STARTUP_TIMEOUT_S``), never polling the socket;
- the simulator's log lines (JSON: stdout is a file) are kept in ``log_path`` for the test.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Literal

import pytest

from agent.protocol.wire import Hello, Role, encode_frame

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

STARTUP_TIMEOUT_S: Final = 20.0
COMMAND_TIMEOUT_S: Final = 30.0
LISTENING: Final = "simulated host listening at"
WAIT_S: Final = 30.0
"""How long a test of processes waits for what it expects before it fails."""
POLL_S: Final = 0.05
"""How often it looks again."""


Refusal = Literal["full", "closed"]
"""How a stream refuses writes: a full disk (``/dev/full``, ENOSPC) or a pipe whose reader
went away (``| head``, EPIPE)."""
REFUSALS: Final[tuple[Refusal, ...]] = ("full", "closed")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Return once ``condition()`` holds, looking every :data:`POLL_S`; fail the test, naming
    ``what``, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(POLL_S)


@contextmanager
def refusing_stream(refusal: Refusal) -> Iterator[int]:
    """A descriptor for a child's stdout or stderr on which every write fails as ``refusal``
    says; closed after the block."""
    if refusal == "full":
        descriptor = os.open("/dev/full", os.O_WRONLY)
    else:
        read_end, descriptor = os.pipe()
        os.close(read_end)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


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


@contextmanager
def hung_host(path: str) -> Iterator[None]:
    """While the block runs, a host listening at ``path`` that answers every client's HELLO
    and then nothing: what it is sent is read and dropped, as by a host that hangs."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(8)
        stop, stopped = socket.socketpair()
        clients: list[socket.socket] = []

        def serve() -> None:
            while True:
                ready, _, _ = select.select([stopped, listener, *clients], [], [])
                if stopped in ready:
                    return
                for source in ready:
                    if source is listener:
                        client, _ = listener.accept()
                        client.recv(4096)  # its HELLO
                        client.sendall(encode_frame(Hello(Role.HOST)))
                        clients.append(client)
                    elif not source.recv(65536):
                        clients.remove(source)
                        source.close()

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            yield
        finally:
            stop.send(b"x")
            server.join(WAIT_S)
            for client in (*clients, stop, stopped):
                client.close()


class Simulator:
    """A ``vbox-agent simulate`` process, started and waited for until it listens."""

    def __init__(
        self, path: str, log_path: Path, *extra: str, env: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent", "simulate", "--socket", path, *extra],
                stdout=log,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        announced = self._first_stderr_line()
        if not announced.startswith(LISTENING):
            self.process.kill()
            _, rest = self.process.communicate(timeout=COMMAND_TIMEOUT_S)
            pytest.fail(f"the simulator did not start: {announced}{rest}")

    def _first_stderr_line(self) -> str:
        assert self.process.stderr is not None
        ready, _, _ = select.select([self.process.stderr], [], [], STARTUP_TIMEOUT_S)
        return self.process.stderr.readline() if ready else "(nothing within the timeout)"

    def stop(self, signum: int) -> int:
        """Send ``signum``, reap the process and return its exit code."""
        self.process.send_signal(signum)
        self.process.communicate(timeout=COMMAND_TIMEOUT_S)
        return self.process.returncode

    def kill(self) -> bool:
        """Kill the process if it still runs and reap it; return whether it had ended by itself."""
        ended = self.process.poll() is not None
        if not ended:
            self.process.kill()
        self.process.communicate(timeout=COMMAND_TIMEOUT_S)
        return ended

    def log_lines(self) -> list[dict[str, Any]]:
        """The simulator's log lines so far, parsed."""
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]
