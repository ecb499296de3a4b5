"""The session monitor counts each restore once, and only at a read of the id that goes through.

The host keeps a RESTORED no session's filter admits and hands it to the first that does, so
a run's first event may be for a restore its first read already saw; later events are
restores all, even one whose new id the read before found already; a restore while no run
was subscribed (a restart's back-off) shows as another id at the next run's first read.

Rules of this test module:
- The host is a simulated one behind ``SimOpener`` or ``HookedOpener`` (pure trio), once per
  built-in driver, so the virtual clock (``autojump_clock``) drives every wait; each test
  is bounded by ``trio.fail_after`` and synchronises with ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Final

import pytest
import structlog.testing
import trio
import trio.testing

from agent.device import open_device
from agent.host import PERSONALITIES, SimulatedHost
from agent.protocol import Event, RequestType
from agent.services import EventPump, ServiceContext, SessionMonitorStatistics
from agent.services.session_monitor import SessionMonitor
from tests.sim_support import HookedOpener

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from structlog.typing import EventDict

    from agent.device import Device

LIMIT_S: Final = 60.0
SETTLING: Final = frozenset({"vm_session_read", "vm_restored", "vm_restore_seen_before"})
"""The lines a read that goes through logs, one each."""


@pytest.fixture(name="host", params=tuple(PERSONALITIES))
async def _host(request: pytest.FixtureRequest) -> AsyncIterator[SimulatedHost]:
    """A running simulated host, once with each built-in driver."""
    host = SimulatedHost(personality=request.param)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


def _session_id(host: SimulatedHost) -> int:
    value = host.status()["session_id"]
    assert isinstance(value, int)
    return value


def _settled(logs: list[EventDict]) -> list[tuple[str, str | None, str, int | None]]:
    return [
        (line["event"], line.get("old_session_id"), line["session_id"], line.get("restores"))
        for line in logs
        if line["event"] in SETTLING
    ]


class _Monitor:
    """A monitor on its own pump, whose status changes are recorded."""

    def __init__(self, device: Device) -> None:
        self.pump = EventPump(device)
        self.changes: list[str] = []
        self.monitor = SessionMonitor(
            ServiceContext(device, self.pump, lambda: self.changes.append(self.monitor.status()))
        )


async def test_a_restore_the_read_before_found_already_is_counted(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """A second restore reaches the host before the read the first's event called for: that
    read finds the second's id, and the second's event, which comes next, is a restore all
    the same (two restores, two lines, the second from an id no read saw)."""
    counts = host.vmmdev.request_counts
    armed: list[bool] = []

    async def before(code: int) -> None:
        del code
        if armed and counts[RequestType.GET_SESSION_ID] == 1:
            armed.clear()
            host.restore()  # restore 2, before the host answers restore 1's read

    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(HookedOpener(host, before=before)) as device:
            subject = _Monitor(device)
            async with trio.open_nursery() as nursery:
                await nursery.start(subject.pump.run)
                await nursery.start(subject.monitor.run)
                first = _session_id(host)
                await trio.testing.wait_all_tasks_blocked()
                armed.append(True)
                host.restore()  # restore 1
                await trio.testing.wait_all_tasks_blocked()
                statistics = subject.monitor.statistics()
                nursery.cancel_scope.cancel()
    second = _session_id(host)
    assert counts[RequestType.GET_SESSION_ID] == 3
    assert statistics == SessionMonitorStatistics(second, 2)
    assert subject.changes == [
        f"vm session {first:#x}, 0 restores",
        f"vm session {second:#x}, 1 restores",
        f"vm session {second:#x}, 2 restores",
    ]
    assert _settled(logs) == [
        ("vm_session_read", None, f"{first:#x}", None),
        ("vm_restored", f"{first:#x}", f"{second:#x}", 1),
        ("vm_restored", "unknown", f"{second:#x}", 2),
    ]


async def run_in(
    monitor: SessionMonitor,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``monitor`` until ``scope`` is cancelled (a run that ends, as a failure ends it)."""
    with scope:
        await monitor.run(task_status=task_status)


@pytest.mark.parametrize("other_subscriber", [True, False], ids=["other", "sole"])
async def test_a_restore_during_a_restart_back_off_is_counted_by_the_next_run(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device, other_subscriber: bool
) -> None:
    """The run ends (the supervisor backs off) and the VM is restored before the same
    monitor runs again: the next run's first read finds another id than the last read, one
    restore. Its event reached another subscriber alone, or, with none, the host kept it
    for the next run, which takes it for the restore its first read saw."""
    subject = _Monitor(device)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(subject.pump.run)
            with ExitStack() as stack:
                if other_subscriber:
                    stack.enter_context(subject.pump.subscribe("other", Event.RESTORED))
                first_run = trio.CancelScope()
                await nursery.start(run_in, subject.monitor, first_run)
                first = _session_id(host)
                first_run.cancel()  # the run ended: the supervisor backs off
                await trio.testing.wait_all_tasks_blocked()
                host.restore()  # during the back-off
                await trio.testing.wait_all_tasks_blocked()
                await nursery.start(subject.monitor.run)  # the same object runs again
                await trio.testing.wait_all_tasks_blocked()
                statistics = subject.monitor.statistics()
            nursery.cancel_scope.cancel()
    second = _session_id(host)
    assert statistics == SessionMonitorStatistics(second, 1)
    assert subject.changes == [
        f"vm session {first:#x}, 0 restores",
        f"vm session {second:#x}, 1 restores",
    ]
    restored = ("vm_restored", f"{first:#x}", f"{second:#x}", 1)
    kept = [] if other_subscriber else [("vm_restore_seen_before", None, f"{second:#x}", None)]
    assert _settled(logs) == [("vm_session_read", None, f"{first:#x}", None), restored, *kept]


async def test_no_count_is_shown_before_a_read_tells(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """The event the host kept for a restore before the start calls for a read; while the
    host holds that read, the status and statistics (what the daemon may publish meanwhile)
    show no restore, and the read, finding the start's id, changes nothing."""
    counts = host.vmmdev.request_counts
    in_flight = trio.Event()
    release = trio.Event()

    async def after(code: int) -> None:
        del code
        if counts[RequestType.GET_SESSION_ID] == 2 and not release.is_set():
            in_flight.set()
            await release.wait()

    host.restore()  # no filter admits RESTORED yet: the host keeps the event
    restored = _session_id(host)
    shown = f"vm session {restored:#x}, 0 restores"
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(HookedOpener(host, after=after)) as device:
            subject = _Monitor(device)
            async with trio.open_nursery() as nursery:
                await nursery.start(subject.pump.run)
                await nursery.start(subject.monitor.run)
                await in_flight.wait()
                during = (subject.monitor.status(), subject.monitor.statistics())
                release.set()
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
    assert during == (shown, SessionMonitorStatistics(restored, 0))
    assert subject.changes == [shown]
    assert _settled(logs) == [
        ("vm_session_read", None, f"{restored:#x}", None),
        ("vm_restore_seen_before", None, f"{restored:#x}", None),
    ]
