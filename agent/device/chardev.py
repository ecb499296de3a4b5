"""The production transport: ioctls on ``/dev/vboxguest`` (or ``/dev/vboxuser``).

One :class:`CharDevTransport` is one open file descriptor, which the driver treats as one
session. Design points:

- **Threads.** Every ioctl runs in ``trio.to_thread.run_sync`` under one
  :class:`ThreadBudget` per opener, which the daemon creates once: the budget
  (``device.ioctl_threads``, at least :data:`MIN_THREADS`) is per process, however many
  sessions, waiters and HGCM clients exist, so systemd's ``TasksMax`` holds. A blocking
  call (:func:`is_blocking`: a WAIT_FOR_EVENTS or an HGCM call without a short driver
  timeout, such as the event pump's wait or a property notification) holds its thread for
  as long as the host keeps it, so the budget must cover all of them at once. Blocking
  calls in flight are counted: long HGCM calls may hold all threads but
  :data:`RESERVED_THREADS`, a WAIT_FOR_EVENTS all but those kept for short calls, prompt
  calls and interrupts, so the event pump's wait (the agent's only one) is never refused
  however many property waits are open (it may wait, as any call, while short calls hold
  the other threads; the host keeps its events latched meanwhile), and a full budget can
  never deadlock: a blocking call beyond that fails at once with
  :class:`IoctlThreadsExhaustedError`, naming the setting to raise. Short calls (any other
  ioctl; an HGCM call with at most ``SHORT_CALL_TIMEOUT_MS``, such as a property set) never
  fail for want of a thread: they wait for one. The host may hold those that wait for it
  (:func:`waits_for_host`: an HGCM call for up to its timeout, an HGCM connect or
  disconnect, which neither driver times out or lets a signal end, until
  ``Device.open_hgcm_client`` gives it up after ``SHORT_CALL_TIMEOUT_MS`` and its thread is
  abandoned and replaced), so they may not take the :data:`PROMPT_THREADS` either: those
  stay for the *prompt* calls, VMMDev requests and the driver's own calls (the heartbeat,
  the balloon, facility reports), which the host answers within the request. No call but
  INTERRUPT_ALL_WAIT_FOR_EVENTS takes the :data:`INTERRUPT_THREADS` (the driver answers it
  at once), so ending a blocked wait never waits for short calls the host holds.
- **libc, not fcntl.** Every ioctl calls libc ``ioctl`` through ctypes, which releases the
  GIL for the call and raises EINTR to the caller. ``fcntl.ioctl`` would do neither for
  every buffer: on 3.11-3.13 it keeps the GIL for buffers over 1 KiB, and from 3.14 on it
  retries EINTR itself (CPython gh-132742), which in a worker thread (where checking for
  Python signals is a no-op) never ends, so the interrupt signal could no longer end a
  blocked WAIT_FOR_EVENTS or HGCM call. It costs about a microsecond of CPU per call more
  than ``fcntl.ioctl``, next to the tens of microseconds of the worker-thread hand-off.
- **User buffers.** The address of each :class:`~agent.protocol.UserBuffer`'s memory is
  written as a little-endian u64 into the ioctl buffer; the memory stays pinned (exported)
  for the whole call, so the driver reads and writes it in place.
- **Cancellation.** Cancelling the task that awaits :meth:`CharDevTransport.ioctl` sends
  :data:`INTERRUPT_SIGNAL` to the worker thread, again with backoff until the call returns
  (a signal that lands just before the thread enters the kernel is lost). The driver ends
  interruptible waits (WAIT_FOR_EVENTS, userspace HGCM calls, which it also cancels at the
  host) with EINTR (Oracle's driver: VERR_INTERRUPTED in ``rc``), and the task then raises
  ``Cancelled``. A call that completes anyway returns normally. A call cancelled while it
  waits for a thread never runs: its :class:`~agent.protocol.Submission` stays unissued,
  which it becomes only as its thread makes the system call. A call the driver does not
  give back (an uninterruptible HGCM connect or disconnect on a host that never answers)
  is abandoned with an ``ioctl_abandoned`` log line (a warning for the first of a run of
  one code, :mod:`agent.abandons`): :data:`ABANDON_AFTER_S` after an
  explicit cancel, never past the deadline in effect when the call began, and at once
  when that deadline is what cancelled it, so no caller is held past its deadline but for
  :data:`GIVE_BACK_S`, which lets an interruptible call come back from its signal. Its
  thread stays in the kernel, keeping the buffer and its user memory alive, and the caller
  is cancelled at once. A signal lost in the gap between taking the call and entering the
  kernel may have been every one it got (a thread kept off the GIL or a CPU that long), and
  once in the driver nothing else would end an interruptible wait there (a GET_NOTIFICATION
  without timeout: until the host answers, holding its thread): so the abandoned call is
  still signalled, with the same backoff, by a trio system task, until it returns or for
  :data:`LATE_INTERRUPTS_S` at most (``late_interrupts_ended``, debug, when it is left to
  the driver after that). The end of the run cancels that task, so no stop or exit waits for
  it (trio's worker threads are daemon threads). Its thread keeps its token,
  so the budget gets one more in its place, for up to ``threads`` abandoned calls at once
  (each ``ioctl_abandoned`` line counts them); past that, every ioctl of the process fails
  at once with :class:`DeviceLostError` rather than waiting for a thread that may never
  come, and the daemon exits for systemd to restart it. So that a retried connect the host
  never answers cannot spend the budget, no HGCM connect starts while
  :data:`HELD_CONNECTS_MAX` abandoned connects are in the driver: it fails at once with
  ``ETIMEDOUT``. An abandoned thread that comes back
  takes its replacement away again (``abandoned_ioctl_returned``). An abandoned thread
  may not have entered the kernel yet (the lost signal above), so it still uses the fd
  number: the fd stays open for it, as the kernel keeps a file an ioctl is in (see Close).
  What no process can do: a thread asleep uninterruptibly in the driver ends only when the
  host answers, so until then the exiting process is not fully reaped (even SIGKILL waits
  for it) and systemd may report it as left over.
- **Close.** :meth:`CharDevTransport.aclose` is shielded but bounded by its caller's
  deadline (the device's cleanup deadline; :data:`GIVE_BACK_S` at least): the interrupt
  phase by that and :data:`ABANDON_AFTER_S`, ``close(2)`` by that and :data:`CLOSE_TIMEOUT`.
  ``close(2)`` runs on a thread of its own, and one the driver holds longer (it
  disconnects the session's HGCM clients there, waiting for the host) is abandoned with a
  ``close_abandoned`` log line. While abandoned calls are still out, ``aclose`` returns
  without ``close(2)`` (``close_deferred``): the thread of the last of them to return runs
  it (``deferred_close_done``), so no call made for this session ever lands on another
  session that ``open(2)`` gave the same, lowest free, fd number.
- **EINTR.** Retried at most :data:`EINTR_RETRIES` times, and only for a stray signal: never
  when the transport interrupted the call itself, is closing, or has passed
  INTERRUPT_ALL_WAIT_FOR_EVENTS (after which every wait on the fd fails with EINTR for good,
  so a retry would spin). The driver cancelled an HGCM call at the host before its EINTR,
  so the host may go on counting each retried attempt: their number goes to the call's
  :class:`~agent.protocol.Submission` (``retried``; an abandoned call's, as of then).
- **Signal.** ``SIGURG``: its default action is to ignore it, so a stray one never kills the
  process, and the agent uses no out-of-band socket data. An ignored signal does not
  interrupt a system call, so the opener, created once at start in the main thread,
  installs a no-op Python handler (unless one is already installed) and clears
  ``SA_RESTART``.
- **Handshake.** :meth:`CharDevOpener.open_session` performs DRIVER_VERSION_INFO on every
  fd it opens, as VbglR3 does once per fd: a refusal then fails the open with a
  :class:`DeviceUnavailableError` naming the path. The query changes no driver state, so
  the ``Device`` may repeat it on its own session. :meth:`CharDevTransport.ioctl` itself
  stays a pure byte mover.
- **One agent per driver.** :meth:`CharDevTransport.claim` holds two things, neither
  waited for, until the session closes (the process's exit releases both, however it
  ends). An exclusive ``flock(2)`` on its descriptor (:func:`flock_exclusive`), which
  belongs to the node's inode, so it also covers the node bind-mounted into a container
  with a network namespace of its own. And the abstract Unix socket name
  :data:`~agent.device.claimname.CLAIM_NAME` (:mod:`agent.device.claimname`), which stands
  for the driver itself: the driver registers two nodes, ``vboxguest`` and ``vboxuser``,
  and a copy made with ``mknod`` is a third inode, each with a lock of its own, while a
  ``vboxuser`` session may still report facility status and make HGCM calls. An abstract
  name needs no file, lives in the network namespace and goes with its socket
  (close-on-exec, listening; :meth:`CharDevTransport.serve_claim` accepts and closes
  whatever connects to it, so its queue fills only while processes connect faster than
  it is served). Both are advisory: every other open of a node (VBoxControl,
  ``vbox-agent prop``) works as before. Any process of the network namespace may bind the
  name, so it refuses a claim only when its holder listens as root or as this process's
  user (``SO_PEERCRED``); otherwise the claim rests on the node's lock alone, logged, and no
  user can keep the agent from starting by binding the name first. A copy of the node in a
  container with its own network namespace escapes both.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import fcntl
import grp
import os
import pwd
import signal
import stat
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final

import structlog
import trio

from agent.abandons import AbandonedCalls, call_kind
from agent.device.claimname import bind_claim_name
from agent.device.errors import DeviceLostError, DeviceUnavailableError, NotTheDeviceError
from agent.device.spec import NOT_THE_DEVICE_ERRNOS, shown_path
from agent.device.transport import abandon_at, given_back_by
from agent.protocol import (
    AgentError,
    DriverVersion,
    DriverVersionInfo,
    Ioctl,
    LocalProtocolError,
    RemoteProtocolError,
    VBoxStatusError,
    layouts as L,  # noqa: N812 - the layout table
)
from agent.protocol._ioc import ioc_nr
from agent.protocol.constants import (
    ABANDON_AFTER_S,
    SHORT_CALL_TIMEOUT_MS,
    IoctlFunction,
)
from agent.protocol.errors import escaped
from agent.protocol.status import VERR_NO_MEMORY

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Sequence
    from types import FrameType

    import outcome

    from agent.device.claimname import ClaimedName
    from agent.protocol import Submission, UserBuffer

    IoctlFn = Callable[[int, int, bytearray], None]
    """``ioctl_fn(fd, code, buffer)``: one blocking ioctl, run in a worker thread."""

_log = structlog.get_logger(__name__)

DEFAULT_PATH: Final = "/dev/vboxguest"
INTERRUPT_THREADS: Final = 1
"""Threads only INTERRUPT_ALL_WAIT_FOR_EVENTS may take: what ends a blocked wait finds one
however many short calls the host holds (the driver answers it without the host)."""
PROMPT_THREADS: Final = 1
"""Threads no call that waits for the host (:func:`waits_for_host`) may take: VMMDev
requests and the driver's own calls (the heartbeat, the balloon, facility reports) find one
however many HGCM connects, disconnects and calls the host holds."""
SHORT_CALL_THREADS: Final = 1
"""Threads no blocking call may take: short calls (HGCM connects and property sets
included) always progress."""
EVENT_WAIT_THREADS: Final = 1
"""Threads a long HGCM call may not take: the event pump's WAIT_FOR_EVENTS is never refused
(short calls may still hold it up until one of them returns)."""
RESERVED_THREADS: Final = (
    INTERRUPT_THREADS + PROMPT_THREADS + SHORT_CALL_THREADS + EVENT_WAIT_THREADS
)
"""Threads a long HGCM call may never take: ``N`` long waits need ``N + RESERVED_THREADS``."""
MIN_THREADS: Final = RESERVED_THREADS
"""The smallest thread budget: the event pump's wait, a short HGCM call and a prompt call
beside it, and the interrupt that ends the wait (a long HGCM call needs one more)."""
DEFAULT_THREADS: Final = 5
"""The reserved threads and one long HGCM call (a property wait)."""
INTERRUPT_SIGNAL: Final = signal.SIGURG
EINTR_RETRIES: Final = 3
CLOSE_TIMEOUT: Final = 1.0
"""Seconds ``aclose`` waits for ``close(2)`` (the driver disconnects HGCM clients there),
never past its caller's deadline."""
NO_DEVICE_ERRNOS: Final = frozenset(
    {
        *NOT_THE_DEVICE_ERRNOS,
        errno.ENOENT,
        errno.ENXIO,
        errno.ENODEV,
        errno.EACCES,
        errno.EPERM,
    }
)
"""The errnos of ``open(2)`` that mean there is no device to open: the path names no device
node (ENOENT: missing, as before the module loads; :data:`NOT_THE_DEVICE_ERRNOS`),
no driver serves the node's device number (ENXIO), the driver has no device behind it
(ENODEV), or the agent may not open it (EACCES: the node's mode and owner; EPERM: the unit's
device policy or a security module). Any other errno (EMFILE, ENFILE, ENOMEM: the driver's
open allocates the session) is a shortage that may pass, not a missing device."""
NAME_THE_NODE: Final = "name the device node (--device, or run's [device] path)"
"""The fix for a path that is not the device, as the end of its one-line message."""
VBOXGUEST_NODE_NAMES: Final = frozenset({"vboxguest", "vboxuser"})
"""The misc devices both drivers register (the in-tree ``vboxguest_linux.c`` and Oracle's
``VBoxGuest-linux.c``): ``/sys/dev/char/MAJ:MIN`` of their nodes ends in these names."""
DEFAULT_SYSFS_ROOT: Final = "/sys"
_RESIGNAL_FIRST: Final = 0.01
_RESIGNAL_MAX: Final = 1.0
LATE_INTERRUPTS_S: Final = 30.0
"""Seconds an abandoned call is still signalled after it was abandoned, with the backoff
before it (at most every ``_RESIGNAL_MAX`` s: about 30 signals), until its thread returns.
A thread kept off the GIL or a CPU between taking the call and entering the kernel loses
every signal sent meanwhile; the first one after it entered ends an interruptible wait.
This covers any delay the agent outlives: the watchdog's pings need a GET_SESSION_ID
through an ioctl thread every 15 s, so ioctl threads kept from running for the unit's
``WatchdogSec=`` (30 s) get the agent restarted anyway. A call still out then is one the
driver does not let a signal end (an HGCM connect or disconnect): it is left to the host."""
HELD_CONNECTS_MAX: Final = 2
"""Abandoned HGCM connects in the driver at which no other connect starts: it fails at once
with ``ETIMEDOUT`` (VERR_TIMEOUT, as a connect the host does not answer in time). A host
that answers no connect would otherwise cost a thread at every retry until the budget is
spent and the agent exits; one connect the host lost still lets the next one try."""
_CONNECT_HELD_BACK: Final = (
    "not sent: HGCM connects abandoned earlier are still in the driver, holding threads"
)


