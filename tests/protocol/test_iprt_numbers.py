"""IPRT's base-0 number reading: the value ``RTStrToUInt64`` returns and whether it was exact.

The lenient values are shown through the simulated service's counters
(tests/host/test_guest_props_host.py) and the strict reading through the timesync options;
here, what ``exact`` and None mean.
"""

from __future__ import annotations

import pytest

from agent.protocol.iprt_numbers import U64_MASK, IprtNumber, read_number


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("42", 42), ("0x2A", 42), ("052", 42), ("09", 9), (str(U64_MASK), U64_MASK)],
)
def test_a_plain_number_is_exact(text: str, value: int) -> None:
    assert read_number(text) == IprtNumber(value, exact=True)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("+42", 42),  # a sign
        ("-1", U64_MASK),  # a sign, two's complement
        ("42 ", 42),  # something after the digits
        ("0x", 0),  # "0", then an "x" no hexadecimal digit follows
        ("019", 1),  # octal, stopped by the 9
        (str(U64_MASK + 1), 0),  # wrapped
        ("1" * 400, int("1" * 400) & U64_MASK),  # wrapped, read in linear time
    ],
)
def test_anything_more_is_read_but_not_exact(text: str, value: int) -> None:
    assert read_number(text) == IprtNumber(value, exact=False)


@pytest.mark.parametrize("text", ["", " 1", "-", "x1", "+-", "\u0661"])
def test_no_digit_is_no_number(text: str) -> None:
    assert read_number(text) is None
