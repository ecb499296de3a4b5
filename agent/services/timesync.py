"""``timesync``: keeps the guest's wall clock on the host's, as VBoxService's timesync does.

Every ``interval_s`` (10 s) the service reads the host's clock (``GET_HOST_TIME``, UTC in
ms) between two readings of the guest's, and works out the drift:

- a reading that took ``max_latency_ms`` or more (timed on the monotonic clock) says
  nothing; it is retried after a second, three tries in all, then the pass is given up;
- a drift within ``max(min_adjust_ms, latency_factor x latency)`` is left alone (one more
  ``min_adjust_ms`` when the guest is ahead, against moving time backwards);
- beyond that, the clock is slewed (``adjtime``: gradual, at most 0.5 ms a second, never
  backwards; every pass hands the kernel the drift then left) or, over ``set_threshold_s``
  or when the kernel refuses the slew, stepped (``clock_settime``);
- after a restore (the RESTORED event, at once, where VBoxService waits for its next pass)
  the threshold is 0: a saved VM comes back hours behind, and is stepped. VBoxService tells
  a restore by the VM session id (a new one at every restore), and so does the service: a
  RESTORED whose read finds the id the run read last is no restore since (the host keeps
  the event of a restore while no session's filter admits it, so one from before the
  agent's start comes after the run's first read, which already took that id); a run that
  (re)starts reads the id too (before each pass until a read goes through), so a restore
  while no run listened for the event (a restart's back-off, a reload that rebuilt the
  service) is stepped all the same (``ServiceContext.sessions`` keeps the id each service
  last acted on);
- ``set_on_start`` steps at the first reading, whatever the drift.

Where VBoxService knows nothing of other time daemons, the agent does not fight one: while
the kernel says a daemon keeps the clock synchronised (``defer_to_ntp``), slewing is left to
it and the agent only steps (after a restore, at ``set_on_start``'s first reading, and once
over the threshold); a slew of the agent's the kernel may still be making up when the
daemon takes over is cancelled (``adjtime`` 0), as it would go on moving the clock under the
daemon for up to hours. A step makes the kernel say "unsynchronised" until the daemon's next
update, so after one the daemon is given up to ``DAEMON_RESYNC_GRACE_S`` to come back before
it is taken for gone. A drift back over the threshold once the daemon updated after the
agent's step over it means the host's clock and the daemon's time source disagree (a host
whose own clock is off NTP time, say): the agent would step at every pass after each of the
daemon's corrections, so it says so once (``host_clock_disagrees_with_time_daemon``, with
the drift) and leaves the clock to the daemon until a drift within the minimum, on a pass
after the one that found the daemon's update, shows them agreeing (one line), or the daemon
is gone. A drift only within the threshold is no agreement: chronyd slews the agent's step
back (83 ms a second at most), for hours. A restore that arrives during a pass makes the
pass read again, as a restore.

The host's tuning of VBoxService applies too (``host_options``, see
:mod:`agent.services._host_options`): its ``--timesync-*`` options and the global
``--interval`` (seconds; the interval where no ``--timesync-interval`` is set), over the
config's values. They are read at start, before the first pass, and again after every
restore's pass, which steps with the options in force: the property service may be slow to
answer (an HGCM connect the host holds), and a clock hours behind does not wait for it
(VBoxService reads them once, at start).

Correcting needs ``CAP_SYS_TIME``; without it the service says so once and goes on
measuring. A host without the clock request (``VERR_NOT_SUPPORTED``) or with a broken answer
(a time before 1980 or after 2200 included: ``MIN_HOST_TIME_MS``, ``MAX_HOST_TIME_MS``) is
reported the same way and asked again every interval. Each state (slewing, left to a time
daemon, a problem) is logged when it begins and ends, not at every pass. Nothing is held, so
a stop gives nothing back. Config section: ``[timesync]``.
"""

from __future__ import annotations

import errno
from enum import Enum
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio
from pydantic import Field

from agent.protocol import (
    HOST_ERRORS,
    Event,
    GetHostTime,
    GetSessionId,
    RemoteProtocolError,
    VBoxStatusError,
)
from agent.records import record
from agent.services._base import ServiceContext, ServiceSpec
from agent.services._host_options import (
    MAX_INTERVAL_MS,
    MAX_SET_THRESHOLD_MS,
    MIN_INTERVAL_MS,
    TIMESYNC_OPTIONS,
    HostSettings,
    HostTunedSection,
)
from agent.services._lasting import LastingFailure
from agent.services._publishing import IntervalPause
from agent.services._wallclock import KERNEL_SLEW_NS_PER_S, AgentOwnClock, SystemClock
from agent.units import MS_PER_S, NS_PER_MS, NS_PER_S

