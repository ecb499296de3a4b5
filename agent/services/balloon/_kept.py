"""``KeptChunks``: the chunks a balloon's drain could not give back, while the service is off.

A drain cut short while the agent runs on (a reload disabled the balloon or rebuilds it, a
restart after a failure) leaves its walker's chunks here, a
:class:`~agent.services.Remnant`: they are given back in the background (a deflate from
the top; a refusal retried after the section's capped backoff), and once the agent stops
as the service's drain: in owned mode one that passes over refused chunks until the stop's
deadline (a deflate in flight as the stop comes goes on), in allocated mode one try, the
rest left to the driver, which deflates at the close. A new start of the service takes
them over instead. What is left at that deadline outlives the process: in owned mode
nothing deflates the chunks once it exits, so that is logged at critical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import structlog
import trio

from agent.services.balloon._incomplete import log_drain_incomplete
from agent.services.balloon._mode import CHUNK_MB, BalloonMode

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.services.balloon._backoff import Backoff
    from agent.services.balloon._walker import ChunkWalker

log = structlog.get_logger("agent.services.balloon")


@final
class KeptChunks:
    """The chunks ``walker`` still holds in ``mode``, retried after ``backoff`` while the
    agent runs on; ``status_changed`` is called whenever an attempt ends with fewer kept
    (not at every chunk, as the walk's status)."""

    def __init__(
        self,
        walker: ChunkWalker,
        mode: BalloonMode,
        backoff: Backoff,
        status_changed: Callable[[], None],
    ) -> None:
        self.walker = walker
        self.mode = mode
        self._backoff = backoff
        self._status_changed = status_changed
        self._left = len(walker.held)
        """The chunks kept when the service left them."""

    def status(self) -> str:
        """``61 MB kept``."""
        return f"{len(self.walker.held) * CHUNK_MB} MB kept"

    async def give_back(self, stopping: trio.Event) -> None:
        """Give every chunk back, one line once all are (:class:`~agent.services.Remnant`)."""
        walker, backoff = self.walker, self._backoff
        owned = self.mode is BalloonMode.OWNED  # else the driver deflates at the close
        try:
            while await walker.drain(persist=owned and stopping.is_set()):
                self._status_changed()
                if stopping.is_set() and not owned:  # one try at the stop, as its drain
                    self._incomplete("refused")
                    return
                first = backoff.failures == 0
                delay = backoff.failed(trio.current_time())
                (log.warning if first else log.debug)(
                    "balloon_kept_refused",
                    reason=walker.last_failure,
                    chunks=len(walker.held),
                    retry_in_s=round(delay, 3),
                )
                with trio.move_on_at(backoff.retry_at):
                    await stopping.wait()  # the stop's drain retries at its own pace
        except trio.Cancelled:
            if stopping.is_set():  # the stop's deadline: what is left outlives the process
                self._incomplete("the drain time ran out")
            raise
        log.info("balloon_kept_returned", returned=self._left, mode=str(self.mode))

    def _incomplete(self, reason: str) -> None:
        log_drain_incomplete(
            self.walker, self.mode, began_with=self._left, reason=reason, handed_over=False
        )
