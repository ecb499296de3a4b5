"""Differential: VMMDEV_REQUEST, the request policy per requestor and its size checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import MAX_VMMDEV_REQUEST_SIZE, Facility, Ioctl, RequestType
from tests.kernel.builders import REQUESTORS, request, sessions
from tests.kernel.differential import assert_agree, differ

if TYPE_CHECKING:
    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")

ALL_TYPES: Final = sorted({*RequestType, 0, 9, 99, 222, 250, 1234})
"""Every known request type and some unknown ones."""
SIZES: Final[dict[int, int]] = {
    RequestType.GET_HOST_VERSION: 40,
    RequestType.GET_HOST_TIME: 32,
    RequestType.GET_SESSION_ID: 32,
    RequestType.REPORT_GUEST_STATUS: 36,
    RequestType.GET_MOUSE_STATUS: 36,
    RequestType.SET_MOUSE_STATUS: 36,
    RequestType.ACKNOWLEDGE_EVENTS: 28,
    RequestType.WRITE_COREDUMP: 28,
    RequestType.GET_MEMBALLOON_CHANGE_REQ: 36,
    RequestType.CHANGE_MEMBALLOON: 2080,
    RequestType.HEARTBEAT_CONFIGURE: 36,
    RequestType.IDLE: 24,
}


def _code(size: int) -> int:
    return Ioctl.vmmdev_request(size) if size < 1024 else Ioctl.VMMDEV_REQUEST_BIG


@pytest.mark.parametrize(("label", "user_device", "uid"), REQUESTORS)
async def test_every_request_type(label: str, user_device: bool, uid: int) -> None:
    """Every request type from one kind of caller: allowed, refused, what the host saw."""

    async def script(rig: Rig) -> None:
        session = rig.open(user_device=user_device, uid=uid)
        for request_type in ALL_TYPES:
            size = SIZES.get(request_type, 32)
            await rig.ioctl(
                f"{label} type {request_type}", session, _code(size), request(request_type, size)
            )

    assert_agree(await differ(script))


@pytest.mark.parametrize(
    "facility",
    [
        0,
        Facility.VBOXGUEST_DRIVER,
        Facility.VBOX_SERVICE,
        Facility.VBOX_TRAY_CLIENT,
        Facility.ALL,
        7,
    ],
)
async def test_report_guest_capabilities_reads_a_facility(facility: int) -> None:
    """REPORT_GUEST_CAPABILITIES is judged by its first field read as a facility."""

    async def script(rig: Rig) -> None:
        for label, session in sessions(rig):
            req = request(RequestType.REPORT_GUEST_CAPABILITIES, 28)
            L.EventsRequest.events.set(req, facility)
            await rig.ioctl(label, session, _code(28), req)

    assert_agree(await differ(script))


async def test_request_sizes() -> None:
    """size_in against size_out and the request's own size; the 1 MiB limit; the big code."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        version = RequestType.GET_HOST_VERSION
        req = request(version, 40)
        L.RequestHeader.reserved1.set(req, 48)
        await rig.ioctl("size_out larger", session, _code(48), req + bytes(8))
        req = request(version, 40)
        L.RequestHeader.reserved1.set(req, 0)
        await rig.ioctl("size_out zero", session, _code(40), req)
        req = request(version, 48)
        await rig.ioctl("request longer than needed", session, _code(48), req)
        req = request(version, 40)
        L.RequestHeader.size_.set(req, 32)
        L.RequestHeader.reserved1.set(req, 32)
        await rig.ioctl("request shorter than needed", session, _code(32), req)
        await rig.ioctl(
            "big code, small request", session, Ioctl.VMMDEV_REQUEST_BIG, request(version, 40)
        )
        await rig.ioctl("alt big code", session, Ioctl.VMMDEV_REQUEST_BIG_ALT, request(version, 40))
        size = MAX_VMMDEV_REQUEST_SIZE + 8
        await rig.ioctl("over 1 MiB", session, Ioctl.VMMDEV_REQUEST_BIG, request(version, size))
        size = MAX_VMMDEV_REQUEST_SIZE
        await rig.ioctl("exactly 1 MiB", session, Ioctl.VMMDEV_REQUEST_BIG, request(version, size))
        req = request(RequestType.GET_HOST_TIME, 32)
        L.RequestHeader.requestor.set(req, 0xFFFFFFFF)
        await rig.ioctl("requestor field set", session, _code(32), req)

    assert_agree(await differ(script))
