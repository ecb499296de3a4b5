"""The differential harness: the same ioctl script against ``mainline`` and the real driver.

A script is an async function of a :class:`Rig`. It opens sessions and performs ioctls
(hand-built buffers, user memory at fixed offsets), raises host events, closes sessions;
every step yields a :class:`Step`: the errno, the ioctl buffer afterwards, the user buffers
afterwards, the VMMDev requests the host saw during the step (normalised: guest-physical
addresses and bounce-buffer placement differ by allocator, not by behaviour) and what the
test HGCM service saw. :func:`differ` runs a script on both personalities in turn and
:func:`assert_agree` compares the steps. A :class:`Fault` makes the host refuse one request
of the load (or later): the script then runs whether the driver loaded or not.

Heartbeats and the ISR's acknowledgements are left out of the request stream (``LEFT_OUT``).
"""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio
import trio.testing

from agent.host import DictMemory, DriverLoadError, SimulatedHost
from agent.host.guest_props import GuestPropertyService
from agent.host.hgcm_service import HostBuffer, HostU32, HostU64
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import HgcmParmType, RequestType
from agent.protocol.status import VINF_SUCCESS
from testbed.kernel import KernelDriver
from tests.host.conftest import EchoService

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from agent.host import DriverSession
    from agent.host.hgcm_service import HgcmCallHandle

    Script = Callable[["Rig"], Awaitable[None]]

PERSONALITIES: Final = ("mainline", "kernel")
FN_SUCCEED: Final = 4
"""A function of the recording echo service that succeeds at once, whatever its parameters."""
SETTLE_S: Final = 5.0
"""Bound on waiting for the driver's asynchronous work (ISR, balloon) to finish."""
POLL_S: Final = 0.001
HOST_TIME_MS: Final = 1_700_000_000_000
"""What GET_HOST_TIME answers on both hosts (the wall clock would differ between runs)."""
PROPERTY_CLOCK_START_NS: Final = 1_700_000_000_000_000_000
PROPERTY_CLOCK_STEP_NS: Final = 1_000
"""The guest-property service's clock: the same readings on both hosts."""
LEFT_OUT: Final = frozenset({RequestType.GUEST_HEARTBEAT, RequestType.ACKNOWLEDGE_EVENTS})
"""Requests whose number and timing are the scheduler's: the real driver's per-tick heartbeat
(``docs/personalities.md``) and the ISR's acknowledgements, which follow host events and
HGCM completions whenever the interrupt thread gets to run."""
_ADDRESS: Final = struct.Struct("<Q")
_P = L.HgcmParameter64
_PAGE_ADDRESS: Final = _ADDRESS.size
"""A page list's entry per page: one guest-physical address."""


@dataclass(frozen=True)
class Step:
    """What one step of a script showed."""

    label: str
    errno: int = 0
    buffer: bytes = b""
    user: tuple[bytes, ...] = ()
    requests: tuple[str, ...] = ()
    service: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fault:
    """The host answers the ``nth`` request of ``request_type`` (from 1) with ``status``,
    unexecuted (:meth:`SimulatedHost.add_fault`, queued as that request arrives)."""

    request_type: RequestType
    nth: int
    status: int


@dataclass
class Mark:
    """Where a step started; ``errno`` is filled in when its call fails."""

    label: str
    requests: int
    service: int
    errno: int = 0


@dataclass(eq=False)
class RecordingEcho(EchoService):
    """The test echo service, also recording each call's function and parameters."""

    seen: list[str] = field(default_factory=list)

    def call(self, call: HgcmCallHandle) -> None:
        """Record the call as the host received it, then run it."""
        self.seen.append(f"call fn={call.function} {[_parm(p) for p in call.params]}")
        if call.function == FN_SUCCEED:
            call.complete(VINF_SUCCESS)
        else:
            super().call(call)

    def cancel(self, call: HgcmCallHandle) -> None:
        """Record the cancel."""
        self.seen.append(f"cancel fn={call.function}")
        super().cancel(call)


def _parm(parm: HostU32 | HostU64 | HostBuffer) -> str:
    if isinstance(parm, HostU32):
        return f"u32:{parm.value:#x}"
    if isinstance(parm, HostU64):
        return f"u64:{parm.value:#x}"
    access = ("r" if parm.readable else "") + ("w" if parm.writable else "")
    return f"buf[{len(parm.data)},{access}]:{bytes(parm.data[:32]).hex()}"


