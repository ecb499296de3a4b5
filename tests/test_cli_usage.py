"""Command-line mistakes: every parser exits 64 with the usage of the command that got them.

Rules of this test module:
- the command runs in-process (``agent.cli.main``) and stops at the mistake (in its
  arguments, config or scenario), so nothing starts; output is read with ``capsys``;
- one test per behaviour, the mistakes themselves are parameters.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Final

import pytest

from agent import host as simulated_host
from agent.cli import _host, _prop, main
from agent.cli._arguments import (
    ALL_PERSONALITIES,
    DEFAULT_PERSONALITY,
    PERSONALITIES,
    positive_seconds,
)
from agent.cli._exit import EX_CONFIG, EX_UNAVAILABLE, EX_USAGE
from agent.cli._run import _demo_scenario_path
from agent.host import _faults as faults
from agent.host.scenario import load_scenario

if TYPE_CHECKING:
    from pathlib import Path

SOCKET = "/tmp/vbx-usage/host.sock"
"""Never created: every command here stops at its arguments."""
TOO_LONG = "/tmp/" + "x" * 103
"""108 bytes: one more than ``sun_path`` holds with its terminating NUL."""
ABSOLUTE_EXPECTED = "must be an absolute path (/dev/vboxguest) or unix:/absolute/socket/path"
"""What ``--device`` says to a relative or empty path, as ``device.path`` does."""


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run ``vbox-agent ARGV``, check it exits 64 printing nothing on stdout; return stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EX_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    return err.splitlines()


@pytest.mark.parametrize(
    ("argv", "usage", "message"),
    [
        ([], "vbox-agent", "the following arguments are required: COMMAND"),
        (["bogus"], "vbox-agent", "invalid choice: 'bogus'"),
        (["run", "--bogus"], "vbox-agent run", "unrecognized arguments: --bogus"),
        (["abi", "--nope"], "vbox-agent abi", "unrecognized arguments: --nope"),
        (["check-config"], "vbox-agent check-config", "required: FILE"),
        (["run", "--personality", "oracle"], "vbox-agent run", "--personality needs --simulate"),
        (["run", "--scenario", "demo.toml"], "vbox-agent run", "--scenario needs --simulate"),
        (["simulate", "--socket", SOCKET, "-x"], "vbox-agent simulate", "unrecognized"),
        (
            ["simulate", "--socket", SOCKET, "--r3-balloon"],
            "vbox-agent simulate",
            "--r3-balloon needs --personality oracle",
        ),
        (["host", "--socket", SOCKET], "vbox-agent host", "required: COMMAND"),
        (
            ["host", "--socket", SOCKET, "balloon", "5", "--bogus"],
            "vbox-agent host balloon",
            "unrecognized arguments: --bogus",
        ),
        (
            ["host", "--socket", SOCKET, "prop", "set", "/a", "b", "--bogus"],
            "vbox-agent host prop set",
            "unrecognized arguments: --bogus",
        ),
        (["host", "--socket", SOCKET, "cpu"], "vbox-agent host cpu", "required: plug|unplug"),
        (["host", "--socket", SOCKET, "cpu", "plug"], "vbox-agent host cpu", "required: CORE"),
        (
            ["host", "--socket", SOCKET, "cpu", "plug", "1", "2"],
            "vbox-agent host cpu",
            "unrecognized arguments: 2",
        ),
        (
            ["host", "--socket", SOCKET, "fault", "CHANGE_MEMBALLOON"],
            "vbox-agent host fault",
            "the following arguments are required: STATUS",
        ),
        (
            ["host", "--socket", SOCKET, "fault", "113", "-8", "--clear"],
            "vbox-agent host fault",
            "argument --clear: not allowed with argument STATUS",
        ),
        (
            ["host", "--socket", SOCKET, "fault", "--clear", "--count", "2"],
            "vbox-agent host fault",
            "argument --clear: not allowed with argument --count",
        ),
        (
            ["--simulate", "run"],
            "vbox-agent run",
            "--simulate is an option of 'run': give it after 'run'",
        ),
        (["--json", "abi"], "vbox-agent abi", "--json is an option of 'abi': give it after 'abi'"),
        (
            ["--device", "unix:/tmp/h.sock", "prop", "get", "/a/b"],
            "vbox-agent prop get",
            "error: --device is an option of 'prop': give it after 'prop'",
        ),
        (
            ["--device=unix:/tmp/h.sock", "prop", "get", "/a/b"],
            "vbox-agent prop get",
            "error: --device is an option of 'prop': give it after 'prop'",
        ),
        (
            ["--socket", "x", "host", "status"],
            "vbox-agent host status",
            "error: --socket is an option of 'host': give it after 'host'",
        ),
        (
            ["prop", "--json", "get", "/a"],
            "vbox-agent prop get",
            "--json is an option of 'get': give it after 'get'",
        ),
        (
            ["host", "--socket", SOCKET, "--json", "status"],
            "vbox-agent host status",
            "--json is an option of 'status': give it after 'status'",
        ),
        (
            ["prop", "get", "/a", "--device", "unix:/x.sock"],
            "vbox-agent prop get",
            "--device is an option of 'prop': give it before 'get'",
        ),
        (["run", "--version"], "vbox-agent run", "option of 'vbox-agent': give it before 'run'"),
    ],
)
def test_unknown_commands_and_options(
    argv: list[str], usage: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Unknown or missing words: the usage of the command that got them, then the error.

    An option given to the wrong command (before its own command's name, or after the next
    one's) is not called unrecognized (``abi --help`` lists ``--json``): the error says
    where it goes."""
    lines = usage_error(argv, capsys)
    assert lines[0].startswith(f"usage: {usage} ")
    assert lines[-1].startswith(f"{usage}: error: ")
    assert message in lines[-1]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["host", "status", "--socket", SOCKET],
            "vbox-agent host status: error: --socket is an option of 'host': give it before "
            "'status'",
        ),
        (
            ["host", "status"],
            "vbox-agent host: error: the following arguments are required: --socket",
        ),
        (
            ["prop", "get", "/a", "--device=unix:/x.sock"],
            "vbox-agent prop get: error: --device is an option of 'prop': give it before 'get'",
        ),
        (
            ["prop", "get", "/a", "--bogus", "--device", "x", "--nope"],
            "vbox-agent prop get: error: --device is an option of 'prop': give it before 'get'; "
            "unrecognized arguments: --bogus --nope",
        ),
        (
            ["host", "balloon", "--socket", SOCKET, "10"],
            "vbox-agent host balloon: error: --socket is an option of 'host': give it before "
            "'balloon'",
        ),
        (
            ["host", "stats-interval", "--socket", SOCKET, "5"],
            "vbox-agent host stats-interval: error: --socket is an option of 'host': give it "
            "before 'stats-interval'",
        ),
        (
            ["host", "--socket", SOCKET, "cpu", "plug", "--socket", SOCKET, "1"],
            "vbox-agent host cpu: error: --socket is an option of 'host': give it before 'cpu'",
        ),
        (
            ["host", "--socket", SOCKET, "delay", "--bogus", "--socket", SOCKET, "IDLE", "1"],
            "vbox-agent host delay: error: --socket is an option of 'host': give it before "
            "'delay'; unrecognized arguments: --bogus",
        ),
    ],
)
def test_misplaced_and_missing_options(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A required option given after a later command's name is misplaced, not missing; the
    message names the option, not the word (its value too, never taken for the next
    positional argument, whose type would refuse it); an unknown option beside a misplaced
    one is reported as well."""
    assert usage_error(argv, capsys)[-1] == error


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            ["host", "balloon", "--sock", SOCKET, "10"],
            "vbox-agent host balloon: error: --socket is an option of 'host': give it before "
            "'balloon'",
        ),
        (
            ["prop", "get", "/a", "--dev", "unix:/x.sock"],
            "vbox-agent prop get: error: --device is an option of 'prop': give it before 'get'",
        ),
        (
            ["host", "balloon", "10", "--bogus", "--socket"],
            "vbox-agent host balloon: error: --socket is an option of 'host': give it before "
            "'balloon'; unrecognized arguments: --bogus",
        ),
        (
            ["host", "balloon", "10", "extra", "--socket"],
            "vbox-agent host balloon: error: --socket is an option of 'host': give it before "
            "'balloon'; unrecognized arguments: extra",
        ),
        (
            ["--sock", SOCKET, "host", "status"],
            "vbox-agent host status: error: --socket is an option of 'host': give it after 'host'",
        ),
        (
            ["host", "prop", "set", "/x", "--socket=a b"],
            "vbox-agent host: error: the following arguments are required: --socket",
        ),
        (
            ["host", "balloon", "--socket", SOCKET],
            "vbox-agent host balloon: error: the following arguments are required: MB",
        ),
    ],
)
def test_options_are_read_as_argparse_reads_them(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An outer command's option is found where argparse would take it: by a unique
    abbreviation too (and named in full); not in a word argparse takes for a positional (one
    with a space); never taking an option-looking word as its value, which is reported."""
    assert usage_error(argv, capsys)[-1] == error


AMBIGUOUS: Final = [
    (
        ["run", "--d", "1"],
        "vbox-agent run: error: ambiguous option: --d could match --device, --duration",
    ),
    (
        ["host", "--socket", SOCKET, "fault", "--c", "3"],
        "vbox-agent host fault: error: ambiguous option: --c could match --count, --clear",
    ),
    (
        ["--c", "host", "--socket", SOCKET, "status"],
        "vbox-agent host status: error: unrecognized arguments: --c",
    ),
]
"""Abbreviations of two options: the parser the word goes to reports them, no other."""


@pytest.mark.parametrize(("argv", "error"), AMBIGUOUS)
def test_an_ambiguous_abbreviation_is_reported_by_its_reader(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--c`` before ``host ... status`` was reported by ``host fault``, a parser in the
    command's tree that was only asked how it reads the word."""
    assert usage_error(argv, capsys)[-1] == error


@pytest.mark.parametrize(("argv", "error"), AMBIGUOUS)
def test_an_ambiguous_abbreviation_as_python_3_13_reads_it(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.13's argparse raises ``ArgumentError`` for an ambiguous abbreviation where
    earlier ones call ``error``: that ended the command with a traceback, not exit 64."""
    reading = argparse.ArgumentParser._parse_optional

    def raising(parser: argparse.ArgumentParser, word: str) -> object:
        matches = parser._get_option_tuples(word) if word.startswith("-") else []
        if len(matches) > 1 and word not in parser._option_string_actions:
            names = ", ".join(match[1] for match in matches)
            raise argparse.ArgumentError(None, f"ambiguous option: {word} could match {names}")
        return reading(parser, word)

    monkeypatch.setattr(argparse.ArgumentParser, "_parse_optional", raising)
    assert usage_error(argv, capsys)[-1] == error


@pytest.mark.parametrize(
    ("argv", "name", "value"),
    [
        (["prop", "set", "/x", "--device=foo bar"], "value", "--device=foo bar"),
        (["prop", "enum", "--device=a b"], "patterns", ["--device=a b"]),
        (["prop", "wait", "--device=a b"], "pattern", "--device=a b"),
        (["prop", "--dev", "unix:/x.sock", "get", "/x"], "device", "unix:/x.sock"),
        (["host", "--sock", SOCKET, "status"], "socket", SOCKET),
        (["host", "--sock", "status", "status"], "socket", "status"),
        (["host", "--socket", SOCKET, "fault", "113", "-8"], "status", -8),
    ],
)
def test_correct_command_lines_keep_their_meaning(
    argv: list[str], name: str, value: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command line argparse takes runs its handler with what argparse made of it: a
    positional that looks like an outer option with its value (``'--device=a b'``, a word
    with a space), an abbreviated option before its command's subcommand."""
    given: list[argparse.Namespace] = []

    def handler(args: argparse.Namespace) -> int:
        given.append(args)
        return 0

    monkeypatch.setattr(_prop, "prop_command", handler)
    monkeypatch.setattr(_host, "host_command", handler)
    assert main(argv) == 0
    assert getattr(given[0], name) == value


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["host", "--help"], "usage: vbox-agent host [-h] --socket PATH COMMAND ..."),
        (["simulate", "--socket", ""], "usage: vbox-agent simulate [-h] --socket PATH"),
        (["simulate"], "usage: vbox-agent simulate [-h] --socket PATH"),
        (["host", "--socket", "", "status"], "usage: vbox-agent host [-h] --socket PATH COMMAND"),
    ],
)
def test_required_options_show_as_required(
    argv: list[str], usage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Help and every usage show a required option without brackets (during the parse they
    showed ``[--socket PATH]``: the check of required options is left until after it)."""
    with pytest.raises(SystemExit):
        main(argv)
    out, err = capsys.readouterr()
    assert (out or err).startswith(usage)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--duration", "0"], "'0' must be a positive number of seconds"),
        (["prop", "wait", "/x", "--timeout", "0"], "'0' must be a positive number of seconds"),
        (["prop", "wait", "/x", "--timeout", "-1"], "'-1' must be a positive number"),
        (["prop", "wait", "/x", "--timeout", "nan"], "'nan' must be a positive number"),
        (["prop", "wait", "/x", "--timeout", "inf"], "'inf' must be a positive number"),
        (["prop", "wait", "/x", "--timeout", ""], "--timeout: '' is not a number of seconds"),
        (["run", "--duration", "nan"], "'nan' must be a positive number of seconds"),
        (["run", "--device", "unix:"], f"argument --device: {ABSOLUTE_EXPECTED}"),
        (["run", "--device", f"unix:{TOO_LONG}"], "a Unix socket path holds at most 107"),
        (["run", "--device", ""], f"argument --device: {ABSOLUTE_EXPECTED}"),
        (["run", "--config", ""], "argument --config: the file name is empty"),
        (["run", "--device", "/dev/x\nfake line"], "--device: must not contain a control char"),
        (["run", "--device", "/dev/vbox\x1b[2J"], "must not contain a control character (\\x1b)"),
        (["prop", "--device", "/dev/x\nfake", "get", "/x"], "a control character (\\n)"),
        (
            ["host", "--socket", "/x\nFAKE", "status"],
            "socket path '/x\\nFAKE' contains a control character (\\n)",
        ),
        (["run", "--device", "unix:/x\x9b2J"], "a control character (\\x9b)"),
        (["run", "--simulate", "--scenario", ""], "argument --scenario: the file name is empty"),
        (["check-config", ""], "argument FILE: the file name is empty"),
        (["run", "--device", "relative"], f"argument --device: {ABSOLUTE_EXPECTED}"),
        (["run", "--device", "unix:rel.sock"], f"argument --device: {ABSOLUTE_EXPECTED}"),
        (["prop", "--device", "relative", "get", "/x"], f"argument --device: {ABSOLUTE_EXPECTED}"),
        (["prop", "--device", "unix:rel", "get", "/x"], f"argument --device: {ABSOLUTE_EXPECTED}"),
        (["simulate", "--socket", ""], "argument --socket: the socket path is empty"),
        (["simulate", "--socket", TOO_LONG], "a Unix socket path holds at most 107"),
        (["simulate", "--socket", SOCKET, "--ram-mb", "3"], "'3' is not an integer in [4, "),
        (["simulate", "--socket", SOCKET, "--ram-mb", "lots"], "'lots' is not an integer in"),
        (["simulate", "--socket", SOCKET, "--ram-mb", "2097153"], "in [4, 2097152]"),
        (["simulate", "--socket", SOCKET, "--heartbeat-interval-ms", "10"], "in [50, "),
        (
            ["simulate", "--socket", SOCKET, "--heartbeat-interval-ms", "99999999999999"],
            "in [50, 9223372036854]",
        ),
        (["simulate", "--socket", SOCKET, "--personality", "nope"], "invalid choice: 'nope'"),
        (["host", "--socket", "", "status"], "the socket path is empty"),
        (["host", "--socket", SOCKET, "balloon", "-1"], "'-1' is not an integer >= 0"),
        (["host", "--socket", SOCKET, "balloon", "lots"], "'lots' is not an integer >= 0"),
        # plain ASCII decimal only: int() and float() also take these
        (["host", "--socket", SOCKET, "balloon", "1_0"], "'1_0' is not an integer >= 0"),
        (["host", "--socket", SOCKET, "balloon", "\u0663"], "'\u0663' is not an integer >= 0"),
        (["host", "--socket", SOCKET, "balloon", " 3"], "' 3' is not an integer >= 0"),
        (["host", "--socket", SOCKET, "cpu", "plug", "1\n"], "'1\\n' is not an integer in [0, "),
        (["prop", "wait", "/x", "--timeout", "\uff11"], "'\uff11' is not a number of seconds"),
        (["prop", "wait", "/x", "--timeout", "1_0"], "'1_0' is not a number of seconds"),
        (["run", "--duration", " 1"], "' 1' is not a number of seconds"),
        (["host", "--socket", SOCKET, "delay", "GUEST_HEARTBEAT", "1_0"], "'1_0' is not a non-n"),
        (["host", "--socket", SOCKET, "fault", "\u0661\u0661\u0663", "-8"], "unknown VMMDev"),
        (["host", "--socket", SOCKET, "event", "NOPE"], "NOPE"),
        (["host", "--socket", SOCKET, "fault", "NOPE", "VERR_NO_MEMORY"], "NOPE"),
        (["host", "--socket", SOCKET, "fault", "CHANGE_MEMBALLOON", "VERR_NOPE"], "VERR_NOPE"),
        (
            ["host", "--socket", SOCKET, "fault", "CHANGE_MEMBALLOON", "-8", "--count", "0"],
            "argument --count: '0' is not an integer in [1, 4294967295]",
        ),
        (
            [
                "host",
                "--socket",
                SOCKET,
                "fault",
                "113",
                "-8",
                "--count",
                "99999999999999999999999",
            ],
            "argument --count: '99999999999999999999999' is not an integer in [1, 4294967295]",
        ),
        (["host", "--socket", SOCKET, "delay", "GUEST_HEARTBEAT", "-1"], "'-1' is not a non-neg"),
        (["host", "--socket", SOCKET, "delay", "GUEST_HEARTBEAT", "inf"], "'inf' is not a non-neg"),
        # the host's own checks of names, values and flags, before any connection (the
        # host's refusal exited 1)
        (["host", "--socket", SOCKET, "prop", "set", "", "x"], "NAME: property name is empty"),
        (["host", "--socket", SOCKET, "prop", "set", "/x/*", "x"], "contains '*', '?' or '|'"),
        (["host", "--socket", SOCKET, "prop", "set", "/" + "n" * 100, "x"], "is 101 bytes"),
        (["host", "--socket", SOCKET, "prop", "set", "/a/\udcff", "x"], "not valid Unicode"),
        (["host", "--socket", SOCKET, "prop", "set", "/a", "v" * 2000], "VALUE: property value"),
        (
            ["host", "--socket", SOCKET, "prop", "set", "/a", "x", "--flags", "BOGUS"],
            "argument --flags: invalid flags 'BOGUS'",
        ),
        (["host", "--socket", SOCKET, "prop", "get", "/x|y"], "contains '*', '?' or '|'"),
        (["host", "--socket", SOCKET, "prop", "delete", ""], "property name is empty"),
        (["host", "--socket", SOCKET, "cpu", "eject", "1"], "invalid choice: 'eject'"),
        (["host", "--socket", SOCKET, "cpu", "plug", "-1"], "'-1' is not an integer in [0, 4294"),
        (["host", "--socket", SOCKET, "cpu", "plug", "4294967296"], "in [0, 4294967295]"),
        (["host", "--socket", SOCKET, "cpu", "unplug", "x"], "'x' is not an integer in [0, "),
        (
            ["host", "--socket", SOCKET, "cpu", "unplug", "1", "--package", "-2"],
            "argument --package: '-2' is not an integer in [0, 4294967295]",
        ),
    ],
)
def test_bad_values(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value: the command's usage, then one error line naming the argument and value."""
    lines = usage_error(argv, capsys)
    command = " ".join(word for word in argv[:1] if not word.startswith("-"))
    assert lines[0].startswith(f"usage: vbox-agent {command}")
    assert lines[-1].startswith("vbox-agent ")
    assert ": error: argument " in lines[-1]
    assert message in lines[-1]


@pytest.mark.parametrize(
    ("text", "seconds"), [("1.5", 1.5), (".5", 0.5), ("2.", 2.0), ("1e3", 1000.0), ("+2", 2.0)]
)
def test_plain_decimal_seconds_are_taken(text: str, seconds: float) -> None:
    """What a number of seconds may look like: ASCII decimals, with a fraction or exponent."""
    assert positive_seconds(text) == seconds


def test_personalities_are_the_simulators() -> None:
    """The command line offers exactly the personalities the simulated host has."""
    assert tuple(simulated_host.PERSONALITIES) == PERSONALITIES
    assert tuple(simulated_host.ALL_PERSONALITIES) == ALL_PERSONALITIES


def test_host_fault_checks_the_hosts_own_limit() -> None:
    """``host fault --count`` stops where the simulated host does."""
    assert _host.MAX_FAULT_COUNT == faults.MAX_FAULT_COUNT


def test_simulate_and_the_demo_default_to_the_same_personality() -> None:
    """``simulate`` and ``run --simulate`` (the bundled demo) both model mainline by default."""
    assert DEFAULT_PERSONALITY == "mainline"
    assert load_scenario(_demo_scenario_path()).host.personality == DEFAULT_PERSONALITY
    assert simulated_host.SimulatedHost().status()["personality"] == DEFAULT_PERSONALITY


def test_a_bad_device_in_the_config_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same socket path given by the config file: exit 78, one line naming file and key."""
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\npath = "unix:{TOO_LONG}"\n')
    assert main(["run", "--config", str(config)]) == EX_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f'{config}: device.path = "unix:{TOO_LONG}": socket path ')
    assert len(err.splitlines()) == 1


def test_the_old_minimum_of_ioctl_threads_is_logged_and_run_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``device.ioctl_threads = 3`` (the old minimum) is no config error: run logs one
    ``config_deprecated`` line naming the file, the key and both minimums, and goes on to
    open the device (missing here: 69, not 78)."""
    config = tmp_path / "agent.toml"
    config.write_text(f'[device]\npath = "{tmp_path / "vboxguest"}"\nioctl_threads = 3\n')
    assert main(["run", "--config", str(config)]) == EX_UNAVAILABLE
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    [deprecated] = [line for line in lines if line["event"] == "config_deprecated"]
    assert (deprecated["level"], deprecated["path"]) == ("warning", str(config))
    assert deprecated["warning"].startswith(
        f"{config}: device.ioctl_threads = 3: deprecated, 4 used: the minimum is 4 (was 3) "
    )


@pytest.mark.parametrize(
    ("host_table", "message"),
    [
        (
            "heartbeat_interval_ms = 10",
            "key 'heartbeat_interval_ms': 10 ms is below the host's shortest interval, 50 ms",
        ),
        (
            "heartbeat_interval_ms = 99999999999999",
            "key 'heartbeat_interval_ms': 99999999999999 ms is above 9223372036854 ms, ",
        ),
        ("ram_mb = 99999999999", "key 'ram_mb': 99999999999 is not an integer in [4, 2097152]"),
        ("ram_mb = 3", "key 'ram_mb': 3 is not an integer in [4, 2097152]"),
    ],
)
def test_a_scenario_host_the_model_refuses_is_a_config_error(
    host_table: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run --simulate``: host settings beyond the host's limits: exit 78, one line."""
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(f"[host]\n{host_table}\n")
    # --duration bounds the run should the host be accepted after all
    assert main(["run", "--simulate", "--scenario", str(scenario), "--duration", "1"]) == EX_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"vbox-agent run: {scenario}: host: ")
    assert message in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("personality", ["mainline", "passthrough"])
def test_a_personality_without_the_scenarios_r3_balloon_is_refused(
    personality: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``run --simulate --personality P`` over a scenario whose ``[host]`` sets r3_balloon
    (an oracle option) is refused with 64, as ``simulate --personality P --r3-balloon`` is;
    it used to drop r3_balloon silently and run."""
    scenario = tmp_path / "r3.toml"
    scenario.write_text('[host]\npersonality = "oracle"\nr3_balloon = true\n')
    args = ["run", "--simulate", "--personality", personality, "--scenario", str(scenario)]
    # --duration bounds the run should the personality be accepted after all
    assert usage_error([*args, "--duration", "1"], capsys)[-1] == (
        f"vbox-agent run: error: --personality {personality}: {scenario} sets r3_balloon, "
        "an option of the oracle personality only"
    )


def test_every_argument_of_host_delay_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    """``host delay --help`` says what REQUEST takes and that 0 ends the delay."""
    with pytest.raises(SystemExit) as exited:
        main(["host", "--socket", SOCKET, "delay", "--help"])
    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "REQUEST e.g. GUEST_HEARTBEAT or 219" in help_text
    assert "SECONDS how long each waits from when it was written, held ones too (0: no delay)" in (
        help_text
    )
