"""The ``kernel`` personality: the real Linux 6.12 vboxguest driver in front of the VMMDev.

Ioctls, open and release run the driver's own ``vbg_misc_device_*`` entry points from
:mod:`testbed.realdriver`; every request the driver writes to its port reaches the
simulated VMMDev (from whichever driver thread wrote it, through the loop's trio token);
when the VMMDev raises its interrupt line the real ``vbg_core_isr`` runs. Guest RAM is the
library's arena, so the VMMDev reads and writes the very buffers the driver allocated.

Threads: the driver blocks (waits, HGCM completion, its mutexes), so ioctls, release,
probe, unplug and the ISR run on worker threads and never on the trio thread. Open is the
exception: ``vbg_core_open_session`` only allocates, so it runs inline and ``open_session``
stays synchronous like the other personalities'. A cancelled ioctl is a signal to its task
(``shim_task_interrupt``): a blocked wait returns EINTR, a pending HGCM call is cancelled.
"""

from __future__ import annotations

import ctypes
import errno
import json
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn, TypeVar

import trio

from agent.host.driver import DriverLoadError, DriverSession, PersonalitySpec
from agent.host.driver._util import fail
from testbed.realdriver import ARENA_MB, ArenaMemory, real_driver

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.host.memory import GuestMemory
    from agent.host.vmmdev import VMMDev

T = TypeVar("T")

IO_BASE_FIRST: Final = 0x1000
"""I/O base of the first probed device (above the legacy ISA ports); each later probe moves
on by ``IO_BASE_STRIDE`` and never goes back: ``shim_unplug`` makes the library ignore its
port for good, and a port write from an unplugged device's leftover thread is dropped."""
IO_BASE_STRIDE: Final = 4
"""One 32-bit port: the driver writes only its request port (``io_base + 0``)."""
IO_PORT_LIMIT: Final = 0x1_0000
"""x86 I/O ports are 16-bit, and the driver keeps its port in a ``u16``."""
IO_BASE_SLOTS: Final = (IO_PORT_LIMIT - IO_BASE_FIRST) // IO_BASE_STRIDE
"""Devices one process can probe."""
IRQ: Final = 20
UBUF_ADDRESS: Final = 0x10_0000_0000
"""The user address of every ioctl's argument buffer (away from the simulated user mappings)."""
MAX_DRIVER_THREADS: Final = 256
"""Worker threads the driver may occupy at once (each blocked ioctl holds one)."""
ISR_RETRY_S: Final = 0.01
"""After an ISR whose acknowledgement failed, the level-triggered line fires again this later."""
QUERY_SIZE: Final = 1024
DMESG_SIZE: Final = 1 << 16
"""The shim's log buffer size."""
NS_PER_MS: Final = 1_000_000
ERESTARTSYS: Final = 512
"""What an interrupted wait returns inside the kernel; userspace sees EINTR."""

_DEVICE_SLOT: trio.lowlevel.RunVar[trio.Lock] = trio.lowlevel.RunVar("kernel_device_slot")


def _device_slot() -> trio.Lock:
    """The library drives one device at a time: the next probe waits for the last unplug."""
    try:
        return _DEVICE_SLOT.get()
    except LookupError:
        lock = trio.Lock()
        _DEVICE_SLOT.set(lock)
        return lock


