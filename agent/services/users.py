"""``users``: publishes who is logged in to the guest as guest properties.

What VBoxService's VM-info service publishes and host tools wait on (``VBoxManage
guestproperty wait VM /VirtualBox/GuestInfo/OS/NoLoggedInUsers``):
``/VirtualBox/GuestInfo/OS/LoggedInUsersList`` (the names, comma-separated; empty while no
one is logged in, as VBoxService 7.2.6 writes it), ``LoggedInUsers`` (how many) and
``NoLoggedInUsers`` (``true`` or ``false``). The users come from utmp and logind's active
sessions (:mod:`agent.services._logins`).

The engine is :class:`~agent.services._publishing.PublishingService`: every ``[users]
interval_s`` (10 s, VBoxService 7.2.6's default) and after a restore, writing only what
changed, but ``LoggedInUsers`` on every pass and after the other two: as in VBoxService from
7.2.6, it is the beacon by which the host knows the users' properties are current. As
VBoxService does, every value carries ``TRANSRESET`` (the host drops it when the VM resets
or powers off), and a stop deletes all three, as VBoxService 7.2.6 does at termination:
users may still be logged in (``systemctl restart``), so "no one" would be false. A source
that cannot be read (utmp or logind) is logged when it starts and ends and shown in the
status, and the other's users are published, as VBoxService 7.2.6 does; only when every
source that exists fails (on a guest without utmp, logind alone) are the last values kept
rather than claim no one is logged in. As in
VBoxService 7.2.6, a name that would take the list over a property value's limit (1023
bytes) is left out, which is logged when it starts and ends, and ``LoggedInUsers`` counts
the names listed. Config section: ``[users]``.

Naming a session's user may ask the account database (where libsystemd predates
``sd_session_get_username``), which NSS may send to a network directory (LDAP, SSSD) that
answers slowly or not at all; on the event loop that would hold every service. So
:func:`read_logins_without_blocking` reads on the loop while every name is known (kept from earlier
lookups, :mod:`agent.services._logins`) and moves a reading that must ask to a worker
thread: at most one per process (:data:`READING_THREADS`, one of the threads
``agent.config.OTHER_THREADS`` leaves room for in the unit's ``TasksMax=``). A stop does not
wait for it, nor a pass longer than :data:`ACCOUNT_LOOKUP_TIMEOUT_S`: it is abandoned (it
ends its lookup on its own, keeps what it found for the next reading and gives the thread
back then), and the next reading that must ask waits as long for the one still in a lookup,
so restarts never add threads. A pass that gave up is unreadable (``account lookup pending``),
logged when that begins and ends, and the last values stay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, final

import structlog
import trio

from agent.protocol.guest_props import MAX_VALUE_SIZE
from agent.protocol.host_text import host_bytes
from agent.services._base import ServiceContext, ServiceSpec
from agent.services._logins import (
    AccountLookupNeededError,
    Logins,
    LoginsError,
    known_accounts_only,
    logged_in_users,
)
from agent.services._publishing import PublishingSection, PublishingService, Reading

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

NAME: Final = "users"
OS_PREFIX: Final = "/VirtualBox/GuestInfo/OS/"
LIST_PROPERTY: Final = f"{OS_PREFIX}LoggedInUsersList"
COUNT_PROPERTY: Final = f"{OS_PREFIX}LoggedInUsers"
NONE_PROPERTY: Final = f"{OS_PREFIX}NoLoggedInUsers"
MAX_LIST_BYTES: Final = MAX_VALUE_SIZE - 1
"""The longest list a property value holds (UTF-8, without the NUL)."""
SEPARATOR: Final = ","
READING_THREADS: Final = 1
"""Worker threads that read the logins, per process, abandoned ones included."""
ACCOUNT_LOOKUP_TIMEOUT_S: Final = 5.0
"""How long a pass waits for a reading on the worker thread, half the default ``interval_s``:
a network directory that does not answer may hold a lookup for minutes, and a pass that
waited as long would leave the status and the log silent meanwhile."""
LOOKUP_PENDING: Final = "account lookup pending"
_READING_LIMITER: Final[trio.lowlevel.RunVar[trio.CapacityLimiter]] = trio.lowlevel.RunVar(
    "users_reading_limiter"
)

log = structlog.get_logger(__name__)


class UsersSection(PublishingSection):
    """``[users]``: who is logged in, as guest properties, every ``interval_s``."""


def users_list(users: Sequence[str]) -> tuple[str, int]:
    """The comma-separated list of the ``users`` that fit a property value, and how many it
    names: as in VBoxService 7.2.6, a name that would take the list over the limit is left
    out, and the next ones are tried."""
    listed: list[str] = []
    size = -len(SEPARATOR)
    for user in users:
        grown = size + len(SEPARATOR) + len(host_bytes(user))
        if grown <= MAX_LIST_BYTES:
            listed.append(user)
            size = grown
    return SEPARATOR.join(listed), len(listed)


async def read_logins_without_blocking(read: Callable[[], Logins] = logged_in_users) -> Logins:
    """``read()`` on the event loop if it needs no account lookup, else on a worker thread,
    at most :data:`READING_THREADS` per process at once; cancelling, or
    :data:`ACCOUNT_LOOKUP_TIMEOUT_S` without an answer, abandons the thread to its lookup
    (it keeps its place until it returns).

    Raises:
        LoginsError: no answer within :data:`ACCOUNT_LOOKUP_TIMEOUT_S` (``account lookup
            pending``), the thread's or the one before it still in its lookup.
    """
    try:
        logins = known_accounts_only(read)
    except AccountLookupNeededError:
        pass
    else:
        await trio.lowlevel.checkpoint()
        return logins
    try:
        limiter = _READING_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(READING_THREADS)
        _READING_LIMITER.set(limiter)
    with trio.move_on_after(ACCOUNT_LOOKUP_TIMEOUT_S):
        return await trio.to_thread.run_sync(read, limiter=limiter, abandon_on_cancel=True)
    raise LoginsError(LOOKUP_PENDING)


@final
class UsersReader:
    """Reads the users as properties and ``N users``, then in parentheses ``K left out``
    when the list is cut and the sources not read (``logind not read: ...``); logs when the
    list starts being cut and when it fits again, and when a source starts failing (or its
    error changes) and when it reads again, not at every pass."""

    def __init__(
        self, read_logins: Callable[[], Awaitable[Logins]] = read_logins_without_blocking
    ) -> None:
        self._read_logins = read_logins
        self._cut = False
        self._unread: Mapping[str, str] = {}

    async def __call__(self) -> Reading:
        logins = await self._read_logins()
        self._note_unread(logins.unread)
        users = logins.users
        names, listed = users_list(users)
        self._note_cut(len(users), listed)
        properties = {
            LIST_PROPERTY: names,
            NONE_PROPERTY: "false" if listed else "true",
            COUNT_PROPERTY: str(listed),
        }
        notes = [f"{len(users) - listed} left out"] if listed < len(users) else []
        notes += [f"{source} not read: {error}" for source, error in logins.unread.items()]
        summary = f"{listed} user{'' if listed == 1 else 's'}"
        if notes:  # no "; ": the daemon joins the services' statuses with it
            summary += f" ({', '.join(notes)})"
        return Reading(properties, summary)

    def _note_unread(self, unread: Mapping[str, str]) -> None:
        for source, error in unread.items():
            if self._unread.get(source) != error:
                log.warning("login_source_unreadable", source=source, error=error)
        for source in self._unread.keys() - unread.keys():
            log.info("login_source_readable", source=source)
        self._unread = unread

    def _note_cut(self, users: int, listed: int) -> None:
        cut = listed < users
        if cut and not self._cut:
            log.warning("users_list_cut", users=users, listed=listed, limit_bytes=MAX_LIST_BYTES)
        elif self._cut and not cut:
            log.info("users_list_whole", users=users)
        self._cut = cut


def users_service(
    context: ServiceContext,
    section: UsersSection,
    read_logins: Callable[[], Awaitable[Logins]] = read_logins_without_blocking,
) -> PublishingService:
    """The service, reading the guest's logins off the event loop (tests pass their own
    ``read_logins``)."""
    return PublishingService(
        NAME,
        context,
        section,
        UsersReader(read_logins),
        always={COUNT_PROPERTY},
    )


SPEC: Final = ServiceSpec(NAME, UsersSection, users_service)
