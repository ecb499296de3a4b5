"""The host's HGCM framework: services by name, clients, pending calls, completion, cancel.

Requests arrive from the VMMDev port handler as byte copies with their guest-physical
address. A request the framework accepts is answered ``VINF_HGCM_ASYNC_EXECUTE`` in the
guest's header and is not written back at submit time. Completion reads the request back
from guest memory, stores the results (values, ``result``; for connect the client id) in
that copy, writes it back, then sets ``VMMDEV_HGCM_REQ_DONE`` in a second write, then raises
``VMMDEV_EVENT_HGCM``; a call whose request lies within one page is mapped instead, and its
values, ``result`` and DONE are written there. Either way what the guest changed in the
request since sending stays. A cancelled command is never written back.

Save/restore and reset follow VMMDev: a restore keeps client ids, reconnects them to the
(restarted) services and re-submits every pending call as it was submitted (answering the
guest with the failure when that is refused); a reset disconnects every client and drops
every command.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from agent.host import _header_fields as H  # noqa: N812 - see the module
from agent.host._hgcm_clients import (
    MAX_CLIENTS,
    REQUESTOR_LEGACY,
    ClientCategory,
    client_category,
)
from agent.host._hgcm_parms import (
    CALL_PARMS_OFFSET,
    MAX_HGCM_PARMS,
    ParmError,
    parse_parms,
    write_back as write_back_parms,
)
from agent.host._log import host_log as _log
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    HGCM_REQ_DONE,
    Event,
    RequestType,
)
from agent.protocol.status import (
    STATUS_CODES,
    VERR_HGCM_INVALID_CLIENT_ID,
    VERR_HGCM_SERVICE_NOT_FOUND,
    VERR_HGCM_TOO_MANY_CLIENT_CALLS,
    VERR_HGCM_TOO_MANY_CLIENTS,
    VERR_INVALID_PARAMETER,
    VERR_NOT_FOUND,
    VINF_HGCM_ASYNC_EXECUTE,
    VINF_SUCCESS,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.host._hgcm_parms import PageOutput, ValueSlot
    from agent.host.hgcm_service import HgcmService, HostParm
    from agent.host.memory import GuestRam, Mapping

VERR_HGCM_INVALID_CMD_ADDRESS: Final = STATUS_CODES["VERR_HGCM_INVALID_CMD_ADDRESS"]
NIL_PHYS32: Final = 0xFFFFFFFF
"""``NIL_RTGCPHYS32``: not an address CANCEL2 accepts."""
MAX_CLIENT_ID: Final = 0x7FFFFFFF
"""Client ids are 1 .. 0x7FFFFFFF, then 1 again: Main's handles at 0x80000000 and up are its
own objects', and 0 is none (``hgcmObjGenerateHandle``)."""
_HGCM_EVENT: Final = int(Event.HGCM)
"""Read once: an enum attribute lookup costs more than the bit operation it feeds."""
_HGCM_CANCEL: Final = int(RequestType.HGCM_CANCEL)
"""The legacy cancel's type, which the guest writes over a call's own to cancel it."""
_CALL_TARGET: Final = L.run(
    L.HgcmCallRequest.client_id, L.HgcmCallRequest.function, L.HgcmCallRequest.parm_count
).codec
_CALL_TARGET_AT: Final = L.HgcmCallRequest.client_id.offset
_FLAGS_RESULT: Final = L.run(L.HgcmRequestHeader.flags, L.HgcmRequestHeader.result).codec
"""Runs kept as their struct, as in :mod:`agent.host._header_fields`."""
_TYPE_AND_FLAGS: Final = struct.Struct(f"<I{H.HGCM_FLAGS_AT - H.REQUEST_TYPE_AT - 4}xI")
_TYPE_AND_FLAGS_AT: Final = H.REQUEST_TYPE_AT
"""The request's type and its HGCM flags, which completion reads together (one unpack)."""
_ASYNC_EXECUTE_RC: Final = H.REQUEST_RC.pack(VINF_HGCM_ASYNC_EXECUTE)
"""What accepting a request writes to the guest's ``rc``."""
_PARM64_SIZE: Final = L.HgcmParameter64.size
_PARM32_SIZE: Final = L.HgcmParameter32.size
"""The parameter sizes of HGCM_CALL64 (16 bytes) and HGCM_CALL32 (12 bytes), as plain ints
(a class attribute's look-up is not specialised)."""


