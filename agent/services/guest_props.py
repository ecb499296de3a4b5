"""The guest-property client: get, set, delete, enumerate and follow host properties.

``async with open_guest_properties(device) as props:`` connects a client of the host's
``VBoxGuestPropSvc`` for the short calls (GET_PROP, SET_PROP, DEL_PROP, ENUM_PROPS), which
any number of tasks may make at once (beyond the host's 15 per client they queue). Waits
for changes (GET_NOTIFICATION) each get a channel of their own (:meth:`GuestProperties.wait`,
:meth:`GuestProperties.watch`): the service ends a client's older wait with identical
patterns (``VERR_INTERRUPTED``), and a blocked wait must not hold up the short calls.

Everything the service would refuse for its size or shape is refused here first with a
:class:`PropertyArgumentError` (a ``ValueError``; the checks are the wire contract's, shared
with the simulated host) naming the limit: names of 1..63 bytes of UTF-8 without ``*``,
``?`` or ``|``, values up to 1023 bytes (a 6.1 host allows 127 and answers
``VERR_TOO_MUCH_DATA``), an enumeration's pattern list up to 1023 bytes (a wait's has no
limit at the service: only what one HGCM buffer carries), known flag names, and text the
host's UTF-8 check (IPRT's) takes: neither U+FFFE nor U+FFFF. Methods that take patterns
take a sequence of them (``["/VirtualBox/*"]``); a lone ``str`` raises ``TypeError``, as it
would otherwise be one pattern per character. What the host refuses (read-only properties,
the 256-property cap) raises ``HgcmCallError`` with the VBox status's name.
:func:`name_param`, :func:`set_params`, :func:`enum_patterns` and :func:`wait_patterns`
make a call's checks without a device (``vbox-agent prop`` makes them before it opens one).
"""

from __future__ import annotations

import functools
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, NoReturn, Self, final

import structlog
import trio

