"""The agent runs on when its log stream refuses lines, and still drains at its stop.

Rules of this test module:
- A real ``SimulatedHost`` (passthrough: the agent owns the balloon's chunks) behind
  ``SimOpener``, and the whole daemon; its log goes to a stream that refuses writes while
  the test says so, as a full disk or a journal gone would.
- Pure trio: ``autojump_clock``; bounded by ``fail_after``; waits poll the host or the
  daemon on that clock (``balloon_support.until``).
- The ``reset`` fixture puts structlog's defaults and the root logger back.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Final

import pytest
import structlog
import trio

from agent.config import LogConfig, load_config
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimOpener, SimulatedHost
from agent.logconfig import LogOutputStatistics, configure_logging
from agent.services.registry import section_models
from tests.log_support import Refusing
from tests.services.balloon_support import host_chunks, until

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

LIMIT_S: Final = 120.0
PSI_TEXT: Final = (
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)


def os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.fixture(autouse=True, name="reset")
def fixture_reset() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


async def test_the_agent_runs_on_without_its_log_and_drains_at_its_stop(
    autojump_clock: trio.abc.Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under the log: the balloon follows the host all the same, the lines are
    counted as lost and stderr hears it once; once the stream takes lines again one line
    says how many were lost. The reader then goes for good (EPIPE), which stderr hears once
    too: the stop still drains, every chunk goes back to the host, and the daemon says why
    the stream fails."""
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    out = Refusing()
    configure_logging(LogConfig(format="json"), stream=out)
    psi = tmp_path / "memory.pressure"
    psi.write_text(PSI_TEXT)
    path = tmp_path / "agent.toml"
    path.write_text(f'[balloon]\npsi_path = "{psi}"\nmin_available_mb = 0\n')
    host = SimulatedHost(personality="passthrough")
    daemon = Daemon(load_config(path, section_models()), SimOpener(host), notifier=Notifier(None))
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                out.error = os_error(errno.ENOSPC)
                host.set_balloon_target(4)
                await until(lambda: host_chunks(host) == 4)
                refused = daemon.statistics().log
                assert refused.lost > 0
                assert refused.failing == "No space left on device"
                out.error = None
                host.set_balloon_target(2)
                await until(lambda: host_chunks(host) == 2)
                assert LogOutputStatistics(lost=refused.lost, failing=None) == (
                    daemon.statistics().log
                )
                out.error = os_error(errno.EPIPE)
                daemon.request_shutdown("test")
            outer.cancel_scope.cancel()
    assert host_chunks(host) == 0
    assert daemon.statistics().log.failing == "Broken pipe"
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.getvalue().splitlines()]
    lost = [line for line in lines if line["event"] == "log_lines_lost"]
    assert [(refused.lost, "No space left on device", "warning")] == [
        (line["lines"], line["error"], line["level"]) for line in lost
    ]
    assert "service" not in lost[0]
    assert "agent_ready" in [line["event"] for line in lines[: lines.index(lost[0])]]
    assert stderr.getvalue().splitlines() == [
        "vbox-agent: cannot write the output: No space left on device",
        "vbox-agent: cannot write the output: Broken pipe",
    ]
