"""The host's guest-statistics state: the interval Main asks for and the reports it gets.

As in VMMDev: setting an interval that differs from the one the guest last *acknowledged*
stores it and raises STATISTICS_INTERVAL_CHANGE_REQUEST (0x80); setting the acknowledged value
again does nothing at all, not even store it. GET_STATISTICS_CHANGE_REQ returns the stored
interval and, when its ``event_ack`` is 0x80, records it as acknowledged. REPORT_GUEST_STATS
hands the ``VBoxGuestStatistics`` to Main, which keeps the latest values. A VM reset forgets
the acknowledgement (the interval stays), so the next setting notifies again. Both requests
must have their exact size; the device checks that before the handlers run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.host._log import host_log as _log
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import Event
from agent.protocol.messages import GUEST_STATISTICS_FIELDS
from agent.protocol.status import VINF_SUCCESS

if TYPE_CHECKING:
    from collections.abc import Callable

MAX_INTERVAL_S: Final = 0xFFFF_FFFF
"""The interval is a u32 of seconds."""


class HostGuestStats:
    """Guest statistics of one VM, as VMMDev and Main keep them."""

    __slots__ = ("_raise_events", "acked_interval_s", "interval_s", "last", "reports")

    def __init__(self, raise_events: Callable[[int], None]) -> None:
        self._raise_events = raise_events
        self.interval_s = 0
        self.acked_interval_s = 0
        self.reports = 0
        self.last: dict[str, int] | None = None

    def set_interval(self, seconds: int) -> None:
        """Main asks for a report every ``seconds`` (0: none); notify if the guest has not seen it.

        Raises:
            ValueError: ``seconds`` is negative or above a u32.
        """
        if not 0 <= seconds <= MAX_INTERVAL_S:
            msg = f"statistics interval must be in range [0, {MAX_INTERVAL_S}] s, got {seconds}"
            raise ValueError(msg)
        if seconds == self.acked_interval_s:
            return
        self.interval_s = seconds
        _log.info("statistics_interval_set", interval_s=seconds)
        self._raise_events(Event.STATISTICS_INTERVAL_CHANGE_REQUEST)

    def change_request(self, req: bytearray, _phys: int) -> int:
        """GET_STATISTICS_CHANGE_REQ: return the interval; ``event_ack`` 0x80 acknowledges it."""
        L.StatisticsChangeRequest.interval_s.set(req, self.interval_s)
        if L.StatisticsChangeRequest.event_ack.get(req) == Event.STATISTICS_INTERVAL_CHANGE_REQUEST:
            self.acked_interval_s = self.interval_s
        return VINF_SUCCESS

    def report(self, req: bytearray, _phys: int) -> int:
        """REPORT_GUEST_STATS: keep the report as the latest."""
        values: dict[str, int] = {}
        for name in GUEST_STATISTICS_FIELDS:
            member: L.IntField = getattr(L.GuestStatsRequest, name)
            values[name] = member.get(req)
        self.last = values
        self.reports += 1
        return VINF_SUCCESS

    def reset(self) -> None:
        """VM reset: the guest has acknowledged nothing any more."""
        self.acked_interval_s = 0

    def snapshot(self) -> dict[str, object]:
        """Return the state for ``host status`` (``last`` is None before any report)."""
        last = None if self.last is None else dict(self.last)
        return {"interval_s": self.interval_s, "reports": self.reports, "last": last}