from agent.protocol import HOST_ERRORS, RemoteProtocolError
from agent.protocol.constants import HGCM_MAX_USER_PARM, SHORT_CALL_TIMEOUT_MS, Event
from agent.protocol.errors import shown
from agent.protocol.guest_props import (
    MAX_FLAGS_SIZE,
    MAX_GUEST_NOTIFICATIONS,
    MAX_NAME_SIZE,
    MAX_VALUE_SIZE,
    MAX_WAIT_PATTERN_SIZE,
    SERVICE_NAME,
    FlagsParseError,
    GuestFunction,
    PropertyArgumentError,
    encode_name,
    encode_patterns,
    encode_value,
    format_flags,
    parse_flags,
)
from agent.protocol.host_text import host_bytes, host_str
from agent.protocol.messages import slot_setters
from agent.protocol.prop_patterns import patterns_match
from agent.protocol.status import (
    VERR_BUFFER_OVERFLOW,
    VERR_HGCM_INVALID_CLIENT_ID,
    VERR_INTERRUPTED,
    VERR_NOT_FOUND,
    VWRN_NOT_FOUND,
)
from agent.records import record
from agent.services.hgcm import (
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCallError,
    HgcmData,
    HgcmU32,
    HgcmU64,
    open_hgcm_channel,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
    from types import TracebackType

    from agent.device import Device
    from agent.services._lasting import LastingFailure
    from agent.services.event_pump import EventPump, Subscription
    from agent.services.hgcm import HgcmChannel, HgcmParam, HgcmReply, HgcmValue, PreparedCall

    _Caller = Callable[[PreparedCall], Awaitable[HgcmReply]]
    """Makes one short call: ``(prepared) -> reply``."""
    _Preparer = Callable[..., PreparedCall]
    """Prepares one short call: ``(function, *params) -> prepared``."""

log = structlog.get_logger(__name__)

VALUE_BUFFER_SIZE: Final = MAX_VALUE_SIZE + MAX_FLAGS_SIZE
"""GET_PROP's buffer: the largest value and flags a 7.0 host returns, so one call does."""
NOTIFICATION_BUFFER_SIZE: Final = MAX_NAME_SIZE + VALUE_BUFFER_SIZE + 2
"""GET_NOTIFICATION's buffer: name, value, flags and the deleted flag."""
ENUM_BUFFER_SIZE: Final = 4096
"""ENUM_PROPS' first buffer; a larger one is asked for with the size the host reports."""
ENUM_SPARE_ROOM: Final = 4096
"""Bytes ENUM_PROPS' next buffer holds beyond the size the host asked for, as upstream's
``VbglR3GuestPropEnum`` adds them: properties the host (or another guest process) adds
before that call still fit."""
ENUM_TRIES: Final = 10
"""ENUM_PROPS calls one listing makes at most while the properties outgrow each buffer
(``VbglR3GuestPropEnum`` makes as many)."""
SIZE_RETRIES: Final = 4
"""Times GET_PROP or GET_NOTIFICATION is repeated with the size the host asked for. Their
first buffers hold any value and flags a host takes in a set; only a property the host
loaded past those limits (``setPropertyBlock``) needs more, and nothing keeps growing one
value as added properties keep growing a listing (:data:`ENUM_TRIES`)."""
SNAPSHOT_TRIES: Final = 4
"""Times a watch connects again and repeats a snapshot the host dropped its client during."""
FRUITLESS_WAITS: Final = 16
"""Waits in a row a watch lets the host end without a change (``VERR_INTERRUPTED``, a
``VERR_BUFFER_OVERFLOW`` for the next new change, a dropped client) before it gives up: a
host that always does would make ``next()`` spin."""
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_U64_DIGITS: Final = len(str(_U64_MAX))
"""Digits of the largest timestamp: a longer one is refused before ``int`` reads it (Python
refuses over 4300 digits with a ValueError that would read as a usage error)."""
_VALUE_BUFFER: Final = HgcmBufferOut(VALUE_BUFFER_SIZE)
_ZERO_U64: Final = HgcmU64(0)
_ZERO_U32: Final = HgcmU32(0)
"""Parameters every GET_PROP sends the same (frozen, so shared)."""
_WAIT_ENDINGS: Final = frozenset(
    {VERR_BUFFER_OVERFLOW, VERR_INTERRUPTED, VERR_HGCM_INVALID_CLIENT_ID}
)
"""The failures of a wait the watch recovers from (counted against :data:`FRUITLESS_WAITS`)."""
GETS_PREPARED: Final = 256
"""Property names whose GET_PROP a client keeps prepared for the next get of them."""
NAME_PARAMS_CACHED: Final = 256
"""Property names whose checked, encoded parameter is kept for the next call with them."""
_EMPTY_NAME: Final = HgcmBufferIn(b"\0\0")
"""The name "" as a guest sets it and a watch reads it back: a two-byte buffer, which
``GuestPropValidateName`` takes (it checks the buffer's size, 2..64, not the name's).
:func:`encode_name` refuses the name: VbglR3 would send it as one byte, which the host
refuses, so the agent sets, reads and deletes no such property of its own accord."""
_GET_PROP: Final = int(GuestFunction.GET_PROP)
"""Read once: an enum member costs a metaclass attribute look-up per access, which on the
hot path of every get cost as much as encoding one of its parameters."""


@record(init=False)
class Property:
    """A property as the host holds it; ``timestamp`` is the host's ns of its last change
    (from a clock that may go back: not an order). Bytes of the host's text that Python
    cannot decode (IPRT's UTF-8 reaches past Unicode) are surrogate escapes
    (:mod:`agent.protocol.host_text`)."""

    name: str
    value: str
    flags: str
    timestamp: int

    def __init__(self, name: str, value: str, flags: str, timestamp: int) -> None:
        # As the frozen HGCM classes do (see slot_setters): one is built for every get.
        set_name, set_value, set_flags, set_timestamp = _SET_PROPERTY
        set_name(self, name)
        set_value(self, value)
        set_flags(self, flags)
        set_timestamp(self, timestamp)


_SET_PROPERTY: Final = slot_setters(Property, "name", "value", "flags", "timestamp")


@record
class PropertyChange:
    """One change: a set (``deleted`` False, with the new value and flags) or a delete."""

    name: str
    value: str
    flags: str
    timestamp: int
    deleted: bool


@final
class GuestProperties:
    """The short calls of the property service on one channel; see :func:`open_guest_properties`."""

    def __init__(self, device: Device, channel: HgcmChannel) -> None:
        self._device = device
        self._channel = channel
        # The slots are a counter and a parking lot rather than a trio.Semaphore, whose
        # acquire_nowait and release cost four Python calls on every get.
        self._free_slots = channel.max_pending
        """Short calls that may start now; beyond the host's per-client limit they queue."""
        self._queue = trio.lowlevel.ParkingLot()
        """Callers waiting for a slot, first come first served."""
        self._queued = 0
        """Callers in :attr:`_queue`, or cancelled there and not yet gone (never fewer)."""
        # An agent reads the same few properties over and over: checking and encoding
        # each get anew was a fifth of the agent's work on it.
        self._prepared_get = functools.lru_cache(maxsize=GETS_PREPARED)(
            functools.partial(_prepare_get_on, channel)
        )
        """GET_PROP of a name, prepared on first use and kept."""
        self._prepare = functools.partial(_prepare_short_on, channel)
        """A short call, prepared on the client's channel."""

    @property
    def channel(self) -> HgcmChannel:
        """The channel of the short calls."""
        return self._channel

    def get(self, name: str) -> Coroutine[Any, Any, Property | None]:
        """Return the property ``name`` (await the result), or None when the host has none
        of that name.

        A plain function returning the GET_PROP coroutine, so that no frame of its own lies
        under every get, which the transport's checkpoint suspends and resumes through.
        """
        return _get(self._short_call, self._prepared_get, name)

    async def set(self, name: str, value: str, flags: str | None = None) -> int:
        """Set ``name`` to ``value``; its flags become ``flags`` (none when omitted).

        The service replaces the flags on every set; without ``flags`` the two-parameter
        SET_PROP_VALUE is sent, which resets them. Returns the service's status: a success,
        but ``VINF_PERMISSION_DENIED`` when the host made every property read-only for the
        guest and ignored the write (VBoxControl reports that as success too).
        """
        function, params = set_params(name, value, flags)
        return (await self._short_call(self._prepare(function, *params))).status

    async def delete(self, name: str) -> int:
        """Delete ``name``; deleting a property that does not exist succeeds.

        Returns the service's status, as :meth:`set` does.
        """
        delete = self._prepare(GuestFunction.DEL_PROP, name_param(name))
        return (await self._short_call(delete)).status

    async def enumerate(self, patterns: Sequence[str] = ()) -> list[Property]:
        """Return the properties whose names match any of ``patterns`` (all when empty)."""
        return await _enumerate(self._short_call, self._prepare, patterns)

    async def wait(self, patterns: Sequence[str] = ()) -> PropertyChange:
        """Wait, on a channel of its own, for the next change of a matching property.

        Bound it with a cancel scope; cancelling closes the channel, which ends the wait at
        the host. A delete of a property that did not exist when the wait began is no news:
        the host cannot tell one set and deleted since from one deleted just before. A
        deadline that expires while the channel is being closed, after the change came,
        loses it: a caller that must not lose it reads :meth:`watch` inside its block.
        """
        async with self.watch(patterns, unseen_deletes=False) as watch:
            return await watch.next()

    @asynccontextmanager
    async def watch(
        self,
        patterns: Sequence[str] = (),
        *,
        unseen_deletes: bool = True,
        pump: EventPump | None = None,
    ) -> AsyncIterator[PropertyWatch]:
        """Follow the changes of matching properties; see :func:`open_property_watch`."""
        async with open_property_watch(
            self._device, patterns, unseen_deletes=unseen_deletes, pump=pump
        ) as watch:
            yield watch

    async def _short_call(self, prepared: PreparedCall) -> HgcmReply:
        # A free slot is taken without yielding (the call itself checkpoints); only a
        # caller that has to queue waits.
        if self._free_slots:
            self._free_slots -= 1
        else:
            await self._wait_for_slot()
        try:
            return await self._channel.call_prepared(prepared)
        finally:
            # The slot goes to the first caller waiting, if any, else back to the free ones.
            if not (self._queued and self._queue.unpark()):
                self._free_slots += 1

    async def _wait_for_slot(self) -> None:
        """Wait until a finished call hands its slot over."""
        self._queued += 1
        try:
            await self._queue.park()
        finally:
            self._queued -= 1


@final
class PropertyWatch:
    """The changes of the properties matching some patterns, oldest first.

    ``async for change in watch`` (or :meth:`next`, from one task at a time) yields each
    change once, as the host queued it: a set to the value a property already has is a
    change too (a host poking a trigger property). The stream has no gap while the host's
    queue holds the watch's place; where it does not (below), what the watch missed is
    yielded as a snapshot's differences, which keep only the last value of each property
    and cannot show a poke.

    The watch opens from a snapshot: a listing of every property, whose newest timestamp
    is the watch's place in the host's queue of changes (the *cursor*: it goes on after
    the change stamped so), and whose properties matching the watch's patterns (matched
    here, as the service matches them) are what stands. The queue is in the order
    the changes were made, but its stamps are neither unique nor in order: a clock may go
    back, upstream stamps its start-up properties T, T+1, T+2 and then counts from its
    clock again, and a change stamped as the one queued before it is queued one later (the
    property keeps the stamp). So changes made before the snapshot may come after the
    cursor, and each property the snapshot showed has a *mark*, the stamp of the change
    it showed, to tell them. A queued change of a marked name is:

    - stamped as the mark: that change, skipped, and every later one is news;
    - stamped one past it: that change queued one later while the property still bears
      the mark (a GET_PROP), skipped; else its next change (a coarse clock stamps it so);
    - stamped before it: an older change, skipped, while the property bears a stamp at or
      after the mark; gone, or stamped before it (the clock went back), the change may
      follow the marked one and is news;
    - stamped otherwise: news.

    The reader never sees the first snapshot, so what it shows of a change made after the
    watch began is news: a mark is the stamp the first snapshot found, and a property that
    snapshot did not hold has none (a set made while a wait starts is the wait's change). A
    later snapshot (a resync, below) is reported, so its marks are the stamps it shows.
    With a clock going back an older value may be yielded again; no change is lost and
    the last one yielded per name is what the host holds.

    It keeps following across what would otherwise lose changes:

    - a change too large for the buffer (``VERR_BUFFER_OVERFLOW``): asked again with the
      size the host reported; one stamped as the watch's place (a coarse clock), which
      the host would skip when asked again, is shown by a snapshot instead;
    - the host completing the wait early (``VERR_INTERRUPTED``: an identical wait of the
      same client, or the client's disconnect at the host): asked again;
    - missed changes (``VWRN_NOT_FOUND``: the host no longer knows the place the watch
      asked for, after a restore or when more than 256 changes went by): the change that
      came (the oldest the host holds, or the first new one if the wait waited) is judged
      as any other, then a new snapshot is the truth: a set for each matching property
      that differs from what the watch knows, a delete for each it knows that is gone,
      and new marks. They are yielded with that change by timestamp (the deletes, which
      have none, last), so the stream's stamps rise unless the host's clock went back; a
      change stamped after the snapshot's set of its name is dropped. The host answers
      ``VWRN_NOT_FOUND`` only with a matching change: a wait whose place is gone *waits*
      for one (the new service instance's queue after a restore holds none of the
      changes before it, and Main's reload of the properties queues none), and the
      protocol cannot tell that wait from one with nothing to report. Until the next
      matching change the watch does not see the gap, unless it was given the event
      ``pump``: a ``RESTORED`` event ends the wait and takes a snapshot at once. More
      than 256 changes of any names between two waits (eviction from the host's queue,
      ``GUEST_PROP_MAX_GUEST_NOTIFICATIONS``) send no event: that gap stays until the
      next matching change, and so does a change too large for the buffer that was
      evicted before the retry;
    - the client vanishing (``VERR_HGCM_INVALID_CLIENT_ID``, also during a snapshot: the
      host no longer knows the client, which a running guest should not see): a new
      channel is connected, the old one closed, then as for missed changes.

    A host that ends :data:`FRUITLESS_WAITS` waits in a row without a change (any of the
    above but a large change) makes ``next()`` raise ``RemoteProtocolError`` naming the
    status, rather than ask again at full speed for ever.

    Closing the watch (leaving its block) while another task waits in ``next()`` ends that
    wait with ``trio.ClosedResourceError``, as a later ``next()`` does: the close's
    disconnect ends the wait at the host, and the watch asks nothing more on the channel
    being closed.

    Every call goes through the watch's own channel. A property set and deleted before the
    watch reads its changes comes as a delete (the host marks a set as one when the
    property is gone by then), and a delete of a name the watch knows is gone is skipped.
    It knows the last :data:`MAX_GUEST_NOTIFICATIONS` names gone, as deep as the host's
    queue, which could still hold a delete of them; an older one's second delete, should
    the host still send it, is yielded again (a watch over names that come and go kept
    every name ever deleted).
    Of a property the watch never knew, that delete is yielded unless ``unseen_deletes``
    is false: the host's queue after the snapshot's place may hold deletes of properties
    gone before the watch opened. A queued delete read after the name was set again comes
    as a set with an empty value and flags: the host computes the deleted flag from the
    property's state when it answers, not when the change was made.

    A property named "" (any guest process may set one with a two-byte name buffer, which
    the host takes) is followed as any other where the watch's patterns match "" as the
    host matches them (no patterns, ``*``, an empty alternative in ``a||b``); other
    patterns never see it, in a snapshot or from the host. That name, and a name holding
    bytes Python cannot decode (kept as surrogate escapes), are read back byte for byte
    when the watch asks a property's stamp.
    """

    def __init__(
        self,
        device: Device,
        patterns: bytes,
        *,
        unseen_deletes: bool = True,
        pump: EventPump | None = None,
    ) -> None:
        self._device = device
        self._unseen_deletes = unseen_deletes
        self._patterns = patterns
        self._pump = pump
        self._stack = AsyncExitStack()
        """The current channel's; closed (and replaced) when the host dropped the client."""
        self._subscription = ExitStack()
        self._restores: Subscription | None = None
        """The pump's RESTORED events, from before the first snapshot on (None: no pump)."""
        self._channel: HgcmChannel
        self._cursor = 0
        """The timestamp of the change the next wait goes on from (0: the next new one)."""
        self._cursor_unproven = False
        """Whether the cursor came from a snapshot and no answer has shown the host has it."""
        self._known: dict[str, tuple[str, str]] = {}
        """Per name that exists, the value and flags last yielded or seen."""
        self._gone: dict[str, None] = {}
        """The names known gone, oldest first, the last MAX_GUEST_NOTIFICATIONS (kept only
        where ``unseen_deletes``: without it a delete of a name not known is skipped anyway)."""
        self._marks: dict[str, int] = {}
        """Per name, the timestamp of the last change a snapshot showed, until it is passed."""
        self._backlog: list[PropertyChange] = []
        """Changes judged news and not yet yielded."""
        self._resync_due = False
        """Whether changes may have been missed and no snapshot has been taken since."""
        self._fruitless = 0
        """Waits the host ended in a row without a change, none yielded since."""
        self._reading = False
        self._closed = False
        """Whether the block began to exit: the watch sends nothing more from then on."""
        self.resyncs = 0
        """Times the watch took a new snapshot because changes were missed."""

    async def __aenter__(self) -> Self:
        if self._pump is not None:
            subscription = self._pump.subscribe("property-watch", Event.RESTORED)
            self._restores = self._subscription.enter_context(subscription)
        try:
            await self._connect(self._stack)
            try:
                await self._snapshot(first=True)
            except BaseException as exc:
                await self._stack.__aexit__(type(exc), exc, exc.__traceback__)
                raise
        except BaseException:
            self._subscription.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._closed = True
        try:
            return bool(await self._stack.__aexit__(exc_type, exc_value, traceback))
        finally:
            self._subscription.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> PropertyChange:
        return await self.next()

    async def next(self) -> PropertyChange:
        """Return the next change, waiting for it as long as it takes.

        Raises:
            RemoteProtocolError: the host ended :data:`FRUITLESS_WAITS` waits in a row
                without a change, or sent a malformed reply.
            trio.ClosedResourceError: the watch was closed, before or during the call.
            trio.BusyResourceError: another task is in ``next()``. A watch has one reader:
                a second one's wait would end the first's (an identical wait of the same
                client), and each reader's next wait the other's, endlessly.
        """
        self._check_open()
        if self._reading:
            msg = "another task is already reading this property watch"
            raise trio.BusyResourceError(msg)
        self._reading = True
        try:
            while self._resync_due or not self._backlog:
                await self._fetch()
            self._fruitless = 0
            return self._backlog.pop(0)
        finally:
            self._reading = False

    async def _take(self, change: PropertyChange) -> None:
        """Queue ``change`` to be yielded if it is news, and know it."""
        name = change.name
        mark = self._marks.get(name)
        if mark is not None:
            stamp = change.timestamp
            if stamp == mark or (stamp == mark + 1 and await self._stamp(name) == mark):
                del self._marks[name]  # the change the snapshot showed
                return
            if stamp < mark and (now := await self._stamp(name)) is not None and now >= mark:
                return
            del self._marks[name]
        elif change.deleted and (
            name in self._gone or (name not in self._known and not self._unseen_deletes)
        ):
            return
        self._know(name, None if change.deleted else (change.value, change.flags))
        self._backlog.append(change)

    def _know(self, name: str, state: tuple[str, str] | None) -> None:
        """Know ``name`` as ``state`` (None: gone); a gone name is remembered only while the
        host's queue could still hold a delete of it (the last MAX_GUEST_NOTIFICATIONS)."""
        self._gone.pop(name, None)
        if state is not None:
            self._known[name] = state
            return
        self._known.pop(name, None)
        if self._unseen_deletes:
            self._gone[name] = None
            if len(self._gone) > MAX_GUEST_NOTIFICATIONS:
                del self._gone[next(iter(self._gone))]

    async def _stamp(self, name: str) -> int | None:
        """``name``'s timestamp now (a GET_PROP); None when it is gone, or the client is."""
        try:
            prop = await _get(self._short_call, self._prepare_get, name)
        except HgcmCallError as exc:
            if exc.rc != VERR_HGCM_INVALID_CLIENT_ID:
                raise
            self._resync_due = True  # reconnects at the next wait
            return None
        return None if prop is None else prop.timestamp

    async def _connect(self, stack: AsyncExitStack) -> None:
        channel_cm = open_hgcm_channel(self._device, SERVICE_NAME)
        self._channel = await stack.enter_async_context(channel_cm)

    async def _reconnect(self) -> None:
        """Connect a new channel, then close the one whose client the host dropped.

        Cancelled while connecting, the watch keeps the old channel, whose next call fails
        the same way and reconnects again. Closed while connecting, it closes the new one
        (the block's exit closes only the channel it found), and a connect that fails then
        ends the read as closed, like a call.
        """
        self._check_open()
        stack = AsyncExitStack()
        try:
            await self._connect(stack)
        except HOST_ERRORS as exc:
            self._check_open(exc)
            raise
        if self._closed:
            await stack.aclose()
            self._check_open()
        stack, self._stack = self._stack, stack
        await stack.aclose()

    async def _fetch(self) -> None:
        if self._restored() or self._resync_due:  # a restore, or a resync was cancelled
            await self._snapshot()
            return
        size = NOTIFICATION_BUFFER_SIZE
        for _ in range(SIZE_RETRIES):
            try:
                reply = await self._wait(size)
            except HgcmCallError as exc:
                if exc.rc == VERR_BUFFER_OVERFLOW and self._cursor not in {
                    0,
                    _u64(exc.reply.params[1]),
                }:
                    size = _needed_size(exc, 3, GuestFunction.GET_NOTIFICATION, size)
                    continue
                if exc.rc in _WAIT_ENDINGS:
                    self._fruitless += 1
                    if self._fruitless >= FRUITLESS_WAITS:
                        msg = (
                            f"GET_NOTIFICATION: the host ended {self._fruitless} waits in a "
                            f"row without a change, the last with {exc.name}"
                        )
                        raise RemoteProtocolError(msg) from exc
                await self._recover(exc)
                return
            if reply is None:  # a restore ended the wait: next() resyncs (_resync_due)
                return
            self._fruitless = 0
            change = _notification(reply)
            unproven = self._cursor_unproven
            await self._take(change)
            self._cursor, self._cursor_unproven = change.timestamp, False
            if reply.status == VWRN_NOT_FOUND:
                # The host did not know the place: it answered with the oldest change it
                # holds (or the first after a restore). A snapshot, taken after it, shows
                # what stands; its differences and this change are yielded by timestamp.
                # If the place was a snapshot's (its property predates the queue, or the
                # clock went back), go on from this change, which the queue holds; the
                # marks skip what the snapshot showed.
                await self._resync(change.timestamp if unproven else None)
            return
        _still_too_small(GuestFunction.GET_NOTIFICATION)

    async def _recover(self, exc: HgcmCallError) -> None:
        """Continue after a failed wait, or re-raise what cannot be recovered from."""
        if exc.rc == VERR_BUFFER_OVERFLOW:
            # A wait for the next new change (cursor 0), or from a cursor stamped as this
            # change (a coarse clock), cannot ask for it again: a retry would wait for the
            # one after. The snapshot shows it if it stands.
            await self._resync(_u64(exc.reply.params[1]))
        elif exc.rc == VERR_INTERRUPTED:
            log.debug("property_wait_interrupted")
        elif exc.rc == VERR_HGCM_INVALID_CLIENT_ID:
            log.info("property_watch_reconnecting")
            self._resync_due = True
            await self._reconnect()
            await self._snapshot()
        else:
            raise exc

    async def _resync(self, cursor: int | None) -> None:
        """Take a new snapshot, then go on from ``cursor`` (None: the snapshot's place).

        Until the snapshot is taken the watch goes on from ``cursor`` but takes one first.
        """
        if cursor is not None:
            self._cursor, self._cursor_unproven = cursor, False
        self._resync_due = True
        await self._snapshot()
        if cursor is not None:
            self._cursor, self._cursor_unproven = cursor, False

    def _restored(self) -> bool:
        """Take a RESTORED event that came meanwhile; True (and a resync due) if one did."""
        if self._restores is None:
            return False
        try:
            self._restores.receive_nowait()
        except trio.WouldBlock:
            return False
        self._note_restore()
        return True

    def _note_restore(self) -> None:
        log.info("property_watch_restored")
        self._resync_due = True

    async def _wait(self, size: int) -> HgcmReply | None:
        """One wait (:meth:`_call`), ended by a RESTORED event: None if it ended so.

        A reply that came with the event is returned, and the resync stays due: ``next()``
        takes the snapshot before it yields anything.
        """
        restores = self._restores
        if restores is None:
            return await self._call(size)
        reply: HgcmReply | None = None
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._end_wait_on_restore, restores, nursery.cancel_scope)
            try:
                reply = await self._call(size)
            except Exception as exc:  # noqa: BLE001 - raised below, not in an exception group
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return reply

    async def _end_wait_on_restore(self, restores: Subscription, scope: trio.CancelScope) -> None:
        await restores.receive()
        self._note_restore()
        scope.cancel()

    @property
    def channel(self) -> HgcmChannel:
        """The watch's own channel (a new one after the host dropped the client)."""
        return self._channel

    def _prepare(self, function: int, *params: HgcmParam) -> PreparedCall:
        """A short call (ENUM_PROPS) on the watch's channel, which a reconnect replaces."""
        return _prepare_short_on(self._channel, function, *params)

    def _prepare_get(self, name: str) -> PreparedCall:
        """GET_PROP of ``name``, a name the watch listed, on the watch's channel, sent as
        the host holds it (:func:`_held_name_param`)."""
        return _prepare_get_with(self._channel, _held_name_param(name))

    async def _short_call(self, prepared: PreparedCall) -> HgcmReply:
        """Make a short call the watch prepared on its channel."""
        self._check_open()
        try:
            return await self._channel.call_prepared(prepared)
        except HOST_ERRORS as exc:
            self._check_open(exc)
            raise

    async def _call(self, size: int) -> HgcmReply:
        """One GET_NOTIFICATION on the watch's channel.

        A cancelled wait (a ``next()`` under a timeout) stays at the host only until the
        client's next wait with the same patterns, which ends it, or the next matching
        change; every wait of the watch has the same patterns, so at most one lingers and
        the channel need not keep counting it (it would refuse the 16th ``next()``).

        A wait that fails once the watch is closed was ended by the close (its disconnect
        or its session's), which another task began meanwhile.
        """
        self._check_open()
        try:
            return await self._channel.call(
                GuestFunction.GET_NOTIFICATION,
                HgcmBufferIn(self._patterns),
                HgcmU64(self._cursor),
                HgcmBufferOut(size),
                HgcmU32(0),
                lingers_when_cancelled=False,
            )
        except HOST_ERRORS as exc:
            self._check_open(exc)
            raise

    def _check_open(self, cause: BaseException | None = None) -> None:
        """Raise trio.ClosedResourceError (from ``cause``) if the watch was closed.

        Checked before each call, in the step that sends it: a call sent once the close
        began would name a client the close disconnects, or already did.
        """
        if self._closed:
            msg = "the property watch was closed"
            raise trio.ClosedResourceError(msg) from cause

    async def _snapshot(self, *, first: bool = False) -> None:
        """Take a snapshot, connecting again if the host drops the client meanwhile."""
        for _ in range(SNAPSHOT_TRIES - 1):
            try:
                return await self._take_snapshot(first=first)
            except HgcmCallError as exc:
                if exc.rc != VERR_HGCM_INVALID_CLIENT_ID:
                    raise
            log.info("property_watch_reconnecting")
            await self._reconnect()
        return await self._take_snapshot(first=first)

    async def _take_snapshot(self, *, first: bool) -> None:
        """List every property: the newest timestamp is the cursor, and the properties
        matching the watch's patterns, matched here as the service matches them, are what
        stands (ENUM_PROPS would refuse a pattern list over 1023 bytes, which a wait takes).

        The first snapshot makes the watch know them as the listing found them, each marked
        with its timestamp there. A later one (a resync) queues a set for each that
        differs from what the watch knows and a delete for each property the watch knows
        that is gone, and marks each with its timestamp.
        """
        everything = await _enumerate(self._short_call, self._prepare)
        latest = max((prop.timestamp for prop in everything), default=0)
        patterns = self._patterns[:-1]
        current = []
        for prop in everything:
            # A wait's pattern list may hold thousands of alternatives: matching every
            # property against them takes seconds, and the caller's deadline must end it.
            await trio.lowlevel.checkpoint()
            if patterns_match(patterns, host_bytes(prop.name)):
                current.append(prop)
        self._cursor, self._cursor_unproven = latest, latest != 0
        self._resync_due = False
        if first:
            # Unreported: a change made since the listing is news.
            self._marks = {prop.name: prop.timestamp for prop in current}
            self._known = {prop.name: (prop.value, prop.flags) for prop in current}
            self._gone = {}
            return
        self._marks = {prop.name: prop.timestamp for prop in current}
        self.resyncs += 1
        log.info("property_watch_resync", resyncs=self.resyncs)
        changes: list[PropertyChange] = []
        for name in list(self._known):
            if name not in self._marks:
                self._know(name, None)
                changes.append(PropertyChange(name, "", "", latest, deleted=True))
        for prop in current:
            if self._known.get(prop.name) != (prop.value, prop.flags):
                self._know(prop.name, (prop.value, prop.flags))
                changes.append(
                    PropertyChange(prop.name, prop.value, prop.flags, prop.timestamp, deleted=False)
                )
        # All are yielded oldest first (a delete, which has no stamp, as the newest), the
        # snapshot's after the changes not yet yielded that came before it: one of those
        # stamped after the snapshot's change of its name (the clock went back) is dropped.
        stamps = {change.name: change.timestamp for change in changes}
        backlog = [
            change
            for change in self._backlog
            if change.timestamp <= stamps.get(change.name, change.timestamp)
        ]
        backlog.extend(changes)
        backlog.sort(key=_timestamp)
        self._backlog = backlog


