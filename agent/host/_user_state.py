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
from agent.protocol.iprt_utf8 import validate_utf8
from agent.protocol.status import VERR_INVALID_PARAMETER, VERR_TOO_MUCH_DATA, VINF_SUCCESS

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
