"""Numbers of the vboxguest ABI: ioctl functions, VMMDev request types, event bits, limits.

Enum members carry the C names minus their prefix (``VMMDEVREQ_``, ``VMMDEV_EVENT_``, ...).
The values come from the Linux uapi headers ``linux/vboxguest.h`` and
``linux/vbox_vmmdev_types.h``, the driver-private ``vmmdev.h`` and, where marked, from
Oracle's headers (``VBoxGuest.h``, ``VMMDev.h``).
"""

from __future__ import annotations

import re
from enum import IntEnum, IntFlag
from typing import Final

from agent.protocol._ioc import io, ioc, iowr

IOCTL_TYPE: Final = "V"
IOCTL_HDR_VERSION: Final = 0x10001
"""``VBG_IOCTL_HDR_VERSION``: the ``version`` of every ioctl header."""
IOCTL_HDR_TYPE_DEFAULT: Final = 0
"""``VBG_IOCTL_HDR_TYPE_DEFAULT``: the header ``type`` of every ioctl but a VMMDev request's
(which the drivers let carry another)."""
IOC_VERSION: Final = 0x00010000
"""``VBG_IOC_VERSION``: the ioctl interface version the agent asks for."""
REQUEST_HEADER_VERSION: Final = 0x10001
"""``VMMDEV_REQUEST_HEADER_VERSION``."""
VMMDEV_VERSION: Final = 0x00010004
"""``VMMDEV_VERSION``: the interface version REPORT_GUEST_INFO carries (major 1, minor 4)."""
OSTYPE_LINUX26: Final = 0x53000
OSTYPE_X64: Final = 0x100

HEADER_SIZE: Final = 24
"""Size of ``struct vbg_ioctl_hdr`` and ``struct vmmdev_request_header``."""
MAX_VMMDEV_REQUEST_SIZE: Final = 1 << 20
"""``VMMDEV_MAX_VMMDEVREQ_SIZE``: the largest VMMDev request (1 MiB)."""
MAX_IOCTL_SIZE: Final = 16 << 20
"""Largest ioctl buffer the mainline driver accepts (``SZ_16M``)."""
VMMDEV_REQUEST_SMALL_LIMIT: Final = 1024
"""Requests below this size use ``VMMDEV_REQUEST(s)``; larger ones ``VMMDEV_REQUEST_BIG``."""

HGCM_MAX_PARMS: Final = 32
"""``VMMDEV_HGCM_MAX_PARMS``: parameters per HGCM call the driver accepts."""
HGCM_MAX_USER_PARM: Final = 24 << 20
"""``VBG_MAX_HGCM_USER_PARM``: the largest user buffer of one HGCM parameter."""
HGCM_MAX_LOCKED_BUFFERS: Final = 10
"""``VbglR0ParmInfo.aLockBufs`` of Oracle's driver: the non-empty buffers one user HGCM call
may pass (the next one is VERR_INVALID_PARAMETER); mainline has no such limit."""
HGCM_CLIENTS_PER_SESSION: Final = 64
"""Slots in a driver session's ``hgcm_client_ids``."""
HGCM_SERVICE_NAME_SIZE: Final = 128
"""Bytes of ``service_name``, including the terminating NUL."""
HGCM_REQ_DONE: Final = 0x1
HGCM_REQ_CANCELLED: Final = 0x2
HGCM_CALL_HEADER_SIZE: Final = 40
"""Size of ``struct vbg_ioctl_hgcm_call`` (the header before the parameters)."""
HGCM_PARM64_SIZE: Final = 16
TIMEOUT_INFINITE: Final = 0xFFFFFFFF
"""A ``timeout_ms`` meaning "wait forever"."""
SHORT_CALL_TIMEOUT_MS: Final = 30_000
"""The longest ``timeout_ms`` of a wait or HGCM call that counts as short: the driver gives
it back within that (cancelling an HGCM call at the host), so it holds a worker thread only
briefly; short HGCM calls (a property set) pass it."""
ABANDON_AFTER_S: Final = 0.2
"""How long a transport waits for a call it was cancelled on (and interrupted) to come back
before it abandons the call, never past the deadline in effect when the call began (but
:data:`GIVE_BACK_S`): the character device and the in-process simulated host apply the same
rule, and the Unix socket to a frame half sent. A cancelled HGCM call must take effect
within 250 ms: a driver that holds the call after the signal (its cancel refused at the
host, both drivers then wait up to 2 s; an uninterruptible connect) is left this long,
which with the scheduling that follows (milliseconds) stays within that; an interruptible
call comes back from its signal at once (within :data:`GIVE_BACK_S`)."""
GIVE_BACK_S: Final = 0.05
"""The least a transport waits for a call it interrupted to come back, even past its
caller's deadline: an interruptible call comes back within it (a worker thread's signal
round trip; scheduling steps in the simulator), so one its caller's deadline cancels (``prop
wait --timeout``) is not reported abandoned. The daemon's stop leaves 250 ms for it."""