def _timestamp(change: PropertyChange) -> int:
    return change.timestamp


@asynccontextmanager
async def open_guest_properties(device: Device) -> AsyncIterator[GuestProperties]:
    """Connect to the host's property service; yield the client; disconnect on exit."""
    async with open_hgcm_channel(device, SERVICE_NAME) as channel:
        yield GuestProperties(device, channel)


@asynccontextmanager
async def open_property_watch(
    device: Device,
    patterns: Sequence[str] = (),
    *,
    unseen_deletes: bool = True,
    pump: EventPump | None = None,
) -> AsyncIterator[PropertyWatch]:
    """Follow the changes of the properties matching ``patterns`` (all when empty) on a
    channel of the watch's own; see :class:`PropertyWatch`. No other client is connected,
    so a deadline around the block bounds the watch's connect too."""
    raw = wait_patterns(patterns)
    async with PropertyWatch(device, raw, unseen_deletes=unseen_deletes, pump=pump) as watch:
        yield watch


async def keep_guest_properties(
    device: Device, stack: AsyncExitStack, connects: LastingFailure
) -> tuple[GuestProperties | None, bool]:
    """A client of the property service kept open on ``stack``, or None if the host refused
    it; ``connects`` counts and logs the refusal when it begins, changes and ends
    (``property_service_unavailable``). Also whether that changed what ``connects`` shows."""
    try:
        props = await stack.enter_async_context(open_guest_properties(device))
    except HOST_ERRORS as exc:
        return None, connects.host_failed("property_service_unavailable", exc)
    return props, connects.succeeded()


