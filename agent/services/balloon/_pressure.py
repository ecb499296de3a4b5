"""Memory pressure for the balloon: PSI stall readings and ``MemAvailable``.

A :class:`PsiMonitor` reads a PSI file (``/proc/pressure/memory`` or a cgroup v2
``memory.pressure``). Where the kernel accepts a trigger on the file (``some STALL WINDOW``)
it sleeps until the trigger fires (``POLLPRI``, waited for on the descriptor after the trigger
is written to it: the kernel's poll waits only on a trigger that exists), so an idle guest
costs no wake-ups; otherwise it reads the file every interval and computes the stall share
from the ``total`` counter. Either way :meth:`PsiMonitor.next_reading` returns one
:class:`PressureReading`.
"""

from __future__ import annotations

import errno
import os
import re
import select
import stat
import weakref
from typing import TYPE_CHECKING, Final, Protocol, Self

import structlog
import trio

from agent.records import record

if TYPE_CHECKING:
    from types import TracebackType

log = structlog.get_logger(__name__)

MEMINFO_PATH: Final = "/proc/meminfo"
US_PER_S: Final = 1_000_000
PERCENT: Final = 100.0
_SOME_LINE: Final = re.compile(rb"^some avg10=(?P<avg10>\S*) .*total=(?P<total>\S*)$", re.MULTILINE)
"""The line with the figures; each is then read as the kernel writes it (:func:`_parse_some`)."""
_AVG: Final = re.compile(rb"\d{1,3}\.\d\d")
"""A share of time as the kernel writes it (``%lu.%02lu``)."""
_TOTAL: Final = re.compile(rb"\d{1,20}")
"""Microseconds of stall as the kernel writes them (``%llu``; a u64 has at most 20 digits)."""
U64_MAX: Final = (1 << 64) - 1
"""The largest ``total`` there is: the kernel keeps it in a u64."""
_SHOWN_CHARS: Final = 24
"""How much of a figure that is no number an error message quotes."""
_MEM_AVAILABLE: Final = re.compile(rb"^MemAvailable:\s+(?P<kb>\d+) kB$", re.MULTILINE)
_KB_PER_MB: Final = 1024
_MEMINFO_READ_BYTES: Final = 16384
"""Enough for all of /proc/meminfo (about 1.5 KiB; MemAvailable is its third line)."""


class PressureFileError(OSError):
    """The PSI or meminfo file cannot be read or has no figures where expected."""

    def __str__(self) -> str:
        """The message alone: it names the file and what is wrong (no ``[Errno 2]``)."""
        return self.strerror or super().__str__()


@record
class PressureReading:
    """One look at memory pressure.

    Attributes:
        stall_pct: share of time some task stalled on memory (over the last interval when
            polling; the kernel's ``avg10`` when a trigger fired).
        high: at or over the threshold (always true when a trigger fired).
        via: ``"trigger"`` or ``"poll"``.
    """

    stall_pct: float
    high: bool
    via: str


class PressureSource(Protocol):
    """Where the balloon gets pressure readings from (injectable in tests)."""

    async def next_reading(self) -> PressureReading:
        """Wait for and return the next reading."""
        ...


class MemInfo:
    """``MemAvailable`` from ``path``, through a descriptor kept open: one ``pread`` a look.

    The balloon looks before every chunk it inflates; /proc files regenerate on every read
    from offset 0, so the descriptor is opened once (and closed with the object).
    """

    __slots__ = ("__weakref__", "_fd", "path")

    def __init__(self, path: str = MEMINFO_PATH) -> None:
        self.path = path
        self._fd: int | None = None

    def available_mb(self) -> int:
        """Return ``MemAvailable`` in MiB.

        Raises:
            PressureFileError: unreadable, or no MemAvailable line.
        """
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                weakref.finalize(self, os.close, self._fd)
            text = os.pread(self._fd, _MEMINFO_READ_BYTES, 0)
        except OSError as exc:
            msg = f"cannot read {self.path}: {exc.strerror}"
            raise PressureFileError(exc.errno, msg) from exc
        match = _MEM_AVAILABLE.search(text)
        if match is None:
            msg = f"{self.path} has no 'MemAvailable: N kB' line"
            raise PressureFileError(errno.EINVAL, msg)
        return int(match["kb"]) // _KB_PER_MB