PAGE_SIZE: Final = 4096
BALLOON_CHUNK_SIZE: Final = 1 << 20
"""``VMMDEV_MEMORY_BALLOON_CHUNK_SIZE``: the balloon moves in 1 MiB chunks."""
BALLOON_CHUNK_PAGES: Final = BALLOON_CHUNK_SIZE // PAGE_SIZE
"""``VMMDEV_MEMORY_BALLOON_CHUNK_PAGES`` (256)."""
MIN_GUEST_RAM_MB: Final = 4
"""The least guest RAM VirtualBox gives a VM (``MM_RAM_MIN_IN_MB``), in MiB: the
``phys_mem_chunks`` a host reports to the balloon."""
MAX_GUEST_RAM_MB: Final = 2_097_152
"""The most guest RAM VirtualBox gives a VM on a 64-bit host (2 TiB, ``MM_RAM_MAX_IN_MB``)."""
MIN_HEARTBEAT_INTERVAL_NS: Final = 50_000_000
"""The shortest heartbeat interval a VirtualBox host has: VMMDev refuses to start a VM whose
``HeartbeatInterval`` is below 50 ms (``RT_NS_100MS / 2``), so a shorter one is malformed."""

AGC_FLAGS_CONFIG_ACQUIRE_MODE: Final = 0x1
AGC_FLAGS_VALID_MASK: Final = 0x1
GUEST_CAPABILITIES_MASK: Final = 0x7
"""``VMMDEV_GUEST_CAPABILITIES_MASK``."""

HOST_FEATURE_HGCM_PHYS_PAGE_LIST: Final = 0x1
"""``VMMDEV_HVF_HGCM_PHYS_PAGE_LIST``: Linux refuses a host without it."""
HOST_FEATURE_FAST_IRQ_ACK: Final = 0x8000_0000
"""``VMMDEV_HVF_FAST_IRQ_ACK``: reading the fast request port acknowledges the events."""


class IoctlFunction(IntEnum):
    """Function numbers (the ``nr`` field) of the vboxguest ioctls."""

    DRIVER_VERSION_INFO = 0
    VMMDEV_REQUEST = 2
    VMMDEV_REQUEST_BIG = 3
    HGCM_CONNECT = 4
    HGCM_DISCONNECT = 5
    HGCM_CALL_32 = 6
    HGCM_CALL_64 = 7
    LOG = 9
    WAIT_FOR_EVENTS = 10
    INTERRUPT_ALL_WAIT_FOR_EVENTS = 11
    CHANGE_FILTER_MASK = 12
    ACQUIRE_GUEST_CAPABILITIES = 13
    CHANGE_GUEST_CAPABILITIES = 14
    CHECK_BALLOON = 17
    CHANGE_BALLOON = 18
    """Oracle's driver only (``VBGL_IOCTL_CHANGE_BALLOON``); mainline answers ENOTTY."""
    WRITE_CORE_DUMP = 19


