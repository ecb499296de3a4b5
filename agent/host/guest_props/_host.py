"""Checks on what the simulated VBoxManage passes in, with messages for the CLI."""

from __future__ import annotations

from agent.protocol.guest_props import MAX_NAME_SIZE, MAX_PATTERN_SIZE, MIN_NAME_SIZE
from agent.protocol.status import VERR_TOO_MUCH_DATA, status_name


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid property name."""
    raw = _encode(name, "property name")
    if len(raw) + 1 < MIN_NAME_SIZE:
        msg = "property name is empty"
        raise ValueError(msg)
    if len(raw) + 1 > MAX_NAME_SIZE:
        msg = (
            f"property name {name!r} is {len(raw)} bytes long; "
            f"the limit is {MAX_NAME_SIZE - 1} bytes of UTF-8"
        )
        raise ValueError(msg)
    if any(char in name for char in "*?|"):
        msg = f"property name {name!r} contains '*', '?' or '|'"
        raise ValueError(msg)


def check_value(value: str, max_size: int) -> None:
    """Raise ValueError unless ``value`` fits a ``max_size`` buffer with its NUL."""
    raw = _encode(value, "property value")
    if len(raw) + 1 > max_size:
        msg = (
            f"property value is {len(raw)} bytes long; the limit is {max_size - 1} bytes "
            f"of UTF-8 ({status_name(VERR_TOO_MUCH_DATA)})"
        )
        raise ValueError(msg)


def check_patterns(patterns: str) -> bytes:
    """Return ``patterns`` as the service matches them; raise ValueError when too long."""
    raw = _encode(patterns, "pattern list")
    if len(raw) + 1 > MAX_PATTERN_SIZE:
        msg = f"pattern list is {len(raw)} bytes long; the limit is {MAX_PATTERN_SIZE - 1}"
        raise ValueError(msg)
    return raw


def _encode(text: str, what: str) -> bytes:
    if "\0" in text:
        msg = f"{what} {text!r} contains a NUL character"
        raise ValueError(msg)
    try:
        return text.encode()
    except UnicodeEncodeError:
        msg = f"{what} {text!r} is not valid Unicode text"
        raise ValueError(msg) from None
