"""The ``properties`` service against the in-process simulated host.

Rules of this test module:
- a real ``SimulatedHost`` behind ``SimOpener`` with the event pump, virtual clock
  (``autojump_clock``, a parameter of each test: pytest-trio ignores a clock named in
  ``usefixtures``), each test bounded by ``trio.fail_after``; ordering by
  ``wait_all_tasks_blocked``;
- the host's view is checked (``prop_get``, ``status``), not just the service's counters.
"""

from __future__ import annotations

import os
from typing import Final

import structlog.testing
import trio
import trio.testing

from agent import __version__
from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.host.guest_props import GuestPropertyService
from agent.protocol.guest_props import NILFLAG, RDONLYGUEST, SERVICE_NAME
from agent.services import EventPump, ServiceContext
from agent.services.properties import (
    AGENT_VERSION_PROPERTY,
    RETRY_S,
    PropertiesSection,
    PropertiesService,
    PropertiesStatistics,
    published_properties,
)

LIMIT_S: Final = 60
WRITTEN: Final = ("Product", "Release", "Version", "ServicePack")
"""The OS properties VBoxService's VM-info service writes on Linux."""


def _values_and_flags(host: SimulatedHost) -> dict[str, tuple[str, str] | None]:
    """Each property the service writes, by name, as the host keeps it (value, flags)."""
    names = [*(f"/VirtualBox/GuestInfo/OS/{key}" for key in WRITTEN), AGENT_VERSION_PROPERTY]
    found = {name: host.prop_get(name) for name in names}
    return {name: None if got is None else got[:2] for name, got in found.items()}


async def test_publishes_and_republishes_after_a_restore(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """OS and agent version are published at start and again after a restore, on the client
    the service keeps; stopping releases it."""
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            pump = EventPump(device)
            service = PropertiesService(ServiceContext(device, pump))
            assert service.status() == "properties setting up"
            await nursery.start(pump.run)
            await nursery.start(service.run)
            assert service.status() == "properties ok"
            uname = os.uname()
            assert _values_and_flags(host) == {
                "/VirtualBox/GuestInfo/OS/Product": (uname.sysname, ""),
                "/VirtualBox/GuestInfo/OS/Release": (uname.release, ""),
                "/VirtualBox/GuestInfo/OS/Version": (uname.version, ""),
                "/VirtualBox/GuestInfo/OS/ServicePack": ("", ""),
                "/VirtualBox/GuestAdd/VBoxAgent/Version": (__version__, ""),
            }
            assert host.status()["hgcm_clients"] == 1
            host.prop_delete(AGENT_VERSION_PROPERTY)
            host.restore()
            await trio.testing.wait_all_tasks_blocked()
            assert service.statistics().publications == 2
            assert host.prop_get(AGENT_VERSION_PROPERTY) is not None
            assert host.status()["hgcm_clients"] == 1
            nursery.cancel_scope.cancel()
        await service.drain()
    assert host.status()["hgcm_clients"] == 0
    assert service.reconfigure(PropertiesSection()) is True


async def test_a_refused_property_shows_in_the_status(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """A property the host made read-only is reported, the others still published."""
    host.prop_set(AGENT_VERSION_PROPERTY, "host-owned", "RDONLYGUEST")
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            pump = EventPump(device)
            service = PropertiesService(ServiceContext(device, pump))
            await nursery.start(pump.run)
            await nursery.start(service.run)
            assert service.status() == (
                f"properties: {AGENT_VERSION_PROPERTY} refused (VERR_PERMISSION_DENIED)"
            )
            assert service.statistics().refused == 1
            assert all(
                host.prop_get(name) is not None
                for name in published_properties()
                if name != AGENT_VERSION_PROPERTY
            )
            nursery.cancel_scope.cancel()


async def test_a_host_without_the_property_service_is_tried_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """No property service on the host (VBoxService then disables its VM-info service): the
    service starts all the same, says why in its status, logs it once, connects again every
    ``RETRY_S`` and publishes once the host has the service."""
    host = SimulatedHost(services=[])
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
                pump = EventPump(device)
                service = PropertiesService(ServiceContext(device, pump))
                await nursery.start(pump.run)
                await nursery.start(service.run)
                assert service.status() == (
                    "properties: property service unavailable (VERR_HGCM_SERVICE_NOT_FOUND)"
                )
                await trio.sleep(RETRY_S * 2.5)
                assert service.statistics() == PropertiesStatistics(0, 0, 3)
                host.register_hgcm_service(GuestPropertyService())
                await trio.sleep(RETRY_S)
                assert service.status() == "properties ok"
                assert all(host.prop_get(name) is not None for name in published_properties())
                nursery.cancel_scope.cancel()
            vm.cancel_scope.cancel()
    connects = [line["event"] for line in logs if "property_service" in line["event"]]
    assert connects == ["property_service_unavailable", "property_service_connected_again"]


async def test_writes_the_host_ignored_are_made_again_once_it_takes_them(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """With the host's global RDONLYGUEST the writes are answered VINF_PERMISSION_DENIED
    and change nothing: the status says so, one warning while it lasts, the writes are made
    again every RETRY_S, and once the host takes them the publication is done, with one
    info line. (They counted as written: nothing was published until a restore.)"""
    service_of_host = host.vmmdev.hgcm.service(SERVICE_NAME)
    assert isinstance(service_of_host, GuestPropertyService)
    service_of_host.set_global_flags(RDONLYGUEST)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            pump = EventPump(device)
            service = PropertiesService(ServiceContext(device, pump))
            await nursery.start(pump.run)
            await nursery.start(service.run)
            await trio.sleep(3 * RETRY_S)
            assert service.status() == (
                "properties: writes ignored by the host (VINF_PERMISSION_DENIED)"
            )
            assert service.statistics().publications == 0
            assert set(_values_and_flags(host).values()) == {None}
            service_of_host.set_global_flags(NILFLAG)
            await trio.sleep(RETRY_S)
            await trio.testing.wait_all_tasks_blocked()
            assert service.status() == "properties ok"
            assert service.statistics().publications == 1
            assert None not in _values_and_flags(host).values()
            nursery.cancel_scope.cancel()
    events = [line["event"] for line in logs]
    assert events.count("property_writes_ignored") == 1
    assert events.count("property_writes_taken_again") == 1
    assert events.count("properties_published") == 1
