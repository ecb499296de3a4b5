"""What the guest additions told the host: interface version, additions version, caps, mouse."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import HEADER_SIZE
from agent.protocol.status import VERR_INVALID_PARAMETER, VERR_VERSION_MISMATCH, VINF_SUCCESS

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
_MOUSE_STATUS: Final = struct.Struct("<Iii")
"""``vmmdev_mouse_status`` body at 24: features, pointer x, pointer y."""


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

    def report_info(self, req: bytearray, _phys: int) -> int:
        """REPORT_GUEST_INFO: a compatible interface version lets the additions in."""
        version = L.GuestInfoRequest.interface_version.get(req)
        if version >> 16 != INTERFACE_MAJOR or version & 0xFFFF > INTERFACE_MAX_MINOR:
            return VERR_VERSION_MISMATCH
        self.additions_ok = True
        self.interface_version = version
        self.os_type = L.GuestInfoRequest.os_type.get(req)
        return VINF_SUCCESS

    def report_info2(self, req: bytearray, _phys: int) -> int:
        """REPORT_GUEST_INFO2: the additions version, checked against its name."""
        r = L.GuestInfo2Request
        major, minor = r.additions_major.get(req), r.additions_minor.get(req)
        build, revision = r.additions_build.get(req), r.additions_revision.get(req)
        raw = r.name.get(req)
        end = raw.find(b"\0")
        if (
            not MIN_ADDITIONS_MAJOR <= major <= MAX_MAJOR
            or minor > MAX_MINOR
            or build > MAX_BUILD
            or end < 0
        ):
            return VERR_INVALID_PARAMETER
        name = raw[:end].decode("latin-1")
        prefix = f"{major}.{minor}.{build}"
        strict = (major, minor, build) >= STRICT_NAME_VERSION
        if strict and name != prefix and not name.startswith(prefix + "_"):
            return VERR_INVALID_PARAMETER
        self.additions_version = (major, minor, build, revision)
        self.additions_features = r.additions_features.get(req)
        self.additions_name = name
        return VINF_SUCCESS

    def get_mouse_status(self, req: bytearray, _phys: int) -> int:
        """GET_MOUSE_STATUS: features and a centred pointer (the host has no real mouse)."""
        _MOUSE_STATUS.pack_into(req, HEADER_SIZE, self.mouse_features, 0, 0)
        return VINF_SUCCESS

    def set_mouse_status(self, req: bytearray, _phys: int) -> int:
        """SET_MOUSE_STATUS: remember the guest's mouse features."""
        self.mouse_features = _MOUSE_STATUS.unpack_from(req, HEADER_SIZE)[0]
        return VINF_SUCCESS

    def reset(self) -> None:
        """VM reset: the additions must report again."""
        self.additions_ok = False
        self.additions_version = None
        self.capabilities = 0
        self.mouse_features = 0
