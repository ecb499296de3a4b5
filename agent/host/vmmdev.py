"""The simulated VMMDev PCI device: the request port, the event line and the host's state.

The guest writes the physical address of a request to the port (:meth:`VMMDev.submit`); the
device handles it exactly as the host's port handler does:

1. header unreadable, ``size < 24`` or ``version != 0x10001``: ignored, nothing written;
2. ``size > 1 MiB``: ``VERR_NOT_SUPPORTED`` in the header;
3. before a good REPORT_GUEST_INFO only types 4, 50, 58 and 218 are served, the rest get
   ``VERR_NOT_SUPPORTED``;
4. an injected fault answers instead of the handler;
5. unknown type: ``VERR_NOT_IMPLEMENTED``; wrong size: ``VERR_INVALID_PARAMETER``;
6. the handler runs and the whole request is written back (HGCM requests answer later).

The device has no display, pointer, seamless, VRDP, credentials, patch-memory, power or
page-sharing model. So it answers ``VERR_NOT_IMPLEMENTED`` to these types, which a real
host handles: SET_POINTER_SHAPE (3), REGISTER/DEREGISTER_PATCH_MEMORY (22, 23),
SET_POWER_STATUS (30), GET_DISPLAY_CHANGE_REQ (51), VIDEMODE_SUPPORTED (52),
GET_HEIGHT_REDUCTION (53), GET_DISPLAY_CHANGE_REQ2 (54), VIDEMODE_SUPPORTED2 (57),
VIDEO_ACCEL_ENABLE/FLUSH (70, 71), VIDEO_SET_VISIBLE_REGION (72), GET_SEAMLESS_CHANGE_REQ
(73), GET_DISPLAY_CHANGE_REQEX/MULTI (80, 81), QUERY_CREDENTIALS (100),
REPORT_CREDENTIALS_JUDGEMENT (101), GET_VRDPCHANGE_REQ (150), the page-sharing requests
(212-216) and VIDEO_UPDATE_MONITOR_POSITIONS (222). LOG_STRING (200) is handled only by
debug builds: a release host answers ``VERR_NOT_IMPLEMENTED`` as this one does.

Events follow VMMDevNotifyGuest: pending events outside the guest filter stay pending; the
interrupt line (``have_events``) rises when ``pending & filter`` becomes non-zero and falls
at ACKNOWLEDGE_EVENTS; a filter change while events are deliverable waits for the next ack;
the guest can never clear the HGCM bit; nothing is delivered before the additions reported.
"""

from __future__ import annotations

import random
import struct
import time
from collections import Counter, deque
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NoReturn, final

import trio

from agent.host import _header_fields as H  # noqa: N812 - see the module
from agent.host._balloon import HostBalloon
from agent.host._cpu_hotplug import HostCpuHotPlug
from agent.host._facilities import FacilityTable
from agent.host._faults import FaultInjector, request_name
from agent.host._guest_info import GET_MOUSE_STATUS_EX, GuestInfo
from agent.host._heartbeat import DEFAULT_INTERVAL_NS, HeartbeatMonitor
from agent.host._hgcm_clients import GUEST_INFO2_F_REQUESTOR_INFO
from agent.host._release import RELEASE
from agent.host._stats import GUEST_CPUS, HostGuestStats
from agent.host._user_state import USER_STATE_SIZE, UserState, parse_user_state
from agent.host.hgcm import HgcmHost
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    BALLOON_CHUNK_PAGES,
    HEADER_SIZE,
    HOST_FEATURE_FAST_IRQ_ACK,
    HOST_FEATURE_HGCM_PHYS_PAGE_LIST,
    MAX_GUEST_RAM_MB,
    MAX_VMMDEV_REQUEST_SIZE,
    MIN_GUEST_RAM_MB,
    PAGE_SIZE,
    REQUEST_HEADER_VERSION,
    Event,
    GuestCapability,
    RequestType,
)
from agent.protocol.status import (
    STATUS_CODES,
    VERR_ACCESS_DENIED,
    VERR_INVALID_PARAMETER,
    VERR_NOT_IMPLEMENTED,
    VERR_NOT_SUPPORTED,
    VINF_SUCCESS,
)
from agent.units import NS_PER_MS

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.host.memory import GuestRam

