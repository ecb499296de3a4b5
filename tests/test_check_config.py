"""Tests of the ``vbox-agent check-config FILE`` command.

Rules of this test module:
- The command is driven through a parser that registers only ``check-config``, so these tests
  do not depend on the other commands; one test runs the real console entry point in a child
  process.
- Output is read with ``capsys``; files are written to ``tmp_path``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli import _check_config
from tests.cli_support import COMMAND_TIMEOUT_S

if TYPE_CHECKING:
    import pytest

SHIPPED = Path(__file__).parents[1] / "config" / "agent.toml"


def check_config(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vbox-agent")
    _check_config.configure(parser.add_subparsers(required=True).add_parser("check-config"))
    args = parser.parse_args(["check-config", *argv])
    code: int = args.handler(args)
    return code


class TestCheckConfig:
    def test_valid_file(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A valid file prints FILE: ok and exits 0."""
        assert check_config(str(SHIPPED)) == 0
        assert capsys.readouterr() == (f"{SHIPPED}: ok\n", "")

    def test_invalid_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """An invalid file prints one line per problem to stderr and exits 78."""
        path = tmp_path / "agent.toml"
        path.write_text('[log]\nlevel = "loud"\n[session_monitor]\nenable = "yes"\n')
        assert check_config(str(path)) == 78
        out, err = capsys.readouterr()
        assert out == ""
        assert err.splitlines() == [
            f"{path}: log.level = \"loud\": must be one of 'debug', 'info', 'warning' or 'error'",
            f'{path}: session_monitor.enable = "yes": must be a valid boolean',
        ]

    def test_missing_file(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A missing file is a config problem (78), not a crash."""
        path = tmp_path / "absent.toml"
        assert check_config(str(path)) == 78
        assert capsys.readouterr().err == f"{path}: cannot read: No such file or directory\n"

    def test_nesting_too_deep(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A value nested deeper than tomllib recurses is one line and 78, not a traceback."""
        path = tmp_path / "agent.toml"
        path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
        assert check_config(str(path)) == 78
        assert capsys.readouterr() == (
            "",
            f"{path}: line 1, column 5: invalid TOML: arrays or tables nested too deeply\n",
        )

    def test_console_entry_point(self, tmp_path: Path) -> None:
        """``python -m agent check-config`` exits 78 with the problem on stderr."""
        path = tmp_path / "agent.toml"
        path.write_text("[daemon]\nshutdown_timeout_s = -1\n")
        result = subprocess.run(
            [sys.executable, "-m", "agent", "check-config", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert (result.returncode, result.stdout) == (78, "")
        assert result.stderr == f"{path}: daemon.shutdown_timeout_s = -1: must be > 0\n"
