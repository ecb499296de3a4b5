"""Per-descriptor state of a simulated driver session, and the per-bit usage tracker."""

from __future__ import annotations

from typing import Final, final

from agent.protocol.constants import HGCM_CLIENTS_PER_SESSION, Requestor

TRACKED_BITS: Final = 32
CLIENT_SLOT_FREE: Final = 0
CLIENT_SLOT_BUSY: Final = 0xFFFFFFFF
"""A slot claimed by a connect or disconnect that is still in progress."""


def session_requestor(*, user_device: bool, uid: int) -> int:
    """Return the requestor the mainline driver computes at open time.

    Root gets USR_ROOT and, since the node is root:root, GRP_VBOX; others get USR_USER.
    ``/dev/vboxuser`` adds USER_DEVICE.
    """
    requestor = Requestor.USERMODE
    requestor |= Requestor.USR_ROOT | Requestor.GRP_VBOX if uid == 0 else Requestor.USR_USER
    if user_device:
        requestor |= Requestor.USER_DEVICE
    return int(requestor)


@final
class DriverSession:
    """One open file descriptor of ``/dev/vboxguest`` or ``/dev/vboxuser``."""

    __slots__ = (
        "acquired_guest_caps",
        "cancel_waiters",
        "closed",
        "event_filter",
        "hgcm_client_ids",
        "lost",
        "mouse_status",
        "requestor",
        "set_guest_caps",
        "uid",
        "user_device",
    )

    def __init__(self, *, user_device: bool, uid: int) -> None:
        self.user_device = user_device
        self.uid = uid
        self.requestor = session_requestor(user_device=user_device, uid=uid)
        self.event_filter = 0
        self.set_guest_caps = 0
        self.acquired_guest_caps = 0
        self.mouse_status = 0
        """Mouse features this session set (Oracle's SET_MOUSE_STATUS ioctl)."""
        self.cancel_waiters = False
        self.closed = False
        self.lost = False
        self.hgcm_client_ids = [CLIENT_SLOT_FREE] * HGCM_CLIENTS_PER_SESSION

    def described(self) -> str:
        """The session for a log line: ``/dev/vboxguest opened by uid 0 (requestor 0x8b)``."""
        node = "vboxuser" if self.user_device else "vboxguest"
        return f"/dev/{node} opened by uid {self.uid} (requestor {self.requestor:#x})"

    def __repr__(self) -> str:
        return f"<DriverSession {self.described()}>"


class BitTracker:
    """``vbg_bit_usage_tracker``: how many sessions use each bit; ``mask`` = bits in use."""

    __slots__ = ("counts", "mask")

    def __init__(self) -> None:
        self.counts = [0] * TRACKED_BITS
        self.mask = 0

    def update(self, changed: int, previous: int) -> None:
        """Count each bit of ``changed`` up if ``previous`` lacked it, else down."""
        for bit in range(TRACKED_BITS):
            flag = 1 << bit
            if not changed & flag:
                continue
            if previous & flag:
                self.counts[bit] -= 1
                if self.counts[bit] == 0:
                    self.mask &= ~flag
            else:
                self.counts[bit] += 1
                if self.counts[bit] == 1:
                    self.mask |= flag