class Ioctl:
    """The ioctl numbers, computed as the C macros do (``VBG_IOCTL_*``)."""

    DRIVER_VERSION_INFO: Final = iowr(IOCTL_TYPE, IoctlFunction.DRIVER_VERSION_INFO, 44)
    VMMDEV_REQUEST_BIG: Final = io(IOCTL_TYPE, IoctlFunction.VMMDEV_REQUEST_BIG)
    VMMDEV_REQUEST_BIG_ALT: Final = iowr(IOCTL_TYPE, IoctlFunction.VMMDEV_REQUEST_BIG, 0)
    HGCM_CONNECT: Final = iowr(IOCTL_TYPE, IoctlFunction.HGCM_CONNECT, 156)
    HGCM_DISCONNECT: Final = iowr(IOCTL_TYPE, IoctlFunction.HGCM_DISCONNECT, 28)
    LOG: Final = io(IOCTL_TYPE, IoctlFunction.LOG)
    WAIT_FOR_EVENTS: Final = iowr(IOCTL_TYPE, IoctlFunction.WAIT_FOR_EVENTS, 32)
    INTERRUPT_ALL_WAIT_FOR_EVENTS: Final = iowr(
        IOCTL_TYPE, IoctlFunction.INTERRUPT_ALL_WAIT_FOR_EVENTS, 24
    )
    CHANGE_FILTER_MASK: Final = iowr(IOCTL_TYPE, IoctlFunction.CHANGE_FILTER_MASK, 32)
    ACQUIRE_GUEST_CAPABILITIES: Final = iowr(
        IOCTL_TYPE, IoctlFunction.ACQUIRE_GUEST_CAPABILITIES, 36
    )
    CHANGE_GUEST_CAPABILITIES: Final = iowr(IOCTL_TYPE, IoctlFunction.CHANGE_GUEST_CAPABILITIES, 32)
    CHECK_BALLOON: Final = iowr(IOCTL_TYPE, IoctlFunction.CHECK_BALLOON, 32)
    CHANGE_BALLOON: Final = iowr(IOCTL_TYPE, IoctlFunction.CHANGE_BALLOON, 40)
    WRITE_CORE_DUMP: Final = iowr(IOCTL_TYPE, IoctlFunction.WRITE_CORE_DUMP, 28)

    @staticmethod
    def vmmdev_request(size: int) -> int:
        """Return ``VBG_IOCTL_VMMDEV_REQUEST(size)``."""
        return ioc(3, IOCTL_TYPE, IoctlFunction.VMMDEV_REQUEST, size)

    @staticmethod
    def hgcm_call_64(size: int) -> int:
        """Return ``VBG_IOCTL_HGCM_CALL_64(size)`` (the native call on 64-bit userspace)."""
        return ioc(3, IOCTL_TYPE, IoctlFunction.HGCM_CALL_64, size)

    @staticmethod
    def hgcm_call_32(size: int) -> int:
        """Return ``VBG_IOCTL_HGCM_CALL_32(size)`` (12-byte parameters)."""
        return ioc(3, IOCTL_TYPE, IoctlFunction.HGCM_CALL_32, size)

    @staticmethod
    def log_alt(size: int) -> int:
        """Return ``VBG_IOCTL_LOG_ALT(size)``, the sized alias of ``VBG_IOCTL_LOG``."""
        return ioc(3, IOCTL_TYPE, IoctlFunction.LOG, size)


class RequestType(IntEnum):
    """VMMDev request types (``enum vmmdev_request_type``)."""

    INVALID_REQUEST = 0
    GET_MOUSE_STATUS = 1
    SET_MOUSE_STATUS = 2
    SET_POINTER_SHAPE = 3
    GET_HOST_VERSION = 4
    IDLE = 5
    GET_HOST_TIME = 10
    GET_HYPERVISOR_INFO = 20
    SET_HYPERVISOR_INFO = 21
    REGISTER_PATCH_MEMORY = 22
    DEREGISTER_PATCH_MEMORY = 23
    SET_POWER_STATUS = 30
    ACKNOWLEDGE_EVENTS = 41
    CTL_GUEST_FILTER_MASK = 42
    REPORT_GUEST_INFO = 50
    GET_DISPLAY_CHANGE_REQ = 51
    VIDEMODE_SUPPORTED = 52
    GET_HEIGHT_REDUCTION = 53
    GET_DISPLAY_CHANGE_REQ2 = 54
    REPORT_GUEST_CAPABILITIES = 55
    SET_GUEST_CAPABILITIES = 56
    VIDEMODE_SUPPORTED2 = 57
    REPORT_GUEST_INFO2 = 58
    REPORT_GUEST_STATUS = 59
    HGCM_CONNECT = 60
    HGCM_DISCONNECT = 61
    HGCM_CALL32 = 62
    HGCM_CALL64 = 63
    HGCM_CANCEL = 64
    HGCM_CANCEL2 = 65
    VIDEO_ACCEL_ENABLE = 70
    VIDEO_ACCEL_FLUSH = 71
    VIDEO_SET_VISIBLE_REGION = 72
    GET_SEAMLESS_CHANGE_REQ = 73
    REPORT_GUEST_USER_STATE = 74
    GET_DISPLAY_CHANGE_REQEX = 80
    GET_DISPLAY_CHANGE_REQ_MULTI = 81
    QUERY_CREDENTIALS = 100
    REPORT_CREDENTIALS_JUDGEMENT = 101
    REPORT_GUEST_STATS = 110
    GET_MEMBALLOON_CHANGE_REQ = 111
    GET_STATISTICS_CHANGE_REQ = 112
    CHANGE_MEMBALLOON = 113
    GET_VRDPCHANGE_REQ = 150
    LOG_STRING = 200
    GET_CPU_HOTPLUG_REQ = 210
    SET_CPU_HOTPLUG_STATUS = 211
    REGISTER_SHARED_MODULE = 212
    UNREGISTER_SHARED_MODULE = 213
    CHECK_SHARED_MODULES = 214
    GET_PAGE_SHARING_STATUS = 215
    DEBUG_IS_PAGE_SHARED = 216
    GET_SESSION_ID = 217
    WRITE_COREDUMP = 218
    GUEST_HEARTBEAT = 219
    HEARTBEAT_CONFIGURE = 220
    NT_BUG_CHECK = 221
    VIDEO_UPDATE_MONITOR_POSITIONS = 222


