"""The CPU scheduling ``systemd/vbox-agent.service`` gives the agent, for tests and benches.

The heartbeat's end-to-end test and ``bench/heartbeat.py`` run the agent as the unit runs
it: :func:`unit_scheduling` reads ``Nice=``, ``CPUSchedulingPolicy=``,
``CPUSchedulingPriority=`` and ``CPUSchedulingResetOnFork=`` from the unit's ``[Service]``
section (the last assignment wins, as in systemd), so they never measure a copy that
drifted from the shipped file. Start the agent as systemd does: in a session of its own
(``start_new_session=True``: systemd calls ``setsid``, and with autogroups a session is a
scheduling group of its own), then :meth:`Scheduling.apply` to its pid, before it starts a
thread (it starts none before its event loop runs).

The simulated host stands for the hypervisor, which guest load never delays:
:func:`host_scheduling` puts it above the agent, so what the host measures is the agent.

The unit's real-time priority puts the agent ahead of every SCHED_OTHER task, not ahead of
other real-time ones: an agent starting at the same priority (half a second of imports) or a
host one above it takes the CPU from the agent being measured, and its beats come tens of ms
late. Whoever runs processes at these priorities to time them (the end-to-end heartbeat
tests, ``bench/heartbeat.py``) holds :func:`realtime_slot` while they run, so suites run side
by side on one machine take turns instead of measuring each other.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

UNIT: Final = Path(__file__).parents[1] / "systemd" / "vbox-agent.service"
POLICIES: Final = {
    "other": os.SCHED_OTHER,
    "batch": os.SCHED_BATCH,
    "idle": os.SCHED_IDLE,
    "fifo": os.SCHED_FIFO,
    "rr": os.SCHED_RR,
}
"""``CPUSchedulingPolicy=`` values and the policies they name."""
REALTIME: Final = frozenset({"fifo", "rr"})
SCHED_RESET_ON_FORK: Final = 0x4000_0000
"""The flag ORed into the policy by ``CPUSchedulingResetOnFork=yes`` (``<sched.h>``)."""
REALTIME_LOCK: Final = Path(tempfile.gettempdir()) / "vbox-agent-realtime.lock"
"""The lock file of :func:`realtime_slot`, one per machine (every worktree's suite uses it)."""
REALTIME_SLOT_WAIT_S: Final = 600.0
"""How long :func:`realtime_slot` waits for the slot: a few other suites' heartbeat tests."""
REALTIME_SLOT_POLL_S: Final = 0.05
"""How often :func:`realtime_slot` tries the lock while another run holds it."""
HOST_NICE: Final = -10
"""The host's nice when the agent is not real-time (a nice above any the unit may give)."""
BOOLEANS: Final = dict.fromkeys(("yes", "true", "on", "1"), True) | dict.fromkeys(
    ("no", "false", "off", "0"), False
)
"""How systemd spells a boolean."""


@dataclass(frozen=True, slots=True)
class Scheduling:
    """A process's CPU scheduling: policy (systemd's name), real-time priority, nice."""

    policy: str = "other"
    priority: int = 0
    nice: int = 0
    reset_on_fork: bool = False

    @property
    def realtime(self) -> bool:
        """Whether the policy is SCHED_FIFO or SCHED_RR."""
        return self.policy in REALTIME

    def describe(self) -> str:
        """``SCHED_RR priority 1``, ``nice -10``..."""
        if self.realtime:
            text = f"SCHED_{self.policy.upper()} priority {self.priority}"
            return text + (", reset on fork" if self.reset_on_fork else "")
        return f"SCHED_{self.policy.upper()} nice {self.nice}"

    def apply(self, pid: int) -> None:
        """Give every thread of ``pid`` this scheduling (0: the calling process).

        Raises:
            PermissionError: this user may not raise the priority that far.
        """
        policy = POLICIES[self.policy] | (SCHED_RESET_ON_FORK if self.reset_on_fork else 0)
        param = os.sched_param(self.priority)
        for tid in _threads(pid):
            os.setpriority(os.PRIO_PROCESS, tid, self.nice)
            os.sched_setscheduler(tid, policy, param)


PLAIN: Final = Scheduling()
"""A process's scheduling when nobody chooses one: SCHED_OTHER at nice 0."""


def unit_scheduling(unit: Path = UNIT) -> Scheduling:
    """The scheduling ``unit``'s ``[Service]`` section asks systemd for.

    Raises:
        ValueError: a value systemd would refuse, or a real-time policy without a priority.
    """
    settings: dict[str, str] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    where = f"{unit}: [Service]"
    policy = settings.get("CPUSchedulingPolicy", "other")
    if policy not in POLICIES:
        msg = f"{where} CPUSchedulingPolicy={policy} is none of {', '.join(POLICIES)}"
        raise ValueError(msg)
    if policy in REALTIME and "CPUSchedulingPriority" not in settings:
        msg = f"{where} CPUSchedulingPolicy={policy} needs a CPUSchedulingPriority="
        raise ValueError(msg)
    reset = settings.get("CPUSchedulingResetOnFork", "no").lower()
    if reset not in BOOLEANS:
        msg = f"{where} CPUSchedulingResetOnFork={reset} is not a boolean"
        raise ValueError(msg)
    return Scheduling(
        policy=policy,
        priority=int(settings.get("CPUSchedulingPriority", "0")),
        nice=int(settings.get("Nice", "0")),
        reset_on_fork=BOOLEANS[reset],
    )


def host_scheduling(agent: Scheduling) -> Scheduling:
    """A scheduling for the simulated host that guest processes never delay.

    One real-time priority above a real-time agent (SCHED_FIFO), else ``HOST_NICE``. Reset on
    fork, so processes the host's process starts (hogs, the agent) begin at SCHED_OTHER.
    """
    if agent.realtime:
        return Scheduling(policy="fifo", priority=agent.priority + 1, reset_on_fork=True)
    return Scheduling(nice=min(HOST_NICE, agent.nice - 1), reset_on_fork=True)


def _threads(pid: int) -> list[int]:
    """The thread ids of ``pid`` (0: the calling process)."""
    task = Path(f"/proc/{pid or 'self'}/task")
    return [int(entry.name) for entry in task.iterdir()]


@contextmanager
def realtime_slot(
    lock: Path = REALTIME_LOCK, wait_s: float = REALTIME_SLOT_WAIT_S
) -> Iterator[None]:
    """Hold the machine's one slot for timing real-time processes (an exclusive ``flock`` on
    ``lock``, released on exit, or by the kernel when the holder dies).

    Raises:
        TimeoutError: another holder kept the slot for ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    with lock.open("a") as file:
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    msg = f"{lock}: another run held the real-time slot for {wait_s:g} s"
                    raise TimeoutError(msg) from None
                time.sleep(REALTIME_SLOT_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)
