"""Name patterns as the service matches them (``RTStrSimplePatternMultiMatch``).

A pattern is a byte string where ``*`` matches any run of bytes and ``?`` exactly one byte;
everything else matches itself, case-sensitively. A pattern list separates patterns with
``|``. An empty list matches every name; an empty pattern inside a list matches only an
empty name, and a trailing ``|`` adds no pattern.
"""

from __future__ import annotations

from typing import Final

SEPARATOR: Final = b"|"


def pattern_matches(pattern: bytes, name: bytes) -> bool:
    """Return whether one ``pattern`` matches all of ``name``."""
    pat = nam = 0
    star_pat = -1  # position after the last '*' seen, for backtracking
    star_nam = 0
    while nam < len(name):
        if pat < len(pattern) and pattern[pat] == ord("*"):
            star_pat, star_nam = pat + 1, nam
            pat += 1
        elif pat < len(pattern) and pattern[pat] in (ord("?"), name[nam]):
            pat += 1
            nam += 1
        elif star_pat >= 0:
            star_nam += 1
            pat, nam = star_pat, star_nam
        else:
            return False
    return all(byte == ord("*") for byte in pattern[pat:])


def patterns_match(patterns: bytes, name: bytes) -> bool:
    """Return whether ``name`` matches any pattern of the ``|``-separated list ``patterns``."""
    if not patterns:
        return True
    parts = patterns.split(SEPARATOR)
    if not parts[-1]:
        parts.pop()
    return any(pattern_matches(pattern, name) for pattern in parts)
