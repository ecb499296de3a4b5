"""GET_NOTIFICATION of the simulated VBoxGuestPropSvc: the queue, waits and their endings.

Rules of this test module:
- calls go through the ``HgcmService`` interface; a wait is a ``FakeCall`` that is still
  pending, and a later change, sweep or disconnect completes it synchronously;
- the service runs on a ``FakeClock``: the n-th change of a test gets ``START_NS + n``.
"""

from __future__ import annotations

import pytest

from agent.host.guest_props import (
    MAX_CONCURRENT_WAITS,
    MAX_GUEST_NOTIFICATIONS,
    MAX_PATTERN_SIZE,
    GuestPropertyService,
)
from agent.protocol.status import (
    VERR_BUFFER_OVERFLOW,
    VERR_INTERRUPTED,
    VERR_OUT_OF_RESOURCES,
    VERR_TOO_MUCH_DATA,
    VINF_SUCCESS,
    VWRN_NOT_FOUND,
)

from .guest_props_support import (
    START_NS,
    FakeClock,
    del_call,
    enum_call,
    guest_set,
    notification,
    notify_call,
    run,
    u32_value,
    u64_value,
)


@pytest.fixture(name="svc")
def _svc() -> GuestPropertyService:
    return GuestPropertyService(clock=FakeClock())


class TestWaitForNext:
    def test_completes_on_matching_change(self, svc: GuestPropertyService) -> None:
        """A zero-timestamp call waits, then gets the next matching change."""
        wait = run(svc, notify_call("/Guest/*"))
        assert wait.pending
        guest_set(svc, "/Guest/a", "v", "TRANSIENT")
        assert wait.status == VINF_SUCCESS
        assert notification(wait) == ("/Guest/a", "v", "TRANSIENT", "0")
        assert u64_value(wait, 1) == START_NS
        assert len(b"/Guest/a\0v\0TRANSIENT\0000\0") == u32_value(wait, 3)

    def test_ignores_other_changes(self, svc: GuestPropertyService) -> None:
        """Changes that do not match leave the call waiting."""
        wait = run(svc, notify_call("/Guest/a|/Guest/b"))
        guest_set(svc, "/Other/a", "v")
        assert wait.pending
        svc.host_set("/Guest/b", "w")
        assert notification(wait) == ("/Guest/b", "w", "", "0")

    def test_waits_even_when_the_queue_has_entries(self, svc: GuestPropertyService) -> None:
        """Timestamp 0 never returns an old change."""
        guest_set(svc, "/Guest/a", "v")
        assert run(svc, notify_call()).pending

    def test_delete(self, svc: GuestPropertyService) -> None:
        """A delete reports an empty value, empty flags and ``1``."""
        guest_set(svc, "/Guest/a", "v", "TRANSIENT")
        wait = run(svc, notify_call())
        run(svc, del_call("/Guest/a"))
        assert notification(wait) == ("/Guest/a", "", "", "1")

    def test_only_the_first_string_is_the_pattern(self, svc: GuestPropertyService) -> None:
        """An inner NUL ends GET_NOTIFICATION's patterns (unlike ENUM_PROPS)."""
        wait = run(svc, notify_call("/Guest/a\0/Guest/b"))
        guest_set(svc, "/Guest/b", "v")
        assert wait.pending
        guest_set(svc, "/Guest/a", "v")
        assert wait.status == VINF_SUCCESS

    def test_patterns_over_the_enumeration_limit(self, svc: GuestPropertyService) -> None:
        """GET_NOTIFICATION takes a pattern list of any length (``getNotification`` checks
        none), where ENUM_PROPS refuses the same list over 1024 bytes."""
        names = [f"/Guest/{index:02}/{'x' * 40}" for index in range(30)]
        patterns = "|".join(names)
        assert len(patterns) + 1 > MAX_PATTERN_SIZE
        assert run(svc, enum_call(patterns.encode() + b"\0")).status == VERR_TOO_MUCH_DATA
        wait = run(svc, notify_call(patterns))
        guest_set(svc, "/Guest/other", "v")
        assert wait.pending
        guest_set(svc, names[7], "v")
        assert wait.status == VINF_SUCCESS
        assert notification(wait) == (names[7], "v", "", "0")

    def test_overflow_on_wake_up(self, svc: GuestPropertyService) -> None:
        """A short buffer ends the wait with VERR_BUFFER_OVERFLOW, timestamp and size set."""
        wait = run(svc, notify_call(size=4))
        guest_set(svc, "/Guest/a", "v")
        assert wait.status == VERR_BUFFER_OVERFLOW
        assert u64_value(wait, 1) == START_NS
        assert len(b"/Guest/a\0v\0\0000\0") == u32_value(wait, 3)

    def test_each_wait_uses_its_own_patterns(self, svc: GuestPropertyService) -> None:
        """A change completes exactly the waits whose own patterns match it."""
        first = run(svc, notify_call("/Guest/a*", client_id=1))
        second = run(svc, notify_call("/Guest/b*", client_id=2))
        third = run(svc, notify_call("/Guest/*", client_id=3))
        guest_set(svc, "/Guest/b1", "v")
        assert first.pending
        assert second.status == VINF_SUCCESS
        assert third.status == VINF_SUCCESS


