"""REPORT_GUEST_USER_STATE as the host checks it, with Main attached to take the report.

``VMMDevReportGuestUserState`` is the header, then ``VBoxGuestUserStatus``: the state and
the sizes of the user name, the domain and the details (u32 each), then those three fields
one after the other from offset 40 (the structure itself is 44 bytes, one byte for each).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from agent.protocol.constants import HEADER_SIZE
from agent.protocol.status import (
    STATUS_CODES,
    VERR_INVALID_PARAMETER,
    VERR_INVALID_UTF8_ENCODING,
    VERR_TOO_MUCH_DATA,
    VINF_SUCCESS,
)

USER_STATE_SIZE: Final = 44
"""``sizeof(VMMDevReportGuestUserState)``: the dispatcher's minimum."""
MAX_REQUEST: Final = 2048
MAX_USER: Final = 256
MAX_DOMAIN: Final = 256
MAX_DETAILS: Final = 1024
"""The limits the handler asserts before it parses anything (VERR_TOO_MUCH_DATA)."""
_STATUS: Final = struct.Struct("<IIII")
"""State, user size, domain size, details size, after the header."""
_DYNAMIC_AT: Final = HEADER_SIZE + _STATUS.size
VERR_CODE_POINT_ENDIAN_INDICATOR: Final = STATUS_CODES["VERR_CODE_POINT_ENDIAN_INDICATOR"]
VERR_CODE_POINT_SURROGATE: Final = STATUS_CODES["VERR_CODE_POINT_SURROGATE"]
_SEQUENCES: Final = (
    (0xE0, 0xC0, 2),
    (0xF0, 0xE0, 3),
    (0xF8, 0xF0, 4),
    (0xFC, 0xF8, 5),
    (0xFE, 0xFC, 6),
)
"""(mask, value, length) of the lead bytes IPRT takes: up to six-byte sequences."""
_RANGES: Final = {
    2: (0x80, 0x7FF),
    3: (0x800, 0xFFFD),
    4: (0x1_0000, 0x1F_FFFF),
    5: (0x20_0000, 0x3FF_FFFF),
    6: (0x400_0000, 0x7FFF_FFFF),
}
"""The code points a sequence of each length may carry (shorter forms are overlong)."""


@dataclass(frozen=True, slots=True)
class UserState:
    """One report Main took: the user, the domain (None when empty; both as the guest's
    bytes, UTF-8 as IPRT takes it), the state, the details."""

    user: bytes
    domain: bytes | None
    state: int
    details: bytes


def parse_user_state(req: bytes | bytearray) -> UserState | int:
    """``vmmdevReqHandler_ReportGuestUserState`` past the size check: the report, or the
    status the host answers, checked in its order (the user name must not be empty)."""
    state, cb_user, cb_domain, cb_details = _STATUS.unpack_from(req, HEADER_SIZE)
    if (
        len(req) > MAX_REQUEST
        or cb_user > MAX_USER
        or cb_domain > MAX_DOMAIN
        or cb_details > MAX_DETAILS
    ):
        return VERR_TOO_MUCH_DATA
    if cb_user == 0:
        return VERR_INVALID_PARAMETER
    at, left = _DYNAMIC_AT, len(req) - _DYNAMIC_AT
    texts: list[bytes] = []
    for size in (cb_user, cb_domain):
        if size > left:
            return VERR_INVALID_PARAMETER
        if size:  # the domain may be empty
            text = _string(req, at, size)
            if isinstance(text, int):
                return text
            texts.append(text)
            at, left = at + size, left - size
    if cb_details > left:
        return VERR_INVALID_PARAMETER
    domain = texts[1] if cb_domain else None
    return UserState(texts[0], domain, state, bytes(req[at : at + cb_details]))


def _string(req: bytes | bytearray, at: int, size: int) -> bytes | int:
    """A string field: a NUL within its ``size`` bytes (``RTStrEnd``), then valid UTF-8 up
    to that NUL (``RTStrValidateEncoding``); the text, or the status."""
    end = req.find(0, at, at + size)
    if end < 0:
        return VERR_INVALID_PARAMETER
    raw = bytes(req[at:end])
    rc = validate_utf8(raw)
    return raw if rc == VINF_SUCCESS else rc


def validate_utf8(raw: bytes) -> int:
    """IPRT's ``rtUtf8Length`` on a string without its NUL: sequences of up to six bytes,
    code points up to 0x7FFFFFFF, no overlong forms; U+FFFE and U+FFFF are
    VERR_CODE_POINT_ENDIAN_INDICATOR, surrogates VERR_CODE_POINT_SURROGATE."""
    index = 0
    while index < len(raw):
        lead = raw[index]
        if lead < 0x80:
            index += 1
            continue
        length = next((n for mask, value, n in _SEQUENCES if lead & mask == value), 0)
        tail = raw[index + 1 : index + length]
        if not length or len(tail) < length - 1 or any(b & 0xC0 != 0x80 for b in tail):
            return VERR_INVALID_UTF8_ENCODING
        point = lead & (0x7F >> length)
        for byte in tail:
            point = point << 6 | byte & 0x3F
        low, high = _RANGES[length]
        if not low <= point <= high:
            endian = point in (0xFFFE, 0xFFFF)
            return VERR_CODE_POINT_ENDIAN_INDICATOR if endian else VERR_INVALID_UTF8_ENCODING
        if 0xD800 <= point <= 0xDFFF:
            return VERR_CODE_POINT_SURROGATE
        index += length
    return VINF_SUCCESS
