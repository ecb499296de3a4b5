"""The balloon service against the in-process simulated host, in every driver's mode.

Virtual time (``autojump_clock``) drives every wait; each test is bounded by
``trio.fail_after`` on that clock. Waits for the host's state poll it on that clock.
"""

from __future__ import annotations

import errno
import os
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

import pytest
import structlog.testing
import trio

from agent.device import open_device
from agent.host import SimOpener, SimTransport, SimulatedHost
from agent.host.driver.oracle import OracleDriver
from agent.protocol import (
    BalloonStatus,
    ChangeBalloon,
    ChangeMemBalloon,
    CheckBalloon,
    GetMemBalloonChangeRequest,
    RequestType,
    VBoxStatusError,
)
from agent.protocol.constants import BALLOON_CHUNK_PAGES, BALLOON_CHUNK_SIZE
from agent.protocol.status import (
    STATUS_CODES,
    VERR_GENERAL_FAILURE,
    VERR_INVALID_PARAMETER,
    VERR_NO_MEMORY,
    VERR_PERMISSION_DENIED,
)
from agent.services import EventPump, Leftovers
from agent.services._base import BalloonGauge
from agent.services.balloon import BalloonMode, BalloonSection, BalloonService, PressureReading
from agent.services.balloon._mode import detect_mode
from agent.services.balloon._pressure import PressureFileError
from agent.services.balloon._service import MAX_HOLD_FACTOR
from agent.services.balloon._walker import (
    DRAIN_RETRY_INITIAL_S,
    DRAIN_RETRY_MAX_S,
    MEMINFO_REUSE_CHUNKS,
)
from tests.services.balloon_support import (
    ErrnoOnce,
    Quiet,
    RecordRefusals,
    RefuseChunk,
    Running,
    ScriptedPressure,
    SimChunks,
    hand_to_ring3,
    running_balloon,
    start_in_scope,
)
from tests.services.test_balloon_pressure import PSI_TEXT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
    from pathlib import Path

    from agent.device import Device

WALKING = [("oracle-r3", BalloonMode.ALLOCATED), ("passthrough", BalloonMode.OWNED)]
CHANGE_OPERATION = {
    BalloonMode.ALLOCATED: ChangeBalloon.operation,
    BalloonMode.OWNED: ChangeMemBalloon.operation,
}
READ_OPERATION = {
    BalloonMode.ALLOCATED: CheckBalloon.operation,
    BalloonMode.OWNED: GetMemBalloonChangeRequest.operation,
}
"""What each walking mode's ioctl is named in the errors the device raises."""


def _host(kind: str) -> SimulatedHost:
    if kind == "oracle-r3":
        return SimulatedHost(personality="oracle", r3_balloon=True)
    return SimulatedHost(personality=kind)


def _balloon_state(host: SimulatedHost) -> dict[str, object]:
    """The balloon as the host and (Oracle's) driver hold it, and the driver's assertions."""
    state: dict[str, object] = {"host": host.status()["balloon"]}
    driver = host.driver
    if isinstance(driver, OracleDriver):
        state |= {
            "owner": driver.owner,
            "kernel_api": driver.use_kernel_api,
            "chunks": dict(driver.chunks),
            "kernel_chunks": list(driver.kernel_chunks),
            "assertions": list(driver.failed_assertions),
        }
    return state


@asynccontextmanager
async def _device_with_pump(
    host: SimulatedHost, *, before: Callable[[SimulatedHost], Awaitable[None]] | None = None
) -> AsyncIterator[tuple[Device, EventPump, trio.Nursery]]:
    """``host`` running, a device on it and the device's event pump, with the nursery the
    pump runs in, for the services a test builds itself; all stop when the block ends.
    ``before`` runs once the host runs, before the device opens."""
    async with trio.open_nursery() as outer:
        await outer.start(host.run)
        if before is not None:
            await before(host)
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as inner:
            pump = EventPump(device)
            await inner.start(pump.run)
            yield device, pump, inner
            inner.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def _inflate_two(host: SimulatedHost, device: Device) -> None:
    """Ring 3: ``device`` owns the balloon and hands two chunks over."""
    await hand_to_ring3(host)
    host.set_balloon_target(2)
    assert (await device.check_balloon()).handle_in_r3
    for index in range(2):
        await device.request(ChangeBalloon((index + 1) * BALLOON_CHUNK_SIZE, inflate=True))


PROBED = {
    "mainline": ("mainline", False),
    "oracle": ("oracle", True),
    "oracle-r3": ("oracle-r3", True),
    "oracle-r3-held": ("oracle-r3", True),
    "oracle-owned-elsewhere": ("oracle", True),
    "oracle-r3-held-elsewhere": ("oracle-r3", True),
}
"""Driver states before the mode probe: the host, and whether CHECK_BALLOON may move the
balloon in the kernel (so the probe's gate holds it back)."""


async def _prepare(state: str, host: SimulatedHost, ours: Device, other: Device) -> None:
    if state == "oracle-r3":  # an earlier agent left the driver in ring-3 mode, empty
        await hand_to_ring3(host)
    elif state == "oracle-r3-held":
        await _inflate_two(host, ours)
    elif state == "oracle-owned-elsewhere":
        await other.check_balloon()
    elif state == "oracle-r3-held-elsewhere":
        await _inflate_two(host, other)


async def _claim_the_balloon(host: SimulatedHost, *, sessions: list[SimTransport]) -> None:
    """Another session's CHECK_BALLOON makes it the owner of Oracle's balloon; the session
    is kept open in ``sessions``."""
    other = await SimOpener(host).open_session()
    call = CheckBalloon().encode()
    await other.ioctl(call.code, call.buffer)
    sessions.append(other)


