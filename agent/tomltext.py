"""Reading TOML text with syntax errors that always name their line and column.

Python 3.11's ``tomllib`` puts the position in the message (``Invalid value (at line 3,
column 7)``), except where the text ends too early: then it says ``(at end of document)``.
:func:`parse_toml` names that position as a line and column too, so every syntax error of a
config file or a scenario points at a place in the file. A leaf module (stdlib only), used by
``agent.config`` and the simulator's scenario loader.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any, Final

_POSITIONED: Final = re.compile(r"^(?P<what>.*) \(at (?P<where>line \d+, column \d+)\)$")
_AT_END: Final = re.compile(r"^(?P<what>.*) \(at end of document\)$")


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


def parse_toml(text: str) -> dict[str, Any]:
    """Parse ``text`` as ``tomllib.loads`` does.

    Raises:
        TomlSyntaxError: a syntax error, with its line and column (those just past the last
            character when the text ends too early).
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(str(exc), text) from None


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
