"""The guest-property service's wire contract, shared by the agent and the simulated host.

Function numbers, limits and host-reserved names (``GuestPropertySvc.h``,
``VBoxGuestPropSvc.cpp``), and the property flags (``GUEST_PROP_F_*``) with their text
(``GuestPropValidateFlags``, ``GuestPropWriteFlags``).

Flag parsing is comma separated and ASCII case-insensitive, with spaces (only spaces) allowed
around names and commas; a trailing comma is accepted and an empty string means NIL.
Formatting lists the flags in a fixed order joined by ``", "``, prints READONLY when both
RDONLY bits are set, and always adds TRANSIENT to TRANSRESET.
"""

from __future__ import annotations

import functools
import re
from enum import IntEnum
from typing import TYPE_CHECKING, Final

from agent.protocol.constants import HGCM_MAX_USER_PARM
from agent.protocol.errors import shown
from agent.protocol.host_text import host_bytes
from agent.protocol.iprt_utf8 import utf8_fault
from agent.protocol.status import VERR_TOO_MUCH_DATA, status_name

if TYPE_CHECKING:
    from collections.abc import Sequence

SERVICE_NAME: Final = "VBoxGuestPropSvc"
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
MAX_WAIT_PATTERN_SIZE: Final = HGCM_MAX_USER_PARM
"""The largest GET_NOTIFICATION pattern buffer: ``getNotification`` checks no length (only
``enumProps`` checks :data:`MAX_PATTERN_SIZE`), so what one HGCM buffer carries bounds it."""
MAX_GUEST_NOTIFICATIONS: Final = 256
"""``GUEST_PROP_MAX_GUEST_NOTIFICATIONS``: changes the notification queue remembers."""
MAX_CONCURRENT_WAITS: Final = 16
"""``GUEST_PROP_MAX_GUEST_CONCURRENT_WAITS``: pending GET_NOTIFICATION calls per client."""
MAX_CALLS_PER_CLIENT: Final = 16
"""``acMaxCallsPerClient``, the same for every client category (so 15 pending calls)."""
MAX_FLAGS_SIZE: Final = len("TRANSIENT, RDONLYGUEST, TRANSRESET") + 1
"""``GUEST_PROP_MAX_FLAGS_LEN``: the longest flags text the service writes, NUL included."""
ENUM_TERMINATOR: Final = b"\0\0\0\0"
"""What ENUM_PROPS writes after the last entry: four empty strings."""
NAME_FORBIDDEN: Final = "*?|"
"""Characters a property name may not contain (``GuestPropValidateName``)."""
NAME_FORBIDDEN_RE: Final = re.compile(f"[{re.escape(NAME_FORBIDDEN)}]")
"""Finds a character of :data:`NAME_FORBIDDEN` (in a ``str``)."""
NAME_FORBIDDEN_BYTES_RE: Final = re.compile(f"[{re.escape(NAME_FORBIDDEN)}]".encode())
"""Finds a character of :data:`NAME_FORBIDDEN` (in ``bytes``)."""

HOST_RESERVED_PREFIXES: Final = (
    "/VirtualBox/GuestAdd/VBoxService/",
    "/VirtualBox/GuestAdd/PAM/",
    "/VirtualBox/GuestAdd/Greeter/",
    "/VirtualBox/GuestAdd/SharedFolders/",
    "/VirtualBox/HostInfo/",
    "/VirtualBox/VMInfo/",
)
"""Names the guest may never write; host writes there get RDONLYGUEST (``checkHostReserved``)."""


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
            msg = f"invalid flags {shown(text)}: unknown flag at {shown(text[pos:])}"
            raise FlagsParseError(msg)
        bit, name = match
        flags |= bit
        pos = _skip_spaces(upper, pos + len(name))
        if pos < len(upper):
            if upper[pos] != ",":
                msg = f"invalid flags {shown(text)}: expected ',' before {shown(text[pos:])}"
                raise FlagsParseError(msg)
            pos = _skip_spaces(upper, pos + 1)
    return flags


