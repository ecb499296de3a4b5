"""Long-lived services of the agent, each started by the supervisor with ``nursery.start``."""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn, Protocol

from agent.services.event_pump import (
    EventPump as EventPump,
    EventPumpStatistics as EventPumpStatistics,
)
from agent.services.session_monitor import (
    SessionMonitor as SessionMonitor,
    SessionMonitorStatistics as SessionMonitorStatistics,
)

if TYPE_CHECKING:
    import trio


class Service(Protocol):
    """What the supervisor runs: a named task that reports readiness and its counters."""

    @property
    def name(self) -> str:
        """Stable name, bound as ``service`` in every log line of the task."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> NoReturn:
        """Run until cancelled; call ``task_status.started()`` once ready."""
        ...

    def statistics(self) -> object:
        """Return an immutable snapshot of the service's counters."""
        ...