if TYPE_CHECKING:
    from agent.device import Device
    from agent.services._wallclock import WallClock
    from agent.services.event_pump import EventPump, Subscription

log = structlog.get_logger(__name__)

NAME: Final = "timesync"
READING_TRIES: Final = 3
"""Readings of one pass before it is given up for latency, as VBoxService."""
RETRY_AFTER_HIGH_LATENCY_S: Final = 1.0
"""The wait before another reading when one took too long, as VBoxService."""
MAX_SET_THRESHOLD_S: Final = MAX_SET_THRESHOLD_MS // MS_PER_S
"""VBoxService's bound on ``--timesync-set-threshold``: a week."""
MIN_INTERVAL_S: Final = MIN_INTERVAL_MS / MS_PER_S
MAX_INTERVAL_S: Final = MAX_INTERVAL_MS / MS_PER_S
"""VBoxService's bounds on ``--timesync-interval``: 0.05 s to 4294967.294 s (49.7 days)."""
OVER_THRESHOLD: Final = "over set_threshold_s"
"""The reason of a step for a drift over ``set_threshold_s``."""
NOT_PERMITTED: Final = "not permitted to set the clock (needs CAP_SYS_TIME)"
MAX_HOST_TIME_MS: Final = 7_258_118_400_000
"""2200-01-01: later than any real host, earlier than the kernel's limit for the clock
(about 2232 on 64-bit Linux); a later answer is a bad reply."""
MIN_HOST_TIME_MS: Final = 315_532_800_000
"""1980-01-01, where DOS and FAT time begins: earlier than any date a PC guest is set to,
and above the answers of a broken host (0, a count of seconds read as ms, ten years of
uptime in ms); an earlier answer is a bad reply. A VM its host dates back
(``--biossystemtimeoffset``, which moves the UTC the host answers with) stays well above it.
It is a fixed floor, not the guest's boot time (``CLOCK_REALTIME`` - ``CLOCK_BOOTTIME``):
that moves with the very clock being corrected, so a guest set years ahead would take the
host's right time for one before its boot and keep its wrong one. (Linux itself refuses a
wall time below ``CLOCK_MONOTONIC``'s reading, ``EINVAL``.)"""
DAEMON_RESYNC_GRACE_S: Final = 2048.0
"""After the agent steps the clock, the kernel says "unsynchronised" until the time daemon
updates it again, at the daemon's next poll: at most 2048 s (systemd-timesyncd's longest;
chrony's and ntpd's is 1024 s). Until then the daemon is not taken for gone."""


class TimesyncSection(HostTunedSection):
    """``[timesync]``: the guest's clock kept on the host's (VBoxService's defaults)."""

    interval_s: float = Field(default=10.0, ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S)
    """Seconds between two readings of the host's clock, within VBoxService's bounds (50 ms
    to UINT32_MAX - 1 ms), so the host's ``--timesync-interval`` is taken as VBoxService
    takes it."""
    min_adjust_ms: int = Field(default=100, ge=0, le=3_600_000)
    """The smallest drift ever corrected."""
    latency_factor: int = Field(default=8, ge=1, le=1024)
    """A drift within this many times the reading's latency is left alone."""
    max_latency_ms: int = Field(default=250, ge=1, le=3_600_000)
    """A reading that takes this long is worthless and retried."""
    set_threshold_s: float = Field(default=1200.0, ge=0, le=MAX_SET_THRESHOLD_S)
    """Over this drift the clock is stepped instead of slewed."""
    set_on_start: bool = False
    """Step the clock at the first reading, whatever the drift."""
    set_on_restore: bool = True
    """After a restore, step any drift over the minimum at once."""
    defer_to_ntp: bool = True
    """Leave small drifts to a time daemon that keeps the clock synchronised, and a drift
    over ``set_threshold_s`` that comes back after the agent's step and the daemon's update
    (the host's clock disagreeing with the daemon's time source), until a drift within the
    minimum after the daemon's update shows them agreeing."""
    host_options: bool = True
    """Apply VBoxService's ``--timesync-*`` and ``--interval`` options the host sets as
    guest properties, over this section's values; false: this section wins."""


