"""The small ioctls: DRIVER_VERSION_INFO, LOG and WRITE_CORE_DUMP."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from agent.host._log import host_log as _log
from agent.host.driver._util import U32_MAX, check_sizes, fail
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import HEADER_SIZE, IOC_VERSION, RequestType
from agent.protocol.status import VERR_VERSION_MISMATCH

if TYPE_CHECKING:
    from agent.host.driver._core import Driver
    from agent.host.driver._session import DriverSession
    from agent.host.memory import GuestMemory


async def driver_version_info(
    drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> None:
    """Agree on the ioctl interface version (1.0 is all the driver speaks)."""
    del drv, session, memory
    layout = L.DriverVersionInfo
    check_sizes(kbuf, 40, layout.size)
    requested, minimum = layout.req_version.get(kbuf), layout.min_version.get(kbuf)
    if minimum > requested or minimum >> 16 != requested >> 16:
        raise fail(errno.EINVAL)
    if minimum <= IOC_VERSION and minimum >> 16 == IOC_VERSION >> 16:
        layout.session_version.set(kbuf, IOC_VERSION)
    else:
        layout.session_version.set(kbuf, U32_MAX)
        L.IoctlHeader.rc.set(kbuf, VERR_VERSION_MISMATCH)
    layout.driver_version.set(kbuf, IOC_VERSION)
    layout.driver_revision.set(kbuf, 0)
    layout.out_reserved1.set(kbuf, 0)
    layout.out_reserved2.set(kbuf, 0)


async def log(drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory) -> None:
    """Write the message to the kernel log (and the host's guest log); size_out must be 24.

    As ``%.*s`` prints it: up to its first NUL, and at most ``drv.log_line_max`` bytes.
    """
    del session, memory
    if L.IoctlHeader.size_out.get(kbuf) != HEADER_SIZE:
        raise fail(errno.EINVAL)
    end = min(L.IoctlHeader.size_in.get(kbuf), HEADER_SIZE + drv.log_line_max)
    message = bytes(kbuf[HEADER_SIZE:end]).split(b"\0", 1)[0]
    drv.log_messages.append(message)
    _log.info("guest_log", message=message.decode("utf-8", "replace"))


async def write_core_dump(
    drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> None:
    """Ask the host for a core dump; not restricted to trusted sessions."""
    del memory
    check_sizes(kbuf, L.WriteCoreDumpIoctl.size, HEADER_SIZE)
    req = drv.alloc_request(
        RequestType.WRITE_COREDUMP, L.WriteCoreDumpRequest.size, session.requestor
    )
    L.WriteCoreDumpRequest.flags.set(req, L.WriteCoreDumpIoctl.flags.get(kbuf))
    L.IoctlHeader.rc.set(kbuf, await drv.perform(req))
