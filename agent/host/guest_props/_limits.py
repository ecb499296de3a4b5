"""Limits, function numbers and reserved names of the property service (GuestPropertySvc.h)."""

from __future__ import annotations

from enum import IntEnum
from typing import Final

MIN_NAME_SIZE: Final = 2
"""Smallest name buffer: one character and the NUL."""
MAX_NAME_SIZE: Final = 64
"""``GUEST_PROP_MAX_NAME_LEN``: the largest name buffer, NUL included."""
MAX_VALUE_SIZE: Final = 1024
"""``GUEST_PROP_MAX_VALUE_LEN`` of 7.0: the largest value buffer, NUL included."""
MAX_VALUE_SIZE_6_1: Final = 128
"""The same limit on 6.1 and older hosts."""
MAX_PROPS: Final = 256
"""``GUEST_PROP_MAX_PROPS``: properties the service holds at most."""
MAX_PATTERN_SIZE: Final = 1024
"""``GUEST_PROP_MAX_PATTERN_LEN``: the largest ENUM_PROPS pattern buffer."""
MAX_GUEST_NOTIFICATIONS: Final = 256
"""``GUEST_PROP_MAX_GUEST_NOTIFICATIONS``: changes the notification queue remembers."""
MAX_CONCURRENT_WAITS: Final = 16
"""``GUEST_PROP_MAX_GUEST_CONCURRENT_WAITS``: pending GET_NOTIFICATION calls per client."""
MAX_CALLS_PER_CLIENT: Final = 16
"""``acMaxCallsPerClient``, the same for every client category."""
ENUM_TERMINATOR: Final = b"\0\0\0\0"
"""What ENUM_PROPS writes after the last entry: four empty strings."""

SERVICE_NAME: Final = "VBoxGuestPropSvc"

HOST_RESERVED_PREFIXES: Final = (
    "/VirtualBox/GuestAdd/VBoxService/",
    "/VirtualBox/GuestAdd/PAM/",
    "/VirtualBox/GuestAdd/Greeter/",
    "/VirtualBox/GuestAdd/SharedFolders/",
    "/VirtualBox/HostInfo/",
    "/VirtualBox/VMInfo/",
)
"""Names the guest may never write; host writes there get RDONLYGUEST (``checkHostReserved``)."""

VBOX_VER: Final = "/VirtualBox/HostInfo/VBoxVer"
VBOX_VER_EXT: Final = "/VirtualBox/HostInfo/VBoxVerExt"
VBOX_REV: Final = "/VirtualBox/HostInfo/VBoxRev"
RESET_COUNTER: Final = "/VirtualBox/VMInfo/ResetCounter"
RESUME_COUNTER: Final = "/VirtualBox/VMInfo/ResumeCounter"
SYSPREP_EXEC: Final = "/VirtualBox/HostGuest/SysprepExec"
SYSPREP_ARGS: Final = "/VirtualBox/HostGuest/SysprepArgs"


class GuestFunction(IntEnum):
    """``GUEST_PROP_FN_*``: the guest-callable functions ("the numbers may not change")."""

    GET_PROP = 1
    SET_PROP = 2
    SET_PROP_VALUE = 3
    DEL_PROP = 4
    ENUM_PROPS = 5
    GET_NOTIFICATION = 6


def is_host_reserved(name: str) -> bool:
    """Return whether ``name`` lies under a host-reserved prefix."""
    return name.startswith(HOST_RESERVED_PREFIXES)
