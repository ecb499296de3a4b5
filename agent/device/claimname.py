"""The claim name: the abstract Unix socket name that stands for the vboxguest driver.

A claim (:meth:`CharDevTransport.claim <agent.device.chardev.CharDevTransport.claim>`)
binds :data:`CLAIM_NAME` beside the node's ``flock(2)``: the driver has two nodes and any
``mknod`` copy is a third inode with a lock of its own, while the name covers every node in
the network namespace. Any local process may bind an abstract name, so a name already held
refuses a claim only when its holder listens as root or as this process's user: the agent
connects and reads ``SO_PEERCRED``, which Linux fills in at ``connect(2)`` from the
listener's credentials as of its ``listen(2)``, and which stays readable once the holder
closed the connection.

Connecting needs no right, so the holder serves its socket for as long as the claim lasts
(:meth:`HeldName.serve`): it accepts and closes every queued connection, and the queue of
:data:`CLAIM_BACKLOG` fills only while local processes connect faster than the holder's
turns. An agent asking then tries again, :data:`CLAIM_ASK_TRIES` times at most; if it still
cannot ask, it logs ``claim_name_untrusted`` and its claim rests on its node's lock, as for
a holder of another user (which covers only that node).
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Final, Protocol, final

import structlog
import trio

from agent.device.spec import peer_uid
from agent.protocol.errors import escaped

_log = structlog.get_logger(__name__)

CLAIM_NAME: Final = b"\0vbox-agent/vboxguest"
"""The abstract Unix socket name a claim binds: the vboxguest driver of this guest (shown as
``@vbox-agent/vboxguest`` by ``ss -x``)."""
CLAIM_BACKLOG: Final = 64
"""Connections the claim's socket queues until its holder accepts and closes them (Linux
queues one more): each is a process that asked who holds the name, a refused agent or any
local process. The holder takes up to a whole queue each time its socket wakes it."""
CLAIM_ASK_TRIES: Final = 50
"""How many times an agent tries to ask who holds the name while the holder's queue is full
(a flood of connections), :data:`CLAIM_ASK_PAUSE_S` apart, about a second in all; then it
cannot tell, and its claim rests on its node's lock."""
CLAIM_ASK_PAUSE_S: Final = 0.02
"""The pause between two tries to ask (:data:`CLAIM_ASK_TRIES`)."""
ACCEPT_PAUSE_S: Final = 1.0
"""How long the holder waits after ``accept(2)`` failed and may have left the connection
queued (descriptors or kernel memory short, a security policy that refuses the accept)
before it tries again."""
_DROPPED_ERRNOS: Final = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
    }
)
"""``accept(2)`` failures that took the connection off the queue (``ECONNABORTED``: the
kernel could not name the peer; the rest are a network's errors, as trio's listener counts
them): the holder goes on to the next one. ``EPERM``, which trio skips alike, is not one:
Linux asks the security module (``security_socket_accept``) before it takes a connection,
so a refusal leaves it queued, and trying again at once would spin."""
_GONE_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})
"""``accept(2)`` failures that mean the socket itself is gone: nothing is left to serve."""


class ClaimedName(Protocol):
    """The claim name as a claim holds it (what ``claim_name_fn`` returns)."""

    async def serve(self) -> None:
        """Answer whoever asks who holds the name until cancelled (or released)."""
        ...

    def release(self) -> None:
        """Give the name up (on trio's thread). Idempotent."""
        ...


