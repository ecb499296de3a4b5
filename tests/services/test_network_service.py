"""The ``network`` service against the in-process simulated host, and its interface reader.

Rules of this test module:
- a real ``SimulatedHost`` behind ``SimOpener`` with the event pump and the virtual clock:
  ``autojump_clock`` is a parameter of each test (pytest-trio runs a test on the clock among
  its own arguments, never on one named in ``usefixtures``); each test is bounded by
  ``trio.fail_after``; the interfaces come from a list the test changes; the host's view is
  checked (``prop_get``), not just the counters;
- the reader itself runs against the kernel in a network namespace of its own, where the
  test sets up the devices and addresses.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pydantic
import pytest
import structlog.testing
import trio
import trio.testing

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.host.guest_props import GuestPropertyService
from agent.protocol.guest_props import NILFLAG, RDONLYGUEST, SERVICE_NAME, GuestFunction
from agent.protocol.host_text import host_bytes, host_str
from agent.protocol.status import VINF_SUCCESS
from agent.services import EventPump, ServiceContext
from agent.services._host_options import OPTION_PREFIX
from agent.services._netifaces import NetInterface
from agent.services._publishing import NOT_SENT
from agent.services.guest_props import open_guest_properties
from agent.services.hgcm import HgcmBufferIn
from agent.services.network import (
    COUNT_PROPERTY,
    NET_PREFIX,
    NetworkSection,
    network_properties,
    network_service,
)
from agent.services.users import UsersSection
from tests.services.publishing_support import GuestSource, MalformedLists

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from agent.services._publishing import PublishingService

LIMIT_S: Final = 60
INTERVAL_S: Final = 5.0
FLAGS: Final = "TRANSIENT, TRANSRESET"
"""What the host keeps of a TRANSRESET write: the service always adds TRANSIENT to it."""
ETH0: Final = NetInterface("eth0", "10.0.2.15", "10.0.2.255", "255.255.255.0", "080027AB12CD", True)
ETH1: Final = NetInterface(
    "eth1", "192.168.56.10", "192.168.56.255", "255.255.255.0", "08002700FF01", False
)


PAST_UNICODE: Final = b"br\xf4\x90\x80\x80"
"""A device name with U+110000: IPRT takes it as UTF-8, Python's decoder does not."""

Interfaces = GuestSource[NetInterface]
"""What the service reads (see ``GuestSource``)."""


class Running:
    """A started service and what the test needs around it."""

    def __init__(self, host: SimulatedHost) -> None:
        self.host = host
        self.status_changes = 0

    def status_changed(self) -> None:
        self.status_changes += 1

    def start(self, service: PublishingService) -> None:
        self.service = service

    def value(self, name: str) -> str | None:
        found = self.host.prop_get(name)
        return None if found is None else found[0]

    def stamp(self, name: str) -> int:
        found = self.host.prop_get(name)
        assert found is not None, name
        return found[2]

    async def next_pass(self) -> None:
        """Let the next interval's pass run (the clock jumps there)."""
        passes = self.service.statistics().passes
        await trio.sleep(INTERVAL_S)
        await trio.testing.wait_all_tasks_blocked()
        assert self.service.statistics().passes == passes + 1


@pytest.fixture(name="interfaces")
def _interfaces() -> Interfaces:
    return Interfaces(ETH0, ETH1)


@pytest.fixture(name="running")
async def _running(host: SimulatedHost, interfaces: Interfaces) -> AsyncIterator[Running]:
    async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
        pump = EventPump(device)
        running = Running(host)
        context = ServiceContext(device, pump, running.status_changed)
        service = network_service(context, NetworkSection(interval_s=INTERVAL_S), interfaces)
        assert service.status() == "network setting up"
        running.start(service)
        with trio.fail_after(LIMIT_S):
            await nursery.start(pump.run)
            await nursery.start(service.run)
        yield running
        nursery.cancel_scope.cancel()


async def test_publishes_every_interface_as_vboxservice_names_them(
    autojump_clock: trio.abc.Clock, running: Running
) -> None:
    """Each address's six properties, under its index, then Count."""
    assert network_properties([ETH0, ETH1]) == {
        f"{NET_PREFIX}0/V4/IP": "10.0.2.15",
        f"{NET_PREFIX}0/V4/Broadcast": "10.0.2.255",
        f"{NET_PREFIX}0/V4/Netmask": "255.255.255.0",
        f"{NET_PREFIX}0/MAC": "080027AB12CD",
        f"{NET_PREFIX}0/Status": "Up",
        f"{NET_PREFIX}0/Name": "eth0",
        f"{NET_PREFIX}1/V4/IP": "192.168.56.10",
        f"{NET_PREFIX}1/V4/Broadcast": "192.168.56.255",
        f"{NET_PREFIX}1/V4/Netmask": "255.255.255.0",
        f"{NET_PREFIX}1/MAC": "08002700FF01",
        f"{NET_PREFIX}1/Status": "Down",
        f"{NET_PREFIX}1/Name": "eth1",
        COUNT_PROPERTY: "2",
    }
    for name, value in network_properties([ETH0, ETH1]).items():
        assert running.value(name) == value
    assert running.service.status() == "network 2 interfaces"
    statistics = running.service.statistics()
    assert (statistics.passes, statistics.summary, statistics.writes) == (1, "2 interfaces", 12)


