"""Fault injection and slow-host delays for the simulated VMMDev, by request type."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from agent.protocol.constants import RequestType
from agent.protocol.status import STATUS_MAX, STATUS_MIN, status_name

MAX_FAULT_COUNT: Final = 0xFFFF_FFFF
"""The most requests one fault answers: a u32's worth, more than any run sends (a fault
for "every request from now on"); a count beyond it is a typo."""


@dataclass(slots=True)
class _Fault:
    status: int
    remaining: int


class FaultInjector:
    """Queued answers that replace the handler, and per-type delays.

    Attributes:
        has_faults: whether any answer is queued.
        has_delays: whether any request type is delayed.

    Both are kept as plain attributes: the VMMDev port reads them for every request,
    where a property call would cost more than the test it guards.
    """

    __slots__ = ("_delays", "_faults", "has_delays", "has_faults")

    def __init__(self) -> None:
        self._faults: dict[int, list[_Fault]] = {}
        self._delays: dict[int, float] = {}
        self.has_faults = False
        self.has_delays = False

    def add_fault(self, request_type: int, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests of ``request_type`` with ``status``, unexecuted."""
        if not 1 <= count <= MAX_FAULT_COUNT:
            msg = f"fault count must be in [1, {MAX_FAULT_COUNT}], got {count}"
            raise ValueError(msg)
        if not STATUS_MIN <= status <= STATUS_MAX:
            msg = f"fault status {status} is outside {STATUS_MIN}..{STATUS_MAX} (a 32-bit int)"
            raise ValueError(msg)
        self._faults.setdefault(request_type, []).append(_Fault(status, count))
        self.has_faults = True

    def take_fault(self, request_type: int) -> int | None:
        """Return the status a queued fault answers with, consuming one use of it."""
        queue = self._faults.get(request_type)
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining == 0:
            queue.pop(0)
            if not queue:
                del self._faults[request_type]
                self.has_faults = bool(self._faults)
        return fault.status

    def clear_faults(self, request_type: int | None = None) -> int:
        """Drop the queued faults of ``request_type`` (of every type with None); return how
        many answers they still held."""
        if request_type is None:
            dropped = [fault for queue in self._faults.values() for fault in queue]
            self._faults.clear()
        else:
            dropped = self._faults.pop(request_type, [])
        self.has_faults = bool(self._faults)
        return sum(fault.remaining for fault in dropped)

    def queued_faults(self) -> list[dict[str, object]]:
        """The queued faults, by request type then in the order they answer: each one's
        ``request`` and ``status`` names and the ``remaining`` answers."""
        return [
            {
                "request": request_name(request_type),
                "status": status_name(fault.status),
                "remaining": fault.remaining,
            }
            for request_type, queue in sorted(self._faults.items())
            for fault in queue
        ]

    def active_delays(self) -> dict[str, float]:
        """The delayed request types' names and their delays in seconds."""
        return {request_name(t): seconds for t, seconds in sorted(self._delays.items())}

    def set_delay(self, request_type: int, seconds: float) -> None:
        """Hold every request of ``request_type`` for ``seconds`` before answering (0 clears).

        Raises:
            ValueError: ``seconds`` is negative or NaN; nothing changed.
        """
        if math.isnan(seconds) or seconds < 0:
            msg = f"delay must be a number of seconds, not negative or NaN, got {seconds}"
            raise ValueError(msg)
        if seconds:
            self._delays[request_type] = seconds
        else:
            self._delays.pop(request_type, None)
        self.has_delays = bool(self._delays)

    def delay(self, request_type: int) -> float:
        """Return the delay for ``request_type`` (0 if none)."""
        return self._delays.get(request_type, 0.0)


def request_name(request_type: int) -> str:
    """``CHANGE_MEMBALLOON``, or the number of a type the codec does not know."""
    try:
        return RequestType(request_type).name
    except ValueError:
        return str(request_type)
