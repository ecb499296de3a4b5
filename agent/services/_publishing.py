"""The engine of the services that publish guest state as guest properties.

:class:`PublishingService` is the service: every ``interval_s`` (a section field; the host's
``--vminfo-interval`` or ``--interval`` over it, as VBoxService's VM-info service takes them,
read at start and after every restore unless ``host_options`` is false: see
:mod:`agent.services._host_options`) and at once after a restore it takes a :class:`Reading`
of the guest (the properties it wants and a short summary) and publishes it on one HGCM
client it keeps; at a stop it deletes what it
published, as VBoxService 7.2.6 deletes its cache entries at termination. A service may own
every name matching some patterns (``owned``, such as ``/VirtualBox/GuestInfo/Net/*``): on a
run's first pass and after a restore, the host's names among them that the reading does not
want (a previous boot's) are deleted, and at a stop all of them are. Failing to
read the guest is logged when it starts and ends, shown in the status, and publishes nothing
meanwhile. A host request that fails (:data:`agent.protocol.HOST_ERRORS`: a refusal, or a
reply that breaks the ABI) never ends :meth:`PublishingService.run`: a client the host will
not connect (``VERR_HGCM_SERVICE_NOT_FOUND``, where VBoxService disables its VM-info service)
or owned names it will not list are logged when the failure begins, changes and ends, shown in
the status and tried again at the next pass.

:class:`PropertyPublisher` keeps a set of properties as the service wants them, like
VBoxService's property cache: a value is written only when it changed (names in ``always``,
a beacon, on every call), always with ``TRANSRESET`` (as VBoxService 7.2.6 writes every cache
entry: the host drops it when the VM resets or powers off, where the agent's stop never
runs; a host too old to know the flag refuses it with ``VERR_PARSE_ERROR``, and from then
on values are written ``TRANSIENT``, as VBoxService falls back to it), a property wanted
absent is deleted once, a property no longer wanted at all is deleted, and after a restore
(:meth:`PropertyPublisher.forget`) everything is written again.
A property the host refuses, or one the client refuses to send (a value over the 1023-byte
limit: ``PropertyArgumentError``), or whose reply breaks the ABI, is logged once per status,
shown in the status and retried on the next call; the refusal is forgotten once the property
is neither wanted nor held. A name counts as held from the write that sends it, not from
its answer, as VBoxService's cache keeps an entry from its first update, written or not, and
resets its temporary entries at termination: a write cut off by a stop, or answered with a
malformed reply or a driver's give-up (``VERR_INTERRUPTED``, ``VERR_TIMEOUT``), may have
reached the host, so the drain deletes it; only a refusal takes the write back (a name not
held before is then no longer held), and so does a write the host ignored: answered
``VINF_PERMISSION_DENIED``, a success status, when the host made every property read-only
for the guest, it changed nothing. The write (or delete) is made again at the next call,
and the ignoring is logged once when it begins and once when a write is taken again.
VBoxService's cache counts such a write as made (``RT_SUCCESS``), so it would not write that
value again until it changes. :class:`IntervalPause` is the wait between two passes,
which a reload may shorten or lengthen while it runs and an event (a restore) ends early.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio
from pydantic import Field

from agent.protocol import HOST_ERRORS, Event, RemoteProtocolError, VBoxStatusError
from agent.protocol.guest_props import PropertyArgumentError
from agent.protocol.status import (
    VERR_INTERRUPTED,
    VERR_PARSE_ERROR,
    VERR_TIMEOUT,
    VINF_SUCCESS,
    status_name,
)
from agent.records import record
from agent.services._host_options import VMINFO_OPTIONS, HostSettings, HostTunedSection
from agent.services._lasting import (
    MALFORMED_REPLY,
    WRITES_IGNORED,
    WRITES_TAKEN_AGAIN,
    LastingFailure,
)
from agent.services.guest_props import (
    PropertiesGrowingError,
    keep_guest_properties,
    open_guest_properties,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence

    from agent.services._base import ServiceContext
    from agent.services._paced import EventSource
    from agent.services.guest_props import GuestProperties

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL_S = 10.0
"""VBoxService 7.2.6's VM-info interval (``RT_MS_10SEC``, where no option sets one)."""
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 3600.0
FLAGS: Final = "TRANSRESET"
"""The flags of every value written (the host adds TRANSIENT)."""
OLD_HOST_FLAGS: Final = "TRANSIENT"
"""The flags written instead where the host does not know :data:`FLAGS`."""
NOT_SENT: Final = "not sent: over a limit of the property service"
"""The refusal of a name or value the client would not send (``PropertyArgumentError``)."""
GAVE_UP: Final = frozenset({VERR_INTERRUPTED, VERR_TIMEOUT})
"""Statuses of a call the driver gave up waiting for: the host may have carried it out."""
PROPERTIES_GROWING: Final = "properties kept growing"
"""The cause of a listing of the owned names whose every buffer the host's properties
outgrew (``PropertiesGrowingError``)."""


