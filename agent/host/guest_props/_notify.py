"""The notification queue and the pending GET_NOTIFICATION waits (``doNotifications``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING

from agent.protocol.guest_props import (
    MAX_CONCURRENT_WAITS,
    MAX_GUEST_NOTIFICATIONS,
    format_flags,
)
from agent.protocol.host_text import host_bytes
from agent.protocol.prop_patterns import patterns_match
from agent.protocol.status import (
    VERR_BUFFER_OVERFLOW,
    VERR_INTERRUPTED,
    VERR_OUT_OF_RESOURCES,
    VINF_SUCCESS,
    VWRN_NOT_FOUND,
)

from ._params import buffer, u32, u64

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.host.hgcm_service import HgcmCallHandle, HostParm

    from ._store import Property


@dataclass(slots=True, eq=False)
class _Wait:
    """A pending GET_NOTIFICATION and the status it completes with (0, or +78 for an old one)."""

    call: HgcmCallHandle
    patterns: bytes
    status: int


def write_out(params: Sequence[HostParm], entry: Property, *, deleted: bool) -> int:
    """Write ``entry`` into GET_NOTIFICATION's parameters; return the call's status.

    The timestamp and the size are set even when the buffer is too small.
    """
    u64(params[1]).value = entry.timestamp
    data = b"%s\0%s\0%s\0%s\0" % (
        host_bytes(entry.name),
        host_bytes(entry.value),
        format_flags(entry.flags).encode(),
        b"1" if deleted else b"0",
    )
    u32(params[3]).value = len(data)
    out = buffer(params[2])
    if len(data) > len(out.data):
        return VERR_BUFFER_OVERFLOW
    out.data[: len(data)] = data
    return VINF_SUCCESS


class Notifier:
    """The last changes (snapshots, oldest first) and the guests waiting for the next ones."""

    def __init__(self) -> None:
        self._queue: deque[Property] = deque(maxlen=MAX_GUEST_NOTIFICATIONS)
        self._waits: list[_Wait] = []

    def find_old(self, patterns: bytes, timestamp: int) -> tuple[int, Property | None]:
        """Return the first matching change after ``timestamp`` (``getOldNotificationInternal``).

        The status is VWRN_NOT_FOUND when no change had that timestamp; the search then
        starts at the oldest change the queue still holds.
        """
        status, start = VWRN_NOT_FOUND, 0
        for index in range(len(self._queue) - 1, -1, -1):
            if self._queue[index].timestamp == timestamp:
                status, start = VINF_SUCCESS, index + 1
                break
        for entry in islice(self._queue, start, None):
            if patterns_match(patterns, host_bytes(entry.name)):
                return status, entry
        return status, None

    def add_wait(self, call: HgcmCallHandle, patterns: bytes, status: int) -> int | None:
        """Queue ``call`` to complete with the next matching change; None, or a failure status.

        An older wait of the same client with the same patterns, and cancelled ones, are
        completed with VERR_INTERRUPTED first; past the per-client limit the call fails.
        """
        pending = 0
        for wait in list(self._waits):
            if wait.call.client_id != call.client_id:
                continue
            if wait.patterns == patterns or wait.call.cancelled:
                self._finish(wait, VERR_INTERRUPTED)
            else:
                pending += 1
        if pending >= MAX_CONCURRENT_WAITS:
            return VERR_OUT_OF_RESOURCES
        self._waits.append(_Wait(call, patterns, status))
        return None

    def publish(self, entry: Property, *, deleted: bool) -> None:
        """Complete the waits that match ``entry``, each by its own patterns, then remember it.

        An entry dated as the last one in the queue is dated one later (the property keeps
        its timestamp), as ``doNotifications`` does. Cancelled waits that match are
        completed too (the framework discards those).
        """
        if self._queue and self._queue[-1].timestamp == entry.timestamp:
            entry = replace(entry, timestamp=entry.timestamp + 1)
        name = host_bytes(entry.name)
        for wait in list(self._waits):
            if patterns_match(wait.patterns, name):
                status = write_out(wait.call.params, entry, deleted=deleted)
                self._finish(wait, status if status < 0 else wait.status)
        self._queue.append(entry)

    def interrupt(self, client_id: int | None = None) -> None:
        """Complete the waits of ``client_id`` (or all) with VERR_INTERRUPTED."""
        for wait in list(self._waits):
            if client_id is None or wait.call.client_id == client_id:
                self._finish(wait, VERR_INTERRUPTED)

    def restart(self) -> None:
        """Forget the queue and, without completing them, the waits (a new service instance)."""
        self._queue.clear()
        self._waits.clear()

    def _finish(self, wait: _Wait, status: int) -> None:
        self._waits.remove(wait)
        wait.call.complete(status)
