"""``SessionMonitor``: notices VM restores and keeps the current VMMDev session id.

The host gives the VM a new session id at every start, restore and reset, and raises
RESTORED after a restore. VBoxService polls the id; here the event pump wakes the monitor,
which re-reads the id and logs the change. As VBoxService, the monitor tells a restore by
the id: the host keeps a RESTORED no session's filter admits pending and hands it over once
one does, so the event of a restore from before the monitor's first read (the VM restored
before the agent started) comes after that read; a read that finds the id unchanged shows
the event was for that earlier restore, which is then not counted (one debug line). A read
that fails (a refusal or a malformed reply) keeps the id last read, as VBoxService ignores a
failed ``VbglR3GetSessionId``: it is counted, logged when such failures begin, change cause
and end, shown in the status, and tried again every ``RETRY_S`` until a read goes through
(and at every restore); a restore stays pending, and counted, until then, so every restore
is logged (``vm_restored``, from the id read before it). Config section:
``[session_monitor]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.protocol import HOST_ERRORS, Event, GetSessionId
from agent.records import record
from agent.services._base import ServiceContext, ServiceSection, ServiceSpec
from agent.services._lasting import LastingFailure

if TYPE_CHECKING:
    from agent.device import Device
    from agent.services.event_pump import EventPump

log = structlog.get_logger(__name__)

NAME: Final = "session_monitor"
RETRY_S: Final = 10.0
"""How soon a failed read is tried again: VBoxService's VM-info service reads the id at
every pass, every 10 s. Only while reads fail: a monitor that read the id waits for events."""


class SessionMonitorSection(ServiceSection):
    """``[session_monitor]``: nothing to tune beyond ``enable``."""


@record
class SessionMonitorStatistics:
    """The current session id (None before the first read), the restores seen and the reads
    that failed."""

    session_id: int | None
    restores: int
    failures: int = 0


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
        self._restored_from: int | None = None
        """The id before the restores whose re-read has not gone through yet."""
        self._unconfirmed = 0
        """RESTORED events since the last read that went through (counted in ``_restores``
        until a read tells whether the id changed)."""
        self._failures = LastingFailure("vm_session_read_again")

    def statistics(self) -> SessionMonitorStatistics:
        """Return the session id, restore count and failed reads."""
        return SessionMonitorStatistics(self._session_id, self._restores, self._failures.total)

    def status(self) -> str:
        """``vm session 0x1234, 2 restores`` (``vm session unknown`` before the first read),
        then `` (read failing: STATUS)`` while reads fail."""
        if self._session_id is None:
            text = "vm session unknown"
        else:
            text = f"vm session {self._session_id:#x}, {self._restores} restores"
        cause = self._failures.cause
        return text if cause is None else f"{text} (read failing: {cause})"

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
        """Read the session id, then re-read it at every RESTORED event (and every
        ``RETRY_S`` while reads fail)."""
        with self._pump.subscribe(self.name, Event.RESTORED) as events:
            await self._read(restored=False)
            task_status.started()
            while True:
                restored = False
                with trio.move_on_after(RETRY_S if self._failures.cause else math.inf):
                    await events.receive()  # restores while busy coalesce: one re-read
                    restored = True
                await self._read(restored=restored)

    async def _read(self, *, restored: bool) -> None:
        """Count the restore, if any; read the id and log it (see :meth:`_settle`); a
        failure (a refusal, a malformed reply) keeps the id last read and the restore
        pending, and is counted, and logged when such failures begin, change cause and end.
        Tell the daemon when the status changed."""
        status = self.status()
        if restored:
            self._restores += 1
            if not self._unconfirmed:
                self._restored_from = self._session_id
            self._unconfirmed += 1
        try:
            self._session_id = (await self._device.request(GetSessionId())).value
        except HOST_ERRORS as exc:
            self._failures.host_failed("vm_session_unreadable", exc)
        else:
            self._failures.succeeded()
            self._settle()
        if self.status() != status:
            self._status_changed()

    def _settle(self) -> None:
        """Log the id just read: ``vm_restored`` (from the id before) after RESTORED events,
        unless the id is the one read before them (both known): the events were then for a
        restore that read already saw, and are not counted."""
        events, self._unconfirmed = self._unconfirmed, 0
        if not events:
            log.info("vm_session_read", session_id=_shown(self._session_id))
        elif self._session_id == self._restored_from:
            self._restores -= events
            log.debug("vm_restore_seen_before", session_id=_shown(self._session_id))
        else:
            log.info(
                "vm_restored",
                old_session_id=_shown(self._restored_from),
                session_id=_shown(self._session_id),
                restores=self._restores,
            )


def _shown(session_id: int | None) -> str:
    return "unknown" if session_id is None else f"{session_id:#x}"


def _build(context: ServiceContext, section: SessionMonitorSection) -> SessionMonitor:
    del section
    return SessionMonitor(context)


SPEC: Final = ServiceSpec(NAME, SessionMonitorSection, _build)
