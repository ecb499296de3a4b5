"""One agent per device: a second agent on a device another one holds leaves before it changes
anything, and the first runs on untouched (two agents on one VM undo each other's work: the
second's stop deleted the first's properties and reported the facility Terminated).

Rules of this test module:
- Both agents are real ``Daemon`` runs over the real ``CharDevOpener``/``CharDevTransport``
  (worker threads and all); only the system calls are injected
  (``tests.device.syscalls.Kernel``: one node, whose ``flock(2)`` one open file holds, with
  a running ``SimulatedHost`` as the driver behind it; kernels of two nodes of one driver
  share their ``AbstractNames``, the claim name's namespace, so no test binds the real
  name). The real ``flock(2)`` and ``bind(2)`` are tested on files and a name of the
  test's own (tests/device/test_chardev.py, ``TestClaim``); the tests of a flood of
  connections to the name, or of a failing ``accept(2)`` on it, bind a name of the test's
  own for real (``bind_claim_name``, ``failing_accept``), to which the test connects.
- Real clock (threads); every test is bounded by ``fail_after``.
"""

from __future__ import annotations

import errno
import os
from functools import partial
from typing import TYPE_CHECKING, Final, TypeAlias

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from agent.config import AgentConfig, DaemonConfig
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.device import DeviceInUseError
from agent.device.claimname import CLAIM_BACKLOG, HeldName, bind_claim_name
from agent.protocol import Facility, FacilityStatus
from tests.daemon.test_services import RecordingNotifier
from tests.device.syscalls import DEVICE_PATH, AbstractNames, Kernel
from tests.device.test_claimname import (
    asking,
    closing_all,
    connect,
    failing_accept,
    fill_queue,
    flood,
    open_sockets,
    served,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from agent.host import DriverSession, SimulatedHost

    NodeKernel: TypeAlias = Callable[[SimulatedHost, AbstractNames], Kernel[SimulatedHost]]

BOUND: Final = 20.0
USER_PATH: Final = "/dev/vboxuser"
COPY_PATH: Final = "/run/container/dev/vboxguest"
"""A node made with ``mknod`` with the driver's major:minor: an inode of its own."""
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


class UserNodeKernel(Kernel["SimulatedHost"]):
    """The driver's other node, ``/dev/vboxuser``: another inode, so a lock of its own, and a
    user session, which may still report facility status and make HGCM calls."""

    def new_session(self) -> DriverSession:
        """A session opened through ``/dev/vboxuser``."""
        return self.driver.open_session(user_device=True)


def _user_node(host: SimulatedHost, names: AbstractNames) -> Kernel[SimulatedHost]:
    return UserNodeKernel(host, path=USER_PATH, names=names)


def _copied_node(host: SimulatedHost, names: AbstractNames) -> Kernel[SimulatedHost]:
    return Kernel(host, path=COPY_PATH, names=names)


@pytest.mark.parametrize("other_node", [_user_node, _copied_node], ids=["vboxuser", "mknod"])
async def test_a_second_agent_on_another_node_of_the_driver_is_refused(
    host: SimulatedHost, other_node: NodeKernel
) -> None:
    """Another node of the driver has a ``flock(2)`` of its own, but not a claim name of its
    own: the second agent is refused with the same line, and the first runs on."""
    names = AbstractNames()
    kernel, other = Kernel(host, names=names), other_node(host, names)
    first = Daemon(AgentConfig(), kernel.opener(), notifier=Notifier(None))
    second = Daemon(AgentConfig(), other.opener(), notifier=Notifier(None))
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            product = host.prop_get(OS_PRODUCT)
            assert product is not None
            with pytest.RaisesGroup(DeviceInUseError, flatten_subgroups=True) as refused:
                await second.run()
            assert not second.device_opened
            assert other.locked_by is None  # its flock was taken, and went with its fd
            assert _facility(host) == FacilityStatus.ACTIVE
            assert host.prop_get(OS_PRODUCT) == product
            assert names.bound()
            first.request_shutdown("test")
    assert not names.bound()
    (error,) = refused.value.exceptions
    assert str(error) == (
        f"{other.path} is in use by another vbox-agent (it holds the device's lock): one "
        "agent per device, stop the other first"
    )


async def test_the_device_is_free_again_once_its_agent_stopped(host: SimulatedHost) -> None:
    """The lock and the name go with the first agent's session: an agent started after it
    stopped runs."""
    kernel = Kernel(host)
    with trio.fail_after(BOUND):
        for _ in range(2):
            daemon = Daemon(AgentConfig(), kernel.opener(), notifier=Notifier(None))
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                assert kernel.names.bound()
                assert kernel.locked_by is not None
                daemon.request_shutdown("test")
            assert not kernel.names.bound()
            assert kernel.locked_by is None


def _named_kernels(host: SimulatedHost, tmp_path: Path) -> tuple[bytes, Kernel[SimulatedHost]]:
    """A test's own claim name, bound for real, and a kernel of the driver's first node."""
    name = b"\0vbox-agent-test/%d/%s" % (os.getpid(), tmp_path.name.encode())
    return name, Kernel(host, claim_name_fn=partial(bind_claim_name, name))


async def test_a_flood_of_connections_to_the_name_refuses_no_later_agent(
    host: SimulatedHost, tmp_path: Path
) -> None:
    """Any local process may connect to the claim name, as often as it likes: the first
    agent accepts and closes every connection while it runs, so a second agent on another
    node (a lock of its own) that asks with the name's queue full at that instant is still
    refused (``run`` exits 69), and no descriptor is left open."""
    name, kernel = _named_kernels(host, tmp_path)
    other = Kernel(host, path=COPY_PATH, claim_name_fn=partial(bind_claim_name, name))
    first = Daemon(AgentConfig(), kernel.opener(), notifier=Notifier(None))
    second = Daemon(AgentConfig(), other.opener(), notifier=Notifier(None))
    before = open_sockets()
    with trio.fail_after(BOUND), closing_all([]) as connections:
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            await flood(name, connections)
            fill_queue(name, connections)
            try:
                with pytest.RaisesGroup(DeviceInUseError, flatten_subgroups=True):
                    await nursery.start(second.run)
                assert not second.device_opened
                assert _facility(host) == FacilityStatus.ACTIVE
                await trio.testing.wait_all_tasks_blocked()
                assert all(served(connection) for connection in connections)
            finally:
                second.request_shutdown("test")
                first.request_shutdown("test")
    assert _facility(host) == FacilityStatus.TERMINATED
    assert open_sockets() == before


async def test_a_stop_while_the_name_is_flooded_is_prompt(
    host: SimulatedHost, tmp_path: Path
) -> None:
    """The task serving the name runs until the device closes and delays no stop: one
    requested while processes keep connecting ends the run at once, and the name goes."""
    name, kernel = _named_kernels(host, tmp_path)
    config = AgentConfig(daemon=DaemonConfig(shutdown_timeout_s=1.0))
    daemon = Daemon(config, kernel.opener(), notifier=Notifier(None))
    asked = 0

    async def keep_connecting() -> None:
        nonlocal asked
        for _ in range(10_000_000):  # until the name is gone
            try:
                connection = connect(name)
            except ConnectionRefusedError:
                return
            if connection is not None:
                asked += 1
                connection.close()
            await trio.lowlevel.checkpoint()

    before = open_sockets()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as flooding:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                flooding.start_soon(keep_connecting)
                for _ in range(10_000_000):  # until more than two queues' worth asked
                    if asked > 2 * (CLAIM_BACKLOG + 1):
                        break
                    await trio.lowlevel.checkpoint()
                requested = trio.current_time()
                daemon.request_shutdown("test")
            took = trio.current_time() - requested
    assert took < config.daemon.shutdown_timeout_s
    assert asked > 2 * (CLAIM_BACKLOG + 1)
    with pytest.raises(ConnectionRefusedError):
        connect(name)
    assert open_sockets() == before


@pytest.mark.parametrize("code", [errno.EACCES, errno.ECONNABORTED], ids=errno.errorcode.get)
async def test_a_failed_accept_on_the_name_leaves_the_agent_running(
    host: SimulatedHost, tmp_path: Path, code: int
) -> None:
    """Any local process may connect to the claim name: ``accept(2)`` failing for it (a
    security policy that allows ``listen(2)`` but refuses the accept, a connection aborted)
    leaves the agent running, the name served, and the stop as usual."""
    name = b"\0vbox-agent-test/%d/%s" % (os.getpid(), tmp_path.name.encode())

    async def claim_name() -> HeldName:
        await trio.lowlevel.checkpoint()
        return HeldName(failing_accept(name, code))

    kernel = Kernel(host, claim_name_fn=claim_name)
    daemon = Daemon(AgentConfig(), kernel.opener(), notifier=Notifier(None))
    with trio.fail_after(BOUND), closing_all([]) as connections:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            connection = asking(name, connections)
            await trio.lowlevel.wait_readable(connection)
            assert served(connection)
            assert _facility(host) == FacilityStatus.ACTIVE
            daemon.request_shutdown("test")
    assert _facility(host) == FacilityStatus.TERMINATED


class FailingName:
    """A held claim name whose serving fails once :attr:`fail` is set; it counts its
    releases."""

    def __init__(self) -> None:
        self.fail = trio.Event()
        self.releases = 0

    async def serve(self) -> None:
        """Fail once told to."""
        await self.fail.wait()
        msg = "claim name serving failed"
        raise RuntimeError(msg)

    def release(self) -> None:
        """Count the release."""
        self.releases += 1


async def test_a_failing_claim_task_leaves_the_agent_running(host: SimulatedHost) -> None:
    """The task serving the claim name failing is logged (``claim_name_serve_failed``) and
    ends that task alone: the claim stays held, the agent runs on (facility Active, no
    ``STOPPING=1``), and its stop drains and reports as usual."""
    name = FailingName()

    async def claim_name() -> FailingName:
        await trio.lowlevel.checkpoint()
        return name

    kernel = Kernel(host, claim_name_fn=claim_name)
    notifier = RecordingNotifier()
    daemon = Daemon(AgentConfig(), kernel.opener(), notifier=notifier)
    with trio.fail_after(BOUND), capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            name.fail.set()
            await trio.testing.wait_all_tasks_blocked()
            assert [log["error"] for log in logs if log["event"] == "claim_name_serve_failed"] == [
                "RuntimeError('claim name serving failed')"
            ]
            assert _facility(host) == FacilityStatus.ACTIVE
            assert name.releases == 0
            assert kernel.locked_by is not None
            assert notifier.sent == ["READY=1"]
            daemon.request_shutdown("test")
    assert _facility(host) == FacilityStatus.TERMINATED
    assert name.releases == 1
    assert [message.split(" ")[0] for message in notifier.sent] == ["READY=1", "STOPPING=1"]
