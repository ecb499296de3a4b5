"""Real memory pressure for a test: a process thrashing file pages in a scratch memory cgroup.

The cgroup's limit is far below the file the process reads over and over, so every page it
faults in is charged past the limit and the kernel reclaims inside the cgroup: memory stall
(PSI ``some``) for the whole system's ``/proc/pressure/memory`` within a second. The file is
sparse (its holes read as zero pages, no disk I/O) on the test's ``tmp_path``, and the process
ends by itself after :data:`THRASH_S`, or with the test process, however the test goes (a
scratch cgroup a killed run left is removed by the next). Needs root and a memory
cgroup the test may make a child of (a cgroup v1 memory hierarchy, or a v2 cgroup whose
``cgroup.subtree_control`` enables memory); :func:`scratch_parent` says why not otherwise.
On a ``tmp_path`` in tmpfs the file's pages cannot be reclaimed (no swap): the cgroup's OOM
killer ends the process instead (``SIGKILL``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from agent.services.balloon._cgroup import memory_cgroups

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

LIMIT_BYTES: Final = 32 << 20
FILE_BYTES: Final = 128 << 20
THRASH_S: Final = 30
SCRATCH_PREFIX: Final = "vbox-agent-test-thrash-"
"""The scratch cgroup's name, before the pid of the test process that made it and a random
part (pids repeat across PID namespaces and runs)."""
STALE_AFTER_S: Final = 600
"""Age past which a scratch cgroup is a killed run's: a run removes its own within
:data:`THRASH_S` of making it."""
_THRASH: Final = """
import ctypes, mmap, os, signal, sys, time
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: ends with pytest
if os.getppid() != int(sys.argv[4]):
    sys.exit("the test ended before the thrasher started")
with open(sys.argv[2], "w") as procs:  # into the scratch cgroup before the first page
    procs.write(str(os.getpid()))
pages = mmap.mmap(os.open(sys.argv[1], os.O_RDONLY), 0, prot=mmap.PROT_READ)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    for offset in range(0, len(pages), mmap.PAGESIZE):
        pages[offset]
"""


def scratch_parent() -> tuple[Path, str] | str:
    """This process's memory cgroup, to make a scratch child in, and the child's limit file;
    or why there is none."""
    dirs = memory_cgroups()
    if not dirs or not dirs[0].is_dir():
        return "this process is in no memory cgroup it can see"
    leaf = dirs[0]
    if not os.access(leaf, os.W_OK):  # not root, or a read-only mount (ProtectControlGroups=)
        return f"cannot make a cgroup in {leaf}: not writable by this process"
    if (leaf / "memory.limit_in_bytes").exists():
        return leaf, "memory.limit_in_bytes"
    try:
        controllers = (leaf / "cgroup.subtree_control").read_text().split()
    except OSError as exc:
        return f"cannot read {leaf}/cgroup.subtree_control: {exc.strerror}"
    if "memory" not in controllers:
        return f"{leaf} does not enable the memory controller for its children"
    return leaf, "memory.max"


@contextmanager
def thrashing(tmp_path: Path, parent: Path, limit_name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Thrash file pages in a scratch child of ``parent`` for the block (or :data:`THRASH_S`);
    the process is killed and the cgroup removed when it ends."""
    pages = tmp_path / "thrash.bin"
    with pages.open("wb") as file:
        file.truncate(FILE_BYTES)
    _remove_stale(parent)
    scratch = parent / f"{SCRATCH_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        (scratch / limit_name).write_text(str(LIMIT_BYTES))
        args = [sys.executable, "-c", _THRASH, str(pages), str(scratch / "cgroup.procs")]
        with subprocess.Popen([*args, str(THRASH_S), str(os.getpid())]) as process:
            try:
                yield process
            finally:
                process.kill()
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.rmdir()  # empty: the process was reaped when its block ended


def _remove_stale(parent: Path) -> None:
    """Remove the scratch cgroups runs ended by a signal left (SIGTERM from a job's time limit
    skips the block's cleanup; the thrasher died with its test process, ``PR_SET_PDEATHSIG``):
    those made over :data:`STALE_AFTER_S` ago, which no run still holds (a pid would not say,
    as runs in other PID namespaces share the cgroup tree). One with a process left in it
    refuses to go (EBUSY) and stays."""
    too_old = time.time() - STALE_AFTER_S
    for stale in parent.glob(f"{SCRATCH_PREFIX}*"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < too_old:
                stale.rmdir()
