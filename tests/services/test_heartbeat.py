"""Tests of the heartbeat service against the in-process simulated host.

Rules of this test module:
- The host is a real ``SimulatedHost`` behind ``SimOpener`` (pure trio, no threads), so the
  virtual clock (``autojump_clock``, an argument of every test) drives every beat; each test
  is bounded by ``trio.fail_after`` on that clock.
- Beat counts and gaps are read from the host's own heartbeat state, as ``host status``
  shows it; synchronisation uses ``wait_all_tasks_blocked`` and virtual sleeps.
"""

from __future__ import annotations

import errno
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import pytest
import structlog
import trio
import trio.testing

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import (
    HeartbeatConfigure,
    RequestType,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.status import VERR_GENERAL_FAILURE, VERR_NOT_SUPPORTED
from agent.services import EventPump
from agent.services._base import ServiceContext
from agent.services.heartbeat import HeartbeatSection, HeartbeatService
from tests.sim_support import HookedOpener, ReplyGarbler

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

BOUND_S: Final = 600.0
INTERVAL_NS: Final = 100_000_000
DRIVER_LOAD: Final = 2
"""HEARTBEAT_CONFIGURE requests a heartbeat-owning driver sends at load (off, then on)."""


@asynccontextmanager
async def running(
    personality: str,
    section: HeartbeatSection | None = None,
    status_changed: Callable[[], None] = lambda: None,
    reply: Callable[[bytearray], None] | None = None,
    interval_ns: int = INTERVAL_NS,
) -> AsyncIterator[tuple[SimulatedHost, HeartbeatService, trio.CancelScope]]:
    """A host with a 100 ms interval (or ``interval_ns``, even one VMMDev would refuse to
    start with), the pump, and a started service with its cancel scope (``status_changed``
    is the context's; ``reply`` may change the host's replies, as :class:`HookedOpener`'s)."""
    host = SimulatedHost(personality=personality, heartbeat_interval_ns=INTERVAL_NS, seed=1)
    host.vmmdev.heartbeat.interval_ns = interval_ns
    opener = SimOpener(host) if reply is None else HookedOpener(host, reply=reply)
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(opener) as device:
                pump = EventPump(device)
                service = HeartbeatService(
                    ServiceContext(device, pump, status_changed), section or HeartbeatSection()
                )
                await nursery.start(pump.run)
                service_scope = await nursery.start(_run_in_scope, service)
                yield host, service, service_scope
                nursery.cancel_scope.cancel()


async def _run_in_scope(
    service: HeartbeatService, *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(service.run)
            task_status.started(scope)


class RefuseAfterDisable:
    """A ``reply`` hook: once ``host`` is set, the host's answer to the next Disable queues a
    refusal (VERR_GENERAL_FAILURE) of the configures after it, the Enable first."""

    def __init__(self) -> None:
        self.host: SimulatedHost | None = None

    def __call__(self, buffer: bytearray) -> None:
        request = L.HeartbeatRequest
        if (
            self.host is not None
            and len(buffer) == request.size
            and L.RequestHeader.request_type.get(buffer) == RequestType.HEARTBEAT_CONFIGURE
            and not request.enabled.get(buffer)
        ):
            self.host.add_fault(RequestType.HEARTBEAT_CONFIGURE, VERR_GENERAL_FAILURE, 1000)
            self.host = None


def heartbeat(host: SimulatedHost) -> dict[str, object]:
    """The host's heartbeat state (``host status``)."""
    state = host.status()["heartbeat"]
    assert isinstance(state, dict)
    return state


class TestAgentKeepsTheHeartbeat:
    """``passthrough``: the service configures the check and beats."""

    async def test_beats_on_the_host_interval(self, autojump_clock: trio.abc.Clock) -> None:
        """Over 10 s the host counts one beat per 100 ms, never a gap above the interval."""
        async with running("passthrough") as (host, service, _):
            await trio.sleep(10.0 - 1e-9)
            state = heartbeat(host)
            assert (state["enabled"], state["beats"], state["flatlined"]) == (True, 100, False)
            assert state["max_gap_ns"] == INTERVAL_NS
            assert service.status() == "heartbeat 100 ms"
            stats = service.statistics()
            assert (stats.owner, stats.configures, stats.rhythm.late) == ("agent", 1, 0)

    async def test_restore_configures_again_and_beats_go_on(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """After RESTORED the check is switched off and on again and beats continue."""
        async with running("passthrough") as (host, service, _):
            await trio.sleep(1.05)
            configures = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
            host.restore()
            await trio.sleep(1.0)
            assert host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE] == configures + 2
            assert service.statistics().configures == 2
            state = heartbeat(host)
            assert (state["enabled"], state["flatlined"]) == (True, False)
            assert state["max_gap_ns"] == INTERVAL_NS

    async def test_restore_is_followed_while_beats_are_slow(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Beats the host answers after 300 ms (three intervals: no deadline is ever ahead
        to wait for) still let a restore through: the check is configured again once the
        beat under way (sent as the VM was restored) is answered; half a minute of slow
        beats is one warning."""
        async with running("passthrough") as (host, service, _):
            await trio.sleep(1.0)
            host.set_delay(RequestType.GUEST_HEARTBEAT, 0.3)
            with structlog.testing.capture_logs() as logs:
                await trio.sleep(1.0)
                configures = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
                host.restore()
                await trio.sleep(0.4)
                assert host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE] == configures + 2
                assert service.statistics().configures == 2
                await trio.sleep(30.0)
            rhythm = service.statistics().rhythm
            assert rhythm.rereads == 1
            assert rhythm.late > 10
        assert [entry["event"] for entry in logs].count("tick_late") == 1

    async def test_drain_switches_the_check_off(self, autojump_clock: trio.abc.Clock) -> None:
        """The stop leaves the host's check disabled and the guest not flat-lined."""
        async with running("passthrough") as (host, service, scope):
            await trio.sleep(0.5)
            scope.cancel()
            with structlog.testing.capture_logs() as logs:
                await service.drain()
                await service.drain()
            await trio.sleep(5.0)
            state = heartbeat(host)
            assert (state["enabled"], state["flatlined"]) == (False, False)
            assert [entry["event"] for entry in logs].count("heartbeat_stopped") == 1

    async def test_refused_beats_are_counted_and_the_rhythm_goes_on(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Beats the host fails are counted, logged once while they last (and the status says
        so), and once more when a beat goes through; the next beat goes out on time."""
        async with running("passthrough") as (host, service, _):
            await trio.sleep(0.05)
            host.add_fault(RequestType.GUEST_HEARTBEAT, -1, 3)
            with structlog.testing.capture_logs() as logs:
                await trio.sleep(0.1)
                assert service.status() == "heartbeat 100 ms (failing: VERR_GENERAL_FAILURE)"
                await trio.sleep(1.0)
            assert service.statistics().failures == 3
            assert service.status() == "heartbeat 100 ms"
            failed = [entry for entry in logs if entry["event"] == "heartbeat_failed"]
            assert [(e["status"], e["failures"]) for e in failed] == [("VERR_GENERAL_FAILURE", 1)]
            recovered = [entry for entry in logs if entry["event"] == "heartbeat_recovered"]
            assert [entry["failed_in_a_row"] for entry in recovered] == [3]

    async def test_malformed_beat_replies_are_counted_and_the_rhythm_goes_on(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A minute of beat replies whose header names another request type (a broken host;
        far more failures than the supervisor's restart budget) is counted beat by beat and
        logged once, the status says so, and the service goes on beating on time; one more
        line when replies are sound again."""
        garbler = ReplyGarbler()
        async with running("passthrough", reply=garbler) as (host, service, _):
            await trio.sleep(0.05)
            garbler.request_types.add(RequestType.GUEST_HEARTBEAT)
            with structlog.testing.capture_logs() as logs:
                await trio.sleep(60.0)
                assert service.status() == "heartbeat 100 ms (failing: malformed reply)"
                garbler.request_types.clear()
                await trio.sleep(1.0)
            assert service.status() == "heartbeat 100 ms"
            assert (service.statistics().failures, garbler.garbled) == (600, 600)
            state = heartbeat(host)
            assert (state["beats"], state["max_gap_ns"]) == (611, INTERVAL_NS)
        failed = [entry for entry in logs if entry["event"] == "heartbeat_failed"]
        assert len(failed) == 1
        assert "reply header (size, version, type)" in failed[0]["malformed_reply"]
        recovered = [entry for entry in logs if entry["event"] == "heartbeat_recovered"]
        assert [entry["failed_in_a_row"] for entry in recovered] == [600]

    @pytest.mark.parametrize("interval_ns", [0, 1, 49_999_999])
    async def test_an_interval_below_50ms_leaves_the_check_off_until_a_restore(
        self, autojump_clock: trio.abc.Clock, interval_ns: int
    ) -> None:
        """A host naming an interval below the 50 ms VMMDev allows (on 1 ns the agent beat
        20,000 times a second): one warning naming the value and the bound, the check
        switched off again and no beat for a minute, the service up (no restarts to spend);
        a restore configures again and a sound interval applies; the drain switches the
        check off."""
        with structlog.testing.capture_logs() as logs:
            async with running("passthrough", interval_ns=interval_ns) as (host, service, scope):
                await trio.sleep(60.0)
                state = heartbeat(host)
                assert (state["enabled"], state["beats"]) == (False, 0)
                assert host.vmmdev.request_counts[RequestType.GUEST_HEARTBEAT] == 0
                assert service.status() == "heartbeat not armed (malformed reply)"
                assert service.statistics().malformed_configures == 1
                host.vmmdev.heartbeat.interval_ns = INTERVAL_NS
                host.restore()
                await trio.sleep(1.0 - 1e-9)
                state = heartbeat(host)
                assert (state["enabled"], state["beats"], state["flatlined"]) == (True, 10, False)
                assert service.status() == "heartbeat 100 ms"
                scope.cancel()
                await service.drain()
                assert heartbeat(host)["enabled"] is False
        [not_armed] = [entry for entry in logs if entry["event"] == "heartbeat_not_armed"]
        said = f"interval of {interval_ns} ns, below the 50000000 ns (50 ms)"
        assert said in not_armed["malformed_reply"]
        assert not [entry for entry in logs if entry["event"] == "heartbeat_disable_failed"]

    async def test_a_refused_configure_is_said_once_and_retried_on_a_back_off(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A host refusing HEARTBEAT_CONFIGURE with VERR_GENERAL_FAILURE (the service
        re-raised it: six restarts within a minute ended the agent, exit 70): one warning,
        the status says so, no beat and the service up; the configure is asked again 1, 2,
        4 and 8 s later, and once the host takes it the beats go on, with one line saying
        so."""
        with structlog.testing.capture_logs() as logs:
            async with running("passthrough") as (host, service, _):
                host.add_fault(RequestType.HEARTBEAT_CONFIGURE, -1, 1000)
                host.restore()
                await trio.sleep(0.5)
                assert service.status() == "heartbeat not armed (VERR_GENERAL_FAILURE)"
                beats = heartbeat(host)["beats"]
                assert isinstance(beats, int)
                configures = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
                await trio.sleep(14.0)  # retries at 1, 3, 7 and 15 s after the restore
                assert heartbeat(host)["beats"] == beats
                asked = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
                assert asked == configures + 3
                host.clear_faults(RequestType.HEARTBEAT_CONFIGURE)
                await trio.sleep(0.95)  # armed at 15 s: beats at 15.0 ... 15.4
                assert service.status() == "heartbeat 100 ms"
                assert heartbeat(host)["beats"] == beats + 5
                statistics = service.statistics()
                assert (statistics.configures, statistics.refused_configures) == (2, 4)
        [not_armed] = [entry for entry in logs if entry["event"] == "heartbeat_not_armed"]
        assert (not_armed["status"], not_armed["log_level"]) == ("VERR_GENERAL_FAILURE", "warning")
        [armed] = [entry for entry in logs if entry["event"] == "heartbeat_armed_again"]
        assert armed["failed_in_a_row"] == 4

    async def test_a_host_refusing_the_first_configure_leaves_the_check_off(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Refused from the start (the repro: ``host fault HEARTBEAT_CONFIGURE``): the
        service starts all the same, nothing was switched on, so the drain sends nothing;
        an hour of refusals is about 65 requests and one warning."""
        with structlog.testing.capture_logs() as logs:
            host = SimulatedHost(personality="passthrough", heartbeat_interval_ns=INTERVAL_NS)
            host.add_fault(RequestType.HEARTBEAT_CONFIGURE, -1, 1000)
            with trio.fail_after(BOUND_S * 10):
                async with trio.open_nursery() as nursery:
                    await nursery.start(host.run)
                    async with open_device(SimOpener(host)) as device:
                        pump = EventPump(device)
                        service = HeartbeatService(ServiceContext(device, pump), HeartbeatSection())
                        await nursery.start(pump.run)
                        with trio.move_on_after(3600):
                            await service.run()
                        assert service.status() == "heartbeat not armed (VERR_GENERAL_FAILURE)"
                        sent = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
                        await service.drain()
                        asked = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
                    nursery.cancel_scope.cancel()
        assert 60 <= sent - DRIVER_LOAD <= 70
        assert asked == sent
        assert len([entry for entry in logs if entry["event"] == "heartbeat_not_armed"]) == 1

    async def test_a_restore_whose_enable_is_refused_leaves_the_drain_nothing_to_switch_off(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """After a restore the host takes the Disable and refuses the Enable: its check is
        off, so the drain sends no Disable (one the host would refuse, logged as failed)."""
        refuse = RefuseAfterDisable()
        async with running("passthrough", reply=refuse) as (host, service, scope):
            await trio.sleep(0.5)
            refuse.host = host
            host.restore()
            await trio.sleep(0.5)
            assert service.status() == "heartbeat not armed (VERR_GENERAL_FAILURE)"
            assert heartbeat(host)["enabled"] is False
            sent = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
            scope.cancel()
            with structlog.testing.capture_logs() as logs:
                await service.drain()
            assert host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE] == sent
        assert not [entry for entry in logs if entry["event"].startswith("heartbeat_")]

    async def test_a_retry_refused_as_unsupported_gives_up_and_says_so(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The first configure is refused with VERR_GENERAL_FAILURE, its retry with
        VERR_NOT_SUPPORTED: the host lacks the heartbeat, so the service stops retrying and
        its status says so (it said ``not armed (VERR_GENERAL_FAILURE)`` for good). Started as
        the supervisor starts it: the metronome reported ready at the first configure, so the
        refusal at the retry does not again (a second ``started()`` ended the service)."""
        with structlog.testing.capture_logs() as logs:
            host = SimulatedHost(personality="passthrough", heartbeat_interval_ns=INTERVAL_NS)
            with trio.fail_after(BOUND_S * 10):
                async with trio.open_nursery() as nursery:
                    await nursery.start(host.run)
                    host.add_fault(RequestType.HEARTBEAT_CONFIGURE, VERR_GENERAL_FAILURE, 1)
                    host.add_fault(RequestType.HEARTBEAT_CONFIGURE, VERR_NOT_SUPPORTED, 1000)
                    sent = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
                    async with open_device(SimOpener(host)) as device:
                        pump = EventPump(device)
                        service = HeartbeatService(ServiceContext(device, pump), HeartbeatSection())
                        await nursery.start(pump.run)
                        await nursery.start(service.run)
                        await trio.sleep(3600)
                        assert service.status() == "heartbeat unsupported by the host"
                        assert service.statistics().owner == "none"
                        asked = host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE]
                        assert asked == sent + 2  # the refused Disables, no retry after
                    nursery.cancel_scope.cancel()
        said = [entry["event"] for entry in logs if entry["event"].startswith("heartbeat_")]
        assert said == ["heartbeat_not_armed", "heartbeat_not_supported_by_host"]

    async def test_a_failed_first_configure_then_the_kernel_s_refusal_idles(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Mainline allocates an ioctl's buffer before it checks who may send the request: the
        first configure may fail with ENOMEM, and its retry meets the kernel's EPERM. The
        service, started as the supervisor starts it, then says the kernel keeps the
        heartbeat and idles, once."""
        code = HeartbeatConfigure(enabled=False).encode().code
        failures_left = [1]

        async def enomem_once(ioctl_code: int) -> None:
            if ioctl_code == code and failures_left[0]:
                failures_left[0] -= 1
                raise OSError(errno.ENOMEM, "Cannot allocate memory")

        host = SimulatedHost(personality="mainline", heartbeat_interval_ns=INTERVAL_NS)
        with structlog.testing.capture_logs() as logs, trio.fail_after(BOUND_S * 10):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                async with open_device(HookedOpener(host, before=enomem_once)) as device:
                    pump = EventPump(device)
                    service = HeartbeatService(ServiceContext(device, pump), HeartbeatSection())
                    await nursery.start(pump.run)
                    await nursery.start(service.run)
                    await trio.sleep(3600)
                    assert service.status() == "heartbeat (kernel)"
                nursery.cancel_scope.cancel()
        assert failures_left == [0]
        said = [entry["event"] for entry in logs if entry["event"] == "heartbeat_kept_by_driver"]
        assert said == ["heartbeat_kept_by_driver"]

    async def test_failing_and_recovering_beats_change_the_status(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The daemon is told of a status change at the first refused beat and again when
        beats go through, once each (besides the one at the configure)."""
        changes: list[None] = []

        def changed() -> None:
            changes.append(None)

        async with running("passthrough", status_changed=changed) as (host, service, _):
            await trio.sleep(0.05)
            assert len(changes) == 1  # configured
            host.add_fault(RequestType.GUEST_HEARTBEAT, -1, 3)
            await trio.sleep(0.1)
            assert service.status() == "heartbeat 100 ms (failing: VERR_GENERAL_FAILURE)"
            assert len(changes) == 2
            await trio.sleep(1.0)
            assert service.status() == "heartbeat 100 ms"
            assert len(changes) == 3

    async def test_late_threshold_applies_live(self, autojump_clock: trio.abc.Clock) -> None:
        """A reload changes the late threshold without a restart: beats up to 90 ms late (the
        host takes 130 ms per beat of a 100 ms rhythm) are not late under 0.5 s, and are
        under 0.02 s."""
        section = HeartbeatSection(late_after_s=0.5)
        async with running("passthrough", section) as (host, service, _):
            host.set_delay(RequestType.GUEST_HEARTBEAT, 0.13)
            await trio.sleep(1.0)
            before = service.statistics().rhythm
            assert before.late == 0
            assert 0.02 < before.max_lateness_s < 0.5
            assert service.reconfigure(HeartbeatSection(late_after_s=0.02))
            await trio.sleep(1.0)
            after = service.statistics().rhythm
            assert after.late > 0


class TestDriverKeepsTheHeartbeat:
    """``mainline`` and ``oracle`` keep the heartbeat in the kernel."""

    async def test_mainline_logs_once_and_sends_nothing(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """EPERM: one log line, no request reaches the host, the kernel's beats go on."""
        with structlog.testing.capture_logs() as logs:
            async with running("mainline") as (host, service, _):
                host.restore()
                await trio.sleep(5.0)
                assert host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE] == DRIVER_LOAD
                assert heartbeat(host)["flatlined"] is False
                assert service.status() == "heartbeat (kernel)"
                await service.drain()
                assert heartbeat(host)["enabled"] is True
        kept = [entry for entry in logs if entry["event"] == "heartbeat_kept_by_driver"]
        assert [entry["refused_with"] for entry in kept] == ["VERR_PERMISSION_DENIED"]

    async def test_oracle_logs_once_and_sends_nothing(self, autojump_clock: trio.abc.Clock) -> None:
        """VERR_PERMISSION_DENIED in the header: the same single log line, nothing sent."""
        with structlog.testing.capture_logs() as logs:
            async with running("oracle") as (host, service, _):
                await trio.sleep(5.0)
                assert service.statistics().owner == "driver"
                assert host.vmmdev.request_counts[RequestType.HEARTBEAT_CONFIGURE] == DRIVER_LOAD
                assert heartbeat(host)["flatlined"] is False
        kept = [entry for entry in logs if entry["event"] == "heartbeat_kept_by_driver"]
        assert [entry["refused_with"] for entry in kept] == ["VERR_PERMISSION_DENIED"]
