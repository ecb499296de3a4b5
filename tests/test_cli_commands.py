"""The command table: every command is reachable, and only the chosen one's module is loaded.

``agent.cli`` imports a command's module only when that command is chosen, so the daemon
(``run``) carries no other command's code. These tests check both halves: each command still
gets its full parser, and a fresh interpreter running one command has loaded no other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from agent.cli import COMMANDS, main
from agent.cli._exit import EX_IOERR
from tests.cli_support import COMMAND_TIMEOUT_S

NAMES = [name for name, _, _ in COMMANDS]
LOADED_COMMANDS = """
import json, sys
from agent.cli import COMMANDS, main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
modules = {f"agent.cli.{module}" for _, module, _ in COMMANDS}
print(json.dumps(sorted(modules & set(sys.modules))), file=sys.stderr)
"""
"""Runs ``vbox-agent ARGS`` in-process, then prints the command modules it loaded."""


@pytest.mark.parametrize("name", NAMES)
def test_each_command_gets_its_own_parser(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``vbox-agent NAME --help`` shows that command's usage, description and options."""
    with pytest.raises(SystemExit) as exited:
        main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: vbox-agent {name} [-h]")
    assert len(usage.split()) > 4, "the command's own arguments are missing"
    description = rest.partition("\n\n")[0]
    assert description, "the command's description is missing"
    assert not description.startswith(("positional arguments", "options")), out


def test_the_top_level_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """``vbox-agent --help`` names every command with its one-line help."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, _, summary in COMMANDS:
        assert f"{name} {summary}" in out


@pytest.mark.parametrize(("name", "module"), [(name, module) for name, module, _ in COMMANDS])
def test_a_command_loads_no_other_commands_module(name: str, module: str) -> None:
    """A fresh ``vbox-agent NAME --help`` imports NAME's module and no other command's."""
    result = subprocess.run(
        [sys.executable, "-c", LOADED_COMMANDS, name, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(result.stderr.splitlines()[-1]) == [f"agent.cli.{module}"], result.stderr


def test_output_nobody_reads_ends_quietly() -> None:
    """``vbox-agent abi --json | true``: the reader is gone, so the command ends with 141 and
    nothing on stderr (it printed a BrokenPipeError traceback)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent", "abi", "--json"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


FULL_DISK_LINE: Final = "vbox-agent: cannot write the output: No space left on device\n"


def run_into_full_disk(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``python -m agent ARGV > /dev/full``; return its exit code and stderr."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "agent", *argv],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            cwd=Path(__file__).parents[1],
            env=env,
        )
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["abi", "--json"],
        ["abi"],
        ["check-config", "config/agent.toml"],
        ["--help"],
        ["--version"],
        ["run", "--help"],
        ["run", "--simulate", "--duration", "0.5"],
    ],
)
def test_output_to_a_full_disk_is_one_line(argv: list[str]) -> None:
    """``> /dev/full``: one line and exit 74 (EX_IOERR), whether the answer is larger than
    the buffer (abi: a traceback, exit 1), written by the last flush (check-config: an
    ignored exception at exit, 120) or argparse's (``--help``, ``--version``: nothing said,
    exit 0). ``run`` ran on without its log and stopped cleanly at the end of its
    ``--duration`` (it ended at its first line with a traceback, exit 1)."""
    assert run_into_full_disk(*argv) == (EX_IOERR, FULL_DISK_LINE)


@pytest.mark.parametrize(
    ("argv", "closed", "code"),
    [
        (["check-config", "config/agent.toml"], 1, 0),
        (["check-config", "/nonexistent.toml"], 2, 78),
        (["run", "--simulate", "--duration", "0.5"], 1, 0),
    ],
)
def test_closed_output_is_no_crash(argv: list[str], closed: int, code: int) -> None:
    """Started with stdout or stderr closed (``>&-``), a command runs and exits as usual;
    what it would write there is lost (it ended with an AttributeError traceback, exit 1)."""
    done = subprocess.run(
        ["/bin/sh", "-c", f'exec "$0" -m agent "$@" {closed}>&-', sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr


PLUGIN_MODULE: Final = """
from pathlib import Path

Path(__file__).with_name("plugin-loaded").touch()


class Plugin:
    def new_schema_validator(self, *args, **kwargs):
        return None, None, None


plugin = Plugin()
"""
"""A pydantic plugin that records being imported (next to itself) and changes nothing."""
ONE_MODEL: Final = "import pydantic\nclass Probe(pydantic.BaseModel):\n    x: int = 0\n"


def test_installed_pydantic_plugins_are_not_loaded(tmp_path: Path) -> None:
    """A package on the path that registers a ``pydantic`` entry point is not imported by
    ``vbox-agent`` (validating the shipped config), while a bare process building one model
    does import it: the agent's validation does not depend on what else is installed."""
    (tmp_path / "fake_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = tmp_path / "fake_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[pydantic]\nfake = fake_plugin:plugin\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("PYDANTIC_DISABLE_PLUGINS", None)  # set here by every test that ran main()
    marker = tmp_path / "plugin-loaded"

    def run(*argv: str) -> None:
        done = subprocess.run(
            [sys.executable, *argv],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
            cwd=Path(__file__).parents[1],
            env=env,
        )
        assert done.returncode == 0, done.stderr

    run("-m", "agent", "check-config", "config/agent.toml")
    assert not marker.exists()
    run("-c", ONE_MODEL)
    assert marker.exists(), "the fake plugin is not found: the test proves nothing"
