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
root, under a path naming the host's) is passed over, and so is a value that cannot be read,
with a debug line: the floor then rests on ``MemAvailable`` alone.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Final

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


def _room(directory: Path) -> int | None:
    """The lowest limit less usage not counting reclaimable cache in ``directory`` in bytes,
    or None: no limit files (passed over silently), no limit, or a value that cannot be read
    (a debug line)."""
    for limit_names, usage_name, cache_key in _LIMITS:
        try:
            limit = _lowest_limit(directory, limit_names)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            _unread(directory, exc)
            return None
        if limit is None:
            return None
        try:
            usage = int((directory / usage_name).read_text(encoding="ascii"))
        except (OSError, ValueError) as exc:
            _unread(directory, exc)
            return None
        return limit - usage + _cache(directory, cache_key)
    return None


def _lowest_limit(directory: Path, names: Sequence[str]) -> int | None:
    """The lowest limit the files ``names`` in ``directory`` set, in bytes; None if none sets
    one (``max``, :data:`NO_LIMIT` or more, or a file after the first that is not there).

    Raises:
        FileNotFoundError: the first file is not there.
        OSError, ValueError: a file cannot be read or holds no number.
    """
    first, *others = names
    texts = [(directory / first).read_text(encoding="ascii")]
    for name in others:
        try:
            texts.append((directory / name).read_text(encoding="ascii"))
        except FileNotFoundError:
            continue
    limits = [int(text) for text in texts if text.strip() != "max"]
    return min((limit for limit in limits if limit < NO_LIMIT), default=None)


def _cache(directory: Path, key: str) -> int:
    """The bytes of ``key`` in ``directory``'s ``memory.stat``; 0 if the file is not there
    (silently), or it or the line cannot be read (a debug line)."""
    try:
        lines = (directory / _STAT).read_text(encoding="ascii").splitlines()
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        _unread(directory / _STAT, exc)
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return max(0, int(value))
            except ValueError as exc:
                _unread(directory / _STAT, exc)
                return 0
    return 0


def _unread(where: Path, exc: Exception) -> None:
    log.debug("balloon_cgroup_unread", cgroup=str(where), reason=str(exc))


def memory_cgroups(root: Path = CGROUP_ROOT, membership_path: Path = MEMBERSHIP_PATH) -> list[Path]:
    """The directories of this process's memory cgroup and its ancestors, leaf first (none,
    with a debug line, if ``membership_path`` cannot be read). Read once: the room is read
    before every chunk, and systemd does not move a running service to another cgroup."""
    try:
        membership = membership_path.read_text(encoding="ascii")
    except (OSError, ValueError) as exc:
        _unread(membership_path, exc)
        return []
    return _memory_dirs(membership, root)


def least_room(directories: Sequence[Path]) -> CgroupRoom | None:
    """The least room over ``directories`` (:func:`memory_cgroups`), or None where none has
    a limit it can read (the module docstring)."""
    least: CgroupRoom | None = None
    for directory in directories:
        room = _room(directory)
        if room is not None and (least is None or max(0, room) // _MB < least.mb):
            least = CgroupRoom(max(0, room) // _MB, str(directory))
    return least


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
