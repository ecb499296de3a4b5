"""A session the character device cannot open for a passing shortage is a service failure,
not a lost device.

Rules of this test module:
- The real ``CharDevOpener``/``CharDevTransport`` run, worker threads and all; only the
  system calls are injected (``tests.device.syscalls.Kernel``), with a running
  ``SimulatedHost`` (passthrough: the agent owns the heartbeat) as the driver behind them.
- Real clock (threads); every test is bounded by ``fail_after`` and waits on events.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Final

import structlog.testing
import trio

from agent.config import load_config
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimulatedHost
from agent.services.registry import section_models
from tests.device.syscalls import Kernel

if TYPE_CHECKING:
    from pathlib import Path

BOUND: Final = 30.0
DAEMON: Final = "[daemon]\nrestart_backoff_initial_s = 0.05\n"
WITHOUT_NETWORK: Final = "".join(
    f"[{name}]\nenable = false\n"
    for name in ("statistics", "properties", "users", "timesync", "cpuhotplug", "balloon")
)
"""Only the heartbeat and the session monitor run; the network service joins on reload."""


class OutOfDescriptors(Kernel[SimulatedHost]):
    """``open(2)`` fails once with EMFILE after :meth:`run_out` (RLIMIT_NOFILE reached);
    ``reopened`` is set once an open succeeded after that."""

    def __init__(self, host: SimulatedHost) -> None:
        super().__init__(host)
        self._full = False
        self._refused = False
        self.reopened = trio.Event()

    def run_out(self) -> None:
        """Make the next open fail with EMFILE."""
        self._full = True

    def open(self, path: str, flags: int) -> int:
        """``open(2)``: EMFILE once after :meth:`run_out`."""
        if self._full:
            self._full = False
            self._refused = True
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        fd = super().open(path, flags)
        if self._refused:
            self.reopened.set()
        return fd


async def test_emfile_restarts_the_service_and_the_stop_still_drains(tmp_path: Path) -> None:
    """EMFILE on the session a reload's new service opens: that service fails and is
    restarted with back-off; the agent does not end as if the device were gone, and its
    stop still switches the heartbeat off."""
    host = SimulatedHost(personality="passthrough")
    path = tmp_path / "agent.toml"
    path.write_text(DAEMON + WITHOUT_NETWORK + "[network]\nenable = false\n")
    async with trio.open_nursery() as outer:
        await outer.start(host.run)
        kernel = OutOfDescriptors(host)
        daemon = Daemon(
            load_config(path, section_models()),
            kernel.opener(),
            config_path=path,
            notifier=Notifier(None),
        )
        with trio.fail_after(BOUND), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                heartbeat = host.status()["heartbeat"]
                assert isinstance(heartbeat, dict)
                assert heartbeat["enabled"]
                path.write_text(DAEMON + WITHOUT_NETWORK)  # the network service opens a session
                kernel.run_out()
                await daemon.reload()
                await kernel.reopened.wait()
                assert daemon.statistics().restarts.get("network") == 1
                daemon.request_shutdown("SIGTERM")
        heartbeat = host.status()["heartbeat"]
        outer.cancel_scope.cancel()
    assert isinstance(heartbeat, dict)
    assert not heartbeat["enabled"]
    [failed] = [entry for entry in logs if entry["event"] == "service_failed"]
    assert failed["service"] == "network"
    assert "EMFILE" in failed["error"]
