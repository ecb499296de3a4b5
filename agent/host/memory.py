"""Guest memory as the simulated driver and host see it: addresses that map to byte arrays.

``GuestMemory`` is what the kernel reaches through ``copy_from_user``/``copy_to_user`` (user
memory of one ioctl) and what the host reaches through guest-physical reads and writes (request
buffers, HGCM bounce buffers). ``DictMemory`` maps synthetic addresses onto ``bytearray``
objects *by reference*, so a write through the memory lands in the caller's own buffer.
"""

from __future__ import annotations

import bisect
import errno
from typing import TYPE_CHECKING, Final, Protocol

from agent.protocol.constants import PAGE_SIZE

if TYPE_CHECKING:
    from collections.abc import Iterable

USER_BASE: Final = 0x7F00_0000_0000
"""Where synthetic user addresses start (a typical x86-64 mmap area)."""
USER_LIMIT: Final = 0x7FFF_FFFF_F000
GUARD_BYTES: Final = PAGE_SIZE
"""Unmapped gap after each region, so an overrun faults instead of reading a neighbour."""


class GuestMemory(Protocol):
    """Memory reachable by address; unknown or out-of-range addresses raise ``EFAULT``."""

    def read(self, address: int, size: int) -> bytes:
        """Return ``size`` bytes at ``address``."""
        ...

    def write(self, address: int, data: bytes | bytearray) -> None:
        """Store ``data`` at ``address``."""
        ...


Mapping = tuple[bytearray | memoryview, int]
"""Guest memory reached directly: the host's view of it and where the mapped bytes start."""


class GuestRam(GuestMemory, Protocol):
    """Guest-physical memory as the VMMDev reaches it: read, written, or mapped in place."""

    def lock(self, address: int, size: int) -> Mapping | None:
        """``PDMDevHlpPhysGCPhys2CCPtr``: the memory holding ``size`` bytes at ``address``,
        to read and write in place; None when no mapping holds them all."""
        ...


_WINDOW_BITS: Final = 32
USER_WINDOW: Final = 1 << _WINDOW_BITS
"""The address space each user buffer of one ioctl gets (far more than any buffer)."""
_IN_WINDOW: Final = USER_WINDOW - 1
"""The mask of an offset from ``USER_BASE`` to its place in its window."""
_USER_WINDOWS: Final = (USER_LIMIT - USER_BASE) // USER_WINDOW
"""How many windows the user range holds."""
_MAX_USER_BUFFER: Final = USER_WINDOW - GUARD_BYTES
"""The largest buffer a window holds, with its guard."""
_IN_PAGE: Final = PAGE_SIZE - 1
_PAGE_START: Final = ~_IN_PAGE
"""Masks of an address's offset in its page and of its page's start."""


class IoctlMemory:
    """The user memory one ioctl points to: buffer ``i`` starts the ``i``-th window of
    :data:`USER_WINDOW` bytes from :data:`USER_BASE`; the rest of each window is unmapped.

    Buffers are mapped by reference, so the driver's writes land in the caller's bytearray.
    """

    __slots__ = ("_buffers",)

    def __init__(self, buffers: list[bytearray] | None = None) -> None:
        """Map ``buffers`` (none by default), all at once: buffer ``i`` at
        ``USER_BASE + i * USER_WINDOW``.

        Raises:
            OSError: ``ENOMEM`` when a buffer or the number of buffers does not fit.
        """
        if buffers is None:
            buffers = []
        elif len(buffers) > _USER_WINDOWS:
            raise _exhausted()
        else:
            for data in buffers:
                if len(data) > _MAX_USER_BUFFER:
                    raise _exhausted()
        self._buffers = buffers

    def read(self, address: int, size: int) -> bytes:
        """Return ``size`` bytes at ``address``; ``EFAULT`` outside a mapped buffer."""
        if size == 0:
            return b""
        relative = address - USER_BASE
        index = relative >> _WINDOW_BITS  # divmod, in two cheaper steps
        offset = relative & _IN_WINDOW
        if not 0 <= index < len(self._buffers) or size < 0:
            raise _fault(address, size)
        data = self._buffers[index]
        if offset + size > len(data):
            raise _fault(address, size)
        return bytes(data) if size == len(data) else bytes(data[offset : offset + size])

    def write(self, address: int, data: bytes | bytearray) -> None:
        """Store ``data`` at ``address`` in place; ``EFAULT`` outside a mapped buffer."""
        size = len(data)
        if not size:
            return
        relative = address - USER_BASE
        index = relative >> _WINDOW_BITS
        offset = relative & _IN_WINDOW
        if not 0 <= index < len(self._buffers):
            raise _fault(address, size)
        region = self._buffers[index]
        if offset + size > len(region):
            raise _fault(address, size)
        region[offset : offset + size] = data


