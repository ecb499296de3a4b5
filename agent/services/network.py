"""``network``: publishes the guest's IPv4 interfaces as guest properties.

What VBoxService's VM-info service publishes and host tools read (``VBoxManage
guestproperty get VM /VirtualBox/GuestInfo/Net/0/V4/IP``; Vagrant finds a DHCP guest's
address there). For the N-th IPv4 address of a non-loopback interface
(:mod:`agent.services._netifaces`), under ``/VirtualBox/GuestInfo/Net/N/``: ``V4/IP``,
``V4/Broadcast``, ``V4/Netmask``, ``MAC`` (12 upper-case hex digits), ``Status`` (``Up`` or
``Down``) and ``Name`` (left out where IPRT would refuse the name as UTF-8, as VBoxService
does); then ``/VirtualBox/GuestInfo/Net/Count``.

The engine is :class:`~agent.services._publishing.PublishingService`: every ``[network]
interval_s`` (10 s, VBoxService 7.2.6's default) and after a restore. A value is written
only when it changed, but ``Count`` on every pass: it is the beacon by which the host knows
the rest is current. As in VBoxService 7.2.6, the entries of an interface that went away are
deleted, and so are, on the first pass (7.2.6 deletes all of ``Net/`` at start) and after a
restore, the names under ``Net/`` that no interface wants (a previous boot's, above today's
count). Every value, ``Count`` too, carries ``TRANSRESET``, as VBoxService 7.2.6 writes
them: the host drops it when the VM resets or powers off, where the agent's stop never runs.
A stop deletes every name under ``Net/``, as VBoxService does at termination, so that no
host tool (Vagrant) reads a stale address before the next start publishes. Config section:
``[network]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.services._base import ServiceContext, ServiceSpec
from agent.services._netifaces import read_ipv4_interfaces
from agent.services._publishing import PublishingSection, PublishingService, Reading

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from agent.services._netifaces import NetInterface

NAME: Final = "network"
NET_PREFIX: Final = "/VirtualBox/GuestInfo/Net/"
COUNT_PROPERTY: Final = f"{NET_PREFIX}Count"
NET_PATTERN: Final = f"{NET_PREFIX}*"
"""Every name the service owns."""


class NetworkSection(PublishingSection):
    """``[network]``: the guest's IPv4 interfaces as guest properties, every ``interval_s``."""


def network_properties(interfaces: Sequence[NetInterface]) -> dict[str, str | None]:
    """The properties of ``interfaces``, by name, ``Count`` included (None: absent, the
    ``Name`` of an interface whose name IPRT would refuse)."""
    properties: dict[str, str | None] = {}
    for index, interface in enumerate(interfaces):
        prefix = f"{NET_PREFIX}{index}/"
        properties |= {
            f"{prefix}V4/IP": interface.address,
            f"{prefix}V4/Broadcast": interface.broadcast,
            f"{prefix}V4/Netmask": interface.netmask,
            f"{prefix}MAC": interface.mac,
            f"{prefix}Status": "Up" if interface.up else "Down",
            f"{prefix}Name": interface.name,
        }
    properties[COUNT_PROPERTY] = str(len(interfaces))
    return properties


async def network_reading(
    read_interfaces: Callable[[], Sequence[NetInterface]] = read_ipv4_interfaces,
) -> Reading:
    """The interfaces ``read_interfaces`` lists, as properties and ``N interfaces``.

    Read on the event loop: the listing is a few ioctls on a datagram socket, which the
    kernel answers from memory.
    """
    interfaces = read_interfaces()
    count = len(interfaces)
    return Reading(network_properties(interfaces), f"{count} interface{'' if count == 1 else 's'}")


def network_service(
    context: ServiceContext,
    section: NetworkSection,
    read_interfaces: Callable[[], Sequence[NetInterface]] = read_ipv4_interfaces,
) -> PublishingService:
    """The service, reading the guest's interfaces (tests pass their own ``read_interfaces``)."""
    return PublishingService(
        NAME,
        context,
        section,
        lambda: network_reading(read_interfaces),
        always={COUNT_PROPERTY},
        owned=(NET_PATTERN,),
    )


SPEC: Final = ServiceSpec(NAME, NetworkSection, network_service)
