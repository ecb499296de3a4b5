"""Who is logged in to the guest, from the two sources VBoxService reads on Linux.

1. The utmp file: every ``USER_PROCESS`` record's user name (glibc's ``struct utmp``; see
   :func:`utmp_record_size` for its size, which differs between architectures).
2. systemd-logind's sessions: the user of every active session. VBoxService asks logind over
   D-Bus for the session's user name; the agent calls libsystemd's ``sd-login``
   (``sd_get_sessions``, ``sd_session_is_active``, then ``sd_session_get_username``, or
   where libsystemd predates it (systemd 254) ``sd_session_get_uid`` and the account name of
   the uid), the documented library interface to the same state, so it needs no D-Bus.
   Distributions that no longer write utmp still have these.

Names are kept in order of first appearance, once each, compared as the sources give their
bytes (decoded as host text, :func:`agent.protocol.host_text.host_str`, so nothing is lost),
as VBoxService 7.2.6 compares whole names: two accounts whose names share their first 32
bytes (one short name in two SSSD domains) are two users. One exception: utmp's ``ut_user``
holds 32 bytes, so a utmp name of exactly 32 bytes may be the cut of a longer one, maybe
mid-character; it counts as the same user as the first longer logind name that begins
with those bytes (unless logind lists it whole), and logind's full name is published in its
place; where no name completes it, a character the cut split is left out. A name IPRT does
not take as UTF-8 would make the host refuse the whole list: it is published with each such
sequence (and U+FFFE, U+FFFF) as U+FFFD. A source that does not
exist (no utmp file, no libsystemd) adds no one and is not one read. One that exists and
cannot be read is left out and named with its error, the other's users still count (as
VBoxService 7.2.6 logs a failing logind and publishes what it has); only when every source
that exists fails is that an error: on a guest without utmp a failing logind must not read
as "no one is logged in".

Naming a uid asks the account database, which NSS may send to a network directory (LDAP,
SSSD) that answers slowly or not at all. Its answers are kept (names found; misses for the
next reading), and :func:`known_accounts_only` reads without asking, so the caller reads on
its event loop while every name is known and moves only a reading that must ask to a
worker thread.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import os
import platform
import pwd
import struct
import threading
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar, final

from agent.protocol.host_text import host_bytes, host_str
from agent.protocol.iprt_utf8 import replace_refused, without_cut_sequence
from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

T = TypeVar("T")
UTMP_PATH: Final = Path("/run/utmp")
LIBSYSTEMD: Final = "libsystemd.so.0"
UTMP_RECORD_SIZE_TIME32: Final = 384
"""``struct utmp`` where ``ut_session`` and ``ut_tv`` are 32-bit fields (glibc's
``__WORDSIZE_TIME64_COMPAT32``): every 32-bit ABI, and the 64-bit ones kept compatible with
a 32-bit sibling (x86-64, ppc64, sparc64, mips64, riscv64)."""
UTMP_RECORD_SIZE_TIME64: Final = 400
"""``struct utmp`` where ``ut_session`` is a ``long`` and ``ut_tv`` a ``struct timeval``:
the 64-bit ABIs without that compatibility (aarch64, s390x, loongarch64). The fields
read here (``ut_type`` to ``ut_user``) have the same offsets in both."""
WIDE_UTMP_MACHINES: Final = frozenset({"aarch64", "s390x", "loongarch64"})
"""``uname -m`` of the 64-bit architectures with the 400-byte record."""
POINTER_SIZE: Final = struct.calcsize("P")
USER_PROCESS: Final = 7
UT_NAMESIZE: Final = 32
USER_NAMES_CACHED: Final = 256
"""Account names remembered by uid (a name changed while the agent runs shows after a restart)."""
MISSES_KEPT: Final = 1
"""Readings after the one that missed for which a uid without a name is not asked again."""
MAX_UTMP_BYTES: Final = 16 * 1024 * 1024
"""A larger utmp file is not a utmp file: it is refused rather than read into memory."""
_UTMP_HEAD: Final = struct.Struct("=h2xi32s4s32s")
"""``ut_type``, ``ut_pid``, ``ut_line``, ``ut_id``, ``ut_user``: the fields before ``ut_host``."""


def utmp_record_size(machine: str, pointer_size: int) -> int:
    """The size of glibc's ``struct utmp`` on ``machine`` (``uname -m``) for a process with
    ``pointer_size``-byte pointers (a 32-bit process on a 64-bit kernel has the 32-bit
    layout, whatever the machine)."""
    if pointer_size == 8 and machine in WIDE_UTMP_MACHINES:
        return UTMP_RECORD_SIZE_TIME64
    return UTMP_RECORD_SIZE_TIME32


UTMP_RECORD_SIZE: Final = utmp_record_size(platform.machine(), POINTER_SIZE)
"""The record size of the running architecture."""


class LoginsError(OSError):
    """A login source exists but could not be read; the message names it."""


@record
class Logins:
    """Who is logged in, as far as the sources could be read.

    Attributes:
        users: the names, in order of first appearance, as the host takes them.
        unread: the error of each source that could not be read, by source
            (``utmp``, ``logind``).
    """

    users: tuple[str, ...]
    unread: Mapping[str, str] = field(default_factory=dict)


def logged_in_users(
    utmp_path: Path = UTMP_PATH, logind: Callable[[], list[str] | None] | None = None
) -> Logins:
    """The logged-in users' names, utmp's first, then logind's active sessions', each once
    (see the module's docstring) and as the host takes it (:func:`published_name`).

    ``logind`` lists the latter as host text (:func:`agent.protocol.host_text.host_str`),
    None where there is no logind (:func:`logind_users` by default; tests pass their own).

    Raises:
        LoginsError: every source that exists failed (the message names each).
    """
    sources: dict[str, Callable[[], list[str] | None]] = {
        "utmp": lambda: utmp_users(utmp_path),
        "logind": logind or logind_users,
    }
    found: dict[str, list[bytes]] = {}
    unread: dict[str, str] = {}
    for source, read in sources.items():
        try:
            names = read()
        except LoginsError as exc:
            unread[source] = str(exc)
            continue
        if names is not None:
            found[source] = [host_bytes(name) for name in names]
    if unread and not found:
        raise LoginsError(", ".join(unread.values()))
    users = distinct_users(found.get("utmp", []), found.get("logind", []))
    return Logins(tuple(published_name(user) for user in users), unread)


def distinct_users(utmp: Sequence[bytes], logind: Sequence[bytes]) -> list[bytes]:
    """Each name once, in order of first appearance, utmp's before logind's; a utmp name of
    exactly :data:`UT_NAMESIZE` bytes that logind does not list whole is taken for the cut
    of the first longer logind name beginning with it, which takes its place; one that no
    name completes loses a character its cut split."""
    users = list(dict.fromkeys(utmp))
    listed = set(users)
    listed_whole = set(logind)
    cuts = {
        name: at
        for at, name in enumerate(users)
        if len(name) == UT_NAMESIZE and name not in listed_whole
    }
    for name in dict.fromkeys(logind):
        if name in listed:
            continue
        at = cuts.pop(name[:UT_NAMESIZE], None) if len(name) > UT_NAMESIZE else None
        if at is None:
            users.append(name)
        else:
            users[at] = name
    for at in cuts.values():  # no longer name to complete it: a split character goes
        users[at] = without_cut_sequence(users[at])
    return list(dict.fromkeys(users))


def published_name(raw: bytes) -> str:
    """The login name ``raw`` as the host takes it (:func:`host_str`): each sequence IPRT
    refuses (bytes that are not UTF-8 to it, U+FFFE, U+FFFF) as U+FFFD, as the host would
    refuse the list that held it; the rest, code points past U+10FFFF included, as it is."""
    return host_str(replace_refused(raw))


def utmp_users(path: Path = UTMP_PATH) -> list[str] | None:
    """The user names of the ``USER_PROCESS`` records of ``path`` as host text, in file
    order; None where there is no such file."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_UTMP_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        msg = f"{path}: {exc.strerror or exc}"
        raise LoginsError(msg) from exc
    if len(data) > MAX_UTMP_BYTES:
        msg = f"{path}: larger than {MAX_UTMP_BYTES} bytes"
        raise LoginsError(msg)
    names = []
    for at in range(0, len(data) - UTMP_RECORD_SIZE + 1, UTMP_RECORD_SIZE):
        kind, _pid, _line, _id, user = _UTMP_HEAD.unpack_from(data, at)
        name = host_str(user.split(b"\0", 1)[0])
        if kind == USER_PROCESS and name:
            names.append(name)
    return names


def logind_users() -> list[str] | None:
    """The users of logind's active sessions as host text, through libsystemd's
    ``sd-login``; None on a guest without libsystemd (with libsystemd but no logind running,
    ``sd_get_sessions`` lists no session: none)."""
    try:
        sd_login = _sd_login()
    except OSError:
        return None
    _ACCOUNTS.next_reading()
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
        name = _session_user(sd_login, session)
        if name is not None:
            names.append(name)
    return names


def _session_user(sd_login: ctypes.CDLL, session: bytes) -> str | None:
    """The user name logind keeps for ``session`` (systemd 254 and later), else the account
    name of its uid; None if the session ended since the listing."""
    get_username = getattr(sd_login, "sd_session_get_username", None)
    if get_username is not None:
        name = ctypes.c_void_p()
        if get_username(session, ctypes.byref(name)) >= 0 and name.value:
            try:
                return host_str(ctypes.string_at(name.value))
            finally:
                _free(name)
    uid = ctypes.c_uint32()
    if sd_login.sd_session_get_uid(session, ctypes.byref(uid)) < 0:
        return None
    return _account_name(uid.value) or str(uid.value)


class AccountLookupNeededError(Exception):
    """A reading made with :func:`known_accounts_only` met a uid whose name is not known."""


_LOOKUPS_ALLOWED: Final = contextvars.ContextVar("account_lookups_allowed", default=True)


def known_accounts_only(read: Callable[[], T]) -> T:
    """``read()`` without asking the account database, which may block (NSS: LDAP, SSSD):
    names already found and recent misses are used, and a uid needing a lookup raises
    :class:`AccountLookupNeededError` (the caller reads again where blocking is allowed)."""
    token = _LOOKUPS_ALLOWED.set(False)
    try:
        return read()
    finally:
        _LOOKUPS_ALLOWED.reset(token)


@final
class _Accounts:
    """What the account database answered, by uid: names found (up to
    :data:`USER_NAMES_CACHED`, the oldest dropped first), and misses (no account, or the
    lookup failed), each kept for the :data:`MISSES_KEPT` readings after the one that asked,
    then asked again (a passing NSS failure does not stick). Locked: a reading abandoned in
    a lookup on a worker thread may finish while the next one runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reading = 0
        self.names: dict[int, str] = {}
        self._missed: dict[int, int] = {}

    def next_reading(self) -> None:
        """A reading begins: forget the misses it asks again."""
        with self._lock:
            self._reading += 1
            oldest = self._reading - MISSES_KEPT
            self._missed = {uid: at for uid, at in self._missed.items() if at >= oldest}

    def known(self, uid: int) -> tuple[bool, str | None]:
        """Whether ``uid`` needs no lookup, and its name (None: a recent miss)."""
        with self._lock:
            if uid in self.names:
                return True, self.names[uid]
            return uid in self._missed, None

    def found(self, uid: int, name: str | None) -> None:
        """Keep what a lookup of ``uid`` answered (None: no name)."""
        with self._lock:
            if name is None:
                self._missed[uid] = self._reading
                return
            if len(self.names) >= USER_NAMES_CACHED:
                del self.names[next(iter(self.names))]
            self.names[uid] = name


_ACCOUNTS: Final = _Accounts()


def _account_name(uid: int) -> str | None:
    """The account name of ``uid``, None where the account database has none (or the lookup
    failed).

    The lookup may go to a network directory (NSS) and block, so it is kept (see
    :class:`_Accounts`) and made only where lookups are allowed (not within
    :func:`known_accounts_only`, which raises :class:`AccountLookupNeededError` instead).
    """
    known, name = _ACCOUNTS.known(uid)
    if known:
        return name
    if not _LOOKUPS_ALLOWED.get():
        raise AccountLookupNeededError(uid)
    try:
        name = host_str(os.fsencode(pwd.getpwuid(uid).pw_name))
    except KeyError:
        name = None
    _ACCOUNTS.found(uid, name)
    return name


@functools.cache
def _sd_login() -> ctypes.CDLL:
    """libsystemd with the ``sd-login`` functions used here declared, loaded once and kept:
    since systemd 256 it is linked ``-z nodelete`` and cannot be unloaded."""
    library = ctypes.CDLL(LIBSYSTEMD)
    library.sd_get_sessions.argtypes = [ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p))]
    library.sd_get_sessions.restype = ctypes.c_int
    library.sd_session_is_active.argtypes = [ctypes.c_char_p]
    library.sd_session_is_active.restype = ctypes.c_int
    library.sd_session_get_uid.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32)]
    library.sd_session_get_uid.restype = ctypes.c_int
    if hasattr(library, "sd_session_get_username"):  # systemd 254 and later
        library.sd_session_get_username.argtypes = [
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_void_p),
        ]
        library.sd_session_get_username.restype = ctypes.c_int
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