# --- the system calls, typed ---------------------------------------------------------------

_libc: Final = ctypes.CDLL(None, use_errno=True)
_libc_ioctl: Final = _libc.ioctl
_libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc_ioctl.restype = ctypes.c_int


def _pin(data: bytearray) -> ctypes.Array[ctypes.c_char]:
    """Return a ctypes view of ``data``; while it lives, ``data`` cannot move or resize."""
    return (ctypes.c_char * len(data)).from_buffer(data)


def foreign_call(function: Callable[..., int], *args: object) -> int:
    """Call the libc ``function`` through ctypes (the GIL is released meanwhile).

    Raises:
        OSError: the call returned a negative result; ``InterruptedError`` for EINTR,
            which is never retried here.
    """
    result = function(*args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def native_ioctl(fd: int, code: int, buffer: bytearray) -> None:
    """Perform one ioctl on ``buffer`` in place: libc ``ioctl`` through :func:`foreign_call`."""
    view = _pin(buffer)
    foreign_call(_libc_ioctl, fd, code, ctypes.addressof(view))


def flock_exclusive(fd: int) -> None:
    """Take an exclusive ``flock(2)`` on ``fd``'s file, without waiting.

    Raises:
        BlockingIOError: another open file of it holds the lock.
    """
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def signal_thread(thread_id: int) -> None:
    """Send :data:`INTERRUPT_SIGNAL` to one thread of this process."""
    signal.pthread_kill(thread_id, INTERRUPT_SIGNAL)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """Do nothing: the signal exists to make a blocked system call return EINTR."""


class IoctlThreadsExhaustedError(AgentError):
    """A blocking ioctl found every unreserved worker thread taken by other blocking calls."""


class ThreadBudget:
    """The process's ioctl worker threads: one limiter for every session of one opener.

    Attributes:
        threads: the configured number of threads.
        limiter: the tokens every ioctl's worker thread holds while it runs.
        calls: the tokens every call but an interrupt holds too.
        blocking: blocking calls (see :func:`is_blocking`) now in flight.
    """

    def __init__(self, threads: int) -> None:
        """Create the budget for ``threads`` threads (at least :data:`MIN_THREADS`).

        Raises:
            ValueError: ``threads`` is below the minimum.
        """
        if threads < MIN_THREADS:
            msg = (
                f"ioctl threads must be at least {MIN_THREADS} (the event pump's wait, a short "
                f"HGCM call, a VMMDev request and the interrupt that ends the wait), not {threads}"
            )
            raise ValueError(msg)
        self.threads = threads
        self.limiter = trio.CapacityLimiter(threads)
        self.calls = trio.CapacityLimiter(threads - INTERRUPT_THREADS)
        """Held, besides a ``limiter`` token, by every call but INTERRUPT_ALL while it has
        a thread, so :data:`INTERRUPT_THREADS` stay for the interrupts; an abandoned call
        gives its token back (its thread, still holding the ``limiter`` token, is replaced)."""
        self.host_calls = trio.CapacityLimiter(threads - INTERRUPT_THREADS - PROMPT_THREADS)
        """Held, besides a ``calls`` token, by every call that waits for the host
        (:func:`waits_for_host`), so :data:`PROMPT_THREADS` stay for the prompt calls; an
        abandoned call gives it back as it does its ``calls`` token."""
        self.blocking = 0
        self.long_hgcm_calls = 0
        """The blocking calls that are HGCM calls (not WAIT_FOR_EVENTS)."""
        self.abandoned = 0
        """Abandoned calls whose threads are still in the driver, each holding its token."""
        self.connects_held = 0
        """The HGCM connects among them (see :data:`HELD_CONNECTS_MAX`)."""
        self.connects_held_back = 0
        """Connects not sent since the held ones reached :data:`HELD_CONNECTS_MAX`."""
        self.abandons = AbandonedCalls()
        """Logs abandoned calls: a warning for the first of a run (see :mod:`agent.abandons`)."""
        self.closes_held = 0
        """``close(2)`` calls abandoned in the driver, each keeping a thread of its own."""

    def hold_back_connect(self) -> None:
        """Count a connect not sent for the abandoned connects in the driver: the first of a
        run is a warning (the connects' failure reads as the host's VERR_TIMEOUT)."""
        self.connects_held_back += 1
        (_log.warning if self.connects_held_back == 1 else _log.debug)(
            "hgcm_connect_held_back",
            connects_held=self.connects_held,
            held_back=self.connects_held_back,
            reason=_CONNECT_HELD_BACK,
        )

    def connect_returned(self) -> None:
        """An abandoned connect's thread came back: connects are sent again if they were
        held back (one line saying how many were not sent)."""
        self.connects_held -= 1
        if self.connects_held_back and self.connects_held < HELD_CONNECTS_MAX:
            _log.info("hgcm_connects_sent_again", held_back=self.connects_held_back)
            self.connects_held_back = 0

    def start_blocking(self, *, hgcm: bool) -> None:
        """Count one more blocking call in flight (a long HGCM call if ``hgcm``, else a
        WAIT_FOR_EVENTS), unless it would take a thread reserved from it.

        Raises:
            IoctlThreadsExhaustedError: blocking calls already hold every thread it may take.
        """
        kept = SHORT_CALL_THREADS + PROMPT_THREADS + INTERRUPT_THREADS
        if self.blocking >= self.threads - kept:
            msg = (
                f"{self.blocking} blocking ioctls hold all {self.threads} ioctl threads but "
                f"the {kept} kept for short calls, VMMDev requests and interrupts: a blocking "
                "call cannot start; raise device.ioctl_threads"
            )
            raise IoctlThreadsExhaustedError(msg)
        if hgcm and self.long_hgcm_calls >= self.threads - RESERVED_THREADS:
            msg = (
                f"{self.long_hgcm_calls} long HGCM calls hold all {self.threads} ioctl threads "
                f"but the {RESERVED_THREADS} kept for the event pump's wait, short calls, "
                "VMMDev requests and interrupts: a long HGCM call cannot start; raise "
                "device.ioctl_threads"
            )
            raise IoctlThreadsExhaustedError(msg)
        self.blocking += 1
        self.long_hgcm_calls += hgcm

    def tokens_for(self, code: int) -> tuple[trio.CapacityLimiter, ...]:
        """The limiters a call with ioctl ``code`` holds besides ``limiter``, in the order
        it acquires them (the narrower first, so a call waiting for it holds no other)."""
        if code == Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS:
            return ()
        if waits_for_host(code):
            return (self.host_calls, self.calls)
        return (self.calls,)

    def end_blocking(self, *, hgcm: bool) -> None:
        """Count a blocking call that returned (or was abandoned) out."""
        self.blocking -= 1
        self.long_hgcm_calls -= hgcm

    def check_usable(self) -> None:
        """Raise if more threads are abandoned in the driver than the budget allows.

        Abandoned ioctls and abandoned closes together may keep at most ``threads``
        threads, so the process stays within twice the budget plus its own threads
        (systemd's ``TasksMax``).

        Raises:
            DeviceLostError: more than ``threads`` calls are abandoned in the driver.
        """
        if self.abandoned + self.closes_held > self.threads:
            msg = (
                f"{self.abandoned} ioctls and {self.closes_held} closes were abandoned in "
                "the driver and their threads have not come back, more than the "
                f"{self.threads} the thread budget allows: the vboxguest driver no longer "
                "gives calls back"
            )
            raise DeviceLostError(msg)

    def abandon(self) -> bool:
        """Count a call abandoned in the driver; return whether its token was replaced."""
        self.abandoned += 1
        if self.abandoned > self.threads:
            return False
        self.limiter.total_tokens += 1
        return True

    def abandoned_returned(self) -> None:
        """Count out an abandoned call whose thread came back; its replacement goes.

        Runs before trio releases the returning thread's own token.
        """
        if self.abandoned <= self.threads:
            self.limiter.total_tokens -= 1
        self.abandoned -= 1
        _log.info("abandoned_ioctl_returned", abandoned=self.abandoned)


_TIMED_IOCTLS: Final[dict[int, type[L.WaitForEventsIoctl | L.HgcmCallIoctl]]] = {
    IoctlFunction.WAIT_FOR_EVENTS: L.WaitForEventsIoctl,
    IoctlFunction.HGCM_CALL_64: L.HgcmCallIoctl,
}
"""The ioctls that may block, by function: their layout holds the driver timeout."""


_HOST_WAITS: Final = frozenset(
    {
        IoctlFunction.WAIT_FOR_EVENTS,
        IoctlFunction.HGCM_CONNECT,
        IoctlFunction.HGCM_DISCONNECT,
        IoctlFunction.HGCM_CALL_32,
        IoctlFunction.HGCM_CALL_64,
    }
)


def waits_for_host(code: int) -> bool:
    """Whether the driver may keep this call waiting for the host: a WAIT_FOR_EVENTS or an
    HGCM connect, disconnect or call, whatever its timeout.

    Every other ioctl is *prompt*: a VMMDev request, which the host answers within the
    request, or a call the driver answers itself.
    """
    return ioc_nr(code) in _HOST_WAITS


def is_blocking(code: int, buffer: bytearray) -> bool:
    """Whether the driver may keep this call, and its worker thread, without a bound.

    That is a WAIT_FOR_EVENTS or an HGCM call whose ``timeout_ms`` is above
    :data:`~agent.protocol.constants.SHORT_CALL_TIMEOUT_MS` (``TIMEOUT_INFINITE`` included);
    a buffer too short to hold the timeout counts as blocking.
    """
    layout = _TIMED_IOCTLS.get(ioc_nr(code))
    if layout is None:
        return False
    if len(buffer) < layout.size:
        return True
    return layout.timeout_ms.get(buffer) > SHORT_CALL_TIMEOUT_MS


def install_interrupt_handler() -> None:
    """Make :data:`INTERRUPT_SIGNAL` interrupt system calls; call from the main thread.

    A Python or C handler already installed is kept; ``SIG_DFL`` and ``SIG_IGN`` are
    replaced by a no-op handler. ``SA_RESTART`` is cleared either way.
    """
    if signal.getsignal(INTERRUPT_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN):
        signal.signal(INTERRUPT_SIGNAL, _ignore_signal)
    signal.siginterrupt(INTERRUPT_SIGNAL, True)


# --- the transport -------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Call:
    """One ioctl in flight; ``thread`` and ``interrupted`` are guarded by the transport lock."""

    code: int
    buffer: bytearray
    pins: list[ctypes.Array[ctypes.c_char]]
    """User memory the driver may write; the worker thread keeps it alive, even abandoned."""
    token: trio.lowlevel.TrioToken
    """Where the worker thread reports that an abandoned call came back."""
    scope: trio.CancelScope = field(default_factory=lambda: trio.CancelScope(shield=True))
    """Shields the call from its caller; cancelled only to abandon it."""
    done: trio.Event = field(default_factory=trio.Event)
    thread: int | None = None
    """Ident of the worker thread while it is inside ``ioctl_fn``."""
    started: bool = False
    """A worker thread took the call (it will not touch the buffer if ``interrupted``)."""
    issued: bool = False
    """The worker thread made the system call: the driver may have the call. Final once the
    call is done or abandoned (an interrupted call that had not started never is)."""
    returned: bool = False
    """The worker thread is done with the call (it may not have reported back yet)."""
    abandoned: bool = False
    """Given up on while its thread is still in the driver."""
    interrupted: bool = False
    """The transport interrupted this call (cancellation or close)."""
    retried: int = 0
    """Attempts a stray signal ended (EINTR) that were made again."""
    cancelled: bool = False
    """The awaiting task was cancelled."""
    back: trio.Event = field(default_factory=trio.Event)
    """Set once an abandoned call's thread came back (ends its late interrupts)."""
    outcome: Exception | None = None


class CharDevTransport:
    """One open descriptor of a vboxguest character device.

    Attributes:
        driver_version: the driver's answer to the version handshake, set by the opener.
    """

    def __init__(
        self,
        fd: int,
        *,
        budget: ThreadBudget | None = None,
        ioctl_fn: IoctlFn = native_ioctl,
        close_fn: Callable[[int], None] = os.close,
        interrupt_fn: Callable[[int], None] = signal_thread,
        lock_fn: Callable[[int], None] = flock_exclusive,
        claim_name_fn: Callable[[], Awaitable[ClaimedName]] = bind_claim_name,
    ) -> None:
        """Wrap ``fd``; ``budget`` is the process's (its opener's) thread budget."""
        self.driver_version: DriverVersion | None = None
        self._fd = fd
        self._ioctl_fn = ioctl_fn
        self._close_fn = close_fn
        self._lock_fn = lock_fn
        self._claim_name_fn = claim_name_fn
        self._claimed_name: ClaimedName | None = None
        """The claim name once :meth:`claim` bound it."""
        self._interrupt_fn = interrupt_fn
        self._budget = budget if budget is not None else ThreadBudget(DEFAULT_THREADS)
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._closing = False
        self._closed = trio.Event()
        self._waits_interrupted = False
        self._in_driver = 0
        """Issued calls whose threads have not returned; guarded by the lock."""
        self._close_deferred = False
        """``aclose`` left ``close(2)`` to the last of those threads; guarded by the lock."""
        self._abandons_warned = False
        """An abandoned call of this session was logged at warning: so is the close it
        defers."""

    async def ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer] = (),
        *,
        submission: Submission | None = None,
    ) -> None:
        """Perform one ioctl in a worker thread; see :mod:`agent.device.transport`.

        Raises:
            OSError: the driver returned an errno (``InterruptedError`` when interrupted or
                abandoned).
            IoctlThreadsExhaustedError: a blocking call found no thread it may take.
            DeviceLostError: the driver keeps more abandoned calls than the budget replaces.
            trio.ClosedResourceError: the transport is closed or closing.
        """
        if self._closing:
            msg = "the vboxguest session is closed"
            raise trio.ClosedResourceError(msg)
        self._budget.check_usable()
        if self._budget.connects_held >= HELD_CONNECTS_MAX and _is_connect(code):
            await trio.lowlevel.checkpoint()
            self._budget.hold_back_connect()
            raise OSError(errno.ETIMEDOUT, _CONNECT_HELD_BACK)
        if not is_blocking(code, buffer):
            await self._ioctl(code, buffer, user_buffers, submission)
            return
        hgcm = ioc_nr(code) == IoctlFunction.HGCM_CALL_64
        self._budget.start_blocking(hgcm=hgcm)
        try:
            await self._ioctl(code, buffer, user_buffers, submission)
        finally:
            self._budget.end_blocking(hgcm=hgcm)

    async def _ioctl(
        self,
        code: int,
        buffer: bytearray,
        user_buffers: Sequence[UserBuffer],
        submission: Submission | None,
    ) -> None:
        saved, pins = _map_user_buffers(buffer, user_buffers)
        if code == Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS:
            self._waits_interrupted = True
        call = _Call(code, buffer, pins, trio.lowlevel.current_trio_token())
        del pins  # from now on the call (and its worker thread) keeps the memory exported
        deadline = trio.current_effective_deadline()
        self._calls.add(call)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._interrupt_if_cancelled, call, deadline)
                try:
                    with call.scope:
                        await self._run_in_thread(call)
                    if call.scope.cancelled_caught:  # not started, or abandoned
                        call.outcome = InterruptedError(errno.EINTR, os.strerror(errno.EINTR))
                finally:
                    call.done.set()
        finally:
            self._calls.discard(call)
            if submission is not None:
                submission.issued = call.issued
                submission.retried = call.retried
            if not call.abandoned:
                call.pins.clear()  # a traceback holding this frame must not keep them exported
        if call.issued and not call.abandoned:
            self._budget.abandons.given_back(code, buffer)
        if call.outcome is None:
            return
        for offset, original in saved:
            buffer[offset : offset + 8] = original
        if call.cancelled and isinstance(call.outcome, InterruptedError):
            await trio.lowlevel.checkpoint()  # the caller's scope is cancelled: raises Cancelled
        raise call.outcome

    async def _run_in_thread(self, call: _Call) -> None:
        """Run ``call`` on a worker thread, holding the tokens its kind takes besides the
        thread's (:meth:`ThreadBudget.tokens_for`)."""
        held: list[trio.CapacityLimiter] = []
        try:
            for tokens in self._budget.tokens_for(call.code):
                try:  # a token free now costs no trip through the scheduler
                    tokens.acquire_on_behalf_of_nowait(call)
                except trio.WouldBlock:
                    await tokens.acquire_on_behalf_of(call)
                held.append(tokens)
            call.outcome = await trio.to_thread.run_sync(
                self._perform,
                call,
                limiter=self._budget.limiter,
                thread_name="vbox-ioctl",
                abandon_on_cancel=True,
            )
        finally:
            for tokens in reversed(held):
                tokens.release_on_behalf_of(call)

    async def claim(self) -> bool:
        """Hold the driver for this process alone until the session closes: an exclusive
        ``flock(2)`` on the node and the name :data:`~agent.device.claimname.CLAIM_NAME`,
        neither waited for (asking who holds the name may take a second, see
        :mod:`agent.device.claimname`). False if another open file of the node holds the
        lock or another agent the name.

        Raises:
            trio.ClosedResourceError: the transport is closed or closing.
            DeviceUnavailableError: the name cannot be bound for another reason.
        """
        if self._closing:
            msg = "the vboxguest session is closed"
            raise trio.ClosedResourceError(msg)
        try:
            self._lock_fn(self._fd)
        except BlockingIOError:
            await trio.lowlevel.checkpoint()
            return False
        if self._claimed_name is None:
            try:
                claimed = await self._claim_name_fn()
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                msg = f"cannot claim the vboxguest driver: binding its Unix socket name: {exc}"
                raise DeviceUnavailableError(msg) from exc
            self._claimed_name = claimed  # a close now under way releases it
            if self._closed.is_set():  # closed while it asked who held the name
                claimed.release()
                msg = "the vboxguest session is closed"
                raise trio.ClosedResourceError(msg)
        else:
            await trio.lowlevel.checkpoint()
        return True

    async def serve_claim(self) -> None:
        """Accept and close the connections of whoever asks who holds the claim name, until
        cancelled or the session closes (:meth:`HeldName.serve
        <agent.device.claimname.HeldName.serve>`); returns at once without a claim."""
        if self._claimed_name is None:
            await trio.lowlevel.checkpoint()
            return
        await self._claimed_name.serve()

    async def aclose(self) -> None:
        """Interrupt pending ioctls, wait for their threads (bounded), close the fd.

        Idempotent and shielded, but never past the caller's deadline (in a
        :meth:`Device.cleanup_scope <agent.device.Device.cleanup_scope>`, the device's
        cleanup deadline) but for :data:`GIVE_BACK_S` per phase. A call still in the driver
        after :data:`ABANDON_AFTER_S`, or at that deadline, is abandoned (and signalled on
        for :data:`LATE_INTERRUPTS_S`, as a cancelled one); while one is, the fd stays open
        (``close_deferred``) and the last such call's thread closes it when the call returns,
        so none reaches a session that reuses the fd number. Otherwise
        ``close(2)`` runs at once, on a thread of its own, since the driver disconnects the
        session's HGCM clients there, waiting for the host; it is abandoned with a
        ``close_abandoned`` log line after :data:`CLOSE_TIMEOUT` seconds, or at the
        deadline (it shares no buffer).

        Raises:
            OSError: ``close(2)`` failed (only when it returned in time).
        """
        deadline = trio.current_effective_deadline()
        with trio.CancelScope(shield=True):
            if self._closing:
                with trio.move_on_at(deadline):
                    await self._closed.wait()
                return
            with self._lock:
                self._closing = True
            try:
                interrupted_by = min(trio.current_time() + ABANDON_AFTER_S, deadline)
                try:
                    await self._interrupt_until_done(
                        list(self._calls), given_back_by(interrupted_by)
                    )
                finally:  # interrupting may fail (a signal refused): the fd still goes
                    await self._close_or_defer(deadline)
            finally:
                if self._claimed_name is not None:
                    self._claimed_name.release()
                self._closed.set()

    async def _close_or_defer(self, deadline: float) -> None:
        """Close the fd, or leave it to the last abandoned call still in the driver."""
        with self._lock:
            in_driver = self._in_driver
            self._close_deferred = in_driver > 0
        if in_driver:
            (_log.warning if self._abandons_warned else _log.debug)(
                "close_deferred",
                in_driver=in_driver,
                reason="abandoned ioctls are still in the driver: the last to return "
                "closes the fd, so none reaches a session that reuses its number",
            )
            return
        closed_by = min(trio.current_time() + CLOSE_TIMEOUT, deadline)
        await self._close_fd(given_back_by(closed_by))

    async def _close_fd(self, deadline: float) -> None:
        """Start ``close(2)`` on a thread of its own and wait for it until ``deadline``."""
        token = trio.lowlevel.current_trio_token()
        closed = trio.Event()
        result: list[outcome.Outcome[None]] = []
        abandoned: list[bool] = []

        def finished() -> None:
            closed.set()
            if abandoned:  # counted out of the budget, as an abandoned ioctl is
                self._budget.closes_held -= 1
                _log.info("abandoned_close_returned", closes_held=self._budget.closes_held)

        def deliver(closing: outcome.Outcome[None]) -> None:
            result.append(closing)
            try:
                token.run_sync_soon(finished)
            except trio.RunFinishedError:  # pragma: no cover - the process is ending
                return

        began = trio.current_time()
        trio.lowlevel.start_thread_soon(
            partial(self._close_fn, self._fd), deliver, name="vbox-close"
        )
        with trio.move_on_at(deadline):
            await closed.wait()
        if closed.is_set():
            result[0].unwrap()
            return
        abandoned.append(True)
        self._budget.closes_held += 1
        _log.warning(
            "close_abandoned",
            after_s=round(trio.current_time() - began, 3),
            closes_held=self._budget.closes_held,
            reason="the driver did not finish close(2) in time (it disconnects the "
            "session's HGCM clients there, waiting for the host)",
        )

    async def _interrupt_if_cancelled(self, call: _Call, deadline: float) -> None:
        """Interrupt ``call`` once its caller is cancelled; ``deadline`` is the caller's, in
        effect when the call began."""
        try:
            await call.done.wait()
        except trio.Cancelled as cancelled:
            # Swallowed on purpose: cancellation is level-triggered, so ioctl() raises a
            # fresh Cancelled after the nursery, outside any exception group.
            call.cancelled = True
            with trio.CancelScope(shield=True):
                await self._interrupt_until_done([call], abandon_at(cancelled, deadline))

    async def _interrupt_until_done(self, calls: Iterable[_Call], deadline: float) -> None:
        """Signal ``calls`` with backoff until they return; abandon them at ``deadline``.

        Each is signalled at least once, even when ``deadline`` has passed. One that had not
        reached the driver never runs and is not abandoned: it comes back at once.
        """
        pending = [call for call in calls if not call.done.is_set()]
        began = trio.current_time()
        delay = _RESIGNAL_FIRST
        with trio.move_on_at(deadline):
            while pending:
                with self._lock:
                    for call in pending:
                        call.interrupted = True
                        if not call.started:
                            call.scope.cancel()  # waiting for a thread: it never runs
                        elif call.thread is not None:
                            self._interrupt_fn(call.thread)
                with trio.move_on_after(delay):
                    for call in pending:
                        await call.done.wait()
                pending = [call for call in pending if not call.done.is_set()]
                delay = min(2 * delay, _RESIGNAL_MAX)
        for call in pending:
            with self._lock:  # once only: another interrupter may have abandoned it already
                newly_abandoned = call.started and not call.returned and not call.abandoned
                call.abandoned = call.abandoned or newly_abandoned
            if newly_abandoned:
                replaced = self._budget.abandon()
                self._budget.connects_held += _is_connect(call.code)
                self._abandons_warned |= self._budget.abandons.abandoned(
                    call.code,
                    call.buffer,
                    after_s=round(trio.current_time() - began, 3),
                    reason="the driver did not give the call back after interrupts",
                    abandoned=self._budget.abandoned,
                    thread_replaced=replaced,
                )
                trio.lowlevel.spawn_system_task(
                    self._interrupt_late,
                    call,
                    delay,
                    name="vbox-ioctl-late-interrupts",
                    context=contextvars.copy_context(),  # the caller's log fields (its service)
                )
                call.scope.cancel()
            await call.done.wait()

    async def _interrupt_late(self, call: _Call, delay: float) -> None:
        """Signal the abandoned ``call`` again, ``delay`` first and with backoff, until it
        returns or for :data:`LATE_INTERRUPTS_S`; a system task, which the run's end cancels.

        Its thread may have lost every earlier signal before it entered the kernel.
        """
        began = trio.current_time()
        signals = 0
        with trio.move_on_after(LATE_INTERRUPTS_S):
            while True:
                with trio.move_on_after(delay):
                    await call.back.wait()
                    return
                with self._lock:
                    if call.thread is not None:  # else it returned: its report is on its way
                        self._interrupt_fn(call.thread)
                        signals += 1
                delay = min(2 * delay, _RESIGNAL_MAX)
        _log.debug(
            "late_interrupts_ended",
            code=f"{call.code:#x}",
            kind=call_kind(call.code, call.buffer)[1],
            signals=signals,
            after_s=round(trio.current_time() - began, 3),
            reason="the driver did not give the abandoned call back after interrupts: it is "
            "left to the host",
        )

    def _perform(self, call: _Call) -> Exception | None:
        """Run in the worker thread: the ioctl with the EINTR policy; return its error."""
        with self._lock:
            call.started = True
            refusal: Exception | None = None
            if self._closing:
                refusal = trio.ClosedResourceError("the vboxguest session was closed")
            elif call.interrupted:
                refusal = InterruptedError(errno.EINTR, os.strerror(errno.EINTR))
            if refusal is not None:
                call.returned = True
                return refusal
            call.thread = threading.get_ident()
            call.issued = True
            self._in_driver += 1
        try:
            while True:
                try:
                    self._ioctl_fn(self._fd, call.code, call.buffer)
                except InterruptedError as exc:
                    if call.retried >= EINTR_RETRIES or not self._may_retry(call):
                        return exc
                    call.retried += 1
                except OSError as exc:
                    return exc
                else:
                    return None
        finally:
            with self._lock:
                call.thread = None
                call.returned = True
                self._in_driver -= 1
                last = self._close_deferred and not self._in_driver
                if last:
                    self._close_deferred = False
            if last:
                self._close_last(call)
            if call.abandoned:
                self._report_return(call, partial(self._abandoned_returned, call))

    def _abandoned_returned(self, call: _Call) -> None:
        """An abandoned call's thread came back: count it out of the budget."""
        call.back.set()
        if _is_connect(call.code):
            self._budget.connect_returned()
        self._budget.abandoned_returned()

    def _close_last(self, call: _Call) -> None:
        """In the worker thread of the last call ``aclose`` left in the driver: ``close(2)``,
        reported with a ``deferred_close_done`` log line."""
        error: OSError | None = None
        try:
            self._close_fn(self._fd)
        except OSError as exc:
            error = exc
        self._report_return(call, partial(_log_deferred_close, error))

    def _report_return(self, call: _Call, report: Callable[[], object]) -> None:
        """In the worker thread: have the trio thread run ``report`` (a returned abandoned call
        gives its extra token back)."""
        try:
            call.token.run_sync_soon(report)
        except trio.RunFinishedError:  # pragma: no cover - the process is ending
            return

    def _may_retry(self, call: _Call) -> bool:
        """Whether an EINTR of ``call`` came from a stray signal, not from this transport."""
        return not (call.interrupted or self._closing or self._waits_interrupted)


