"""The real Linux vboxguest driver as a library: where it is, its C API, guest RAM, callbacks.

The library (``libvbgreal.so``, see ``../shared/realdriver/README.md``) is the 6.12 driver
compiled unmodified over a userspace kernel shim. Its state is process-wide (one probed
device at a time, one guest-RAM arena for the life of the process), so this module holds
one :class:`RealDriver` per process and routes the two callbacks to whichever device is
current.

Finding the library: ``$VBOX_AGENT_REALDRIVER`` names the ``.so``; without it the nearest
``shared/realdriver/build.sh`` builds it, or reuses its cache, and prints its path. That
script is looked for as ``.ci/test`` looks: beside the checkout or one of its parent
directories, else beside the local repository the checkout was cloned from (its
``remote.origin.url``, when that is a path) or one of that one's parents.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.host.driver import PersonalityUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.host.memory import GuestMemory, Mapping

ENV_LIBRARY: Final = "VBOX_AGENT_REALDRIVER"
"""Path of a built ``libvbgreal.so``; overrides building it."""
BUILD_SCRIPT: Final = Path("shared/realdriver/build.sh")
"""Where the build script sits, relative to a directory beside the checkout."""
BUILD_TIMEOUT_S: Final = 900.0
"""A cold build downloads the kernel source package (about 150 MB)."""
GIT_TIMEOUT_S: Final = 10.0
"""Bound of the ``git config`` that reads the checkout's origin."""
CHECKOUT: Final = Path(__file__).resolve().parent.parent

ARENA_PHYS: Final = 0x0010_0000
"""Guest-physical address of the first arena page (1 MiB, above the legacy area)."""
ARENA_MB: Final = 4095
"""Arena size in MiB: it ends at 4 GiB, so every request the driver sends fits the 32-bit port."""
MIB: Final = 1 << 20
MAP_NORESERVE: Final = getattr(mmap, "MAP_NORESERVE", 0x4000)
"""Reserve no swap for the arena (Linux's value; Python's mmap names it from 3.13)."""

OutlCallback = ctypes.CFUNCTYPE(None, ctypes.c_uint, ctypes.c_uint)
UaccessCallback = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulonglong,
    ctypes.c_void_p,
    ctypes.c_ulonglong,
    ctypes.c_int,
)


def build_script(checkout: Path = CHECKOUT) -> Path | None:
    """Return the nearest ``shared/realdriver/build.sh`` beside ``checkout`` or a parent,
    else beside its origin (a local repository it was cloned from) or a parent of that."""
    for start in (checkout, origin(checkout)):
        if start is None:
            continue
        for directory in start.resolve().parents:
            script = directory / BUILD_SCRIPT
            if script.is_file():
                return script
    return None


