"""A stop while a service starts: what the start did is undone within the drain time.

Rules of this test module:
- The host is an in-process ``SimulatedHost`` with the ``passthrough`` driver (the agent owns
  the heartbeat), opened through a :class:`Hold`: sessions that hold back the answer to
  the first ioctl after which a condition on the host holds. The host has
  acted, the agent has not heard back: the window a stop may hit during a start.
- sd_notify is off, so the virtual clock (``autojump_clock``) drives every wait; each test
  is bounded by ``trio.fail_after`` on that clock. Synchronisation uses the hold's event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest
import trio

from agent.config import AgentConfig, DaemonConfig
from agent.daemon import Daemon
from agent.daemon.daemon import CLOSE_S, FINAL_PHASE_S
from agent.daemon.notify import Notifier
from agent.host import SimulatedHost
from agent.protocol import Facility, FacilityStatus
from agent.services.network import COUNT_PROPERTY
from tests.sim_support import HookedOpener

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

LIMIT_S: Final = 120.0
SHUTDOWN_TIMEOUT_S: Final = 2.0


class Hold:
    """Holds back, until cancelled, the answer to the first ioctl after which
    ``condition(host)`` holds; ``holding`` is then set. ``opener`` opens sessions on
    ``host`` that do so."""

    def __init__(self, host: SimulatedHost, condition: Callable[[SimulatedHost], bool]) -> None:
        self._host = host
        self._condition = condition
        self.holding = trio.Event()
        self.opener = HookedOpener(host, after=self._after)

    async def _after(self, _code: int) -> None:
        if not self.holding.is_set() and self._condition(self._host):
            self.holding.set()
            await trio.sleep_forever()


def _heartbeat_on(host: SimulatedHost) -> bool:
    state = host.status()["heartbeat"]
    assert isinstance(state, dict)
    return state["enabled"] is True


def _net_count_published(host: SimulatedHost) -> bool:
    return host.prop_get(COUNT_PROPERTY) is not None


def _facility(host: SimulatedHost) -> int:
    facilities = host.status()["facilities"]
    assert isinstance(facilities, dict)
    status = facilities[str(int(Facility.VBOX_SERVICE))]["status"]
    assert isinstance(status, int)
    return status


@pytest.fixture(name="host")
async def _passthrough_host() -> AsyncIterator[SimulatedHost]:
    host = SimulatedHost(personality="passthrough")
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


class TestStopDuringStart:
    """SIGTERM or a stop request before a service reported started."""

    async def test_heartbeat_switched_on_by_a_cancelled_start_is_switched_off(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """The host switched its check on but the answer never came: the stop cancels the
        heartbeat's start, its drain switches the check off, facility Terminated follows,
        and the run ends within the promised bound."""
        hold = Hold(host, _heartbeat_on)
        config = AgentConfig(daemon=DaemonConfig(shutdown_timeout_s=SHUTDOWN_TIMEOUT_S))
        daemon = Daemon(config, hold.opener, notifier=Notifier(None))
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await hold.holding.wait()
                assert _heartbeat_on(host)
                began = trio.current_time()
                daemon.request_shutdown("test")
            took = trio.current_time() - began
        assert not daemon.statistics().ready
        assert not _heartbeat_on(host)
        assert _facility(host) == FacilityStatus.TERMINATED
        assert took <= SHUTDOWN_TIMEOUT_S + FINAL_PHASE_S + CLOSE_S

    async def test_properties_written_by_a_cancelled_first_pass_are_deleted(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """The network service's first pass (its start) wrote Net/Count but never heard
        back: the stop cancels the start and its drain deletes what it owns, as at any stop."""
        hold = Hold(host, _net_count_published)
        daemon = Daemon(AgentConfig(), hold.opener, notifier=Notifier(None))
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await hold.holding.wait()
                daemon.request_shutdown("test")
        assert host.prop_get(COUNT_PROPERTY) is None
        assert _facility(host) == FacilityStatus.TERMINATED
