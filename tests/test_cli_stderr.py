"""A stderr that refuses lines (a full disk, a reader gone) changes no command's exit code.

Rules of this test module:
- every command runs as its own ``python -m agent`` process, its stderr a descriptor that
  refuses every write (``tests.cli_support.refusing_stream``);
- the simulator cannot say it listens on such a stderr: ``vbox-agent host ... status`` finds
  it (the control client's own bounded wait for a host that is still starting), and the
  simulator is reaped in a ``finally``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

from agent.cli._exit import (
    EX_BROKEN_PIPE,
    EX_CONFIG,
    EX_IOERR,
    EX_OK,
    EX_UNAVAILABLE,
)
from tests.cli_support import COMMAND_TIMEOUT_S, REFUSALS, host, refusing_stream

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.cli_support import Refusal

REPOSITORY: Final = Path(__file__).parents[1]


def run_refused(refusal: Refusal, *argv: str, stdout: int = subprocess.DEVNULL) -> int:
    """Run ``python -m agent ARGV`` with a stderr that refuses writes; return its exit code."""
    with refusing_stream(refusal) as stderr:
        return subprocess.run(
            [sys.executable, "-m", "agent", *argv],
            stdout=stdout,
            stderr=stderr,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            cwd=REPOSITORY,
        ).returncode


@pytest.fixture(name="files")
def _files(tmp_path: Path) -> Path:
    """A config with one warning (``warned.toml``), one with a syntax error (``bad.toml``)
    and a regular file (``plain``)."""
    (tmp_path / "warned.toml").write_text("[device]\nioctl_threads = 3\n")
    (tmp_path / "bad.toml").write_text("[device\n")
    (tmp_path / "plain").write_text("not a socket\n")
    return tmp_path


@pytest.mark.parametrize("refusal", REFUSALS)
@pytest.mark.parametrize(
    ("argv", "code"),
    [
        pytest.param(["check-config", "{files}/warned.toml"], EX_OK, id="check-config-warned"),
        pytest.param(["check-config", "{files}/bad.toml"], EX_CONFIG, id="check-config-bad"),
        pytest.param(
            ["run", "--simulate", "--config", "{files}/bad.toml"], EX_CONFIG, id="run-bad"
        ),
        pytest.param(["prop", "--device", "unix:{files}/plain", "get", "/x"], EX_CONFIG, id="prop"),
        pytest.param(["host", "--socket", "{files}/plain", "status"], EX_UNAVAILABLE, id="host"),
        pytest.param(
            ["simulate", "--socket", "{files}/plain/host.sock"], EX_UNAVAILABLE, id="simulate"
        ),
    ],
)
def test_the_exit_code_is_the_commands(
    files: Path, refusal: Refusal, argv: list[str], code: int
) -> None:
    """The line on stderr is lost and the command exits as it decided: a warning still
    passes (so ExecReload= does not fail), a failure keeps its code (check-config, prop, host
    and simulate exited 1 with an OSError for a full disk, 141 for a reader gone)."""
    assert run_refused(refusal, *(word.format(files=files) for word in argv)) == code


@pytest.mark.parametrize(
    ("refusal", "stdout_refusal", "code"),
    [("full", "full", EX_IOERR), ("closed", "full", EX_IOERR), ("full", "closed", EX_BROKEN_PIPE)],
)
def test_an_answer_nobody_can_read_keeps_its_code(
    files: Path, refusal: Refusal, stdout_refusal: Refusal, code: int
) -> None:
    """With stdout refused too, the answer's code stands (74 for a full disk, 141 for a reader
    gone) though neither the warning said before the answer nor the line about the full disk
    can be said (the warning's write ended it: 1 for a full disk, 141 for a reader gone).
    Each stream refuses differently where only that tells the two apart: with a reader gone
    on both, the warning's write ended it with 141 too."""
    with refusing_stream(stdout_refusal) as stdout:
        assert run_refused(refusal, "check-config", f"{files}/warned.toml", stdout=stdout) == code


@pytest.fixture(name="socket_path")
def _socket_path() -> Iterator[Path]:
    """A socket path in a fresh directory short enough for ``AF_UNIX``."""
    with tempfile.TemporaryDirectory(prefix="vbx-say-", dir="/tmp") as directory:
        yield Path(directory) / "host.sock"


@pytest.mark.parametrize("refusal", REFUSALS)
def test_the_simulator_runs_on(socket_path: Path, refusal: Refusal) -> None:
    """``simulate 2>/dev/full`` and ``simulate 2>&1 | head -n 1`` keep serving until
    stopped, then exit 0 and remove the socket (the ``listening`` line that could not be
    written ended the host as it started: exit 1, or 141)."""
    with refusing_stream(refusal) as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "--socket", str(socket_path)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=REPOSITORY,
        )
    try:
        status = host(str(socket_path), "status", "--json")
        assert status.returncode == EX_OK, status.stderr
        assert process.poll() is None, "the simulator ended by itself"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=COMMAND_TIMEOUT_S) == EX_OK
        assert not socket_path.exists()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=COMMAND_TIMEOUT_S)
