"""The daemon's stop on the character-device transport ends in time whatever the host does.

Rules of this test module:
- The real ``CharDevOpener``/``CharDevTransport`` run, worker threads and all; only the
  system calls are injected (``tests.device.syscalls.Kernel``), with a running
  ``SimulatedHost`` as the driver behind them.
- ``HeldClose`` holds every ``close(2)`` as a driver that waits for the host to disconnect the
  session's HGCM clients would; the host holds one kind of request (``set_delay``).
- Real clock (threads); every test is bounded by ``fail_after`` and measures from the stop
  request to the end of ``Daemon.run``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Final

import structlog.testing
import trio

from agent.config import load_config
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimulatedHost
from agent.protocol import RequestType
from agent.services.registry import section_models
from tests.device.syscalls import Kernel

if TYPE_CHECKING:
    from pathlib import Path

SHUTDOWN_TIMEOUT_S: Final = 1.0
EXIT_BOUND_S: Final = SHUTDOWN_TIMEOUT_S + 1.0
"""What the daemon promises: exit within ``shutdown_timeout_s + 1 s``."""
HELD_S: Final = EXIT_BOUND_S + 0.5
"""How long the host holds the delayed requests: beyond the bound. They reach the host after
the stop began, so any time beyond it holds them past a stop that keeps the bound. The
session of an abandoned request is closed only once it returns, so this is also how long a
test waits."""
BOUND: Final = 30.0
ONLY_THE_HEARTBEAT: Final = "".join(
    f"[{name}]\nenable = false\n"
    for name in (
        "statistics",
        "properties",
        "network",
        "users",
        "timesync",
        "cpuhotplug",
        "balloon",
    )
)


class HeldClose(Kernel[SimulatedHost]):
    """``close(2)`` waits for ``release`` before the driver releases the session;
    ``all_closed`` is set once every session opened was released."""

    def __init__(self, host: SimulatedHost) -> None:
        super().__init__(host)
        self.release = threading.Event()
        self.all_closed = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def close(self, fd: int) -> None:
        self.release.wait()
        super().close(fd)
        if not self.sessions:
            trio.from_thread.run_sync(self.all_closed.set, trio_token=self._token)


async def _stop_took(host: SimulatedHost, config_text: str, tmp_path: Path, held: int) -> float:
    """Run the daemon over ``HeldClose``, hold requests of type ``held``, stop; return how
    long the stop took. Every close is released and waited for before returning (a session
    with abandoned requests closes only once they return, after ``HELD_S``)."""
    path = tmp_path / "agent.toml"
    path.write_text(f"[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n{config_text}")
    kernel = HeldClose(host)
    daemon = Daemon(load_config(path, section_models()), kernel.opener(), notifier=Notifier(None))
    try:
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                host.set_delay(held, HELD_S)
                began = trio.current_time()
                daemon.request_shutdown("SIGTERM")
            took = trio.current_time() - began
            kernel.release.set()
            await kernel.all_closed.wait()
    finally:
        kernel.release.set()
    return took


async def test_stop_ends_in_time_when_reports_and_closes_hang(
    host: SimulatedHost, tmp_path: Path
) -> None:
    """The host never answers the facility reports (uninterruptible VMMDev requests) and the
    driver holds every close: each is abandoned at its phase's end, with a log line, or
    deferred while abandoned requests are in the driver."""
    with structlog.testing.capture_logs() as logs:
        took = await _stop_took(
            host,
            ONLY_THE_HEARTBEAT + "[heartbeat]\nenable = false\n",
            tmp_path,
            int(RequestType.REPORT_GUEST_STATUS),
        )
    assert took <= EXIT_BOUND_S
    events = [entry["event"] for entry in logs]
    assert "ioctl_abandoned" in events
    assert "close_abandoned" in events
    assert "close_deferred" in events


async def test_stop_ends_in_time_when_a_drain_and_closes_hang(tmp_path: Path) -> None:
    """The agent owns the heartbeat (passthrough) and the host holds its switch-off, so the
    drain runs until the drain deadline; the driver holds every close too."""
    host = SimulatedHost(personality="passthrough")
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        with structlog.testing.capture_logs() as logs:
            took = await _stop_took(
                host, ONLY_THE_HEARTBEAT, tmp_path, int(RequestType.HEARTBEAT_CONFIGURE)
            )
        nursery.cancel_scope.cancel()
    assert took <= EXIT_BOUND_S
    drains = [entry for entry in logs if entry["event"] == "service_drain_abandoned"]
    assert "heartbeat" in [entry.get("service") for entry in drains]
