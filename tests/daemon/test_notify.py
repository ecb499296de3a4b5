"""Tests of ``agent.daemon.notify.Notifier`` against a real datagram socket.

Rules of this test module:
- The "service manager" is a ``trio.socket`` ``AF_UNIX`` datagram socket bound in
  ``tmp_path`` (or under a random abstract name); nothing else is contacted.
- Every receive runs under ``fail_after(RECEIVE_TIMEOUT_S)`` on the real clock, so a missing
  message fails fast instead of hanging; the full-queue test alone runs on the virtual clock
  (autojump_clock), as the notifier's wait for room is on trio's clock.
- "Nothing more was sent" is shown by a sentinel datagram from another socket arriving next.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from select import PIPE_BUF
from typing import TYPE_CHECKING

import pytest
import trio
from structlog.testing import capture_logs

from agent.daemon.notify import SEND_TIMEOUT_S, STATUS_LIMIT_BYTES, Notifier

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

RECEIVE_TIMEOUT_S = 5
SENTINEL = "SENTINEL=1"
MAX_FILL = 100_000
"""More datagrams than any Unix socket queue holds (the kernel's default is 10)."""


class Manager:
    """The receiving end: a bound datagram socket and its address."""

    def __init__(self, sock: trio.socket.SocketType, address: str) -> None:
        self.sock = sock
        self.address = address

    async def receive(self, count: int) -> list[str]:
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            return [(await self.sock.recv(4096)).decode() for _ in range(count)]

    async def assert_nothing_more(self) -> None:
        with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as other:
            await other.sendto(SENTINEL.encode(), self.address)
        assert await self.receive(1) == [SENTINEL]


async def open_manager(address: str) -> Manager:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    await sock.bind(address)
    return Manager(sock, address)


@pytest.fixture(name="manager")
async def fixture_manager(tmp_path: Path) -> AsyncIterator[Manager]:
    manager = await open_manager(str(tmp_path / "notify"))
    with manager.sock:
        yield manager


def forbid_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: object) -> None:
        pytest.fail("no socket may be opened")

    monkeypatch.setattr(socket, "socket", no_socket)


