"""The agent runs on when its PSI file holds figures the kernel does not write.

Rules of this test module:
- A real ``SimulatedHost`` (passthrough: the agent owns the balloon's chunks) behind
  ``SimOpener``, and the whole daemon; the PSI file is a regular file the test writes (polled
  every ``psi_interval_s``).
- Pure trio: ``autojump_clock``; bounded by ``fail_after``; waits poll the host, the log or the
  daemon on that clock (``balloon_support.until``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import structlog.testing
import trio

from agent.config import load_config
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimOpener, SimulatedHost
from agent.services.registry import section_models
from tests.services.balloon_support import host_chunks, until

if TYPE_CHECKING:
    from pathlib import Path

LIMIT_S: Final = 120.0
FULL_LINE: Final = "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


async def test_a_psi_file_gone_bad_switches_pressure_off_not_the_agent(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """The PSI file's ``some`` line turns to ``avg10=.`` mid-run: one ``balloon_pressure_off``
    warning, and the balloon runs on, following the host, with no restart (it failed at every
    start, until the daemon gave up and exited, heartbeat and all, half a minute later)."""
    psi = tmp_path / "memory.pressure"
    psi.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n" + FULL_LINE)
    path = tmp_path / "agent.toml"
    path.write_text(f'[balloon]\npsi_path = "{psi}"\npsi_interval_s = 1.0\nmin_available_mb = 0\n')
    host = SimulatedHost(personality="passthrough")
    daemon = Daemon(load_config(path, section_models()), SimOpener(host), notifier=Notifier(None))
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                host.set_balloon_target(8)
                await until(lambda: host_chunks(host) == 8)
                psi.write_text("some avg10=. avg60=0.00 avg300=0.00 total=0\n" + FULL_LINE)
                await until(lambda: any(e["event"] == "balloon_pressure_off" for e in logs))
                host.set_balloon_target(16)
                await until(lambda: host_chunks(host) == 16)
                statistics = daemon.statistics()
                assert statistics.ready
                assert statistics.restarts.get("balloon", 0) == 0
                assert "failed" not in statistics.status
                daemon.request_shutdown("test")
            outer.cancel_scope.cancel()
    assert host_chunks(host) == 0
    [off] = [entry for entry in logs if entry["event"] == "balloon_pressure_off"]
    assert (off["log_level"], off["reason"]) == (
        "warning",
        f"{psi} has avg10=., not a share of time from 0.00 to 100.00",
    )
    assert [e for e in logs if e["log_level"] in {"error", "critical"}] == []