async def test_writes_only_changes_but_count_every_pass(
    autojump_clock: trio.abc.Clock, running: Running, interfaces: Interfaces
) -> None:
    """An unchanged value keeps its timestamp; Count, the host's beacon, gets a new one."""
    with trio.fail_after(LIMIT_S):
        ip_stamp, count_stamp = running.stamp(f"{NET_PREFIX}0/V4/IP"), running.stamp(COUNT_PROPERTY)
        await running.next_pass()
        assert running.stamp(f"{NET_PREFIX}0/V4/IP") == ip_stamp
        assert running.stamp(COUNT_PROPERTY) > count_stamp
        assert running.service.statistics().writes == 12
        interfaces.now = (ETH0, dataclasses.replace(ETH1, address="192.168.56.11"))
        await running.next_pass()
        assert running.value(f"{NET_PREFIX}1/V4/IP") == "192.168.56.11"
        assert running.stamp(f"{NET_PREFIX}0/V4/IP") == ip_stamp
        assert running.service.statistics().writes == 13


async def test_a_vanished_interface_is_deleted(
    autojump_clock: trio.abc.Clock, running: Running, interfaces: Interfaces
) -> None:
    """Fewer addresses: the entries past the new count go, Count follows."""
    with trio.fail_after(LIMIT_S):
        interfaces.now = (ETH1,)
        await running.next_pass()
        assert running.value(f"{NET_PREFIX}0/V4/IP") == "192.168.56.10"
        assert running.value(f"{NET_PREFIX}0/Status") == "Down"
        assert all(running.value(f"{NET_PREFIX}1/{key}") is None for key in ("V4/IP", "Name"))
        assert running.value(COUNT_PROPERTY) == "1"
        assert running.service.statistics().deletes == 6
        assert running.service.status() == "network 1 interface"


async def test_the_daemon_hears_of_status_changes_only(
    autojump_clock: trio.abc.Clock, running: Running, interfaces: Interfaces
) -> None:
    """Passes that change nothing do not ask for a new STATUS= line (an idle agent stays
    quiet); a changed count does."""
    with trio.fail_after(LIMIT_S):
        assert running.status_changes == 1  # "network setting up" became "network 2 interfaces"
        await running.next_pass()
        await running.next_pass()
        assert running.status_changes == 1
        interfaces.now = (ETH0,)
        await running.next_pass()
        assert running.status_changes == 2


async def test_a_restore_publishes_everything_again_at_once(
    autojump_clock: trio.abc.Clock, running: Running
) -> None:
    """After a restore every value is written again, without waiting for the interval."""
    with trio.fail_after(LIMIT_S):
        stamp = running.stamp(f"{NET_PREFIX}0/MAC")
        running.host.prop_delete(f"{NET_PREFIX}1/Name")
        started = trio.current_time()
        running.host.restore()
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() - started < INTERVAL_S
        assert running.service.statistics().passes == 2
        assert running.stamp(f"{NET_PREFIX}0/MAC") > stamp
        assert running.value(f"{NET_PREFIX}1/Name") == "eth1"
        assert running.service.statistics().writes == 24


async def test_a_reload_shortens_the_current_wait(
    autojump_clock: trio.abc.Clock, running: Running
) -> None:
    """A new interval applies to the wait already under way: one already over ends it; a
    longer one holds that wait and every later one."""
    with trio.fail_after(LIMIT_S):
        running.service.reconfigure(NetworkSection(interval_s=3600))
        await trio.sleep(INTERVAL_S * 2)
        assert running.service.statistics().passes == 1
        started = trio.current_time()
        assert running.service.reconfigure(NetworkSection(interval_s=INTERVAL_S))
        await trio.testing.wait_all_tasks_blocked()
        assert running.service.statistics().passes == 2
        assert trio.current_time() == started  # the new interval had already passed
        assert running.service.reconfigure(NetworkSection(interval_s=4 * INTERVAL_S))
        await trio.sleep(6 * INTERVAL_S)
        assert running.service.statistics().passes == 3  # at 4 intervals, the next at 8


