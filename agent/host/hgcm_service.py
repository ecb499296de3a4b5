"""How a simulated host service plugs into the simulated HGCM framework.

The framework (``agent.host.hgcm``) owns clients, ids, limits and completion; a service sees
only connects, disconnects and calls, and answers each call now or later through
:meth:`HgcmCallHandle.complete`, exactly once. Parameters arrive as :class:`HostParm` values
that the service reads and updates in place; the framework copies them back to the guest
when the call completes (and copies nothing for a call the guest cancelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, final

if TYPE_CHECKING:
    from collections.abc import Sequence


@final
@dataclass(slots=True)
class HostU32:
    """A 32-bit parameter; the service may change ``value``."""

    value: int


@final
@dataclass(slots=True)
class HostU64:
    """A 64-bit parameter; the service may change ``value``."""

    value: int


@final
@dataclass(slots=True, init=False)
class HostBuffer:
    """A buffer parameter: ``data`` is what the guest passed (zeros for an out buffer).

    ``size`` starts as ``len(data)``. A service writes output into ``data`` (never beyond
    its length) and may set ``size`` to the number of bytes it produced: only those are
    copied back to the guest, whose request keeps the buffer's size as it sent it (VMMDev
    updates no page list's or linear buffer's size; services report sizes in a separate
    parameter, as GET_PROP does).
    ``readable``/``writable`` follow the guest's direction (LINADDR_IN is not writable,
    LINADDR_OUT not readable).
    """

    data: bytearray
    readable: bool
    writable: bool
    size: int

    def __init__(
        self,
        data: bytearray,
        readable: bool = True,
        writable: bool = True,
        size: int | None = None,
    ) -> None:
        """``size`` defaults to ``len(data)``; written by hand so that the default costs no
        ``__post_init__`` call (two buffers are built per guest-property get)."""
        self.data = data
        self.readable = readable
        self.writable = writable
        self.size = len(data) if size is None else size


HostParm = HostU32 | HostU64 | HostBuffer


class HgcmCallHandle(Protocol):
    """One guest call as a service sees it."""

    @property
    def client_id(self) -> int:
        """The calling client."""
        ...

    @property
    def function(self) -> int:
        """The function number."""
        ...

    @property
    def params(self) -> Sequence[HostParm]:
        """The parameters as parsed. A service changes their ``value`` and ``data`` in place;
        which parameters there are is fixed, since completion writes back the ones parsed, at
        the places their guest parameters have (as VMMDev does)."""
        ...

    @property
    def cancelled(self) -> bool:
        """Whether the guest cancelled the call (complete it anyway; nothing is copied)."""
        ...

    def complete(self, status: int) -> None:
        """Finish the call with a VBox status. Exactly once per call."""
        ...


class HgcmService(Protocol):
    """A host service (``VBoxGuestPropSvc``, ...) registered with the framework."""

    @property
    def name(self) -> str:
        """The name guests connect to."""
        ...

    @property
    def max_calls_per_client(self) -> int:
        """Pending calls one client may have; one more gets VERR_HGCM_TOO_MANY_CLIENT_CALLS.

        Fixed for the service's life, as upstream, where a service gives its limits once, in
        the table its load entry point fills: the framework reads it once per client, at
        connect.
        """
        ...

    def connect(self, client_id: int, requestor: int) -> int:
        """A guest connects; return a VBox status (< 0 refuses the client)."""
        ...

    def disconnect(self, client_id: int) -> None:
        """The client is gone; complete its pending calls as the real service does (the
        framework writes those completions back to the guest, as VMMDev does)."""
        ...

    def call(self, call: HgcmCallHandle) -> None:
        """Handle a guest call: complete it now, or keep it and complete it later."""
        ...

    def cancel(self, call: HgcmCallHandle) -> None:
        """The guest cancelled a pending call (``pfnCancelled``).

        The call keeps counting against the client's pending-call limit until the service
        completes it; that completion writes nothing to the guest.
        """
        ...

    def reset(self) -> None:
        """The VM was reset or restored; drop per-client state as the real service does."""
        ...
