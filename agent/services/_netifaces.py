"""The guest's IPv4 interfaces, as VBoxService's VM-info service lists them on Linux.

``SIOCGIFCONF`` on an ``AF_INET`` datagram socket names one entry per IPv4 address (an
interface with a labelled second address, ``eth0:1``, has two), in the kernel's device
order; the loopback device is left out. For each entry ``SIOCGIFFLAGS``, ``SIOCGIFBRDADDR``,
``SIOCGIFNETMASK`` and ``SIOCGIFHWADDR`` give the state, broadcast address, netmask and MAC.
Each of these is asked with the whole entry, name and address, as VBoxService does: the
kernel answers the broadcast and netmask of the address with that label and address, where
the name alone would give the label's first address (a second address added without a label
of its own shares the device's name). The socket only carries these ioctls: it is never
bound and sends nothing. An entry whose interface (``ENODEV``) or address
(``EADDRNOTAVAIL``) goes away between the listing and its own ioctls is skipped.
"""

from __future__ import annotations

import array
import errno
import fcntl
import socket
import struct
from typing import Final

from agent.protocol.host_text import host_str
from agent.protocol.iprt_utf8 import utf8_fault
from agent.records import record

SIOCGIFCONF: Final = 0x8912
SIOCGIFFLAGS: Final = 0x8913
SIOCGIFBRDADDR: Final = 0x8919
SIOCGIFNETMASK: Final = 0x891B
SIOCGIFHWADDR: Final = 0x8927
IFF_UP: Final = 0x1
IFF_LOOPBACK: Final = 0x8
IFNAMSIZ: Final = 16
IFREQ_SIZE: Final = IFNAMSIZ + max(16, struct.calcsize("LLHBBB0L"))
"""``struct ifreq``: the name, then a union whose largest member is ``struct ifmap``."""
_IFCONF: Final = struct.Struct("iP")
"""``struct ifconf``: the buffer's length, then its address."""
_SOCKADDR_IN_ADDRESS: Final = slice(IFNAMSIZ + 4, IFNAMSIZ + 8)
"""Where a ``sockaddr_in`` in an ``ifreq`` keeps its address (after family and port)."""
_HWADDR: Final = slice(IFNAMSIZ + 2, IFNAMSIZ + 8)
"""A 6-byte hardware address in ``ifr_hwaddr.sa_data``."""
LISTING_ATTEMPTS: Final = 3
"""Listings tried when addresses keep appearing between sizing the buffer and filling it."""
_SPARE_ENTRIES: Final = 4
GONE_SINCE_LISTING: Final = frozenset({errno.ENODEV, errno.EADDRNOTAVAIL})
"""What the ioctls of an entry fail with when its interface or its address went away."""


@record
class NetInterface:
    """One IPv4 address of a non-loopback interface, with what VBoxService reports of it.

    Attributes:
        name: the interface name, or the address's label (``eth0:1``), as host text
            (bytes Python cannot decode kept as surrogate escapes); None where IPRT would not
            take it as UTF-8 (Linux takes any bytes but ``/``, ``:``, white space and NUL),
            which VBoxService does not publish either.
        address, broadcast, netmask: dotted quads (``0.0.0.0`` where there is none).
        mac: the hardware address as 12 upper-case hex digits (zeros where there is none).
        up: whether the interface is up (``IFF_UP``).
    """

    name: str | None
    address: str
    broadcast: str
    netmask: str
    mac: str
    up: bool


def read_ipv4_interfaces() -> tuple[NetInterface, ...]:
    """List the guest's IPv4 interfaces.

    Raises:
        OSError: no ``AF_INET`` socket (a sandbox without it) or the listing failed.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        found: list[NetInterface] = []
        for entry in _list_entries(sock):
            try:
                interface = _describe(sock, entry)
            except OSError as exc:
                if exc.errno not in GONE_SINCE_LISTING:
                    raise
                continue
            if interface is not None:
                found.append(interface)
        return tuple(found)


def _list_entries(sock: socket.socket) -> list[bytes]:
    """The ``ifreq`` entries ``SIOCGIFCONF`` returns, every one of them."""
    needed = _ifconf(sock, None)
    for _ in range(LISTING_ATTEMPTS):
        size = needed + _SPARE_ENTRIES * IFREQ_SIZE
        buffer = array.array("B", bytes(size))
        used = _ifconf(sock, buffer)
        if used < size:  # room to spare: nothing was cut off
            data = buffer.tobytes()
            return [data[at : at + IFREQ_SIZE] for at in range(0, used, IFREQ_SIZE)]
        needed = _ifconf(sock, None)
    msg = f"SIOCGIFCONF: the address list kept growing over {LISTING_ATTEMPTS} listings"
    raise OSError(errno.EOVERFLOW, msg)


def _ifconf(sock: socket.socket, buffer: array.array[int] | None) -> int:
    """Run ``SIOCGIFCONF`` into ``buffer`` (None: only size it); return the bytes used."""
    address, length = (0, 0) if buffer is None else (buffer.buffer_info()[0], len(buffer))
    reply = fcntl.ioctl(sock.fileno(), SIOCGIFCONF, _IFCONF.pack(length, address))
    used: int = _IFCONF.unpack(reply)[0]
    return used


def _describe(sock: socket.socket, entry: bytes) -> NetInterface | None:
    """The interface of one listing entry; None for the loopback device or another family."""
    family: int = struct.unpack_from("H", entry, IFNAMSIZ)[0]
    if family != socket.AF_INET:
        return None
    flags: int = struct.unpack_from("H", _ioctl(sock, SIOCGIFFLAGS, entry), IFNAMSIZ)[0]
    if flags & IFF_LOOPBACK:
        return None
    hwaddr = _ioctl(sock, SIOCGIFHWADDR, entry)[_HWADDR]
    return NetInterface(
        name=_host_name(entry[:IFNAMSIZ].split(b"\0", 1)[0]),
        address=socket.inet_ntoa(entry[_SOCKADDR_IN_ADDRESS]),
        broadcast=socket.inet_ntoa(_ioctl(sock, SIOCGIFBRDADDR, entry)[_SOCKADDR_IN_ADDRESS]),
        netmask=socket.inet_ntoa(_ioctl(sock, SIOCGIFNETMASK, entry)[_SOCKADDR_IN_ADDRESS]),
        mac=hwaddr.hex().upper(),
        up=bool(flags & IFF_UP),
    )


def _host_name(raw: bytes) -> str | None:
    """``raw`` as host text (:func:`~agent.protocol.host_text.host_str`) if IPRT takes it as
    UTF-8, as VBoxService checks a name before it publishes it; else None. IPRT and Python
    differ both ways: U+FFFE and U+FFFF are refused, code points past U+10FFFF taken."""
    return None if utf8_fault(raw) is not None else host_str(raw)


def _ioctl(sock: socket.socket, code: int, request: bytes) -> bytes:
    reply: bytes = fcntl.ioctl(sock.fileno(), code, request)
    return reply