HOST_VERSION: Final = RELEASE
"""The VirtualBox release the simulated host claims to be (major, minor, build, revision)."""
HOST_FEATURES: Final = (
    HOST_FEATURE_HGCM_PHYS_PAGE_LIST | 0x2 | 0x4 | 0x8 | HOST_FEATURE_FAST_IRQ_ACK
)
"""PHYS_PAGE_LIST, EMBEDDED_BUFFERS, CONTIGUOUS_PAGE_LIST, NO_BOUNCE_PAGE_LIST, FAST_IRQ_ACK."""
PRE_ADDITIONS_TYPES: Final = frozenset(
    {
        RequestType.GET_HOST_VERSION,
        RequestType.REPORT_GUEST_INFO,
        RequestType.REPORT_GUEST_INFO2,
        RequestType.WRITE_COREDUMP,
    }
)
"""Requests the host serves before the guest additions reported in."""
RESET_KEPT_EVENTS: Final = Event.DISPLAY_CHANGE_REQUEST
"""A VM reset clears every pending event but this one."""
VERR_TRY_AGAIN: Final = STATUS_CODES["VERR_TRY_AGAIN"]
REPORT_HISTORY: Final = 64
"""Bug-check and user-state reports kept for inspection (the latest; a guest may send many)."""
_U32_MAX: Final = 0xFFFFFFFF
LEGACY_INTERFACE: Final = 0x0001_0003
"""Additions of interface 1.03 use the legacy event protocol, which the fast port refuses."""
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
DEFAULT_RAM_MB: Final = 2048
"""The guest's RAM in MiB unless its maker sets it (also the default of a scenario's ``[host]``
table and of ``vbox-agent simulate --ram-mb``)."""
_BALLOON_CHANGE: Final = L.BALLOON_CHANGE_COUNT_AND_FLAG.codec
_BALLOON_CHANGE_AT: Final = L.BALLOON_CHANGE_COUNT_AND_FLAG.offset
_BALLOON_PAGES_AT: Final = L.MemBalloonChangeRequest.phys_page.offset
"""CHANGE_MEMBALLOON's page count and inflate flag (adjacent: one unpack), and its pages."""
_HEADER_START: Final = L.run(
    L.RequestHeader.size_, L.RequestHeader.version, L.RequestHeader.request_type
).codec
"""What the port handler checks first: size, version and type (from offset 0)."""


@final
class RequestCounts(dict[int, int]):
    """Requests the port handled (or refused) by type; a type not seen counts 0.

    A dict with ``__missing__`` and no ``__dict__``, not a ``Counter``: the port counts every
    request, and a ``Counter``'s item look-up and store cost twice as much.
    """

    __slots__ = ()

    def __missing__(self, request_type: int) -> int:
        """A type not seen: 0."""
        del request_type
        return 0


class PortWriter:
    """Who writes to the port (one device connection of the host's server): how many of
    its port writes a delay holds now, and what to call whenever that changes."""

    __slots__ = ("changed", "held")

    def __init__(self, changed: Callable[[], object]) -> None:
        self.held = 0
        self.changed = changed


PORT_WRITER: Final = ContextVar[PortWriter | None]("port_writer", default=None)
"""The writer the port writes of a task count for (the tasks it starts inherit it)."""


@dataclass(eq=False, slots=True)
class _HeldWrite:
    """A port write a delay holds: its scope's deadline is when the host handles it."""

    request_type: int
    started: float
    scope: trio.CancelScope
    writer: PortWriter | None
    powered_off: bool = False
    """The VM powered off while it was held: it ends unhandled."""


@dataclass(frozen=True, slots=True)
class _Entry:
    size: int
    exact: bool
    handle: Callable[[bytearray, int], int | None] | None
    """None for the HGCM calls, which take the request's mapping too (:meth:`VMMDev.process`)."""


