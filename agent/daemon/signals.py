"""The one task that owns SIGTERM, SIGINT and SIGHUP and turns them into daemon calls.

The process may hold them blocked until then (``agent.cli`` does for ``run``, from before
its imports): they are unblocked once trio's receiver is in place, so one that came while
the process started is delivered to it at once, and the mask is restored on the way out.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Final, NoReturn, Protocol

import structlog
import trio

log = structlog.get_logger(__name__)

SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""SIGTERM and SIGINT stop the daemon, SIGHUP reloads it."""

if TYPE_CHECKING:
    from collections.abc import Awaitable


class SignalTarget(Protocol):
    """What signals control."""

    def request_shutdown(self, reason: str) -> None:
        """Begin a clean shutdown."""
        ...

    def reload(self) -> Awaitable[None]:
        """Re-read the configuration; safe to call while another reload runs."""
        ...


async def handle_signals(
    target: SignalTarget, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> NoReturn:
    """SIGTERM/SIGINT request a shutdown; SIGHUP reloads. Must run in the main thread.

    Each reload runs as a task of its own (the target serialises them), so a SIGTERM that
    comes while a reload waits (for systemd's notify queue, say) requests the shutdown at
    once; the reloads left are cancelled with this task.
    """
    with trio.open_signal_receiver(*SIGNALS) as signals:
        before = signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        try:
            async with trio.open_nursery() as reloads:
                task_status.started()
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info("signal_received", signal=name)
                    if signum == signal.SIGHUP:
                        reloads.start_soon(target.reload)
                    else:
                        target.request_shutdown(name)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
    msg = "the signal receiver ended"  # pragma: no cover - trio's iterator never ends
    raise RuntimeError(msg)  # pragma: no cover
