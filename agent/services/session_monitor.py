"""``SessionMonitor``: notices VM restores and keeps the current VMMDev session id.

The host gives the VM a new session id at every start, restore and reset, and raises
RESTORED after a restore. VBoxService polls the id; here the event pump wakes the monitor,
which re-reads the id and logs the change. Config section: ``[session_monitor]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.protocol import Event, GetSessionId
from agent.services._base import ServiceContext, ServiceSection, ServiceSpec

if TYPE_CHECKING:
    from agent.device import Device
    from agent.services.event_pump import EventPump

log = structlog.get_logger(__name__)

NAME: Final = "session_monitor"


class SessionMonitorSection(ServiceSection):
    """``[session_monitor]``: nothing to tune beyond ``enable``."""


@dataclass(frozen=True, slots=True)
class SessionMonitorStatistics:
    """The current session id (None before the first read) and the restores seen."""

    session_id: int | None
    restores: int


@final
class SessionMonitor:
    """Follows the VM's session id across restores."""

    name: Final = NAME

    def __init__(self, context: ServiceContext) -> None:
        self._device: Device = context.device
        self._pump: EventPump = context.pump
        self._status_changed = context.status_changed
        self._session_id: int | None = None
        self._restores = 0

    def statistics(self) -> SessionMonitorStatistics:
        """Return the session id and restore count."""
        return SessionMonitorStatistics(self._session_id, self._restores)

    def status(self) -> str:
        """``vm session 0x1234, 2 restores`` (``vm session unknown`` before the first read)."""
        if self._session_id is None:
            return "vm session unknown"
        return f"vm session {self._session_id:#x}, {self._restores} restores"

    def reconfigure(self, section: SessionMonitorSection) -> bool:
        """Nothing to apply: the section has no settings besides ``enable``."""
        del section
        return True

    async def drain(self) -> None:
        """Nothing to give back: the monitor holds no host resources."""
        await trio.lowlevel.checkpoint()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Read the session id, then re-read it at every RESTORED event."""
        with self._pump.subscribe(self.name, Event.RESTORED) as events:
            session_id = await self._read_session_id()
            self._session_id = session_id
            self._status_changed()
            log.info("vm_session_read", session_id=f"{session_id:#x}")
            task_status.started()
            while True:
                await events.receive()  # restores while busy coalesce: one re-read covers them
                old, session_id = session_id, await self._read_session_id()
                self._session_id = session_id
                self._restores += 1
                self._status_changed()
                log.info(
                    "vm_restored",
                    old_session_id=f"{old:#x}",
                    session_id=f"{session_id:#x}",
                    restores=self._restores,
                )

    async def _read_session_id(self) -> int:
        return (await self._device.request(GetSessionId())).value


def _build(context: ServiceContext, section: SessionMonitorSection) -> SessionMonitor:
    del section
    return SessionMonitor(context)


SPEC: Final = ServiceSpec(NAME, SessionMonitorSection, _build)
