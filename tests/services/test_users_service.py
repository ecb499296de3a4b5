"""The ``users`` service and its login sources.

Rules of this test module:
- the service runs against the in-process simulated host on the virtual clock
  (``autojump_clock`` as a parameter of each test), bounded by ``trio.fail_after``; the users
  come from a list the test changes; the host's view is checked (``prop_get``);
- utmp is a file the test writes record by record; logind is libsystemd's real ``sd-login``
  reading session files the test writes over a tmpfs in a mount namespace of its own.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import pwd
import struct
import subprocess
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, Final

import pytest
import structlog.testing
import trio
import trio.testing

from agent.daemon.daemon import STATUS_SEPARATOR
from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.host.guest_props import GuestPropertyService
from agent.host.hgcm_service import HostBuffer
from agent.protocol.host_text import host_bytes, host_str
from agent.protocol.status import VERR_PARSE_ERROR
from agent.services import EventPump, ServiceContext, _logins, users
from agent.services._logins import (
    LIBSYSTEMD,
    MAX_UTMP_BYTES,
    USER_PROCESS,
    UT_NAMESIZE,
    UTMP_RECORD_SIZE,
    UTMP_RECORD_SIZE_TIME32,
    UTMP_RECORD_SIZE_TIME64,
    Logins,
    LoginsError,
    logged_in_users,
    utmp_record_size,
    utmp_users,
)
from agent.services.users import (
    ACCOUNT_LOOKUP_TIMEOUT_S,
    COUNT_PROPERTY,
    LIST_PROPERTY,
    LOOKUP_PENDING,
    MAX_LIST_BYTES,
    NONE_PROPERTY,
    UsersReader,
    UsersSection,
    read_logins_without_blocking,
    users_list,
    users_service,
)
from tests.services.publishing_support import GuestSource, HeldAnswers

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from agent.device import Device
    from agent.host.hgcm_service import HgcmCallHandle
    from agent.services._publishing import PublishingService

LIMIT_S: Final = 60
INTERVAL_S: Final = 5.0
LOGIN_PROCESS: Final = 6
UNNAMED_UIDS: Final = (4_000_000_001, 4_000_000_002)
"""uids no account database names (lookups in this process are kept: no other test asks)."""
HUNG_UID: Final = 4_000_000_003
"""A uid whose lookup the account database holds (asked on an account cache of its own)."""
DEAD_PROCESS: Final = 8
FLAGS: Final = "TRANSIENT, TRANSRESET"
"""What the host keeps of a TRANSRESET write: the service always adds TRANSIENT to it."""


def utmp_record(kind: int, user: str | bytes, pid: int = 100) -> bytes:
    """One glibc ``struct utmp`` of the running architecture: type, pid, line, id, user
    (its first 32 bytes, with no NUL if it fills them, as login writes it), host, the rest 0."""
    raw = user if isinstance(user, bytes) else user.encode()
    head = struct.pack("=h2xi32s4s32s256s", kind, pid, b"pts/0", b"ts/0", raw, b"")
    return head.ljust(UTMP_RECORD_SIZE, b"\0")


@pytest.mark.parametrize(
    ("machine", "pointer_size", "size"),
    [
        ("x86_64", 8, UTMP_RECORD_SIZE_TIME32),
        ("i686", 4, UTMP_RECORD_SIZE_TIME32),
        ("ppc64le", 8, UTMP_RECORD_SIZE_TIME32),
        ("riscv64", 8, UTMP_RECORD_SIZE_TIME32),
        ("armv7l", 4, UTMP_RECORD_SIZE_TIME32),
        ("aarch64", 8, UTMP_RECORD_SIZE_TIME64),
        ("s390x", 8, UTMP_RECORD_SIZE_TIME64),
        ("loongarch64", 8, UTMP_RECORD_SIZE_TIME64),
        ("aarch64", 4, UTMP_RECORD_SIZE_TIME32),  # a 32-bit process on a 64-bit kernel
    ],
)
def test_the_utmp_record_size_follows_glibc_s_layout(
    machine: str, pointer_size: int, size: int
) -> None:
    """384 bytes where glibc keeps ``ut_session`` and ``ut_tv`` 32-bit (its
    ``__WORDSIZE_TIME64_COMPAT32``), 400 on the 64-bit ABIs that do not (the running one is
    checked against gcc in test_guest_info_abi)."""
    assert utmp_record_size(machine, pointer_size) == size


def test_utmp_gives_user_processes_once_each_then_logind(tmp_path: Path) -> None:
    """Only USER_PROCESS records with a name count; a name counts once, in order of first
    appearance, utmp's before logind's."""
    utmp = tmp_path / "utmp"
    utmp.write_bytes(
        utmp_record(LOGIN_PROCESS, "LOGIN")
        + utmp_record(USER_PROCESS, "alice")
        + utmp_record(DEAD_PROCESS, "carol")
        + utmp_record(USER_PROCESS, "bob")
        + utmp_record(USER_PROCESS, "alice")
        + utmp_record(USER_PROCESS, "")
        + b"\0" * 100  # a torn last record is left out
    )
    assert utmp_users(utmp) == ["alice", "bob", "alice"]
    assert logged_in_users(utmp, lambda: ["bob", "dave"]) == Logins(("alice", "bob", "dave"))
    assert logged_in_users(tmp_path / "absent", lambda: ["dave"]) == Logins(("dave",))
    utmp.write_bytes(utmp_record(LOGIN_PROCESS, "LOGIN") + utmp_record(USER_PROCESS, "erin"))
    assert utmp_users(utmp) == ["erin"]  # the file's last record, whole, counts


LONG_NAMES: Final = (
    "administrator.longname@corp.example.com",
    "a" + "é" * 16 + "@corp.example.com",
)
"""Names longer than utmp's 32 bytes: ASCII, and one whose 32nd byte begins an "é"."""


