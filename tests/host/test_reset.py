"""A VM reset of the simulated host, on every personality: the old boot ends before it.

Rules of this test module:
- a running ``SimulatedHost`` of each personality (``kernel`` needs the real driver library);
- the host's own delay holds a request in the port, on the real clock: the kernel
  personality's port writes come from driver threads, which a virtual clock would jump over;
- host state the driver threads change has no event, so it is polled (``until``); every
  test is bounded by ``fail_after``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final

import pytest
import trio

from agent.host import SimulatedHost
from agent.protocol import ReportGuestStatus
from agent.protocol.constants import Facility, FacilityStatus, RequestType
from tests.host.conftest import Client, open_client, until

if TYPE_CHECKING:
    from agent.host.driver import DriverModel

PERSONALITIES: Final = ("mainline", "oracle", "passthrough", "kernel")
HOLD_S: Final = 0.5
"""How long the host holds the old boot's facility report in the port."""
WAIT_S: Final = 10.0


async def _report_active(client: Client) -> None:
    """Report VBoxService active, as the agent does once ready; the reset may fail it."""
    with contextlib.suppress(OSError):
        await client.request(ReportGuestStatus(Facility.VBOX_SERVICE, FacilityStatus.ACTIVE))


@pytest.mark.parametrize("personality", PERSONALITIES)
async def test_a_request_written_before_a_reset_acts_before_it(
    personality: str, request: pytest.FixtureRequest
) -> None:
    """A facility report the host holds in the port when the VM resets is handled first,
    as a real reset waits for every vCPU to leave its port write: the new boot finds the
    facility inactive, as the reset left it, not active from the boot before."""
    if personality == "kernel":
        request.getfixturevalue("kernel_library")
    host = SimulatedHost(personality=personality)
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            client = await open_client(host)
            host.set_delay(RequestType.REPORT_GUEST_STATUS, HOLD_S)
            vm.start_soon(_report_active, client)
            await until(lambda: host.vmmdev.port_writes_held == 1)
            host.set_delay(RequestType.REPORT_GUEST_STATUS, 0)  # the new boot's load is not held
            await host.reset()
            held_after_reset = host.vmmdev.port_writes_held
            await until(lambda: host.vmmdev.port_writes_held == 0)
            service = host.vmmdev.facilities.entries[Facility.VBOX_SERVICE].status
            vm.cancel_scope.cancel()
    assert (held_after_reset, service) == (0, FacilityStatus.INACTIVE)


async def test_resets_follow_one_another() -> None:
    """Two resets asked for at once run one after the other: the second ends the boot the
    first began, so one driver runs at the end, not two answering the same VMMDev."""
    host = SimulatedHost(personality="mainline")
    booted: list[DriverModel] = []

    async def reset() -> None:
        await host.reset()
        booted.append(host.driver)

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            async with trio.open_nursery() as resets:
                resets.start_soon(reset)
                resets.start_soon(reset)
            lost = [driver.lost for driver in booted]
            vm.cancel_scope.cancel()
    assert lost == [True, False]
