"""What the tests of the publishing services (``network``, ``users``) share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Generic, TypeVar

from agent.host.guest_props import GuestPropertyService
from agent.host.hgcm_service import HostBuffer, HostU32
from agent.protocol.guest_props import GuestFunction
from agent.protocol.status import VERR_BUFFER_OVERFLOW

if TYPE_CHECKING:
    from agent.host.hgcm_service import HgcmCallHandle

T = TypeVar("T")
SETS: Final = frozenset({GuestFunction.SET_PROP, GuestFunction.SET_PROP_VALUE})


class GuestSource(Generic[T]):
    """What a publishing service reads: items the test changes, or an error it raises."""

    def __init__(self, *items: T) -> None:
        self.now: tuple[T, ...] = items
        self.error: OSError | None = None

    def __call__(self) -> tuple[T, ...]:
        if self.error is not None:
            raise self.error
        return self.now


class HeldAnswers(GuestPropertyService):
    """A property service that carries out every set at once but, while ``holding``, keeps
    its answer (a host slow to answer): the guest's call stays pending, its effect visible."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False
        self.held: list[HgcmCallHandle] = []

    def call(self, call: HgcmCallHandle) -> None:
        if self.holding and call.function in SETS:
            self._set_prop(call)
            self.held.append(call)
        else:
            super().call(call)


class MalformedLists(GuestPropertyService):
    """A property service whose ENUM_PROPS never lists: a list without its empty entry at
    the end (a malformed reply), or (``growing``) a buffer always asked one byte larger than
    the one sent (a list outgrowing every buffer)."""

    def __init__(self, *, growing: bool = False) -> None:
        super().__init__()
        self.growing = growing

    def _enum_props(self, call: HgcmCallHandle) -> int:
        status = super()._enum_props(call)
        out, size = call.params[1], call.params[2]
        assert isinstance(out, HostBuffer)
        assert isinstance(size, HostU32)
        if self.growing:
            size.value = len(out.data) + 1
            return VERR_BUFFER_OVERFLOW
        out.data[: size.value] = b"x" * size.value  # one name, never ended
        return status
