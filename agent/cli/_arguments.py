"""Argument types and choices several commands share.

A type here turns a bad value into ``argparse.ArgumentTypeError``, so the parser reports
it with the command's usage and exit status 64. The personalities are listed here so that
building the parser imports no simulator code; a test checks them against
``agent.host.PERSONALITIES``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Final, TypeVar

from agent.device.unix import check_socket_path

if TYPE_CHECKING:
    from collections.abc import Callable

_T = TypeVar("_T")

PERSONALITIES: Final = ("mainline", "oracle", "passthrough")
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


def integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argument type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            msg = f"{text!r} is not an integer >= {minimum}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse
