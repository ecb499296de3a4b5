"""An in-process simulated host whose sessions run a test's hooks around every ioctl, a host
that answers with malformed replies, and a property service that asks for sizes of its own."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Final

import trio

from agent.host import SimOpener
from agent.host.guest_props import GuestFunction, GuestPropertyService
from agent.host.hgcm_service import HostBuffer, HostU32, HostU64
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.status import VERR_BUFFER_OVERFLOW
from agent.protocol.wire import Hello, Role, encode_frame

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from agent.host import SimulatedHost
    from agent.host.hgcm_service import HgcmCallHandle
    from agent.host.transport import SimTransport
    from agent.protocol import Submission, UserBuffer


class HookedOpener:
    """Opens sessions on ``host`` as ``SimOpener`` does; each ioctl awaits ``before(code)``
    before the host sees it and ``after(code)`` once the host answered (either may hold the
    ioctl, until cancelled, say); ``reply(buffer)`` may then change the answer the caller
    decodes."""

    def __init__(
        self,
        host: SimulatedHost,
        *,
        before: Callable[[int], Awaitable[None]] | None = None,
        after: Callable[[int], Awaitable[None]] | None = None,
        reply: Callable[[bytearray], None] | None = None,
    ) -> None:
        self._opener = SimOpener(host)
        self._before = before
        self._after = after
        self._reply = reply

    @property
    def description(self) -> str:
        """The simulated host's."""
        return self._opener.description

    @property
    def simulated(self) -> bool:
        """True."""
        return self._opener.simulated

    async def open_session(self) -> HookedSession:
        """Open a session on the host, with the hooks."""
        return HookedSession(
            await self._opener.open_session(), self._before, self._after, self._reply
        )


class HookedSession:
    """One session of :class:`HookedOpener`."""

    def __init__(
        self,
        transport: SimTransport,
        before: Callable[[int], Awaitable[None]] | None,
        after: Callable[[int], Awaitable[None]] | None,
        reply: Callable[[bytearray], None] | None = None,
    ) -> None:
        self._transport = transport
        self._before = before
        self._after = after
        self._reply = reply

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        """``before``, the host's ioctl, ``after``, then ``reply``."""
        if self._before is not None:
            await self._before(code)
        await self._transport.ioctl(code, buffer, user_buffers, submission=submission)
        if self._after is not None:
            await self._after(code)
        if self._reply is not None:
            self._reply(buffer)

    async def aclose(self) -> None:
        """Close the host's session."""
        await self._transport.aclose()

    async def claim(self) -> bool:
        """The host's session's claim."""
        return await self._transport.claim()

    async def serve_claim(self) -> None:
        """The host's session's claim server."""
        await self._transport.serve_claim()


class ReplyGarbler:
    """A ``reply`` hook for :class:`HookedOpener`: the host's answers to the VMMDev request
    types in ``request_types`` (empty at first; a test adds them when it wants) name another
    request type in their header, as a broken host's would, so decoding them raises
    ``RemoteProtocolError``.

    Attributes:
        request_types: the request types whose replies are garbled.
        garbled: how many replies were.
    """

    GARBLED_TYPE = 0x7FFF
    """The request type a garbled reply names (none the codec knows)."""

    def __init__(self) -> None:
        self.request_types: set[int] = set()
        self.garbled = 0

    def __call__(self, buffer: bytearray) -> None:
        """Garble ``buffer`` if it is a VMMDev request of a chosen type (an ioctl's own
        header has type 0 where a VMMDev request has its type)."""
        header = L.RequestHeader
        if len(buffer) >= header.size and header.request_type.get(buffer) in self.request_types:
            header.request_type.set(buffer, self.GARBLED_TYPE)
            self.garbled += 1


_OVERFLOW_PARAMS: Final = {
    GuestFunction.GET_PROP: (1, 3),
    GuestFunction.ENUM_PROPS: (1, 2),
    GuestFunction.GET_NOTIFICATION: (2, 3),
}
"""Where each function that answers VERR_BUFFER_OVERFLOW has its buffer and the size."""


class OverflowAsking(GuestPropertyService):
    """A property service that answers the next ``times`` calls of ``function`` at once with
    VERR_BUFFER_OVERFLOW and ``asked(sent)`` as the size they need (``sent``: the buffer's
    size), a GET_NOTIFICATION as a change stamped one past the place it asked from; the
    calls after them as the service does.

    Attributes:
        sent: the buffer sizes of the calls of ``function``, in order.
    """

    def __init__(
        self, function: GuestFunction, asked: Callable[[int], int], times: int = 1
    ) -> None:
        super().__init__()
        self._function = function
        self._asked = asked
        self._times = times
        self.sent: list[int] = []

    def call(self, call: HgcmCallHandle) -> None:
        if call.function != self._function:
            super().call(call)
            return
        buffer_at, size_at = _OVERFLOW_PARAMS[self._function]
        buffer, size = call.params[buffer_at], call.params[size_at]
        assert isinstance(buffer, HostBuffer)
        assert isinstance(size, HostU32)
        self.sent.append(len(buffer.data))
        if len(self.sent) > self._times:
            super().call(call)
            return
        size.value = self._asked(len(buffer.data))
        if self._function == GuestFunction.GET_NOTIFICATION:
            stamp = call.params[1]
            assert isinstance(stamp, HostU64)
            stamp.value += 1
        call.complete(VERR_BUFFER_OVERFLOW)


@asynccontextmanager
async def garbage_host(path: str) -> AsyncIterator[None]:
    """While the block runs, a host listening at ``path`` greets its first client, then
    sends bytes that are no frame."""
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)

    async def serve() -> None:
        connection, _ = await listener.accept()
        with connection:
            await connection.send(encode_frame(Hello(Role.HOST)) + b"\xff\xff\xff\xff")
            await trio.sleep_forever()

    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield
            nursery.cancel_scope.cancel()
