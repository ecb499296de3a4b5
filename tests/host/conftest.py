"""Shared helpers for the simulated-host tests: raw VMMDev requests, a test HGCM service,
running hosts and a typed request helper over ``SimTransport``."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, TypeVar

import pytest
import trio
import trio.testing

from agent.host import SimOpener, SimTransport, SimulatedHost
from agent.host.driver import Driver
from agent.host.hgcm_service import HgcmCallHandle, HostBuffer, HostU32
from agent.host.memory import DictMemory
from agent.host.vmmdev import VMMDev
from agent.protocol import (
    ChangeFilterMask,
    HgcmCall,
    HgcmConnect,
    HgcmU32,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import (
    REQUEST_HEADER_VERSION,
    VMMDEV_VERSION,
    Event,
    RequestType,
)
from agent.protocol.session import Session
from agent.protocol.status import VERR_GENERAL_FAILURE, VERR_NOT_FOUND, VINF_SUCCESS

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from agent.protocol.messages import HgcmReply, Request

R = TypeVar("R")

ECHO: Final = "TestEchoSvc"
FN_ECHO: Final = 1
"""Copy parameter 0 (a buffer) into parameter 1 (a buffer) and set parameter 2 to its length."""
FN_HOLD: Final = 2
"""Keep the call pending until the test completes it."""
FN_FAIL: Final = 3
"""Complete at once with the status in parameter 0."""
POLL_S: Final = 0.005
"""How often :func:`until` looks at the host again."""


@dataclass(eq=False)
class EchoService:
    """A tiny HGCM service for framework tests; it records what the framework tells it."""

    max_calls: int = 4
    connected: list[int] = field(default_factory=list)
    disconnected: list[int] = field(default_factory=list)
    cancelled: list[HgcmCallHandle] = field(default_factory=list)
    held: list[HgcmCallHandle] = field(default_factory=list)
    resets: int = 0
    refuse: int = 0

    @property
    def name(self) -> str:
        """The service name."""
        return ECHO

    @property
    def max_calls_per_client(self) -> int:
        """The pending-call limit under test."""
        return self.max_calls

    def connect(self, client_id: int, requestor: int) -> int:
        """Accept (or refuse with ``refuse``) a client."""
        del requestor
        if self.refuse:
            return self.refuse
        self.connected.append(client_id)
        return VINF_SUCCESS

    def disconnect(self, client_id: int) -> None:
        """Record the disconnect; pending calls stay for the framework to discard."""
        self.disconnected.append(client_id)

    def call(self, call: HgcmCallHandle) -> None:
        """Run one of the test functions."""
        params = call.params
        if call.function == FN_ECHO:
            src, dst, length = params
            assert isinstance(src, HostBuffer)
            assert isinstance(dst, HostBuffer)
            assert isinstance(length, HostU32)
            count = min(len(src.data), len(dst.data))
            dst.data[:count] = src.data[:count]
            dst.size = count
            length.value = len(src.data)
            call.complete(VINF_SUCCESS)
        elif call.function == FN_HOLD:
            self.held.append(call)
        else:
            status = params[0]
            assert isinstance(status, HostU32)
            call.complete(status.value - (1 << 32) if status.value >> 31 else status.value)

    def cancel(self, call: HgcmCallHandle) -> None:
        """Record the cancel."""
        self.cancelled.append(call)
        self.held.remove(call)

    def reset(self) -> None:
        """Count resets and forget held calls."""
        self.resets += 1
        self.held.clear()


# --- raw VMMDev requests -------------------------------------------------------------------------


def vmmdev_request(request_type: int, size: int, *, header_size: int | None = None) -> bytearray:
    """Return a zeroed VMMDev request with its header (``header_size`` overrides ``size``)."""
    req = bytearray(size)
    L.RequestHeader.size_.set(req, size if header_size is None else header_size)
    L.RequestHeader.version.set(req, REQUEST_HEADER_VERSION)
    L.RequestHeader.request_type.set(req, request_type)
    L.RequestHeader.rc.set(req, VERR_GENERAL_FAILURE)
    return req


def user_state_request(
    user: bytes = b"alice\0",
    domain: bytes = b"",
    details: bytes = b"",
    *,
    sizes: tuple[int, int, int] | None = None,
    padding: int = 0,
) -> bytearray:
    """A REPORT_GUEST_USER_STATE request (state 1) carrying ``user``, ``domain`` and
    ``details`` one after the other; ``sizes`` overrides the three size fields."""
    body = user + domain + details
    req = vmmdev_request(RequestType.REPORT_GUEST_USER_STATE, max(44, 40 + len(body)) + padding)
    cb_user, cb_domain, cb_details = sizes or (len(user), len(domain), len(details))
    struct.pack_into("<IIII", req, 24, 1, cb_user, cb_domain, cb_details)
    req[40 : 40 + len(body)] = body
    return req


@dataclass
class Device:
    """A bare VMMDev with its guest-physical memory, driven with raw requests."""

    vmmdev: VMMDev
    ram: DictMemory

    def send(self, req: bytearray) -> int:
        """Submit ``req`` through the port (synchronously) and return its ``rc``."""
        phys = self.ram.map(req)
        try:
            self.vmmdev.process(phys)
        finally:
            self.ram.unmap(phys)
        return L.RequestHeader.rc.get(req)

    def report_additions(self) -> None:
        """Pass the additions gate with a good REPORT_GUEST_INFO."""
        req = vmmdev_request(RequestType.REPORT_GUEST_INFO, L.GuestInfoRequest.size)
        L.GuestInfoRequest.interface_version.set(req, VMMDEV_VERSION)
        assert self.send(req) == VINF_SUCCESS


def make_device(**options: int | bool) -> Device:
    """Return a fresh device (options go to :class:`VMMDev`)."""
    ram = DictMemory(base=0x10_0000, limit=0xFFFF_F000)
    return Device(VMMDev(ram, **options), ram)  # type: ignore[arg-type]


@pytest.fixture(name="device")
def _device() -> Device:
    return make_device()


# --- running hosts ---------------------------------------------------------------------------


@pytest.fixture(name="echo")
def _echo() -> EchoService:
    return EchoService()


@pytest.fixture(name="host")
async def _host(echo: EchoService, request: pytest.FixtureRequest) -> AsyncIterator[SimulatedHost]:
    """A running host; the personality comes from the module's ``PERSONALITY`` (mainline)."""
    personality = getattr(request.module, "PERSONALITY", "mainline")
    host = SimulatedHost(personality=personality, seed=1)
    host.register_hgcm_service(echo)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


