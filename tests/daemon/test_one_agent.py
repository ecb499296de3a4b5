"""One agent per device: a second agent on a device another one holds leaves before it changes
anything, and the first runs on untouched (two agents on one VM undo each other's work: the
second's stop deleted the first's properties and reported the facility Terminated).

Rules of this test module:
- Both agents are real ``Daemon`` runs over the real ``CharDevOpener``/``CharDevTransport``
  (worker threads and all); only the system calls are injected
  (``tests.device.syscalls.Kernel``: one node, whose ``flock(2)`` one open file holds, with
  a running ``SimulatedHost`` as the driver behind it). The real ``flock(2)`` is tested on
  a file (tests/device/test_chardev.py, ``TestClaim``).
- Real clock (threads); every test is bounded by ``fail_after``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest
import trio

from agent.config import AgentConfig
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.device import DeviceInUseError
from agent.protocol import Facility, FacilityStatus
from tests.device.syscalls import DEVICE_PATH, Kernel

if TYPE_CHECKING:
    from agent.host import SimulatedHost

BOUND: Final = 20.0
SERVICE: Final = str(int(Facility.VBOX_SERVICE))
OS_PRODUCT: Final = "/VirtualBox/GuestInfo/OS/Product"
"""A property the first agent publishes as it starts."""


def _facility(host: SimulatedHost) -> int:
    facilities = host.status()["facilities"]
    assert isinstance(facilities, dict)
    status = facilities[SERVICE]["status"]
    assert isinstance(status, int)
    return status


async def test_a_second_agent_is_refused_and_the_first_runs_on(host: SimulatedHost) -> None:
    """The second agent's run fails with ``DeviceInUseError`` (``run`` exits 69 with its
    one line) before it reports or publishes anything: the first agent's facility stays
    Active, its properties stay, and it stops as usual afterwards."""
    kernel = Kernel(host)
    first = Daemon(AgentConfig(), kernel.opener(), notifier=Notifier(None))
    second = Daemon(AgentConfig(), kernel.opener(), notifier=Notifier(None))
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            product = host.prop_get(OS_PRODUCT)
            assert product is not None
            assert _facility(host) == FacilityStatus.ACTIVE
            with pytest.RaisesGroup(DeviceInUseError, flatten_subgroups=True) as refused:
                await second.run()
            assert not second.device_opened
            assert _facility(host) == FacilityStatus.ACTIVE
            assert host.prop_get(OS_PRODUCT) == product
            first.request_shutdown("test")
    assert _facility(host) == FacilityStatus.TERMINATED
    (error,) = refused.value.exceptions
    assert str(error) == (
        f"{DEVICE_PATH} is in use by another vbox-agent (it holds the device's lock): one "
        "agent per device, stop the other first"
    )


async def test_the_device_is_free_again_once_its_agent_stopped(host: SimulatedHost) -> None:
    """The lock goes with the first agent's session: an agent started after it stopped runs."""
    kernel = Kernel(host)
    with trio.fail_after(BOUND):
        for _ in range(2):
            daemon = Daemon(AgentConfig(), kernel.opener(), notifier=Notifier(None))
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                assert kernel.locked_by is not None
                daemon.request_shutdown("test")
            assert kernel.locked_by is None