async def test_a_refused_property_is_logged_once_and_retried(
    autojump_clock: trio.abc.Clock, running: Running
) -> None:
    """A value the host made read-only shows in the status; one warning, the rest published."""
    with trio.fail_after(LIMIT_S):
        name = f"{NET_PREFIX}0/V4/IP"
        running.host.prop_set(name, "host-owned", "RDONLYGUEST")
        with structlog.testing.capture_logs() as logs:
            running.host.restore()
            await trio.testing.wait_all_tasks_blocked()
            await running.next_pass()
        refusals = [line for line in logs if line["event"] == "property_refused"]
        assert refusals == [
            {
                "event": "property_refused",
                "log_level": "warning",
                "property": name,
                "status": "VERR_PERMISSION_DENIED",
            }
        ]
        assert running.service.status() == f"network: {name} refused (VERR_PERMISSION_DENIED)"
        assert running.service.statistics().refused == 1
        assert running.value(name) == "host-owned"
        assert running.value(f"{NET_PREFIX}0/MAC") == ETH0.mac
        running.host.prop_delete(name)
        await running.next_pass()
        assert running.value(name) == ETH0.address
        assert running.service.status() == "network 2 interfaces"


async def test_a_value_the_client_will_not_send_is_a_refusal_not_a_crash(
    autojump_clock: trio.abc.Clock, running: Running, interfaces: Interfaces
) -> None:
    """A value the property client refuses before sending (here text that is not valid
    Unicode) is logged once and shown in the status like the host's refusals; the rest is
    published, pass after pass, and the refusal ends when the value is fixed."""
    with trio.fail_after(LIMIT_S):
        with structlog.testing.capture_logs() as logs:
            interfaces.now = (ETH0, dataclasses.replace(ETH1, name="eth\udc80"))
            await running.next_pass()
            await running.next_pass()
        name = f"{NET_PREFIX}1/Name"
        refusals = [line for line in logs if line["event"] == "property_refused"]
        assert [(line["property"], line["status"]) for line in refusals] == [(name, NOT_SENT)]
        assert "not valid Unicode" in refusals[0]["error"]
        assert running.service.status() == f"network: {name} refused ({NOT_SENT})"
        assert running.value(COUNT_PROPERTY) == "2"
        interfaces.now = (ETH0, ETH1)
        await running.next_pass()
        assert running.value(name) == "eth1"
        assert running.service.status() == "network 2 interfaces"


async def test_a_refusal_of_a_name_no_longer_wanted_is_forgotten(
    autojump_clock: trio.abc.Clock, running: Running, interfaces: Interfaces
) -> None:
    """A property refused from its first write, of an interface that went away, leaves the
    status: there is nothing left to retry."""
    with trio.fail_after(LIMIT_S):
        interfaces.now = (ETH0,)
        await running.next_pass()
        interfaces.now = (ETH0, dataclasses.replace(ETH1, name="eth\udc80"))
        await running.next_pass()
        assert running.service.statistics().refused == 1
        interfaces.now = (ETH0,)
        await running.next_pass()
        assert running.service.statistics().refused == 0
        assert running.service.status() == "network 1 interface"


