"""``NetworkService``: publishes the guest's IPv4 interfaces as guest properties.

What VBoxService's VM-info service publishes and host tools read (``VBoxManage
guestproperty get VM /VirtualBox/GuestInfo/Net/0/V4/IP``; Vagrant finds a DHCP guest's
address there). For the N-th IPv4 address of a non-loopback interface
(:mod:`agent.services._netifaces`), under ``/VirtualBox/GuestInfo/Net/N/``: ``V4/IP``,
``V4/Broadcast``, ``V4/Netmask``, ``MAC`` (12 upper-case hex digits), ``Status`` (``Up`` or
``Down``) and ``Name``; then ``/VirtualBox/GuestInfo/Net/Count``.

Every ``[network] interval_s`` (5 s, VBoxService's default) the interfaces are read again.
A value is written only when it changed, but ``Count`` is written on every pass: it is the
beacon by which the host knows the other values are current. After a restore everything is
written again. Unlike VBoxService, which leaves them, the entries of an interface that went
away are deleted. A stop deletes ``Count``, as VBoxService does, and leaves the rest. One
HGCM client, kept across restores. Config section: ``[network]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio
from pydantic import Field

from agent.protocol import Event, VBoxStatusError
from agent.services._base import ServiceContext, ServiceSection, ServiceSpec
from agent.services._netifaces import read_ipv4_interfaces
from agent.services.guest_props import open_guest_properties

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from agent.device import Device
    from agent.services._netifaces import NetInterface
    from agent.services.event_pump import EventPump
    from agent.services.guest_props import GuestProperties

log = structlog.get_logger(__name__)

NAME: Final = "network"
NET_PREFIX: Final = "/VirtualBox/GuestInfo/Net/"
COUNT_PROPERTY: Final = f"{NET_PREFIX}Count"
DEFAULT_INTERVAL_S: Final = 5.0
MIN_INTERVAL_S: Final = 1.0
MAX_INTERVAL_S: Final = 3600.0


class NetworkSection(ServiceSection):
    """``[network]``: the guest's IPv4 interfaces as guest properties."""

    interval_s: float = Field(default=DEFAULT_INTERVAL_S, ge=MIN_INTERVAL_S, le=MAX_INTERVAL_S)
    """Seconds between two readings of the interfaces; a reload applies it at once."""


@dataclass(frozen=True, slots=True)
class NetworkStatistics:
    """What the network service published.

    Attributes:
        passes: readings of the interfaces that were published (``Count`` written).
        interfaces: the IPv4 addresses of the last pass (None before the first).
        writes, deletes: properties written and deleted, ``Count`` not included.
        refused: properties the host refused at their last attempt.
    """

    passes: int
    interfaces: int | None
    writes: int
    deletes: int
    refused: int


def network_properties(interfaces: Sequence[NetInterface]) -> dict[str, str]:
    """The properties of ``interfaces``, by name, ``Count`` not included."""
    properties: dict[str, str] = {}
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
    return properties


