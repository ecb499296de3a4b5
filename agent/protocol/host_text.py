"""Host strings that Python cannot decode: how they are kept and how they are shown.

The host's services take any string IPRT takes as UTF-8 (:mod:`agent.protocol.iprt_utf8`):
code points past U+10FFFF, five- and six-byte sequences. Python's decoder refuses those
bytes, so a ``str`` keeps each as a surrogate escape (``surrogateescape``: U+DC80..U+DCFF,
one per byte; IPRT refuses real surrogates, so none is ambiguous): :func:`host_str` reads
them so, and :func:`host_bytes` gives the bytes back as the host holds them. Two names the
host holds apart stay apart, and a name is sent back as it came. The client and the
simulated service both hold text this way.

Shown to a person or in JSON (``prop get``, ``enum``, ``wait`` and ``host prop get``, text
and ``--json``), such text follows one rule, :func:`displayed`: each byte Python could not
decode as ``\\xNN`` (``backslashreplace`` of the bytes), as error messages show them
(:func:`agent.protocol.errors.shown`); all else as it is. No lone surrogate is ever
printed, and valid text is printed unchanged.
"""

from __future__ import annotations

import re
from typing import Final

_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_BYTE_ESCAPES: Final = range(0xDC80, 0xDD00)
"""The surrogates ``surrogateescape`` stands undecodable bytes with (0x80..0xFF)."""


def host_str(raw: bytes | bytearray) -> str:
    """Host text (UTF-8 as IPRT takes it) as a ``str``: each byte Python cannot decode a
    surrogate escape; valid text costs nothing more."""
    return raw.decode("utf-8", "surrogateescape")


def host_bytes(text: str) -> bytes:
    """``text`` as the host holds it: UTF-8, each surrogate escape the byte it stands for."""
    return text.encode("utf-8", "surrogateescape")


def displayed(text: str) -> str:
    """``text`` to print: each undecodable byte (a surrogate escape) as ``\\xNN``, any other
    lone surrogate (which no host string holds) as ``\\udNNN``; valid text as it is."""
    if text.isascii():
        return text
    return _SURROGATE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    point = ord(match[0])
    if point in _BYTE_ESCAPES:
        return f"\\x{point - 0xDC00:02x}"
    return f"\\u{point:04x}"
