"""The guest's wall clock, as the ``timesync`` service reads and corrects it.

``WallClock`` is the seam: :class:`SystemClock` is the real one (``CLOCK_REALTIME``);
:class:`AgentOwnClock` stands in for it when the agent follows a simulated host, whose
corrections must not move the machine's clock; tests inject their own.

- ``step`` sets the clock at once (``clock_settime``). The kernel also drops a slew still
  under way (setting the time clears its NTP state).
- ``slew`` has the kernel make up a small offset gradually (``adjtime``: at most 0.5 ms per
  second, so time never runs backwards). glibc refuses offsets beyond about ±35 minutes. A
  slew replaces what is left of the last one, so a slew of 0 cancels a slew under way.
- ``ntp_synchronised`` asks the kernel whether a time daemon (chronyd, ntpd,
  systemd-timesyncd) keeps the clock synchronised: ``adjtimex`` in read-only mode returns
  ``TIME_ERROR`` while the clock is unsynchronised. After a daemon stops, the kernel goes on
  saying "synchronised" until its error estimate reaches 16 s (hours later).

Setting or slewing needs ``CAP_SYS_TIME``; without it both raise ``PermissionError``.
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Final, Protocol

from agent.units import NS_PER_S

KERNEL_SLEW_NS_PER_S: Final = 500_000
"""How fast Linux makes up an ``adjtime`` offset: 0.5 ms a second (``MAX_TICKADJ``)."""
TIME_ERROR: Final = 5
"""``adjtimex``'s answer while the clock is not synchronised (``linux/timex.h``)."""
_TIMEX_BYTES: Final = 512
"""Room for ``struct timex`` (208 bytes on 64-bit Linux); zeroed ``modes`` reads only."""
_NS_PER_US: Final = 1000
_Timeval: Final = ctypes.c_long * 2
"""``struct timeval``: seconds, then microseconds."""


class WallClock(Protocol):
    """The wall clock the service measures against the host's, and corrects."""

    def now_ns(self) -> int:
        """UTC in nanoseconds since the Unix epoch."""
        ...

    def monotonic_ns(self) -> int:
        """A clock that never jumps, to time a reading (``CLOCK_MONOTONIC``)."""
        ...

    def step(self, offset_ns: int) -> None:
        """Move the clock by ``offset_ns`` at once."""
        ...

    def slew(self, offset_ns: int) -> None:
        """Have the kernel make up ``offset_ns`` gradually."""
        ...

    def ntp_synchronised(self) -> bool:
        """Whether a time daemon keeps the clock synchronised."""
        ...


class SystemClock:
    """``CLOCK_REALTIME`` through ``clock_settime``, ``adjtime`` and ``adjtimex``."""

    __slots__ = ("_libc",)

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)  # the C library this process runs on
        self._libc.adjtime.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        self._libc.adjtime.restype = ctypes.c_int
        self._libc.adjtimex.argtypes = (ctypes.c_void_p,)
        self._libc.adjtimex.restype = ctypes.c_int

    def now_ns(self) -> int:
        """UTC in nanoseconds since the Unix epoch."""
        return time.clock_gettime_ns(time.CLOCK_REALTIME)

    def monotonic_ns(self) -> int:
        """``CLOCK_MONOTONIC`` in nanoseconds: steps of the wall clock do not move it."""
        return time.monotonic_ns()

    def step(self, offset_ns: int) -> None:
        """Move the clock by ``offset_ns`` at once (``clock_settime``).

        Raises:
            OSError: the kernel refused (``PermissionError`` without ``CAP_SYS_TIME``).
        """
        time.clock_settime_ns(time.CLOCK_REALTIME, self.now_ns() + offset_ns)

    def slew(self, offset_ns: int) -> None:
        """Have the kernel make up ``offset_ns`` gradually (``adjtime``).

        Raises:
            OSError: refused (``PermissionError`` without ``CAP_SYS_TIME``; ``EINVAL`` for
                an offset beyond glibc's bound).
        """
        seconds, rest_ns = divmod(offset_ns, NS_PER_S)  # tv_usec in 0..999999, as required
        delta = _Timeval(seconds, rest_ns // _NS_PER_US)
        if self._libc.adjtime(delta, None) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"adjtime: {os.strerror(code)}")

    def ntp_synchronised(self) -> bool:
        """Whether a time daemon keeps the clock synchronised (``adjtimex``, read only)."""
        timex = ctypes.create_string_buffer(_TIMEX_BYTES)
        state = self._libc.adjtimex(timex)
        return state not in (-1, TIME_ERROR)


class AgentOwnClock:
    """The machine's clock plus an offset of the agent's own, which steps and slews move.

    For an agent that follows a simulated host: the corrections are made (and logged) as on
    a guest, but only this offset moves; ``CLOCK_REALTIME`` stays as it is. A slew applies at
    once (there is no kernel to spread it), and no time daemon is taken to keep this clock.
    """

    __slots__ = ("_offset_ns",)

    def __init__(self) -> None:
        self._offset_ns = 0

    def now_ns(self) -> int:
        """The machine's UTC plus the offset."""
        return time.clock_gettime_ns(time.CLOCK_REALTIME) + self._offset_ns

    def monotonic_ns(self) -> int:
        """``CLOCK_MONOTONIC``."""
        return time.monotonic_ns()

    def step(self, offset_ns: int) -> None:
        """Move the offset by ``offset_ns``."""
        self._offset_ns += offset_ns

    def slew(self, offset_ns: int) -> None:
        """Move the offset by ``offset_ns`` (at once)."""
        self._offset_ns += offset_ns

    def ntp_synchronised(self) -> bool:
        """False: no time daemon keeps this clock."""
        return False