def _exhausted() -> OSError:
    return OSError(errno.ENOMEM, "simulated user address space exhausted")


def _fault(address: int, size: int) -> OSError:
    return OSError(errno.EFAULT, f"bad address {address:#x} (+{size})")


class DictMemory:
    """Synthetic address space: page-aligned regions, each backed by a caller's bytearray.

    Addresses are handed out from ``[base, limit)``; freed space is reused. A region starts
    ``offset`` bytes into a page when asked (HGCM's ``offset_first_page``). The regions are
    kept by start address in a dict: a request or a buffer is mostly reached from its
    start, and mapping past every region (the usual case) and unmapping are a dict store
    and a dict removal. The sorted list of starts, which finds the region an address lies
    in by bisection and the room between regions, is built when first needed after a
    change (the requests and bounce buffers of every call come and go without one).
    """

    __slots__ = ("_base", "_by_start", "_limit", "_next", "_sorted", "_top")

    def __init__(self, *, base: int = USER_BASE, limit: int = USER_LIMIT) -> None:
        if base % PAGE_SIZE or limit <= base:
            msg = f"bad memory range [{base:#x}, {limit:#x})"
            raise ValueError(msg)
        self._base = base
        self._limit = limit
        self._next = base
        """Where the next region goes if it fits there (page-aligned)."""
        self._by_start: dict[int, bytearray] = {}
        """The regions by start address."""
        self._sorted: list[int] | None = []
        """The regions' start addresses, sorted; None once a map or unmap outdated it."""
        self._top = base
        """At or above where the guard after the highest region ends: exact when set by a
        map, left as it was by an unmap (see :meth:`_exact_top`)."""

    def map(self, data: bytearray, *, offset: int = 0) -> int:
        """Give ``data`` an address (``offset`` bytes into its first page) and return it.

        Raises:
            OSError: ``ENOMEM`` when the range has no room left.
        """
        start = self._next
        top = start + len(data) + GUARD_BYTES
        if offset or not data or start < self._top or top > self._limit:
            return self._map_anywhere(data, offset)
        # The usual case, in few steps (every request and bounce buffer is mapped): a
        # non-empty region at a page's start, above every other one, with room.
        self._by_start[start] = data
        self._sorted = None
        self._top = top
        self._next = (top + _IN_PAGE) & _PAGE_START
        return start

    def _map_anywhere(self, data: bytearray, offset: int) -> int:
        """:meth:`map`, in every case."""
        if not 0 <= offset < PAGE_SIZE:
            msg = f"offset {offset} is not within a page"
            raise ValueError(msg)
        size = len(data)
        need = offset + (size or 1) + GUARD_BYTES
        start = self._next
        if start < self._exact_top() or start + need > self._limit:
            start = self._find_room(need)
        address = start + offset
        self._by_start[address] = data
        self._sorted = None
        self._top = max(self._top, address + size + GUARD_BYTES)
        self._next = _page_align(start + need)
        return address

    def _exact_top(self) -> int:
        """Where the guard after the highest region ends (the base when nothing is
        mapped), stored as :attr:`_top` again: unmaps leave that too high."""
        starts = self._starts()
        top = self._base
        if starts:
            top = starts[-1] + len(self._by_start[starts[-1]]) + GUARD_BYTES
        self._top = top
        return top

    def unmap(self, address: int) -> None:
        """Forget the region that starts at ``address`` (no-op if there is none)."""
        if self._by_start.pop(address, None) is not None:
            self._sorted = None

    def unmap_all(self, addresses: Iterable[int]) -> None:
        """:meth:`unmap` each of ``addresses``, in one call (a call's buffers go together)."""
        by_start = self._by_start
        for address in addresses:
            by_start.pop(address, None)
        self._sorted = None  # built again when needed, whether or not a region went

    def read(self, address: int, size: int) -> bytes:
        """Return ``size`` bytes at ``address``; ``EFAULT`` outside a mapped region."""
        data = self._by_start.get(address)
        if data is not None and 0 < size <= len(data):  # from a region's start, within it
            return bytes(data) if size == len(data) else bytes(data[:size])
        if size == 0:
            return b""
        data, offset = self._region_of(address, size)
        return bytes(data[offset : offset + size])

    def write(self, address: int, data: bytes | bytearray) -> None:
        """Store ``data`` at ``address`` in place; ``EFAULT`` outside a mapped region."""
        size = len(data)
        region = self._by_start.get(address)
        if region is not None and 0 < size <= len(region):  # from a region's start, within it
            region[:size] = data
            return
        if not size:
            return
        region, offset = self._region_of(address, size)
        region[offset : offset + size] = data

    def lock(self, address: int, size: int) -> Mapping | None:
        """The region holding ``size`` bytes at ``address`` and their offset in it, or None.

        The mapping is the region's bytearray: once the guest unmaps the region, writes
        through it land in that orphaned buffer, whereas a real host's lock pins the page
        and writes whatever the guest has since put there (only a buggy guest frees a
        request whose call is pending).
        """
        data = self._by_start.get(address)
        if data is not None and 0 <= size <= len(data):
            return data, 0
        try:
            return self._region_of(address, size)
        except OSError:
            return None

    def __len__(self) -> int:
        return len(self._by_start)

    def _starts(self) -> list[int]:
        """The regions' start addresses, sorted (built again after a change)."""
        starts = self._sorted
        if starts is None:
            starts = self._sorted = sorted(self._by_start)
        return starts

    def _region_of(self, address: int, size: int) -> tuple[bytearray, int]:
        """The region holding ``size`` bytes at ``address`` and their offset in it; EFAULT
        when no region holds them all."""
        starts = self._starts()
        index = bisect.bisect_right(starts, address) - 1
        if index < 0 or size < 0:
            raise _fault(address, size)
        start = starts[index]
        data = self._by_start[start]
        if address - start + size > len(data):
            raise _fault(address, size)
        return data, address - start

    def _find_room(self, need: int) -> int:
        """The first page-aligned start at or after ``_next`` (wrapping once) with room."""
        candidate = _page_align(self._next)
        wrapped = False
        while True:
            if candidate + need > self._limit:
                if wrapped:
                    raise OSError(errno.ENOMEM, "simulated address space exhausted")
                candidate, wrapped = self._base, True
                continue
            clash = self._first_region_in(candidate, candidate + need)
            if clash is None:
                return candidate
            candidate = _page_align(clash + len(self._by_start[clash]) + GUARD_BYTES)

    def _first_region_in(self, low: int, high: int) -> int | None:
        """The start of the first region (with its guard) overlapping ``[low, high)``."""
        starts = self._starts()
        index = max(bisect.bisect_right(starts, low) - 1, 0)
        for at in range(index, len(starts)):
            start = starts[at]
            if start >= high:
                return None
            if start + len(self._by_start[start]) + GUARD_BYTES > low:
                return start
        return None


def _page_align(address: int) -> int:
    return -(-address // PAGE_SIZE) * PAGE_SIZE