def _require_regular_file(fd: int, path: str) -> None:
    """Refuse anything but a regular file (a FIFO, a device), as PSI files are."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise PressureFileError(errno.EINVAL, f"{path} is not a regular file (a PSI file is)")


def _parse_some(path: str, text: bytes) -> tuple[float, int]:
    """``avg10`` (0 to 100 %) and ``total`` (µs, a u64) of the ``some`` line of ``text``.

    Raises:
        PressureFileError: no such line, or a figure the kernel would not write.
    """
    match = _SOME_LINE.search(text)
    if match is None:
        raise PressureFileError(
            errno.EINVAL, f"{path} has no 'some avg10=... total=N' line (not a PSI file?)"
        )
    avg10, total = match["avg10"], match["total"]
    if _AVG.fullmatch(avg10) is None or float(avg10) > PERCENT:
        msg = f"{path} has avg10={_shown(avg10)}, not a share of time from 0.00 to 100.00"
        raise PressureFileError(errno.EINVAL, msg)
    if _TOTAL.fullmatch(total) is None or int(total) > U64_MAX:
        msg = f"{path} has total={_shown(total)}, not a count of microseconds (a u64)"
        raise PressureFileError(errno.EINVAL, msg)
    return float(avg10), int(total)


def _shown(figure: bytes) -> str:
    """``figure`` for a message: its first :data:`_SHOWN_CHARS` characters, escaped."""
    text = figure[:_SHOWN_CHARS].decode("ascii", "backslashreplace")
    return text + "..." if len(figure) > _SHOWN_CHARS else text


class PsiMonitor:
    """PSI readings from one file, by kernel trigger where possible, else by polling.

    Use as a context manager: it opens the file (and registers the trigger) on entry and
    closes it on exit.
    """

    def __init__(self, path: str, *, interval_s: float, threshold_pct: float) -> None:
        self.path = path
        self.interval_s = interval_s
        self.threshold_pct = threshold_pct
        self._fd: int | None = None
        self._epoll: select.epoll | None = None
        self._last_total = 0
        self._last_time = 0.0

    def __enter__(self) -> Self:
        """Open the file, read a first figure and try to register the trigger.

        The file is opened without blocking and must be a regular file (as /proc/pressure/*
        and cgroup ``memory.pressure`` are): a FIFO's open would block the event loop.

        Raises:
            PressureFileError: the file cannot be opened, is no regular file or no PSI file.
        """
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise PressureFileError(exc.errno, f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            _require_regular_file(self._fd, self.path)
            self._last_total = self._read()[1]
            self._last_time = trio.current_time()
            self._try_trigger()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the file and the trigger."""
        self._close()

    def _close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _try_trigger(self) -> None:
        """Register ``some STALL WINDOW`` on a fd of its own; keep polling if refused."""
        window_us = round(self.interval_s * US_PER_S)
        stall_us = max(1, round(window_us * self.threshold_pct / PERCENT))
        epoll = select.epoll()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            epoll.close()
            self._log_polling(exc)
            return
        try:
            # A regular file refuses epoll (EPERM): it stays polled, never written to.
            epoll.register(fd, select.EPOLLPRI)
            epoll.unregister(fd)
            # Registered for good after the write: the kernel's poll waits on the trigger only
            # once there is one, so a registration made before it would never be woken.
            os.write(fd, f"some {stall_us} {window_us}".encode() + b"\0")
            epoll.register(fd, select.EPOLLPRI)
        except OSError as exc:
            epoll.close()
            os.close(fd)
            self._log_polling(exc)
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._epoll = epoll
        log.info("psi_trigger_set", path=self.path, stall_us=stall_us, window_us=window_us)

    def _log_polling(self, exc: OSError) -> None:
        log.info(
            "psi_trigger_unavailable",
            path=self.path,
            reason=exc.strerror,
            polling_every_s=self.interval_s,
        )

    def _read(self) -> tuple[float, int]:
        if self._fd is None:
            msg = "PsiMonitor used outside its 'with' block"
            raise RuntimeError(msg)
        try:
            text = os.pread(self._fd, 4096, 0)
        except OSError as exc:
            raise PressureFileError(exc.errno, f"cannot read {self.path}: {exc.strerror}") from exc
        return _parse_some(self.path, text)

    async def next_reading(self) -> PressureReading:
        """Sleep until the trigger fires (or the interval passes) and return a reading."""
        if self._epoll is not None:
            # The inner epoll becomes readable only on POLLPRI: trio waits on it.
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            self._epoll.poll(0)
            avg10, self._last_total = self._read()
            self._last_time = trio.current_time()
            return PressureReading(avg10, high=True, via="trigger")
        await trio.sleep(self.interval_s)
        _avg10, total = self._read()
        now = trio.current_time()
        elapsed_us = max((now - self._last_time) * US_PER_S, 1.0)
        stall_pct = min(PERCENT, (total - self._last_total) * PERCENT / elapsed_us)
        self._last_total, self._last_time = total, now
        return PressureReading(
            round(stall_pct, 2), high=stall_pct >= self.threshold_pct, via="poll"
        )
