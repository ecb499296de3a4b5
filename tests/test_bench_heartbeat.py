"""``bench/heartbeat.py``'s wait beyond the interval between beats, on made-up host stamps."""

from __future__ import annotations

import pytest

from bench.heartbeat import wait_beyond_interval

INTERVAL = 0.1
TRIP = 0.0003
"""The beat's way from the agent to the host's stamp."""


def stamped(*sent: float, start: float = 5.0) -> list[float]:
    """Host stamps of beats the agent sent at ``sent`` seconds after ``start``."""
    return [start + at + TRIP for at in sent]


def assert_waits(stamps: list[float], expected: list[float]) -> None:
    assert wait_beyond_interval(stamps, INTERVAL) == pytest.approx(expected, abs=1e-9)


def test_a_late_beat_is_waited_for_that_much_longer_and_the_one_after_it_not_at_all() -> None:
    # 30 ms late; the next beat, on time, comes 70 ms after it: sooner than an interval.
    assert_waits(stamped(0, 0.1, 0.23, 0.3, 0.4), [0, 0.13 - 0.1, 0, 0])


def test_a_stall_that_skips_a_slot_is_the_silence_the_host_saw() -> None:
    # The beat for 0.3 s reaches the host on time and its reply comes back 210 ms later: the
    # metronome skips the deadline of 0.4 s and sends that of 0.5 s at once, 10 ms late.
    # The host waited 210 ms for it (110 ms beyond the interval); the beats after it keep time.
    stamps = stamped(0, 0.1, 0.2, 0.3, 0.5103, 0.6, 0.7, 0.8)
    assert_waits(stamps, [0, 0, 0, 0.2103 - 0.1, 0, 0, 0])


def test_a_late_first_beat_has_no_wait_of_its_own_and_shortens_the_next() -> None:
    # The first beat 30 ms late: the host has no beat before it to wait from, and the next
    # comes 70 ms after it. The fourth 210 ms late: its reply came back past the next
    # deadline too, so that beat follows at once. Nothing after the first reads late.
    stamps = stamped(0.03, 0.1, 0.2, 0.51, 0.5106, 0.6, 0.7)
    assert_waits(stamps, [0, 0, 0.31 - 0.1, 0, 0, 0])


@pytest.mark.parametrize(
    ("stamps", "expected"),
    [
        # The beat for 0.3 s reaches the host 199.1 ms late, its reply back before 0.5 s:
        # the deadline of 0.4 s is sent at once, that of 0.5 s on time.
        (stamped(0, 0.1, 0.2, 0.4991, 0.4997, 0.5, 0.6), [0, 0, 0.1991, 0, 0, 0]),
        # 199.5 ms late, its reply back just past 0.5 s: the deadline of 0.4 s is skipped,
        # that of 0.5 s sent at once.
        (stamped(0, 0.1, 0.2, 0.4995, 0.5003, 0.6), [0, 0, 0.1995, 0, 0]),
    ],
    ids=["reply-before-the-edge", "reply-past-the-edge"],
)
def test_jitter_at_a_slot_edge_moves_the_figure_by_the_jitter_not_by_a_slot(
    stamps: list[float], expected: list[float]
) -> None:
    assert_waits(stamps, expected)


def test_a_constant_trip_to_the_host_is_not_counted() -> None:
    on_time = [5.0 + slot * INTERVAL for slot in range(5)]
    assert_waits([stamp + 0.004 for stamp in on_time], [0, 0, 0, 0])


@pytest.mark.parametrize("stamps", [[], [5.0]], ids=["no-beats", "one-beat"])
def test_fewer_than_two_beats_have_no_wait_to_measure(stamps: list[float]) -> None:
    assert wait_beyond_interval(stamps, INTERVAL) == []