def _prepare_short_on(channel: HgcmChannel, function: int, *params: HgcmParam) -> PreparedCall:
    """A short call prepared (checked and encoded) on ``channel``: the driver's timeout, and
    no lingering once cancelled."""
    return channel.prepare_with(
        function, params, lingers_when_cancelled=False, timeout_ms=SHORT_CALL_TIMEOUT_MS
    )


def _prepare_get_on(channel: HgcmChannel, name: str) -> PreparedCall:
    """GET_PROP of ``name`` on ``channel``, with the buffer that holds any value and flags."""
    return _prepare_get_with(channel, name_param(name))


def _prepare_get_with(channel: HgcmChannel, name_buffer: HgcmBufferIn) -> PreparedCall:
    """GET_PROP of the name in ``name_buffer`` on ``channel``, as :func:`_prepare_get_on`."""
    return _prepare_short_on(channel, _GET_PROP, name_buffer, _VALUE_BUFFER, _ZERO_U64, _ZERO_U32)


def _held_name_param(name: str) -> HgcmBufferIn:
    """``name``, which the host listed, as the host holds it: byte for byte, unchecked, so
    names the client would not send of its own accord are read back as they are: ""
    (:data:`_EMPTY_NAME`), and one the host loaded at power-on past a guest's limits."""
    return HgcmBufferIn(host_bytes(name) + b"\0") if name else _EMPTY_NAME


