"""``Session``: the protocol state of one open device session, without any I/O.

Rules it enforces (each breach raises :class:`LocalProtocolError` before anything is sent):

- After INTERRUPT_ALL_WAIT_FOR_EVENTS the mainline driver fails every later wait on the
  same descriptor, and Oracle's ends the next one at once if no wait was in progress, so
  a session that was interrupted refuses to encode another wait.
- HGCM calls and disconnects name a client this session connected; a session holds at
  most 64 clients, as the driver's ``hgcm_client_ids`` table does, and a connect in flight
  counts, since the driver takes its slot before it asks the host.

It records what the driver confirmed: the negotiated version, the session's event filter
mask and its HGCM clients, besides the connects in flight. A call whose outcome is unknown
(the transport failed) is reported with :meth:`Session.call_failed`.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

from agent.protocol.constants import HGCM_CLIENTS_PER_SESSION
from agent.protocol.errors import LocalProtocolError
from agent.protocol.messages import (
    ChangeFilterMask,
    DriverVersion,
    DriverVersionInfo,
    HgcmCall,
    HgcmConnect,
    HgcmConnected,
    HgcmDisconnect,
    InterruptAllWaits,
    IoctlCall,
    PreparedHgcmCall,
    Request,
    WaitForEvents,
)

R = TypeVar("R")
_NAMES_A_CLIENT: Final = (PreparedHgcmCall, HgcmCall, HgcmDisconnect)
"""Requests that must name a client this session connected."""
_CHECKED: Final[frozenset[type]] = frozenset({WaitForEvents, *_NAMES_A_CLIENT})
"""Requests a session rule applies to, besides connects (counted while in flight)."""
_SETTLED_BY_A_REPLY: Final[frozenset[type]] = frozenset({InterruptAllWaits, HgcmConnect})
"""Requests whose reply settles session state whatever it says, a failure included."""
_RECORDED: Final[frozenset[type]] = frozenset(
    {ChangeFilterMask, HgcmConnect, HgcmDisconnect, DriverVersionInfo}
)
"""Requests whose confirmed outcome the session records.

These request classes are final, so every request is tested by its type, in one look-up: a
failing ``isinstance`` also looks up the object's ``__class__``, and most requests pass
through here failing every test."""


class Session:
    """The state of one device session (one open file descriptor)."""

    __slots__ = ("_clients", "_connecting", "driver_version", "filter_mask", "interrupted")

    def __init__(self) -> None:
        self.driver_version: DriverVersion | None = None
        self.filter_mask = 0
        self.interrupted = False
        self._clients: set[int] = set()
        self._connecting = 0
        """Connects encoded whose reply (or failure) has not come back."""

    @property
    def hgcm_clients(self) -> frozenset[int]:
        """The HGCM client ids this session holds."""
        return frozenset(self._clients)

    def encode(self, request: Request[R]) -> IoctlCall[R]:
        """Check ``request`` against the session's rules and encode it."""
        if type(request) is PreparedHgcmCall:  # the most frequent: its rule here, not a call away
            if request.client_id not in self._clients:
                raise self._not_connected(request.client_id)
        elif type(request) in _CHECKED:  # one test for the other rules, which most skip
            self._check(request)
        elif type(request) is HgcmConnect:
            return self._encode_connect(request)
        return request.encode()

    def _encode_connect(self, request: HgcmConnect) -> IoctlCall[Any]:
        if len(self._clients) + self._connecting >= HGCM_CLIENTS_PER_SESSION:
            msg = (
                f"this session already holds {HGCM_CLIENTS_PER_SESSION} HGCM clients, "
                f"{self._connecting} of them connecting"
            )
            raise LocalProtocolError(msg)
        call = request.encode()
        self._connecting += 1
        return call

    def _check(self, request: Request[Any]) -> None:
        # One rule per request type (a prepared HGCM call's is checked in ``encode``).
        if isinstance(request, _NAMES_A_CLIENT):
            if request.client_id not in self._clients:
                raise self._not_connected(request.client_id)
        elif self.interrupted:  # a WaitForEvents
            msg = "this session was interrupted; open a new session to wait again"
            raise LocalProtocolError(msg)

    @staticmethod
    def _not_connected(client_id: int) -> LocalProtocolError:
        return LocalProtocolError(f"HGCM client {client_id} is not connected in this session")

    def decode(self, call: IoctlCall[R]) -> R:
        """Decode the reply in ``call.buffer`` and record what it confirms."""
        request = call.request
        if type(request) in _SETTLED_BY_A_REPLY:
            self._settle(request)
        reply = request.decode(call)
        if type(request) in _RECORDED:  # one test for what is recorded, which most skip
            self._record(request, reply)
        return reply

    def _settle(self, request: Request[Any]) -> None:
        if type(request) is InterruptAllWaits:
            # The flag is set by the driver before it answers; once asked, treat it as set.
            self.interrupted = True
        else:  # a connect: a client now, or a failure whose slot the driver gave back
            self._connecting -= 1

    def _record(self, request: Request[Any], reply: object) -> None:
        if isinstance(request, ChangeFilterMask):
            self.filter_mask = (self.filter_mask | request.or_mask) & ~request.not_mask
        elif isinstance(reply, HgcmConnected):
            self._clients.add(reply.client_id)
        elif isinstance(request, HgcmDisconnect):
            self._clients.discard(request.client_id)
        elif isinstance(reply, DriverVersion) and isinstance(request, DriverVersionInfo):
            self.driver_version = reply

    def call_failed(self, call: IoctlCall[R]) -> None:
        """Record that the transport failed ``call`` and its outcome is unknown.

        An interrupt that may have reached the driver is treated as done (mainline's flag is
        sticky, Oracle's would end the next wait); a connect is no longer in flight (a
        client it may still make in the driver is not this session's to use: its owner
        closes the session, as ``Device.open_hgcm_client`` does); every other request
        leaves the confirmed state as it was.
        """
        if type(call.request) in _SETTLED_BY_A_REPLY:
            self._settle(call.request)
