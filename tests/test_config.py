"""Tests of ``agent.config``: the models, the loader and its one-line problems.

Rules of this test module:
- Config files are written to ``tmp_path``; the shipped ``config/agent.toml`` is only read.
- A problem line is asserted whole where its wording is the point, so messages stay exact.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args, get_origin

import annotated_types
import pytest
from pydantic import BaseModel, Field, ValidationError

from agent.cli._exit import EX_CONFIG, EX_USAGE
from agent.config import (
    CORE_SECTIONS,
    LISTED_PROBLEMS,
    MAX_IOCTL_THREADS,
    MAX_SHUTDOWN_TIMEOUT_S,
    MIN_IOCTL_THREADS,
    OTHER_THREADS,
    AgentConfig,
    ConfigError,
    DaemonConfig,
    DeviceConfig,
    LogConfig,
    load_config,
)
from agent.daemon.daemon import REPORT_TIMEOUT_S, START_WAIT_S
from agent.daemon.notify import STATE_SEND_TIMEOUT_S
from agent.device.claimname import CLAIM_ASK_PAUSE_S, CLAIM_ASK_TRIES
from agent.protocol import AgentError
from agent.protocol.errors import SHOWN_SIZE
from agent.services import ServiceSection
from agent.services.registry import section_models
from agent.tomltext import MAX_TOML_BYTES, parse_toml

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic.fields import FieldInfo

SHIPPED = Path(__file__).parents[1] / "config" / "agent.toml"
UNIT = Path(__file__).parents[1] / "systemd" / "vbox-agent.service"


class GadgetSection(ServiceSection):
    """A throw-away service section."""

    interval_s: float = Field(default=2.0, gt=0)
    label: str = "gadget"


GADGET = {"gadget": GadgetSection}
HUGE = "1" + "0" * 400
"""An integer past the largest float (about 1.8e308)."""
LONG_RUN = "1" * 4400
"""Digits enough for an integer too long to read, in a comment or a string here."""
KEY_OF_20_000 = ".".join(["a"] * 20_000) + " = 1"
"""One key of 20 000 dotted parts: 40 KB that tomllib took 8 s to read."""
STRINGS_AND_COMMENTS = '''\
s = "a.b.c.d.e \\" # 'f.g.h.i.j" # k.l.m.n.o's
t = 'a.b.c.d.e "f.g.h.i.j'
u = """a.b.c.d.e \\""" "f.g.h.i.j" \'\'\' \\
k.l.m.n.o""""
v = \'\'\'a.b.c.d.e """ f.g.h.i.j\'\' """
k.l.m.n.o\'\'\'\'\'
# a.b.c.d.e "f.g.h.i.j 'k.l.m.n.o
w = ["a.b.c.d.e", 'f.g.h.i.j', {x = "k.l.m.n.o"}]
'''
"""Dots and quotes in strings of every kind and in comments: none of them is a key's."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def problems_of(
    path: Path, sections: Mapping[str, type[ServiceSection]] | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, sections or {})
    return info.value.problems


class TestShippedFile:
    def test_equals_the_defaults(self) -> None:
        """config/agent.toml loads to exactly the built-in defaults, services' included."""
        models = section_models()
        defaults = AgentConfig(services={name: model() for name, model in models.items()})
        assert load_config(SHIPPED, models) == defaults

    def test_lists_every_field(self) -> None:
        """config/agent.toml sets every key of every section explicitly, services' too."""
        data = tomllib.loads(SHIPPED.read_text())
        models = section_models()
        assert set(data) == {*CORE_SECTIONS, *models}
        for name in CORE_SECTIONS:
            section = getattr(AgentConfig(), name)
            assert set(data[name]) == set(type(section).model_fields), name
        for name, model in models.items():
            assert set(data[name]) == set(model.model_fields), name

    def test_states_every_limit(self) -> None:
        """The comment above each key of config/agent.toml states every bound the model puts
        on it (``> 0``, ``>= 1``, ``at most 13``, or ``0.5..10``) and every allowed word."""
        missing = [
            f"{section}.{key}: {wanted}"
            for section, key, field in _fields()
            for wanted in _stated_limits(field)
            if not any(form in _comment_above(section, key) for form in wanted)
        ]
        assert missing == []


def _fields() -> list[tuple[str, str, FieldInfo]]:
    """Every (section, key, field) of the shipped file's models, services' included."""
    models: dict[str, type[BaseModel]] = {
        name: type(getattr(AgentConfig(), name)) for name in CORE_SECTIONS
    }
    models.update(section_models())
    return [
        (section, key, field)
        for section, model in models.items()
        for key, field in model.model_fields.items()
    ]


def _stated_limits(field: FieldInfo) -> list[tuple[str, ...]]:
    """For each bound or allowed word of ``field``: the ways the file may state it."""
    wanted: list[tuple[str, ...]] = []
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Gt):
            wanted.append((f"> {_number(bound.gt)}",))
        elif isinstance(bound, annotated_types.Ge):
            wanted.append((f">= {_number(bound.ge)}", f"({_number(bound.ge)}.."))
        elif isinstance(bound, annotated_types.Le):
            wanted.append((f"at most {_number(bound.le)}", f"..{_number(bound.le)}"))
        elif isinstance(bound, annotated_types.Lt):
            wanted.append((f"< {_number(bound.lt)}",))
    if get_origin(field.annotation) is Literal:
        wanted.extend((f'"{word}"',) for word in get_args(field.annotation))
    return wanted


def _number(value: object) -> str:
    """A bound as the file states it: an integer in full (3600000), a float in its shortest
    exact form (0.5, 4294967.294; 3600 for 3600.0)."""
    return str(value) if isinstance(value, int) else repr(value).removesuffix(".0")


def _comment_above(section: str, key: str) -> str:
    """The comment lines right above ``key = ...`` in section ``[section]`` of the file."""
    lines = SHIPPED.read_text().splitlines()
    start = lines.index(f"[{section}]")
    at = next(i for i in range(start, len(lines)) if lines[i].startswith(f"{key} = "))
    above = itertools.takewhile(lambda line: line.startswith("#"), reversed(lines[start:at]))
    return " ".join(line.removeprefix("#").strip() for line in reversed(list(above)))


class TestModels:
    def test_defaults(self) -> None:
        """The defaults are the documented values."""
        config = AgentConfig()
        assert config.device == DeviceConfig(path="/dev/vboxguest", ioctl_threads=5)
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

    def test_the_old_minimum_of_ioctl_threads_is_read_as_the_new_one_with_a_warning(
        self, tmp_path: Path
    ) -> None:
        """3, the documented minimum before VMMDev requests kept a thread of their own, still
        loads (an upgrade must not leave the guest without an agent): read as 4, with one
        warning naming the file, the key, both minimums and why; a file without it has none."""
        path = write(tmp_path, "[device]\nioctl_threads = 3\n")
        config = load_config(path)
        assert config.device.ioctl_threads == MIN_IOCTL_THREADS == 4
        assert config.warnings == (
            f"{path}: device.ioctl_threads = 3: deprecated, 4 used: the minimum is 4 (was 3) "
            "since VMMDev requests (the heartbeat, the balloon) keep a thread no HGCM call may "
            "take; set 4 or more",
        )
        assert load_config(write(tmp_path, "[device]\nioctl_threads = 4\n")).warnings == ()

    def test_partial_file_keeps_other_defaults(self, tmp_path: Path) -> None:
        """Keys left out of the file keep their defaults."""
        config = load_config(write(tmp_path, '[log]\nlevel = "debug"\n'))
        assert config == AgentConfig(log=LogConfig(level="debug"))


class TestProblems:
    def test_is_an_agent_error(self, tmp_path: Path) -> None:
        """ConfigError belongs to the agent's exception tree and lists its problems."""
        with pytest.raises(AgentError, match="unknown section"):
            load_config(write(tmp_path, "x = 1\n"))

    def test_unknown_key(self, tmp_path: Path) -> None:
        """An unknown key names the allowed keys of its section."""
        path = write(tmp_path, "[daemon]\nshutdown_timeout = 5\n")
        assert problems_of(path) == [
            f"{path}: daemon.shutdown_timeout = 5: unknown key (did you mean shutdown_timeout_s?); "
            "allowed keys: shutdown_timeout_s, restart_backoff_initial_s, restart_backoff_max_s, "
            "restart_budget, restart_window_s"
        ]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("[log]\nlvl = 1\n", "log.lvl = 1: unknown key (did you mean level?)"),
            ("[log]\nLevel = 1\n", "log.Level = 1: unknown key (did you mean level?)"),
            ("[Log]\nlevel = 1\n", "Log = {...}: unknown section (did you mean log?)"),
            ("[daemon]\nx = 1\n", "daemon.x = 1: unknown key; allowed keys: shutdown_timeout_s,"),
            ("[heartbeat]\n", "heartbeat = {}: unknown section; allowed sections: device,"),
        ],
    )
    def test_unknown_name_suggests_the_closest_allowed_one(
        self, tmp_path: Path, text: str, expected: str
    ) -> None:
        """A typo of an allowed key or section names it first; a name like none has no hint."""
        path = write(tmp_path, text)
        (problem,) = problems_of(path)
        assert problem.startswith(f"{path}: {expected}")

    def test_unknown_section(self, tmp_path: Path) -> None:
        """An unknown section names the allowed sections."""
        path = write(tmp_path, "[heartbeat]\ninterval_s = 5\n")
        assert problems_of(path) == [
            f"{path}: heartbeat = {{...}}: unknown section; allowed sections: device, daemon, log"
        ]

    def test_unknown_section_names_the_services(self, tmp_path: Path) -> None:
        """The allowed sections include every service section the loader was given."""
        path = write(tmp_path, "[events]\nsubscriber_queue = 16\n")
        assert problems_of(path, GADGET) == [
            f"{path}: events = {{...}}: unknown section; allowed sections: "
            "device, daemon, log, gadget"
        ]

    def test_out_of_range(self, tmp_path: Path) -> None:
        """A value outside its range says which bound it breaks."""
        path = write(tmp_path, "[daemon]\nshutdown_timeout_s = 0\n")
        assert problems_of(path) == [f"{path}: daemon.shutdown_timeout_s = 0: must be > 0"]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("[device]\nioctl_threads = 81\n", "device.ioctl_threads = 81: must be <= 80"),
            ("[device]\nioctl_threads = 2\n", "device.ioctl_threads = 2: must be >= 4"),
            (
                "[daemon]\nshutdown_timeout_s = 14\n",
                "daemon.shutdown_timeout_s = 14: must be <= 13",
            ),
            (
                "[daemon]\nrestart_budget = 10001\n",
                "daemon.restart_budget = 10001: must be <= 10000",
            ),
            (
                "[daemon]\nrestart_window_s = inf\n",
                "daemon.restart_window_s = inf: must be a finite number",
            ),
            (
                "[daemon]\nrestart_backoff_initial_s = 10\nrestart_backoff_max_s = 5\n",
                "daemon.restart_backoff_max_s = 5: must be >= restart_backoff_initial_s (10)",
            ),
            # an order broken by a default is named on the key the file set (it passed)
            (
                "[daemon]\nrestart_backoff_initial_s = 100\n",
                "daemon.restart_backoff_initial_s = 100: must be <= restart_backoff_max_s (30)",
            ),
            (
                "[daemon]\nrestart_backoff_max_s = 0.5\n",
                "daemon.restart_backoff_max_s = 0.5: must be >= restart_backoff_initial_s (1)",
            ),
            (
                "[balloon]\nretry_initial_s = 100\n",
                "balloon.retry_initial_s = 100: must be <= retry_max_s (60)",
            ),
            (
                "[balloon]\nretry_initial_s = 10\nretry_max_s = 5\n",
                "balloon.retry_max_s = 5: must be >= retry_initial_s (10)",
            ),
            # bounds shown exactly (they were 3.6e+06 and 1.23457e+06)
            (
                "[timesync]\nmin_adjust_ms = 3600001\n",
                "timesync.min_adjust_ms = 3600001: must be <= 3600000",
            ),
            (
                "[daemon]\nrestart_backoff_initial_s = 1234.5\nrestart_backoff_max_s = 5\n",
                "daemon.restart_backoff_max_s = 5: must be >= restart_backoff_initial_s (1234.5)",
            ),
            (
                "[daemon]\nrestart_backoff_max_s = 1e308\n",
                "daemon.restart_backoff_max_s = 1e+308: must be <= 3600",
            ),
            (
                "[daemon]\nrestart_window_s = 86400.5\n",
                "daemon.restart_window_s = 86400.5: must be <= 86400",
            ),
            (
                "[balloon]\npressure_cooldown_s = 1e300\n",
                "balloon.pressure_cooldown_s = 1e+300: must be <= 3600",
            ),
            (
                "[timesync]\nset_threshold_s = -0.5\n",
                "timesync.set_threshold_s = -0.5: must be >= 0",
            ),
        ],
    )
    def test_limits(self, tmp_path: Path, text: str, expected: str) -> None:
        """Each limit is enforced and named in the problem."""
        path = write(tmp_path, text)
        assert problems_of(path, section_models()) == [f"{path}: {expected}"]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
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
            (
                '[device]\npath = "/dev/vboxguest\\u0000"\n',
                'device.path = "/dev/vboxguest\\u0000": must not contain a control character '
                "(\\x00)",
            ),
            (
                '[device]\npath = "/dev/vbox\\u001b[2Jguest"\n',
                'device.path = "/dev/vbox\\u001b[2Jguest": must not contain a control character '
                "(\\x1b)",
            ),
            (
                f'[device]\npath = "unix:/{"s" * 107}"\n',
                f"device.path = \"unix:/{'s' * 107}\": socket path '/{'s' * 107}' is 108 bytes "
                "long; a Unix socket path holds at most 107",
            ),
            ("[[log]]\n", "log = [...]: must be a table"),
        ],
    )
    def test_wrong_type(self, tmp_path: Path, text: str, expected: str) -> None:
        """A value of the wrong type is rejected, not converted."""
        path = write(tmp_path, text)
        assert problems_of(path) == [f"{path}: {expected}"]

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "[daemon]\nshutdown_timeout_s = 1979-05-27\n",
                "daemon.shutdown_timeout_s = 1979-05-27: must be a valid number",
            ),
            (
                "[daemon]\nrestart_window_s = 07:32:00\n",
                "daemon.restart_window_s = 07:32:00: must be a valid number",
            ),
            (
                "[daemon]\nrestart_budget = 1979-05-27T07:32:00Z\n",
                "daemon.restart_budget = 1979-05-27T07:32:00+00:00: must be a valid integer",
            ),
        ],
    )
    def test_dates_and_times_are_shown_as_toml(
        self, tmp_path: Path, text: str, expected: str
    ) -> None:
        """A date or time where a number belongs is shown as the file writes it, not as
        Python's ``datetime.date(1979, 5, 27)``."""
        path = write(tmp_path, text)
        assert problems_of(path) == [f"{path}: {expected}"]

    def test_keys_are_shown_as_toml(self, tmp_path: Path) -> None:
        """A key that is not a bare TOML key is shown quoted, escapes and all: a dotted,
        empty or control-character key stays one unambiguous line."""
        path = write(tmp_path, '[device]\n"a.b" = 1\n"" = 2\n"x\\ty" = 3\n["\\u001b[2J"]\n')
        allowed = "allowed keys: path, ioctl_threads"
        assert problems_of(path) == [
            f'{path}: "\\u001b[2J" = {{}}: unknown section; allowed sections: device, daemon, log',
            f'{path}: device."a.b" = 1: unknown key; {allowed}',
            f'{path}: device."" = 2: unknown key; {allowed}',
            f'{path}: device."x\\ty" = 3: unknown key; {allowed}',
        ]

    def test_values_and_keys_are_shown_as_valid_toml(self, tmp_path: Path) -> None:
        """Quotes, backslashes and every non-printable character (C1 controls such as U+0085
        too) are shown as TOML escapes, so the shown value or key reads back as what the file
        holds: repr's \\' and \\x85 are no TOML."""
        path = write(
            tmp_path, '[log]\nlevel = "a\'b\\\\c\\u0085\\u2028\\U000e0001"\n"\\u0085" = 1\n'
        )
        shown_value, shown_key = '"a\'b\\\\c\\u0085\\u2028\\U000e0001"', '"\\u0085"'
        assert problems_of(path) == [
            f"{path}: log.level = {shown_value}: must be one of 'debug', 'info', 'warning' or "
            "'error'",
            f"{path}: log.{shown_key} = 1: unknown key; allowed keys: level, format",
        ]
        shown = tomllib.loads(f"value = {shown_value}\n{shown_key} = 1\n")
        assert shown == {"value": "a'b\\c\x85\u2028\U000e0001", "\x85": 1}

    def test_long_values_and_keys_are_cut(self, tmp_path: Path) -> None:
        """A long value or key is cut to SHOWN_SIZE characters with its full length said: a
        problem stays a line a terminal or the journal shows whole."""
        path = write(tmp_path, f'[log]\nlevel = "{"v" * 5000}"\n{"k" * 5000} = 1\n')
        value = f'"{"v" * (SHOWN_SIZE - 1)}... (5002 characters)'
        key = f"log.{'k' * (SHOWN_SIZE - 4)}... (5004 characters)"
        assert problems_of(path) == [
            f"{path}: log.level = {value}: must be one of 'debug', 'info', 'warning' or 'error'",
            f"{path}: {key} = 1: unknown key; allowed keys: level, format",
        ]

    @pytest.mark.parametrize(
        ("text", "key", "reason"),
        [
            (f"[daemon]\nshutdown_timeout_s = {HUGE}\n", "daemon.shutdown_timeout_s", "<= 13"),
            (f"[daemon]\nshutdown_timeout_s = -{HUGE}\n", "daemon.shutdown_timeout_s", "> 0"),
            (f"[timesync]\nset_threshold_s = -{HUGE}\n", "timesync.set_threshold_s", ">= 0"),
            (f"[gadget]\ninterval_s = {HUGE}\n", "gadget.interval_s", "a finite number"),
        ],
    )
    def test_an_integer_past_every_float_names_the_bound(
        self, tmp_path: Path, text: str, key: str, reason: str
    ) -> None:
        """An integer too large for a float (pydantic's float_type, past about 1.8e308) is
        past the key's bound, which the problem names as for 1e300; a key without that bound
        takes finite numbers only, as for inf. It is a number: never "must be a valid
        number"."""
        path = write(tmp_path, text)
        [problem] = problems_of(path, {**section_models(), **GADGET})
        assert problem.startswith(f"{path}: {key} = ")
        assert problem.endswith(f" characters): must be {reason}")

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "[balloon]\nretry_initial_s = 100\nretry_max_s = 10\npressure_step_mb = 0\n",
                [
                    "balloon.pressure_step_mb = 0: must be >= 1",
                    "balloon.retry_max_s = 10: must be >= retry_initial_s (100)",
                ],
            ),
            # a default takes part, and the key the file set is named, as when all is valid
            (
                "[daemon]\nrestart_backoff_initial_s = 100\nshutdown_timeout_s = 0\nx = 1\n",
                [
                    "daemon.shutdown_timeout_s = 0: must be > 0",
                    "daemon.x = 1: unknown key; allowed keys: shutdown_timeout_s, "
                    "restart_backoff_initial_s, restart_backoff_max_s, restart_budget, "
                    "restart_window_s",
                    "daemon.restart_backoff_initial_s = 100: must be <= restart_backoff_max_s (30)",
                ],
            ),
            # a setting of the pair that is itself invalid has no order to check
            (
                "[balloon]\nretry_initial_s = 100\nretry_max_s = 0\n",
                ["balloon.retry_max_s = 0: must be > 0"],
            ),
            (
                '[balloon]\nretry_initial_s = "100"\nretry_max_s = 10\nenable = 1\n',
                [
                    "balloon.enable = 1: must be a valid boolean",
                    'balloon.retry_initial_s = "100": must be a valid number',
                ],
            ),
        ],
    )
    def test_an_order_is_checked_beside_other_problems(
        self, tmp_path: Path, text: str, expected: list[str]
    ) -> None:
        """An ``initial <= max`` rule whose two settings are valid is reported with the
        section's other problems, not only once they are fixed."""
        path = write(tmp_path, text)
        assert problems_of(path, section_models()) == [f"{path}: {line}" for line in expected]

    def test_every_problem_is_reported(self, tmp_path: Path) -> None:
        """All problems of a file are reported at once, one line each."""
        path = write(
            tmp_path,
            '[log]\nlevel = "loud"\nformat = "xml"\n[daemon]\nx = 1\n[gadget]\nlabel = 1\n[y]\n',
        )
        problems = problems_of(path, GADGET)
        assert [line.split(" = ")[0] for line in problems] == [
            f"{path}: y",
            f"{path}: daemon.x",
            f"{path}: log.level",
            f"{path}: log.format",
            f"{path}: gadget.label",
        ]

    def test_a_log_line_lists_the_first_problems_and_how_many_more(self, tmp_path: Path) -> None:
        """The problems a log line lists (``config_reload_rejected``, ``config_invalid``) are
        the first ``LISTED_PROBLEMS`` and a count of the others: hundreds made one line over
        the log's limits, which never reached the journal."""
        path = write(tmp_path, "".join(f"[section_{n}]\n" for n in range(LISTED_PROBLEMS + 5)))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        problems = info.value.problems
        assert len(problems) == LISTED_PROBLEMS + 5
        assert info.value.listed == [
            *problems[:LISTED_PROBLEMS],
            "and 5 more problems (check-config lists them all)",
        ]
        assert ConfigError(problems[:LISTED_PROBLEMS]).listed == problems[:LISTED_PROBLEMS]
        assert ConfigError(problems[: LISTED_PROBLEMS + 1]).listed[-1] == (
            "and 1 more problem (check-config lists them all)"
        )

    def test_syntax_error_names_line_and_column(self, tmp_path: Path) -> None:
        """A TOML syntax error names its line and column."""
        path = write(tmp_path, "[log]\nlevel = debug\n")
        assert problems_of(path) == [f"{path}: line 2, column 9: invalid TOML: Invalid value"]

    def test_byte_order_mark_is_named(self, tmp_path: Path) -> None:
        """A BOM (Windows editors write one) is named, not reported as an invalid statement."""
        path = tmp_path / "agent.toml"
        path.write_bytes(b'\xef\xbb\xbf[log]\r\nlevel = "info"\r\n')
        assert problems_of(path) == [
            f"{path}: line 1, column 1: invalid TOML: a byte order mark (U+FEFF): save as "
            "UTF-8 without BOM"
        ]

    @pytest.mark.parametrize(
        ("text", "where", "what"),
        [
            ("x", "line 1, column 2", "Expected '=' after a key in a key/value pair"),
            ('[log]\nlevel = "info', "line 2, column 14", "Unterminated string"),
            ("[daemon]\r\nrestart_budget = [1,\r\n", "line 3, column 1", "Invalid value"),
        ],
    )
    def test_text_ending_too_early_names_where_it_ends(
        self, tmp_path: Path, text: str, where: str, what: str
    ) -> None:
        """A file that ends in the middle of something names its end as line and column.

        tomllib says only "at end of document" there; CRLF line ends count as one.
        """
        path = tmp_path / "agent.toml"
        path.write_bytes(text.encode())
        assert problems_of(path) == [f"{path}: {where} (the end of the file): invalid TOML: {what}"]

    @pytest.mark.parametrize(
        ("text", "where", "digits"),
        [
            (f"[daemon]\nrestart_budget = {'9' * 5000}\n", "line 2, column 18", 5000),
            (f"# {LONG_RUN}\n[daemon]\nrestart_budget = {'9' * 5000}\n", "line 3, column 18", 5000),
            (f'[log]\nlevel = "{LONG_RUN}"\nx = [-{"9_" * 4400}9]\n', "line 3, column 6", 4401),
            (
                f"x = '''\r\n{LONG_RUN}\r\n'''\r\ny = {{z = +{'9' * 4400}}}\r\n",
                "line 4, column 10",
                4400,
            ),
        ],
    )
    def test_integer_too_long_to_read(
        self, tmp_path: Path, text: str, where: str, digits: int
    ) -> None:
        """An integer longer than Python converts (4300 digits) is a syntax problem naming
        where it is: tomllib let the interpreter's ValueError out, a traceback for
        check-config and the end of a running daemon for a reload (exit 70). A long run of
        digits before it, in a comment or a string, is not taken for it."""
        path = tmp_path / "agent.toml"
        path.write_bytes(text.encode())
        assert problems_of(path) == [
            f"{path}: {where}: invalid TOML: an integer of {digits} digits, more "
            "than the 4300 this program reads"
        ]

    @pytest.mark.parametrize(
        ("value", "column"),
        [
            ("[" * 100_000 + "]" * 100_000, 18),
            ("{a = " * 20_000 + "1" + "}" * 20_000, 18),
            ("[{a = [" + "[" * 5_000, 18),
        ],
    )
    def test_nesting_too_deep_to_read(self, tmp_path: Path, value: str, column: int) -> None:
        """Arrays or inline tables nested deeper than tomllib recurses (a 200 KB file, under
        the size limit) are a syntax problem naming where the value begins: its
        RecursionError was a traceback for check-config and the end of a daemon's reload."""
        path = write(tmp_path, f"[daemon]\r\nrestart_budget = {value}\n")
        assert problems_of(path) == [
            f"{path}: line 2, column {column}: invalid TOML: arrays or tables nested too deeply"
        ]

    @pytest.mark.parametrize(
        ("text", "where", "parts"),
        [
            (f"[daemon]\r\n{KEY_OF_20_000}\r\n", "line 2, column 1", 20_000),
            ("[a.b.c.d.e]\n", "line 1, column 2", 5),
            ("[[ a . b\t. c .d. e ]]\n", "line 1, column 4", 5),
            ("x = {y = 1, 'a.b'.\"c.d\".e.f.g = 2}\n", "line 1, column 13", 5),
            (f"{STRINGS_AND_COMMENTS}a.b.c.d.e = 1\n", "line 9, column 1", 5),
        ],
    )
    def test_a_key_of_too_many_parts_is_refused_unread(
        self, tmp_path: Path, text: str, where: str, parts: int
    ) -> None:
        """A key or a table header of more than 4 dotted parts is a syntax problem named at
        its first part, found before tomllib reads the file: tomllib takes time quadratic in
        the parts (8 s for 20 000, a 40 KB file, while a reload holds the next one back). A
        quoted part is one part; the strings and comments before it are no key."""
        path = tmp_path / "agent.toml"
        path.write_bytes(text.encode())
        assert problems_of(path) == [
            f"{path}: {where}: invalid TOML: a key of {parts} dotted parts, more than the 4 "
            "this program reads"
        ]

    @pytest.mark.parametrize(
        "text",
        [
            "[a.b.c.d]\ne.f.g.h = 1\n[[i . j . k . l]]\nm = {n.o.p.q = 2}\n",
            '"a.b.c.d.e.f" = 1\n\'g.h.i.j.k\'."l.m.n.o.p".q.r = 2\n',
            STRINGS_AND_COMMENTS,
            "x = [1.5, 2.5e3, 1979-05-27T07:32:00.999, 07:32:00.5]\n",
        ],
        ids=["four parts", "quoted parts with dots", "strings and comments", "floats and times"],
    )
    def test_keys_within_the_limit_and_dots_elsewhere_are_read(self, text: str) -> None:
        """Keys and headers of 4 parts, quoted parts full of dots, strings and comments full
        of dots (and of quotes that do not end them), floats and times read as tomllib
        reads them."""
        assert parse_toml(text) == tomllib.loads(text)

    @pytest.mark.parametrize(
        ("text", "problem"),
        [
            ('x = "a\nb.c.d.e.f = 1\n', "line 1, column 7: invalid TOML: Illegal character '\\n'"),
            (
                'x = """a"\nb.c.d.e.f = 1\n',
                "line 3, column 1 (the end of the file): invalid TOML: Unterminated string",
            ),
            (
                "x = '''a'\nb.c.d.e.f = 1\n",
                "line 3, column 1 (the end of the file): invalid TOML: Expected \"'''\"",
            ),
        ],
        ids=["basic, on its line", "multi-line basic", "multi-line literal"],
    )
    def test_a_string_that_does_not_end_is_named_not_a_key_after_it(
        self, tmp_path: Path, text: str, problem: str
    ) -> None:
        """tomllib stops at a string that does not end: that is the problem named, not a key
        of too many parts after it. Three quotes that nothing closes open a multi-line
        string, never an empty string and a quote (then the scan would go on, looking for
        the end again at each later opening: quadratic time)."""
        path = write(tmp_path, text)
        assert problems_of(path) == [f"{path}: {problem}"]

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file names the path and the OS's reason."""
        path = tmp_path / "absent.toml"
        assert problems_of(path) == [f"{path}: cannot read: No such file or directory"]

    def test_device(self) -> None:
        """A path naming a device (an endless one here) is refused without reading it."""
        assert problems_of(Path("/dev/zero")) == [
            "/dev/zero: not a regular file but a character device: name a TOML file"
        ]

    def test_socket(self, tmp_path: Path) -> None:
        """A socket at the path is named as one: it is looked at before it is opened (opening
        a socket fails with ENXIO, 'No such device or address'; opening a device can act)."""
        path = tmp_path / "agent.toml"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            assert problems_of(path) == [
                f"{path}: not a regular file but a socket: name a TOML file"
            ]

    def test_pipe(self) -> None:
        """A pipe (``check-config /dev/stdin`` or ``<(...)`` names one) is refused as a FIFO is:
        what ``run`` could not load again on a reload is no config to check."""
        read_end, write_end = os.pipe()
        try:
            path = Path(f"/proc/self/fd/{read_end}")
            assert problems_of(path) == [f"{path}: not a regular file but a FIFO: name a TOML file"]
        finally:
            os.close(read_end)
            os.close(write_end)

    def test_fifo_nobody_writes_to(self, tmp_path: Path) -> None:
        """A FIFO at the path is refused at once: reading it would block the caller (a
        daemon's reload stopped the event loop, heartbeats and SIGTERM included)."""
        path = tmp_path / "agent.toml"
        os.mkfifo(path)
        assert _problems_without_blocking(path) == [
            f"{path}: not a regular file but a FIFO: name a TOML file"
        ]

    def test_size_limit(self, tmp_path: Path) -> None:
        """A file of MAX_TOML_BYTES is read; one byte more is refused."""
        path = write(tmp_path, "#" * (MAX_TOML_BYTES - 1) + "\n")
        assert load_config(path) == AgentConfig()
        path.write_text("#" * MAX_TOML_BYTES + "\n")
        assert problems_of(path) == [
            f"{path}: larger than 1 MiB: not a TOML file this program reads"
        ]

    def test_directory(self, tmp_path: Path) -> None:
        """A directory given as the file names the OS's reason."""
        assert problems_of(tmp_path) == [f"{tmp_path}: cannot read: Is a directory"]

    @pytest.mark.parametrize(
        ("data", "where", "what"),
        [
            (b'[log]\nlevel = "\xff"\n', "line 2, column 10", "0xff (invalid start byte)"),
            (
                b"[log]\r\n"
                + b"# x\r\n" * 38
                + 'level = "info" # café ≠ caf'.encode()
                + b"\xe9\r\n",
                "line 40, column 28",
                "0xe9 (invalid continuation byte)",
            ),
            (b"# caf" + "é".encode()[:1], "line 1, column 6", "0xc3 (unexpected end of data)"),
        ],
    )
    def test_not_utf8_names_line_and_column(
        self, tmp_path: Path, data: bytes, where: str, what: str
    ) -> None:
        """A byte that is not UTF-8 (an editor's Latin-1 'é' in a comment) is named by its line
        and column, counted in characters as every other syntax problem is, not by its
        offset in the file."""
        path = tmp_path / "agent.toml"
        path.write_bytes(data)
        assert problems_of(path) == [
            f"{path}: {where}: invalid TOML: not UTF-8 text: byte {what}: save as UTF-8"
        ]


