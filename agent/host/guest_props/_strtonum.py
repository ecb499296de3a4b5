"""IPRT's ``RTStrToUInt64``, which the service reads its counters with (``strtonum.cpp``)."""

from __future__ import annotations

from typing import Final

U64_MASK: Final = (1 << 64) - 1
_NOT_A_DIGIT: Final = 255


def str_to_u64(text: str) -> int:
    """Return the number at the start of ``text`` as ``RTStrToUInt64`` reads it, or 0.

    - Signs come first, any run of them: ``-`` flips the sign, ``+`` makes it positive.
      Nothing else is skipped, not even leading spaces.
    - The base comes from the prefix: ``0x`` or ``0X`` followed by a hexadecimal digit is
      hexadecimal, ``0`` followed by an octal digit octal, anything else decimal.
    - Digits are read as far as they go. What follows them (trailing characters, trailing
      spaces) and too many digits (the value wraps modulo 2**64) only make the status a
      warning, which ``RTStrToUInt64`` ignores; a negative number is its two's complement.
    - No digit after the signs and prefix is an error, for which it returns 0.
    """
    raw = text.encode()
    pos, negative = 0, False
    while pos < len(raw) and raw[pos] in b"+-":
        negative = raw[pos] == ord("-") and not negative
        pos += 1
    base = 10
    if _digit(raw, pos) == 0:
        if raw[pos + 1 : pos + 2] in (b"x", b"X") and _digit(raw, pos + 2) < 16:
            base, pos = 16, pos + 2
        elif _digit(raw, pos + 1) < 8:
            base = 8
    start, value = pos, 0
    while (digit := _digit(raw, pos)) < base:
        value = value * base + digit
        pos += 1
    if pos == start:
        return 0
    return (-value if negative else value) & U64_MASK


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