class KernelDriver:
    """One boot of the real driver; ``SimulatedHost`` makes a new one at each VM reset."""

    personality: ClassVar[str] = "kernel"
    _probes: ClassVar[int] = 0

    def __init__(self, vmmdev: VMMDev, ram: ArenaMemory) -> None:
        del ram  # the arena: the library allocates from it itself
        self.vmmdev = vmmdev
        self.loaded = False
        self.lost = False
        self.sessions: set[DriverSession] = set()
        self._real = real_driver()
        self._lib: Any = self._real.lib
        self._dev: int | None = None
        self._port = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._files: dict[DriverSession, int] = {}
        self._in_flight: dict[int, DriverSession] = {}
        self._calls_moved = trio.lowlevel.ParkingLot()
        """Unparked whenever an ioctl enters or leaves the driver."""
        self._limiter = trio.CapacityLimiter(MAX_DRIVER_THREADS)
        self.interrupts_served = 0
        """Runs of the real ISR so far (tests wait on it: the ISR runs on a worker thread)."""
        self.signalled_returns: list[int] = []
        """What each ioctl a cancellation signalled (``shim_task_interrupt``) returned, in
        order: ``-EINTR`` for a WAIT_FOR_EVENTS the signal ended, 0 for a call the driver
        completed all the same (tests check that the signal path ran)."""

    # --- state -----------------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """The driver's own state (``shim_query``: balloon, heartbeat, filters, capabilities)."""
        if self._dev is None:
            return {}
        text = ctypes.create_string_buffer(QUERY_SIZE)
        self._lib.shim_query(self._dev, text, QUERY_SIZE)
        state: dict[str, Any] = json.loads(text.value)
        return state

    @property
    def balloon_chunks(self) -> int:
        """Chunks the kernel holds in the balloon."""
        return int(self.query().get("balloon_chunks", 0))

    @property
    def heartbeat_interval_ns(self) -> int:
        """The heartbeat interval the driver got from the host (0: no heartbeat)."""
        return int(self.query().get("heartbeat_interval_ms", 0)) * NS_PER_MS

    def dmesg(self) -> str:
        """The driver's log since the last call (its printk lines)."""
        text = ctypes.create_string_buffer(DMESG_SIZE)
        self._lib.shim_dmesg_take(text, len(text))
        return text.value.decode(errors="replace")

    @property
    def calls_in_flight(self) -> int:
        """Ioctls handed to the driver (on their worker threads, or about to be) that have not
        returned; a signal sent to one ends its wait even before the thread reaches it."""
        return len(self._in_flight)

    async def wait_calls_in_flight(self, count: int) -> None:
        """Return once exactly ``count`` ioctls are inside the driver (callers bound it)."""
        while len(self._in_flight) != count:
            await self._calls_moved.park()

    # --- life cycle ------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Probe the device (the load sequence reaches the VMMDev), then serve its interrupts.

        Raises:
            DriverLoadError: ``vbg_pci_probe`` failed, or this process has no unused port.
        """
        async with _device_slot():
            self._token = trio.lowlevel.current_trio_token()
            if KernelDriver._probes == IO_BASE_SLOTS:
                msg = f"no unused I/O port left: one process probes at most {IO_BASE_SLOTS}"
                raise DriverLoadError(msg)
            self._port = IO_BASE_FIRST + IO_BASE_STRIDE * KernelDriver._probes
            KernelDriver._probes += 1
            self._real.port_handler = self._port_write
            try:
                await self._probe()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._isr_loop)
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._unplug()

    async def _probe(self) -> None:
        ret = ctypes.c_int(0)
        dev = await self._thread(self._lib.shim_probe, self._port, IRQ, ctypes.byref(ret))
        if not dev:
            msg = f"vbg_pci_probe failed: {_errno_name(-ret.value)}"
            raise DriverLoadError(msg)
        self._dev = dev
        self.loaded = True

    async def _unplug(self) -> None:
        """At a power-off, stop every call, the timer and the work item, release the files
        and drop the port; after a VM reset (:meth:`shutdown`), only the timer, the work
        item and the port.

        A reset ends the old boot without unloading it: its files are never released, and
        its calls still in the driver (ENODEV when the driver lets them go) are not waited
        for, so the next boot's probe does not wait for them either.
        """
        if not self.lost:
            for task in self._in_flight:
                self._lib.shim_task_interrupt(task)
            while self._in_flight:
                await self._calls_moved.park()
        if self._dev is not None:
            await self._thread(self._lib.shim_unplug, self._dev)
        files, self._files = list(self._files.values()), {}  # a close from now on finds none
        if not self.lost:
            for file in files:
                await self._thread(self._lib.shim_release, file)
        if self._real.port_handler == self._port_write:
            self._real.port_handler = None

    def shutdown(self) -> None:
        """The VM was reset: every session is lost (ENODEV), blocked calls return, and the
        old boot's port writes reach no device from now on (its threads still in the driver
        write to a device the reset removed)."""
        self.lost = True
        for session in self.sessions:
            session.lost = True
        for task in self._in_flight:
            self._lib.shim_task_interrupt(task)

    # --- the VMMDev side ---------------------------------------------------------------------

    def _port_write(self, port: int, value: int) -> None:
        """A driver thread wrote ``value`` (a request's address) to ``port``: a vCPU exit."""
        if port != self._port or self._token is None or self.lost:
            return  # a leftover thread of an unplugged device, or of the boot a reset ended
        try:
            trio.from_thread.run(self.vmmdev.submit, value, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            return  # the VM is gone: nobody answers

    async def _isr_loop(self) -> NoReturn:
        while True:
            await self.vmmdev.wait_for_irq()
            await self._thread(self._isr)
            self.interrupts_served += 1
            if self.vmmdev.have_events:  # the acknowledgement failed: the line is still up
                await trio.sleep(ISR_RETRY_S)

    def _isr(self) -> None:
        self._lib.shim_set_have_events(self._dev, 1)
        self._lib.shim_isr(self._dev)

    # --- sessions --------------------------------------------------------------------------------

    def open_session(self, *, user_device: bool = False, uid: int = 0) -> DriverSession:
        """``open()`` of ``/dev/vboxguest`` (or ``/dev/vboxuser``) as ``uid`` (group: ``uid``).

        After a reset ended the driver's boot the session is lost at once (its ioctls fail
        with ENODEV), as on the in-package drivers.

        Raises:
            OSError: the driver refused the open (ENOMEM), or it is not loaded (ENODEV).
        """
        if self._dev is None:
            raise fail(errno.ENODEV)
        if self.lost:
            session = DriverSession(user_device=user_device, uid=uid)
            session.lost = True
            self.sessions.add(session)
            return session
        ret = ctypes.c_int(0)
        file = self._lib.shim_open(self._dev, int(user_device), uid, uid, ctypes.byref(ret))
        if not file:
            raise fail(-ret.value)
        session = DriverSession(user_device=user_device, uid=uid)
        self._files[session] = file
        self.sessions.add(session)
        return session

    async def close_session(self, session: DriverSession) -> None:
        """``release()``: interrupt the session's calls, wait for them, then release."""
        if session.closed:
            await trio.lowlevel.checkpoint()
            return
        session.closed = True
        self.sessions.discard(session)
        with trio.CancelScope(shield=True):
            for task, owner in self._in_flight.items():
                if owner is session:
                    self._lib.shim_task_interrupt(task)
            while session in self._in_flight.values():
                await self._calls_moved.park()
            file = self._files.pop(session, None)
            if file is not None and not self.lost:
                await self._thread(self._lib.shim_release, file)

    async def ioctl(
        self, session: DriverSession, code: int, buf: bytearray, memory: GuestMemory
    ) -> None:
        """The driver's ``unlocked_ioctl`` with ``buf`` at ``UBUF_ADDRESS`` in ``memory``'s space.

        Raises:
            OSError: the errno the driver returned; ``buf`` then holds what it wrote, if anything.
        """
        await trio.lowlevel.checkpoint()
        if session.lost or self.lost:
            raise fail(errno.ENODEV)
        file = self._files.get(session)
        if session.closed or file is None:
            raise fail(errno.EBADF)
        cookie = self._real.new_cookie()
        task = self._lib.shim_task_new(session.uid, session.uid, cookie)
        user = ctypes.create_string_buffer(bytes(buf), len(buf))
        self._lib.shim_task_set_ubuf(task, UBUF_ADDRESS, user, len(buf))
        self._real.task_memory[cookie] = memory
        self._in_flight[task] = session
        self._calls_moved.unpark_all()
        try:
            rc = await self._interruptible(task, file, code)
        finally:
            del self._in_flight[task]
            del self._real.task_memory[cookie]
            self._calls_moved.unpark_all()
            self._lib.shim_task_free(task)
        buf[:] = user.raw[: len(buf)]
        if session.lost:
            raise fail(errno.ENODEV)
        if rc < 0:
            raise fail(errno.EINTR if -rc == ERESTARTSYS else -rc)

    async def _interruptible(self, task: int, file: int, code: int) -> int:
        """Run the ioctl on a worker thread; if cancelled, signal the task and wait for it.

        The cancellation propagates unless the driver completed the ioctl all the same (an
        HGCM call the host finished while its cancel failed): that one returns its 0, and
        the caller's next checkpoint raises the cancellation.
        """
        finished = trio.Event()
        token = trio.lowlevel.current_trio_token()
        returned: list[int] = []

        def call() -> int:
            try:
                rc = int(self._lib.shim_ioctl(task, file, code, UBUF_ADDRESS))
                returned.append(rc)
                return rc
            finally:
                trio.from_thread.run_sync(finished.set, trio_token=token)

        try:
            return await trio.to_thread.run_sync(
                call, abandon_on_cancel=True, limiter=self._limiter
            )
        except trio.Cancelled:
            self._lib.shim_task_interrupt(task)
            with trio.CancelScope(shield=True):
                await finished.wait()
            self.signalled_returns.extend(returned)
            if returned != [0]:
                raise
            return 0

    async def _thread(self, function: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def _arena(ram_mb: int) -> ArenaMemory:
    if ram_mb > ARENA_MB:
        msg = f"the kernel personality models at most {ARENA_MB} MB of guest RAM, not {ram_mb}"
        raise ValueError(msg)
    return real_driver().memory


PERSONALITY: Final = PersonalitySpec("kernel", _arena, KernelDriver)
"""What ``agent.host`` imports when ``kernel`` is asked for."""
