"""Tests of the supervisor's start, restart and give-up rules.

Rules of this test module:
- Services are small fakes; time is trio's virtual clock (``autojump_clock``), so backoff
  delays are asserted exactly.
- Every test bounds itself with ``trio.fail_after`` on the virtual clock.
"""

from __future__ import annotations

import itertools
from typing import NoReturn

import pytest
import structlog
import trio
import trio.testing

from agent.config import MAX_RESTART_BUDGET, DaemonConfig
from agent.daemon import ServiceFailedError, Supervisor
from agent.device import DeviceLostError
from agent.protocol import LocalProtocolError


class FlakyService:
    """Fails ``failures`` times (after starting), then runs for ever."""

    name = "flaky"

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or RuntimeError("boom")
        self.starts: list[float] = []
        self.drains: list[float] = []
        self.recovered = trio.Event()
        """Set once the start after the last failure began."""

    async def drain(self) -> None:
        self.drains.append(trio.current_time())
        await trio.lowlevel.checkpoint()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        self.starts.append(trio.current_time())
        task_status.started()
        if len(self.starts) <= self.failures:
            raise self.error
        self.recovered.set()
        await trio.sleep_forever()


class FailsBeforeReady:
    """Fails during start-up ``failures`` times, then starts and runs; drains in ``drain_s``."""

    name = "late"

    def __init__(self, failures: int, drain_s: float = 0.0) -> None:
        self.failures = failures
        self.drain_s = drain_s
        self.attempts = 0
        self.drained_at: list[float] = []
        self.running = trio.Event()

    async def drain(self) -> None:
        await trio.sleep(self.drain_s)  # the service's own clean-up work
        self.drained_at.append(trio.current_time())

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        self.attempts += 1
        if self.attempts <= self.failures:
            msg = "not yet"
            raise OSError(msg)
        task_status.started()
        self.running.set()
        await trio.sleep_forever()


class BrokenService(FlakyService):
    """Starts, then a second later fails with an error no restart can fix."""

    name = "broken"

    def __init__(self) -> None:
        super().__init__(failures=0)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        task_status.started()
        await trio.sleep(1.0)
        msg = "the agent broke the protocol"
        raise LocalProtocolError(msg)


def _config(**changes: object) -> DaemonConfig:
    values: dict[str, object] = {
        "restart_backoff_initial_s": 1.0,
        "restart_backoff_max_s": 4.0,
        "restart_budget": 5,
        "restart_window_s": 60.0,
    }
    values.update(changes)
    return DaemonConfig.model_validate(values)


