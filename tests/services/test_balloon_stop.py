"""What a stop of the balloon leaves behind: the driver's own balloon (one line, whose level
says whether anybody follows it on), and chunks whose handover's outcome is unknown.

Virtual time (``autojump_clock``) drives every wait; each test is bounded by
``trio.fail_after`` on that clock. Waits for the host's or the daemon's state poll it on
that clock, at most ``MAX_POLLS`` times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest
import structlog.testing
import trio

from agent.config import load_config
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimOpener, SimulatedHost
from agent.services.registry import section_models

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

LIMIT_S: Final = 120.0
POLL_S: Final = 0.01
MAX_POLLS: Final = 10_000
PSI_TEXT: Final = (
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)


async def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` on the (virtual) clock, at most ``MAX_POLLS`` times."""
    for _ in range(MAX_POLLS):
        if condition():
            return
        await trio.sleep(POLL_S)
    msg = f"condition not met within {MAX_POLLS * POLL_S:g} s"
    raise AssertionError(msg)


def _host_chunks(host: SimulatedHost) -> int:
    balloon = host.status()["balloon"]
    assert isinstance(balloon, dict)
    chunks = balloon["chunks"]
    assert isinstance(chunks, int)
    return chunks


class TestLeftToTheDriverByTheDaemon:
    """The daemon tells the balloon's drain whether the whole agent stops."""

    @pytest.mark.parametrize(
        ("kind", "mode", "then"),
        [("mainline", "kernel", "next start"), ("oracle", "triggered", "closes the device")],
    )
    async def test_a_reload_that_disables_the_balloon_warns_a_stop_of_the_agent_does_not(
        self, autojump_clock: trio.abc.Clock, tmp_path: Path, kind: str, mode: str, then: str
    ) -> None:
        """The driver holds a 32 MB balloon. A reload that disables the balloon service
        leaves it with nobody following the host while the agent runs on: a warning. Enabled
        again, the service takes it on; the agent's stop then leaves it to the driver as
        every ordinary stop does (Oracle's deflates it at the close, the in-tree kernel's
        waits for the next start): an info line."""
        psi = tmp_path / "memory.pressure"
        psi.write_text(PSI_TEXT)
        enabled = f'[balloon]\npsi_path = "{psi}"\nmin_available_mb = 0\n'
        path = tmp_path / "agent.toml"
        path.write_text(enabled)
        host = SimulatedHost(personality=kind)
        daemon = Daemon(
            load_config(path, section_models()),
            SimOpener(host),
            config_path=path,
            notifier=Notifier(None),
        )

        def balloon_mode() -> str | None:
            statistics = daemon.statistics().services.get("balloon")
            return getattr(statistics, "mode", None)

        with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as outer:
                await outer.start(host.run)
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    host.set_balloon_target(32)
                    await _until(lambda: _host_chunks(host) == 32)
                    path.write_text(enabled.replace("[balloon]\n", "[balloon]\nenable = false\n"))
                    await daemon.reload()
                    await _until(lambda: "balloon" not in daemon.statistics().services)
                    path.write_text(enabled)
                    await daemon.reload()
                    await _until(lambda: balloon_mode() == mode)
                    daemon.request_shutdown("test")
                outer.cancel_scope.cancel()
        left = [e for e in logs if e["event"] == "balloon_left_to_driver"]
        assert [(e["log_level"], e["mode"]) for e in left] == [("warning", mode), ("info", mode)]
        assert "runs again" in left[0]["until"]
        assert then in left[1]["until"]
