"""Device specs: what ``--device`` and ``device.path`` name.

- ``/dev/vboxguest`` (or any path): the kernel driver's character device;
  ``/dev/vboxuser`` works for the requests the driver allows unprivileged users.
- ``unix:PATH``: a simulated host served by ``vbox-agent simulate --socket PATH``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from agent.device.transport import DeviceOpener

UNIX_PREFIX: Final = "unix:"


def opener_for_spec(spec: str, *, ioctl_threads: int) -> DeviceOpener:
    """Return the opener for ``spec``.

    Raises:
        ValueError: the spec is empty, or ``unix:`` has no path.
    """
    from agent.device.chardev import CharDevOpener  # noqa: PLC0415 - keeps fcntl/ctypes lazy
    from agent.device.unix import UnixSocketOpener  # noqa: PLC0415

    text = spec.strip()
    if text.startswith(UNIX_PREFIX):
        path = text.removeprefix(UNIX_PREFIX)
        if not path:
            msg = f"device spec {spec!r}: 'unix:' needs a socket path, e.g. unix:/run/host.sock"
            raise ValueError(msg)
        return UnixSocketOpener(path)
    if not text:
        msg = "device spec is empty: give a device path such as /dev/vboxguest or unix:PATH"
        raise ValueError(msg)
    return CharDevOpener(text, threads=ioctl_threads)