class VMMDev:
    """The VMMDev device of one VM: events, balloon, heartbeat, guest statistics and HGCM."""

    def __init__(
        self,
        memory: GuestRam,
        *,
        ram_mb: int = DEFAULT_RAM_MB,
        cpus: int = GUEST_CPUS,
        heartbeat_interval_ns: int = DEFAULT_INTERVAL_NS,
        heartbeat_timeout_ns: int | None = None,
        host_time_enabled: bool = True,
        core_dump_enabled: bool = False,
        seed: int | None = None,
    ) -> None:
        if not MIN_GUEST_RAM_MB <= ram_mb <= MAX_GUEST_RAM_MB:
            msg = (
                f"guest RAM must be in [{MIN_GUEST_RAM_MB}, {MAX_GUEST_RAM_MB}] MB, got {ram_mb} MB"
            )
            raise ValueError(msg)
        self.memory = memory
        self.ram_mb = ram_mb
        self.host_time_enabled = host_time_enabled
        self.core_dump_enabled = core_dump_enabled
        self.hgcm = HgcmHost(
            memory,
            self._raise_events,  # it raises a plain int, every HGCM completion
            requestor_info=lambda: bool(
                self.guest.additions_features & GUEST_INFO2_F_REQUESTOR_INFO
            ),
        )
        self.balloon = HostBalloon(ram_mb, cpus=cpus)
        self.heartbeat = HeartbeatMonitor(
            heartbeat_interval_ns,
            2 * heartbeat_interval_ns if heartbeat_timeout_ns is None else heartbeat_timeout_ns,
        )
        self.guest_stats = HostGuestStats(self.raise_events, cpus=cpus)
        self.cpu_hotplug = HostCpuHotPlug(self.raise_events)
        self.facilities = FacilityTable()
        self.guest = GuestInfo()
        self.request_counts = RequestCounts()
        self.core_dumps = 0
        self.bug_checks: deque[tuple[int, int, int, int, int]] = deque(maxlen=REPORT_HISTORY)
        """NT_BUG_CHECK reports (code and four parameters; all 0 for a bare header), as
        the debugger would get them (``DBGFEVENT_BSOD_VMMDEV``)."""
        self.user_states: deque[UserState] = deque(maxlen=REPORT_HISTORY)
        """REPORT_GUEST_USER_STATE reports Main took, in order."""
        self._rng = random.Random(seed)  # noqa: S311 - session ids, not secrets
        self.session_id = self._rng.getrandbits(64)
        self.pending_events = 0
        self.guest_filter = 0
        self.have_events = False
        self._new_filter: int | None = None
        self._hgcm_filter_enabled = False
        self._irq = trio.lowlevel.ParkingLot()
        self.faults = FaultInjector()
        self._held_writes: set[_HeldWrite] = set()
        self._write_released = trio.lowlevel.ParkingLot()
        """Unparked whenever a held port write ends."""
        self._powered_off = False
        """:meth:`run` ended: a write a delay would hold ends at once, unhandled."""
        self.time_offset_ms = 0
        """How far the host's clock is ahead of this machine's (GET_HOST_TIME)."""
        self._handlers = self._handler_table()

    # --- the request port ------------------------------------------------------------------

    async def submit(self, phys: int) -> None:
        """The guest wrote ``phys`` to the request port; handle the request it points to.

        A configured delay holds the "vCPU" in the port write first, for the delay of its
        request type from the moment the write started: changing that delay
        (:meth:`set_delay`) moves the end of the writes it holds already, 0 ends them at
        once. The guest cannot interrupt it, only powering the VM off (the end of
        :meth:`run`) does, and then the request is not handled; once the VM is off, such a
        write is not held at all (the simulated host's teardown, closing the sessions left,
        must not wait for it). A VM reset waits for it instead (:meth:`finish_port_writes`).
        """
        request_type = self._request_type_at(phys) if self.faults.has_delays else None
        delay = 0.0 if request_type is None else self.faults.delay(request_type)
        if delay > 0 and self._powered_off:
            await trio.lowlevel.checkpoint()
            return
        if request_type is not None and delay > 0 and not await self._hold(request_type, delay):
            return
        self.process(phys)

    async def _hold(self, request_type: int, delay: float) -> bool:
        """Hold a port write of ``request_type`` until its delay ends; return whether it is
        to be handled (False: the VM powered off meanwhile)."""
        started = trio.current_time()
        writer = PORT_WRITER.get()
        with trio.CancelScope(shield=True, deadline=started + delay) as scope:
            held = _HeldWrite(request_type, started, scope, writer)
            self._held_writes.add(held)
            if writer is not None:
                writer.held += 1
                writer.changed()
            try:
                await trio.sleep_forever()
            finally:
                self._held_writes.discard(held)
                self._write_released.unpark_all()
                if writer is not None:
                    writer.held -= 1
                    writer.changed()
        return not held.powered_off

    def process(self, phys: int) -> None:  # noqa: PLR0912 - one inline path, see below
        """Handle the request at ``phys`` synchronously (the port handler proper)."""
        mapping = self.memory.lock(phys, HEADER_SIZE)  # the header, unpacked where it lies
        if mapping is None:
            return
        view, at = mapping
        size, version, request_type = _HEADER_START.unpack_from(view, at)
        if size < HEADER_SIZE or version != REQUEST_HEADER_VERSION:
            return
        if size > MAX_VMMDEV_REQUEST_SIZE:
            answer = bytearray(view[at : at + HEADER_SIZE])
            H.REQUEST_RC.pack_into(answer, H.REQUEST_RC_AT, VERR_NOT_SUPPORTED)
            self._write(phys, answer)
            return
        # The whole request, copied from the header's mapping when that holds it (it always
        # does for a request within one region), else read (EFAULT: ignored as unreadable).
        end = at + size
        if end <= len(view):
            # A bytearray's slice is already a copy (a memoryview's is not).
            req = view[at:end] if type(view) is bytearray else bytearray(view[at:end])
        else:
            try:
                req = bytearray(self.memory.read(phys, size))
            except OSError:
                return
            mapping = None  # the request is not all in the header's mapping
        self.request_counts[request_type] += 1
        # Steps 3-6 of the module docstring, inline: every request of the guest passes here.
        rc: int | None
        if not self.guest.additions_ok and request_type not in PRE_ADDITIONS_TYPES:
            rc = VERR_NOT_SUPPORTED
        elif self.faults.has_faults and (fault := self.faults.take_fault(request_type)) is not None:
            rc = fault
        elif (entry := self._handlers.get(request_type)) is None:
            rc = VERR_NOT_IMPLEMENTED
        elif size < entry.size or (entry.exact and size != entry.size):
            rc = VERR_INVALID_PARAMETER
        elif entry.handle is not None:
            rc = entry.handle(req, phys)
        else:
            if not self._hgcm_filter_enabled:
                self._enable_hgcm_events()
            # Mapped in place when it lies within one page (``vmmdevRequestHandler``'s test:
            # its end, one past its last byte, is on the page it starts on).
            in_page = (phys + size) // PAGE_SIZE == phys // PAGE_SIZE
            rc = self.hgcm.call(req, phys, request_type, mapping if in_page else None)
        if rc is not None:
            H.REQUEST_RC.pack_into(req, H.REQUEST_RC_AT, rc)
            self._write(phys, req)

    def _write(self, phys: int, data: bytes | bytearray) -> None:
        try:
            self.memory.write(phys, data)
        except OSError:
            return

    # --- fault injection and delays ----------------------------------------------------------

    def add_fault(self, request_type: int, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests of ``request_type`` with ``status``, unexecuted."""
        self.faults.add_fault(request_type, status, count)

    def clear_faults(self, request_type: int | None = None) -> int:
        """Drop the queued faults of ``request_type`` (all with None); return the answers
        they still held."""
        return self.faults.clear_faults(request_type)

    def set_delay(self, request_type: int, seconds: float) -> None:
        """Hold every request of ``request_type`` for ``seconds`` before answering (0 clears).

        The writes of that type held already end ``seconds`` after each started: at once
        with 0 (or a delay they have waited out), later with a longer delay.
        """
        self.faults.set_delay(request_type, seconds)
        for held in self._held_writes:
            if held.request_type == request_type:
                held.scope.deadline = held.started + seconds

    def held_requests(self) -> dict[str, int]:
        """How many port writes a delay holds now, by request type name."""
        counts = Counter(held.request_type for held in self._held_writes)
        return {request_name(t): n for t, n in sorted(counts.items())}

    def _request_type_at(self, phys: int) -> int | None:
        """The type of the request at ``phys`` (None if its header is unreadable)."""
        try:
            header = self.memory.read(phys, HEADER_SIZE)
        except OSError:
            return None
        return L.RequestHeader.request_type.get(header)

    # --- events ----------------------------------------------------------------------------

    def raise_events(self, mask: int) -> None:
        """VMMDevNotifyGuest: add ``mask`` to the pending events and raise the line if due."""
        self._raise_events(int(mask))

    def _raise_events(self, mask: int) -> None:
        """:meth:`raise_events` of a plain int."""
        if not self.guest.additions_ok:
            self.pending_events |= mask
            return
        had_events = self.pending_events & self.guest_filter
        self.pending_events |= mask
        if not had_events:
            self._maybe_set_irq()

    async def wait_for_irq(self) -> None:
        """Return once the interrupt line is raised."""
        while not self.have_events:
            await self._irq.park()

    def _maybe_set_irq(self) -> None:
        if self.guest.additions_ok and self.pending_events & self.guest_filter:
            self.have_events = True
            self._irq.unpark_all()

    def _ctl_filter(self, or_mask: int, not_mask: int) -> None:
        if self.pending_events & self.guest_filter:
            base = self.guest_filter if self._new_filter is None else self._new_filter
            self._new_filter = (base | or_mask) & ~not_mask
        else:
            self.guest_filter = (self.guest_filter | or_mask) & ~not_mask & _U32_MAX
            self._maybe_set_irq()

    def _acknowledge(self, req: bytearray, _phys: int) -> int:
        L.EventsRequest.events.set(req, self._take_events())
        return VINF_SUCCESS

    def read_fast_ack_port(self) -> int:
        """A 32-bit read of the fast request port (``vmmdevFastReqIrqAck``): what
        ACKNOWLEDGE_EVENTS does, without a request (so no count, fault or delay of type 41);
        ``U32_MAX``, acknowledging nothing, before the additions reported or for the
        legacy 1.03 interface."""
        if not self.guest.additions_ok or self.guest.interface_version == LEGACY_INTERFACE:
            return _U32_MAX
        return self._take_events()

    def _take_events(self) -> int:
        """Apply a deferred filter, hand over the deliverable events, lower the line."""
        if self._new_filter is not None:
            self.guest_filter, self._new_filter = self._new_filter & _U32_MAX, None
        events = self.pending_events & self.guest_filter
        self.pending_events &= ~self.guest_filter
        self.have_events = False
        return events

    def _filter_mask(self, req: bytearray, _phys: int) -> int:
        not_mask = L.MaskRequest.not_mask.get(req) & ~int(Event.HGCM)
        self._ctl_filter(L.MaskRequest.or_mask.get(req), not_mask)
        return VINF_SUCCESS

    # --- VM life cycle -----------------------------------------------------------------------

    def set_balloon_target(self, mb: int) -> None:
        """Management: ask the guest for a balloon of ``mb`` MiB (see HostBalloon.set_target)."""
        if self.balloon.set_target(mb):
            self.raise_events(Event.BALLOON_CHANGE_REQUEST)

    def set_statistics_interval(self, seconds: int) -> None:
        """Management: ask for a statistics report every ``seconds`` (0 stops them)."""
        self.guest_stats.set_interval(seconds)

    def restore(self) -> None:
        """A saved state was loaded: new session id, HGCM re-submission, no balloon target
        acknowledged (see :meth:`HostBalloon.restore`), the statistics interval back to 0
        (see :meth:`HostGuestStats.restore`), CPU hot-plug monitoring off (see
        :class:`HostCpuHotPlug`), RESTORED event."""
        self.session_id = self._rng.getrandbits(64)
        self.hgcm.restore()
        self.balloon.restore()
        self.guest_stats.restore()
        self.cpu_hotplug.restore()
        self.raise_events(Event.RESTORED)

    @property
    def powered_off(self) -> bool:
        """Whether :meth:`run` ran and ended (the VM powered off), and runs no more."""
        return self._powered_off

    @property
    def port_writes_held(self) -> int:
        """Port writes a delay holds now (tests wait on it: the kernel personality's writes
        come from driver threads)."""
        return len(self._held_writes)

    async def finish_port_writes(self) -> None:
        """Return once no port write is held, each handled (or ended by a power-off).

        A VM reset rendezvouses with every vCPU first, and a vCPU in a port write leaves it
        only once the host handled the request: a request written before the reset acts on
        the device before :meth:`reset`, never on the reset device. Call this, then
        :meth:`reset` with no checkpoint between.
        """
        while self._held_writes:
            await self._write_released.park()

    def reset(self) -> None:
        """VM reset: the additions must report again; host state goes back to power-on.

        Port writes still held by a delay must have finished (:meth:`finish_port_writes`).
        """
        self.hgcm.reset()
        self.session_id = self._rng.getrandbits(64)
        self.pending_events &= int(RESET_KEPT_EVENTS)
        self.guest_filter = 0
        self._new_filter = None
        self.have_events = False
        self._hgcm_filter_enabled = False
        self.guest.reset()
        self.facilities.reset()
        self.heartbeat.reset()
        self.balloon.reset()
        self.guest_stats.reset()

    async def run(self) -> NoReturn:
        """Run the VM's timers (the heartbeat flat-line check, Main's statistics timer)
        while the VM is on.

        When it is cancelled (the VM powers off), port writes held by a delay end too, and
        later ones are not held (until it runs again).
        """
        self._powered_off = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.guest_stats.run)
                await self.heartbeat.run()
        finally:
            self._powered_off = True
            for held in self._held_writes:
                held.powered_off = True
                held.scope.cancel()

    def host_time_ms(self) -> int:
        """Host UTC in ms since the epoch: this machine's clock moved by ``time_offset_ms``.

        The machine's clock, not trio's: a guest clock synchronised to it is the machine's
        own, so an agent under test never finds a drift to correct on the machine it runs on.
        """
        return time.time_ns() // NS_PER_MS + self.time_offset_ms

    # --- handlers ----------------------------------------------------------------------------

    def _handler_table(self) -> dict[int, _Entry]:
        t = RequestType
        exact: dict[int, tuple[int, Callable[[bytearray, int], int | None]]] = {
            t.GET_MOUSE_STATUS: (36, self.guest.get_mouse_status),
            t.SET_MOUSE_STATUS: (36, self.guest.set_mouse_status),
            GET_MOUSE_STATUS_EX: (48, self.guest.get_mouse_status_ex),
            t.GET_HOST_VERSION: (L.HostVersionRequest.size, _host_version),
            t.GET_HOST_TIME: (L.HostTimeRequest.size, self._host_time),
            t.GET_HYPERVISOR_INFO: (32, _get_hypervisor_info),
            t.SET_HYPERVISOR_INFO: (32, _set_hypervisor_info),
            t.ACKNOWLEDGE_EVENTS: (L.EventsRequest.size, self._acknowledge),
            t.CTL_GUEST_FILTER_MASK: (L.MaskRequest.size, self._filter_mask),
            t.REPORT_GUEST_INFO: (L.GuestInfoRequest.size, self.guest.report_info),
            t.REPORT_GUEST_INFO2: (L.GuestInfo2Request.size, self.guest.report_info2),
            t.REPORT_GUEST_CAPABILITIES: (28, self._report_capabilities),
            t.SET_GUEST_CAPABILITIES: (L.MaskRequest.size, self._set_capabilities),
            t.REPORT_GUEST_STATUS: (L.GuestStatusRequest.size, self._guest_status),
            t.GET_MEMBALLOON_CHANGE_REQ: (L.MemBalloonInfoRequest.size, self._balloon_info),
            t.GET_SESSION_ID: (L.SessionIdRequest.size, self._session_id),
            t.WRITE_COREDUMP: (L.WriteCoreDumpRequest.size, self._core_dump),
            t.HEARTBEAT_CONFIGURE: (L.HeartbeatRequest.size, self._heartbeat_configure),
            t.GET_STATISTICS_CHANGE_REQ: (
                L.StatisticsChangeRequest.size,
                self.guest_stats.change_request,
            ),
            t.REPORT_GUEST_STATS: (L.GuestStatsRequest.size, self.guest_stats.report),
            t.GET_CPU_HOTPLUG_REQ: (L.CpuHotPlugRequest.size, self.cpu_hotplug.get_request),
            t.SET_CPU_HOTPLUG_STATUS: (L.CpuHotPlugStatusRequest.size, self.cpu_hotplug.set_status),
        }
        at_least: dict[int, tuple[int, Callable[[bytearray, int], int | None] | None]] = {
            t.GUEST_HEARTBEAT: (HEADER_SIZE, self._guest_heartbeat),
            t.IDLE: (HEADER_SIZE, _idle),
            t.NT_BUG_CHECK: (HEADER_SIZE, self._nt_bug_check),
            t.REPORT_GUEST_USER_STATE: (USER_STATE_SIZE, self._guest_user_state),
            t.CHANGE_MEMBALLOON: (L.MemBalloonChangeRequest.phys_page.end, self._change_balloon),
            t.HGCM_CONNECT: (L.HgcmConnectRequest.size, self._hgcm(self.hgcm.connect)),
            t.HGCM_DISCONNECT: (L.HgcmDisconnectRequest.size, self._hgcm(self.hgcm.disconnect)),
            t.HGCM_CALL32: (L.HgcmCallRequest.size, None),
            t.HGCM_CALL64: (L.HgcmCallRequest.size, None),
            t.HGCM_CANCEL: (L.HgcmRequestHeader.size, self._hgcm_cancel),
            t.HGCM_CANCEL2: (L.HgcmCancel2Request.size, self._hgcm_cancel2),
        }
        table = {k: _Entry(size, True, fn) for k, (size, fn) in exact.items()}
        table.update({k: _Entry(size, False, fn) for k, (size, fn) in at_least.items()})
        return table

    def _host_time(self, req: bytearray, _phys: int) -> int:
        if not self.host_time_enabled:
            return VERR_NOT_SUPPORTED
        L.HostTimeRequest.time_ms.set(req, self.host_time_ms() & _U64_MAX)
        return VINF_SUCCESS

    def _report_capabilities(self, req: bytearray, _phys: int) -> int:
        # The legacy request has one u32 ``caps`` at offset 24, where vmmdev_events has events.
        self.guest.capabilities = L.EventsRequest.events.get(req) | int(GuestCapability.GRAPHICS)
        return VINF_SUCCESS

    def _set_capabilities(self, req: bytearray, _phys: int) -> int:
        caps = self.guest.capabilities | L.MaskRequest.or_mask.get(req)
        self.guest.capabilities = caps & ~L.MaskRequest.not_mask.get(req)
        return VINF_SUCCESS

    def _guest_status(self, req: bytearray, _phys: int) -> int:
        return self.facilities.report(
            L.GuestStatusRequest.facility.get(req),
            L.GuestStatusRequest.status.get(req),
            L.GuestStatusRequest.flags.get(req),
        )

    def _balloon_info(self, req: bytearray, _phys: int) -> int:
        L.MemBalloonInfoRequest.balloon_chunks.set(req, self.balloon.target_mb)
        L.MemBalloonInfoRequest.phys_mem_chunks.set(req, self.ram_mb)
        if L.MemBalloonInfoRequest.event_ack.get(req) == Event.BALLOON_CHANGE_REQUEST:
            self.balloon.acked_mb = self.balloon.target_mb
        return VINF_SUCCESS

    def _change_balloon(self, req: bytearray, _phys: int) -> int:
        pages, inflate = _BALLOON_CHANGE.unpack_from(req, _BALLOON_CHANGE_AT)
        if pages != BALLOON_CHUNK_PAGES or len(req) != L.MemBalloonChangeRequest.size:
            return VERR_INVALID_PARAMETER
        return self.balloon.change(inflate != 0, memoryview(req)[_BALLOON_PAGES_AT:])

    def _session_id(self, req: bytearray, _phys: int) -> int:
        L.SessionIdRequest.session_id.set(req, self.session_id)
        return VINF_SUCCESS

    def _core_dump(self, _req: bytearray, _phys: int) -> int:
        if not self.core_dump_enabled:
            return VERR_ACCESS_DENIED
        self.core_dumps += 1
        return VINF_SUCCESS

    def _heartbeat_configure(self, req: bytearray, _phys: int) -> int:
        enabled = L.HeartbeatRequest.enabled.get(req) != 0
        L.HeartbeatRequest.interval_ns.set(req, self.heartbeat.configure(enabled))
        return VINF_SUCCESS

    def _guest_heartbeat(self, _req: bytearray, _phys: int) -> int:
        self.heartbeat.beat()
        return VINF_SUCCESS

    def _nt_bug_check(self, req: bytearray, _phys: int) -> int:
        """A bare header or the whole report (code and four u64 parameters); nothing else."""
        if len(req) == HEADER_SIZE:
            self.bug_checks.append((0, 0, 0, 0, 0))
        elif len(req) == _BUG_CHECK.size + HEADER_SIZE:
            self.bug_checks.append(_BUG_CHECK.unpack_from(req, HEADER_SIZE))
        else:
            return VERR_INVALID_PARAMETER
        return VINF_SUCCESS

    def _guest_user_state(self, req: bytearray, _phys: int) -> int:
        report = parse_user_state(req)
        if isinstance(report, int):
            return report
        self.user_states.append(report)
        return VINF_SUCCESS

    def _hgcm(
        self, handler: Callable[[bytearray, int], int | None]
    ) -> Callable[[bytearray, int], int | None]:
        def handle(req: bytearray, phys: int) -> int | None:
            if not self._hgcm_filter_enabled:
                self._enable_hgcm_events()
            return handler(req, phys)

        return handle

    def _enable_hgcm_events(self) -> None:
        """The first HGCM request adds the HGCM event to the guest's filter."""
        self._hgcm_filter_enabled = True
        self._ctl_filter(int(Event.HGCM), 0)

    def _hgcm_cancel(self, _req: bytearray, phys: int) -> int:
        rc = self.hgcm.cancel(phys)
        return VERR_INVALID_PARAMETER if rc == STATUS_CODES["VERR_NOT_FOUND"] else rc

    def _hgcm_cancel2(self, req: bytearray, _phys: int) -> int:
        return self.hgcm.cancel(L.HgcmCancel2Request.phys_req_to_cancel.get(req))


