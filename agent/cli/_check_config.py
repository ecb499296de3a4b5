"""``vbox-agent check-config FILE``: validate a configuration file without starting anything.

Prints ``FILE: ok`` and exits 0, or prints one line per problem to stderr and exits 78
(``EX_CONFIG``), the same lines ``run`` prints for a bad file at start and logs in
``config_reload_rejected`` on a reload. FILE is read as ``run`` reads it: a pipe is refused, as
a FIFO is, since a daemon could not read it again on a reload.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from agent.cli._arguments import file_path
from agent.cli._exit import EX_CONFIG, EX_OK
from agent.cli._output import write_line
from agent.config import ConfigError, load_config
from agent.services.registry import section_models

if TYPE_CHECKING:
    import argparse
    from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    """Give the ``check-config`` parser its description, arguments and handler."""
    parser.description = (
        "Load FILE as the agent would and report every problem, one per line naming the "
        "key, the bad value and what is allowed. Exit status 0 when valid, 78 otherwise."
    )
    parser.add_argument(
        "file",
        type=file_path,
        metavar="FILE",
        help="the TOML file to check: a regular file, as run reads (a pipe such as /dev/stdin "
        "or <(...) is refused)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Check ``args.file``; return the exit code."""
    path: Path = args.file
    try:
        load_config(path, section_models())
    except ConfigError as exc:
        sys.stderr.writelines(f"{problem}\n" for problem in exc.problems)
        return EX_CONFIG
    write_line(f"{path}: ok")
    return EX_OK
