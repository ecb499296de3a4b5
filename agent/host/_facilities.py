"""The host's guest-facility table (REPORT_GUEST_STATUS), as Main keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from agent.protocol.constants import Facility, FacilityStatus
from agent.protocol.status import (
    VERR_INVALID_PARAMETER,
    VERR_OUT_OF_RANGE,
    VERR_OUT_OF_RESOURCES,
    VINF_SUCCESS,
)

MAX_FACILITIES: Final = 32
"""Entries the host keeps; a full table expunges an inactive, non-fixed entry."""
FIXED_FACILITIES: Final = (
    Facility.VBOXGUEST_DRIVER,
    Facility.VBOX_SERVICE,
    Facility.VBOX_TRAY_CLIENT,
    Facility.SEAMLESS,
    Facility.GRAPHICS,
)
"""Entries that exist from construction and are never expunged."""
MAX_STATUS: Final = 0xFFFF
"""A status must fit in 16 bits."""


@dataclass(slots=True)
class FacilityEntry:
    """One facility's last reported state."""

    status: int = int(FacilityStatus.INACTIVE)
    flags: int = 0


class FacilityTable:
    """Facility number -> last status, with the host's size limit and fixed entries."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[int, FacilityEntry] = {int(f): FacilityEntry() for f in FIXED_FACILITIES}

    def report(self, facility: int, status: int, flags: int) -> int:
        """Record a report and return the VBox status the host answers with."""
        if not 0 < facility <= Facility.ALL:
            return VERR_INVALID_PARAMETER
        if status > MAX_STATUS:
            return VERR_OUT_OF_RANGE
        if facility == Facility.ALL:
            for entry in self.entries.values():
                entry.status, entry.flags = status, flags
            return VINF_SUCCESS
        if facility not in self.entries:
            if len(self.entries) >= MAX_FACILITIES and not self._expunge_one():
                return VERR_OUT_OF_RESOURCES
            self.entries[facility] = FacilityEntry()
        entry = self.entries[facility]
        entry.status, entry.flags = status, flags
        return VINF_SUCCESS

    def reset(self) -> None:
        """VM reset: every facility goes back to inactive; its flags stay (VMMDev's reset
        sets only the status and the time stamp)."""
        for entry in self.entries.values():
            entry.status = int(FacilityStatus.INACTIVE)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Return ``{"<facility>": {"status": N}}`` in facility order."""
        return {str(f): {"status": self.entries[f].status} for f in sorted(self.entries)}

    def _expunge_one(self) -> bool:
        """Drop the highest-numbered inactive entry that is not fixed (VMMDev's table is
        sorted by facility and searched from its end)."""
        for facility in sorted(self.entries, reverse=True):
            entry = self.entries[facility]
            if facility not in FIXED_FACILITIES and entry.status == FacilityStatus.INACTIVE:
                del self.entries[facility]
                return True
        return False
