"""The layouts and numbers the network and users services read the guest with, as gcc sees
them: ``struct utmp`` (``<utmp.h>``) and the interface ioctls (``<net/if.h>``,
``<linux/sockios.h>``). gcc is required, as for the protocol's ABI test (``.ci/run`` installs
it); a missing gcc fails with a message."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from typing import TYPE_CHECKING, Final

from agent.services import _logins, _netifaces

if TYPE_CHECKING:
    from pathlib import Path

GCC_LIMIT_S: Final = 120
PROBE: Final = r"""
#include <linux/sockios.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <utmp.h>

int main(void) {
    printf("{\"utmp\": %zu, \"ut_type\": %zu, \"ut_pid\": %zu, \"ut_user\": %zu, "
           "\"ut_namesize\": %d, \"user_process\": %d, ",
           sizeof(struct utmp), offsetof(struct utmp, ut_type), offsetof(struct utmp, ut_pid),
           offsetof(struct utmp, ut_user), UT_NAMESIZE, USER_PROCESS);
    printf("\"ifreq\": %zu, \"ifnamsiz\": %d, \"ifr_addr\": %zu, \"ifr_hwaddr_data\": %zu, "
           "\"ifr_flags\": %zu, \"ifconf\": %zu, \"ifc_buf\": %zu, \"sin_addr\": %zu, ",
           sizeof(struct ifreq), IFNAMSIZ, offsetof(struct ifreq, ifr_addr),
           offsetof(struct ifreq, ifr_hwaddr.sa_data), offsetof(struct ifreq, ifr_flags),
           sizeof(struct ifconf), offsetof(struct ifconf, ifc_buf),
           offsetof(struct sockaddr_in, sin_addr));
    printf("\"SIOCGIFCONF\": %d, \"SIOCGIFFLAGS\": %d, \"SIOCGIFBRDADDR\": %d, "
           "\"SIOCGIFNETMASK\": %d, \"SIOCGIFHWADDR\": %d, \"IFF_UP\": %d, "
           "\"IFF_LOOPBACK\": %d}\n",
           SIOCGIFCONF, SIOCGIFFLAGS, SIOCGIFBRDADDR, SIOCGIFNETMASK, SIOCGIFHWADDR, IFF_UP,
           IFF_LOOPBACK);
    return 0;
}
"""


def _gcc_says(tmp_path: Path) -> dict[str, int]:
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc is not installed (apt-get install gcc linux-libc-dev)"
    source, binary = tmp_path / "probe.c", tmp_path / "probe"
    source.write_text(PROBE)
    subprocess.run([gcc, str(source), "-o", str(binary)], check=True, timeout=GCC_LIMIT_S)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True)
    said: dict[str, int] = json.loads(output.stdout)
    return said


def test_the_readers_match_gcc(tmp_path: Path) -> None:
    """Every size, offset and number the readers use is the C library's and the kernel's."""
    gcc = _gcc_says(tmp_path)
    head = _logins._UTMP_HEAD
    assert (gcc["utmp"], gcc["ut_namesize"], gcc["user_process"]) == (
        _logins.UTMP_RECORD_SIZE,
        _logins.UT_NAMESIZE,
        _logins.USER_PROCESS,
    )
    assert (gcc["ut_type"], gcc["ut_pid"]) == (0, struct.calcsize("=h2x"))
    assert gcc["ut_user"] == head.size - _logins.UT_NAMESIZE
    ifreq = _netifaces.IFNAMSIZ
    assert (gcc["ifreq"], gcc["ifnamsiz"]) == (_netifaces.IFREQ_SIZE, _netifaces.IFNAMSIZ)
    assert gcc["ifr_addr"] == gcc["ifr_flags"] == ifreq
    assert gcc["ifr_hwaddr_data"] == _netifaces._HWADDR.start
    assert ifreq + gcc["sin_addr"] == _netifaces._SOCKADDR_IN_ADDRESS.start
    ifconf = _netifaces._IFCONF
    assert (gcc["ifconf"], gcc["ifc_buf"]) == (ifconf.size, struct.calcsize("i0P"))
    for name in ("SIOCGIFCONF", "SIOCGIFFLAGS", "SIOCGIFBRDADDR", "SIOCGIFNETMASK"):
        assert gcc[name] == getattr(_netifaces, name), name
    assert gcc["SIOCGIFHWADDR"] == _netifaces.SIOCGIFHWADDR
    assert (gcc["IFF_UP"], gcc["IFF_LOOPBACK"]) == (_netifaces.IFF_UP, _netifaces.IFF_LOOPBACK)
