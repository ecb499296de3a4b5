"""VirtualBox status codes (``VINF_*``, ``VWRN_*``, ``VERR_*``) and the mainline errno mapping.

Every code of the Linux uapi ``linux/vbox_err.h`` is here (the ABI test checks them against
the installed header), plus the VirtualBox codes the host and its services return that the
uapi header leaves out (the HGCM framework's ``-29xx`` family among them).
"""

from __future__ import annotations

import errno
from types import MappingProxyType
from typing import Final

from agent.protocol.constants import parse_integer_literal

_STATUS: Final[dict[str, int]] = {
    "VINF_SUCCESS": 0,
    "VINF_PERMISSION_DENIED": 10,  # VirtualBox err.h, not in the Linux uapi
    "VWRN_NOT_FOUND": 78,  # VirtualBox err.h, not in the Linux uapi
    "VINF_HGCM_CLIENT_REJECTED": 2901,  # VirtualBox err.h, not in the Linux uapi
    "VINF_HGCM_ASYNC_EXECUTE": 2903,
    "VINF_HGCM_SAVE_STATE": 2906,  # VirtualBox err.h, not in the Linux uapi
    "VERR_GENERAL_FAILURE": -1,
    "VERR_INVALID_PARAMETER": -2,
    "VERR_INVALID_MAGIC": -3,
    "VERR_INVALID_HANDLE": -4,
    "VERR_LOCK_FAILED": -5,
    "VERR_INVALID_POINTER": -6,
    "VERR_IDT_FAILED": -7,
    "VERR_NO_MEMORY": -8,
    "VERR_ALREADY_LOADED": -9,
    "VERR_PERMISSION_DENIED": -10,
    "VERR_VERSION_MISMATCH": -11,
    "VERR_NOT_IMPLEMENTED": -12,
    "VERR_INVALID_FLAGS": -13,
    "VERR_NOT_EQUAL": -18,
    "VERR_NOT_SYMLINK": -19,
    "VERR_NO_TMP_MEMORY": -20,
    "VERR_INVALID_FMODE": -21,
    "VERR_WRONG_ORDER": -22,
    "VERR_NO_TLS_FOR_SELF": -23,
    "VERR_FAILED_TO_SET_SELF_TLS": -24,
    "VERR_NO_CONT_MEMORY": -26,
    "VERR_NO_PAGE_MEMORY": -27,
    "VERR_THREAD_IS_DEAD": -29,
    "VERR_THREAD_NOT_WAITABLE": -30,
    "VERR_PAGE_TABLE_NOT_PRESENT": -31,
    "VERR_INVALID_CONTEXT": -32,
    "VERR_TIMER_BUSY": -33,
    "VERR_ADDRESS_CONFLICT": -34,
    "VERR_UNRESOLVED_ERROR": -35,
    "VERR_INVALID_FUNCTION": -36,
    "VERR_NOT_SUPPORTED": -37,
    "VERR_ACCESS_DENIED": -38,
    "VERR_INTERRUPTED": -39,
    "VERR_TIMEOUT": -40,
    "VERR_BUFFER_OVERFLOW": -41,
    "VERR_TOO_MUCH_DATA": -42,
    "VERR_MAX_THRDS_REACHED": -43,
    "VERR_MAX_PROCS_REACHED": -44,
    "VERR_SIGNAL_REFUSED": -45,
    "VERR_SIGNAL_PENDING": -46,
    "VERR_SIGNAL_INVALID": -47,
    "VERR_STATE_CHANGED": -48,
    "VERR_INVALID_UUID_FORMAT": -49,
    "VERR_PROCESS_NOT_FOUND": -50,
    "VERR_PROCESS_RUNNING": -51,
    "VERR_TRY_AGAIN": -52,
    "VERR_PARSE_ERROR": -53,
    "VERR_OUT_OF_RANGE": -54,
    "VERR_NUMBER_TOO_BIG": -55,
    "VERR_NO_DIGITS": -56,
    "VERR_NEGATIVE_UNSIGNED": -57,
    "VERR_NO_TRANSLATION": -58,
    "VERR_CODE_POINT_ENDIAN_INDICATOR": -59,  # IPRT err.h, not in the Linux uapi
    "VERR_CODE_POINT_SURROGATE": -60,  # IPRT err.h, not in the Linux uapi
    "VERR_INVALID_UTF8_ENCODING": -61,  # IPRT err.h, not in the Linux uapi
    "VERR_NO_PHYS_MEMORY": -73,  # VirtualBox err.h, not in the Linux uapi
    "VERR_NOT_FOUND": -78,
    "VERR_INVALID_STATE": -79,
    "VERR_OUT_OF_RESOURCES": -80,
    "VERR_FILE_NOT_FOUND": -102,
    "VERR_PATH_NOT_FOUND": -103,
    "VERR_INVALID_NAME": -104,
    "VERR_ALREADY_EXISTS": -105,
    "VERR_TOO_MANY_OPEN_FILES": -106,
    "VERR_SEEK": -107,
    "VERR_NEGATIVE_SEEK": -108,
    "VERR_SEEK_ON_DEVICE": -109,
    "VERR_EOF": -110,
    "VERR_READ_ERROR": -111,
    "VERR_WRITE_ERROR": -112,
    "VERR_WRITE_PROTECT": -113,
    "VERR_SHARING_VIOLATION": -114,
    "VERR_FILE_LOCK_FAILED": -115,
    "VERR_FILE_LOCK_VIOLATION": -116,
    "VERR_CANT_CREATE": -117,
    "VERR_CANT_DELETE_DIRECTORY": -118,
    "VERR_NOT_SAME_DEVICE": -119,
    "VERR_FILENAME_TOO_LONG": -120,
    "VERR_MEDIA_NOT_PRESENT": -121,
    "VERR_MEDIA_NOT_RECOGNIZED": -122,
    "VERR_FILE_NOT_LOCKED": -123,
    "VERR_FILE_LOCK_LOST": -124,
    "VERR_DIR_NOT_EMPTY": -125,
    "VERR_NOT_A_DIRECTORY": -126,
    "VERR_IS_A_DIRECTORY": -127,
    "VERR_FILE_TOO_BIG": -128,
    "VERR_RESOURCE_BUSY": -138,
    "VERR_DISK_FULL": -152,
    "VERR_TOO_MANY_SYMLINKS": -156,
    "VERR_NO_MORE_FILES": -201,
    "VERR_INTERNAL_ERROR": -225,
    "VERR_INTERNAL_ERROR_2": -226,
    "VERR_INTERNAL_ERROR_3": -227,
    "VERR_INTERNAL_ERROR_4": -228,
    "VERR_DEV_IO_ERROR": -250,
    "VERR_IO_BAD_LENGTH": -255,
    "VERR_BROKEN_PIPE": -301,
    "VERR_NO_DATA": -304,
    "VERR_SEM_DESTROYED": -363,
    "VERR_DEADLOCK": -365,
    "VERR_NET_IO_ERROR": -400,
    "VERR_NET_OUT_OF_RESOURCES": -401,
    "VERR_NET_HOST_NOT_FOUND": -402,
    "VERR_NET_PATH_NOT_FOUND": -403,
    "VERR_NET_PRINT_ERROR": -404,
    "VERR_NET_NO_NETWORK": -405,
    "VERR_NET_NOT_UNIQUE_NAME": -406,
    "VERR_NET_IN_PROGRESS": -436,
    "VERR_NET_ALREADY_IN_PROGRESS": -437,
    "VERR_NET_NOT_SOCKET": -438,
    "VERR_NET_DEST_ADDRESS_REQUIRED": -439,
    "VERR_NET_MSG_SIZE": -440,
    "VERR_NET_PROTOCOL_TYPE": -441,
    "VERR_NET_PROTOCOL_NOT_AVAILABLE": -442,
    "VERR_NET_PROTOCOL_NOT_SUPPORTED": -443,
    "VERR_NET_SOCKET_TYPE_NOT_SUPPORTED": -444,
    "VERR_NET_OPERATION_NOT_SUPPORTED": -445,
    "VERR_NET_PROTOCOL_FAMILY_NOT_SUPPORTED": -446,
    "VERR_NET_ADDRESS_FAMILY_NOT_SUPPORTED": -447,
    "VERR_NET_ADDRESS_IN_USE": -448,
    "VERR_NET_ADDRESS_NOT_AVAILABLE": -449,
    "VERR_NET_DOWN": -450,
    "VERR_NET_UNREACHABLE": -451,
    "VERR_NET_CONNECTION_RESET": -452,
    "VERR_NET_CONNECTION_ABORTED": -453,
    "VERR_NET_CONNECTION_RESET_BY_PEER": -454,
    "VERR_NET_NO_BUFFER_SPACE": -455,
    "VERR_NET_ALREADY_CONNECTED": -456,
    "VERR_NET_NOT_CONNECTED": -457,
    "VERR_NET_SHUTDOWN": -458,
    "VERR_NET_TOO_MANY_REFERENCES": -459,
    "VERR_NET_CONNECTION_TIMED_OUT": -460,
    "VERR_NET_CONNECTION_REFUSED": -461,
    "VERR_NET_HOST_DOWN": -464,
    "VERR_NET_HOST_UNREACHABLE": -465,
    "VERR_NET_PROTOCOL_ERROR": -466,
    "VERR_NET_INCOMPLETE_TX_PACKET": -467,
    "VERR_BAD_EXE_FORMAT": -608,
    "VERR_SERVICE_DISABLED": -1020,  # VirtualBox err.h, not in the Linux uapi
    "VERR_HGCM_SERVICE_NOT_FOUND": -2900,  # VirtualBox err.h, not in the Linux uapi
    "VERR_HGCM_INVALID_CMD_ADDRESS": -2902,  # VirtualBox err.h, not in the Linux uapi
    "VERR_HGCM_INTERNAL": -2904,  # VirtualBox err.h, not in the Linux uapi
    "VERR_HGCM_INVALID_CLIENT_ID": -2905,  # VirtualBox err.h, not in the Linux uapi
    "VERR_HGCM_SERVICE_EXISTS": -2907,  # VirtualBox err.h, not in the Linux uapi
    "VERR_HGCM_TOO_MANY_CLIENTS": -2908,  # VirtualBox err.h, not in the Linux uapi
    "VERR_HGCM_TOO_MANY_CLIENT_CALLS": -2909,  # VirtualBox err.h, not in the Linux uapi
    "VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH": -3804,  # VirtualBox err.h, not in the Linux uapi
    "VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH": -3805,  # VirtualBox err.h, not in the Linux uapi
    # VirtualBox err.h, not in the Linux uapi
    "VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST": -4700,
}

