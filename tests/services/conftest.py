"""Fixtures shared by the service tests: a running simulated mainline host and a device on it.

Test modules that need another personality define their own ``host`` fixture, which takes
precedence over these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from agent.device import open_device
from agent.host import SimOpener, SimulatedHost

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from agent.device import Device


@pytest.fixture(name="host")
async def _host() -> AsyncIterator[SimulatedHost]:
    host = SimulatedHost(personality="mainline")
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


@pytest.fixture(name="device")
async def _device(host: SimulatedHost) -> AsyncIterator[Device]:
    async with open_device(SimOpener(host)) as device:
        yield device
