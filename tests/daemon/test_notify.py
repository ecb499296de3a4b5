"""Tests of ``agent.daemon.notify.Notifier`` against a real datagram socket.

Rules of this test module:
- The "service manager" is a ``trio.socket`` ``AF_UNIX`` datagram socket bound in
  ``tmp_path`` (or under a random abstract name); nothing else is contacted.
- Every receive runs under ``fail_after(RECEIVE_TIMEOUT_S)`` on the real clock, so a missing
  message fails fast instead of hanging; the full-queue tests alone run on the virtual clock
  (autojump_clock), as the notifier's wait for room is on trio's clock.
- "Nothing more was sent" is shown by a sentinel datagram from another socket arriving next.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import uuid
from select import PIPE_BUF
from typing import TYPE_CHECKING

import pytest
import trio
from structlog.testing import capture_logs

from agent.daemon.notify import (
    SEND_RETRY_S,
    SEND_TIMEOUT_S,
    STATE_SEND_TIMEOUT_S,
    STATUS_LIMIT_BYTES,
    Notifier,
)

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
        """When the socket is gone, sending does not raise: a change of state is a warning
        naming the socket, the rest a debug line."""
        address = str(tmp_path / "gone")
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
        with capture_logs() as logs:
            await notifier.ready()
            await notifier.watchdog()
        await notifier.aclose()
        assert [(log["message"], log["log_level"], log["socket"]) for log in logs] == [
            ("READY=1", "warning", address),
            ("WATCHDOG=1", "debug", address),
        ]

    async def test_a_status_without_room_goes_with_the_next_message(
        self, manager: Manager, autojump_clock: trio.abc.Clock
    ) -> None:
        """A socket nobody reads (its queue full) costs a ``STATUS=`` SEND_TIMEOUT_S at most,
        with a debug line; the text is kept, not tried again on its own, and goes with the
        next message once there is room, the latest text in the place of an older one."""
        filled = fill_queue(manager.address)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        with capture_logs() as logs, trio.fail_after(SEND_TIMEOUT_S * 3):
            await notifier.status("balloon 512 MiB")
            await notifier.status("balloon 256 MiB")
        assert [(log["event"], log["log_level"], log["error"]) for log in logs] == [
            ("sd_notify_failed", "debug", f"no room in the socket's queue for {SEND_TIMEOUT_S:g} s")
        ] * 2
        assert await manager.receive(filled) == ["x"] * filled
        await manager.assert_nothing_more()
        await notifier.watchdog()
        await notifier.watchdog()
        assert await manager.receive(2) == ["WATCHDOG=1\nSTATUS=balloon 256 MiB", "WATCHDOG=1"]
        await notifier.aclose()

    async def test_a_message_with_a_status_of_its_own_replaces_the_unsent_one(
        self, manager: Manager, autojump_clock: trio.abc.Clock
    ) -> None:
        """A status that found no room is not sent after a later one: READY=1 with its own
        ``STATUS=`` (the newer text) takes its place."""
        filled = fill_queue(manager.address)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        with trio.fail_after(SEND_TIMEOUT_S * 2):
            await notifier.status("old")
        assert await manager.receive(filled) == ["x"] * filled
        await notifier.ready("new")
        await notifier.watchdog()
        assert await manager.receive(2) == ["READY=1\nSTATUS=new", "WATCHDOG=1"]
        await notifier.aclose()

    async def test_a_message_waiting_for_room_carries_the_latest_status(
        self, manager: Manager, autojump_clock: trio.abc.Clock
    ) -> None:
        """A ping carrying an unsent status waits for room while a newer status is handed
        in: the newer finds room first, and the ping, tried again after it, no longer carries
        the older text (it did, and systemd showed it last)."""
        filled = fill_queue(manager.address)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        with trio.fail_after(SEND_TIMEOUT_S * 3):
            await notifier.status("balloon 512 MiB")  # no room: kept
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.watchdog)  # carries it, waits for room
                await trio.sleep(SEND_RETRY_S / 2)
                nursery.start_soon(notifier.status, "balloon 256 MiB")  # waits too
                await trio.sleep(SEND_RETRY_S * 0.8)
                assert await manager.receive(filled) == ["x"] * filled  # systemd reads again
        assert await manager.receive(2) == ["STATUS=balloon 256 MiB", "WATCHDOG=1"]
        await notifier.aclose()

    async def test_a_stopping_waiting_for_room_carries_the_status_given_meanwhile(
        self, manager: Manager, autojump_clock: trio.abc.Clock
    ) -> None:
        """A bare STOPPING=1 (the daemon's stop) waits for room with the unsent status of
        before the stop; the services' "stopping" status, which finds no room either, is
        the one it delivers, and nothing follows it."""
        filled = fill_queue(manager.address)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        with trio.fail_after(SEND_TIMEOUT_S * 4):
            await notifier.status("network 2 interfaces")  # no room: kept
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.stopping)
                await trio.sleep(SEND_RETRY_S / 2)
                await notifier.status("network stopping")  # no room for its whole budget
                assert await manager.receive(filled) == ["x"] * filled
        assert await manager.receive(1) == ["STOPPING=1\nSTATUS=network stopping"]
        await manager.assert_nothing_more()
        await notifier.aclose()

    @pytest.mark.parametrize("kind", ["missing", "refused", "stream", "too long"])
    async def test_a_socket_that_cannot_take_a_change_of_state_is_one_warning(
        self, tmp_path: Path, kind: str
    ) -> None:
        """A change of state that no wait would deliver (no socket at the path, a socket
        nobody has open, a stream socket, a path too long for ``sun_path``) is one warning
        naming the socket and why, at once; a ``STATUS=`` one debug line. (Both were debug
        lines, so the journal said nothing of a READY=1 systemd never got.)"""
        address = str(tmp_path / "notify")
        with contextlib.ExitStack() as sockets:
            if kind == "refused":
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
                    gone.bind(address)  # its file stays, with nobody behind it
                error = str(
                    ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
                )
            elif kind == "stream":
                stream = sockets.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                stream.bind(address)
                stream.listen()
                error = str(OSError(errno.EPROTOTYPE, os.strerror(errno.EPROTOTYPE)))
            elif kind == "missing":
                error = str(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)))
            else:
                address = "/" + "n" * 200
                error = "AF_UNIX path too long"
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
            with capture_logs() as logs, trio.fail_after(RECEIVE_TIMEOUT_S):
                await notifier.ready("up")
                await notifier.status("up")
            await notifier.aclose()
        assert logs == [
            {
                "event": "sd_notify_failed",
                "log_level": "warning",
                "message": "READY=1\nSTATUS=up",
                "socket": address,
                "error": error,
            },
            {
                "event": "sd_notify_failed",
                "log_level": "debug",
                "message": "STATUS=up",
                "socket": address,
                "error": error,
            },
        ]

    @pytest.mark.parametrize("address", ["/" + "n" * 200, "@", "@" + "n" * 200])
    async def test_unusable_address_is_logged_and_ignored(self, address: str) -> None:
        """A path too long for ``sun_path``, an empty or too long abstract name: one line per
        message, nothing raised."""
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
        with capture_logs() as logs:
            await notifier.ready()
        await notifier.aclose()
        assert [(log["event"], log["message"], log["socket"]) for log in logs] == [
            ("sd_notify_failed", "READY=1", address)
        ]


class TestChangeOfState:
    """READY=1 and STOPPING=1 wait for room as long as systemd waits for READY=1.

    These run on the virtual clock (autojump_clock): the wait for room is on trio's clock.
    """

    async def test_waits_for_room_past_a_status_budget(
        self, manager: Manager, autojump_clock: trio.abc.Clock
    ) -> None:
        """A READY=1 that finds the queue full for several seconds (PID 1 busy on a boot)
        goes once systemd reads again, and nothing is logged. (It was dropped after
        SEND_TIMEOUT_S: under Type=notify, systemd stopped the agent at TimeoutStartSec= and
        restarted it, again and again.)"""
        filled = fill_queue(manager.address)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        with capture_logs() as logs, trio.fail_after(STATE_SEND_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.ready, "up")
                await trio.sleep(SEND_TIMEOUT_S * 5)  # systemd does not read meanwhile
                assert await manager.receive(filled) == ["x"] * filled
                assert await manager.receive(1) == ["READY=1\nSTATUS=up"]
        assert logs == []
        await notifier.aclose()

    async def test_a_queue_full_for_the_whole_budget_is_one_warning(
        self, manager: Manager, autojump_clock: trio.abc.Clock
    ) -> None:
        """STOPPING=1 that never finds room is tried for STATE_SEND_TIMEOUT_S, then dropped
        with one warning naming the socket and why."""
        fill_queue(manager.address)
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        began = trio.current_time()
        with capture_logs() as logs, trio.fail_after(STATE_SEND_TIMEOUT_S * 2):
            await notifier.stopping()
        assert trio.current_time() - began >= STATE_SEND_TIMEOUT_S
        assert logs == [
            {
                "event": "sd_notify_failed",
                "log_level": "warning",
                "message": "STOPPING=1",
                "socket": manager.address,
                "error": f"no room in the socket's queue for {STATE_SEND_TIMEOUT_S:g} s",
            }
        ]
        await notifier.aclose()

    async def test_given_up_by_the_caller_is_one_warning(
        self, autojump_clock: trio.abc.Clock
    ) -> None:
        """A change of state the caller gives up while it waits for room (a stop cuts a
        READY=1 short) is one warning saying how long it waited; the cancel goes on up."""
        name = f"vbox-agent-test-{uuid.uuid4().hex}"
        manager = await open_manager("\0" + name)
        with manager.sock:
            fill_queue(manager.address)
            notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
            with capture_logs() as logs, trio.move_on_after(2.5) as waited:
                await notifier.ready()
            await notifier.aclose()
        assert waited.cancelled_caught
        [line] = logs
        assert line == {
            "event": "sd_notify_failed",
            "log_level": "warning",
            "message": "READY=1",
            "socket": "@" + name,
            "error": "no room in the socket's queue for 2.5 s, given up",
        }


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