_INTEGER_LITERAL: Final = re.compile(r"[+-]?(?:0[xX][0-9a-fA-F]+|0|[1-9][0-9]*)")
"""A number as the host's commands take it: ASCII decimal or ``0x`` hex, with a sign; what
``int(text, 0)`` reads of that, without its underscores, octal and binary prefixes, or other
scripts' digits (``'0x1_0'``, Arabic-Indic or full-width digits)."""


def parse_integer_literal(text: str) -> int:
    """``text`` as an ASCII decimal or ``0x`` hexadecimal integer.

    Raises:
        ValueError: anything else.
    """
    if _INTEGER_LITERAL.fullmatch(text) is None:
        msg = f"{text!r} is not a decimal or 0x hexadecimal integer"
        raise ValueError(msg)
    return int(text, 0)


def parse_request_type(text: str) -> RequestType:
    """Return the request type named by ``text`` (``CHANGE_MEMBALLOON``, ``VMMDEVREQ_...`` or 113).

    Raises:
        ValueError: ``text`` names no request type.
    """
    stripped = text.strip().upper().removeprefix("VMMDEVREQ_")
    try:
        return RequestType[stripped] if not stripped.isdigit() else RequestType(int(stripped))
    except (KeyError, ValueError):
        msg = f"unknown VMMDev request type {text!r}: expected a name such as CHANGE_MEMBALLOON"
        raise ValueError(msg) from None


class Event(IntFlag):
    """Host event bits (``VMMDEV_EVENT_*``)."""

    MOUSE_CAPABILITIES_CHANGED = 0x001
    HGCM = 0x002
    DISPLAY_CHANGE_REQUEST = 0x004
    JUDGE_CREDENTIALS = 0x008
    RESTORED = 0x010
    SEAMLESS_MODE_CHANGE_REQUEST = 0x020
    BALLOON_CHANGE_REQUEST = 0x040
    STATISTICS_INTERVAL_CHANGE_REQUEST = 0x080
    VRDP = 0x100
    MOUSE_POSITION_CHANGED = 0x200
    CPU_HOTPLUG = 0x400


VALID_EVENT_MASK: Final = 0x7FF
"""``VMMDEV_EVENT_VALID_EVENT_MASK``: mask bits outside it are refused."""


def parse_event_mask(text: str) -> int:
    """Return the event mask named by ``text``: ``RESTORED``, ``0x10`` or ``RESTORED|VRDP``.

    Raises:
        ValueError: a part names no event, or the mask has bits outside 0x7FF.
    """
    mask = 0
    for raw in text.split("|"):
        part = raw.strip().upper().removeprefix("VMMDEV_EVENT_")
        if part in Event.__members__:
            mask |= Event[part]
            continue
        try:
            mask |= parse_integer_literal(part)
        except ValueError:
            names = ", ".join(Event.__members__)
            msg = f"unknown event {raw.strip()!r}: expected one of {names} or a number"
            raise ValueError(msg) from None
    if mask & ~VALID_EVENT_MASK or mask == 0:
        msg = f"event mask {mask:#x} must be non-zero and within {VALID_EVENT_MASK:#x}"
        raise ValueError(msg)
    return mask


class StatCap(IntFlag):
    """Which ``VBoxGuestStatistics`` fields a report fills (``VBOX_GUEST_STAT_*``)."""

    CPU_LOAD_IDLE = 0x0001
    CPU_LOAD_KERNEL = 0x0002
    CPU_LOAD_USER = 0x0004
    THREADS = 0x0008
    PROCESSES = 0x0010
    HANDLES = 0x0020
    MEMORY_LOAD = 0x0040
    PHYS_MEM_TOTAL = 0x0080
    PHYS_MEM_AVAIL = 0x0100
    PHYS_MEM_BALLOON = 0x0200
    MEM_COMMIT_TOTAL = 0x0400
    MEM_KERNEL_TOTAL = 0x0800
    MEM_KERNEL_PAGED = 0x1000
    MEM_KERNEL_NONPAGED = 0x2000
    MEM_SYSTEM_CACHE = 0x4000
    PAGE_FILE_SIZE = 0x8000


