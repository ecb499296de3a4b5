"""Reading TOML files: bounded in size, with syntax errors that name their line and column.

Python 3.11's ``tomllib`` puts the position in the message (``Invalid value (at line 3,
column 7)``), except where the text ends too early: then it says ``(at end of document)``.
:func:`parse_toml` names that position as a line and column too, and :func:`read_toml_file`
so names the first byte that is not UTF-8 (TOML is UTF-8 text), so every syntax error of a
config file or a scenario points at a place in the file. A leaf module (stdlib only), used by
``agent.config`` and the simulator's scenario loader. :func:`read_toml_file` reads only a
regular file, and at most ``MAX_TOML_BYTES`` of it: a path naming a FIFO, a socket or a device
fails at once, before it is opened, instead of blocking the reader (a daemon's reload) or
filling memory, and so does a log file. :func:`parse_toml` refuses a key or a table header of
more than ``MAX_KEY_PARTS`` dotted parts before ``tomllib`` reads the text, which would take
time quadratic in them (``agent.tomlkeys``): the size alone does not bound the time.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import sys
import tomllib
from typing import TYPE_CHECKING, Any, Final

from agent.tomlkeys import MAX_KEY_PARTS, find_long_key

if TYPE_CHECKING:
    from pathlib import Path

MAX_TOML_BYTES: Final = 1 << 20
"""Largest file read: a config or a scenario is a few KiB."""

_BYTE_ORDER_MARK: Final = "\ufeff"
_POSITIONED: Final = re.compile(r"^(?P<what>.*) \(at (?P<where>line \d+, column \d+)\)$")
_AT_END: Final = re.compile(r"^(?P<what>.*) \(at end of document\)$")
_INTEGER: Final = re.compile(r"[+-]?(?P<digits>[0-9_]+)")


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
        TomlSyntaxError: it is not TOML, or not UTF-8 (named by the line and column of its
            first byte that is not).
    """
    # Refused before it is opened: opening a device can act (a watchdog starts counting) and
    # opening a socket fails (ENXIO) without saying what it is.
    _check_regular(os.stat(path).st_mode, path)
    # Checked again once open, for a path replaced meanwhile: O_NONBLOCK makes a FIFO that
    # nobody writes to open at once, O_NOCTTY keeps a terminal from becoming ours.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    with open(os.open(path, flags), "rb") as file:
        _check_regular(os.fstat(file.fileno()).st_mode, path)
        data = file.read(MAX_TOML_BYTES + 1)
    if len(data) > MAX_TOML_BYTES:
        msg = f"larger than {MAX_TOML_BYTES >> 20} MiB: not a TOML file this program reads"
        raise TomlFileTooLargeError(msg)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise _not_utf8(data, exc) from None
    return parse_toml(text)


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> TomlSyntaxError:
    """The error for the first byte of ``data`` that is not UTF-8 (an editor's Latin-1
    ``\\xe9``), at its line and column as tomllib counts them: in characters, from the text
    before it, which is UTF-8."""
    before = data[: exc.start].decode().replace("\r\n", "\n")
    what = f"not UTF-8 text: byte {data[exc.start]:#04x} ({exc.reason}): save as UTF-8"
    return TomlSyntaxError(_position(before, len(before)), what)


def _check_regular(mode: int, path: Path) -> None:
    """Raise unless ``mode`` is a regular file's (``IsADirectoryError`` for a directory)."""
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    for is_kind, kind in _FILE_KINDS:
        if is_kind(mode):
            msg = f"not a regular file but {kind}: name a TOML file"
            raise NotARegularFileError(msg)


def parse_toml(text: str) -> dict[str, Any]:
    """Parse ``text`` as ``tomllib.loads`` does, but for a key of too many parts.

    Raises:
        TomlSyntaxError: a syntax error, with its line and column (those just past the last
            character when the text ends too early), or a key or table header of more than
            ``MAX_KEY_PARTS`` dotted parts, at its first part.
    """
    if text.startswith(_BYTE_ORDER_MARK):  # what Windows editors put first; TOML has none
        where, what = "line 1, column 1", "a byte order mark (U+FEFF): save as UTF-8 without BOM"
        raise TomlSyntaxError(where, what)
    parsed = text.replace("\r\n", "\n")  # as tomllib parses it
    if (long_key := find_long_key(parsed)) is not None:
        start, parts = long_key
        what = f"a key of {parts} dotted parts, more than the {MAX_KEY_PARTS} this program reads"
        raise TomlSyntaxError(_position(text, start), what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(str(exc), text) from None
    except RecursionError as exc:  # tomllib recurses once per nested array or inline table
        # The outermost key/value pair is the document's: its value holds the nesting.
        starts = _parser_positions(exc, "parse_key_value_pair")
        where = _position(text, starts[0]) if starts else ""
        raise TomlSyntaxError(where, "arrays or tables nested too deeply") from None
    except ValueError as exc:  # the only other one: an integer longer than int() converts
        raise _integer_too_long(exc, text) from None


def _parser_positions(exc: BaseException, function: str) -> list[int]:
    """The ``pos`` of every call of tomllib's ``function`` the traceback of ``exc`` holds,
    outermost first: where in the text that call was parsing.

    Both names are tomllib's own, so a Python whose tomllib differs gets no position rather
    than a wrong one.
    """
    positions: list[int] = []
    traceback = exc.__traceback__
    while traceback is not None:  # as long as the recursion limit, at most
        frame = traceback.tb_frame
        code, module = frame.f_code.co_name, frame.f_globals.get("__name__")
        if code == function and module == "tomllib._parser":
            pos = frame.f_locals.get("pos")
            if isinstance(pos, int):
                positions.append(pos)
        traceback = traceback.tb_next
    return positions


def _position(text: str, index: int) -> str:
    """``line L, column C`` of ``index`` in ``text`` as tomllib parsed it ("\\r\\n" as "\\n")."""
    parsed = text.replace("\r\n", "\n")
    line = parsed.count("\n", 0, index) + 1
    column = index - parsed.rfind("\n", 0, index)
    return f"line {line}, column {column}"


def _integer_too_long(exc: ValueError, text: str) -> TomlSyntaxError:
    """The error for a decimal integer over ``sys.get_int_max_str_digits()`` digits.

    Its position is where tomllib's innermost ``parse_value`` was, the integer's first
    character (a digit run earlier in a comment or a string is not it).
    """
    limit = sys.get_int_max_str_digits()
    values = _parser_positions(exc, "parse_value")
    parsed = text.replace("\r\n", "\n")
    if values and (integer := _INTEGER.match(parsed, values[-1])) is not None:
        digits = len(integer["digits"].replace("_", ""))
        what = f"an integer of {digits} digits, more than the {limit} this program reads"
        return TomlSyntaxError(_position(text, values[-1]), what)
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