async def _get(
    call: _Caller, prepare_get: Callable[[str], PreparedCall], name: str
) -> Property | None:
    """GET_PROP of ``name``, as ``prepare_get`` prepares it (with a buffer of
    :data:`VALUE_BUFFER_SIZE`), through ``call``; asked again with a larger buffer when needed."""
    get_prop = prepare_get(name)
    size = VALUE_BUFFER_SIZE
    for _ in range(SIZE_RETRIES):
        try:
            reply = await call(get_prop)
        except HgcmCallError as exc:
            if exc.rc == VERR_NOT_FOUND:
                return None
            size = _needed_size(exc, 3, GuestFunction.GET_PROP, size)
            get_prop = get_prop.with_param(1, HgcmBufferOut(size))
            continue
        value, flags, _ = _strings(reply.params[1], reply.params[3], 2)
        return Property(name, value, flags, _u64(reply.params[2]))
    return _still_too_small(GuestFunction.GET_PROP)


async def _enumerate(
    call: _Caller, prepare: _Preparer, patterns: Sequence[str] = ()
) -> list[Property]:
    """ENUM_PROPS through ``call``, asked again when needed with a buffer
    :data:`ENUM_SPARE_ROOM` larger than the size the host asked for, :data:`ENUM_TRIES`
    calls at most.

    Raises:
        PropertiesGrowingError: every call's buffer was too small.
    """
    raw_patterns = enum_patterns(patterns)
    size = ENUM_BUFFER_SIZE
    enum_props = prepare(
        GuestFunction.ENUM_PROPS, HgcmBufferIn(raw_patterns), HgcmBufferOut(size), HgcmU32(0)
    )
    needed = size
    for _ in range(ENUM_TRIES):
        try:
            reply = await call(enum_props)
        except HgcmCallError as exc:
            needed = _needed_size(exc, 2, GuestFunction.ENUM_PROPS, size)
            size = min(needed + ENUM_SPARE_ROOM, HGCM_MAX_USER_PARM)
            enum_props = enum_props.with_param(1, HgcmBufferOut(size))
            continue
        return _parse_enumeration(reply.params[1], reply.params[2])
    msg = (
        "ENUM_PROPS: the host's properties kept growing while they were listed: "
        f"{ENUM_TRIES} tries in a row outgrew the buffer (the last asked for {needed} bytes)"
    )
    raise PropertiesGrowingError(msg)