def _is_connect(code: int) -> bool:
    """Whether ioctl ``code`` is an HGCM connect."""
    return ioc_nr(code) == IoctlFunction.HGCM_CONNECT


def _log_deferred_close(error: OSError | None) -> None:
    """Log the ``close(2)`` that the last abandoned call's thread ran for ``aclose``."""
    if error is None:
        _log.info("deferred_close_done")
    else:
        _log.warning("deferred_close_failed", error=str(error))


def _map_user_buffers(
    buffer: bytearray, user_buffers: Sequence[UserBuffer]
) -> tuple[list[tuple[int, bytes]], list[ctypes.Array[ctypes.c_char]]]:
    """Store each user buffer's address in ``buffer``; return the old bytes and the pins.

    The old bytes restore ``buffer`` when the call fails; the pins keep the memory in place
    until the caller drops them.
    """
    saved: list[tuple[int, bytes]] = []
    for user in user_buffers:
        offset = user.address_offset
        if not 0 <= offset <= len(buffer) - 8:
            msg = f"user buffer address field at {offset} is outside the {len(buffer)}-byte buffer"
            raise LocalProtocolError(msg)
        saved.append((offset, bytes(buffer[offset : offset + 8])))
    pinned = [_pin(user.data) for user in user_buffers]
    for (offset, _), view in zip(saved, pinned, strict=True):
        buffer[offset : offset + 8] = ctypes.addressof(view).to_bytes(8, "little")
    return saved, pinned


