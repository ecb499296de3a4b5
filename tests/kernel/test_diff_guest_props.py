"""Differential: the guest-property service over HGCM, with real page lists both ways."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from agent.host.guest_props import SERVICE_NAME
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import HgcmParmType, Ioctl
from agent.protocol.guest_props import GuestFunction as F
from tests.kernel.differential import assert_agree, differ
from tests.kernel.test_diff_hgcm import connect, do_call

if TYPE_CHECKING:
    from agent.host import DriverSession
    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")

T = HgcmParmType


async def props_client(rig: Rig, session: DriverSession) -> int:
    """Connect ``session`` to the guest-property service."""
    step = await rig.ioctl("connect", session, Ioctl.HGCM_CONNECT, connect(SERVICE_NAME))
    return L.HgcmConnectIoctl.client_id.get(step.buffer)


async def test_set_get_enumerate_delete() -> None:
    """Properties written, read (fitting and overflowing), enumerated and deleted by a guest."""

    async def script(rig: Rig) -> None:
        session = rig.open()
        c = await props_client(rig, session)
        name = b"/Guest/Test/Name\0"
        await do_call(
            rig,
            "set",
            session,
            c,
            F.SET_PROP,
            [(T.LINADDR_IN, name), (T.LINADDR_IN, b"value\0"), (T.LINADDR_IN, b"TRANSIENT\0")],
        )
        await do_call(
            rig,
            "set value",
            session,
            c,
            F.SET_PROP_VALUE,
            [(T.LINADDR_IN, b"/Guest/Big\0"), (T.LINADDR_IN, b"x" * 5000 + b"\0")],
        )
        await do_call(
            rig,
            "get",
            session,
            c,
            F.GET_PROP,
            [(T.LINADDR_IN, name), (T.LINADDR_OUT, bytes(64)), (T.U64, 0), (T.U32, 0)],
        )
        await do_call(
            rig,
            "get overflow",
            session,
            c,
            F.GET_PROP,
            [(T.LINADDR_IN, b"/Guest/Big\0"), (T.LINADDR_OUT, bytes(16)), (T.U64, 0), (T.U32, 0)],
        )
        await do_call(
            rig,
            "get big",
            session,
            c,
            F.GET_PROP,
            [(T.LINADDR_IN, b"/Guest/Big\0"), (T.LINADDR, bytes(6000)), (T.U64, 0), (T.U32, 0)],
        )
        await do_call(
            rig,
            "enumerate",
            session,
            c,
            F.ENUM_PROPS,
            [(T.LINADDR_IN, b"/Guest/*\0"), (T.LINADDR_OUT, bytes(8192)), (T.U32, 0)],
        )
        await do_call(
            rig,
            "host reserved",
            session,
            c,
            F.SET_PROP_VALUE,
            [(T.LINADDR_IN, b"/VirtualBox/HostInfo/X\0"), (T.LINADDR_IN, b"1\0")],
        )
        await do_call(
            rig,
            "bad name",
            session,
            c,
            F.SET_PROP_VALUE,
            [(T.LINADDR_IN, b"no-slash\0"), (T.LINADDR_IN, b"1\0")],
        )
        await do_call(rig, "delete", session, c, F.DEL_PROP, [(T.LINADDR_IN, name)])
        await do_call(
            rig,
            "get deleted",
            session,
            c,
            F.GET_PROP,
            [(T.LINADDR_IN, name), (T.LINADDR_OUT, bytes(64)), (T.U64, 0), (T.U32, 0)],
        )

    assert_agree(await differ(script))


async def test_notification_wakes_a_waiting_guest() -> None:
    """GET_NOTIFICATION waits in the host until another session changes a property."""

    async def script(rig: Rig) -> None:
        waiter, writer = rig.open(), rig.open()
        w = await props_client(rig, waiter)
        c = await props_client(rig, writer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                do_call,
                rig,
                "notification",
                waiter,
                w,
                F.GET_NOTIFICATION,
                [
                    (T.LINADDR_IN, b"/Guest/*\0"),
                    (T.U64, 0),
                    (T.LINADDR_OUT, bytes(256)),
                    (T.U32, 0),
                ],
            )
            await rig.settle(lambda: rig.host.status()["hgcm_pending_calls"] == 1)
            await do_call(
                rig,
                "change",
                writer,
                c,
                F.SET_PROP_VALUE,
                [(T.LINADDR_IN, b"/Guest/N\0"), (T.LINADDR_IN, b"v\0")],
            )
        rig.steps[-2:] = sorted(rig.steps[-2:], key=lambda step: step.label)  # concurrent steps

    assert_agree(await differ(script))
