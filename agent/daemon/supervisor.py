"""``Supervisor``: runs services in their own cancel scopes and restarts the ones that fail.

Crash-only at the top: errors that mean the agent cannot go on (the device vanished, or we
broke the protocol) propagate and end the daemon with a non-zero exit, so systemd restarts
it. Any other failure of a service restarts that service after a backoff that doubles up
to a ceiling; more failures than the budget within the window are fatal too.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent.device import DeviceLostError, DeviceUnavailableError
from agent.protocol import AgentError, LocalProtocolError

if TYPE_CHECKING:
    from agent.config import DaemonConfig
    from agent.services import Service

log = structlog.get_logger(__name__)

FATAL_ERRORS: Final = (DeviceLostError, DeviceUnavailableError, LocalProtocolError)
"""Errors no restart can fix: they end the daemon."""


class ServiceFailedError(AgentError):
    """A service failed more often than its restart budget allows."""


@final
class Supervisor:
    """Starts services, restarts failed ones with backoff, and restarts them on request."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self._scopes: dict[str, trio.CancelScope] = {}
        self._restarts: dict[str, int] = {}

    def restarts(self) -> dict[str, int]:
        """Return how often each service was restarted (after failures or on request)."""
        return dict(self._restarts)

    def restart(self, name: str) -> None:
        """Restart the running service ``name`` (its failure budget is not charged)."""
        scope = self._scopes.get(name)
        if scope is not None:
            scope.cancel()

    async def supervise(
        self, service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Run ``service`` for ever; ready once its first start succeeded."""
        failures: deque[float] = deque()
        started = False
        while True:
            scope = trio.CancelScope()
            self._scopes[service.name] = scope
            failure: BaseExceptionGroup[Exception] | None = None
            try:
                with scope:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(service.run)
                        if not started:
                            task_status.started()
                            started = True
                        log.info("service_started", service=service.name)
            except* FATAL_ERRORS:
                raise
            except* Exception as group:  # noqa: BLE001 - any other failure restarts the service
                failure = group
            if failure is not None:
                await self._back_off(service.name, failures, failure)
            elif scope.cancelled_caught:
                self._restarts[service.name] = self._restarts.get(service.name, 0) + 1
                log.info("service_restarted", service=service.name, reason="requested")

    async def _back_off(
        self, name: str, failures: deque[float], group: BaseExceptionGroup[Exception]
    ) -> None:
        now = trio.current_time()
        failures.append(now)
        while failures and failures[0] < now - self.config.restart_window_s:
            failures.popleft()
        error = group.exceptions[0] if len(group.exceptions) == 1 else group
        if len(failures) > self.config.restart_budget:
            log.error("service_gave_up", service=name, failures=len(failures), error=repr(error))
            msg = (
                f"service {name} failed {len(failures)} times within "
                f"{self.config.restart_window_s:g} s: {error!r}"
            )
            raise ServiceFailedError(msg) from group
        delay = min(
            self.config.restart_backoff_initial_s * 2 ** (len(failures) - 1),
            self.config.restart_backoff_max_s,
        )
        self._restarts[name] = self._restarts.get(name, 0) + 1
        log.warning(
            "service_failed",
            service=name,
            error=repr(error),
            retry_in_s=delay,
            failures=len(failures),
        )
        await trio.sleep(delay)
