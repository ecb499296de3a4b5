"""What a stop of the balloon leaves behind: the driver's own balloon (one line, whose level
says whether anybody follows it on), and chunks whose handover's outcome is unknown.

Virtual time (``autojump_clock``) drives every wait; each test is bounded by
``trio.fail_after`` on that clock. Waits for the host's or the daemon's state poll it on
that clock (``balloon_support.until``).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import pytest
import structlog.testing
import trio
import trio.testing

from agent.config import load_config
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.host.driver.oracle import OracleDriver
from agent.protocol import RequestType
from agent.protocol.status import VERR_INVALID_PARAMETER
from agent.services import BalloonGauge, EventPump, Leftovers
from agent.services.balloon import BalloonSection, BalloonService
from agent.services.registry import section_models
from tests.services.balloon_support import (
    Quiet,
    SimChunks,
    hand_to_ring3,
    host_chunks,
    running_balloon,
    start_in_scope,
    until,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from agent.services.balloon._walker import ChunkWalker

LIMIT_S: Final = 120.0
DRAIN_S: Final = 5.0
"""The drain time the tests allow (``daemon.shutdown_timeout_s``)."""
HELD_S: Final = 10.0
"""How long the host holds a change in the port write while the service stops."""
PSI_TEXT: Final = (
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)


def _reloadable_daemon(tmp_path: Path, host: SimulatedHost) -> tuple[Daemon, Path, str]:
    """A daemon on ``host`` with the balloon enabled by a config file the test may rewrite
    and reload; returned with the file and its text."""
    psi = tmp_path / "memory.pressure"
    psi.write_text(PSI_TEXT)
    enabled = f'[balloon]\npsi_path = "{psi}"\nmin_available_mb = 0\n'
    path = tmp_path / "agent.toml"
    path.write_text(enabled)
    daemon = Daemon(
        load_config(path, section_models()),
        SimOpener(host),
        config_path=path,
        notifier=Notifier(None),
    )
    return daemon, path, enabled


def _balloon_mode(daemon: Daemon) -> str | None:
    """The balloon service's mode in the daemon's statistics (None while it has none)."""
    statistics = daemon.statistics().services.get("balloon")
    return getattr(statistics, "mode", None)


class TestLeftToTheDriverByTheDaemon:
    """The daemon tells the balloon's drain whether the whole agent stops."""

    @pytest.mark.parametrize(
        ("kind", "mode", "then"),
        [("mainline", "kernel", "next start"), ("oracle", "triggered", "closes the device")],
    )
    async def test_a_reload_that_disables_the_balloon_warns_a_stop_of_the_agent_does_not(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path, kind: str, mode: str, then: str
    ) -> None:
        """The driver holds a 32 MB balloon. A reload that disables the balloon service
        leaves it with nobody following the host while the agent runs on: a warning. Enabled
        again, the service takes it on; the agent's stop then leaves it to the driver as
        every ordinary stop does (Oracle's deflates it at the close, the in-tree kernel's
        waits for the next start): an info line."""
        host = SimulatedHost(personality=kind)
        daemon, path, enabled = _reloadable_daemon(tmp_path, host)
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as outer:
                await outer.start(host.run)
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    host.set_balloon_target(32)
                    await until(lambda: host_chunks(host) == 32)
                    path.write_text(enabled.replace("[balloon]\n", "[balloon]\nenable = false\n"))
                    await daemon.reload()
                    await until(lambda: "balloon" not in daemon.statistics().services)
                    path.write_text(enabled)
                    await daemon.reload()
                    await until(lambda: _balloon_mode(daemon) == mode)
                    daemon.request_shutdown("test")
                outer.cancel_scope.cancel()
        left = [e for e in logs if e["event"] == "balloon_left_to_driver"]
        assert [(e["log_level"], e["mode"]) for e in left] == [("warning", mode), ("info", mode)]
        assert "runs again" in left[0]["until"]
        assert then in left[1]["until"]


