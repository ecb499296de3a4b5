"""The page array of a balloon chunk: 256 guest-physical addresses, as CHANGE_MEMBALLOON carries.

The agent checks a chunk once, when it builds its :class:`ChunkPages`, and sends the same
bytes to inflate and to deflate it (a real host checks only the first address's alignment,
as the simulated one does). :func:`chunk_frames` never walks the 256 addresses in Python: the packed
array is read as one little-endian integer, where a single AND tests every address's
in-page offset bits and, those bits being clear, a single right shift by ``PAGE_SHIFT``
turns every 64-bit address into its page frame number (the bits a lane receives from its
neighbour are that neighbour's offset bits, all zero).
"""

from __future__ import annotations

import struct
from dataclasses import field
from typing import TYPE_CHECKING, Final

from agent.protocol.constants import BALLOON_CHUNK_PAGES, PAGE_SIZE
from agent.protocol.errors import LocalProtocolError
from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Sequence

PAGE_SHIFT: Final = PAGE_SIZE.bit_length() - 1
CHUNK_PAGES: Final = struct.Struct(f"<{BALLOON_CHUNK_PAGES}Q")
"""The 256 little-endian u64 page addresses of one chunk."""


def every_page(value: int) -> int:
    """``value`` in each of the 256 u64 lanes of a packed chunk read as one integer (a mask)."""
    return int.from_bytes(CHUNK_PAGES.pack(*[value] * BALLOON_CHUNK_PAGES), "little")


_OFFSET_BITS: Final = every_page(PAGE_SIZE - 1)
"""Every address's in-page offset bits."""
_ONE_PER_PAGE: Final = every_page(1)
_PAGE_OFFSETS: Final = int.from_bytes(
    CHUNK_PAGES.pack(*range(0, BALLOON_CHUNK_PAGES * PAGE_SIZE, PAGE_SIZE)), "little"
)
"""A packed chunk whose page ``i`` is ``i * PAGE_SIZE``, read as one integer."""
_FIRST: Final = struct.Struct("<Q")
"""The first page's address of a packed chunk."""
_CHUNK_BYTES: Final = BALLOON_CHUNK_PAGES * PAGE_SIZE
_NOT_DISTINCT: Final = f"a balloon chunk needs {BALLOON_CHUNK_PAGES} distinct pages"


def chunk_frames(packed: bytes | bytearray | memoryview) -> tuple[int, ...] | None:
    """Return the page frame numbers of a packed chunk in order (repeated ones stay), or
    None if an address is not page-aligned."""
    whole = int.from_bytes(packed, "little")
    if whole & _OFFSET_BITS:
        return None
    return CHUNK_PAGES.unpack((whole >> PAGE_SHIFT).to_bytes(CHUNK_PAGES.size, "little"))


def consecutive_pages(first: int) -> bytes:
    """Return the packed chunk of the 256 consecutive pages from address ``first`` on.

    Built as one integer: ``first`` in every lane plus each lane's offset.
    """
    return (first * _ONE_PER_PAGE + _PAGE_OFFSETS).to_bytes(CHUNK_PAGES.size, "little")


def aligned_chunk_index(packed: bytes | bytearray | memoryview) -> int | None:
    """Return ``i`` if a packed chunk names, in order, the 256 pages of the ``i``-th
    chunk-aligned MiB of the address space; None for any other array.

    One comparison with the array :func:`consecutive_pages` would build, so the chunks a
    kernel allocates fresh are recognised without unpacking their addresses.
    """
    if len(packed) != CHUNK_PAGES.size:
        return None
    first: int = _FIRST.unpack_from(packed)[0]
    if first % _CHUNK_BYTES:  # most arrays of scattered pages stop here, unconverted
        return None
    if int.from_bytes(packed, "little") != first * _ONE_PER_PAGE + _PAGE_OFFSETS:
        return None
    return first // _CHUNK_BYTES


@record
class ChunkPages:
    """One chunk's 256 distinct, non-zero, page-aligned addresses, checked and packed once.

    Raises:
        LocalProtocolError: ``packed`` is not such an array (the message names the page).
    """

    packed: bytes = field(repr=False)
    """The addresses as CHANGE_MEMBALLOON carries them."""

    def __post_init__(self) -> None:
        if len(self.packed) != CHUNK_PAGES.size:
            raise LocalProtocolError(_NOT_DISTINCT)
        frames = chunk_frames(self.packed)
        distinct = None if frames is None else set(frames)
        if distinct is None or 0 in distinct:
            index, address = next(
                (i, a) for i, a in enumerate(self.addresses) if a == 0 or a % PAGE_SIZE
            )
            msg = f"page {index} address {address:#x} is zero or not page-aligned"
            raise LocalProtocolError(msg)
        if len(distinct) != BALLOON_CHUNK_PAGES:
            raise LocalProtocolError(_NOT_DISTINCT)

    @classmethod
    def of(cls, addresses: Sequence[int]) -> ChunkPages:
        """Check and pack ``addresses``.

        Raises:
            LocalProtocolError: not 256 distinct, non-zero, page-aligned u64 addresses.
        """
        if len(addresses) != BALLOON_CHUNK_PAGES:
            raise LocalProtocolError(_NOT_DISTINCT)
        try:
            packed = CHUNK_PAGES.pack(*addresses)
        except struct.error as exc:
            bad = next((i for i, a in enumerate(addresses) if not 0 <= a < 1 << 64), None)
            msg = (
                "page addresses must be u64 integers"
                if bad is None
                else f"page {bad} address {addresses[bad]:#x} is not a u64"
            )
            raise LocalProtocolError(msg) from exc
        return cls(packed)

    @property
    def addresses(self) -> tuple[int, ...]:
        """The 256 addresses, in order."""
        return CHUNK_PAGES.unpack(self.packed)
