"""What the guest additions told the host: interface version, additions version, caps, mouse."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import HEADER_SIZE
from agent.protocol.status import (
    VERR_INVALID_PARAMETER,
    VERR_OUT_OF_RANGE,
    VERR_VERSION_MISMATCH,
    VINF_SUCCESS,
)

INTERFACE_MAJOR: Final = 1
INTERFACE_MAX_MINOR: Final = 4
"""REPORT_GUEST_INFO must carry interface 1.x with x <= 4 (``VMMDEV_VERSION``)."""
MIN_ADDITIONS_MAJOR: Final = 3
STRICT_NAME_VERSION: Final = (4, 1, 50)
"""From this additions version on, INFO2's name must start with "major.minor.build"."""
MAX_MAJOR: Final = 0xFF
MAX_MINOR: Final = 0xFF
MAX_BUILD: Final = 0xFFFF
"""The version must pack into ``VBOX_FULL_VERSION`` (8.8.16 bits)."""
BUILD_TAG_PREFIXES: Final = (b"RC", b"BETA", b"ALPHA")
"""A build tag is one of these, optionally followed by a decimal number below 256."""
BUILD_TAG_SIGNS: Final = b"+-"
"""``RTStrToUInt8Full`` takes any run of signs before the number: '+' makes it positive,
'-' flips it, and a negative number fails."""
MAX_BUILD_TAG_NUMBER: Final = 0xFF
PUBLISHER_TAG_CHARS: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz()[]{}+-.,"
)
"""The characters a publisher tag may have."""
_MOUSE_STATUS: Final = struct.Struct("<Iii")
"""``vmmdev_mouse_status`` body at 24: features, pointer x, pointer y."""
_MOUSE_STATUS_EX: Final = struct.Struct("<Iiiiii")
"""``VMMDevReqMouseStatusEx`` body at 24: the above, then wheel dz, dw and the buttons."""
GET_MOUSE_STATUS_EX: Final = 223
"""``VMMDevReq_GetMouseStatusEx`` (VirtualBox 7), which :class:`RequestType` does not name
(the Linux uapi enum stops before it)."""
MOUSE_MASK: Final = 0x1FF
"""``VMMDEV_MOUSE_MASK``: every ``VMMDEV_MOUSE_*`` bit (up to HOST_USES_FULL_STATE_PROTOCOL)."""
MOUSE_GUEST_MASK: Final = 0x95
"""``VMMDEV_MOUSE_GUEST_MASK``: the bits the guest may change (can-absolute, needs-host-cursor,
new protocol, uses-full-state)."""
HOST_MOUSE_FEATURES: Final = 0x120
"""What the device's constructor sets: HOST_RECHECKS_NEEDS_HOST_CURSOR (0x20) and
HOST_SUPPORTS_FULL_STATE_PROTOCOL (0x100); no Main front-end changes them here."""


