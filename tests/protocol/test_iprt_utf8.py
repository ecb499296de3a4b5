"""UTF-8 as IPRT's ``rtUtf8Length`` checks it: what it takes beyond Python's decoder, what it
refuses, with which status and where.

The host's uses are shown through the simulated services (the guest-property calls in
tests/host/test_guest_props.py, the user-state report in tests/host/test_vmmdev.py) and the
client's refusals through its checks (tests/services/test_guest_props_client.py).
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from agent.protocol.iprt_utf8 import (
    VERR_CODE_POINT_ENDIAN_INDICATOR,
    VERR_CODE_POINT_SURROGATE,
    Utf8Fault,
    replace_refused,
    utf8_fault,
    validate_utf8,
    without_cut_sequence,
)
from agent.protocol.status import VERR_INVALID_UTF8_ENCODING, VINF_SUCCESS


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"plain ascii",
        "h\u00e9llo \u2603 \U0001f600".encode(),
        "\ufffd\U0010ffff".encode(),
        b"\xf4\x90\x80\x80",  # 0x110000: past Unicode, in a four-byte sequence's range
        b"\xf7\xbf\xbf\xbf",  # 0x1FFFFF, the largest four-byte code point
        b"\xf8\x88\x80\x80\x80",  # 0x200000, five bytes
        b"\xfd\xbf\xbf\xbf\xbf\xbf",  # 0x7FFFFFFF, six bytes
    ],
    ids=["empty", "ascii", "unicode", "last-of-unicode", "0x110000", "0x1fffff", "five", "six"],
)
def test_what_iprt_takes(raw: bytes) -> None:
    assert utf8_fault(raw) is None
    assert validate_utf8(raw) == VINF_SUCCESS


@pytest.mark.parametrize(
    ("raw", "fault"),
    [
        (b"ab\xef\xbf\xbe", Utf8Fault(VERR_CODE_POINT_ENDIAN_INDICATOR, 2)),  # U+FFFE
        ("\u00e9\uffff".encode(), Utf8Fault(VERR_CODE_POINT_ENDIAN_INDICATOR, 2)),
        (b"x\xed\xa0\x80", Utf8Fault(VERR_CODE_POINT_SURROGATE, 1)),  # U+D800
        (b"\xed\xbf\xbf", Utf8Fault(VERR_CODE_POINT_SURROGATE, 0)),  # U+DFFF
        (b"ab\xffc", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 2)),  # no lead byte
        (b"\xfe", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 0)),
        (b"a\x80", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 1)),  # a continuation alone
        (b"\xc3", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 0)),  # cut short
        (b"\xe2\x98x", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 0)),  # no continuation
        (b"\xc1\x81", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 0)),  # overlong 'A'
        (b"\xe0\x80\xaf", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 0)),  # overlong '/'
        (b"\xf0\x8f\xbf\xbf", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 0)),  # overlong U+FFFF
        (b"\xf8\x87\xbf\xbf\xbf", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 0)),  # overlong, 5
        (b"\xfc\x83\xbf\xbf\xbf\xbf", Utf8Fault(VERR_INVALID_UTF8_ENCODING, 0)),  # 6
    ],
    ids=[
        "fffe",
        "ffff-after-two-bytes",
        "surrogate",
        "last-surrogate",
        "ff",
        "fe",
        "continuation",
        "cut-short",
        "no-continuation",
        "overlong-2",
        "overlong-3",
        "overlong-4-ffff",
        "overlong-5",
        "overlong-6",
    ],
)
def test_what_iprt_refuses(raw: bytes, fault: Utf8Fault) -> None:
    """The status of the first sequence refused and the byte it starts at. Only a
    three-byte U+FFFE or U+FFFF is an endian indicator: IPRT checks for them there alone
    (an overlong four-byte U+FFFF was reported as one)."""
    assert utf8_fault(raw) == fault
    assert validate_utf8(bytearray(raw)) == fault.status


@given(st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from("\ufffe\uffff"))))
def test_python_text_is_taken_but_the_endian_indicators(text: str) -> None:
    """Text Python encodes (no surrogates) is refused only for U+FFFE or U+FFFF, at the
    first of them."""
    raw = text.encode()
    firsts = [index for index, char in enumerate(text) if char in "\ufffe\uffff"]
    expected = None
    if firsts:
        offset = len(text[: firsts[0]].encode())
        expected = Utf8Fault(VERR_CODE_POINT_ENDIAN_INDICATOR, offset)
    assert utf8_fault(raw) == expected


REPLACEMENT = "\ufffd".encode()


@pytest.mark.parametrize(
    ("raw", "published"),
    [
        (b"plain", b"plain"),
        (b"past\xf8\x88\x80\x80\x80\xff", b"past\xf8\x88\x80\x80\x80" + REPLACEMENT),
        (b"\xf4\x90\x80\x80" + "\uffff".encode() + b"x", b"\xf4\x90\x80\x80" + REPLACEMENT + b"x"),
        (b"a\xed\xa0\x80b", b"a" + REPLACEMENT + b"b"),  # a surrogate, whole
        (b"\xc0\x80", REPLACEMENT * 2),  # overlong: its lead, then a stray continuation
        (b"cut\xe2\x82", b"cut" + REPLACEMENT * 2),
    ],
    ids=["valid", "five-then-ff", "past-unicode-then-ffff", "surrogate", "overlong", "cut-short"],
)
def test_only_what_iprt_refuses_is_replaced(raw: bytes, published: bytes) -> None:
    """Each refused sequence becomes U+FFFD; what IPRT takes, even where Python's decoder
    would not, stays byte for byte."""
    assert replace_refused(raw) == published


@given(st.binary(max_size=64))
def test_a_replaced_string_is_one_iprt_takes(raw: bytes) -> None:
    """Whatever the bytes, the result is taken whole, and a string IPRT takes is unchanged."""
    replaced = replace_refused(raw)
    assert utf8_fault(replaced) is None
    assert (replaced == raw) == (utf8_fault(raw) is None)


@pytest.mark.parametrize(
    ("raw", "whole"),
    [
        (b"", b""),
        (b"ascii", b"ascii"),
        ("caf\u00e9".encode(), "caf\u00e9".encode()),
        ("caf\u00e9".encode()[:-1], b"caf"),
        ("x\u20ac".encode()[:-1], b"x"),
        ("x\U0001f600".encode()[:-1], b"x"),
        (b"x\xf8\x88\x80\x80", b"x"),  # five bytes announced, four there
        (b"x\xf8\x88\x80\x80\x80", b"x\xf8\x88\x80\x80\x80"),
        (b"x\x80", b"x\x80"),  # a stray continuation is no cut: left for IPRT's check
    ],
)
def test_a_sequence_cut_short_at_the_end_is_left_out(raw: bytes, whole: bytes) -> None:
    """What a fixed-size field's cut leaves of the last character goes; whole characters,
    and faults that are not a cut, stay."""
    assert without_cut_sequence(raw) == whole
