"""``ChunkWalker``: moves the agent's own balloon one 1 MiB chunk at a time.

The goal is the host's target, capped by the host's maximum, under memory pressure by the
pressure cap, and in owned mode by what the drain can give back in time (the drain budget,
:mod:`._budget`: each step is timed for it; a walk that settles below the target by it says
so once, ``balloon_drain_cap``). Every chunk is handed to (or taken from) the host on its
own, and the goal is read again before each, so a new target redirects a walk at once.
The memory work goes in groups of up to :data:`BATCH_CHUNKS`: a step maps and locks that
many chunks, then hands them over one by one (unmapping those a new goal no longer wants),
or takes that many back one by one, then unmaps them. Locking a chunk faults in (zeroes) a
MiB, which leaves the CPU caches holding nothing of the agent's nor the driver's code and
data; in groups, the handovers between two such passes run on warm caches. No chunk waits
longer than its step.
A failed chunk (host status, driver error, allocation, the ``MemAvailable`` floor) stops
the walk in its direction after the chunks before it, which are kept; it is logged once per
run of failures and retried after a capped exponential backoff, or at once when a new event
arrives. The backoff holds back only the direction that failed: a goal below the chunks
held after a refused inflate (pressure) is walked at once, and pressure that lowers the
goal after a refused deflate retries it at once. A run of failures ends only at the goal
(walked to, or moved to the chunks held; one line, ``balloon_walk_recovered``), or with a
failure the other way: a retry that moves some chunks and stops again (memory trickling in
at the floor) goes on the same run, its backoff growing, so it logs no new warning. A walk
goes one way; one that reaches its goal is logged once, with the chunks it moved (negative:
given back). One that turns back first is not, and the walk back counts from there.

The floor is checked before every chunk, but ``MemAvailable`` is not read for every chunk:
a reading serves the next chunks of the same walk, less the MiB each of them takes, for at
most :data:`MEMINFO_REUSE_CHUNKS` chunks and only while it leaves that many MiB above the
floor; nearer the floor, after a pause, a restart, a deflate or a failure, it is read again.
A chunk is therefore refused exactly where a reading before it would refuse it, unless the
rest of the guest took more than that many MiB within those few chunks (a few milliseconds).
A group ends before a chunk that would read MemAvailable afresh, so a reading that finds it
is taken with every chunk of the walk handed over, as one chunk at a time took it. While
MemAvailable is unknown (the floor unchecked) every chunk looks for it, the group's earlier
chunks mapped but not yet handed over; the first reading that finds it serves from then on.

A chunk whose handover was cancelled once issued is held, unconfirmed, until a deflate takes
it back. Through a passthrough driver (owned mode) the agent cannot learn whether that
handover reached the host: a real host marks the pages of any deflate not ballooned and of
any inflate ballooned, checks only GMM's count of ballooned pages, and with more than one
vCPU answers success before it does anything. Deflating the chunk is right when its inflate
went through or its deflate did not; otherwise it takes off the host's count a chunk that
another chunk put there, and the count stays below the pages ballooned until the VM is reset.
The other choice, unmapping such a chunk, could hand the kernel pages the host keeps
ballooned and refuses writes to. An inflate the host refused after it marked the pages
(``Handover.refusal_ballooned``) is deflated before its chunk is unmapped, for that reason.

A reply that breaks the ABI (``RemoteProtocolError``: a header naming another request, say)
came back from a request that reached the host, which may or may not have carried it out:
a failure like a refusal, whose chunk is held, unconfirmed, never unmapped before a deflate
takes it back. It goes to the bottom of the balloon, deflated after every other chunk: by
then a host with one vCPU counts it only if it holds it, and answers a deflate of it that
way (success, or ``VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH``, the chunk given up), so no count
is taken off that another chunk put there. Until then the balloon may hold one MiB less
than the agent counts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final, NoReturn

import structlog
import trio

from agent.protocol import RemoteProtocolError, Submission, VBoxStatusError
from agent.services.balloon._backoff import failure_text
from agent.services.balloon._budget import DRAIN_SHARE
from agent.services.balloon._chunks import Chunk, ChunkError
from agent.services.balloon._mode import CHUNK_MB

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.services.balloon._backoff import Backoff
    from agent.services.balloon._budget import DrainBudget
    from agent.services.balloon._chunks import ChunkAllocator
    from agent.services.balloon._handover import Handover, HostTarget

log = structlog.get_logger("agent.services.balloon")

MEMINFO_REUSE_CHUNKS: Final = 32
"""Chunks one ``MemAvailable`` reading may serve, and the MiB above the floor it must leave."""
BATCH_CHUNKS: Final = 16
"""Chunks one step maps and locks before handing them over, or takes back before unmapping."""
DRAIN_RETRY_INITIAL_S: Final = 0.05
DRAIN_RETRY_MAX_S: Final = 1.0
"""A persisting drain retries a refused chunk after the initial delay, doubling up to this."""


class WalkStoppedError(Exception):
    """One step could not be taken; the message names why (with the VBox status name)."""


class ChunkWalker:
    """The chunks the agent holds in the balloon, and the walk toward the goal."""

    def __init__(
        self,
        handover: Handover,
        allocator: ChunkAllocator,
        *,
        backoff: Backoff,
        mem_available_mb: Callable[[], int | None],
        min_available_mb: int,
        status_changed: Callable[[], None] = lambda: None,
        resized: Callable[[int], None] = lambda _chunks: None,
        budget: DrainBudget | None = None,
    ) -> None:
        self._status_changed = status_changed
        """Called when the walk settles (a run of failures ends only there), its goal's inputs
        change, or it fails (not at every chunk: ``resized`` says those)."""
        self._on_resized = resized
        self.handover = handover
        self.allocator = allocator
        self.backoff = backoff
        self.min_available_mb = min_available_mb
        self._mem_available_mb = mem_available_mb
        self._available_mb = 0
        """``MemAvailable`` as last read, less the MiB inflated on that reading since."""
        self._reading_uses = 0
        """Chunks the last reading may still serve (0: read before the next chunk)."""
        self._available_known = True
        """Whether the last reading found MemAvailable (the floor is checked only then)."""
        self.held: list[Chunk] = []
        self.unconfirmed: set[int] = set()
        """Addresses of held chunks whose last inflate or deflate was cancelled once issued:
        the driver may or may not have them."""
        self.target = 0
        self.max_chunks: int | None = None
        self.cap: int | None = None
        self.refusal: str | None = None
        """Why the agent may hold no chunks now (the goal is then 0), or None."""
        self.inflated = 0
        self.deflated = 0
        self.failures = 0
        self.last_failure: str | None = None
        self._changed = trio.Event()
        self._settled = trio.Event()
        self._holding = trio.Event()
        """Set when the walker comes to hold a chunk (a waiter makes a new one)."""
        self._walk_from: int | None = None
        """Chunks held when the current walk took its first step (None: no walk under way)."""
        self._failed_inflate = True
        """The direction the backoff holds back (meaningful while it counts failures)."""
        self.budget = budget
        """The drain budget, in owned mode only (None: another mode): it bounds the chunks held
        so that the drain gives every one back in time, but sets no bound while its
        :attr:`DrainBudget.chunks` is None."""
        self.drain_capped = False
        """Whether the walk last settled where the budget held it, below what the host (and
        pressure) want."""
        self._drain_cap_episodes = 0
        """How often the drain budget came to hold the balloon below what is wanted: the
        first time is a warning, later ones debug lines."""

    @property
    def goal(self) -> int:
        """Chunks the balloon should hold now."""
        goal = self.wanted
        if self.budget is None:
            return goal
        bound = self.budget.bound(len(self.held))
        return goal if bound is None else min(goal, bound)

    @property
    def wanted(self) -> int:
        """The goal but for the drain budget: the host's target, capped by its maximum and
        by pressure (0 while refused)."""
        if self.refusal is not None:
            return 0
        goal = self.target
        if self.max_chunks is not None:
            goal = min(goal, self.max_chunks)
        if self.cap is not None:
            goal = min(goal, self.cap)
        return goal

    @property
    def drain_cap(self) -> int | None:
        """The most chunks the balloon may grow to for the drain (owned mode), or None."""
        return None if self.budget is None else self.budget.chunks

    def set_target(self, target: HostTarget) -> None:
        """A new target from the host: walk toward it at once (even after failures)."""
        self.target = target.chunks
        if target.max_chunks is not None:
            self.max_chunks = target.max_chunks
        if self.max_chunks is not None and self.target > self.max_chunks:
            log.warning("balloon_target_capped", target=self.target, max_chunks=self.max_chunks)
        self.backoff.retry_now()
        self.wake()
        self._status_changed()

    def refuse(self, reason: str | None) -> None:
        """Hold no chunks while ``reason`` stands, giving back any held; None: the target
        counts again. Walk at once."""
        self.refusal = reason
        self.wake()
        self._status_changed()

    def lower_cap(self, cap: int) -> None:
        """Pressure: cap the goal at ``cap`` chunks and walk toward it at once.

        A goal that goes down also ends the backoff after a refused deflate (keeping its
        count): the host is asked again now, and backed off further if it refuses again. It
        can go down only so often before it reaches 0, so a host that keeps refusing is
        still backed off.
        """
        goal = self.goal
        self.cap = cap
        if self.goal < goal and self.backoff.failures and not self._failed_inflate:
            self.backoff.retry_now()
        self.wake()
        self._status_changed()

    def wake(self) -> None:
        """Re-read the goal (the cap or target changed)."""
        self._changed.set()

    async def wait_held(self, chunks: int) -> None:
        """Wait until the walk settles holding ``chunks`` (for tests and benchmarks)."""
        while len(self.held) != chunks:
            await self._settled.wait()

    async def wait_holding(self) -> None:
        """Wait until the walker holds a chunk (at once if it does)."""
        while not self.held:
            self._holding = trio.Event()
            await self._holding.wait()

    def _resized(self) -> None:
        if self.held:
            self._holding.set()
        self._on_resized(len(self.held))

    async def run(self) -> NoReturn:
        """Walk toward the goal forever; sleep while there or while backing off."""
        self._reading_uses = 0  # a (re)start: the last run's reading may be long out of date
        while True:
            goal = self.goal
            held = len(self.held)
            if held != goal and not self._backing_off(inflate=held < goal):
                inflate = held < goal
                if self._walk_from is None or (held > self._walk_from) is not inflate:
                    self._walk_from = held  # a walk goes one way: turning back starts another
                await self._step(inflate=inflate)
                continue
            self._reading_uses = 0  # a pause: the next walk starts from a fresh reading
            deadline = math.inf
            if held == goal:
                self._walk_done()
                self._failures_over()
                if self.budget is not None:
                    self._note_drain_cap(self.budget, goal)
                self._settled.set()
                self._settled = trio.Event()
                self._status_changed()
            else:
                deadline = self.backoff.retry_at
            self._changed = trio.Event()
            with trio.move_on_at(deadline):
                await self._changed.wait()

    def _note_drain_cap(self, budget: DrainBudget, goal: int) -> None:
        """At the goal: a warning when the drain budget came to hold it below what the host
        (and pressure) want, a line when it no longer does; after the walker's first warning
        both are debug lines (a host moving its target across the cap would repeat them;
        the status and statistics show the cap)."""
        wanted = self.wanted
        capped = goal < wanted
        if capped is self.drain_capped:
            return
        self.drain_capped = capped
        self._drain_cap_episodes += capped
        repeat = self._drain_cap_episodes > 1
        figures = {
            "target": self.target,
            "cap": budget.chunks,
            "rate_chunks_s": None if math.isinf(budget.rate) else round(budget.rate, 1),
            "measured_by": budget.measured_by or "the default",
            "drain_s": budget.drain_time.seconds,
        }
        if not capped:
            (log.debug if repeat else log.info)(
                "balloon_drain_cap_lifted", **figures, chunks=wanted
            )
            return
        (log.debug if repeat else log.warning)(
            "balloon_drain_cap",
            **figures,
            chunks=goal,
            share=DRAIN_SHARE,
            reason="in owned mode only the agent's drain gives the chunks back, within"
            " daemon.shutdown_timeout_s; a chunk it cannot give back in time stays ballooned"
            " at the host while the kernel reuses its pages after the exit, so the balloon"
            f" grows to what {DRAIN_SHARE:.0%} of that time gives back at the measured rate"
            " and keeps what it holds while the whole time gives it back",
            fix="raising daemon.shutdown_timeout_s raises the cap",
        )

    def _backing_off(self, *, inflate: bool) -> bool:
        """Whether the backoff holds a step in this direction back (only the failed one)."""
        retry_at = self.backoff.retry_at
        if retry_at == -math.inf or inflate is not self._failed_inflate:
            return False
        return trio.current_time() < retry_at  # the clock is read only while backing off

    def _walk_done(self) -> None:
        """Log a walk that reached its goal, once (a wake-up at the goal is no walk)."""
        walked_from, self._walk_from = self._walk_from, None
        if walked_from is not None and walked_from != len(self.held):
            log.info("balloon_walk_done", chunks=len(self.held), moved=len(self.held) - walked_from)

    def _failures_over(self) -> None:
        """End a run of failures at the goal (walked to, or moved to the chunks held)."""
        failures = self.backoff.failures
        if failures:
            self.backoff.succeeded()
            self.last_failure = None
            log.info("balloon_walk_recovered", chunks=len(self.held), failures=failures)

    async def _step(self, *, inflate: bool) -> None:
        """One group of chunks toward the goal; a failure stops the walk after the chunks
        before it, which are kept, and goes on the run of failures (module docstring)."""
        budget = self.budget
        held = len(self.held)
        started = trio.current_time() if budget is not None else 0.0
        try:
            if inflate:
                await self._inflate()
            else:
                await self._deflate()
        except WalkStoppedError as failure:
            self._failed(str(failure), inflate=inflate)
        if budget is not None:
            moved = abs(len(self.held) - held)
            budget.record(moved, trio.current_time() - started, deflate=not inflate)

    def _failed(self, reason: str, *, inflate: bool) -> None:
        self._reading_uses = 0
        self.failures += 1
        if inflate is not self._failed_inflate:  # the other direction's failures are not these
            self.backoff.succeeded()
            self._failed_inflate = inflate
        first = self.backoff.failures == 0
        delay = self.backoff.failed(trio.current_time())
        self.last_failure = reason
        (log.warning if first else log.debug)(
            "balloon_walk_stopped",
            reason=reason,
            chunks=len(self.held),
            goal=self.goal,
            retry_in_s=round(delay, 3),
        )
        self._status_changed()

    def _reading_due(self) -> bool:
        """Whether the next chunk's floor check reads MemAvailable (module docstring)."""
        above = self._available_mb - CHUNK_MB - self.min_available_mb
        return self._reading_uses == 0 or above < MEMINFO_REUSE_CHUNKS * CHUNK_MB

    def _check_floor(self) -> None:
        """Stop the walk if one more chunk would take MemAvailable below the floor.

        Reads MemAvailable unless the last reading may serve this chunk (module docstring);
        an unknown MemAvailable (None) is not checked.
        """
        floor = self.min_available_mb
        if self._reading_due():
            available = self._mem_available_mb()
            self._available_known = available is not None
            if available is None:
                self._reading_uses = 0
                return
            self._available_mb, self._reading_uses = available, MEMINFO_REUSE_CHUNKS
        if self._available_mb - CHUNK_MB < floor:
            msg = f"{self._available_mb} MB available would fall below the floor of {floor} MB"
            raise WalkStoppedError(msg)
        self._available_mb -= CHUNK_MB
        self._reading_uses -= 1

    async def _inflate(self) -> None:
        """Map and lock a group of chunks, then hand them over one by one while the goal
        wants them; unmap the rest. A failure stops the walk after the chunks before it."""
        ready, failure = self._allocate(self.goal - len(self.held))
        ready.reverse()  # handed over from the end, in allocation order
        try:
            while ready and len(self.held) < self.goal:
                chunk = ready[-1]
                submission = Submission()
                try:
                    await self.handover.inflate(chunk, submission)
                except VBoxStatusError as exc:  # still ready: unmapped below
                    # The host's status, or the driver's errno as the status it stands for.
                    if self.handover.refusal_ballooned(exc.rc):
                        await self._take_back_refused(ready)
                    raise WalkStoppedError(failure_text(exc)) from exc
                except RemoteProtocolError as exc:  # the host may hold it (module docstring)
                    self._hold_unconfirmed(ready)
                    self._deflate_last(chunk)
                    raise WalkStoppedError(failure_text(exc)) from exc
                except BaseException:
                    # Cancelled mid-call. Once issued, the host may hold the chunk (a real host
                    # answers a deflate of pages it never took with no error, so the drain
                    # cannot tell): held, the drain deflates it. If the inflate never reached
                    # the host, that deflate takes a chunk off a count another chunk put there
                    # (the module docstring). Never issued, the host never saw it: still
                    # ready, unmapped below.
                    if submission.issued:
                        self._hold_unconfirmed(ready)
                    raise
                self.held.append(ready.pop())
                self.inflated += 1
                self._resized()
        finally:
            self._release([chunk.address for chunk in ready])
        if failure is not None and len(self.held) < self.goal:
            raise WalkStoppedError(failure)

    def _hold_unconfirmed(self, ready: list[Chunk]) -> None:
        """Hold the last of ``ready``, which the host may have ballooned: kept mapped until a
        deflate takes it back."""
        chunk = ready.pop()
        self.held.append(chunk)
        self.unconfirmed.add(chunk.address)
        self._resized()

    def _deflate_last(self, chunk: Chunk, *, above: int = 0) -> None:
        """Move held ``chunk``, whose last handover got a malformed reply, to the bottom of
        the balloon, unconfirmed (the module docstring). ``above``: the held chunks above it."""
        self.unconfirmed.add(chunk.address)
        del self.held[-1 - above]
        self.held.insert(0, chunk)

    async def _take_back_refused(self, ready: list[Chunk]) -> None:
        """Deflate the last of ``ready``, whose refused inflate left its pages ballooned at
        the host, so that it may be unmapped with the rest of ``ready``.

        The host's count never took the chunk, so this deflate takes a chunk off a count
        that was already over the pages ballooned (why GMM refused the inflate), bringing
        the two closer. A deflate that fails otherwise, is cancelled or gets a malformed
        reply leaves the pages ballooned as far as the agent can tell: the chunk is held,
        unconfirmed, and given back like any other (after every other one, for a malformed
        reply), never unmapped before.

        The chunk is held unless the host is known to have given it back: held in a
        ``finally``, so that no exit (a failure, or a cancellation at any await, the
        handover's ``not_held`` included) leaves it in ``ready`` to be unmapped.
        """
        chunk = ready[-1]
        back = malformed = False
        try:
            try:
                await self.handover.deflate(chunk, Submission())
            except VBoxStatusError as exc:
                back = await self.handover.not_held(
                    chunk, exc.rc, unconfirmed=True, balloon_empty=False
                )
            except RemoteProtocolError:
                malformed = True
            else:
                back = True
        finally:
            if not back:
                self._hold_unconfirmed(ready)
                if malformed:
                    self._deflate_last(chunk)

    def _allocate(self, count: int) -> tuple[list[Chunk], str | None]:
        """Map and lock up to ``count`` chunks (at most a group), each after the floor check;
        return them and, if one could not be had, why."""
        allocator = self.allocator
        needs_pages = self.handover.needs_pages
        chunks: list[Chunk] = []
        try:
            for _ in range(min(count, BATCH_CHUNKS)):
                if chunks and self._available_known and self._reading_due():
                    break  # a known MemAvailable is read with the walk's chunks handed over
                self._check_floor()
                address = allocator.allocate()
                try:
                    pages = allocator.physical_pages(address) if needs_pages else None
                except BaseException:
                    allocator.release(address)
                    raise
                chunks.append(Chunk(address, pages))
        except (WalkStoppedError, ChunkError) as exc:
            return chunks, str(exc)
        except BaseException:
            self._release([chunk.address for chunk in chunks])
            raise
        return chunks, None

    async def _deflate(self) -> None:
        """Take a group of chunks back one by one while the goal is below, then unmap them."""
        self._reading_uses = 0
        taken: list[int] = []
        try:
            for _ in range(BATCH_CHUNKS):
                if len(self.held) <= self.goal:
                    break
                chunk = self.held[-1]
                if not await self._take_back(chunk):
                    failure = self.last_failure
                    msg = f"the host did not give chunk {chunk.address:#x} back: {failure}"
                    raise WalkStoppedError(msg)
                taken.append(chunk.address)
        finally:
            self._release(taken)

    async def give_back(self, chunk: Chunk, *, above: int = 0) -> bool:
        """Take ``chunk`` back from the host and unmap it; return False if the host refused.

        The chunk stays held (and mapped) when the host refused. ``above``: as for
        :meth:`_take_back`.
        """
        if not await self._take_back(chunk, above=above):
            return False
        self._release([chunk.address])
        return True

    async def _take_back(self, chunk: Chunk, *, above: int = 0) -> bool:
        """Take ``chunk`` back from the host (it is no longer held, not yet unmapped); return
        False, the chunk still held, if the host refused.

        ``above`` is the number of held chunks above ``chunk`` (the drain's refused ones): it
        is found and removed by its position, never by comparing it with the others.

        Cancelled once issued, the deflate may have gone through: the chunk stays held
        (mapped), unconfirmed, and is deflated again; Oracle's driver's answer to that tells
        (the handover's ``not_held``), a real host's does not (the module docstring). A
        malformed reply is a refusal (False) whose chunk is deflated last.
        """
        submission = Submission()
        unconfirmed = self.unconfirmed
        try:
            await self.handover.deflate(chunk, submission)
        except VBoxStatusError as exc:  # a host status, or a driver errno as the status
            # Every held chunk unconfirmed: ``unconfirmed`` names held chunks only.
            empty = len(unconfirmed) == len(self.held)
            if not await self.handover.not_held(
                chunk, exc.rc, unconfirmed=chunk.address in unconfirmed, balloon_empty=empty
            ):
                self.last_failure = failure_text(exc)
                return False
        except RemoteProtocolError as exc:
            self._deflate_last(chunk, above=above)
            self.last_failure = failure_text(exc)
            return False
        except BaseException:
            if submission.issued:
                unconfirmed.add(chunk.address)
            raise
        self.unconfirmed.discard(chunk.address)
        del self.held[-1 - above]
        self.deflated += 1
        self._resized()
        return True

    def _release(self, addresses: list[int]) -> None:
        """Unmap every chunk at ``addresses``; the first failure is raised after the rest."""
        failure: ChunkError | None = None
        for address in addresses:
            try:
                self.allocator.release(address)
            except ChunkError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def drain(self, *, persist: bool = False) -> int:
        """Give every chunk back, newest first; return how many the host kept.

        Without ``persist`` the drain ends at the first refusal. With it a refused chunk is
        passed over for the others, and the refused ones are tried again, every one of
        them, after a short capped backoff (:data:`DRAIN_RETRY_INITIAL_S` doubling up to
        :data:`DRAIN_RETRY_MAX_S`) until all are back or the caller's deadline cancels the
        drain. ``last_failure`` is the drain's last refusal (None if there was none).

        A round tries each chunk held at its start once. The chunks refused in it stay on
        top of those still to try, which are taken from just below them by position, so a
        refusal costs its retry and nothing more (a malformed reply moves its chunk to the
        bottom instead, where this round does not reach it again).
        """
        self.last_failure = None
        delay = DRAIN_RETRY_INITIAL_S
        held = self.held
        while True:
            passed = 0
            for _ in range(len(held)):
                chunk = held[-1 - passed]
                if await self.give_back(chunk, above=passed):
                    continue
                if not persist:
                    return len(held)
                if held[-1 - passed] is chunk:  # still in place: not moved to the bottom
                    passed += 1
            if not held:
                return 0
            (log.warning if delay == DRAIN_RETRY_INITIAL_S else log.debug)(
                "balloon_drain_refused",
                reason=self.last_failure,
                chunks=len(self.held),
                retry_in_s=delay,
            )
            await trio.sleep(delay)
            delay = min(2 * delay, DRAIN_RETRY_MAX_S)
