"""Tests of the event pump against the in-process simulated host.

Rules of this test module:
- The host is a real ``SimulatedHost`` behind ``SimOpener`` (pure trio, no threads), so
  the virtual clock (``autojump_clock``, an argument of every test) drives every
  wait; each test is bounded by ``trio.fail_after`` on that clock.
- Synchronisation uses ``wait_all_tasks_blocked`` and trio Events, never sleeps for ordering
  (the idle tests sleep on the virtual clock to show that nothing wakes up meanwhile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest
import structlog.testing
import trio
import trio.testing

from agent.device import open_device
from agent.host import SimOpener
from agent.protocol import (
    Event,
    Ioctl,
    RequestType,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.status import VERR_GENERAL_FAILURE
from agent.services import EventPump, Subscription
from agent.services._lasting import RETRY_INITIAL_S
from agent.services.event_pump import WAIT_HELD_S

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.device import Device
    from agent.host import SimulatedHost
    from agent.host.transport import SimTransport
    from agent.protocol import Submission, UserBuffer

RESTORED = int(Event.RESTORED)
VRDP = int(Event.VRDP)
CPU_HOTPLUG = int(Event.CPU_HOTPLUG)


MAX_EMPTY_WAITS: Final = 2000
"""Empty answers :class:`EmptyWaits` gives before it fails the test (a spinning pump)."""


class EmptyWaits:
    """Opens sessions on ``host``; while ``broken``, each WAIT_FOR_EVENTS is answered at
    once with success and no events, as no driver does unasked (``waits`` counts them)."""

    description = "driver answering waits with no events"
    simulated = True

    def __init__(self, host: SimulatedHost) -> None:
        self._opener = SimOpener(host)
        self.broken = True
        self.waits = 0
        self.sessions = 0

    async def open_session(self) -> EmptyWaitSession:
        """A session whose waits go to :meth:`answer` first."""
        self.sessions += 1
        return EmptyWaitSession(await self._opener.open_session(), self)


class EmptyWaitSession:
    """One session of :class:`EmptyWaits`."""

    def __init__(self, transport: SimTransport, driver: EmptyWaits) -> None:
        self._transport = transport
        self._driver = driver

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        """The empty answer while broken, else the host's."""
        if code == Ioctl.WAIT_FOR_EVENTS and self._driver.broken:
            self._driver.waits += 1
            assert self._driver.waits < MAX_EMPTY_WAITS, "the pump spins"
            await trio.lowlevel.checkpoint()
            L.IoctlHeader.rc.set(buffer, 0)
            L.WaitForEventsIoctl.events_out.set(buffer, 0)
            return
        await self._transport.ioctl(code, buffer, user_buffers, submission=submission)

    async def aclose(self) -> None:
        """Close the host's session."""
        await self._transport.aclose()

    async def claim(self) -> bool:
        """The host's session's claim."""
        return await self._transport.claim()

    async def serve_claim(self) -> None:
        """The host's session's claim server."""
        await self._transport.serve_claim()


def _filter_mask(host: SimulatedHost) -> int:
    mask = host.status()["filter_mask"]
    assert isinstance(mask, int)
    return mask