class TestModes:
    """The mode comes from the driver's answers."""

    @pytest.mark.parametrize("state", [*PROBED, "passthrough"])
    async def test_the_probe_changes_nothing(
        self, autojump_clock: trio.abc.Clock, state: str
    ) -> None:
        """Up to its CHECK_BALLOON the mode probe claims nothing and changes nothing, on every
        driver in every balloon state (Oracle's ring-3 driver asserts on a deflate of an
        empty balloon in a VBOX_STRICT build); it tells Oracle's driver from the in-tree one."""
        kind, may_allocate = PROBED.get(state, (state, None))
        host = _host(kind)
        seen: list[tuple[bool, dict[str, object]]] = []

        async def before_check(allocates: bool) -> None:
            seen.append((allocates, _balloon_state(host)))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
                await nursery.start(host.run)
                ours = await stack.enter_async_context(open_device(SimOpener(host)))
                other = await stack.enter_async_context(open_device(SimOpener(host)))
                await _prepare(state, host, ours, other)
                before = _balloon_state(host)
                if state.endswith("elsewhere"):
                    with pytest.raises(VBoxStatusError) as refused:
                        await detect_mode(ours, before_check)
                    assert refused.value.rc == VERR_PERMISSION_DENIED
                else:
                    detected = await detect_mode(ours, before_check)
                    assert (detected.mode is BalloonMode.OWNED) == (may_allocate is None)
                nursery.cancel_scope.cancel()
        assert seen == ([] if may_allocate is None else [(may_allocate, before)])
        assert before.get("assertions", []) == []

    @pytest.mark.parametrize(
        ("kind", "mode"),
        [
            ("mainline", BalloonMode.KERNEL),
            ("oracle", BalloonMode.TRIGGERED),
            ("oracle-r3", BalloonMode.TRIGGERED),  # until its first inflate
            ("passthrough", BalloonMode.OWNED),
        ],
    )
    async def test_mode_from_driver(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind)) as run:
                assert run.service.mode is mode

    @pytest.mark.parametrize("start", ["handed over", "target waiting"])
    async def test_a_ring3_driver_at_start(
        self, autojump_clock: trio.abc.Clock, start: str
    ) -> None:
        """Oracle's driver without its allocator answers the probe ``handle_in_r3`` once an
        inflate handed the balloon to ring 3 (an earlier agent's), or when the probe's own
        CHECK_BALLOON is that inflate (a target waiting): allocated mode from the start."""

        async def target_waiting(host: SimulatedHost) -> None:
            host.set_balloon_target(16)

        before = hand_to_ring3 if start == "handed over" else target_waiting
        with trio.fail_after(60):
            async with running_balloon(
                personality="", host=_host("oracle-r3"), before=before
            ) as run:
                assert run.service.mode is BalloonMode.ALLOCATED
                run.host.set_balloon_target(16)
                await run.settle(16)

    async def test_a_ring3_driver_hands_over_at_its_first_inflate(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Oracle's driver without its allocator answers as the Linux build (triggered mode)
        until a CHECK_BALLOON needs an inflate; that one answers ``handle_in_r3`` and the
        service walks the target with its own chunks from then on, as VBoxService, which
        reads the flag on every refresh."""
        gauge = BalloonGauge()
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running_balloon(personality="", host=_host("oracle-r3"), gauge=gauge) as run:
                assert run.service.mode is BalloonMode.TRIGGERED
                run.host.set_balloon_target(16)
                await run.settle(16)
                walker = run.walker
                assert (run.service.mode, len(walker.held), gauge.chunks) == (
                    BalloonMode.ALLOCATED,
                    16,
                    16,
                )
                assert run.service.status() == "balloon 16/16 MB (allocated)"
                run.host.set_balloon_target(4)
                await run.settle(4)
                assert len(walker.held) == 4
        modes = [e for e in logs if e["event"] == "balloon_mode"]
        assert [e["mode"] for e in modes] == ["triggered", "allocated"]
        assert (modes[1]["previous"], modes[1]["target"]) == ("triggered", 16)
        assert "handle_in_r3" in modes[1]["reason"]

    async def test_a_hand_over_during_a_pressure_hold_waits_for_its_end(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Pressure postponed the CHECK_BALLOON until the cooldown forced it, and it handed
        the balloon to the agent: the walk waits for the hold's end, as any walk capped by
        pressure."""
        pressure = ScriptedPressure()
        section = BalloonSection(pressure_cooldown_s=30.0)

        async def press_for(seconds: int) -> None:
            for _ in range(seconds // 2):
                pressure.send(90.0, high=True)
                await trio.sleep(2)

        with trio.fail_after(600):
            async with running_balloon(
                personality="", host=_host("oracle-r3"), section=section, pressure=pressure
            ) as run:
                run.nursery.start_soon(press_for, 60)
                await run.until(lambda: run.service.statistics().pressure_events == 1)
                run.host.set_balloon_target(16)
                await run.until(lambda: run.service.mode is BalloonMode.ALLOCATED)
                assert run.service.statistics().cap == 0
                assert run.host_chunks == 0
                await run.settle(16)
                assert run.service.statistics().pressure_events == 30


PROBE_FAULTS = [
    ("passthrough", BalloonMode.OWNED, GetMemBalloonChangeRequest.operation),
    ("oracle", BalloonMode.TRIGGERED, CheckBalloon.operation),
]
"""Drivers whose mode probe reaches the host's GET_MEMBALLOON_CHANGE_REQ, the mode it
decides, and the request it names when the host fails: passthrough's own, and the
CHECK_BALLOON for which Oracle's driver asks the host."""


def _fail_first_reads(status: str, count: int) -> Callable[[SimulatedHost], Awaitable[None]]:
    """A ``before`` hook: the host fails the next ``count`` GET_MEMBALLOON_CHANGE_REQ."""

    async def fail(host: SimulatedHost) -> None:
        host.add_fault(RequestType.GET_MEMBALLOON_CHANGE_REQ, STATUS_CODES[status], count)
        await trio.lowlevel.checkpoint()

    return fail


def _events(logs: Sequence[Mapping[str, object]], name: str) -> list[Mapping[str, object]]:
    return [entry for entry in logs if entry["event"] == name]


class TestModeProbeFailures:
    """A mode probe the host fails is retried: one warning, the status says why until one
    goes through, and one line says when it did. Only the driver's own refusal of
    GET_MEMBALLOON_CHANGE_REQ (in-tree: EPERM; Oracle's: VERR_PERMISSION_DENIED in the
    reply) rules the owned mode out."""

    @pytest.mark.parametrize(("kind", "mode", "operation"), PROBE_FAULTS)
    @pytest.mark.parametrize("status", ["VERR_GENERAL_FAILURE", "VERR_PERMISSION_DENIED"])
    async def test_a_host_failure_at_start_is_retried(
        self,
        autojump_clock: trio.abc.Clock,
        kind: str,
        mode: BalloonMode,
        operation: str,
        status: str,
    ) -> None:
        """The host fails the first three reads of the balloon request (passthrough: the
        agent's own, which its driver passed on, whatever the status; Oracle's: the
        driver's, for the probe's CHECK_BALLOON): the mode is decided at the fourth probe,
        7 s in, and the balloon follows the host's target."""
        published = Published()
        with trio.fail_after(120), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality=kind,
                before=_fail_first_reads(status, 3),
                status_changed=published.changed,
            ) as run:
                started = trio.current_time()
                failing = f"balloon mode undecided (probe failing: {operation}: {status})"
                assert published.text(run.service) == failing
                await run.service.mode_known.wait()
                assert run.service.mode is mode
                assert trio.current_time() - started == 1.0 + 2.0 + 4.0
                assert "failing" not in published.text(run.service)
                run.host.set_balloon_target(16)
                await run.settle(16)
                assert run.service.statistics().failures == 3
        failed = _events(logs, "balloon_check_failed")
        assert [entry["log_level"] for entry in failed] == ["warning", "debug", "debug"]
        assert (failed[0]["operation"], failed[0]["status"]) == (operation, status)
        [recovered] = _events(logs, "balloon_check_recovered")
        assert recovered["log_level"] == "info"
        assert [entry["mode"] for entry in _events(logs, "balloon_mode")] == [str(mode)]

    async def test_the_in_tree_drivers_refusal_decides_at_once(self, personality: str) -> None:
        """The in-tree driver, the real one too, refuses the agent's GET_MEMBALLOON_CHANGE_REQ
        itself (EPERM) before the host could fail it: kernel mode at the first probe, with
        no failure (real time: the real driver's threads keep a virtual clock from jumping)."""
        with trio.fail_after(30), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality=personality, before=_fail_first_reads("VERR_GENERAL_FAILURE", 3)
            ) as run:
                assert run.service.mode is BalloonMode.KERNEL
                assert run.service.status() == "balloon 0 MB (kernel)"
        assert not _events(logs, "balloon_check_failed")


