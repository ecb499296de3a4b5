"""VBoxService's options as guest properties: names, units, bounds, parsing, precedence."""

from __future__ import annotations

import pytest
from pydantic import Field

from agent.services._host_options import (
    OPTION_PREFIX,
    TIMESYNC_OPTIONS,
    VMINFO_OPTIONS,
    host_options,
    iprt_number,
)
from agent.services.network import NetworkSection
from agent.services.timesync import TimesyncSection

TIMESYNC = f"{OPTION_PREFIX}timesync-"


class _StricterSection(TimesyncSection):
    """A section whose interval is stricter than VBoxService's bounds."""

    interval_s: float = Field(default=10.0, ge=1, le=3600)


def test_every_option_in_vboxservices_units() -> None:
    options = host_options(
        {
            f"{TIMESYNC}interval": "30000",
            f"{TIMESYNC}min-adjust": "0",
            f"{TIMESYNC}latency-factor": "1024",
            f"{TIMESYNC}max-latency": "1",
            f"{TIMESYNC}set-threshold": "60000",
            f"{TIMESYNC}set-start": "",
            f"{TIMESYNC}no-set-on-restore": "1",
            "/VirtualBox/GuestAdd/VBoxService/--vminfo-interval": "1",
        },
        TimesyncSection,
        TIMESYNC_OPTIONS,
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
    both = {f"{TIMESYNC}set-start": "", f"{TIMESYNC}no-set-start": ""}
    assert host_options(both, TimesyncSection, TIMESYNC_OPTIONS).settings == {"set_on_start": False}


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
    options = host_options({f"{TIMESYNC}{suffix}": value}, TimesyncSection, TIMESYNC_OPTIONS)
    assert options.settings == {}
    assert options.refused == [f"{TIMESYNC}{suffix} = {value!r}: {reason}"]


@pytest.mark.parametrize(("value", "seconds"), [("50", 0.05), ("4294967294", 4294967.294)])
def test_the_interval_takes_vboxservices_whole_range(value: str, seconds: float) -> None:
    """``[timesync] interval_s`` has VBoxService's bounds: its least and greatest apply."""
    options = host_options({f"{TIMESYNC}interval": value}, TimesyncSection, TIMESYNC_OPTIONS)
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
    options = host_options({f"{TIMESYNC}interval": value}, _StricterSection, TIMESYNC_OPTIONS)
    assert options.settings == {}
    assert options.refused == [f"{TIMESYNC}interval = {value!r}: {reason}"]


def test_a_long_value_is_shown_short() -> None:
    options = host_options({f"{TIMESYNC}interval": "9" * 5000}, TimesyncSection, TIMESYNC_OPTIONS)
    assert options.refused == [
        f"{TIMESYNC}interval = {'9' * 40!r}: not a whole number in 50..4294967294"
    ]


@pytest.mark.parametrize(
    ("properties", "seconds"),
    [
        ({"interval": "30"}, 30),
        ({"interval": "30", "timesync-interval": "2000"}, 2.0),
        ({"interval": "30", "timesync-interval": "49"}, 30),
        ({"interval": "0", "timesync-interval": "2000"}, 2.0),
        ({"interval": "4294966"}, 4294966),
    ],
)
def test_the_global_interval_is_the_default_of_the_timesync_one(
    properties: dict[str, str], seconds: float
) -> None:
    """``--interval`` (s) sets ``interval_s`` where ``--timesync-interval`` (ms) does not: not
    set, or refused (``vgsvcTimeSyncInit`` falls back the same way)."""
    options = host_options(
        {OPTION_PREFIX + name: value for name, value in properties.items()},
        TimesyncSection,
        TIMESYNC_OPTIONS,
    )
    assert options.settings == {"interval_s": seconds}


@pytest.mark.parametrize("value", ["0", "4294967"])
def test_the_global_interval_has_vboxservices_bounds(value: str) -> None:
    """1 s to UINT32_MAX / 1000 - 1 s, as ``vgsvcProcessGlobalOption`` takes it."""
    options = host_options({f"{OPTION_PREFIX}interval": value}, TimesyncSection, TIMESYNC_OPTIONS)
    assert options.settings == {}
    assert options.refused == [
        f"{OPTION_PREFIX}interval = {value!r}: not a whole number in 1..4294966"
    ]


@pytest.mark.parametrize(
    ("properties", "settings", "refused"),
    [
        ({"vminfo-interval": "2500"}, {"interval_s": 2.5}, []),
        ({"interval": "30"}, {"interval_s": 30}, []),
        ({"interval": "30", "vminfo-interval": "2500"}, {"interval_s": 2.5}, []),
        (
            {"interval": "30", "vminfo-interval": "500"},
            {"interval_s": 30},
            [
                "--vminfo-interval = '500': "
                "interval_s 0.5: input should be greater than or equal to 1"
            ],
        ),
        (
            {"interval": "7200"},
            {},
            ["--interval = '7200': interval_s 7200: input should be less than or equal to 3600"],
        ),
        ({"interval": "7200", "vminfo-interval": "2000"}, {"interval_s": 2.0}, []),
        (
            {"interval": "30", "vminfo-interval": "7200000"},
            {"interval_s": 30},
            [
                "--vminfo-interval = '7200000': interval_s 7200: input should be less than or"
                " equal to 3600"
            ],
        ),
        ({"timesync-interval": "2000", "timesync-set-start": ""}, {}, []),
    ],
)
def test_the_vminfo_interval_and_its_default(
    properties: dict[str, str], settings: dict[str, float], refused: list[str]
) -> None:
    """``--vminfo-interval`` (ms, VBoxService's 50 ms..UINT32_MAX - 1 ms) wins over
    ``--interval`` (s); either is held to ``[network]``'s 1..3600 s (a global one out of them
    refused only where it would apply), and the other services' options are not the VM-info
    service's."""
    options = host_options(
        {OPTION_PREFIX + name: value for name, value in properties.items()},
        NetworkSection,
        VMINFO_OPTIONS,
    )
    assert options.settings == settings
    assert options.refused == ["/VirtualBox/GuestAdd/VBoxService/" + problem for problem in refused]