# --- the opener ----------------------------------------------------------------------------


class CharDevOpener:
    """Opens sessions on a vboxguest character device, one fd each."""

    def __init__(
        self,
        path: str = DEFAULT_PATH,
        *,
        threads: int = DEFAULT_THREADS,
        ioctl_fn: IoctlFn = native_ioctl,
        open_fn: Callable[[str, int], int] = os.open,
        close_fn: Callable[[int], None] = os.close,
        interrupt_fn: Callable[[int], None] = signal_thread,
        lock_fn: Callable[[int], None] = flock_exclusive,
        claim_name_fn: Callable[[], Awaitable[ClaimedName]] = bind_claim_name,
        sysfs_root: str = DEFAULT_SYSFS_ROOT,
    ) -> None:
        """Create the opener; the ``*_fn`` arguments replace the system calls in tests.

        Args:
            path: the device node.
            threads: worker threads for all its sessions together (at least
                :data:`MIN_THREADS`): the process's budget.
            ioctl_fn: ``ioctl_fn(fd, code, buffer)``, blocking, run in a worker thread.
            open_fn: ``open_fn(path, flags) -> fd``, as ``os.open``.
            close_fn: ``close_fn(fd)``, as ``os.close``.
            interrupt_fn: makes the ioctl of the worker thread with that ident return
                EINTR (default: :func:`signal_thread`).
            lock_fn: ``lock_fn(fd)``, an exclusive lock not waited for, raising
                ``BlockingIOError`` when held elsewhere (default: :func:`flock_exclusive`).
            claim_name_fn: binds the driver's claim name and returns it, to serve and
                release, raising ``OSError`` EADDRINUSE when another agent holds it
                (default: :func:`~agent.device.claimname.bind_claim_name`).
            sysfs_root: where sysfs is mounted: a failed open or handshake asks its
                ``dev/char`` what the node is (:func:`foreign_node`).
        """
        self._path = path
        self._sysfs_root = sysfs_root
        self._budget = ThreadBudget(threads)
        self._ioctl_fn = ioctl_fn
        self._open_fn = open_fn
        self._close_fn = close_fn
        self._interrupt_fn = interrupt_fn
        self._lock_fn = lock_fn
        self._claim_name_fn = claim_name_fn
        if interrupt_fn is signal_thread:
            install_interrupt_handler()

    @property
    def description(self) -> str:
        """The device path."""
        return shown_path(self._path)

    @property
    def simulated(self) -> bool:
        """False: a device node leads to this machine's driver."""
        return False

    async def open_session(self) -> CharDevTransport:
        """Open the node, agree on the ioctl interface version and return the session.

        Raises:
            NotTheDeviceError: the path cannot be the device: a directory, a bad path, a
                file that is no vboxguest node (the handshake's ioctl is unknown to it), or
                what :func:`foreign_node` proves is not one (a socket, another device).
            DeviceUnavailableError: the node is missing, not accessible, not backed by a
                VirtualBox device, or its driver refuses our interface version.
            OSError: ``open(2)`` failed for want of something that may come back (see
                :data:`NO_DEVICE_ERRNOS`): descriptors (EMFILE, ENFILE), kernel memory
                (ENOMEM); or the handshake did, for want of kernel memory or to stray
                signals. The device is not gone: a service retries, as after any failure.
        """
        await trio.lowlevel.checkpoint()
        try:
            fd = self._open_fn(self._path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in NOT_THE_DEVICE_ERRNOS:
                raise NotTheDeviceError(open_failure(self._path, exc)) from exc
            if exc.errno in (errno.ENXIO, errno.ENODEV) and (
                foreign := foreign_node(self._path, self._sysfs_root)
            ):
                raise NotTheDeviceError(foreign) from exc
            if exc.errno in NO_DEVICE_ERRNOS:
                raise DeviceUnavailableError(open_failure(self._path, exc)) from exc
            raise OSError(exc.errno, open_failure(self._path, exc)) from exc
        transport = CharDevTransport(
            fd,
            budget=self._budget,
            ioctl_fn=self._ioctl_fn,
            close_fn=self._close_fn,
            interrupt_fn=self._interrupt_fn,
            lock_fn=self._lock_fn,
            claim_name_fn=self._claim_name_fn,
        )
        try:
            transport.driver_version = await self._handshake(transport)
        except BaseException:
            await transport.aclose()
            raise
        return transport

    async def _handshake(self, transport: CharDevTransport) -> DriverVersion:
        request = DriverVersionInfo()
        call = request.encode()
        path = shown_path(self._path)
        try:
            await transport.ioctl(call.code, call.buffer)
            return request.decode(call)
        except (VBoxStatusError, OSError) as exc:
            if _passing(exc):
                msg = (
                    f"the vboxguest version handshake on {path} failed ({_reason(exc)}), a "
                    "shortage that may pass, not a missing device"
                )
                raise OSError(errno.ENOMEM if exc.errno is None else exc.errno, msg) from exc
            if exc.errno == errno.ENOTTY:
                # Both drivers know the version request whatever their interface version;
                # a file without this ioctl (a regular file, /dev/null) is not the device.
                msg = (
                    f"{path} is not a vboxguest device: it did not answer the vboxguest "
                    f"version handshake (ENOTTY); {NAME_THE_NODE}"
                )
                raise NotTheDeviceError(msg) from exc
            if not isinstance(exc, VBoxStatusError) and (
                foreign := foreign_node(self._path, self._sysfs_root)
            ):
                # Another driver's node may answer an unknown ioctl with EINVAL (/dev/random)
                # or anything else: that is no version the vboxguest driver refused.
                raise NotTheDeviceError(foreign) from exc
            refused = isinstance(exc, VBoxStatusError) or exc.errno == errno.EINVAL
            if not refused:
                msg = f"{path} did not answer the vboxguest version handshake ({_reason(exc)})"
                raise DeviceUnavailableError(msg) from exc
            msg = (
                f"the vboxguest driver behind {path} refused ioctl interface version "
                f"{request.req_version:#010x} ({_reason(exc)}): its ioctl interface is "
                "incompatible with this agent"
            )
            raise DeviceUnavailableError(msg) from exc
        except RemoteProtocolError as exc:
            msg = f"the vboxguest driver behind {path} broke the version handshake: {exc}"
            raise DeviceUnavailableError(msg) from exc


def _passing(exc: VBoxStatusError | OSError) -> bool:
    """Whether a handshake failed for a reason that may pass: no kernel memory for the call
    (the driver allocates its buffer: ENOMEM, or VERR_NO_MEMORY in ``rc`` from Oracle's
    driver), or stray signals past the transport's retries (EINTR)."""
    if isinstance(exc, VBoxStatusError):
        return exc.rc == VERR_NO_MEMORY
    return exc.errno in (errno.ENOMEM, errno.EINTR)


def _reason(exc: VBoxStatusError | OSError) -> str:
    if isinstance(exc, VBoxStatusError):
        return exc.name
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def cannot_be_the_node(path: str, sysfs_root: str = DEFAULT_SYSFS_ROOT) -> str | None:
    """Return why :meth:`CharDevOpener.open_session` would raise :class:`NotTheDeviceError`
    for ``path`` whatever loads later, as far as ``stat`` shows without opening it, or None
    (a missing node included: the module may load later).

    That is a path ``open(2)`` refuses as :data:`NOT_THE_DEVICE_ERRNOS` (``stat`` fails
    alike, but for a directory: EISDIR), with the open's own line, or a
    :func:`foreign_node`. ``vbox-agent check-config`` refuses such a ``[device] path``, as
    ``run`` would at its next start.
    """
    try:
        status = os.stat(path)
    except OSError as exc:
        return open_failure(path, exc) if exc.errno in NOT_THE_DEVICE_ERRNOS else None
    if stat.S_ISDIR(status.st_mode):
        return open_failure(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    return foreign_node(path, sysfs_root)


def foreign_node(path: str, sysfs_root: str = DEFAULT_SYSFS_ROOT) -> str | None:
    """Return why ``path`` cannot be the vboxguest device, in one line ending with the fix,
    or None when it may be (or nothing tells).

    A Unix socket cannot be (a simulated host's socket is named ``unix:PATH``), nor a
    regular file or a FIFO (no driver behind it: the handshake's ioctl fails, with ENOTTY),
    nor a block device, nor a character device that sysfs names other than ``vboxguest`` or
    ``vboxuser`` (``/sys/dev/char/MAJ:MIN`` links to the device's directory). Where
    ``stat`` fails, or sysfs has no entry for the node (no ``/sys``), nothing is proven.
    """
    shown = shown_path(path)
    try:
        mode = os.stat(path)
    except OSError:
        return None
    if stat.S_ISSOCK(mode.st_mode):
        return (
            f"{shown} is a Unix socket, not the vboxguest device: for a simulated host "
            f"listening there write unix:{shown} (--device, or run's [device] path)"
        )
    if stat.S_ISREG(mode.st_mode):
        name: str | None = "a regular file"
    elif stat.S_ISFIFO(mode.st_mode):
        name = "a FIFO"
    elif stat.S_ISBLK(mode.st_mode):
        name = "a block device"
    elif stat.S_ISCHR(mode.st_mode):
        name = _sysfs_char_name(mode.st_rdev, sysfs_root)
    else:
        name = None
    if name is None or name in VBOXGUEST_NODE_NAMES:
        return None
    return f"{shown} is not a vboxguest device (it is {escaped(name)}); {NAME_THE_NODE}"


def _sysfs_char_name(rdev: int, sysfs_root: str) -> str | None:
    """The name sysfs gives the character device ``rdev``, or None if it has no entry."""
    entry = os.path.join(sysfs_root, "dev", "char", f"{os.major(rdev)}:{os.minor(rdev)}")
    try:
        return os.path.basename(os.readlink(entry)) or None
    except OSError:
        return None


def open_failure(path: str, exc: OSError) -> str:
    """Return the one-line reason ``os.open(path)`` failed with ``exc`` and what to do."""
    shown = shown_path(path)
    if exc.errno == errno.ENOENT:
        return (
            f"{shown} does not exist: load the vboxguest kernel module (modprobe vboxguest), "
            "or name the right device node (--device, or run's [device] path)"
        )
    if exc.errno in NOT_THE_DEVICE_ERRNOS:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return (
            f"{shown} cannot be the vboxguest device: {exc.strerror or exc} ({name}); "
            f"{NAME_THE_NODE}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied opening {shown}{_node_owner(path)}: run as root or add the "
            "user to the node's group (/dev/vboxuser is for unprivileged use)"
        )
    if exc.errno in (errno.ENXIO, errno.ENODEV):
        return f"no VirtualBox device behind {shown} (not running in VirtualBox?)"
    if exc.errno not in NO_DEVICE_ERRNOS:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return (
            f"cannot open a session on {shown}: {exc.strerror or exc} ({name}), a shortage "
            "that may pass, not a missing device"
        )
    return f"cannot open {shown}: {exc.strerror or exc}"


def _node_owner(path: str) -> str:
    """Return `` (mode 0600, owner root:root)`` for ``path``, or nothing if stat fails."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f" (mode {stat.S_IMODE(st.st_mode):04o}, owner {_user(st.st_uid)}:{_group(st.st_gid)})"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
