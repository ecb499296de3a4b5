"""Byte layouts of the ioctl and VMMDev structures, declared field by field.

Each layout names its C struct and lists every member with the C member path (union members
written with dots, as ``offsetof`` takes them) and its absolute offset. The same declarations
drive encoding, decoding, ``vbox-agent abi --json`` and the gcc ABI test, so a layout can only
be wrong in one place, where the test sees it.

Sources: ``uapi`` structs are in ``linux/vboxguest.h`` / ``linux/vbox_vmmdev_types.h``;
``vmmdev`` structs are private to the driver (``drivers/virt/vboxguest/vmmdev.h``) and checked
against a C mirror with the sizes the kernel asserts; ``oracle`` structs exist only in Oracle's
``VBoxGuest.h``/``VMMDev.h``. Everything is little-endian; upstream packs to 4 bytes, so a u64
may sit at an offset that is only 4-aligned.
"""

from __future__ import annotations

import functools
import itertools
import struct
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Final, Literal

from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Mapping

Source = Literal["uapi", "vmmdev", "oracle"]


@record
class IntField:
    """An integer member at a fixed offset."""

    offset: int
    c_path: str
    codec: struct.Struct

    def get(self, buf: bytes | bytearray | memoryview, base: int = 0) -> int:
        """Read the member from ``buf`` (of the structure at ``base``)."""
        value: int = self.codec.unpack_from(buf, base + self.offset)[0]
        return value

    def set(self, buf: bytearray | memoryview, value: int, base: int = 0) -> None:
        """Write the member into ``buf`` (of the structure at ``base``)."""
        self.codec.pack_into(buf, base + self.offset, value)

    @property
    def end(self) -> int:
        """Offset just past the member."""
        return self.offset + self.codec.size


@record
class BytesField:
    """A fixed-size byte array (``char name[N]`` or ``u8 padding[N]``)."""

    offset: int
    c_path: str
    size: int

    def get(self, buf: bytes | bytearray | memoryview) -> bytes:
        """Read the array from ``buf``."""
        return bytes(buf[self.offset : self.offset + self.size])

    def set(self, buf: bytearray | memoryview, value: bytes) -> None:
        """Write ``value`` into the array, zero-filling the rest."""
        if len(value) > self.size:
            msg = f"{self.c_path}: {len(value)} bytes do not fit in {self.size}"
            raise ValueError(msg)
        buf[self.offset : self.offset + self.size] = value.ljust(self.size, b"\0")

    @property
    def end(self) -> int:
        """Offset just past the array."""
        return self.offset + self.size


Field = IntField | BytesField


@record
class FieldRun:
    """Adjacent integer members read or written with one ``struct`` call.

    Built by :func:`run` from the members' own declarations, so it cannot disagree with
    them. ``base`` shifts the run, for structures repeated in an array (HGCM parameters).
    """

    offset: int
    codec: struct.Struct

    def get(self, buf: bytes | bytearray | memoryview, base: int = 0) -> tuple[int, ...]:
        """Read the members from ``buf``, in declaration order."""
        values: tuple[int, ...] = self.codec.unpack_from(buf, base + self.offset)
        return values

    def set(self, buf: bytearray | memoryview, *values: int, base: int = 0) -> None:
        """Write the members into ``buf``, in declaration order."""
        self.codec.pack_into(buf, base + self.offset, *values)


def run(*fields: IntField) -> FieldRun:
    """Declare a :class:`FieldRun` over ``fields``, each starting where the previous ends.

    Raises:
        ValueError: no fields, or a gap or an overlap between two of them.
    """
    if not fields:
        msg = "a field run needs at least one field"
        raise ValueError(msg)
    for before, after in itertools.pairwise(fields):
        if after.offset != before.end:
            msg = f"{after.c_path} at {after.offset} does not follow {before.c_path}"
            raise ValueError(msg)
    formats = "".join(field.codec.format.lstrip("<") for field in fields)
    return FieldRun(fields[0].offset, struct.Struct("<" + formats))


_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_U64: Final = struct.Struct("<Q")


def u8(offset: int, c_path: str) -> IntField:
    """Declare a ``__u8`` member."""
    return IntField(offset, c_path, _U8)


