"""What ``SimulatedHost`` needs of a driver personality, and where personalities come from.

The built-in personalities are models in this package. Others live outside the installed
package (the ``kernel`` personality runs the real Linux driver and belongs to the source
checkout's test bed): they are imported by module name only when asked for, and that
module exports ``PERSONALITY``, a :class:`PersonalitySpec`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, Protocol, TypeVar

import trio

from agent.protocol import AgentError

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from agent.host.driver._session import DriverSession
    from agent.host.memory import GuestMemory, GuestRam
    from agent.host.vmmdev import VMMDev

M = TypeVar("M", bound="GuestRam")

EXTERNAL_PERSONALITIES: Final = {"kernel": "testbed.kernel"}
"""Personalities outside the installed package, by name: the module that provides each."""


class PersonalityUnavailableError(AgentError):
    """A personality exists but cannot run here (its module or its library is missing)."""


class DriverModel(Protocol):
    """A kernel driver in front of the simulated VMMDev, as the host and its server use it."""

    @property
    def loaded(self) -> bool:
        """Whether the driver finished loading (its device nodes exist)."""
        ...

    @property
    def lost(self) -> bool:
        """Whether the VM was reset under this driver."""
        ...

    @property
    def sessions(self) -> Collection[DriverSession]:
        """The open sessions."""
        ...

    @property
    def balloon_chunks(self) -> int:
        """Chunks the driver itself holds in the balloon."""
        ...

    @property
    def heartbeat_interval_ns(self) -> int:
        """The heartbeat interval the driver got from the host at load (0: it does not beat)."""
        ...

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Load, then serve interrupts and kernel timers until cancelled."""
        ...

    def open_session(self, *, user_device: bool = False, uid: int = 0) -> DriverSession:
        """Open ``/dev/vboxguest`` (or ``/dev/vboxuser``) as ``uid``."""
        ...

    async def ioctl(
        self, session: DriverSession, code: int, buf: bytearray, memory: GuestMemory
    ) -> None:
        """Perform one ioctl; raise ``OSError(errno)`` as the kernel returns it."""
        ...

    async def close_session(self, session: DriverSession) -> None:
        """Release the session (idempotent)."""
        ...

    def shutdown(self) -> None:
        """The VM was reset under this driver: every session is lost."""
        ...


@dataclass(frozen=True)
class PersonalitySpec(Generic[M]):
    """How to build one personality: its guest RAM, then its driver over the VMMDev."""

    name: str
    make_ram: Callable[[int], M]
    """Guest RAM (as the VMMDev reads it) for a VM of the given size in MiB."""
    make_driver: Callable[[VMMDev, M], DriverModel]


def load_external(name: str) -> PersonalitySpec[Any]:
    """Import the module of the external personality ``name`` and return its spec.

    Raises:
        KeyError: ``name`` is no external personality.
        PersonalityUnavailableError: its module is not installed, or cannot run here.
    """
    module_name = EXTERNAL_PERSONALITIES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        msg = (
            f"the {name!r} personality needs the test bed ({module_name}) of a source "
            "checkout, which this installation lacks"
        )
        raise PersonalityUnavailableError(msg) from exc
    spec: PersonalitySpec[Any] = module.PERSONALITY
    return spec
