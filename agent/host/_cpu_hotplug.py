"""The host's CPU hot-plug state, as VMMDev keeps it.

VMMDev holds a flag (does the guest monitor hot-plug?) and *one* event slot, not a queue:

- ``SET_CPU_HOTPLUG_STATUS`` sets the flag (Disable 1 clears it, Enable 2 sets it, any other
  value is VERR_INVALID_PARAMETER);
- Main's plug or unplug of a CPU (``pfnCpuHotPlug``/``pfnCpuHotUnplug``, given the CPU's core
  and package ids) fails with VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST while the flag
  is clear; otherwise it overwrites the slot (an event the guest has not read yet is lost)
  and raises CPU_HOTPLUG;
- ``GET_CPU_HOTPLUG_REQ`` returns the slot and clears it to (NONE, UINT32_MAX, UINT32_MAX).

Neither the flag nor the slot is in the saved state: after a restore (a new VM process) the
flag is clear and the slot reads INVALID with ids 0, so a guest must enable monitoring again.
A VM reset leaves both alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.host._log import host_log as _log
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import CpuEventType, CpuStatusType, Event
from agent.protocol.status import (
    STATUS_CODES,
    VERR_INVALID_PARAMETER,
    VINF_SUCCESS,
)

if TYPE_CHECKING:
    from collections.abc import Callable

VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST: Final = STATUS_CODES[
    "VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST"
]
U32_MAX: Final = 0xFFFF_FFFF


class HostCpuHotPlug:
    """CPU hot-plug of one VM: the guest's monitoring flag and the pending event.

    Args:
        raise_events: VMMDev's event notification.
    """

    def __init__(self, raise_events: Callable[[int], None]) -> None:
        self._raise_events = raise_events
        self.monitored = False
        self.event = CpuEventType.INVALID
        self.core = 0
        self.package = 0
        self.notified = 0
        """Plug and unplug events handed to the guest."""

    def notify(self, event: CpuEventType, core: int, package: int) -> int:
        """Main plugs or unplugs the CPU with ids ``core``/``package``; return the status.

        Raises:
            ValueError: ``event`` is not PLUG or UNPLUG, or an id is not a u32.
        """
        if event not in (CpuEventType.PLUG, CpuEventType.UNPLUG):
            msg = f"a CPU hot-plug event is PLUG or UNPLUG, not {event!r}"
            raise ValueError(msg)
        for name, value in (("core", core), ("package", package)):
            if not 0 <= value <= U32_MAX:
                msg = f"CPU {name} id {value} is not a u32"
                raise ValueError(msg)
        if not self.monitored:
            return VERR_VMMDEV_CPU_HOTPLUG_NOT_MONITORED_BY_GUEST
        self.event, self.core, self.package = event, core, package
        self.notified += 1
        _log.info("cpu_hotplug_notified", kind=event.name, core=core, package=package)
        self._raise_events(Event.CPU_HOTPLUG)
        return VINF_SUCCESS

    def get_request(self, req: bytearray, _phys: int) -> int:
        """GET_CPU_HOTPLUG_REQ: hand over the slot and clear it."""
        L.CpuHotPlugRequest.event_type.set(req, self.event)
        L.CpuHotPlugRequest.core.set(req, self.core)
        L.CpuHotPlugRequest.package.set(req, self.package)
        self.event, self.core, self.package = CpuEventType.NONE, U32_MAX, U32_MAX
        return VINF_SUCCESS

    def set_status(self, req: bytearray, _phys: int) -> int:
        """SET_CPU_HOTPLUG_STATUS: Disable or Enable the events."""
        status = L.CpuHotPlugStatusRequest.status.get(req)
        if status == CpuStatusType.DISABLE:
            self.monitored = False
        elif status == CpuStatusType.ENABLE:
            self.monitored = True
        else:
            return VERR_INVALID_PARAMETER
        return VINF_SUCCESS

    def restore(self) -> None:
        """A new VM process loaded the saved state: nothing of this was in it."""
        self.monitored = False
        self.event, self.core, self.package = CpuEventType.INVALID, 0, 0

    def snapshot(self) -> dict[str, object]:
        """The state for ``host status``."""
        return {
            "monitored": self.monitored,
            "event": self.event.name,
            "core": self.core,
            "package": self.package,
            "notified": self.notified,
        }