@final
class HeldName:
    """The listening socket that holds the claim name, or none when the name is held by a
    process that is no agent (the claim then rests on the node's lock)."""

    __slots__ = ("_logged", "_sock")

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock
        self._logged: set[int] = set()
        """The ``accept(2)`` errnos logged already (each is logged once)."""

    async def serve(self) -> None:
        """Accept and close every connection queued on the name, until cancelled or
        released (then it returns), up to a full queue (:data:`CLAIM_BACKLOG` + 1) per
        wake-up so other tasks run between: each asker read the holder's credentials at
        ``connect(2)``, and nothing is sent.

        No failure of ``accept(2)`` ends the agent (any local user may connect, so it would
        be anyone's to cause): one that dropped the connection (:data:`_DROPPED_ERRNOS`) is
        passed over; one that means the socket is gone (``EBADF``, ``ENOTSOCK``) ends the
        service; any other (descriptors or memory short, a security policy refusing the
        accept) is tried again after :data:`ACCEPT_PAUSE_S`, the connection left queued
        meanwhile. Each errno is logged once, the first time (``claim_name_accept_failed``),
        so a user who keeps connecting floods no log.
        """
        while (sock := self._sock) is not None:  # as long as the claim lasts: one turn a wake-up
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                break
            for _ in range(CLAIM_BACKLOG + 1):
                try:
                    connection, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    code = exc.errno or 0
                    if code in _DROPPED_ERRNOS:
                        self._log_failure(code, outcome="the connection is dropped")
                        continue
                    if code in _GONE_ERRNOS:
                        self._log_failure(code, outcome="the name is no longer served")
                        return
                    self._log_failure(code, outcome=f"tried again in {ACCEPT_PAUSE_S} s")
                    await trio.sleep(ACCEPT_PAUSE_S)
                    break
                connection.close()
        await trio.lowlevel.checkpoint()

    def _log_failure(self, code: int, *, outcome: str) -> None:
        """Log ``accept(2)`` failing with ``code``, the first time it does."""
        if code not in self._logged:
            self._logged.add(code)
            _log.warning(
                "claim_name_accept_failed",
                error=errno.errorcode.get(code, str(code)),
                outcome=outcome,
                repeats="not logged",
            )

    def release(self) -> None:
        """Close the socket (a task serving it returns). Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            trio.lowlevel.notify_closing(sock)
            sock.close()


async def bind_claim_name(name: bytes = CLAIM_NAME) -> HeldName:
    """Bind the abstract ``name`` to a new socket (close-on-exec, non-blocking, listening)
    and return it, to serve while the claim lasts and release with it.

    A name held by a socket listening as root or as this process's user is another agent's:
    ``EADDRINUSE``. Any process may bind an abstract name, so one held otherwise (by another
    user, or not listening, as no agent holds it), or whose holder cannot be asked (its
    queue stayed full, :data:`CLAIM_ASK_TRIES`), refuses nothing: that is logged
    (``claim_name_untrusted``) and the claim rests on the node's lock alone, so no user can
    keep the agent from starting by binding the name first.

    Raises:
        OSError: ``EADDRINUSE`` when another agent holds the name; another ``bind(2)`` or
            ``listen(2)`` failure.
    """
    await trio.lowlevel.checkpoint()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen(CLAIM_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        holder, reason = await _name_holder(name)
        if holder in (0, os.geteuid()):
            raise
        _log.warning(
            "claim_name_untrusted",
            name="@" + escaped(name[1:].decode(errors="surrogateescape")),
            holder_uid=holder,
            reason=reason,
            consequence="the node's lock alone keeps a second agent off",
        )
        return HeldName(None)
    return HeldName(sock)


async def _name_holder(name: bytes) -> tuple[int | None, str]:
    """The uid the socket holding the abstract ``name`` listened as (``SO_PEERCRED``), or
    None, and what ``claim_name_untrusted`` says of it: a full queue is asked again
    (:data:`CLAIM_ASK_TRIES`)."""
    for attempt in range(CLAIM_ASK_TRIES):
        if attempt:
            await trio.sleep(CLAIM_ASK_PAUSE_S)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as asking:
            asking.setblocking(False)
            try:
                asking.connect(name)
            except BlockingIOError:  # EAGAIN: its queue is full
                continue
            except OSError:
                return None, "its holder does not answer"
            return peer_uid(asking), "held by another user"
    return None, f"its holder's queue stayed full ({CLAIM_ASK_TRIES} tries)"