def origin(checkout: Path) -> Path | None:
    """The local repository ``checkout`` was cloned from (``remote.origin.url`` naming a
    directory, as a path or a ``file://`` URL), or None."""
    try:
        result = subprocess.run(  # noqa: S603 - fixed arguments
            ["git", "-C", str(checkout), "config", "--get", "remote.origin.url"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    url = result.stdout.strip().removeprefix("file://")
    if not url.startswith("/"):
        return None
    path = Path(url)
    return path if path.is_dir() else None


def locate_library(checkout: Path = CHECKOUT) -> Path:
    """Return the library's path: ``$VBOX_AGENT_REALDRIVER``, else what build.sh prints.

    Raises:
        PersonalityUnavailableError: no library and no way to build it, or the build failed.
    """
    configured = os.environ.get(ENV_LIBRARY)
    if configured:
        path = Path(configured)
        if not path.is_file():
            msg = f"${ENV_LIBRARY} names {path}, which is no file"
            raise PersonalityUnavailableError(msg)
        return path
    script = build_script(checkout)
    if script is None:
        found = origin(checkout)
        where = checkout if found is None else f"{checkout}, its origin {found}"
        msg = (
            f"the real driver library is missing: set ${ENV_LIBRARY} to a built "
            f"libvbgreal.so, or put {BUILD_SCRIPT} (which builds it) beside {where} or "
            "a parent directory"
        )
        raise PersonalityUnavailableError(msg)
    try:
        result = subprocess.run(  # noqa: S603 - our own build script
            ["bash", str(script)],  # noqa: S607 - bash from PATH, as CI runs it
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
            preexec_fn=_unblock_all_signals,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        msg = f"building the real driver with {script} failed: {exc}"
        raise PersonalityUnavailableError(msg) from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        errors = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        msg = f"building the real driver with {script} failed: {errors[-1]}"
        raise PersonalityUnavailableError(msg)
    return Path(lines[-1])


def _unblock_all_signals() -> None:
    """In the build's process, before it execs: take no blocked signal from the caller.

    ``vbox-agent simulate`` holds SIGTERM and SIGINT blocked until its host runs
    (``agent.cli.HELD_SIGNALS``), and a mask passes through ``exec``: the build would not
    stop on Ctrl-C or on the SIGTERM ``timeout`` sends to the group.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


class ArenaMemory:
    """Guest RAM as the VMMDev sees it: the arena at guest-physical ``ARENA_PHYS``."""

    __slots__ = ("_base", "_view")

    def __init__(self, view: memoryview, base: int) -> None:
        self._view = view
        self._base = base

    def read(self, address: int, size: int) -> bytes:
        """Return ``size`` bytes at guest-physical ``address``; ``EFAULT`` outside the arena."""
        offset = self._offset(address, size)
        return bytes(self._view[offset : offset + size])

    def write(self, address: int, data: bytes | bytearray) -> None:
        """Store ``data`` at guest-physical ``address``; ``EFAULT`` outside the arena."""
        offset = self._offset(address, len(data))
        self._view[offset : offset + len(data)] = data

    def lock(self, address: int, size: int) -> Mapping | None:
        """The arena itself and the offset of ``address`` in it; None outside the arena."""
        offset = address - self._base
        if offset < 0 or size < 0 or offset + size > len(self._view):
            return None
        return self._view, offset

    def _offset(self, address: int, size: int) -> int:
        offset = address - self._base
        if offset < 0 or size < 0 or offset + size > len(self._view):
            raise OSError(errno.EFAULT, f"bad guest-physical address {address:#x} (+{size})")
        return offset


class RealDriver:
    """The loaded library with its arena and callbacks (one per process: :func:`real_driver`)."""

    def __init__(self, path: Path) -> None:
        try:
            self.lib = ctypes.CDLL(str(path))
        except OSError as exc:
            msg = f"cannot load the real driver library {path}: {exc}"
            raise PersonalityUnavailableError(msg) from exc
        _declare(self.lib)
        size = ARENA_MB * MIB
        self._arena = mmap.mmap(
            -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        )
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._arena))
        rc = self.lib.shim_arena_init(base, ARENA_PHYS, size)
        if rc:
            msg = f"shim_arena_init failed: {os.strerror(-rc)}"
            raise PersonalityUnavailableError(msg)
        self.memory = ArenaMemory(memoryview(self._arena), ARENA_PHYS)
        self.port_handler: Callable[[int, int], None] | None = None
        """Where request-port writes go: the current device's handler."""
        self.task_memory: dict[int, GuestMemory] = {}
        """User memory of each ioctl in flight, by its task's cookie."""
        self._cookies = itertools.count(1)
        self._outl = OutlCallback(self._on_outl)
        self._uaccess = UaccessCallback(self._on_uaccess)
        self.lib.shim_set_callbacks(self._outl, self._uaccess, 0)

    def new_cookie(self) -> int:
        """A fresh cookie for a task (its key in :attr:`task_memory`)."""
        return next(self._cookies)

    def _on_outl(self, port: int, value: int) -> None:
        handler = self.port_handler
        if handler is not None:
            handler(port, value)

    def _on_uaccess(self, cookie: int, uaddr: int, kptr: int, size: int, write: int) -> int:
        memory = self.task_memory.get(cookie)
        if memory is None:
            return 1
        try:
            if write:
                memory.write(uaddr, ctypes.string_at(kptr, size))
            else:
                ctypes.memmove(kptr, memory.read(uaddr, size), size)
        except OSError:
            return 1
        return 0


_REAL: list[RealDriver] = []


def real_driver() -> RealDriver:
    """Return the process's library, loading (and if need be building) it on first use.

    Raises:
        PersonalityUnavailableError: the library cannot be found, built or loaded.
    """
    if not _REAL:
        _REAL.append(RealDriver(locate_library()))
    return _REAL[0]


def _declare(lib: ctypes.CDLL) -> None:
    """Give the C API its argument and result types."""
    ptr, uint, ulong, cint = ctypes.c_void_p, ctypes.c_uint, ctypes.c_ulong, ctypes.c_int
    pint = ctypes.POINTER(ctypes.c_int)
    signatures: dict[str, tuple[list[object], object]] = {
        "shim_set_callbacks": ([OutlCallback, UaccessCallback, cint], None),
        "shim_arena_init": ([ptr, ctypes.c_ulonglong, ctypes.c_ulonglong], cint),
        "shim_dmesg_take": ([ctypes.c_char_p, ctypes.c_size_t], ctypes.c_size_t),
        "shim_task_new": ([uint, uint, ulong], ptr),
        "shim_task_set_ubuf": ([ptr, ulong, ptr, ctypes.c_size_t], None),
        "shim_task_interrupt": ([ptr], None),
        "shim_task_free": ([ptr], None),
        "shim_probe": ([uint, uint, pint], ptr),
        "shim_set_have_events": ([ptr, cint], None),
        "shim_isr": ([ptr], cint),
        "shim_open": ([ptr, cint, uint, uint, pint], ptr),
        "shim_ioctl": ([ptr, ptr, uint, ulong], ctypes.c_long),
        "shim_release": ([ptr], None),
        "shim_unplug": ([ptr], None),
        "shim_query": ([ptr, ctypes.c_char_p, ctypes.c_size_t], cint),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = restype
