"""A driver that delegates balloon and heartbeat to trusted userspace.

Trusted sessions (``/dev/vboxguest``) may pass GET_MEMBALLOON_CHANGE_REQ, CHANGE_MEMBALLOON,
GUEST_HEARTBEAT and HEARTBEAT_CONFIGURE through the VMMDev request ioctl; the driver does no
balloon or heartbeat of its own and delivers BALLOON_CHANGE_REQUEST to userspace waiters.
Everything else is mainline.
"""

from __future__ import annotations

from typing import ClassVar

from agent.host.driver._core import Driver
from agent.protocol.constants import Event, RequestType


class PassthroughDriver(Driver):
    """Mainline plus trusted balloon and heartbeat requests from userspace."""

    personality: ClassVar[str] = "passthrough"
    kernel_events: ClassVar[int] = int(Event.HGCM | Event.MOUSE_POSITION_CHANGED)
    owns_heartbeat: ClassVar[bool] = False
    trusted_requests: ClassVar[frozenset[int]] = frozenset(
        {
            RequestType.GET_MEMBALLOON_CHANGE_REQ,
            RequestType.CHANGE_MEMBALLOON,
            RequestType.GUEST_HEARTBEAT,
            RequestType.HEARTBEAT_CONFIGURE,
        }
    )
