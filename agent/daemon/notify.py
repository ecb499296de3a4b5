"""sd_notify: tell systemd about readiness, reloads, shutdown and liveness.

The protocol (``sd_notify(3)``): one ``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated
``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``; a leading ``@`` there means the
abstract namespace. Without the variable every method does nothing, so the daemon runs the same
outside systemd. Sending never fails nor holds up the daemon: a datagram the socket has no room
for within ``SEND_TIMEOUT_S`` (nobody reads it) is dropped like one that fails, with a debug
line.
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
"""How long a message may wait for room in the socket's queue before it is dropped."""
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
    ``aclose``, after which messages are dropped.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        """``address``: a socket path, or ``\\0name`` (abstract); ``None`` disables sending."""
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None

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
        await self._send("READY=1", *([] if status is None else [_status(status)]))

    async def reloading(self) -> None:
        """A reload begins: ``RELOADING=1`` with the ``CLOCK_MONOTONIC`` time in µs."""
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await self._send("RELOADING=1", f"MONOTONIC_USEC={now_us}")

    async def stopping(self, status: str | None = None) -> None:
        """Shutdown begins: ``STOPPING=1``, with an optional status line."""
        await self._send("STOPPING=1", *([] if status is None else [_status(status)]))

    async def status(self, text: str) -> None:
        """Set the line ``systemctl status`` shows: ``STATUS=text``."""
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

    async def _send(self, *lines: str) -> None:
        if self._address is None:
            await trio.lowlevel.checkpoint()
            return
        message = "\n".join(lines)
        data = message.encode(errors="replace")  # a lone surrogate must not end the daemon
        give_up_at = trio.current_time() + SEND_TIMEOUT_S
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            # poll() says an unconnected datagram socket is always writable, whatever the
            # receiver's queue holds: trio's sendto would spin, so retry on a timer instead.
            while True:
                try:
                    self._socket.sendto(data, self._address)
                    break
                except BlockingIOError:
                    if trio.current_time() >= give_up_at:
                        raise
                    await trio.sleep(SEND_RETRY_S)
        except BlockingIOError:
            error = f"no room in the socket's queue within {SEND_TIMEOUT_S:g} s"
            logger.debug("sd_notify_failed", message=message, error=error)
        except OSError as exc:
            logger.debug("sd_notify_failed", message=message, error=str(exc))
        await trio.lowlevel.checkpoint()


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
