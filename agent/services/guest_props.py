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
``VERR_TOO_MUCH_DATA``), pattern lists up to 1023 bytes, known flag names. What the
host refuses (read-only properties, the 256-property cap) raises ``HgcmCallError`` with the
VBox status's name.
"""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn, Self, final

import structlog
import trio

from agent.protocol import RemoteProtocolError
from agent.protocol.guest_props import (
    MAX_FLAGS_SIZE,
    MAX_NAME_SIZE,
    MAX_VALUE_SIZE,
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
from agent.protocol.status import (
    VERR_BUFFER_OVERFLOW,
    VERR_HGCM_INVALID_CLIENT_ID,
    VERR_INTERRUPTED,
    VERR_NOT_FOUND,
    VWRN_NOT_FOUND,
)
from agent.protocol.wire import shown
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
    from collections.abc import AsyncIterator, Sequence

    from agent.device import Device
    from agent.services.hgcm import HgcmChannel, HgcmParam, HgcmReply, HgcmValue

log = structlog.get_logger(__name__)

VALUE_BUFFER_SIZE: Final = MAX_VALUE_SIZE + MAX_FLAGS_SIZE
"""GET_PROP's buffer: the largest value and flags a 7.0 host returns, so one call does."""
NOTIFICATION_BUFFER_SIZE: Final = MAX_NAME_SIZE + VALUE_BUFFER_SIZE + 2
"""GET_NOTIFICATION's buffer: name, value, flags and the deleted flag."""
ENUM_BUFFER_SIZE: Final = 4096
"""ENUM_PROPS' first buffer; a larger one is asked for with the size the host reports."""
SIZE_RETRIES: Final = 4
"""Times a call is repeated with the size the host asked for (properties may keep growing)."""
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_U64_DIGITS: Final = len(str(_U64_MAX))
"""Digits of the largest timestamp: a longer one is refused before ``int`` reads it (Python
refuses over 4300 digits with a ValueError that would read as a usage error)."""
_VALUE_BUFFER: Final = HgcmBufferOut(VALUE_BUFFER_SIZE)
_ZERO_U64: Final = HgcmU64(0)
_ZERO_U32: Final = HgcmU32(0)
"""Parameters every GET_PROP sends the same (frozen, so shared)."""


@dataclass(frozen=True, slots=True)
class Property:
    """A property as the host holds it; ``timestamp`` is the host's ns of its last change."""

    name: str
    value: str
    flags: str
    timestamp: int


