"""Tests of the session monitor as a plug-in: built from its spec, run, reported, drained.

Rules of this test module:
- The host is a real ``SimulatedHost`` behind ``SimOpener`` (pure trio), so the virtual
  clock (``autojump_clock``) drives every wait; each test is bounded by ``trio.fail_after``.
- Synchronisation uses ``wait_all_tasks_blocked``, never sleeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog.testing
import trio
import trio.testing

from agent.protocol import RequestType
from agent.protocol.status import STATUS_CODES
from agent.services import EventPump, ServiceContext, SessionMonitorStatistics
from agent.services.registry import SERVICES
from agent.services.session_monitor import RETRY_S, SPEC, SessionMonitorSection

if TYPE_CHECKING:
    from agent.device import Device
    from agent.host import SimulatedHost


def _session_id(host: SimulatedHost) -> int:
    value = host.status()["session_id"]
    assert isinstance(value, int)
    return value


class TestSessionMonitor:
    def test_is_registered_with_its_section(self) -> None:
        """The registry lists it; its section is ``[session_monitor]`` with ``enable``."""
        assert SPEC in SERVICES
        assert (SPEC.name, SPEC.section) == ("session_monitor", SessionMonitorSection)
        assert SessionMonitorSection() == SessionMonitorSection(enable=True)

    async def test_follows_restores_and_reports_them(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """Each restore is read, counted, shown in ``status()`` and announced as a change."""
        pump = EventPump(device)
        changes: list[str] = []
        monitor = SPEC.build(
            ServiceContext(device, pump, lambda: changes.append(monitor.status())),
            SessionMonitorSection(),
        )
        assert monitor.status() == "vm session unknown"
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await nursery.start(monitor.run)
                first = _session_id(host)
                assert changes == [f"vm session {first:#x}, 0 restores"]
                host.restore()
                await trio.testing.wait_all_tasks_blocked()
                second = _session_id(host)
                assert second != first
                assert monitor.status() == f"vm session {second:#x}, 1 restores"
                assert changes[-1] == monitor.status()
                assert monitor.statistics() == SessionMonitorStatistics(second, 1)
                nursery.cancel_scope.cancel()

    async def test_a_failing_read_is_counted_shown_and_tried_again(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """A read the host refuses is no reason to restart (VBoxService ignores a failed
        GetSessionId): the monitor starts, the status says why the id is unknown, one line
        is logged, and the read is tried again every ``RETRY_S`` until it goes through; a
        restore whose read fails keeps the id last read and is not counted yet: the read that
        goes through counts both restores and logs them (``vm_restored``, from the id before
        them), not a plain read."""
        pump = EventPump(device)
        changes: list[str] = []
        monitor = SPEC.build(
            ServiceContext(device, pump, lambda: changes.append(monitor.status())),
            SessionMonitorSection(),
        )
        general_failure = STATUS_CODES["VERR_GENERAL_FAILURE"]
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                host.add_fault(RequestType.GET_SESSION_ID, general_failure, 3)
                await nursery.start(monitor.run)
                assert monitor.status() == (
                    "vm session unknown (read failing: VERR_GENERAL_FAILURE)"
                )
                await trio.sleep(RETRY_S * 2.5)
                assert monitor.statistics() == SessionMonitorStatistics(None, 0, 3)
                await trio.sleep(RETRY_S)
                first = _session_id(host)
                assert monitor.status() == f"vm session {first:#x}, 0 restores"
                host.add_fault(RequestType.GET_SESSION_ID, general_failure, 2)
                for _ in range(2):
                    host.restore()
                    await trio.testing.wait_all_tasks_blocked()
                    assert (
                        changes[-1]
                        == monitor.status()
                        == f"vm session {first:#x}, 0 restores (read failing: VERR_GENERAL_FAILURE)"
                    )
                await trio.sleep(RETRY_S * 1.5)
                assert monitor.status() == f"vm session {_session_id(host):#x}, 2 restores"
                assert monitor.statistics() == SessionMonitorStatistics(_session_id(host), 2, 5)
                nursery.cancel_scope.cancel()
        events = [line["event"] for line in logs if line["event"].startswith("vm_")]
        assert events == [
            "vm_session_unreadable",
            "vm_session_read_again",
            "vm_session_read",
            "vm_session_unreadable",
            "vm_session_read_again",
            "vm_restored",
        ]
        restored = next(line for line in logs if line["event"] == "vm_restored")
        assert restored["old_session_id"] == f"{first:#x}"
        assert restored["session_id"] == f"{_session_id(host):#x}"
        assert restored["restores"] == 2

    async def test_an_event_from_before_the_start_is_never_counted_when_its_read_fails(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """The event the host kept for a restore before the monitor's start arrives after
        its first read; the read it calls for fails, so nothing is counted until a read goes
        through: that one finds the id the start read, so there was no restore (no
        ``vm_restored``, and no count shown and taken back)."""
        pump = EventPump(device)
        changes: list[str] = []
        general_failure = STATUS_CODES["VERR_GENERAL_FAILURE"]

        def status_changed() -> None:
            if not changes:  # the start's read went through: fail the next one
                host.add_fault(RequestType.GET_SESSION_ID, general_failure)
            changes.append(monitor.status())

        monitor = SPEC.build(ServiceContext(device, pump, status_changed), SessionMonitorSection())
        host.restore()  # no filter admits RESTORED yet: the host keeps the event
        restored = _session_id(host)
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await nursery.start(monitor.run)
                await trio.sleep(RETRY_S * 1.5)
                nursery.cancel_scope.cancel()
        assert [
            f"vm session {restored:#x}, 0 restores",
            f"vm session {restored:#x}, 0 restores (read failing: VERR_GENERAL_FAILURE)",
            f"vm session {restored:#x}, 0 restores",
        ] == changes
        assert SessionMonitorStatistics(restored, 0, 1) == monitor.statistics()
        events = [line["event"] for line in logs if line["event"].startswith("vm_")]
        assert events == [
            "vm_session_read",
            "vm_session_unreadable",
            "vm_session_read_again",
            "vm_restore_seen_before",
        ]

    async def test_reconfigure_and_drain(
        self, autojump_clock: trio.abc.Clock, device: Device
    ) -> None:
        """A new section applies live (nothing to change); the drain holds nothing back."""
        monitor = SPEC.build(ServiceContext(device, EventPump(device)), SessionMonitorSection())
        assert monitor.reconfigure(SessionMonitorSection())
        with trio.fail_after(1):
            await monitor.drain()
        assert monitor.statistics() == SessionMonitorStatistics(None, 0)
