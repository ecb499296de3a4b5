"""Device specs: what ``--device`` and ``device.path`` name.

- ``/dev/vboxguest`` (or any path): the kernel driver's character device;
  ``/dev/vboxuser`` works for the requests the driver allows unprivileged users.
- ``unix:PATH``: a simulated host served by ``vbox-agent simulate --socket PATH``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import TYPE_CHECKING, Final, Protocol

from agent.protocol.errors import escaped

if TYPE_CHECKING:
    from agent.device.transport import DeviceOpener

UNIX_PREFIX: Final = "unix:"
SOCKET_PATH_MAX_BYTES: Final = 107
"""Longest Unix socket path: ``sun_path`` holds 108 bytes, the terminating NUL included."""
NOT_THE_DEVICE_ERRNOS: Final = frozenset(
    {errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}
)
"""The errnos of ``open(2)``, ``connect(2)`` or ``stat(2)`` that prove a path can never be
the device node or a simulated host's socket, whatever loads or starts later: a directory
(EISDIR), a file where the path needs a directory (ENOTDIR, also a node named with a
trailing ``/``), a symbolic link loop (ELOOP), a name too long: a configuration mistake
(:class:`~agent.device.errors.NotTheDeviceError`)."""


def opener_for_spec(spec: str, *, ioctl_threads: int) -> DeviceOpener:
    """Return the opener for ``spec``.

    Raises:
        ValueError: the spec is not one :func:`check_device_spec` accepts.
    """
    # Only the chosen transport is imported: a real agent loads no socket framing, an agent
    # on a simulated host no ioctl code.
    check_device_spec(spec)
    if spec.startswith(UNIX_PREFIX):
        from agent.device.unix import UnixSocketOpener  # noqa: PLC0415

        return UnixSocketOpener(spec.removeprefix(UNIX_PREFIX))
    from agent.device.chardev import CharDevOpener  # noqa: PLC0415

    return CharDevOpener(spec, threads=ioctl_threads)


def cannot_be_the_device(spec: str) -> str | None:
    """Return why ``spec`` can never reach the device, whatever loads or starts later, as
    far as ``stat`` shows without an open (the
    :class:`~agent.device.errors.NotTheDeviceError` its opener would raise, for which ``run``
    exits 78), or None: for ``unix:PATH`` a path that exists and is not a socket, or where
    none can be (:func:`agent.device.unix.cannot_be_a_host`), else a directory, a bad path,
    or a file that is no vboxguest node (:func:`agent.device.chardev.cannot_be_the_node`).

    Raises:
        ValueError: the spec is not one :func:`check_device_spec` accepts.
    """
    check_device_spec(spec)
    if spec.startswith(UNIX_PREFIX):
        from agent.device.unix import cannot_be_a_host  # noqa: PLC0415

        return cannot_be_a_host(spec.removeprefix(UNIX_PREFIX))
    from agent.device.chardev import cannot_be_the_node  # noqa: PLC0415

    return cannot_be_the_node(spec)


def check_device_spec(spec: str) -> str:
    """Return ``spec`` if it names a device: an absolute path, or ``unix:`` and one.

    ``device.path`` and ``--device`` both check with this.

    Raises:
        ValueError: the path is relative, holds a control character (NUL, a newline, an
            escape...), or cannot name a Unix socket.
    """
    target = spec.removeprefix(UNIX_PREFIX)
    if not target.startswith("/"):
        msg = "must be an absolute path (/dev/vboxguest) or unix:/absolute/socket/path"
        raise ValueError(msg)
    if spec.startswith(UNIX_PREFIX):
        check_socket_path(target)
    elif (control := _control_character(spec)) is not None:
        msg = f"must not contain a control character ({control})"
        raise ValueError(msg)
    return spec


def check_socket_path(path: str) -> str:
    """Return ``path`` if it can name a Unix socket.

    Raises:
        ValueError: the path is empty, holds a control character (NUL, a newline, an
            escape...) or is longer than ``SOCKET_PATH_MAX_BYTES`` bytes.
    """
    size = len(os.fsencode(path))
    if not path:
        msg = "the socket path is empty"
    elif (control := _control_character(path)) is not None:
        msg = f"socket path '{escaped(path)}' contains a control character ({control})"
    elif size > SOCKET_PATH_MAX_BYTES:
        msg = (
            f"socket path '{escaped(path)}' is {size} bytes long; "
            f"a Unix socket path holds at most {SOCKET_PATH_MAX_BYTES}"
        )
    else:
        return path
    raise ValueError(msg)


def shown_path(path: str | os.PathLike[str]) -> str:
    """``path`` for a message, on one printable line (see :func:`escaped`): a file name
    may hold a newline or a terminal escape, and undecodable bytes."""
    return escaped(os.fspath(path))


def _control_character(text: str) -> str | None:
    """The first control character (C0, DEL, C1) in ``text``, escaped; None without one."""
    return next((escaped(char) for char in text if _is_control(char)), None)


def _is_control(char: str) -> bool:
    """Whether ``char`` is a control character: Unicode's category Cc, which is exactly C0
    (U+0000 to U+001F), DEL and C1 (U+007F to U+009F); a range test spares the Unicode
    database's pages."""
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F


_UCRED: Final = struct.Struct("iII")
"""``struct ucred`` (``SO_PEERCRED``): ``pid_t pid``, ``uid_t uid``, ``gid_t gid``."""


class SocketOptions(Protocol):
    """A socket's ``getsockopt`` (the standard library's, or trio's)."""

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes:
        """The option's raw value."""
        ...


def peer_uid(sock: SocketOptions) -> int:
    """The uid of the process at the other end of the connected Unix socket ``sock``
    (``SO_PEERCRED``: for a listener, its credentials when it called ``listen(2)``)."""
    ucred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(ucred)[1])
