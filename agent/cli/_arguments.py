"""Argument types and choices several commands share.

A type here turns a bad value into ``argparse.ArgumentTypeError``, so the parser reports
it with the command's usage and exit status 64. The personalities are listed here so that
building the parser imports no simulator code; a test checks them against ``agent.host``'s.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from agent.device.spec import check_device_spec, check_socket_path

if TYPE_CHECKING:
    from collections.abc import Callable

_T = TypeVar("_T")

PERSONALITIES: Final = ("mainline", "oracle", "passthrough")
"""The built-in personalities (what a scenario may name)."""
ALL_PERSONALITIES: Final = (*PERSONALITIES, "kernel")
"""Every personality ``simulate`` offers: the built-in ones, then the external ``kernel``."""
DEFAULT_PERSONALITY: Final = "mainline"
"""What a simulated host models unless told otherwise: the kernel's own driver, as real
guests run it (``simulate`` and the bundled demo of ``run --simulate`` agree on it)."""


def argument_type(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """Wrap ``parse`` so the ``ValueError`` it raises reaches the user as its message."""

    def convert(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


socket_path = argument_type(check_socket_path)
"""``--socket PATH``: a path that can name a Unix socket."""

device_spec = argument_type(check_device_spec)
"""``--device SPEC``: what ``device.path`` accepts, an absolute path or ``unix:`` and one."""


def _file_path(text: str) -> Path:
    if not text:
        msg = "the file name is empty"
        raise ValueError(msg)
    return Path(text)


file_path = argument_type(_file_path)
"""A file to read (``--config``, ``--scenario``, ``check-config FILE``): any path but ``''``,
which ``Path`` would take as the current directory."""


_INTEGER: Final = re.compile(r"[+-]?[0-9]+")
"""An integer as the arguments take it: ASCII decimal digits only, so ``int()``'s
underscores, surrounding spaces and other scripts' digits (``'1_0'``, ``' 3'``, ``'٣'``)
are refused."""
_DECIMAL: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""A number of seconds, in ASCII as ``float()`` reads it, without underscores or spaces."""


def parse_integer(text: str) -> int:
    """``text`` as a plain ASCII decimal integer.

    Raises:
        ValueError: anything else (underscores, spaces, other digits, a fraction).
    """
    if _INTEGER.fullmatch(text) is None:
        msg = f"{text!r} is not a decimal integer"
        raise ValueError(msg)
    return int(text)


def parse_seconds(text: str) -> float:
    """``text`` as a plain ASCII decimal number (``inf`` and ``nan`` as ``float()`` names
    them, for the caller's range check to refuse).

    Raises:
        ValueError: anything else (underscores, spaces, other digits).
    """
    if _DECIMAL.fullmatch(text) is None and not (text.isascii() and text.isalpha()):
        msg = f"{text!r} is not a decimal number"
        raise ValueError(msg)
    return float(text)


def integer_at_least(minimum: int, *, at_most: int | None = None) -> Callable[[str], int]:
    """An argument type: an integer no smaller than ``minimum`` (nor larger than ``at_most``)."""
    bounds = f">= {minimum}" if at_most is None else f"in [{minimum}, {at_most}]"

    def parse(text: str) -> int:
        try:
            value = parse_integer(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (at_most is not None and value > at_most):
            msg = f"{text!r} is not an integer {bounds}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argument type: a positive, finite number of seconds (``--duration``, ``--timeout``)."""
    try:
        value = parse_seconds(text)
    except ValueError:
        msg = f"{text!r} is not a number of seconds"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 < value < float("inf"):
        msg = f"{text!r} must be a positive number of seconds"
        raise argparse.ArgumentTypeError(msg)
    return value
