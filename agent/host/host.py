"""``SimulatedHost``: one simulated VM (VMMDev, HGCM services, a driver personality).

Synopsis::

    host = SimulatedHost(personality="mainline")
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)          # the driver loads, as at guest boot
        session = host.open_session()
        await host.ioctl(session, code, buffer, memory)
        host.set_balloon_target(256)           # as VBoxManage controlvm ... guestmemoryballoon

Device sessions go through the driver personality; the control methods act as VBoxManage
and Main would.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, runtime_checkable

import trio

from agent.host._heartbeat import DEFAULT_INTERVAL_NS
from agent.host._log import host_log as _log
from agent.host._stats import GUEST_CPUS
from agent.host.driver import DriverModel, DriverSession, OracleDriver, personality_spec
from agent.host.guest_props import SERVICE_NAME as GUEST_PROP_SERVICE, GuestPropertyService
from agent.host.vmmdev import DEFAULT_RAM_MB, HOST_VERSION, VMMDev
from agent.protocol.constants import VALID_EVENT_MASK, CpuEventType
from agent.protocol.errors import VBoxStatusError
from agent.protocol.status import STATUS_CODES, VINF_SUCCESS, status_name

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterable

    from agent.host.hgcm_service import HgcmService
    from agent.host.memory import GuestMemory

__all__ = ["DriverSession", "GuestPropertyControl", "SimulatedHost"]

VERR_RESOURCE_BUSY: Final = STATUS_CODES["VERR_RESOURCE_BUSY"]


@runtime_checkable
class GuestPropertyControl(Protocol):
    """The host-side calls of the guest-property service (as Main makes them)."""

    def host_set(self, name: str, value: str, flags: str = "") -> None:
        """Set a property as the host."""
        ...

    def host_get(self, name: str) -> tuple[str, str, int] | None:
        """Return ``(value, flags, timestamp)`` or ``None``."""
        ...

    def host_delete(self, name: str) -> None:
        """Delete a property as the host."""
        ...


class SimulatedHost:
    """A simulated VirtualBox VM as the guest's userspace sees it.

    Args:
        personality: the kernel driver in front of the device (``mainline``, ``oracle``,
            ``passthrough``, or ``kernel``: the real Linux driver from the test bed).
        ram_mb: guest RAM in MiB.
        cpus: the guest's CPU count, by default this machine's (its ``/proc/stat`` is the
            guest's); Main averages the reported CPU loads over it.
        heartbeat_interval_ns: the host's ``HeartbeatInterval``.
        heartbeat_timeout_ns: ``HeartbeatTimeout`` (default twice the interval).
        host_time_enabled: whether GET_HOST_TIME answers (else VERR_NOT_SUPPORTED).
        core_dump_enabled: whether WRITE_COREDUMP is allowed (else VERR_ACCESS_DENIED).
        seed: seeds the session ids, for reproducible runs.
        services: HGCM services to register; by default the guest-property service.
        r3_balloon: Oracle's driver without its kernel balloon allocator (CHECK_BALLOON
            answers ``handle_in_r3`` from its first inflate on); only with
            ``personality="oracle"``.

    Raises:
        ValueError: unknown personality, or ``r3_balloon`` with another one.
        PersonalityUnavailableError: an external personality that cannot run here.
    """

    def __init__(
        self,
        *,
        personality: str = "mainline",
        ram_mb: int = DEFAULT_RAM_MB,
        cpus: int = GUEST_CPUS,
        heartbeat_interval_ns: int = DEFAULT_INTERVAL_NS,
        heartbeat_timeout_ns: int | None = None,
        host_time_enabled: bool = True,
        core_dump_enabled: bool = False,
        seed: int | None = None,
        services: Iterable[HgcmService] | None = None,
        r3_balloon: bool = False,
    ) -> None:
        self._spec = personality_spec(personality)
        if r3_balloon and personality != OracleDriver.personality:
            msg = f"a ring-3 balloon is an option of the oracle personality, not of {personality!r}"
            raise ValueError(msg)
        self.personality = personality
        self.ram = self._spec.make_ram(ram_mb)
        self.vmmdev = VMMDev(
            self.ram,
            ram_mb=ram_mb,
            cpus=cpus,
            heartbeat_interval_ns=heartbeat_interval_ns,
            heartbeat_timeout_ns=heartbeat_timeout_ns,
            host_time_enabled=host_time_enabled,
            core_dump_enabled=core_dump_enabled,
            seed=seed,
        )
        self._r3_balloon = r3_balloon
        self.driver = self._load_driver()
        for service in (GuestPropertyService(),) if services is None else services:
            self.register_hgcm_service(service)
        self._nursery: trio.Nursery | None = None
        self._driver_scope = trio.CancelScope()
        self._resetting = trio.Lock()

    def _load_driver(self) -> DriverModel:
        """The guest's driver as this host's guest builds it (at power-on and every reboot)."""
        if self._r3_balloon:
            return OracleDriver(self.vmmdev, self.ram, r3_balloon=True)
        return self._spec.make_driver(self.vmmdev, self.ram)

    # --- set-up and running ----------------------------------------------------------------

    def register_hgcm_service(self, service: HgcmService) -> None:
        """Make ``service`` available to HGCM_CONNECT by its name.

        Raises:
            ValueError: a service of that name is registered.
        """
        self.vmmdev.hgcm.register(service)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Power the VM on, load the driver, then run the host's timers until cancelled.

        ``started()`` comes once the driver has loaded (the additions reported in).

        Raises:
            RuntimeError: the host is already running.
            DriverLoadError: the driver refused to load (an injected fault, for example).
        """
        if self._nursery is not None:
            msg = "this simulated host is already running"
            raise RuntimeError(msg)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.vmmdev.hgcm.power_on()
                nursery.start_soon(self.vmmdev.run)
                self._driver_scope = await nursery.start(self._run_driver, self.driver)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    @staticmethod
    async def _run_driver(
        driver: DriverModel, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(driver.run)
                task_status.started(scope)

    # --- device sessions ---------------------------------------------------------------------

    def open_session(self, *, user_device: bool = False, uid: int = 0) -> DriverSession:
        """Open ``/dev/vboxguest`` (or ``/dev/vboxuser`` with ``user_device``) as ``uid``.

        An open while a reset runs (from the old boot's end until the new driver has
        loaded) reaches the old boot's driver, which the caller belongs to: its open sends
        the host nothing (``vbg_core_open_session``, ``VGDrvCommonCreateUserSession``), so
        it succeeds with a session lost at once, whose first ioctl fails with ENODEV. Once
        a reset has ended without loading the new driver (it failed, or the VM powered off
        meanwhile), no driver is left to open.

        Raises:
            FileNotFoundError: no driver is loaded (the host is not running).
        """
        driver = self.driver
        if not driver.loaded or (driver.lost and not self._resetting.locked()):
            node = "vboxuser" if user_device else "vboxguest"
            raise FileNotFoundError(errno.ENOENT, "the simulated host is not running", node)
        return driver.open_session(user_device=user_device, uid=uid)

    def ioctl(
        self, session: DriverSession, code: int, buffer: bytearray, memory: GuestMemory
    ) -> Coroutine[Any, Any, None]:
        """Perform one ioctl (await the result); raises ``OSError(errno)`` as the kernel
        returns it.

        A plain function returning the current driver's ``ioctl`` coroutine, so that no
        frame of its own lies under every in-process call, which the driver's checkpoint
        suspends and resumes through.
        """
        return self.driver.ioctl(session, code, buffer, memory)

    async def close_session(self, session: DriverSession) -> None:
        """Close the session: its filter bits, capabilities, HGCM clients (and balloon) go."""
        await self.driver.close_session(session)

    # --- control, as VBoxManage ------------------------------------------------------------------

    def set_balloon_target(self, mb: int) -> None:
        """``controlvm guestmemoryballoon``: raise 0x40 if ``mb`` differs from the acknowledged.

        Raises:
            ValueError: ``mb`` is negative or not below 90 % of guest RAM.
        """
        self.vmmdev.set_balloon_target(mb)

    def raise_events(self, mask: int) -> None:
        """Raise host events (``VMMDEV_EVENT_*`` bits).

        Raises:
            ValueError: ``mask`` is zero or has bits outside 0x7FF.
        """
        if mask <= 0 or mask & ~VALID_EVENT_MASK:
            msg = f"event mask {mask:#x} must be non-zero and within {VALID_EVENT_MASK:#x}"
            raise ValueError(msg)
        self.vmmdev.raise_events(mask)

    def set_statistics_interval(self, seconds: int) -> None:
        """``IGuest::statisticsUpdateInterval``: a report every ``seconds`` (0 stops them).

        Raises:
            ValueError: ``seconds`` is negative or above a u32.
        """
        self.vmmdev.set_statistics_interval(seconds)

    def cpu_plug(self, core: int, package: int = 0) -> None:
        """``controlvm plugcpu``: attach the CPU with these ids and tell the guest.

        As Main's ``Console::i_doCPUAdd``, the plug succeeds whatever VMMDev answers: where
        the guest does not monitor CPU hot-plug the notification is lost (logged here), and
        the CPU stays offline in the guest.

        Raises:
            ValueError: an id is not a u32.
        """
        rc = self.vmmdev.cpu_hotplug.notify(CpuEventType.PLUG, core, package)
        if rc != VINF_SUCCESS:
            _log.info("cpu_plug_not_notified", core=core, package=package, status=status_name(rc))

    def cpu_unplug(self, core: int, package: int = 0) -> None:
        """``controlvm unplugcpu``: ask the guest to give up the CPU with these ids.

        Where the guest does not monitor CPU hot-plug, Main's ``Console::i_doCPURemove``
        looks once whether the guest ejected the CPU anyway and otherwise gives up with
        VERR_RESOURCE_BUSY; the simulated host never sees an ejection (the guest's is in its
        own sysfs), so it always gives up.

        Raises:
            ValueError: an id is not a u32.
            VBoxStatusError: the guest does not monitor CPU hot-plug (VERR_RESOURCE_BUSY,
                the CPU may still be in use).
        """
        rc = self.vmmdev.cpu_hotplug.notify(CpuEventType.UNPLUG, core, package)
        if rc != VINF_SUCCESS:
            # VBoxStatusError says "OPERATION failed: STATUS": the why goes inside OPERATION.
            what = (
                f"CPU unplug (core {core}, package {package}; not monitored by the guest, "
                "which may still use the CPU)"
            )
            raise VBoxStatusError(VERR_RESOURCE_BUSY, what)

    def restore(self) -> None:
        """Restore from a saved state: new session id, HGCM calls re-sent, no balloon target
        acknowledged (the target stays), no statistics interval (a new VM process's Main asks
        for none), CPU hot-plug monitoring off, RESTORED raised."""
        self.vmmdev.restore()

    async def reset(self) -> None:
        """Reset the VM: the guest reboots, so every open session is lost (ENODEV) and a fresh
        driver loads; HGCM clients are disconnected and facilities go inactive.

        A request the old boot's driver is writing to the port (one a delay holds) is handled
        first, as a real reset waits for every vCPU to leave its port write: so the reset
        takes as long as that write, and no request of the old boot reaches the reset device.

        The old boot's driver sends nothing more: a request of it still on its way (waiting
        for a lock, say) fails with ENODEV instead of reaching the reset device.

        Raises:
            RuntimeError: the host is not running, or it powered off while the reset waited
                (the device is then left as the power-off left it, the old boot lost).
            DriverLoadError: the new boot's driver refused to load (in an exception group);
                the old boot is lost all the same, so opens are refused as "not running".
        """
        nursery = self._nursery
        if nursery is None:
            msg = "the simulated host is not running"
            raise RuntimeError(msg)
        async with self._resetting:  # one reset at a time: each ends the boot it began on
            self._driver_scope.cancel()
            self.driver.shutdown()
            await self.vmmdev.finish_port_writes()
            if self._nursery is not nursery or self.vmmdev.powered_off:
                msg = "the simulated host is not running"
                raise RuntimeError(msg)
            self.vmmdev.reset()
            booting = self._load_driver()
            # The old boot's driver answers opens until the new one has loaded.
            self._driver_scope = await nursery.start(self._run_driver, booting)
            self.driver = booting

    def add_fault(self, request_type: int, status: int, count: int = 1) -> None:
        """Answer the next ``count`` VMMDev requests of ``request_type`` with ``status``."""
        self.vmmdev.add_fault(request_type, status, count)

    def clear_faults(self, request_type: int | None = None) -> int:
        """Drop the queued faults of ``request_type`` (of every type with None); return how
        many answers they still held."""
        return self.vmmdev.clear_faults(request_type)

    def set_delay(self, request_type: int, seconds: float) -> None:
        """Hold every request of ``request_type`` for ``seconds`` (0 clears): a slow host.
        The requests of that type held already end ``seconds`` after each was written (at
        once with 0)."""
        self.vmmdev.set_delay(request_type, seconds)

    add_delay = set_delay
    """The name the control socket's ``delay`` command uses."""

    def prop_set(self, name: str, value: str, flags: str = "") -> None:
        """Set a guest property as the host (``guestproperty set``).

        Raises:
            ValueError: invalid name, value or flags.
            VBoxStatusError: the service refused it (a property read-only for the host, a
                full service).
            LookupError: no guest property service is registered.
        """
        self._properties().host_set(name, value, flags)

    def prop_get(self, name: str) -> tuple[str, str, int] | None:
        """Return ``(value, flags, timestamp)`` of a guest property, or ``None``."""
        return self._properties().host_get(name)

    def prop_delete(self, name: str) -> None:
        """Delete a guest property as the host (``guestproperty delete``).

        Raises:
            ValueError: invalid name.
            VBoxStatusError: the service refused it (a property read-only for the host).
            LookupError: no guest property service is registered.
        """
        self._properties().host_delete(name)

    def _properties(self) -> GuestPropertyControl:
        service: object = self.vmmdev.hgcm.service(GUEST_PROP_SERVICE)
        if isinstance(service, GuestPropertyControl):
            return service
        msg = f"no guest property service ({GUEST_PROP_SERVICE}) is registered"
        raise LookupError(msg)

    def status(self) -> dict[str, object]:
        """Return the host's state as a JSON-ready dict (``vbox-agent host status``)."""
        dev = self.vmmdev
        major, minor, build, revision = HOST_VERSION
        return {
            "personality": self.personality,
            "host_version": f"{major}.{minor}.{build}r{revision}",
            "session_id": dev.session_id,
            "ram_mb": dev.ram_mb,
            "additions_reported": dev.guest.additions_ok,
            "filter_mask": dev.guest_filter,
            "pending_events": dev.pending_events,
            "guest_capabilities": dev.guest.capabilities,
            "balloon": {
                "target_mb": dev.balloon.target_mb,
                "acked_mb": dev.balloon.acked_mb,
                "max_mb": dev.balloon.max_mb,
                "chunks": dev.balloon.chunks,
                "pages": dev.balloon.pages,
            },
            "heartbeat": dev.heartbeat.snapshot(),
            "guest_stats": dev.guest_stats.snapshot(),
            "cpu_hotplug": dev.cpu_hotplug.snapshot(),
            "facilities": dev.facilities.snapshot(),
            "hgcm_clients": dev.hgcm.client_count,
            "hgcm_pending_calls": dev.hgcm.pending_calls,
            "sessions": len(self.driver.sessions),
            "core_dumps": dev.core_dumps,
            "faults": dev.faults.queued_faults(),
            "delays": dev.faults.active_delays(),
            "held_requests": dev.held_requests(),
        }
