"""Driver load (``vbg_core_init``): introduce the additions to the host, in the driver's order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.host._log import host_log as _log
from agent.protocol import (
    DeviceUnavailableError,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol.constants import (
    HEADER_SIZE,
    HOST_FEATURE_HGCM_PHYS_PAGE_LIST,
    OSTYPE_LINUX26,
    OSTYPE_X64,
    VMMDEV_VERSION,
    Event,
    Facility,
    FacilityStatus,
    RequestType,
)
from agent.protocol.status import (
    VERR_NOT_IMPLEMENTED,
    VERR_NOT_SUPPORTED,
    VINF_SUCCESS,
    status_name,
)

if TYPE_CHECKING:
    from agent.host.driver._core import Driver

FIXED_EVENTS: Final = Event.MOUSE_POSITION_CHANGED | Event.HGCM
"""Events the driver always asks the host for."""
ADDITIONS_VERSION: Final = (6, 0, 0, 127566)
"""What mainline's ``vboxguest_version.h`` reports (6.0.0 r127566)."""
ADDITIONS_NAME: Final = b"6.0.0"
ADDITIONS_FEATURE_REQUESTOR_INFO: Final = 0x1
MOUSE_STATUS_SIZE: Final = 36
HYPERVISOR_INFO_SIZE: Final = 32
"""``struct vmmdev_hypervisorinfo``: the header, ``hypervisor_start`` and ``hypervisor_size``."""


class DriverLoadError(DeviceUnavailableError):
    """The simulated driver refused to load (as ``vbg_core_init`` failing probe).

    As on a real guest, there is then no device to open: the CLI exits 69.
    """


async def load(drv: Driver) -> None:
    """``vbg_core_init``: introduce the additions to the host, in the driver's order.

    Raises:
        DriverLoadError: a step whose failure aborts the probe failed.
    """
    version = drv.alloc_request(RequestType.GET_HOST_VERSION, L.HostVersionRequest.size)
    rc = await drv.perform(version)
    drv.host_features = L.HostVersionRequest.features.get(version)
    if rc < 0 or not drv.host_features & HOST_FEATURE_HGCM_PHYS_PAGE_LIST:
        msg = f"host too old or unreachable: GET_HOST_VERSION {status_name(rc)}"
        raise DriverLoadError(msg)
    await _report_guest_info(drv)
    await _must(drv, drv.mask_request(RequestType.CTL_GUEST_FILTER_MASK, FIXED_EVENTS))
    await _must(drv, drv.mask_request(RequestType.SET_GUEST_CAPABILITIES, 0))
    await _must(drv, _mouse_status(drv, 0))
    await _query_guest_mappings(drv)
    if drv.owns_heartbeat:
        await _heartbeat_init(drv)
    status = drv.alloc_request(RequestType.REPORT_GUEST_STATUS, L.GuestStatusRequest.size)
    L.GuestStatusRequest.facility.set(status, Facility.VBOXGUEST_DRIVER)
    L.GuestStatusRequest.status.set(status, FacilityStatus.ACTIVE)
    L.GuestStatusRequest.flags.set(status, 0)
    rc = await drv.perform(status)
    if rc < 0 and rc != VERR_NOT_IMPLEMENTED:
        _log.warning("driver_status_report_failed", rc=rc)
    drv.loaded = True


async def _must(drv: Driver, req: bytearray) -> None:
    rc = await drv.perform(req)
    if rc < 0:
        name = RequestType(L.RequestHeader.request_type.get(req)).name
        msg = f"driver load failed: {name} {status_name(rc)}"
        raise DriverLoadError(msg)


def _mouse_status(drv: Driver, features: int) -> bytearray:
    """A SET_MOUSE_STATUS request with ``features`` and a zero position."""
    req = drv.alloc_request(RequestType.SET_MOUSE_STATUS, MOUSE_STATUS_SIZE)
    req[HEADER_SIZE:MOUSE_STATUS_SIZE] = features.to_bytes(4, "little") + bytes(8)
    return req


async def _query_guest_mappings(drv: Driver) -> None:
    """``vbg_guest_mappings_init``: ask for the hypervisor's area; failure is not fatal.

    The simulated host (hardware virtualisation) wants no area, so nothing is mapped.
    """
    req = drv.alloc_request(RequestType.GET_HYPERVISOR_INFO, HYPERVISOR_INFO_SIZE)
    req[HEADER_SIZE:HYPERVISOR_INFO_SIZE] = bytes(HYPERVISOR_INFO_SIZE - HEADER_SIZE)
    await drv.perform(req)


async def _report_guest_info(drv: Driver) -> None:
    info2 = drv.alloc_request(RequestType.REPORT_GUEST_INFO2, L.GuestInfo2Request.size)
    major, minor, build, revision = ADDITIONS_VERSION
    L.GuestInfo2Request.additions_major.set(info2, major)
    L.GuestInfo2Request.additions_minor.set(info2, minor)
    L.GuestInfo2Request.additions_build.set(info2, build)
    L.GuestInfo2Request.additions_revision.set(info2, revision)
    L.GuestInfo2Request.additions_features.set(info2, ADDITIONS_FEATURE_REQUESTOR_INFO)
    name_at = L.GuestInfo2Request.name.offset
    info2[name_at : name_at + len(ADDITIONS_NAME) + 1] = ADDITIONS_NAME + b"\0"
    info1 = drv.alloc_request(RequestType.REPORT_GUEST_INFO, L.GuestInfoRequest.size)
    L.GuestInfoRequest.interface_version.set(info1, VMMDEV_VERSION)
    L.GuestInfoRequest.os_type.set(info1, OSTYPE_LINUX26 | OSTYPE_X64)
    rc = await drv.perform(info2)
    if rc >= 0:
        rc = await drv.perform(info1)
    elif rc in (VERR_NOT_SUPPORTED, VERR_NOT_IMPLEMENTED):
        rc = await drv.perform(info1)
        if rc >= 0:
            rc = await drv.perform(info2)
            rc = VINF_SUCCESS if rc == VERR_NOT_IMPLEMENTED else rc
    if rc < 0:
        msg = f"driver load failed: reporting the guest info gave {status_name(rc)}"
        raise DriverLoadError(msg)


async def _heartbeat_init(drv: Driver) -> None:
    """``vbg_heartbeat_init`` / ``vgdrvHeartbeatInit``: switch the host's check off, then on.

    A refused step ends it there (a failed "off" sends no "on"), the driver beats not at all
    and still loads.
    """
    for enabled in (False, True):
        rc = await _heartbeat_configure(drv, enabled=enabled)
        if rc < 0:
            drv.heartbeat_interval_ns = 0
            _log.warning("driver_heartbeat_unavailable", enabled=enabled, rc=rc)
            return


async def _heartbeat_configure(drv: Driver, *, enabled: bool) -> int:
    req = drv.alloc_request(RequestType.HEARTBEAT_CONFIGURE, L.HeartbeatRequest.size)
    L.HeartbeatRequest.enabled.set(req, int(enabled))
    L.HeartbeatRequest.interval_ns.set(req, 0)
    rc = await drv.perform(req)
    drv.heartbeat_interval_ns = L.HeartbeatRequest.interval_ns.get(req)
    return rc
