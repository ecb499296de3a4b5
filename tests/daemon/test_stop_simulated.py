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
from agent.protocol import Ioctl, RequestType
from agent.services.registry import section_models
from tests.sim_support import HookedOpener

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


async def test_a_stop_bounds_the_teardown_a_reload_began(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
) -> None:
    """A reload disables the balloon, so the event pump's wait ends with an interrupt that
    the driver holds; the stop comes 0.05 s later. The teardown begun before the stop is
    held to the stop's bound, not to the 2 s teardown budget it began with."""
    held = False

    async def before(code: int) -> None:
        if held and code == Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS:
            await trio.sleep_forever()  # the driver holds the interrupt

    path = tmp_path / "agent.toml"
    quick = "[daemon]\nshutdown_timeout_s = 0.2\n[balloon]\nmin_available_mb = 0\n"
    path.write_text(quick)
    daemon = Daemon(
        load_config(path, section_models()),
        HookedOpener(host, before=before),
        config_path=path,
        notifier=Notifier(None),
    )
    with trio.fail_after(4 * HELD_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            held = True
            path.write_text(quick.replace("[balloon]\n", "[balloon]\nenable = false\n"))
            await daemon.reload()
            await trio.sleep(0.05)
            began = trio.current_time()
            daemon.request_shutdown("SIGTERM")
        took = trio.current_time() - began
    assert took <= 0.2 + 1.0
