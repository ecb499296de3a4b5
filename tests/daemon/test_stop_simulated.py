"""The daemon's stop on the in-process simulated host ends in time whatever the host does.

Rules of this test module:
- A real ``SimulatedHost`` behind ``SimOpener`` (``run --simulate``'s transport); the host
  holds one kind of request (``set_delay``, as a scenario's ``delay`` step does).
- Pure trio: ``autojump_clock`` measures the stop exactly; bounded by ``fail_after``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import structlog.testing
import trio

from agent.config import load_config
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimOpener, SimulatedHost
from agent.protocol import RequestType
from agent.services.registry import section_models

if TYPE_CHECKING:
    from pathlib import Path

SHUTDOWN_TIMEOUT_S: Final = 1.0
EXIT_BOUND_S: Final = SHUTDOWN_TIMEOUT_S + 1.0
"""What the daemon promises: exit within ``shutdown_timeout_s + 1 s``."""
HELD_S: Final = 30.0
"""How long the host holds the facility reports (the reviewer's scenario)."""


async def test_stop_ends_in_time_when_the_host_holds_the_facility_reports(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
) -> None:
    """The host holds every facility report in the port write (uninterruptible): the stop
    abandons each at its bound, with a log line, and the run ends within the promise; the
    host still handles the held reports when their hold ends."""
    path = tmp_path / "agent.toml"
    path.write_text(f"[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n")
    daemon = Daemon(load_config(path, section_models()), SimOpener(host), notifier=Notifier(None))
    with trio.fail_after(4 * HELD_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            host.set_delay(RequestType.REPORT_GUEST_STATUS, HELD_S)
            began = trio.current_time()
            daemon.request_shutdown("SIGTERM")
        took = trio.current_time() - began
    assert took <= EXIT_BOUND_S
    abandoned = [entry for entry in logs if entry["event"] == "ioctl_abandoned"]
    assert len(abandoned) == 2  # facility Terminating and Terminated
