"""Tests of the supervisor's start, restart and give-up rules.

Rules of this test module:
- Services are small fakes; time is trio's virtual clock (``autojump_clock``), so backoff
  delays are asserted exactly.
- Every test bounds itself with ``trio.fail_after`` on the virtual clock.
"""

from __future__ import annotations

from typing import NoReturn

import pytest
import trio

from agent.config import DaemonConfig
from agent.daemon import ServiceFailedError, Supervisor
from agent.device import DeviceLostError


class FlakyService:
    """Fails ``failures`` times (after starting), then runs for ever."""

    name = "flaky"

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or RuntimeError("boom")
        self.starts: list[float] = []

    def statistics(self) -> object:
        return len(self.starts)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        self.starts.append(trio.current_time())
        task_status.started()
        if len(self.starts) <= self.failures:
            raise self.error
        await trio.sleep_forever()


class FailsBeforeReady:
    """Fails during start-up ``failures`` times, then starts and runs."""

    name = "late"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0

    def statistics(self) -> object:
        return self.attempts

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        self.attempts += 1
        if self.attempts <= self.failures:
            msg = "not yet"
            raise OSError(msg)
        task_status.started()
        await trio.sleep_forever()


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
        supervisor = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.supervise, service)
                await trio.sleep(20)
                nursery.cancel_scope.cancel()
        assert service.starts == [0.0, 1.0, 3.0, 7.0, 11.0]
        assert supervisor.restarts() == {"flaky": 4}

    async def test_gives_up_after_budget(self, autojump_clock: trio.abc.Clock) -> None:
        """More failures than the budget within the window raise ServiceFailedError."""
        service = FlakyService(failures=100)
        supervisor = Supervisor(_config(restart_budget=2))
        with trio.fail_after(60), pytest.RaisesGroup(ServiceFailedError):
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.supervise, service)
        assert len(service.starts) == 3

    async def test_failures_outside_window_do_not_count(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Failures older than the window are forgotten, so a slow failer runs on."""
        service = FlakyService(failures=6)
        supervisor = Supervisor(_config(restart_budget=1, restart_window_s=0.5))
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.supervise, service)
                await trio.sleep(30)
                nursery.cancel_scope.cancel()
        assert len(service.starts) == 7

    async def test_fatal_error_propagates_at_once(self, autojump_clock: trio.abc.Clock) -> None:
        """A lost device is not retried: it ends the supervisor."""
        service = FlakyService(failures=1, error=DeviceLostError("gone"))
        supervisor = Supervisor(_config())
        with trio.fail_after(60), pytest.RaisesGroup(pytest.RaisesGroup(DeviceLostError)):
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.supervise, service)
        assert len(service.starts) == 1

    async def test_ready_only_after_first_successful_start(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A service failing during start-up is retried, and readiness waits for it."""
        service = FailsBeforeReady(failures=2)
        supervisor = Supervisor(_config())
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.supervise, service)
                ready_at = trio.current_time()
                nursery.cancel_scope.cancel()
        assert ready_at == 3.0
        assert service.attempts == 3

    async def test_requested_restart_is_not_a_failure(self, autojump_clock: trio.abc.Clock) -> None:
        """``restart(name)`` restarts at once without backoff or budget."""
        service = FlakyService(failures=0)
        supervisor = Supervisor(_config(restart_budget=0))
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.supervise, service)
                await trio.sleep(1)
                supervisor.restart("flaky")
                await trio.sleep(1)
                supervisor.restart("flaky")
                await trio.sleep(1)
                nursery.cancel_scope.cancel()
        assert service.starts == [0.0, 1.0, 2.0]
