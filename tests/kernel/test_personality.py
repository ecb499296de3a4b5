"""The ``kernel`` personality itself: the real driver loads, serves, is interrupted and resets.

Real threads and real time (the library's timers run on CLOCK_MONOTONIC), so every wait
here is bounded by ``WAIT_S`` and synchronises on the driver's answers, never on sleeps.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from agent.device import open_device
from agent.host import DriverLoadError, SimOpener, SimulatedHost
from agent.host.driver import PersonalityUnavailableError
from agent.protocol.constants import Event, RequestType
from agent.protocol.messages import ChangeFilterMask, InterruptAllWaits, WaitForEvents
from agent.protocol.status import VERR_GENERAL_FAILURE, VERR_NOT_SUPPORTED
from agent.services import EventPump
from testbed.kernel import KernelDriver
from testbed.realdriver import BUILD_SCRIPT, ENV_LIBRARY, build_script, locate_library
from tests.host.conftest import Client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

WAIT_S: Final = 10.0
MANY_BOOTS: Final = 400
"""Boots in one process for the long-run test: more than fit when each took 0x20 ports
from 0xD000 (the suite itself boots the real driver a few hundred times)."""


@pytest.fixture(name="host")
async def _host(kernel_library: Path) -> AsyncIterator[SimulatedHost]:
    del kernel_library
    host = SimulatedHost(personality="kernel", seed=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


def kernel(host: SimulatedHost) -> KernelDriver:
    """The host's driver, which is the real one."""
    assert isinstance(host.driver, KernelDriver)
    return host.driver


async def open_client(host: SimulatedHost, *, uid: int = 0) -> Client:
    """A session on the real driver through the in-process transport."""
    return Client(await SimOpener(host, uid=uid).open_session())


async def test_probe_reports_to_the_host(host: SimulatedHost) -> None:
    """The real load sequence reports the additions and the driver's facility to the host."""
    status = host.status()
    assert status["additions_reported"]
    assert host.vmmdev.facilities.snapshot()["20"]["status"] == 50  # VBoxGuest driver: Active
    assert status["filter_mask"] == Event.MOUSE_POSITION_CHANGED | Event.HGCM
    assert kernel(host).heartbeat_interval_ns == 2_000_000_000
    assert "vboxguest: host-version: 7.0.18r162988" in kernel(host).dmesg()


async def test_failed_probe_is_a_load_error(kernel_library: Path) -> None:
    """The real probe failing (GET_HOST_VERSION refused) is DriverLoadError; no device node."""
    del kernel_library
    host = SimulatedHost(personality="kernel")
    host.add_fault(RequestType.GET_HOST_VERSION, VERR_NOT_SUPPORTED)
    with trio.fail_after(WAIT_S), pytest.RaisesGroup(DriverLoadError, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
    with pytest.raises(FileNotFoundError):
        host.open_session()
    assert "vbg_query_host_version error" in kernel(host).dmesg()


async def test_event_reaches_a_waiter(host: SimulatedHost) -> None:
    """A host event raises the interrupt; the real ISR wakes the waiting ioctl."""
    client = await open_client(host)
    await client.request(ChangeFilterMask(Event.RESTORED, 0))
    host.raise_events(Event.RESTORED)
    with trio.fail_after(WAIT_S):
        received = await client.request(WaitForEvents(Event.RESTORED))
    assert received.mask == Event.RESTORED


async def test_cancelled_wait_is_interrupted(host: SimulatedHost) -> None:
    """Cancelling a WAIT_FOR_EVENTS in the driver signals its task, and the signal ends the
    wait (the driver returns -EINTR); the session stays usable."""
    client = await open_client(host)
    await client.request(ChangeFilterMask(Event.RESTORED, 0))
    driver = kernel(host)
    scope = trio.CancelScope()

    async def wait() -> None:
        with scope:
            await client.request(WaitForEvents(Event.RESTORED))

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await driver.wait_calls_in_flight(1)
            scope.cancel()
    assert scope.cancelled_caught
    assert driver.signalled_returns == [-errno.EINTR]
    host.raise_events(Event.RESTORED)
    with trio.fail_after(WAIT_S):
        received = await client.request(WaitForEvents(Event.RESTORED))
    assert received.mask == Event.RESTORED


async def test_close_ends_a_blocked_wait(host: SimulatedHost) -> None:
    """Closing a session interrupts its blocked wait (EINTR) before the real release runs."""
    client = await open_client(host)

    async def wait() -> None:
        with pytest.raises(OSError, match="Interrupted") as failure:
            await client.request(WaitForEvents(Event.RESTORED))
        assert failure.value.errno == errno.EINTR

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await client.transport.aclose()
    assert host.status()["sessions"] == 0


async def test_interrupt_all_ends_waits_for_good(host: SimulatedHost) -> None:
    """INTERRUPT_ALL_WAIT_FOR_EVENTS ends a blocked wait with EINTR."""
    client = await open_client(host)
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_eintr, client)
            await trio.testing.wait_all_tasks_blocked()
            await client.request(InterruptAllWaits())


async def expect_eintr(client: Client) -> None:
    """A wait on ``client`` fails with EINTR."""
    with pytest.raises(OSError, match="Interrupted") as failure:
        await client.request(WaitForEvents(Event.RESTORED))
    assert failure.value.errno == errno.EINTR