# --- arguments ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=NAME_PARAMS_CACHED)
def name_param(name: str) -> HgcmBufferIn:
    """``name`` as the calls send it (checked, NUL-terminated), kept for the next call.

    Kept because an agent writes the same few properties over and over: checking and
    encoding the name cost a quarter of encoding a SET_PROP. A name that is refused raises
    PropertyArgumentError every time (exceptions are not kept).
    """
    return HgcmBufferIn(encode_name(name))


def set_params(
    name: str, value: str, flags: str | None = None
) -> tuple[GuestFunction, tuple[HgcmParam, ...]]:
    """The function and parameters :meth:`GuestProperties.set` sends: SET_PROP_VALUE, or
    SET_PROP with ``flags``; raise PropertyArgumentError as that set would."""
    params = (name_param(name), HgcmBufferIn(encode_value(value)))
    if flags is None:
        return GuestFunction.SET_PROP_VALUE, params
    return GuestFunction.SET_PROP, (*params, HgcmBufferIn(canonical_flags(flags).encode() + b"\0"))


def enum_patterns(patterns: Sequence[str]) -> bytes:
    """The pattern list ENUM_PROPS sends; raise PropertyArgumentError as a listing would."""
    return encode_patterns(patterns, nul_separated=True)


def wait_patterns(patterns: Sequence[str]) -> bytes:
    """The pattern list a watch's waits send; raise PropertyArgumentError as a watch would."""
    return encode_patterns(patterns, nul_separated=False, max_size=MAX_WAIT_PATTERN_SIZE)


