"""``Leftovers``: what a service that stopped while the agent runs on left at the host.

A drain cut short (the drain time ran out, the host refused) may leave something the host
still holds for the guest: an owned balloon's chunks, which the host keeps ballooned while
the kernel would reuse their pages once the process exits. A service that stops while the
agent runs on (a reload disabled it, or rebuilds it, or it restarts after a failure) hands
such a :class:`Remnant` to the context's ``leftovers``. The daemon serves them (one task,
:meth:`Leftovers.serve`): each is given back in the background at the service's own pace
while the agent runs on and, once the agent stops, as a drain would, under the services'
drain deadline. A new start of the service takes its remnant over (:meth:`Leftovers.take`),
and ``STATUS=`` shows it after the service's fragment until then, whatever that reads
(``balloon off, 61 MB kept`` while it is disabled, ``balloon failed, retrying (1x), 61 MB
kept`` while it backs off before a restart). No daemon code names a service: a
plug-in that leaves something behind needs nothing but this.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol, final

import structlog
import trio

if TYPE_CHECKING:
    from collections.abc import Callable

log = structlog.get_logger(__name__)


class Remnant(Protocol):
    """What a stopped service still holds at the host, and how to give it back."""

    def status(self) -> str:
        """What is still held, e.g. ``61 MB kept``: ``STATUS=`` puts it after the service's
        own fragment (``balloon off, 61 MB kept``; ``balloon failed, retrying (1x), 61 MB
        kept`` before a restart)."""
        ...

    async def give_back(self, stopping: trio.Event) -> None:
        """Give back everything, then return.

        Until ``stopping`` is set (the agent stops) failures are retried at the service's
        own pace, without end; a new start's take-over cancels this. From then on it goes
        as a drain would, without waiting out a backoff, until the stop's deadline cancels
        it: log then what is still kept. What is under way when the stop comes goes on
        (a request in flight is not cut off by the stop itself).
        """
        ...


def _nobody_listens() -> None:
    """The default ``status_changed``."""


@final
class _Held:
    """A remnant, and the scope of its give-back (a take-over cancels it, the stop bounds it)."""

    __slots__ = ("ended", "interrupted", "remnant", "running", "scope", "taking")

    def __init__(self, remnant: Remnant, deadline: float) -> None:
        self.remnant = remnant
        self.scope = trio.CancelScope(deadline=deadline)
        self.running = False
        """Its give-back task was started (:meth:`Leftovers.serve` runs)."""
        self.ended = trio.Event()
        """Set once that task ended: nothing of it touches the remnant any more."""
        self.interrupted = False
        """A take-over cancelled the give-back."""
        self.taking = False
        """A take-over waits for the give-back's end."""


