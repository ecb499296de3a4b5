"""Command line entry point: ``vbox-agent <command> ...``.

Each command lives in its own ``agent.cli._<command>`` module with a ``register(subparsers)``
function that adds its parser and sets ``handler`` to a function taking the parsed
arguments and returning the exit code.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from agent import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

EX_USAGE = 64


def _build_parser() -> argparse.ArgumentParser:
    from agent.cli import _abi, _check_config, _host, _prop, _run, _simulate  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="vbox-agent",
        description="VirtualBox guest agent for Linux (balloon, heartbeat, HGCM services).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (_run, _check_config, _abi, _simulate, _host, _prop):
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vbox-agent`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
