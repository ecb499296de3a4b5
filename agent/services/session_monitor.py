"""``SessionMonitor``: notices VM restores and keeps the current VMMDev session id.

The host gives the VM a new session id at every start, restore and reset, and raises
RESTORED after a restore. VBoxService polls the id; here the event pump wakes the monitor,
which re-reads the id and logs the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.protocol import Event, GetSessionId

if TYPE_CHECKING:
    from agent.device import Device
    from agent.services.event_pump import EventPump

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SessionMonitorStatistics:
    """The current session id (None before the first read) and the restores seen."""

    session_id: int | None
    restores: int


@final
class SessionMonitor:
    """Follows the VM's session id across restores."""

    name: Final = "session-monitor"

    def __init__(self, device: Device, pump: EventPump) -> None:
        self._device = device
        self._pump = pump
        self._session_id: int | None = None
        self._restores = 0

    def statistics(self) -> SessionMonitorStatistics:
        """Return the session id and restore count."""
        return SessionMonitorStatistics(self._session_id, self._restores)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Read the session id, then re-read it at every RESTORED event."""
        structlog.contextvars.bind_contextvars(service=self.name)
        with self._pump.subscribe(self.name, Event.RESTORED) as events:
            session_id = (await self._device.request(GetSessionId())).value
            self._session_id = session_id
            log.info("vm_session_read", session_id=f"{session_id:#x}")
            task_status.started()
            while True:
                await events.receive()
                old, session_id = session_id, (await self._device.request(GetSessionId())).value
                self._session_id = session_id
                self._restores += 1
                log.info(
                    "vm_restored",
                    old_session_id=f"{old:#x}",
                    session_id=f"{session_id:#x}",
                    restores=self._restores,
                )
