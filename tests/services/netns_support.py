"""Setting up interfaces in a network namespace of the test's own, for the network reader's
tests (run in a subprocess: ``unshare`` changes the calling process for good).

The devices are bridges (``SIOCBRADDBR``), configured with the classic ioctls; an address
without a label of its own is added with an ``RTM_NEWADDR`` netlink request, which the
ioctls cannot make (``SIOCSIFADDR`` on a name replaces that label's address). Nothing here
needs a program outside Python (no iproute2).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
from typing import Final

CLONE_NEWNET: Final = 0x40000000
SIOCSIFFLAGS: Final = 0x8914
SIOCSIFADDR: Final = 0x8916
SIOCSIFBRDADDR: Final = 0x891A
SIOCSIFNETMASK: Final = 0x891C
SIOCSIFHWADDR: Final = 0x8924
SIOCBRADDBR: Final = 0x89A0
IFF_UP: Final = 0x1
ARPHRD_ETHER: Final = 1
IFREQ_UNION_SIZE: Final = 24
NETLINK_ROUTE: Final = 0
RTM_NEWADDR: Final = 20
RTM_DELADDR: Final = 21
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_EXCL: Final = 0x200
NLM_F_CREATE: Final = 0x400
NLMSG_ERROR: Final = 2
IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2
IFA_BROADCAST: Final = 4
_NLMSGHDR: Final = struct.Struct("=IHHII")
_IFADDRMSG: Final = struct.Struct("=BBBBI")
_RTATTR: Final = struct.Struct("=HH")
REPLY_SIZE: Final = 65536


def enter_new_network_namespace() -> socket.socket:
    """Move this process into a new network namespace (only a down loopback there); return
    an ``AF_INET`` datagram socket in it for the ioctls."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET):
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def ifreq(name: str, tail: bytes = b"") -> bytes:
    """A ``struct ifreq``: the name, then ``tail`` in the union."""
    return name.encode().ljust(16, b"\0") + tail.ljust(IFREQ_UNION_SIZE, b"\0")


def inet(address: str) -> bytes:
    """A ``sockaddr_in`` of ``address``."""
    return struct.pack("HH4s", socket.AF_INET, 0, socket.inet_aton(address))


def set_up(sock: socket.socket, name: str) -> None:
    fcntl.ioctl(sock, SIOCSIFFLAGS, ifreq(name, struct.pack("H", IFF_UP)))


def add_bridge(sock: socket.socket, name: str) -> None:
    fcntl.ioctl(sock, SIOCBRADDBR, name.encode() + b"\0")


def set_address(
    sock: socket.socket,
    label: str,
    address: str,
    netmask: str | None = None,
    broadcast: str | None = None,
) -> None:
    """Set the address of ``label`` (``br7`` or ``br7:1``), then its netmask and broadcast."""
    fcntl.ioctl(sock, SIOCSIFADDR, ifreq(label, inet(address)))
    if netmask is not None:
        fcntl.ioctl(sock, SIOCSIFNETMASK, ifreq(label, inet(netmask)))
    if broadcast is not None:
        fcntl.ioctl(sock, SIOCSIFBRDADDR, ifreq(label, inet(broadcast)))


def set_mac(sock: socket.socket, name: str, mac: str) -> None:
    fcntl.ioctl(
        sock, SIOCSIFHWADDR, ifreq(name, struct.pack("H6s", ARPHRD_ETHER, bytes.fromhex(mac)))
    )


def add_unlabelled_address(device: str, address: str, prefix_length: int, broadcast: str) -> None:
    """Add ``address/prefix_length`` to ``device`` with netlink, without a label: it is
    listed under the device's own name."""
    attributes = [(IFA_LOCAL, address), (IFA_ADDRESS, address), (IFA_BROADCAST, broadcast)]
    _address_request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, device, prefix_length, attributes)


def delete_address(device: str, address: str, prefix_length: int) -> None:
    """Delete ``address/prefix_length`` from ``device`` with netlink."""
    _address_request(RTM_DELADDR, 0, device, prefix_length, [(IFA_LOCAL, address)])


def _address_request(
    kind: int,
    flags: int,
    device: str,
    prefix_length: int,
    attributes: list[tuple[int, str]],
) -> None:
    """Send one address request; raise the kernel's error, if any, as ``OSError``."""
    body = _IFADDRMSG.pack(socket.AF_INET, prefix_length, 0, 0, socket.if_nametoindex(device))
    for kind_of_attribute, value in attributes:
        data = socket.inet_aton(value)
        body += _RTATTR.pack(_RTATTR.size + len(data), kind_of_attribute) + data
    header = _NLMSGHDR.pack(
        _NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as netlink:
        netlink.sendto(header + body, (0, 0))
        reply = netlink.recv(REPLY_SIZE)
    _length, reply_kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(reply)
    if reply_kind != NLMSG_ERROR:
        raise OSError(errno.EPROTO, f"netlink: unexpected reply type {reply_kind}")
    (error,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
    if error:
        raise OSError(-error, f"netlink address request {kind}: {errno.errorcode.get(-error)}")
