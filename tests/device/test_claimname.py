"""The claim name: its holder serves it, so no queue of connections keeps an agent from asking.

Rules of this test module:

- Real sockets: ``bind(2)``, ``listen(2)``, ``connect(2)`` and ``accept(2)`` on an abstract
  name of the test's own, never :data:`~agent.device.claimname.CLAIM_NAME` (a run on a
  guest whose agent holds it would fail, and the agent with it).
- The test's connections are made without a checkpoint between them, so they fill the
  holder's queue before it serves it; the holder serves once every task waits
  (``wait_all_tasks_blocked``).
- Tests that wait out the asker's pauses run on ``autojump_clock`` (no threads); every test
  is bounded by ``fail_after``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from agent.device import claimname
from agent.device.claimname import CLAIM_ASK_TRIES, CLAIM_BACKLOG, HeldName, bind_claim_name

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

BOUND: Final = 5.0
QUEUE: Final = CLAIM_BACKLOG + 1
"""Connections the name's queue holds (Linux queues one more than the backlog)."""
FLOOD: Final = 3 * QUEUE
"""Connections of a flood: three queues' worth."""


def _test_name(tmp_path: Path) -> bytes:
    """An abstract name of the test's own."""
    return b"\0vbox-agent-test/%d/%s" % (os.getpid(), tmp_path.name.encode())


def open_sockets() -> int:
    """How many sockets this process has open (``/proc/self/fd``): a daemon's worker
    threads may hold a file of their own for a moment, never a socket."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(link.startswith("socket:") for link in links)


def connect(name: bytes) -> socket.socket | None:
    """A connection to ``name`` as a process asking who holds it makes, or None: the
    holder's queue is full."""
    asking = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    asking.setblocking(False)
    try:
        asking.connect(name)
    except BlockingIOError:
        asking.close()
        return None
    except OSError:
        asking.close()
        raise
    return asking


def fill_queue(name: bytes, connections: list[socket.socket]) -> None:
    """Connect to ``name`` until its queue is full, keeping the connections."""
    for _ in range(QUEUE + 1):
        connection = connect(name)
        if connection is None:
            return
        connections.append(connection)
    pytest.fail(f"the queue of {name!r} took more than {QUEUE} connections")


async def flood(name: bytes, connections: list[socket.socket]) -> None:
    """Make :data:`FLOOD` connections to ``name``, keeping them open; a full queue is left
    to its holder to serve once, then the connection must go through."""
    for _ in range(FLOOD):
        connection = connect(name)
        if connection is None:
            await trio.testing.wait_all_tasks_blocked()
            connection = connect(name)
        assert connection is not None, f"{name!r} was not served: its queue stayed full"
        connections.append(connection)


@contextlib.contextmanager
def closing_all(connections: list[socket.socket]) -> Iterator[list[socket.socket]]:
    """Close every connection in ``connections`` on leaving."""
    try:
        yield connections
    finally:
        for connection in connections:
            connection.close()


def served(connection: socket.socket) -> bool:
    """Whether the holder accepted and closed ``connection``: it reads end-of-file."""
    try:
        return connection.recv(1) == b""
    except BlockingIOError:
        return False


async def test_a_flood_of_connections_leaves_the_name_refusing(tmp_path: Path) -> None:
    """Any local process may connect to the name: the holder accepts and closes every
    connection, however many, so an agent that asks with the queue full at that instant is
    still told who holds it (EADDRINUSE, the claim refused), and nothing is left open."""
    name = _test_name(tmp_path)
    before = open_sockets()
    with trio.fail_after(BOUND), closing_all([]) as connections:
        held = await bind_claim_name(name)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(held.serve)
                await flood(name, connections)
                fill_queue(name, connections)
                with pytest.raises(OSError, match="in use") as refused:
                    await bind_claim_name(name)
                await trio.testing.wait_all_tasks_blocked()
                assert all(served(connection) for connection in connections)
                nursery.cancel_scope.cancel()
        finally:
            held.release()
    assert refused.value.errno == errno.EADDRINUSE
    assert open_sockets() == before


