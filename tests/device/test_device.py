"""Tests of the ``Device`` facade against the in-process simulated host.

Rules of this test module:
- The host is a real ``SimulatedHost`` behind ``SimOpener`` (pure trio, no threads), so
  the virtual clock (``autojump_clock``, an argument of every test) drives every
  wait; each test is bounded by ``trio.fail_after`` on that clock.
- Synchronisation uses ``wait_all_tasks_blocked``, never sleeps for ordering.
"""

from __future__ import annotations

import errno

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from agent.device import DeviceLostError, WaiterInterruptedError, open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import (
    ChangeBalloon,
    Event,
    GetHostVersion,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmData,
    HgcmU32,
    HgcmU64,
    LocalProtocolError,
    RequestType,
    VBoxStatusError,
)
from agent.protocol.status import (
    VERR_HGCM_SERVICE_NOT_FOUND,
    VERR_INTERNAL_ERROR,
    VERR_NOT_FOUND,
)

RESTORED = int(Event.RESTORED)
GET_PROP = 1
REFUSED_CHANGE_BALLOON = {
    "mainline": (
        "VERR_INVALID_FUNCTION",
        errno.ENOTTY,
        "VBGL_IOCTL_CHANGE_BALLOON failed: VERR_INVALID_FUNCTION (-36) from errno ENOTTY",
    ),
    "oracle": (
        "VERR_PERMISSION_DENIED",
        None,
        "VBGL_IOCTL_CHANGE_BALLOON failed: VERR_PERMISSION_DENIED (-10)",
    ),
}
"""Each driver's refusal: mainline has no such ioctl; Oracle's allocates the chunks itself."""


