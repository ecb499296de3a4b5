"""Kernel-driver personalities in front of the simulated VMMDev.

``mainline`` is the Linux in-tree driver, ``oracle`` Oracle's out-of-tree driver (balloon
allocated by the kernel, or in ring 3 when built without that), ``passthrough`` a driver
that lets trusted userspace own the balloon and the heartbeat. ``kernel`` (external, loaded
on demand) is the real Linux driver from the source checkout's test bed.
"""

from __future__ import annotations

from typing import Any, Final

from agent.host.driver._core import Driver
from agent.host.driver._load import DriverLoadError
from agent.host.driver._model import (
    EXTERNAL_PERSONALITIES,
    DriverModel,
    PersonalitySpec,
    PersonalityUnavailableError,
    load_external,
)
from agent.host.driver._session import DriverSession
from agent.host.driver.mainline import MainlineDriver
from agent.host.driver.oracle import OracleDriver
from agent.host.driver.passthrough import PassthroughDriver
from agent.host.memory import DictMemory

PERSONALITIES: Final[dict[str, type[Driver]]] = {
    MainlineDriver.personality: MainlineDriver,
    OracleDriver.personality: OracleDriver,
    PassthroughDriver.personality: PassthroughDriver,
}
"""The built-in personalities."""
ALL_PERSONALITIES: Final = (*PERSONALITIES, *EXTERNAL_PERSONALITIES)
"""Every personality name, built-in first."""
REQUEST_RAM_BASE: Final = 0x0010_0000
REQUEST_RAM_LIMIT: Final = 0xFFFF_F000
"""Request and bounce buffers live below 4 GiB, as ``vbg_req_alloc`` (GFP_DMA32) places them."""


def _request_ram(_ram_mb: int) -> DictMemory:
    return DictMemory(base=REQUEST_RAM_BASE, limit=REQUEST_RAM_LIMIT)


def personality_spec(personality: str) -> PersonalitySpec[Any]:
    """Return how to build ``personality`` (importing an external one on first use).

    Raises:
        ValueError: unknown personality.
        PersonalityUnavailableError: an external personality that cannot run here.
    """
    if personality in EXTERNAL_PERSONALITIES:
        return load_external(personality)
    driver_type = _builtin(personality)
    return PersonalitySpec(personality, _request_ram, driver_type)


def _builtin(personality: str) -> type[Driver]:
    try:
        return PERSONALITIES[personality]
    except KeyError:
        names = ", ".join(ALL_PERSONALITIES)
        msg = f"unknown driver personality {personality!r}: expected one of {names}"
        raise ValueError(msg) from None


__all__ = [
    "ALL_PERSONALITIES",
    "PERSONALITIES",
    "REQUEST_RAM_BASE",
    "REQUEST_RAM_LIMIT",
    "Driver",
    "DriverLoadError",
    "DriverModel",
    "DriverSession",
    "MainlineDriver",
    "OracleDriver",
    "PassthroughDriver",
    "PersonalitySpec",
    "PersonalityUnavailableError",
    "personality_spec",
]
