"""``cpuhotplug``: brings the CPUs the host plugs online and gives up the ones it unplugs,
as VBoxService's cpuhotplug does.

The host tells the guest about a CPU only while the guest monitors hot-plug
(SET_CPU_HOTPLUG_STATUS Enable); until then VMMDev drops the notification
(VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST): ``VBoxManage controlvm plugcpu`` still
attaches the CPU, which stays offline in the guest, and ``unplugcpu`` fails with
VERR_RESOURCE_BUSY, the CPU maybe still in use (Main's ``Console::i_doCPUAdd`` and
``i_doCPURemove``). The service enables monitoring at start
and again after every restore (the host forgets it: it is not in the saved state, which
VBoxService never accounts for), then sleeps until CPU_HOTPLUG, and takes the host's events
(GET_CPU_HOTPLUG_REQ) until it has none:

- **plug** (the host's core and package ids): an offline CPU has no topology to match, so an
  offline CPU is brought online (``cpuN/online`` = 1) and its ids read; one that is not the
  host's goes offline again (an admin's choice is kept; VBoxService onlines the first
  offline CPU unchecked) and the next is tried. An online CPU that already has the ids is
  the plugged one. The kernel may add the CPU's directory a little after the event, so, as
  VBoxService, the service looks ``PLUG_TRIES`` times, ``PLUG_RETRY_S`` apart, until a CPU
  comes online with the ids; the CPUs that were offline when monitoring started (an
  admin's) are tried only at the last look, when no new CPU appeared (none refused to come
  online), and one of them that refuses to go offline again is a warning of its own;
- **unplug**: the online CPU whose topology has the ids goes offline (``online`` = 0), then
  is ejected through its ACPI device (``firmware_node/eject`` = 1), which lets the host take
  it away. VBoxService only writes the eject (the kernel offlines the CPU itself); the agent
  first checks that the eject is there and writable and offlines the CPU itself, so that a
  CPU the kernel will not give up (the last one, cpu0 without an ``online`` file) is one
  clear line, and brings it back online if the eject write fails.

Each action is one log line with the host's ids and the CPU; a request nobody can carry out
(an unknown core, a CPU that stays) is one warning line and the service goes on; events of
a type the agent does not know are counted, and logged when a run of them begins and
ends (VBoxService logs the first ten). A host or driver that refuses monitoring (a host
without the requests, ``/dev/vboxuser``) or answers the Enable with a malformed reply is one
warning and said in the status; the service then waits for a restore without polling. Any
other refusal of the Enable (VERR_GENERAL_FAILURE, say) is said the same way and tried again
on a back-off (:meth:`LastingFailure.retry_in`) and at a restore: VBoxService's worker ends
on a failed Enable while its other services run on, and the agent's run on too, whatever
this one meets. A read of the host's request that fails (a status, a malformed reply) is
counted (the status says how many failed, a simulated host's too) and logged when such
failures begin or change cause, and the service goes on with the host's next event. A stop
disables monitoring. Config section: ``[cpuhotplug]`` (``sysfs_root``: where the CPUs are).
A root whose CPU directory cannot be read is one warning naming the setting at start and at
a reload, and the status says it; each request then fails with a line naming the directory
and the reason, and the service goes on. A file there that is no regular file (a FIFO,
whose open would block the daemon) is one warning naming it, and counts as missing.
"""

from __future__ import annotations

import errno
import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn, TypeVar, final

import structlog
import trio
from pydantic import field_validator

from agent.protocol import (
    HOST_ERRORS,
    CpuEventType,
    CpuStatusType,
    Event,
    GetCpuHotPlugRequest,
    RemoteProtocolError,
    SetCpuHotPlugStatus,
    VBoxStatusError,
)
from agent.protocol.status import STATUS_CODES
from agent.records import record
from agent.services._base import ServiceContext, ServiceSection, ServiceSpec
from agent.services._cpu_sysfs import DEFAULT_SYSFS_ROOT, CpuChange, CpuSysfs, PassedOver
from agent.services._lasting import RETRY_MAX_S, LastingFailure

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.device import Device
    from agent.protocol import CpuHotPlugEvent
    from agent.services.event_pump import EventPump

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

