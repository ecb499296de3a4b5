"""Balloon chunks the agent allocates itself: 1 MiB of locked anonymous memory each.

A chunk is its own mapping (``mmap``), kept out of children (``MADV_DONTFORK``) and out of
transparent huge pages (``MADV_NOHUGEPAGE``), and locked (``mlock``, which also faults every
page in), as Oracle's ``CHANGE_BALLOON`` and the passthrough ``CHANGE_MEMBALLOON`` expect.
Nothing in the agent ever reads or writes a chunk's memory; it is unmapped only after the
host gave it back.

``ChunkAllocator`` is the seam: :class:`MmapAllocator` is the real one; tests may inject
their own. ``physical_pages`` turns a chunk into the guest-physical addresses of its 256
pages (``/proc/self/pagemap`` on a real guest), checked and packed for CHANGE_MEMBALLOON.

Those addresses are read once, so they must stay the pages' frames while the host holds
them. ``mlock`` keeps a page in memory, not in its frame: Linux migrates locked pages. Where
the agent sends frames itself (passthrough), :func:`pages_may_move` names a kernel setting
under which that happens (compaction of locked pages, NUMA balancing), and khugepaged, which
copies small pages into a new huge page, is kept away by ``MADV_NOHUGEPAGE``. What no
setting or flag stops (memory offlining, CMA allocations, another root process's
``migrate_pages``) is documented in ``docs/architecture.md``. Oracle's driver pins the
pages it is handed (``get_user_pages``), which keeps them where they are.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import weakref
from pathlib import Path
from typing import Final, Protocol

from agent.protocol import BALLOON_CHUNK_SIZE, ChunkPages, LocalProtocolError
from agent.protocol.balloon_pages import CHUNK_PAGES, PAGE_SHIFT, every_page
from agent.records import record

PAGEMAP_PATH: Final = "/proc/self/pagemap"
STATUS_PATH: Final = "/proc/self/status"
PROC_SYS: Final = Path("/proc/sys")
CAP_IPC_LOCK: Final = 14
"""The capability bit that lifts ``RLIMIT_MEMLOCK`` (``linux/capability.h``)."""
_PAGEMAP_ENTRY_BYTES: Final = 8
_PRESENT: Final = every_page(1 << 63)
"""Bit 63 of every pagemap entry: the page is present."""
_FRAME_NUMBERS: Final = every_page((1 << 55) - 1)
"""Bits 0-54 of every entry: the page frame number (0 when the reader lacks CAP_SYS_ADMIN)."""
_BEYOND_64_BITS: Final = every_page(((1 << 55) - 1) >> (64 - PAGE_SHIFT) << (64 - PAGE_SHIFT))
"""Frame-number bits whose address would not fit in 64 bits (none on any real machine)."""
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
_PROT_READ_WRITE: Final = mmap.PROT_READ | mmap.PROT_WRITE


class ChunkError(OSError):
    """A chunk could not be allocated, locked or released (``errno`` says why)."""

    def __str__(self) -> str:
        """The message alone: it names the call and the OS's reason (no ``[Errno 12]``, nor
        ``[Errno 0]`` for a check that made no call)."""
        return self.strerror or super().__str__()


@record
class Chunk:
    """One 1 MiB chunk: its address in this process and, where the driver needs them, its
    pages' guest-physical addresses (checked and packed once, sent to inflate and deflate)."""

    address: int
    pages: ChunkPages | None = None


class ChunkAllocator(Protocol):
    """Gives out and takes back 1 MiB chunks of this process's memory."""

    def allocate(self) -> int:
        """Map, lock and fault in a chunk; return its address.

        Raises:
            ChunkError: no memory, or the lock was refused (``RLIMIT_MEMLOCK``).
        """
        ...

    def release(self, address: int) -> None:
        """Unlock and unmap a chunk the host does not hold."""
        ...

    def physical_pages(self, address: int) -> ChunkPages:
        """Return the guest-physical addresses of the chunk's 256 pages, checked and packed.

        Raises:
            ChunkError: the addresses cannot be read, or are not 256 distinct page addresses.
        """
        ...


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already runs on
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    for name in ("munmap", "mlock", "munlock"):
        function = getattr(libc, name)
        function.restype = ctypes.c_int
        function.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def _error(call: str) -> ChunkError:
    code = ctypes.get_errno()
    return ChunkError(
        code, f"{call} of a {BALLOON_CHUNK_SIZE >> 20} MiB chunk failed: {os.strerror(code)}"
    )


def _mlock_error() -> ChunkError:
    """``mlock``'s failure, naming ``RLIMIT_MEMLOCK`` where that is what refused it (ENOMEM
    past the limit, EPERM with a limit of 0): it read as the guest out of memory."""
    code = ctypes.get_errno()
    limit = memlock_limit()
    if code not in (errno.ENOMEM, errno.EPERM) or limit is None or has_ipc_lock():
        return _error("mlock")
    return ChunkError(
        code,
        f"mlock of a {BALLOON_CHUNK_SIZE >> 20} MiB chunk failed: RLIMIT_MEMLOCK of"
        f" {limit / (1 << 20):g} MiB reached (LimitMEMLOCK=infinity or CAP_IPC_LOCK lifts it)",
    )


