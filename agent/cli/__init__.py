"""Command line entry point: ``vbox-agent <command> ...``.

Each command lives in its own ``agent.cli._<command>`` module with a ``register(subparsers)``
function that adds its parser and sets ``handler`` to a function taking the parsed
arguments and returning the exit code. A command module imports what only its handler needs
(the simulated host, above all) inside the handler, so ``vbox-agent run`` on a real device
loads no simulator code.

Every command-line mistake (unknown command or option, bad or missing value) exits 64
(``EX_USAGE``) after the usage of the (sub)command that got it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from agent import __version__
from agent.cli._exit import EX_USAGE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose mistakes exit 64 with its own usage.

    ``add_subparsers`` builds subcommand parsers of the same class, and each records itself
    as ``usage_parser`` in the namespace, so the innermost subcommand given can report
    arguments nobody recognised.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(usage_parser=self)

    def error(self, message: str) -> NoReturn:
        """Print this parser's usage and ``message``, then exit 64."""
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> CommandParser:
    from agent.cli import _abi, _check_config, _host, _prop, _run, _simulate  # noqa: PLC0415

    parser = CommandParser(
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
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:
        usage_parser: CommandParser = args.usage_parser
        usage_parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