@pytest.mark.parametrize("name", LONG_NAMES)
def test_utmp_s_cut_of_a_long_name_is_logind_s_whole_name(tmp_path: Path, name: str) -> None:
    """utmp keeps a name's first 32 bytes (a character may be split): that cut counts as the
    same user as logind's whole name, which is published in its place; without logind the
    cut is all there is, less a character it split."""
    cut = name.encode()[:UT_NAMESIZE]
    utmp = tmp_path / "utmp"
    utmp.write_bytes(
        utmp_record(USER_PROCESS, "alice")
        + utmp_record(USER_PROCESS, cut)
        + utmp_record(USER_PROCESS, "bob")
    )
    assert logged_in_users(utmp, lambda: ["bob", name]) == Logins(("alice", name, "bob"))
    whole = cut.decode(errors="ignore")  # the split character's first bytes left out
    assert logged_in_users(utmp, no_logind) == Logins(("alice", whole, "bob"))


def test_names_sharing_their_first_32_bytes_are_different_users(tmp_path: Path) -> None:
    """As VBoxService 7.2.6 compares whole names: one short name in two SSSD domains is two
    users, from logind alone (no utmp) or with utmp's cut of both; a 32-byte utmp name that
    logind lists whole is that user, not the cut of a longer name."""
    com = "firstname.lastname@engineering.example.com"
    org = "firstname.lastname@engineering.example.org"
    assert logged_in_users(tmp_path / "absent", lambda: [com, org]) == Logins((com, org))
    cut = com.encode()[:UT_NAMESIZE]
    utmp = tmp_path / "utmp"
    utmp.write_bytes(utmp_record(USER_PROCESS, cut) * 2)
    assert logged_in_users(utmp, lambda: [com, org, com]) == Logins((com, org))
    assert logged_in_users(utmp, lambda: [com, cut.decode()]) == Logins((cut.decode(), com))


def failing_logind() -> list[str]:
    """logind's sessions where libsystemd cannot list them."""
    msg = "sd_get_sessions: Input/output error"
    raise LoginsError(msg)


def test_a_source_that_cannot_be_read_is_named_and_the_other_s_users_count(
    tmp_path: Path,
) -> None:
    """Each source fails on its own, as in VBoxService 7.2.6, which logs a failing logind and
    publishes what it has: the other's users are listed, the failure named by its source;
    only when neither can be read is that an error, naming both."""
    utmp = tmp_path / "utmp"
    utmp.write_bytes(utmp_record(USER_PROCESS, "alice"))
    assert logged_in_users(utmp, failing_logind) == Logins(
        ("alice",), {"logind": "sd_get_sessions: Input/output error"}
    )
    assert logged_in_users(tmp_path, lambda: ["dave"]) == Logins(
        ("dave",), {"utmp": f"{tmp_path}: Is a directory"}
    )
    with pytest.raises(
        LoginsError, match=f"^{tmp_path}: Is a directory, sd_get_sessions: Input/output error$"
    ):
        logged_in_users(tmp_path, failing_logind)


def no_logind() -> None:
    """logind's sessions where there is no libsystemd."""


def test_when_every_source_that_exists_fails_that_is_an_error(tmp_path: Path) -> None:
    """A source that does not exist is not one read: without utmp a failing logind, and
    without logind an unreadable utmp, is an error (the last values are kept, rather than
    claim no one is logged in); with no source at all, no one is."""
    with pytest.raises(LoginsError, match=r"^sd_get_sessions: Input/output error$"):
        logged_in_users(tmp_path / "absent", failing_logind)
    with pytest.raises(LoginsError, match=f"^{tmp_path}: Is a directory$"):
        logged_in_users(tmp_path, no_logind)
    assert logged_in_users(tmp_path / "absent", no_logind) == Logins(())
    assert logged_in_users(tmp_path / "absent", lambda: ["dave"]) == Logins(("dave",))


def test_an_unreadable_utmp_is_an_error_naming_it(tmp_path: Path) -> None:
    """A utmp that exists and cannot be read, or is too large to be one, raises."""
    with pytest.raises(LoginsError, match=f"^{tmp_path}: Is a directory$"):
        utmp_users(tmp_path)
    huge = tmp_path / "utmp"
    with huge.open("wb") as file:
        file.truncate(MAX_UTMP_BYTES + 1)
    with pytest.raises(LoginsError, match=f"larger than {MAX_UTMP_BYTES} bytes"):
        utmp_users(huge)


