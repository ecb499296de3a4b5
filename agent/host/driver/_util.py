"""Small helpers shared by the driver modules."""

from __future__ import annotations

import errno
import os
from typing import Final, NoReturn

import trio

from agent.host import _header_fields as H  # noqa: N812 - see the module
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.status import status_to_errno

U32_MAX: Final = 0xFFFFFFFF
FILL_BYTE: Final = 0xAA
"""``vbg_req_alloc`` fills every new request with this byte before setting the header."""


class DriverError(OSError):
    """An ioctl failure as mainline returns it (the errno), with the VBox status behind it.

    Attributes:
        status: the host's status the errno was converted from, or None when the driver
            chose the errno itself. Oracle's entry reports it in ``hdr.rc`` instead.
    """

    def __init__(self, code: int, status: int | None = None) -> None:
        super().__init__(code, os.strerror(code))
        self.status = status


def fail(code: int) -> OSError:
    """Return the ``OSError`` an ioctl raises for ``code`` (a positive errno)."""
    return DriverError(code)


async def lost_port_write() -> NoReturn:
    """A port write of a driver whose boot a VM reset ended: it reaches no device.

    The reset cancelled the driver's own work (ISR, timers), which ends at the checkpoint;
    a session's request fails with ENODEV, as every call of a lost boot does. Check the
    driver's ``lost`` right before the write, with no checkpoint between.
    """
    await trio.lowlevel.checkpoint()
    raise fail(errno.ENODEV)


def fail_status(rc: int) -> OSError:
    """Return the ``OSError`` mainline raises for the host's failing status ``rc``."""
    return DriverError(status_to_errno(rc), rc)


def check_sizes(kbuf: bytearray, size_in: int, size_out: int) -> None:
    """``vbg_ioctl_chk``: the header's sizes must be exactly these, else EINVAL."""
    if L.IoctlHeader.size_in.get(kbuf) != size_in or L.IoctlHeader.size_out.get(kbuf) != size_out:
        raise fail(errno.EINVAL)


class KernelMutex:
    """A sleeping lock that, like the kernel's ``mutex_lock``, sleeps only when contended.

    An uncontended lock is taken without a trio schedule point: the ioctl entry already had
    its one. Waiters are served in order: the holder hands the lock straight to the first
    waiter, so a free lock never has waiters and is never jumped. It has no owner: a task
    taking it again while it holds it sleeps for good, as ``mutex_lock`` would.

    Attributes:
        locked: whether some task holds the lock (a free lock has no waiters); read it,
            never set it. A plain attribute: every HGCM call reads it, where a property
            call would cost more than the test.
    """

    __slots__ = ("_waiters", "locked")

    def __init__(self) -> None:
        self.locked = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        if self.locked:
            await self._waiters.park()  # woken as the new holder
        else:
            self.locked = True

    async def __aexit__(self, *exc_info: object) -> None:
        if self._waiters:
            self._waiters.unpark()
        else:
            self.locked = False


def copy_in(buf: bytearray, size_in: int, size: int) -> bytearray:
    """The kernel's copy of an ioctl buffer: the ``size_in`` bytes the caller passed,
    zero-padded to ``size`` (the larger of its two sizes)."""
    kbuf = buf[:size_in]  # a copy
    if size > size_in:
        kbuf += bytes(size - size_in)
    return kbuf


def copy_out(kbuf: bytearray, buf: bytearray) -> None:
    """Copy the header's ``size_out`` bytes of the kernel's buffer back (EFAULT if the
    caller's buffer is shorter), in one copy."""
    count = H.IOCTL_SIZE_OUT.unpack_from(kbuf, H.IOCTL_SIZE_OUT_AT)[0]
    if count > len(kbuf):  # noqa: PLR1730 - min() parses its arguments
        count = len(kbuf)
    if len(buf) < count:
        raise fail(errno.EFAULT)
    buf[:count] = kbuf if count == len(kbuf) else memoryview(kbuf)[:count]