class TestOpenDevice:
    """Opening, requests and statistics."""

    async def test_agrees_on_the_interface_version(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """The handshake records the driver's session version."""
        async with open_device(SimOpener(host)) as device:
            assert device.driver_version is not None
            assert device.driver_version.session_version == 0x00010000
            version = await device.request(GetHostVersion())
            assert version.features & 0x1
            assert (
                device.statistics().requests,
                device.statistics().failures,
                device.statistics().open_sessions,
            ) == (2, 0, 1)

    async def test_counts_failed_requests(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A request the driver refuses raises, in its own convention, and is counted."""
        async with open_device(SimOpener(host)) as device:
            with pytest.raises(VBoxStatusError) as info:
                await device.request(ChangeBalloon(0x10000, inflate=True))
            refused = (info.value.name, info.value.errno, str(info.value))
            assert refused == REFUSED_CHANGE_BALLOON[host.personality]
            assert device.statistics().failures == 1

    async def test_a_vm_reset_loses_the_device(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """After a VM reset every session of the old boot fails with ENODEV: a request and
        a wait in flight raise DeviceLostError, which ends the agent, not a status that a
        service would count and try again on a session that never works again."""
        async with (
            open_device(SimOpener(host)) as device,
            device.open_event_waiter(RESTORED) as waiter,
        ):
            lost: list[BaseException] = []

            async def wait() -> None:
                with pytest.raises(DeviceLostError) as info:
                    await waiter.wait()
                lost.append(info.value)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait)
                    await trio.testing.wait_all_tasks_blocked()
                    await host.reset()
                with pytest.raises(DeviceLostError) as info:
                    await device.request(GetHostVersion())
                lost.append(info.value)
        assert [str(error) for error in lost] == [
            "VBG_IOCTL_WAIT_FOR_EVENTS failed: the device is gone (ENODEV)",
            "VMMDEVREQ_GET_HOST_VERSION failed: the device is gone (ENODEV)",
        ]


class TestEventWaiter:
    """Waiting, interrupting and cancelling on a session of its own."""

    async def test_returns_raised_events(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A wait returns the event once the host raises it."""
        async with (
            open_device(SimOpener(host)) as device,
            device.open_event_waiter(RESTORED) as waiter,
        ):
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_raise_later, host, RESTORED)
                    assert await waiter.wait() == RESTORED
            assert device.statistics().open_sessions == 2
        assert device.statistics().open_sessions == 0

    async def test_interrupt_ends_the_wait_for_good(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """After ``interrupt`` the wait raises, and the session refuses further waits."""
        async with (
            open_device(SimOpener(host)) as device,
            device.open_event_waiter(RESTORED) as waiter,
        ):
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:

                    async def interrupt() -> None:
                        await trio.testing.wait_all_tasks_blocked()
                        await waiter.interrupt()

                    nursery.start_soon(interrupt)
                    with pytest.raises(WaiterInterruptedError):
                        await waiter.wait()
                assert waiter.interrupted
                with pytest.raises(LocalProtocolError, match="interrupted"):
                    await waiter.wait()

    async def test_cancel_ends_the_wait_promptly(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """Cancelling a blocked wait returns at once and leaves other sessions alone."""
        async with open_device(SimOpener(host)) as device:
            async with device.open_event_waiter(RESTORED) as waiter:
                with trio.move_on_after(5) as scope:
                    await waiter.wait()
                assert scope.cancelled_caught
                assert trio.current_time() == 5.0
            async with device.open_event_waiter(RESTORED) as fresh:
                host.raise_events(RESTORED)
                with trio.fail_after(60):
                    assert await fresh.wait() == RESTORED

    async def test_rejects_an_empty_mask(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A waiter needs at least one valid event bit."""
        async with open_device(SimOpener(host)) as device:
            with pytest.raises(ValueError, match="non-zero"):
                async with device.open_event_waiter(0):
                    pass


class TestHgcmClient:
    """HGCM clients on sessions of their own."""

    async def test_unknown_service_is_refused(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """Connecting to a service the host lacks fails with VERR_HGCM_SERVICE_NOT_FOUND."""
        async with open_device(SimOpener(host)) as device:
            with trio.fail_after(60), pytest.raises(VBoxStatusError) as info:
                async with device.open_hgcm_client("NoSuchService"):
                    pass
            assert info.value.rc == VERR_HGCM_SERVICE_NOT_FOUND
            assert device.statistics().open_sessions == 1

    async def test_calls_the_guest_property_service(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A property the host set is read back through GET_PROP, and the client is released."""
        host.prop_set("/VirtualBox/Test/Answer", "42", "")
        async with open_device(SimOpener(host)) as device:
            with trio.fail_after(60):
                async with device.open_hgcm_client("VBoxGuestPropSvc") as client:
                    assert host.status()["hgcm_clients"] == 1
                    reply = await client.call(
                        GET_PROP,
                        (
                            HgcmBufferIn(b"/VirtualBox/Test/Answer\0"),
                            HgcmBufferOut(128),
                            HgcmU64(0),
                            HgcmU32(0),
                        ),
                    )
                    value, size = reply.params[1], reply.params[3]
                    assert HgcmU32(4) == size
                    assert isinstance(value, HgcmData)
                    assert value.data[:4] == b"42\0\0"
                    with pytest.raises(VBoxStatusError) as info:
                        await client.call(
                            GET_PROP,
                            (
                                HgcmBufferIn(b"/VirtualBox/Test/Missing\0"),
                                HgcmBufferOut(128),
                                HgcmU64(0),
                                HgcmU32(0),
                            ),
                        )
                    assert info.value.rc == VERR_NOT_FOUND
            assert host.status()["hgcm_clients"] == 0

    async def test_a_failed_disconnect_after_the_work_is_a_warning(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """A disconnect the host fails once the caller's work is done is logged, and closing
        the session releases the client (it raised: ``prop set`` exited 1 after the write)."""
        host.add_fault(RequestType.HGCM_DISCONNECT, VERR_INTERNAL_ERROR)
        async with open_device(SimOpener(host)) as device:
            with trio.fail_after(60), capture_logs() as logs:
                async with device.open_hgcm_client("VBoxGuestPropSvc"):
                    assert host.status()["hgcm_clients"] == 1
            warnings = [entry for entry in logs if entry["log_level"] == "warning"]
            assert [(w["event"], w["service"], w["status"]) for w in warnings] == [
                ("hgcm_disconnect_failed", "VBoxGuestPropSvc", "VERR_INTERNAL_ERROR")
            ]
            assert host.status()["hgcm_clients"] == 0
            assert device.statistics().open_sessions == 1


async def _raise_later(host: SimulatedHost, mask: int) -> None:
    await trio.testing.wait_all_tasks_blocked()
    host.raise_events(mask)
