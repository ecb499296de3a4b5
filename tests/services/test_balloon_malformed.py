"""Balloon replies that break the ABI (``RemoteProtocolError``): a failure the service backs
off from and shows, as a refusal, never a restart; a chunk whose handover got one is held,
unconfirmed, never unmapped before a deflate takes it back.

Virtual time (``autojump_clock``) drives every wait; each test is bounded by
``trio.fail_after`` on that clock. Waits for the host's state poll it on that clock.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

import pytest
import structlog.testing
import trio

from agent.config import AgentConfig
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimulatedHost
from agent.protocol import (
    RemoteProtocolError,
    RequestType,
    VBoxStatusError,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import Ioctl
from agent.protocol.status import VERR_GENERAL_FAILURE, VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH
from agent.services.balloon import BalloonMode
from agent.services.balloon._handover import HostTarget
from tests.services.balloon_support import (
    Running,
    SimChunks,
    host_chunks,
    running_balloon,
    until,
)
from tests.services.test_balloon_walker import (
    BlockingHandover,
    TrackingAllocator,
    _mapped_is_held,
    _walker,
)
from tests.sim_support import HookedOpener, ReplyGarbler

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from contextlib import AbstractAsyncContextManager

    from agent.device import DeviceOpener
    from agent.protocol import Submission
    from agent.services.balloon._chunks import Chunk

LIMIT_S: Final = 600.0
RAM_MB: Final = 2048
GARBLED_HEADER: Final = (
    "malformed reply: VMMDEVREQ_CHANGE_MEMBALLOON: reply header (size, version, type) is "
    f"(2080, 65537, {ReplyGarbler.GARBLED_TYPE})"
)
"""How a garbled CHANGE_MEMBALLOON reply reads in the status and the log."""
OVER_RAM: Final = (
    "malformed reply: VMMDEVREQ_GET_MEMBALLOON_CHANGE_REQ: target 4294967295 MiB exceeds "
    f"guest RAM {RAM_MB} MiB"
)
BAD_FLAG: Final = "malformed reply: VBG_IOCTL_CHECK_BALLOON: handle_in_r3 is 2, expected 0 or 1"


class GarbleNext(ReplyGarbler):
    """Garbles the next ``left`` replies of ``request_types`` (all while ``left`` is None);
    with ``inflates_only``, only those of inflating CHANGE_MEMBALLOON requests."""

    def __init__(self, left: int | None = 0, *, inflates_only: bool = False) -> None:
        super().__init__()
        self.request_types.add(RequestType.CHANGE_MEMBALLOON)
        self.left = left
        self._inflates_only = inflates_only

    def __call__(self, buffer: bytearray) -> None:
        if self.left == 0 or len(buffer) != L.MemBalloonChangeRequest.size:
            return
        if self._inflates_only and not L.BALLOON_CHANGE_COUNT_AND_FLAG.get(buffer)[1]:
            return
        garbled = self.garbled
        super().__call__(buffer)
        if self.left is not None:
            self.left -= self.garbled - garbled


class BadReads:
    """While ``on``: GET_MEMBALLOON_CHANGE_REQ answers a target of 0xFFFFFFFF MiB (above any
    guest's RAM), CHECK_BALLOON a ``handle_in_r3`` of 2. ``after`` notes each ioctl's code,
    ``reply`` (run right after it, in the same call) rewrites that ioctl's answer."""

    def __init__(self) -> None:
        self.on = False
        self.rewritten = 0
        self._code = 0

    async def after(self, code: int) -> None:
        self._code = code

    def reply(self, buffer: bytearray) -> None:
        if not self.on:
            return
        if self._code == Ioctl.CHECK_BALLOON:
            L.CheckBalloonIoctl.handle_in_r3.set(buffer, 2)
            self.rewritten += 1
        elif L.RequestHeader.request_type.get(buffer) == RequestType.GET_MEMBALLOON_CHANGE_REQ:
            L.MemBalloonInfoRequest.balloon_chunks.set(buffer, 0xFFFF_FFFF)
            self.rewritten += 1

    def opener(self, host: SimulatedHost) -> DeviceOpener:
        return HookedOpener(host, after=self.after, reply=self.reply)


class MalformedTakeBack(BlockingHandover):
    """The 4th inflate is refused with its pages ballooned (GMM's
    VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH); the first deflate, the one taking that chunk back,
    gets a malformed reply; every other handover goes through (``deflated`` lists them)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.deflated: list[int] = []
        self.garbled = False

    async def inflate(self, chunk: Chunk, submission: Submission) -> None:
        del chunk
        self.inflates += 1
        submission.issued = True
        await trio.lowlevel.checkpoint()
        if self.inflates == 4:
            raise VBoxStatusError(VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH, "VMMDEVREQ_CHANGE_MEMBALLOON")

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        submission.issued = True
        await trio.lowlevel.checkpoint()
        if not self.garbled:  # the take-back
            self.garbled = True
            msg = "VMMDEVREQ_CHANGE_MEMBALLOON: garbled"
            raise RemoteProtocolError(msg)
        self.deflated.append(chunk.address)

    def refusal_ballooned(self, rc: int) -> bool:
        return rc == VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH


def _passthrough(*, cpus: int = 2) -> SimulatedHost:
    return SimulatedHost(personality="passthrough", ram_mb=RAM_MB, cpus=cpus)


def _garbled(
    garbler: GarbleNext,
    chunks: SimChunks,
    host: SimulatedHost,
    drain_s: float = math.inf,
    *,
    agent_stops: bool = False,
) -> AbstractAsyncContextManager[Running]:
    """The balloon on ``host`` with ``chunks``, every reply through ``garbler`` first."""
    return running_balloon(
        personality="",
        host=host,
        allocator=chunks,
        drain_s=drain_s,
        agent_stops=agent_stops,
        opener_for=lambda host: HookedOpener(host, reply=garbler),
    )


def _events(logs: Sequence[Mapping[str, object]], name: str) -> list[Mapping[str, object]]:
    return [entry for entry in logs if entry["event"] == name]


class TestMalformedDeflateReplies:
    """Owned mode: a deflate whose reply is malformed may or may not have gone through."""

    @pytest.mark.parametrize("carried_out", [True, False])
    async def test_one_in_the_drain_costs_no_chunk(
        self, autojump_clock: trio.abc.Clock, carried_out: bool
    ) -> None:
        """The drain's first deflate reply is malformed, whether the host carried it out or
        not: the drain gives the 63 others back, then that one, and says it returned all 64;
        the host counts none, its pages and its count agreeing (one vCPU: it answers what
        GMM says)."""
        chunks, garbler = SimChunks(), GarbleNext()
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with _garbled(garbler, chunks, _passthrough(cpus=1), drain_s=5.0) as run:
                run.host.set_balloon_target(64)
                await run.settle(64)
                garbler.left = 1
                if not carried_out:
                    run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_GENERAL_FAILURE)
                stopping = trio.current_time()
            assert (garbler.garbled, run.host_chunks, chunks.live) == (1, 0, {})
            assert trio.current_time() - stopping < 1.0
        [refused] = _events(logs, "balloon_drain_refused")
        assert (refused["log_level"], refused["reason"], refused["chunks"]) == (
            "warning",
            GARBLED_HEADER,
            1,
        )
        assert [entry["returned"] for entry in _events(logs, "balloon_drained")] == [64]
        assert not _events(logs, "balloon_drain_incomplete")
        assert not _events(logs, "balloon_host_count_short")

    async def test_until_the_deadline_every_chunk_stays_mapped_and_is_said_kept(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Every deflate is refused with a malformed reply: the drain retries until its time
        runs out, unmaps nothing the host still holds, and the critical line says what it
        kept, that the host may not have them, and why."""
        chunks, garbler = SimChunks(), GarbleNext()
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with _garbled(
                garbler, chunks, _passthrough(), drain_s=3.0, agent_stops=True
            ) as run:
                run.host.set_balloon_target(8)
                await run.settle(8)
                garbler.left = None
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_GENERAL_FAILURE, 10**6)
            assert (run.host_chunks, len(chunks.live)) == (8, 8)
        [incomplete] = _events(logs, "balloon_drain_incomplete")
        figures = ("log_level", "returned", "kept", "unconfirmed", "reason", "last_refusal")
        assert tuple(incomplete[name] for name in figures) == (
            "critical",
            0,
            8,
            8,
            "the drain time ran out",
            GARBLED_HEADER,
        )

    async def test_in_a_walk_its_chunk_is_deflated_last(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A walk from 32 to 16 chunks meets one malformed deflate reply (the host carried it
        out): one warning, the walk goes on after its backoff with the other chunks and holds
        16, one of them unconfirmed, which the host no longer counts. A walk to 0 deflates
        that one last, when the host's count says it has it no more: no chunk is taken off
        the count twice, none is left mapped."""
        chunks, garbler = SimChunks(), GarbleNext()
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with _garbled(garbler, chunks, _passthrough(cpus=1)) as run:
                walker = run.walker
                run.host.set_balloon_target(32)
                await run.settle(32)
                garbler.left = 1
                run.host.set_balloon_target(16)
                await run.until(lambda: len(walker.held) == 16 and walker.last_failure is None)
                assert (run.host_chunks, len(walker.unconfirmed)) == (15, 1)
                run.host.set_balloon_target(0)
                await run.until(lambda: not walker.held)
                assert (run.host_chunks, chunks.live, walker.unconfirmed) == (0, {}, set())
        [stopped] = _events(logs, "balloon_walk_stopped")
        assert stopped["log_level"] == "warning"
        assert GARBLED_HEADER in str(stopped["reason"])
        assert not _events(logs, "balloon_host_count_short")
        assert [entry["event"] for entry in logs].count("balloon_mode") == 1

    async def test_taking_back_a_refused_inflate_holds_its_chunk_to_deflate_last(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """An inflate refused with its pages ballooned is taken back with a deflate whose
        reply is malformed: the host may still have the pages, so the chunk stays held and
        mapped, unconfirmed, at the bottom of the balloon, and the drain deflates it last."""
        allocator, handover = TrackingAllocator(), MalformedTakeBack()
        walker = _walker(handover, allocator)
        walker.set_target(HostTarget(chunks=4, max_chunks=None))
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(walker.run)
                await walker.wait_held(4)
                nursery.cancel_scope.cancel()
            bottom = walker.held[0]
            assert walker.unconfirmed == {bottom.address}
            assert handover.inflates == 4
            assert _mapped_is_held(walker, allocator)
            assert await walker.drain() == 0
        assert handover.deflated[-1] == bottom.address
        assert (walker.held, allocator.mapped) == ([], set())


class TestMalformedInflateReplies:
    async def test_are_failed_steps_whose_chunks_stay_held(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Two minutes of inflate replies that name another request type (far more failures
        than the supervisor's restart budget): the walk backs off, logs once, says why in
        the status; each chunk the host took is held, unconfirmed. Sound replies again, the
        walk reaches the target; the drain gives every chunk back."""
        chunks, garbler = SimChunks(), GarbleNext(None, inflates_only=True)
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with _garbled(garbler, chunks, _passthrough()) as run:
                walker = run.walker
                run.host.set_balloon_target(64)
                await trio.sleep(120.0)
                held = len(walker.held)
                assert garbler.garbled == held == len(walker.unconfirmed) == run.host_chunks > 2
                assert run.service.status() == (
                    f"balloon {held}/64 MB (owned, failing: {GARBLED_HEADER})"
                )
                garbler.left = 0
                await run.until(lambda: len(walker.held) == 64 and walker.last_failure is None)
                assert run.host_chunks == 64
                assert run.service.status() == "balloon 64/64 MB (owned)"
            assert (run.host_chunks, chunks.live) == (0, {})
        stopped = _events(logs, "balloon_walk_stopped")
        assert [entry["log_level"] for entry in stopped[:2]] == ["warning", "debug"]
        assert stopped[0]["reason"] == GARBLED_HEADER
        assert [entry["returned"] for entry in _events(logs, "balloon_drained")] == [64]


class TestMalformedTargetReads:
    async def test_a_target_above_the_guest_ram_keeps_the_current_one(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Passthrough: the host names a target above the guest's RAM for five minutes. One
        warning naming the request and the values, the target and the chunks stay, the
        status says why; the read is retried after its backoff, and the first sound answer
        applies."""
        bad = BadReads()
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="", host=_passthrough(), opener_for=bad.opener
            ) as run:
                walker = run.walker
                run.host.set_balloon_target(32)
                await run.settle(32)
                bad.on = True
                run.host.set_balloon_target(16)
                await trio.sleep(300.0)
                assert bad.rewritten > 3
                assert (walker.target, len(walker.held), run.host_chunks) == (32, 32, 32)
                assert run.service.status() == (
                    f"balloon 32/32 MB (owned, target read failing: {OVER_RAM})"
                )
                bad.on = False
                await run.settle(16)
                assert run.service.status() == "balloon 16/16 MB (owned)"
        failed = _events(logs, "balloon_check_failed")
        assert [entry["log_level"] for entry in failed[:2]] == ["warning", "debug"]
        assert failed[0]["malformed_reply"] == OVER_RAM.removeprefix("malformed reply: ")
        assert len(_events(logs, "balloon_check_recovered")) == 1
        assert [entry["event"] for entry in logs].count("balloon_mode") == 1

    async def test_a_malformed_probe_reply_is_retried(self, autojump_clock: trio.abc.Clock) -> None:
        """The mode probe's GET_MEMBALLOON_CHANGE_REQ names a target above the guest's RAM:
        one warning, the status says why, the probe is retried after its backoff, and
        decides once the answer is sound (one line)."""
        bad = BadReads()
        bad.on = True
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="", host=_passthrough(), opener_for=bad.opener
            ) as run:
                await trio.sleep(10.0)
                failing = f"balloon mode undecided (probe failing: {OVER_RAM})"
                assert (run.service.mode, run.service.status()) == (None, failing)
                bad.on = False
                await run.service.mode_known.wait()
                assert run.service.mode is BalloonMode.OWNED
                assert run.service.status() == "balloon 0/0 MB (owned)"
        failed = _events(logs, "balloon_check_failed")
        assert failed[0]["log_level"] == "warning"
        assert failed[0]["malformed_reply"] == OVER_RAM.removeprefix("malformed reply: ")
        assert len(_events(logs, "balloon_check_recovered")) == 1

    @pytest.mark.parametrize(("kind", "mode"), [("mainline", "kernel"), ("oracle", "triggered")])
    async def test_a_check_balloon_flag_out_of_range_is_a_failed_read(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: str
    ) -> None:
        """CHECK_BALLOON answers ``handle_in_r3`` = 2 after a restore, for two minutes: one
        warning naming the ioctl and the value, the status says why, the service goes on;
        the first sound answer ends it."""
        bad = BadReads()
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with running_balloon(personality=kind, opener_for=bad.opener) as run:
                await run.service.mode_known.wait()
                assert run.service.mode == mode
                bad.on = True
                run.host.restore()
                await trio.sleep(120.0)
                assert bad.rewritten > 3
                status = run.service.status()
                assert status.endswith(f"target read failing: {BAD_FLAG})"), status
                bad.on = False
                await run.until(lambda: "failing" not in run.service.status())
        failed = _events(logs, "balloon_check_failed")
        assert [entry["log_level"] for entry in failed[:2]] == ["warning", "debug"]
        assert failed[0]["malformed_reply"] == BAD_FLAG.removeprefix("malformed reply: ")
        assert len(_events(logs, "balloon_check_recovered")) == 1
        assert [entry["event"] for entry in logs].count("balloon_mode") == 1

    async def test_the_real_driver_too(self, personality: str) -> None:
        """As above beside the real driver's own balloon work (real time: its threads keep
        the virtual clock from jumping): the failed read is in the status; the next event
        reads again at once, and a sound answer ends it."""
        bad = BadReads()
        with trio.fail_after(30), structlog.testing.capture_logs() as logs:
            async with running_balloon(personality=personality, opener_for=bad.opener) as run:
                await run.service.mode_known.wait()
                assert run.service.mode is BalloonMode.KERNEL
                bad.on = True
                run.host.restore()
                await until(lambda: BAD_FLAG in run.service.status())
                bad.on = False
                run.host.restore()
                await until(lambda: "failing" not in run.service.status())
        [failed] = _events(logs, "balloon_check_failed")
        assert failed["malformed_reply"] == BAD_FLAG.removeprefix("malformed reply: ")
        assert len(_events(logs, "balloon_check_recovered")) == 1


class TestTheDaemonRunsOn:
    @pytest.mark.parametrize("case", ["target over RAM", "flag out of range", "inflate reply"])
    async def test_malformed_balloon_replies_never_restart_the_service(
        self, autojump_clock: trio.abc.Clock, case: str
    ) -> None:
        """Two minutes of malformed balloon replies under the daemon, from a new target on:
        no restart (before, the supervisor spent its budget in 31 s and the agent exited),
        no log line with an exception group's repr; the stop gives every chunk the agent
        holds back (the in-tree kernel keeps its own, at the new target)."""
        bad, garbler = BadReads(), GarbleNext(None, inflates_only=True)

        def reply(buffer: bytearray) -> None:
            bad.reply(buffer)
            if case == "inflate reply":
                garbler(buffer)

        kernel = case == "flag out of range"
        host = SimulatedHost(personality="mainline" if kernel else "passthrough", ram_mb=RAM_MB)
        opener = HookedOpener(host, after=bad.after, reply=reply)
        daemon = Daemon(AgentConfig(), opener, notifier=Notifier(None))
        if case == "inflate reply":
            garbler.left = 0
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as outer:
                await outer.start(host.run)
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    host.set_balloon_target(16)
                    await until(lambda: host_chunks(host) == 16)
                    bad.on, garbler.left = case != "inflate reply", None
                    host.set_balloon_target(64)
                    host.restore()
                    await trio.sleep(120.0)
                    assert bad.rewritten + garbler.garbled > 3
                    daemon.request_shutdown("test")
                outer.cancel_scope.cancel()
        assert host_chunks(host) == (64 if kernel else 0)
        events = [entry["event"] for entry in logs]
        assert not {"service_failed", "service_gave_up", "balloon_drain_incomplete"} & set(events)
        assert not [entry for entry in logs if "ExceptionGroup" in repr(entry)]
        assert events.count("balloon_mode") == 1