FIFO_GRACE_S = 10.0
"""How long a loader that does not block may take: it returns in well under a millisecond."""


def _problems_without_blocking(fifo: Path) -> list[str]:
    """:func:`problems_of` for ``fifo``, failing the test if the loader blocked opening it.

    The loader runs in a thread. One still running after ``FIFO_GRACE_S`` is blocked: a
    writer's non-blocking open then succeeds only because a reader waits in ``open`` (it
    fails with ENXIO when none does), and it releases that reader so the thread ends.
    """
    outcome: list[BaseException | AgentConfig] = []

    def load() -> None:
        try:
            outcome.append(load_config(fifo, {}))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=FIFO_GRACE_S)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO unless a reader waits
        thread.join()
        pytest.fail(f"loading {fifo} blocked in open until a writer came")
    [result] = outcome
    assert isinstance(result, ConfigError), result
    return result.problems


class TestServiceSections:
    """Sections of services, given to the loader by name."""

    def test_defaults_when_left_out(self, tmp_path: Path) -> None:
        """A service section the file leaves out gets its model's defaults."""
        config = load_config(write(tmp_path, ""), GADGET)
        assert config.services == {"gadget": GadgetSection()}
        assert config.service_section("gadget", GadgetSection) == GadgetSection()

    def test_values_are_validated(self, tmp_path: Path) -> None:
        """A section's values are read into its model."""
        path = write(tmp_path, '[gadget]\nenable = false\ninterval_s = 3\nlabel = "x"\n')
        section = load_config(path, GADGET).service_section("gadget", GadgetSection)
        assert section == GadgetSection(enable=False, interval_s=3.0, label="x")

    def test_built_in_config_falls_back_to_defaults(self) -> None:
        """``AgentConfig()`` holds no sections: each service gets its model's defaults."""
        assert AgentConfig().service_section("gadget", GadgetSection) == GadgetSection()

    def test_wrong_model_is_refused(self, tmp_path: Path) -> None:
        """Asking for a section with another model than it was loaded with is a TypeError."""
        config = load_config(write(tmp_path, ""), GADGET)
        with pytest.raises(TypeError, match="GadgetSection, not a LogConfig"):
            config.service_section("gadget", LogConfig)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "[gadget]\ninterval = 1\n",
                "gadget.interval = 1: unknown key (did you mean interval_s?); "
                "allowed keys: enable, interval_s, label",
            ),
            ("[gadget]\ninterval_s = 0\n", "gadget.interval_s = 0: must be > 0"),
            ("[gadget]\nenable = 1\n", "gadget.enable = 1: must be a valid boolean"),
            ("gadget = 3\n", "gadget = 3: must be a table"),
            ("[gadget]\ninterval_s = nan\n", "gadget.interval_s = nan: must be a finite number"),
        ],
    )
    def test_problems_name_the_section(self, tmp_path: Path, text: str, expected: str) -> None:
        """A service section's problems name the section, the key and what is allowed."""
        path = write(tmp_path, text)
        assert problems_of(path, GADGET) == [f"{path}: {expected}"]


