"""Differential: the ioctl entry's header checks, DRIVER_VERSION_INFO, LOG, WRITE_CORE_DUMP."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import pytest

from agent.protocol import ChangeBalloonProbe, layouts as L  # noqa: N812 - the layout table
from agent.protocol._ioc import ioc
from agent.protocol.constants import IOC_VERSION, Ioctl, IoctlFunction
from tests.kernel.builders import ioctl, sessions
from tests.kernel.differential import assert_agree, differ

if TYPE_CHECKING:
    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")

HEADER_CASES = [
    ("good", {}),
    ("bad version", {"version": 0x10002}),
    ("size_in below header", {"size_in": 23}),
    ("size_out below header", {"size_out": 10}),
    ("size_out zero", {"size_out": 0}),
    ("type set", {"type": 1}),
    ("rc set", {"rc": -1}),
    ("reserved set", {"reserved": 7}),
    ("huge size_in", {"size_in": (16 << 20) + 1}),
]


async def test_header_checks_on_every_fixed_ioctl() -> None:
    """Each fixed-size ioctl with each header defect: errno and buffer match."""
    fixed = {
        "version-info": (Ioctl.DRIVER_VERSION_INFO, 44, 44),
        "wait": (Ioctl.WAIT_FOR_EVENTS, 32, 28),
        "interrupt-all": (Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS, 24, 24),
        "filter": (Ioctl.CHANGE_FILTER_MASK, 32, 24),
        "caps": (Ioctl.CHANGE_GUEST_CAPABILITIES, 32, 32),
        "acquire": (Ioctl.ACQUIRE_GUEST_CAPABILITIES, 36, 24),
        "balloon": (Ioctl.CHECK_BALLOON, 24, 32),
        "core-dump": (Ioctl.WRITE_CORE_DUMP, 28, 24),
        "disconnect": (Ioctl.HGCM_DISCONNECT, 28, 24),
        "change-balloon": (Ioctl.CHANGE_BALLOON, 40, 24),
    }

    async def script(rig: Rig) -> None:
        session = rig.open()
        for name, (code, size_in, size_out) in fixed.items():
            for case, fields in HEADER_CASES:
                buf = ioctl(size_in, size_out, total=max(size_in, size_out, 24), **fields)
                if name == "wait":
                    L.WaitForEventsIoctl.timeout_ms.set(buf, 0)
                await rig.ioctl(f"{name}: {case}", session, code, buf)

    assert_agree(await differ(script))


async def test_size_and_code_mismatches() -> None:
    """The ioctl number's size, short buffers, unknown numbers."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        filter_code = Ioctl.CHANGE_FILTER_MASK
        await rig.ioctl("ioc size too big", session, ioc(3, "V", 12, 40), ioctl(32, 24, total=40))
        await rig.ioctl("ioc size too small", session, ioc(3, "V", 12, 24), ioctl(32, 24))
        await rig.ioctl("ioc size zero", session, ioc(3, "V", 12, 0), ioctl(32, 24))
        await rig.ioctl("short buffer", session, filter_code, ioctl(32, 24, total=28))
        await rig.ioctl("header only", session, filter_code, ioctl(32, 24, total=24))
        await rig.ioctl("tiny buffer", session, filter_code, bytearray(8))
        for nr in (1, 8, 15, 16, 18, 20, 63):
            await rig.ioctl(f"nr {nr}", session, ioc(3, "V", nr, 24), ioctl(24, 24))
        await rig.ioctl("other type", session, ioc(3, "W", 12, 32), ioctl(32, 24))
        await rig.ioctl("direction none", session, ioc(0, "V", 12, 32), ioctl(32, 24))
        await rig.ioctl("log", session, Ioctl.LOG, ioctl(30, 24, total=30))
        await rig.ioctl("log alt", session, Ioctl.log_alt(30), ioctl(30, 24, total=30))
        await rig.ioctl("log size_out 30", session, Ioctl.LOG, ioctl(30, 30))

    assert_agree(await differ(script))


async def test_log_number_with_a_size_and_no_direction() -> None:
    """``_IOC(_IOC_NONE, 'V', 9, n)`` is LOG when ``n`` is the buffer's size: the driver
    matches the variable-size ioctls on the number without its size field."""
    codes = {
        "log, size in the number": ioc(0, "V", 9, 30),
        "log, another size": ioc(0, "V", 9, 40),
        "read only, size in the number": ioc(2, "V", 9, 30),
    }

    async def script(rig: Rig) -> None:
        session = rig.open()
        for label, code in codes.items():
            await rig.ioctl(label, session, code, ioctl(30, 24, total=30))

    assert_agree(await differ(script))


@pytest.mark.parametrize(
    ("req_version", "min_version"),
    [
        (IOC_VERSION, IOC_VERSION),
        (0x00010001, IOC_VERSION),
        (0x00020000, 0x00020000),
        (IOC_VERSION, 0x00000001),
        (0, 0),
        (0x00010000, 0x00020000),
    ],
)
async def test_driver_version_info(req_version: int, min_version: int) -> None:
    """DRIVER_VERSION_INFO answers the same to every version pair, from every requestor."""

    async def script(rig: Rig) -> None:
        for label, session in sessions(rig):
            buf = ioctl(44, 44)
            L.DriverVersionInfo.req_version.set(buf, req_version)
            L.DriverVersionInfo.min_version.set(buf, min_version)
            await rig.ioctl(label, session, Ioctl.DRIVER_VERSION_INFO, buf)

    assert_agree(await differ(script))


async def test_core_dump_and_unknown_function() -> None:
    """WRITE_CORE_DUMP per requestor (the host refuses it by default)."""

    async def script(rig: Rig) -> None:
        for label, session in sessions(rig):
            await rig.ioctl(label, session, Ioctl.WRITE_CORE_DUMP, ioctl(28, 24))
        session = rig.open()
        nr = IoctlFunction.CHANGE_BALLOON
        await rig.ioctl("change balloon", session, ioc(3, "V", nr, 40), ioctl(40, 24, total=40))

    assert_agree(await differ(script))


async def test_the_balloon_mode_probe_is_unknown() -> None:
    """The balloon service's mode probe (CHANGE_BALLOON, padding set) is an unknown ioctl to
    the in-tree driver: ENOTTY, the buffer untouched."""

    async def script(rig: Rig) -> None:
        call = ChangeBalloonProbe().encode()
        await rig.ioctl("mode probe", rig.open(), call.code, call.buffer)

    results = await differ(script)
    assert_agree(results)
    assert results["kernel"][-1].errno == errno.ENOTTY
