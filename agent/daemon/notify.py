"""sd_notify: tell systemd about readiness, reloads, shutdown and liveness.

The protocol (``sd_notify(3)``): one ``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated
``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``; a leading ``@`` there means the
abstract namespace. Without the variable every method does nothing, so the daemon runs the same
outside systemd. Sending never raises. A datagram the socket has no room for (nobody reads it)
is tried again until its budget ends: a state systemd acts on (``READY=1``, ``STOPPING=1``)
for :data:`STATE_SEND_TIMEOUT_S`, as long as systemd waits for ``READY=1`` (``sd_notify(3)``
blocks until there is room), the rest for :data:`SEND_TIMEOUT_S`. A ``STATUS=`` that found no
room is not tried again on its own (an idle agent does not wake up for it): it goes with the
next message sent, a watchdog ping or a later status taking its place. Every try of a
message is built anew with the latest status, so no older text lands after a newer one (a
message waiting for room meanwhile carries the newer). A state that cannot go
(no room for its whole budget, or until the caller gives it up; no socket at the path, an
address too long, a refused or a stream socket) gets one warning line naming the socket and
why, the rest a debug line.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Final

import structlog
import trio

if TYPE_CHECKING:
    from collections.abc import Mapping

logger = structlog.get_logger(__name__)

WATCHDOG_FRACTION: Final = 0.5
"""Ping at this fraction of ``WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)`` recommends."""
SEND_TIMEOUT_S: Final = 1.0
"""How long ``STATUS=``, ``WATCHDOG=1`` or ``RELOADING=1`` may wait for room in the socket's
queue before it is dropped: a later status or ping takes the place of one, and systemd loses
nothing when it never hears ``RELOADING=1`` (the ``READY=1`` after it then changes nothing)."""
STATE_SEND_TIMEOUT_S: Final = 30.0
"""How long ``READY=1`` (a start's or a reload's) or ``STOPPING=1`` may wait for room in the
socket's queue: the unit's ``TimeoutStartSec=``, for which systemd waits for the start's
``READY=1`` before it stops the agent. The daemon gives up sooner what a stop must not wait
for."""
SEND_RETRY_S: Final = 0.05
"""How often a message waiting for room is tried again."""
STATUS_LIMIT_BYTES: Final = 2048
"""The most a ``STATUS=`` value may take (UTF-8), cut at a character and ended with ``…``:
systemd drops a whole notify datagram of ``PIPE_BUF`` (4096) bytes or more, READY=1 or
STOPPING=1 with it (``manager_dispatch_notify_fd``); a status is about 1 KiB, but a plug-in's
build error or a long path in a fragment has no bound of its own."""
_USEC_PER_S: Final = 1_000_000


class Notifier:
    """Sends sd_notify messages to one socket (or nowhere).

    Build it with ``from_environ``; the socket is opened on the first message and closed by
    ``aclose``, after which messages are dropped. A cancel while a message waits for room
    gives it up (logged as undelivered).
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        """``address``: a socket path, or ``\\0name`` (abstract); ``None`` disables sending."""
        self._address = address
        self._shown_address = None if address is None else address.replace("\0", "@", 1)
        """The address as ``NOTIFY_SOCKET`` gives it, for log lines."""
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._status: str | None = None
        """The latest ``STATUS=`` line handed in."""
        self._status_sent = True
        """Whether ``_status`` went: until then every message carries it."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from ``environ``."""
        return cls(_socket_address(environ), watchdog_usec=_watchdog_usec(environ))

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls, or ``None`` when systemd wants none for us."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec * WATCHDOG_FRACTION / _USEC_PER_S

    async def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is complete: ``READY=1``, with an optional status line."""
        await self._send("READY=1", *([] if status is None else [_status(status)]), state=True)

    async def reloading(self) -> None:
        """A reload begins: ``RELOADING=1`` with the ``CLOCK_MONOTONIC`` time in µs."""
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await self._send("RELOADING=1", f"MONOTONIC_USEC={now_us}")

    async def stopping(self, status: str | None = None) -> None:
        """Shutdown begins: ``STOPPING=1``, with an optional status line."""
        await self._send("STOPPING=1", *([] if status is None else [_status(status)]), state=True)

    async def status(self, text: str) -> None:
        """Set the line ``systemctl status`` shows: ``STATUS=text``.

        A text the socket's queue had no room for within :data:`SEND_TIMEOUT_S` is kept, not
        tried again: it goes with the next message sent (a ``WATCHDOG=1``, a notice), unless a
        later text takes its place first.
        """
        await self._send(_status(text))

    async def watchdog(self) -> None:
        """Tell the service manager we are alive: ``WATCHDOG=1``."""
        await self._send("WATCHDOG=1")

    async def aclose(self) -> None:
        """Close the socket; later messages are dropped."""
        self._address = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        await trio.lowlevel.checkpoint()

    async def _send(self, *lines: str, state: bool = False) -> None:
        """Send one datagram of ``lines``, trying again while there is no room, for
        :data:`STATE_SEND_TIMEOUT_S` for a ``state`` systemd acts on, else
        :data:`SEND_TIMEOUT_S`; each try carries the latest ``STATUS=`` in place of the one
        ``lines`` may hold, and, when they hold none, the latest that has not gone yet. A
        failure is logged once, at warning for a state; a status that found no room is kept
        for the next message."""
        if self._address is None:
            await trio.lowlevel.checkpoint()
            return
        own = tuple(line for line in lines if not line.startswith("STATUS="))
        sets_status = len(own) < len(lines)
        if sets_status:
            self._status = next(line for line in lines if line.startswith("STATUS="))
            self._status_sent = False
        address = self._address
        budget_s = STATE_SEND_TIMEOUT_S if state else SEND_TIMEOUT_S
        began = trio.current_time()
        sock = self._open_socket()
        while True:
            status = self._status if sets_status or not self._status_sent else None
            message = "\n".join(own if status is None else (*own, status))
            try:
                # A lone surrogate must not end the daemon: errors="replace".
                sock.sendto(message.encode(errors="replace"), address)
            except BlockingIOError:
                if trio.current_time() < began + budget_s:
                    await self._wait_for_room(message, began, state=state)
                    continue
                error = f"no room in the socket's queue for {budget_s:g} s"
                self._log_failed(message, error, state=state)
            except OSError as exc:  # no socket there, address too long, refused, stream socket
                self._log_failed(message, str(exc), state=state)
                self._status_done(status)
            else:
                self._status_done(status)
            break
        await trio.lowlevel.checkpoint()

    async def _wait_for_room(self, message: str, began: float, *, state: bool) -> None:
        """Sleep before the next try (poll() says an unconnected datagram socket is always
        writable, whatever the receiver's queue holds: a wait on it would spin); a cancel
        meanwhile gives the message up, logged."""
        try:
            await trio.sleep(SEND_RETRY_S)
        except trio.Cancelled:
            waited_s = trio.current_time() - began
            error = f"no room in the socket's queue for {waited_s:.1f} s, given up"
            self._log_failed(message, error, state=state)
            raise

    def _status_done(self, status: str | None) -> None:
        """``status`` went (or failed for a reason no wait mends): it is carried no longer,
        unless a later one was handed in meanwhile."""
        if status is not None and status == self._status:
            self._status_sent = True

    def _open_socket(self) -> socket.socket:
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        return self._socket

    def _log_failed(self, message: str, error: str, *, state: bool) -> None:
        log = logger.warning if state else logger.debug
        log("sd_notify_failed", message=message, socket=self._shown_address, error=error)


def _socket_address(environ: Mapping[str, str]) -> str | None:
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    if address:  # vsock: and other families are not supported
        logger.debug("sd_notify_unsupported", address=address)
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    pid = environ.get("WATCHDOG_PID")
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec if usec > 0 else None


def _status(text: str) -> str:
    """One ``STATUS=`` line systemd takes: a newline would start a new (bogus) assignment,
    and a NUL (shown as ``?``) or an overlong text (cut to :data:`STATUS_LIMIT_BYTES`) would
    make it drop the whole message."""
    line = " ".join(text.replace("\0", "?").splitlines())
    data = line.encode(errors="replace")
    if len(data) > STATUS_LIMIT_BYTES:
        kept = data[: STATUS_LIMIT_BYTES - len("…".encode())]
        line = kept.decode(errors="ignore") + "…"
    return "STATUS=" + line