def test_the_unit_holds_the_most_ioctl_threads_the_config_allows() -> None:
    """``TasksMax=`` leaves room for every ioctl worker the config allows, as many again in
    place of calls abandoned in the driver, and the other threads."""
    lines = UNIT.read_text().splitlines()
    (tasks,) = [line.partition("=")[2] for line in lines if line.startswith("TasksMax=")]
    assert int(tasks) >= 2 * MAX_IOCTL_THREADS + OTHER_THREADS


def test_the_unit_waits_longer_than_the_longest_drain() -> None:
    """systemd must not SIGKILL an agent that drains for the longest time the config allows."""
    lines = UNIT.read_text().splitlines()
    (timeout,) = [line.partition("=")[2] for line in lines if line.startswith("TimeoutStopSec=")]
    assert timeout.endswith("s")
    assert float(timeout.removesuffix("s")) > MAX_SHUTDOWN_TIMEOUT_S + 1


def test_the_unit_waits_for_the_start_longer_than_the_start_up_takes() -> None:
    """``TimeoutStartSec=`` is set (systemd's default, 90 s, is no choice of ours) and leaves
    the interpreter's start at least 10 s beyond what the start-up may take once the device
    answered, up to READY=1: the claim's asks of a full queue, the version query, facility
    Init and Active, the services' starts. READY=1 then waits for room in the notify queue
    for as long as systemd waits for it (it was dropped after a second)."""
    lines = UNIT.read_text().splitlines()
    (timeout,) = [line.partition("=")[2] for line in lines if line.startswith("TimeoutStartSec=")]
    assert timeout.endswith("s")
    asks = (CLAIM_ASK_TRIES - 1) * CLAIM_ASK_PAUSE_S
    start_up = asks + 3 * REPORT_TIMEOUT_S + START_WAIT_S
    assert float(timeout.removesuffix("s")) >= start_up + 10
    assert float(timeout.removesuffix("s")) <= STATE_SEND_TIMEOUT_S


