"""The VirtualBox release the simulated host claims to be, wherever a real host shows it."""

from __future__ import annotations

from typing import Final

RELEASE: Final = (7, 0, 18, 162988)
"""Major, minor, build, revision: what VMMDev's GET_HOST_VERSION answers and what the
guest-property service publishes as ``/VirtualBox/HostInfo/VBoxVer``, ``VBoxVerExt`` and
``VBoxRev`` (one host, one version)."""
RELEASE_VERSION: Final = ".".join(str(part) for part in RELEASE[:3])
"""``7.0.18``."""
RELEASE_REVISION: Final = str(RELEASE[3])
"""``162988``."""
