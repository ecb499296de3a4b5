"""VBoxService's ``--timesync-*`` options as guest properties: names, units, bounds, parsing."""

from __future__ import annotations

import pytest
from pydantic import Field

from agent.services._timesync_options import OPTION_PREFIX, host_options, iprt_number
from agent.services.timesync import TimesyncSection


class _StricterSection(TimesyncSection):
    """A section whose interval is stricter than VBoxService's bounds."""

    interval_s: float = Field(default=10.0, ge=1, le=3600)


def test_every_option_in_vboxservices_units() -> None:
    options = host_options(
        {
            f"{OPTION_PREFIX}interval": "30000",
            f"{OPTION_PREFIX}min-adjust": "0",
            f"{OPTION_PREFIX}latency-factor": "1024",
            f"{OPTION_PREFIX}max-latency": "1",
            f"{OPTION_PREFIX}set-threshold": "60000",
            f"{OPTION_PREFIX}set-start": "",
            f"{OPTION_PREFIX}no-set-on-restore": "1",
            "/VirtualBox/GuestAdd/VBoxService/--vminfo-interval": "1",
        },
        TimesyncSection,
    )
    assert options.refused == []
    assert options.settings == {
        "interval_s": 30.0,
        "min_adjust_ms": 0,
        "latency_factor": 1024,
        "max_latency_ms": 1,
        "set_threshold_s": 60.0,
        "set_on_start": True,
        "set_on_restore": False,
    }


def test_a_no_option_wins_over_its_pair() -> None:
    """As VBoxService checks them: ``--timesync-no-set-start`` after ``--timesync-set-start``."""
    both = {f"{OPTION_PREFIX}set-start": "", f"{OPTION_PREFIX}no-set-start": ""}
    assert host_options(both, TimesyncSection).settings == {"set_on_start": False}


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0", 0),
        ("250", 250),
        ("0x10", 16),
        ("0XfF", 255),
        ("010", 8),
        ("09", 9),
        ("00", 0),
        ("4294967295", 4294967295),
        ("037777777777", 4294967295),
    ],
)
def test_numbers_read_as_iprt_reads_them(text: str, number: int) -> None:
    """Base 0, as VBoxService's ``RTStrToUInt32Ex``: decimal, ``0x`` hex, leading-0 octal."""
    assert iprt_number(text) == number


@pytest.mark.parametrize(
    "text", ["", "-5", "+5", " 5", "5 ", "1_000", "0x", "019", "0x1g", "\u0661", "1" * 21, "5ms"]
)
def test_anything_else_is_no_number(text: str) -> None:
    assert iprt_number(text) is None


@pytest.mark.parametrize(
    ("suffix", "value", "reason"),
    [
        ("min-adjust", "-5", "not a whole number in 0..3600000"),
        ("latency-factor", "1025", "not a whole number in 1..1024"),
        ("max-latency", "\u0661", "not a whole number in 1..3600000"),
        ("set-threshold", "604800001", "not a whole number in 0..604800000"),
        ("interval", "49", "not a whole number in 50..4294967294"),
        ("interval", "4294967295", "not a whole number in 50..4294967294"),
    ],
)
def test_a_bad_value_is_refused_with_the_reason(suffix: str, value: str, reason: str) -> None:
    options = host_options({f"{OPTION_PREFIX}{suffix}": value}, TimesyncSection)
    assert options.settings == {}
    assert options.refused == [f"{OPTION_PREFIX}{suffix} = {value!r}: {reason}"]


@pytest.mark.parametrize(("value", "seconds"), [("50", 0.05), ("4294967294", 4294967.294)])
def test_the_interval_takes_vboxservices_whole_range(value: str, seconds: float) -> None:
    """``[timesync] interval_s`` has VBoxService's bounds: its least and greatest apply."""
    options = host_options({f"{OPTION_PREFIX}interval": value}, TimesyncSection)
    assert (options.refused, options.settings) == ([], {"interval_s": seconds})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("500", "interval_s 0.5: input should be greater than or equal to 1"),
        # the value exactly (it said 'interval_s 3600: ... less than or equal to 3600')
        ("3600001", "interval_s 3600.001: input should be less than or equal to 3600"),
        ("999", "interval_s 0.999: input should be greater than or equal to 1"),
    ],
)
def test_the_sections_own_bounds_hold_too(value: str, reason: str) -> None:
    """A value VBoxService takes but the section does not is refused with the section's
    reason, naming the converted value exactly."""
    options = host_options({f"{OPTION_PREFIX}interval": value}, _StricterSection)
    assert options.settings == {}
    assert options.refused == [f"{OPTION_PREFIX}interval = {value!r}: {reason}"]


def test_a_long_value_is_shown_short() -> None:
    options = host_options({f"{OPTION_PREFIX}interval": "9" * 5000}, TimesyncSection)
    assert options.refused == [
        f"{OPTION_PREFIX}interval = {'9' * 40!r}: not a whole number in 50..4294967294"
    ]