@final
class Leftovers:
    """The remnants of services stopped while the agent runs on, by service name.

    Args:
        status_changed: called when a remnant is left, taken over or given back, and
            whatever changes what :meth:`status` reads (the remnant's give-back calls it too).
    """

    __slots__ = (
        "_closed",
        "_emptied",
        "_held",
        "_nursery",
        "_status_changed",
        "_stop_at",
        "_stopping",
    )

    def __init__(self, status_changed: Callable[[], None] = _nobody_listens) -> None:
        self._status_changed = status_changed
        self._held: dict[str, _Held] = {}
        self._nursery: trio.Nursery | None = None
        self._stop_at = math.inf
        """The deadline of the agent's stop, once :meth:`stop` was called."""
        self._stopping = trio.Event()
        self._emptied = trio.Event()
        """Set once the stop came and nothing is held any more."""
        self._closed = trio.Event()
        """Set once no service runs any more: nothing is left from then on."""

    def leave(self, name: str, remnant: Remnant) -> bool:
        """Service ``name`` stopped with ``remnant`` still held: give it back from now on.

        Return False, nothing held, once the stop's deadline passed (what is left then
        outlives the process: the caller says so). A service leaves at most one remnant: a
        new start takes it over before it can leave another.
        """
        if trio.current_time() >= self._stop_at:
            return False
        assert name not in self._held  # noqa: S101 - one owner per remnant at all times
        held = self._held[name] = _Held(remnant, self._stop_at)
        self._start(name, held)
        self._status_changed()
        return True

    async def take(self, name: str) -> Remnant | None:
        """A new start of service ``name`` takes its remnant over (None: there is none).

        Its give-back is cancelled, and this returns once that task ended (a request in
        flight answered or given up), so only one owner ever touches the remnant. Cancelled
        meanwhile, the remnant stays here and is given back again once that task ended.
        """
        held = self._held.get(name)
        if held is None:
            await trio.lowlevel.checkpoint()
            return None
        held.interrupted = True
        held.scope.cancel()
        if held.running:
            held.taking = True
            try:
                await held.ended.wait()
            except trio.Cancelled:
                held.taking = False
                if held.ended.is_set():
                    self._resume(name, held)
                raise
        del self._held[name]
        self._status_changed()
        return held.remnant

    def status(self, name: str) -> str | None:
        """What service ``name``'s remnant still holds (e.g. ``61 MB kept``), which the
        daemon adds to the service's ``STATUS=`` fragment; None if it left none."""
        held = self._held.get(name)
        return None if held is None else held.remnant.status()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Give every remnant back, in the background until :meth:`stop`, then as a drain
        until the stop's deadline; return once :meth:`close` was called and that is over."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name, held in list(self._held.items()):
                self._start(name, held)
            task_status.started()
            await self._closed.wait()
        self._nursery = None

    def close(self) -> None:
        """No service runs any more (each drained and ended): :meth:`serve` returns once
        every give-back ended."""
        self._closed.set()

    def stop(self, deadline: float) -> None:
        """The agent stops: every remnant is given back as at a drain, until ``deadline``."""
        self._stop_at = min(self._stop_at, deadline)
        for held in self._held.values():
            held.scope.deadline = min(held.scope.deadline, deadline)
        self._stopping.set()
        self._note_emptied()

    async def wait_given_back(self) -> None:
        """After :meth:`stop`: wait until every remnant's give-back ended."""
        await self._emptied.wait()

    def _start(self, name: str, held: _Held) -> None:
        if self._nursery is not None:
            held.running = True
            self._nursery.start_soon(self._give_back, name, held)

    def _resume(self, name: str, held: _Held) -> None:
        """A take-over of ``held`` gave up: give its remnant back again."""
        fresh = self._held[name] = _Held(held.remnant, self._stop_at)
        self._start(name, fresh)

    async def _give_back(self, name: str, held: _Held) -> None:
        """Give ``held`` back; an error it raises is logged, never raised (the remnant is
        kept, and tried once more when the agent stops)."""
        with structlog.contextvars.bound_contextvars(service=name):
            try:
                with held.scope:
                    stopping = self._stopping
                    if not await _given_back(held.remnant, stopping) and not stopping.is_set():
                        await stopping.wait()  # kept, shown in the status, until the stop
                        await _given_back(held.remnant, stopping)
            finally:
                held.ended.set()
        if held.taking:  # the take-over has it now
            return
        if held.interrupted:  # a take-over that gave up: it is still to give back
            self._resume(name, held)
            return
        del self._held[name]
        self._status_changed()
        self._note_emptied()

    def _note_emptied(self) -> None:
        if self._stopping.is_set() and not self._held:
            self._emptied.set()


async def _given_back(remnant: Remnant, stopping: trio.Event) -> bool:
    """Give ``remnant`` back and return True; False, logged, if that raised (a plug-in's
    error must not end the agent)."""
    try:
        await remnant.give_back(stopping)
    except Exception as exc:  # noqa: BLE001 - plug-ins are third-party code
        log.error(
            "leftovers_give_back_failed",
            error=repr(exc),
            outcome="left behind as the agent exits"
            if stopping.is_set()
            else "tried again when the agent stops",
        )
        return False
    return True