NAME: Final = "cpuhotplug"
PLUG_TRIES: Final = 6
"""Looks for an offline CPU after a plug event, as VBoxService (one and five more)."""
PLUG_RETRY_S: Final = 0.1
"""The wait between two looks, as VBoxService."""
MAX_REQUESTS_PER_WAKEUP: Final = 16
"""Host events taken at one wake-up before one more read decides: the host has one slot, so
two reads normally do (the event, then NONE); if that extra read still has an event, it is
taken too and the host reported as unending (not followed further until it wakes us)."""
UNAVAILABLE: Final = frozenset(
    STATUS_CODES[name]
    for name in (
        "VERR_NOT_IMPLEMENTED",
        "VERR_NOT_SUPPORTED",
        "VERR_PERMISSION_DENIED",
        "VERR_ACCESS_DENIED",
    )
)
"""Refusals of SET_CPU_HOTPLUG_STATUS that asking again will not change before a restore."""
AUTO: Final = "auto"
"""``sysfs_root``'s default: the machine's ``/sys`` on a real device, none on a simulated host."""
_REQUEST_NAMES: Final[dict[int, str]] = {CpuEventType.PLUG: "plug", CpuEventType.UNPLUG: "unplug"}


class CpuHotPlugSection(ServiceSection):
    """``[cpuhotplug]``: on, as in VBoxService; where the guest's CPUs are."""

    sysfs_root: str = AUTO
    """The sysfs mount whose CPUs the service changes. ``auto``: ``/sys`` on a real device,
    and none on a simulated host (the host's requests are logged, this machine's CPUs are
    left as they are); a path (a scratch tree, or ``/sys`` on purpose) has them changed."""

    @field_validator("sysfs_root")
    @classmethod
    def _check_sysfs_root(cls, value: str) -> str:
        if value != AUTO and (not value.startswith("/") or "\0" in value):
            msg = f"must be {AUTO!r} or an absolute path (without NUL) such as /sys"
            raise ValueError(msg)
        return value


@record
class CpuHotPlugStatistics:
    """What the service did.

    Attributes:
        monitoring: whether the host was last told to send CPU hot-plug events.
        events: host events taken (plug, unplug or of an unknown type).
        plugged: CPUs brought online (or found online) for a plug.
        unplugged: CPUs taken offline and ejected for an unplug.
        failures: events not carried out, and host requests that failed (a status, a
            malformed reply).
        left_alone: events of a simulated host, whose CPUs are this machine's (no sysfs).
    """

    monitoring: bool
    events: int
    plugged: int
    unplugged: int
    failures: int
    left_alone: int = 0