class Rig:
    """One running host of one personality, with the request recorder and the steps so far."""

    def __init__(
        self, host: SimulatedHost, echo: RecordingEcho, faults: Sequence[Fault] = ()
    ) -> None:
        self.host = host
        self.echo = echo
        self.steps: list[Step] = []
        self.requests: list[str] = []
        self._processed = trio.lowlevel.ParkingLot()
        arrived: Counter[int] = Counter()
        process = host.vmmdev.process

        def record(phys: int) -> None:
            try:
                header = host.vmmdev.memory.read(phys, L.RequestHeader.size)
                size = L.RequestHeader.size_.get(header)
                raw = host.vmmdev.memory.read(phys, min(size, 1 << 20))
            except OSError:
                raw = b""
            if len(raw) >= L.RequestHeader.size:
                request_type = L.RequestHeader.request_type.get(raw)
                arrived[request_type] += 1
                for fault in faults:
                    if (fault.request_type, fault.nth) == (request_type, arrived[request_type]):
                        host.add_fault(request_type, fault.status)
                if request_type not in LEFT_OUT:
                    self.requests.append(normalise(bytearray(raw)))
            process(phys)
            self._processed.unpark_all()

        host.vmmdev.process = record  # type: ignore[method-assign]
        host.vmmdev.host_time_ms = lambda: HOST_TIME_MS  # type: ignore[method-assign]

    @property
    def personality(self) -> str:
        """The personality under test."""
        return self.host.personality

    def open(self, *, user_device: bool = False, uid: int = 0) -> DriverSession:
        """Open a session (``/dev/vboxuser`` with ``user_device``) as ``uid``."""
        return self.host.open_session(user_device=user_device, uid=uid)

    async def ioctl(
        self,
        label: str,
        session: DriverSession,
        code: int,
        buf: bytearray,
        user: Sequence[tuple[int, bytes]] = (),
        *,
        until: Callable[[], bool] | None = None,
    ) -> Step:
        """Perform one ioctl; ``user`` maps buffers whose addresses go at the given offsets.

        With ``until``, the step also waits for the driver's asynchronous work it started.
        """
        memory = DictMemory()
        regions = []
        for offset, data in user:
            region = bytearray(data)
            _ADDRESS.pack_into(buf, offset, memory.map(region))
            regions.append(region)
        step = self.begin(label)
        try:
            await self.host.ioctl(session, code, buf, memory)
        except OSError as exc:
            step.errno = exc.errno or -1
        if until is not None:
            await self.settle(until)
        return self.finish(step, buffer=bytes(buf), user=tuple(bytes(r) for r in regions))

    async def close(self, label: str, session: DriverSession) -> Step:
        """Close ``session``; the step holds the requests its release sent."""
        step = self.begin(label)
        await self.host.close_session(session)
        return self.finish(step)

    async def raise_events(self, label: str, mask: int) -> Step:
        """Raise host events and wait until the ISR (if they were due) has run to its end."""
        step = self.begin(label)
        driver = self.host.driver
        served = driver.interrupts_served if isinstance(driver, KernelDriver) else 0
        self.host.raise_events(mask)
        if self.host.vmmdev.have_events:  # deliverable: an interrupt is due
            if isinstance(driver, KernelDriver):
                await self.settle(lambda: driver.interrupts_served > served)
            else:  # the model's ISR is a trio task
                await trio.testing.wait_all_tasks_blocked()
        return self.finish(step)

    async def settle(self, condition: Callable[[], bool]) -> None:
        """Wait (bounded) until ``condition`` holds: the driver's own threads are not trio's."""
        with trio.fail_after(SETTLE_S):
            while not condition():  # noqa: ASYNC110 - driver threads set no trio Event
                await trio.sleep(POLL_S)

    async def wait_for_host(self, condition: Callable[[], bool]) -> None:
        """Wait (bounded) until ``condition`` holds after a request the host processed."""
        with trio.fail_after(SETTLE_S):
            while not condition():
                await self._processed.park()

    def note(self, label: str, value: object) -> None:
        """Record a value both personalities must agree on (a state query)."""
        self.steps.append(Step(f"{label}: {value!r}"))

    def begin(self, label: str) -> Mark:
        """Start a step: note where the request stream and the service record stand."""
        return Mark(label, len(self.requests), len(self.echo.seen))

    def finish(self, step: Mark, *, buffer: bytes = b"", user: tuple[bytes, ...] = ()) -> Step:
        """End a step: record what happened since :meth:`begin`."""
        done = Step(
            step.label,
            step.errno,
            buffer,
            user,
            tuple(self.requests[step.requests :]),
            tuple(self.echo.seen[step.service :]),
        )
        self.steps.append(done)
        return done


