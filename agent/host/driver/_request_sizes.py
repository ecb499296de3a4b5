"""How Oracle's driver sizes a VMMDev request userspace passes through VMMDEV_REQUEST.

``vgdrvIoCtl_VMMDevRequest`` checks a request's size before its type's permission, and
without the host: the size must reach the type's structure size (``vmmdevGetRequestSize``,
:data:`REQUEST_SIZES`), else VERR_INVALID_PARAMETER; then ``VbglGR0Verify`` allows a larger
one only to the variable-size types (:data:`VARIABLE_TYPES`), up to 1 MiB
(VERR_BUFFER_OVERFLOW), and refuses it to the others with VERR_IO_BAD_LENGTH. Types
``vmmdevGetRequestSize`` does not know count as size 0, so only a variable type passes:
WRITE_COREDUMP, for one, never does, whoever sends it.

Mainline has none of this; its host answers for a wrong size.
"""

from __future__ import annotations

from typing import Final

from agent.host._guest_info import GET_MOUSE_STATUS_EX
from agent.protocol.constants import MAX_VMMDEV_REQUEST_SIZE, RequestType
from agent.protocol.status import (
    STATUS_CODES,
    VERR_BUFFER_OVERFLOW,
    VERR_INVALID_PARAMETER,
    VINF_SUCCESS,
)

VERR_IO_BAD_LENGTH: Final = STATUS_CODES["VERR_IO_BAD_LENGTH"]

_T = RequestType
REQUEST_SIZES: Final[dict[int, int]] = {
    _T.GET_MOUSE_STATUS: 36,
    _T.SET_MOUSE_STATUS: 36,
    GET_MOUSE_STATUS_EX: 48,
    _T.SET_POINTER_SHAPE: 48,
    _T.GET_HOST_VERSION: 40,
    _T.IDLE: 24,
    _T.GET_HOST_TIME: 32,
    _T.GET_HYPERVISOR_INFO: 32,
    _T.SET_HYPERVISOR_INFO: 32,
    _T.REGISTER_PATCH_MEMORY: 36,
    _T.DEREGISTER_PATCH_MEMORY: 36,
    _T.SET_POWER_STATUS: 28,
    _T.ACKNOWLEDGE_EVENTS: 28,
    _T.REPORT_GUEST_INFO: 32,
    _T.REPORT_GUEST_INFO2: 168,
    _T.REPORT_GUEST_STATUS: 36,
    _T.REPORT_GUEST_USER_STATE: 44,
    _T.GET_DISPLAY_CHANGE_REQ: 40,
    _T.GET_DISPLAY_CHANGE_REQ2: 44,
    _T.GET_DISPLAY_CHANGE_REQEX: 56,
    _T.GET_DISPLAY_CHANGE_REQ_MULTI: 32,  # up to aDisplays[0]
    _T.VIDEMODE_SUPPORTED: 40,
    _T.GET_HEIGHT_REDUCTION: 28,
    _T.REPORT_GUEST_CAPABILITIES: 28,
    _T.SET_GUEST_CAPABILITIES: 32,
    _T.HGCM_CONNECT: 168,
    _T.HGCM_DISCONNECT: 36,
    _T.HGCM_CALL32: 44,
    _T.HGCM_CALL64: 44,  # VBOX_WITH_64_BITS_GUESTS, as in a 64-bit build
    _T.HGCM_CANCEL: 32,
    _T.VIDEO_ACCEL_ENABLE: 36,
    _T.VIDEO_ACCEL_FLUSH: 24,
    _T.VIDEO_SET_VISIBLE_REGION: 28,  # without its one rectangle
    _T.GET_SEAMLESS_CHANGE_REQ: 32,
    _T.QUERY_CREDENTIALS: 412,
    _T.REPORT_GUEST_STATS: 100,
    _T.GET_MEMBALLOON_CHANGE_REQ: 36,
    _T.GET_STATISTICS_CHANGE_REQ: 32,
    _T.CHANGE_MEMBALLOON: 40,  # with one page address
    _T.GET_VRDPCHANGE_REQ: 32,
    _T.LOG_STRING: 28,
    _T.CTL_GUEST_FILTER_MASK: 32,
    _T.GET_CPU_HOTPLUG_REQ: 36,
    _T.SET_CPU_HOTPLUG_STATUS: 28,
    _T.REGISTER_SHARED_MODULE: 208,
    _T.UNREGISTER_SHARED_MODULE: 184,
    _T.CHECK_SHARED_MODULES: 24,
    _T.GET_PAGE_SHARING_STATUS: 28,
    _T.DEBUG_IS_PAGE_SHARED: 44,
    _T.GET_SESSION_ID: 32,
    _T.HEARTBEAT_CONFIGURE: 36,
    _T.GUEST_HEARTBEAT: 24,
    _T.VIDEO_UPDATE_MONITOR_POSITIONS: 36,
}
"""``vmmdevGetRequestSize``: each type's structure size (``VMMDev.h``, packed to 4 bytes)."""
VARIABLE_TYPES: Final = frozenset(
    {
        _T.CHANGE_MEMBALLOON,
        _T.GET_DISPLAY_CHANGE_REQ_MULTI,
        _T.HGCM_CALL64,
        _T.HGCM_CALL32,
        _T.REGISTER_SHARED_MODULE,
        _T.REPORT_GUEST_USER_STATE,
        _T.LOG_STRING,
        _T.SET_POINTER_SHAPE,
        _T.VIDEO_SET_VISIBLE_REGION,
        _T.VIDEO_UPDATE_MONITOR_POSITIONS,
    }
)
"""The types ``VbglGR0Verify`` lets have a buffer larger than their structure."""


def check_request_size(request_type: int, size: int) -> int:
    """Return VINF_SUCCESS, or the status Oracle's driver refuses a request with.

    ``size`` is both the header's and the buffer's: the ioctl entry insists on
    ``size_in == size_out``, and ``size_in`` is the request header's ``size``.
    """
    expected = REQUEST_SIZES.get(request_type, 0)
    if size < expected:
        return VERR_INVALID_PARAMETER
    if size == expected:
        return VINF_SUCCESS
    if request_type not in VARIABLE_TYPES:
        return VERR_IO_BAD_LENGTH
    if size > MAX_VMMDEV_REQUEST_SIZE:
        return VERR_BUFFER_OVERFLOW
    return VINF_SUCCESS
