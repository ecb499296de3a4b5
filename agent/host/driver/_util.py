"""Small helpers shared by the driver modules."""

from __future__ import annotations

import errno
import os
from typing import Final

from agent.protocol import layouts as L  # noqa: N812 - the layout table

U32_MAX: Final = 0xFFFFFFFF


def fail(code: int) -> OSError:
    """Return the ``OSError`` an ioctl raises for ``code`` (a positive errno)."""
    return OSError(code, os.strerror(code))


def check_sizes(kbuf: bytearray, size_in: int, size_out: int) -> None:
    """``vbg_ioctl_chk``: the header's sizes must be exactly these, else EINVAL."""
    if L.IoctlHeader.size_in.get(kbuf) != size_in or L.IoctlHeader.size_out.get(kbuf) != size_out:
        raise fail(errno.EINVAL)
