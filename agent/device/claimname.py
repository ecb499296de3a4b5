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
"""How long the holder waits after ``accept(2)`` failed for want of descriptors or kernel
memory before it tries again (the connection stays queued meanwhile)."""
_SHORTAGE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket | None) -> None:
        self._sock = sock

    async def serve(self) -> None:
        """Accept and close every connection queued on the name, until cancelled or
        released (then it returns), a queue's worth per wake-up so other tasks run between:
        each asker read the holder's credentials at ``connect(2)``, and nothing is sent.
        ``accept(2)`` failing for want of descriptors or memory is logged
        (``claim_name_accept_failed``) and tried again after :data:`ACCEPT_PAUSE_S`.

        Raises:
            OSError: another failure of ``accept(2)``.
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
                    if exc.errno not in _SHORTAGE_ERRNOS:
                        raise
                    _log.warning(
                        "claim_name_accept_failed",
                        error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        retry_in_s=ACCEPT_PAUSE_S,
                    )
                    await trio.sleep(ACCEPT_PAUSE_S)
                    break
                connection.close()
        await trio.lowlevel.checkpoint()

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
