"""Header members the simulated host touches on every request, as a struct and an offset.

Each ``NAME`` / ``NAME_AT`` pair is one member's ``struct`` and absolute offset, for one
``unpack_from`` or ``pack_into`` call: every ioctl and request passes through the driver
models, the VMMDev port handler and the HGCM host, where a field's ``get``/``set`` would add
a Python call per member. They are taken from the layouts, so they cannot disagree with them.

Modules name them through this module (``from agent.host import _header_fields as H``, then
``H.IOCTL_RC.pack_into(...)``), not by importing each name: CPython 3.11 compiles
``NAME.method(...)`` for a module-level ``NAME`` bound by an import as a plain attribute
load, expecting a module, and for a ``struct`` method that load cannot be specialised: it
builds a bound method on every call.
"""

from __future__ import annotations

import struct
from typing import Final

from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import RequestType


def picked(*fields: L.IntField) -> struct.Struct:
    """``fields``, in offset order, in one unpack from the first's offset: the members
    between them are skipped as padding, so no value is built for them.

    Raises:
        ValueError: a member overlaps the one before it.
    """
    parts = []
    end = fields[0].offset
    for field in fields:
        if field.offset < end:
            msg = f"{field.c_path} at {field.offset} overlaps the member before it"
            raise ValueError(msg)
        gap = field.offset - end
        parts.append(f"{gap}x" * bool(gap) + field.codec.format.lstrip("<"))
        end = field.offset + field.codec.size
    return struct.Struct("<" + "".join(parts))


IOCTL_HEADER: Final = L.IoctlHeader.whole().codec
"""The whole ioctl header (at offset 0)."""
IOCTL_CHECKED: Final = picked(
    L.IoctlHeader.size_in, L.IoctlHeader.version, L.IoctlHeader.type, L.IoctlHeader.size_out
)
"""What the driver's entry checks in the ioctl header (at offset 0): ``size_in``, ``version``,
``type`` and ``size_out``."""
IOCTL_RC: Final = L.IoctlHeader.rc.codec
IOCTL_RC_AT: Final = L.IoctlHeader.rc.offset
IOCTL_SIZE_OUT: Final = L.IoctlHeader.size_out.codec
IOCTL_SIZE_OUT_AT: Final = L.IoctlHeader.size_out.offset
REQUEST_HEADER: Final = L.RequestHeader.whole().codec
"""The whole VMMDev request header (at offset 0)."""
REQUEST_RC: Final = L.RequestHeader.rc.codec
REQUEST_RC_AT: Final = L.RequestHeader.rc.offset
REQUEST_TYPE: Final = L.RequestHeader.request_type.codec
REQUEST_TYPE_AT: Final = L.RequestHeader.request_type.offset
HGCM_FLAGS: Final = L.HgcmRequestHeader.flags.codec
HGCM_FLAGS_AT: Final = L.HgcmRequestHeader.flags.offset
HGCM_RESULT: Final = L.HgcmRequestHeader.result.codec
HGCM_RESULT_AT: Final = L.HgcmRequestHeader.result.offset
HGCM_CALL64: Final = int(RequestType.HGCM_CALL64)
"""Read once, as a plain int: an enum attribute lookup costs more than the comparison it
feeds."""