class TestUnansweredCheck:
    """A CHECK_BALLOON on Oracle's driver that the stop cancels leaves a balloon whose size
    no answer told the agent: the drain still says the driver keeps it."""

    @pytest.mark.parametrize("stop", ["reload", "shutdown"])
    @pytest.mark.parametrize("call", ["probe", "read"])
    async def test_the_driver_keeps_what_a_cancelled_check_inflated(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path, call: str, stop: str
    ) -> None:
        """The host holds each page handover of the driver's inflate to 100 MB (the mode
        probe's CHECK_BALLOON at start, or a read after the host's request), and the stop
        comes halfway: the driver keeps what it took, of a size the agent never learnt. A
        reload that disables the balloon warns, a stop of the agent says it in an info
        line."""
        host = SimulatedHost(personality="oracle")
        host.set_delay(RequestType.CHANGE_MEMBALLOON, 0.1)
        if call == "probe":
            host.set_balloon_target(100)
        daemon, path, enabled = _reloadable_daemon(tmp_path, host)
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as outer:
                await outer.start(host.run)
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    if call == "read":
                        await until(lambda: _balloon_mode(daemon) == "triggered")
                        host.set_balloon_target(100)
                    await until(lambda: host_chunks(host) >= 10)
                    assert host_chunks(host) < 100
                    if stop == "reload":
                        path.write_text(
                            enabled.replace("[balloon]\n", "[balloon]\nenable = false\n")
                        )
                        await daemon.reload()
                        await until(lambda: "balloon" not in daemon.statistics().services)
                    daemon.request_shutdown("test")
                outer.cancel_scope.cancel()
        [line] = [e for e in logs if e["event"] == "balloon_left_to_driver"]
        level = "warning" if stop == "reload" else "info"
        mode = "undecided" if call == "probe" else "triggered"
        assert (level, mode, None) == (line["log_level"], line["mode"], line["target"])
        assert "host's pending target" in line["size"]

    async def test_the_gauge_leaves_a_size_no_answer_told_out(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The service stops while the driver inflates to the host's 100 MB (triggered
        mode): what the driver keeps is unknown, so the gauge, which the guest statistics
        report, says nothing rather than the 0 answered before."""
        gauge = BalloonGauge()
        host = SimulatedHost(personality="oracle")
        host.set_delay(RequestType.CHANGE_MEMBALLOON, 0.1)
        with trio.fail_after(LIMIT_S):
            async with running_balloon(personality="", host=host, gauge=gauge) as run:
                await run.service.mode_known.wait()
                assert (run.service.statistics().mode, gauge.chunks) == ("triggered", 0)
                host.set_balloon_target(100)
                await until(lambda: host_chunks(host) >= 10)
                assert host_chunks(host) < 100
        assert (gauge.chunks, gauge.refresh) == (None, None)  # no CHECK_BALLOON to come


@dataclass
class _Stoppable:
    """A balloon service on a simulated host, which the test stops (``stop``) and drains."""

    host: SimulatedHost
    service: BalloonService
    walker: ChunkWalker
    chunks: SimChunks
    gauge: BalloonGauge
    scope: trio.CancelScope
    stopped: trio.Event
    leftovers: Leftovers

    @property
    def host_chunks(self) -> int:
        return host_chunks(self.host)

    async def stop_while_the_host_holds_a_change(self) -> None:
        """Stop the service while the host holds its next CHANGE_MEMBALLOON in the port
        write (the driver has the call, the caller gives up on it), then let the host carry
        it out."""
        self.host.set_delay(RequestType.CHANGE_MEMBALLOON, HELD_S)
        await trio.testing.wait_all_tasks_blocked()  # before the clock jumps: held
        self.scope.cancel()
        await self.stopped.wait()
        before = trio.current_time()
        await trio.sleep(HELD_S)  # the host carries the change out meanwhile
        assert trio.current_time() - before == HELD_S
        self.host.set_delay(RequestType.CHANGE_MEMBALLOON, 0)


@asynccontextmanager
async def _stoppable_balloon(kind: str, *, cpus: int = 1) -> AsyncIterator[_Stoppable]:
    """Oracle's driver without its allocator (allocated mode) or passthrough (owned mode)
    on a host with ``cpus`` vCPUs, and a balloon service on it that the test stops and
    drains."""
    if kind == "oracle-r3":
        host = SimulatedHost(personality="oracle", r3_balloon=True, cpus=cpus)
    else:
        host = SimulatedHost(personality=kind, cpus=cpus)
    chunks, gauge = SimChunks(), BalloonGauge()
    async with trio.open_nursery() as outer:
        await outer.start(host.run)
        await hand_to_ring3(host)
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as inner:
            pump = EventPump(device)
            await inner.start(pump.run)
            leftovers = Leftovers()
            service = BalloonService(
                device,
                pump,
                BalloonSection(),
                allocator=chunks,
                pressure=Quiet(),
                gauge=gauge,
                leftovers=leftovers,
            )
            scope = trio.CancelScope()
            stopped = await start_in_scope(inner, service, scope)
            walker = service.walker
            assert walker is not None
            yield _Stoppable(host, service, walker, chunks, gauge, scope, stopped, leftovers)
            scope.cancel()
            inner.cancel_scope.cancel()
        outer.cancel_scope.cancel()


class TestUnconfirmedInflate:
    """An inflate cancelled once the driver had it leaves its chunk held, its outcome
    unknown: the drain's deflate decides."""

    async def test_a_host_refusal_of_a_chunk_the_driver_took_keeps_it(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Allocated mode. The service stops while the host holds the first chunk's inflate,
        which the host then carries out: the driver holds the chunk, the agent holds it
        unconfirmed (its only chunk). The host refuses the drain's deflate with
        VERR_INVALID_PARAMETER, which Oracle's driver passes on keeping the chunk, and which
        it also answers for an empty balloon. Asked, the driver's balloon is not empty: the
        chunk stays held, mapped and counted, and the next drain gives it back. Forgotten, it
        would stay in the driver's balloon with its memory unmapped."""
        with trio.fail_after(LIMIT_S):
            async with _stoppable_balloon("oracle-r3") as run:
                run.host.set_balloon_target(1)
                await run.stop_while_the_host_holds_a_change()
                assert (len(run.walker.held), len(run.walker.unconfirmed)) == (1, 1)
                assert run.host_chunks == 1
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_INVALID_PARAMETER)
                await run.service.drain()
                assert (len(run.walker.held), len(run.chunks.live)) == (1, 1)
                assert (run.host_chunks, run.gauge.chunks) == (1, 1)
                kept = await run.leftovers.take("balloon")  # what a new start takes over
                assert run.service.walker is None
                assert kept is not None
                await kept.give_back(trio.Event())
                assert (run.walker.held, run.chunks.live, run.host_chunks) == ([], {}, 0)
                driver = run.host.driver
                assert isinstance(driver, OracleDriver)
                assert driver.failed_assertions == []  # no deflate of an empty balloon


