"""The host's heartbeat check: configure, beats and the flat-line timer, on trio time.

As in VMMDev: enabling records "last beat = now" and arms a one-shot timer for the timeout;
each beat while active clears the flat-lined state and re-arms it; when the timer fires and
at least one interval passed since the last beat, the guest is flat-lined. That is only
logged (and counted here): the host takes no action.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final, NoReturn

import trio

from agent.host._log import host_log as _log
from agent.protocol.constants import MIN_HEARTBEAT_INTERVAL_NS
from agent.units import NS_PER_S

if TYPE_CHECKING:
    from collections.abc import Callable

MIN_INTERVAL_NS: Final = MIN_HEARTBEAT_INTERVAL_NS
"""``HeartbeatInterval`` below 50 ms is a configuration error."""
DEFAULT_INTERVAL_NS: Final = 2 * NS_PER_S
"""The simulated host's ``HeartbeatInterval`` unless it is given one."""
MIN_TIMEOUT_NS: Final = 100_000_000
"""``HeartbeatTimeout`` below 100 ms is a configuration error."""
TIMEOUT_MARGIN_NS: Final = 10_000_000
"""The timeout must exceed the interval by more than 10 ms."""
MAX_NS: Final = 2**64 - 1
"""VMMDev keeps the interval and the timeout as u64 nanoseconds."""


def now_ns() -> int:
    """Return trio's clock in nanoseconds (virtual time under ``MockClock``)."""
    return round(trio.current_time() * NS_PER_S)


class HeartbeatMonitor:
    """Host heartbeat state of one VM."""

    __slots__ = (
        "_deadline_ns",
        "_last_ns",
        "_now",
        "_rearmed",
        "active",
        "beats",
        "flatline_count",
        "flatlined",
        "interval_ns",
        "max_gap_ns",
        "timeout_ns",
    )

    def __init__(
        self, interval_ns: int, timeout_ns: int, *, clock: Callable[[], int] = now_ns
    ) -> None:
        if interval_ns < MIN_INTERVAL_NS:
            msg = f"heartbeat interval {interval_ns} ns is below {MIN_INTERVAL_NS} ns"
            raise ValueError(msg)
        if timeout_ns > MAX_NS:
            msg = (
                f"heartbeat timeout {timeout_ns} ns (twice the interval unless set) "
                "does not fit in 64 bits"
            )
            raise ValueError(msg)
        if timeout_ns < MIN_TIMEOUT_NS or timeout_ns <= interval_ns + TIMEOUT_MARGIN_NS:
            msg = (
                f"heartbeat timeout {timeout_ns} ns must be at least {MIN_TIMEOUT_NS} ns and "
                f"more than the interval + {TIMEOUT_MARGIN_NS} ns"
            )
            raise ValueError(msg)
        self.interval_ns = interval_ns
        self.timeout_ns = timeout_ns
        self.active = False
        self.flatlined = False
        self.flatline_count = 0
        self.beats = 0
        self.max_gap_ns = 0
        self._now = clock
        self._last_ns = 0
        self._deadline_ns: int | None = None
        self._rearmed = trio.lowlevel.ParkingLot()

    def configure(self, enabled: bool) -> int:
        """HEARTBEAT_CONFIGURE: switch the check and return the interval the guest must keep.

        Switching it off stops the timer but keeps a flat-line on record (the next beat after
        switching it on again ends it); asking for the state it is in changes nothing and is
        logged, as VMMDev does.
        """
        if enabled == self.active:
            _log.info("heartbeat_configure_unchanged", enabled=enabled)
        else:
            self.active = enabled
            if enabled:
                self._last_ns = self._now()
                self._arm()
                _log.info("heartbeat_armed", timeout_ns=self.timeout_ns)
            else:
                self._deadline_ns = None
                self._rearmed.unpark_all()
                _log.info("heartbeat_disabled")
        return self.interval_ns

    def beat(self) -> None:
        """GUEST_HEARTBEAT: the guest is alive (ignored while the check is off)."""
        self.beats += 1
        if not self.active:
            return
        now = self._now()
        self.max_gap_ns = max(self.max_gap_ns, now - self._last_ns)
        if self.flatlined:
            self.flatlined = False
            _log.info("guest_alive", gone_ns=now - self._last_ns)
        self._last_ns = now
        self._arm()

    def reset(self) -> None:
        """VM reset: an active check stops its timer and forgets the flat-line.

        VMMDev's reset leaves the check's on/off state as it was (its "deactivate" sets the
        flag it just tested back to true), so a check the guest never configured stays off,
        and an active one stays active until the guest configures it again.
        """
        if not self.active:
            return
        self._deadline_ns = None
        self._rearmed.unpark_all()
        self.flatlined = False

    async def run(self) -> NoReturn:
        """Run the one-shot flat-line timer forever (re-armed by beats and configure)."""
        while True:
            deadline = self._deadline_ns
            if deadline is None:
                await self._rearmed.park()
                continue
            with trio.move_on_at(deadline / NS_PER_S) as timer:
                await self._rearmed.park()
            if timer.cancelled_caught and self._deadline_ns == deadline:
                self._deadline_ns = None
                self._fire()

    def snapshot(self) -> dict[str, int | bool]:
        """Return the state for ``host status``."""
        return {
            "enabled": self.active,
            "interval_ns": self.interval_ns,
            "timeout_ns": self.timeout_ns,
            "beats": self.beats,
            "flatlined": self.flatlined,
            "flatline_count": self.flatline_count,
            "max_gap_ns": self.max_gap_ns,
        }

    def _arm(self) -> None:
        self._deadline_ns = self._now() + self.timeout_ns
        self._rearmed.unpark_all()

    def _fire(self) -> None:
        elapsed = self._now() - self._last_ns
        if self.active and not self.flatlined and elapsed >= self.interval_ns:
            self.flatlined = True
            self.flatline_count += 1
            _log.warning(
                "guest_unresponsive", last_beat_s=math.floor(elapsed / NS_PER_S), gone_ns=elapsed
            )
