"""``bench/heartbeat.py``'s lateness of beats behind their slots, on made-up host stamps."""

from __future__ import annotations

import pytest

from bench.heartbeat import grid_lateness

INTERVAL = 0.1


def beats(*lateness: float, start: float = 5.0) -> list[float]:
    """Host stamps of beats sent for consecutive slots, each ``lateness`` seconds late."""
    return [start + slot * INTERVAL + late for slot, late in enumerate(lateness)]


def assert_lateness(stamps: list[float], expected: list[float]) -> None:
    assert grid_lateness(stamps, INTERVAL) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("late", [0.002, 0.049, 0.051, 0.06, 0.098, 0.099])
def test_a_beat_less_than_an_interval_late_is_late_by_that_much(late: float) -> None:
    # Past half an interval, a beat rounded to its nearest slot was taken for an early one.
    assert_lateness(beats(0, 0, 0, late, 0, 0), [0, 0, 0, late, 0, 0])


def test_a_beat_over_an_interval_late_is_late_and_so_is_the_next_sent_at_once() -> None:
    # 130 ms late: the next deadline has passed too, so that beat follows at once, 30 ms late.
    assert_lateness(beats(0, 0, 0.13, 0.03, 0), [0, 0, 0.13, 0.03, 0])


def test_the_slots_a_late_beat_overran_by_a_whole_interval_are_skipped() -> None:
    # The beat for 5.1 s goes out 250 ms late: the deadline of 5.2 s is overrun by a whole
    # interval and skipped, that of 5.3 s (50 ms overrun) is sent at once, and 5.4 s on time.
    stamps = [5.0, 5.1 + 0.25, 5.3 + 0.051, 5.4, 5.5]
    assert_lateness(stamps, [0, 0.25, 0.051, 0, 0])


def test_a_late_first_beat_is_measured_against_the_least_late_one() -> None:
    assert_lateness(beats(0.03, 0.001, 0, 0.002), [0.03, 0.001, 0, 0.002])


def test_the_trip_to_the_host_is_not_lateness() -> None:
    assert_lateness(beats(0.004, 0.004, 0.005, 0.004), [0, 0, 0.001, 0])


def test_no_beats_have_no_lateness() -> None:
    assert grid_lateness([], INTERVAL) == []
