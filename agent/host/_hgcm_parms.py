"""HGCM call parameters as the host reads them from a VMMDev request and writes them back.

The host understands what the Linux driver sends: 32/64-bit values, page lists (type 10,
whose list sits inside the request at ``page_list.offset`` and names guest-physical pages),
and linear-address parameters of size 0 (the driver leaves empty buffers as LINADDR*).
Non-empty linear, physical and kernel addresses would need the guest's page tables; the
simulated host refuses them with VERR_INVALID_PARAMETER.

The parameter array is read in one unpack, as 32-bit words: a parameter (16 bytes in
HGCM_CALL64, 12 in HGCM_CALL32) is its ``type`` word and a union whose members all start at
the second word (``value32``; ``value64``, the second and third words; a pointer's or page
list's ``size``), with a page list's ``offset`` in the third word.
"""

from __future__ import annotations

import functools
import operator
import struct
from typing import TYPE_CHECKING, Final

from agent.host.hgcm_service import HostBuffer, HostParm, HostU32, HostU64
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    PAGE_SIZE,
    HgcmParmType,
    PageListDirection,
)
from agent.protocol.status import VERR_INVALID_FLAGS, VERR_INVALID_PARAMETER, VERR_NO_MEMORY

if TYPE_CHECKING:
    from agent.host.memory import GuestMemory, GuestRam

CALL_PARMS_OFFSET: Final = L.HgcmCallRequest.size
"""Parameters of a VMMDev HGCM call start right after its 44-byte header."""
PAGE_LIST_HEADER_SIZE: Final = 8
PAGE_ADDRESS_SIZE: Final = 8
WORD_SIZE: Final = 4
_VALUE_WORD: Final = L.HgcmParameter64.value32.offset // WORD_SIZE
"""``value32``, the low half of ``value64``, and a pointer's or page list's ``size``."""
_HIGH_WORD: Final = L.HgcmParameter64.page_list_offset.offset // WORD_SIZE
"""A page list's ``offset`` and the high half of ``value64``."""
_VALUE_AT: Final = L.HgcmParameter64.value32.offset
"""Where ``value32``, ``value64`` and a buffer's ``size`` start in either layout."""
_VALUES_AT: Final = CALL_PARMS_OFFSET + _VALUE_AT
"""The first parameter's value in the request: a parameter's is as many bytes further as
its words in the array (:func:`parse_parms`)."""
_U32: Final = L.HgcmParameter64.value32.codec
_U64: Final = L.HgcmParameter64.value64.codec
"""What :func:`write_back` packs at :data:`_VALUE_AT`, without a field's ``set`` per value."""
PAGE_LIST_INFO_SIZE: Final = PAGE_LIST_HEADER_SIZE + PAGE_ADDRESS_SIZE
"""``sizeof(HGCMPageListInfo)``: the header and the first page's address, which must fit."""
_PAGE_LIST_INFO: Final = L.page_list_codec(1)
"""That much: flags, first page offset, page count and the first page, in one unpack."""
MAX_HGCM_DATA_SIZE: Final = 128 << 20
"""``VMMDEV_MAX_HGCM_DATA_SIZE`` (128 MiB): the most bytes one buffer parameter may name, and
the most host memory one call may cost (VERR_NO_MEMORY beyond: see :func:`command_cost`)."""
CACHED_COMMAND_PARMS: Final = 6
CACHED_COMMAND_COST: Final = 504
"""A call of up to 6 parameters takes one cached command block (``VBOXHGCMCMDCACHED``)."""
COMMAND_COST: Final = 120
PARM_COST: Final = 40 + 24
"""A larger call costs the command (``VBOXHGCMCMD``) plus a guest and a host parameter each."""
_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
_U32_TYPE: Final = int(HgcmParmType.U32)
_U64_TYPE: Final = int(HgcmParmType.U64)
_PAGELIST_TYPE: Final = int(HgcmParmType.PAGELIST)
_BOTH: Final = int(PageListDirection.BOTH)
_TO_HOST: Final = int(PageListDirection.TO_HOST)
_FROM_HOST: Final = int(PageListDirection.FROM_HOST)
"""Enum members read once, as plain ints: an enum attribute lookup costs more than the
comparison, and a comparison of two exact ints is the interpreter's fast one."""
_DIRECTIONS: Final = frozenset({_TO_HOST, _FROM_HOST, _BOTH})
"""The valid direction flags of a page list (``VBOX_HGCM_F_PARM_ARE_VALID``)."""
_IN_PAGE: Final = PAGE_SIZE - 1
"""The mask of an address's offset in its page."""
_LINADDR_TYPES: Final = {
    HgcmParmType.LINADDR: (True, True),
    HgcmParmType.LINADDR_IN: (True, False),
    HgcmParmType.LINADDR_OUT: (False, True),
}
"""Linear-address types and their (readable, writable) directions."""