def u16(offset: int, c_path: str) -> IntField:
    """Declare a ``__u16`` member."""
    return IntField(offset, c_path, _U16)


def u32(offset: int, c_path: str) -> IntField:
    """Declare a ``__u32`` (or 32-bit enum) member."""
    return IntField(offset, c_path, _U32)


def s32(offset: int, c_path: str) -> IntField:
    """Declare a ``__s32`` member."""
    return IntField(offset, c_path, _I32)


def u64(offset: int, c_path: str) -> IntField:
    """Declare a ``__u64`` member (possibly only 4-aligned)."""
    return IntField(offset, c_path, _U64)


def chars(offset: int, c_path: str, size: int) -> BytesField:
    """Declare a ``char``/``__u8`` array member."""
    return BytesField(offset, c_path, size)


class Layout:
    """A C structure: its name, size, origin and members (class attributes that are fields).

    Members whose ``c_path`` is a whole embedded struct (``hdr``, ``header``) are listed in
    ``nested`` with their offset, so the ABI description includes them.
    """

    c_name: ClassVar[str]
    size: ClassVar[int]
    source: ClassVar[Source]
    nested: ClassVar[Mapping[str, int]] = MappingProxyType({})

    @classmethod
    def fields(cls) -> dict[str, Field]:
        """Return the members by Python attribute name, in declaration order."""
        return {
            name: value
            for klass in reversed(cls.__mro__)
            for name, value in vars(klass).items()
            if isinstance(value, IntField | BytesField)
        }

    @classmethod
    def whole(cls) -> FieldRun:
        """Return every member as one :class:`FieldRun`: the struct in one pack or unpack.

        Raises:
            ValueError: a member that is not an integer, or members that do not follow each
                other (a gap, or a union's overlapping members).
        """
        members = sorted(cls.fields().values(), key=lambda member: member.offset)
        integers = [member for member in members if isinstance(member, IntField)]
        if len(integers) != len(members):
            msg = f"{cls.c_name} has members that are not integers"
            raise ValueError(msg)
        return run(*integers)

    @classmethod
    def offsets(cls) -> dict[str, int]:
        """Return ``{C member path: offset}`` for every declared member."""
        result = dict(cls.nested)
        for field in cls.fields().values():
            result[field.c_path] = field.offset
        return result


# --- ioctl header ------------------------------------------------------------------------


class IoctlHeader(Layout):
    """``struct vbg_ioctl_hdr`` (24 bytes), the header of every ioctl buffer.

    struct vbg_ioctl_hdr { __u32 size_in; __u32 version; __u32 type; __s32 rc;
                           __u32 size_out; __u32 reserved; };
    """

    c_name = "vbg_ioctl_hdr"
    size = 24
    source: ClassVar[Source] = "uapi"
    size_in = u32(0, "size_in")
    version = u32(4, "version")
    type = u32(8, "type")
    rc = s32(12, "rc")
    size_out = u32(16, "size_out")
    reserved = u32(20, "reserved")


class _WithIoctlHeader(Layout):
    nested: ClassVar[Mapping[str, int]] = MappingProxyType({"hdr": 0})
    hdr_size_in = u32(0, "hdr.size_in")
    hdr_version = u32(4, "hdr.version")
    hdr_type = u32(8, "hdr.type")
    hdr_rc = s32(12, "hdr.rc")
    hdr_size_out = u32(16, "hdr.size_out")
    hdr_reserved = u32(20, "hdr.reserved")


class DriverVersionInfo(_WithIoctlHeader):
    """``struct vbg_ioctl_driver_version_info`` (44 bytes; in 40, out 44)."""

    c_name = "vbg_ioctl_driver_version_info"
    size = 44
    source: ClassVar[Source] = "uapi"
    req_version = u32(24, "u.in.req_version")
    min_version = u32(28, "u.in.min_version")
    in_reserved1 = u32(32, "u.in.reserved1")
    in_reserved2 = u32(36, "u.in.reserved2")
    session_version = u32(24, "u.out.session_version")
    driver_version = u32(28, "u.out.driver_version")
    driver_revision = u32(32, "u.out.driver_revision")
    out_reserved1 = u32(36, "u.out.reserved1")
    out_reserved2 = u32(40, "u.out.reserved2")


