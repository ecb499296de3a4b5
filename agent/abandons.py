"""``AbandonedCalls``: one warning when a driver begins to keep calls of one kind.

A transport abandons a call its driver does not give back after cancellation (see
:mod:`agent.device.transport`). When the host never answers, every try meets the same fate:
a service retrying an HGCM connect every 40 s (its 30 s timeout and 10 s back-off) would log
an ``ioctl_abandoned`` warning at each retry, about 2,200 a day per service, while the
service itself logs the failure once (``LastingFailure``). So, per ioctl code and per
opener (every session of one device), the first call abandoned logs ``ioctl_abandoned`` at
warning; the next ones, until the driver gives a call of that code back again, log it at
debug with how many were abandoned in a row; the first call of that code given back then
logs ``ioctl_answered_again`` (info) with the count. A one-off abandoned call is one
warning, as before. How calls are abandoned, counted and bounded is the transport's and
does not change. Calls are told apart by what they ask for (:func:`call_kind`), not by
their ioctl code alone: every VMMDev request of one size shares a code (``GetHostTime``
and ``GetSessionId`` both), and one answered must not end, nor one abandoned hide, the
other's run. Used by the device and host layers; it reads buffers with the protocol's
layouts.
"""

from __future__ import annotations

from typing import Final, final

import structlog

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol._ioc import ioc_nr
from agent.protocol.constants import IoctlFunction

_log = structlog.get_logger(__name__)
_BY_REQUEST_TYPE: Final = frozenset(
    {IoctlFunction.VMMDEV_REQUEST, IoctlFunction.VMMDEV_REQUEST_BIG}
)
_BY_FUNCTION: Final = frozenset({IoctlFunction.HGCM_CALL_32, IoctlFunction.HGCM_CALL_64})
_HGCM_CALL_HEAD: Final = L.HgcmCallIoctl.function.offset + 4


def call_kind(code: int, buffer: bytes | bytearray) -> tuple[int, int]:
    """What a call asks for: its ioctl code and, where one code serves many requests, the
    VMMDev request type or the HGCM function in its buffer (else 0)."""
    function = ioc_nr(code)
    if function in _BY_REQUEST_TYPE and len(buffer) >= L.RequestHeader.size:
        return code, L.RequestHeader.request_type.get(buffer)
    if function in _BY_FUNCTION and len(buffer) >= _HGCM_CALL_HEAD:
        return code, L.HgcmCallIoctl.function.get(buffer)
    return code, 0


@final
class AbandonedCalls:
    """Abandoned calls in a row, by what they ask for; logs their start and their end."""

    __slots__ = ("_in_a_row",)

    def __init__(self) -> None:
        self._in_a_row: dict[tuple[int, int], int] = {}

    def abandoned(self, code: int, buffer: bytes | bytearray, **details: object) -> bool:
        """Log a call (``code`` with ``buffer``) abandoned, ``details`` with the line: at
        warning, and return True, if it is the first since one of its kind was given back."""
        kind = call_kind(code, buffer)
        in_a_row = self._in_a_row.get(kind, 0) + 1
        self._in_a_row[kind] = in_a_row
        first = in_a_row == 1
        (_log.warning if first else _log.debug)(
            "ioctl_abandoned", code=f"{code:#x}", kind=kind[1], in_a_row=in_a_row, **details
        )
        return first

    def given_back(self, code: int, buffer: bytes | bytearray) -> None:
        """A call (``code`` with ``buffer``) came back from the driver (not abandoned): end
        the run of abandoned calls of its kind, if any, with one line."""
        if not self._in_a_row:  # no run: every call that completes passes here
            return
        kind = call_kind(code, buffer)
        if in_a_row := self._in_a_row.pop(kind, 0):
            _log.info(
                "ioctl_answered_again",
                code=f"{code:#x}",
                kind=kind[1],
                abandoned_in_a_row=in_a_row,
            )
