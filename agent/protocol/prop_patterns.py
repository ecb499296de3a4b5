"""Name patterns as the property service matches them (IPRT's
``RTStrSimplePatternMultiMatch``): the simulated service's matching, and the guest's where it
filters a listing itself (a watch's snapshot).

A pattern is a byte string where ``*`` matches any run of bytes, ``?`` exactly one byte,
and everything else itself, case-sensitively; there is no escape and no ``[...]``. One IPRT
rule differs from shell globs: every ``?`` and ``*`` right after a ``*`` is swallowed by it,
so ``a*?`` matches ``a`` (a glob would want one more byte).

A pattern list separates patterns with ``|``. The service treats an empty list as "match
all" before IPRT sees it; inside a list an empty pattern matches only an empty name, and a
trailing ``|`` adds no pattern.
"""

from __future__ import annotations

from typing import Final

SEPARATOR: Final = b"|"
_STAR: Final = ord("*")
_ANY: Final = ord("?")


def pattern_matches(pattern: bytes, name: bytes) -> bool:
    """Return whether one ``pattern`` matches all of ``name`` (``RTStrSimplePatternNMatch``).

    IPRT backtracks recursively; after swallowing the ``?`` that follow a ``*`` its result
    is that of a plain glob, so this walks the name once and backtracks only to the last
    ``*`` (no exponential cases).
    """
    pattern = _swallow_after_stars(pattern)
    pat = nam = 0
    star_pat = -1  # position after the last '*' seen, for backtracking
    star_nam = 0
    while nam < len(name):
        if pat < len(pattern) and pattern[pat] == _STAR:
            star_pat, star_nam = pat + 1, nam
            pat += 1
        elif pat < len(pattern) and pattern[pat] in (_ANY, name[nam]):
            pat += 1
            nam += 1
        elif star_pat >= 0:
            star_nam += 1
            pat, nam = star_pat, star_nam
        else:
            return False
    return all(byte == _STAR for byte in pattern[pat:])


def _swallow_after_stars(pattern: bytes) -> bytes:
    """Drop every ``*`` and ``?`` that directly follows a ``*``."""
    if _STAR not in pattern:
        return pattern
    out = bytearray()
    for byte in pattern:
        if out and out[-1] == _STAR and byte in (_STAR, _ANY):
            continue
        out.append(byte)
    return bytes(out)


def patterns_match(patterns: bytes, name: bytes) -> bool:
    """Return whether ``name`` matches the ``|``-separated list ``patterns`` (empty: all)."""
    if not patterns:
        return True
    parts = patterns.split(SEPARATOR)
    if not parts[-1]:
        parts.pop()
    return any(pattern_matches(pattern, name) for pattern in parts)
