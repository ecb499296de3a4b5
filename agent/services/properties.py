"""``PropertiesService``: publishes the guest's OS and the agent's version as guest properties.

As VBoxService's VM-info service does at start and after every restore, it writes
``/VirtualBox/GuestInfo/OS/Product``, ``Release``, ``Version`` (``uname``) and
``ServicePack`` (empty on Linux), plus the agent's own ``/VirtualBox/GuestAdd/VBoxAgent/Version``
(not ``/VirtualBox/GuestAdd/Version``, which tools read as the Guest Additions' version). One
HGCM client, kept across restores (the host restores its clients); a restore is the
RESTORED event. A client the host will not connect (``VERR_HGCM_SERVICE_NOT_FOUND``, where
VBoxService disables its VM-info service, or any other refusal or malformed reply) is no
reason to restart: it is counted, logged when such failures begin, change cause and end,
shown in the status and tried again every ``RETRY_S`` and at every restore. Writes the host
ignored (``VINF_PERMISSION_DENIED``: it made every property read-only for the guest) are made
again every ``RETRY_S`` until it takes them, logged once when the ignoring begins and once
when it ends, and shown in the status meanwhile. Config section: ``[properties]``.
"""

from __future__ import annotations

import math
import os
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Final, NoReturn, final

import structlog
import trio

from agent import __version__
from agent.protocol import Event, RemoteProtocolError, VBoxStatusError
from agent.protocol.status import VINF_SUCCESS, status_name
from agent.records import record
from agent.services._base import ServiceContext, ServiceSection, ServiceSpec
from agent.services._lasting import (
    MALFORMED_REPLY,
    WRITES_IGNORED,
    WRITES_TAKEN_AGAIN,
    LastingFailure,
)
from agent.services.guest_props import keep_guest_properties

if TYPE_CHECKING:
    from collections.abc import Mapping

    from agent.device import Device
    from agent.services.event_pump import EventPump
    from agent.services.guest_props import GuestProperties

log = structlog.get_logger(__name__)

NAME: Final = "properties"
AGENT_VERSION_PROPERTY: Final = "/VirtualBox/GuestAdd/VBoxAgent/Version"
OS_PREFIX: Final = "/VirtualBox/GuestInfo/OS/"
RETRY_S: Final = 10.0
"""How soon a connect that failed, or a write the host ignored, is tried again (VBoxService's
VM-info interval)."""


class PropertiesSection(ServiceSection):
    """``[properties]``: nothing to tune beyond ``enable``."""


@record
class PropertiesStatistics:
    """Publications done (one per start and restore, once every property was written or
    refused), properties the host refused, connects that failed."""

    publications: int
    refused: int
    connect_failures: int = 0


def published_properties() -> dict[str, str]:
    """The properties the service writes, by name, as VBoxService fills them on Linux."""
    uname = os.uname()
    return {
        f"{OS_PREFIX}Product": uname.sysname,
        f"{OS_PREFIX}Release": uname.release,
        f"{OS_PREFIX}Version": uname.version,
        f"{OS_PREFIX}ServicePack": "",
        AGENT_VERSION_PROPERTY: __version__,
    }


@final
class PropertiesService:
    """Writes the guest-info properties at start and after every restore."""

    name: Final = NAME

    def __init__(self, context: ServiceContext) -> None:
        self._device: Device = context.device
        self._pump: EventPump = context.pump
        self._status_changed = context.status_changed
        self._publications = 0
        self._refused: dict[str, str] = {}
        self._unwritten: dict[str, str] = {}
        """The properties whose last write the host ignored, with their values."""
        self._ignoring = LastingFailure(WRITES_TAKEN_AGAIN)
        self._connects = LastingFailure("property_service_connected_again")

    def statistics(self) -> PropertiesStatistics:
        """Return the counters."""
        return PropertiesStatistics(self._publications, len(self._refused), self._connects.total)

    def status(self) -> str:
        """``properties ok``, ``properties setting up`` (before its first publication), or what
        the host refused or ignored."""
        if self._connects.cause is not None:
            return f"properties: property service unavailable ({self._connects.cause})"
        if self._ignoring.cause is not None:
            return f"properties: writes ignored by the host ({self._ignoring.cause})"
        if self._refused:
            name, status = next(iter(self._refused.items()))
            return f"properties: {name} refused ({status})"
        return "properties ok" if self._publications else "properties setting up"

    def reconfigure(self, section: PropertiesSection) -> bool:
        """Nothing to apply: the section has no settings besides ``enable``."""
        del section
        return True

    async def drain(self) -> None:
        """Nothing to give back: leaving :meth:`run` closed the HGCM client."""
        await trio.lowlevel.checkpoint()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Publish, then publish again at every RESTORED event, on one client (connected
        again every ``RETRY_S`` and at every restore while the host refuses it); write again
        every ``RETRY_S`` what the host ignored."""
        with self._pump.subscribe(self.name, Event.RESTORED) as events:
            async with AsyncExitStack() as stack:
                props = await self._connect(stack)
                if props is not None:
                    await self._publish(props, published_properties())
                task_status.started()
                while True:
                    retrying = props is None or bool(self._unwritten)
                    with trio.move_on_after(RETRY_S if retrying else math.inf) as pause:
                        await events.receive()
                    everything = props is None or not pause.cancelled_caught
                    if props is None:
                        props = await self._connect(stack)
                    if props is not None:
                        wanted = published_properties() if everything else dict(self._unwritten)
                        await self._publish(props, wanted)

    async def _connect(self, stack: AsyncExitStack) -> GuestProperties | None:
        """A client kept open on ``stack``; None (counted, logged when the failure begins,
        changes and ends, shown in the status) if the host refused it."""
        props, changed = await keep_guest_properties(self._device, stack, self._connects)
        if changed:
            self._status_changed()
        return props

    async def _publish(self, props: GuestProperties, wanted: Mapping[str, str]) -> None:
        """Write ``wanted``; a publication is done once no write is left that the host
        ignored. Tell the daemon when it is done or the status changed."""
        status = self.status()
        for name, value in wanted.items():
            self._refused.pop(name, None)
            self._unwritten.pop(name, None)
            try:
                written = await props.set(name, value)
            except VBoxStatusError as exc:
                self._refused[name] = exc.name
                log.warning("property_refused", property=name, status=exc.name)
                continue
            except RemoteProtocolError as exc:
                self._refused[name] = MALFORMED_REPLY
                log.warning("property_refused", property=name, malformed_reply=str(exc))
                continue
            if written == VINF_SUCCESS:
                self._ignoring.succeeded()
            else:
                self._unwritten[name] = value
                cause = status_name(written)
                self._ignoring.failed(WRITES_IGNORED, cause, status=cause, property=name)
        if self._unwritten:
            if self.status() != status:
                self._status_changed()
            return
        self._publications += 1
        self._status_changed()
        log.info(
            "properties_published", publications=self._publications, refused=len(self._refused)
        )


def _build(context: ServiceContext, section: PropertiesSection) -> PropertiesService:
    del section
    return PropertiesService(context)


SPEC: Final = ServiceSpec(NAME, PropertiesSection, _build)