STATUS_CODES: Final = MappingProxyType(_STATUS)
"""Symbolic name to value, for every status code this package knows."""

_NAMES: Final = MappingProxyType({value: name for name, value in _STATUS.items()})

VINF_SUCCESS: Final = 0
VERR_GENERAL_FAILURE: Final = -1
VERR_INVALID_PARAMETER: Final = -2
VERR_NO_MEMORY: Final = -8
VERR_INVALID_FLAGS: Final = -13
VERR_PERMISSION_DENIED: Final = -10
VERR_VERSION_MISMATCH: Final = -11
VERR_NOT_IMPLEMENTED: Final = -12
VERR_NOT_SUPPORTED: Final = -37
VERR_ACCESS_DENIED: Final = -38
VERR_INTERRUPTED: Final = -39
VERR_TIMEOUT: Final = -40
VERR_BUFFER_OVERFLOW: Final = -41
VERR_TOO_MUCH_DATA: Final = -42
VERR_PARSE_ERROR: Final = -53
VERR_OUT_OF_RANGE: Final = -54
VERR_INVALID_UTF8_ENCODING: Final = -61
VERR_NOT_FOUND: Final = -78
VERR_OUT_OF_RESOURCES: Final = -80
VERR_ALREADY_EXISTS: Final = -105
VERR_INTERNAL_ERROR: Final = -225
VINF_PERMISSION_DENIED: Final = 10
VWRN_NOT_FOUND: Final = 78
VINF_HGCM_ASYNC_EXECUTE: Final = 2903
VERR_HGCM_SERVICE_NOT_FOUND: Final = -2900
VERR_HGCM_INVALID_CLIENT_ID: Final = -2905
VERR_HGCM_TOO_MANY_CLIENTS: Final = -2908
VERR_HGCM_TOO_MANY_CLIENT_CALLS: Final = -2909
VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH: Final = -3804
VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH: Final = -3805


