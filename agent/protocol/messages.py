"""Typed requests and replies, and their byte encodings.

A request encodes itself into an :class:`IoctlCall` (ioctl number, buffer, user buffers)
and decodes the buffer the driver handed back into its reply type. Decoding checks the
header, sizes and value ranges: a reply that breaks the ABI raises
:class:`RemoteProtocolError`; a well-formed reply with a failing VBox status raises
:class:`VBoxStatusError`. Requests that break the ABI raise :class:`LocalProtocolError`
when they are built.

VMMDev requests (the passthrough ioctl) follow the recipe of Oracle's VbglR3: the ioctl
header overlays the request header, ``reserved1`` carries the size as ``size_out``, the
requestor is 0 (the driver stamps its own), and ``rc`` starts as ``VERR_GENERAL_FAILURE``.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Final, Generic, TypeVar, final

from agent.protocol import layouts as L  # noqa: N812 - short name for the layout table
from agent.protocol.balloon_pages import CHUNK_PAGES, ChunkPages
from agent.protocol.constants import (
    AGC_FLAGS_VALID_MASK,
    BALLOON_CHUNK_PAGES,
    GUEST_CAPABILITIES_MASK,
    HEADER_SIZE,
    HGCM_CALL_HEADER_SIZE,
    HGCM_MAX_PARMS,
    HGCM_MAX_USER_PARM,
    HGCM_PARM64_SIZE,
    HGCM_SERVICE_NAME_SIZE,
    IOC_VERSION,
    IOCTL_HDR_TYPE_DEFAULT,
    IOCTL_HDR_VERSION,
    MAX_IOCTL_SIZE,
    MIN_HEARTBEAT_INTERVAL_NS,
    PAGE_SIZE,
    REQUEST_HEADER_VERSION,
    TIMEOUT_INFINITE,
    VALID_EVENT_MASK,
    VMMDEV_REQUEST_SMALL_LIMIT,
    CpuEventType,
    CpuStatusType,
    Event,
    Facility,
    FacilityStatus,
    HgcmLocationType,
    HgcmParmType,
    Ioctl,
    RequestType,
)
from agent.protocol.errors import LocalProtocolError, RemoteProtocolError, VBoxStatusError
from agent.protocol.status import VERR_GENERAL_FAILURE, VERR_INTERNAL_ERROR
from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Callable

    SlotSetter = Callable[[object, object], None]
    """Sets one field of an object: ``setter(instance, value)``."""

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
_IOCTL_HEADER: Final = L.IoctlHeader.whole()
_REQUEST_HEADER: Final = L.RequestHeader.whole()


@dataclass(slots=True)
class UserBuffer:
    """User memory an ioctl points to: the transport stores its address in the buffer.

    Not frozen, as :class:`IoctlCall`: each HGCM call builds one per buffer parameter (it
    holds a bytearray, so it was never hashable).

    Attributes:
        address_offset: offset of the u64 linear-address field inside the ioctl buffer.
        data: the memory itself; the driver reads it and writes results into it.
    """

    address_offset: int
    data: bytearray


@dataclass(slots=True)
class Submission:
    """Whether an ioctl may have reached the driver: the caller passes it, the transport sets it.

    A transport sets ``issued`` at the last moment it could still drop the call on its own:
    as the system call is made (not while the call waits for a worker thread), as the
    request frame is sent (not while it waits to send), as the driver's entry point is
    called. A call cancelled before that never reached the driver, so the host never saw it;
    one cancelled after it may still be counted by the host until its service completes it.

    ``retried`` counts the attempts a transport made again after a stray signal ended them
    (the character device's EINTR retries): the driver cancelled each at the host first, so
    the host may count each until its service completes it.
    """

    issued: bool = False
    retried: int = 0


@dataclass(slots=True, eq=False)
class IoctlCall(Generic[R]):
    """One encoded ioctl: what a transport needs to perform it and the request it came from.

    Built for every request and never changed after; not frozen, because a frozen
    dataclass's ``__init__`` sets each member through ``object.__setattr__``, which made
    building it cost more than encoding most requests.
    """

    code: int
    buffer: bytearray
    request: Request[R]
    user_buffers: tuple[UserBuffer, ...] = ()


class Request(Generic[R_co]):
    """A typed request: ``encode`` builds the call, ``decode`` reads the reply buffer."""

    __slots__ = ()
    operation: ClassVar[str]
    """The C name of the ioctl or VMMDev request, for errors and logs."""

    def encode(self) -> IoctlCall[R_co]:
        """Return the ioctl that performs this request."""
        raise NotImplementedError

    def decode(self, call: IoctlCall[R_co]) -> R_co:
        """Return the reply read from ``call.buffer`` after the driver handled it."""
        raise NotImplementedError


# --- helpers -----------------------------------------------------------------------------


def ioctl_buffer(size_in: int, size_out: int) -> bytearray:
    """Return a zeroed ioctl buffer of ``max(size_in, size_out)`` bytes with its header set.

    ``rc`` starts as ``VERR_INTERNAL_ERROR``, as VbglR3 presets it, so a driver that does not
    write it back is noticed.
    """
    return bytearray(_ioctl_template(size_in, size_out))


@functools.lru_cache(maxsize=64)
def _ioctl_template(size_in: int, size_out: int) -> bytes:
    """The bytes :func:`ioctl_buffer` copies: built once per pair of sizes."""
    buf = bytearray(max(size_in, size_out))
    _IOCTL_HEADER.set(
        buf, size_in, IOCTL_HDR_VERSION, IOCTL_HDR_TYPE_DEFAULT, VERR_INTERNAL_ERROR, size_out, 0
    )
    return bytes(buf)


def vmmdev_request_buffer(request_type: RequestType, size: int) -> bytearray:
    """Return a zeroed VMMDev request of ``size`` bytes with its header set for passthrough."""
    return bytearray(_vmmdev_request_template(request_type, size))


@functools.lru_cache(maxsize=64)
def _vmmdev_request_template(request_type: RequestType, size: int) -> bytes:
    """The bytes :func:`vmmdev_request_buffer` copies: built once per type and size."""
    buf = bytearray(size)
    _REQUEST_HEADER.set(
        buf, size, REQUEST_HEADER_VERSION, request_type, VERR_GENERAL_FAILURE, size, 0
    )
    return bytes(buf)


@functools.lru_cache(maxsize=64)
def vmmdev_request_code(size: int) -> int:
    """Return the ioctl that carries a VMMDev request of ``size`` bytes."""
    if size < VMMDEV_REQUEST_SMALL_LIMIT:
        return Ioctl.vmmdev_request(size)
    return Ioctl.VMMDEV_REQUEST_BIG


def check_ioctl_reply(call: IoctlCall[R], size_in: int, size_out: int) -> int:
    """Validate the header of an ioctl reply and return its ``rc``.

    Raises:
        RemoteProtocolError: wrong buffer length, header version, ``size_in`` or ``size_out``.
        VBoxStatusError: ``rc`` is a failure.
    """
    buf = call.buffer
    if len(buf) == max(size_in, size_out):
        got_in, version, _, rc, got_out, _ = _IOCTL_HEADER.codec.unpack_from(buf)
        if rc >= 0 and got_in == size_in and got_out == size_out and version == IOCTL_HDR_VERSION:
            return int(rc)  # the usual reply, checked in one pass
    operation = call.request.operation  # something is wrong: name it
    _check_reply_length(operation, buf, max(size_in, size_out))
    rc = _reply_rc(operation, _IOCTL_HEADER.codec.unpack_from(buf), size_in, size_out)
    raise VBoxStatusError(rc, operation)


def _check_reply_length(operation: str, buf: bytearray, expected: int) -> None:
    if len(buf) != expected:
        msg = f"{operation}: reply buffer has {len(buf)} bytes, expected {expected}"
        raise RemoteProtocolError(msg)


def _reply_rc(operation: str, values: tuple[int, ...], size_in: int, size_out: int) -> int:
    """Check the ioctl header that starts ``values`` (a reply's unpacked words) against the
    sizes the request gave; return its ``rc``.

    Raises:
        RemoteProtocolError: wrong header version, ``size_in`` or ``size_out``.
    """
    got_in, version, _, rc, got_out, _ = values[:6]
    if (got_in, version) != (size_in, IOCTL_HDR_VERSION):
        msg = f"{operation}: reply header (size_in, version) is {(got_in, version)}"
        raise RemoteProtocolError(msg)
    if got_out != size_out:
        msg = f"{operation}: reply size_out {got_out}, expected {size_out}"
        raise RemoteProtocolError(msg)
    return rc


def _check_mask(name: str, value: int, valid: int) -> None:
    if not 0 <= value <= _U32_MAX or value & ~valid:
        msg = f"{name} {value:#x} has bits outside {valid:#x}"
        raise LocalProtocolError(msg)


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        msg = f"{name} {value} does not fit in 32 bits"
        raise LocalProtocolError(msg)


class _FixedIoctl(Request[R_co]):
    """A fixed-size ioctl: its sizes are declared once, here, for encode and decode."""

    __slots__ = ()
    size_in: ClassVar[int]
    size_out: ClassVar[int]

    def new_buffer(self) -> bytearray:
        """Return the request's buffer with its header set."""
        return ioctl_buffer(self.size_in, self.size_out)

    def check_reply(self, call: IoctlCall[R_co]) -> int:
        """Validate the reply header against the declared sizes; return ``rc``."""
        return check_ioctl_reply(call, self.size_in, self.size_out)


# --- driver ioctls -----------------------------------------------------------------------


@record
class DriverVersion:
    """Reply to :class:`DriverVersionInfo`."""

    session_version: int
    driver_version: int
    driver_revision: int


@final
@record
class DriverVersionInfo(_FixedIoctl[DriverVersion]):
    """``VBG_IOCTL_DRIVER_VERSION_INFO``: agree on the ioctl interface version."""

    operation: ClassVar[str] = "VBG_IOCTL_DRIVER_VERSION_INFO"
    size_in: ClassVar[int] = 40
    size_out: ClassVar[int] = 44
    req_version: int = IOC_VERSION
    min_version: int = IOC_VERSION

    def encode(self) -> IoctlCall[DriverVersion]:
        """Encode the requested and minimum versions."""
        _check_u32("req_version", self.req_version)
        _check_u32("min_version", self.min_version)
        buf = self.new_buffer()
        L.DriverVersionInfo.req_version.set(buf, self.req_version)
        L.DriverVersionInfo.min_version.set(buf, self.min_version)
        return IoctlCall(Ioctl.DRIVER_VERSION_INFO, buf, self)

    def decode(self, call: IoctlCall[DriverVersion]) -> DriverVersion:
        """Decode the versions; the session version's major half must match ours."""
        self.check_reply(call)
        buf = call.buffer
        reply = DriverVersion(
            L.DriverVersionInfo.session_version.get(buf),
            L.DriverVersionInfo.driver_version.get(buf),
            L.DriverVersionInfo.driver_revision.get(buf),
        )
        if reply.session_version >> 16 != self.req_version >> 16:
            msg = f"{self.operation}: session version {reply.session_version:#x} is foreign"
            raise RemoteProtocolError(msg)
        return reply


@record
class EventsReceived:
    """Reply to :class:`WaitForEvents`: the events this waiter consumed (0: interrupted)."""

    mask: int


@final
@record
class WaitForEvents(_FixedIoctl[EventsReceived]):
    """``VBG_IOCTL_WAIT_FOR_EVENTS``: block until one of ``mask``'s events is pending."""

    operation: ClassVar[str] = "VBG_IOCTL_WAIT_FOR_EVENTS"
    size_in: ClassVar[int] = 32
    size_out: ClassVar[int] = 28
    mask: int
    timeout_ms: int = TIMEOUT_INFINITE

    def encode(self) -> IoctlCall[EventsReceived]:
        """Encode the mask and timeout."""
        _check_mask("event mask", self.mask, VALID_EVENT_MASK)
        _check_u32("timeout_ms", self.timeout_ms)
        buf = self.new_buffer()
        L.WaitForEventsIoctl.timeout_ms.set(buf, self.timeout_ms)
        L.WaitForEventsIoctl.events_in.set(buf, self.mask)
        return IoctlCall(Ioctl.WAIT_FOR_EVENTS, buf, self)

    def decode(self, call: IoctlCall[EventsReceived]) -> EventsReceived:
        """Decode the consumed events, a subset of ``mask``.

        No events at all is a success on Oracle's driver only: the wait consumed an
        INTERRUPT_ALL that found no wait in progress (see :class:`InterruptAllWaits`).
        """
        self.check_reply(call)
        events = L.WaitForEventsIoctl.events_out.get(call.buffer)
        if events & ~self.mask:
            msg = f"{self.operation}: events {events:#x} are not within the mask {self.mask:#x}"
            raise RemoteProtocolError(msg)
        return EventsReceived(events)


@final
@record
class InterruptAllWaits(_FixedIoctl[None]):
    """``VBG_IOCTL_INTERRUPT_ALL_WAIT_FOR_EVENTS``: end the waits on this session.

    Mainline makes every wait on the session fail with EINTR from then on (sticky). Oracle's
    driver ends the waits in progress with ``VERR_INTERRUPTED``, or, if there are none, the
    next wait, which then succeeds with whatever matching events are pending, maybe none
    (one-shot). Either way a session is not waited on again after it (:class:`Session`).
    """

    operation: ClassVar[str] = "VBG_IOCTL_INTERRUPT_ALL_WAIT_FOR_EVENTS"
    size_in: ClassVar[int] = 24
    size_out: ClassVar[int] = 24

    def encode(self) -> IoctlCall[None]:
        """Encode a bare header."""
        return IoctlCall(Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS, self.new_buffer(), self)

    def decode(self, call: IoctlCall[None]) -> None:
        """Check the reply header."""
        self.check_reply(call)


@final
@record
class ChangeFilterMask(_FixedIoctl[None]):
    """``VBG_IOCTL_CHANGE_FILTER_MASK``: add and remove events this session asks the host for."""

    operation: ClassVar[str] = "VBG_IOCTL_CHANGE_FILTER_MASK"
    size_in: ClassVar[int] = 32
    size_out: ClassVar[int] = 24
    or_mask: int
    not_mask: int

    def encode(self) -> IoctlCall[None]:
        """Encode the masks."""
        _check_mask("or_mask", self.or_mask, VALID_EVENT_MASK)
        _check_mask("not_mask", self.not_mask, VALID_EVENT_MASK)
        buf = self.new_buffer()
        L.ChangeFilterIoctl.or_mask.set(buf, self.or_mask)
        L.ChangeFilterIoctl.not_mask.set(buf, self.not_mask)
        return IoctlCall(Ioctl.CHANGE_FILTER_MASK, buf, self)

    def decode(self, call: IoctlCall[None]) -> None:
        """Check the reply header."""
        self.check_reply(call)


@record
class AcquireGuestCapabilities(_FixedIoctl[None]):
    """``VBG_IOCTL_ACQUIRE_GUEST_CAPABILITIES``: take exclusive guest capabilities."""

    operation: ClassVar[str] = "VBG_IOCTL_ACQUIRE_GUEST_CAPABILITIES"
    size_in: ClassVar[int] = 36
    size_out: ClassVar[int] = 24
    or_mask: int
    not_mask: int
    flags: int = 0

    def encode(self) -> IoctlCall[None]:
        """Encode flags and masks."""
        _check_mask("flags", self.flags, AGC_FLAGS_VALID_MASK)
        _check_mask("or_mask", self.or_mask, GUEST_CAPABILITIES_MASK)
        _check_mask("not_mask", self.not_mask, GUEST_CAPABILITIES_MASK)
        buf = self.new_buffer()
        L.AcquireGuestCapsIoctl.flags.set(buf, self.flags)
        L.AcquireGuestCapsIoctl.or_mask.set(buf, self.or_mask)
        L.AcquireGuestCapsIoctl.not_mask.set(buf, self.not_mask)
        return IoctlCall(Ioctl.ACQUIRE_GUEST_CAPABILITIES, buf, self)

    def decode(self, call: IoctlCall[None]) -> None:
        """Check the reply header."""
        self.check_reply(call)


@record
class GuestCapabilities:
    """Reply to :class:`ChangeGuestCapabilities`."""

    session_caps: int
    global_caps: int


@record
class ChangeGuestCapabilities(_FixedIoctl[GuestCapabilities]):
    """``VBG_IOCTL_CHANGE_GUEST_CAPABILITIES``: set or clear capabilities for this session."""

    operation: ClassVar[str] = "VBG_IOCTL_CHANGE_GUEST_CAPABILITIES"
    size_in: ClassVar[int] = 32
    size_out: ClassVar[int] = 32
    or_mask: int
    not_mask: int

    def encode(self) -> IoctlCall[GuestCapabilities]:
        """Encode the masks."""
        _check_mask("or_mask", self.or_mask, GUEST_CAPABILITIES_MASK)
        _check_mask("not_mask", self.not_mask, GUEST_CAPABILITIES_MASK)
        buf = self.new_buffer()
        L.SetGuestCapsIoctl.or_mask.set(buf, self.or_mask)
        L.SetGuestCapsIoctl.not_mask.set(buf, self.not_mask)
        return IoctlCall(Ioctl.CHANGE_GUEST_CAPABILITIES, buf, self)

    def decode(self, call: IoctlCall[GuestCapabilities]) -> GuestCapabilities:
        """Decode the session's and the device's capabilities."""
        self.check_reply(call)
        session = L.SetGuestCapsIoctl.session_caps.get(call.buffer)
        if session & ~GUEST_CAPABILITIES_MASK:
            msg = f"{self.operation}: session capabilities {session:#x} are out of range"
            raise RemoteProtocolError(msg)
        return GuestCapabilities(session, L.SetGuestCapsIoctl.global_caps.get(call.buffer))


@record
class BalloonStatus:
    """Reply to :class:`CheckBalloon`.

    Attributes:
        chunks: balloon size in 1 MiB chunks (the driver's count, or the host target when
            userspace handles the balloon).
        handle_in_r3: userspace must allocate chunks and hand them over with
            :class:`ChangeBalloon` (Oracle's driver only).
    """

    chunks: int
    handle_in_r3: bool


@record
class CheckBalloon(_FixedIoctl[BalloonStatus]):
    """``VBG_IOCTL_CHECK_BALLOON``: ask the driver about the balloon."""

    operation: ClassVar[str] = "VBG_IOCTL_CHECK_BALLOON"
    size_in: ClassVar[int] = 24
    size_out: ClassVar[int] = 32

    def encode(self) -> IoctlCall[BalloonStatus]:
        """Encode a bare header."""
        return IoctlCall(Ioctl.CHECK_BALLOON, self.new_buffer(), self)

    def decode(self, call: IoctlCall[BalloonStatus]) -> BalloonStatus:
        """Decode the chunk count and the ring-3 flag (0 or 1)."""
        self.check_reply(call)
        flag = L.CheckBalloonIoctl.handle_in_r3.get(call.buffer)
        if flag > 1:
            msg = f"{self.operation}: handle_in_r3 is {flag}, expected 0 or 1"
            raise RemoteProtocolError(msg)
        return BalloonStatus(L.CheckBalloonIoctl.balloon_chunks.get(call.buffer), flag == 1)


_CHANGE_BALLOON_IN: Final = struct.Struct(f"<Q{L.ChangeBalloonIoctl.padding.size}x?")
"""CHANGE_BALLOON's input members, which follow each other: the chunk address, the padding
(zeroes) and the inflate flag, in one pack."""
_CHANGE_BALLOON_IN_AT: Final = L.ChangeBalloonIoctl.chunk_address.offset
_CHANGE_BALLOON_CODE: Final = int(Ioctl.CHANGE_BALLOON)


@record
class ChangeBalloon(_FixedIoctl[None]):
    """``VBGL_IOCTL_CHANGE_BALLOON`` (Oracle's driver): hand a 1 MiB user chunk to the host."""

    operation: ClassVar[str] = "VBGL_IOCTL_CHANGE_BALLOON"
    size_in: ClassVar[int] = 40
    size_out: ClassVar[int] = 24
    chunk_address: int
    inflate: bool

    def encode(self) -> IoctlCall[None]:
        """Encode the chunk address and direction; padding stays zero."""
        if not 0 < self.chunk_address <= _U64_MAX or self.chunk_address % PAGE_SIZE:
            msg = f"chunk address {self.chunk_address:#x} must be a non-zero page address"
            raise LocalProtocolError(msg)
        buf = self.new_buffer()
        _CHANGE_BALLOON_IN.pack_into(buf, _CHANGE_BALLOON_IN_AT, self.chunk_address, self.inflate)
        return IoctlCall(_CHANGE_BALLOON_CODE, buf, self)

    def decode(self, call: IoctlCall[None]) -> None:
        """Check the reply header."""
        self.check_reply(call)


@record
class ChangeBalloonProbe(_FixedIoctl[None]):
    """``VBGL_IOCTL_CHANGE_BALLOON`` with a padding byte set: which driver answers?

    Oracle's driver checks the padding before anything else (before the balloon's mutex,
    its owner and ``fUseKernelAPI``) and answers ``VERR_INVALID_PARAMETER`` in the reply; the
    in-tree driver has no such ioctl and fails it with ENOTTY. Neither changes anything.
    """

    operation: ClassVar[str] = "VBGL_IOCTL_CHANGE_BALLOON"
    size_in: ClassVar[int] = ChangeBalloon.size_in
    size_out: ClassVar[int] = ChangeBalloon.size_out

    def encode(self) -> IoctlCall[None]:
        """Encode a null chunk, a deflate, and a padding that is not zero."""
        buf = self.new_buffer()
        buf[L.ChangeBalloonIoctl.padding.offset] = 1
        return IoctlCall(_CHANGE_BALLOON_CODE, buf, self)

    def decode(self, call: IoctlCall[None]) -> None:
        """Check the reply header (no driver is known to accept the call)."""
        self.check_reply(call)


@record
class WriteCoreDump(_FixedIoctl[None]):
    """``VBG_IOCTL_WRITE_CORE_DUMP``: ask the host to write a guest core dump."""

    operation: ClassVar[str] = "VBG_IOCTL_WRITE_CORE_DUMP"
    size_in: ClassVar[int] = 28
    size_out: ClassVar[int] = 24
    flags: int = 0

    def encode(self) -> IoctlCall[None]:
        """Encode the flags (which must be zero)."""
        _check_mask("flags", self.flags, 0)
        return IoctlCall(Ioctl.WRITE_CORE_DUMP, self.new_buffer(), self)

    def decode(self, call: IoctlCall[None]) -> None:
        """Check the reply header."""
        self.check_reply(call)


@record
class Log(Request[None]):
    """``VBG_IOCTL_LOG``: write a message to the kernel log and the host's guest log."""

    operation: ClassVar[str] = "VBG_IOCTL_LOG"
    message: bytes

    @property
    def size_in(self) -> int:
        """The header and the message; ``size_out`` is the bare header."""
        return HEADER_SIZE + len(self.message)

    def encode(self) -> IoctlCall[None]:
        """Encode the message after the header; ``size_out`` must be exactly 24."""
        if not self.message or len(self.message) > MAX_IOCTL_SIZE - HEADER_SIZE:
            msg = f"log message of {len(self.message)} bytes is empty or too long"
            raise LocalProtocolError(msg)
        buf = ioctl_buffer(self.size_in, HEADER_SIZE)
        buf[HEADER_SIZE:] = self.message
        return IoctlCall(Ioctl.LOG, buf, self)

    def decode(self, call: IoctlCall[None]) -> None:
        """Check the reply header."""
        check_ioctl_reply(call, self.size_in, HEADER_SIZE)


# --- HGCM --------------------------------------------------------------------------------


@record
class HgcmConnected:
    """Reply to :class:`HgcmConnect`."""

    client_id: int


def encode_service_name(service: str) -> bytes:
    """Return the NUL-terminated service name, checking it fits the 128-byte field.

    Raises:
        LocalProtocolError: empty, containing NUL, or longer than 127 UTF-8 bytes.
    """
    raw = service.encode()
    if not raw or b"\0" in raw or len(raw) >= HGCM_SERVICE_NAME_SIZE:
        msg = f"HGCM service name {service!r} must be 1..127 bytes without NUL"
        raise LocalProtocolError(msg)
    return raw + b"\0"


@final
@record
class HgcmConnect(_FixedIoctl[HgcmConnected]):
    """``VBG_IOCTL_HGCM_CONNECT``: connect to an existing host service by name."""

    operation: ClassVar[str] = "VBG_IOCTL_HGCM_CONNECT"
    size_in: ClassVar[int] = 156
    size_out: ClassVar[int] = 28
    service: str

    def encode(self) -> IoctlCall[HgcmConnected]:
        """Encode the service name with location type LOCALHOST_EXISTING."""
        buf = self.new_buffer()
        L.HgcmConnectIoctl.loc_type.set(buf, HgcmLocationType.LOCALHOST_EXISTING)
        L.HgcmConnectIoctl.service_name.set(buf, encode_service_name(self.service))
        return IoctlCall(Ioctl.HGCM_CONNECT, buf, self)

    def decode(self, call: IoctlCall[HgcmConnected]) -> HgcmConnected:
        """Decode the client id, which must be a usable id (not 0 or 0xFFFFFFFF)."""
        self.check_reply(call)
        client_id = L.HgcmConnectIoctl.client_id.get(call.buffer)
        if client_id in (0, _U32_MAX):
            msg = f"{self.operation}: host returned the invalid client id {client_id:#x}"
            raise RemoteProtocolError(msg)
        return HgcmConnected(client_id)


@final
@record
class HgcmDisconnect(_FixedIoctl[None]):
    """``VBG_IOCTL_HGCM_DISCONNECT``: drop an HGCM client of this session."""

    operation: ClassVar[str] = "VBG_IOCTL_HGCM_DISCONNECT"
    size_in: ClassVar[int] = 28
    size_out: ClassVar[int] = 24
    client_id: int

    def encode(self) -> IoctlCall[None]:
        """Encode the client id."""
        _check_client_id(self.client_id)
        buf = self.new_buffer()
        L.HgcmDisconnectIoctl.client_id.set(buf, self.client_id)
        return IoctlCall(Ioctl.HGCM_DISCONNECT, buf, self)

    def decode(self, call: IoctlCall[None]) -> None:
        """Check the reply header."""
        self.check_reply(call)


def _check_client_id(client_id: int) -> None:
    if not 0 < client_id < _U32_MAX:
        msg = f"HGCM client id {client_id:#x} is not a valid id"
        raise LocalProtocolError(msg)


def slot_setters(cls: type, *names: str) -> tuple[SlotSetter, ...]:
    """The setters of fields ``names`` of the frozen, slotted dataclass ``cls``, for its
    hand-written ``__init__``.

    Each is the field's slot descriptor's own ``__set__``, where ``object.__setattr__`` (the
    usual way round a frozen class's ``__setattr__``) ends up too, but only after checks
    that cost half as much again. The HGCM classes below are built for every parameter of
    every call, so their fields are set this way.
    """
    fields = vars(cls)
    return tuple(fields[name].__set__ for name in names)


@final
@record(init=False)
class HgcmU32:
    """A 32-bit HGCM parameter (``VMMDEV_HGCM_PARM_TYPE_32BIT``), in and out."""

    value: int

    def __init__(self, value: int) -> None:
        _SET_U32(self, value)


(_SET_U32,) = slot_setters(HgcmU32, "value")


@final
@record(init=False)
class HgcmU64:
    """A 64-bit HGCM parameter (``VMMDEV_HGCM_PARM_TYPE_64BIT``), in and out."""

    value: int

    def __init__(self, value: int) -> None:
        _SET_U64(self, value)


(_SET_U64,) = slot_setters(HgcmU64, "value")


@final
@record(init=False)
class HgcmBufferIn:
    """A buffer the host reads (``LINADDR_IN``), such as a property name with its NUL."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        _SET_BUFFER_IN(self, data)


(_SET_BUFFER_IN,) = slot_setters(HgcmBufferIn, "data")


@final
@record(init=False)
class HgcmBufferOut:
    """A buffer of ``size`` bytes the host writes (``LINADDR_OUT``)."""

    size: int

    def __init__(self, size: int) -> None:
        _SET_BUFFER_OUT(self, size)


(_SET_BUFFER_OUT,) = slot_setters(HgcmBufferOut, "size")


@final
@record(init=False)
class HgcmBuffer:
    """A buffer the host reads and writes (``LINADDR``), starting as ``data``."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        _SET_BUFFER(self, data)


(_SET_BUFFER,) = slot_setters(HgcmBuffer, "data")


HgcmParam = HgcmU32 | HgcmU64 | HgcmBufferIn | HgcmBufferOut | HgcmBuffer
"""A parameter of an HGCM call as the caller gives it."""


@final
@record(init=False)
class HgcmData:
    """A buffer parameter after the call: the bytes the host reported (its ``size``)."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        _SET_DATA(self, data)


(_SET_DATA,) = slot_setters(HgcmData, "data")


HgcmValue = HgcmU32 | HgcmU64 | HgcmData
"""A parameter of an HGCM call as the host handed it back."""


@record(init=False)
class HgcmReply:
    """Reply to :class:`HgcmCall`: the service's status and the parameters it returned."""

    status: int
    params: tuple[HgcmValue, ...]

    def __init__(self, status: int, params: tuple[HgcmValue, ...]) -> None:
        set_status, set_params = _SET_REPLY
        set_status(self, status)
        set_params(self, params)


_SET_REPLY: Final = slot_setters(HgcmReply, "status", "params")


class HgcmCallError(VBoxStatusError):
    """An HGCM call completed with a failing service status; ``reply`` holds what came back.

    Services use the returned parameters even on failure (a required size with
    ``VERR_BUFFER_OVERFLOW``, for example).
    """

    def __init__(self, reply: HgcmReply, operation: str) -> None:
        super().__init__(reply.status, operation)
        self.reply = reply


_CALL_HEADER: Final = L.HgcmCallIoctl.whole()
"""The ioctl header and the call's own header, read in one go."""
_C = L.HgcmCallIoctl
_CALL_BODY: Final = L.run(
    _C.client_id, _C.function, _C.timeout_ms, _C.interruptible, _C.reserved, _C.parm_count
)
"""The call's own header, written in one go with the parameters after it; the ioctl header
before it comes from a template (:func:`_ioctl_template`)."""
_P = L.HgcmParameter64
_PARM_FORMAT: Final = L.run(_P.type, _P.value64).codec.format.lstrip("<") + "4x"
"""A parameter as two words: its type and the u64 at offset 4 (``value64``; ``value32`` and a
buffer's size are its low half, the low half of a buffer's address its high half). The last
4 bytes, the high half of a buffer's address, are written as zero and left to the transport,
which stores the address, and are skipped when read."""
_CALL_HEADER_VALUES: Final = len(L.HgcmCallIoctl.fields())
"""How many values of a whole-call unpack are the headers' (``parm_count`` is the last)."""
_PARM_TYPES: Final[dict[type[HgcmParam], HgcmParmType]] = {
    HgcmU32: HgcmParmType.U32,
    HgcmU64: HgcmParmType.U64,
    HgcmBufferIn: HgcmParmType.LINADDR_IN,
    HgcmBufferOut: HgcmParmType.LINADDR_OUT,
    HgcmBuffer: HgcmParmType.LINADDR,
}
_FIRST_ADDRESS_AT: Final = HGCM_CALL_HEADER_SIZE + _P.pointer_linear_addr.offset
"""Where the first parameter's linear address sits in the ioctl buffer."""
_U32_TYPE: Final = int(HgcmParmType.U32)
_U64_TYPE: Final = int(HgcmParmType.U64)
"""Enum members read once, as plain ints."""


@final
class _CallLayout:
    """The ioctl of a call with a given number of parameters, worked out once per count.

    Attributes:
        code: the ioctl number, which holds the size.
        size: the buffer's size (``size_in`` and ``size_out``).
        header: the buffer's first bytes as a template: the ioctl header, set as
            :func:`ioctl_buffer` sets it, and zeros after it.
        body: everything after the ioctl header, in one pack (:data:`_CALL_BODY`, then the
            parameters).
        whole: the whole buffer, in one unpack.
    """

    __slots__ = ("body", "code", "header", "size", "whole")

    def __init__(self, count: int) -> None:
        self.size = HGCM_CALL_HEADER_SIZE + HGCM_PARM64_SIZE * count
        self.code = Ioctl.hgcm_call_64(self.size)
        self.header = _ioctl_template(self.size, self.size)
        self.body = struct.Struct(_CALL_BODY.codec.format + _PARM_FORMAT * count)
        self.whole = struct.Struct(_CALL_HEADER.codec.format + _PARM_FORMAT * count)


@functools.cache
def _call_layout(count: int) -> _CallLayout:
    """The layout of a call with ``count`` parameters.

    Built on first use: a daemon calls with a few parameter counts, and all 33 would keep
    about 70 KiB.
    """
    return _CallLayout(count)


@final
@record(init=False)
class HgcmCall(Request[HgcmReply]):
    """``VBG_IOCTL_HGCM_CALL_64``: call ``function`` of a connected host service.

    The host's answer comes back as :class:`HgcmReply`; a failing service status raises
    :class:`HgcmCallError` with the reply attached.
    """

    operation: ClassVar[str] = "VBG_IOCTL_HGCM_CALL"
    client_id: int
    function: int
    params: tuple[HgcmParam, ...] = ()
    timeout_ms: int = TIMEOUT_INFINITE

    def __init__(
        self,
        client_id: int,
        function: int,
        params: tuple[HgcmParam, ...] = (),
        timeout_ms: int = TIMEOUT_INFINITE,
    ) -> None:
        set_client_id, set_function, set_params, set_timeout_ms = _SET_CALL
        set_client_id(self, client_id)
        set_function(self, function)
        set_params(self, params)
        set_timeout_ms(self, timeout_ms)

    @property
    def size(self) -> int:
        """Size of the ioctl buffer: the call header and 16 bytes per parameter."""
        return HGCM_CALL_HEADER_SIZE + HGCM_PARM64_SIZE * len(self.params)

    def prepare(self) -> PreparedHgcmCall:
        """Check and lay out the call once, for making it any number of times.

        Raises:
            LocalProtocolError: as :meth:`encode` would.
        """
        return PreparedHgcmCall(self)

    def encode(self) -> IoctlCall[HgcmReply]:
        """Encode the call; buffer parameters become user buffers the transport maps.

        The header is set as :func:`ioctl_buffer` sets it (``rc`` preset to
        ``VERR_INTERNAL_ERROR``), with the call interruptible. (The call is prepared for
        this one encoding, see :class:`PreparedHgcmCall`.)
        """
        call = PreparedHgcmCall(self).encode()
        return IoctlCall(call.code, call.buffer, self, call.user_buffers)

    def decode(self, call: IoctlCall[HgcmReply]) -> HgcmReply:
        """Decode the status and the returned parameters."""
        return PreparedHgcmCall(self).decode(call)


_SET_CALL: Final = slot_setters(HgcmCall, "client_id", "function", "params", "timeout_ms")


@final
class PreparedHgcmCall(Request[HgcmReply]):
    """An :class:`HgcmCall` checked and laid out once, to be made any number of times.

    Preparing makes every check :meth:`HgcmCall.encode` makes and builds the ioctl buffer,
    every word of it set, as a template; encoding copies the template and gives each
    non-empty buffer parameter memory of its own (a copy of an in buffer's bytes, zeros for
    an out buffer), which is all that differs between two calls. A service that makes the
    same call over and over (a property get of one name) encodes it in half the time.

    Attributes:
        call: the call prepared.
        client_id: the client the call names (the call's).
        code: the ioctl number.
    """

    __slots__ = ("_buffers", "_layout", "_template", "call", "client_id", "code")
    operation: ClassVar[str] = HgcmCall.operation

    def __init__(self, call: HgcmCall) -> None:
        client_id, function, timeout_ms = call.client_id, call.function, call.timeout_ms
        if not (
            0 < client_id < _U32_MAX and 0 <= function <= _U32_MAX and 0 <= timeout_ms <= _U32_MAX
        ):  # one of these raises, naming the value
            _check_client_id(client_id)
            _check_u32("function", function)
            _check_u32("timeout_ms", timeout_ms)
        count = len(call.params)
        if count > HGCM_MAX_PARMS:
            msg = f"HGCM call with {count} parameters; the limit is {HGCM_MAX_PARMS}"
            raise LocalProtocolError(msg)
        layout = _call_layout(count)
        values = [client_id, function, timeout_ms, 1, 0, count]
        self._buffers = _encode_params(call.params, values)
        """Each non-empty buffer parameter's address offset and what its memory starts as:
        the bytes of an in (or in/out) buffer, the size of an out buffer."""
        buf = bytearray(layout.header)
        layout.body.pack_into(buf, _CALL_BODY.offset, *values)
        self._template = bytes(buf)
        self._layout = layout
        self.call = call
        self.client_id = client_id
        self.code = layout.code

    def encode(self) -> IoctlCall[HgcmReply]:
        """Encode the call from the template (see the class docstring)."""
        user_buffers = tuple([UserBuffer(at, bytearray(start)) for at, start in self._buffers])
        return IoctlCall(self.code, bytearray(self._template), self, user_buffers)

    def decode(self, call: IoctlCall[HgcmReply]) -> HgcmReply:
        """Decode the status and the returned parameters."""
        buf = call.buffer
        layout = self._layout
        size = layout.size
        if len(buf) != size:
            _check_reply_length(self.operation, buf, size)
        values = layout.whole.unpack_from(buf)
        if values[0] == size and values[1] == IOCTL_HDR_VERSION and values[4] == size:
            rc = values[3]  # the usual header, checked in one pass
        else:
            rc = _reply_rc(self.operation, values, size, size)
        reply = HgcmReply(rc, self._decode_params(call, values))
        if rc < 0:
            raise HgcmCallError(reply, self.operation)
        return reply

    def _decode_params(
        self, call: IoctlCall[HgcmReply], values: tuple[int, ...]
    ) -> tuple[HgcmValue, ...]:
        """Each parameter back as its type: a buffer's reported size must fit what was sent.

        Buffers are decoded inline rather than by a helper: the loop runs for every
        parameter of every call.
        """
        params = self.call.params
        if values[_CALL_HEADER_VALUES - 1] != len(params):
            msg = f"{self.operation}: reply does not hold {len(params)} parameters"
            raise RemoteProtocolError(msg)
        user = iter(call.user_buffers)
        decoded: list[HgcmValue] = []
        at = _CALL_HEADER_VALUES
        for param in params:
            kind = values[at]
            word = values[at + 1]
            # ``type(param) is``: the parameter classes are final, and the test is cheaper
            # than ``isinstance``; this loop runs for every parameter of every call.
            if type(param) is HgcmU64:
                if kind != _U64_TYPE:
                    raise self._wrong_type(at, kind)
                decoded.append(HgcmU64(word))
                at += 2
                continue
            returned = word & _U32_MAX  # value32, or a buffer's size
            if type(param) is HgcmU32:
                if kind != _U32_TYPE:
                    raise self._wrong_type(at, kind)
                decoded.append(HgcmU32(returned))
            else:
                if kind != _PARM_TYPES[type(param)]:
                    raise self._wrong_type(at, kind)
                capacity = param.size if type(param) is HgcmBufferOut else len(param.data)
                if returned > capacity:
                    msg = (
                        f"{self.operation}: parameter {_value_index(at)} reports {returned} "
                        f"bytes of {capacity}"
                    )
                    raise RemoteProtocolError(msg)
                if not capacity:
                    decoded.append(HgcmData(b""))
                elif type(param) is HgcmBufferIn:
                    next(user)
                    decoded.append(HgcmData(param.data[:returned]))
                else:
                    data = next(user).data
                    reported = data if returned == capacity else data[:returned]
                    decoded.append(HgcmData(bytes(reported)))
            at += 2
        return tuple(decoded)

    def _wrong_type(self, at: int, kind: int) -> RemoteProtocolError:
        """The error for parameter type ``kind`` at value ``at`` of the reply."""
        return RemoteProtocolError(
            f"{self.operation}: parameter {_value_index(at)} came back as type {kind}"
        )


def _encode_params(
    params: tuple[HgcmParam, ...], values: list[int]
) -> tuple[tuple[int, bytes | int], ...]:
    """Append each parameter's words (type, then value or size) to ``values``; return the
    address offset of each non-empty buffer parameter with its bytes (in, in/out) or its
    size (out)."""
    buffers: list[tuple[int, bytes | int]] = []
    address_at = _FIRST_ADDRESS_AT
    for param in params:
        # ``type(param) is``, as in :meth:`PreparedHgcmCall._decode_params`; two appends cost less
        # than ``+=`` of a pair, which builds a tuple and extends the list with it.
        if type(param) is HgcmU32:
            if not 0 <= param.value <= _U32_MAX:
                msg = f"parameter {_index(address_at)} {param.value} does not fit in 32 bits"
                raise LocalProtocolError(msg)
            values.append(_U32_TYPE)
            values.append(param.value)
        elif type(param) is HgcmU64:
            if not 0 <= param.value <= _U64_MAX:
                msg = f"parameter {_index(address_at)}: {param.value} does not fit in 64 bits"
                raise LocalProtocolError(msg)
            values.append(_U64_TYPE)
            values.append(param.value)
        else:
            start: bytes | int
            if type(param) is HgcmBufferOut:
                if param.size < 0:
                    msg = f"HGCM out buffer size {param.size} is negative"
                    raise LocalProtocolError(msg)
                start = size = param.size
            else:
                start = bytes(param.data)  # the bytes as they are now, whatever the caller does
                size = len(start)
            if size > HGCM_MAX_USER_PARM:
                msg = f"parameter {_index(address_at)}: {size} bytes exceed {HGCM_MAX_USER_PARM}"
                raise LocalProtocolError(msg)
            values.append(_PARM_TYPES[type(param)])
            values.append(size)
            if size:
                buffers.append((address_at, start))
        address_at += HGCM_PARM64_SIZE
    return tuple(buffers)


def _index(address_at: int) -> int:
    """The parameter whose address field is at ``address_at`` of the ioctl buffer."""
    return (address_at - _FIRST_ADDRESS_AT) // HGCM_PARM64_SIZE


def _value_index(at: int) -> int:
    """The parameter whose type is value ``at`` of a whole-call unpack."""
    return (at - _CALL_HEADER_VALUES) // 2


# --- VMMDev requests (passthrough) -------------------------------------------------------


def check_vmmdev_reply(call: IoctlCall[R], request_type: RequestType, size: int) -> int:
    """Validate a VMMDev request the driver handed back and return its ``rc``.

    Raises:
        RemoteProtocolError: wrong length, header version, type or size.
        VBoxStatusError: the host answered with a failure.
    """
    buf = call.buffer
    operation = call.request.operation
    if len(buf) != size:
        msg = f"{operation}: reply has {len(buf)} bytes, expected {size}"
        raise RemoteProtocolError(msg)
    header: tuple[int, ...] = _REQUEST_HEADER.codec.unpack_from(buf)
    got_size, version, got_type, rc, _, _ = header
    got = (got_size, version, got_type)
    if got != (size, REQUEST_HEADER_VERSION, request_type):
        msg = f"{operation}: reply header (size, version, type) is {got}"
        raise RemoteProtocolError(msg)
    if rc < 0:
        raise VBoxStatusError(rc, operation)
    return rc


class _VmmdevRequest(Request[R_co]):
    """Shared encode/decode for fixed-size VMMDev requests."""

    __slots__ = ()
    request_type: ClassVar[RequestType]
    layout_size: ClassVar[int]

    def encode(self) -> IoctlCall[R_co]:
        """Build the request with its header and let ``fill`` write the body."""
        buf = vmmdev_request_buffer(self.request_type, self.layout_size)
        self.fill(buf)
        return IoctlCall(vmmdev_request_code(self.layout_size), buf, self)

    def decode(self, call: IoctlCall[R_co]) -> R_co:
        """Check the header and let ``read`` decode the body."""
        check_vmmdev_reply(call, self.request_type, self.layout_size)
        return self.read(call.buffer)

    def fill(self, buf: bytearray) -> None:
        """Write the request body (nothing by default)."""

    def read(self, buf: bytearray) -> R_co:
        """Decode the reply body."""
        raise NotImplementedError


@record
class HostVersion:
    """Reply to :class:`GetHostVersion`."""

    major: int
    minor: int
    build: int
    revision: int
    features: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}r{self.revision}"


@record
class GetHostVersion(_VmmdevRequest[HostVersion]):
    """``VMMDEVREQ_GET_HOST_VERSION`` (40 bytes)."""

    operation: ClassVar[str] = "VMMDEVREQ_GET_HOST_VERSION"
    request_type: ClassVar[RequestType] = RequestType.GET_HOST_VERSION
    layout_size: ClassVar[int] = L.HostVersionRequest.size

    def read(self, buf: bytearray) -> HostVersion:
        """Decode the version and feature bits."""
        return HostVersion(*L.HOST_VERSION_BODY.get(buf))


@record
class HostTime:
    """Reply to :class:`GetHostTime`: host UTC in milliseconds since the Unix epoch."""

    ms: int


@record
class GetHostTime(_VmmdevRequest[HostTime]):
    """``VMMDEVREQ_GET_HOST_TIME`` (32 bytes)."""

    operation: ClassVar[str] = "VMMDEVREQ_GET_HOST_TIME"
    request_type: ClassVar[RequestType] = RequestType.GET_HOST_TIME
    layout_size: ClassVar[int] = L.HostTimeRequest.size

    def fill(self, buf: bytearray) -> None:
        """Preset the time to UINT64_MAX, as VbglR3 does."""
        L.HostTimeRequest.time_ms.set(buf, _U64_MAX)

    def read(self, buf: bytearray) -> HostTime:
        """Decode the time; UINT64_MAX means the host never wrote it."""
        ms = L.HostTimeRequest.time_ms.get(buf)
        if ms == _U64_MAX:
            msg = f"{self.operation}: host succeeded but left the time unset"
            raise RemoteProtocolError(msg)
        return HostTime(ms)


@record
class SessionId:
    """Reply to :class:`GetSessionId`: changes at every VM start, restore and reset."""

    value: int


@record
class GetSessionId(_VmmdevRequest[SessionId]):
    """``VMMDEVREQ_GET_SESSION_ID`` (32 bytes)."""

    operation: ClassVar[str] = "VMMDEVREQ_GET_SESSION_ID"
    request_type: ClassVar[RequestType] = RequestType.GET_SESSION_ID
    layout_size: ClassVar[int] = L.SessionIdRequest.size

    def read(self, buf: bytearray) -> SessionId:
        """Decode the session id."""
        return SessionId(L.SessionIdRequest.session_id.get(buf))


@record
class SetCpuHotPlugStatus(_VmmdevRequest[None]):
    """``VMMDEVREQ_SET_CPU_HOTPLUG_STATUS`` (28 bytes): start or stop CPU hot-plug events.

    The host raises CPU_HOTPLUG (and answers its management's plug and unplug calls) only
    while the guest has it enabled.
    """

    operation: ClassVar[str] = "VMMDEVREQ_SET_CPU_HOTPLUG_STATUS"
    request_type: ClassVar[RequestType] = RequestType.SET_CPU_HOTPLUG_STATUS
    layout_size: ClassVar[int] = L.CpuHotPlugStatusRequest.size
    status: CpuStatusType

    def fill(self, buf: bytearray) -> None:
        """Write the status (any u32: the host judges it)."""
        _check_u32("status", self.status)
        L.CpuHotPlugStatusRequest.status.set(buf, self.status)

    def read(self, buf: bytearray) -> None:
        """Nothing comes back."""


@record
class CpuHotPlugEvent:
    """Reply to :class:`GetCpuHotPlugRequest`: the host's pending event and its CPU.

    ``event_type`` is the raw ``VMMDevCpuEventType`` value (see :attr:`pending`).
    """

    event_type: int
    core: int
    package: int

    @property
    def pending(self) -> bool:
        """Whether the host had an event (INVALID and NONE mean it had none)."""
        return self.event_type not in (CpuEventType.INVALID, CpuEventType.NONE)


@record
class GetCpuHotPlugRequest(_VmmdevRequest[CpuHotPlugEvent]):
    """``VMMDEVREQ_GET_CPU_HOTPLUG_REQ`` (36 bytes): take the host's pending event.

    Sent as VbglR3 sends it: NONE with both ids UINT32_MAX, which the host overwrites.
    """

    operation: ClassVar[str] = "VMMDEVREQ_GET_CPU_HOTPLUG_REQ"
    request_type: ClassVar[RequestType] = RequestType.GET_CPU_HOTPLUG_REQ
    layout_size: ClassVar[int] = L.CpuHotPlugRequest.size

    def fill(self, buf: bytearray) -> None:
        """Pre-set NONE and UINT32_MAX ids."""
        L.CpuHotPlugRequest.event_type.set(buf, CpuEventType.NONE)
        L.CpuHotPlugRequest.core.set(buf, _U32_MAX)
        L.CpuHotPlugRequest.package.set(buf, _U32_MAX)

    def read(self, buf: bytearray) -> CpuHotPlugEvent:
        """Decode the event and the CPU's ids."""
        return CpuHotPlugEvent(
            L.CpuHotPlugRequest.event_type.get(buf),
            L.CpuHotPlugRequest.core.get(buf),
            L.CpuHotPlugRequest.package.get(buf),
        )


@record
class ReportGuestStatus(_VmmdevRequest[None]):
    """``VMMDEVREQ_REPORT_GUEST_STATUS`` (36 bytes): a facility's state for the host."""

    operation: ClassVar[str] = "VMMDEVREQ_REPORT_GUEST_STATUS"
    request_type: ClassVar[RequestType] = RequestType.REPORT_GUEST_STATUS
    layout_size: ClassVar[int] = L.GuestStatusRequest.size
    facility: Facility
    status: FacilityStatus
    flags: int = 0

    def fill(self, buf: bytearray) -> None:
        """Write facility, status and flags."""
        _check_u32("facility", self.facility)
        _check_u32("status", self.status)
        _check_u32("flags", self.flags)
        L.GuestStatusRequest.facility.set(buf, self.facility)
        L.GuestStatusRequest.status.set(buf, self.status)
        L.GuestStatusRequest.flags.set(buf, self.flags)

    def read(self, buf: bytearray) -> None:
        """Nothing comes back."""


@record
class BalloonTarget:
    """Reply to :class:`GetMemBalloonChangeRequest`: the host's target and guest RAM, in MiB."""

    chunks: int
    phys_mem_chunks: int


@record
class GetMemBalloonChangeRequest(_VmmdevRequest[BalloonTarget]):
    """``VMMDEVREQ_GET_MEMBALLOON_CHANGE_REQ`` (36 bytes); acknowledges event 0x40."""

    operation: ClassVar[str] = "VMMDEVREQ_GET_MEMBALLOON_CHANGE_REQ"
    request_type: ClassVar[RequestType] = RequestType.GET_MEMBALLOON_CHANGE_REQ
    layout_size: ClassVar[int] = L.MemBalloonInfoRequest.size
    acknowledge: bool = True

    def fill(self, buf: bytearray) -> None:
        """Set ``event_ack`` to BALLOON_CHANGE_REQUEST when acknowledging."""
        ack = Event.BALLOON_CHANGE_REQUEST if self.acknowledge else 0
        L.MemBalloonInfoRequest.event_ack.set(buf, ack)

    def read(self, buf: bytearray) -> BalloonTarget:
        """Decode target and RAM; a target above the RAM is a host error."""
        target = BalloonTarget(
            L.MemBalloonInfoRequest.balloon_chunks.get(buf),
            L.MemBalloonInfoRequest.phys_mem_chunks.get(buf),
        )
        if target.chunks > target.phys_mem_chunks:
            msg = (
                f"{self.operation}: target {target.chunks} MiB exceeds guest RAM "
                f"{target.phys_mem_chunks} MiB"
            )
            raise RemoteProtocolError(msg)
        return target


@record
class ChangeMemBalloon(_VmmdevRequest[None]):
    """``VMMDEVREQ_CHANGE_MEMBALLOON`` (2080 bytes): inflate or deflate one 256-page chunk."""

    operation: ClassVar[str] = "VMMDEVREQ_CHANGE_MEMBALLOON"
    request_type: ClassVar[RequestType] = RequestType.CHANGE_MEMBALLOON
    layout_size: ClassVar[int] = L.MemBalloonChangeRequest.size
    inflate: bool
    pages: ChunkPages

    def fill(self, buf: bytearray) -> None:
        """Write the chunk's 256 addresses (checked when its ``ChunkPages`` was built)."""
        L.BALLOON_CHANGE_COUNT_AND_FLAG.set(buf, BALLOON_CHUNK_PAGES, int(self.inflate))
        offset = L.MemBalloonChangeRequest.phys_page.offset
        buf[offset : offset + CHUNK_PAGES.size] = self.pages.packed

    def read(self, buf: bytearray) -> None:
        """Nothing comes back."""


@record
class HeartbeatSettings:
    """Reply to :class:`HeartbeatConfigure`: the interval the host expects beats at."""

    interval_ns: int


@record
class HeartbeatConfigure(_VmmdevRequest[HeartbeatSettings]):
    """``VMMDEVREQ_HEARTBEAT_CONFIGURE`` (36 bytes): switch the host's flat-line check."""

    operation: ClassVar[str] = "VMMDEVREQ_HEARTBEAT_CONFIGURE"
    request_type: ClassVar[RequestType] = RequestType.HEARTBEAT_CONFIGURE
    layout_size: ClassVar[int] = L.HeartbeatRequest.size
    enabled: bool

    def fill(self, buf: bytearray) -> None:
        """Write the enabled flag."""
        L.HeartbeatRequest.enabled.set(buf, int(self.enabled))

    def read(self, buf: bytearray) -> HeartbeatSettings:
        """Decode the interval, which switching the check on needs: at least
        :data:`MIN_HEARTBEAT_INTERVAL_NS`. The host names it in its reply to "off" too,
        where nothing depends on it, so it is not checked there."""
        interval = L.HeartbeatRequest.interval_ns.get(buf)
        if self.enabled and interval < MIN_HEARTBEAT_INTERVAL_NS:
            msg = (
                f"{self.operation}: host reported a heartbeat interval of {interval} ns, "
                f"below the {MIN_HEARTBEAT_INTERVAL_NS} ns (50 ms) a VirtualBox host allows"
            )
            raise RemoteProtocolError(msg)
        return HeartbeatSettings(interval)


@record
class GuestHeartbeat(_VmmdevRequest[None]):
    """``VMMDEVREQ_GUEST_HEARTBEAT`` (24 bytes, header only)."""

    operation: ClassVar[str] = "VMMDEVREQ_GUEST_HEARTBEAT"
    request_type: ClassVar[RequestType] = RequestType.GUEST_HEARTBEAT
    layout_size: ClassVar[int] = L.RequestHeader.size

    def read(self, buf: bytearray) -> None:
        """Nothing comes back."""


# --- guest statistics ------------------------------------------------------------------


@record
class StatisticsInterval:
    """Reply to :class:`GetStatisticsChangeRequest`: seconds between reports (0 = none)."""

    seconds: int


@record
class GetStatisticsChangeRequest(_VmmdevRequest[StatisticsInterval]):
    """``VMMDEVREQ_GET_STATISTICS_CHANGE_REQ`` (32 bytes); acknowledges event 0x80."""

    operation: ClassVar[str] = "VMMDEVREQ_GET_STATISTICS_CHANGE_REQ"
    request_type: ClassVar[RequestType] = RequestType.GET_STATISTICS_CHANGE_REQ
    layout_size: ClassVar[int] = L.StatisticsChangeRequest.size
    acknowledge: bool = True

    def fill(self, buf: bytearray) -> None:
        """Set ``event_ack`` to STATISTICS_INTERVAL_CHANGE_REQUEST when acknowledging."""
        ack = Event.STATISTICS_INTERVAL_CHANGE_REQUEST if self.acknowledge else 0
        L.StatisticsChangeRequest.event_ack.set(buf, ack)

    def read(self, buf: bytearray) -> StatisticsInterval:
        """Decode the interval."""
        return StatisticsInterval(L.StatisticsChangeRequest.interval_s.get(buf))


@record
class GuestStatistics:
    """``VBoxGuestStatistics``: one report; memory figures in 4 KiB pages, loads in percent.

    ``stat_caps`` (:class:`~agent.protocol.constants.StatCap` bits) says which fields are
    real; the host ignores the others.
    """

    cpu_id: int = 0
    stat_caps: int = 0
    cpu_load_idle: int = 0
    cpu_load_kernel: int = 0
    cpu_load_user: int = 0
    threads: int = 0
    processes: int = 0
    handles: int = 0
    memory_load: int = 0
    page_size: int = 0
    phys_mem_total: int = 0
    phys_mem_avail: int = 0
    phys_mem_balloon: int = 0
    mem_commit_total: int = 0
    mem_kernel_total: int = 0
    mem_kernel_paged: int = 0
    mem_kernel_nonpaged: int = 0
    mem_system_cache: int = 0
    page_file_size: int = 0


GUEST_STATISTICS_FIELDS: Final = tuple(GuestStatistics.__dataclass_fields__)
"""The report's fields in ``VBoxGuestStatistics`` order (the layout uses the same names)."""


@record
class ReportGuestStats(_VmmdevRequest[None]):
    """``VMMDEVREQ_REPORT_GUEST_STATS`` (100 bytes): one statistics report."""

    operation: ClassVar[str] = "VMMDEVREQ_REPORT_GUEST_STATS"
    request_type: ClassVar[RequestType] = RequestType.REPORT_GUEST_STATS
    layout_size: ClassVar[int] = L.GuestStatsRequest.size
    stats: GuestStatistics

    def fill(self, buf: bytearray) -> None:
        """Write every field (each must fit in a u32)."""
        for name in GUEST_STATISTICS_FIELDS:
            value: int = getattr(self.stats, name)
            _check_u32(name, value)
            member: L.IntField = getattr(L.GuestStatsRequest, name)
            member.set(buf, value)

    def read(self, buf: bytearray) -> None:
        """Nothing comes back."""