def canonical_flags(flags: str) -> str:
    """Return ``flags`` as the service prints them; raise PropertyArgumentError if unknown."""
    try:
        return format_flags(parse_flags(flags))
    except FlagsParseError as exc:
        raise PropertyArgumentError(str(exc)) from None


# --- replies ------------------------------------------------------------------------------


def _needed_size(exc: HgcmCallError, size_index: int, function: GuestFunction, sent: int) -> int:
    """The size a VERR_BUFFER_OVERFLOW reply asks for, after a ``sent``-byte buffer; re-raise
    any other failure.

    Raises:
        HgcmSizeError: a size the service cannot need. It answers VERR_BUFFER_OVERFLOW only
            for a buffer smaller than the size it reports, and a size over what one HGCM
            buffer carries (the drivers' 24 MiB) no guest can give. The property limits
            bound nothing here: the properties the host loads from the VM's settings at
            power-on (``setPropertyBlock``) are held to none of them.
    """
    if exc.rc != VERR_BUFFER_OVERFLOW:
        raise exc
    needed = exc.reply.params[size_index]
    if not isinstance(needed, HgcmU32):  # pragma: no cover - HgcmCall checks the types
        raise exc
    if needed.value <= sent:
        msg = (
            f"{function.name}: the host answered VERR_BUFFER_OVERFLOW asking for "
            f"{needed.value} bytes, no more than the {sent}-byte buffer it was given"
        )
        raise HgcmSizeError(msg)
    if needed.value > HGCM_MAX_USER_PARM:
        msg = (
            f"{function.name}: the host answered VERR_BUFFER_OVERFLOW asking for a "
            f"{needed.value}-byte buffer, over the {HGCM_MAX_USER_PARM} bytes one HGCM "
            "buffer carries"
        )
        raise HgcmSizeError(msg)
    return needed.value


