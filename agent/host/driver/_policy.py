"""``vbg_req_allowed``: which VMMDev requests userspace may pass through the driver.

Oracle's ``vgdrvCheckIfVmmReqIsAllowed`` gives every request the same level for a user
session, so its personality checks against these tables too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import Facility, RequestType

if TYPE_CHECKING:
    from collections.abc import Set as AbstractSet

    from agent.host.driver._session import DriverSession

_T = RequestType
ANYONE: Final = frozenset(
    {
        _T.GET_MOUSE_STATUS,
        _T.SET_MOUSE_STATUS,
        _T.SET_POINTER_SHAPE,
        _T.GET_HOST_VERSION,
        _T.IDLE,
        _T.GET_HOST_TIME,
        _T.SET_POWER_STATUS,
        _T.ACKNOWLEDGE_EVENTS,
        _T.CTL_GUEST_FILTER_MASK,
        _T.REPORT_GUEST_STATUS,
        _T.GET_DISPLAY_CHANGE_REQ,
        _T.VIDEMODE_SUPPORTED,
        _T.GET_HEIGHT_REDUCTION,
        _T.GET_DISPLAY_CHANGE_REQ2,
        _T.VIDEMODE_SUPPORTED2,
        _T.VIDEO_ACCEL_ENABLE,
        _T.VIDEO_ACCEL_FLUSH,
        _T.VIDEO_SET_VISIBLE_REGION,
        _T.VIDEO_UPDATE_MONITOR_POSITIONS,
        _T.GET_DISPLAY_CHANGE_REQEX,
        _T.GET_DISPLAY_CHANGE_REQ_MULTI,
        _T.GET_SEAMLESS_CHANGE_REQ,
        _T.GET_VRDPCHANGE_REQ,
        _T.LOG_STRING,
        _T.GET_SESSION_ID,
    }
)
"""Requests any session may send, through either device node."""
TRUSTED_ONLY: Final = frozenset(
    {
        _T.QUERY_CREDENTIALS,
        _T.REPORT_CREDENTIALS_JUDGEMENT,
        _T.REGISTER_SHARED_MODULE,
        _T.UNREGISTER_SHARED_MODULE,
        _T.WRITE_COREDUMP,
        _T.GET_CPU_HOTPLUG_REQ,
        _T.SET_CPU_HOTPLUG_STATUS,
        _T.CHECK_SHARED_MODULES,
        _T.GET_PAGE_SHARING_STATUS,
        _T.DEBUG_IS_PAGE_SHARED,
        _T.REPORT_GUEST_STATS,
        _T.REPORT_GUEST_USER_STATE,
        _T.GET_STATISTICS_CHANGE_REQ,
    }
)
"""Requests refused to ``/dev/vboxuser`` sessions (USER_DEVICE)."""
NEVER_FACILITIES: Final = frozenset({Facility.ALL, Facility.VBOXGUEST_DRIVER})
_REPORT_GUEST_CAPABILITIES: Final = RequestType.REPORT_GUEST_CAPABILITIES
"""Read once: an enum attribute lookup costs more than the comparison."""
UNSET_BYTES: Final = 0xAAAAAAAA
"""What a request too short to hold the field has there (``vbg_req_alloc``'s fill)."""


def req_allowed(
    session: DriverSession, request_type: int, req: bytearray, trusted_extra: AbstractSet[int]
) -> bool:
    """Return whether ``session`` may pass ``req`` (of ``request_type``) to the host.

    REPORT_GUEST_CAPABILITIES is judged by the u32 at offset 24 read as a *facility*
    (really ``caps``; the check was copied from REPORT_GUEST_STATUS upstream).
    """
    if request_type == _REPORT_GUEST_CAPABILITIES:
        field = L.GuestStatusRequest.facility
        facility = field.get(req) if len(req) >= field.end else UNSET_BYTES
        if facility in NEVER_FACILITIES:
            return False
        trusted_only = facility == Facility.VBOX_SERVICE
    elif request_type in ANYONE:
        trusted_only = False
    elif request_type in TRUSTED_ONLY or request_type in trusted_extra:
        trusted_only = True
    else:
        return False
    return not (trusted_only and session.user_device)