@final
class CpuHotPlugService:
    """Follows the host's CPU plug and unplug requests."""

    name: Final = NAME

    def __init__(self, context: ServiceContext, sysfs: CpuSysfs | None) -> None:
        """``sysfs``: where the CPUs are changed; None leaves every CPU alone (a simulated
        host with ``sysfs_root = "auto"``)."""
        self._device: Device = context.device
        self._pump: EventPump = context.pump
        self._status_changed = context.status_changed
        self._sysfs = sysfs
        self._limiter = trio.CapacityLimiter(1)
        self._monitoring = False
        self._host_may_monitor = False
        """An Enable was sent (answered or not) and no Disable went through since."""
        self._refusals = LastingFailure("cpu_hotplug_available_again")
        """Enables refused or answered with a malformed reply (not counted as failures)."""
        self._retry_at = math.inf
        """When a refused Enable is tried again (inf: at a restore only)."""
        self._unreadable: str | None = None
        """The sysfs problem last warned about (said once, not at every restore)."""
        self._events = self._plugged = self._unplugged = self._failures = self._left_alone = 0
        self._reads = LastingFailure("cpu_hotplug_requests_read_again")
        """Failed reads of the host's requests (counted apart from ``_failures``)."""
        self._unknown = LastingFailure("cpu_hotplug_events_known_again")
        """Host events of an unknown type (counted apart from ``_failures``)."""

    def statistics(self) -> CpuHotPlugStatistics:
        """Return the counters."""
        return CpuHotPlugStatistics(
            self._monitoring,
            self._events,
            self._plugged,
            self._unplugged,
            self._failed(),
            self._left_alone,
        )

    def status(self) -> str:
        """``cpuhotplug: 1 plugged, 0 unplugged``, why the host sends no events, or why the
        CPUs cannot be changed; ``, 2 failed`` once anything failed (a read of the host's
        request, an event not carried out), a simulated host's too."""
        if (refusal := self._refusals.cause) is not None:
            return f"cpuhotplug: not available ({refusal})"
        if not self._monitoring:
            return "cpuhotplug setting up"
        failures = self._failed()
        failed = f", {failures} failed" if failures else ""
        if self._sysfs is None:
            left_alone = f"{self._left_alone} requests, CPUs left alone"
            return f"cpuhotplug: simulated host, {left_alone}{failed}"
        if (unreadable := self._sysfs.unreadable()) is not None:
            return f"cpuhotplug: CPUs unreadable ({unreadable})"
        return f"cpuhotplug: {self._plugged} plugged, {self._unplugged} unplugged{failed}"

    def _failed(self) -> int:
        return self._failures + self._reads.total + self._unknown.total

    def reconfigure(self, section: CpuHotPlugSection) -> bool:
        """Apply a new ``sysfs_root`` at once (from the next host event on), remembering its
        offline CPUs as monitoring does (and warning if they cannot be read)."""
        self._sysfs = cpu_sysfs(section, self._device)
        self._unreadable = None
        if self._sysfs is not None:
            self._remember(self._sysfs)
        self._status_changed()
        return True

    async def drain(self) -> None:
        """Stop the host's events (Disable), so Main knows nobody follows them any more.

        Sent whenever an Enable was sent, answered or not (a stop during the start cancels
        the wait for an answer the host may already have acted on), as VBoxService's
        ``VbglR3CpuHotPlugTerm`` always disables."""
        if not self._host_may_monitor:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._device.request(SetCpuHotPlugStatus(CpuStatusType.DISABLE))
        except HOST_ERRORS as exc:
            log.warning("cpu_hotplug_disable_failed", error=str(exc))
            return
        self._monitoring = self._host_may_monitor = False
        log.info("cpu_hotplug_monitoring_stopped")

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Enable monitoring, then follow the host's events; enable again after a restore,
        and when a refused Enable's retry is due."""
        with self._pump.subscribe(self.name, Event.CPU_HOTPLUG | Event.RESTORED) as events:
            await self._enable(restored=False)
            task_status.started()
            await self._take_events()
            while True:
                bits = 0
                with trio.move_on_at(self._retry_at):  # a cancelled receive keeps the bits
                    bits = await events.receive()
                if not bits or bits & Event.RESTORED:
                    await self._enable(restored=bool(bits & Event.RESTORED))
                await self._take_events()

    async def _enable(self, *, restored: bool) -> None:
        """SET_CPU_HOTPLUG_STATUS Enable; a refusal is said once and waited out.

        The CPUs offline before the host can plug any are remembered first (see
        :meth:`CpuSysfs.remember`: reads of small attributes, which do not block)."""
        if self._sysfs is not None:
            self._remember(self._sysfs)
        had_enabled, self._host_may_monitor = self._host_may_monitor, True
        try:
            await self._device.request(SetCpuHotPlugStatus(CpuStatusType.ENABLE))
        except HOST_ERRORS as exc:
            if isinstance(exc, VBoxStatusError):
                self._host_may_monitor = had_enabled  # this Enable switched nothing on
            self._unavailable(exc, restored=restored)
        else:
            cpus = "left alone (simulated host)" if self._sysfs is None else str(self._sysfs.cpus)
            log.info("cpu_hotplug_monitoring", restored=restored, cpus=cpus)
            self._refusals.succeeded()
            self._monitoring, self._retry_at = True, math.inf
        self._status_changed()

    def _unavailable(self, error: VBoxStatusError | RemoteProtocolError, *, restored: bool) -> None:
        """Monitoring is off: said once while the cause stays the same. A status of
        :data:`UNAVAILABLE` or a malformed reply is waited out until a restore; any other
        status is tried again on a back-off too."""
        lasting = not isinstance(error, VBoxStatusError) or error.rc in UNAVAILABLE
        until = "a restore" if lasting else f"a restore, or a retry within {RETRY_MAX_S:g} s"
        self._refusals.host_failed("cpu_hotplug_unavailable", error, restored=restored, until=until)
        self._monitoring = False
        self._retry_at = math.inf if lasting else trio.current_time() + self._refusals.retry_in()

    def _remember(self, sysfs: CpuSysfs) -> None:
        """Remember the offline CPUs; one warning naming the setting when they cannot be
        read (not again while the same problem lasts: a restore checks again)."""
        error = sysfs.remember()
        unreadable = sysfs.unreadable()
        if error is not None and unreadable != self._unreadable:
            log.warning(
                "cpu_sysfs_unreadable",
                setting="[cpuhotplug] sysfs_root",
                sysfs_root=str(sysfs.root),
                errno=None if error.errno is None else errno.errorcode.get(error.errno),
                reason=unreadable,
                outcome="the host's CPU plug and unplug requests fail until it can be read",
            )
        self._unreadable = unreadable

    async def _take_events(self) -> None:
        """Take the host's events until it has none (bounded), acting on each."""
        if not self._monitoring:
            return
        for _ in range(MAX_REQUESTS_PER_WAKEUP + 1):
            try:
                event = await self._device.request(GetCpuHotPlugRequest())
            except HOST_ERRORS as exc:
                self._reads.host_failed("cpu_hotplug_request_failed", exc)
                self._status_changed()
                return
            self._reads.succeeded()
            if not event.pending:
                return
            self._events += 1
            await self._act(event)
        self._fail("cpu_hotplug_events_unending", taken=MAX_REQUESTS_PER_WAKEUP + 1)

    async def _act(self, event: CpuHotPlugEvent) -> None:
        ids = {"core": event.core, "package": event.package}
        sysfs = self._sysfs
        if sysfs is None:
            self._left_alone += 1
            log.info(
                "cpu_change_left_alone",
                request=_REQUEST_NAMES.get(event.event_type, event.event_type),
                reason="simulated host: this machine's CPUs stay as they are "
                "(set [cpuhotplug] sysfs_root to change the CPUs of a tree)",
                **ids,
            )
        elif event.event_type == CpuEventType.PLUG:
            self._unknown.succeeded()
            await self._plug(sysfs, event.core, event.package)
        elif event.event_type == CpuEventType.UNPLUG:
            self._unknown.succeeded()
            change = await self._in_thread(
                functools.partial(sysfs.take_offline, event.core, event.package)
            )
            if change.problem is None:
                self._unplugged += 1
                log.info("cpu_unplugged", cpu=change.cpu, **ids)
            else:
                self._fail("cpu_unplug_failed", cpu=change.cpu, problem=change.problem, **ids)
        else:
            self._unknown.failed(
                "cpu_hotplug_event_unknown",
                str(event.event_type),
                event_type=event.event_type,
                **ids,
            )
        self._status_changed()

    async def _plug(self, sysfs: CpuSysfs, core: int, package: int) -> None:
        """Bring the plugged CPU online and log the outcome (one line, and one warning per
        CPU passed over that stays online)."""
        ids = {"core": core, "package": package}
        checked: dict[str, PassedOver] = {}
        change = await self._look(sysfs, core, package, checked)
        passed = {"passed_over": [p.text for p in checked.values()]} if checked else {}
        if change.problem is None:
            self._plugged += 1
            log.info("cpu_plugged", cpu=change.cpu, **ids, **passed)
        else:
            self._fail("cpu_plug_failed", cpu=change.cpu, problem=change.problem, **ids, **passed)
        for name, passed_over in checked.items():
            if passed_over.online:
                log.warning(
                    "cpu_passed_over_stays_online", cpu=name, problem=passed_over.text, **ids
                )

    async def _look(
        self, sysfs: CpuSysfs, core: int, package: int, checked: dict[str, PassedOver]
    ) -> CpuChange:
        """Look ``PLUG_TRIES`` times until a CPU is online with the ids, the CPUs offline
        since monitoring started only at the last look; ``checked`` gathers the offline
        CPUs found to be others (each looked at once)."""
        change: CpuChange | None = None
        for attempt in range(PLUG_TRIES):
            if attempt:
                await trio.sleep(PLUG_RETRY_S)
            last = attempt == PLUG_TRIES - 1
            change = await self._in_thread(
                functools.partial(sysfs.bring_online, core, package, checked, settled=last)
            )
            if change is not None and change.problem is None:
                return change
        if change is not None:
            return change
        if checked:
            tried = f"{len(checked)} offline CPU{'s' if len(checked) > 1 else ''} tried"
            return CpuChange(None, f"core {core} package {package} not found among {tried}")
        return CpuChange(None, f"no offline CPU appeared within {PLUG_TRIES} looks")

    async def _in_thread(self, work: Callable[[], _T]) -> _T:
        """Run sysfs work on a worker thread: a CPU going offline may keep a write busy.

        A stop does not wait for it: the kernel finishes the write whoever waits.
        """
        return await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)

    def _fail(self, event: str, **details: object) -> None:
        self._failures += 1
        log.warning(event, **details)
        self._status_changed()


def cpu_sysfs(section: CpuHotPlugSection, device: Device) -> CpuSysfs | None:
    """The CPUs ``section`` names; ``auto``: ``/sys`` unless ``device`` is a simulated host,
    whose requests must not change this machine's CPUs (None)."""
    if section.sysfs_root != AUTO:
        return CpuSysfs(Path(section.sysfs_root))
    return None if device.simulated else CpuSysfs(Path(DEFAULT_SYSFS_ROOT))


def cpuhotplug_service(context: ServiceContext, section: CpuHotPlugSection) -> CpuHotPlugService:
    """The service on the CPUs the section names (see :func:`cpu_sysfs`)."""
    return CpuHotPlugService(context, cpu_sysfs(section, context.device))


SPEC: Final = ServiceSpec(NAME, CpuHotPlugSection, cpuhotplug_service)