LOGIND_SCRIPT: Final = textwrap.dedent(
    """
    import ctypes, json, os
    from agent.services._logins import logind_users

    libc = ctypes.CDLL(None, use_errno=True)
    def check(result, what):
        if result:
            raise OSError(ctypes.get_errno(), what)
    check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "mount --make-rprivate /")
    # An empty /run of this namespace's own first: what is made under it stays there.
    check(libc.mount(b"tmpfs", b"/run", b"tmpfs", 0, None), "mount tmpfs on /run")
    os.makedirs("/run/systemd/sessions")
    for name, text in json.loads(os.environ["SESSIONS"]).items():
        with open(f"/run/systemd/sessions/{name}", "w") as file:
            file.write(text)
    print(json.dumps(logind_users()))
    """
)


WITHOUT_USERNAME: Final = textwrap.dedent(
    """
    from agent.services import _logins

    library = _logins._sd_login()

    class BeforeSystemd254:
        def __getattr__(self, name):
            if name == "sd_session_get_username":
                raise AttributeError(name)
            return getattr(library, name)

    _logins._sd_login = BeforeSystemd254
    """
)
WITH_USERNAME: Final = textwrap.dedent(
    """
    import ctypes
    from agent.services import _logins

    library = _logins._sd_login()
    strdup = ctypes.CDLL(None).strdup  # the script's own "libc" comes later
    strdup.argtypes = [ctypes.c_char_p]
    strdup.restype = ctypes.c_void_p
    USERS = {b"3": b"root", b"c1": b"ghost"}  # what the session files say

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p))
    def get_username(session, name):
        name[0] = strdup(USERS[session])
        return 0

    class Systemd254:
        sd_session_get_username = get_username

        def __getattr__(self, name):
            return getattr(library, name)

    _logins._sd_login = Systemd254
    """
)
REPORT_CACHE: Final = textwrap.dedent(
    """
    from agent.services import _logins
    print(len(_logins._ACCOUNTS.names))
    """
)


SESSIONS: Final = {
    "3": "UID=0\nUSER=root\nACTIVE=1\nSTATE=active\n",
    "5": "UID=65534\nUSER=nobody\nACTIVE=0\nSTATE=online\n",
    "c1": "UID=4242\nUSER=ghost\nACTIVE=1\nSTATE=active\n",
}
"""logind's session files: root's and ghost's (uid 4242, no account) active, nobody's not."""


def _run_with_sessions(script: str, sessions: dict[str, str] = SESSIONS) -> list[str]:
    """The lines ``script`` prints, run by a new interpreter with ``sessions`` as logind's
    session files (``LOGIND_SCRIPT`` reads them from the environment)."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
        check=False,
        env=dict(os.environ, SESSIONS=json.dumps(sessions)),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _logind_users(library: str = "", sessions: dict[str, str] = SESSIONS) -> list[str | int]:
    """The users ``logind_users`` finds in a namespace with ``sessions`` as logind's session
    files, with ``library`` set up first, then the number of account names cached."""
    users, cached = _run_with_sessions(library + LOGIND_SCRIPT + REPORT_CACHE, sessions)
    return [*sorted(json.loads(users)), int(cached)]


def test_logind_s_active_sessions_through_sd_login() -> None:
    """libsystemd lists the sessions; inactive ones are left out; each is named as logind
    names its user where libsystemd can say (systemd 254), else by the uid's account."""
    has_username = hasattr(ctypes.CDLL(LIBSYSTEMD), "sd_session_get_username")
    assert _logind_users() == ["ghost" if has_username else "4242", "root", int(not has_username)]


def test_logind_without_sessions_has_no_users() -> None:
    """No session at all (a guest nobody logged in to) is no user, not an error."""
    assert _logind_users(sessions={}) == [0]


def test_logind_s_user_name_is_the_session_s() -> None:
    """With ``sd_session_get_username`` the session's own user name is taken, with no
    account lookup (a uid without an account keeps its name)."""
    assert _logind_users(WITH_USERNAME) == ["ghost", "root", 0]


def test_before_systemd_254_the_uid_s_account_names_the_user() -> None:
    """Without ``sd_session_get_username``: the uid's account name, or the number where
    there is none, which is not cached (a passing NSS failure must not stick)."""
    assert _logind_users(WITHOUT_USERNAME) == ["4242", "root", 1]


COUNT_LOOKUPS: Final = textwrap.dedent(
    """
    import pwd

    asked = []
    account = pwd.getpwuid

    def counted(uid):
        asked.append(uid)
        return account(uid)

    pwd.getpwuid = counted
    """
)
READ_TWICE_MORE: Final = textwrap.dedent(
    """
    for _ in range(2):
        assert sorted(logind_users()) == ["4242", "root"]
    print(json.dumps(sorted(asked)))
    """
)