class TestEventPump:
    """Fan-out, masks and back-pressure of :class:`EventPump`."""

    async def test_delivers_events_to_matching_subscribers(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """Each subscriber receives only the bits of its own mask."""
        pump = EventPump(device)
        with (
            trio.fail_after(60),
            pump.subscribe("restore", RESTORED) as restore,
            pump.subscribe("both", RESTORED | VRDP) as both,
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                host.raise_events(RESTORED | VRDP)
                assert await restore.receive() == RESTORED
                assert await both.receive() == RESTORED | VRDP
                nursery.cancel_scope.cancel()

    async def test_host_filter_is_the_union_of_subscriptions(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """The host is asked for exactly the subscribed events (plus the fixed ones)."""
        pump = EventPump(device)
        with trio.fail_after(60), pump.subscribe("restore", RESTORED):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await trio.testing.wait_all_tasks_blocked()
                assert RESTORED & _filter_mask(host)
                assert not VRDP & _filter_mask(host)
                with pump.subscribe("vrdp", VRDP) as vrdp:
                    await trio.testing.wait_all_tasks_blocked()
                    assert VRDP & _filter_mask(host)
                    host.raise_events(VRDP)
                    assert await vrdp.receive() == VRDP
                await trio.testing.wait_all_tasks_blocked()
                assert not VRDP & _filter_mask(host)
                assert pump.mask == RESTORED
                nursery.cancel_scope.cancel()

    async def test_slow_subscriber_gets_every_bit_coalesced(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """A flood for a subscriber that is busy loses no bit: they arrive OR-ed, counted;
        the pump counts each wait that brought events, and when the last did."""
        pump = EventPump(device)
        flood = (RESTORED, VRDP, CPU_HOTPLUG) * 40
        with (
            trio.fail_after(60),
            pump.subscribe("slow", RESTORED | VRDP | CPU_HOTPLUG) as slow,
            pump.subscribe("fast", RESTORED) as fast,
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await trio.sleep(5.0)  # the flood comes 5 s in
                for bits in flood:
                    host.raise_events(bits)
                    if bits == RESTORED:
                        assert await fast.receive() == RESTORED
                    await trio.testing.wait_all_tasks_blocked()
                assert await slow.receive() == RESTORED | VRDP | CPU_HOTPLUG
                with pytest.raises(trio.WouldBlock):
                    slow.receive_nowait()
                stats = {s.name: s for s in pump.statistics().subscribers}
                assert (stats["slow"].posted, stats["slow"].delivered) == (len(flood), 1)
                assert stats["slow"].coalesced == len(flood) - 1
                assert (stats["fast"].posted, stats["fast"].delivered) == (40, 40)
                assert stats["fast"].coalesced == 0
                totals = pump.statistics()
                assert (totals.events_received, totals.last_event_time) == (len(flood), 5.0)
                nursery.cancel_scope.cancel()

    async def test_bits_arriving_while_busy_reach_the_next_receive(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """A subscriber that works between receives sees, next time, all that came meanwhile."""
        pump = EventPump(device)
        received: list[int] = []
        busy = trio.Event()
        done_working = trio.Event()

        async def subscriber(events: Subscription) -> None:
            received.append(await events.receive())
            busy.set()
            await done_working.wait()  # "working": the pump goes on meanwhile
            received.append(await events.receive())

        with trio.fail_after(60), pump.subscribe("worker", RESTORED | VRDP) as events:
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                nursery.start_soon(subscriber, events)
                host.raise_events(RESTORED)
                await busy.wait()
                host.raise_events(VRDP)
                await trio.testing.wait_all_tasks_blocked()
                host.raise_events(RESTORED)
                await trio.testing.wait_all_tasks_blocked()
                done_working.set()
                await trio.testing.wait_all_tasks_blocked()
                assert received == [RESTORED, RESTORED | VRDP]
                nursery.cancel_scope.cancel()

    async def test_cancelled_receive_keeps_the_bits(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """A receive cancelled before it returns leaves the pending bits for the next one."""
        pump = EventPump(device)
        with trio.fail_after(60), pump.subscribe("restore", RESTORED) as events:
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                host.raise_events(RESTORED)
                await trio.testing.wait_all_tasks_blocked()
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await events.receive()
                assert events.receive_nowait() == RESTORED
                nursery.cancel_scope.cancel()

    async def test_concurrent_receivers_never_return_no_bits(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """Of two receivers woken by one post, one gets the bits and the other waits on for
        the next post (it returned 0, no bits at all)."""
        events = Subscription("twice", RESTORED | VRDP)
        received: list[int] = []

        async def receiver() -> None:
            received.append(await events.receive())

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                nursery.start_soon(receiver)
                await trio.testing.wait_all_tasks_blocked()
                events._post(RESTORED)
                await trio.testing.wait_all_tasks_blocked()
                assert received == [RESTORED]
                events._post(VRDP)
        assert received == [RESTORED, VRDP]

    async def test_events_raised_before_subscription_are_kept(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """An event pending at the host is delivered once somebody asks for it."""
        pump = EventPump(device)
        host.raise_events(CPU_HOTPLUG)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                with pump.subscribe("hotplug", CPU_HOTPLUG) as hotplug:
                    assert await hotplug.receive() == CPU_HOTPLUG
                nursery.cancel_scope.cancel()

    async def test_idle_pump_sleeps_in_one_wait(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """A silent host costs one blocked wait, however long it stays silent."""
        pump = EventPump(device)
        with trio.fail_after(7200), pump.subscribe("restore", RESTORED):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await trio.sleep(3600)
                assert pump.statistics().waits == 1
                assert pump.statistics().events_received == 0
                nursery.cancel_scope.cancel()

    async def test_no_subscribers_means_no_waiter(
        self, autojump_clock: trio.abc.Clock, device: Device
    ) -> None:
        """Without subscriptions the pump opens no session and never waits."""
        pump = EventPump(device)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                await trio.sleep(10)
                assert pump.statistics().waits == 0
                assert device.statistics().open_sessions == 1
                nursery.cancel_scope.cancel()

    async def test_a_leaving_agent_opens_no_new_waiter(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """Once the agent is leaving, a subscriber that leaves ends the waiter and none is
        opened for the subscribers left (runs being cancelled): the stop opened a session
        and a wait for them (``event_waiter_opened {"mask": "0x10"}`` during the drains)."""
        leaving = False
        pump = EventPump(device, leaving=lambda: leaving)
        with trio.fail_after(60), pump.subscribe("restore", RESTORED):
            async with trio.open_nursery() as nursery:
                with pump.subscribe("hotplug", CPU_HOTPLUG):
                    await nursery.start(pump.run)
                    await trio.testing.wait_all_tasks_blocked()
                    assert device.statistics().open_sessions == 2
                    leaving = True
                await trio.testing.wait_all_tasks_blocked()
                assert device.statistics().open_sessions == 1
                assert pump.statistics().waits == 1
                assert pump.mask == RESTORED
                nursery.cancel_scope.cancel()

    async def test_rejects_invalid_masks(
        self, autojump_clock: trio.abc.Clock, device: Device
    ) -> None:
        """Masks outside the valid event bits are refused at subscription."""
        pump = EventPump(device)
        with pytest.raises(ValueError, match="must be within"), pump.subscribe("bad", 0x800):
            pass


class TestFailures:
    """What the host or driver fails never ends the pump: said once, retried on a back-off."""

    async def test_a_refused_filter_is_retried_and_loses_no_event(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, device: Device
    ) -> None:
        """The host refuses the filter three times (the pump re-raised it: six failures
        within a minute ended the agent, exit 70): the pump is ready all the same, says so
        once, in its status too, and opens the waiter again 1, 2 and 4 s later; a restore
        the host raised meanwhile reaches the subscriber then."""
        changes: list[str | None] = []
        pump = EventPump(device, status_changed=lambda: changes.append(pump.failing()))
        host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_GENERAL_FAILURE, 3)
        with (
            trio.fail_after(60),
            structlog.testing.capture_logs() as logs,
            pump.subscribe("restore", RESTORED) as restore,
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(pump.run)
                began = trio.current_time()
                refused = pump.failing()
                host.raise_events(RESTORED)
                assert await restore.receive() == RESTORED
                recovered_after = trio.current_time() - began
                assert pump.failing() is None
                nursery.cancel_scope.cancel()
        assert refused is not None
        assert refused.startswith("event filter refused (VERR_")
        assert recovered_after == pytest.approx(7.0)
        assert changes == [refused, None]
        assert pump.statistics().failures == 3
        [said] = [entry for entry in logs if entry["event"] == "event_filter_refused"]
        assert (said["failures"], said["log_level"]) == (1, "warning")
        [again] = [entry for entry in logs if entry["event"] == "event_filter_accepted_again"]
        assert again["failed_in_a_row"] == 3

    async def test_waits_answered_with_no_events_are_bounded(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A driver answering every wait at once with success and no events (the pump took
        each for its own interrupt and opened a new session: 9,000 sessions and
        ``event_waiter_opened`` lines in 3 s): the pump says so once and opens a new waiter
        on a back-off, about 65 in an hour; once the driver waits again, the next event
        reaches the subscriber and one line says so."""
        driver = EmptyWaits(host)
        with (
            trio.fail_after(7200),
            structlog.testing.capture_logs() as logs,
        ):
            async with open_device(driver) as device, trio.open_nursery() as nursery:
                pump = EventPump(device)
                with pump.subscribe("restore", RESTORED) as restore:
                    await nursery.start(pump.run)
                    await trio.sleep(3600)
                    assert pump.failing() == "event waits failing (malformed reply)"
                    sessions = driver.sessions
                    driver.broken = False
                    host.raise_events(RESTORED)
                    assert await restore.receive() == RESTORED
                    assert pump.failing() is None
                nursery.cancel_scope.cancel()
        assert 60 <= sessions - 1 <= 70  # the device's main session is one
        assert driver.waits == 4 * (sessions - 1)
        opened = [entry for entry in logs if entry["event"] == "event_waiter_opened"]
        assert [entry["log_level"] for entry in opened].count("info") == 1
        [failed] = [entry for entry in logs if entry["event"] == "event_wait_failed"]
        assert "no interrupt was asked for" in failed["malformed_reply"]
        assert [entry["event"] for entry in logs].count("event_waits_answered_again") == 1

    async def test_a_wait_held_after_failed_waits_ends_the_failure(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """Waits fail (answered with no events), then the driver waits again and the host
        stays silent: the waiter opened after the back-off is held, and ``WAIT_HELD_S`` later
        the failure is over, with one line saying so; no further session is opened. (It read
        ``event waits failing (malformed reply), retrying`` until the host raised an event:
        hours on a quiet host.)"""
        driver = EmptyWaits(host)
        changes: list[tuple[float, str | None]] = []
        with trio.fail_after(7200), structlog.testing.capture_logs() as logs:
            async with open_device(driver) as device, trio.open_nursery() as nursery:
                pump = EventPump(
                    device,
                    status_changed=lambda: changes.append((trio.current_time(), pump.failing())),
                )
                with pump.subscribe("restore", RESTORED):
                    await nursery.start(pump.run)
                    await trio.testing.wait_all_tasks_blocked()  # in the back-off
                    driver.broken = False
                    sessions = driver.sessions
                    await trio.sleep(3600)
                    assert driver.sessions == sessions + 1
                nursery.cancel_scope.cancel()
        (failed_at, failing), (ended_at, ended) = changes
        assert (failing, ended) == ("event waits failing (malformed reply)", None)
        assert ended_at - failed_at == pytest.approx(RETRY_INITIAL_S + WAIT_HELD_S)
        [answered] = [entry for entry in logs if entry["event"] == "event_waits_answered_again"]
        assert answered["failed_in_a_row"] == 1
