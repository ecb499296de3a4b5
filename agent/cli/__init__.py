"""Command line entry point: ``vbox-agent <command> ...``.

Each command lives in its own ``agent.cli._<command>`` module with a ``configure(parser)``
function that gives the command's parser its description and arguments and sets ``handler``
to a function taking the parsed arguments and returning the exit code. Only the chosen
command's module is imported (:data:`COMMANDS` holds every name and one-line help the
top-level usage lists), and a command module imports what only its handler needs (the
simulated host, above all) inside the handler: the daemon (``vbox-agent run``) loads no
other command's code, and on a real device no simulator code.

Every command-line mistake (unknown command or option, bad or missing value) exits 64
(``EX_USAGE``) after the usage of the (sub)command that got it. Ctrl-C (SIGINT) ends a
command with 130 (``run`` and ``simulate`` catch it as they catch SIGTERM: a clean stop, 0),
output nobody reads any more (``| head``) with 141, without a traceback, and output that
cannot be written (a full disk) with 74 (``EX_IOERR``) and one line saying why.

``run`` handles SIGTERM, SIGINT and SIGHUP itself, but only once the daemon runs, after its
imports and the config (about 1.5 s), and ``simulate`` SIGTERM and SIGINT once its host
runs: :data:`HELD_SIGNALS` are blocked from the moment ``main`` knows the command, so one
that comes meanwhile waits for the command's handler instead of ending the process with
its default action (killed, or a KeyboardInterrupt); one that comes once the command
stopped handling them is discarded, so a stopped agent or host exits 0 however many
signals follow (``timeout`` sends its SIGTERM twice: to the command, then to its group).

Third-party pydantic plugins are off for every command (:func:`agent.pydantic_plugins.disable`):
how a config file validates must not depend on what else is installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, NoReturn

from agent import __version__, pydantic_plugins
from agent.cli._exit import EX_BROKEN_PIPE, EX_INTERRUPTED, EX_IOERR, EX_USAGE
from agent.cli._output import OutputError, flush, say, write_text

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import FrameType

    from _typeshed import SupportsWrite


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose mistakes exit 64 with its own usage.

    ``add_subparsers`` builds subcommand parsers of the same class, and each records itself
    as ``usage_parser`` in the namespace, so the innermost subcommand given can report
    arguments nobody recognised.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[argparse.Action] = []
        self.consulted = False
        """Set while the parser is only asked how it reads a word (:func:`_reading`)."""
        self.set_defaults(usage_parser=self)

    def error(self, message: str) -> NoReturn:
        """Print this parser's usage and ``message``, then exit 64; while it is
        :attr:`consulted`, raise ``ArgumentError`` instead (as Python 3.13's reading of an
        ambiguous abbreviation does): the word may go to another parser, which reports it."""
        if self.consulted:
            raise argparse.ArgumentError(None, message)
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        """Write ``message`` (``--help``, ``--version``) as a command's answer when it goes
        to stdout: a write refused ends the command as any answer's does (74 with one line,
        141 for a reader gone), where argparse would drop the error and exit 0."""
        if message and file is sys.stdout:
            write_text(message)
            flush()
        else:
            super()._print_message(message, file)

    def parse_known_args(  # type: ignore[override]  # one Namespace type, not the overloads
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse as argparse does, but leave the check of required options to
        :func:`_missing_options`: a required option given after a later command's name is
        then reported as misplaced (by :func:`main`), not as missing.

        argparse checks ``required`` while it parses and the usage shows it, so the required
        options are made optional for the parse and shown required again in any usage or
        help printed meanwhile (``--help``, a bad value).
        """
        self._deferred = [
            action for action in self._actions if action.required and action.option_strings
        ]
        self._required(shown=False)
        try:
            return super().parse_known_args(args, namespace)
        finally:
            self._required(shown=True)
            self._deferred = []

    def _required(self, *, shown: bool) -> None:
        for action in self._deferred:
            action.required = shown

    def format_usage(self) -> str:
        """The usage, required options shown as such even while a parse defers them."""
        self._required(shown=True)
        try:
            return super().format_usage()
        finally:
            self._required(shown=False)

    def format_help(self) -> str:
        """The help, required options shown as such even while a parse defers them."""
        self._required(shown=True)
        try:
            return super().format_help()
        finally:
            self._required(shown=False)


