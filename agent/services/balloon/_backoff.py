"""Capped exponential backoff for retried balloon steps, and how a failed request is named."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agent.protocol import VBoxStatusError

if TYPE_CHECKING:
    from agent.protocol import RemoteProtocolError


def failure_text(exc: VBoxStatusError | RemoteProtocolError) -> str:
    """One line naming the request and what went wrong: ``VBG_IOCTL_CHECK_BALLOON:
    VERR_NO_MEMORY``, or for a reply that breaks the ABI ``malformed reply:`` and the
    decoder's message (which begins with the request's name)."""
    if isinstance(exc, VBoxStatusError):
        return f"{exc.operation}: {exc.name}"
    return f"malformed reply: {exc}"


class Backoff:
    """The next retry time after consecutive failures: ``initial``, doubling, up to ``maximum``.

    ``retry_at`` is ``-inf`` while nothing failed (a step may run at once).
    """

    __slots__ = ("failures", "initial", "maximum", "retry_at")

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.retry_at = -math.inf

    def failed(self, now: float) -> float:
        """Count a failure; return the delay before the retry."""
        delay = min(self.maximum, self.initial * 2.0 ** min(self.failures, 60))
        self.failures += 1
        self.retry_at = now + delay
        return delay

    def succeeded(self) -> bool:
        """Reset; return whether failures had been counted (so a recovery may be logged)."""
        recovered = self.failures > 0
        self.failures = 0
        self.retry_at = -math.inf
        return recovered

    def retry_now(self) -> None:
        """Something changed (a new event): allow the next attempt at once, keep the count."""
        self.retry_at = -math.inf
