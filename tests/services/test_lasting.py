"""``LastingFailure``: which failures and recoveries are logged."""

from __future__ import annotations

import structlog

from agent.services._lasting import LastingFailure


def test_each_new_cause_is_logged_once_and_the_end_once() -> None:
    """Repeats of a cause are counted silently; a new cause is logged; a success ends it."""
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
    assert [(e["event"], e.get("status"), e.get("failures")) for e in logs[:2]] == [
        ("broke", "A", 1),
        ("broke", "B", 3),
    ]
    assert [(e["event"], e["failed_in_a_row"]) for e in logs[2:]] == [("ok_again", 3)]