class HgcmServiceLocationLocalhost(Layout):
    """``struct vmmdev_hgcm_service_location_localhost`` (128 bytes)."""

    c_name = "vmmdev_hgcm_service_location_localhost"
    size = 128
    source: ClassVar[Source] = "uapi"
    service_name = chars(0, "service_name", 128)


class HgcmServiceLocation(Layout):
    """``struct vmmdev_hgcm_service_location`` (132 bytes): a type and a service name."""

    c_name = "vmmdev_hgcm_service_location"
    size = 132
    source: ClassVar[Source] = "uapi"
    type = u32(0, "type")
    service_name = chars(4, "u.localhost.service_name", 128)


class HgcmConnectIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_hgcm_connect`` (156 bytes; in 156, out 28)."""

    c_name = "vbg_ioctl_hgcm_connect"
    size = 156
    source: ClassVar[Source] = "uapi"
    loc_type = u32(24, "u.in.loc.type")
    service_name = chars(28, "u.in.loc.u.localhost.service_name", 128)
    client_id = u32(24, "u.out.client_id")


class HgcmDisconnectIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_hgcm_disconnect`` (28 bytes; in 28, out 24)."""

    c_name = "vbg_ioctl_hgcm_disconnect"
    size = 28
    source: ClassVar[Source] = "uapi"
    client_id = u32(24, "u.in.client_id")


class HgcmCallIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_hgcm_call`` (40 bytes), followed by ``parm_count`` parameters."""

    c_name = "vbg_ioctl_hgcm_call"
    size = 40
    source: ClassVar[Source] = "uapi"
    client_id = u32(24, "client_id")
    function = u32(28, "function")
    timeout_ms = u32(32, "timeout_ms")
    interruptible = u8(36, "interruptible")
    reserved = u8(37, "reserved")
    parm_count = u16(38, "parm_count")


class HgcmParameter64(Layout):
    """``struct vmmdev_hgcm_function_parameter64`` (16 bytes, packed)."""

    c_name = "vmmdev_hgcm_function_parameter64"
    size = 16
    source: ClassVar[Source] = "uapi"
    type = u32(0, "type")
    value32 = u32(4, "u.value32")
    value64 = u64(4, "u.value64")
    pointer_size = u32(4, "u.pointer.size")
    pointer_phys_addr = u64(8, "u.pointer.u.phys_addr")
    pointer_linear_addr = u64(8, "u.pointer.u.linear_addr")
    page_list_size = u32(4, "u.page_list.size")
    page_list_offset = u32(8, "u.page_list.offset")


class HgcmParameter32(Layout):
    """``struct vmmdev_hgcm_function_parameter32`` (12 bytes, packed)."""

    c_name = "vmmdev_hgcm_function_parameter32"
    size = 12
    source: ClassVar[Source] = "uapi"
    type = u32(0, "type")
    value32 = u32(4, "u.value32")
    value64 = u64(4, "u.value64")
    pointer_size = u32(4, "u.pointer.size")
    pointer_phys_addr = u32(8, "u.pointer.u.phys_addr")
    pointer_linear_addr = u32(8, "u.pointer.u.linear_addr")
    page_list_size = u32(4, "u.page_list.size")
    page_list_offset = u32(8, "u.page_list.offset")


class HgcmPageList(Layout):
    """``struct vmmdev_hgcm_pagelist`` (16 bytes nominal; a list takes 8 + 8 * page_count)."""

    c_name = "vmmdev_hgcm_pagelist"
    size = 16
    source: ClassVar[Source] = "uapi"
    flags = u32(0, "flags")
    offset_first_page = u16(4, "offset_first_page")
    page_count = u16(6, "page_count")
    first_page = u64(8, "pages")


@functools.lru_cache(maxsize=64)
def page_list_codec(page_count: int) -> struct.Struct:
    """:class:`HgcmPageList` with ``page_count`` pages, in one pack or unpack: ``flags``,
    ``offset_first_page``, ``page_count``, then the page addresses.

    The addresses are one repeated code (``"<IHH6145Q"``), not a letter each: a struct keeps
    about 32 bytes per letter, which a cached list of a 24 MiB buffer would keep per size.
    """
    header = run(HgcmPageList.flags, HgcmPageList.offset_first_page, HgcmPageList.page_count)
    page = HgcmPageList.first_page.codec.format.lstrip("<")
    return struct.Struct(f"{header.codec.format}{page_count}{page}")


class LogIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_log``: the header and a message of ``size_in - 24`` bytes."""

    c_name = "vbg_ioctl_log"
    size = 28
    source: ClassVar[Source] = "uapi"
    msg = chars(24, "u.in.msg", 1)


class WaitForEventsIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_wait_for_events`` (32 bytes; in 32, out 28)."""

    c_name = "vbg_ioctl_wait_for_events"
    size = 32
    source: ClassVar[Source] = "uapi"
    timeout_ms = u32(24, "u.in.timeout_ms")
    events_in = u32(28, "u.in.events")
    events_out = u32(24, "u.out.events")


class ChangeFilterIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_change_filter`` (32 bytes; in 32, out 24)."""

    c_name = "vbg_ioctl_change_filter"
    size = 32
    source: ClassVar[Source] = "uapi"
    or_mask = u32(24, "u.in.or_mask")
    not_mask = u32(28, "u.in.not_mask")


class AcquireGuestCapsIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_acquire_guest_caps`` (36 bytes; in 36, out 24)."""

    c_name = "vbg_ioctl_acquire_guest_caps"
    size = 36
    source: ClassVar[Source] = "uapi"
    flags = u32(24, "u.in.flags")
    or_mask = u32(28, "u.in.or_mask")
    not_mask = u32(32, "u.in.not_mask")


class SetGuestCapsIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_set_guest_caps`` (32 bytes; in 32, out 32)."""

    c_name = "vbg_ioctl_set_guest_caps"
    size = 32
    source: ClassVar[Source] = "uapi"
    or_mask = u32(24, "u.in.or_mask")
    not_mask = u32(28, "u.in.not_mask")
    session_caps = u32(24, "u.out.session_caps")
    global_caps = u32(28, "u.out.global_caps")


class CheckBalloonIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_check_balloon`` (32 bytes; in 24, out 32)."""

    c_name = "vbg_ioctl_check_balloon"
    size = 32
    source: ClassVar[Source] = "uapi"
    balloon_chunks = u32(24, "u.out.balloon_chunks")
    handle_in_r3 = u8(28, "u.out.handle_in_r3")
    padding = chars(29, "u.out.padding", 3)


class WriteCoreDumpIoctl(_WithIoctlHeader):
    """``struct vbg_ioctl_write_coredump`` (28 bytes; in 28, out 24)."""

    c_name = "vbg_ioctl_write_coredump"
    size = 28
    source: ClassVar[Source] = "uapi"
    flags = u32(24, "u.in.flags")


class ChangeBalloonIoctl(_WithIoctlHeader):
    """Oracle's ``VBGLIOCCHANGEBALLOON`` (40 bytes; in 40, out 24), 64-bit userspace layout.

    A user pointer to a 1 MiB chunk, 7 padding bytes that must be zero, and the inflate flag.
    """

    c_name = "vbg_ioctl_change_balloon"
    size = 40
    source: ClassVar[Source] = "oracle"
    chunk_address = u64(24, "u.in.chunk_address")
    padding = chars(32, "u.in.padding", 7)
    inflate = u8(39, "u.in.inflate")


# --- VMMDev requests ---------------------------------------------------------------------


class RequestHeader(Layout):
    """``struct vmmdev_request_header`` (24 bytes), the head of every VMMDev request.

    struct vmmdev_request_header { u32 size; u32 version; enum request_type;
                                   s32 rc; u32 reserved1; u32 requestor; };
    """

    c_name = "vmmdev_request_header"
    size = 24
    source: ClassVar[Source] = "vmmdev"
    size_ = u32(0, "size")
    version = u32(4, "version")
    request_type = u32(8, "request_type")
    rc = s32(12, "rc")
    reserved1 = u32(16, "reserved1")
    requestor = u32(20, "requestor")


class _WithRequestHeader(Layout):
    nested: ClassVar[Mapping[str, int]] = MappingProxyType({"header": 0})
    header_size = u32(0, "header.size")
    header_version = u32(4, "header.version")
    header_request_type = u32(8, "header.request_type")
    header_rc = s32(12, "header.rc")
    header_reserved1 = u32(16, "header.reserved1")
    header_requestor = u32(20, "header.requestor")


class HostVersionRequest(_WithRequestHeader):
    """``struct vmmdev_host_version`` (40 bytes), GET_HOST_VERSION."""

    c_name = "vmmdev_host_version"
    size = 40
    source: ClassVar[Source] = "vmmdev"
    major = u16(24, "major")
    minor = u16(26, "minor")
    build = u32(28, "build")
    revision = u32(32, "revision")
    features = u32(36, "features")


HOST_VERSION_BODY: Final = run(
    HostVersionRequest.major,
    HostVersionRequest.minor,
    HostVersionRequest.build,
    HostVersionRequest.revision,
    HostVersionRequest.features,
)
"""What GET_HOST_VERSION answers after its header, in one pack or unpack."""


class MaskRequest(_WithRequestHeader):
    """``struct vmmdev_mask`` (32 bytes): CTL_GUEST_FILTER_MASK, SET_GUEST_CAPABILITIES."""

    c_name = "vmmdev_mask"
    size = 32
    source: ClassVar[Source] = "vmmdev"
    or_mask = u32(24, "or_mask")
    not_mask = u32(28, "not_mask")


class EventsRequest(_WithRequestHeader):
    """``struct vmmdev_events`` (28 bytes), ACKNOWLEDGE_EVENTS."""

    c_name = "vmmdev_events"
    size = 28
    source: ClassVar[Source] = "vmmdev"
    events = u32(24, "events")


class GuestInfoRequest(_WithRequestHeader):
    """``struct vmmdev_guest_info`` (32 bytes), REPORT_GUEST_INFO."""

    c_name = "vmmdev_guest_info"
    size = 32
    source: ClassVar[Source] = "vmmdev"
    interface_version = u32(24, "interface_version")
    os_type = u32(28, "os_type")


class GuestInfo2Request(_WithRequestHeader):
    """``struct vmmdev_guest_info2`` (168 bytes), REPORT_GUEST_INFO2."""

    c_name = "vmmdev_guest_info2"
    size = 168
    source: ClassVar[Source] = "vmmdev"
    additions_major = u16(24, "additions_major")
    additions_minor = u16(26, "additions_minor")
    additions_build = u32(28, "additions_build")
    additions_revision = u32(32, "additions_revision")
    additions_features = u32(36, "additions_features")
    name = chars(40, "name", 128)


class GuestStatusRequest(_WithRequestHeader):
    """``struct vmmdev_guest_status`` (36 bytes), REPORT_GUEST_STATUS."""

    c_name = "vmmdev_guest_status"
    size = 36
    source: ClassVar[Source] = "vmmdev"
    facility = u32(24, "facility")
    status = u32(28, "status")
    flags = u32(32, "flags")


class MemBalloonInfoRequest(_WithRequestHeader):
    """``struct vmmdev_memballoon_info`` (36 bytes), GET_MEMBALLOON_CHANGE_REQ."""

    c_name = "vmmdev_memballoon_info"
    size = 36
    source: ClassVar[Source] = "vmmdev"
    balloon_chunks = u32(24, "balloon_chunks")
    phys_mem_chunks = u32(28, "phys_mem_chunks")
    event_ack = u32(32, "event_ack")


class MemBalloonChangeRequest(_WithRequestHeader):
    """``struct vmmdev_memballoon_change`` (2080 bytes), CHANGE_MEMBALLOON: 256 page addresses."""

    c_name = "vmmdev_memballoon_change"
    size = 2080
    source: ClassVar[Source] = "vmmdev"
    pages = u32(24, "pages")
    inflate = u32(28, "inflate")
    phys_page = u64(32, "phys_page")


BALLOON_CHANGE_COUNT_AND_FLAG: Final = run(
    MemBalloonChangeRequest.pages, MemBalloonChangeRequest.inflate
)
"""CHANGE_MEMBALLOON's page count and inflate flag, adjacent: one pack or unpack."""


class WriteCoreDumpRequest(_WithRequestHeader):
    """``struct vmmdev_write_core_dump`` (28 bytes), WRITE_COREDUMP."""

    c_name = "vmmdev_write_core_dump"
    size = 28
    source: ClassVar[Source] = "vmmdev"
    flags = u32(24, "flags")


