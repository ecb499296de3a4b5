"""Both drivers' error conventions end in the same typed errors.

Rules of this test module:
- Each scenario runs against a ``SimulatedHost`` of each personality behind ``SimOpener``:
  mainline fails with errnos, Oracle's driver with statuses in ``hdr.rc``.
- Where the simulator cannot produce a case (a stray signal, an interrupt that overtakes
  the wait), a scripted transport answers as Oracle's driver does.
- The virtual clock (``autojump_clock``) drives every wait; each test is bounded by
  ``trio.fail_after`` on that clock; ordering uses ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from agent.device import WaiterInterruptedError, open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import (
    Event,
    GetMemBalloonChangeRequest,
    HeartbeatConfigure,
    HgcmU32,
    Ioctl,
    RemoteProtocolError,
    VBoxStatusError,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.status import (
    VERR_INTERRUPTED,
    VERR_PERMISSION_DENIED,
    VERR_TIMEOUT,
    VINF_SUCCESS,
)
from tests.host.conftest import ECHO, FN_HOLD, EchoService

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from agent.protocol import Submission, UserBuffer

PERSONALITIES: Final = ("mainline", "oracle")
LIMIT_S: Final = 60
MASK: Final = int(Event.MOUSE_CAPABILITIES_CHANGED)


@pytest.fixture(name="host", params=PERSONALITIES)
async def _host(request: pytest.FixtureRequest) -> AsyncIterator[SimulatedHost]:
    host = SimulatedHost(personality=request.param)
    host.register_hgcm_service(EchoService())
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


class TestSameErrors:
    """The same failure raises the same VBoxStatusError on either driver."""

    @pytest.mark.parametrize("request_", [GetMemBalloonChangeRequest(), HeartbeatConfigure(True)])
    async def test_refused_vmmdev_request(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        request_: GetMemBalloonChangeRequest | HeartbeatConfigure,
    ) -> None:
        """Requests only the kernel may send are VERR_PERMISSION_DENIED (mainline: EPERM)."""
        with trio.fail_after(LIMIT_S):
            async with open_device(SimOpener(host)) as device:
                with pytest.raises(VBoxStatusError) as info:
                    await device.request(request_)
        assert (info.value.rc, info.value.name) == (
            VERR_PERMISSION_DENIED,
            "VERR_PERMISSION_DENIED",
        )
        expected_errno = errno.EPERM if host.personality == "mainline" else None
        assert info.value.errno == expected_errno

    async def test_hgcm_call_timeout(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A call the host never completes ends with VERR_TIMEOUT after its timeout."""
        with trio.fail_after(LIMIT_S):
            async with (
                open_device(SimOpener(host)) as device,
                device.open_hgcm_client(ECHO) as client,
            ):
                with pytest.raises(VBoxStatusError) as info:
                    await client.call(FN_HOLD, (HgcmU32(0),), timeout_ms=1500)
        assert info.value.rc == VERR_TIMEOUT

    async def test_interrupted_waiter(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """Interrupting a blocked waiter ends it (mainline: EINTR; Oracle: VERR_INTERRUPTED)."""
        outcome: list[str] = []
        with trio.fail_after(LIMIT_S):
            async with (
                open_device(SimOpener(host)) as device,
                device.open_event_waiter(MASK) as waiter,
                trio.open_nursery() as nursery,
            ):

                async def wait() -> None:
                    with pytest.raises(WaiterInterruptedError):
                        await waiter.wait()
                    outcome.append("interrupted")

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                await waiter.interrupt()
        assert outcome == ["interrupted"]
        assert waiter.interrupted

    async def test_cancelled_waiter(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """Cancelling a blocked wait raises Cancelled and leaves the waiter interrupted."""
        with trio.fail_after(LIMIT_S):
            async with (
                open_device(SimOpener(host)) as device,
                device.open_event_waiter(MASK) as waiter,
            ):
                with trio.move_on_after(5) as scope:
                    await waiter.wait()
                assert scope.cancelled_caught
                assert waiter.interrupted
                assert device.statistics().open_sessions == 2


class OracleScript:
    """A transport answering WAIT_FOR_EVENTS as Oracle's driver does, from a script.

    Each entry is the ``(rc, events)`` of one wait; INTERRUPT_ALL succeeds. A wait reaches
    the script only once ``hold`` (if any) is set.
    """

    def __init__(self, waits: Sequence[tuple[int, int]]) -> None:
        self.waits = list(waits)
        self.calls = 0
        self.hold: trio.Event | None = None

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        del user_buffers
        if submission is not None:
            submission.issued = True
        await trio.lowlevel.checkpoint()
        rc, events = VINF_SUCCESS, 0
        if code == Ioctl.WAIT_FOR_EVENTS:
            if self.hold is not None:
                await self.hold.wait()
            self.calls += 1
            rc, events = self.waits.pop(0)
            L.WaitForEventsIoctl.events_out.set(buffer, events)
        if code == Ioctl.DRIVER_VERSION_INFO:
            L.DriverVersionInfo.session_version.set(buffer, 0x0001_0000)
        L.IoctlHeader.rc.set(buffer, rc)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def claim(self) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def serve_claim(self) -> None:
        await trio.lowlevel.checkpoint()


class ScriptOpener:
    """Opens :class:`OracleScript` sessions; the waiter's is the second."""

    description = "scripted Oracle driver"
    simulated = True

    def __init__(self, waits: Sequence[tuple[int, int]]) -> None:
        self.waiter = OracleScript(waits)
        self._opened = 0

    async def open_session(self) -> OracleScript:
        await trio.lowlevel.checkpoint()
        self._opened += 1
        return self.waiter if self._opened == 2 else OracleScript(())


class TestOracleWaits:
    """Oracle's answers the simulator cannot time: overtaking interrupts, stray signals."""

    async def test_consumed_interrupt_is_an_interrupt(self) -> None:
        """Success with no events after an interrupt that overtook the wait (Oracle's
        ``fPendingCancelWaitEvents``, consumed by the next wait) ends the waiter."""
        opener = ScriptOpener([(VINF_SUCCESS, 0)])
        opener.waiter.hold = trio.Event()  # the wait is on its way, not yet in the driver
        async with (
            open_device(opener) as device,
            device.open_event_waiter(MASK) as waiter,
            trio.open_nursery() as nursery,
        ):

            async def wait() -> None:
                with pytest.raises(WaiterInterruptedError):
                    await waiter.wait()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await waiter.interrupt()
            opener.waiter.hold.set()
        assert waiter.interrupted
        assert opener.waiter.calls == 1

    async def test_success_without_events_nobody_asked_for_is_a_stray(self) -> None:
        """Neither driver answers a wait with no events unless an interrupt came first (mainline
        waits on, Oracle's answers VERR_INTERNAL_ERROR): one nobody asked for repeats the wait
        as a stray interrupt does, three times at most, then fails as a malformed reply;
        the waiter is not taken as interrupted (it opened a new session every time, 9,000
        sessions and log lines in 3 s against a driver that kept answering so)."""
        opener = ScriptOpener([(VINF_SUCCESS, 0)] * 3 + [(VINF_SUCCESS, MASK)])
        async with open_device(opener) as device, device.open_event_waiter(MASK) as waiter:
            assert await waiter.wait() == MASK
            assert not waiter.interrupted
        opener = ScriptOpener([(VINF_SUCCESS, 0)] * 4)
        async with open_device(opener) as device, device.open_event_waiter(MASK) as waiter:
            with pytest.raises(RemoteProtocolError, match="no interrupt was asked for"):
                await waiter.wait()
            assert opener.waiter.calls == 4
            assert not waiter.interrupted

    async def test_stray_interrupts_are_retried_a_bounded_number_of_times(self) -> None:
        """VERR_INTERRUPTED nobody asked for repeats the wait, three times at most."""
        opener = ScriptOpener([(VERR_INTERRUPTED, 0)] * 3 + [(VINF_SUCCESS, MASK)])
        async with open_device(opener) as device, device.open_event_waiter(MASK) as waiter:
            assert await waiter.wait() == MASK
        opener = ScriptOpener([(VERR_INTERRUPTED, 0)] * 4)
        async with open_device(opener) as device, device.open_event_waiter(MASK) as waiter:
            with pytest.raises(VBoxStatusError) as info:
                await waiter.wait()
            assert info.value.rc == VERR_INTERRUPTED
            assert opener.waiter.calls == 4
