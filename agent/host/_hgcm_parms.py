"""HGCM call parameters as the host reads them from a VMMDev request and writes them back.

The host understands what the Linux driver sends: 32/64-bit values, page lists (type 10,
whose list sits inside the request at ``page_list.offset`` and names guest-physical pages),
and linear-address parameters of size 0 (the driver leaves empty buffers as LINADDR*).
Non-empty linear, physical and kernel addresses would need the guest's page tables; the
simulated host refuses them with VERR_INVALID_PARAMETER.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from agent.host.hgcm_service import HostBuffer, HostParm, HostU32, HostU64
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    PAGE_SIZE,
    HgcmParmType,
    PageListDirection,
)

if TYPE_CHECKING:
    from agent.host.memory import GuestMemory

CALL_PARMS_OFFSET: Final = L.HgcmCallRequest.size
"""Parameters of a VMMDev HGCM call start right after its 44-byte header."""
PAGE_LIST_HEADER_SIZE: Final = 8
PAGE_ADDRESS_SIZE: Final = 8
_PAGE_LIST_HEADER: Final = L.run(
    L.HgcmPageList.flags, L.HgcmPageList.offset_first_page, L.HgcmPageList.page_count
)
_LINADDR_TYPES: Final = {
    HgcmParmType.LINADDR: (True, True),
    HgcmParmType.LINADDR_IN: (True, False),
    HgcmParmType.LINADDR_OUT: (False, True),
}
"""Linear-address types and their (readable, writable) directions."""

ParmLayout = type[L.HgcmParameter64] | type[L.HgcmParameter32]


class ParmError(Exception):
    """A parameter the host cannot accept (answered with VERR_INVALID_PARAMETER)."""


@dataclass(slots=True)
class ParmSlot:
    """One parameter: where it sits in the request and what the service sees."""

    offset: int
    kind: HgcmParmType
    parm: HostParm
    pages: tuple[int, ...] = ()
    first_page_offset: int = 0


def parm_layout(request_type_is_64: bool) -> ParmLayout:
    """Return the parameter layout of HGCM_CALL64 (16 bytes) or HGCM_CALL32 (12 bytes)."""
    return L.HgcmParameter64 if request_type_is_64 else L.HgcmParameter32


def parse_parms(req: bytes | bytearray, memory: GuestMemory, layout: ParmLayout) -> list[ParmSlot]:
    """Read every parameter of the call in ``req``, gathering page-list data from memory.

    Raises:
        ParmError: an unsupported type, a page list outside the request, bad page addresses.
    """
    count = L.HgcmCallRequest.parm_count.get(req)
    return [
        _parse_one(req, offset, memory, layout)
        for offset in range(CALL_PARMS_OFFSET, CALL_PARMS_OFFSET + layout.size * count, layout.size)
    ]


def parms_end(req: bytes | bytearray, layout: ParmLayout) -> int:
    """Return where the parameter array of ``req`` ends."""
    return CALL_PARMS_OFFSET + layout.size * L.HgcmCallRequest.parm_count.get(req)


def _parse_one(
    req: bytes | bytearray, offset: int, memory: GuestMemory, layout: ParmLayout
) -> ParmSlot:
    raw_type = layout.type.get(req, offset)
    if raw_type == HgcmParmType.U32:
        return ParmSlot(offset, HgcmParmType.U32, HostU32(layout.value32.get(req, offset)))
    if raw_type == HgcmParmType.U64:
        return ParmSlot(offset, HgcmParmType.U64, HostU64(layout.value64.get(req, offset)))
    if raw_type in _LINADDR_TYPES and layout.pointer_size.get(req, offset) == 0:
        readable, writable = _LINADDR_TYPES[HgcmParmType(raw_type)]
        buffer = HostBuffer(bytearray(), readable=readable, writable=writable)
        return ParmSlot(offset, HgcmParmType(raw_type), buffer)
    if raw_type == HgcmParmType.PAGELIST:
        return _parse_page_list(req, offset, memory, layout)
    msg = f"parameter type {raw_type} is not supported by the simulated host"
    raise ParmError(msg)


def _parse_page_list(
    req: bytes | bytearray, offset: int, memory: GuestMemory, layout: ParmLayout
) -> ParmSlot:
    size = layout.page_list_size.get(req, offset)
    list_at = layout.page_list_offset.get(req, offset)
    if list_at + PAGE_LIST_HEADER_SIZE > len(req):
        msg = f"page list at {list_at} is outside the request"
        raise ParmError(msg)
    flags, first, count = _PAGE_LIST_HEADER.get(req, list_at)
    end = list_at + PAGE_LIST_HEADER_SIZE + PAGE_ADDRESS_SIZE * count
    if flags & ~PageListDirection.BOTH or first >= PAGE_SIZE or end > len(req):
        msg = f"bad page list at {list_at}: flags {flags:#x}, first {first}, {count} pages"
        raise ParmError(msg)
    pages: tuple[int, ...] = struct.unpack_from(f"<{count}Q", req, list_at + PAGE_LIST_HEADER_SIZE)
    if count * PAGE_SIZE - first < size or any(page % PAGE_SIZE for page in pages):
        msg = f"page list at {list_at} does not describe {size} bytes in whole pages"
        raise ParmError(msg)
    readable = bool(flags & PageListDirection.TO_HOST)
    writable = bool(flags & PageListDirection.FROM_HOST)
    data = _gather(memory, pages, first, size) if readable else bytearray(size)
    buffer = HostBuffer(data, readable=readable, writable=writable)
    return ParmSlot(offset, HgcmParmType.PAGELIST, buffer, pages, first)


def _spans(pages: tuple[int, ...], first: int, size: int) -> list[tuple[int, int, int]]:
    """Return ``(guest address, data offset, length)`` pieces covering ``size`` bytes."""
    spans = []
    done = 0
    for index, page in enumerate(pages):
        if done >= size:
            break
        start = first if index == 0 else 0
        length = min(size - done, PAGE_SIZE - start)
        spans.append((page + start, done, length))
        done += length
    return spans


def _gather(memory: GuestMemory, pages: tuple[int, ...], first: int, size: int) -> bytearray:
    data = bytearray(size)
    try:
        for address, at, length in _spans(pages, first, size):
            data[at : at + length] = memory.read(address, length)
    except OSError as exc:
        msg = f"page list names unreadable guest memory: {exc}"
        raise ParmError(msg) from exc
    return data


def write_back(
    req: bytearray, slots: list[ParmSlot], memory: GuestMemory, layout: ParmLayout
) -> None:
    """Store the service's results into ``req`` and the buffers' guest pages.

    Buffer sizes are clamped to the buffer the guest gave: the host never reports more bytes
    than the guest can receive.
    """
    for slot in slots:
        parm = slot.parm
        if isinstance(parm, HostU32):
            layout.value32.set(req, parm.value & 0xFFFFFFFF, slot.offset)
        elif isinstance(parm, HostU64):
            layout.value64.set(req, parm.value & 0xFFFFFFFFFFFFFFFF, slot.offset)
        else:
            returned = max(0, min(parm.size, len(parm.data)))
            layout.page_list_size.set(req, returned, slot.offset)
            if slot.kind == HgcmParmType.PAGELIST and parm.writable:
                _scatter(memory, slot, parm.data[:returned])


def _scatter(memory: GuestMemory, slot: ParmSlot, data: bytes | bytearray) -> None:
    try:
        for address, at, length in _spans(slot.pages, slot.first_page_offset, len(data)):
            memory.write(address, data[at : at + length])
    except OSError:
        return  # the guest freed the pages; the host's write goes nowhere
