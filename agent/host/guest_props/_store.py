"""The property store: properties, permissions, timestamps and change notification."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

from agent.protocol.guest_props import (
    MAX_PROPS,
    NILFLAG,
    RDONLYGUEST,
    RDONLYHOST,
    format_flags,
    is_host_reserved,
)
from agent.protocol.host_text import host_bytes
from agent.protocol.status import (
    VERR_PERMISSION_DENIED,
    VERR_TOO_MUCH_DATA,
    VINF_PERMISSION_DENIED,
    VINF_SUCCESS,
)

from ._notify import Notifier

_U64_RANGE: Final = 1 << 64

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


@dataclass(frozen=True, slots=True)
class Property:
    """A property, or a snapshot of one in the notification queue (a delete has no value)."""

    name: str
    value: str = ""
    flags: int = NILFLAG
    timestamp: int = 0
    answer: bytes = field(init=False, repr=False, compare=False)
    """What GET_PROP writes for it: the value, its terminator, the flags' text and theirs
    (derived once: every read of the property writes it)."""

    def __post_init__(self) -> None:
        # The dataclass is frozen: a derived field is set as its own __init__ would.
        object.__setattr__(self, "answer", host_bytes(self.value) + _flags_field(self.flags))


@functools.cache
def _flags_field(flags: int) -> bytes:
    """What follows a value in GET_PROP's answer: its terminator, the flags' text and theirs
    (remembered per flags)."""
    return b"\0%s\0" % format_flags(flags).encode()


class Timestamps:
    """Nanosecond timestamps from ``clock`` as ``getCurrentTimestamp`` makes them.

    A reading equal to the last timestamp, or older by no more than the bumps made in a
    row, becomes last + 1 (a coarse clock still gives unique timestamps); any other reading
    is used as it is, so timestamps follow a clock that goes back. They are not an order.
    """

    def __init__(self, clock: Callable[[], int]) -> None:
        self._clock = clock
        self._last = 0
        self._bumps = 0

    def next(self) -> int:
        """Return the next timestamp."""
        now = self._clock()
        if (self._last - now) % _U64_RANGE > self._bumps:
            self._bumps = 0
        else:
            self._bumps += 1
            now = self._last + 1
        self._last = now
        return now

    def restart(self) -> None:
        """Start again from 0, as a new service instance does (so after a restore too)."""
        self._last = self._bumps = 0


class PropertyStore:
    """The properties by name, the global flags, and the notifier every change goes through."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.notifier = Notifier()
        self.global_flags = NILFLAG
        self._timestamps = Timestamps(clock)
        self._props: dict[str, Property] = {}
        self.get: Callable[[str], Property | None] = self._props.get
        """Return the property ``name``, or None: the dict's own ``get``, bound once (every
        guest-property read looks a name up; the dict is never replaced)."""

    def in_order(self) -> list[Property]:
        """Return every property by name.

        Upstream walks a hash-keyed tree (an order of no use); name order is deterministic.
        """
        return sorted(self._props.values(), key=lambda prop: prop.name)

    def timestamp(self) -> int:
        """``getCurrentTimestamp``: the next timestamp, for a change that may still be refused."""
        return self._timestamps.next()

    def set(self, name: str, value: str, flags: int, timestamp: int, *, is_guest: bool) -> int:
        """``setPropertyInternal``: check, store with ``flags`` replacing the old ones and the
        ``timestamp`` the caller took, notify."""
        old = self._props.get(name)
        status = self._check_permission(old.flags if old else NILFLAG, is_guest=is_guest)
        if status == VINF_SUCCESS and is_host_reserved(name):
            if is_guest:
                status = VERR_PERMISSION_DENIED
            else:
                flags |= RDONLYGUEST
        if status != VINF_SUCCESS:
            return status
        if old is None and len(self._props) >= MAX_PROPS:
            # Upstream notifies anyway: waiters see the name as deleted.
            status = VERR_TOO_MUCH_DATA
        else:
            self._props[name] = Property(name, value, flags, timestamp)
        self._publish(name, timestamp)
        return status

    def delete(self, name: str, *, is_guest: bool) -> int:
        """``delProperty``: a missing property is a success without notification.

        Only a deletion that happens takes a timestamp.
        """
        old = self._props.get(name)
        if old is None:
            return VINF_SUCCESS
        status = self._check_permission(old.flags, is_guest=is_guest)
        if status == VINF_SUCCESS:
            timestamp = self._timestamps.next()
            del self._props[name]
            self._publish(name, timestamp)
        return status

    def drop(self, flags: int) -> None:
        """Forget, without notifications, every property with any of ``flags``."""
        for name in [name for name, prop in self._props.items() if prop.flags & flags]:
            del self._props[name]

    def restart(self) -> list[Property]:
        """Empty the store, queue and waits as a new instance starts; return the old properties."""
        saved = list(self._props.values())
        self._props.clear()
        self.notifier.restart()
        self._timestamps.restart()
        return saved

    def bulk_load(self, props: Iterable[Property]) -> None:
        """Main's SET_PROPS: store ``props`` as they are (RDONLYGUEST added under reserved
        prefixes), keeping their timestamps and notifying nobody."""
        for prop in props:
            reserved = RDONLYGUEST if is_host_reserved(prop.name) else NILFLAG
            self._props[prop.name] = replace(prop, flags=prop.flags | reserved)

    def _check_permission(self, flags: int, *, is_guest: bool) -> int:
        if flags & (RDONLYGUEST if is_guest else RDONLYHOST):
            return VERR_PERMISSION_DENIED
        if is_guest and self.global_flags & RDONLYGUEST:
            return VINF_PERMISSION_DENIED
        return VINF_SUCCESS

    def _publish(self, name: str, timestamp: int) -> None:
        prop = self._props.get(name)
        entry = prop if prop is not None else Property(name, timestamp=timestamp)
        self.notifier.publish(entry, deleted=prop is None)
