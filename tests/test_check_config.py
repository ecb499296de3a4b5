"""Tests of the ``vbox-agent check-config FILE`` command.

Rules of this test module:
- The command is driven through a parser that registers only ``check-config``, so these tests
  do not depend on the other commands; two tests run the real console entry point in a child
  process (a bad value, a device path), and TestDevicePath runs ``run`` (in-process,
  ``agent.cli.main``) on the same file, which stops at the device, to show both refuse it
  alike.
- Output is read with ``capsys``; files are written to ``tmp_path``.
"""

from __future__ import annotations

import argparse
import functools
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import _check_config, main
from agent.cli._check_config import unreadable_by_the_service
from tests.cli_support import COMMAND_TIMEOUT_S

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

    def test_a_file_name_is_shown_escaped(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A file name with a newline and an escape reads as one printable line, on stdout
        (ok) as on stderr (a problem)."""
        good = tmp_path / "a\nfake: ok\x1b[2J.toml"
        good.write_text("")
        assert check_config(str(good)) == 0
        assert capsys.readouterr() == (f"{tmp_path}/a\\nfake: ok\\x1b[2J.toml: ok\n", "")
        bad = tmp_path / "b\n.toml"
        bad.write_text("[log]\nlevel = 3\n")
        assert check_config(str(bad)) == 78
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"{tmp_path}/b\\n.toml: log.level = 3: ")
        assert len(err.splitlines()) == 1

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

    def test_every_problem_is_reported(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A broken ``initial <= max`` rule is reported beside another bad key of its
        section, so one run names every problem."""
        path = tmp_path / "agent.toml"
        path.write_text(
            "[balloon]\nretry_initial_s = 100\nretry_max_s = 10\npressure_step_mb = 0\n"
        )
        assert check_config(str(path)) == 78
        assert capsys.readouterr().err.splitlines() == [
            f"{path}: balloon.pressure_step_mb = 0: must be >= 1",
            f"{path}: balloon.retry_max_s = 10: must be >= retry_initial_s (100)",
        ]

    def test_a_deprecated_value_is_a_warning(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``device.ioctl_threads = 3``, the old minimum, is valid: its warning on stderr,
        FILE: ok, exit 0; 2 stays a problem (78)."""
        path = tmp_path / "agent.toml"
        path.write_text("[device]\nioctl_threads = 3\n")
        assert check_config(str(path)) == 0
        out, err = capsys.readouterr()
        assert out == f"{path}: ok\n"
        assert err.startswith(f"{path}: device.ioctl_threads = 3: deprecated, 4 used: ")
        assert len(err.splitlines()) == 1
        path.write_text("[device]\nioctl_threads = 2\n")
        assert check_config(str(path)) == 78
        assert capsys.readouterr().err == f"{path}: device.ioctl_threads = 2: must be >= 4\n"

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

    def test_a_key_of_too_many_parts(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A key of 20 000 dotted parts (40 KB, which tomllib took 8 s to read) is one line
        and 78 at once: ExecReload= runs check-config."""
        path = tmp_path / "agent.toml"
        path.write_text("[daemon]\n" + ".".join(["a"] * 20_000) + " = 1\n")
        assert check_config(str(path)) == 78
        assert capsys.readouterr() == (
            "",
            f"{path}: line 2, column 1: invalid TOML: a key of 20000 dotted parts, more than "
            "the 4 this program reads\n",
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


class TestDevicePath:
    @pytest.mark.parametrize(
        ("kind", "reason"),
        [
            ("directory", "{path} cannot be the vboxguest device: Is a directory (EISDIR); "),
            ("below a file", "{path} cannot be the vboxguest device: Not a directory (ENOTDIR); "),
            ("file", "{path} is not a vboxguest device (it is a regular file); "),
            ("fifo", "{path} is not a vboxguest device (it is a FIFO); "),
            ("unix: file", "no simulated host at {path}: it exists and is not a socket"),
            (
                "unix: below a file",
                "no simulated host at {path}: no socket can be there (Not a directory, ENOTDIR)",
            ),
            (
                "unix: symlink loop",
                "no simulated host at {path}: no socket can be there "
                "(Too many levels of symbolic links, ELOOP)",
            ),
        ],
    )
    def test_a_path_run_refuses_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, reason: str
    ) -> None:
        """A ``[device] path`` that ``run`` refuses with 78 (no restart under the unit) is
        one problem naming it and exit 78, so the reload that checks the file first fails
        instead of the next start. A directory or a bad path gets ``run``'s own reason; for
        what only an open or the handshake would show, ``stat`` names what it is."""
        target = tmp_path / "target"
        if kind == "directory":
            target.mkdir()
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "unix: symlink loop":
            target.symlink_to(target)
        else:
            target.write_text("")
        path = target / "x" if kind.endswith("below a file") else target
        spec = f"unix:{path}" if kind.startswith("unix:") else str(path)
        config = tmp_path / "agent.toml"
        config.write_text(f'[device]\npath = "{spec}"\n')
        assert main(["run", "--config", str(config)]) == 78
        capsys.readouterr()
        assert check_config(str(config)) == 78
        fix = (
            ""
            if kind.startswith("unix:")
            else "name the device node (--device, or run's [device] path)"
        )
        assert capsys.readouterr() == (
            "",
            f'{config}: device.path = "{spec}": {reason.format(path=path)}{fix}\n',
        )

    def test_the_command_refuses_a_unix_path_where_no_socket_can_be(self, tmp_path: Path) -> None:
        """``vbox-agent check-config`` exits 78 for a ``unix:`` path below a regular file (a
        typo no host can ever listen at; it passed, and ``run`` exited 69, which the unit
        restarts forever)."""
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "h.sock"
        config = tmp_path / "agent.toml"
        config.write_text(f'[device]\npath = "unix:{path}"\n')
        result = subprocess.run(
            [sys.executable, "-m", "agent", "check-config", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert (result.returncode, result.stdout) == (78, "")
        assert result.stderr == (
            f'{config}: device.path = "unix:{path}": no simulated host at {path}: '
            "no socket can be there (Not a directory, ENOTDIR)\n"
        )

    def test_a_path_run_refuses_is_named_beside_the_other_problems(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Every problem of the file, the device path's among them, in file order (the path
        was checked only once the rest was valid, so another problem hid it)."""
        config = tmp_path / "agent.toml"
        config.write_text(f'[device]\npath = "{tmp_path}"\n[daemon]\nshutdown_timeout_s = 99\n')
        assert check_config(str(config)) == 78
        assert [line.split(" = ")[0] for line in capsys.readouterr().err.splitlines()] == [
            f"{config}: device.path",
            f"{config}: daemon.shutdown_timeout_s",
        ]

    def test_an_invalid_device_table_is_not_stat_checked(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A ``[device]`` table with a problem of its own is reported by that problem alone."""
        config = tmp_path / "agent.toml"
        config.write_text(f'[device]\npath = "{tmp_path}"\nioctl_threads = 2\n')
        assert check_config(str(config)) == 78
        assert capsys.readouterr().err == f"{config}: device.ioctl_threads = 2: must be >= 4\n"

    def test_a_missing_path_may_come(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A node that does not exist yet is no problem: ``run`` exits 69, which the unit
        retries, and the module may load later."""
        config = tmp_path / "agent.toml"
        config.write_text(f'[device]\npath = "{tmp_path / "vboxguest"}"\n')
        assert main(["run", "--config", str(config)]) == 69
        capsys.readouterr()
        assert check_config(str(config)) == 0
        assert capsys.readouterr() == (f"{config}: ok\n", "")

    def test_a_device_given_apart_is_checked_in_place_of_the_path(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``--device SPEC`` checks SPEC, as ``run --device`` opens it, and not the file's
        path, which that run never reads (a drop-in's ``ExecStart=`` with ``--device`` made
        every reload fail on a stale path); ``--simulate`` checks no device."""
        config = tmp_path / "agent.toml"
        config.write_text(f'[device]\npath = "{tmp_path}"\n')
        missing = str(tmp_path / "vboxguest")
        assert main(["run", "--device", missing, "--config", str(config)]) == 69
        capsys.readouterr()
        assert check_config("--device", missing, str(config)) == 0
        assert check_config("--simulate", str(config)) == 0
        assert capsys.readouterr() == (f"{config}: ok\n{config}: ok\n", "")
        config.write_text(f'[device]\npath = "{missing}"\n')
        assert main(["run", "--device", str(tmp_path), "--config", str(config)]) == 78
        capsys.readouterr()
        config.write_text(f'[device]\npath = "{missing}"\n[log]\nlevel = 3\n')
        assert check_config("--device", str(tmp_path), str(config)) == 78
        assert capsys.readouterr().err.splitlines() == [
            f"{config}: log.level = 3: must be one of 'debug', 'info', 'warning' or 'error'",
            f"vbox-agent check-config: --device: {tmp_path} cannot be the vboxguest device: "
            "Is a directory (EISDIR); name the device node (--device, or run's [device] path)",
        ]


NOBODY = 65534


def fake_stat(modes: dict[str, tuple[int, int, int]]) -> _check_config.StatFn:
    """``os.stat`` over a made-up tree: path -> (mode bits, uid, gid); others root's 0755."""

    def status(path: Path) -> os.stat_result:
        mode, uid, gid = modes.get(str(path), (0o755, 0, 0))
        kind = stat.S_IFREG if str(path).endswith(".toml") else stat.S_IFDIR
        return os.stat_result((kind | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))

    return status


class TestReadableByTheService:
    """The service runs as root without CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH: only the mode
    bits that apply to uid 0 and gid 0 let it read its file."""

    @pytest.mark.parametrize(
        ("mode", "uid", "gid"),
        [(0o600, 0, NOBODY), (0o640, NOBODY, 0), (0o604, NOBODY, NOBODY), (0o400, 0, 0)],
    )
    def test_readable(self, mode: int, uid: int, gid: int) -> None:
        """Read by the owner bits (root's file), the group bits (gid 0) or the others'."""
        status = fake_stat({"/etc/vbox-agent/agent.toml": (mode, uid, gid)})
        assert unreadable_by_the_service(Path("/etc/vbox-agent/agent.toml"), status) is None

    @pytest.mark.parametrize(
        ("mode", "uid", "gid"),
        [(0o600, NOBODY, NOBODY), (0o064, 0, 0), (0o066, 0, NOBODY), (0o660, NOBODY, NOBODY)],
    )
    def test_the_file_unreadable(self, mode: int, uid: int, gid: int) -> None:
        """Root's own file without the owner's r, or another's without r for gid 0 or
        others, is unreadable to it (the first bits that apply are the only ones)."""
        status = fake_stat({"/etc/vbox-agent/agent.toml": (mode, uid, gid)})
        assert unreadable_by_the_service(Path("/etc/vbox-agent/agent.toml"), status) == (
            f"the file is mode {mode:04o}, owner uid {uid}, gid {gid}"
        )

    def test_a_directory_on_the_way_unsearchable(self) -> None:
        """A directory root may not search hides a readable file."""
        status = fake_stat({"/home/alice": (0o750, 1000, 1000)})
        assert unreadable_by_the_service(Path("/home/alice/vbox/agent.toml"), status) == (
            "directory /home/alice cannot be searched: mode 0750, owner uid 1000, gid 1000"
        )

    def test_dot_dot_after_a_symlink(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A ``..`` after a symlink climbs from its target: the directories looked at are
        the ones the lookup searches (here ``a/q`` and not a textual ``t/q``), all real."""
        (tmp_path / "a" / "b" / "c").mkdir(parents=True)
        (tmp_path / "a" / "q").mkdir()
        (tmp_path / "ln").symlink_to("a/b/c")
        (tmp_path / "a" / "b" / "agent.toml").write_text('[log]\nlevel = "info"\n')
        path = tmp_path / "ln" / ".." / ".." / "q" / ".." / "b" / "agent.toml"
        looked_at: list[Path] = []

        def recording_stat(path: Path) -> os.stat_result:
            looked_at.append(path)
            return os.stat(path)

        unreadable_by_the_service(path, recording_stat)
        real = tmp_path.resolve()
        assert set(looked_at) == {
            *real.parents,
            real,
            real / "a",
            real / "a" / "b",
            real / "a" / "b" / "c",
            real / "a" / "q",
            real / "a" / "b" / "agent.toml",
        }
        assert check_config(str(path)) == 0
        assert capsys.readouterr() == (f"{path}: ok\n", "")

    def test_a_failing_stat_cannot_tell(self) -> None:
        """A directory or file that cannot be stat'ed gives no warning."""

        def failing_stat(path: Path) -> os.stat_result:
            raise PermissionError(13, "Permission denied", str(path))

        assert unreadable_by_the_service(Path("/etc/vbox-agent/agent.toml"), failing_stat) is None

    def test_warned_and_still_valid(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A valid file owned by nobody with mode 0600 (which run, with CAP_DAC_OVERRIDE,
        reads) gets one warning line naming it and why; the exit status stays 0. The file
        is given away in what the check's ``stat`` returns, so no root is needed."""
        tmp_path.chmod(0o755)
        path = tmp_path / "agent.toml"
        path.write_text('[log]\nlevel = "info"\n')
        path.chmod(0o600)
        real_file = path.resolve()

        def given_away(looked_at: Path) -> os.stat_result:
            status = os.stat(looked_at)
            if looked_at != real_file:
                return status
            fields = list(status[:10])
            fields[4:6] = [NOBODY, NOBODY]  # st_uid, st_gid
            return os.stat_result(fields)

        check = functools.partial(unreadable_by_the_service, stat_fn=given_away)
        monkeypatch.setattr(_check_config, "unreadable_by_the_service", check)
        assert check_config(str(path)) == 0
        out, err = capsys.readouterr()
        assert out == f"{path}: ok\n"
        assert err == (
            f"{path}: warning: the service could not read it (the file is mode 0600, owner "
            f"uid {NOBODY}, gid {NOBODY}): the unit leaves root no CAP_DAC_OVERRIDE, so only "
            "the mode bits for uid 0, gid 0 or others count\n"
        )