def normalise(req: bytearray) -> str:
    """Describe a request with its guest-physical addresses and page-list layout blanked."""
    request_type = L.RequestHeader.request_type.get(req)
    try:
        name = RequestType(request_type).name
    except ValueError:
        name = str(request_type)
    if request_type in (RequestType.HGCM_CALL64, RequestType.HGCM_CALL32, RequestType.HGCM_CANCEL):
        # The legacy cancel is the call's own request under another type.
        lists = _blank_page_lists(req)
        return f"{name} {req.hex()} lists={lists}"
    if request_type == RequestType.HGCM_CANCEL2:
        L.HgcmCancel2Request.phys_req_to_cancel.set(req, 0)
    elif request_type == RequestType.CHANGE_MEMBALLOON:
        pages = L.MemBalloonChangeRequest.phys_page.offset
        req[pages:] = bytes(len(req) - pages)
    return f"{name} {req.hex()}"


def _blank_page_lists(req: bytearray) -> list[str]:
    """Cut the page lists off an HGCM call, keeping each one's flags, and zero the size field;
    the last entry is the room the request has after its last page list (``spare``).

    A list's page count follows where its bounce buffer lies in a page, which differs
    between the drivers, so the lists and the size are not compared; the spare room is.
    """
    count = L.HgcmCallRequest.parm_count.get(req)
    end = used = L.HgcmCallRequest.size + count * _P.size
    lists = []
    for index in range(count):
        at = L.HgcmCallRequest.size + index * _P.size
        parm = req[at : at + _P.size]
        if _P.type.get(parm) == HgcmParmType.PAGELIST:
            offset = _P.page_list_offset.get(parm)
            entry = req[offset : offset + L.HgcmPageList.size]
            lists.append(f"flags={L.HgcmPageList.flags.get(entry)}")
            pages = L.HgcmPageList.page_count.get(entry)
            used = max(used, offset + L.HgcmPageList.first_page.offset + _PAGE_ADDRESS * pages)
            blank = at + _P.page_list_offset.offset
            req[blank : blank + 4] = bytes(4)
    lists.append(f"spare={L.RequestHeader.size_.get(req) - used}")
    del req[end:]
    L.RequestHeader.size_.set(req, 0)
    return lists


@asynccontextmanager
async def running(personality: str, faults: Sequence[Fault] = ()) -> AsyncIterator[Rig]:
    """A host of ``personality`` with the recording echo service, loaded and recording.

    With ``faults`` the load may fail (``host.driver.loaded`` tells); without, it must not.
    """
    echo = RecordingEcho()
    clock = itertools.count(PROPERTY_CLOCK_START_NS, PROPERTY_CLOCK_STEP_NS)
    properties = GuestPropertyService(clock=lambda: next(clock))
    host = SimulatedHost(personality=personality, seed=1, services=[properties, echo])
    rig = Rig(host, echo, faults)
    async with trio.open_nursery() as nursery:
        step = rig.begin("boot")
        try:
            await nursery.start(host.run)
        except* DriverLoadError:
            if not faults:
                raise
        rig.finish(step)
        yield rig
        nursery.cancel_scope.cancel()


async def differ(script: Script, faults: Sequence[Fault] = ()) -> dict[str, list[Step]]:
    """Run ``script`` on each personality (the host refusing ``faults``); return the steps."""
    results = {}
    for personality in PERSONALITIES:
        async with running(personality, faults) as rig:
            await script(rig)
            results[personality] = rig.steps
    return results


def assert_agree(results: dict[str, list[Step]]) -> None:
    """Every step of the script must look the same on both personalities."""
    mainline, kernel = (results[name] for name in PERSONALITIES)
    labels = [s.label for s in mainline], [s.label for s in kernel]
    assert labels[0] == labels[1], f"the steps differ: {labels}"
    for ours, real in zip(mainline, kernel, strict=True):
        if ours != real:
            raise AssertionError(_difference(ours, real))


def _difference(ours: Step, real: Step) -> str:
    names = [
        name for name in Step.__dataclass_fields__ if getattr(ours, name) != getattr(real, name)
    ]
    lines = [f"step {ours.label!r} differs in {', '.join(names)}:"]
    for name in names:
        lines += [
            f"  {name}:",
            f"    mainline {getattr(ours, name)!r}",
            f"    kernel   {getattr(real, name)!r}",
        ]
    return "\n".join(lines)
