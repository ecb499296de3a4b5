"""``Daemon``: the process's root — device, services, readiness, signals, reload, shutdown.

Order of a run: open the device (version handshake) → report the facility as Init → start
the event pump, then the services that subscribe to it, each with ``nursery.start`` under
the supervisor → ``READY=1`` and facility Active → wait for a shutdown request →
``STOPPING=1`` and facility Terminating → cancel the services (their cleanup is shielded
and bounded) → facility Terminated. The whole shutdown is bounded by
``daemon.shutdown_timeout_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from agent.config import ConfigError, load_config
from agent.daemon.facility import FacilityReporter
from agent.daemon.notify import Notifier
from agent.daemon.signals import handle_signals
from agent.daemon.supervisor import Supervisor
from agent.device import open_device
from agent.logconfig import configure_logging
from agent.protocol import FacilityStatus, GetHostVersion, GetSessionId, VBoxStatusError
from agent.services import EventPump, SessionMonitor

if TYPE_CHECKING:
    from pathlib import Path

    from agent.config import AgentConfig
    from agent.device import Device, DeviceOpener
    from agent.services import Service

log = structlog.get_logger(__name__)

LIVE_SECTIONS: Final = frozenset({"log", "daemon", "events"})
"""Config sections a reload applies at once; changes elsewhere need a restart."""


@dataclass(frozen=True, slots=True)
class DaemonStatistics:
    """What the daemon is doing, for STATUS lines, tests and benchmarks."""

    ready: bool
    reloads: int
    services: dict[str, object]
    restarts: dict[str, int]


@final
class Daemon:
    """Runs the agent against one device until asked to stop."""

    def __init__(
        self,
        config: AgentConfig,
        opener: DeviceOpener,
        *,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self._opener = opener
        self._config_path = config_path
        self._notifier = notifier if notifier is not None else Notifier.from_environ()
        self._supervisor = Supervisor(config.daemon)
        self._shutdown = trio.Event()
        self._services: list[Service] = []
        self._pump: EventPump | None = None
        self._ready = False
        self._reloads = 0

    def statistics(self) -> DaemonStatistics:
        """Return readiness, reload count and each service's statistics."""
        return DaemonStatistics(
            ready=self._ready,
            reloads=self._reloads,
            services={service.name: service.statistics() for service in self._services},
            restarts=self._supervisor.restarts(),
        )

    def request_shutdown(self, reason: str) -> None:
        """Begin a clean shutdown (idempotent)."""
        if not self._shutdown.is_set():
            log.info("shutdown_requested", reason=reason)
            self._shutdown.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`request_shutdown`, SIGTERM or SIGINT; ready after READY=1."""
        async with open_device(self._opener) as device:
            await self._log_device(device)
            facility = FacilityReporter(device)
            await facility.report(FacilityStatus.INIT)
            try:
                await self._serve(device, facility, task_status)
            except Exception:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await facility.report(FacilityStatus.FAILED)
                raise
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await facility.report(FacilityStatus.TERMINATED)
        log.info("agent_stopped")

    async def _serve(
        self, device: Device, facility: FacilityReporter, task_status: trio.TaskStatus[None]
    ) -> None:
        pump = EventPump(device, queue_size=self.config.events.subscriber_queue)
        self._pump = pump
        self._services = [pump, SessionMonitor(device, pump)]
        async with trio.open_nursery() as nursery:
            await nursery.start(handle_signals, self)
            for service in self._services:
                await nursery.start(self._supervisor.supervise, service)
            self._ready = True
            await self._notifier.ready(self._status_text(device))
            await facility.report(FacilityStatus.ACTIVE)
            log.info("agent_ready", services=[s.name for s in self._services])
            task_status.started()
            interval = self._notifier.watchdog_interval()
            if interval is not None:
                nursery.start_soon(self._watchdog, device, interval)
            await self._shutdown.wait()
            await self._notifier.stopping()
            await facility.report(FacilityStatus.TERMINATING)
            nursery.cancel_scope.deadline = (
                trio.current_time() + self.config.daemon.shutdown_timeout_s
            )
            nursery.cancel_scope.cancel()

    def _status_text(self, device: Device) -> str:
        return f"{len(self._services)} services running on {device.description}"

    async def _log_device(self, device: Device) -> None:
        try:
            version = await device.request(GetHostVersion())
        except (VBoxStatusError, OSError) as exc:
            log.warning("host_version_unavailable", error=str(exc))
            return
        log.info(
            "device_opened",
            device=device.description,
            host_version=str(version),
            host_features=f"{version.features:#x}",
        )

    async def _watchdog(self, device: Device, interval: float) -> None:
        """Ping systemd's watchdog while a cheap request still goes through the device."""
        while True:
            with trio.move_on_after(interval) as probe:
                try:
                    await device.request(GetSessionId())
                except (VBoxStatusError, OSError) as exc:
                    log.error("watchdog_probe_failed", error=str(exc))
                else:
                    await self._notifier.watchdog()
            if probe.cancelled_caught:
                log.error("watchdog_probe_timed_out", timeout_s=interval)
            await trio.sleep(interval)

    async def reload(self) -> None:
        """Re-read the config file: apply what can change live, keep the old one if invalid."""
        await self._notifier.reloading()
        try:
            self._apply(self._read_config())
        finally:
            await self._notifier.ready(None)

    def _read_config(self) -> AgentConfig | None:
        if self._config_path is None:
            log.warning("config_reload_skipped", reason="the agent runs without a config file")
            return None
        try:
            return load_config(self._config_path)
        except ConfigError as exc:
            log.error("config_reload_rejected", path=str(self._config_path), errors=exc.problems)
            return None

    def _apply(self, new: AgentConfig | None) -> None:
        if new is None or new == self.config:
            return
        old, self.config = self.config, new
        self._reloads += 1
        changed = sorted(
            name for name in type(new).model_fields if getattr(old, name) != getattr(new, name)
        )
        if "log" in changed:
            configure_logging(new.log)
        if "daemon" in changed:
            self._supervisor.config = new.daemon
        if "events" in changed and self._pump is not None:
            self._pump.queue_size = new.events.subscriber_queue
            for service in self._services:
                if service is not self._pump:
                    self._supervisor.restart(service.name)
        needs_restart = [name for name in changed if name not in LIVE_SECTIONS]
        log.info("config_reloaded", changed=changed)
        if needs_restart:
            log.warning("config_change_needs_restart", sections=needs_restart)