MAX_HGCM_PARMS: Final = 32
"""``VMMDEV_MAX_HGCM_PARMS`` of the host (older hosts allowed 1024): more is refused."""
_WORD_ARRAYS: Final = tuple(
    struct.Struct(f"<{words}I")
    for words in range(L.HgcmParameter64.size // WORD_SIZE * MAX_HGCM_PARMS + 1)
)
"""Codecs of parameter arrays by their words: any array the host parses has one here (an
index costs less than a cache look-up)."""


class ParmError(Exception):
    """A parameter the host cannot accept; ``rc`` is what the host answers.

    VERR_INVALID_PARAMETER unless said otherwise (a page list's direction flags that are
    not 1, 2 or 3 are VERR_INVALID_FLAGS, as ``VBOX_HGCM_F_PARM_ARE_VALID`` fails them).
    """

    def __init__(self, message: str, rc: int = VERR_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.rc = rc


ValueSlot = tuple[int, HostU32 | HostU64]
"""A value parameter and where its value lies in the request (from the request's start)."""
PageOutput = tuple[HostBuffer, tuple[int, ...], int]
"""A page list the host writes back to (direction FROM_HOST): its buffer, its guest-physical
pages and the offset into the first."""
ParsedParms = tuple[list[HostParm], list[ValueSlot], list[PageOutput]]
"""What :func:`parse_parms` finds: the parameters, and what :func:`write_back` writes."""


def parse_parms(
    req: bytes | bytearray, memory: GuestRam, parm_size: int, count: int
) -> ParsedParms:
    """Read the ``count`` parameters of ``parm_size`` bytes each (16 in HGCM_CALL64, 12 in
    HGCM_CALL32) of the call in ``req``, gathering page-list data.

    The caller has checked that the array lies within ``req`` (a call whose array ends past
    the request is refused before its parameters are read).

    Returns:
        the parameters as the service sees them, and for :func:`write_back` where each
        value parameter's value lies and each page list the host writes to.

    Raises:
        ParmError: an unsupported type, a page list outside the request, bad page addresses,
            or buffers that cost the host more than it allows one call.
    """
    per_parm = parm_size // WORD_SIZE
    end = per_parm * count
    extra = CALL_PARMS_OFFSET + parm_size * count  # where the array ends
    words = _WORD_ARRAYS[end].unpack_from(req, CALL_PARMS_OFFSET)
    params: list[HostParm] = []
    values: list[ValueSlot] = []
    outputs: list[PageOutput] = []
    cost = CACHED_COMMAND_COST if count <= CACHED_COMMAND_PARMS else command_cost(count)
    for at in range(0, end, per_parm):
        raw_type = words[at]
        value = words[at + _VALUE_WORD]
        parm: HostParm
        if raw_type == _PAGELIST_TYPE:
            # Positional arguments: a call with keywords is not specialised.
            buffer, pages, first = _parse_page_list(
                req, memory, value, words[at + _HIGH_WORD], extra
            )
            if buffer.writable:
                outputs.append((buffer, pages, first))
            cost += value if len(pages) == 1 else value + PAGE_ADDRESS_SIZE * len(pages)
            parm = buffer
        elif raw_type == _U32_TYPE:
            parm = HostU32(value)
            values.append((_VALUES_AT + at * WORD_SIZE, parm))
        elif raw_type == _U64_TYPE:
            parm = HostU64(value | words[at + _HIGH_WORD] << 32)
            values.append((_VALUES_AT + at * WORD_SIZE, parm))
        elif raw_type in _LINADDR_TYPES and value == 0:
            readable, writable = _LINADDR_TYPES[raw_type]
            parm = HostBuffer(bytearray(), readable, writable, 0)
        else:
            msg = f"parameter type {raw_type} is not supported by the simulated host"
            raise ParmError(msg)
        params.append(parm)
    if cost > MAX_HGCM_DATA_SIZE:
        msg = f"the call would cost the host {cost} bytes, over {MAX_HGCM_DATA_SIZE}"
        raise ParmError(msg, VERR_NO_MEMORY)
    return params, values, outputs


def command_cost(count: int) -> int:
    """Host memory a call of ``count`` parameters costs before its buffers.

    VMMDev charges each call's allocations against ``VMMDEV_MAX_HGCM_DATA_SIZE``: the
    command, then a page-address array for each page list of several pages, then each
    buffer's bytes; the allocation that would pass the limit fails with VERR_NO_MEMORY
    (after every parameter was checked, so other refusals come first).
    """
    if count <= CACHED_COMMAND_PARMS:
        return CACHED_COMMAND_COST
    return COMMAND_COST + PARM_COST * count


def _parse_page_list(
    req: bytes | bytearray,
    memory: GuestRam,
    size: int,
    list_at: int,
    extra: int,
) -> tuple[HostBuffer, tuple[int, ...], int]:
    """Check a page list as ``vmmdevR3HgcmCallFetchGuestParms`` does, in its order, then read it.

    ``list_at`` is where the list lies in ``req``, ``extra`` where the parameter array ends.
    Returns the buffer, the list's pages and the offset into the first.

    The simulated host is stricter than VMMDev in one respect: it also refuses a list whose
    pages do not hold ``size`` bytes or name an unaligned page, where VMMDev would read past
    the listed pages or at odd addresses.
    """
    if size > MAX_HGCM_DATA_SIZE:
        msg = f"page list of {size} bytes is over {MAX_HGCM_DATA_SIZE}"
        raise ParmError(msg)
    if list_at < extra or list_at + PAGE_LIST_INFO_SIZE > len(req):
        msg = f"page list at {list_at} is not between the parameters' end and the request's"
        raise ParmError(msg)
    flags, first, count, first_page = _PAGE_LIST_INFO.unpack_from(req, list_at)
    if count != 1:  # one page always fits: its address was read with the header
        room = 1 + (len(req) - list_at - PAGE_LIST_INFO_SIZE) // PAGE_ADDRESS_SIZE
        if not 0 < count <= room:
            msg = f"page list at {list_at}: {count} pages, room for {room}"
            raise ParmError(msg)
    if flags not in _DIRECTIONS:
        msg = f"page list at {list_at}: direction flags {flags:#x}"
        raise ParmError(msg, VERR_INVALID_FLAGS)
    if first >= PAGE_SIZE:
        msg = f"page list at {list_at}: first page offset {first}"
        raise ParmError(msg)
    if count == 1:  # most buffers: the one page was read with the header
        pages: tuple[int, ...] = (first_page,)
        unaligned = first_page & _IN_PAGE
    else:
        pages = L.page_list_codec(count).unpack_from(req, list_at)[3:]
        # An address with a bit below the page size makes the OR of them all unaligned too.
        unaligned = functools.reduce(operator.or_, pages) & _IN_PAGE
    if count * PAGE_SIZE - first < size or unaligned:
        msg = f"page list at {list_at} does not describe {size} bytes in whole pages"
        raise ParmError(msg)
    if flags == _FROM_HOST:  # not readable: the host's buffer starts zeroed
        return HostBuffer(bytearray(size), False, True, size), pages, first
    if first + size <= PAGE_SIZE and (mapping := memory.lock(first_page + first, size)) is not None:
        # Most strings lie within the first page: copied from its mapping, one copy where
        # a read makes two (a bytearray's slice is a copy, a memoryview's is not).
        view, at = mapping
        piece = view[at : at + size]
        data = piece if type(piece) is bytearray else bytearray(piece)
    else:
        data = _gather(memory, pages, first, size)
    return HostBuffer(data, True, flags != _TO_HOST, size), pages, first


def _spans(pages: tuple[int, ...], first: int, size: int) -> list[tuple[int, int, int]]:
    """Return ``(guest address, data offset, length)`` pieces covering ``size`` bytes.

    Pages that follow each other in guest-physical memory make one piece.
    """
    if first + size <= PAGE_SIZE:
        return [(pages[0] + first, 0, size)] if size else []
    needed = -(-(first + size) // PAGE_SIZE)
    start = pages[0]
    if pages[:needed] == tuple(range(start, start + needed * PAGE_SIZE, PAGE_SIZE)):
        return [(start + first, 0, size)]
    spans = []
    done = 0
    for index, page in enumerate(pages):
        if done >= size:
            break
        offset = first if index == 0 else 0
        length = min(size - done, PAGE_SIZE - offset)
        spans.append((page + offset, done, length))
        done += length
    return spans


def _gather(memory: GuestRam, pages: tuple[int, ...], first: int, size: int) -> bytearray:
    """The ``size`` bytes a readable page list names, read piece by piece (a copy, as VMMDev
    reads them); :func:`_parse_page_list` copies those it finds mapped in one page itself."""
    spans = _spans(pages, first, size)
    try:
        if len(spans) == 1:
            return bytearray(memory.read(spans[0][0], size))
        data = bytearray(size)
        for address, at, length in spans:
            data[at : at + length] = memory.read(address, length)
    except OSError as exc:
        msg = f"page list names unreadable guest memory: {exc}"
        raise ParmError(msg) from exc
    return data


def write_back(
    req: bytearray | memoryview,
    values: list[ValueSlot],
    outputs: list[PageOutput],
    memory: GuestMemory,
    base: int = 0,
) -> None:
    """Store the service's values into the request at ``base`` of ``req`` and its output
    into the pages of the page lists it writes to.

    As ``vmmdevR3HgcmCompleteCallRequest`` does for page lists and linear buffers: a buffer's
    size in the request stays as the guest sent it, and the pages get the first
    ``min(size, len(data))`` bytes the service left (never more than the guest gave).
    """
    for at, parm in values:
        # ``type(parm) is``: the parameter classes are final, and a failing ``isinstance``
        # also looks up the object's ``__class__``.
        if type(parm) is HostU32:
            _U32.pack_into(req, base + at, parm.value & _U32_MAX)
        else:
            _U64.pack_into(req, base + at, parm.value & _U64_MAX)
    for buffer, pages, first in outputs:
        data, size = buffer.data, buffer.size
        if size < len(data):
            if size <= 0:
                continue
            data = data[:size]
        elif not data:
            continue
        if first + len(data) > PAGE_SIZE:
            _scatter(memory, pages, first, data)
            continue
        try:  # within the first page, as most outputs are
            memory.write(pages[0] + first, data)
        except OSError:
            continue  # the guest freed the pages; the write goes nowhere


def _scatter(
    memory: GuestMemory, pages: tuple[int, ...], first: int, data: bytes | bytearray
) -> None:
    try:
        for address, at, length in _spans(pages, first, len(data)):
            memory.write(address, data[at : at + length])
    except OSError:
        return  # the guest freed the pages; the write goes nowhere