@functools.cache
def format_flags(flags: int) -> str:
    """Return the text form of ``flags`` as the service writes it (remembered per value).

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


class PropertyArgumentError(ValueError):
    """A name, value, pattern list or flags string the service would refuse; nothing was sent."""


def encode_name(name: str) -> bytes:
    """Return ``name`` NUL-terminated, as the service's calls take it.

    Raises:
        PropertyArgumentError: empty, too long, or with a character names may not hold.
    """
    raw = _encode_text(name, "property name")
    size = len(raw) + 1
    if size < MIN_NAME_SIZE:
        msg = "property name is empty"
        raise PropertyArgumentError(msg)
    if size > MAX_NAME_SIZE:
        msg = (
            f"property name {shown(name)} is {len(raw)} bytes long; "
            f"the limit is {MAX_NAME_SIZE - 1} bytes of UTF-8"
        )
        raise PropertyArgumentError(msg)
    if NAME_FORBIDDEN_RE.search(name):
        msg = f"property name {shown(name)} contains '*', '?' or '|', which names may not"
        raise PropertyArgumentError(msg)
    return raw + b"\0"


def encode_value(value: str, max_size: int = MAX_VALUE_SIZE) -> bytes:
    """Return ``value`` NUL-terminated; raise PropertyArgumentError unless it fits ``max_size``."""
    raw = _encode_text(value, "property value")
    if len(raw) + 1 > max_size:
        msg = (
            f"property value is {len(raw)} bytes long; the limit is {max_size - 1} bytes "
            f"of UTF-8 ({status_name(VERR_TOO_MUCH_DATA)})"
        )
        raise PropertyArgumentError(msg)
    return raw + b"\0"


def encode_patterns(
    patterns: Sequence[str], *, nul_separated: bool, max_size: int = MAX_PATTERN_SIZE
) -> bytes:
    """Return a pattern list, NUL-terminated: NUL-separated for ENUM_PROPS, ``|``-separated
    for waits (whose buffer may take up to :data:`MAX_WAIT_PATTERN_SIZE`).

    Raises:
        TypeError: ``patterns`` is a ``str`` (a sequence of one-character patterns).
        PropertyArgumentError: a pattern holds NUL, or the list and its NUL exceed
            ``max_size`` bytes (by default ENUM_PROPS' limit: 1023 bytes and the NUL).
    """
    if isinstance(patterns, str):
        msg = (
            f"patterns must be a sequence of patterns, not the str {shown(patterns)} "
            "(which would be one pattern per character)"
        )
        raise TypeError(msg)
    raws = [_encode_text(pattern, "pattern") for pattern in patterns]
    joined = (b"\0" if nul_separated else b"|").join(raws)
    if len(joined) + 1 > max_size:
        msg = (
            f"pattern list is {len(joined)} bytes long; the limit is {max_size - 1} bytes of UTF-8"
        )
        raise PropertyArgumentError(msg)
    return joined + b"\0"


def _encode_text(text: str, what: str) -> bytes:
    """``text`` in UTF-8, refused unless the host takes it as IPRT does (no NUL, no
    surrogates, neither U+FFFE nor U+FFFF). Bytes Python could not decode, kept as surrogate
    escapes (:func:`agent.protocol.host_text.host_bytes`: text the host gave), are sent as
    they are where IPRT takes them, so a name the host listed can be deleted or set."""
    if "\0" in text:
        msg = f"{what} {shown(text)} contains a NUL character"
        raise PropertyArgumentError(msg)
    try:
        raw = host_bytes(text)
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        raw = None
    fault = None if raw is None else utf8_fault(raw)
    if raw is None or (fault is not None and not _is_unicode(text)):
        msg = f"{what} {shown(text)} is not valid Unicode text"
        raise PropertyArgumentError(msg)
    if fault is not None:
        at = len(raw[: fault.offset].decode())
        msg = (
            f"{what} {shown(text)} holds U+{ord(text[at]):04X} at character {at + 1}, "
            f"which the host refuses ({status_name(fault.status)})"
        )
        raise PropertyArgumentError(msg)
    return raw


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