class PublishingSection(HostTunedSection):
    """A publishing service's section: how often it reads the guest again."""

    interval_s: float = Field(default=DEFAULT_INTERVAL_S, ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S)
    """Seconds between two readings; a reload applies it at once."""
    host_options: bool = True
    """Apply the VM-info interval the host sets for VBoxService as guest properties
    (``--vminfo-interval`` in ms, else the global ``--interval`` in s) over ``interval_s``;
    false: this section wins."""


@record
class Reading:
    """One reading of the guest: the properties wanted (None: absent) and a short summary
    for the status and the log (``2 interfaces``)."""

    properties: Mapping[str, str | None]
    summary: str


@record
class PublishingStatistics:
    """What a publishing service did.

    Attributes:
        passes: readings published.
        summary: the last reading's summary (None before the first).
        writes, deletes: properties written (beacons not included) and deleted.
        refused: properties refused (by the host, or not sent) at their last attempt.
    """

    passes: int
    summary: str | None
    writes: int
    deletes: int
    refused: int


@final
class PublishingService:
    """Reads the guest every ``interval_s`` and after a restore; publishes what changed.

    ``read`` takes a reading (on the event loop, or where it says: blocking work runs on a
    thread) and raises ``OSError`` when it cannot; ``always`` names the
    beacons written on every pass; ``owned`` are the patterns of the names the service owns
    (see the module).
    """

    def __init__(
        self,
        name: str,
        context: ServiceContext,
        section: PublishingSection,
        read: Callable[[], Awaitable[Reading]],
        *,
        always: Collection[str] = (),
        owned: Sequence[str] = (),
    ) -> None:
        self.name = name
        self._device = context.device
        self._pump = context.pump
        self._status_changed = context.status_changed
        self._read = read
        self._always = always
        self._owned = owned
        self._sweep_owned = True
        """Whether the next pass first deletes the owned names the reading does not want."""
        self._configured = section
        self._host_settings: HostSettings[PublishingSection] = HostSettings(VMINFO_OPTIONS)
        self._pause = IntervalPause(section.interval_s)
        self._publisher = PropertyPublisher()
        self._connects = LastingFailure("property_service_connected_again")
        self._listing = LastingFailure("owned_properties_listed_again")
        self._published = False
        self._unreadable: str | None = None
        self._summary: str | None = None
        self._passes = 0

    def statistics(self) -> PublishingStatistics:
        """Return the counters."""
        publisher = self._publisher
        return PublishingStatistics(
            self._passes, self._summary, publisher.writes, publisher.deletes, len(publisher.refused)
        )

    def status(self) -> str:
        """``NAME SUMMARY``, ``NAME setting up`` (before its first pass), or what went wrong
        (the first of: no client, the guest unreadable, writes ignored, a property refused,
        the owned names unlisted)."""
        if self._connects.cause is not None:
            return f"{self.name}: property service unavailable ({self._connects.cause})"
        if self._unreadable is not None:
            return f"{self.name}: unreadable ({self._unreadable})"
        if self._publisher.ignoring.cause is not None:
            return f"{self.name}: writes ignored by the host ({self._publisher.ignoring.cause})"
        if self._publisher.refused:
            name, status = next(iter(self._publisher.refused.items()))
            return f"{self.name}: {name} refused ({status})"
        if self._listing.cause is not None:
            return f"{self.name}: owned names unlisted ({self._listing.cause})"
        return f"{self.name} {self._summary or 'setting up'}"

    def reconfigure(self, section: PublishingSection) -> bool:
        """Apply the new interval at once (the current wait ends by the new one), the host's
        options still over it. Switching ``host_options`` needs a restart (it reads them)."""
        if section.host_options != self._configured.host_options:
            return False
        self._configured = section
        self._apply_settings()
        return True

    async def drain(self) -> None:
        """Delete what was published and the other owned names, on a client of its own
        (leaving :meth:`run` closed its)."""
        if not self._published:
            await trio.lowlevel.checkpoint()
            return
        async with open_guest_properties(self._device) as props:
            owned = set(self._publisher.held()) | set(await self._list_owned(props) or ())
            names = sorted(owned)
            await self._publisher.delete(props, names)
        publisher = self._publisher
        if any(name in publisher.refused or name in publisher.ignored for name in names):
            return  # each refusal is logged; a next run publishes everything again
        self._published = False
        log.info("published_deleted", properties=len(names))

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Publish, then again every ``interval_s`` and at once after every restore.

        A (re)started run writes everything: a restore may have come while it was not
        running (a supervisor's restart backoff), with no one subscribed to hear it.
        """
        self._publisher.forget()
        self._sweep_owned = True
        with self._pump.subscribe(self.name, Event.RESTORED) as events:
            async with AsyncExitStack() as stack:
                props = await self._publish(stack, None)
                task_status.started()
                await self._read_host_options()
                while True:
                    if await self._pause.wait(events):
                        self._publisher.forget()
                        self._sweep_owned = True
                        log.info("republishing_after_restore")
                        await self._read_host_options()
                    props = await self._publish(stack, props)

    async def _read_host_options(self) -> None:
        """Read VBoxService's VM-info options from the host (at start and after a restore)."""
        if await self._host_settings.read(self._device, self._configured):
            self._apply_settings()

    def _apply_settings(self) -> None:
        """The interval in force: the section's, or the host's option over it."""
        self._pause.set_interval(self._host_settings.over(self._configured).interval_s)

    async def _publish(
        self, stack: AsyncExitStack, props: GuestProperties | None
    ) -> GuestProperties | None:
        """One pass, on ``props`` or a client connected now (kept on ``stack``); return the
        client, None if the host would not connect one. Tell the daemon when the status
        changed (not every pass: no wake-up)."""
        status = self.status()
        if props is None:
            props = await self._connect(stack)
        if props is not None:
            await self._pass(props)
        if self.status() != status:
            self._status_changed()
        return props

    async def _connect(self, stack: AsyncExitStack) -> GuestProperties | None:
        """A client of the property service, kept open on ``stack``; None (counted, logged
        when the failure begins, changes and ends) if the host refused it."""
        props, _ = await keep_guest_properties(self._device, stack, self._connects)
        return props

    async def _pass(self, props: GuestProperties) -> None:
        try:
            reading = await self._read()
        except OSError as exc:
            self._set_unreadable(str(exc))
            return
        self._set_unreadable(None)
        publisher = self._publisher
        if self._sweep_owned:
            found = await self._list_owned(props)
            if found is not None:
                publisher.adopt(found)  # the next publish deletes those not wanted
                self._sweep_owned = False
        writes, deletes = publisher.writes, publisher.deletes
        # Published from the first write, not from its answer: a stop during the pass (the
        # first pass is the start) cancels the wait for writes the host may have made.
        self._published = True
        await publisher.publish(props, reading.properties, self._always)
        self._passes += 1
        written, deleted = publisher.writes - writes, publisher.deletes - deletes
        if written or deleted or reading.summary != self._summary:
            log.info("published", summary=reading.summary, written=written, deleted=deleted)
        self._summary = reading.summary

    async def _list_owned(self, props: GuestProperties) -> list[str] | None:
        """The host's names matching ``owned``; None (counted, logged when the failure begins,
        changes and ends) if the host would not list them, its list broke the ABI
        (``HgcmSizeError`` included) or outgrew every buffer (:data:`PROPERTIES_GROWING`)."""
        if not self._owned:
            return []
        try:
            found = [prop.name for prop in await props.enumerate(self._owned)]
        except PropertiesGrowingError as exc:  # no malformed reply: one a later pass may get
            self._listing.failed(
                "owned_properties_unlisted",
                PROPERTIES_GROWING,
                error=str(exc),
                patterns=list(self._owned),
            )
            return None
        except HOST_ERRORS as exc:
            self._listing.host_failed("owned_properties_unlisted", exc, patterns=list(self._owned))
            return None
        self._listing.succeeded()
        return found

    def _set_unreadable(self, reason: str | None) -> None:
        """Log a failure to read the guest when it starts, changes and ends."""
        if reason == self._unreadable:
            return
        if reason is None:
            log.info("readable_again")
        else:
            log.warning("unreadable", error=reason)
        self._unreadable = reason


@record
class _Undo:
    """What a name was before a write: held (and its value), deleted."""

    held: bool
    value: str | None
    deleted: bool


@final
class PropertyPublisher:
    """Brings the host's copy of a set of properties to what the caller wants.

    Every value is written with :data:`FLAGS`, or :data:`OLD_HOST_FLAGS` from the first
    write the host refuses for them until a restore (``flags``, logged once each time).
    ``writes`` counts the values written, the ``always`` names' not included, ``deletes``
    the deletions; ``refused`` maps
    each property refused at its last attempt to the VBox status name the host answered, or
    :data:`NOT_SENT`; ``ignored`` holds the names whose last write or delete the host
    ignored, and ``ignoring`` counts those writes and deletes.
    """

    def __init__(self) -> None:
        self._held: dict[str, str | None] = {}
        """The values the host holds from us; None: unknown (after a restore, or a write
        whose answer did not come)."""
        self._deleted: set[str] = set()
        self.refused: dict[str, str] = {}
        self.ignored: set[str] = set()
        self.ignoring = LastingFailure(WRITES_TAKEN_AGAIN)
        """Logs when the host begins to ignore writes and deletes, and when it takes a write
        again (a delete of a missing property succeeds while the host ignores the others)."""
        self.flags: str = FLAGS
        self.writes = 0
        self.deletes = 0

    def held(self) -> list[str]:
        """The names the host holds from us (or may: after a restore, or a write whose
        answer did not come)."""
        return list(self._held)

    def adopt(self, names: Iterable[str]) -> None:
        """Count ``names`` as ours, values unknown: the next :meth:`publish` deletes those
        it does not want (a previous boot's), and writes the others."""
        for name in names:
            self._held.setdefault(name, None)

    def forget(self) -> None:
        """The host's store may have changed (a restore): write everything again, with
        :data:`FLAGS` again (the VM may now run on a host that knows them)."""
        self._held = dict.fromkeys(self._held)
        self._deleted.clear()
        self.flags = FLAGS

    async def publish(
        self,
        props: GuestProperties,
        wanted: Mapping[str, str | None],
        always: Collection[str] = (),
    ) -> None:
        """Write what changed, delete what is wanted absent or no longer wanted.

        ``wanted`` maps names to values, None for "absent".
        """
        for name, value in wanted.items():
            if value is None:
                if name not in self._deleted:
                    await self._delete(props, name)
            elif name in always or name in self.refused or self._held.get(name) != value:
                await self._write(props, name, value, counted=name not in always)
        for name in [name for name in self._held if name not in wanted]:
            await self._delete(props, name)
        # A refusal of a name neither wanted nor held has nothing left to retry.
        self.refused = {
            name: status
            for name, status in self.refused.items()
            if name in wanted or name in self._held
        }
        self.ignored = {name for name in self.ignored if name in wanted or name in self._held}

    async def delete(self, props: GuestProperties, names: Iterable[str]) -> None:
        """Delete each of ``names`` now, whatever the host holds."""
        for name in names:
            await self._delete(props, name)

    async def _write(self, props: GuestProperties, name: str, value: str, *, counted: bool) -> None:
        # Held, value unknown, from the request: the host may act on a write whose answer a
        # stop (or a malformed reply) keeps from us, and the drain must then delete it.
        undo = _Undo(name in self._held, self._held.get(name), name in self._deleted)
        self._held[name] = None
        self._deleted.discard(name)
        self.ignored.discard(name)
        try:
            status = await self._set(props, name, value)
        except VBoxStatusError as exc:
            if exc.rc not in GAVE_UP:
                self._undo_write(name, undo)
            self._refuse(name, exc.name)
            return
        except RemoteProtocolError as exc:
            self._refuse(name, MALFORMED_REPLY, str(exc))
            return
        except PropertyArgumentError as exc:
            self._undo_write(name, undo)
            self._refuse(name, NOT_SENT, str(exc))
            return
        self.refused.pop(name, None)
        if status != VINF_SUCCESS:
            self._undo_write(name, undo)  # the host changed nothing
            self._ignore(name, status)
            return
        self.ignoring.succeeded()
        self._held[name] = value
        if counted:
            self.writes += 1

    def _undo_write(self, name: str, undo: _Undo) -> None:
        """The write was refused: the host holds what it held before."""
        if undo.held:
            self._held[name] = undo.value
        else:
            del self._held[name]
        if undo.deleted:
            self._deleted.add(name)

    async def _set(self, props: GuestProperties, name: str, value: str) -> int:
        """Write with :attr:`flags`; where the host cannot parse TRANSRESET, fall back to
        TRANSIENT for this write and every later one. Return the host's success status."""
        try:
            return await props.set(name, value, self.flags)
        except VBoxStatusError as exc:
            if exc.rc != VERR_PARSE_ERROR or self.flags == OLD_HOST_FLAGS:
                raise
            log.warning("transreset_unsupported", property=name, flags=OLD_HOST_FLAGS)
            self.flags = OLD_HOST_FLAGS
            return await props.set(name, value, self.flags)

    async def _delete(self, props: GuestProperties, name: str) -> None:
        try:
            status = await props.delete(name)
        except VBoxStatusError as exc:
            self._refuse(name, exc.name)
            return
        except RemoteProtocolError as exc:
            self._refuse(name, MALFORMED_REPLY, str(exc))
            return
        except PropertyArgumentError as exc:
            self._refuse(name, NOT_SENT, str(exc))
            return
        self.refused.pop(name, None)
        if status != VINF_SUCCESS:
            self._ignore(name, status)  # held (or not) as before, deleted again next time
            return
        self.ignored.discard(name)
        if not self.ignored:
            self.ignoring.succeeded()
        self._held.pop(name, None)
        self._deleted.add(name)
        self.deletes += 1

    def _ignore(self, name: str, status: int) -> None:
        """The host ignored a write or delete of ``name``: logged when the ignoring begins."""
        self.ignored.add(name)
        cause = status_name(status)
        self.ignoring.failed(WRITES_IGNORED, cause, status=cause, property=name)

    def _refuse(self, name: str, status: str, error: str | None = None) -> None:
        """Log a refusal once per status, not at every pass that retries it."""
        if self.refused.get(name) != status:
            if error is None:
                log.warning("property_refused", property=name, status=status)
            else:
                log.warning("property_refused", property=name, status=status, error=error)
        self.refused[name] = status


@final
class IntervalPause:
    """The wait between two passes: ``interval_s``, or until an event arrives.

    :meth:`set_interval` re-aims a wait already under way, counted from its start: a reload
    to a shorter interval that has already passed ends it at once.
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._scope: trio.CancelScope | None = None
        self._since = 0.0

    def set_interval(self, interval_s: float) -> None:
        """Use ``interval_s`` from now on, for the wait under way too."""
        self.interval_s = interval_s
        if self._scope is not None:
            self._scope.deadline = self._since + interval_s

    async def wait(self, events: EventSource) -> bool:
        """Wait the interval or for the next event; True if an event ended the wait."""
        self._since = trio.current_time()
        return await self.resume(events)

    async def resume(self, events: EventSource) -> bool:
        """Go on with the last wait an event ended, to the same end (an event that called
        for nothing); True if another event ended it."""
        with trio.CancelScope(deadline=self._since + self.interval_s) as scope:
            self._scope = scope
            try:
                await events.receive()
            finally:
                self._scope = None
            return True
        return False
