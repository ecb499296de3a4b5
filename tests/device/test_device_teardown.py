"""Teardown the driver does not honour is abandoned in bounded time, never waited for.

Rules of this test module:
- The host is a real ``SimulatedHost`` behind ``SimOpener``; ``DeafOpener`` wraps its
  sessions so that INTERRUPT_ALL_WAIT_FOR_EVENTS never returns, as a wedged driver would,
  or fails with the error it is given.
- Pure trio, so the virtual clock (``autojump_clock``) measures the bounds exactly; each test
  is bounded by ``trio.fail_after`` on that clock. Synchronisation uses
  ``wait_all_tasks_blocked``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import pytest
import structlog.testing
import trio
import trio.testing

from agent.device import open_device
from agent.device.device import CLEANUP_TIMEOUT_S
from agent.device.errors import DeviceLostError
from agent.host import SimOpener, SimulatedHost
from agent.protocol import Event, Ioctl

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.device import Transport
    from agent.protocol import Submission, UserBuffer

RESTORED = int(Event.RESTORED)


class DeafTransport:
    """A session whose driver never answers INTERRUPT_ALL_WAIT_FOR_EVENTS, or fails it with
    ``failure``."""

    def __init__(self, inner: Transport, failure: Exception | None) -> None:
        self._inner = inner
        self._failure = failure

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        if code == Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS:
            if self._failure is not None:
                raise self._failure
            await trio.sleep_forever()
        await self._inner.ioctl(code, buffer, user_buffers, submission=submission)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def claim(self) -> bool:
        return await self._inner.claim()

    async def serve_claim(self) -> None:
        await self._inner.serve_claim()


class DeafOpener:
    def __init__(self, host: SimulatedHost, failure: Exception | None = None) -> None:
        self._inner = SimOpener(host)
        self._failure = failure
        self.description = "deaf simulated driver"
        self.simulated = True

    async def open_session(self) -> DeafTransport:
        return DeafTransport(await self._inner.open_session(), self._failure)


async def _cancel_a_wait(
    host: SimulatedHost, cleanup_in_s: float | None, failure: Exception | None = None
) -> float:
    """Cancel a blocked wait on a deaf session; return how long the cancellation took."""
    async with open_device(DeafOpener(host, failure)) as device:
        if cleanup_in_s is not None:
            device.cleanup_deadline = trio.current_time() + cleanup_in_s
        async with device.open_event_waiter(RESTORED) as waiter:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter.wait)
                    await trio.testing.wait_all_tasks_blocked()
                    began = trio.current_time()
                    scope.cancel()
            return trio.current_time() - began


class TestAbandonedTeardown:
    async def test_cancelled_wait_ends_within_the_cleanup_timeout(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """The interrupt never returns: the wait is abandoned after CLEANUP_TIMEOUT_S, logged."""
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            took = await _cancel_a_wait(host, None)
        assert took == pytest.approx(CLEANUP_TIMEOUT_S)
        abandoned = [e["what"] for e in logs if e["event"] == "device_cleanup_abandoned"]
        assert sorted(abandoned) == ["event wait", "interrupt"]  # same deadline: either order

    async def test_cleanup_deadline_shortens_it(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """With the device's cleanup deadline 0.3 s away, the wait is abandoned then."""
        with trio.fail_after(60):
            took = await _cancel_a_wait(host, 0.3)
        assert took == pytest.approx(0.3)

    async def test_a_deadline_lowered_during_teardown_reaches_it(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """The wait's teardown began (its interrupt held by the driver) 0.1 s before a stop
        set the cleanup deadline 0.2 s away: the interrupt and the wait are abandoned then,
        not CLEANUP_TIMEOUT_S after they began."""
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with open_device(DeafOpener(host)) as device:

                async def stop() -> None:
                    await trio.sleep(0.1)
                    device.cleanup_deadline = trio.current_time() + 0.2

                async with (
                    device.open_event_waiter(RESTORED) as waiter,
                    trio.open_nursery() as outer,
                ):
                    with trio.CancelScope() as scope:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(waiter.wait)
                            await trio.testing.wait_all_tasks_blocked()
                            began = trio.current_time()
                            scope.cancel()
                            outer.start_soon(stop)
                    took = trio.current_time() - began
        assert took == pytest.approx(0.3)
        abandoned = [e["what"] for e in logs if e["event"] == "device_cleanup_abandoned"]
        assert sorted(abandoned) == ["event wait", "interrupt"]

    @pytest.mark.parametrize(
        ("failure", "logged"),
        [
            pytest.param(
                DeviceLostError("the driver no longer gives calls back"),
                "the driver no longer gives calls back",
                id="lost",
            ),
            pytest.param(OSError(errno.EIO, "I/O error"), "VERR_DEV_IO_ERROR", id="errno"),
            pytest.param(trio.ClosedResourceError("session closed"), "session closed", id="closed"),
        ],
    )
    async def test_a_failed_interrupt_gives_the_wait_up_at_once(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        failure: Exception,
        logged: str,
    ) -> None:
        """The interrupt a cancelled wait sends fails: nothing else would end the wait, so it
        is given up at once and the caller sees its own cancellation, the failure logged (it
        escaped as an ExceptionGroup, the wait left running)."""
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            took = await _cancel_a_wait(host, None, failure)
        assert took == 0
        failed = [e["error"] for e in logs if e["event"] == "event_wait_interrupt_failed"]
        assert len(failed) == 1
        assert logged in failed[0]
        abandoned = [e["what"] for e in logs if e["event"] == "device_cleanup_abandoned"]
        assert abandoned == ["event wait"]