async def test_a_queue_that_stays_full_refuses_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A holder that never accepts (no agent serves its name so) keeps its queue full: the
    asker tries :data:`CLAIM_ASK_TRIES` times, then the claim rests on the node's lock, and
    says why."""
    name = _test_name(tmp_path)
    with (
        trio.fail_after(BOUND),
        socket.socket(socket.AF_UNIX) as holder,
        closing_all([]) as connections,
    ):
        holder.bind(name)
        holder.listen(0)
        fill_queue(name, connections)
        started = trio.current_time()
        with capture_logs() as logs:
            held = await bind_claim_name(name)
        took = trio.current_time() - started
        held.release()
    assert [(log["event"], log["holder_uid"], log["reason"]) for log in logs] == [
        (
            "claim_name_untrusted",
            None,
            f"its holder's queue stayed full ({CLAIM_ASK_TRIES} tries)",
        )
    ]
    assert took == pytest.approx((CLAIM_ASK_TRIES - 1) * claimname.CLAIM_ASK_PAUSE_S)


async def test_release_ends_the_service(tmp_path: Path) -> None:
    """Releasing the name ends a task serving it, which returns; a later agent may bind it."""
    name = _test_name(tmp_path)
    with trio.fail_after(BOUND):
        held = await bind_claim_name(name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(held.serve)
            await trio.testing.wait_all_tasks_blocked()
            held.release()
            held.release()
        later = await bind_claim_name(name)
        later.release()


class FailingAccept(socket.socket):
    """A listening socket whose ``accept(2)`` fails with :attr:`code` :attr:`failures` times
    (without taking the connection off the queue), then is the real one."""

    code = errno.EMFILE
    failures = 1
    calls = 0

    def accept(self) -> tuple[socket.socket, object]:
        """``code`` the first ``failures`` times, then the real ``accept(2)``."""
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(self.code, os.strerror(self.code))
        return super().accept()


def failing_accept(name: bytes, code: int, failures: int = 1) -> FailingAccept:
    """A socket listening on ``name`` whose ``accept(2)`` fails ``failures`` times with
    ``code``."""
    sock = FailingAccept(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.code, sock.failures = code, failures
    sock.bind(name)
    sock.listen(CLAIM_BACKLOG)
    sock.setblocking(False)
    return sock


def asking(name: bytes, connections: list[socket.socket]) -> socket.socket:
    """A connection to ``name`` (kept in ``connections``), non-blocking."""
    connection = socket.socket(socket.AF_UNIX)
    connections.append(connection)
    connection.connect(name)
    connection.setblocking(False)
    return connection


@pytest.mark.parametrize(
    "code",
    [errno.EMFILE, errno.ENOMEM, errno.EACCES, errno.EPERM, errno.EINVAL],
    ids=errno.errorcode.get,
)
async def test_a_failed_accept_pauses_the_service(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, code: int
) -> None:
    """``accept(2)`` failing in a way that may leave the connection queued (descriptors or
    memory short, a security policy refusing it, any errno not known to drop it) is logged
    and tried again after :data:`~claimname.ACCEPT_PAUSE_S`; the service goes on."""
    name = _test_name(tmp_path)
    with trio.fail_after(BOUND), closing_all([]) as connections:
        held = HeldName(failing_accept(name, code))
        try:
            with capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(held.serve)
                    connection = asking(name, connections)
                    await trio.testing.wait_all_tasks_blocked()
                    started = trio.current_time()
                    assert not served(connection)
                    await trio.lowlevel.wait_readable(connection)
                    assert served(connection)
                    assert trio.current_time() - started == pytest.approx(claimname.ACCEPT_PAUSE_S)
                    assert served(asking(name, connections)) is False
                    await trio.lowlevel.wait_readable(connections[-1])
                    assert served(connections[-1])
                    nursery.cancel_scope.cancel()
        finally:
            held.release()
    assert [(log["event"], log["error"]) for log in logs] == [
        ("claim_name_accept_failed", errno.errorcode[code])
    ]


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO], ids=errno.errorcode.get)
async def test_an_accept_that_dropped_the_connection_is_passed_over(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, code: int
) -> None:
    """``accept(2)`` failing after it took the connection off the queue (``ECONNABORTED``,
    or a network's errno as trio counts them) is logged and the next connection is served
    at once, no pause."""
    name = _test_name(tmp_path)
    with trio.fail_after(BOUND), closing_all([]) as connections:
        held = HeldName(failing_accept(name, code))
        try:
            with capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(held.serve)
                    connection = asking(name, connections)
                    started = trio.current_time()
                    await trio.lowlevel.wait_readable(connection)
                    assert served(connection)
                    assert trio.current_time() == started
                    nursery.cancel_scope.cancel()
        finally:
            held.release()
    assert [(log["event"], log["error"]) for log in logs] == [
        ("claim_name_accept_failed", errno.errorcode[code])
    ]


async def test_a_lasting_accept_failure_is_logged_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A policy that refuses every ``accept(2)`` while a user keeps connecting costs one try
    per :data:`~claimname.ACCEPT_PAUSE_S` and one log line in all, and the service runs on
    until cancelled."""
    name = _test_name(tmp_path)
    tries = 4
    with trio.fail_after(BOUND), closing_all([]) as connections:
        sock = failing_accept(name, errno.EACCES, failures=10**9)
        held = HeldName(sock)
        try:
            with capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(held.serve)
                    asking(name, connections)
                    await trio.sleep((tries - 0.5) * claimname.ACCEPT_PAUSE_S)
                    nursery.cancel_scope.cancel()
        finally:
            held.release()
    assert sock.calls == tries
    assert [(log["event"], log["error"]) for log in logs] == [
        ("claim_name_accept_failed", "EACCES")
    ]


@pytest.mark.parametrize("code", [errno.EBADF, errno.ENOTSOCK], ids=errno.errorcode.get)
async def test_a_socket_gone_ends_the_service(tmp_path: Path, code: int) -> None:
    """``accept(2)`` saying the socket is gone ends the service (logged): it returns, and
    raises nothing."""
    name = _test_name(tmp_path)
    with trio.fail_after(BOUND), closing_all([]) as connections:
        held = HeldName(failing_accept(name, code))
        try:
            with capture_logs() as logs:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(held.serve)
                    asking(name, connections)
        finally:
            held.release()
    assert [(log["event"], log["error"]) for log in logs] == [
        ("claim_name_accept_failed", errno.errorcode[code])
    ]
