"""The commands' answers on stdout, and the one error a failed write becomes.

A command writes its answer with :func:`write_line`; a write the system refuses (a full disk:
``> /dev/full``) raises :class:`OutputError`, which ``main`` reports in one line with exit
74. A reader that went away (``| head``) stays a ``BrokenPipeError``: exit 141, no message.
"""

from __future__ import annotations

import sys


class OutputError(Exception):
    """stdout refused a write (its ``OSError`` is the cause)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))


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