class HeartbeatRequest(_WithRequestHeader):
    """``struct vmmdev_heartbeat`` (36 bytes, packed), HEARTBEAT_CONFIGURE."""

    c_name = "vmmdev_heartbeat"
    size = 36
    source: ClassVar[Source] = "vmmdev"
    interval_ns = u64(24, "interval_ns")
    enabled = u8(32, "enabled")
    padding = chars(33, "padding", 3)


class HostTimeRequest(_WithRequestHeader):
    """Upstream ``VMMDevReqHostTime`` (32 bytes), GET_HOST_TIME: ms since the Unix epoch."""

    c_name = "vmmdev_host_time"
    size = 32
    source: ClassVar[Source] = "oracle"
    time_ms = u64(24, "time")


class StatisticsChangeRequest(_WithRequestHeader):
    """Upstream ``VMMDevGetStatisticsChangeRequest`` (32 bytes), GET_STATISTICS_CHANGE_REQ.

    The host writes the interval (seconds, 0 = no reports); ``event_ack`` set to
    STATISTICS_INTERVAL_CHANGE_REQUEST marks the interval as seen by the guest.
    """

    c_name = "vmmdev_statistics_change"
    size = 32
    source: ClassVar[Source] = "oracle"
    interval_s = u32(24, "stat_interval")
    event_ack = u32(28, "event_ack")


class GuestStatsRequest(_WithRequestHeader):
    """Upstream ``VMMDevReportGuestStats`` (24 + 19 * 4 = 100 bytes), REPORT_GUEST_STATS.

    ``VBoxGuestStatistics`` follows the header: 19 u32 members, memory ones in 4 KiB pages.
    """

    c_name = "vmmdev_guest_stats"
    size = 100
    nested: ClassVar[Mapping[str, int]] = MappingProxyType({"header": 0, "stats": 24})
    source: ClassVar[Source] = "oracle"
    cpu_id = u32(24, "stats.cpu_id")
    stat_caps = u32(28, "stats.stat_caps")
    cpu_load_idle = u32(32, "stats.cpu_load_idle")
    cpu_load_kernel = u32(36, "stats.cpu_load_kernel")
    cpu_load_user = u32(40, "stats.cpu_load_user")
    threads = u32(44, "stats.threads")
    processes = u32(48, "stats.processes")
    handles = u32(52, "stats.handles")
    memory_load = u32(56, "stats.memory_load")
    page_size = u32(60, "stats.page_size")
    phys_mem_total = u32(64, "stats.phys_mem_total")
    phys_mem_avail = u32(68, "stats.phys_mem_avail")
    phys_mem_balloon = u32(72, "stats.phys_mem_balloon")
    mem_commit_total = u32(76, "stats.mem_commit_total")
    mem_kernel_total = u32(80, "stats.mem_kernel_total")
    mem_kernel_paged = u32(84, "stats.mem_kernel_paged")
    mem_kernel_nonpaged = u32(88, "stats.mem_kernel_nonpaged")
    mem_system_cache = u32(92, "stats.mem_system_cache")
    page_file_size = u32(96, "stats.page_file_size")


class SessionIdRequest(_WithRequestHeader):
    """Upstream ``VMMDevReqSessionId`` (32 bytes), GET_SESSION_ID."""

    c_name = "vmmdev_session_id"
    size = 32
    source: ClassVar[Source] = "oracle"
    session_id = u64(24, "session_id")


class CpuHotPlugStatusRequest(_WithRequestHeader):
    """Upstream ``VMMDevCpuHotPlugStatusRequest`` (28 bytes), SET_CPU_HOTPLUG_STATUS.

    ``status`` is a ``VMMDevCpuStatusType``: Disable 1, Enable 2 (anything else is
    VERR_INVALID_PARAMETER).
    """

    c_name = "vmmdev_cpu_hotplug_status"
    size = 28
    source: ClassVar[Source] = "oracle"
    status = u32(24, "status")


class CpuHotPlugRequest(_WithRequestHeader):
    """Upstream ``VMMDevGetCpuHotPlugRequest`` (36 bytes), GET_CPU_HOTPLUG_REQ.

    The host writes its pending event (a ``VMMDevCpuEventType``) and the CPU's core and
    package ids, then clears its slot (None, UINT32_MAX, UINT32_MAX).
    """

    c_name = "vmmdev_cpu_hotplug_request"
    size = 36
    source: ClassVar[Source] = "oracle"
    event_type = u32(24, "event_type")
    core = u32(28, "core")
    package = u32(32, "package")


