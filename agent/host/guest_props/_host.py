"""Checks on what the simulated VBoxManage passes in, with messages for the CLI."""

from __future__ import annotations

from agent.protocol.guest_props import encode_name, encode_patterns, encode_value


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid property name."""
    encode_name(name)


def check_value(value: str, max_size: int) -> None:
    """Raise ValueError unless ``value`` fits a ``max_size`` buffer with its NUL."""
    encode_value(value, max_size)


def check_patterns(patterns: str) -> bytes:
    """Return ``patterns`` as the service matches them; raise ValueError when too long."""
    return encode_patterns([patterns], nul_separated=False)[:-1]
