"""``LastingFailure``: which failures and recoveries are logged."""

from __future__ import annotations

import structlog

from agent.services._lasting import LastingFailure


def test_each_new_cause_is_logged_once_and_the_end_once() -> None:
    """Repeats of a cause are counted silently; a new cause is a warning; a success ends it
    with one info line."""
    failures = LastingFailure("ok_again")
    with structlog.testing.capture_logs() as logs:
        changes = [
            failures.failed("broke", "A", status="A"),
            failures.failed("broke", "A", status="A"),
            failures.failed("broke", "B", status="B"),
        ]
        cause = failures.cause
        ended = [failures.succeeded(), failures.succeeded()]
    assert changes == [True, False, True]
    assert cause == "B"
    assert ended == [True, False]
    assert failures.total == 3
    assert failures.cause is None
    assert [(e["event"], e["log_level"], e.get("status"), e.get("failures")) for e in logs[:2]] == [
        ("broke", "warning", "A", 1),
        ("broke", "warning", "B", 3),
    ]
    assert [(e["event"], e["log_level"], e["failed_in_a_row"]) for e in logs[2:]] == [
        ("ok_again", "info", 3)
    ]


def test_a_later_failure_counts_its_own_run() -> None:
    """After a success the same cause is news again, and its end counts only the failures
    since that success; the total keeps counting."""
    failures = LastingFailure("ok_again")
    failures.failed("broke", "A")
    failures.failed("broke", "A")
    failures.succeeded()
    with structlog.testing.capture_logs() as logs:
        again = failures.failed("broke", "A")
        failures.succeeded()
    assert again is True
    assert failures.total == 3
    assert [(e["event"], e.get("failures"), e.get("failed_in_a_row")) for e in logs] == [
        ("broke", 3, None),
        ("ok_again", None, 1),
    ]


def test_the_same_cause_under_another_event_is_logged() -> None:
    """A cause is compared together with its event."""
    failures = LastingFailure("ok_again")
    with structlog.testing.capture_logs() as logs:
        changes = [failures.failed("one", "X"), failures.failed("other", "X")]
    assert changes == [True, True]
    assert [entry["event"] for entry in logs] == ["one", "other"]
