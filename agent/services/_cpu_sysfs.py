"""The guest's CPUs in sysfs: find one by the host's core and package ids, bring it online,
take it offline and eject it.

Everything here is file I/O on ``ROOT/devices/system/cpu`` (``ROOT`` is ``/sys`` in a
guest, a tree of their own in tests); the service runs plugs and unplugs on a worker thread,
since a CPU going offline can keep the write busy for a while, and :meth:`CpuSysfs.remember`
on the event loop. No open or read can block: every attribute is opened non-blocking and
must be a regular file (as every sysfs attribute is); anything else under the root (a FIFO
an admin left there, a device node) is refused with one warning naming it, and counts as
missing.

What the kernel offers (and what VBoxService relies on):

- ``cpuN/online`` reads 0 or 1 and takes a write of either; a CPU that cannot go offline has
  no such file (usually cpu0), and a refused change is an ``OSError`` (``EBUSY`` for the last
  CPU online, for example);
- ``cpuN/topology/{core_id,physical_package_id}`` exist only while the CPU is online, so a
  CPU the host has just plugged cannot be told by its ids before it is online: VBoxService
  brings the first offline CPU online; the agent brings one online, reads its ids and, if
  they are not the host's, takes it offline again (an admin's offline CPU stays offline) and
  tries the next. Only CPUs that were not offline when monitoring started (a plugged CPU's
  directory is new) are tried at first; those that were (an admin's, say) only at the last
  look, once no new one appeared (nor refused to come online), so that an admin's CPU is
  not brought online for a moment at each plug while the kernel is still adding the new
  CPU's directory, or when the kernel will not bring the new CPU up. An online CPU that
  already has the ids is the plugged one (the kernel or a udev rule was quicker);
- ``cpuN/firmware_node`` links to the CPU's ACPI device (``LNXCPU:nn`` in the processor
  container ``ACPI0004:nn`` VirtualBox's firmware declares for each CPU), whose ``eject``
  takes "1": the write returns once the kernel has queued the removal, which then offlines
  the CPU if it still is online (and puts it back online if that fails) and runs the
  firmware's eject method, which is what tells the host it may take the CPU away (VirtualBox
  waits for that).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import structlog

from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Callable

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

DEFAULT_SYSFS_ROOT: Final = "/sys"
CPU_DIR: Final = Path("devices/system/cpu")
"""Where the CPUs are, under the sysfs root."""
_CPU_NAME: Final = re.compile(r"cpu(\d+)")
ATTRIBUTE_BYTES: Final = 64
"""The most read of one attribute: each holds one small number."""


@record
class PassedOver:
    """An offline CPU brought online for a plug that had other ids: what it had and what
    became of it (one phrase), and whether it stayed online (its offline write refused)."""

    text: str
    online: bool


@record
class CpuChange:
    """What one plug or unplug did: the CPU it concerned (None if none matched) and, if it
    did not complete, why (one line)."""

    cpu: str | None
    problem: str | None = None


class NotAnAttributeError(OSError):
    """A path under the root that is no regular file, so no sysfs attribute (a FIFO, say)."""


class CpuSysfs:
    """The CPUs under ``root`` (``/sys`` in a guest).

    Args:
        root: the sysfs mount point.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._cpus = root / CPU_DIR
        self._settled: frozenset[str] = frozenset()
        self._error: OSError | None = None
        self._warned: set[str] = set()
        """The files refused as no attribute, each warned about once."""

    @property
    def root(self) -> Path:
        """The sysfs mount point."""
        return self._root

    @property
    def cpus(self) -> Path:
        """The directory of the CPUs (``root/devices/system/cpu``)."""
        return self._cpus

    def unreadable(self) -> str | None:
        """Why the directory of the CPUs could not be listed at the last look, in one line
        (``cannot read DIR: reason``); None if it could, or before the first look."""
        error = self._error
        return None if error is None else f"cannot read {self._cpus}: {_why(error)}"

    def remember(self) -> OSError | None:
        """Note the CPUs offline now (an admin's choice, or not plugged by the host since):
        a plug tries every other offline CPU first. Until the first call, all rank alike.

        Returns why the directory of the CPUs cannot be listed (None if it can)."""
        self._settled = frozenset(name for name in self._names() if self._online(name) is False)
        return self._error

    def bring_online(
        self, core: int, package: int, checked: dict[str, PassedOver], *, settled: bool
    ) -> CpuChange | None:
        """Make the host's newly plugged CPU online; None when no offline CPU is left to try
        (nor refused to come online), a change naming the directory if it cannot be read.

        An online CPU with the ids is reported as done; otherwise the offline CPUs not in
        ``checked`` are brought online one by one (in number order) until one has the ids:
        those that were not offline when monitoring started, and with ``settled`` (the last
        look) then those that were, unless a new one refused to come online (the plugged
        CPU, most likely: the others would come online for nothing). One that has other ids
        is taken offline again and added to ``checked``, so a later look passes it over.
        """
        offline: list[str] = []
        names = self._names()
        if (unreadable := self.unreadable()) is not None:
            return CpuChange(None, unreadable)
        for name in names:
            state = self._online(name)
            if state is True and self._ids(name) == (core, package):
                return CpuChange(name)
            if state is False and name not in checked and (settled or name not in self._settled):
                offline.append(name)
        offline.sort(key=lambda name: name in self._settled)
        refused: CpuChange | None = None
        for name in offline:
            if refused is not None and name in self._settled:
                break
            try:
                self._write(name, "online", "1")
            except OSError as exc:
                refused = CpuChange(name, f"{name} refused to come online: {_why(exc)}")
                continue
            ids = self._ids(name)
            if ids == (core, package):
                return CpuChange(name)
            checked[name] = self._put_back(name, ids)
        return refused

    def take_offline(self, core: int, package: int) -> CpuChange:
        """Take the online CPU with these ids offline, then eject it through ACPI.

        Nothing is written unless the CPU's ``eject`` is there and writable (a read-only
        ``/sys`` refuses even root); a CPU whose eject write fails is brought back online, as
        the host still owns it.
        """
        names = self._names()
        if (unreadable := self.unreadable()) is not None:
            return CpuChange(None, unreadable)
        candidates = (n for n in names if self._online(n) is not False)
        name = next((n for n in candidates if self._ids(n) == (core, package)), None)
        if name is None:
            return CpuChange(None, f"no online CPU has core {core} package {package}")
        eject = self._cpus / name / "firmware_node" / "eject"
        if (problem := self._cannot_unplug(name, eject)) is not None:
            return CpuChange(name, problem)
        try:
            self._write(name, "online", "0")
        except OSError as exc:
            return CpuChange(name, f"{name} refused to go offline: {_why(exc)}")
        try:
            self._refused_if_odd(_write, eject, "1")
        except OSError as exc:
            return CpuChange(name, f"{name}'s ACPI eject failed ({_why(exc)}): {self._back(name)}")
        return CpuChange(name)

    def _cannot_unplug(self, name: str, eject: Path) -> str | None:
        """Why the CPU cannot be offlined and ejected (None if it can): checked before
        anything is written."""
        if not (self._cpus / name / "online").exists():
            return f"{name} cannot go offline (it has no online file)"
        if not eject.exists():
            return f"{name} has no ACPI eject: it stays online, the host keeps it"
        if not os.access(eject, os.W_OK):
            return f"{name}'s ACPI eject is read-only here: it stays online, the host keeps it"
        return None

    def _put_back(self, name: str, ids: tuple[int, int] | None) -> PassedOver:
        """Take an offline CPU brought online by mistake offline again; say what became of it."""
        found = "no topology" if ids is None else f"core {ids[0]} package {ids[1]}"
        try:
            self._write(name, "online", "0")
        except OSError as exc:
            return PassedOver(
                f"{name} has {found}, stays online: offline refused: {_why(exc)}",
                online=True,
            )
        self._settled |= {name}
        return PassedOver(f"{name} has {found}, offline again", online=False)

    def _back(self, name: str) -> str:
        """Bring a CPU the host still owns back online; say whether it came."""
        try:
            self._write(name, "online", "1")
        except OSError as exc:
            return f"it stays offline ({_why(exc)})"
        return "it is back online"

    def _names(self) -> list[str]:
        """The CPU directories, in number order (none if the directory cannot be read: the
        reason is kept for :meth:`unreadable`)."""
        try:
            entries = [entry.name for entry in self._cpus.iterdir()]
        except OSError as exc:
            self._error = exc
            return []
        self._error = None
        numbered = [(int(m.group(1)), name) for name in entries if (m := _CPU_NAME.fullmatch(name))]
        return [name for _, name in sorted(numbered)]

    def _online(self, name: str) -> bool | None:
        """True or False from ``online``; None without one (or with neither 0 nor 1 in it)."""
        try:
            text = self._read(self._cpus / name / "online")
        except OSError:
            return None
        return {"0": False, "1": True}.get(text)

    def _ids(self, name: str) -> tuple[int, int] | None:
        """The CPU's (core_id, physical_package_id), or None when it has no topology."""
        topology = self._cpus / name / "topology"
        try:
            return (
                int(self._read(topology / "core_id")),
                int(self._read(topology / "physical_package_id")),
            )
        except (OSError, ValueError):
            return None

    def _write(self, name: str, attribute: str, value: str) -> None:
        self._refused_if_odd(_write, self._cpus / name / attribute, value)

    def _read(self, path: Path) -> str:
        return self._refused_if_odd(_read, path)

    def _refused_if_odd(self, access: Callable[..., _T], path: Path, *args: str) -> _T:
        """``access(path, *args)``; a path that is no attribute is one warning (the first
        time) and then the OSError it is."""
        try:
            return access(path, *args)
        except NotAnAttributeError as exc:
            if exc.filename not in self._warned:
                self._warned.add(exc.filename)
                log.warning(
                    "cpu_sysfs_not_an_attribute",
                    setting="[cpuhotplug] sysfs_root",
                    path=exc.filename,
                    problem=exc.strerror,
                    outcome="taken as missing",
                )
            raise


def _read(path: Path) -> str:
    """An attribute's text, stripped (at most ``ATTRIBUTE_BYTES``)."""
    fd = _open(path, os.O_RDONLY)
    try:
        return os.read(fd, ATTRIBUTE_BYTES).decode("ascii", "replace").strip()
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    """Write an attribute in one ``write`` (sysfs takes one per open), never creating it."""
    fd = _open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def _open(path: Path, flags: int) -> int:
    """Open an attribute without blocking: a regular file (checked before and after the
    open, which is non-blocking so that a FIFO put there meanwhile cannot hold it)."""
    _check_attribute(path, os.stat(path).st_mode)
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _check_attribute(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_attribute(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((kind for is_kind, kind in _KINDS if is_kind(mode)), "no regular file")
        raise NotAnAttributeError(errno.EINVAL, f"{kind}, not a sysfs attribute", str(path))


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)