class Correction(Enum):
    """What one reading calls for."""

    NONE = "none"
    SLEW = "slew"
    STEP = "step"


@record
class Reading:
    """The host's clock against the guest's: drift (host - guest) and how long it took."""

    drift_ns: int
    latency_ns: int


@record
class Plan:
    """The correction a reading calls for, and why (for the log line)."""

    correction: Correction
    reason: str


def plan_correction(
    reading: Reading, section: TimesyncSection, *, set_now: bool, restored: bool
) -> Plan:
    """Decide as VBoxService's timesync does (``set_now``: set-on-start's first reading)."""
    min_adjust_ns = section.min_adjust_ms * NS_PER_MS
    threshold_ns = max(reading.latency_ns * section.latency_factor, min_adjust_ns)
    if reading.drift_ns < 0:  # the guest is ahead: a correction would move time backwards
        threshold_ns += min_adjust_ns
    drift = abs(reading.drift_ns)
    if set_now:
        return Plan(Correction.STEP, "set_on_start")
    if drift <= threshold_ns:
        return Plan(Correction.NONE, "within the minimum")
    if restored and section.set_on_restore:
        return Plan(Correction.STEP, "restored")
    if drift > section.set_threshold_s * NS_PER_S:
        return Plan(Correction.STEP, OVER_THRESHOLD)
    return Plan(Correction.SLEW, "over the minimum")


@record
class TimesyncStatistics:
    """What the service did.

    Attributes:
        passes: readings that were used.
        discarded: passes given up because every reading took too long.
        slews: drifts handed to the kernel to make up gradually (``adjtime`` calls).
        steps: times the clock was set.
        left_to_ntp: drifts left to a time daemon (``defer_to_ntp``).
        failures: host readings and corrections that failed.
        last_drift_ms: the drift of the last used reading (host - guest), None before one.
    """

    passes: int
    discarded: int
    slews: int
    steps: int
    left_to_ntp: int
    failures: int
    last_drift_ms: float | None