class TestUnconfirmedDeflate:
    """A deflate cancelled once the driver had it leaves its chunk held, its outcome unknown:
    the next deflate's answer that the chunk is not in the balloon gives it up."""

    @pytest.mark.parametrize(
        ("kind", "cpus"), [("oracle-r3", 1), ("passthrough", 1), ("passthrough", 2)]
    )
    async def test_a_deflate_that_went_through_is_not_asked_for_for_ever(
        self, autojump_clock: trio.abc.Clock, kind: str, cpus: int
    ) -> None:
        """The balloon holds one chunk; the service stops while the host holds its deflate,
        which the host then carries out. The drain deflates the chunk again, and the chunk
        is given up and unmapped: drained, nothing kept, the host's pages and count back to
        0. Oracle's driver, whose balloon is now empty, answers VERR_INVALID_PARAMETER (asked,
        it confirms the balloon is empty); each deflate of its empty balloon, the drain's and
        the probe's, reaches the driver's assertion (a stop in a VBOX_STRICT build): two, no
        more. The host, passed through, marks the pages again (none was ballooned) and its
        count, at 0, refuses the chunk: one vCPU answers VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH
        (the pages are back, expected of an unconfirmed chunk: no warning), two answer
        success, the host logging the refusal."""
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with _stoppable_balloon(kind, cpus=cpus) as run:
                run.host.set_balloon_target(1)
                await run.walker.wait_held(1)
                run.host.set_balloon_target(0)
                await run.stop_while_the_host_holds_a_change()
                assert (len(run.walker.held), len(run.walker.unconfirmed)) == (1, 1)
                assert run.host_chunks == 0
                with trio.move_on_after(DRAIN_S):
                    await run.service.drain()
                assert (run.walker.held, run.chunks.live, run.gauge.chunks) == ([], {}, 0)
                balloon = run.host.vmmdev.balloon
                assert (balloon.pages, balloon.counted_pages) == (0, 0)
                if kind == "oracle-r3":
                    driver = run.host.driver
                    assert isinstance(driver, OracleDriver)
                    assert len(driver.failed_assertions) == 2
        [drained] = [e for e in logs if e["event"] == "balloon_drained"]
        assert drained["returned"] == 1
        events = [e["event"] for e in logs]
        assert "balloon_drain_incomplete" not in events
        assert "balloon_host_count_short" not in events
        failed = [e["seen_by_guest"] for e in logs if e["event"] == "balloon_change_failed"]
        assert failed == ([cpus == 1] if kind == "passthrough" else [])


class TestShortHostCount:
    """A real host answers a deflate whose pages its count falls short of with
    VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH after it already set those pages back: the chunk is
    out of the balloon, whether or not the agent knew the host had it."""

    async def test_a_chunk_the_host_took_is_given_up_with_one_warning(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Owned mode, one vCPU; the host took both chunks (neither unconfirmed), but its
        count has fallen to 0 (as a deflate of a chunk never inflated leaves it), so it
        answers each deflate with VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH after setting the
        pages back. The drain gives both up and unmaps them, in one pass and not retried to
        the drain's deadline, with one warning that the host's count was off (the second
        chunk's line is at debug level); no page stays ballooned."""
        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with _stoppable_balloon("passthrough") as run:
                run.host.set_balloon_target(2)
                await run.walker.wait_held(2)
                assert run.walker.unconfirmed == set()
                run.scope.cancel()
                await run.stopped.wait()
                balloon = run.host.vmmdev.balloon
                balloon.counted_pages = 0
                began = trio.current_time()
                with trio.move_on_after(DRAIN_S):
                    await run.service.drain()
                assert trio.current_time() == began
                assert (run.walker.held, run.chunks.live, run.gauge.chunks) == ([], {}, 0)
                assert (balloon.pages, balloon.counted_pages) == (0, 0)
        short = [e for e in logs if e["event"] == "balloon_host_count_short"]
        assert [e["log_level"] for e in short] == ["warning", "debug"]
        [drained] = [e for e in logs if e["event"] == "balloon_drained"]
        assert drained["returned"] == 2
        assert "balloon_drain_refused" not in [e["event"] for e in logs]
