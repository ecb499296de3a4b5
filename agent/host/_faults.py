"""Fault injection and slow-host delays for the simulated VMMDev, by request type."""

from __future__ import annotations

from dataclasses import dataclass

from agent.protocol.status import STATUS_MAX, STATUS_MIN


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
        if count <= 0:
            msg = f"fault count must be positive, got {count}"
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

    def set_delay(self, request_type: int, seconds: float) -> None:
        """Hold every request of ``request_type`` for ``seconds`` before answering (0 clears)."""
        if seconds < 0:
            msg = f"delay must not be negative, got {seconds}"
            raise ValueError(msg)
        if seconds:
            self._delays[request_type] = seconds
        else:
            self._delays.pop(request_type, None)
        self.has_delays = bool(self._delays)

    def delay(self, request_type: int) -> float:
        """Return the delay for ``request_type`` (0 if none)."""
        return self._delays.get(request_type, 0.0)
