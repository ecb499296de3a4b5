"""``LastingFailure``: one log line when a repeating failure begins, changes or ends.

A timer-driven service whose every tick fails the same way (the host refusing each beat,
``/proc`` unreadable at each report) would otherwise write a warning per tick: 43,000 lines a
day at the heartbeat's 2 s. The failure is logged when it begins and whenever its cause
changes, and its end once, with how many ticks failed; every failure is still counted.

A request to the host fails in one of two ways a service outlives
(:data:`agent.protocol.HOST_ERRORS`): the host or driver refuses it with a status, or
answers with a reply that breaks the ABI.
Restarting the service would meet the same host, and a supervisor that restarts it on every
tick ends the daemon once the restart budget is spent, so the services count both kinds
(:meth:`LastingFailure.host_failed`) and go on, as VBoxService's workers do. One that must try
again on its own (a feature the host refused at start) waits :meth:`LastingFailure.retry_in`.
"""

from __future__ import annotations

from typing import Final, final

import structlog

from agent.protocol import RemoteProtocolError, VBoxStatusError

log = structlog.get_logger(__name__)

MALFORMED_REPLY: Final = "malformed reply"
"""The cause a malformed reply is counted under (its message changes with the reply)."""
RETRY_INITIAL_S: Final = 1.0
"""The first wait before trying a refused request again (the daemon's default restart
back-off, which such a refusal met when it ended the service)."""
RETRY_MAX_S: Final = 60.0
"""The longest wait between two tries: a host that keeps refusing costs a request a minute."""
WRITES_IGNORED: Final = "property_writes_ignored"
"""The event of guest-property writes the host ignored: it answered them with a success
(``VINF_PERMISSION_DENIED``) and changed nothing, having made every property read-only for
the guest (its global RDONLYGUEST)."""
WRITES_TAKEN_AGAIN: Final = "property_writes_taken_again"
"""The event logged when the host takes a guest-property write again."""


@final
class LastingFailure:
    """Counts failures; logs each new cause once, and ``ended_event`` when one succeeds.

    Args:
        ended_event: the info line logged at the first success after failures.
    """

    def __init__(self, ended_event: str) -> None:
        self._ended_event = ended_event
        self._failing: tuple[str, str] | None = None
        """The event and cause of the failure going on."""
        self._in_a_row = 0
        self.total = 0
        """Failures since the service was built."""

    @property
    def cause(self) -> str | None:
        """The cause of the failure going on, or None."""
        return None if self._failing is None else self._failing[1]

    def failed(self, event: str, cause: str, **details: object) -> bool:
        """Count a failure; log it as ``event`` (and return True) if it is the first or its
        ``event`` or ``cause`` differs from the last one's. ``cause`` must not carry data that
        changes while the problem stays (that goes in ``details``)."""
        self.total += 1
        self._in_a_row += 1
        if (event, cause) == self._failing:
            return False
        log.warning(event, failures=self.total, **details)
        self._failing = (event, cause)
        return True

    def retry_in(self, initial_s: float = RETRY_INITIAL_S, maximum_s: float = RETRY_MAX_S) -> float:
        """The wait before trying again: ``initial_s``, doubled for each failure in a row
        after the first, at most ``maximum_s``."""
        return min(maximum_s, initial_s * 2.0 ** min(max(self._in_a_row - 1, 0), 60))

    def host_failed(
        self, event: str, error: VBoxStatusError | RemoteProtocolError, **details: object
    ) -> bool:
        """:meth:`failed` for a host request: the cause is the status's name (logged as
        ``status``), or :data:`MALFORMED_REPLY` (the decoder's message logged as
        ``malformed_reply``)."""
        if isinstance(error, VBoxStatusError):
            return self.failed(event, error.name, status=error.name, **details)
        return self.failed(event, MALFORMED_REPLY, malformed_reply=str(error), **details)

    def succeeded(self) -> bool:
        """Log the end of the failure going on, if any (and return True)."""
        if self._failing is None:
            return False
        log.info(self._ended_event, failed_in_a_row=self._in_a_row)
        self._failing = None
        self._in_a_row = 0
        return True