class _WithHgcmHeader(Layout):
    nested: ClassVar[Mapping[str, int]] = MappingProxyType({"header": 0, "header.header": 0})
    header_size = u32(0, "header.header.size")
    header_version = u32(4, "header.header.version")
    header_request_type = u32(8, "header.header.request_type")
    header_rc = s32(12, "header.header.rc")
    header_reserved1 = u32(16, "header.header.reserved1")
    header_requestor = u32(20, "header.header.requestor")
    flags = u32(24, "header.flags")
    result = s32(28, "header.result")


class HgcmRequestHeader(_WithRequestHeader):
    """``struct vmmdev_hgcmreq_header`` (32 bytes): request header, flags, result."""

    c_name = "vmmdev_hgcmreq_header"
    size = 32
    source: ClassVar[Source] = "vmmdev"
    flags = u32(24, "flags")
    result = s32(28, "result")


class HgcmConnectRequest(_WithHgcmHeader):
    """``struct vmmdev_hgcm_connect`` (168 bytes), HGCM_CONNECT."""

    c_name = "vmmdev_hgcm_connect"
    size = 168
    source: ClassVar[Source] = "vmmdev"
    nested: ClassVar[Mapping[str, int]] = MappingProxyType(
        {"header": 0, "header.header": 0, "loc": 32}
    )
    loc_type = u32(32, "loc.type")
    service_name = chars(36, "loc.u.localhost.service_name", 128)
    client_id = u32(164, "client_id")


class HgcmDisconnectRequest(_WithHgcmHeader):
    """``struct vmmdev_hgcm_disconnect`` (36 bytes), HGCM_DISCONNECT."""

    c_name = "vmmdev_hgcm_disconnect"
    size = 36
    source: ClassVar[Source] = "vmmdev"
    client_id = u32(32, "client_id")


class HgcmCallRequest(_WithHgcmHeader):
    """``struct vmmdev_hgcm_call`` (44 bytes), HGCM_CALL32/64, followed by the parameters."""

    c_name = "vmmdev_hgcm_call"
    size = 44
    source: ClassVar[Source] = "vmmdev"
    client_id = u32(32, "client_id")
    function = u32(36, "function")
    parm_count = u32(40, "parm_count")


class HgcmCancel2Request(_WithRequestHeader):
    """``struct vmmdev_hgcm_cancel2`` (28 bytes), HGCM_CANCEL2."""

    c_name = "vmmdev_hgcm_cancel2"
    size = 28
    source: ClassVar[Source] = "vmmdev"
    phys_req_to_cancel = u32(24, "phys_req_to_cancel")


ALL_LAYOUTS: Final[tuple[type[Layout], ...]] = (
    IoctlHeader,
    DriverVersionInfo,
    HgcmServiceLocationLocalhost,
    HgcmServiceLocation,
    HgcmConnectIoctl,
    HgcmDisconnectIoctl,
    HgcmCallIoctl,
    HgcmParameter64,
    HgcmParameter32,
    HgcmPageList,
    LogIoctl,
    WaitForEventsIoctl,
    ChangeFilterIoctl,
    AcquireGuestCapsIoctl,
    SetGuestCapsIoctl,
    CheckBalloonIoctl,
    WriteCoreDumpIoctl,
    ChangeBalloonIoctl,
    RequestHeader,
    HostVersionRequest,
    MaskRequest,
    EventsRequest,
    GuestInfoRequest,
    GuestInfo2Request,
    GuestStatusRequest,
    MemBalloonInfoRequest,
    MemBalloonChangeRequest,
    WriteCoreDumpRequest,
    HeartbeatRequest,
    StatisticsChangeRequest,
    GuestStatsRequest,
    HostTimeRequest,
    SessionIdRequest,
    CpuHotPlugStatusRequest,
    CpuHotPlugRequest,
    HgcmRequestHeader,
    HgcmConnectRequest,
    HgcmDisconnectRequest,
    HgcmCallRequest,
    HgcmCancel2Request,
)
"""Every layout, in the order ``vbox-agent abi`` lists them."""