@final
class TimesyncService:
    """Reads the host's clock every ``interval_s`` and after a restore; corrects the guest's."""

    name: Final = NAME

    def __init__(self, context: ServiceContext, section: TimesyncSection, clock: WallClock) -> None:
        self._device: Device = context.device
        self._pump: EventPump = context.pump
        self._status_changed = context.status_changed
        self._sessions = context.sessions
        self._session_id: int | None = None
        """The VM session id last read, None if that read failed; noted in ``sessions`` by the
        pass that follows."""
        self._session_reads = LastingFailure("vm_session_read_again")
        self._configured = section
        self._section = section
        self._host_settings: HostSettings[TimesyncSection] = HostSettings(TIMESYNC_OPTIONS)
        self._clock = clock
        self._pause = IntervalPause(section.interval_s)
        self._set_pending = False
        self._restore_pending = False
        self._options_due = False
        """Whether a restore's pass left the host's options to read."""
        self._options_read = False
        self._host_problem: str | None = None
        self._clock_problem: str | None = None
        self._left_to_ntp = False
        self._slewing = False
        self._discarding = False
        self._daemon_resync_by: float | None = None
        self._threshold_stepped = False
        """The agent stepped over the threshold while a time daemon kept the clock, and the
        two have not agreed since: the next such drift is the daemon's to keep."""
        self._disagreeing = False
        self._slew_done_by: float | None = None
        """When the kernel will have made up the agent's last slew (trio's clock), if a
        step has not dropped it since."""
        self._passes = self._discarded = self._slews = self._steps = 0
        self._left = self._failures = 0
        self._last_drift_ms: float | None = None

    def statistics(self) -> TimesyncStatistics:
        """Return the counters."""
        return TimesyncStatistics(
            self._passes,
            self._discarded,
            self._slews,
            self._steps,
            self._left,
            self._failures + self._session_reads.total,
            self._last_drift_ms,
        )

    def status(self) -> str:
        """``timesync ok``, ``timesync setting up`` (before its first reading), who keeps the
        clock, or what is wrong."""
        problem = self._host_problem or self._clock_problem
        if problem is not None:
            return f"timesync: {problem}"
        if self._disagreeing:
            return "timesync: a time daemon keeps the clock; the host's disagrees"
        if self._left_to_ntp:
            return "timesync: a time daemon keeps the clock"
        return "timesync ok" if self._passes else "timesync setting up"

    def reconfigure(self, section: TimesyncSection) -> bool:
        """Apply the settings at once (a new interval also to the wait under way), the host's
        options still over them. Switching ``host_options`` needs a restart (it reads them),
        and so does ``set_on_start``: it is about a run's first reading, read once as the run
        begins, so the rebuilt service is the one it applies to. ``defer_to_ntp`` turned off
        takes the clock back from a time daemon at once (one line)."""
        restart_only = ("host_options", "set_on_start")
        if any(getattr(section, key) != getattr(self._configured, key) for key in restart_only):
            return False
        self._configured = section
        self._apply_settings()
        if self._left_to_ntp and not self._section.defer_to_ntp:
            log.info("clock_taken_from_time_daemon", reason="defer_to_ntp off")
            self._left_to_ntp = False
            self._forget_disagreement()
            self._status_changed()
        return True

    async def drain(self) -> None:
        """Nothing to give back: a slew under way is the kernel's to finish."""
        await trio.lowlevel.checkpoint()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Read and correct, then again every ``interval_s`` and at once after a restore.

        A (re)started run first reads the VM session id: another than the one the service
        last acted on means a restore came while no run of it was subscribed to RESTORED (a
        supervisor's restart back-off, a reload that rebuilt or re-enabled it), and the
        first pass is a restore's, before the options are read again if a run read them.
        While the last read failed, the id is read again before each pass until a read goes
        through, and compared the same way (VBoxService reads it at every pass).
        """
        with self._pump.subscribe(self.name, Event.RESTORED) as events:
            task_status.started()
            await self._read_session()
            if self._restore_pending and self._options_read:
                self._options_due = True
            else:
                await self._read_host_options()
            self._set_pending = self._section.set_on_start
            while True:
                await self._pass(events)
                if self._options_due:
                    await self._read_host_options()
                heard = await self._pause.wait(events)
                while heard and not await self._restore_came():  # a restore already seen
                    heard = await self._pause.resume(events)
                if not heard and self._session_id is None:
                    await self._read_session()

    async def _restore_came(self) -> bool:
        """A RESTORED event: read the new session id (a VMMDev request, which no HGCM
        service holds up). The same id as the run's last read means no restore since that
        read (the event was for one before it) and changes nothing; otherwise (the id read
        before or now unknown included) the next pass steps as after a restore, with the
        options in force, and the host's options are read after it (the property service
        may be slow to answer an HGCM connect, and a clock hours behind should not wait for
        it). Return whether it was a restore."""
        before, pending = self._session_id, self._restore_pending
        self._restore_pending = True  # heard: the read does not take it for one unheard
        await self._read_session()
        if before is not None and self._session_id == before:
            self._restore_pending = pending
            log.debug("restore_seen_before", session_id=f"{before:#x}")
            return False
        self._options_due = True
        return True

    async def _read_session(self) -> None:
        """Read the VM session id; another than the one the service last acted on means a
        restore came since, its event heard or not. A failed read leaves the id unknown, so
        no pass notes one (VBoxService adopts only an id it read); the pass that handles a
        restore without its id then drops the id noted before it (:meth:`_correct`), so the
        next id read is adopted, not taken for another restore."""
        try:
            session_id = (await self._device.request(GetSessionId())).value
        except HOST_ERRORS as exc:
            self._session_reads.host_failed("vm_session_unreadable", exc)
            self._session_id = None
            return
        self._session_reads.succeeded()
        last = self._sessions.last(self.name)
        if last is not None and last != session_id and not self._restore_pending:
            log.info(
                "restored_while_not_listening",
                old_session_id=f"{last:#x}",
                session_id=f"{session_id:#x}",
            )
            self._restore_pending = self._options_due = True
        self._session_id = session_id

    # --- settings ----------------------------------------------------------------------------

    async def _read_host_options(self) -> None:
        """Read VBoxService's options from the host (at start and after a restore's pass)."""
        self._options_due = False
        self._options_read = True
        if await self._host_settings.read(self._device, self._configured):
            self._apply_settings()

    def _apply_settings(self) -> None:
        """The section in force: the config's, with the host's options over it."""
        self._section = self._host_settings.over(self._configured)
        self._pause.set_interval(self._section.interval_s)

    # --- a pass ------------------------------------------------------------------------------

    async def _pass(self, events: Subscription) -> None:
        status = self.status()
        reading = await self._read()
        if reading is not None and _event_waiting(events) and await self._restore_came():
            reading = await self._read()  # a restore during the pass: read again, as one
        if reading is not None:
            self._correct(reading)
        if self.status() != status:
            self._status_changed()

    async def _read(self) -> Reading | None:
        """A reading taken fast enough, or None (discarded, or the host failed)."""
        max_latency_ns = self._section.max_latency_ms * NS_PER_MS
        clock = self._clock
        for attempt in range(1, READING_TRIES + 1):
            started = clock.monotonic_ns()
            try:
                host = await self._device.request(GetHostTime())
            except VBoxStatusError as exc:
                self._host_failed(f"host clock unreadable ({exc.name})", "host_time_failed")
                return None
            except RemoteProtocolError as exc:
                self._host_failed("host clock reply broken", "host_time_invalid", error=str(exc))
                return None
            guest_ns = clock.now_ns()
            latency_ns = clock.monotonic_ns() - started
            if not MIN_HOST_TIME_MS <= host.ms <= MAX_HOST_TIME_MS:
                self._host_failed("host clock out of range", "host_time_invalid", host_ms=host.ms)
                return None
            self._host_recovered()
            if latency_ns < max_latency_ns:
                if self._discarding:
                    log.info("host_time_readings_fast_again", latency_ms=latency_ns / NS_PER_MS)
                self._discarding = False
                return Reading(host.ms * NS_PER_MS - guest_ns, latency_ns)
            log.debug("host_time_too_slow", latency_ms=latency_ns / NS_PER_MS, attempt=attempt)
            if attempt < READING_TRIES:
                await trio.sleep(RETRY_AFTER_HIGH_LATENCY_S)
        self._discarded += 1
        if not self._discarding:
            log.info(
                "host_time_readings_discarded",
                tries=READING_TRIES,
                max_latency_ms=self._section.max_latency_ms,
            )
        self._discarding = True
        return None

    def _correct(self, reading: Reading) -> None:
        section = self._section
        plan = plan_correction(
            reading, section, set_now=self._set_pending, restored=self._restore_pending
        )
        restored = self._restore_pending
        self._set_pending = self._restore_pending = False
        if self._session_id is not None:
            self._sessions.note(self.name, self._session_id)
        elif restored:  # the restore is handled now: its id, unread, is adopted when read
            self._sessions.forget(self.name)
        self._passes += 1
        drift_ms = reading.drift_ns / NS_PER_MS
        self._last_drift_ms = drift_ms
        settled = self._daemon_resync_by is None  # the daemon updated before this pass
        self._note_time_daemon(self._time_daemon_keeps_clock(), drift_ms)
        if self._left_to_ntp and self._disagrees(plan, reading, settled=settled):
            self._left += 1
        elif plan.correction is Correction.SLEW and self._left_to_ntp:
            self._left += 1
            self._slewing = False  # the time daemon's now (logged as such)
        elif plan.correction is Correction.NONE:
            if self._slewing:
                log.info("clock_in_sync", drift_ms=drift_ms)
            self._slewing = False
            if self._clock_problem != NOT_PERMITTED:
                self._clock_fixed()  # a one-off failure; a missing privilege stays
        else:
            self._apply(plan, reading.drift_ns)

    def _time_daemon_keeps_clock(self) -> bool:
        """Whether to leave slewing to a time daemon (see ``DAEMON_RESYNC_GRACE_S``)."""
        if not self._section.defer_to_ntp:
            return False
        if self._clock.ntp_synchronised():
            self._daemon_resync_by = None
            return True
        resync_by = self._daemon_resync_by
        return resync_by is not None and trio.current_time() < resync_by

    def _disagrees(self, plan: Plan, reading: Reading, *, settled: bool) -> bool:
        """Whether to leave a step over the threshold to the time daemon: the agent made one
        since the two last agreed. Logged once the daemon updated after that step. They
        agree at a drift within the minimum on a pass after the one that found the daemon's
        update (``settled``): one within the threshold may be the daemon slewing the agent's
        step back (chronyd, at up to 83 ms a second), and one read just after the update,
        that slew's start."""
        resynced = self._daemon_resync_by is None
        drift_ms = reading.drift_ns / NS_PER_MS
        if plan.reason != OVER_THRESHOLD:
            if settled and plan.correction is Correction.NONE:
                if self._disagreeing:
                    log.info("host_clock_agrees_with_time_daemon", drift_ms=drift_ms)
                self._forget_disagreement()
            return False
        if not self._threshold_stepped:
            return False
        if resynced and not self._disagreeing:
            log.warning(
                "host_clock_disagrees_with_time_daemon",
                drift_ms=drift_ms,
                set_threshold_s=self._section.set_threshold_s,
            )
            self._disagreeing = True
        return True

    def _forget_disagreement(self) -> None:
        self._threshold_stepped = self._disagreeing = False

    def _apply(self, plan: Plan, drift_ns: int) -> None:
        """Slew or step; a slew the kernel refuses (too large) becomes a step."""
        drift_ms = drift_ns / NS_PER_MS
        try:
            if plan.correction is Correction.SLEW:
                try:
                    self._clock.slew(drift_ns)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    log.info("clock_slew_refused", drift_ms=drift_ms, error=exc.strerror)
                    plan = Plan(Correction.STEP, "slewing refused")
                else:
                    self._slews += 1
                    self._slew_done_by = trio.current_time() + abs(drift_ns) / KERNEL_SLEW_NS_PER_S
                    self._clock_fixed()
                    if not self._slewing:
                        log.info("clock_slewing", drift_ms=drift_ms)
                    self._slewing = True
                    return
            self._clock.step(drift_ns)
        except PermissionError:
            self._clock_failed(NOT_PERMITTED)
            return
        except OSError as exc:
            self._clock_failed(f"clock not set ({exc.strerror})")
            return
        except (OverflowError, ValueError) as exc:  # a time the clock cannot take
            self._clock_failed(f"clock not set ({exc})")
            return
        self._steps += 1
        self._slewing = False
        self._slew_done_by = None  # the kernel dropped it
        self._clock_fixed()
        if self._left_to_ntp:  # the kernel now says "unsynchronised" until the daemon's poll
            self._daemon_resync_by = trio.current_time() + DAEMON_RESYNC_GRACE_S
            self._threshold_stepped |= plan.reason == OVER_THRESHOLD
        log.info("clock_stepped", drift_ms=drift_ms, reason=plan.reason)

    # --- states, logged when they begin and end ----------------------------------------------

    def _note_time_daemon(self, synchronised: bool, drift_ms: float) -> None:
        if synchronised and not self._left_to_ntp:
            self._hand_over(drift_ms)
        elif self._left_to_ntp and not synchronised:
            log.info("time_daemon_gone", drift_ms=drift_ms)
            self._forget_disagreement()
        self._left_to_ntp = synchronised

    def _hand_over(self, drift_ms: float) -> None:
        """Leave the clock to the time daemon; cancel the agent's slew if the kernel may
        still be making it up (one after that would be the daemon's own, if it slews with
        ``adjtime``, and is left alone)."""
        done_by, self._slew_done_by = self._slew_done_by, None
        if done_by is None or trio.current_time() >= done_by:
            log.info("clock_left_to_time_daemon", drift_ms=drift_ms)
            return
        try:
            self._clock.slew(0)
        except OSError as exc:
            log.warning(
                "clock_left_to_time_daemon",
                drift_ms=drift_ms,
                agent_slew=f"not cancelled ({exc.strerror or exc})",
            )
            return
        log.info("clock_left_to_time_daemon", drift_ms=drift_ms, agent_slew="cancelled")

    def _host_failed(self, problem: str, event: str, **details: object) -> None:
        self._failures += 1
        if problem != self._host_problem:
            log.warning(event, problem=problem, **details)
        self._host_problem = problem

    def _host_recovered(self) -> None:
        if self._host_problem is not None:
            log.info("host_time_readable_again")
        self._host_problem = None

    def _clock_failed(self, problem: str) -> None:
        self._failures += 1
        if problem != self._clock_problem:
            log.warning("clock_not_corrected", problem=problem)
        self._clock_problem = problem

    def _clock_fixed(self) -> None:
        if self._clock_problem is not None:
            log.info("clock_corrected_again")
        self._clock_problem = None


def _event_waiting(events: Subscription) -> bool:
    """Take an event already delivered, if any (a restore during a pass)."""
    try:
        events.receive_nowait()
    except trio.WouldBlock:
        return False
    return True


def timesync_service(
    context: ServiceContext, section: TimesyncSection, clock: WallClock | None = None
) -> TimesyncService:
    """The service on ``clock``; by default the system's, or on a simulated host a clock
    of the agent's own that leaves the machine's alone (tests pass their own)."""
    if clock is None:
        clock = AgentOwnClock() if context.device.simulated else SystemClock()
    return TimesyncService(context, section, clock)


SPEC: Final = ServiceSpec(NAME, TimesyncSection, timesync_service)