class TestMessages:
    async def test_sequence(self, manager: Manager) -> None:
        """Each method sends exactly its datagram, in call order."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        await notifier.ready("3 services up")
        await notifier.status("balloon 512 MiB")
        before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await notifier.reloading()
        after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await notifier.ready()
        await notifier.watchdog()
        await notifier.stopping()
        await notifier.aclose()
        ready, status, reloading, ready_again, watchdog, stopping = await manager.receive(6)
        assert ready == "READY=1\nSTATUS=3 services up"
        assert status == "STATUS=balloon 512 MiB"
        head, usec = reloading.split("\nMONOTONIC_USEC=")
        assert head == "RELOADING=1"
        assert before_us <= int(usec) <= after_us
        assert (ready_again, watchdog, stopping) == ("READY=1", "WATCHDOG=1", "STOPPING=1")
        await manager.assert_nothing_more()

    async def test_status_stays_one_line(self, manager: Manager) -> None:
        """A multi-line status is joined into one STATUS= line."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        await notifier.status("balloon\nREADY=1")
        await notifier.aclose()
        assert await manager.receive(1) == ["STATUS=balloon READY=1"]

    async def test_a_nul_does_not_cost_the_message(self, manager: Manager) -> None:
        """systemd drops a datagram with a NUL inside, READY=1 with it: a NUL is sent as
        ``?``. (It went as it was, and cut the status short.)"""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        await notifier.ready("cpuhotplug: a\0b")
        await notifier.aclose()
        assert await manager.receive(1) == ["READY=1\nSTATUS=cpuhotplug: a?b"]

    @pytest.mark.parametrize("filler", ["x", "é", "\U0001f600"])
    async def test_a_long_status_does_not_cost_the_message(
        self, manager: Manager, filler: str
    ) -> None:
        """systemd drops a datagram of PIPE_BUF (4096) bytes or more, READY=1 with it: the
        status is cut at a character to STATUS_LIMIT_BYTES and ends with an ellipsis. (A
        5 000-character status went whole.)"""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        await notifier.ready(filler * 5000)
        await notifier.aclose()
        [message] = await manager.receive(1)
        ready, status = message.split("\n")
        value = status.removeprefix("STATUS=")
        assert (ready, value[-1]) == ("READY=1", "…")
        assert set(value[:-1]) == {filler}
        assert STATUS_LIMIT_BYTES - 4 < len(value.encode()) <= STATUS_LIMIT_BYTES
        assert len(message.encode()) < PIPE_BUF

    async def test_undecodable_text_is_sent_replaced(self, manager: Manager) -> None:
        """A status holding a lone surrogate (a file name read with surrogateescape) is sent
        with it replaced instead of raising out of the notifier."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        await notifier.status("users: alice, b\udcffob")
        assert await manager.receive(1) == ["STATUS=users: alice, b?ob"]
        await notifier.aclose()

    async def test_reads_the_process_environment(
        self, manager: Manager, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """By default the socket comes from the process's own environment."""
        monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
        notifier = Notifier.from_environ()
        await notifier.stopping()
        await notifier.aclose()
        assert await manager.receive(1) == ["STOPPING=1"]

    async def test_abstract_socket(self) -> None:
        """A leading @ names a socket in the abstract namespace."""
        name = f"vbox-agent-test-{uuid.uuid4().hex}"
        manager = await open_manager("\0" + name)
        with manager.sock:
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
            await notifier.ready()
            await notifier.aclose()
            assert await manager.receive(1) == ["READY=1"]

    async def test_dropped_after_aclose(self, manager: Manager) -> None:
        """Messages after aclose are dropped."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        await notifier.aclose()
        await notifier.ready()
        await manager.assert_nothing_more()


class TestWithoutSocket:
    async def test_no_notify_socket_sends_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without NOTIFY_SOCKET every method returns without opening a socket."""
        forbid_sockets(monkeypatch)
        notifier = Notifier.from_environ({})
        await notifier.ready("up")
        await notifier.reloading()
        await notifier.status("x")
        await notifier.watchdog()
        await notifier.stopping()
        await notifier.aclose()

    async def test_unsupported_address_sends_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A NOTIFY_SOCKET that is neither a path nor @name disables notification."""
        forbid_sockets(monkeypatch)
        with capture_logs() as logs:
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
        await notifier.ready()
        assert logs == [
            {"event": "sd_notify_unsupported", "address": "vsock:2:1234", "log_level": "debug"}
        ]

    async def test_vanished_socket_is_logged_and_ignored(self, tmp_path: Path) -> None:
        """When the socket is gone, sending logs at debug and does not raise."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
        with capture_logs() as logs:
            await notifier.ready()
            await notifier.watchdog()
        await notifier.aclose()
        assert [(log["event"], log["log_level"], log["message"]) for log in logs] == [
            ("sd_notify_failed", "debug", "READY=1"),
            ("sd_notify_failed", "debug", "WATCHDOG=1"),
        ]

    async def test_a_full_queue_drops_the_message(
        self, manager: Manager, autojump_clock: trio.abc.Clock
    ) -> None:
        """A socket nobody reads (its queue full) costs a message at most SEND_TIMEOUT_S,
        then the message is dropped with a debug line; once there is room again, sending
        goes on."""
        filled = fill_queue(manager.address)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        with capture_logs() as logs, trio.fail_after(SEND_TIMEOUT_S * 2):
            await notifier.stopping()
        assert [(log["event"], log["message"]) for log in logs] == [
            ("sd_notify_failed", "STOPPING=1")
        ]
        assert await manager.receive(filled) == ["x"] * filled
        await notifier.watchdog()
        assert await manager.receive(1) == ["WATCHDOG=1"]
        await notifier.aclose()

    @pytest.mark.parametrize("address", ["/" + "n" * 200, "@", "@" + "n" * 200])
    async def test_unusable_address_is_logged_and_ignored(self, address: str) -> None:
        """A path too long for ``sun_path``, an empty or too long abstract name: one debug
        line per message, nothing raised."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
        with capture_logs() as logs:
            await notifier.ready()
        await notifier.aclose()
        assert [(log["event"], log["message"]) for log in logs] == [("sd_notify_failed", "READY=1")]


def fill_queue(address: str) -> int:
    """Send one-byte datagrams to ``address`` until its queue is full; return how many."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        for sent in range(MAX_FILL):
            try:
                filler.sendto(b"x", address)
            except BlockingIOError:
                return sent
    msg = f"the queue took {MAX_FILL} datagrams without filling"
    raise AssertionError(msg)


class TestWatchdogInterval:
    @pytest.mark.parametrize(
        ("environ", "expected"),
        [
            ({"WATCHDOG_USEC": "30000000"}, 15.0),
            ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
            ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
            ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, None),
            ({}, None),
            ({"WATCHDOG_USEC": "0"}, None),
            ({"WATCHDOG_USEC": "soon"}, None),
        ],
    )
    def test_half_the_interval_for_our_pid(
        self, environ: dict[str, str], expected: float | None
    ) -> None:
        """The interval is half of WATCHDOG_USEC, and only when WATCHDOG_PID (if set) is ours."""
        assert Notifier.from_environ(environ).watchdog_interval() == expected
