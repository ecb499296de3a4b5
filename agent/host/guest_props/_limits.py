"""Names of the properties the simulated service sets itself (``initialize``, ``svcNotify``)."""

from __future__ import annotations

from typing import Final

VBOX_VER: Final = "/VirtualBox/HostInfo/VBoxVer"
VBOX_VER_EXT: Final = "/VirtualBox/HostInfo/VBoxVerExt"
VBOX_REV: Final = "/VirtualBox/HostInfo/VBoxRev"
RESET_COUNTER: Final = "/VirtualBox/VMInfo/ResetCounter"
RESUME_COUNTER: Final = "/VirtualBox/VMInfo/ResumeCounter"
SYSPREP_EXEC: Final = "/VirtualBox/HostGuest/SysprepExec"
SYSPREP_ARGS: Final = "/VirtualBox/HostGuest/SysprepArgs"