@runtime_checkable
class VmLifecycle(Protocol):
    """Optional VM life-cycle hooks a service may have besides ``reset``.

    A service with them hears ``power_on`` at VM start, ``restore`` (instead of ``reset``)
    before a restore re-submits its pending calls, and ``resume`` afterwards.
    """

    def power_on(self) -> None:
        """The VM starts."""
        ...

    def restore(self) -> None:
        """The VM was restored from a saved state."""
        ...

    def resume(self) -> None:
        """The VM resumes running."""
        ...


@dataclass(eq=False, slots=True)
class _Client:
    client_id: int
    service: HgcmService
    requestor: int
    category: ClientCategory
    max_calls: int
    """The service's ``max_calls_per_client``, fixed as a service loads: read once here,
    as the property is a call and the limit is checked on every call."""
    pending: int = 0
    """Calls counted against ``max_calls``: accepted and not completed (cancelled ones too)."""


@dataclass(eq=False, slots=True)
class _Command:
    """A call the framework accepted and has not finished."""

    host: HgcmHost
    phys: int
    req: bytearray
    client: _Client
    function: int
    """The function number."""
    request_type: int
    """The request's type as submitted (HGCM_CALL32 or HGCM_CALL64)."""
    params: list[HostParm]
    """The parameters, updated in place by the service."""
    values: list[ValueSlot]
    """Where the value parameters' values go back to."""
    outputs: list[PageOutput]
    """Where the page lists the host writes to have their pages."""
    locked: Mapping | None = None
    """The request mapped in place, when VMMDev locked it (see :meth:`HgcmHost.call`)."""
    cancelled: bool = False
    completed: bool = False
    stale: bool = False

    @property
    def client_id(self) -> int:
        """The calling client."""
        return self.client.client_id

    def complete(self, status: int) -> None:
        """Finish the call with a VBox status: write results back (unless cancelled) and
        raise the HGCM event.

        A locked request (``hgcmCompletedWorker``'s second path) gets its values, its result
        and DONE in place; any other is read back and written whole
        (:meth:`HgcmHost._finish`). On both paths the guest's other members stay as the
        guest left them, and the type is checked as :meth:`HgcmHost._finish` says (the
        locked path reads it through the mapping).

        Raises:
            RuntimeError: the service completed the call twice.
        """
        if self.stale:
            return
        if self.completed:
            msg = f"HGCM call of client {self.client.client_id} completed twice"
            raise RuntimeError(msg)
        self.completed = True
        self.client.pending -= 1
        host = self.host
        if self.cancelled:
            host._cancelled.discard(self)
            return
        host._commands.pop(self.phys, None)
        if self.locked is None:
            host._finish(self.req, self.phys, status, self._write_back)
            return
        view, at = self.locked
        request_type, flags = _TYPE_AND_FLAGS.unpack_from(view, at + _TYPE_AND_FLAGS_AT)
        if request_type == self.request_type:
            write_back_parms(view, self.values, self.outputs, host._memory, at)
        elif request_type != _HGCM_CANCEL:
            status = VERR_INVALID_PARAMETER
        _FLAGS_RESULT.pack_into(view, at + H.HGCM_FLAGS_AT, flags | HGCM_REQ_DONE, status)
        host._notify(_HGCM_EVENT)

    def _write_back(self, copy: bytearray) -> None:
        """Store the results in a copy of the request read back from the guest."""
        write_back_parms(copy, self.values, self.outputs, self.host._memory)


