"""The room left in the agent's memory cgroup, which the balloon's floor checks with
``MemAvailable``.

Every chunk the agent locks is charged to its memory cgroup. Where a cgroup on its path has a
limit (a slice's ``MemoryMax=``, a container's ``--memory``), faulting in a chunk past it wakes
that cgroup's OOM killer inside ``mlock``: a SIGKILL, with no error to report. Past a v2
cgroup's ``memory.high`` (``MemoryHigh=``) the kernel reclaims hard and throttles every task of
the cgroup that allocates (the agent's event loop and heartbeat too), and cannot reclaim the
locked chunks. The room is the least, over the agent's cgroup and each ancestor, of its limit
less its usage not counting reclaimable cache: the lower of ``memory.max`` and ``memory.high``
less ``memory.current`` on cgroup v2 (``max``: no limit; a ``memory.high`` that is not there:
none), ``memory.limit_in_bytes - memory.usage_in_bytes`` of the memory controller's hierarchy on
cgroup v1 (a limit of :data:`NO_LIMIT` or more: none, as v1 writes "no limit" as its largest
page-aligned number), plus the inactive file cache of ``memory.stat`` (``inactive_file``; v1's
``total_inactive_file``, the hierarchy's as its usage is). The usage counts page cache, which
file I/O fills up to the limit, and the kernel reclaims it inside the cgroup before any OOM
kill; where ``memory.stat`` or its line cannot be read, the whole usage counts. A directory that
is not there (the root has no limit files; a container sees only its own cgroup, mounted as the
root, under a path naming the host's) is passed over, and so is a value that cannot be read
(:class:`CgroupLimits`: a limit, any other of its directory still counting; a usage, its
directory's limits), said once as a warning: where no limit is left, the floor rests on
``MemAvailable`` alone.
"""

from __future__ import annotations

from collections import Counter
from contextlib import suppress
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final, TypeVar

import structlog

from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

log = structlog.get_logger("agent.services.balloon")

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
MEMBERSHIP_PATH: Final = Path("/proc/self/cgroup")
_V1_MEMORY: Final = "memory"
"""The v1 hierarchy's directory under the root, and its controller's name."""
_LIMITS: Final = (
    (("memory.max", "memory.high"), "memory.current", "inactive_file"),
    (("memory.limit_in_bytes",), "memory.usage_in_bytes", "total_inactive_file"),
)
"""Each version's limit files (the first one there tells the version; the lowest limit counts),
its usage file and its reclaimable cache in ``memory.stat``: v2, then v1."""
_STAT: Final = "memory.stat"
NO_LIMIT: Final = 1 << 62
"""Bytes at and above which a limit is none (v1's "no limit" is just under ``2**63``)."""
_MB: Final = 1 << 20
_SHOWN_CHARS: Final = 24
"""How much of a value that is no number a warning quotes."""
UNREAD_WARNINGS: Final = 5
"""Warnings (and lines when it reads again) at most for one file that cannot be read: each time
it starts failing; after that, debug lines. A file failing at every look is said once."""
_LIMIT_PASSED_OVER: Final = "this limit (any other limit of its cgroup still counts)"
_USAGE_PASSED_OVER: Final = "this cgroup's limits"
_CACHE_PASSED_OVER: Final = "the reclaimable cache (the whole usage counts)"
_Value = TypeVar("_Value")


@record
class CgroupRoom:
    """The least room over the agent's memory cgroups: ``mb`` MiB, in the ``cgroup``
    directory whose limit leaves it."""

    mb: int
    cgroup: str


def _memory_dirs(membership: str, root: Path) -> list[Path]:
    """The directories of the agent's memory cgroup and its ancestors, leaf first, from the
    text of ``/proc/self/cgroup`` (``0::/path`` on v2, ``N:memory:/path`` on v1)."""
    dirs: list[Path] = []
    for line in membership.splitlines():
        _hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "":
            base = root
        elif _V1_MEMORY in controllers.split(","):
            base = root / _V1_MEMORY
        else:
            continue
        cgroup = PurePosixPath(path)
        dirs += [base / ancestor.relative_to("/") for ancestor in (cgroup, *cgroup.parents)]
    return dirs


def _bytes(text: str) -> int:
    """The number of bytes ``text`` holds, as the kernel writes it (digits).

    Raises:
        ValueError: ``text`` holds no such number.
    """
    figure = text.strip()
    if not (figure.isascii() and figure.isdigit()):
        shown = figure[:_SHOWN_CHARS] + ("..." if len(figure) > _SHOWN_CHARS else "")
        msg = f"{shown!r} is no number of bytes"
        raise ValueError(msg)
    return int(figure)


def _limit(text: str) -> int | None:
    """The limit ``text`` sets, in bytes; None for none (``max``, :data:`NO_LIMIT` or more).

    Raises:
        ValueError: ``text`` holds neither.
    """
    if text.strip() == "max":
        return None
    limit = _bytes(text)
    return limit if limit < NO_LIMIT else None


def _cache(key: str) -> Callable[[str], int]:
    """What reads the bytes of ``key`` from a ``memory.stat`` text: 0 without the line."""

    def parse(text: str) -> int:
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return _bytes(value)
        return 0

    return parse


