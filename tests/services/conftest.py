"""Fixtures shared by the service tests: a device on the shared ``host`` (``tests/conftest.py``),
so once with each simulated driver.

Test modules that need another host define their own ``host`` fixture, which takes precedence
over the shared one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from agent.device import Device


@pytest.fixture(name="device")
async def _device(host: SimulatedHost) -> AsyncIterator[Device]:
    async with open_device(SimOpener(host)) as device:
        yield device
