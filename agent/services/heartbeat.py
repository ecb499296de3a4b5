"""``heartbeat``: keep the host's heartbeat check fed, where the driver lets userspace do it.

The host's flat-line check expects GUEST_HEARTBEAT every interval it chooses. Where the driver
passes the heartbeat requests through (``passthrough``), the service switches the check off
and on again with HEARTBEAT_CONFIGURE (a fresh start, whatever an earlier run left), takes the
interval the host returns and beats on that rhythm with the :class:`Metronome` (absolute
deadlines, one late beat rather than a burst). After a restore (RESTORED) it configures again;
at stop (``drain``) it switches the check off, so a stopped agent is not mistaken for a hung
guest. A configure whose reply is malformed (an interval below the 50 ms a VirtualBox host
allows, say: beating on it would be a busy loop) is one warning (``heartbeat_not_armed``);
the service switches the check off again and leaves it so until the next restore, when it
configures again. A configure the host refuses with any other status than the two below
(VERR_GENERAL_FAILURE, say, or any status after the heartbeat was once armed) is the same
warning, said once while its cause lasts; it is tried again on a back-off
(:meth:`LastingFailure.retry_in`) and at the next restore, and ``heartbeat_armed_again`` says when
one goes through. The service never ends on it: a restart would meet the same host, and the
daemon's restart budget would end the agent and every other service with it. A beat the
host refuses or answers with a malformed reply is counted; such failures are logged when
they begin and change cause (``heartbeat_failed``) and when a beat goes through again
(``heartbeat_recovered``), not at every beat, the status says so
meanwhile, and the rhythm goes on.

Where the driver keeps the heartbeat itself, the requests are refused (mainline: EPERM; Oracle's
``vgdrvCheckIfVmmReqIsAllowed``: VERR_PERMISSION_DENIED, as neither request is on its list).
The service then logs once that the kernel owns the heartbeat and does nothing more. A host
without the heartbeat (VERR_NOT_IMPLEMENTED / VERR_NOT_SUPPORTED) is logged the same way.
A retry that meets one of these, the heartbeat never armed, gives up the same way, and the
status then says who keeps the heartbeat, not the refusal that came before.
Config section: ``[heartbeat]``.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio
from pydantic import Field

from agent.protocol import (
    HOST_ERRORS,
    Event,
    GuestHeartbeat,
    HeartbeatConfigure,
    RemoteProtocolError,
    VBoxStatusError,
)
from agent.protocol.status import (
    VERR_ACCESS_DENIED,
    VERR_NOT_IMPLEMENTED,
    VERR_NOT_SUPPORTED,
    VERR_PERMISSION_DENIED,
)
from agent.records import record
from agent.services._base import ServiceContext, ServiceSection, ServiceSpec
from agent.services._lasting import LastingFailure
from agent.services._paced import Metronome, RetryWakeups
from agent.units import MS_PER_S, NS_PER_MS, NS_PER_S

if TYPE_CHECKING:
    from agent.device import Device
    from agent.services._paced import MetronomeStatistics
    from agent.services.event_pump import EventPump

log = structlog.get_logger(__name__)

NAME: Final = "heartbeat"
MAX_LATE_AFTER_S: Final = 60.0
DRIVER_REFUSALS: Final = frozenset({VERR_PERMISSION_DENIED, VERR_ACCESS_DENIED})
"""Statuses meaning "the driver keeps the heartbeat" (mainline's EPERM arrives as the first)."""
HOST_LACKS: Final = frozenset({VERR_NOT_IMPLEMENTED, VERR_NOT_SUPPORTED})
"""Statuses meaning "this host has no heartbeat check"."""


class HeartbeatSection(ServiceSection):
    """``[heartbeat]``: the guest heartbeat, where the driver leaves it to userspace."""

    late_after_s: float = Field(default=0.05, gt=0, le=MAX_LATE_AFTER_S)
    """A beat sent more than this many seconds after its deadline is late: counted, and the
    first of a run of late beats is logged (``tick_late``)."""


class Owner(Enum):
    """Who keeps the heartbeat."""

    UNKNOWN = "unknown"
    AGENT = "agent"
    DRIVER = "driver"
    NONE = "none"


@record
class HeartbeatStatistics:
    """The heartbeat as the service keeps it.

    Attributes:
        owner: ``agent`` (beating), ``driver`` (the kernel keeps it), ``none`` (the host
            has no heartbeat), ``unknown`` (before the first configure).
        configures: successful HEARTBEAT_CONFIGURE (on) requests.
        failures: beats the host refused or answered with a malformed reply.
        rhythm: the metronome's counters (beats are its ticks).
        malformed_configures: configures whose reply was malformed, each leaving the
            heartbeat off until the next restore.
        refused_configures: configures the host refused (with a status that does not mean
            "not ours"), each tried again on a back-off and at the next restore.
    """

    owner: str
    configures: int
    failures: int
    rhythm: MetronomeStatistics
    malformed_configures: int = 0
    refused_configures: int = 0


class _NotOursError(Exception):
    """The first configure showed that the agent does not keep the heartbeat."""

    def __init__(self, owner: Owner, status: str) -> None:
        super().__init__(status)
        self.owner = owner
        self.status = status


@final
class HeartbeatService:
    """Configures the host's heartbeat check and beats on its interval."""

    name: Final = NAME

    def __init__(self, context: ServiceContext, section: HeartbeatSection) -> None:
        self._device: Device = context.device
        self._pump: EventPump = context.pump
        self._status_changed = context.status_changed
        self._metronome = Metronome(self._configure, self._beat, late_after_s=section.late_after_s)
        self._owner = Owner.UNKNOWN
        self._host_check_on = False
        self._configures = 0
        self._malformed_configures = 0
        self._refused_configures = 0
        self._not_armed = LastingFailure("heartbeat_armed_again")
        """Configures refused or answered with a malformed reply: no beats meanwhile."""
        self._retry_at = math.inf
        """When a refused configure is tried again (inf: at the next restore only)."""
        self._failures = LastingFailure("heartbeat_recovered")

    def statistics(self) -> HeartbeatStatistics:
        """Return who keeps the heartbeat and the beat counters."""
        return HeartbeatStatistics(
            self._owner.value,
            self._configures,
            self._failures.total,
            self._metronome.statistics(),
            self._malformed_configures,
            self._refused_configures,
        )

    def status(self) -> str:
        """``heartbeat 2000 ms``, ``heartbeat 2000 ms (failing: VERR_...)``, ``heartbeat
        (kernel)``, ``heartbeat unsupported by the host``, ``heartbeat not armed (malformed
        reply)``, ``heartbeat not armed (VERR_...)``..."""
        if self._owner is Owner.DRIVER:  # the service has given up, whatever was refused before
            return "heartbeat (kernel)"
        if self._owner is Owner.NONE:
            return "heartbeat unsupported by the host"
        if (cause := self._not_armed.cause) is not None:
            return f"heartbeat not armed ({cause})"
        interval = self._metronome.interval_s
        if self._owner is Owner.AGENT and interval is not None:
            failing = self._failures.cause
            rhythm = f"heartbeat {round(interval * MS_PER_S)} ms"
            return rhythm if failing is None else f"{rhythm} (failing: {failing})"
        return "heartbeat setting up"

    def reconfigure(self, section: HeartbeatSection) -> bool:
        """Apply a new late threshold at once."""
        self._metronome.late_after_s = section.late_after_s
        return True

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Configure the host's check and beat; configure again after every restore."""
        try:
            with self._pump.subscribe(self.name, Event.RESTORED) as events:
                wakeups = RetryWakeups(events, lambda: self._retry_at)
                await self._metronome.run(wakeups, task_status=task_status)
        except _NotOursError as exc:
            self._owner = exc.owner
            self._status_changed()
            if exc.owner is Owner.DRIVER:
                log.info("heartbeat_kept_by_driver", refused_with=exc.status)
            else:
                log.warning("heartbeat_not_supported_by_host", status=exc.status)
        if not self._metronome.ready:  # refused at the first configure, not at a retry
            task_status.started()
        await trio.sleep_forever()

    async def drain(self) -> None:
        """Switch the host's check off if this service may have switched it on."""
        if not self._host_check_on:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._device.request(HeartbeatConfigure(enabled=False))
        except HOST_ERRORS as exc:
            log.warning("heartbeat_disable_failed", error=str(exc))
            return
        self._host_check_on = False
        log.info("heartbeat_stopped")

    async def _configure(self) -> float | None:
        """Switch the check off and on again; return the host's interval in seconds, or None
        (no beats) if the host refused (until a retry or the next restore) or a reply was
        malformed (until the next restore)."""
        # Possibly on from the first request, not from the last answer: a stop during the
        # start cancels the wait for an answer the host may already have acted on.
        was_on, self._host_check_on = self._host_check_on, True
        switched_off = False
        try:
            await self._device.request(HeartbeatConfigure(enabled=False))
            switched_off = True
            settings = await self._device.request(HeartbeatConfigure(enabled=True))
        except VBoxStatusError as exc:
            self._host_check_on = was_on and not switched_off  # a refusal switched nothing on
            self._raise_if_not_ours(exc.rc, exc.name)
            self._refused(exc)
            return None
        except RemoteProtocolError as exc:
            await self._leave_off(exc)
            return None
        self._owner = Owner.AGENT
        self._not_armed.succeeded()
        self._retry_at = math.inf
        self._configures += 1
        interval_s = settings.interval_ns / NS_PER_S
        log.info("heartbeat_configured", interval_ms=settings.interval_ns / NS_PER_MS)
        self._status_changed()
        return interval_s

    def _refused(self, error: VBoxStatusError) -> None:
        """The host refused a configure: say so (once while the status lasts) and try again
        after a back-off, or at the next restore if that comes first."""
        self._owner = Owner.AGENT  # the driver let the request through
        self._refused_configures += 1
        if self._not_armed.host_failed("heartbeat_not_armed", error, until="a retry or a restore"):
            self._status_changed()
        self._retry_at = trio.current_time() + self._not_armed.retry_in()

    async def _leave_off(self, error: RemoteProtocolError) -> None:
        """A configure's reply was malformed: say so, and switch the check off again (the
        host may have switched it on) rather than beat on what the reply says."""
        self._owner = Owner.AGENT  # the driver let the request through
        self._malformed_configures += 1
        self._retry_at = math.inf
        if self._not_armed.host_failed("heartbeat_not_armed", error, until="the next restore"):
            self._status_changed()
        try:
            await self._device.request(HeartbeatConfigure(enabled=False))
        except HOST_ERRORS as exc:  # the drain tries again
            log.warning("heartbeat_disable_failed", error=str(exc))
            return
        self._host_check_on = False

    def _raise_if_not_ours(self, rc: int, status: str) -> None:
        """Before the first success, a refusal means the driver (or no host) keeps it."""
        if self._configures:
            return
        if rc in DRIVER_REFUSALS:
            raise _NotOursError(Owner.DRIVER, status)
        if rc in HOST_LACKS:
            raise _NotOursError(Owner.NONE, status)

    async def _beat(self) -> None:
        try:
            await self._device.request(GuestHeartbeat())
        except HOST_ERRORS as exc:
            if self._failures.host_failed("heartbeat_failed", exc):
                self._status_changed()
            return
        if self._failures.succeeded():
            self._status_changed()


def _build(context: ServiceContext, section: HeartbeatSection) -> HeartbeatService:
    return HeartbeatService(context, section)


SPEC: Final = ServiceSpec(NAME, HeartbeatSection, _build)