@final
class NetworkService:
    """Reads the interfaces every ``interval_s`` and after a restore; publishes what changed.

    ``read_interfaces`` lists them (the guest's own by default; tests pass their own).
    """

    name: Final = NAME

    def __init__(
        self,
        context: ServiceContext,
        section: NetworkSection,
        read_interfaces: Callable[[], Sequence[NetInterface]] = read_ipv4_interfaces,
    ) -> None:
        self._read_interfaces = read_interfaces
        self._device: Device = context.device
        self._pump: EventPump = context.pump
        self._status_changed = context.status_changed
        self._interval_s = section.interval_s
        self._pause: trio.CancelScope | None = None
        self._paused_at = 0.0
        self._published: dict[str, str | None] = {}
        """What the host holds from us; None: it may hold something else (after a restore)."""
        self._count_published = False
        self._refused: dict[str, str] = {}
        self._unreadable: str | None = None
        self._interfaces: int | None = None
        self._passes = 0
        self._writes = 0
        self._deletes = 0

    def statistics(self) -> NetworkStatistics:
        """Return the counters."""
        return NetworkStatistics(
            self._passes, self._interfaces, self._writes, self._deletes, len(self._refused)
        )

    def status(self) -> str:
        """``network 2 interfaces``, ``network starting``, or what went wrong."""
        if self._unreadable is not None:
            return f"network: interfaces unreadable ({self._unreadable})"
        if self._refused:
            name, status = next(iter(self._refused.items()))
            return f"network: {name} refused ({status})"
        if self._interfaces is None:
            return "network starting"
        return f"network {self._interfaces} interface{'' if self._interfaces == 1 else 's'}"

    def reconfigure(self, section: NetworkSection) -> bool:
        """Apply the new interval at once: the current wait ends by the new one."""
        self._interval_s = section.interval_s
        if self._pause is not None:
            self._pause.deadline = self._paused_at + self._interval_s
        return True

    async def drain(self) -> None:
        """Delete ``Count``, so the host knows the other values are no longer kept current."""
        if not self._count_published:
            await trio.lowlevel.checkpoint()
            return
        try:
            async with open_guest_properties(self._device) as props:
                await props.delete(COUNT_PROPERTY)
        except VBoxStatusError as exc:
            log.warning("network_count_delete_failed", status=exc.name)
            return
        self._count_published = False
        log.info("network_count_deleted")

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Publish, then again every ``interval_s`` and at once after every restore."""
        structlog.contextvars.bind_contextvars(service=self.name)
        with self._pump.subscribe(self.name, Event.RESTORED) as events:
            async with open_guest_properties(self._device) as props:
                await self._publish(props)
                task_status.started()
                while True:
                    self._paused_at = trio.current_time()
                    with trio.CancelScope(deadline=self._paused_at + self._interval_s) as pause:
                        self._pause = pause
                        await events.receive()
                        self._published = dict.fromkeys(self._published)
                        log.info("network_republish_after_restore")
                    self._pause = None
                    await self._publish(props)

    async def _publish(self, props: GuestProperties) -> None:
        """One pass; tell the daemon when the status changed (not every pass: no wake-up)."""
        status = self.status()
        await self._pass(props)
        if self.status() != status:
            self._status_changed()

    async def _pass(self, props: GuestProperties) -> None:
        """Read the interfaces, write what changed, delete what went, then Count."""
        try:
            interfaces = self._read_interfaces()
        except OSError as exc:
            self._set_unreadable(str(exc))
            return
        self._set_unreadable(None)
        wanted = network_properties(interfaces)
        writes, deletes = self._writes, self._deletes
        for name, value in wanted.items():
            if self._published.get(name) != value:
                await self._write(props, name, value)
        for name in [name for name in self._published if name not in wanted]:
            await self._delete(props, name)
        self._count_published |= await self._write(props, COUNT_PROPERTY, str(len(interfaces)))
        self._passes += 1
        written, deleted = self._writes - writes, self._deletes - deletes
        if written or deleted or self._interfaces != len(interfaces):
            log.info(
                "network_published", interfaces=len(interfaces), written=written, deleted=deleted
            )
        self._interfaces = len(interfaces)

    async def _write(self, props: GuestProperties, name: str, value: str) -> bool:
        """Set one property; True if the host took it."""
        try:
            await props.set(name, value)
        except VBoxStatusError as exc:
            self._refuse(name, exc.name)
            return False
        self._refused.pop(name, None)
        if name != COUNT_PROPERTY:
            self._published[name] = value
            self._writes += 1
        return True

    async def _delete(self, props: GuestProperties, name: str) -> None:
        try:
            await props.delete(name)
        except VBoxStatusError as exc:
            self._refuse(name, exc.name)
            return
        self._refused.pop(name, None)
        del self._published[name]
        self._deletes += 1

    def _refuse(self, name: str, status: str) -> None:
        """Log a refusal once, not at every pass that retries it."""
        if self._refused.get(name) != status:
            log.warning("property_refused", property=name, status=status)
        self._refused[name] = status

    def _set_unreadable(self, reason: str | None) -> None:
        """Log a failure to read the interfaces when it starts, changes and ends."""
        if reason == self._unreadable:
            return
        if reason is None:
            log.info("network_interfaces_readable")
        else:
            log.warning("network_interfaces_unreadable", error=reason)
        self._unreadable = reason


def _build(context: ServiceContext, section: NetworkSection) -> NetworkService:
    return NetworkService(context, section)


SPEC: Final = ServiceSpec(NAME, NetworkSection, _build)
