"""Kernel-driver personalities in front of the simulated VMMDev.

``mainline`` is the Linux in-tree driver, ``oracle`` Oracle's out-of-tree driver (balloon
allocated by the kernel, or in ring 3 with ``r3_balloon``), ``passthrough`` a driver that
lets trusted userspace own the balloon and the heartbeat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.host.driver._core import Driver
from agent.host.driver._load import DriverLoadError
from agent.host.driver._session import DriverSession
from agent.host.driver.mainline import MainlineDriver
from agent.host.driver.oracle import OracleDriver
from agent.host.driver.passthrough import PassthroughDriver

if TYPE_CHECKING:
    from agent.host.memory import DictMemory
    from agent.host.vmmdev import VMMDev

PERSONALITIES: Final[dict[str, type[Driver]]] = {
    MainlineDriver.personality: MainlineDriver,
    OracleDriver.personality: OracleDriver,
    PassthroughDriver.personality: PassthroughDriver,
}


def make_driver(
    personality: str, vmmdev: VMMDev, ram: DictMemory, *, r3_balloon: bool = False
) -> Driver:
    """Return a driver of ``personality`` bound to ``vmmdev``.

    ``r3_balloon`` builds Oracle's driver without its kernel balloon allocator.

    Raises:
        ValueError: unknown personality, or ``r3_balloon`` for another personality.
    """
    try:
        driver_type = PERSONALITIES[personality]
    except KeyError:
        names = ", ".join(PERSONALITIES)
        msg = f"unknown driver personality {personality!r}: expected one of {names}"
        raise ValueError(msg) from None
    if driver_type is OracleDriver:
        return OracleDriver(vmmdev, ram, r3_balloon=r3_balloon)
    if r3_balloon:
        msg = f"a ring-3 balloon is an option of the oracle personality, not of {personality!r}"
        raise ValueError(msg)
    return driver_type(vmmdev, ram)


__all__ = [
    "PERSONALITIES",
    "Driver",
    "DriverLoadError",
    "DriverSession",
    "MainlineDriver",
    "OracleDriver",
    "PassthroughDriver",
    "make_driver",
]