@dataclass(frozen=True, slots=True)
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
        self._slots = trio.Semaphore(channel.max_pending)
        """Short calls beyond the host's per-client limit queue here instead of failing."""

    @property
    def channel(self) -> HgcmChannel:
        """The channel of the short calls."""
        return self._channel

    async def get(self, name: str) -> Property | None:
        """Return the property ``name``, or None when the host has none of that name."""
        name_param = HgcmBufferIn(encode_name(name))
        value_buffer = _VALUE_BUFFER
        for _ in range(SIZE_RETRIES):
            try:
                reply = await self._short_call(
                    GuestFunction.GET_PROP, name_param, value_buffer, _ZERO_U64, _ZERO_U32
                )
            except HgcmCallError as exc:
                if exc.rc == VERR_NOT_FOUND:
                    return None
                value_buffer = HgcmBufferOut(_needed_size(exc, 3))
                continue
            value, flags = _strings(reply.params[1], reply.params[3], 2)
            return Property(name, value, flags, _u64(reply.params[2]))
        return _still_too_small(GuestFunction.GET_PROP)

    async def set(self, name: str, value: str, flags: str | None = None) -> None:
        """Set ``name`` to ``value``; its flags become ``flags`` (none when omitted).

        The service replaces the flags on every set; without ``flags`` the two-parameter
        SET_PROP_VALUE is sent, which resets them.
        """
        params: list[HgcmParam] = [
            HgcmBufferIn(encode_name(name)),
            HgcmBufferIn(encode_value(value)),
        ]
        function = GuestFunction.SET_PROP_VALUE
        if flags is not None:
            params.append(HgcmBufferIn(canonical_flags(flags).encode() + b"\0"))
            function = GuestFunction.SET_PROP
        await self._short_call(function, *params)

    async def delete(self, name: str) -> None:
        """Delete ``name``; deleting a property that does not exist succeeds."""
        await self._short_call(GuestFunction.DEL_PROP, HgcmBufferIn(encode_name(name)))

    async def enumerate(self, patterns: Sequence[str] = ()) -> list[Property]:
        """Return the properties whose names match any of ``patterns`` (all when empty)."""
        raw_patterns = encode_patterns(patterns, nul_separated=True)
        size = ENUM_BUFFER_SIZE
        for _ in range(SIZE_RETRIES):
            try:
                reply = await self._short_call(
                    GuestFunction.ENUM_PROPS,
                    HgcmBufferIn(raw_patterns),
                    HgcmBufferOut(size),
                    HgcmU32(0),
                )
            except HgcmCallError as exc:
                size = _needed_size(exc, 2)
                continue
            return _parse_enumeration(reply.params[1], reply.params[2])
        return _still_too_small(GuestFunction.ENUM_PROPS)

    async def wait(self, patterns: Sequence[str] = ()) -> PropertyChange:
        """Wait, on a channel of its own, for the next change of a matching property.

        Bound it with a cancel scope; cancelling closes the channel, which ends the wait at
        the host. A delete of a property that did not exist when the wait began is no news:
        the host cannot tell one set and deleted since from one deleted just before.
        """
        async with self.watch(patterns, unseen_deletes=False) as watch:
            return await watch.next()

    @asynccontextmanager
    async def watch(
        self, patterns: Sequence[str] = (), *, unseen_deletes: bool = True
    ) -> AsyncIterator[PropertyWatch]:
        """Follow the changes of matching properties; see :class:`PropertyWatch`."""
        raw = encode_patterns(patterns, nul_separated=False)
        async with AsyncExitStack() as stack:
            watch = PropertyWatch(self, raw, stack, unseen_deletes=unseen_deletes)
            await watch.connect()
            await watch.start_from(
                await self.enumerate(patterns),
                latest=max((prop.timestamp for prop in await self.enumerate()), default=0),
            )
            yield watch

    async def _short_call(self, function: GuestFunction, *params: HgcmParam) -> HgcmReply:
        # A free slot is taken without yielding (the call itself checkpoints); only a
        # caller that has to queue waits in the semaphore.
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            return await self._channel.call(function, *params, lingers_when_cancelled=False)
        finally:
            self._slots.release()


