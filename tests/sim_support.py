"""An in-process simulated host whose sessions run a test's hooks around every ioctl."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from agent.host import SimOpener
from agent.protocol.wire import Hello, Role, encode_frame

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

    from agent.host import SimulatedHost
    from agent.host.transport import SimTransport
    from agent.protocol import Submission, UserBuffer


class HookedOpener:
    """Opens sessions on ``host`` as ``SimOpener`` does; each ioctl awaits ``before(code)``
    before the host sees it and ``after(code)`` once the host answered (either may hold the
    ioctl, until cancelled, say)."""

    def __init__(
        self,
        host: SimulatedHost,
        *,
        before: Callable[[int], Awaitable[None]] | None = None,
        after: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self._opener = SimOpener(host)
        self._before = before
        self._after = after

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
        return HookedSession(await self._opener.open_session(), self._before, self._after)


class HookedSession:
    """One session of :class:`HookedOpener`."""

    def __init__(
        self,
        transport: SimTransport,
        before: Callable[[int], Awaitable[None]] | None,
        after: Callable[[int], Awaitable[None]] | None,
    ) -> None:
        self._transport = transport
        self._before = before
        self._after = after

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        """``before``, the host's ioctl, then ``after``."""
        if self._before is not None:
            await self._before(code)
        await self._transport.ioctl(code, buffer, user_buffers, submission=submission)
        if self._after is not None:
            await self._after(code)

    async def aclose(self) -> None:
        """Close the host's session."""
        await self._transport.aclose()


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