def test_an_account_lookup_that_misses_is_not_repeated_at_the_next_reading() -> None:
    """Without ``sd_session_get_username`` each uid is looked up in the account database,
    which may block on a network directory: a name found is kept, and a uid with none
    (4242) is not asked again at the next reading, only at the one after (a passing NSS
    failure does not stick): three readings, two lookups of 4242, one of root."""
    first, asked = _run_with_sessions(
        WITHOUT_USERNAME + COUNT_LOOKUPS + LOGIND_SCRIPT + READ_TWICE_MORE
    )
    assert sorted(json.loads(first)) == ["4242", "root"]
    assert json.loads(asked) == [0, 4242, 4242]


async def test_a_reading_that_must_ask_the_account_database_runs_on_one_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reading that must look an account up (which may block on a network directory) runs
    on a worker thread; a stop does not wait for one stuck in its lookup, and the next such
    reading waits for that thread rather than start a second; a reading whose names are all
    known runs on the event loop (real clock and threads)."""
    entered, release = threading.Event(), threading.Event()
    askers: list[int] = []

    def directory(uid: int) -> pwd.struct_passwd:
        askers.append(threading.get_ident())
        entered.set()
        release.wait(LIMIT_S)
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", directory)

    def reading(uid: int) -> Callable[[], Logins]:
        return lambda: Logins((_logins._account_name(uid) or str(uid),))

    read: list[Logins] = []

    async def read_again() -> None:
        read.append(await read_logins_without_blocking(reading(UNNAMED_UIDS[1])))

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as stopped:
            stopped.start_soon(read_logins_without_blocking, reading(UNNAMED_UIDS[0]))
            await trio.to_thread.run_sync(entered.wait, abandon_on_cancel=True)
            stopped.cancel_scope.cancel()
        assert not release.is_set()  # the stop came back with the thread still in its lookup
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_again)
            await trio.testing.wait_all_tasks_blocked()
            # It waits for the abandoned thread's token: a thread of its own would have
            # borrowed a second one.
            waiting = users._READING_LIMITER.get().statistics()
            assert (waiting.borrowed_tokens, waiting.tasks_waiting) == (1, 1)
            assert (read, len(askers)) == ([], 1)
            release.set()
        assert read == [Logins((str(UNNAMED_UIDS[1]),))]
        assert len(askers) == 2
        assert threading.get_ident() not in askers
        known = await read_logins_without_blocking(reading(UNNAMED_UIDS[1]))  # a recent miss
        assert (known, len(askers)) == (Logins((str(UNNAMED_UIDS[1]),)), 2)


async def test_a_hung_account_lookup_leaves_the_reading_unreadable_not_the_service_stuck(
    autojump_clock: trio.testing.MockClock, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup the account database holds (a network directory not answering) makes each
    pass give up after ``ACCOUNT_LOOKUP_TIMEOUT_S``: the service starts, its status says a
    lookup is pending, one line is logged however many passes find it so, and no second
    thread asks; once the lookup returns, the next pass publishes (it started before). The
    account cache is the test's own: the miss an earlier run kept would spare the lookup."""
    entered, release, left = threading.Event(), threading.Event(), threading.Event()
    askers: list[int] = []
    monkeypatch.setattr(_logins, "_ACCOUNTS", _logins._Accounts())

    def directory(uid: int) -> pwd.struct_passwd:
        askers.append(uid)
        entered.set()
        try:
            release.wait(LIMIT_S)
        finally:
            left.set()
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", directory)

    def reading() -> Logins:
        return Logins((_logins._account_name(HUNG_UID) or str(HUNG_UID),))

    async def read_logins() -> Logins:
        return await read_logins_without_blocking(reading)

    readable = trio.Event()

    def changed() -> None:
        if service.status() == "users 1 user":
            readable.set()

    async def advance(seconds: float) -> None:
        """Move the clock by hand once every task waits (autojump would move it while a
        worker thread starts or ends)."""
        await trio.testing.wait_all_tasks_blocked()
        autojump_clock.jump(seconds)
        await trio.testing.wait_all_tasks_blocked()

    autojump_clock.autojump_threshold = math.inf
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            pump = EventPump(device)
            section = UsersSection(interval_s=INTERVAL_S)
            service = users_service(ServiceContext(device, pump, changed), section, read_logins)
            await nursery.start(pump.run)
            started = trio.Event()

            async def start_users() -> None:
                await nursery.start(service.run)
                started.set()

            nursery.start_soon(start_users)
            assert await trio.to_thread.run_sync(entered.wait, LIMIT_S, abandon_on_cancel=True)
            await advance(ACCOUNT_LOOKUP_TIMEOUT_S)
            await started.wait()
            assert service.status() == f"users: unreadable ({LOOKUP_PENDING})"
            for _ in range(3):  # each pass waits for the thread still in its lookup
                await advance(INTERVAL_S)
                assert service.status() == f"users: unreadable ({LOOKUP_PENDING})"
                await advance(ACCOUNT_LOOKUP_TIMEOUT_S)
            assert (askers, service.statistics().passes) == ([HUNG_UID], 0)
            release.set()
            assert await trio.to_thread.run_sync(left.wait, LIMIT_S, abandon_on_cancel=True)
            await advance(INTERVAL_S)
            await readable.wait()
            assert values(host)[LIST_PROPERTY] == (str(HUNG_UID), FLAGS)
            nursery.cancel_scope.cancel()
    lines = [line for line in logs if line["event"] in {"unreadable", "readable_again"}]
    assert lines == [
        {"event": "unreadable", "error": LOOKUP_PENDING, "log_level": "warning"},
        {"event": "readable_again", "log_level": "info"},
    ]


