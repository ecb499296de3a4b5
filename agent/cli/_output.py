"""The commands' answers on stdout, their other lines on stderr, and what a failed write does.

A command writes its answer with :func:`write_line`; a write the system refuses (a full disk:
``> /dev/full``) raises :class:`OutputError`, which ``main`` reports in one line with exit
74. A reader that went away (``| head``) stays a ``BrokenPipeError``: exit 141, no message.
Every other line (why a command failed, a warning, where the simulated host listens) goes to
stderr with :func:`say`, which drops a line stderr refuses: the command goes on and exits
with the code it decided.
"""

from __future__ import annotations

import io
import sys


class OutputError(Exception):
    """stdout refused a write (its ``OSError`` is the cause)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))


def escape_unencodable() -> None:
    """Make stdout print what its encoding cannot hold backslash-escaped, not fail on it
    (a valid value under an ASCII locale)."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def write_line(text: str) -> None:
    """Write ``text`` and a newline to stdout.

    Raises:
        OutputError: the write failed, other than for a closed pipe.
    """
    write_text(f"{text}\n")


def write_text(text: str) -> None:
    """Write ``text`` to stdout as it is.

    Raises:
        OutputError: the write failed, other than for a closed pipe.
    """
    try:
        sys.stdout.write(text)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc) from exc


def flush() -> None:
    """Flush stdout: the last of the answer, still buffered, is written now.

    Raises:
        OutputError: the write failed, other than for a closed pipe.
    """
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(exc) from exc


def say(line: str) -> None:
    """Write ``line`` and a newline to stderr, for the person or script that ran the command.

    A stream that refuses it (``OSError``: a full disk, a reader gone; ``ValueError``: a
    closed stream or text it cannot encode) is left alone: there is nowhere else to say it.
    ``agent.logconfig`` guards its own line on stderr the same way; it is not imported here,
    which would load structlog into ``abi``, ``--help`` and ``--version`` (about 90 ms).
    """
    try:
        sys.stderr.write(f"{line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        return
