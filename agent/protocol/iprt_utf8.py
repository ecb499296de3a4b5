"""UTF-8 as IPRT checks it (``rtUtf8Length`` in ``utf-8.cpp``, behind
``RTStrValidateEncodingEx``): what the host's services take in a string, which is not what
Python's decoder takes.

- A lead byte starts a sequence of two to six bytes, each byte after it a continuation
  (``10xxxxxx``); a sequence cut short is refused.
- Code points run to 0x7FFFFFFF: a four-byte sequence carries up to 0x1FFFFF (past
  Unicode's 0x10FFFF), and five- and six-byte sequences are taken.
- A code point in a longer sequence than it needs (overlong) is refused.
- U+FFFE and U+FFFF are ``VERR_CODE_POINT_ENDIAN_INDICATOR``, surrogates (U+D800..U+DFFF)
  ``VERR_CODE_POINT_SURROGATE``; every other fault ``VERR_INVALID_UTF8_ENCODING``.

The checks here take a string without its NUL: IPRT stops at the first one.
"""

from __future__ import annotations

import re
from typing import Final

from agent.protocol.status import STATUS_CODES, VERR_INVALID_UTF8_ENCODING, VINF_SUCCESS
from agent.records import record

VERR_CODE_POINT_ENDIAN_INDICATOR: Final = STATUS_CODES["VERR_CODE_POINT_ENDIAN_INDICATOR"]
VERR_CODE_POINT_SURROGATE: Final = STATUS_CODES["VERR_CODE_POINT_SURROGATE"]
_LEAD_BYTES: Final = (
    (0xE0, 0xC0, 2),
    (0xF0, 0xE0, 3),
    (0xF8, 0xF0, 4),
    (0xFC, 0xF8, 5),
    (0xFE, 0xFC, 6),
)
"""(mask, value, sequence length) of each lead byte IPRT takes."""
MAX_SEQUENCE_BYTES: Final = 6
_CODE_POINTS: Final = {
    2: (0x80, 0x7FF),
    3: (0x800, 0xFFFD),
    4: (0x1_0000, 0x1F_FFFF),
    5: (0x20_0000, 0x3FF_FFFF),
    6: (0x400_0000, 0x7FFF_FFFF),
}
"""The code points a sequence of each length may carry: fewer would be overlong, and the
three-byte range stops short of the two endian indicators (an overlong four-byte form of
one is plain bad UTF-8)."""
_ENDIAN_INDICATORS: Final = (0xFFFE, 0xFFFF)
_REPLACEMENT: Final = "\ufffd".encode()
_SURROGATES: Final = range(0xD800, 0xE000)
_ENDIAN_INDICATOR_BYTES: Final = re.compile(b"\xef\xbf[\xbe\xbf]")
"""U+FFFE or U+FFFF in UTF-8 that Python's decoder took: no other code point's bytes hold
these three, as 0xEF only ever leads a sequence."""


@record
class Utf8Fault:
    """Why and where IPRT refuses a string."""

    status: int
    """The status ``RTStrValidateEncodingEx`` returns."""
    offset: int
    """The byte at which the refused sequence starts."""


def utf8_fault(raw: bytes | bytearray) -> Utf8Fault | None:
    """What IPRT refuses in ``raw`` (a string without its NUL), or None when it takes it all."""
    if raw.isascii():
        return None
    try:
        raw.decode()
    except UnicodeDecodeError:
        pass  # IPRT may still take it: its UTF-8 reaches past Unicode
    else:
        # Python's decoder takes a subset of what IPRT takes, less the endian indicators.
        if _ENDIAN_INDICATOR_BYTES.search(raw) is None:
            return None
    return _walk(raw)


def validate_utf8(raw: bytes | bytearray) -> int:
    """``RTStrValidateEncodingEx`` of ``raw`` (a string without its NUL): VINF_SUCCESS, or
    the status IPRT refuses it with."""
    fault = utf8_fault(raw)
    return VINF_SUCCESS if fault is None else fault.status


def replace_refused(raw: bytes) -> bytes:
    """``raw`` (a string without its NUL) with each sequence IPRT refuses as U+FFFD, the rest
    byte for byte: a refused code point (U+FFFE, U+FFFF, a surrogate: three bytes) whole, a
    byte that starts no sequence IPRT takes alone. For short strings such as names: each
    refusal walks the rest again."""
    kept = bytearray()
    while (fault := utf8_fault(raw)) is not None:
        refused = 1 if fault.status == VERR_INVALID_UTF8_ENCODING else 3
        kept += raw[: fault.offset] + _REPLACEMENT
        raw = raw[fault.offset + refused :]
    return bytes(kept + raw)


def without_cut_sequence(raw: bytes) -> bytes:
    """``raw`` less a sequence cut short at its end (a lead byte followed by fewer
    continuation bytes than it announces), as a fixed-size field's cut leaves one; else
    ``raw`` as it is."""
    tail = len(raw)
    while tail > 0 and len(raw) - tail < MAX_SEQUENCE_BYTES and raw[tail - 1] & 0xC0 == 0x80:
        tail -= 1
    if tail == 0:
        return raw
    lead = raw[tail - 1]
    length = next((n for mask, value, n in _LEAD_BYTES if lead & mask == value), 0)
    return raw[: tail - 1] if length > len(raw) - tail + 1 else raw


def _walk(raw: bytes | bytearray) -> Utf8Fault | None:
    """``rtUtf8Length``'s walk, a sequence at a time."""
    index = 0
    while index < len(raw):
        lead = raw[index]
        if lead < 0x80:
            index += 1
            continue
        length = next((n for mask, value, n in _LEAD_BYTES if lead & mask == value), 0)
        tail = raw[index + 1 : index + length]
        if not length or len(tail) < length - 1 or any(byte & 0xC0 != 0x80 for byte in tail):
            return Utf8Fault(VERR_INVALID_UTF8_ENCODING, index)
        point = lead & (0x7F >> length)
        for byte in tail:
            point = point << 6 | byte & 0x3F
        low, high = _CODE_POINTS[length]
        if not low <= point <= high:
            endian = length == 3 and point in _ENDIAN_INDICATORS  # only there, as IPRT
            status = VERR_CODE_POINT_ENDIAN_INDICATOR if endian else VERR_INVALID_UTF8_ENCODING
            return Utf8Fault(status, index)
        if point in _SURROGATES:
            return Utf8Fault(VERR_CODE_POINT_SURROGATE, index)
        index += length
    return None
