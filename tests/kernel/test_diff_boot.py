"""Differential: the load sequence and the fixed-size ioctls' header checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.kernel.differential import assert_agree, differ

if TYPE_CHECKING:
    from pathlib import Path

    from tests.kernel.differential import Rig


async def test_boot(kernel_library: Path) -> None:
    """The driver's load sequence reaches the host request by request."""
    del kernel_library

    async def script(rig: Rig) -> None:
        rig.note("filter", rig.host.vmmdev.guest_filter)

    assert_agree(await differ(script))
