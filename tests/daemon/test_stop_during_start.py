"""A stop while a service starts: what the start did is undone within the drain time.

Rules of this test module:
- The host is an in-process ``SimulatedHost`` with the ``passthrough`` driver (the agent owns
  the heartbeat), behind :class:`HoldingOpener`: a ``SimOpener`` whose sessions hold back
  the answer to the first ioctl after which a condition on the host holds. The host has
  acted, the agent has not heard back: the window a stop may hit during a start.
- sd_notify is off, so the virtual clock (``autojump_clock``) drives every wait; each test
  is bounded by ``trio.fail_after`` on that clock. Synchronisation uses the opener's event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest
import trio

from agent.config import AgentConfig, DaemonConfig
from agent.daemon import Daemon
from agent.daemon.daemon import CLOSE_S, FINAL_PHASE_S
from agent.daemon.notify import Notifier
from agent.host import SimOpener, SimulatedHost
from agent.protocol import Facility, FacilityStatus
from agent.services.network import COUNT_PROPERTY

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    from agent.host.transport import SimTransport
    from agent.protocol import UserBuffer

LIMIT_S: Final = 120.0
SHUTDOWN_TIMEOUT_S: Final = 2.0


class HoldingOpener:
    """Sessions on ``host`` that never deliver the answer to the first ioctl after which
    ``condition(host)`` holds (the ioctl waits until cancelled); ``holding`` is then set."""

    def __init__(self, host: SimulatedHost, condition: Callable[[SimulatedHost], bool]) -> None:
        self._host = host
        self._opener = SimOpener(host)
        self._condition = condition
        self.holding = trio.Event()

    @property
    def description(self) -> str:
        """The wrapped opener's."""
        return self._opener.description

    @property
    def simulated(self) -> bool:
        """The wrapped opener's."""
        return self._opener.simulated

    async def open_session(self) -> HoldingSession:
        """Open a session on the host whose answers this opener may hold."""
        return HoldingSession(await self._opener.open_session(), self)

    async def after_ioctl(self) -> None:
        """Hold this ioctl's answer for ever if it is the first to meet the condition."""
        if not self.holding.is_set() and self._condition(self._host):
            self.holding.set()
            await trio.sleep_forever()


class HoldingSession:
    """One session of :class:`HoldingOpener`."""

    def __init__(self, transport: SimTransport, opener: HoldingOpener) -> None:
        self._transport = transport
        self._opener = opener

    async def ioctl(
        self, code: int, buffer: bytearray, user_buffers: Sequence[UserBuffer] = ()
    ) -> None:
        """The host's ioctl, then maybe the hold."""
        await self._transport.ioctl(code, buffer, user_buffers)
        await self._opener.after_ioctl()

    async def aclose(self) -> None:
        """Close the host's session."""
        await self._transport.aclose()


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
        opener = HoldingOpener(host, _heartbeat_on)
        config = AgentConfig(daemon=DaemonConfig(shutdown_timeout_s=SHUTDOWN_TIMEOUT_S))
        daemon = Daemon(config, opener, notifier=Notifier(None))
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await opener.holding.wait()
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
        opener = HoldingOpener(host, _net_count_published)
        daemon = Daemon(AgentConfig(), opener, notifier=Notifier(None))
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.run)
                await opener.holding.wait()
                daemon.request_shutdown("test")
        assert host.prop_get(COUNT_PROPERTY) is None
        assert _facility(host) == FacilityStatus.TERMINATED
