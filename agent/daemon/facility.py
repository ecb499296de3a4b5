"""Reports the agent's facility status to the host, as VBoxService does (facility 100).

The host shows it as the guest's run level ("Userland" once the service is Active). A
failed report (refused, or answered with a malformed reply) is logged and ignored: the
status is informational. Once Failed has been
reported nothing else is sent (the host keeps Failed, as VBoxService does). The Failed
report of an agent ending on an error does not raise even when the device is gone: the
error the agent ends with, and its exit status, stay that error's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, final

import structlog

from agent.protocol import (
    HOST_ERRORS,
    DeviceLostError,
    Facility,
    FacilityStatus,
    ReportGuestStatus,
)

if TYPE_CHECKING:
    from agent.device import Device

log = structlog.get_logger(__name__)

REQUEST_ERRORS: Final = (*HOST_ERRORS, OSError)
"""How a request the daemon makes for itself fails without harming the agent: as a
service's (:data:`agent.protocol.HOST_ERRORS`), or the transport fails it."""


@final
class FacilityReporter:
    """Sends REPORT_GUEST_STATUS for the agent's facility."""

    def __init__(self, device: Device, facility: Facility = Facility.VBOX_SERVICE) -> None:
        self._device = device
        self._facility = facility
        self.last: FacilityStatus | None = None

    async def report(self, status: FacilityStatus) -> None:
        """Report ``status`` unless Failed was reported before."""
        if self.last is FacilityStatus.FAILED:
            return
        try:
            await self._device.request(ReportGuestStatus(self._facility, status))
        except REQUEST_ERRORS as exc:
            log.warning("facility_status_not_reported", status=status.name, error=str(exc))
            return
        self.last = status
        log.debug("facility_status_reported", status=status.name)

    async def report_failed(self) -> None:
        """Report Failed as the agent ends on an error; a lost device is logged, not raised
        (it would replace that error)."""
        try:
            await self.report(FacilityStatus.FAILED)
        except DeviceLostError as exc:
            status = FacilityStatus.FAILED.name
            log.warning("facility_status_not_reported", status=status, error=str(exc))
