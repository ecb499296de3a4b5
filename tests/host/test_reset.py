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
import errno
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from agent.host import DriverLoadError, SimulatedHost
from agent.protocol import ChangeFilterMask, ChangeGuestCapabilities, ReportGuestStatus
from agent.protocol.constants import Facility, FacilityStatus, RequestType
from agent.protocol.status import VERR_INTERNAL_ERROR
from tests.host.conftest import Client, model_driver, open_client, until

if TYPE_CHECKING:
    from agent.host.driver import DriverModel

PERSONALITIES: Final = ("mainline", "oracle", "passthrough", "kernel")
HOLD_S: Final = 1000.0
"""How long the host holds the old boot's facility report in the port: until the test
ends the delay, once the reset waits for it."""
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
    as a real reset waits for every vCPU to leave its port write: the reset waits until the
    delay ends (ended once the reset waits), and the new boot finds the facility inactive,
    as the reset left it, not active from the boot before."""
    if personality == "kernel":
        request.getfixturevalue("kernel_library")
    host = SimulatedHost(personality=personality)
    reset_done = trio.Event()

    async def reset() -> None:
        await host.reset()
        reset_done.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            client = await open_client(host)
            host.set_delay(RequestType.REPORT_GUEST_STATUS, HOLD_S)
            vm.start_soon(_report_active, client)
            await until(lambda: host.vmmdev.port_writes_held == 1)
            old_boot = host.driver
            vm.start_soon(reset)
            await until(lambda: old_boot.lost)  # the reset now waits for the held write
            waited = host.driver is old_boot and not reset_done.is_set()
            host.set_delay(RequestType.REPORT_GUEST_STATUS, 0)  # the new boot's load is not held
            await reset_done.wait()
            held = host.vmmdev.port_writes_held, host.vmmdev.held_requests()
            service = host.vmmdev.facilities.entries[Facility.VBOX_SERVICE].status
            vm.cancel_scope.cancel()
    assert (waited, held, service) == (True, (0, {}), FacilityStatus.INACTIVE)


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


IN_PROCESS: Final = ("mainline", "oracle", "passthrough")
SEAMLESS: Final = 0x1
VRDP_EVENT: Final = 0x20


@pytest.mark.parametrize("personality", IN_PROCESS)
@pytest.mark.parametrize(
    ("change", "shown"),
    [
        (ChangeGuestCapabilities(or_mask=SEAMLESS, not_mask=0), "guest_capabilities"),
        (ChangeFilterMask(or_mask=VRDP_EVENT, not_mask=0), "filter_mask"),
    ],
    ids=["capabilities", "filter"],
)
async def test_a_request_of_the_old_boot_still_on_its_way_reaches_no_device(
    personality: str, change: ChangeGuestCapabilities | ChangeFilterMask, shown: str
) -> None:
    """A session's change that entered the old boot's driver before the reset and waits
    for the session mutex another session holds fails with ENODEV once it has it: the
    reset device, which the new boot loaded on, never sees it."""
    host = SimulatedHost(personality=personality)
    outcome: list[int | None] = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            client = await open_client(host)
            done = trio.Event()

            async def send() -> None:
                try:
                    await client.request(change)
                    outcome.append(None)
                except OSError as exc:
                    outcome.append(exc.errno)
                done.set()

            async with model_driver(host).session_mutex:  # another session of the old boot
                vm.start_soon(send)
                await trio.testing.wait_all_tasks_blocked()  # waiting for the mutex
                await host.reset()
            await done.wait()
            bits = host.status()[shown]
            vm.cancel_scope.cancel()
    assert isinstance(bits, int)
    assert (outcome, bits & change.or_mask) == ([errno.ENODEV], 0)


async def test_a_power_off_while_a_reset_waits_leaves_the_device_alone() -> None:
    """A VM powered off while the reset waits for a held port write ends the reset with
    "not running": the device is not reset, no new driver loads, and an open afterwards
    is refused as "not running" (the old boot's lost driver answers no more)."""
    host = SimulatedHost(personality="mainline")
    old = host.driver
    refused: list[str] = []
    ended = trio.Event()

    async def reset() -> None:
        try:
            await host.reset()
        except RuntimeError as exc:
            refused.append(str(exc))
        ended.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as test:
            async with trio.open_nursery() as vm:
                await vm.start(host.run)
                client = await open_client(host)
                session_id = host.vmmdev.session_id
                host.set_delay(RequestType.REPORT_GUEST_STATUS, 2 * WAIT_S)  # until the power-off
                test.start_soon(_report_active, client)
                await until(lambda: host.vmmdev.port_writes_held == 1)
                test.start_soon(reset)
                await trio.testing.wait_all_tasks_blocked()  # the reset waits for the write
                vm.cancel_scope.cancel()  # the power-off
            await ended.wait()
    with pytest.raises(FileNotFoundError) as opened:
        host.open_session()
    assert (refused, opened.value.strerror, host.driver, old.lost, host.vmmdev.session_id) == (
        ["the simulated host is not running"],
        "the simulated host is not running",
        old,
        True,
        session_id,
    )


@pytest.mark.parametrize("personality", PERSONALITIES)
async def test_an_open_after_a_reset_whose_driver_failed_to_load_is_refused(
    personality: str, request: pytest.FixtureRequest
) -> None:
    """The new boot's driver refuses to load (GET_HOST_VERSION fails): the reset raises,
    and a later open finds no driver ("not running"), not the old boot's lost one."""
    if personality == "kernel":
        request.getfixturevalue("kernel_library")
    host = SimulatedHost(personality=personality)
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            host.add_fault(RequestType.GET_HOST_VERSION, VERR_INTERNAL_ERROR)
            with pytest.RaisesGroup(DriverLoadError, flatten_subgroups=True):
                await host.reset()
            with pytest.raises(FileNotFoundError) as opened:
                host.open_session()
            vm.cancel_scope.cancel()
    assert opened.value.strerror == "the simulated host is not running"


@pytest.mark.parametrize("personality", ["mainline", "oracle", "passthrough"])
@pytest.mark.parametrize(
    "held",
    [RequestType.REPORT_GUEST_STATUS, RequestType.GET_HOST_VERSION],
    ids=["old-boot-write", "new-boot-load"],
)
async def test_an_open_while_a_reset_runs_gets_a_lost_session(
    personality: str, held: RequestType
) -> None:
    """An open while the reset waits for the old boot's held port write, or while the new
    driver loads (its first request held), reaches the old boot's driver: it succeeds and
    the session's first ioctl fails with ENODEV, never "not running" (which the agent
    showed at random for a reset at 0 s). Once the new driver is up, opens reach it."""
    host = SimulatedHost(personality=personality)
    outcome: list[int | None] = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            client = await open_client(host)
            host.set_delay(held, HOLD_S)
            if held == RequestType.REPORT_GUEST_STATUS:
                vm.start_soon(_report_active, client)
                await trio.testing.wait_all_tasks_blocked()  # the write is held
            resetting = trio.Event()

            async def reset() -> None:
                await host.reset()
                resetting.set()

            vm.start_soon(reset)
            await trio.testing.wait_all_tasks_blocked()  # the reset waits on the held request
            during = await open_client(host)
            try:
                await during.request(ChangeFilterMask(or_mask=0, not_mask=0))
                outcome.append(None)
            except OSError as exc:
                outcome.append(exc.errno)
            host.set_delay(held, 0)
            await resetting.wait()
            after = await open_client(host)
            await after.request(ChangeFilterMask(or_mask=0, not_mask=0))
            vm.cancel_scope.cancel()
    assert outcome == [errno.ENODEV]
