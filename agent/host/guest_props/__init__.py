"""The simulated host's guest-property HGCM service ("VBoxGuestPropSvc")."""

from __future__ import annotations

from agent.protocol.guest_props import (
    ALLFLAGS,
    HOST_RESERVED_PREFIXES,
    MAX_CALLS_PER_CLIENT,
    MAX_CONCURRENT_WAITS,
    MAX_GUEST_NOTIFICATIONS,
    MAX_NAME_SIZE,
    MAX_PATTERN_SIZE,
    MAX_PROPS,
    MAX_VALUE_SIZE,
    MAX_VALUE_SIZE_6_1,
    NILFLAG,
    RDONLYGUEST,
    RDONLYHOST,
    READONLY,
    SERVICE_NAME,
    TRANSIENT,
    TRANSRESET,
    FlagsParseError,
    GuestFunction,
    format_flags,
    parse_flags,
)
from agent.protocol.prop_patterns import pattern_matches, patterns_match

from ._service import GuestPropertyService, HostVersion

__all__ = [
    "ALLFLAGS",
    "HOST_RESERVED_PREFIXES",
    "MAX_CALLS_PER_CLIENT",
    "MAX_CONCURRENT_WAITS",
    "MAX_GUEST_NOTIFICATIONS",
    "MAX_NAME_SIZE",
    "MAX_PATTERN_SIZE",
    "MAX_PROPS",
    "MAX_VALUE_SIZE",
    "MAX_VALUE_SIZE_6_1",
    "NILFLAG",
    "RDONLYGUEST",
    "RDONLYHOST",
    "READONLY",
    "SERVICE_NAME",
    "TRANSIENT",
    "TRANSRESET",
    "FlagsParseError",
    "GuestFunction",
    "GuestPropertyService",
    "HostVersion",
    "format_flags",
    "parse_flags",
    "pattern_matches",
    "patterns_match",
]
