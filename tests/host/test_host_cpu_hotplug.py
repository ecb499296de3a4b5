"""CPU hot-plug in the simulated host: VMMDev's flag and one event slot, Main's plug and unplug
calls (Console's, over VMMDev's), and each driver personality's policy for the two requests.

Rules of this test module:

- The device tests send raw requests through the port handler (no driver), as
  ``test_vmmdev.py`` does; every status is the real host's.
- The policy tests go through a running host and the ``Device`` facade, so mainline's errno
  and Oracle's header ``rc`` both arrive as ``VBoxStatusError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import structlog
import trio

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.host.control import execute_control
from agent.protocol import (
    CpuEventType,
    CpuHotPlugEvent,
    CpuStatusType,
    GetCpuHotPlugRequest,
    SetCpuHotPlugStatus,
    VBoxStatusError,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import Event, RequestType
from agent.protocol.status import (
    STATUS_CODES,
    VERR_INVALID_PARAMETER,
    VERR_PERMISSION_DENIED,
    VINF_SUCCESS,
)
from tests.host.conftest import Device, vmmdev_request

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

NOT_MONITORED = STATUS_CODES["VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST"]
U32_MAX = 0xFFFF_FFFF


def set_status(device: Device, status: int) -> int:
    """Send SET_CPU_HOTPLUG_STATUS and return its rc."""
    req = vmmdev_request(RequestType.SET_CPU_HOTPLUG_STATUS, 28)
    L.CpuHotPlugStatusRequest.status.set(req, status)
    return device.send(req)


def get_request(device: Device) -> tuple[int, int, int]:
    """Send GET_CPU_HOTPLUG_REQ and return (event type, core, package)."""
    req = vmmdev_request(RequestType.GET_CPU_HOTPLUG_REQ, 36)
    assert device.send(req) == VINF_SUCCESS
    return (
        L.CpuHotPlugRequest.event_type.get(req),
        L.CpuHotPlugRequest.core.get(req),
        L.CpuHotPlugRequest.package.get(req),
    )


class TestVmmDev:
    """The device's side: the monitoring flag, the slot, the event."""

    def test_a_new_vm_has_an_invalid_slot_and_no_monitoring(self, device: Device) -> None:
        """Zeroed at construction: INVALID with ids 0, and Main's calls are refused."""
        device.report_additions()
        assert get_request(device) == (CpuEventType.INVALID, 0, 0)
        assert device.vmmdev.cpu_hotplug.notify(CpuEventType.PLUG, 1, 0) == NOT_MONITORED
        assert device.vmmdev.pending_events == 0

    @pytest.mark.parametrize("status", [CpuStatusType.INVALID, 3, U32_MAX])
    def test_status_must_be_enable_or_disable(self, device: Device, status: int) -> None:
        """Any other status is VERR_INVALID_PARAMETER and leaves the flag alone."""
        device.report_additions()
        assert set_status(device, status) == VERR_INVALID_PARAMETER
        assert not device.vmmdev.cpu_hotplug.monitored

    def test_plug_fills_the_slot_raises_the_event_and_reading_clears_it(
        self, device: Device
    ) -> None:
        """Enabled: the event, then NONE with UINT32_MAX ids once read."""
        device.report_additions()
        assert set_status(device, CpuStatusType.ENABLE) == VINF_SUCCESS
        assert device.vmmdev.cpu_hotplug.notify(CpuEventType.PLUG, 3, 0) == VINF_SUCCESS
        assert device.vmmdev.pending_events == Event.CPU_HOTPLUG
        assert get_request(device) == (CpuEventType.PLUG, 3, 0)
        assert get_request(device) == (CpuEventType.NONE, U32_MAX, U32_MAX)

    def test_one_slot_the_later_event_wins(self, device: Device) -> None:
        """Two calls before the guest reads: only the second is there (no queue)."""
        device.report_additions()
        set_status(device, CpuStatusType.ENABLE)
        device.vmmdev.cpu_hotplug.notify(CpuEventType.PLUG, 2, 0)
        device.vmmdev.cpu_hotplug.notify(CpuEventType.UNPLUG, 5, 1)
        assert get_request(device) == (CpuEventType.UNPLUG, 5, 1)
        assert device.vmmdev.cpu_hotplug.notified == 2

    def test_disable_refuses_main_again(self, device: Device) -> None:
        """After Disable, Main's unplug gets VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST."""
        device.report_additions()
        set_status(device, CpuStatusType.ENABLE)
        assert set_status(device, CpuStatusType.DISABLE) == VINF_SUCCESS
        assert device.vmmdev.cpu_hotplug.notify(CpuEventType.UNPLUG, 1, 0) == NOT_MONITORED

    def test_restore_forgets_flag_and_slot_reset_keeps_them(self, device: Device) -> None:
        """Neither is in the saved state; a reset does not touch them."""
        device.report_additions()
        set_status(device, CpuStatusType.ENABLE)
        device.vmmdev.cpu_hotplug.notify(CpuEventType.PLUG, 2, 0)
        device.vmmdev.reset()
        device.report_additions()
        assert device.vmmdev.cpu_hotplug.snapshot()["monitored"] is True
        assert get_request(device) == (CpuEventType.PLUG, 2, 0)
        device.vmmdev.cpu_hotplug.notify(CpuEventType.PLUG, 4, 0)
        device.vmmdev.restore()
        assert device.vmmdev.cpu_hotplug.snapshot()["monitored"] is False
        assert get_request(device) == (CpuEventType.INVALID, 0, 0)

    @pytest.mark.parametrize(
        ("event", "core", "package", "message"),
        [
            (CpuEventType.NONE, 1, 0, "PLUG or UNPLUG"),
            (CpuEventType.PLUG, -1, 0, "core id -1 is not a u32"),
            (CpuEventType.UNPLUG, 1, 1 << 32, "package id 4294967296 is not a u32"),
        ],
    )
    def test_bad_calls_from_main(
        self, device: Device, event: CpuEventType, core: int, package: int, message: str
    ) -> None:
        """A call the host API cannot express is a ValueError, not a status."""
        with pytest.raises(ValueError, match=message):
            device.vmmdev.cpu_hotplug.notify(event, core, package)


