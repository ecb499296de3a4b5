"""Hand-built ioctl buffers and the sessions of every requestor, for the differential scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import IOCTL_HDR_VERSION, REQUEST_HEADER_VERSION
from agent.protocol.status import VERR_GENERAL_FAILURE

if TYPE_CHECKING:
    from agent.host import DriverSession
    from tests.kernel.differential import Rig

USER_UID: Final = 1000
REQUESTORS: Final = (
    ("vboxguest-root", False, 0),
    ("vboxguest-user", False, USER_UID),
    ("vboxuser-root", True, 0),
    ("vboxuser-user", True, USER_UID),
)
"""(label, user_device, uid): the four kinds of caller the driver tells apart."""


def ioctl(size_in: int, size_out: int, /, *, total: int | None = None, **fields: int) -> bytearray:
    """An ioctl buffer of ``total`` bytes (default the larger size) with a valid header.

    ``fields`` override header fields by name (``version``, ``type``, ``rc``, ``reserved``).
    """
    buf = bytearray(max(size_in, size_out) if total is None else total)
    header = {"size_in": size_in, "version": IOCTL_HDR_VERSION, "size_out": size_out, **fields}
    for name, value in header.items():
        getattr(L.IoctlHeader, name).set(buf, value)
    return buf


def request(request_type: int, size: int, *, requestor: int = 0) -> bytearray:
    """A VMMDev request as userspace passes it through VMMDEV_REQUEST (header = ioctl header)."""
    req = bytearray(size)
    L.RequestHeader.size_.set(req, size)
    L.RequestHeader.version.set(req, REQUEST_HEADER_VERSION)
    L.RequestHeader.request_type.set(req, request_type)
    L.RequestHeader.rc.set(req, VERR_GENERAL_FAILURE)
    L.RequestHeader.reserved1.set(req, size)
    L.RequestHeader.requestor.set(req, requestor)
    return req


def sessions(rig: Rig) -> list[tuple[str, DriverSession]]:
    """One open session of each requestor kind."""
    return [(label, rig.open(user_device=dev, uid=uid)) for label, dev, uid in REQUESTORS]