def test_libsystemd_is_loaded_once_and_kept() -> None:
    """libsystemd is loaded at the first read and kept: since systemd 256 it cannot be
    unloaded (``-z nodelete``), and unloading it on older ones cost each read ~0.9 ms."""
    script = (
        "from pathlib import Path\n"
        "from agent.services import _logins\n"
        "for _ in range(2):\n"
        "    _logins.logind_users()\n"
        "    print('libsystemd' in Path('/proc/self/maps').read_text())\n"
        "print(_logins._sd_login() is _logins._sd_login())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=LIMIT_S, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]


class Users(GuestSource[str]):
    """The names the service reads (see ``GuestSource``), as :class:`Logins`."""

    def logins(self) -> Logins:
        return Logins(self())


def on_loop(read: Callable[[], Logins]) -> Callable[[], Awaitable[Logins]]:
    """``read`` as the service calls it, but on the event loop: the virtual clock jumps while
    a worker thread is busy, so the service tests keep off threads."""

    async def read_on_loop() -> Logins:
        return read()

    return read_on_loop


async def test_the_summary_stays_one_fragment_of_systemd_s_status_line(tmp_path: Path) -> None:
    """The daemon joins the services' statuses with ``STATUS_SEPARATOR`` into ``STATUS=``:
    a users status naming a cut list, a source not read or both sources' errors must not
    hold it, or the line could not be split back into the services' parts."""
    error = "sd_get_sessions: Input/output error"
    reading = await UsersReader(on_loop(lambda: Logins(("é" * 512, "alice"), {"logind": error})))()
    assert reading.summary == f"1 user (1 left out, logind not read: {error})"
    with pytest.raises(LoginsError) as both:
        logged_in_users(tmp_path, failing_logind)
    for text in (reading.summary, str(both.value)):
        assert STATUS_SEPARATOR not in text


async def start_users(
    device: Device, nursery: trio.Nursery, read_logins: Callable[[], Logins]
) -> PublishingService:
    """The event pump and the users service on ``device``, a pass every ``INTERVAL_S``."""
    pump = EventPump(device)
    section = UsersSection(interval_s=INTERVAL_S)
    service = users_service(ServiceContext(device, pump), section, on_loop(read_logins))
    await nursery.start(pump.run)
    await nursery.start(service.run)
    return service


def values(host: SimulatedHost) -> dict[str, tuple[str, str] | None]:
    """The three properties as the host holds them: (value, flags), or None."""
    found = {name: host.prop_get(name) for name in (LIST_PROPERTY, COUNT_PROPERTY, NONE_PROPERTY)}
    return {name: None if got is None else got[:2] for name, got in found.items()}


async def test_follows_logins_with_transreset_and_deletes_them_at_stop(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """The list (empty while no one is logged in), count and flag follow the users; every
    value is TRANSRESET; sources that all fail keep the last values and show in the status;
    a stop deletes the three, as VBoxService 7.2.6 does at termination, rather than tell the
    host no one is logged in while users still are."""
    users = Users("alice", "bob")
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device:
            async with trio.open_nursery() as nursery:
                service = await start_users(device, nursery, users.logins)
                assert values(host) == {
                    LIST_PROPERTY: ("alice,bob", FLAGS),
                    COUNT_PROPERTY: ("2", FLAGS),
                    NONE_PROPERTY: ("false", FLAGS),
                }
                assert service.status() == "users 2 users"
                users.now = ()
                await trio.sleep(INTERVAL_S)
                await trio.testing.wait_all_tasks_blocked()
                assert values(host) == {
                    LIST_PROPERTY: ("", FLAGS),
                    COUNT_PROPERTY: ("0", FLAGS),
                    NONE_PROPERTY: ("true", FLAGS),
                }
                users.now = ("carol",)
                users.error = LoginsError("/run/utmp: Permission denied")
                await trio.sleep(INTERVAL_S)
                await trio.testing.wait_all_tasks_blocked()
                assert service.status() == "users: unreadable (/run/utmp: Permission denied)"
                assert values(host)[COUNT_PROPERTY] == ("0", FLAGS)
                users.error = None
                await trio.sleep(INTERVAL_S)
                await trio.testing.wait_all_tasks_blocked()
                assert values(host)[LIST_PROPERTY] == ("carol", FLAGS)
                assert service.status() == "users 1 user"
                nursery.cancel_scope.cancel()
            await service.drain()
    assert values(host) == dict.fromkeys((LIST_PROPERTY, COUNT_PROPERTY, NONE_PROPERTY))
    assert host.status()["hgcm_clients"] == 0


async def test_names_are_published_as_the_host_takes_them(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
) -> None:
    """A name's bytes reach the host as they are where IPRT takes them as UTF-8 (which
    reaches past U+10FFFF, where Python's decoder stops); in a name IPRT refuses, what it
    refuses (bytes that are not UTF-8, U+FFFF) is published as U+FFFD, rather than have the
    host refuse the whole list. logind's name as ``pwd`` gives it, a Latin-1 byte kept as a
    surrogate escape, is one."""
    utmp = tmp_path / "utmp"
    utmp.write_bytes(
        utmp_record(USER_PROCESS, b"past\xf8\x88\x80\x80\x80")  # U+200000, 5 bytes
        + utmp_record(USER_PROCESS, b"bad\xff")
        + utmp_record(USER_PROCESS, "odd\uffff")
    )
    pwd_name = host_str(b"caf\xe9")
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            service = await start_users(
                device, nursery, lambda: logged_in_users(utmp, lambda: [pwd_name])
            )
            listed = host.prop_get(LIST_PROPERTY)
            assert listed is not None
            assert host_bytes(listed[0]) == (
                b"past\xf8\x88\x80\x80\x80,bad\xef\xbf\xbd,odd\xef\xbf\xbd,caf\xef\xbf\xbd"
            )
            assert values(host)[COUNT_PROPERTY] == ("4", FLAGS)
            assert service.status() == "users 4 users"
            nursery.cancel_scope.cancel()


async def test_the_hosts_global_interval_paces_the_users(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """The host's ``--interval 30`` (s) over the section's 5 s, as for ``network``: both are
    VBoxService's VM-info service."""
    host.prop_set("/VirtualBox/GuestAdd/VBoxService/--interval", "30")
    users = Users("alice")
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            service = await start_users(device, nursery, users.logins)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(29)
            assert service.statistics().passes == 1
            await trio.sleep(1)
            await trio.testing.wait_all_tasks_blocked()
            assert service.statistics().passes == 2
            nursery.cancel_scope.cancel()


async def test_a_first_write_a_stop_cut_off_is_deleted_at_the_drain(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A stop that cancels the first write once the host carried it out (its answer still
    to come) leaves no user list behind: the name counts as held from the write, as
    VBoxService's cache holds an entry from its first update and resets it at termination."""
    service = HeldAnswers()
    host = SimulatedHost(services=[service])
    users = Users("alice")
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as vm:
            await vm.start(host.run)
            async with open_device(SimOpener(host)) as device:
                service.holding = True
                async with trio.open_nursery() as nursery:
                    pump = EventPump(device)
                    users_svc = users_service(
                        ServiceContext(device, pump), UsersSection(), on_loop(users.logins)
                    )
                    await nursery.start(pump.run)
                    nursery.start_soon(users_svc.run)  # its start waits for the answer
                    await trio.testing.wait_all_tasks_blocked()
                    assert values(host)[LIST_PROPERTY] == ("alice", FLAGS)
                    assert len(service.held) == 1
                    nursery.cancel_scope.cancel()
                service.holding = False
                await users_svc.drain()
            assert values(host) == dict.fromkeys((LIST_PROPERTY, COUNT_PROPERTY, NONE_PROPERTY))
            vm.cancel_scope.cancel()
    deleted = [line for line in logs if line["event"] == "published_deleted"]
    assert deleted == [{"event": "published_deleted", "log_level": "info", "properties": 1}]


async def test_a_first_write_the_host_refused_is_not_deleted_at_the_drain(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """A name the host refused from its first write was never ours: the drain leaves it
    (here the host's own read-only list) and deletes the two it holds."""
    host.prop_set(LIST_PROPERTY, "set by the host", "RDONLYGUEST")
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(SimOpener(host)) as device:
            async with trio.open_nursery() as nursery:
                service = await start_users(device, nursery, Users("alice").logins)
                assert (
                    service.status() == f"users: {LIST_PROPERTY} refused (VERR_PERMISSION_DENIED)"
                )
                nursery.cancel_scope.cancel()
            await service.drain()
    assert values(host)[LIST_PROPERTY] == ("set by the host", "RDONLYGUEST")
    deleted = [line for line in logs if line["event"] in {"published_deleted", "property_refused"}]
    assert [line["event"] for line in deleted] == ["property_refused", "published_deleted"]
    assert deleted[1]["properties"] == 2


async def test_a_failing_logind_leaves_utmp_s_users_published(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
) -> None:
    """While logind cannot be read, utmp's logins and logouts still reach the host (alice
    logs out: no one); the failure is logged once, not at every pass, shown in the status,
    and its end is logged too."""
    utmp = tmp_path / "utmp"
    utmp.write_bytes(utmp_record(USER_PROCESS, "alice"))
    logind: list[Callable[[], list[str]]] = [list]

    def read_logins() -> Logins:
        return logged_in_users(utmp, logind[0])

    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            service = await start_users(device, nursery, read_logins)
            logind[0] = failing_logind
            utmp.write_bytes(b"")  # alice logs out
            await trio.sleep(INTERVAL_S * 3)
            await trio.testing.wait_all_tasks_blocked()
            assert values(host) == {
                LIST_PROPERTY: ("", FLAGS),
                COUNT_PROPERTY: ("0", FLAGS),
                NONE_PROPERTY: ("true", FLAGS),
            }
            assert service.status() == (
                "users 0 users (logind not read: sd_get_sessions: Input/output error)"
            )
            logind[0] = list
            utmp.write_bytes(utmp_record(USER_PROCESS, "bob"))
            await trio.sleep(INTERVAL_S)
            await trio.testing.wait_all_tasks_blocked()
            assert values(host)[LIST_PROPERTY] == ("bob", FLAGS)
            assert service.status() == "users 1 user"
            nursery.cancel_scope.cancel()
    sources = [line for line in logs if line["event"].startswith(("login_source", "unreadable"))]
    assert sources == [
        {
            "event": "login_source_unreadable",
            "log_level": "warning",
            "source": "logind",
            "error": "sd_get_sessions: Input/output error",
        },
        {"event": "login_source_readable", "log_level": "info", "source": "logind"},
    ]


async def test_without_utmp_a_failing_logind_keeps_the_last_values(
    autojump_clock: trio.abc.Clock, host: SimulatedHost, tmp_path: Path
) -> None:
    """On a guest that writes no utmp, logind is the only source: while it cannot be read
    the host keeps alice's values (its beacon no longer renewed) and the status says why,
    rather than publish that no one is logged in."""
    logind: list[Callable[[], list[str]]] = [lambda: ["alice"]]

    def read_logins() -> Logins:
        return logged_in_users(tmp_path / "utmp", logind[0])

    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            service = await start_users(device, nursery, read_logins)
            published = values(host)
            logind[0] = failing_logind
            await trio.sleep(INTERVAL_S * 3)
            await trio.testing.wait_all_tasks_blocked()
            assert values(host) == published
            assert published[LIST_PROPERTY] == ("alice", FLAGS)
            assert service.status() == "users: unreadable (sd_get_sessions: Input/output error)"
            assert service.statistics().passes == 1
            nursery.cancel_scope.cancel()


async def test_each_logout_empties_the_list_once_and_a_restore_empties_it_again(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """alice logs in, out, in and out again: the list follows each time, written empty once
    per logout (as VBoxService 7.2.6 writes it) however many passes find no one; after a
    restore that brought a list back (the saved state's), it is emptied again."""
    users = Users("alice")
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            service = await start_users(device, nursery, users.logins)

            async def after_passes(count: int, *now: str) -> tuple[str, str] | None:
                users.now = now
                for _ in range(count):
                    await trio.sleep(INTERVAL_S)
                    await trio.testing.wait_all_tasks_blocked()
                return values(host)[LIST_PROPERTY]

            seen = [
                await after_passes(3),
                await after_passes(1, "alice"),
                await after_passes(3),
            ]
            assert seen == [("", FLAGS), ("alice", FLAGS), ("", FLAGS)]
            statistics = service.statistics()
            assert (statistics.writes, statistics.deletes) == (8, 0)  # the list and the flag
            host.prop_set(LIST_PROPERTY, "ghost", FLAGS)
            host.restore()
            await trio.testing.wait_all_tasks_blocked()
            assert values(host)[LIST_PROPERTY] == ("", FLAGS)
            nursery.cancel_scope.cancel()


async def test_the_count_is_the_beacon_written_every_pass_and_last(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """Since VBoxService 7.2.6 ``LoggedInUsers`` is the users' beacon: it is written at every
    pass, changed or not, after the list and ``NoLoggedInUsers``, so a host that sees it
    renewed knows the other two are current; those keep their timestamps while unchanged."""
    users = Users("alice")
    with trio.fail_after(LIMIT_S):
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            service = await start_users(device, nursery, users.logins)

            def stamps() -> dict[str, int]:
                found = {name: host.prop_get(name) for name in (LIST_PROPERTY, NONE_PROPERTY)}
                found[COUNT_PROPERTY] = host.prop_get(COUNT_PROPERTY)
                return {name: got[2] for name, got in found.items() if got is not None}

            first = stamps()
            assert first[COUNT_PROPERTY] > max(first[LIST_PROPERTY], first[NONE_PROPERTY])
            await trio.sleep(INTERVAL_S)
            await trio.testing.wait_all_tasks_blocked()
            second = stamps()
            assert second[LIST_PROPERTY] == first[LIST_PROPERTY]
            assert second[NONE_PROPERTY] == first[NONE_PROPERTY]
            assert second[COUNT_PROPERTY] > first[COUNT_PROPERTY]
            assert values(host)[COUNT_PROPERTY] == ("1", FLAGS)
            assert service.statistics().writes == 2  # beacon writes are not counted
            nursery.cancel_scope.cancel()


class _BeforeTransreset(GuestPropertyService):
    """A host too old to know the TRANSRESET flag: it refuses a set with it as it refuses
    any flag it does not know, with ``VERR_PARSE_ERROR``; counts the refusals."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = 0
        self.upgraded = False
        """Set: the host knows TRANSRESET (a VM restored onto a newer host)."""

    def _set_prop(self, call: HgcmCallHandle) -> int:
        if len(call.params) == 3 and not self.upgraded:
            flags = call.params[2]
            assert isinstance(flags, HostBuffer)
            if b"TRANSRESET" in flags.data:
                self.refusals += 1
                return VERR_PARSE_ERROR
        return super()._set_prop(call)


async def test_a_host_without_transreset_gets_transient_values(
    autojump_clock: trio.abc.Clock,
) -> None:
    """As VBoxService does, a write the host refuses for its TRANSRESET flag
    (``VERR_PARSE_ERROR``) is made again TRANSIENT; the downgrade is remembered, so the
    host refuses once and it is logged once, not at every write of every pass."""
    service = _BeforeTransreset()
    host = SimulatedHost(services=[service])
    users = Users("alice")
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(SimOpener(host)) as device, trio.open_nursery() as services:
                users_svc = await start_users(device, services, users.logins)
                users.now = ("alice", "bob")
                await trio.sleep(INTERVAL_S * 2)
                await trio.testing.wait_all_tasks_blocked()
                assert values(host) == {
                    LIST_PROPERTY: ("alice,bob", "TRANSIENT"),
                    COUNT_PROPERTY: ("2", "TRANSIENT"),
                    NONE_PROPERTY: ("false", "TRANSIENT"),
                }
                assert users_svc.status() == "users 2 users"
                assert users_svc.statistics().refused == 0
                services.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    assert service.refusals == 1
    downgrades = [line for line in logs if line["event"] == "transreset_unsupported"]
    assert len(downgrades) == 1


async def test_a_restore_tries_transreset_again(autojump_clock: trio.abc.Clock) -> None:
    """The TRANSIENT downgrade lasts until a restore, which may bring the VM onto a newer
    host: the values are then written TRANSRESET again (they were kept TRANSIENT, and so
    outlived a VM reset there)."""
    service = _BeforeTransreset()
    host = SimulatedHost(services=[service])
    users = Users("alice")
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(SimOpener(host)) as device, trio.open_nursery() as services:
                await start_users(device, services, users.logins)
                await trio.testing.wait_all_tasks_blocked()
                assert values(host)[COUNT_PROPERTY] == ("1", "TRANSIENT")
                service.upgraded = True
                host.restore()
                await trio.sleep(INTERVAL_S)
                await trio.testing.wait_all_tasks_blocked()
                assert values(host) == {
                    LIST_PROPERTY: ("alice", FLAGS),
                    COUNT_PROPERTY: ("1", FLAGS),
                    NONE_PROPERTY: ("false", FLAGS),
                }
                services.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


async def test_a_long_list_leaves_out_the_names_that_do_not_fit() -> None:
    """As in VBoxService 7.2.6, each name that would take the list over the 1023-byte value
    limit is left out, a later one that fits still listed; only the listed names count, and
    with none listed no one is logged in."""
    names = [f"user{index:011d}" for index in range(80)]  # 15 bytes each, 16 with the comma
    listed, count = users_list(names)
    assert count == (MAX_LIST_BYTES + 1) // 16
    assert listed == ",".join(names[:count])
    assert len(listed.encode()) <= MAX_LIST_BYTES < len(",".join(names[: count + 1]).encode())
    exact = ["x" * 511, "y" * 511]  # 1023 bytes with the comma: fits exactly
    assert users_list(exact) == ("x" * 511 + "," + "y" * 511, 2)
    assert users_list(["x" * 1000, "y" * 100, "z" * 10]) == ("x" * 1000 + "," + "z" * 10, 2)
    alone = await UsersReader(on_loop(lambda: Logins(("é" * 512,))))()  # 1024 bytes: never fits
    assert alone.properties == {LIST_PROPERTY: "", NONE_PROPERTY: "true", COUNT_PROPERTY: "0"}
    assert alone.summary == "0 users (1 left out)"


async def test_eighty_users_are_published_with_the_list_cut(
    autojump_clock: trio.abc.Clock, host: SimulatedHost
) -> None:
    """Too many users for one value: the service keeps running, the list names those that
    fit and the count counts them, as VBoxService 7.2.6 does; the cut is logged once, not at
    every pass."""
    users = Users(*(f"student{index:012d}" for index in range(80)))  # 20 bytes with the comma
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with open_device(SimOpener(host)) as device, trio.open_nursery() as nursery:
            service = await start_users(device, nursery, users.logins)
            await trio.sleep(INTERVAL_S * 2)
            await trio.testing.wait_all_tasks_blocked()
            assert service.statistics().passes == 3
            listed = (MAX_LIST_BYTES + 1) // 20
            assert values(host) == {
                LIST_PROPERTY: (",".join(users.now[:listed]), FLAGS),
                COUNT_PROPERTY: (str(listed), FLAGS),
                NONE_PROPERTY: ("false", FLAGS),
            }
            assert service.status() == f"users {listed} users ({80 - listed} left out)"
            users.now = users.now[:3]
            await trio.sleep(INTERVAL_S)
            await trio.testing.wait_all_tasks_blocked()
            assert values(host)[LIST_PROPERTY] == (",".join(users.now), FLAGS)
            nursery.cancel_scope.cancel()
    cuts = [line for line in logs if line["event"].startswith("users_list")]
    assert cuts == [
        {
            "event": "users_list_cut",
            "log_level": "warning",
            "users": 80,
            "listed": listed,
            "limit_bytes": MAX_LIST_BYTES,
        },
        {"event": "users_list_whole", "log_level": "info", "users": 3},
    ]
