"""``vbox-agent simulate`` ending on a failure: of the simulated host, nobody expected, or a
socket path it refuses.

Rules of this test module:
- the command runs in-process (``agent.cli.main``) so that the failure can be injected: the
  socket server is replaced by one that fails once it listens; output is read with ``capsys``
  (``capfd`` where the host's log lines on stdout count);
- the failure ends the run by itself, so nothing waits for a signal.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, NoReturn

import trio

from agent.cli import main
from agent.cli._exit import EX_SOFTWARE, EX_UNAVAILABLE
from agent.host import server

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from agent.host import SimulatedHost


async def _failing_server(
    host: SimulatedHost, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """Listens, then fails as a host error no code path expects would."""
    del host, path
    task_status.started()
    await trio.lowlevel.checkpoint()
    raise OSError(errno.EIO, "the host broke")


def test_an_unexpected_host_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run ends with 70 and one line naming the error, never a traceback."""
    monkeypatch.setattr(server, "serve_simulated_host", _failing_server)
    path = tmp_path / "host.sock"
    assert main(["simulate", "--socket", str(path)]) == EX_SOFTWARE
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"simulated host listening at {path}",
        "vbox-agent simulate: the simulated host failed: OSError: [Errno 5] the host broke",
    ]


def test_the_listening_line_escapes_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A socket path with a byte that is not UTF-8 is named as every other message names it
    (``\\x85``), not as Python's surrogate escape (``\\udc85``)."""
    monkeypatch.setattr(server, "serve_simulated_host", _failing_server)
    path = os.path.join(os.fsdecode(tmp_path), os.fsdecode(b"h\x85.sock"))
    assert main(["simulate", "--socket", path]) == EX_SOFTWARE
    first = capsys.readouterr().err.splitlines()[0]
    assert first == f"simulated host listening at {os.fsdecode(tmp_path)}/h\\x85.sock"


def test_a_path_taken_by_a_file_is_refused_before_the_host_logs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A socket path that a regular file holds is the run's one line, and the host logs
    nothing before it (it logged its start on stdout, then the refusal came)."""
    path = tmp_path / "plain"
    path.write_text("not a socket\n")
    assert main(["simulate", "--socket", str(path)]) == EX_UNAVAILABLE
    out, err = capfd.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"vbox-agent simulate: {path} exists and is not a socket; refusing to replace it"
    ]


def test_a_refused_path_not_utf8_is_named_as_every_command_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A socket path that is refused names a byte that is not UTF-8 ``\\x85``, as the
    listening line does, not as Python's surrogate escape ``\\udc85``."""
    path = os.path.join(os.fsdecode(tmp_path), os.fsdecode(b"h\x85"))
    os.mkdir(path)
    assert main(["simulate", "--socket", path]) == EX_UNAVAILABLE
    assert capsys.readouterr().err.splitlines() == [
        f"vbox-agent simulate: {os.fsdecode(tmp_path)}/h\\x85 exists and is not a socket; "
        "refusing to replace it"
    ]
