"""Numbers as IPRT's ``RTStrToUInt64Ex`` reads them in base 0 (``strtonum.cpp``).

The guest-property service reads its counters this way, leniently, and VBoxService its
options; the agent reads the options strictly. :func:`read_number` gives both what they need:
the value ``RTStrToUInt64`` returns and whether the text was one plain number.

- Signs come first, any run of them: ``-`` flips the sign, ``+`` makes it positive. Nothing
  else is skipped, not even leading spaces.
- The base comes from the prefix: ``0x`` or ``0X`` followed by a hexadecimal digit is
  hexadecimal, ``0`` followed by an octal digit octal, anything else decimal (``09`` is 9).
- Digits are read as far as they go. What follows them and too many digits (the value wraps
  modulo 2**64) only make IPRT's status a warning; a negative number is its two's complement.
- No digit after the signs and prefix is an error.
"""

from __future__ import annotations

from typing import Final

from agent.records import record

U64_MASK: Final = (1 << 64) - 1
_NOT_A_DIGIT: Final = 255


@record
class IprtNumber:
    """What IPRT reads at the start of a text."""

    value: int
    """The unsigned 64-bit result (wrapped, two's complement when negative)."""
    exact: bool
    """The text was digits alone, after the base prefix: no sign, nothing after them, and
    below 2**64 (IPRT's status is a plain success)."""


def read_number(text: str) -> IprtNumber | None:
    """Read the number at the start of ``text``; None when there is no digit to read."""
    raw = text.encode()
    pos, negative = 0, False
    while pos < len(raw) and raw[pos] in b"+-":
        negative = raw[pos] == ord("-") and not negative
        pos += 1
    signed = pos > 0
    base = 10
    if _digit(raw, pos) == 0:
        if raw[pos + 1 : pos + 2] in (b"x", b"X") and _digit(raw, pos + 2) < 16:
            base, pos = 16, pos + 2
        elif _digit(raw, pos + 1) < 8:
            base = 8
    start, value, wrapped = pos, 0, False
    while (digit := _digit(raw, pos)) < base:
        value = value * base + digit
        wrapped = wrapped or value > U64_MASK
        value &= U64_MASK
        pos += 1
    if pos == start:
        return None
    exact = not signed and not wrapped and pos == len(raw)
    return IprtNumber((-value if negative else value) & U64_MASK, exact)


def _digit(raw: bytes, pos: int) -> int:
    """The value of the byte at ``pos`` as a digit of base 36 (``0-9``, ``a-z``, ``A-Z``)."""
    if pos >= len(raw):
        return _NOT_A_DIGIT
    byte = raw[pos]
    if ord("0") <= byte <= ord("9"):
        return byte - ord("0")
    if ord("a") <= byte | 0x20 <= ord("z"):
        return (byte | 0x20) - ord("a") + 10
    return _NOT_A_DIGIT