@pytest.fixture(name="any_host", params=["mainline", "oracle", "passthrough"])
async def _any_host(request: pytest.FixtureRequest) -> AsyncIterator[SimulatedHost]:
    host = SimulatedHost(personality=request.param, seed=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


class TestPersonalities:
    """Both requests are for trusted userspace only, in every driver (``vbg_req_allowed``,
    Oracle's ``kLevel_TrustedUsers``): /dev/vboxguest passes, /dev/vboxuser is refused."""

    async def test_vboxguest_enables_and_reads(self, any_host: SimulatedHost) -> None:
        """Through /dev/vboxguest the guest enables, Main plugs, the guest reads the event."""
        async with open_device(SimOpener(any_host)) as device:
            await device.request(SetCpuHotPlugStatus(CpuStatusType.ENABLE))
            any_host.cpu_plug(2)
            event = await device.request(GetCpuHotPlugRequest())
            assert event == CpuHotPlugEvent(CpuEventType.PLUG, 2, 0)
            assert any_host.status()["cpu_hotplug"] == {
                "monitored": True,
                "event": "NONE",
                "core": U32_MAX,
                "package": U32_MAX,
                "notified": 1,
            }

    @pytest.mark.parametrize(
        "request_", [SetCpuHotPlugStatus(CpuStatusType.ENABLE), GetCpuHotPlugRequest()]
    )
    async def test_vboxuser_is_refused(
        self, any_host: SimulatedHost, request_: SetCpuHotPlugStatus | GetCpuHotPlugRequest
    ) -> None:
        """VERR_PERMISSION_DENIED (mainline: EPERM), and the host never sees the request."""
        async with open_device(SimOpener(any_host, user_device=True, uid=1000)) as device:
            with pytest.raises(VBoxStatusError) as refused:
                await device.request(request_)
        assert refused.value.rc == VERR_PERMISSION_DENIED
        assert not any_host.vmmdev.cpu_hotplug.monitored
        assert any_host.vmmdev.request_counts[request_.request_type] == 0


class TestControl:
    """``cpu`` on the control socket, as VBoxManage controlvm plugcpu/unplugcpu."""

    async def test_unmonitored_unplug_is_busy_and_plug_loses_its_notification(
        self, any_host: SimulatedHost
    ) -> None:
        """As Main's Console: an unplug the guest was not told of gives up with
        VERR_RESOURCE_BUSY (exit 1 material, one line); a plug attaches and succeeds, its
        notification lost (logged, the slot untouched)."""
        unplug = {"command": "cpu", "action": "unplug", "core": 1, "package": 0}
        with structlog.testing.capture_logs() as logs:
            answer = await execute_control(any_host, unplug, drop=_no_drop)
            assert answer == {
                "ok": False,
                "error": "CPU unplug (core 1, package 0; not monitored by the guest, which may "
                "still use the CPU) failed: VERR_RESOURCE_BUSY (-138)",
            }
            plug = {**unplug, "action": "plug"}
            answer = await execute_control(any_host, plug, drop=_no_drop)
            assert answer == {"ok": True, "result": None}
        assert any_host.status()["cpu_hotplug"] == {
            "monitored": False,
            "event": "INVALID",
            "core": 0,
            "package": 0,
            "notified": 0,
        }
        [lost] = [entry for entry in logs if entry["event"] == "cpu_plug_not_notified"]
        assert lost["core"] == 1
        assert lost["status"] == "VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST"

    async def test_plug_and_bad_arguments(self, any_host: SimulatedHost) -> None:
        """A good call fills the slot; a bad action or id is refused with what is wrong."""
        any_host.vmmdev.cpu_hotplug.monitored = True
        good = {"command": "cpu", "action": "plug", "core": 3, "package": 1}
        assert await execute_control(any_host, good, drop=_no_drop) == {"ok": True, "result": None}
        assert any_host.status()["cpu_hotplug"]["event"] == "PLUG"  # type: ignore[index]
        for bad, expected in (
            ({**good, "action": "eject"}, "needs action as 'plug' or 'unplug'"),
            ({**good, "core": "3"}, "needs core as int"),
            ({**good, "package": -1}, "package id -1 is not a u32"),
        ):
            answer = await execute_control(any_host, bad, drop=_no_drop)
            assert answer["ok"] is False
            assert expected in str(answer["error"])


async def _no_drop() -> dict[str, int]:
    return {"dropped": 0, "closing": 0}
