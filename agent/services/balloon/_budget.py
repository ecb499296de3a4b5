"""``DrainBudget``: the most chunks the owned balloon may hold, so that its drain can give
every one back within the drain time.

In owned mode nothing gives the chunks back but the agent's own drain (no driver deflates
them when the device closes), and the drain has ``daemon.shutdown_timeout_s``: whatever it
has not given back by then stays ballooned at the host once the process exits, while the
kernel reuses the pages. So the balloon grows to at most what :data:`DRAIN_SHARE` of the drain
time gives back at the rate measured in this run, the cap (:attr:`DrainBudget.chunks`).
The cap moves with the drain time (a reload that changes it) and with the rate, and it
limits growth only: chunks held above it stay while the whole drain time still gives them
back (the band: above the cap, up to :attr:`DrainBudget.kept`), since the rest of the
drain time is there for a slower drain. So a rate estimate that wobbles, or the slower
inflates standing in for the rate until deflates measure it, gives nothing back and takes
nothing again. Chunks above the band (the rate fell below half the one that let them in,
or a reload shortened the drain time under them) go back down to the cap, at once.

The rate is kept as seconds per chunk, measured over the walker's steps (a step of up to
16 chunks, its unmapping included) and smoothed: a step weighs its chunks against
:data:`SMOOTHING_CHUNKS`. Deflates measure it, once :data:`MIN_DEFLATE_CHUNKS` of them were
timed (their average then sets it): a deflate of a chunk or two, as a cap moving by a
chunk makes, says little. Until then inflates stand in: an inflate sends the host the same
request as a deflate (``CHANGE_MEMBALLOON``) and does more local work (map, lock and fault
in a MiB, read its frames, against an unmap), so it is the slower one (through the
simulator's socket about 500 to 900 chunks a second, against 1000 to 1500 given back).
Before any step, :data:`DEFAULT_RATE` does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from agent.services._base import DrainTime

DRAIN_SHARE: Final = 0.5
"""The safety margin: the share of the drain time the balloon's drain is planned to take at
the measured rate when it grows. The rest covers a host slower at the stop than before,
the other services draining at the same time and a refused chunk's retry, and absorbs
the estimate's noise for chunks already held (the band, the module docstring)."""
DEFAULT_RATE: Final = 200.0
"""Chunks a second assumed before any step measured the rate: a fifth of the slowest drain
seen (about 1000 a second through the simulator's socket on a loaded 2-core machine), so
at most 500 chunks under the default drain time; the first step of a walk replaces it."""
MIN_DEFLATE_CHUNKS: Final = 16
"""Chunks given back, timed, before deflates measure the rate instead of inflates."""
SMOOTHING_CHUNKS: Final = 64
"""A step of this many chunks or more sets the measured rate alone; a smaller one moves it
in proportion (the first step sets it whatever its size)."""


class DrainBudget:
    """The chunks the owned balloon may hold: it grows to what its drain gives back in its
    share of the drain time at the measured rate, and keeps what the whole drain time gives
    back (the module docstring)."""

    def __init__(self, drain_time: DrainTime) -> None:
        self.drain_time = drain_time
        self._seconds_per_chunk = 1 / DEFAULT_RATE
        self.measured_by: str | None = None
        """What measured the rate: ``deflate``, ``inflate`` (standing in) or None (the
        default)."""
        self._early_deflates = (0, 0.0)
        """Chunks given back and their seconds, while fewer than :data:`MIN_DEFLATE_CHUNKS`."""
        self._giving_back = False
        """Whether the chunks held left the band above: they go back down to the cap."""

    @property
    def rate(self) -> float:
        """Chunks a second the drain is expected to give back (inf: too fast to measure)."""
        spent = self._seconds_per_chunk
        return math.inf if spent == 0 else 1 / spent

    @property
    def chunks(self) -> int | None:
        """The cap: the most chunks the balloon may grow to now (None: no bound, the steps
        took no measurable time, as on a virtual clock)."""
        return self._given_back_in(self.drain_time.seconds * DRAIN_SHARE)

    @property
    def kept(self) -> int | None:
        """The top of the band: the most chunks held may stay, what the whole drain time
        gives back at the measured rate (None: no bound)."""
        return self._given_back_in(self.drain_time.seconds)

    def bound(self, held: int) -> int | None:
        """The most chunks the balloon may hold, holding ``held`` now (None: no bound).

        The cap, or ``held`` while it is in the band (above the cap, at most :attr:`kept`).
        Chunks above the band go back down to the cap: from then on the cap, until the
        balloon is back within it, however the band moves meanwhile.
        """
        cap, kept = self.chunks, self.kept
        if cap is None or kept is None:
            return None
        if held <= cap:
            self._giving_back = False
            return cap
        if held > kept:
            self._giving_back = True
        return cap if self._giving_back else held

    def _given_back_in(self, seconds: float) -> int | None:
        """The chunks the drain gives back in ``seconds`` at the measured rate."""
        spent = self._seconds_per_chunk
        if spent == 0:
            return None
        return math.floor(seconds / spent)

    def record(self, chunks: int, seconds: float, *, deflate: bool) -> None:
        """A step moved ``chunks`` (given back if ``deflate``, else inflated) in ``seconds``;
        inflates count only until a deflate was measured."""
        measured_by = self.measured_by
        if chunks <= 0 or (not deflate and measured_by == "deflate"):
            return
        if deflate and measured_by != "deflate":
            early_chunks, early_seconds = self._early_deflates
            chunks, seconds = early_chunks + chunks, early_seconds + seconds
            if chunks < MIN_DEFLATE_CHUNKS:
                self._early_deflates = (chunks, seconds)
                return
            self._seconds_per_chunk = seconds / chunks
            self.measured_by = "deflate"
            return
        sample = seconds / chunks
        weight = 1.0 if measured_by is None else min(1.0, chunks / SMOOTHING_CHUNKS)
        self._seconds_per_chunk += (sample - self._seconds_per_chunk) * weight
        self.measured_by = "deflate" if deflate else "inflate"