@final
class PropertyWatch:
    """The changes of the properties matching some patterns, oldest first, without gaps.

    ``async for change in watch`` (or :meth:`next`, from one task at a time) yields each
    change once. It keeps following across what would otherwise lose changes:

    - a change too large for the buffer (``VERR_BUFFER_OVERFLOW``): asked again with the
      size the host reported;
    - the host completing the wait early (``VERR_INTERRUPTED``: an identical wait of the
      same client, a VM reset): asked again;
    - missed changes (``VWRN_NOT_FOUND``: the host no longer knows the last timestamp seen,
      after a restore or when more than 256 changes went by): the matching properties are
      enumerated and those changed since the last change seen are yielded, plus a delete
      for each property the watch reported that is gone;
    - the client vanishing (``VERR_HGCM_INVALID_CLIENT_ID`` after a VM reset): a new
      channel is connected, then as for missed changes.

    A property set and deleted before the watch reads its changes comes as a delete (the
    host marks a set as one when the property is gone by then). Of a property the watch
    never saw, that delete is yielded unless ``unseen_deletes`` is false: the host dates it
    after the newest property the watch started from, so it may as well predate the watch
    (a property deleted just before it opened).
    """

    def __init__(
        self,
        props: GuestProperties,
        patterns: bytes,
        stack: AsyncExitStack,
        *,
        unseen_deletes: bool = True,
    ) -> None:
        self._props = props
        self._unseen_deletes = unseen_deletes
        self._patterns = patterns
        self._stack = stack
        self._channel: HgcmChannel | None = None
        self._last_timestamp = self._opened_at = 0
        self._reported: dict[str, int | None] = {}
        """Per name, the timestamp of the last set yielded, or None after a delete."""
        self._backlog: list[PropertyChange] = []
        self._reading = False
        self.resyncs = 0
        """Times the watch enumerated because changes were missed."""

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> PropertyChange:
        return await self.next()

    async def start_from(self, matching: list[Property], *, latest: int) -> None:
        """Follow the changes after the host's ``latest`` change, knowing ``matching``.

        The first wait asks for the changes after ``latest`` (the newest timestamp the host
        showed), so nothing made after the watch opened can slip by. A change of a property
        in ``matching`` counts when newer than the timestamp it had there; one of any other
        name is skipped when the host dates it at or before ``latest`` (a delete of a
        property never seen: see the class's ``unseen_deletes``).
        """
        self._last_timestamp = self._opened_at = latest
        self._reported = {prop.name: prop.timestamp for prop in matching}

    async def connect(self) -> None:
        """Open the watch's own channel (again, after the host dropped the client)."""
        channel_cm = open_hgcm_channel(self._props._device, SERVICE_NAME)
        self._channel = await self._stack.enter_async_context(channel_cm)

    async def next(self) -> PropertyChange:
        """Return the next change, waiting for it as long as it takes.

        Raises:
            trio.BusyResourceError: another task is in ``next()``. A watch has one reader:
                a second one's wait would end the first's (an identical wait of the same
                client), and each reader's next wait the other's, endlessly.
        """
        if self._reading:
            msg = "another task is already reading this property watch"
            raise trio.BusyResourceError(msg)
        self._reading = True
        try:
            while True:
                while not self._backlog:
                    await self._fetch()
                change = self._backlog.pop(0)
                if self._is_new(change):
                    self._reported[change.name] = None if change.deleted else change.timestamp
                    return change
        finally:
            self._reading = False

    def _is_new(self, change: PropertyChange) -> bool:
        """Whether ``change`` is news: not older than what the watch knows of the name (a
        resync may have covered it), and of a name it never knew only if made after the
        watch opened."""
        if change.name not in self._reported:
            if change.timestamp <= self._opened_at:
                return False
            return self._unseen_deletes or not change.deleted
        reported = self._reported[change.name]
        if change.deleted:
            return reported is not None and reported <= change.timestamp
        return reported is None or reported < change.timestamp

    async def _fetch(self) -> None:
        size = NOTIFICATION_BUFFER_SIZE
        for _ in range(SIZE_RETRIES):
            try:
                reply = await self._call(size)
            except HgcmCallError as exc:
                if exc.rc == VERR_BUFFER_OVERFLOW and self._last_timestamp != 0:
                    size = _needed_size(exc, 3)
                    continue
                await self._recover(exc)
                return
            change = _notification(reply)
            caught_up = []
            if reply.status == VWRN_NOT_FOUND:
                caught_up = await self._resync(since=self._last_timestamp)
            # The enumeration shows what stands now, after this change: it comes last.
            self._backlog += [change, *caught_up]
            self._last_timestamp = change.timestamp
            return
        _still_too_small(GuestFunction.GET_NOTIFICATION)

    async def _recover(self, exc: HgcmCallError) -> None:
        """Continue after a failed wait, or re-raise what cannot be recovered from."""
        if exc.rc == VERR_BUFFER_OVERFLOW:
            # The first wait (timestamp 0) cannot ask for that change again: a retry would
            # wait for the next one. The enumeration shows it, if it still stands.
            timestamp = _u64(exc.reply.params[1])
            self._backlog += await self._resync(since=timestamp - 1)
            self._last_timestamp = timestamp
        elif exc.rc == VERR_INTERRUPTED:
            log.debug("property_wait_interrupted")
        elif exc.rc == VERR_HGCM_INVALID_CLIENT_ID:
            log.info("property_watch_reconnecting")
            await self.connect()
            self._backlog += await self._resync(since=self._last_timestamp)
        else:
            raise exc

    async def _call(self, size: int) -> HgcmReply:
        """One GET_NOTIFICATION on the watch's channel.

        A cancelled wait (a ``next()`` under a timeout) stays at the host only until the
        client's next wait with the same patterns, which ends it, or the next matching
        change; every wait of the watch has the same patterns, so at most one lingers and
        the channel need not keep counting it (it would refuse the 16th ``next()``).
        """
        if self._channel is None:  # pragma: no cover - connect() runs before the first call
            msg = "the property watch is not connected"
            raise RuntimeError(msg)
        return await self._channel.call(
            GuestFunction.GET_NOTIFICATION,
            HgcmBufferIn(self._patterns),
            HgcmU64(self._last_timestamp),
            HgcmBufferOut(size),
            HgcmU32(0),
            lingers_when_cancelled=False,
        )

    async def _resync(self, *, since: int) -> list[PropertyChange]:
        """Return, oldest first, a delete for each reported property that is gone and the
        matching properties changed after ``since``.

        A delete is dated no earlier than ``since`` nor than the set the watch reported.
        """
        self.resyncs += 1
        log.info("property_watch_resync", resyncs=self.resyncs)
        patterns = self._patterns[:-1].split(b"|") if len(self._patterns) > 1 else []
        current = await self._props.enumerate([pattern.decode() for pattern in patterns])
        names = {prop.name for prop in current}
        gone = [
            PropertyChange(name, "", "", max(since, timestamp), deleted=True)
            for name, timestamp in self._reported.items()
            if timestamp is not None and name not in names
        ]
        changed = [
            PropertyChange(prop.name, prop.value, prop.flags, prop.timestamp, deleted=False)
            for prop in sorted(current, key=lambda prop: prop.timestamp)
            if prop.timestamp > since
        ]
        return gone + changed


