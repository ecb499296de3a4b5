"""The exception tree: one root, h11's local/remote split, VBox status failures, and the
device errors both the device layer and the simulated host raise, and how a message
quotes a peer's value."""

from __future__ import annotations

import errno as errno_codes
import re
from typing import Final

from agent.protocol.status import status_for_errno, status_name, status_text

SHOWN_SIZE: Final = 120
"""Characters of a peer's value or message quoted in an error message; the rest is elided."""


class AgentError(Exception):
    """Root of every error vbox-agent raises on purpose."""


class ProtocolError(AgentError):
    """The vboxguest protocol was not followed."""


class LocalProtocolError(ProtocolError):
    """We misused the device: the request would break a rule of the ABI or the session."""


class RemoteProtocolError(ProtocolError):
    """The driver or host answered with a buffer that breaks the ABI."""


class VBoxStatusError(AgentError):
    """The host or driver failed a request: a VBox status, whichever convention carried it.

    Oracle's driver reports failures in the ioctl header's ``rc``; mainline returns an errno
    (:meth:`from_errno`), converted back to the status it stands for, so callers test ``rc``
    or ``name`` and never care which driver runs.

    Attributes:
        rc: the VBox status code.
        name: its symbolic name (``VERR_...``).
        operation: what was asked (a request or ioctl name).
        errno: the errno the driver returned, or None when the status came in ``rc``.
    """

    def __init__(self, rc: int, operation: str, *, errno: int | None = None) -> None:
        self.rc = rc
        self.name = status_name(rc)
        self.operation = operation
        self.errno = errno
        via = "" if errno is None else f" from errno {errno_codes.errorcode.get(errno, errno)}"
        super().__init__(f"{operation} failed: {status_text(rc)}{via}")

    @classmethod
    def from_errno(cls, code: int, operation: str) -> VBoxStatusError:
        """Return the error for a driver that failed ``operation`` with errno ``code``."""
        return cls(status_for_errno(code), operation, errno=code)


class DeviceUnavailableError(AgentError):
    """The device cannot be opened: missing node, no permission, no simulated host running.

    The message is one line that names the path and what to do; the CLI exits 69
    (``EX_UNAVAILABLE``).
    """


class NotTheDeviceError(DeviceUnavailableError):
    """The device path names something that cannot be a VirtualBox guest device: a directory,
    a regular file, a socket or another driver's node (the errno or sysfs proves it), a
    configuration mistake that no restart mends.

    The message is one line naming the path and the fix; ``run`` exits 78 (``EX_CONFIG``).
    """


class DeviceInUseError(DeviceUnavailableError):
    """Another process holds the device for itself (another vbox-agent runs on it): two
    agents on one VM undo each other's work. ``run`` exits 69 (``EX_UNAVAILABLE``)."""


class DeviceLostError(AgentError):
    """An open session's other side went away (the simulated host exited, the fd was revoked)."""


_SURROGATE_ESCAPE: Final = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")
"""``repr``'s escape of a lone surrogate U+DC80..U+DCFF (not one after an escaped backslash)."""


def _bytes_shown(escaped: str) -> str:
    """``escaped`` (``repr`` text) with the surrogates that stand for undecodable bytes (how
    Python decodes argv and file names: ``surrogateescape``) shown as those bytes, ``\\xff``."""
    return _SURROGATE_ESCAPE.sub(r"\1\\x\2", escaped)


def shown(value: object) -> str:
    """A peer's value quoted in an error message: its ``repr``, cut as :func:`shown_text` does."""
    return shown_text(_bytes_shown(repr(value)))


def escaped(text: str) -> str:
    """``text`` on one printable line, whole: non-printable characters escaped as ``repr``
    does, undecodable bytes (surrogate escapes) as ``\\xff``."""
    return text if text.isprintable() else _bytes_shown(repr(text)[1:-1])


def shown_text(text: str) -> str:
    """A peer's text for one line of a message: non-printable characters escaped, cut to
    ``SHOWN_SIZE`` characters with the full length said."""
    line = escaped(text)
    if len(line) <= SHOWN_SIZE:
        return line
    return f"{line[:SHOWN_SIZE]}... ({len(line)} characters)"


HOST_ERRORS: Final = (VBoxStatusError, RemoteProtocolError)
"""How a host request fails without harming the agent: the host or driver refused it with a
status, or answered with a malformed reply."""