STATUS_MIN: Final = -(1 << 31)
"""Smallest VBox status code (statuses are 32-bit signed integers, ``int32_t rc``)."""
STATUS_MAX: Final = (1 << 31) - 1
"""Largest VBox status code."""


def status_name(rc: int) -> str:
    """Return the symbolic name of a status code, or a generic label for unknown codes."""
    name = _NAMES.get(rc)
    if name is not None:
        return name
    kind = "VERR" if rc < 0 else "VINF"
    return f"{kind}_UNKNOWN({rc})"


def status_text(rc: int) -> str:
    """``VERR_NO_MEMORY (-8)`` for a known status; an unknown one's label, which holds the
    number already (``VERR_UNKNOWN(-4242)``)."""
    name = status_name(rc)
    return f"{name} ({rc})" if rc in _NAMES else name


def parse_status(text: str) -> int:
    """Return the status code named by ``text`` (a name such as ``VERR_NO_MEMORY`` or a number).

    Raises:
        ValueError: ``text`` is neither a known name nor an integer in
            ``STATUS_MIN..STATUS_MAX``.
    """
    stripped = text.strip()
    value = _STATUS.get(stripped.upper())
    if value is not None:
        return value
    try:
        value = parse_integer_literal(stripped)
    except ValueError:
        msg = f"unknown VBox status {text!r}: expected a name such as VERR_NO_MEMORY or a number"
        raise ValueError(msg) from None
    if not STATUS_MIN <= value <= STATUS_MAX:
        msg = f"VBox status {text!r} is outside {STATUS_MIN}..{STATUS_MAX} (a 32-bit int)"
        raise ValueError(msg)
    return value


