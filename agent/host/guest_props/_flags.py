"""Property flags (``GUEST_PROP_F_*``) and their text (``GuestPropValidateFlags``, ``WriteFlags``).

Parsing is comma separated and ASCII case-insensitive, with spaces (only spaces) allowed
around names and commas; a trailing comma is accepted and an empty string means NIL.
Formatting lists the flags in a fixed order joined by ``", "``, prints READONLY when both
RDONLY bits are set, and always adds TRANSIENT to TRANSRESET.
"""

from __future__ import annotations

from typing import Final

NILFLAG: Final = 0x00
TRANSIENT: Final = 0x02
RDONLYGUEST: Final = 0x04
RDONLYHOST: Final = 0x08
READONLY: Final = RDONLYGUEST | RDONLYHOST
TRANSRESET: Final = 0x10
ALLFLAGS: Final = TRANSIENT | READONLY | TRANSRESET

# Parse and print order; READONLY precedes its parts so that it wins when both are set.
_FLAG_NAMES: Final = (
    (TRANSIENT, "TRANSIENT"),
    (READONLY, "READONLY"),
    (RDONLYGUEST, "RDONLYGUEST"),
    (RDONLYHOST, "RDONLYHOST"),
    (TRANSRESET, "TRANSRESET"),
)
_ASCII_UPPER: Final = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class FlagsParseError(ValueError):
    """A flags string the service rejects with ``VERR_PARSE_ERROR``."""


def parse_flags(text: str) -> int:
    """Return the flag bits named by ``text``.

    Raises:
        FlagsParseError: ``text`` holds something other than flag names, commas and spaces.
    """
    upper = text.translate(_ASCII_UPPER)
    pos = _skip_spaces(upper, 0)
    flags = NILFLAG
    while pos < len(upper):
        match = next(((b, n) for b, n in _FLAG_NAMES if upper.startswith(n, pos)), None)
        if match is None:
            msg = f"invalid flags {text!r}: unknown flag at {text[pos:]!r}"
            raise FlagsParseError(msg)
        bit, name = match
        flags |= bit
        pos = _skip_spaces(upper, pos + len(name))
        if pos < len(upper):
            if upper[pos] != ",":
                msg = f"invalid flags {text!r}: expected ',' before {text[pos:]!r}"
                raise FlagsParseError(msg)
            pos = _skip_spaces(upper, pos + 1)
    return flags


def format_flags(flags: int) -> str:
    """Return the text form of ``flags`` as the service writes it.

    Raises:
        ValueError: ``flags`` has bits outside ``ALLFLAGS``.
    """
    if flags & ~ALLFLAGS:
        msg = f"unknown flag bits {flags & ~ALLFLAGS:#x}"
        raise ValueError(msg)
    if flags & TRANSRESET:
        flags |= TRANSIENT
    names = []
    for bit, name in _FLAG_NAMES:
        if flags & bit == bit:
            names.append(name)
            flags &= ~bit
    return ", ".join(names)


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] == " ":
        pos += 1
    return pos