def memory_cgroups(root: Path = CGROUP_ROOT, membership_path: Path = MEMBERSHIP_PATH) -> list[Path]:
    """The directories of this process's memory cgroup and its ancestors, leaf first (none,
    with a debug line, if ``membership_path`` cannot be read). Read once: the room is read
    before every chunk, and systemd does not move a running service to another cgroup."""
    try:
        membership = membership_path.read_text(encoding="ascii")
    except (OSError, ValueError) as exc:
        log.debug("balloon_cgroup_unread", file=str(membership_path), reason=str(exc))
        return []
    return _memory_dirs(membership, root)


class CgroupLimits:
    """The room left under the limits of the agent's memory cgroups (:func:`memory_cgroups`),
    read afresh at every look (:meth:`least_room`).

    A file that cannot be read or holds no number is passed over: a limit file's limit (any
    other limit of its directory still counts), a usage file's directory, ``memory.stat``'s
    cache (the whole usage counts). It is said once as a warning (``balloon_cgroup_unread``, naming
    the file, what is wrong and what is passed over), and once when it reads again
    (``balloon_cgroup_read``), not at every look; a file that keeps failing and reading again
    is said so at most :data:`UNREAD_WARNINGS` times, then at debug.
    """

    def __init__(self, directories: Sequence[Path]) -> None:
        self.directories = directories
        self._failing: set[Path] = set()
        """The files that failed at their last read."""
        self._warnings: Counter[Path] = Counter()

    def least_room(self) -> CgroupRoom | None:
        """The least room over :attr:`directories`, or None where none has a limit it can read
        (the module docstring)."""
        least: CgroupRoom | None = None
        for directory in self.directories:
            room = self._room(directory)
            if room is not None and (least is None or max(0, room) // _MB < least.mb):
                least = CgroupRoom(max(0, room) // _MB, str(directory))
        return least

    def _room(self, directory: Path) -> int | None:
        """The lowest limit less usage not counting reclaimable cache in ``directory`` in
        bytes, or None: no limit files (passed over silently), no limit it can read, or a
        usage it cannot read."""
        for (first, *others), usage_name, cache_key in _LIMITS:
            try:
                limits = [self._read(directory / first, _limit, _LIMIT_PASSED_OVER)]
            except FileNotFoundError:
                continue
            for name in others:
                with suppress(FileNotFoundError):
                    limits.append(self._read(directory / name, _limit, _LIMIT_PASSED_OVER))
            lowest = min((limit for limit in limits if limit is not None), default=None)
            if lowest is None:
                return None
            usage = self._read(directory / usage_name, _bytes, _USAGE_PASSED_OVER, needed=True)
            if usage is None:
                return None
            try:
                cache = self._read(directory / _STAT, _cache(cache_key), _CACHE_PASSED_OVER)
            except FileNotFoundError:
                cache = None
            return lowest - usage + (cache or 0)
        return None

    def _read(
        self, path: Path, parse: Callable[[str], _Value], passed_over: str, *, needed: bool = False
    ) -> _Value | None:
        """What ``parse`` makes of ``path``'s text; None if that fails (said as the class
        docstring tells, with ``passed_over``), or ``parse`` sees no limit.

        Raises:
            FileNotFoundError: ``path`` is not there (a directory without it), unless
                ``needed``: then that is a failure too.
        """
        try:
            value = parse(path.read_text(encoding="ascii"))
        except FileNotFoundError:
            if not needed:
                raise
            self._unread(path, "not there", passed_over)
            return None
        except OSError as exc:
            self._unread(path, exc.strerror or str(exc), passed_over)
            return None
        except ValueError as exc:  # no number, or no ASCII
            self._unread(path, str(exc), passed_over)
            return None
        if path in self._failing:
            self._failing.remove(path)
            (log.info if self._warnings[path] <= UNREAD_WARNINGS else log.debug)(
                "balloon_cgroup_read", file=str(path)
            )
        return value

    def _unread(self, path: Path, reason: str, passed_over: str) -> None:
        """Say that ``path`` cannot be read, unless it already failed at its last read."""
        if path in self._failing:
            return
        self._failing.add(path)
        self._warnings[path] += 1
        (log.warning if self._warnings[path] <= UNREAD_WARNINGS else log.debug)(
            "balloon_cgroup_unread", file=str(path), reason=reason, passed_over=passed_over
        )


class Headroom:
    """What the balloon's floor is checked against where the agent locks the chunks:
    ``MemAvailable``, or the room left in the agent's memory cgroups where that is less (one
    line the first time it is). Where the driver allocates them (kernel pages, charged to no
    cgroup of the agent's), :attr:`mem_available_mb` alone."""

    def __init__(
        self,
        mem_available_mb: Callable[[], int | None],
        room: Callable[[], CgroupRoom | None] | None,
    ) -> None:
        self.mem_available_mb = mem_available_mb
        """``MemAvailable`` in MiB, None if unknown."""
        self._room = room
        self._logged = False

    def mb(self) -> int | None:
        """The headroom in MiB, None if neither figure is known."""
        available = self.mem_available_mb()
        room = self._room() if self._room is not None else None
        if room is None or (available is not None and available <= room.mb):
            return available
        if not self._logged:
            self._logged = True
            log.info(
                "balloon_floor_cgroup",
                cgroup=room.cgroup,
                room_mb=room.mb,
                mem_available_mb=available,
                reason="the memory cgroup's limit leaves less room than MemAvailable; past"
                " it, the cgroup's OOM killer would end the agent inside mlock (memory.max),"
                " or the kernel throttle its tasks (memory.high)",
            )
        return room.mb