def model_driver(host: SimulatedHost) -> Driver:
    """The host's driver, which must be one of the built-in models (not ``kernel``)."""
    assert isinstance(host.driver, Driver), host.personality
    return host.driver


class Client:
    """A session opened through :class:`SimOpener`, with typed requests."""

    def __init__(self, transport: SimTransport) -> None:
        self.transport = transport
        self.session = Session()

    async def request(self, req: Request[R]) -> R:
        """Encode, perform through the transport and decode ``req``."""
        call = self.session.encode(req)
        await self.transport.ioctl(call.code, call.buffer, call.user_buffers)
        return self.session.decode(call)

    async def raw(self, code: int, buffer: bytearray) -> bytearray:
        """Perform a hand-built ioctl and return the buffer."""
        await self.transport.ioctl(code, buffer)
        return buffer


async def open_client(host: SimulatedHost, *, user_device: bool = False, uid: int = 0) -> Client:
    """Open a session on ``host``."""
    return Client(await SimOpener(host, user_device=user_device, uid=uid).open_session())


async def until(condition: Callable[[], bool]) -> None:
    """Return once ``condition()`` holds (the caller bounds it): host state the real
    driver's worker threads change has no event to wait on."""
    while not condition():  # noqa: ASYNC110 - polling host state, bounded by the caller
        await trio.sleep(POLL_S)


async def signal_in_the_grace_after_a_timeout(
    host: SimulatedHost, echo: EchoService
) -> HgcmReply | None:
    """Run ``host`` and make a call with a 100 ms timeout that the service holds; once the
    driver timed it out and the host refused its cancel (VERR_NOT_FOUND: the driver then
    waits up to 0.5 s for DONE), cancel its caller (the signal) and complete the call with
    77 in its parameter. Return the reply the caller got (None: it got the cancellation)."""
    replies: list[HgcmReply] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            client = await open_client(host)
            client_id = (await client.request(HgcmConnect(ECHO))).client_id
            scope = trio.CancelScope()

            async def timed_call() -> None:
                with scope:
                    call = HgcmCall(client_id, FN_HOLD, (HgcmU32(5),), timeout_ms=100)
                    replies.append(await client.request(call))

            async with trio.open_nursery() as calls:
                calls.start_soon(timed_call)
                await until(lambda: bool(echo.held))
                host.add_fault(RequestType.HGCM_CANCEL2, VERR_NOT_FOUND)
                await until(lambda: not host.vmmdev.faults.has_faults)  # timed out: the grace
                scope.cancel()  # the signal
                await trio.testing.wait_all_tasks_blocked()  # it reached the driver
                held = echo.held.pop()
                (number,) = held.params
                assert isinstance(number, HostU32)
                number.value = 77
                held.complete(VINF_SUCCESS)
            await client.transport.aclose()
            nursery.cancel_scope.cancel()
    return replies[0] if replies else None


async def cancel_while_the_table_is_locked(
    host: SimulatedHost, request_type: int, call: Callable[[], Awaitable[object]]
) -> None:
    """Run ``call`` (a connect or disconnect, whose request of ``request_type`` the host
    holds 1 s) and, from just after its start, a filter change of another session that
    holds the driver's session mutex 2 s (its request held that long); cancel ``call`` at
    1.5 s, when the host has answered it and the driver waits for the mutex to update the
    session's table. Return once the driver is done with it (autojump clock)."""
    other = await open_client(host)
    host.set_delay(request_type, 1)
    host.set_delay(RequestType.CTL_GUEST_FILTER_MASK, 2)
    scope = trio.CancelScope()

    async def cancelled() -> None:
        with scope:
            await call()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()  # held at the host
        nursery.start_soon(other.request, ChangeFilterMask(Event.VRDP, 0))
        await trio.sleep(1.5)
        scope.cancel()
    host.set_delay(request_type, 0)
    host.set_delay(RequestType.CTL_GUEST_FILTER_MASK, 0)
    await trio.testing.wait_all_tasks_blocked()  # the driver finished the call in its task
    assert scope.cancelled_caught
