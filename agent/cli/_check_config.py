"""``vbox-agent check-config FILE``: validate a configuration file without starting anything.

Prints ``FILE: ok`` and exits 0, or prints one line per problem to stderr and exits 78
(``EX_CONFIG``), every one of them: the same lines ``run`` prints for a bad file at start,
whose log lines (``config_invalid`` under systemd, ``config_reload_rejected`` on a reload)
list the first ``agent.config.LISTED_PROBLEMS`` and how many more. FILE is read as ``run``
reads it: a pipe is refused, as a FIFO is, since a daemon could not read it again on a
reload.

A ``[device] path`` that ``run`` would refuse with 78 at its next start is a problem too
(``FILE: device.path = "...": why``), as far as ``stat`` shows it without opening the device:
a directory or a bad path (with ``run``'s own reason), a regular file or a FIFO, a node sysfs
names other than vboxguest or vboxuser, a ``unix:`` path that exists and is not a socket or
where none can be (below a regular file, a symbolic link loop). A missing one is not: the
module may load later (``run`` exits 69 and is restarted). As ``run`` does, ``--device SPEC``
replaces the path (SPEC is checked, ``device.path`` is not: ``run --device`` never reads it),
and ``--simulate`` checks no device (``run --simulate`` opens none).

A deprecated value that is still read (``device.ioctl_threads = 3``) gets the loader's
warning line on stderr (``FILE: KEY = VALUE: deprecated, ...``) and still exits 0, as ``run``
logs it and starts. A valid file that the service could not read gets one warning line on
stderr (``FILE: warning: ...``) and still exits 0: the exit status judges the content, while the
warning is about the file's permissions as the shipped unit meets them (root with every
capability dropped but CAP_SYS_TIME, so no CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH: only the
mode bits for uid 0, gid 0 or others count), which an install step (``install -m 0644``) or a
different unit changes. This command usually runs with every capability and would read the
file anyway. POSIX ACLs are not consulted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli._arguments import device_spec, file_path
from agent.cli._exit import EX_CONFIG, EX_OK
from agent.cli._output import say, write_line
from agent.config import ConfigError, load_config
from agent.device import cannot_be_the_device
from agent.device.spec import shown_path
from agent.services.registry import section_models

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from agent.config import AgentConfig

    StatFn = Callable[[Path], os.stat_result]
    """``os.stat``'s shape, for tests that describe a tree of their own."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Give the ``check-config`` parser its description, arguments and handler."""
    parser.description = (
        "Load FILE as the agent would and report every problem, one per line naming the "
        "key, the bad value and what is allowed, a [device] path that run would refuse "
        "(a directory, a file or node that is no vboxguest device, a unix: path that is no "
        "socket) included; a missing one may come later and is fine. "
        "With --device SPEC (or --simulate), as run is given it, SPEC is checked in place of "
        "device.path (no device is): a unit whose ExecStart= passes --device passes it here "
        "too. "
        "Exit status 0 when valid, 78 otherwise. "
        "A deprecated value, or a valid file the service could not read (it runs as root "
        "without CAP_DAC_OVERRIDE), gets a warning on stderr; the exit status stays 0."
    )
    parser.add_argument(
        "file",
        type=file_path,
        metavar="FILE",
        help="the TOML file to check: a regular file, as run reads (a pipe such as /dev/stdin "
        "or <(...) is refused)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--device",
        type=device_spec,
        metavar="SPEC",
        help="the device run is given (--device SPEC): checked in place of device.path",
    )
    target.add_argument(
        "--simulate",
        action="store_true",
        help="the file is for run --simulate, which opens no device: no device is checked",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Check ``args.file``; return the exit code."""
    path: Path = args.file
    device: str | None = args.device
    config: AgentConfig | None = None
    problems: list[str] = []
    try:
        config = load_config(
            path, section_models(), check_device=device is None and not args.simulate
        )
    except ConfigError as exc:
        problems = exc.problems
    if device is not None and (refused := cannot_be_the_device(device)) is not None:
        problems.append(f"vbox-agent check-config: --device: {refused}")
    if config is None or problems:
        for problem in problems:
            say(problem)
        return EX_CONFIG
    for warning in config.warnings:
        say(warning)
    why = unreadable_by_the_service(path)
    file = shown_path(path)  # as the problems name it
    if why is not None:
        say(
            f"{file}: warning: the service could not read it ({why}): the unit leaves root "
            "no CAP_DAC_OVERRIDE, so only the mode bits for uid 0, gid 0 or others count"
        )
    write_line(f"{file}: ok")
    return EX_OK


def unreadable_by_the_service(path: Path, stat_fn: StatFn = os.stat) -> str | None:
    """Why uid 0 / gid 0 without DAC override could not read ``path``, or None if it could
    or a ``stat`` fails (cannot tell).

    Every directory the lookup searches must let them search it, and the file must let them
    read it.
    """
    try:
        for directory in _searched_directories(path):
            status = stat_fn(directory)
            if not _granted(status, os.X_OK):
                return f"directory {directory} cannot be searched: {_owner_and_mode(status)}"
        status = stat_fn(Path(os.path.realpath(path)))
    except OSError:
        return None
    if not _granted(status, os.R_OK):
        return f"the file is {_owner_and_mode(status)}"
    return None


def _searched_directories(path: Path) -> dict[Path, None]:
    """The real directories a lookup of ``path`` searches, root first: each prefix of the path
    as given, resolved (a ``..`` after a symlink climbs from its target, so the prefixes are
    not collapsed textually), with its parents, which its resolution passed through."""
    parts = (Path.cwd() / path).parts
    directories: dict[Path, None] = {}
    for end in range(1, len(parts)):
        real = Path(os.path.realpath(Path(*parts[:end])))
        directories.update(dict.fromkeys([*reversed(real.parents), real]))
    return directories


def _granted(status: os.stat_result, access: int) -> bool:
    """Whether the mode bits that apply to uid 0 / gid 0 (owner, else group, else others)
    grant ``access`` (``os.R_OK``, ``os.X_OK``)."""
    mode = stat.S_IMODE(status.st_mode)
    if status.st_uid == 0:
        bits = mode >> 6
    elif status.st_gid == 0:
        bits = mode >> 3
    else:
        bits = mode
    return bool(bits & access)


def _owner_and_mode(status: os.stat_result) -> str:
    return (
        f"mode {stat.S_IMODE(status.st_mode):04o}, owner uid {status.st_uid}, gid {status.st_gid}"
    )