class HgcmSizeError(RemoteProtocolError):
    """The host asked for a buffer size it cannot need, or for a larger one too often."""


class PropertiesGrowingError(RemoteProtocolError):
    """ENUM_PROPS' tries ran out while the host's properties outgrew every buffer: the host,
    or another guest process, added them faster than the listing could follow.

    No reply was malformed and a later listing may succeed; it is a RemoteProtocolError so
    that whatever outlives a failed host request (:data:`agent.protocol.HOST_ERRORS`)
    outlives this one too.
    """


def _still_too_small(function: GuestFunction) -> NoReturn:
    msg = f"{function.name}: the host asked for a larger buffer {SIZE_RETRIES} times in a row"
    raise HgcmSizeError(msg)


def _u64(value: HgcmValue) -> int:
    if not isinstance(value, HgcmU64):  # pragma: no cover - HgcmCall checks the types
        msg = f"expected a 64-bit parameter, got {value!r}"
        raise TypeError(msg)
    return value.value


def _strings(data: HgcmValue, size: HgcmValue, count: int) -> list[str]:
    """The first ``count`` NUL-terminated strings of the reported part of a buffer, then what
    follows them."""
    if not isinstance(data, HgcmData) or not isinstance(size, HgcmU32):  # pragma: no cover
        msg = "expected a buffer and its size"
        raise TypeError(msg)
    # Decoded at once: a NUL is never part of a UTF-8 sequence, so each string decodes as
    # it would on its own. Bytes IPRT takes and Python does not are kept as surrogate
    # escapes (which cost valid text nothing), so a name is never merged or changed.
    parts = host_str(data.data[: size.value]).split("\0", count)
    if len(parts) < count + 1:
        msg = f"the host returned {len(parts) - 1} strings where {count} belong"
        raise RemoteProtocolError(msg)
    return parts


def _notification(reply: HgcmReply) -> PropertyChange:
    """GET_NOTIFICATION's change: name, value, flags and whether the name is gone: '1', or
    '0', empty or absent (hosts older than the field) for not; anything else is a protocol
    error, as ``VbglR3GuestPropWait``'s VERR_PARSE_ERROR.

    The host marks a change as a delete when the property no longer exists at the time it
    answers, so a set that was followed by a delete before the guest read it comes as a
    delete too; a delete carries no value or flags.
    """
    name, value, flags, rest = _strings(reply.params[2], reply.params[3], 3)
    deleted = rest.partition("\0")[0]
    timestamp = _u64(reply.params[1])
    if deleted == "1":
        return PropertyChange(name, "", "", timestamp, deleted=True)
    if deleted not in {"", "0"}:
        msg = f"GET_NOTIFICATION: deleted flag {shown(deleted)} of {shown(name)} is not '0' or '1'"
        raise RemoteProtocolError(msg)
    return PropertyChange(name, value, flags, timestamp, deleted=False)


def _parse_enumeration(data: HgcmValue, size: HgcmValue) -> list[Property]:
    """ENUM_PROPS' buffer: name, value, decimal timestamp, flags, ..., four empty strings.

    The entry whose timestamp is empty ends the list: the service writes every property's
    in decimal, so it is never empty, while a name may be: a guest may set one named ""
    with a two-byte name buffer (``GuestPropValidateName`` checks the buffer's size, not
    the name's), which is listed as ``\\0value\\0timestamp\\0flags\\0``. Upstream's
    ``VbglR3GuestPropEnumNext`` takes an empty name for the end, so VBoxControl fails to
    list while such a property stands; here it is a property named "".
    """
    if not isinstance(data, HgcmData) or not isinstance(size, HgcmU32):  # pragma: no cover
        msg = "expected a buffer and its size"
        raise TypeError(msg)
    parts = data.data[: size.value].split(b"\0")
    props: list[Property] = []
    for index in range(0, len(parts) - 3, 4):
        name, value, timestamp, flags = parts[index : index + 4]
        if not timestamp:
            if name or value or flags:  # VbglR3GuestPropEnumNext: VERR_PARSE_ERROR
                msg = (
                    f"ENUM_PROPS: the entry without a timestamp, which ends the list, has "
                    f"name {shown(name)}, value {shown(value)} and flags {shown(flags)}, "
                    "not empty ones"
                )
                raise RemoteProtocolError(msg)
            return props
        if not (timestamp.isdigit() and len(timestamp) <= _U64_DIGITS) or int(timestamp) > _U64_MAX:
            msg = f"ENUM_PROPS: timestamp {shown(timestamp)} of {shown(name)} is not a decimal u64"
            raise RemoteProtocolError(msg)
        props.append(
            Property(
                host_str(name),
                host_str(value),
                host_str(flags),
                int(timestamp),
            )
        )
    msg = "ENUM_PROPS: the list does not end with four empty strings"
    raise RemoteProtocolError(msg)
