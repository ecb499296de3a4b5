"""The same service code against both driver personalities.

Rules of this test module:
- Every test runs once per personality: ``mainline`` (errnos, sticky interrupt) and
  ``oracle`` (statuses in ``hdr.rc``, one-shot interrupt), a real ``SimulatedHost`` behind
  ``SimOpener`` (the shared ``host`` fixture).
- The virtual clock (``autojump_clock``) drives every wait; each test is bounded by
  ``trio.fail_after`` on that clock; ordering uses ``wait_all_tasks_blocked``; an hour of
  virtual silence shows the pump's wait never wakes on a timer.
"""

from __future__ import annotations

from typing import Final

import trio
import trio.testing

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import Event
from agent.services import EventPump, ServiceContext, SessionMonitor

LIMIT_S: Final = 60
SILENCE_S: Final = 3600
"""An hour of virtual silence: a pump that polled on a timeout would wait again in it."""
VRDP: Final = int(Event.VRDP)
CPU_HOTPLUG: Final = int(Event.CPU_HOTPLUG)


async def test_pump_and_session_monitor(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """Restores reach the monitor, mask changes reopen the waiter, nothing spins or is lost."""
    with trio.fail_after(LIMIT_S + SILENCE_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            pump = EventPump(device)
            monitor = SessionMonitor(ServiceContext(device, pump))
            await nursery.start(pump.run)
            await nursery.start(monitor.run)
            host.restore()
            await trio.testing.wait_all_tasks_blocked()
            assert monitor.statistics().restores == 1
            assert monitor.statistics().session_id == host.status()["session_id"]
            with pump.subscribe("vrdp", VRDP) as events:
                await trio.testing.wait_all_tasks_blocked()
                host.raise_events(VRDP)
                assert await events.receive() == VRDP
                with pump.subscribe("hotplug", CPU_HOTPLUG) as hotplug:
                    await trio.testing.wait_all_tasks_blocked()
                    host.raise_events(CPU_HOTPLUG | VRDP)
                    assert await hotplug.receive() == CPU_HOTPLUG
                    assert await events.receive() == VRDP
                host.restore()
                await trio.testing.wait_all_tasks_blocked()
            assert monitor.statistics().restores == 2
            await trio.testing.wait_all_tasks_blocked()
            waits = pump.statistics().waits
            await trio.sleep(SILENCE_S)  # a silent host: the pump's wait must not wake
            assert pump.statistics().waits == waits
            assert device.statistics().open_sessions == 2
            nursery.cancel_scope.cancel()
        assert device.statistics().open_sessions == 0