async def test_a_stale_name_python_cannot_decode_is_deleted(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """A name under the service's prefix that a guest process set with bytes IPRT takes and
    Python cannot decode (U+110000 here) is listed by the service and deleted as the host
    holds it, like any stale name of its own: no refusal, no warning, the status as usual."""
    raw = f"{NET_PREFIX}3/V4/IP".encode() + b"\xf4\x90\x80\x80"
    stale = raw.decode("utf-8", "surrogateescape")
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with (
            open_device(SimOpener(host)) as device,
            trio.open_nursery() as nursery,
            open_guest_properties(device) as other,  # a guest process
        ):
            reply = await other.channel.call(
                GuestFunction.SET_PROP_VALUE, HgcmBufferIn(raw + b"\0"), HgcmBufferIn(b"x\0")
            )
            assert reply.status == VINF_SUCCESS
            assert stale in {found.name for found in await other.enumerate([f"{NET_PREFIX}*"])}
            pump = EventPump(device)
            section = NetworkSection(interval_s=INTERVAL_S)
            service = network_service(ServiceContext(device, pump), section, Interfaces(ETH0))
            await nursery.start(pump.run)
            await nursery.start(service.run)
            await trio.sleep(INTERVAL_S * 2)
            await trio.testing.wait_all_tasks_blocked()
            assert service.statistics().passes >= 2
            names = {found.name for found in await other.enumerate([f"{NET_PREFIX}*"])}
            status = service.status()
            nursery.cancel_scope.cancel()
    assert stale not in names
    assert [line for line in logs if line["event"] == "property_refused"] == []
    assert status == "network 1 interface"


async def test_unreadable_interfaces_hold_the_beacon(
    autojump_clock: trio.abc.Clock, running: Running, interfaces: Interfaces
) -> None:
    """While the interfaces cannot be read, Count is not renewed; reading again resumes."""
    with trio.fail_after(LIMIT_S):
        count_stamp = running.stamp(COUNT_PROPERTY)
        interfaces.error = OSError(97, "Address family not supported by protocol")
        passes = running.service.statistics().passes
        await trio.sleep(INTERVAL_S * 2.5)  # two passes that could not read
        assert running.service.statistics().passes == passes
        assert running.stamp(COUNT_PROPERTY) == count_stamp
        assert running.service.status() == (
            "network: unreadable ([Errno 97] Address family not supported by protocol)"
        )
        interfaces.error = None
        await running.next_pass()
        assert running.stamp(COUNT_PROPERTY) > count_stamp
        assert running.service.status() == "network 2 interfaces"


async def test_a_stop_deletes_every_net_property(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, interfaces: Interfaces
) -> None:
    """A stop deletes everything under Net/, as VBoxService does at termination, so no host
    tool reads a stale address at the next boot; on no client left open."""
    names = [*network_properties([ETH0, ETH1]), f"{NET_PREFIX}7/Name"]
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device:
            async with trio.open_nursery() as nursery:
                pump = EventPump(device)
                service = network_service(
                    ServiceContext(device, pump), NetworkSection(), interfaces
                )
                await nursery.start(pump.run)
                await nursery.start(service.run)
                host.prop_set(f"{NET_PREFIX}7/Name", "written since")
                nursery.cancel_scope.cancel()
            assert all(host.prop_get(name) is not None for name in names)
            await service.drain()
            assert [name for name in names if host.prop_get(name) is not None] == []
            assert host.status()["hgcm_clients"] == 0


@pytest.mark.parametrize("growing", [False, True], ids=["unended", "ever-growing"])
async def test_a_malformed_list_of_owned_names_is_counted_not_fatal(
    autojump_clock: trio.abc.Clock, interfaces: Interfaces, growing: bool
) -> None:
    """An ENUM_PROPS reply that breaks the ABI (a list never ended), or a list that outgrows
    every buffer (``PropertiesGrowingError``, named as such: it read as a malformed reply),
    is a host error like a refusal: logged when it begins, shown in the status, tried again
    at the next pass; the interfaces are published meanwhile, and the drain still deletes
    what the service wrote."""
    cause, detail, text = (
        ("properties kept growing", "error", "kept growing while they were listed")
        if growing
        else ("malformed reply", "malformed_reply", "does not end")
    )
    host = SimulatedHost(services=[MalformedLists(growing=growing)])
    names = network_properties(interfaces.now)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            async with open_device(SimOpener(host)) as device:
                async with trio.open_nursery() as nursery:
                    running = Running(host)
                    context = ServiceContext(device, EventPump(device), running.status_changed)
                    service = network_service(
                        context, NetworkSection(interval_s=INTERVAL_S), interfaces
                    )
                    running.start(service)
                    await nursery.start(context.pump.run)
                    await nursery.start(service.run)
                    await running.next_pass()
                    assert all(running.value(name) == value for name, value in names.items())
                    assert service.status() == f"network: owned names unlisted ({cause})"
                    nursery.cancel_scope.cancel()
                await service.drain()
            assert [name for name in names if host.prop_get(name) is not None] == []
            vm.cancel_scope.cancel()
    unlisted = [line for line in logs if line["event"] == "owned_properties_unlisted"]
    assert len(unlisted) == 1
    assert unlisted[0]["patterns"] == [f"{NET_PREFIX}*"]
    assert text in unlisted[0][detail]


async def test_a_host_without_the_property_service_is_tried_again_each_pass(
    autojump_clock: trio.abc.Clock, interfaces: Interfaces
) -> None:
    """No property service on the host (where VBoxService disables its VM-info service): the
    service starts all the same, says so in its status, logs it once and connects at the next
    pass after the service appears; it is never a reason to restart."""
    host = SimulatedHost(services=[])
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
                running = Running(host)
                context = ServiceContext(device, EventPump(device), running.status_changed)
                service = network_service(
                    context, NetworkSection(interval_s=INTERVAL_S), interfaces
                )
                running.start(service)
                await nursery.start(context.pump.run)
                await nursery.start(service.run)
                await trio.sleep(INTERVAL_S * 2)
                await trio.testing.wait_all_tasks_blocked()
                assert service.status() == (
                    "network: property service unavailable (VERR_HGCM_SERVICE_NOT_FOUND)"
                )
                assert running.status_changes == 1
                host.register_hgcm_service(GuestPropertyService())
                await running.next_pass()
                assert running.value(COUNT_PROPERTY) == "2"
                assert service.status() == "network 2 interfaces"
                nursery.cancel_scope.cancel()
            vm.cancel_scope.cancel()
    connects = [line["event"] for line in logs if "property_service" in line["event"]]
    assert connects == ["property_service_unavailable", "property_service_connected_again"]


async def publish_then_die(host: SimulatedHost, interfaces: Interfaces) -> list[str]:
    """Run the service on ``host`` for one pass, then end it as a crash would (no stop);
    return the flags the host holds for each of its properties."""
    names = network_properties(interfaces.now)
    async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
        pump = EventPump(device)
        service = network_service(ServiceContext(device, pump), NetworkSection(), interfaces)
        await nursery.start(pump.run)
        await nursery.start(service.run)
        held = [host.prop_get(name) for name in names]
        nursery.cancel_scope.cancel()
    return [got[1] for got in held if got is not None]


async def test_a_vm_reset_takes_every_net_value_with_it(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, interfaces: Interfaces
) -> None:
    """Every value, Count too, is written TRANSRESET as VBoxService 7.2.6 writes them: after
    a VM reset, where the agent's stop never ran, no host tool (Vagrant's read_guest_ip)
    reads the previous boot's address."""
    with trio.fail_after(LIMIT_S):
        assert await publish_then_die(host, interfaces) == [FLAGS] * 13
        await host.reset()
    assert [name for name in network_properties(interfaces.now) if host.prop_get(name)] == []


async def test_a_power_off_takes_every_net_value_with_it(
    autojump_clock: trio.abc.Clock, interfaces: Interfaces
) -> None:
    """A power-off without the agent's stop (``VBoxManage controlvm VM poweroff``): the VM's
    next start holds nothing under Net/ before the agent publishes."""
    host = SimulatedHost(personality="mainline")
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            assert await publish_then_die(host, interfaces) == [FLAGS] * 13
            vm.cancel_scope.cancel()
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            left = [name for name in network_properties(interfaces.now) if host.prop_get(name)]
            vm.cancel_scope.cancel()
    assert left == []


PREVIOUS_BOOT: Final = (ETH0, ETH1, dataclasses.replace(ETH1, name="eth2"), ETH0)


async def test_a_previous_boot_s_entries_go_at_the_first_pass(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """Entries above today's count, left by an earlier boot, are deleted when the service
    starts; today's are written."""
    for name, value in network_properties(PREVIOUS_BOOT).items():
        assert value is not None
        host.prop_set(name, value)
    async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
        pump = EventPump(device)
        interfaces = Interfaces(ETH1)
        service = network_service(ServiceContext(device, pump), NetworkSection(), interfaces)
        with trio.fail_after(LIMIT_S):
            await nursery.start(pump.run)
            await nursery.start(service.run)
        held = {name: host.prop_get(name) for name in network_properties(PREVIOUS_BOOT)}
        assert {name: got[0] for name, got in held.items() if got is not None} == (
            network_properties([ETH1])
        )
        nursery.cancel_scope.cancel()


async def test_a_restore_deletes_the_saved_state_s_extra_entries(
    autojump_clock: trio.abc.Clock, running: Running
) -> None:
    """A restored store may hold entries the guest no longer has: they go at once."""
    with trio.fail_after(LIMIT_S):
        stale = f"{NET_PREFIX}3/V4/IP"
        running.host.prop_set(stale, "10.0.3.15")
        running.host.restore()
        await trio.testing.wait_all_tasks_blocked()
        assert running.value(stale) is None
        assert running.value(COUNT_PROPERTY) == "2"


async def test_a_restore_while_the_run_is_down_is_not_missed(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, interfaces: Interfaces
) -> None:
    """A run started again (after a supervisor's restart backoff) writes everything: a
    restore that came meanwhile had no one to hear it."""
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            pump = EventPump(device)
            service = network_service(ServiceContext(device, pump), NetworkSection(), interfaces)
            await nursery.start(pump.run)
            async with trio.open_nursery() as first_run:
                await first_run.start(service.run)
                first_run.cancel_scope.cancel()
            name = f"{NET_PREFIX}1/V4/IP"
            host.prop_delete(name)  # the restored store lacks it
            host.restore()
            await trio.testing.wait_all_tasks_blocked()
            await nursery.start(service.run)
            assert host.prop_get(name) is not None
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _started(
    host: SimulatedHost, interfaces: Interfaces, section: NetworkSection
) -> AsyncIterator[Running]:
    """The service on ``section``, started on ``host`` (whose properties the test set)."""
    async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
        running = Running(host)
        context = ServiceContext(device, EventPump(device), running.status_changed)
        running.start(network_service(context, section, interfaces))
        await nursery.start(context.pump.run)
        await nursery.start(running.service.run)
        await trio.testing.wait_all_tasks_blocked()
        yield running
        nursery.cancel_scope.cancel()


async def _passes_after(running: Running, seconds: float) -> int:
    """The passes made ``seconds`` from now (the clock jumps there)."""
    await trio.sleep(seconds)
    await trio.testing.wait_all_tasks_blocked()
    return running.service.statistics().passes


async def test_the_hosts_vminfo_interval_applies_at_start_and_after_a_restore(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, interfaces: Interfaces
) -> None:
    """``--vminfo-interval 30000`` (ms) over the section's 5 s; set while the VM was saved,
    the global ``--interval 20`` (s) is the one after the restore, as VBoxService reads them
    at start (``vbsvcVMInfoInit``)."""
    host.prop_set(f"{OPTION_PREFIX}vminfo-interval", "30000")
    section = NetworkSection(interval_s=INTERVAL_S)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _started(host, interfaces, section) as running:
            assert running.service.statistics().passes == 1
            assert await _passes_after(running, 29) == 1
            assert await _passes_after(running, 1) == 2
            host.prop_delete(f"{OPTION_PREFIX}vminfo-interval")
            host.prop_set(f"{OPTION_PREFIX}interval", "20")
            host.restore()
            assert await _passes_after(running, 0) == 3
            assert await _passes_after(running, 19) == 3
            assert await _passes_after(running, 1) == 4
    applied = [entry["interval_s"] for entry in logs if entry["event"] == "host_options_applied"]
    assert applied == [30.0, 20]


async def test_a_host_interval_out_of_the_sections_bounds_is_refused_in_one_line(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, interfaces: Interfaces
) -> None:
    """``--vminfo-interval 500`` is within VBoxService's bounds but under the section's 1 s:
    one warning names the property and the bound, and the interval falls back to the global
    ``--interval 15``, as VBoxService falls back where its own option is refused."""
    host.prop_set(f"{OPTION_PREFIX}vminfo-interval", "500")
    host.prop_set(f"{OPTION_PREFIX}interval", "15")
    section = NetworkSection(interval_s=INTERVAL_S)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with _started(host, interfaces, section) as running:
            assert await _passes_after(running, 14) == 1
            assert await _passes_after(running, 1) == 2
    refused = [entry["problem"] for entry in logs if entry["event"] == "host_option_refused"]
    assert refused == [
        f"{OPTION_PREFIX}vminfo-interval = '500': "
        "interval_s 0.5: input should be greater than or equal to 1"
    ]


async def test_host_options_off_keeps_the_sections_interval(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, interfaces: Interfaces
) -> None:
    """``host_options = false``: the section's 5 s, whatever the host sets; a reload that
    switches it needs a restart (the options are read at start), one that keeps it does
    not."""
    host.prop_set(f"{OPTION_PREFIX}vminfo-interval", "30000")
    section = NetworkSection(interval_s=INTERVAL_S, host_options=False)
    with trio.fail_after(LIMIT_S):
        async with _started(host, interfaces, section) as running:
            assert await _passes_after(running, INTERVAL_S) == 2
            assert running.service.reconfigure(NetworkSection(interval_s=INTERVAL_S)) is False
            assert running.service.reconfigure(section.model_copy(update={"interval_s": 6.0}))


def test_the_interval_has_named_bounds() -> None:
    """10 s by default, VBoxService 7.2.6's VM-info interval; below 1 s or above an hour is a
    config error."""
    assert NetworkSection().interval_s == UsersSection().interval_s == 10.0
    for bad in (0.5, 3601):
        with pytest.raises(pydantic.ValidationError):
            NetworkSection(interval_s=bad)


NAMESPACE_SETUP: Final = textwrap.dedent(
    """
    import dataclasses, json
    from agent.services import _netifaces
    from tests.services.netns_support import (
        add_bridge, add_unlabelled_address, delete_address, enter_new_network_namespace,
        set_address, set_mac, set_up,
    )

    sock = enter_new_network_namespace()
    set_up(sock, "lo")  # 127.0.0.1 appears, and must be left out
    for bridge in ("br7", "br8"):
        add_bridge(sock, bridge)
    set_address(sock, "br7", "10.9.8.7", "255.255.255.0", "10.9.8.255")
    set_mac(sock, "br7", "020000000A0B")
    set_up(sock, "br7")
    set_address(sock, "br7:1", "10.20.0.1")  # a labelled second address
    add_unlabelled_address("br7", "172.31.4.5", 16, "172.31.255.255")  # listed as "br7"
    set_address(sock, "br8", "172.16.1.2")  # br8 stays down

    def show(found):
        print(json.dumps([dataclasses.astuple(interface) for interface in found]))
    """
)
LIST_SCRIPT: Final = NAMESPACE_SETUP + "show(_netifaces.read_ipv4_interfaces())\n"
VANISHING_SCRIPT: Final = NAMESPACE_SETUP + textwrap.dedent(
    """
    listed = _netifaces._list_entries(sock)
    _netifaces._list_entries = lambda _sock: listed  # the listing, as it was
    delete_address("br7", "10.20.0.1", 8)  # then br7:1 goes before its own ioctls
    show(_netifaces.read_ipv4_interfaces())
    """
)
REPOSITORY: Final = Path(__file__).resolve().parents[2]
"""Where the scripts run, so that they find ``tests.services.netns_support``."""
MAC: Final = "020000000A0B"


def _in_namespace(script: str) -> list[NetInterface]:
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        check=False,
        cwd=REPOSITORY,
    )
    assert done.returncode == 0, done.stderr
    return [NetInterface(*fields) for fields in json.loads(done.stdout)]


def test_the_reader_lists_the_kernel_s_ipv4_interfaces() -> None:
    """In a namespace of its own: one entry per address, in device order, loopback left out,
    with the broadcast, netmask, MAC and state the kernel holds for that very address (a
    second address without a label of its own has its own netmask and broadcast, not those
    of the device's first address)."""
    found = _in_namespace(LIST_SCRIPT)
    assert found == [
        NetInterface("br7", "10.9.8.7", "10.9.8.255", "255.255.255.0", MAC, True),
        NetInterface("br7:1", "10.20.0.1", "10.255.255.255", "255.0.0.0", MAC, True),
        NetInterface("br7", "172.31.4.5", "172.31.255.255", "255.255.0.0", MAC, True),
        NetInterface("br8", "172.16.1.2", "172.16.255.255", "255.255.0.0", found[3].mac, False),
    ]
    assert len(found[3].mac) == 12


def test_an_address_gone_since_the_listing_is_skipped() -> None:
    """An address deleted between the listing and its own ioctls (``EADDRNOTAVAIL``) is left
    out; the rest of the pass is read."""
    assert [(found.name, found.address) for found in _in_namespace(VANISHING_SCRIPT)] == [
        ("br7", "10.9.8.7"),
        ("br7", "172.31.4.5"),
        ("br8", "172.16.1.2"),
    ]


ODD_NAME_SCRIPT: Final = textwrap.dedent(
    """
    import dataclasses, fcntl, json
    from agent.services import _netifaces
    from tests.services.netns_support import (
        SIOCBRADDBR, SIOCSIFADDR, enter_new_network_namespace, inet,
    )

    sock = enter_new_network_namespace()
    for raw, address in (
        (b"br\\xff", "10.1.0.1"),
        ("br\\u00e9".encode(), "10.2.0.1"),
        ("br\\uffff".encode(), "10.3.0.1"),
        (b"br\\xf4\\x90\\x80\\x80", "10.4.0.1"),  # PAST_UNICODE
    ):
        fcntl.ioctl(sock, SIOCBRADDBR, raw + b"\\0")
        fcntl.ioctl(sock, SIOCSIFADDR, raw.ljust(16, b"\\0") + inet(address).ljust(24, b"\\0"))
    found = _netifaces.read_ipv4_interfaces()
    print(json.dumps([dataclasses.astuple(interface) for interface in found]))
    """
)


def test_a_name_iprt_refuses_is_left_out() -> None:
    """Linux takes any bytes but '/', ':', whitespace and NUL in a device name. VBoxService
    publishes ``Name`` only where IPRT takes it as UTF-8, which is not where Python does: a
    name that is not UTF-8 at all, or holds U+FFFF, has no ``Name`` (rather than a mangled
    one, or a write the host refuses); one beyond ASCII is published as it is, and one with
    a code point past U+10FFFF (which IPRT takes and Python cannot decode) as its bytes."""
    found = _in_namespace(ODD_NAME_SCRIPT)
    assert [(interface.name, interface.address) for interface in found] == [
        (None, "10.1.0.1"),
        ("br\u00e9", "10.2.0.1"),
        (None, "10.3.0.1"),
        (host_str(PAST_UNICODE), "10.4.0.1"),
    ]
    properties = network_properties(found)
    assert properties[f"{NET_PREFIX}0/Name"] is None  # deleted, if an earlier pass wrote one
    assert properties[f"{NET_PREFIX}0/V4/IP"] == "10.1.0.1"
    assert properties[f"{NET_PREFIX}1/Name"] == "br\u00e9"
    assert properties[f"{NET_PREFIX}2/Name"] is None


async def test_a_name_python_cannot_decode_reaches_the_host_as_its_bytes(
    autojump_clock: trio.abc.Clock, running: Running, interfaces: Interfaces
) -> None:
    """An interface whose name IPRT takes but Python cannot decode replaces one with a plain
    name: the host holds the new name's very bytes, and the status is a plain count."""
    odd = NetInterface(host_str(PAST_UNICODE), "10.4.0.1", "10.255.255.255", "255.0.0.0", MAC, True)
    with trio.fail_after(LIMIT_S):
        assert running.value(f"{NET_PREFIX}0/Name") == "eth0"
        interfaces.now = (odd,)
        await running.next_pass()
        assert running.value(f"{NET_PREFIX}0/V4/IP") == "10.4.0.1"
        name = running.value(f"{NET_PREFIX}0/Name")
        assert name is not None
        assert host_bytes(name) == PAST_UNICODE
        assert running.service.status() == "network 1 interface"


async def test_writes_the_host_ignored_are_made_again_once_it_takes_them(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, interfaces: Interfaces
) -> None:
    """With the host's global RDONLYGUEST every write and delete is answered
    VINF_PERMISSION_DENIED and changes nothing: the status says so, one warning while it
    lasts, each pass writes and deletes again, and the first pass after the host lifts the
    flag publishes everything, with one info line; a drain the host ignored leaves the
    service published, and the next deletes. (Ignored writes counted as made: only the
    beacon was written again, never the rest, and each pass logged it.)"""
    stale = f"{NET_PREFIX}9/Name"  # a previous boot's
    host.prop_set(stale, "gone")
    names = network_properties(interfaces.now)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(SimOpener(host)) as device:
            async with trio.open_nursery() as nursery:
                running = Running(host)
                context = ServiceContext(device, EventPump(device), running.status_changed)
                service = network_service(
                    context, NetworkSection(interval_s=INTERVAL_S), interfaces
                )
                running.start(service)
                _global_flags(host, RDONLYGUEST)
                await nursery.start(context.pump.run)
                await nursery.start(service.run)
                await running.next_pass()
                await running.next_pass()
                assert service.status() == (
                    "network: writes ignored by the host (VINF_PERMISSION_DENIED)"
                )
                assert [name for name in names if host.prop_get(name) is not None] == []
                assert running.value(stale) == "gone"
                _global_flags(host, NILFLAG)
                await running.next_pass()
                assert {name: running.value(name) for name in names} == names
                assert host.prop_get(stale) is None
                assert service.status() == "network 2 interfaces"
                nursery.cancel_scope.cancel()
            _global_flags(host, RDONLYGUEST)
            await service.drain()
            assert {name: running.value(name) for name in names} == names
            _global_flags(host, NILFLAG)
            await service.drain()
            assert [name for name in names if host.prop_get(name) is not None] == []
    events = [line["event"] for line in logs]
    assert events.count("property_writes_ignored") == 2  # the passes, then the first drain
    assert events.count("property_writes_taken_again") == 2
    assert events.count("published_deleted") == 1


async def test_a_delete_taken_while_writes_are_ignored_leaves_them_ignored(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """With the host's global RDONLYGUEST the writes of an interface are ignored while the
    delete of its absent ``Name`` (not UTF-8) succeeds, as a delete of a missing property
    does: the host still ignores the writes, so the status says so and no line says it
    takes them again."""
    interfaces = Interfaces(dataclasses.replace(ETH0, name=None))
    _global_flags(host, RDONLYGUEST)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            running = Running(host)
            context = ServiceContext(device, EventPump(device), running.status_changed)
            service = network_service(context, NetworkSection(interval_s=INTERVAL_S), interfaces)
            running.start(service)
            await nursery.start(context.pump.run)
            await nursery.start(service.run)
            await running.next_pass()
            assert service.status() == (
                "network: writes ignored by the host (VINF_PERMISSION_DENIED)"
            )
            nursery.cancel_scope.cancel()
    events = [line["event"] for line in logs]
    assert events.count("property_writes_ignored") == 1
    assert "property_writes_taken_again" not in events


def _global_flags(host: SimulatedHost, flags: int) -> None:
    """Set the host's property service's global flags (RDONLYGUEST: guest writes ignored)."""
    service = host.vmmdev.hgcm.service(SERVICE_NAME)
    assert isinstance(service, GuestPropertyService)
    service.set_global_flags(flags)
