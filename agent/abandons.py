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
does not change. A leaf module (structlog only), used by the device and host layers.
"""

from __future__ import annotations

from typing import final

import structlog

_log = structlog.get_logger(__name__)


@final
class AbandonedCalls:
    """Abandoned calls in a row, by ioctl code; logs their start and their end."""

    __slots__ = ("_in_a_row",)

    def __init__(self) -> None:
        self._in_a_row: dict[int, int] = {}

    def abandoned(self, code: int, **details: object) -> bool:
        """Log a call of ``code`` abandoned (``details`` go with the line): at warning, and
        return True, if it is the first since one of that code was given back."""
        in_a_row = self._in_a_row.get(code, 0) + 1
        self._in_a_row[code] = in_a_row
        first = in_a_row == 1
        (_log.warning if first else _log.debug)(
            "ioctl_abandoned", code=f"{code:#x}", in_a_row=in_a_row, **details
        )
        return first

    def given_back(self, code: int) -> None:
        """A call of ``code`` came back from the driver (not abandoned): end its run of
        abandoned calls, if any, with one line."""
        if self._in_a_row and (in_a_row := self._in_a_row.pop(code, 0)):
            _log.info("ioctl_answered_again", code=f"{code:#x}", abandoned_in_a_row=in_a_row)
