"""How an error message quotes a peer's value (``agent.protocol.errors.shown``)."""

from __future__ import annotations

import pytest

from agent.protocol.errors import SHOWN_SIZE, shown, shown_text
from agent.protocol.guest_props import PropertyArgumentError, encode_name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/v/\udcff", "'/v/\\xff'"),  # argv's undecodable byte 0xff (it showed '\udcff')
        ("/v/\udc80x", "'/v/\\x80x'"),
        ("a\\udcff", "'a\\\\udcff'"),  # an escaped backslash, then text: left alone
        ("\ud800", "'\\ud800'"),  # a surrogate no byte stands for: left alone
        ("tab\there", "'tab\\there'"),
    ],
)
def test_shown_escapes_undecodable_bytes_as_bytes(value: str, expected: str) -> None:
    """A surrogate that stands for an undecodable byte (``surrogateescape``) shows as that
    byte, ``\\xff``, as ``bytes`` would."""
    assert shown(value) == expected


def test_shown_text_escapes_undecodable_bytes_as_bytes() -> None:
    """Text with non-printable characters is escaped, its undecodable bytes as bytes."""
    assert shown_text("x\udcfe\n") == "x\\xfe\\n"
    assert shown_text("y" * (SHOWN_SIZE + 1)).endswith(f"... ({SHOWN_SIZE + 1} characters)")


def test_a_non_utf8_name_is_shown_with_its_byte() -> None:
    """A property name from argv with a byte that is no UTF-8: the message shows ``\\xff``."""
    with pytest.raises(PropertyArgumentError) as raised:
        encode_name("/a/\udcff")
    assert str(raised.value) == "property name '/a/\\xff' is not valid Unicode text"
