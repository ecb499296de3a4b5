"""Reading TOML files: bounded in size, with syntax errors that name their line and column.

Python 3.11's ``tomllib`` puts the position in the message (``Invalid value (at line 3,
column 7)``), except where the text ends too early: then it says ``(at end of document)``.
:func:`parse_toml` names that position as a line and column too, so every syntax error of a
config file or a scenario points at a place in the file. A leaf module (stdlib only), used by
``agent.config`` and the simulator's scenario loader. :func:`read_toml_file` reads only a
regular file, and at most ``MAX_TOML_BYTES`` of it: a path naming a FIFO or a device fails at
once instead of blocking the reader (a daemon's reload) or filling memory, and so does a log
file.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tomllib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pathlib import Path

MAX_TOML_BYTES: Final = 1 << 20
"""Largest file read: a config or a scenario is a few KiB."""

_BYTE_ORDER_MARK: Final = "\ufeff"
_POSITIONED: Final = re.compile(r"^(?P<what>.*) \(at (?P<where>line \d+, column \d+)\)$")
_AT_END: Final = re.compile(r"^(?P<what>.*) \(at end of document\)$")
_DECIMAL_DIGITS: Final = re.compile(r"(?<![\w.])[0-9][0-9_]*(?![\w.])")


class TomlSyntaxError(ValueError):
    """The text is not TOML.

    Attributes:
        where: ``line L, column C`` (with `` (the end of the file)`` when the text ends too
            early); empty in the unlikely case tomllib named no position.
        what: what is wrong, in tomllib's words.
    """

    def __init__(self, where: str, what: str) -> None:
        self.where = where
        self.what = what
        super().__init__(f"{where}: {what}" if where else what)


class TomlFileTooLargeError(ValueError):
    """The file holds more than ``MAX_TOML_BYTES``."""


class NotARegularFileError(ValueError):
    """The path names a FIFO, a socket or a device, not a file."""


_FILE_KINDS: Final = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def read_toml_file(path: Path) -> dict[str, Any]:
    """Read and parse the UTF-8 TOML file at ``path`` (line ends as written, as ``tomllib.load``).

    Raises:
        OSError: the file cannot be read (``IsADirectoryError`` for a directory).
        NotARegularFileError: the path names a FIFO, a socket or a device.
        TomlFileTooLargeError: it is larger than ``MAX_TOML_BYTES``.
        UnicodeDecodeError: it is not UTF-8.
        TomlSyntaxError: it is not TOML.
    """
    # O_NONBLOCK: opening a FIFO nobody writes to returns at once, so fstat can refuse it.
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        for is_kind, kind in _FILE_KINDS:
            if is_kind(mode):
                msg = f"not a regular file but {kind}: name a TOML file"
                raise NotARegularFileError(msg)
        data = file.read(MAX_TOML_BYTES + 1)
    if len(data) > MAX_TOML_BYTES:
        msg = f"larger than {MAX_TOML_BYTES >> 20} MiB: not a TOML file this program reads"
        raise TomlFileTooLargeError(msg)
    return parse_toml(data.decode())


def parse_toml(text: str) -> dict[str, Any]:
    """Parse ``text`` as ``tomllib.loads`` does.

    Raises:
        TomlSyntaxError: a syntax error, with its line and column (those just past the last
            character when the text ends too early).
    """
    if text.startswith(_BYTE_ORDER_MARK):  # what Windows editors put first; TOML has none
        where, what = "line 1, column 1", "a byte order mark (U+FEFF): save as UTF-8 without BOM"
        raise TomlSyntaxError(where, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(str(exc), text) from None
    except ValueError:  # the only other one: an integer longer than int() converts
        raise _integer_too_long(text) from None
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        what = "arrays or tables nested too deeply"
        raise TomlSyntaxError(_nested_value_position(exc, text), what) from None


def _nested_value_position(exc: RecursionError, text: str) -> str:
    """Where the value nested too deeply begins, or "" when the traceback does not say.

    The outermost ``parse_key_value_pair`` frame of tomllib's (it parses one ``key = value``
    of the document) holds in ``pos`` the start of the value it is parsing: the value that
    holds the nesting. Its name and local are tomllib's own, so a Python whose tomllib
    differs gets no position rather than a wrong one.
    """
    traceback = exc.__traceback__
    while traceback is not None:  # as long as the recursion limit, at most
        frame = traceback.tb_frame
        code, module = frame.f_code.co_name, frame.f_globals.get("__name__")
        if code == "parse_key_value_pair" and module == "tomllib._parser":
            pos = frame.f_locals.get("pos")
            if isinstance(pos, int):
                return _position(text.replace("\r\n", "\n"), pos)
        traceback = traceback.tb_next
    return ""


def _position(parsed: str, index: int) -> str:
    """``line L, column C`` of ``index`` in ``parsed`` (the text as tomllib parsed it)."""
    line = parsed.count("\n", 0, index) + 1
    column = index - parsed.rfind("\n", 0, index)
    return f"line {line}, column {column}"


def _integer_too_long(text: str) -> TomlSyntaxError:
    """The error for the first decimal integer over ``sys.get_int_max_str_digits()`` digits."""
    limit = sys.get_int_max_str_digits()
    parsed = text.replace("\r\n", "\n")  # as tomllib counts (see _syntax_error)
    for match in _DECIMAL_DIGITS.finditer(parsed):
        digits = len(match[0].replace("_", ""))
        if digits > limit:
            what = f"an integer of {digits} digits, more than the {limit} this program reads"
            return TomlSyntaxError(_position(parsed, match.start()), what)
    return TomlSyntaxError("", f"an integer of more than {limit} digits")


def _syntax_error(message: str, text: str) -> TomlSyntaxError:
    if (match := _POSITIONED.match(message)) is not None:
        return TomlSyntaxError(match["where"], match["what"])
    if (match := _AT_END.match(message)) is not None:
        # tomllib counts in the text with "\r\n" turned into "\n", as it parsed it.
        parsed = text.replace("\r\n", "\n")
        line = parsed.count("\n") + 1
        column = len(parsed) - parsed.rfind("\n")
        return TomlSyntaxError(f"line {line}, column {column} (the end of the file)", match["what"])
    return TomlSyntaxError("", message)
