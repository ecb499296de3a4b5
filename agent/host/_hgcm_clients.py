"""HGCM client categories and their limits, as Main's ``HGCMService`` counts clients.

Main sorts each client by the requestor bits of its CONNECT into kernel, root and user
clients and admits a new one only while its category of that service is below the limit
(``VERR_HGCM_TOO_MANY_CLIENTS`` as the result otherwise). The requestor bits count only
when the additions said they send them (``VBOXGSTINFO2_F_REQUESTOR_INFO`` in
REPORT_GUEST_INFO2); before that every client is "legacy", which the services the
simulated host has (and Main's default) count as kernel clients.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from agent.protocol.constants import REQUESTOR_USR_MASK, Requestor

REQUESTOR_LEGACY: Final = 0xFFFFFFFF
"""``VMMDEV_REQUESTOR_LEGACY``: the host's requestor of a guest that sends none."""
GUEST_INFO2_F_REQUESTOR_INFO: Final = 0x1
"""``VBOXGSTINFO2_F_REQUESTOR_INFO``: the additions fill the requestor of each request."""


class ClientCategory(IntEnum):
    """``HGCM_CLIENT_CATEGORY_*``."""

    KERNEL = 0
    ROOT = 1
    USER = 2


MAX_CLIENTS: Final = {
    ClientCategory.KERNEL: 2048,
    ClientCategory.ROOT: 1024,
    ClientCategory.USER: 1024,
}
"""Main's default ``acMaxClients`` per category, which the guest-property service keeps."""
_KERNEL_USERS: Final = frozenset({int(Requestor.USR_DRV), int(Requestor.USR_DRV_OTHER)})
_ROOT_USERS: Final = frozenset({int(Requestor.USR_ROOT), 0x4})
"""Root, and the Windows system user (``VMMDEV_REQUESTOR_USR_SYSTEM``)."""


def client_category(requestor: int) -> ClientCategory:
    """Return the category ``HGCMService::CreateAndConnectClient`` puts a client in.

    A requestor that names no user at all counts as a user client.
    """
    if requestor == REQUESTOR_LEGACY:
        return ClientCategory.KERNEL
    user = requestor & REQUESTOR_USR_MASK
    if user in _KERNEL_USERS:
        return ClientCategory.KERNEL
    if user in _ROOT_USERS:
        return ClientCategory.ROOT
    return ClientCategory.USER
