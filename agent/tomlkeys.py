"""Finding a TOML key of too many dotted parts, in linear time, before ``tomllib`` reads it.

Python 3.11's ``tomllib`` takes time quadratic in the parts of a dotted key (``a.b.c = 1``,
or a table header ``[a.b.c]``): it grows the key one part at a time and walks its parts,
and those of the table's header, again for each key (CPython gh-149231, gh-152930). One key
of 20 000 parts, a 40 KB file, took 8 s; 40 000 parts 45 s; 1 MiB, hours.

:func:`find_long_key` splits the text as ``tomllib`` does: a dot in a quoted key
(``"a.b" = 1``), in a string (basic, literal, multi-line) or in a comment is no part of a
key. It counts the parts of every dotted run outside them, keys or not (a float's ``1.5``
is two parts): in text that is not TOML, a run that is no key may be named before the
syntax error ``tomllib`` would name. A string that does not end (on its line, or at all)
ends the search, as it ends ``tomllib``'s reading.
A leaf module (stdlib only), used by ``agent.tomltext``.
"""

from __future__ import annotations

import re
from typing import Final

MAX_KEY_PARTS: Final = 4
"""Most dotted parts in a key or a table header: twice what the agent's files use
(``[log]`` with ``level``, or ``log.level``). With it, the costliest 1 MiB file found
(``bench/toml_keys.py``: a header and then one key, each of 4 parts, over and over) took
1.7 s of CPU in ``tomllib`` on the 2-core test machine (Python 3.11.7); 1.2 s with keys of
2 parts, 2.4 s with 8, 0.3 to 0.9 s with no dotted key (keys, tables, deep inline tables,
a long array); the check itself, 0.06 s more. What remains grows with the size, which
``MAX_TOML_BYTES`` bounds, not with the parts."""

_BARE: Final = r"[A-Za-z0-9_-]"
_QUOTED: Final = r"""(?:"(?:[^"\\\n]++|\\.)*+"|'[^'\n]*+')"""
_PART: Final = rf"(?:{_BARE}++|{_QUOTED})"
_DOT: Final = r"[ \t]*+\.[ \t]*+"
_LONG_KEY: Final = rf"{_PART}(?:{_DOT}{_PART}){{{MAX_KEY_PARTS}}}(?:{_DOT}{_PART})*+"
_KEY_PART: Final = re.compile(_PART)
_SCAN: Final = re.compile(
    rf"""
    (?<![A-Za-z0-9_.-])(?<!\.[ \t])(?P<long_key>{_LONG_KEY})
    | \#[^\n]*+
    | \"\"\"(?:[^"\\]++|\\[\s\S]|"(?!""))*+\"\"\"\"{{0,2}}+
    | '''(?:[^']++|'(?!''))*+''''{{0,2}}+
    | {_QUOTED}
    | (?P<unended>["'])
    """,
    re.VERBOSE,
)
"""Left to right, the first of: a run of more than ``MAX_KEY_PARTS`` parts, a comment, a
string (skipped whole: nothing in it is counted), or a quote that begins no string. A run is
not begun after a bare key character or a dot (and a space): ``finditer`` tries every
position, and a key's first part follows neither, while any other part does."""


def find_long_key(text: str) -> tuple[int, int] | None:
    """The index in ``text`` and the number of parts of its first key of more than
    ``MAX_KEY_PARTS`` dotted parts, or ``None``.

    ``text`` has its "\\r\\n" line ends as "\\n", as ``tomllib`` parses it.
    """
    for match in _SCAN.finditer(text):
        if match.lastgroup == "unended":
            return None
        if match.lastgroup == "long_key":
            return match.start(), len(_KEY_PART.findall(match["long_key"]))
    return None