@asynccontextmanager
async def open_guest_properties(device: Device) -> AsyncIterator[GuestProperties]:
    """Connect to the host's property service; yield the client; disconnect on exit."""
    async with open_hgcm_channel(device, SERVICE_NAME) as channel:
        yield GuestProperties(device, channel)


# --- arguments ----------------------------------------------------------------------------


def canonical_flags(flags: str) -> str:
    """Return ``flags`` as the service prints them; raise PropertyArgumentError if unknown."""
    try:
        return format_flags(parse_flags(flags))
    except FlagsParseError as exc:
        raise PropertyArgumentError(str(exc)) from None


# --- replies ------------------------------------------------------------------------------


def _needed_size(exc: HgcmCallError, size_index: int) -> int:
    """The size a VERR_BUFFER_OVERFLOW reply asks for; re-raise any other failure."""
    if exc.rc != VERR_BUFFER_OVERFLOW:
        raise exc
    needed = exc.reply.params[size_index]
    if not isinstance(needed, HgcmU32) or needed.value == 0:
        raise exc
    return needed.value


class HgcmSizeError(RemoteProtocolError):
    """The host kept asking for larger buffers."""


def _still_too_small(function: GuestFunction) -> NoReturn:
    msg = f"{function.name}: the host asked for a larger buffer {SIZE_RETRIES} times in a row"
    raise HgcmSizeError(msg)


def _u64(value: HgcmValue) -> int:
    if not isinstance(value, HgcmU64):  # pragma: no cover - HgcmCall checks the types
        msg = f"expected a 64-bit parameter, got {value!r}"
        raise TypeError(msg)
    return value.value


def _strings(data: HgcmValue, size: HgcmValue, count: int) -> list[str]:
    """The first ``count`` NUL-terminated strings of the reported part of a buffer."""
    if not isinstance(data, HgcmData) or not isinstance(size, HgcmU32):  # pragma: no cover
        msg = "expected a buffer and its size"
        raise TypeError(msg)
    parts = data.data[: size.value].split(b"\0")
    if len(parts) < count + 1:
        msg = f"the host returned {len(parts) - 1} strings where {count} belong"
        raise RemoteProtocolError(msg)
    return [part.decode(errors="replace") for part in parts[:count]]


def _notification(reply: HgcmReply) -> PropertyChange:
    """GET_NOTIFICATION's change: name, value, flags and whether the name is gone.

    The host marks a change as a delete when the property no longer exists at the time it
    answers, so a set that was followed by a delete before the guest read it comes as a
    delete too; a delete carries no value or flags.
    """
    name, value, flags, deleted = _strings(reply.params[2], reply.params[3], 4)
    timestamp = _u64(reply.params[1])
    if deleted == "1":
        return PropertyChange(name, "", "", timestamp, deleted=True)
    return PropertyChange(name, value, flags, timestamp, deleted=False)


def _parse_enumeration(data: HgcmValue, size: HgcmValue) -> list[Property]:
    """ENUM_PROPS' buffer: name, value, decimal timestamp, flags, ..., an empty name."""
    if not isinstance(data, HgcmData) or not isinstance(size, HgcmU32):  # pragma: no cover
        msg = "expected a buffer and its size"
        raise TypeError(msg)
    parts = data.data[: size.value].split(b"\0")
    props: list[Property] = []
    for index in range(0, len(parts) - 3, 4):
        name, value, timestamp, flags = parts[index : index + 4]
        if not name:
            return props
        if not (timestamp.isdigit() and len(timestamp) <= _U64_DIGITS) or int(timestamp) > _U64_MAX:
            msg = f"ENUM_PROPS: timestamp {shown(timestamp)} of {shown(name)} is not a decimal u64"
            raise RemoteProtocolError(msg)
        props.append(
            Property(
                name.decode(errors="replace"),
                value.decode(errors="replace"),
                flags.decode(errors="replace"),
                int(timestamp),
            )
        )
    msg = "ENUM_PROPS: the list does not end with an empty name"
    raise RemoteProtocolError(msg)