class TestSupervisor:
    """Restart policy of :class:`Supervisor`."""

    async def test_restarts_failed_service_with_doubling_backoff(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A failing service is restarted after 1, 2, 4 and then 4 seconds (the ceiling)."""
        service = FlakyService(failures=4)
        supervisor: Supervisor[FlakyService] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await trio.sleep(20)
                nursery.cancel_scope.cancel()
        assert service.starts == [0.0, 1.0, 3.0, 7.0, 11.0]
        assert supervisor.restarts() == {"flaky": 4}

    async def test_gives_up_after_budget(self, autojump_clock: trio.abc.Clock) -> None:
        """More failures than the budget within the window raise ServiceFailedError, which
        names the service's own error; each retry is a warning with its delay, the end an
        error."""
        service = FlakyService(failures=100)
        supervisor: Supervisor[FlakyService] = Supervisor(_config(restart_budget=2))
        gave_up = pytest.RaisesExc(
            ServiceFailedError,
            match=r"^service flaky failed 3 times within 60 s: RuntimeError\('boom'\)$",
        )
        with (
            structlog.testing.capture_logs() as logs,
            trio.fail_after(60),
            pytest.RaisesGroup(gave_up),
        ):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
        assert len(service.starts) == 3
        lines = [
            (e["event"], e["log_level"], e["failures"], e.get("retry_in_s"), e["error"])
            for e in logs
            if e["event"] in {"service_failed", "service_gave_up"}
        ]
        assert lines == [
            ("service_failed", "warning", 1, 1.0, "RuntimeError('boom')"),
            ("service_failed", "warning", 2, 2.0, "RuntimeError('boom')"),
            ("service_gave_up", "error", 3, None, "RuntimeError('boom')"),
        ]

    async def test_failures_outside_window_do_not_count(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Failures older than the window are forgotten, so a slow failer runs on."""
        service = FlakyService(failures=6)
        supervisor: Supervisor[FlakyService] = Supervisor(
            _config(restart_budget=1, restart_window_s=0.5)
        )
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await trio.sleep(30)
                nursery.cancel_scope.cancel()
        assert len(service.starts) == 7

    async def test_a_large_restart_budget_keeps_the_ceiling(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Past 1024 failures within the window (a budget the config allows) the back-off
        stays at its ceiling: the doubling stops there instead of overflowing a float."""
        service = FlakyService(failures=1100)
        supervisor: Supervisor[FlakyService] = Supervisor(
            _config(restart_budget=MAX_RESTART_BUDGET, restart_window_s=86400.0)
        )
        with trio.fail_after(86400):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await service.recovered.wait()
                nursery.cancel_scope.cancel()
        gaps = [later - earlier for earlier, later in itertools.pairwise(service.starts)]
        assert gaps == [1.0, 2.0] + [4.0] * 1098
        assert supervisor.restarts() == {"flaky": 1100}

    async def test_fatal_error_propagates_at_once(self, autojump_clock: trio.abc.Clock) -> None:
        """A lost device is not retried: it ends the supervisor."""
        service = FlakyService(failures=1, error=DeviceLostError("gone"))
        supervisor: Supervisor[FlakyService] = Supervisor(_config())
        with trio.fail_after(60), pytest.RaisesGroup(pytest.RaisesGroup(DeviceLostError)):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
        assert len(service.starts) == 1

    async def test_fatal_error_drains_every_service_first(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """An error that ends the agent while the device still answers (here a protocol
        error) lets every service drain first, as a stop does, then ends the supervisor."""
        steady = FlakyService(failures=0)
        broken = BrokenService()
        supervisor: Supervisor[FlakyService | BrokenService] = Supervisor(_config())
        with trio.fail_after(60), pytest.RaisesGroup(pytest.RaisesGroup(LocalProtocolError)):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, steady)
                await supervisor.start(nursery, broken)
        assert (steady.drains, broken.drains) == ([1.0], [1.0])
        assert supervisor.services() == []

    async def test_a_second_fatal_error_keeps_its_drain(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A service that fails fatally while the agent already drains for another's error
        (its run's shielded clean-up took a second) gets its whole drain within the one
        deadline, though a third service ended meanwhile, and both errors end the
        supervisor; its line gives the drain time left."""
        broken = BrokenService()
        second = BreaksWhenStopped(drain_s=2.0)
        third = FailsBeforeReady(failures=0, drain_s=2.5)
        supervisor: Supervisor[BrokenService | BreaksWhenStopped | FailsBeforeReady] = Supervisor(
            _config(shutdown_timeout_s=5.0)
        )
        raised = pytest.RaisesGroup(
            pytest.RaisesGroup(pytest.RaisesExc(LocalProtocolError, match="agent broke")),
            pytest.RaisesGroup(pytest.RaisesExc(LocalProtocolError, match="when stopped")),
        )
        with structlog.testing.capture_logs() as logs, trio.fail_after(60), raised:
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, broken)
                await supervisor.start(nursery, second)
                await supervisor.start(nursery, third)
        assert third.drained_at == [3.5]
        assert (second.drained_at, second.drain_cancelled) == ([4.0], False)
        assert trio.current_time() == 4.0
        ending = [
            (e["service"], e["drain_s"])
            for e in logs
            if e["event"] == "services_draining_before_exit"
        ]
        assert ending == [("broken", 5.0), ("second", 4.0)]

    async def test_a_service_started_while_ending_drains_without_running(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A service handed over while a fatal error's drains run is drained at once and
        never runs, so it does not hold up the end."""
        broken = BrokenService()
        slow = FailsBeforeReady(failures=0, drain_s=2.0)
        late = HeldStart()
        supervisor: Supervisor[BrokenService | FailsBeforeReady | HeldStart] = Supervisor(
            _config(shutdown_timeout_s=5.0)
        )
        with trio.fail_after(60), pytest.RaisesGroup(pytest.RaisesGroup(LocalProtocolError)):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, slow)
                await supervisor.start(nursery, broken)
                await trio.sleep(1.5)
                assert supervisor.ending
                await supervisor.start(nursery, late)
        assert (late.starting.is_set(), late.drains) == (False, [1.5])
        assert trio.current_time() == 3.0

    async def test_a_replacement_while_ending_never_runs(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A replacement asked for while a fatal error's drains run is dropped: the service
        on its way out drains and ends, nothing runs in its place."""
        broken = BrokenService()
        slow = FailsBeforeReady(failures=0, drain_s=2.0)
        replacement = FailsBeforeReady(failures=0)
        supervisor: Supervisor[BrokenService | FailsBeforeReady] = Supervisor(
            _config(shutdown_timeout_s=5.0)
        )
        with trio.fail_after(60), pytest.RaisesGroup(pytest.RaisesGroup(LocalProtocolError)):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, slow)
                await supervisor.start(nursery, broken)
                await trio.sleep(1.5)
                assert supervisor.replace("late", replacement)
        assert (slow.drained_at, replacement.attempts) == ([3.0], 0)
        assert trio.current_time() == 3.0

    async def test_end_drains_every_service_and_runs_the_hook(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """``end`` (a fatal error outside the supervisor) drains every service until its
        deadline, runs ``on_ending`` meanwhile, and returns once all ended."""
        steady = FlakyService(failures=0)
        slow = FailsBeforeReady(failures=0, drain_s=2.0)
        hooked: list[tuple[float, float]] = []

        async def on_ending(deadline: float) -> None:
            hooked.append((trio.current_time(), deadline))
            await trio.lowlevel.checkpoint()

        supervisor: Supervisor[FlakyService | FailsBeforeReady] = Supervisor(
            _config(shutdown_timeout_s=5.0), on_ending=on_ending
        )
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, steady)
                await supervisor.start(nursery, slow)
                await trio.sleep(1.0)
                await supervisor.end(trio.current_time() + 3.0)
                ended = trio.current_time()
                assert supervisor.services() == []
        assert (steady.drains, slow.drained_at, ended) == ([1.0], [3.0], 3.0)
        assert hooked == [(1.0, 4.0)]

    async def test_a_failing_hook_leaves_the_fatal_error_to_end_it(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """An ``on_ending`` hook that raises is logged; the service's fatal error, not the
        hook's, ends the supervisor once the drains ran."""
        steady = FailsBeforeReady(failures=0, drain_s=2.0)
        broken = BrokenService()

        async def on_ending(deadline: float) -> None:
            del deadline
            await trio.lowlevel.checkpoint()
            msg = "the hook broke"
            raise RuntimeError(msg)

        supervisor: Supervisor[FailsBeforeReady | BrokenService] = Supervisor(
            _config(shutdown_timeout_s=5.0), on_ending=on_ending
        )
        with (
            structlog.testing.capture_logs() as logs,
            trio.fail_after(60),
            pytest.RaisesGroup(pytest.RaisesGroup(LocalProtocolError)),
        ):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, steady)
                await supervisor.start(nursery, broken)
        failed = [e for e in logs if e["event"] == "on_ending_failed"]
        assert [e["error"] for e in failed] == ["RuntimeError('the hook broke')"]
        assert (steady.drained_at, trio.current_time()) == ([3.0], 3.0)

    async def test_giving_up_drains_every_service_first(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A service past its restart budget ends the supervisor only after the others
        drained."""
        steady = FlakyService(failures=0)
        failing = FailsBeforeReady(failures=100)
        supervisor: Supervisor[FlakyService | FailsBeforeReady] = Supervisor(
            _config(restart_budget=1)
        )
        with trio.fail_after(60), pytest.RaisesGroup(ServiceFailedError):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, steady)
                nursery.start_soon(supervisor.start, nursery, failing)
        assert steady.drains == [1.0]
        assert failing.drained_at == [0.0, 1.0]

    async def test_giving_up_is_decided_before_the_failed_run_drains(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The failure past the budget ends the supervisor at once: its run drains (2 s) as
        one of the ending's drains, beside the others, and not before the ending began (a
        drain then could not tell that the agent exits)."""
        steady = FlakyService(failures=0)
        failing = FailsBeforeReady(failures=100, drain_s=2.0)
        endings: list[float] = []

        async def record(deadline: float) -> None:
            del deadline
            endings.append(trio.current_time())
            await trio.lowlevel.checkpoint()

        supervisor: Supervisor[FlakyService | FailsBeforeReady] = Supervisor(
            _config(restart_budget=1), on_ending=record
        )
        with trio.fail_after(60), pytest.RaisesGroup(ServiceFailedError):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, steady)
                nursery.start_soon(supervisor.start, nursery, failing)
        # Fails at 0, drains until 2, past its 1 s back-off (counted from the failure), so it
        # runs again at once and fails at 2: the ending begins.
        assert endings == [2.0]
        assert (failing.drained_at, steady.drains) == ([2.0, 4.0], [2.0])

    async def test_a_failed_first_start_holds_up_nobody(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A service failing during start-up: the wait for its start ends once it backs off
        (the caller goes on to the next service), and it is retried on its own until it
        starts."""
        service = FailsBeforeReady(failures=2)
        supervisor: Supervisor[FailsBeforeReady] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                returned_at = trio.current_time()
                assert supervisor.retrying() == {"late": 1}
                await service.running.wait()
                assert (trio.current_time(), supervisor.retrying()) == (3.0, {})
                nursery.cancel_scope.cancel()
        assert returned_at == 0.0
        assert service.drained_at == [0.0, 1.0]

    async def test_replacement_is_not_a_failure(self, autojump_clock: trio.abc.Clock) -> None:
        """``replace(name, service)`` drains the old one and runs the new one at once."""
        first, second = FlakyService(failures=0), FlakyService(failures=0)
        supervisor: Supervisor[FlakyService] = Supervisor(_config(restart_budget=0))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, first)
                await trio.sleep(1)
                assert supervisor.replace("flaky", second)
                await trio.testing.wait_all_tasks_blocked()
                assert supervisor.current("flaky") is second
                nursery.cancel_scope.cancel()
        assert (first.starts, first.drains) == ([0.0], [1.0])
        assert second.starts == [1.0]
        assert supervisor.restarts() == {"flaky": 1}
        assert not supervisor.replace("flaky", first)

    async def test_a_replacement_gets_a_fresh_restart_budget(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """The failures of the service replaced do not count against its replacement."""
        first, second = FlakyService(failures=1), FlakyService(failures=1)
        supervisor: Supervisor[FlakyService] = Supervisor(_config(restart_budget=1))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, first)
                await trio.sleep(2)
                assert supervisor.replace("flaky", second)
                await trio.sleep(5)
                nursery.cancel_scope.cancel()
        assert (first.starts, second.starts) == ([0.0, 1.0], [2.0, 3.0])

    async def test_every_failure_is_drained(self, autojump_clock: trio.abc.Clock) -> None:
        """A failed run is drained before the back-off, so nothing is held while waiting."""
        service = FlakyService(failures=2)
        supervisor: Supervisor[FlakyService] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await trio.sleep(10)
                nursery.cancel_scope.cancel()
        assert service.drains == [0.0, 1.0]
        assert service.starts == [0.0, 1.0, 3.0]

    async def test_stop_drains_and_ends_the_task(self, autojump_clock: trio.abc.Clock) -> None:
        """``stop`` cancels the run, drains once and ends the service's task."""
        service = FlakyService(failures=0)
        supervisor: Supervisor[FlakyService] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await trio.sleep(2)
                supervisor.stop_all(trio.current_time() + 5)
        assert service.drains == [2.0]
        assert supervisor.services() == []

    async def test_a_failed_drain_is_logged_and_stops_nothing_else(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A drain that raises is one warning; the other services still drain and the stop
        ends as usual."""

        class BadDrain(FlakyService):
            name = "bad"

            async def drain(self) -> None:
                await super().drain()
                msg = "drain broke"
                raise RuntimeError(msg)

        bad, steady = BadDrain(failures=0), FlakyService(failures=0)
        supervisor: Supervisor[FlakyService] = Supervisor(_config())
        with structlog.testing.capture_logs() as logs, trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, bad)
                await supervisor.start(nursery, steady)
                await trio.sleep(2)
                supervisor.stop_all(trio.current_time() + 5)
        assert (bad.drains, steady.drains) == ([2.0], [2.0])
        assert supervisor.services() == []
        failed = [e for e in logs if e["event"] == "service_drain_failed"]
        assert [(e["service"], e["log_level"], e["error"]) for e in failed] == [
            ("bad", "warning", "RuntimeError('drain broke')")
        ]

    async def test_drain_logs_with_the_service_name(self, autojump_clock: trio.abc.Clock) -> None:
        """A drain runs with ``service`` bound, as its run does, so its log lines say whose."""

        class Named(FlakyService):
            def __init__(self) -> None:
                super().__init__(failures=0)
                self.drain_context: dict[str, object] = {}

            async def drain(self) -> None:
                self.drain_context = structlog.contextvars.get_contextvars()
                await super().drain()

        service = Named()
        supervisor: Supervisor[Named] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                supervisor.stop_all(trio.current_time() + 5)
        assert service.drain_context == {"service": "flaky"}
        assert structlog.contextvars.get_contextvars() == {}

    @pytest.mark.parametrize(
        ("initial_s", "restart_at", "rescheduled"),
        [(2.0, 5.0, [0.0]), (60.0, 60.0, [55.0]), (30.0, 30.0, [])],
    )
    async def test_a_new_policy_re_arms_a_back_off_under_way(
        self,
        autojump_clock: trio.abc.Clock,
        initial_s: float,
        restart_at: float,
        rescheduled: list[float],
    ) -> None:
        """A reload's ``[daemon]`` applies at once, counted from the failure: 5 s
        into a 30 s back-off, a 2 s delay (over already) restarts the service now and a
        60 s one at 60 s, each with one line saying when; the same delay changes nothing."""
        service = FlakyService(failures=1)
        supervisor: Supervisor[FlakyService] = Supervisor(
            _config(restart_backoff_initial_s=30, restart_backoff_max_s=60)
        )
        with trio.fail_after(120), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await trio.sleep(5)
                supervisor.config = _config(
                    restart_backoff_initial_s=initial_s, restart_backoff_max_s=60
                )
                await service.recovered.wait()
                nursery.cancel_scope.cancel()
        assert service.starts == [0.0, restart_at]
        lines = [e for e in logs if e["event"] == "service_retry_rescheduled"]
        assert [(e["service"], e["retry_in_s"]) for e in lines] == [
            ("flaky", left) for left in rescheduled
        ]

    @pytest.mark.parametrize(
        ("initial_s", "restart_at", "rescheduled"),
        [(10.0, 10.0, []), (6.0, 6.0, [2.0]), (2.0, 4.0, [0.0])],
    )
    async def test_a_back_off_counts_from_the_failure_not_from_the_drain(
        self,
        autojump_clock: trio.abc.Clock,
        initial_s: float,
        restart_at: float,
        rescheduled: list[float],
    ) -> None:
        """The failed run's drain (3 s) is part of its back-off, which counts from the
        failure (at 0 s): a 10 s delay restarts it at 10 s, 7 s after the drain. A reload at
        4 s counts its delay from the failure too: 6 s restarts it at 6 s, and 2 s (over
        already) at once."""
        service = FailsBeforeReady(failures=1, drain_s=3.0)
        supervisor: Supervisor[FailsBeforeReady] = Supervisor(
            _config(restart_backoff_initial_s=10, restart_backoff_max_s=10)
        )
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await trio.sleep_until(4.0)
                supervisor.config = _config(
                    restart_backoff_initial_s=initial_s, restart_backoff_max_s=10
                )
                await service.running.wait()
                restarted_at = trio.current_time()
                nursery.cancel_scope.cancel()
        assert (service.drained_at[0], restarted_at) == (3.0, restart_at)
        failed = [e["retry_in_s"] for e in logs if e["event"] == "service_failed"]
        moved = [e["retry_in_s"] for e in logs if e["event"] == "service_retry_rescheduled"]
        assert (failed, moved) == ([7.0], rescheduled)

    async def test_a_restart_is_counted_when_the_service_runs_again(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A back-off is no restart yet: the count grows when the service runs again, so a
        stop during its second back-off leaves one restart, for the one run after a
        failure."""
        service = FlakyService(failures=2)
        supervisor: Supervisor[FlakyService] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await trio.testing.wait_all_tasks_blocked()
                backing_off = (supervisor.retrying(), supervisor.restarts())
                await trio.sleep_until(2.0)  # ran again at 1 s, failed, backs off until 3 s
                supervisor.stop("flaky", trio.current_time() + 5)
        assert (backing_off, service.starts) == (({"flaky": 1}, {}), [0.0, 1.0])
        assert supervisor.restarts() == {"flaky": 1}

    async def test_a_replacement_during_a_back_off_is_one_restart(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A service replaced while it backs off runs again once, as its replacement: one
        restart, not one for the back-off and one for the replacement."""
        first, second = FlakyService(failures=1), FlakyService(failures=0)
        supervisor: Supervisor[FlakyService] = Supervisor(
            _config(restart_backoff_initial_s=30, restart_backoff_max_s=30)
        )
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, first)
                await trio.testing.wait_all_tasks_blocked()
                assert supervisor.retrying() == {"flaky": 1}
                assert supervisor.replace("flaky", second)
                await second.recovered.wait()
                nursery.cancel_scope.cancel()
        assert (first.starts, second.starts) == ([0.0], [0.0])
        assert supervisor.restarts() == {"flaky": 1}

    async def test_stop_during_back_off_ends_at_once(self, autojump_clock: trio.abc.Clock) -> None:
        """A service waiting for its restart is stopped without running again: no restart."""
        service = FlakyService(failures=1)
        supervisor: Supervisor[FlakyService] = Supervisor(
            _config(restart_backoff_initial_s=30, restart_backoff_max_s=30)
        )
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                await trio.testing.wait_all_tasks_blocked()
                supervisor.stop("flaky", trio.current_time() + 5)
            stopped_at = trio.current_time()
        assert (service.starts, service.drains, stopped_at) == ([0.0], [0.0], 0.0)
        assert supervisor.restarts() == {}

    async def test_a_replacement_after_stop_all_never_runs(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A replacement asked for once every service was told to stop (a reload that
        applies its file during the stop) calls nothing off: the service on its way out
        drains and ends, and nothing runs in its place."""
        first, second = FlakyService(failures=0), FlakyService(failures=0)
        supervisor: Supervisor[FlakyService] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, first)
                supervisor.stop_all(trio.current_time() + 5)
                assert supervisor.replace("flaky", second)
        assert (first.drains, second.starts, second.drains) == ([0.0], [], [])
        assert supervisor.restarts() == {}

    async def test_a_service_handed_over_after_stop_all_drains_without_running(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A service handed over once every service was told to stop (one a reload enables
        during the stop) is drained at once and never runs, so it does not hold the stop."""
        late = HeldStart()
        supervisor: Supervisor[HeldStart] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                supervisor.stop_all(trio.current_time() + 5)
                await supervisor.start(nursery, late)
        assert (late.starting.is_set(), late.drains) == (False, [0.0])
        assert supervisor.services() == []

    async def test_stop_during_start_drains(self, autojump_clock: trio.abc.Clock) -> None:
        """A stop while the service starts cancels the start and drains it; the wait for the
        start was given up first (as the daemon's stop does) without cancelling anything."""
        service = HeldStart()
        supervisor: Supervisor[HeldStart] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(1):
                    await supervisor.start(nursery, service)
                assert service.starting.is_set()
                assert service.drains == []
                supervisor.stop_all(trio.current_time() + 5)
        assert service.start_cancelled
        assert service.drains == [1.0]
        assert supervisor.services() == []

    async def test_stop_before_the_task_runs_still_drains(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A stop right after ``start_soon`` reaches the service: its run is cancelled at its
        first checkpoint and it is drained, never left running."""
        service = HeldStart()
        supervisor: Supervisor[HeldStart] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                started = supervisor.start_soon(nursery, service)
                supervisor.stop_all(trio.current_time() + 5)
            await started.wait()
        assert service.start_cancelled
        assert service.drains == [0.0]

    async def test_stop_lets_the_drain_of_a_failed_start_finish(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A stop during the drain after a failed start, with the wait for the start given up,
        narrows that drain to the stop's deadline instead of cutting it short."""
        service = FailsBeforeReady(failures=1, drain_s=3)
        supervisor: Supervisor[FailsBeforeReady] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(1):
                    await supervisor.start(nursery, service)
                supervisor.stop_all(trio.current_time() + 5)
            stopped_at = trio.current_time()
        assert (service.attempts, service.drained_at) == (1, [3.0])
        assert stopped_at == 3.0

    async def test_slow_drain_is_cancelled_at_the_deadline(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A drain still running at the stop deadline is cancelled there."""
        service = SlowDrain()
        supervisor: Supervisor[SlowDrain] = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                supervisor.stop("slow-drain", trio.current_time() + 3)
            stopped_at = trio.current_time()
        assert stopped_at == 3.0
        assert service.drain_cancelled

    async def test_stop_narrows_a_drain_in_progress(self, autojump_clock: trio.abc.Clock) -> None:
        """A stop during a replacement's drain applies its (earlier) deadline to that drain."""
        service = SlowDrain()
        supervisor: Supervisor[SlowDrain] = Supervisor(_config(shutdown_timeout_s=10))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, service)
                supervisor.replace("slow-drain", SlowDrain())
                await trio.testing.wait_all_tasks_blocked()
                supervisor.stop("slow-drain", trio.current_time() + 2)
            stopped_at = trio.current_time()
        assert stopped_at == 2.0
        assert service.drain_cancelled


class SlowDrain:
    """Runs for ever; its drain never finishes by itself."""

    name = "slow-drain"

    def __init__(self) -> None:
        self.drain_cancelled = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def drain(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.drain_cancelled = True


class HeldStart:
    """Its start waits for ``release`` (never set by these tests); its drains are timed."""

    name = "held"

    def __init__(self) -> None:
        self.starting = trio.Event()
        self.release = trio.Event()
        self.start_cancelled = False
        self.drains: list[float] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.lowlevel.checkpoint()
            self.starting.set()
            await self.release.wait()
        except trio.Cancelled:
            self.start_cancelled = True
            raise
        task_status.started()
        await trio.sleep_forever()

    async def drain(self) -> None:
        self.drains.append(trio.current_time())
        await trio.lowlevel.checkpoint()


class BreaksWhenStopped:
    """Runs until stopped; its clean-up then takes a second and breaks the protocol. Its
    drain takes ``drain_s``."""

    name = "second"

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.drained_at: list[float] = []
        self.drain_cancelled = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(1.0)  # shielded teardown, as a device call's
            msg = "broke the protocol when stopped"
            raise LocalProtocolError(msg)

    async def drain(self) -> None:
        try:
            await trio.sleep(self.drain_s)  # the service's own clean-up work
        except trio.Cancelled:
            self.drain_cancelled = True
            raise
        self.drained_at.append(trio.current_time())