_TO_ERRNO: Final = MappingProxyType(
    {
        -38: errno.EPERM,
        -102: errno.ENOENT,
        -50: errno.ESRCH,
        -39: errno.EINTR,
        -250: errno.EIO,
        -42: errno.E2BIG,
        -608: errno.ENOEXEC,
        -4: errno.EBADF,
        -52: errno.EAGAIN,
        -8: errno.ENOMEM,
        -6: errno.EFAULT,
        -138: errno.EBUSY,
        -105: errno.EEXIST,
        -119: errno.EXDEV,
        -126: errno.ENOTDIR,
        -103: errno.ENOTDIR,
        -104: errno.ENOENT,
        -127: errno.EISDIR,
        -2: errno.EINVAL,
        -106: errno.ENFILE,
        -36: errno.ENOTTY,
        -114: errno.ETXTBSY,
        -128: errno.EFBIG,
        -152: errno.ENOSPC,
        -109: errno.ESPIPE,
        -113: errno.EROFS,
        -301: errno.EPIPE,
        -365: errno.EDEADLK,
        -120: errno.ENAMETOOLONG,
        -115: errno.ENOLCK,
        -12: errno.ENOSYS,
        -37: errno.ENOSYS,
        -125: errno.ENOTEMPTY,
        -156: errno.ELOOP,
        -201: errno.ENODATA,
        -304: errno.ENODATA,
        -405: errno.ENONET,
        -406: errno.ENOTUNIQ,
        -58: errno.EILSEQ,
        -438: errno.ENOTSOCK,
        -439: errno.EDESTADDRREQ,
        -440: errno.EMSGSIZE,
        -441: errno.EPROTOTYPE,
        -442: errno.ENOPROTOOPT,
        -443: errno.EPROTONOSUPPORT,
        -444: errno.ESOCKTNOSUPPORT,
        -445: errno.EOPNOTSUPP,
        -446: errno.EPFNOSUPPORT,
        -447: errno.EAFNOSUPPORT,
        -448: errno.EADDRINUSE,
        -449: errno.EADDRNOTAVAIL,
        -450: errno.ENETDOWN,
        -451: errno.ENETUNREACH,
        -452: errno.ENETRESET,
        -453: errno.ECONNABORTED,
        -454: errno.ECONNRESET,
        -455: errno.ENOBUFS,
        -456: errno.EISCONN,
        -457: errno.ENOTCONN,
        -458: errno.ESHUTDOWN,
        -459: errno.ETOOMANYREFS,
        -40: errno.ETIMEDOUT,
        -461: errno.ECONNREFUSED,
        -464: errno.EHOSTDOWN,
        -465: errno.EHOSTUNREACH,
        -437: errno.EALREADY,
        -436: errno.EINPROGRESS,
        -121: errno.ENOMEDIUM,
        -122: errno.EMEDIUMTYPE,
    }
)


_ERRNO_OF_DRIVER: Final = MappingProxyType(
    {
        errno.EPERM: _STATUS["VERR_PERMISSION_DENIED"],
        errno.EMFILE: _STATUS["VERR_TOO_MANY_OPEN_FILES"],
    }
)
"""Errnos mainline returns by itself where Oracle's driver returns these statuses: a refused
VMMDev request (the table would say VERR_ACCESS_DENIED) and a session's 65th HGCM client."""


def _unambiguous_reverse() -> dict[int, int]:
    statuses: dict[int, set[int]] = {}
    for rc, code in _TO_ERRNO.items():
        statuses.setdefault(code, set()).add(rc)
    return {code: rcs.pop() for code, rcs in statuses.items() if len(rcs) == 1}


_FROM_ERRNO: Final = MappingProxyType({**_unambiguous_reverse(), **_ERRNO_OF_DRIVER})


def status_for_errno(code: int) -> int:
    """Return the VBox status a mainline errno stands for.

    The driver's status->errno table read backwards where one status maps to ``code``
    (EINVAL: VERR_INVALID_PARAMETER, EINTR: VERR_INTERRUPTED, ETIMEDOUT: VERR_TIMEOUT, ...),
    except EPERM and EMFILE (:data:`_ERRNO_OF_DRIVER`). An errno several statuses share
    (ENOENT, ENOTDIR, ENOSYS, ENODATA) or none (ENODEV, EPROTO) is VERR_UNRESOLVED_ERROR;
    the error keeps the errno itself.
    """
    return _FROM_ERRNO.get(code, _STATUS["VERR_UNRESOLVED_ERROR"])


def status_to_errno(rc: int) -> int:
    """Return the errno the mainline driver (``vbg_status_code_to_errno``) gives for ``rc``.

    Success and informational codes map to 0; a failure the table does not list maps to
    ``EPROTO``, as in the kernel.
    """
    if rc >= 0:
        return 0
    return _TO_ERRNO.get(rc, errno.EPROTO)