class TestOldNotifications:
    def test_known_timestamp_returns_next_match(self, svc: GuestPropertyService) -> None:
        """A known timestamp returns the first later matching change at once."""
        guest_set(svc, "/Guest/a", "1")
        guest_set(svc, "/Other/x", "2")
        guest_set(svc, "/Guest/b", "3")
        guest_set(svc, "/Guest/c", "4")
        call = run(svc, notify_call("/Guest/*", timestamp=START_NS))
        assert call.status == VINF_SUCCESS
        assert notification(call) == ("/Guest/b", "3", "", "0")
        assert u64_value(call, 1) == START_NS + 2

    def test_known_timestamp_without_later_match_waits(self, svc: GuestPropertyService) -> None:
        """A known timestamp with no later match waits and then succeeds."""
        guest_set(svc, "/Guest/a", "1")
        guest_set(svc, "/Other/x", "2")
        call = run(svc, notify_call("/Guest/*", timestamp=START_NS))
        assert call.pending
        guest_set(svc, "/Guest/b", "3")
        assert call.status == VINF_SUCCESS

    def test_unknown_timestamp_returns_oldest_match(self, svc: GuestPropertyService) -> None:
        """An unknown timestamp returns the oldest matching change with VWRN_NOT_FOUND."""
        guest_set(svc, "/Other/x", "1")
        guest_set(svc, "/Guest/a", "2")
        guest_set(svc, "/Guest/b", "3")
        call = run(svc, notify_call("/Guest/*", timestamp=12345))
        assert call.status == VWRN_NOT_FOUND
        assert notification(call) == ("/Guest/a", "2", "", "0")

    def test_unknown_timestamp_without_match_waits(self, svc: GuestPropertyService) -> None:
        """An unknown timestamp with no match waits and completes with VWRN_NOT_FOUND."""
        guest_set(svc, "/Other/x", "1")
        call = run(svc, notify_call("/Guest/*", timestamp=12345))
        assert call.pending
        guest_set(svc, "/Guest/a", "2")
        assert call.status == VWRN_NOT_FOUND
        assert notification(call) == ("/Guest/a", "2", "", "0")

    def test_deleted_is_computed_now(self, svc: GuestPropertyService) -> None:
        """An old change reports ``1`` when the property no longer exists."""
        guest_set(svc, "/Guest/a", "1")
        guest_set(svc, "/Guest/b", "2")
        run(svc, del_call("/Guest/b"))
        call = run(svc, notify_call("/Guest/b", timestamp=START_NS))
        assert notification(call) == ("/Guest/b", "2", "", "1")

    def test_overflow_at_once(self, svc: GuestPropertyService) -> None:
        """An old change that does not fit gives VERR_BUFFER_OVERFLOW with timestamp and size."""
        guest_set(svc, "/Guest/a", "1")
        guest_set(svc, "/Guest/b", "2")
        call = run(svc, notify_call(timestamp=START_NS, size=3))
        assert call.status == VERR_BUFFER_OVERFLOW
        assert u64_value(call, 1) == START_NS + 1
        assert len(b"/Guest/b\x002\x00\x000\x00") == u32_value(call, 3)

    def test_queue_keeps_the_last_256(self, svc: GuestPropertyService) -> None:
        """Only the last 256 changes are remembered."""
        for index in range(MAX_GUEST_NOTIFICATIONS + 1):
            guest_set(svc, "/Guest/a", str(index))
        forgotten = run(svc, notify_call(timestamp=START_NS))
        assert forgotten.status == VWRN_NOT_FOUND
        assert notification(forgotten) == ("/Guest/a", "1", "", "0")
        kept = run(svc, notify_call(timestamp=START_NS + 1))
        assert kept.status == VINF_SUCCESS
        assert notification(kept) == ("/Guest/a", "2", "", "0")