async def test_an_event_raised_while_the_filter_is_refused_reaches_the_pump(
    host: SimulatedHost,
) -> None:
    """The real driver rolls back a filter the host refused, so the host keeps the event
    it raises meanwhile pending: the pump, which retries the filter after a second instead
    of failing, hands it to its subscriber then."""
    host.add_fault(RequestType.CTL_GUEST_FILTER_MASK, VERR_GENERAL_FAILURE)
    with trio.fail_after(WAIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            pump = EventPump(device)
            with pump.subscribe("restore", Event.RESTORED) as restore:
                await nursery.start(pump.run)
                refused = pump.failing()
                host.raise_events(Event.RESTORED)
                assert await restore.receive() == Event.RESTORED
            assert pump.failing() is None
            nursery.cancel_scope.cancel()
    assert refused == "event filter refused (VERR_UNRESOLVED_ERROR)"


async def test_reset_loses_sessions_and_reloads(host: SimulatedHost) -> None:
    """A VM reset makes open sessions fail with ENODEV; a fresh probe serves new ones."""
    client = await open_client(host)
    with trio.fail_after(WAIT_S):
        await host.reset()
        with pytest.raises(OSError, match="No such device") as failure:
            await client.request(ChangeFilterMask(Event.RESTORED, 0))
        assert failure.value.errno == errno.ENODEV
        fresh = await open_client(host)
        await fresh.request(ChangeFilterMask(Event.RESTORED, 0))
    assert host.vmmdev.guest_filter & Event.RESTORED


async def test_one_process_boots_the_driver_many_times(kernel_library: Path) -> None:
    """Each boot probes at an I/O port no earlier boot used, and every port fits the driver's
    16 bits: hundreds of boots in one process all load."""
    del kernel_library
    with trio.fail_after(6 * WAIT_S):
        for _ in range(MANY_BOOTS):
            host = SimulatedHost(personality="kernel")
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                assert host.status()["additions_reported"]
                nursery.cancel_scope.cancel()


def test_simulate_without_the_library_says_why(tmp_path: Path) -> None:
    """``simulate --personality kernel`` without a library: one line naming it, exit 69."""
    missing = tmp_path / "libvbgreal.so"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "simulate",
            "--socket",
            str(tmp_path / "h.sock"),
            "--personality",
            "kernel",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT_S * 3,
        check=False,
        env=dict(os.environ, **{ENV_LIBRARY: str(missing)}),
    )
    assert result.returncode == 69
    assert result.stderr.count("\n") == 1
    assert str(missing) in result.stderr


def _git(*args: str) -> None:
    subprocess.run(["git", *args], capture_output=True, check=True, timeout=WAIT_S)  # noqa: S607


def test_a_clone_made_elsewhere_finds_the_build_script_beside_its_origin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain clone outside the tree that holds ``shared/`` finds ``build.sh`` beside the
    repository it was cloned from, as ``.ci/test`` does (it looked only above itself);
    without one, the refusal says how to provide the library."""
    script = tmp_path / "work" / BUILD_SCRIPT
    script.parent.mkdir(parents=True)
    script.write_text("echo /nowhere/libvbgreal.so\n")
    _git("init", "-q", str(tmp_path / "work" / "main"))
    _git("clone", "-q", str(tmp_path / "work" / "main"), str(tmp_path / "elsewhere" / "clone"))
    assert build_script(tmp_path / "elsewhere" / "clone") == script.resolve()
    _git("init", "-q", str(tmp_path / "alone"))
    assert build_script(tmp_path / "alone") is None
    monkeypatch.delenv(ENV_LIBRARY, raising=False)
    with pytest.raises(PersonalityUnavailableError) as caught:
        locate_library(tmp_path / "alone")
    assert str(caught.value) == (
        f"the real driver library is missing: set ${ENV_LIBRARY} to a built libvbgreal.so, or "
        f"put {BUILD_SCRIPT} (which builds it) beside {tmp_path / 'alone'} or a parent directory"
    )


async def test_a_session_closed_while_the_device_unplugs_is_released_once(
    kernel_library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session closed while the unplug releases the others (a client ending as the VM stops)
    is released by one of the two, once, and the unplug finishes."""
    del kernel_library
    host = SimulatedHost(personality="kernel", seed=1)
    released: list[object] = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            driver = kernel(host)
            driver.open_session()
            second = driver.open_session()
            release = driver._lib.shim_release
            run_in_thread = driver._thread

            async def counted(function: Callable[..., int], *args: object) -> int:
                if function is release:
                    released.append(args[0])
                result = await run_in_thread(function, *args)
                if function is release and len(released) == 1:
                    await driver.close_session(second)  # the unplug is between two releases
                return result

            monkeypatch.setattr(driver, "_thread", counted)
            nursery.cancel_scope.cancel()
    assert len(released) == len(set(released)) == 2


def test_the_build_takes_no_blocked_signal_from_its_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build script runs with no signal blocked, whatever its caller holds blocked
    (``simulate`` holds SIGTERM and SIGINT until its host runs): it inherited them, so
    Ctrl-C could not stop a build."""
    script = tmp_path / "work" / BUILD_SCRIPT
    script.parent.mkdir(parents=True)
    script.write_text("echo \"/$(awk '/^SigBlk:/ {print $2}' /proc/self/status)\"\n")
    _git("init", "-q", str(tmp_path / "work" / "main"))
    monkeypatch.delenv(ENV_LIBRARY, raising=False)
    held = (signal.SIGTERM, signal.SIGINT)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        library = locate_library(tmp_path / "work" / "main")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert int(library.name, 16) == 0