HELD_SIGNALS: Final = {
    "run": (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
    "simulate": (signal.SIGTERM, signal.SIGINT),
}
"""The signals a command handles itself, by command: blocked until its handler is in place
(``agent.daemon.signals`` unblocks them; a signal that came meanwhile is delivered to it
then), discarded once it is gone, and ignored until the process exits (or as they were
before, for a caller of :func:`main` with ``argv``) once the command ended."""

COMMANDS: Final = (
    ("run", "_run", "run the agent"),
    ("check-config", "_check_config", "validate a configuration file"),
    ("abi", "_abi", "print the ioctl numbers and struct layouts of the vboxguest ABI"),
    ("simulate", "_simulate", "run a simulated VirtualBox host on a Unix socket"),
    ("host", "_host", "control a running simulated host (vbox-agent simulate)"),
    ("prop", "_prop", "get, set, delete, list or wait for guest properties"),
)
"""Every command: its name, its module in ``agent.cli`` and its line in the usage."""


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word naming one, else its first word that is
    not an option (a word that names no command is the parser's error to report).

    A command's option given before the command (``--device SPEC prop get``) is then no
    command itself: :func:`_leading_options` takes it, and its value, out of the parse.
    """
    names = {name for name, _, _ in COMMANDS}
    return next(
        (word for word in argv if word in names),
        next((word for word in argv if not word.startswith("-")), None),
    )


def _command_tree(parser: CommandParser) -> Iterator[CommandParser]:
    """``parser`` and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _command_tree(subparser)


def _reading(parser: CommandParser, word: str) -> tuple[argparse.Action | None, str, bool] | None:
    """How ``parser`` reads ``word``, by argparse's own rules (prefix characters, a unique
    abbreviation, ``--opt=value``; a word with a space or like a negative number is a
    positional): None for a positional, else the option's action (None for one it does not
    know), its full name and whether the word holds its value (``--opt=value``).

    argparse has no public view of this: its reading (a tuple, in later Pythons a list
    of them) is reduced to its first two items and whether its last, the value, is given.
    An abbreviation of two options is argparse's own error. ``--`` (which ends the options,
    before argparse reads any) is read as an option nobody knows.
    """
    if word == "--":
        return None, word, False
    parser.consulted = True
    try:
        found: Any = parser._parse_optional(word)
    except argparse.ArgumentError:  # an abbreviation of two options: the reader reports it
        return None, word, False
    finally:
        parser.consulted = False
    if isinstance(found, list):
        found = found[0]
    if found is None:
        return None
    return found[0], found[1], found[-1] is not None


def _known_option(parser: CommandParser, word: str) -> str | None:
    """The full name of the option of ``parser`` that ``word`` gives, if it gives one."""
    reading = _reading(parser, word)
    return None if reading is None or reading[0] is None else reading[1]


def _takes_value(parser: CommandParser, word: str) -> bool:
    """Whether ``word``, an option of ``parser``, is followed by its value."""
    reading = _reading(parser, word)
    if reading is None:
        return False
    action, _, value_given = reading
    return action is not None and not value_given and action.nargs != 0


def _value_of(
    option: str, owner: CommandParser, reader: CommandParser, following: str | None
) -> list[str]:
    """The value that ``option`` (of ``owner``) takes from the ``following`` word, where
    ``reader`` parses them, as a list of one (else empty): argparse gives an option no word
    that looks like one (nor ``--``)."""
    if following is None or not _takes_value(owner, option):
        return []
    return [following] if _reading(reader, following) is None else []


def _leading_options(root: CommandParser, argv: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """Split ``argv`` into the options given before the command's name that are not the
    top level's (each with the value it takes, per the command's own parsers), and the rest.

    The top-level parser would take such an option's value as the command's name.
    """
    chosen = _chosen_command(argv)
    command = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    if chosen not in command.choices:
        return [], list(argv)
    position = list(argv).index(chosen)
    tree = list(_command_tree(command.choices[chosen]))
    leading: list[list[str]] = []
    rest: list[str] = []
    index = 0
    while index < position:
        word = argv[index]
        index += 1
        owner = next((p for p in tree if _known_option(p, word) is not None), None)
        if _known_option(root, word) is not None or (owner is None and not _reading(root, word)):
            rest.append(word)  # the top level's, or a positional
            continue
        owner = owner or root
        following = argv[index] if index < position else None
        leading.append([word, *_value_of(word, owner, root, following)])
        index += len(leading[-1]) - 1
    return leading, [*rest, *argv[position:]]


def _misplaced_options(
    root: CommandParser, argv: Sequence[str]
) -> tuple[list[list[str]], list[str]]:
    """Split ``argv`` into the options given after a command's name that only an outer
    command knows (each with the value it takes), and the rest.

    Left in, argparse would take such an option for an unknown one and its value for the
    next positional argument, and report that value as a bad one (``host balloon --socket
    PATH 10``: PATH is no MB). Each word is read as the parser that gets it reads it
    (:func:`_reading`): a word it takes for a positional (``'--device=a b'``) stays one.
    """
    chain = [root]
    misplaced: list[list[str]] = []
    rest: list[str] = []
    position = 0
    while position < len(argv):
        word = argv[position]
        position += 1
        if word == "--":
            rest.extend(argv[position - 1 :])
            break
        parser = chain[-1]
        if _reading(parser, word) is None:
            rest.append(word)
            chain.extend(_subcommand(parser, word))
            continue
        owner = next((p for p in reversed(chain) if _known_option(p, word) is not None), parser)
        following = argv[position] if position < len(argv) else None
        taken = [word, *_value_of(word, owner, parser, following)]
        position += len(taken) - 1
        if owner is parser:
            rest.extend(taken)
        else:
            misplaced.append(taken)
    return misplaced, rest


def _subcommand(parser: CommandParser, word: str) -> list[CommandParser]:
    """The subcommand of ``parser`` that ``word`` names, as a list of one (else empty)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and word in action.choices:
            return [action.choices[word]]
    return []


def _build_parser(argv: Sequence[str]) -> CommandParser:
    """The parser of ``vbox-agent``: every command listed, the chosen one's module loaded."""
    parser = CommandParser(
        prog="vbox-agent",
        description="VirtualBox guest agent for Linux (balloon, heartbeat, HGCM services).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen_command(argv)
    for name, module_name, summary in COMMANDS:
        command_parser = subparsers.add_parser(name, help=summary)
        if name == chosen:
            module = importlib.import_module(f"{__name__}.{module_name}")
            configure: Callable[[argparse.ArgumentParser], None] = module.configure
            configure(command_parser)
    return parser


def _give_closed_streams_devnull() -> None:
    """A process started with stdout or stderr closed (``>&-``) has ``sys.stdout`` or
    ``sys.stderr`` None, and its first print or log line would end it with a traceback:
    what it writes there goes to ``/dev/null`` instead."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))  # noqa: SIM115 - for the process's life


def _command_chain(root: CommandParser, innermost: CommandParser) -> list[CommandParser]:
    """The parsers from ``root`` down to ``innermost``, one per command name given."""
    chain = [root]
    for name in innermost.prog.split()[1:]:
        subcommands = (a for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction))
        chain.append(next(subcommands).choices[name])
    return chain


def _unrecognized(
    chain: list[CommandParser], groups: list[list[str]], leading: list[list[str]]
) -> str:
    """The error for the words no parser took, in ``groups`` (an option with its value, if
    it took one, or a word), and the ``leading`` options given before the command, ``chain``
    being the commands given (outermost first; each parser takes only its own options, after
    its name and before the next one's).

    An option that one of them knows was given in the wrong place, which is said (by its
    full name); the words left are unrecognized.
    """
    names = [parser.prog.rpartition(" ")[2] for parser in chain]
    problems: list[str] = []
    unknown: list[str] = []
    for before_command, group in [(True, g) for g in leading] + [(False, g) for g in groups]:
        # the innermost command first
        owners = (
            (depth, option)
            for depth in reversed(range(len(chain)))
            if (option := _known_option(chain[depth], group[0])) is not None
        )
        owner = next(owners, None)
        if owner is None:
            unknown.extend(group)
            continue
        depth, option = owner
        if depth == len(chain) - 1 or before_command:
            problems.append(
                f"{option} is an option of '{names[depth]}': give it after '{names[depth]}'"
            )
        else:
            problems.append(
                f"{option} is an option of '{names[depth]}': give it before '{names[depth + 1]}'"
            )
    if unknown:
        problems.append(f"unrecognized arguments: {' '.join(unknown)}")
    return "; ".join(problems)


def _missing_options(chain: list[CommandParser], args: argparse.Namespace) -> None:
    """Exit 64 with the usage of the first command in ``chain`` missing a required option."""
    for parser in chain:
        missing = [
            "/".join(action.option_strings)
            for action in parser._actions
            if action.required and action.option_strings and getattr(args, action.dest) is None
        ]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")


@contextmanager
def _signals_held(signals: Sequence[signal.Signals], *, until_exit: bool) -> Iterator[None]:
    """Block ``signals`` in the block (its code handles them where it can: it installs its
    own handler and unblocks them, and puts both back after); after it, the ones still
    pending came too late for a handler and are discarded.

    Meanwhile their handler discards them: once the command's handler is gone, a signal
    may reach a thread that does not block it (an ioctl worker). It is a Python handler:
    ``SIG_IGN`` would drop one that came, blocked, before the command's handler. With
    ``until_exit`` (the process ends after the block) they are ignored from then on
    (``SIG_IGN``, which the interpreter's exit keeps, where it resets Python handlers), so
    one that comes while the interpreter exits cannot end the process by its default
    action; otherwise the handlers and the mask are restored.

    Only the calling thread's mask changes: called before the command's imports, with no
    other thread yet (a thread started in the block inherits the blocked mask), it holds the
    signals for the whole process.
    """
    if not signals:
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    handlers = [(signum, signal.signal(signum, _discard)) for signum in signals]
    try:
        yield
    finally:
        for signum, handler in handlers:
            signal.signal(signum, signal.SIG_IGN if until_exit else handler)
        for _ in signals:  # each pending signal is taken once
            if signal.sigtimedwait(signals, 0) is None:
                break
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _discard(signum: int, frame: FrameType | None) -> None:
    """A signal handler that does nothing: the signal came after the command's handler."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vbox-agent`` with ``argv`` and return the exit code.

    Without ``argv`` it runs the process's command line (``sys.argv[1:]``) as the process's
    entry point (the console script, ``python -m agent``): the signals the command handled
    then stay ignored until the process exits (see :func:`_signals_held`).
    """
    pydantic_plugins.disable()
    _give_closed_streams_devnull()
    words = sys.argv[1:] if argv is None else argv
    held = HELD_SIGNALS.get(_chosen_command(words) or "", ())
    with _signals_held(held, until_exit=argv is None):
        return _main(words)


def _main(words: Sequence[str]) -> int:
    """:func:`main` once the command's signals are held: the exit code of the command, or of
    what ended it (Ctrl-C, output that cannot be written, ``--help`` included)."""
    try:
        return _parse_and_run(words)
    except KeyboardInterrupt:  # Ctrl-C ending `prop wait` or a wait for a host is no failure
        return EX_INTERRUPTED
    except BrokenPipeError:
        _discard_output()
        return EX_BROKEN_PIPE
    except OutputError as exc:
        _discard_output()
        say(f"vbox-agent: cannot write the output: {exc}")
        return EX_IOERR


def _parse_and_run(words: Sequence[str]) -> int:
    parser = _build_parser(words)
    leading, words = _leading_options(parser, words)
    misplaced, words = _misplaced_options(parser, words)
    args, unrecognized = parser.parse_known_args(words)
    usage_parser: CommandParser = args.usage_parser
    chain = _command_chain(parser, usage_parser)
    if leading or misplaced or unrecognized:
        groups = misplaced + [[word] for word in unrecognized]
        usage_parser.error(_unrecognized(chain, groups, leading))
    _missing_options(chain, args)
    handler: Callable[[argparse.Namespace], int] = args.handler
    code = handler(args)
    flush()
    return code


def _discard_output() -> None:
    """Point stdout at ``/dev/null``: the interpreter's last flush must not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