class HgcmHost:
    """Registered services, connected clients and pending calls of one VM."""

    __slots__ = (
        "_cancelled",
        "_clients",
        "_commands",
        "_memory",
        "_next_id",
        "_notify",
        "_requestor_info",
        "_services",
    )

    def __init__(
        self,
        memory: GuestRam,
        notify: Callable[[int], None],
        *,
        requestor_info: Callable[[], bool],
    ) -> None:
        """``requestor_info`` says whether the additions send requestor bits (INFO2)."""
        self._memory = memory
        self._notify = notify
        self._requestor_info = requestor_info
        self._services: dict[str, HgcmService] = {}
        self._clients: dict[int, _Client] = {}
        self._commands: dict[int, _Command] = {}
        """Pending calls by request address."""
        self._cancelled: set[_Command] = set()
        """Calls the guest cancelled and the service has not completed."""
        self._next_id = 1

    def register(self, service: HgcmService) -> None:
        """Add a service guests can connect to by its name.

        Raises:
            ValueError: a service of that name exists (``VERR_HGCM_SERVICE_EXISTS``).
        """
        if service.name in self._services:
            msg = f"HGCM service {service.name!r} is already registered"
            raise ValueError(msg)
        self._services[service.name] = service

    def service(self, name: str) -> HgcmService | None:
        """Return the service registered as ``name``."""
        return self._services.get(name)

    @property
    def client_count(self) -> int:
        """Connected clients, over all services."""
        return len(self._clients)

    @property
    def pending_calls(self) -> int:
        """Calls accepted and not yet completed or cancelled."""
        return len(self._commands)

    # --- requests from the port handler ---------------------------------------------------

    def connect(self, req: bytearray, phys: int) -> int | None:
        """HGCM_CONNECT; ``None`` means accepted (answered asynchronously).

        The location type is not checked: VMMDev makes every location "existing local
        service" before Main sees it. A name without a NUL in its 128 bytes is refused at
        once; any other name, the empty one too, is looked up and a miss is the result, as
        is a full client category of the service (:mod:`agent.host._hgcm_clients`).
        """
        raw = L.HgcmConnectRequest.service_name.get(req)
        end = raw.find(b"\0")
        if end < 0:
            return VERR_INVALID_PARAMETER
        self._accept(req, phys)
        service = self._services.get(raw[:end].decode("utf-8", "replace"))
        if service is None:
            self._finish(req, phys, VERR_HGCM_SERVICE_NOT_FOUND)
            return None
        requestor = REQUESTOR_LEGACY
        if self._requestor_info():
            requestor = L.HgcmConnectRequest.header_requestor.get(req)
        category = client_category(requestor)
        if self._client_count(service, category) >= MAX_CLIENTS[category]:
            self._finish(req, phys, VERR_HGCM_TOO_MANY_CLIENTS)
            return None
        client_id = self._new_client_id()
        status = service.connect(client_id, requestor)
        if status >= 0:
            self._clients[client_id] = _Client(
                client_id, service, requestor, category, service.max_calls_per_client
            )
            _log.debug("hgcm_connected", service=service.name, client_id=client_id)
            self._finish(
                req, phys, status, lambda copy: L.HgcmConnectRequest.client_id.set(copy, client_id)
            )
            return None
        self._finish(req, phys, status)
        return None

    def disconnect(self, req: bytearray, phys: int) -> int | None:
        """HGCM_DISCONNECT; the client's pending calls stay the guest's.

        Client id 0 is refused at once (``HGCMGuestDisconnect``); an unknown id is accepted
        and answered VERR_HGCM_INVALID_CLIENT_ID as the result, as Main's HGCM thread does.
        The client's pending calls are VMMDev commands like any other: those the service
        completes (the guest-property service ends its waits with VERR_INTERRUPTED) are
        written back before the disconnect is; those it leaves open stay pending.
        """
        client_id = L.HgcmDisconnectRequest.client_id.get(req)
        if client_id == 0:
            return VERR_INVALID_PARAMETER
        self._accept(req, phys)
        client = self._clients.pop(client_id, None)
        if client is None:
            self._finish(req, phys, VERR_HGCM_INVALID_CLIENT_ID)
            return None
        client.service.disconnect(client_id)
        self._finish(req, phys, VINF_SUCCESS)
        return None

    def call(
        self, req: bytearray, phys: int, request_type: int, locked: Mapping | None
    ) -> int | None:
        """HGCM_CALL32/64 of ``request_type``: parse the parameters and hand the call to the
        service.

        In VMMDev's order: the parameter count (it must fit the request and be at most
        ``VMMDEV_MAX_HGCM_PARMS``), the parameters, then (in Main) the client and its
        pending-call limit.

        ``locked`` is the request mapped in place, which the port handler takes for a call
        within one page (``vmmdevRequestHandler``): its acceptance and its completion are
        written there (see :meth:`_Command.complete`). The simulated host writes nothing
        through it until the call is accepted. A request the guest frees and reuses
        meanwhile differs: its completion goes to the simulated mapping's orphaned buffer,
        a real host's to the pinned page's new occupant (only buggy guests do that).
        """
        parm_size = _PARM64_SIZE if request_type == H.HGCM_CALL64 else _PARM32_SIZE
        client_id, function, count = _CALL_TARGET.unpack_from(req, _CALL_TARGET_AT)
        if count > MAX_HGCM_PARMS or CALL_PARMS_OFFSET + parm_size * count > len(req):
            return VERR_INVALID_PARAMETER  # too many, or the array ends past the request
        try:
            params, values, outputs = parse_parms(req, self._memory, parm_size, count)
        except ParmError as exc:
            _log.debug("hgcm_call_refused", reason=str(exc))
            return exc.rc
        client = self._caller(client_id, phys)
        if not isinstance(client, _Client):
            return client
        # The guest sees the call accepted: VINF_HGCM_ASYNC_EXECUTE in its header before the
        # service runs (vmmdevReqHdrSetHgcmAsyncExecute), so a completion, which keeps the
        # header as guest memory holds it, leaves it there (the host's copy keeps the
        # guest's rc: it is never written back).
        if locked is None:
            self._write(phys + H.REQUEST_RC_AT, _ASYNC_EXECUTE_RC)
        else:
            view, at = locked
            H.REQUEST_RC.pack_into(view, at + H.REQUEST_RC_AT, VINF_HGCM_ASYNC_EXECUTE)
        command = _Command(
            self, phys, req, client, function, request_type, params, values, outputs, locked
        )
        # _start, inline (a call less per call):
        self._commands[phys] = command
        client.pending += 1
        client.service.call(command)
        return None

    def cancel(self, phys: int) -> int:
        """Cancel the pending call whose request is at ``phys`` (CANCEL2, legacy CANCEL).

        The guest forgets the request at once, but the call keeps counting against the
        client's pending-call limit until the service completes it (HGCM decrements the
        count on completion only), which a service without a cancel hook may do late.
        """
        if phys in (0, NIL_PHYS32):
            return VERR_INVALID_PARAMETER
        command = self._commands.pop(phys, None)
        if command is None:
            return VERR_NOT_FOUND
        command.cancelled = True
        self._cancelled.add(command)
        command.client.service.cancel(command)
        return VINF_SUCCESS

    # --- VM life cycle ---------------------------------------------------------------------

    def power_on(self) -> None:
        """The VM starts: tell the services that have life-cycle hooks."""
        for service in self._services.values():
            if isinstance(service, VmLifecycle):
                service.power_on()

    def restore(self) -> None:
        """Saved state loaded: services restart, clients stay, pending calls are re-sent."""
        pending = list(self._commands.values())
        self._discard(pending)
        self._discard(list(self._cancelled))
        for service in self._services.values():
            if isinstance(service, VmLifecycle):
                service.restore()
            else:
                service.reset()
        for client in list(self._clients.values()):
            if client.service.connect(client.client_id, client.requestor) < 0:
                del self._clients[client.client_id]
        for old in pending:
            self._resubmit(old)
        for service in self._services.values():
            if isinstance(service, VmLifecycle):
                service.resume()

    def drop_client(self, client_id: int) -> None:
        """Forget a connected client as if the host had lost it (a test hook).

        The service is told of the disconnect (the property service ends the client's waits
        with VERR_INTERRUPTED); the client's next request is answered
        VERR_HGCM_INVALID_CLIENT_ID, as for any id the host does not know.

        Raises:
            KeyError: no client has that id.
        """
        client = self._clients.pop(client_id)
        client.service.disconnect(client_id)

    def reset(self) -> None:
        """VM reset: every client is disconnected and every command dropped."""
        self._discard(list(self._commands.values()))
        self._discard(list(self._cancelled))
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            client.service.disconnect(client.client_id)
        for service in self._services.values():
            service.reset()

    # --- helpers ---------------------------------------------------------------------------

    def _start(self, command: _Command) -> None:
        self._commands[command.phys] = command
        command.client.pending += 1
        command.client.service.call(command)

    def _resubmit(self, old: _Command) -> None:
        """Hand a call pending at save time to the service again, as ``vmmdevR3HgcmLoadStateDone``.

        The call is rebuilt from what the host kept of it (its parameters as submitted; the
        buffers' bytes are read from the guest's pages again), not from the request in guest
        memory. A call that cannot be re-submitted is answered with the failure: the header's
        ``rc`` and ``result`` get the status, DONE is set and the HGCM event raised, so the
        guest is not left waiting.
        """
        req = old.req
        _, _, count = _CALL_TARGET.unpack_from(req, _CALL_TARGET_AT)
        parm_size = _PARM64_SIZE if old.request_type == H.HGCM_CALL64 else _PARM32_SIZE
        try:
            params, values, outputs = parse_parms(req, self._memory, parm_size, count)
        except ParmError as exc:
            self._fail_resubmit(old.phys, exc.rc)
            return
        client = self._caller(old.client.client_id, old.phys)
        if not isinstance(client, _Client):
            self._fail_resubmit(old.phys, client)
            return
        self._start(
            _Command(
                self,
                old.phys,
                req,
                client,
                old.function,
                old.request_type,
                params,
                values,
                outputs,
            )
        )

    def _caller(self, client_id: int, phys: int) -> _Client | int:
        """Return the client a call at ``phys`` goes to, or the status refusing the call.

        Main's checks in its order: client 0 (``HGCMGuestCall``), an unknown client, then the
        client's pending-call limit. ``HGCMService::GuestCall`` counts the call first and
        accepts it only while the count stays below the limit: a limit of 16 leaves room for
        15 pending calls. (The simulated host also refuses a second pending call at one
        address, which VMMDev would keep twice.)
        """
        if client_id == 0:
            return VERR_INVALID_PARAMETER
        client = self._clients.get(client_id)
        if client is None:
            return VERR_HGCM_INVALID_CLIENT_ID
        if phys in self._commands:
            return VERR_HGCM_INVALID_CMD_ADDRESS
        if client.pending + 1 >= client.max_calls:
            return VERR_HGCM_TOO_MANY_CLIENT_CALLS
        return client

    def _fail_resubmit(self, phys: int, status: int) -> None:
        try:
            header = bytearray(self._memory.read(phys, L.HgcmRequestHeader.size))
        except OSError:
            return  # the guest freed the request; the write goes nowhere
        H.REQUEST_RC.pack_into(header, H.REQUEST_RC_AT, status)
        flags = H.HGCM_FLAGS.unpack_from(header, H.HGCM_FLAGS_AT)[0]
        _FLAGS_RESULT.pack_into(header, H.HGCM_FLAGS_AT, flags | HGCM_REQ_DONE, status)
        self._write(phys, header)
        self._notify(_HGCM_EVENT)

    def _discard(self, commands: list[_Command]) -> None:
        for command in commands:
            command.stale = True
            self._commands.pop(command.phys, None)
            self._cancelled.discard(command)
            command.client.pending -= 1

    def _accept(self, req: bytearray, phys: int) -> None:
        H.REQUEST_RC.pack_into(req, H.REQUEST_RC_AT, VINF_HGCM_ASYNC_EXECUTE)
        self._write(phys + H.REQUEST_RC_AT, _ASYNC_EXECUTE_RC)

    def _finish(
        self,
        req: bytearray,
        phys: int,
        result: int,
        update: Callable[[bytearray], None] | None = None,
    ) -> None:
        """Complete an unmapped request as ``hgcmCompletedWorker``'s first path.

        The request is read back whole from guest memory; while its type is still the
        request's own, ``update`` stores the host's results (a call's values, a connect's
        client id) in that copy. The copy is written back with ``result``, then DONE is set
        in its flags by a second write (the flags are not read again). A type the guest
        changed takes no update: the legacy cancel's (HGCMCancel) keeps ``result``, any
        other makes it VERR_INVALID_PARAMETER. Whatever else the guest changed since
        sending stays, as on the mapped path. When the read fails (the guest freed the
        request) the host's copy from submit time stands in, and the writes go nowhere.
        """
        try:
            current = bytearray(self._memory.read(phys, len(req)))
        except OSError:
            current = req
        request_type = H.REQUEST_TYPE.unpack_from(current, H.REQUEST_TYPE_AT)[0]
        if request_type == H.REQUEST_TYPE.unpack_from(req, H.REQUEST_TYPE_AT)[0]:
            if update is not None:
                update(current)
        elif request_type != _HGCM_CANCEL:
            result = VERR_INVALID_PARAMETER
        H.HGCM_RESULT.pack_into(current, H.HGCM_RESULT_AT, result)
        self._write(phys, current)
        flags = H.HGCM_FLAGS.unpack_from(current, H.HGCM_FLAGS_AT)[0] | HGCM_REQ_DONE
        self._write(phys + H.HGCM_FLAGS_AT, H.HGCM_FLAGS.pack(flags))
        self._notify(_HGCM_EVENT)

    def _write(self, phys: int, data: bytes | bytearray) -> None:
        try:
            self._memory.write(phys, data)
        except OSError:
            return  # the guest freed the request; the write goes nowhere

    def _client_count(self, service: HgcmService, category: ClientCategory) -> int:
        return sum(
            client.service is service and client.category is category
            for client in self._clients.values()
        )

    def _new_client_id(self) -> int:
        while True:
            client_id = self._next_id
            self._next_id = next_client_id(client_id)
            if client_id not in self._clients:
                return client_id


def next_client_id(client_id: int) -> int:
    """Return the client id Main generates after ``client_id`` (ids in use are skipped)."""
    return client_id % MAX_CLIENT_ID + 1