def test_the_unit_lets_the_agent_lock_the_largest_balloon() -> None:
    """Where the agent holds the balloon it mlock()s every chunk, up to most of the guest's
    RAM: the unit sets no memory cap that would refuse or OOM-kill that (``MemoryMax=128M``
    and the default ``RLIMIT_MEMLOCK`` of 8 MiB did), and keeps the OOM killer off the
    agent, whose locked chunks made it the first pick and whose SIGKILL left them ballooned
    at the host while the kernel reused their pages."""
    settings = [line.partition("=") for line in UNIT.read_text().splitlines()]
    values = {key: value for key, _, value in settings if not key.startswith("#")}
    assert values.get("LimitMEMLOCK") == "infinity"
    assert {"MemoryMax", "MemoryHigh", "MemoryLimit"}.isdisjoint(values)
    assert values.get("OOMScoreAdjust") == "-1000"


def test_the_readme_installs_the_command_where_the_unit_runs_it() -> None:
    """The README's service installation puts ``vbox-agent`` at the path ``ExecStart=`` runs
    (it said "system-wide", where pip puts it in /usr/local/bin)."""
    lines = UNIT.read_text().splitlines()
    (command,) = [line.partition("=")[2] for line in lines if line.startswith("ExecStart=")]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.partition("## Installing as a service")[2].partition("\n## ")[0]
    assert f"`{command.split()[0]}`" in section