STAT_PAGE_SIZE: Final = 4096
"""The unit of every memory figure in a statistics report: 4 KiB pages, whatever the guest's."""
VMM_MAX_CPU_COUNT: Final = 64
"""CPUs a VM may have; Main keeps a statistics report's CPU loads per CPU id below it."""


class CpuStatusType(IntEnum):
    """``VMMDevCpuStatusType``: what SET_CPU_HOTPLUG_STATUS asks of the host."""

    INVALID = 0
    DISABLE = 1
    ENABLE = 2


class CpuEventType(IntEnum):
    """``VMMDevCpuEventType``: what GET_CPU_HOTPLUG_REQ reports.

    ``INVALID`` is the host's slot before any hot-plug event since the VM process started
    (it is zeroed at construction and not in the saved state); ``NONE`` after the guest
    read one.
    """

    INVALID = 0
    NONE = 1
    PLUG = 2
    UNPLUG = 3


class GuestCapability(IntFlag):
    """Guest capability bits (``VMMDEV_GUEST_SUPPORTS_*``)."""

    SEAMLESS = 0x1
    GUEST_HOST_WINDOW_MAPPING = 0x2
    GRAPHICS = 0x4


class Facility(IntEnum):
    """Guest facility types (``VBOXGUEST_FACILITY_TYPE_*``)."""

    UNKNOWN = 0
    VBOXGUEST_DRIVER = 20
    AUTO_LOGON = 90
    VBOX_SERVICE = 100
    VBOX_TRAY_CLIENT = 101
    SEAMLESS = 1000
    GRAPHICS = 1100
    MONITOR_ATTACH = 1101
    ALL = 0x7FFFFFFE


class FacilityStatus(IntEnum):
    """Guest facility states (``VBOXGUEST_FACILITY_STATUS_*``)."""

    INACTIVE = 0
    PAUSED = 1
    PRE_INIT = 20
    INIT = 30
    ACTIVE = 50
    TERMINATING = 100
    TERMINATED = 101
    FAILED = 800
    UNKNOWN = 999


class Requestor(IntFlag):
    """Requestor bits (``VMMDEV_REQUESTOR_*``) a driver stamps on host requests."""

    USR_DRV = 0x1
    USR_DRV_OTHER = 0x2
    USR_ROOT = 0x3
    USR_USER = 0x6
    USERMODE = 0x8
    CON_NO = 0x10
    CON_YES = 0x20
    GRP_VBOX = 0x80
    TRUST_UNTRUSTED = 0x1000
    USER_DEVICE = 0x8000


REQUESTOR_USR_MASK: Final = 0x7
REQUESTOR_KERNEL: Final = 0x1
"""``VBG_KERNEL_REQUEST``: what the mainline driver stamps on its own requests."""


class HgcmParmType(IntEnum):
    """HGCM parameter types (``enum vmmdev_hgcm_function_parameter_type``)."""

    INVALID = 0
    U32 = 1
    U64 = 2
    PHYSADDR = 3
    LINADDR = 4
    LINADDR_IN = 5
    LINADDR_OUT = 6
    LINADDR_KERNEL = 7
    LINADDR_KERNEL_IN = 8
    LINADDR_KERNEL_OUT = 9
    PAGELIST = 10


USER_HGCM_PARM_TYPES: Final = frozenset(
    {
        HgcmParmType.U32,
        HgcmParmType.U64,
        HgcmParmType.LINADDR,
        HgcmParmType.LINADDR_IN,
        HgcmParmType.LINADDR_OUT,
    }
)
"""The parameter types the mainline driver accepts from userspace."""


class HgcmLocationType(IntEnum):
    """``enum vmmdev_hgcm_service_location_type``."""

    INVALID = 0
    LOCALHOST = 1
    LOCALHOST_EXISTING = 2


class PageListDirection(IntEnum):
    """``VMMDEV_HGCM_F_PARM_DIRECTION_*`` flags of an HGCM page list."""

    NONE = 0
    TO_HOST = 1
    FROM_HOST = 2
    BOTH = 3