class TestFollowsTarget:
    """`host balloon N` moves the host's chunk count to N, in every mode."""

    @pytest.mark.parametrize("kind", ["mainline", "oracle", "oracle-r3", "passthrough"])
    async def test_inflate_then_deflate(self, autojump_clock: trio.abc.Clock, kind: str) -> None:
        """The gauge follows the balloon, and once the service stopped and drained keeps
        what it left behind: the driver's 16 MB (the in-tree kernel's, read afresh, and
        again at every later read; the target Oracle's driver applied, whose CHECK_BALLOON
        nothing calls again), or nothing where the agent gave its chunks back."""
        gauge = BalloonGauge()
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind), gauge=gauge) as run:
                assert gauge.chunks == 0
                run.host.set_balloon_target(64)
                await run.settle(64)
                if run.service.walker is not None:
                    assert gauge.chunks == 64
                run.host.set_balloon_target(16)
                await run.settle(16)
                if run.service.mode is BalloonMode.KERNEL:
                    await gauge.read()  # asks the driver for the size, as a statistics report
                await run.until(lambda: run.service.statistics().target == 16)
                # Triggered mode: the driver's answer is the target; it never tells its size.
                expected = None if run.service.mode is BalloonMode.TRIGGERED else 16
                assert run.service.statistics().chunks == expected
                assert "16" in run.service.status()
                assert gauge.chunks == 16
                drained = 0 if run.service.walker is not None else 16
                kernel = run.service.mode is BalloonMode.KERNEL
        assert (gauge.chunks, gauge.refresh is not None) == (drained, kernel)

    @pytest.mark.parametrize("kind", ["mainline", "oracle", "oracle-r3", "passthrough"])
    async def test_a_target_back_to_zero_empties_the_balloon(
        self, autojump_clock: trio.abc.Clock, kind: str
    ) -> None:
        """The host asks for 64 MB, then none: the balloon empties. The host tells the guest
        only of a target other than the last one the guest acknowledged, so a read that
        does not acknowledge would leave 0 unannounced."""
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind)) as run:
                run.host.set_balloon_target(64)
                await run.settle(64)
                run.host.set_balloon_target(0)
                await run.settle(0)

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_new_target_redirects_a_walk(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """A target arriving mid-walk turns the walk around at once."""
        with trio.fail_after(60):
            async with running_balloon(
                personality="", host=_host(kind), before=hand_to_ring3
            ) as run:
                walker = run.walker
                run.host.set_delay(RequestType.CHANGE_MEMBALLOON, 0.01)
                run.host.set_balloon_target(200)
                await run.until(lambda: run.host_chunks >= 10)
                run.host.set_balloon_target(5)
                await run.settle(5)
                assert walker.inflated < 200

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_stop_gives_every_chunk_back(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        chunks = SimChunks()
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind), allocator=chunks) as run:
                run.host.set_balloon_target(32)
                await run.settle(32)
            assert run.host_chunks == 0
        assert not chunks.live

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_drain_cut_short_says_what_it_kept(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """A drain the drain time cuts short logs what went back and what the agent kept."""
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with running_balloon(personality="", host=_host(kind), drain_s=2.5) as run:
                run.host.set_balloon_target(8)
                await run.settle(8)
                run.host.set_delay(RequestType.CHANGE_MEMBALLOON, 1.0)
        [incomplete] = [entry for entry in logs if entry["event"] == "balloon_drain_incomplete"]
        # The agent runs on here: the leftovers give the chunks back in the background.
        assert incomplete["log_level"] == "warning"
        assert incomplete["returned"] + incomplete["kept"] == 8
        assert incomplete["kept"] > 0
        assert incomplete["reason"] == "the drain time ran out"

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_successor_takes_over_chunks_a_drain_kept(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """A reload that rebuilds the service (or a stop and a new start) after a drain the
        host cut short: the new instance carries on with the chunks the old one kept, so the
        host's balloon matches the target and every chunk is given back in the end."""
        host = _host(kind)
        chunks = SimChunks()
        with trio.fail_after(600):
            async with _device_with_pump(host) as (device, pump, inner):
                gauge = BalloonGauge()
                leftovers = Leftovers()  # the daemon's: one for every instance

                def build() -> BalloonService:
                    return BalloonService(
                        device,
                        pump,
                        BalloonSection(),
                        allocator=chunks,
                        pressure=Quiet(),
                        mem_available_mb=lambda: 1 << 20,
                        gauge=gauge,
                        leftovers=leftovers,
                    )

                async def host_shows(count: int) -> None:
                    for _ in range(10_000):
                        if host.vmmdev.balloon.chunks == count:
                            return
                        await trio.sleep(0.01)
                    raise AssertionError(host.vmmdev.balloon.chunks)

                first = build()
                stop = await inner.start(_run_until_stopped, first)
                host.set_balloon_target(8)
                await host_shows(8)
                assert first.walker is not None  # every deflate refused until the drain time
                first.walker.handover = ErrnoOnce(
                    first.walker.handover,
                    VBoxStatusError.from_errno(errno.EIO, CHANGE_OPERATION[mode]),
                    deflate=10**6,
                )
                await stop()
                with trio.move_on_after(5.0):
                    await first.drain()  # refused at the first chunk: all 8 kept
                # The gauge (which the guest statistics report) still counts them.
                assert (host.vmmdev.balloon.chunks, len(chunks.live), gauge.chunks) == (8, 8, 8)
                assert host.vmmdev.balloon.pages == 8 * BALLOON_CHUNK_PAGES

                second = build()
                stop = await inner.start(_run_until_stopped, second)
                assert second.walker is not None
                await second.walker.wait_held(8)
                assert (host.vmmdev.balloon.chunks, len(chunks.live)) == (8, 8)
                assert host.vmmdev.balloon.pages == 8 * BALLOON_CHUNK_PAGES
                assert second.statistics().chunks == 8
                host.set_balloon_target(3)
                await host_shows(3)
                await stop()
                await second.drain()
                assert (host.vmmdev.balloon.chunks, host.vmmdev.balloon.pages, chunks.live) == (
                    0,
                    0,
                    {},
                )
                assert gauge.chunks == 0

    async def test_owned_drain_retries_a_refused_chunk(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Passthrough: no driver deflates on close, so a drain retries a chunk the host
        refused (once, here) instead of leaving it ballooned: every chunk goes back."""
        chunks = SimChunks()
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="passthrough", allocator=chunks, drain_s=5.0
            ) as run:
                run.host.set_balloon_target(32)
                await run.settle(32)
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_GENERAL_FAILURE)
                stopping = trio.current_time()
            assert (run.host_chunks, chunks.live) == (0, {})
            assert trio.current_time() - stopping < 1.0
        [refused] = [e for e in logs if e["event"] == "balloon_drain_refused"]
        assert (refused["log_level"], refused["retry_in_s"]) == ("warning", DRAIN_RETRY_INITIAL_S)
        assert [e["returned"] for e in logs if e["event"] == "balloon_drained"] == [32]

    async def test_owned_drain_refused_until_the_deadline_is_critical(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The host refuses every deflate: the drain retries until its time runs out, then
        one critical line names the chunks left and why they matter after the exit."""
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="passthrough", drain_s=3.0, agent_stops=True
            ) as run:
                run.host.set_balloon_target(8)
                await run.settle(8)
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_GENERAL_FAILURE, 10**6)
                stopping = trio.current_time()
            assert run.host_chunks == 8
            assert trio.current_time() - stopping == pytest.approx(3.0)
        [incomplete] = [e for e in logs if e["event"] == "balloon_drain_incomplete"]
        assert (incomplete["log_level"], incomplete["kept"]) == ("critical", 8)
        assert "8 chunks" in incomplete["note"]
        assert "once this process exits the kernel reuses their pages" in incomplete["note"]
        refused = [e for e in logs if e["event"] == "balloon_drain_refused"]
        assert [e["log_level"] for e in refused[:2]] == ["warning", "debug"]
        assert max(e["retry_in_s"] for e in refused) == DRAIN_RETRY_MAX_S

    async def test_owned_drain_passes_over_a_refused_chunk(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Passthrough: the host keeps refusing one chunk, the first the drain tries: the
        drain gives the 49 others back and retries that one (backing off) until the drain
        time runs out; the critical line names the one left and the host's refusal."""
        chunks = SimChunks()
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="passthrough", allocator=chunks, drain_s=3.0, agent_stops=True
            ) as run:
                run.host.set_balloon_target(50)
                await run.settle(50)
                walker = run.walker
                newest = walker.held[-1].address
                walker.handover = refusing = RefuseChunk(walker.handover, newest)
            assert (run.host_chunks, list(chunks.live)) == (1, [newest])
        assert refusing.refusals > 2  # tried again while the drain time lasted
        [incomplete] = [e for e in logs if e["event"] == "balloon_drain_incomplete"]
        assert (incomplete["log_level"], incomplete["returned"], incomplete["kept"]) == (
            "critical",
            49,
            1,
        )
        assert incomplete["reason"] == "the drain time ran out"
        assert incomplete["last_refusal"] == "VMMDEVREQ_CHANGE_MEMBALLOON: VERR_NO_MEMORY"
        refused = [e for e in logs if e["event"] == "balloon_drain_refused"]
        assert [e["chunks"] for e in refused[:2]] == [1, 1]
        assert [e["log_level"] for e in refused[:2]] == ["warning", "debug"]

    async def test_oracle_session_close_deflates_kernel_chunks(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        with trio.fail_after(60):
            async with running_balloon(personality="oracle") as run:
                run.host.set_balloon_target(32)
                await run.settle(32)
            assert run.host_chunks == 0

    @pytest.mark.parametrize("kind", ["oracle-r3", "passthrough"])
    async def test_a_chunk_the_driver_never_got_is_unmapped_not_held(
        self, kind: str, autojump_clock: trio.abc.Clock
    ) -> None:
        """The service stops as the walker hands its first chunk over, before the driver has
        the call (its ``Submission`` not issued, as a call waiting for a thread on the real
        device). The host never saw the chunk, so it is unmapped at once and never held: the
        drain sends no deflate (a real host answers one for pages it never took with success,
        so the drain could not tell), nothing kept, nothing leaked."""
        host = _host(kind)
        service_scope = trio.CancelScope()
        chunks = _StopOnAllocate(service_scope)
        refusals: list[int] = []
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with _device_with_pump(host, before=hand_to_ring3) as (device, pump, inner):
                service = BalloonService(
                    device, pump, BalloonSection(), allocator=chunks, pressure=Quiet()
                )
                stopped = await start_in_scope(inner, service, service_scope)
                walker = service.walker
                assert walker is not None
                host.set_balloon_target(1)
                await stopped.wait()
                assert (walker.held, chunks.live, walker.inflated) == ([], {}, 0)
                assert (host.vmmdev.balloon.chunks, host.vmmdev.balloon.pages) == (0, 0)
                walker.handover = RecordRefusals(walker.handover, refusals)
                deflates = host.vmmdev.request_counts[RequestType.CHANGE_MEMBALLOON]
                await service.drain()
                assert host.vmmdev.request_counts[RequestType.CHANGE_MEMBALLOON] == deflates
        assert (refusals, walker.deflated) == ([], 0)
        assert (host.vmmdev.balloon.chunks, host.vmmdev.balloon.pages) == (0, 0)
        assert [e["returned"] for e in logs if e["event"] == "balloon_drained"] == [0]


class TestFailures:
    """A failed step stops the walk; the target is reached later."""

    @pytest.mark.parametrize("kind", ["oracle", "oracle-r3", "passthrough"])
    async def test_host_fault_on_chunk_n(self, autojump_clock: trio.abc.Clock, kind: str) -> None:
        with trio.fail_after(120):
            async with running_balloon(personality="", host=_host(kind)) as run:
                run.host.set_balloon_target(10)
                await run.settle(10)
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_GENERAL_FAILURE)
                run.host.set_balloon_target(64)
                await run.until(lambda: run.service.statistics().failures == 1)
                assert run.host_chunks == 10
                await run.settle(64)

    async def test_oracle_swallows_out_of_memory(self, autojump_clock: trio.abc.Clock) -> None:
        """Oracle's driver reports a walk stopped by VERR_NO_MEMORY as success: the agent
        cannot see it, and the kernel walks on at the next 0x40."""
        with trio.fail_after(120):
            async with running_balloon(personality="oracle") as run:
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
                run.host.set_balloon_target(64)
                await run.until(lambda: run.service.reads == 1)
                assert (run.host_chunks, run.service.statistics().failures) == (0, 0)
                run.host.set_balloon_target(65)
                await run.settle(65)

    async def test_mainline_kernel_stops_and_needs_a_new_target(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The in-tree kernel stops at the failure and only walks again at the next 0x40."""
        with trio.fail_after(120):
            async with running_balloon(personality="mainline") as run:
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
                run.host.set_balloon_target(64)
                await trio.sleep(30)
                assert run.host_chunks == 0
                run.host.set_balloon_target(65)
                await run.settle(65)

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_allocation_failure_is_retried(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        chunks = SimChunks()
        with trio.fail_after(120):
            async with running_balloon(personality="", host=_host(kind), allocator=chunks) as run:
                chunks.fail_next = 3
                with structlog.testing.capture_logs() as logs:
                    run.host.set_balloon_target(8)
                    await run.settle(8)
                assert run.service.statistics().failures == 3
                # The reason as the allocator words it, without str(OSError)'s "[Errno 12]".
                stopped = [entry for entry in logs if entry["event"] == "balloon_walk_stopped"]
                assert stopped[0]["reason"] == "simulated allocation failure"


class Published:
    """``STATUS=`` as the daemon sends it: the service's status read again only after the
    service said it changed (``status_changed``)."""

    def __init__(self) -> None:
        self._dirty = True

    def changed(self) -> None:
        """The service's ``status_changed``."""
        self._dirty = True

    def text(self, service: BalloonService) -> str:
        """What ``STATUS=`` reads now."""
        if self._dirty:
            self._dirty, self._text = False, service.status()
        return self._text


@asynccontextmanager
async def _published_at_20_mb(kind: str) -> AsyncIterator[tuple[Running, Published]]:
    """The service on ``kind``'s host with its ``STATUS=`` published, once the balloon holds
    the host's 20 MB."""
    published = Published()
    async with running_balloon(
        personality="", host=_host(kind), status_changed=published.changed
    ) as run:
        run.host.set_balloon_target(20)
        await run.settle(20)
        yield run, published


class TestStatusFollowsFailures:
    """STATUS= says when the target moves and a walk or a read fails, and when it recovers."""

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_a_failing_walk_is_in_the_status_until_it_goes_on(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        with trio.fail_after(120):
            async with _published_at_20_mb(kind) as (run, published):
                assert published.text(run.service) == f"balloon 20/20 MB ({mode})"
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY, 10**6)
                run.host.set_balloon_target(60)
                await run.until(lambda: run.service.statistics().failures == 1)
                # Oracle's driver answers the chunk's CHANGE_BALLOON with the host's status.
                failing = f"{CHANGE_OPERATION[mode]}: VERR_NO_MEMORY"
                assert published.text(run.service) == (
                    f"balloon 20/60 MB ({mode}, failing: {failing})"
                )
                run.host.clear_faults()
                await run.settle(60)
                assert published.text(run.service) == f"balloon 60/60 MB ({mode})"

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_a_failing_target_read_is_in_the_status_until_one_goes_through(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        with trio.fail_after(120):
            async with _published_at_20_mb(kind) as (run, published):
                run.host.add_fault(RequestType.GET_MEMBALLOON_CHANGE_REQ, VERR_NO_MEMORY, 10**6)
                run.host.set_balloon_target(60)
                await run.until(lambda: run.service.statistics().failures == 1)
                failing = f"{READ_OPERATION[mode]}: VERR_NO_MEMORY"
                assert published.text(run.service) == (
                    f"balloon 20/20 MB ({mode}, target read failing: {failing})"
                )
                run.host.clear_faults()
                await run.settle(60)
                assert published.text(run.service) == f"balloon 60/60 MB ({mode})"


class TestBackoff:
    """A failed step backs off in its own direction only, and only while it matters."""

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_pressure_deflates_during_an_inflate_backoff(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """The floor stopped the walk and its backoff grew to minutes: pressure still gives
        the chunks back at once, not when the inflate may be retried."""
        host = _host(kind)
        pressure = ScriptedPressure()
        section = BalloonSection(min_available_mb=256, pressure_step_mb=64, retry_max_s=600.0)
        with trio.fail_after(3600):
            async with running_balloon(
                personality="",
                host=host,
                before=hand_to_ring3,
                section=section,
                pressure=pressure,
                mem_available_mb=lambda: 300 - host.vmmdev.balloon.chunks,
            ) as run:
                walker = run.walker
                run.host.set_balloon_target(100)
                await run.until(lambda: walker.backoff.retry_at - trio.current_time() > 60)
                assert run.host_chunks == 44  # 300 - 44 leaves the 256 MB floor
                pressed = trio.current_time()
                pressure.send(80.0, high=True)
                await run.settle(0)
                assert trio.current_time() - pressed < 1.0

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_pressure_retries_a_refused_deflate_at_once(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """The host refused eight deflates and the backoff grew to minutes: pressure that
        lowers the goal asks the host again at once, not when the backoff ends."""
        pressure = ScriptedPressure()
        section = BalloonSection(pressure_step_mb=64, retry_max_s=600.0)
        with trio.fail_after(3600):
            async with running_balloon(
                personality="",
                host=_host(kind),
                before=hand_to_ring3,
                section=section,
                pressure=pressure,
            ) as run:
                walker = run.walker
                run.host.set_balloon_target(64)
                await run.settle(64)
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_GENERAL_FAILURE, 8)
                run.host.set_balloon_target(32)
                await run.until(lambda: walker.failures == 8)
                assert walker.backoff.retry_at - trio.current_time() > 60
                assert run.host_chunks == 64
                pressed = trio.current_time()
                pressure.send(80.0, high=True)
                await run.settle(0)
                assert trio.current_time() - pressed < 1.0

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_pressure_on_a_host_that_keeps_refusing_deflates_still_backs_off(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """Ten minutes of pressure, a reading every 2 s, and the host refuses every deflate:
        only a reading that lowers the goal retries at once (four steps of 16 MB down to 0);
        otherwise the refusals are retried after the backoff, not at every reading."""
        pressure = ScriptedPressure()
        section = BalloonSection(pressure_step_mb=16)

        async def keep_pressing() -> None:
            for _ in range(300):
                pressure.send(80.0, high=True)
                await trio.sleep(2)

        with trio.fail_after(3600):
            async with running_balloon(
                personality="",
                host=_host(kind),
                before=hand_to_ring3,
                section=section,
                pressure=pressure,
                drain_s=1.0,
            ) as run:
                walker = run.walker
                run.host.set_balloon_target(64)
                await run.settle(64)
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_GENERAL_FAILURE, 10**6)
                await keep_pressing()
                assert (run.host_chunks, walker.cap) == (64, 0)
                # Backoff alone: 1, 2, 4, 8, 16, 32, then every 60 s (16 in 600 s); plus the
                # four lowered goals. A retry at every reading would be 300.
                assert walker.failures <= 16 + 4

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_goal_reached_without_a_step_clears_the_backoff(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """The host lowers its target to what the stopped walk holds: the failures are over,
        so a later, unrelated failure is a first one again (a warning, the initial delay)."""
        host = _host(kind)
        available = {"mb": 300}
        with trio.fail_after(3 * 3600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="",
                host=host,
                before=hand_to_ring3,
                mem_available_mb=lambda: available["mb"] - host.vmmdev.balloon.chunks,
            ) as run:
                walker = run.walker
                run.host.set_balloon_target(100)
                await trio.sleep(300)  # the floor stops the walk at 44, again and again
                assert walker.backoff.failures > 3
                run.host.set_balloon_target(44)
                await run.until(lambda: walker.backoff.failures == 0)
                await trio.sleep(3600)
                available["mb"] = 100_000
                seen = len(logs)
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_GENERAL_FAILURE)
                run.host.set_balloon_target(50)
                await run.settle(50)
        [stopped] = [e for e in logs[seen:] if e["event"] == "balloon_walk_stopped"]
        assert (stopped["log_level"], stopped["retry_in_s"]) == ("warning", 1.0)

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_driver_errno_on_inflate_is_a_failed_step(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """The driver refuses CHANGE_(MEM)BALLOON with ENOMEM: one warning, the chunk is not
        counted (nor kept mapped), the walk is retried and the service keeps running."""
        chunks = SimChunks()
        with trio.fail_after(120), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="", host=_host(kind), before=hand_to_ring3, allocator=chunks
            ) as run:
                walker = run.walker
                walker.handover = ErrnoOnce(
                    walker.handover,
                    VBoxStatusError.from_errno(errno.ENOMEM, CHANGE_OPERATION[mode]),
                    inflate=1,
                )
                run.host.set_balloon_target(8)
                await run.until(lambda: run.service.statistics().failures == 1)
                await run.settle(8)
                assert (len(walker.held), len(chunks.live), walker.inflated) == (8, 8, 8)
            assert not chunks.live
        [stopped] = [e for e in logs if e["event"] == "balloon_walk_stopped"]
        assert stopped["log_level"] == "warning"
        assert stopped["reason"] == f"{CHANGE_OPERATION[mode]}: VERR_NO_MEMORY"

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_driver_errno_on_a_target_read_is_a_failed_check(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """An errno from the target read is retried after the backoff, not a service restart."""
        with trio.fail_after(120), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="", host=_host(kind), before=hand_to_ring3
            ) as run:
                walker = run.walker
                walker.handover = ErrnoOnce(
                    walker.handover,
                    VBoxStatusError.from_errno(errno.EIO, READ_OPERATION[mode]),
                    read_target=1,
                )
                run.host.set_balloon_target(8)
                await run.settle(8)
        [failed] = [e for e in logs if e["event"] == "balloon_check_failed"]
        assert (failed["log_level"], failed["operation"], failed["status"]) == (
            "warning",
            READ_OPERATION[mode],
            "VERR_DEV_IO_ERROR",
        )
        assert [e["event"] for e in logs].count("balloon_mode") == 1  # no restart

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_drain_failing_otherwise_keeps_track_of_the_chunks(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """A drain that ends in an error (not the drain time) still records what it holds:
        the next instance on the device takes the chunks over."""
        host = _host(kind)
        chunks = SimChunks()
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with _device_with_pump(host, before=hand_to_ring3) as (device, pump, inner):
                leftovers = Leftovers()

                def build() -> BalloonService:
                    return BalloonService(
                        device,
                        pump,
                        BalloonSection(),
                        allocator=chunks,
                        pressure=Quiet(),
                        leftovers=leftovers,
                    )

                first = build()
                stop = await inner.start(_run_until_stopped, first)
                assert first.walker is not None
                host.set_balloon_target(8)
                await first.walker.wait_held(8)
                first.walker.handover = ErrnoOnce(
                    first.walker.handover, RuntimeError("boom"), deflate=1
                )
                await stop()
                with pytest.RaisesGroup(RuntimeError, allow_unwrapped=True):
                    await first.drain()
                second = build()
                stop = await inner.start(_run_until_stopped, second)
                assert second.walker is not None
                await second.walker.wait_held(8)
                await stop()
                await second.drain()
                assert (host.vmmdev.balloon.chunks, chunks.live) == (0, {})
        [incomplete] = [e for e in logs if e["event"] == "balloon_drain_incomplete"]
        assert (incomplete["kept"], incomplete["reason"]) == (8, "RuntimeError: boom")


@asynccontextmanager
async def _held_by_pressure(
    kind: str, *, cooldown_s: float
) -> AsyncIterator[tuple[Running, ScriptedPressure, float]]:
    """The service on ``kind``'s host holding the host's 64 MB when pressure reads high: it
    gives a 16 MB step back and holds for ``cooldown_s``. Yields the run, its pressure and
    when the reading came."""
    pressure = ScriptedPressure()
    section = BalloonSection(pressure_step_mb=16, pressure_cooldown_s=cooldown_s)
    async with running_balloon(
        personality="", host=_host(kind), section=section, pressure=pressure
    ) as run:
        run.host.set_balloon_target(64)
        await run.settle(64)
        pressed = trio.current_time()
        pressure.send(40.0, high=True)
        await run.settle(48)
        yield run, pressure, pressed


class TestPressure:
    """PSI readings deflate, hold, and let the balloon grow back."""

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_deflate_hold_reinflate(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        with trio.fail_after(600):
            async with _held_by_pressure(kind, cooldown_s=30.0) as (run, pressure, pressed):
                pressure.send(0.5, high=False)
                await trio.sleep(20)
                assert run.host_chunks == 48
                await run.settle(64)
                assert trio.current_time() - pressed >= 30.0

    @pytest.mark.parametrize("kind", ["oracle", "oracle-r3", "passthrough"])
    async def test_sustained_pressure_logs_only_changes(
        self, autojump_clock: trio.abc.Clock, kind: str
    ) -> None:
        """A minute of pressure, one reading per window: the first deflates to 0 (or starts
        the postponement) at info; the same state again is a debug line."""
        pressure = ScriptedPressure()
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="",
                host=_host(kind),
                pressure=pressure,
                section=BalloonSection(pressure_step_mb=64),
            ) as run:
                run.host.set_balloon_target(32)
                await run.settle(32)
                for _ in range(30):
                    pressure.send(50.0, high=True)
                    await trio.sleep(2)
                assert run.service.statistics().pressure_events == 30
        lines = [e for e in logs if e["event"] == "balloon_pressure"]
        assert [e["log_level"] for e in lines] == ["info"] + ["debug"] * 29

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_pressure_soon_after_a_hold_doubles_the_next(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """The guest stalls whenever the balloon holds over 50 MB of a 64 MB target: each
        episode starting within a cooldown of the last hold's end doubles the hold, up to
        MAX_HOLD_FACTOR cooldowns, instead of a deflate and re-inflate every cooldown; after a
        quiet cooldown the next hold is one cooldown again."""
        host = _host(kind)
        needs = {"memory": True}

        class GuestNeeds50:
            async def next_reading(self) -> PressureReading:
                await trio.sleep(2)
                high = needs["memory"] and host.vmmdev.balloon.chunks > 50
                return PressureReading(40.0 if high else 0.0, high=high, via="poll")

        section = BalloonSection(pressure_step_mb=16, pressure_cooldown_s=30.0)
        with trio.fail_after(3 * 3600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="", host=host, pressure=GuestNeeds50(), section=section
            ) as run:
                run.host.set_balloon_target(64)
                await trio.sleep(3600)
                eased = [e for e in logs if e["event"] == "balloon_pressure_eased"]
                # 30 + 60 + 120 + 240 s, then 480 s holds: 10 in the hour, not about 100.
                assert len(eased) <= 10
                needs["memory"] = False
                await run.until(lambda: run.service.statistics().cap is None)
                await trio.sleep(2 * section.pressure_cooldown_s)
                needs["memory"] = True
                await run.until(lambda: run.service.statistics().cap is not None)
        holds = [e for e in logs if e["event"] == "balloon_pressure_hold"]
        assert [e["cooldowns"] for e in holds] == [2, 4, 8, 16, 1]
        assert [e["hold_s"] for e in holds] == [60.0, 120.0, 240.0, 480.0, 30.0]
        assert MAX_HOLD_FACTOR == 16

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_pressure_file_failing_mid_run(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """The PSI file becomes unreadable (its cgroup went away): one line says pressure is
        no longer watched, the balloon keeps its chunks, and the hold in place ends after
        its cooldown."""
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with _held_by_pressure(kind, cooldown_s=30.0) as (run, pressure, pressed):
                pressure.fail(PressureFileError(errno.ENODEV, "cannot read x: No such device"))
                await run.until(lambda: any(e["event"] == "balloon_pressure_off" for e in logs))
                assert run.host_chunks == 48
                await run.settle(64)
                assert trio.current_time() - pressed >= 30.0
                run.host.set_balloon_target(70)
                await run.settle(70)
        [off] = [entry for entry in logs if entry["event"] == "balloon_pressure_off"]
        assert (off["log_level"], off["reason"]) == ("warning", "cannot read x: No such device")

    async def test_floor_stops_inflation(self, autojump_clock: trio.abc.Clock) -> None:
        available = {"mb": 200}
        section = BalloonSection(min_available_mb=256)

        def mem_available() -> int:
            return available["mb"]

        with trio.fail_after(120):
            async with running_balloon(
                personality="passthrough", section=section, mem_available_mb=mem_available
            ) as run:
                assert run.service.walker is not None
                run.host.set_balloon_target(64)
                await run.until(lambda: run.service.statistics().failures >= 1)
                assert run.host_chunks == 0
                available["mb"] = 10_000
                await run.settle(64)

    async def test_floor_holds_on_shared_readings(self, autojump_clock: trio.abc.Clock) -> None:
        """Far from the floor one MemAvailable reading serves several chunks; the walk still
        stops at the first chunk that would take MemAvailable below the floor."""
        reads = 0
        host = SimulatedHost(personality="passthrough")

        def mem_available() -> int:
            nonlocal reads
            reads += 1
            return 400 - host.vmmdev.balloon.chunks  # the balloon takes what it holds

        section = BalloonSection(min_available_mb=256)
        with trio.fail_after(120):
            async with running_balloon(
                personality="", host=host, section=section, mem_available_mb=mem_available
            ) as run:
                run.host.set_balloon_target(200)
                await run.until(lambda: run.service.statistics().failures >= 1)
                # 400 - 144 leaves 256: the 145th chunk would go below the floor.
                assert run.host_chunks == 144
                # One reading per MEMINFO_REUSE_CHUNKS chunks, then one before each chunk
                # within MEMINFO_REUSE_CHUNKS MiB of the floor and before the refused one.
                far = 144 // MEMINFO_REUSE_CHUNKS
                assert reads <= far + MEMINFO_REUSE_CHUNKS + 2

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_pressure_below_the_floor_gives_back_to_the_floor(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """Pressure while the rest of the guest took MemAvailable 144 MB below the floor
        gives back those 144 MB at once, not the 64 MB step; after the hold the balloon grows
        back to the target as the memory comes free."""
        host = _host(kind)
        pressure = ScriptedPressure()
        # A long interval: the reading, not the floor's own look, lowers the cap here.
        section = BalloonSection(min_available_mb=256, pressure_step_mb=64, psi_interval_s=10)
        other = {"mb": 0}
        with trio.fail_after(3600):
            async with running_balloon(
                personality="",
                host=host,
                before=hand_to_ring3,
                section=section,
                pressure=pressure,
                mem_available_mb=lambda: 1024 - host.vmmdev.balloon.chunks - other["mb"],
            ) as run:
                run.host.set_balloon_target(512)
                await run.settle(512)
                other["mb"] = 400  # MemAvailable 112 MB
                pressure.send(60.0, high=True)
                await run.until(lambda: run.walker.cap is not None)
                assert run.walker.cap == 512 - 144
                await run.settle(368)
                other["mb"] = 0
                await run.settle(512)

    @pytest.mark.parametrize("psi", ["off", "quiet"])
    async def test_below_the_floor_the_balloon_gives_back_without_a_reading(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path, psi: str
    ) -> None:
        """No PSI (the file is missing), or PSI that reports no stall while the rest of the
        guest takes MemAvailable below the floor: within an interval the balloon gives back
        what the floor lacks, holds it for the cooldown, then grows back to the target as
        the memory comes free."""
        host = _host("passthrough")
        section = BalloonSection(min_available_mb=256, psi_path=str(tmp_path / "none"))
        other = {"mb": 0}
        with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="",
                host=host,
                section=section,
                pressure=Quiet(),
                psi_file=psi == "off",
                mem_available_mb=lambda: 1024 - host.vmmdev.balloon.chunks - other["mb"],
            ) as run:
                run.host.set_balloon_target(512)
                await run.settle(512)
                other["mb"] = 500  # MemAvailable 12 MB
                taken = trio.current_time()
                await run.settle(512 - 244)
                gave_back = trio.current_time()
                assert gave_back - taken <= section.psi_interval_s
                other["mb"] = 0
                await run.settle(512)
                assert trio.current_time() - gave_back >= section.pressure_cooldown_s
        [below] = [entry for entry in logs if entry["event"] == "balloon_below_floor"]
        assert (below["mem_available_mb"], below["action"]) == (
            12,
            "deflate to 268 and hold for 30 s",
        )

    async def test_a_balloon_at_the_floor_rides_out_a_wobble(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The host asks for more than the floor allows: the walk stops just above it, and
        MemAvailable wobbling 2 MB below it every 10 s (within FLOOR_BAND_MB) gives nothing
        back, where each dip would give back, hold, and walk back to the floor again."""
        chunks = SimChunks()
        wobble = {"mb": 0}
        section = BalloonSection(min_available_mb=256)
        with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="passthrough",
                section=section,
                allocator=chunks,
                mem_available_mb=lambda: 1000 - len(chunks.live) - wobble["mb"],
            ) as run:
                run.host.set_balloon_target(900)
                await run.until(lambda: run.walker.failures >= 1)
                assert run.host_chunks == 744  # 1000 - 744 leaves the 256 MB floor
                for _ in range(60):  # ten minutes: 2 MB taken for 5 s every 10 s
                    wobble["mb"] = 2
                    await trio.sleep(5)
                    wobble["mb"] = 0
                    await trio.sleep(5)
                held = run.host_chunks
        below = [entry for entry in logs if entry["event"] == "balloon_below_floor"]
        assert (held, len(below)) == (744, 0)

    async def test_a_small_floor_still_gives_back_before_nothing_is_left(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A floor of 16 MiB, no more than FLOOR_BAND_MB: the band shrinks to half the floor,
        so MemAvailable at 0 (the rest of the guest took everything) gives the floor back,
        where a band as wide as the floor could never be crossed."""
        chunks = SimChunks()
        other = {"mb": 0}
        section = BalloonSection(min_available_mb=16)
        with trio.fail_after(3600):
            async with running_balloon(
                personality="passthrough",
                section=section,
                allocator=chunks,
                mem_available_mb=lambda: max(0, 1024 - len(chunks.live) - other["mb"]),
            ) as run:
                run.host.set_balloon_target(512)
                await run.until(lambda: run.host_chunks == 512)
                other["mb"] = 600  # MemAvailable 0 (it would be -88)
                await run.until(lambda: run.host_chunks <= 512 - 16)


class TestTriggeredAndKernel:
    """Where the driver allocates, the agent only decides when to trigger it."""

    async def test_pressure_postpones_check_balloon(self, autojump_clock: trio.abc.Clock) -> None:
        pressure = ScriptedPressure()
        section = BalloonSection(pressure_cooldown_s=30.0)
        with trio.fail_after(300):
            async with running_balloon(
                personality="oracle", section=section, pressure=pressure
            ) as run:
                assert run.service.mode is BalloonMode.TRIGGERED
                pressed = trio.current_time()
                pressure.send(50.0, high=True)
                await run.until(lambda: run.service.statistics().pressure_events == 1)
                run.host.set_balloon_target(32)
                await run.until(lambda: run.service.statistics().postponed)
                assert run.host_chunks == 0
                assert "postponed" in run.service.status()
                await run.settle(32)
                assert trio.current_time() - pressed >= section.pressure_cooldown_s

    async def test_floor_postpones_check_balloon(self, autojump_clock: trio.abc.Clock) -> None:
        available = {"mb": 100}
        with trio.fail_after(300):
            async with running_balloon(
                personality="oracle", mem_available_mb=lambda: available["mb"]
            ) as run:
                run.host.set_balloon_target(16)
                await run.until(lambda: run.service.statistics().postponed)
                assert run.host_chunks == 0
                available["mb"] = 10_000
                await run.settle(16)

    async def test_floor_wait_is_no_failed_check(self, autojump_clock: trio.abc.Clock) -> None:
        """Waiting for MemAvailable to rise is no failure: no 'recovered' line after it, and
        the first CHECK_BALLOON the host then refuses is a warning, as any first failure."""
        available = {"mb": 100}
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="oracle", mem_available_mb=lambda: available["mb"]
            ) as run:
                run.host.set_balloon_target(16)
                await trio.sleep(25)  # several looks at the floor, within the cooldown
                assert run.host_chunks == 0
                available["mb"] = 10_000
                await run.settle(16)
                run.host.add_fault(RequestType.GET_MEMBALLOON_CHANGE_REQ, VERR_GENERAL_FAILURE)
                run.host.set_balloon_target(20)
                await run.settle(20)
        # One 'recovered' line: after the refused check, none after the wait at the floor.
        assert [entry["event"] for entry in logs].count("balloon_check_recovered") == 1
        failed = [entry for entry in logs if entry["event"] == "balloon_check_failed"]
        assert [entry["log_level"] for entry in failed] == ["warning"]
        assert failed[0]["retry_in_s"] == BalloonSection().retry_initial_s

    @pytest.mark.parametrize("cause", ["floor", "pressure"])
    async def test_a_postponed_check_goes_after_the_cooldown_at_most(
        self, autojump_clock: trio.abc.Clock, cause: str
    ) -> None:
        """The host asks for its memory back while CHECK_BALLOON is held back: that call is
        also what applies the deflate, so it goes after ``pressure_cooldown_s`` at the latest
        (below the floor the balloon itself keeps MemAvailable there: no end to wait for)."""
        host = SimulatedHost(personality="oracle")
        pressure = ScriptedPressure()
        section = BalloonSection(pressure_cooldown_s=30.0)

        async def keep_pressing() -> None:
            for _ in range(1000):
                pressure.send(90.0, high=True)
                await trio.sleep(2)

        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="",
                host=host,
                pressure=pressure,
                section=section,
                mem_available_mb=lambda: 1000 - host.vmmdev.balloon.chunks,
            ) as run:
                target = 800 if cause == "floor" else 200  # 800 leaves 200 MB: below 256
                run.host.set_balloon_target(target)
                await run.settle(target)
                if cause == "pressure":
                    run.nursery.start_soon(keep_pressing)
                    await run.until(lambda: run.service.statistics().pressure_events == 1)
                asked = trio.current_time()
                run.host.set_balloon_target(0)
                await run.until(lambda: run.service.statistics().postponed)
                await run.settle(0)
                assert trio.current_time() - asked <= section.pressure_cooldown_s + 1
                assert not run.service.statistics().postponed
        [postponed] = [e for e in logs if e["event"] == "balloon_check_postponed"]
        assert postponed["at_most_s"] == section.pressure_cooldown_s
        assert "allocates all of it in one go" in postponed["note"]
        [forced] = [e for e in logs if e["event"] == "balloon_check_forced"]
        assert forced["postponed_s"] == section.pressure_cooldown_s

    async def test_floor_postpones_the_start_probe(self, autojump_clock: trio.abc.Clock) -> None:
        """Oracle's driver applies the host's target on the mode probe's CHECK_BALLOON too:
        below the floor that call waits as any triggered one (the service is ready meanwhile,
        its mode not yet known), for at most ``pressure_cooldown_s``."""
        section = BalloonSection(min_available_mb=256, pressure_cooldown_s=30.0)

        async def target_before_start(host: SimulatedHost) -> None:
            host.set_balloon_target(512)

        with trio.fail_after(300), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="oracle",
                section=section,
                mem_available_mb=lambda: 100,
                before=target_before_start,
            ) as run:
                started = trio.current_time()
                assert (run.host_chunks, run.service.mode) == (0, None)
                assert run.service.statistics().postponed
                await run.service.mode_known.wait()
                assert trio.current_time() - started == section.pressure_cooldown_s
                assert run.service.mode is BalloonMode.TRIGGERED
                assert not run.service.statistics().postponed
                await run.settle(512)
        [postponed] = [e for e in logs if e["event"] == "balloon_check_postponed"]
        assert (postponed["mem_available_mb"], postponed["min_available_mb"]) == (100, 256)
        [forced] = [e for e in logs if e["event"] == "balloon_check_forced"]
        assert forced["postponed_s"] == section.pressure_cooldown_s

    async def test_the_in_tree_probe_is_not_held_back(self, autojump_clock: trio.abc.Clock) -> None:
        """The in-tree driver's CHECK_BALLOON only reads the size: below the floor the probe
        goes at once (the kernel balloons by itself, whatever the agent does)."""
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running_balloon(personality="mainline", mem_available_mb=lambda: 100) as run:
                assert run.service.mode is BalloonMode.KERNEL
        assert not [e for e in logs if e["event"].startswith("balloon_check_")]

    @pytest.mark.parametrize(
        ("kind", "event"),
        [("oracle", "new target"), ("oracle", "restore"), ("mainline", "restore")],
    )
    async def test_an_event_during_the_probe_is_kept(
        self, autojump_clock: trio.abc.Clock, kind: str, event: str
    ) -> None:
        """Just after the probe's CHECK_BALLOON read the balloon, the host asks for 32 MB (a
        0x40, which the in-tree driver keeps for its kernel) or the VM is restored: the
        event reaches the service before the mode is decided and is answered after it, by
        one more read."""
        host = _host(kind)
        target = 32 if event == "new target" else 0
        with trio.fail_after(60):
            async with _device_with_pump(host) as (device, pump, inner):
                probe_check = device.check_balloon

                async def check_then_event() -> BalloonStatus:
                    status = await probe_check()
                    device.check_balloon = probe_check  # type: ignore[method-assign]
                    if target:
                        host.set_balloon_target(target)
                    else:
                        host.restore()
                    await trio.testing.wait_all_tasks_blocked()  # the service has it
                    return status

                device.check_balloon = check_then_event  # type: ignore[method-assign]
                service = BalloonService(device, pump, BalloonSection(), pressure=Quiet())
                run = Running(host, device, service, inner)
                await start_in_scope(inner, service, trio.CancelScope())
                await run.until(lambda: service.reads == 1)
                assert service.statistics().target == run.host_chunks == target

    async def test_kernel_mode_leaves_pressure_to_the_kernel(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """One line says the kernel owns the balloon; pressure is not watched at all (no
        trigger, no polling), so no hold starts and none ends later."""
        pressure = ScriptedPressure()
        section = BalloonSection(pressure_cooldown_s=30.0)
        with trio.fail_after(300), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="mainline", pressure=pressure, section=section
            ) as run:
                run.host.set_balloon_target(16)
                await run.settle(16)
                pressure.send(90.0, high=True)
                await trio.sleep(section.pressure_cooldown_s * 2)
                assert run.host_chunks == 16
                assert (pressure.waits, run.service.statistics().pressure_events) == (0, 0)
        [unwatched] = [e for e in logs if e["event"].startswith("balloon_pressure")]
        assert unwatched["event"] == "balloon_pressure_unwatched"
        assert unwatched["log_level"] == "info"

    @pytest.mark.parametrize("kind", ["mainline", "oracle", "passthrough"])
    async def test_restore_reads_the_balloon_again(
        self, autojump_clock: trio.abc.Clock, kind: str
    ) -> None:
        with trio.fail_after(60):
            async with running_balloon(personality="", host=_host(kind)) as run:
                initial_reads = 1 if run.service.walker is not None else 0
                await run.until(lambda: run.service.reads == initial_reads)
                run.host.restore()
                await run.until(lambda: run.service.reads == initial_reads + 1)

    async def test_owner_elsewhere_is_retried(self, autojump_clock: trio.abc.Clock) -> None:
        """Another session owns Oracle's balloon: the probe is retried until it lets go, the
        status saying why all along; one warning, and one line once it went through."""
        others: list[SimTransport] = []
        claim_the_balloon = partial(_claim_the_balloon, sessions=others)
        published = Published()
        refused = "VBG_IOCTL_CHECK_BALLOON: VERR_PERMISSION_DENIED"

        with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="oracle", before=claim_the_balloon, status_changed=published.changed
            ) as run:
                assert run.service.statistics().mode is None
                failing = f"balloon mode undecided (probe failing: {refused})"
                assert published.text(run.service) == failing
                await trio.sleep(1800)
                assert published.text(run.service) == failing
                await others[0].aclose()
                await run.service.mode_known.wait()
                assert run.service.mode is BalloonMode.TRIGGERED
                assert published.text(run.service) == "balloon target 0 MB (triggered)"
                run.host.set_balloon_target(8)
                await run.settle(8)
        failed = _events(logs, "balloon_check_failed")
        assert [entry["log_level"] for entry in failed].count("warning") == 1
        assert len(failed) > 3
        assert len(_events(logs, "balloon_check_recovered")) == 1


class TestReconfigure:
    async def test_every_setting_applies_live(self, autojump_clock: trio.abc.Clock) -> None:
        """A reload sets the walk's retry delays, first and longest, and a later one that
        leaves them out puts the defaults back."""
        with trio.fail_after(60):
            async with running_balloon(personality="passthrough") as run:
                service = run.service
                retries = BalloonSection(pressure_step_mb=8, retry_initial_s=0.5, retry_max_s=5.0)
                assert service.reconfigure(retries)
                walker = service.walker
                assert walker is not None
                assert (walker.backoff.initial, walker.backoff.maximum) == (0.5, 5.0)
                assert service.reconfigure(BalloonSection(psi_interval_s=5.0))
                defaults = BalloonSection()
                assert (walker.backoff.initial, walker.backoff.maximum) == (
                    defaults.retry_initial_s,
                    defaults.retry_max_s,
                )

    async def test_a_failing_check_is_retried_at_once_under_the_new_delays(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Triggered mode: a reload while CHECK_BALLOON's retries have backed off to 32 s
        retries it at once, and the next failures back off from the new first delay up to
        the new longest."""
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with running_balloon(personality="oracle") as run:

                def delays() -> list[float]:
                    failed = [e for e in logs if e["event"] == "balloon_check_failed"]
                    return [entry["retry_in_s"] for entry in failed]

                run.host.add_fault(RequestType.GET_MEMBALLOON_CHANGE_REQ, VERR_GENERAL_FAILURE, 6)
                run.host.set_balloon_target(16)
                await run.until(lambda: len(delays()) == 6)
                assert delays() == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
                reloaded = trio.current_time()
                assert run.service.reconfigure(BalloonSection(retry_initial_s=0.5, retry_max_s=2))
                await run.settle(16)
                assert trio.current_time() - reloaded < 1.0
                run.host.add_fault(RequestType.GET_MEMBALLOON_CHANGE_REQ, VERR_GENERAL_FAILURE, 3)
                run.host.set_balloon_target(20)
                await run.settle(20)
                assert delays()[6:] == [0.5, 1.0, 2.0]

    async def test_a_failing_probe_is_retried_at_once_under_the_new_delays(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Another session owns Oracle's balloon and the mode probe has backed off to 512 s:
        a reload retries it at once and backs off under the new delays, so the probe after
        the owner let go comes within the new longest delay."""
        others: list[SimTransport] = []
        claim_the_balloon = partial(_claim_the_balloon, sessions=others)

        section = BalloonSection(retry_initial_s=1.0, retry_max_s=3600.0)
        with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="oracle", section=section, before=claim_the_balloon
            ) as run:

                def delays() -> list[float]:
                    failed = [e for e in logs if e["event"] == "balloon_check_failed"]
                    return [entry["retry_in_s"] for entry in failed]

                await run.until(lambda: len(delays()) == 10)
                assert delays()[-1] == 512.0
                assert run.service.reconfigure(section.model_copy(update={"retry_max_s": 2.0}))
                await run.until(lambda: len(delays()) == 11)
                assert delays()[-1] == 2.0
                await others[0].aclose()
                released = trio.current_time()
                await run.service.mode_known.wait()
                assert trio.current_time() - released <= 2.0
                assert run.service.mode is BalloonMode.TRIGGERED

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_shorter_cooldown_ends_the_hold_in_place(
        self, autojump_clock: trio.abc.Clock, kind: str, mode: BalloonMode
    ) -> None:
        """A reload that shortens the cooldown ends a pressure hold already in place sooner."""
        with trio.fail_after(900):
            async with _held_by_pressure(kind, cooldown_s=600.0) as (run, _, pressed):
                shorter = BalloonSection(pressure_step_mb=16, pressure_cooldown_s=30.0)
                assert run.service.reconfigure(shorter)
                await run.settle(64)
                assert 30.0 <= trio.current_time() - pressed < 31.0

    @pytest.mark.parametrize(("kind", "mode"), WALKING)
    async def test_psi_settings_restart_the_watch_alone(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path, kind: str, mode: BalloonMode
    ) -> None:
        """A reload naming another PSI file (interval, threshold) applies live: the watch
        moves to the new file, the balloon keeps its chunks (no drain and re-inflate)."""
        old, new = tmp_path / "old.pressure", tmp_path / "new.pressure"
        for psi in (old, new):
            psi.write_text(PSI_TEXT.format(total=0))
        section = BalloonSection(psi_path=str(old), psi_interval_s=1.0, pressure_step_mb=16)
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="",
                host=_host(kind),
                before=hand_to_ring3,
                section=section,
                psi_file=True,
            ) as run:
                walker = run.walker
                run.host.set_balloon_target(32)
                await run.settle(32)
                moved = section.model_copy(
                    update={
                        "psi_path": str(new),
                        "psi_interval_s": 2.0,
                        "pressure_threshold_pct": 20,
                    }
                )
                assert run.service.reconfigure(moved)
                await run.until(
                    lambda: any(
                        e.get("path") == str(new) for e in logs if e["event"].startswith("psi_")
                    )
                )
                old.write_text(PSI_TEXT.format(total=10_000_000))  # no longer watched
                await trio.sleep(10)
                assert (run.host_chunks, walker.deflated) == (32, 0)
                new.write_text(PSI_TEXT.format(total=1_000_000))  # 1 s of stall in 2 s: 50 %
                await run.settle(16)

    @pytest.mark.parametrize("unusable", ["missing", "fifo"])
    @pytest.mark.parametrize("kind", ["oracle", "oracle-r3", "passthrough"])
    async def test_reload_to_an_unusable_psi_file_still_ends_the_hold(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path, kind: str, unusable: str
    ) -> None:
        """A reload mid-hold names a PSI file that cannot be used (missing, or a FIFO): one
        line says pressure is off, and the hold in place still ends after its cooldown (the
        balloon grows back; a trigger is no longer postponed)."""
        psi, bad = tmp_path / "memory.pressure", tmp_path / "bad"
        psi.write_text(PSI_TEXT.format(total=0))
        if unusable == "fifo":
            os.mkfifo(bad)
        section = BalloonSection(
            psi_path=str(psi), psi_interval_s=1.0, pressure_step_mb=16, pressure_cooldown_s=30.0
        )
        with trio.fail_after(600), structlog.testing.capture_logs() as logs:
            async with running_balloon(
                personality="", host=_host(kind), section=section, psi_file=True
            ) as run:
                triggered = run.service.walker is None
                run.host.set_balloon_target(32)
                await run.settle(32)
                pressed = trio.current_time()
                psi.write_text(PSI_TEXT.format(total=1_000_000))  # 1 s of stall in 1 s
                await run.until(lambda: run.service.statistics().pressure_events == 1)
                if not triggered:
                    await run.settle(16)
                assert run.service.reconfigure(section.model_copy(update={"psi_path": str(bad)}))
                await run.until(lambda: any(e["event"] == "balloon_pressure_off" for e in logs))
                if triggered:
                    await trio.sleep(section.pressure_cooldown_s)
                    asked = trio.current_time()
                    run.host.set_balloon_target(8)
                    await run.settle(8)
                    assert trio.current_time() - asked < 1.0
                else:
                    await run.settle(32)
                    assert section.pressure_cooldown_s <= trio.current_time() - pressed < 32.0
                assert run.service.statistics().cap is None
                assert "capped" not in run.service.status()
        [eased] = [e for e in logs if e["event"] == "balloon_pressure_eased"]
        assert eased["log_level"] == "info"

    @pytest.mark.parametrize("kind", ["oracle", "passthrough"])
    async def test_lower_floor_applies_at_once(
        self, autojump_clock: trio.abc.Clock, kind: str
    ) -> None:
        """A reload that lowers the floor lets a balloon held back by it grow at once, not
        after the backoff its stopped walk (or postponed trigger) had reached."""
        section = BalloonSection(pressure_cooldown_s=600.0)  # a trigger waits that long at most
        with trio.fail_after(600):
            async with running_balloon(
                personality=kind, section=section, mem_available_mb=lambda: 200
            ) as run:
                run.host.set_balloon_target(16)
                await trio.sleep(200)  # the retries have backed off to retry_max_s (60 s)
                assert run.host_chunks == 0
                reloaded = trio.current_time()
                lower = section.model_copy(update={"min_available_mb": 100})
                assert run.service.reconfigure(lower)
                await run.settle(16)
                assert trio.current_time() - reloaded < 1.0


async def _run_until_stopped(
    service: BalloonService, task_status: trio.TaskStatus[Callable[[], Awaitable[None]]]
) -> None:
    """Run ``service`` until the function it starts with is awaited (which returns once the
    run ended, as the supervisor's cancel does before it drains)."""
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def stop() -> None:
        scope.cancel()
        await stopped.wait()

    try:
        with scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                task_status.started(stop)
    finally:
        stopped.set()


class _StopOnAllocate(SimChunks):
    """Chunks that cancel ``scope`` as one is mapped: the service stops before the ioctl that
    hands the chunk over is issued (the transport's check for a cancelled caller)."""

    def __init__(self, scope: trio.CancelScope) -> None:
        super().__init__()
        self._scope = scope

    def allocate(self) -> int:
        self._scope.cancel()
        return super().allocate()


class TestSizesSayWhatTheyAre:
    """Each size the service shows is named for what it is: what the balloon holds, or the
    host's target."""

    async def test_triggered_mode_shows_a_target_not_a_balloon(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Oracle's driver answers CHECK_BALLOON with the host's target whatever it managed
        to allocate (the host refused every chunk here): the status calls it a target, the
        statistics know no balloon size, and the gauge, which the guest statistics report,
        carries the answer as VBoxService reports it."""
        gauge = BalloonGauge()
        with trio.fail_after(60):
            async with running_balloon(personality="oracle", gauge=gauge) as run:
                assert run.service.mode is BalloonMode.TRIGGERED
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
                run.host.set_balloon_target(64)
                await run.until(lambda: run.service.reads == 1)
                assert run.host_chunks == 0
                assert run.service.status() == "balloon target 64 MB (triggered)"
                statistics = run.service.statistics()
                assert (statistics.chunks, statistics.target, gauge.chunks) == (None, 64, 64)

    @pytest.mark.parametrize(
        ("kind", "sizes"),
        [
            ("mainline", {"chunks": 0}),
            ("oracle", {"target": 8}),
            ("passthrough", {"chunks": 0, "target": 8}),
        ],
    )
    async def test_the_mode_line_names_its_sizes(
        self, autojump_clock: trio.abc.Clock, kind: str, sizes: dict[str, int]
    ) -> None:
        """The host asked for 8 MB before the agent started. ``balloon_mode`` shows the
        kernel's count in kernel mode (the kernel balloons only once the agent filters
        0x40), the target Oracle's driver answered with in triggered mode, and the agent's
        chunks and the target it read in owned mode."""

        async def ask_for_8_mb(host: SimulatedHost) -> None:
            host.set_balloon_target(8)
            await trio.lowlevel.checkpoint()

        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running_balloon(personality="", host=_host(kind), before=ask_for_8_mb):
                pass
        [line] = [e for e in logs if e["event"] == "balloon_mode"]
        assert sizes == {key: line[key] for key in ("chunks", "target") if key in line}


class TestOracleEmptyBalloon:
    """Oracle's driver refuses a deflate with VERR_INVALID_PARAMETER when its balloon is
    empty; the host's own VERR_INVALID_PARAMETER comes back the same way."""

    async def test_a_deflate_the_host_refuses_keeps_the_chunk(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Ring-3 balloon of 2 chunks, both known to be in the driver; the host refuses the
        first deflate with VERR_INVALID_PARAMETER, which the driver passes on keeping the
        chunk. The agent keeps it too and asks again: nothing is left at the host, nothing
        mapped."""
        chunks = SimChunks()
        with trio.fail_after(60):
            async with running_balloon(
                personality="", host=_host("oracle-r3"), allocator=chunks, before=hand_to_ring3
            ) as run:
                walker = run.walker
                run.host.set_balloon_target(2)
                await run.settle(2)
                run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_INVALID_PARAMETER)
                run.host.set_balloon_target(0)
                await run.until(lambda: not walker.held)
                assert (run.host_chunks, walker.failures) == (0, 1)
                assert chunks.live == {}


class TestLeftToTheDriver:
    """Where the driver holds the balloon, the drain gives nothing back and says so once."""

    @pytest.mark.parametrize(
        ("kind", "sizes"), [("mainline", {"chunks": 32}), ("oracle", {"target": 32})]
    )
    async def test_a_balloon_the_driver_keeps_is_one_warning(
        self, autojump_clock: trio.abc.Clock, kind: str, sizes: dict[str, int]
    ) -> None:
        """The in-tree driver keeps its kernel's chunks once 0x40 leaves the filter (no
        later request reaches the kernel, a deflate neither); Oracle's keeps them until the
        session closes. One warning names the size and why (in kernel mode read at the
        drain: nothing read it since the kernel ballooned); an empty balloon is no news."""
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with running_balloon(personality="", host=_host(kind)) as run:
                run.host.set_balloon_target(32)
                await run.settle(32)
                if kind == "oracle":
                    await run.until(lambda: run.service.statistics().target == 32)
            async with running_balloon(personality="", host=_host(kind)):
                pass
        [line] = [e for e in logs if e["event"] == "balloon_left_to_driver"]
        assert (line["log_level"], line["mode"]) == ("warning", run.service.mode)
        assert sizes == {key: line[key] for key in ("chunks", "target") if key in line}
        why = "0x40 leaves the event filter" if kind == "mainline" else "closes the device"
        assert why in line["reason"]
