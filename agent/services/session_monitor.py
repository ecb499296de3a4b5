"""``SessionMonitor``: notices VM restores and keeps the current VMMDev session id.

The host gives the VM a new session id at every start, restore and reset, and raises
RESTORED after a restore. VBoxService polls the id; here the event pump wakes the monitor,
which re-reads the id and logs the change. As VBoxService, the monitor takes the id of its
first read that goes through as its baseline and decides restores only at a read that goes
through, never before (so nothing is counted and taken back):

- a read finding another id than the last one read (kept across runs of the object, so a
  restart's first read counts a restore during the back-off, heard by no run of it) counts
  a restore, and every RESTORED the read was called for beyond the first;
- a read finding the same id counts every RESTORED it was called for except a run's first:
  the host keeps a RESTORED no session's filter admits and hands it to the first that does,
  so a run's first event may be for a restore from before its first read (the VM restored
  before the agent started, or during a restart's back-off), which that read already saw
  (one debug line). A later event is a restore after it, one whose id the read before
  happened to find already.

A read that fails (a refusal or a malformed reply) keeps the id last read, as VBoxService
ignores a failed ``VbglR3GetSessionId``: it is counted, logged when such failures begin,
change cause and end, shown in the status, and tried again every ``RETRY_S`` until a read
goes through (and at every restore); the events stay pending until then. Every counted
restore is logged (``vm_restored``: the id read before it, ``unknown`` when no read saw it).
Config section: ``[session_monitor]``.
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
        """The id the last read that went through found, kept across runs."""
        self._restores = 0
        self._first_event_due = True
        """Whether the run has not had a RESTORED yet: its first may be one the host kept."""
        self._pending_first = 0
        """Runs' first RESTORED events no read went through for yet."""
        self._pending_later = 0
        """Later RESTORED events no read went through for yet: restores all."""
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
            self._first_event_due = True
            await self._read()
            task_status.started()
            while True:
                with trio.move_on_after(RETRY_S if self._failures.cause else math.inf):
                    await events.receive()  # restores while busy coalesce: one re-read
                    self._note_event()
                await self._read()

    def _note_event(self) -> None:
        if self._first_event_due:
            self._first_event_due = False
            self._pending_first += 1
        else:
            self._pending_later += 1

    async def _read(self) -> None:
        """Read the id and settle the pending events by it (:meth:`_settle`); a failure (a
        refusal, a malformed reply) keeps the id last read and the events pending, and is
        counted, and logged when such failures begin, change cause and end. Tell the daemon
        when the status changed."""
        status = self.status()
        try:
            session_id = (await self._device.request(GetSessionId())).value
        except HOST_ERRORS as exc:
            self._failures.host_failed("vm_session_unreadable", exc)
        else:
            self._failures.succeeded()
            self._settle(session_id)
        if self.status() != status:
            self._status_changed()

    def _settle(self, session_id: int) -> None:
        """Count and log the restores the id just read tells of (see the module's doc)."""
        before = self._session_id
        changed = before is not None and session_id != before
        kept, later = self._pending_first, self._pending_later
        restores = max(1, kept + later) if changed else later
        self._session_id = session_id
        self._pending_first = self._pending_later = 0
        self._restores += restores
        if restores:
            log.info(
                "vm_restored",
                old_session_id=_shown(before if changed else None),
                session_id=_shown(session_id),
                restores=self._restores,
            )
        elif kept:
            log.debug("vm_restore_seen_before", session_id=_shown(session_id))
        else:
            log.info("vm_session_read", session_id=_shown(session_id))


def _shown(session_id: int | None) -> str:
    return "unknown" if session_id is None else f"{session_id:#x}"


def _build(context: ServiceContext, section: SessionMonitorSection) -> SessionMonitor:
    del section
    return SessionMonitor(context)


SPEC: Final = ServiceSpec(NAME, SessionMonitorSection, _build)
