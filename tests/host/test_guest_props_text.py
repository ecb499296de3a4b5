"""Flag strings and name patterns of the simulated VBoxGuestPropSvc.

Rules of this test module:
- pure functions only: no service, no calls;
- Hypothesis checks the properties (round trips, agreement with ``fnmatch``), tables pin the
  exact strings the upstream service produces and accepts.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, strategies as st

from agent.host.guest_props import (
    ALLFLAGS,
    NILFLAG,
    RDONLYGUEST,
    RDONLYHOST,
    READONLY,
    TRANSIENT,
    TRANSRESET,
    FlagsParseError,
    format_flags,
    parse_flags,
    pattern_matches,
    patterns_match,
)

if TYPE_CHECKING:
    from types import FrameType

    from _typeshed import TraceFunction

_NAMES = {
    "TRANSIENT": TRANSIENT,
    "RDONLYGUEST": RDONLYGUEST,
    "RDONLYHOST": RDONLYHOST,
    "READONLY": READONLY,
    "TRANSRESET": TRANSRESET,
}

flag_sets = st.integers(0, ALLFLAGS).map(lambda bits: bits & ALLFLAGS)
spaces = st.integers(0, 3).map(lambda count: " " * count)


@st.composite
def flag_strings(draw: st.DrawFn) -> tuple[str, int]:
    """A flags string in any case and spacing, with the bits it names."""
    names: list[str] = draw(st.lists(st.sampled_from(sorted(_NAMES)), max_size=6))
    parts = []
    for name in names:
        lower: list[bool] = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
        cased = "".join(
            char.lower() if low else char for char, low in zip(name, lower, strict=True)
        )
        parts.append(draw(spaces) + cased + draw(spaces))
    text = ",".join(parts)
    if draw(st.booleans()) and names:
        text += "," + draw(spaces)
    bits = NILFLAG
    for name in names:
        bits |= _NAMES[name]
    return text, bits


class TestParseFlags:
    @pytest.mark.parametrize(
        ("text", "bits"),
        [
            ("", NILFLAG),
            ("   ", NILFLAG),
            ("TRANSIENT", TRANSIENT),
            ("transient, rdonlyguest", TRANSIENT | RDONLYGUEST),
            ("READONLY", READONLY),
            ("RDONLYGUEST,RDONLYHOST", READONLY),
            ("TRANSRESET", TRANSRESET),
            (" TRANSIENT , ", TRANSIENT),
            ("TRANSIENT,TRANSIENT", TRANSIENT),
        ],
    )
    def test_examples(self, text: str, bits: int) -> None:
        """Known strings parse to their bits."""
        assert bits == parse_flags(text)

    @pytest.mark.parametrize(
        "text",
        [
            "NILFLAG",
            "TRANSIENTX",
            "TRANSIENT RDONLYGUEST",
            "TRANSIENT,,RDONLYGUEST",
            ",",
            "\tTRANSIENT",
            "TRANSIENT;",
            "trans\u0131ent",
        ],
    )
    def test_rejects(self, text: str) -> None:
        """Unknown names, missing commas, tabs and non-ASCII case folding are parse errors."""
        with pytest.raises(FlagsParseError, match="invalid flags"):
            parse_flags(text)

    @given(flag_strings())
    def test_any_case_and_spacing(self, case: tuple[str, int]) -> None:
        """Flag names parse in any case and with spaces around names and commas."""
        text, bits = case
        assert bits == parse_flags(text)


class TestFormatFlags:
    @pytest.mark.parametrize(
        ("bits", "text"),
        [
            (NILFLAG, ""),
            (TRANSIENT | RDONLYGUEST, "TRANSIENT, RDONLYGUEST"),
            (TRANSRESET, "TRANSIENT, TRANSRESET"),
            (READONLY, "READONLY"),
            (RDONLYHOST, "RDONLYHOST"),
            (ALLFLAGS, "TRANSIENT, READONLY, TRANSRESET"),
        ],
    )
    def test_examples(self, bits: int, text: str) -> None:
        """Flags print in fixed order, READONLY for both RDONLY bits, TRANSIENT with TRANSRESET."""
        assert text == format_flags(bits)

    @given(flag_sets)
    def test_round_trip(self, bits: int) -> None:
        """Parsing the printed flags gives them back, TRANSRESET bringing TRANSIENT."""
        expected = bits | TRANSIENT if bits & TRANSRESET else bits
        assert expected == parse_flags(format_flags(bits))

    @given(flag_sets)
    def test_shape(self, bits: int) -> None:
        """The output is known names joined by ``", "`` and fits the 35-byte flags buffer."""
        text = format_flags(bits)
        assert len(text) + 1 <= len("TRANSIENT, RDONLYGUEST, TRANSRESET") + 1
        if text:
            assert set(text.split(", ")) <= set(_NAMES)

    @pytest.mark.parametrize("bits", [0x01, 0x20, 0x8000_0000])
    def test_unknown_bits(self, bits: int) -> None:
        """Bits outside ALLFLAGS are refused."""
        with pytest.raises(ValueError, match="unknown flag bits"):
            format_flags(bits)


names = st.binary(max_size=12).map(lambda raw: raw.replace(b"\0", b"").replace(b"|", b""))
ascii_names = st.text("ab/", max_size=10).map(str.encode)
patterns = st.text("ab/*?", min_size=1, max_size=8).map(str.encode)


class TestPatterns:
    @given(patterns, ascii_names)
    def test_agrees_with_fnmatch_after_swallowing(self, pattern: bytes, name: bytes) -> None:
        """``*``/``?`` match as ``fnmatch.fnmatchcase`` (``/`` included) once every ``*`` and
        ``?`` right after a ``*`` is dropped, as IPRT's simple patterns do."""
        glob = re.sub(r"\*[*?]*", "*", pattern.decode())
        assert fnmatch.fnmatchcase(name.decode(), glob) == pattern_matches(pattern, name)

    @pytest.mark.parametrize(
        ("pattern", "name", "matches"),
        [
            (b"a*?", b"a", True),
            (b"*?b", b"b", True),
            (b"?*", b"", False),
            (b"a?*", b"a", False),
            (b"*.?", b"x.", False),
            (b"[ab]", b"a", False),
            (b"[ab]", b"[ab]", True),
        ],
    )
    def test_iprt_rules(self, pattern: bytes, name: bytes, matches: bool) -> None:
        """``?`` after ``*`` matches nothing more; ``?`` before ``*`` needs a byte; no classes."""
        assert matches == pattern_matches(pattern, name)

    @given(names)
    def test_literal_and_star(self, name: bytes) -> None:
        """A name matches itself and ``*``; ``?`` matches one byte, even of a UTF-8 character."""
        assert pattern_matches(name, name)
        assert pattern_matches(b"*", name)
        assert pattern_matches(b"?" * len(name), name)

    @given(st.lists(patterns, min_size=1, max_size=4), ascii_names)
    def test_list_is_any(self, pattern_list: list[bytes], name: bytes) -> None:
        """A ``|``-separated list matches when any of its patterns does."""
        expected = any(pattern_matches(pattern, name) for pattern in pattern_list)
        assert expected == patterns_match(b"|".join(pattern_list), name)

    @given(names)
    def test_empty_list_matches_all(self, name: bytes) -> None:
        """An empty pattern list matches every name."""
        assert patterns_match(b"", name)

    @pytest.mark.parametrize(
        ("pattern_list", "name", "matches"),
        [
            (b"a||b", b"", True),
            (b"|a", b"", True),
            (b"a|", b"", False),
            (b"a|", b"a", True),
            (b"A*", b"abc", False),
        ],
    )
    def test_edges(self, pattern_list: bytes, name: bytes, matches: bool) -> None:
        """Empty inner patterns match only an empty name, a trailing ``|`` adds none."""
        assert matches == patterns_match(pattern_list, name)

    def test_many_stars_stay_linear(self) -> None:
        """Matching is not exponential in the number of stars: twice the stars against a
        name twice as long take about twice the steps (lines run in the matcher's module),
        where a backtracking matcher's grow combinatorially and are stopped at a budget."""
        small = _matcher_steps(b"*a" * 20 + b"b", b"a" * 40, budget=10_000)
        large = _matcher_steps(b"*a" * 40 + b"b", b"a" * 80, budget=3 * small)
        assert large <= 2.5 * small


class _OverBudgetError(Exception):
    """Raised into the matcher by the step counter: it ran past its budget."""


def _matcher_steps(pattern: bytes, name: bytes, *, budget: int) -> int:
    """The lines of ``pattern_matches``'s module run while it finds that ``pattern`` does
    not match ``name``, counted by a trace function; the test fails past ``budget``."""
    module = pattern_matches.__code__.co_filename
    steps = 0

    def count(_frame: FrameType, event: str, _arg: object) -> TraceFunction:
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > budget:
                raise _OverBudgetError
        return count

    def enter(frame: FrameType, _event: str, _arg: object) -> TraceFunction | None:
        return count if frame.f_code.co_filename == module else None

    previous = sys.gettrace()
    sys.settrace(enter)
    try:
        matched = pattern_matches(pattern, name)
    except _OverBudgetError:
        pytest.fail(f"matching {pattern!r} against {name!r} took over {budget} steps")
    finally:
        sys.settrace(previous)
    assert not matched
    return steps