class TestWaitEndings:
    def test_same_patterns_interrupt_the_older_wait(self, svc: GuestPropertyService) -> None:
        """A client's new wait with identical patterns ends its older one with VERR_INTERRUPTED."""
        old = run(svc, notify_call("/Guest/*"))
        other_client = run(svc, notify_call("/Guest/*", client_id=2))
        other_patterns = run(svc, notify_call("/Guest/a"))
        new = run(svc, notify_call("/Guest/*"))
        assert old.status == VERR_INTERRUPTED
        assert other_client.pending
        assert other_patterns.pending
        assert new.pending

    def test_concurrent_wait_limit(self, svc: GuestPropertyService) -> None:
        """A client's 17th concurrent wait fails with VERR_OUT_OF_RESOURCES."""
        waits = [run(svc, notify_call(f"/Guest/{n}")) for n in range(MAX_CONCURRENT_WAITS)]
        assert all(wait.pending for wait in waits)
        assert run(svc, notify_call("/Guest/x")).status == VERR_OUT_OF_RESOURCES
        assert run(svc, notify_call("/Guest/x", client_id=2)).pending
        replacing = run(svc, notify_call("/Guest/0"))
        assert replacing.pending
        assert waits[0].status == VERR_INTERRUPTED

    def test_cancelled_waits_are_swept(self, svc: GuestPropertyService) -> None:
        """A wait the guest cancelled ends with VERR_INTERRUPTED at the client's next wait."""
        waits = [run(svc, notify_call(f"/Guest/{n}")) for n in range(MAX_CONCURRENT_WAITS)]
        waits[3].cancelled = True
        fresh = run(svc, notify_call("/Guest/x"))
        assert waits[3].status == VERR_INTERRUPTED
        assert fresh.pending

    def test_cancel_leaves_the_wait_queued(self, svc: GuestPropertyService) -> None:
        """The service has no cancel hook: a cancelled wait stays until something ends it."""
        wait = run(svc, notify_call("/Guest/*"))
        wait.cancelled = True
        svc.cancel(wait)
        assert wait.pending
        other_client = run(svc, notify_call("/Guest/b", client_id=2))
        assert wait.pending
        guest_set(svc, "/Guest/a", "v")
        assert wait.status == VINF_SUCCESS
        assert other_client.pending

    def test_cancelled_wait_swept_by_next_wait_of_its_client(
        self, svc: GuestPropertyService
    ) -> None:
        """The client's next GET_NOTIFICATION, whatever its patterns, ends it."""
        wait = run(svc, notify_call("/Guest/a"))
        wait.cancelled = True
        svc.cancel(wait)
        fresh = run(svc, notify_call("/Other/*"))
        assert (wait.status, fresh.pending) == (VERR_INTERRUPTED, True)

    def test_disconnect(self, svc: GuestPropertyService) -> None:
        """A disconnect ends only that client's waits with VERR_INTERRUPTED."""
        first = run(svc, notify_call("/a", client_id=1))
        second = run(svc, notify_call("/b", client_id=1))
        other = run(svc, notify_call("/a", client_id=2))
        svc.disconnect(1)
        assert first.status == VERR_INTERRUPTED
        assert second.status == VERR_INTERRUPTED
        assert other.pending