class MmapAllocator:
    """Real chunks: ``mmap`` + ``MADV_DONTFORK`` + ``MADV_NOHUGEPAGE`` + ``mlock``; page
    frames from pagemap."""

    __slots__ = ("__weakref__", "_libc", "_pagemap_fd", "_pagemap_path")

    def __init__(self, *, pagemap_path: str = PAGEMAP_PATH) -> None:
        self._libc = _libc()
        self._pagemap_path = pagemap_path
        self._pagemap_fd: int | None = None

    def allocate(self) -> int:
        """Map, keep out of forks and huge pages, and lock (faulting every page in)."""
        libc = self._libc
        address = libc.mmap(
            None,
            BALLOON_CHUNK_SIZE,
            _PROT_READ_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            -1,
            0,
        )
        if address is None or address == _MAP_FAILED:
            error = _error("mmap")
            raise error
        if libc.madvise(address, BALLOON_CHUNK_SIZE, mmap.MADV_DONTFORK) != 0:
            error = _error("madvise(MADV_DONTFORK)")
            libc.munmap(address, BALLOON_CHUNK_SIZE)
            raise error
        # Before the pages exist: khugepaged would copy them into a new huge page (other
        # frames). EINVAL: a kernel without transparent huge pages, nothing to keep away.
        if (
            libc.madvise(address, BALLOON_CHUNK_SIZE, mmap.MADV_NOHUGEPAGE) != 0
            and ctypes.get_errno() != errno.EINVAL
        ):
            error = _error("madvise(MADV_NOHUGEPAGE)")
            libc.munmap(address, BALLOON_CHUNK_SIZE)
            raise error
        if libc.mlock(address, BALLOON_CHUNK_SIZE) != 0:
            error = _mlock_error()
            libc.munmap(address, BALLOON_CHUNK_SIZE)
            raise error
        return int(address)

    def release(self, address: int) -> None:
        """Unmap (which unlocks)."""
        if self._libc.munmap(address, BALLOON_CHUNK_SIZE) != 0:
            error = _error("munmap")
            raise error

    def physical_pages(self, address: int) -> ChunkPages:
        """Read the chunk's page frames from pagemap (needs ``CAP_SYS_ADMIN`` to see them).

        The 256 entries are read as one integer, as :mod:`agent.protocol.balloon_pages`
        reads a chunk: one AND keeps every entry's frame number, one shift by ``PAGE_SHIFT``
        makes each one its page's address.
        """
        try:
            raw = os.pread(
                self._pagemap(),
                CHUNK_PAGES.size,
                address // mmap.PAGESIZE * _PAGEMAP_ENTRY_BYTES,
            )
        except OSError as exc:
            raise ChunkError(
                exc.errno, f"cannot read {self._pagemap_path}: {exc.strerror}"
            ) from exc
        if len(raw) != CHUNK_PAGES.size:
            raise ChunkError(0, f"{self._pagemap_path}: short read at {address:#x}")
        entries = int.from_bytes(raw, "little")
        frames = entries & _FRAME_NUMBERS
        if entries & _PRESENT != _PRESENT:
            reason = "a page is not present"
        elif frames & _BEYOND_64_BITS:
            reason = "a frame is out of range of 64-bit addresses"
        else:
            try:
                return ChunkPages((frames << PAGE_SHIFT).to_bytes(CHUNK_PAGES.size, "little"))
            except LocalProtocolError as exc:  # hidden frames read as 0
                reason = f"{exc}; reading frames needs CAP_SYS_ADMIN"
        msg = f"{self._pagemap_path} shows no usable page frames for {address:#x} ({reason})"
        raise ChunkError(0, msg)

    def _pagemap(self) -> int:
        """The pagemap descriptor, opened once and closed with the allocator."""
        if self._pagemap_fd is None:
            self._pagemap_fd = os.open(self._pagemap_path, os.O_RDONLY | os.O_CLOEXEC)
            weakref.finalize(self, os.close, self._pagemap_fd)
        return self._pagemap_fd


def memlock_limit() -> int | None:
    """Return ``RLIMIT_MEMLOCK`` in bytes, or None when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def has_ipc_lock(status_path: str = STATUS_PATH) -> bool:
    """Whether ``CAP_IPC_LOCK`` is in the effective set (``CapEff`` in ``status_path``):
    then ``RLIMIT_MEMLOCK`` does not bound what the process locks."""
    with open(status_path, encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name == "CapEff":
                return bool(int(value, 16) >> CAP_IPC_LOCK & 1)
    return False


@record
class PageMover:
    """A kernel setting under which Linux may move a locked page to another frame.

    Attributes:
        setting: the sysctl's name (``vm.compact_unevictable_allowed``).
        value: what it reads, or None if it cannot be read.
        moves: what moves the pages under it.
    """

    setting: str
    value: str | None
    moves: str

    def __str__(self) -> str:
        """``vm.compact_unevictable_allowed is 1, needs 0``."""
        reads = "cannot be read" if self.value is None else f"is {self.value}"
        return f"{self.setting} {reads}, needs 0"


_MOVERS: Final = (
    (
        "vm.compact_unevictable_allowed",
        False,
        "memory compaction may move locked pages to other frames",
    ),
    (
        "kernel.numa_balancing",
        True,
        "NUMA balancing may move locked pages to another node's frames",
    ),
)
"""Each setting, whether a kernel may lack it (and then lacks the feature), what it moves."""


def pages_may_move(sysctl_root: Path = PROC_SYS) -> PageMover | None:
    """Return the first setting under which locked pages may change frames, or None.

    ``vm.compact_unevictable_allowed`` must read 0 (the kernel's default is 1, 0 under
    PREEMPT_RT); a missing file counts as unreadable, since a ``/proc/sys`` the agent does not
    see looks the same as a kernel without compaction. ``kernel.numa_balancing`` must read 0
    where it exists (on one NUMA node it does by default); it is missing only from a kernel
    without NUMA balancing, ``/proc/sys`` having been read for the first.
    """
    for setting, may_lack, moves in _MOVERS:
        path = sysctl_root.joinpath(*setting.split("."))
        value: str | None
        try:
            value = path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            if may_lack:
                continue
            value = None
        except OSError:
            value = None
        if value != "0":
            return PageMover(setting, value, moves)
    return None
