"""``users``: publishes who is logged in to the guest as guest properties.

What VBoxService's VM-info service publishes and host tools wait on (``VBoxManage
guestproperty wait VM /VirtualBox/GuestInfo/OS/NoLoggedInUsers``):
``/VirtualBox/GuestInfo/OS/LoggedInUsersList`` (the names, comma-separated; absent while
no one is logged in), ``LoggedInUsers`` (how many) and ``NoLoggedInUsers`` (``true`` or
``false``). The users come from utmp and logind's active sessions
(:mod:`agent.services._logins`).

The engine is :class:`~agent.services._publishing.PublishingService`: every ``[users]
interval_s`` (5 s, VBoxService's default) and after a restore, writing only what changed.
As VBoxService does, every value carries ``TRANSRESET`` (the host drops it when the VM
resets or powers off) and a stop leaves the "no one" values: the list deleted, ``0`` and
``true``. A source that cannot be read keeps the last values rather than claim no one is
logged in. Config section: ``[users]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.services._base import ServiceContext, ServiceSpec
from agent.services._logins import logged_in_users
from agent.services._publishing import PublishingSection, PublishingService, Reading

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

NAME: Final = "users"
OS_PREFIX: Final = "/VirtualBox/GuestInfo/OS/"
LIST_PROPERTY: Final = f"{OS_PREFIX}LoggedInUsersList"
COUNT_PROPERTY: Final = f"{OS_PREFIX}LoggedInUsers"
NONE_PROPERTY: Final = f"{OS_PREFIX}NoLoggedInUsers"
FLAGS: Final = "TRANSRESET"
NO_ONE: Final[dict[str, str | None]] = {
    LIST_PROPERTY: None,
    COUNT_PROPERTY: "0",
    NONE_PROPERTY: "true",
}
"""The values with no one logged in: VBoxService's reset values, written at a stop."""


class UsersSection(PublishingSection):
    """``[users]``: who is logged in, as guest properties, every ``interval_s``."""


def users_reading(read_users: Callable[[], Sequence[str]] = logged_in_users) -> Reading:
    """The users ``read_users`` lists, as properties and ``N users``."""
    users = read_users()
    if not users:
        return Reading(NO_ONE, "0 users")
    properties = {
        LIST_PROPERTY: ",".join(users),
        COUNT_PROPERTY: str(len(users)),
        NONE_PROPERTY: "false",
    }
    return Reading(properties, f"{len(users)} user{'' if len(users) == 1 else 's'}")


def users_service(
    context: ServiceContext,
    section: UsersSection,
    read_users: Callable[[], Sequence[str]] = logged_in_users,
) -> PublishingService:
    """The service, reading the guest's logins (tests pass their own ``read_users``)."""
    return PublishingService(
        NAME, context, section, lambda: users_reading(read_users), flags=FLAGS, stop_values=NO_ONE
    )


SPEC: Final = ServiceSpec(NAME, UsersSection, users_service)