def test_a_reload_checks_the_agents_config_file_before_the_signal() -> None:
    """``systemctl reload`` fails visibly on an invalid file: ``ExecReload=`` runs
    ``check-config`` on the file ``ExecStart=`` names (a failed command ends the reload
    before the next), then sends SIGHUP (alone, it reported success whatever the file held)."""
    lines = UNIT.read_text().splitlines()
    (start,) = [line.partition("=")[2] for line in lines if line.startswith("ExecStart=")]
    reloads = [line.partition("=")[2] for line in lines if line.startswith("ExecReload=")]
    command, _, arguments = start.partition(" ")
    config = arguments.split("--config ", 1)[1].split()[0]
    assert reloads == [f"{command} check-config {config}", "/bin/kill -HUP $MAINPID"]


FAILED_START_S = 1.0
"""Upper bound of a start that fails at once (exit 69, no device): 0.34 s measured, with room
for a slow guest."""


def _unit_seconds(values: Mapping[str, str], key: str) -> float:
    value = values[key]
    assert value.endswith("s"), f"{key}={value}"
    return float(value.removesuffix("s"))


def test_the_start_limit_trips_on_starts_that_keep_failing() -> None:
    """An agent that fails every start at once (69) must hit the start limit, or it restarts
    about 25 times a minute for ever (RestartSec=2s and systemd's default of 5 starts in
    10 s never tripped); one that exits after a service used up its default restart budget
    is restarted without end, as crash-only wants."""
    settings = [line.partition("=") for line in UNIT.read_text().splitlines()]
    values = {key: value for key, _, value in settings if key and not key.startswith("#")}
    restart_s = _unit_seconds(values, "RestartSec")
    interval_s = _unit_seconds(values, "StartLimitIntervalSec")
    burst = int(values["StartLimitBurst"])
    daemon = DaemonConfig()
    budget_s = sum(
        min(daemon.restart_backoff_initial_s * 2**n, daemon.restart_backoff_max_s)
        for n in range(daemon.restart_budget)
    )
    assert burst * (restart_s + FAILED_START_S) < interval_s
    assert burst * (restart_s + budget_s) > interval_s


def test_the_unit_does_not_restart_a_bad_config() -> None:
    """A config error (78) or usage error (64) ends the unit instead of restarting it every
    RestartSec= until the start limit trips."""
    lines = UNIT.read_text().splitlines()
    (codes,) = [line.partition("=")[2] for line in lines if line.startswith("RestartPrevent")]
    assert {int(code) for code in codes.split()} == {EX_USAGE, EX_CONFIG}
