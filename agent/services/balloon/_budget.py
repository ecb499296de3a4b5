"""``DrainBudget``: the most chunks the owned balloon may hold, so that its drain can give
every one back within the drain time.

In owned mode nothing gives the chunks back but the agent's own drain (no driver deflates
them when the device closes), and the drain has ``daemon.shutdown_timeout_s``: whatever it
has not given back by then stays ballooned at the host once the process exits, while the
kernel reuses the pages. So the balloon holds at most what :data:`DRAIN_SHARE` of the drain
time gives back at the rate measured in this run. The cap moves with the drain time (a
reload that changes it) and with the rate; one that falls below the chunks held gives the
difference back at once.

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
the measured rate. The rest covers a host slower at the stop than before, the other
services draining at the same time and a refused chunk's retry."""
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
    """The chunks the owned balloon may hold: those its drain gives back in its share of the
    drain time at the measured rate (the module docstring)."""

    def __init__(self, drain_time: DrainTime) -> None:
        self.drain_time = drain_time
        self._seconds_per_chunk = 1 / DEFAULT_RATE
        self.measured_by: str | None = None
        """What measured the rate: ``deflate``, ``inflate`` (standing in) or None (the
        default)."""
        self._early_deflates = (0, 0.0)
        """Chunks given back and their seconds, while fewer than :data:`MIN_DEFLATE_CHUNKS`."""

    @property
    def rate(self) -> float:
        """Chunks a second the drain is expected to give back (inf: too fast to measure)."""
        spent = self._seconds_per_chunk
        return math.inf if spent == 0 else 1 / spent

    @property
    def chunks(self) -> int | None:
        """The most chunks the balloon may hold now (None: no bound, the steps took no
        measurable time, as on a virtual clock)."""
        spent = self._seconds_per_chunk
        if spent == 0:
            return None
        return math.floor(self.drain_time.seconds * DRAIN_SHARE / spent)

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
