"""Who is logged in to the guest, from the two sources VBoxService reads on Linux.

1. The utmp file: every ``USER_PROCESS`` record's user name (glibc's 384-byte ``struct
   utmp``, the same on every Linux architecture).
2. systemd-logind's sessions: the user of every active session. VBoxService asks logind over
   D-Bus; the agent calls libsystemd's ``sd-login`` (``sd_get_sessions``,
   ``sd_session_is_active``, ``sd_session_get_uid``, then the account name of the uid),
   the documented library interface to the same state, so it needs no D-Bus.
   Distributions that no longer write utmp still have these.

Names are kept in order of first appearance, once each (compared on their first 32 bytes,
utmp's field size, as VBoxService compares them). A source that does not exist (no utmp
file, no logind) adds no one; one that exists and cannot be read raises.
"""

from __future__ import annotations

import ctypes
import functools
import os
import pwd
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable

UTMP_PATH: Final = Path("/run/utmp")
LIBSYSTEMD: Final = "libsystemd.so.0"
UTMP_RECORD_SIZE: Final = 384
USER_PROCESS: Final = 7
UT_NAMESIZE: Final = 32
USER_NAMES_CACHED: Final = 256
"""Account names remembered by uid (a name changed while the agent runs shows after a restart)."""
MAX_UTMP_BYTES: Final = 16 * 1024 * 1024
"""A larger utmp file is not a utmp file: it is refused rather than read into memory."""
_UTMP_HEAD: Final = struct.Struct("=h2xi32s4s32s")
"""``ut_type``, ``ut_pid``, ``ut_line``, ``ut_id``, ``ut_user``: the fields before ``ut_host``."""


class LoginsError(OSError):
    """A login source exists but could not be read; the message names it."""


def logged_in_users(
    utmp_path: Path = UTMP_PATH, logind: Callable[[], list[str]] | None = None
) -> tuple[str, ...]:
    """The logged-in users' names, utmp's first, then logind's active sessions'.

    ``logind`` lists the latter (:func:`logind_users` by default; tests pass their own).
    """
    users: dict[bytes, str] = {}
    for name in (*utmp_users(utmp_path), *(logind or logind_users)()):
        users.setdefault(name.encode()[:UT_NAMESIZE], name)
    return tuple(users.values())


def utmp_users(path: Path = UTMP_PATH) -> list[str]:
    """The user names of the ``USER_PROCESS`` records of ``path``, in file order."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_UTMP_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        msg = f"{path}: {exc.strerror or exc}"
        raise LoginsError(msg) from exc
    if len(data) > MAX_UTMP_BYTES:
        msg = f"{path}: larger than {MAX_UTMP_BYTES} bytes"
        raise LoginsError(msg)
    names = []
    for at in range(0, len(data) - UTMP_RECORD_SIZE + 1, UTMP_RECORD_SIZE):
        kind, _pid, _line, _id, user = _UTMP_HEAD.unpack_from(data, at)
        name = user.split(b"\0", 1)[0].decode(errors="replace")
        if kind == USER_PROCESS and name:
            names.append(name)
    return names


def logind_users() -> list[str]:
    """The users of logind's active sessions, through libsystemd's ``sd-login``.

    A guest without libsystemd or without logind has none.
    """
    try:
        sd_login = _sd_login()
    except OSError:
        return []
    listed = ctypes.POINTER(ctypes.c_void_p)()
    count = sd_login.sd_get_sessions(ctypes.byref(listed))
    if count < 0:
        msg = f"sd_get_sessions: {os.strerror(-count)}"
        raise LoginsError(msg)
    try:
        sessions = [ctypes.string_at(listed[index]) for index in range(count)]
    finally:
        for index in range(count):
            _free(listed[index])
        _free(listed)
    names = []
    for session in sessions:
        if sd_login.sd_session_is_active(session) <= 0:
            continue  # inactive, or ended since the listing
        uid = ctypes.c_uint32()
        if sd_login.sd_session_get_uid(session, ctypes.byref(uid)) < 0:
            continue
        names.append(_user_name(uid.value))
    return names


@functools.lru_cache(maxsize=USER_NAMES_CACHED)
def _user_name(uid: int) -> str:
    """The account name of ``uid``, or the number where the account database has none.

    Cached: the lookup may go to a network directory (NSS), and it runs on the event loop
    at every pass, while a uid's name hardly ever changes.
    """
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.cache
def _sd_login() -> ctypes.CDLL:
    """libsystemd with the ``sd-login`` functions used here declared."""
    library = ctypes.CDLL(LIBSYSTEMD)
    library.sd_get_sessions.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p))]
    library.sd_get_sessions.restype = ctypes.c_int
    library.sd_session_is_active.argtypes = [ctypes.c_char_p]
    library.sd_session_is_active.restype = ctypes.c_int
    library.sd_session_get_uid.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32)]
    library.sd_session_get_uid.restype = ctypes.c_int
    return library


def _free(pointer: object) -> None:
    """Free memory libsystemd allocated (a NULL pointer is fine)."""
    _libc().free(pointer)


@functools.cache
def _libc() -> ctypes.CDLL:
    library = ctypes.CDLL(None)
    library.free.argtypes = [ctypes.c_void_p]
    library.free.restype = None
    return library
