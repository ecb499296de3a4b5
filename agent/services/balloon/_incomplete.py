"""``log_drain_incomplete``: the one line a balloon drain logs when chunks are left over.

The service's drain and the give-back of the chunks it left (:mod:`._kept`) both end
with it, so what the line says about chunks that outlive the process stays the same:
critical in owned mode (nothing deflates them once the process exits), an error where the
driver deflates them at the close.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from agent.services.balloon._mode import BalloonMode

if TYPE_CHECKING:
    from agent.services.balloon._walker import ChunkWalker

log = structlog.get_logger("agent.services.balloon")


def log_drain_incomplete(
    walker: ChunkWalker,
    mode: BalloonMode,
    *,
    began_with: int,
    reason: str | None,
    handed_over: bool,
) -> None:
    """Log ``balloon_drain_incomplete``: what a drain that began with ``began_with`` chunks
    gave back and what ``walker`` still holds in ``mode``, and why (``reason``, and the
    host's last refusal). A warning if the chunks were ``handed_over`` to the leftovers,
    which give them back later; else they outlive the process."""
    kept = len(walker.held)
    figures = {
        "returned": began_with - kept,
        "kept": kept,
        "unconfirmed": len(walker.unconfirmed),  # of the kept: the host may not have them
        "reason": reason,
        "last_refusal": walker.last_failure,
    }
    if handed_over:
        log.warning(
            "balloon_drain_incomplete",
            **figures,
            note="given back in the background while this process runs on (at its stop"
            " until the stop's deadline), unless a new start of the service takes them"
            " over",
        )
    elif mode is BalloonMode.OWNED:
        log.critical(
            "balloon_drain_incomplete",
            **figures,
            note=f"the host still holds {kept} chunks ballooned: once this process exits"
            " the kernel reuses their pages, and the host refuses writes to ballooned"
            " pages",
        )
    else:
        log.error(
            "balloon_drain_incomplete",
            **figures,
            note="the driver deflates them when this process closes the device",
        )
