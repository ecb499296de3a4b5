"""Tests of ``agent.config``: the models, the loader and its one-line problems.

Rules of this test module:
- Config files are written to ``tmp_path``; the shipped ``config/agent.toml`` is only read.
- A problem line is asserted whole where its wording is the point, so messages stay exact.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import (
    AgentConfig,
    ConfigError,
    DaemonConfig,
    DeviceConfig,
    EventsConfig,
    LogConfig,
    load_config,
)
from agent.protocol import AgentError

SHIPPED = Path(__file__).parents[1] / "config" / "agent.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


class TestShippedFile:
    def test_equals_the_defaults(self) -> None:
        """config/agent.toml loads to exactly the built-in defaults."""
        assert load_config(SHIPPED) == AgentConfig()

    def test_lists_every_field(self) -> None:
        """config/agent.toml sets every key of every section explicitly."""
        data = tomllib.loads(SHIPPED.read_text())
        assert set(data) == set(AgentConfig.model_fields)
        for name in AgentConfig.model_fields:
            section = getattr(AgentConfig(), name)
            assert set(data[name]) == set(type(section).model_fields), name


class TestModels:
    def test_defaults(self) -> None:
        """The defaults are the documented values."""
        config = AgentConfig()
        assert config.device == DeviceConfig(path="/dev/vboxguest", ioctl_threads=4)
        assert config.events == EventsConfig(subscriber_queue=16)
        assert config.daemon == DaemonConfig(
            shutdown_timeout_s=5.0,
            restart_backoff_initial_s=1.0,
            restart_backoff_max_s=30.0,
            restart_budget=5,
            restart_window_s=60.0,
        )
        assert config.log == LogConfig(level="info", format="auto")

    def test_frozen(self) -> None:
        """A loaded config cannot be changed in place."""
        config = AgentConfig()
        with pytest.raises(ValidationError):
            config.log.level = "debug"  # type: ignore[misc]

    def test_unix_device_spec(self) -> None:
        """A unix: device spec with an absolute socket path is accepted."""
        assert DeviceConfig(path="unix:/run/sim.sock").path == "unix:/run/sim.sock"

    def test_integer_accepted_for_duration(self, tmp_path: Path) -> None:
        """An integer is a valid number of seconds."""
        config = load_config(write(tmp_path, "[daemon]\nshutdown_timeout_s = 3\n"))
        assert config.daemon.shutdown_timeout_s == 3.0

    def test_partial_file_keeps_other_defaults(self, tmp_path: Path) -> None:
        """Keys left out of the file keep their defaults."""
        config = load_config(write(tmp_path, '[log]\nlevel = "debug"\n'))
        assert config == AgentConfig(log=LogConfig(level="debug"))


class TestProblems:
    def test_is_an_agent_error(self, tmp_path: Path) -> None:
        """ConfigError belongs to the agent's exception tree and lists its problems."""
        with pytest.raises(AgentError, match="unknown key"):
            load_config(write(tmp_path, "x = 1\n"))

    def test_unknown_key(self, tmp_path: Path) -> None:
        """An unknown key names the allowed keys of its section."""
        path = write(tmp_path, "[daemon]\nshutdown_timeout = 5\n")
        assert problems_of(path) == [
            f"{path}: daemon.shutdown_timeout = 5: unknown key; allowed keys: "
            "shutdown_timeout_s, restart_backoff_initial_s, restart_backoff_max_s, "
            "restart_budget, restart_window_s"
        ]

    def test_unknown_section(self, tmp_path: Path) -> None:
        """An unknown section names the allowed sections."""
        path = write(tmp_path, "[heartbeat]\ninterval_s = 5\n")
        assert problems_of(path) == [
            f"{path}: heartbeat = {{...}}: unknown key; allowed keys: device, events, daemon, log"
        ]

    def test_out_of_range(self, tmp_path: Path) -> None:
        """A value outside its range says which bound it breaks."""
        path = write(tmp_path, "[daemon]\nshutdown_timeout_s = 0\n")
        assert problems_of(path) == [f"{path}: daemon.shutdown_timeout_s = 0: must be > 0"]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("[device]\nioctl_threads = 65\n", "device.ioctl_threads = 65: must be <= 64"),
            ("[events]\nsubscriber_queue = 0\n", "events.subscriber_queue = 0: must be >= 1"),
            (
                "[daemon]\nshutdown_timeout_s = 61\n",
                "daemon.shutdown_timeout_s = 61: must be <= 60",
            ),
            (
                "[daemon]\nrestart_window_s = inf\n",
                "daemon.restart_window_s = inf: must be a finite number",
            ),
            (
                "[daemon]\nrestart_backoff_initial_s = 10\nrestart_backoff_max_s = 5\n",
                "daemon.restart_backoff_max_s = 5: must be >= restart_backoff_initial_s (10)",
            ),
        ],
    )
    def test_limits(self, tmp_path: Path, text: str, expected: str) -> None:
        """Each limit is enforced and named in the problem."""
        path = write(tmp_path, text)
        assert problems_of(path) == [f"{path}: {expected}"]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                '[events]\nsubscriber_queue = "4"\n',
                'events.subscriber_queue = "4": must be a valid integer',
            ),
            (
                "[daemon]\nrestart_budget = true\n",
                "daemon.restart_budget = true: must be a valid integer",
            ),
            (
                "[device]\nioctl_threads = 2.0\n",
                "device.ioctl_threads = 2.0: must be a valid integer",
            ),
            ("log = 3\n", "log = 3: must be a table"),
            (
                '[log]\nlevel = "loud"\n',
                "log.level = \"loud\": must be one of 'debug', 'info', 'warning' or 'error'",
            ),
            (
                '[device]\npath = "dev/vboxguest"\n',
                'device.path = "dev/vboxguest": must be an absolute path (/dev/vboxguest) '
                "or unix:/absolute/socket/path",
            ),
        ],
    )
    def test_wrong_type(self, tmp_path: Path, text: str, expected: str) -> None:
        """A value of the wrong type is rejected, not converted."""
        path = write(tmp_path, text)
        assert problems_of(path) == [f"{path}: {expected}"]

    def test_every_problem_is_reported(self, tmp_path: Path) -> None:
        """All problems of a file are reported at once, one line each."""
        path = write(tmp_path, '[log]\nlevel = "loud"\nformat = "xml"\n[events]\nx = 1\n')
        problems = problems_of(path)
        assert [line.split(" = ")[0] for line in problems] == [
            f"{path}: events.x",
            f"{path}: log.level",
            f"{path}: log.format",
        ]

    def test_syntax_error_names_line_and_column(self, tmp_path: Path) -> None:
        """A TOML syntax error names its line and column."""
        path = write(tmp_path, "[log]\nlevel = debug\n")
        assert problems_of(path) == [f"{path}: line 2, column 9: invalid TOML: Invalid value"]

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file names the path and the OS's reason."""
        path = tmp_path / "absent.toml"
        assert problems_of(path) == [f"{path}: cannot read: No such file or directory"]

    def test_directory(self, tmp_path: Path) -> None:
        """A directory given as the file names the OS's reason."""
        assert problems_of(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 text is reported, not raised as a decode error."""
        path = tmp_path / "agent.toml"
        path.write_bytes(b'[log]\nlevel = "\xff"\n')
        [problem] = problems_of(path)
        assert problem.startswith(f"{path}: not UTF-8 text:")
