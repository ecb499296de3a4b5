"""Device specs: what ``--device`` and ``device.path`` name.

- ``/dev/vboxguest`` (or any path): the kernel driver's character device;
  ``/dev/vboxuser`` works for the requests the driver allows unprivileged users.
- ``unix:PATH``: a simulated host served by ``vbox-agent simulate --socket PATH``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from agent.device.transport import DeviceOpener

UNIX_PREFIX: Final = "unix:"
SOCKET_PATH_MAX_BYTES: Final = 107
"""Longest Unix socket path: ``sun_path`` holds 108 bytes, the terminating NUL included."""


def opener_for_spec(spec: str, *, ioctl_threads: int) -> DeviceOpener:
    """Return the opener for ``spec``.

    Raises:
        ValueError: the spec is empty, or ``unix:`` has no path.
    """
    # Only the chosen transport is imported: a real agent loads no socket framing, an agent
    # on a simulated host no ioctl code.
    text = spec.strip()
    if text.startswith(UNIX_PREFIX):
        path = text.removeprefix(UNIX_PREFIX)
        if not path:
            msg = f"device spec {spec!r}: 'unix:' needs a socket path, e.g. unix:/run/host.sock"
            raise ValueError(msg)
        from agent.device.unix import UnixSocketOpener  # noqa: PLC0415

        return UnixSocketOpener(path)
    if not text:
        msg = "device spec is empty: give a device path such as /dev/vboxguest or unix:PATH"
        raise ValueError(msg)
    from agent.device.chardev import CharDevOpener  # noqa: PLC0415

    return CharDevOpener(text, threads=ioctl_threads)


def check_socket_path(path: str) -> str:
    """Return ``path`` if it can name a Unix socket.

    Raises:
        ValueError: the path is empty, holds a NUL byte or is longer than
            ``SOCKET_PATH_MAX_BYTES`` bytes.
    """
    size = len(os.fsencode(path))
    if not path:
        msg = "the socket path is empty"
    elif "\0" in path:
        msg = f"socket path {path!r} contains a NUL byte"
    elif size > SOCKET_PATH_MAX_BYTES:
        msg = (
            f"socket path {path!r} is {size} bytes long; "
            f"a Unix socket path holds at most {SOCKET_PATH_MAX_BYTES}"
        )
    else:
        return path
    raise ValueError(msg)
