"""Host text Python cannot decode: kept byte for byte, shown with each such byte as ``\\xNN``.

The client keeps it (tests/services/test_guest_props_client.py) and both CLIs print it so
(tests/test_cli_prop.py); here the rule itself.
"""

from __future__ import annotations

import json
from typing import Final

import pytest
from hypothesis import given, strategies as st

from agent.protocol.host_text import displayed, host_bytes

BEYOND_UNICODE: Final = b"\xf4\x90\x80\x80"
"""U+110000 in four bytes: IPRT takes it, Python's decoder does not."""


def _held(raw: bytes) -> str:
    """``raw`` as the client and the simulated host keep it."""
    return raw.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"v" + BEYOND_UNICODE, "v\\xf4\\x90\\x80\\x80"),
        (b"\xfc\x84\x80\x80\x80\x80", "\\xfc\\x84\\x80\\x80\\x80\\x80"),  # six bytes
        ("h\u00e9".encode() + BEYOND_UNICODE + b" \\", "h\u00e9\\xf4\\x90\\x80\\x80 \\"),
    ],
)
def test_undecodable_bytes_are_shown_as_byte_escapes(raw: bytes, shown: str) -> None:
    """Each byte Python could not decode is ``\\xNN``; the rest, a backslash too, as it is;
    JSON of it holds no lone surrogate."""
    text = _held(raw)
    assert host_bytes(text) == raw
    assert displayed(text) == shown
    assert "\\ud" not in json.dumps(displayed(text))


@given(st.text())
def test_valid_text_is_shown_as_it_is(text: str) -> None:
    """Text that is valid Unicode is printed unchanged (the same object when ASCII)."""
    valid = text.encode("utf-8", "replace").decode()
    assert displayed(valid) == valid
    assert host_bytes(valid) == valid.encode()


def test_ascii_is_returned_as_it_is() -> None:
    text = "/VirtualBox/GuestInfo/OS/Product"
    assert displayed(text) is text


def test_a_lone_surrogate_no_host_holds_is_escaped_too() -> None:
    """A surrogate that stands for no byte (a str built by hand) still prints, escaped."""
    assert displayed("a\ud800") == "a\\ud800"