@dataclass(slots=True)
class GuestInfo:
    """The additions' reports, reset at VM reset."""

    additions_ok: bool = False
    interface_version: int = 0
    os_type: int = 0
    additions_version: tuple[int, int, int, int] | None = None
    additions_features: int = 0
    additions_name: str = ""
    capabilities: int = 0
    mouse_features: int = 0
    """The guest's bits of the device's mouse capability word (within MOUSE_GUEST_MASK)."""

    def report_info(self, req: bytearray, _phys: int) -> int:
        """REPORT_GUEST_INFO: a compatible interface version lets the additions in.

        Every report decides anew: an incompatible one after a good one shuts the additions
        out again (VMMDev recomputes ``fu32AdditionsOk`` whenever the report changes).
        """
        version = L.GuestInfoRequest.interface_version.get(req)
        self.interface_version = version
        self.os_type = L.GuestInfoRequest.os_type.get(req)
        self.additions_ok = (
            version >> 16 == INTERFACE_MAJOR and version & 0xFFFF <= INTERFACE_MAX_MINOR
        )
        return VINF_SUCCESS if self.additions_ok else VERR_VERSION_MISMATCH

    def report_info2(self, req: bytearray, _phys: int) -> int:
        """REPORT_GUEST_INFO2: the additions version, checked against its name.

        In VMMDev's order: major at least 3 (VERR_INVALID_PARAMETER), a version that packs
        into 8.8.16 bits (VERR_OUT_OF_RANGE), a NUL in the name and the name starting with
        "major.minor.build" (VERR_INVALID_PARAMETER). What follows must be empty or "_" and
        a build tag and/or publisher tag; from 4.1.50 on anything else is refused, before
        that it is dropped. ``additions_name`` keeps what VMMDev passes on: the tags.
        """
        r = L.GuestInfo2Request
        major, minor = r.additions_major.get(req), r.additions_minor.get(req)
        build, revision = r.additions_build.get(req), r.additions_revision.get(req)
        if major < MIN_ADDITIONS_MAJOR:
            return VERR_INVALID_PARAMETER
        if major > MAX_MAJOR or minor > MAX_MINOR or build > MAX_BUILD:
            return VERR_OUT_OF_RANGE
        raw = r.name.get(req)
        end = raw.find(b"\0")
        prefix = f"{major}.{minor}.{build}".encode()
        if end < 0 or not raw.startswith(prefix):
            return VERR_INVALID_PARAMETER
        valid, tags = _version_tags(raw[len(prefix) : end])
        if not valid and (major, minor, build) >= STRICT_NAME_VERSION:
            return VERR_INVALID_PARAMETER
        self.additions_version = (major, minor, build, revision)
        self.additions_features = r.additions_features.get(req)
        self.additions_name = tags.decode("latin-1")
        return VINF_SUCCESS

    def get_mouse_status(self, req: bytearray, _phys: int) -> int:
        """GET_MOUSE_STATUS: the capability word (the host's bits and the guest's, within
        MOUSE_MASK) and the pointer at 0, 0 (the host has no real mouse)."""
        _MOUSE_STATUS.pack_into(req, HEADER_SIZE, self.mouse_capabilities, 0, 0)
        return VINF_SUCCESS

    def get_mouse_status_ex(self, req: bytearray, _phys: int) -> int:
        """GET_MOUSE_STATUS_EX: GET_MOUSE_STATUS's answer, no wheel movement, no buttons."""
        _MOUSE_STATUS_EX.pack_into(req, HEADER_SIZE, self.mouse_capabilities, 0, 0, 0, 0, 0)
        return VINF_SUCCESS

    def set_mouse_status(self, req: bytearray, _phys: int) -> int:
        """SET_MOUSE_STATUS: replace the guest's bits of the capability word; the host's
        bits and anything outside MOUSE_GUEST_MASK are not the guest's to set."""
        self.mouse_features = _MOUSE_STATUS.unpack_from(req, HEADER_SIZE)[0] & MOUSE_GUEST_MASK
        return VINF_SUCCESS

    @property
    def mouse_capabilities(self) -> int:
        """The capability word GET_MOUSE_STATUS reports (``fMouseCapabilities & MASK``)."""
        return (HOST_MOUSE_FEATURES | self.mouse_features) & MOUSE_MASK

    def reset(self) -> None:
        """VM reset: the additions must report again; of the mouse capabilities only the
        guest's bits are cleared."""
        self.additions_ok = False
        self.interface_version = 0
        self.os_type = 0
        self.additions_version = None
        self.additions_features = 0
        self.additions_name = ""
        self.capabilities = 0
        self.mouse_features = 0


def _version_tags(rest: bytes) -> tuple[bool, bytes]:
    """Check what follows "major.minor.build"; return (valid, the tags VMMDev keeps).

    Empty is valid. Otherwise "_" and one tag (a build or a publisher tag) or two (a build
    tag, "_", a publisher tag). Of an invalid pair whose build tag is good, VMMDev keeps
    the build tag (it matters only where invalid tags are dropped instead of refused).
    """
    if not rest:
        return True, rest
    if not rest.startswith(b"_"):
        return False, b""
    first, sep, second = rest[1:].partition(b"_")
    if not sep:
        valid = _is_build_tag(first) or _is_publisher_tag(first)
        return valid, first if valid else b""
    if not _is_build_tag(first):
        return False, b""
    if not _is_publisher_tag(second):
        return False, first
    return True, rest[1:]


def _is_build_tag(tag: bytes) -> bool:
    for prefix in BUILD_TAG_PREFIXES:
        if tag.startswith(prefix):
            number = tag[len(prefix) :]
            if not number:
                return True
            digits = number.lstrip(BUILD_TAG_SIGNS)
            positive = True
            for sign in number[: len(number) - len(digits)]:
                positive = sign == ord("+") or not positive
            return positive and digits.isdigit() and int(digits) <= MAX_BUILD_TAG_NUMBER
    return False


def _is_publisher_tag(tag: bytes) -> bool:
    return all(char in PUBLISHER_TAG_CHARS for char in tag)