def _host_version(req: bytearray, _phys: int) -> int:
    L.HOST_VERSION_BODY.set(req, *HOST_VERSION, HOST_FEATURES)
    return VINF_SUCCESS


def _idle(_req: bytearray, _phys: int) -> None:
    """IDLE halts the vCPU until the next interrupt and leaves ``rc`` alone, whatever the
    request's size (the dispatcher's case checks none)."""


_BUG_CHECK: Final = struct.Struct("<5Q")
"""``VMMDevReqNtBugCheck`` after the header: the bug check code and its four parameters."""
_HYPERVISOR_START: Final = struct.Struct("<II")
"""``VMMDevReqHypervisorInfo`` body at 24: ``hypervisorStart``, ``hypervisorSize``."""
_HYPERVISOR_SIZE_AT: Final = HEADER_SIZE + 4
_U32: Final = struct.Struct("<I")


def _get_hypervisor_info(req: bytearray, _phys: int) -> int:
    """The host has no hypervisor area: size 0; the start stays as the guest sent it."""
    _U32.pack_into(req, _HYPERVISOR_SIZE_AT, 0)
    return VINF_SUCCESS


def _set_hypervisor_info(req: bytearray, _phys: int) -> int:
    """Unfixing (start 0) or an empty area is accepted; a real area is VERR_TRY_AGAIN."""
    start, size = _HYPERVISOR_START.unpack_from(req, HEADER_SIZE)
    return VERR_TRY_AGAIN if start and size else VINF_SUCCESS
