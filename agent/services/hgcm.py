"""HGCM channels: typed calls to one host service through an HGCM client of its own.

``async with open_hgcm_channel(device, "VBoxGuestPropSvc") as channel:`` connects a client on
a device session of its own and yields an :class:`HgcmChannel`; leaving the block always
disconnects (on cancellation by closing the session, which makes the driver disconnect).

Concurrency. Many tasks may call through one channel at once; every call is one ioctl in
flight, cancelled on its own (the transport interrupts it and the driver cancels it at the
host, so cancellation takes effect at once and leaves no thread blocked). A channel is one
session, hence one file descriptor with its own ioctl threads: give each long wait a channel
of its own, so that waits never hold up short calls or one another.

Limits, all checked before anything is sent, with a :class:`HgcmLimitError` that says which:

- 32 parameters per call and 24 MiB per buffer (the driver's ``VMMDEV_HGCM_MAX_PARMS`` and
  ``VBG_MAX_HGCM_USER_PARM``); 64 clients per session is the protocol session's check;
- 10 non-empty buffers per call: Oracle's driver locks at most that many
  (``VbglR0ParmInfo.aLockBufs``) and refuses more with VERR_INVALID_PARAMETER. Mainline
  takes 32, but the channel cannot tell the drivers apart before it sends, so a call that
  works on one works on both;
- the host's per-client limit of concurrent calls. ``HGCMService::GuestCall`` counts a call
  first and accepts it only while the count stays *below* the service's
  ``acMaxCallsPerClient``: a limit of 16 leaves room for 15 pending calls. A call the driver
  cancelled at the host keeps its slot there until the service completes it, which a
  service without a cancel hook may do much later; such calls keep their slot here too
  (``lingers_when_cancelled``) until the channel closes. The driver cancels a call when its
  caller is cancelled (the transport's signal) and when it gives up on it itself: its
  timeout (VERR_TIMEOUT) or a signal nobody asked for (VERR_INTERRUPTED), both alike. A
  call the service itself completed with one of those statuses is over at the host and
  takes no slot; how to tell the two apart is in :meth:`HgcmChannel.call`. A cancelled
  call lingers only if it may have reached the driver, as its transport reports
  (:class:`~agent.protocol.Submission`); one cancelled before (its scope cancelled when it
  began, or while the transport held it back: waiting for an ioctl thread of the character
  device, or for another call's frame to be sent) never reached the host and takes no
  slot. Nor does a cancelled call the host completed while the driver's cancel failed: the
  driver returns it, so its caller gets the reply (and the cancellation at its next
  checkpoint), as trio has it: an operation either happened or it did not. The character
  device makes a call again after a stray signal ended it with EINTR (a few times at most);
  mainline's driver cancelled each such attempt at the host first, so each lingers too
  (``Submission.retried``), whatever becomes of the call.

Not checked here: the host's budget of 128 MiB per call (``VMMDEV_MAX_HGCM_DATA_SIZE``, which
also counts its own bookkeeping and the page lists the driver builds), so buffers that add up
to about that much fail with VERR_NO_MEMORY from the host instead.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final, final

import trio

# By name: trio's module has a __getattr__, which keeps trio.lowlevel.X from being
# specialised, so it is looked up the slow way on every call (and this is on every get).
from trio.lowlevel import checkpoint_if_cancelled

from agent.protocol import (
    HgcmBuffer,
    HgcmBufferIn,
    HgcmBufferOut,
    HgcmCallError,
    HgcmData,
    HgcmParam,
    HgcmReply,
    HgcmU32,
    HgcmU64,
    HgcmValue,
    LocalProtocolError,
    PreparedHgcmCall,
    Submission,
    VBoxStatusError,
)
from agent.protocol.constants import (
    HGCM_MAX_LOCKED_BUFFERS,
    HGCM_MAX_PARMS,
    HGCM_MAX_USER_PARM,
    TIMEOUT_INFINITE,
)
from agent.protocol.status import VERR_INTERRUPTED, VERR_TIMEOUT

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

    from agent.device import Device, HgcmClient

__all__ = [
    "HOST_CALL_LIMITS",
    "HgcmBuffer",
    "HgcmBufferIn",
    "HgcmBufferOut",
    "HgcmCallError",
    "HgcmChannel",
    "HgcmData",
    "HgcmLimitError",
    "HgcmParam",
    "HgcmReply",
    "HgcmU32",
    "HgcmU64",
    "HgcmValue",
    "PreparedCall",
    "open_hgcm_channel",
]

_GIVEN_UP_BY_THE_DRIVER: Final = frozenset({VERR_TIMEOUT, VERR_INTERRUPTED})
"""How a call ends that the driver cancelled at the host on its own: its timeout, a signal."""
HOST_CALL_LIMITS: Final = {"VBoxGuestPropSvc": 16}
"""``acMaxCallsPerClient`` of the host services the agent uses, by service name."""


class HgcmLimitError(LocalProtocolError):
    """A call would break a limit of the driver or the host; nothing was sent."""


@final
class HgcmChannel:
    """A connected HGCM client; see :func:`open_hgcm_channel`.

    Attributes:
        service: the host service's name.
        client_id: the host's id of this client.
        max_pending: calls the host accepts at once from this client.
    """

    def __init__(self, client: HgcmClient, host_call_limit: int) -> None:
        self._client = client
        self.service = client.service
        self.client_id = client.client_id
        self.max_pending = host_call_limit - 1
        self._give_ups_in_header = client.give_ups_in_header
        self._in_flight = 0
        self._lingering = 0
        self._calls = 0

    @property
    def pending(self) -> int:
        """Calls the host may count for this client now: in flight, plus cancelled ones it
        may still hold."""
        return self._in_flight + self._lingering

    @property
    def calls(self) -> int:
        """Calls sent through this channel."""
        return self._calls

    def call(
        self,
        function: int,
        *params: HgcmParam,
        lingers_when_cancelled: bool = True,
        timeout_ms: int = TIMEOUT_INFINITE,
    ) -> Coroutine[Any, Any, HgcmReply]:
        """Call ``function`` with ``params`` and return the service's reply (await the result).

        Args:
            function: the service's function number.
            params: typed parameters (``HgcmU32``, ``HgcmU64``, ``HgcmBufferIn``,
                ``HgcmBufferOut``, ``HgcmBuffer``).
            lingers_when_cancelled: whether the host may go on counting this call after
                the driver cancels it there (False for functions the service completes at
                once): when its caller is cancelled (only once it may have reached the
                driver), and when the driver gives up on it (VERR_TIMEOUT,
                VERR_INTERRUPTED). Mainline's driver (and the socket and in-process
                transports, which follow it) reports a give-up as an errno, a plain
                ``VBoxStatusError``, and the service's status in the header, an
                ``HgcmCallError``: only the former lingers. Oracle's driver puts both in the
                header's ``rc`` (``vgdrvIoCtl_HGCMCallInner`` returns either its own status
                or, once ``VbglR0HGCMInternalCall`` copied the result back, the service's,
                and the ioctl dispatcher stores that one value), so on it an
                ``HgcmCallError`` lingers too, but for VERR_TIMEOUT on a call without a
                timeout, which only the service can have sent.
            timeout_ms: the driver cancels the call at the host after this long; at most
                ``SHORT_CALL_TIMEOUT_MS`` makes it a short call, which waits for an ioctl
                thread instead of counting against the blocking calls' share.

        Raises:
            HgcmLimitError: a limit would be broken; nothing was sent.
            HgcmCallError: the service completed the call with a failing status; ``.name``
                is the status's name and ``.reply`` what came back (a needed size, say).
            VBoxStatusError: the driver or host refused the call.

        A plain function returning :meth:`call_with`'s coroutine: no frame of its own lies
        under the call.
        """
        return self.call_with(
            function, params, lingers_when_cancelled=lingers_when_cancelled, timeout_ms=timeout_ms
        )

    async def call_with(
        self,
        function: int,
        params: tuple[HgcmParam, ...],
        *,
        lingers_when_cancelled: bool = True,
        timeout_ms: int = TIMEOUT_INFINITE,
    ) -> HgcmReply:
        """:meth:`call`, with the parameters in one tuple.

        For callers that hold them so: passing on ``*params`` together with keywords makes
        the interpreter build a dict of the keywords and unpack it again, on every call.
        """
        # A call cancelled before it starts is neither checked nor counted.
        await checkpoint_if_cancelled()
        prepared = self.prepare_with(
            function, params, lingers_when_cancelled=lingers_when_cancelled, timeout_ms=timeout_ms
        )
        return await self.call_prepared(prepared)

    def prepare(
        self,
        function: int,
        *params: HgcmParam,
        lingers_when_cancelled: bool = True,
        timeout_ms: int = TIMEOUT_INFINITE,
    ) -> PreparedCall:
        """Check a call as :meth:`call` does and encode it once, to make it any number of
        times with :meth:`call_prepared`, each time as :meth:`call` would.

        A caller that makes the same call over and over (the property client's get of one
        name) saves the checks and most of the encoding. The host's limit of calls at once
        is checked each time the call is made, not here.

        Raises:
            HgcmLimitError: a limit would be broken.
            LocalProtocolError: a value does not fit its parameter.
        """
        return self.prepare_with(
            function, params, lingers_when_cancelled=lingers_when_cancelled, timeout_ms=timeout_ms
        )

    def prepare_with(
        self,
        function: int,
        params: tuple[HgcmParam, ...],
        *,
        lingers_when_cancelled: bool = True,
        timeout_ms: int = TIMEOUT_INFINITE,
    ) -> PreparedCall:
        """:meth:`prepare`, with the parameters in one tuple."""
        self._check(function, params)
        request = self._client.prepare(function, params, timeout_ms=timeout_ms)
        return PreparedCall(self, request, lingers_when_cancelled=lingers_when_cancelled)

    async def call_prepared(self, prepared: PreparedCall) -> HgcmReply:
        """Make a call :meth:`prepare` prepared on this channel; see :meth:`call`.

        Raises:
            ValueError: another channel prepared it.
            HgcmLimitError: the host's limit of calls at once would be broken.
        """
        # A call cancelled before it starts is neither checked nor counted.
        await checkpoint_if_cancelled()
        if prepared.channel is not self:
            msg = f"{self.service}: a call prepared on another channel"
            raise ValueError(msg)
        if self._in_flight + self._lingering >= self.max_pending:  # self.pending, inline
            raise self._too_many_pending(prepared.request.call.function)
        self._in_flight += 1
        self._calls += 1
        lingers_when_cancelled = prepared.lingers_when_cancelled
        # Whether a cancelled call reached the driver matters only for one that may linger.
        submission = Submission() if lingers_when_cancelled else None
        try:
            return await self._client.call_prepared(prepared.request, submission)
        except trio.Cancelled:
            # One that never reached the driver must not linger: 15 of those would close
            # the channel to every later call.
            if submission is not None and submission.issued:
                self._lingering += 1
            raise
        except HgcmCallError as exc:
            # The call's own status: the service's, or on Oracle's driver perhaps its give-up.
            if (
                lingers_when_cancelled
                and self._give_ups_in_header
                and exc.rc in _GIVEN_UP_BY_THE_DRIVER
                and not (
                    exc.rc == VERR_TIMEOUT and prepared.request.call.timeout_ms == TIMEOUT_INFINITE
                )
            ):
                self._lingering += 1
            raise
        except VBoxStatusError as exc:
            # Not the call's status: the driver's errno (mainline), so its give-up for sure.
            if lingers_when_cancelled and exc.rc in _GIVEN_UP_BY_THE_DRIVER:
                self._lingering += 1
            raise
        finally:
            self._in_flight -= 1
            if submission is not None and submission.retried:
                # Attempts a stray signal ended, which the driver cancelled at the host.
                self._lingering += submission.retried

    def _check(self, function: int, params: tuple[HgcmParam, ...]) -> None:
        """The driver's limits of a call's parameters."""
        if len(params) > HGCM_MAX_PARMS:
            msg = (
                f"{self.service} function {function}: {len(params)} parameters; "
                f"the driver takes at most {HGCM_MAX_PARMS}"
            )
            raise HgcmLimitError(msg)
        buffers = 0
        for param in params:
            # ``type(param) is``: the parameter classes are final, and the test is cheaper.
            if type(param) is HgcmBufferOut:
                size = param.size
            elif type(param) is HgcmBufferIn or type(param) is HgcmBuffer:
                size = len(param.data)
            else:
                continue
            if size > HGCM_MAX_USER_PARM:
                # The first parameter equal to this one is this one: it would have failed.
                msg = (
                    f"{self.service} function {function}: parameter {params.index(param)} is "
                    f"a {size}-byte buffer; the driver takes at most {HGCM_MAX_USER_PARM} "
                    "bytes per buffer"
                )
                raise HgcmLimitError(msg)
            if size > 0:
                buffers += 1
        if buffers > HGCM_MAX_LOCKED_BUFFERS:
            msg = (
                f"{self.service} function {function}: {buffers} non-empty buffers; Oracle's "
                f"driver takes at most {HGCM_MAX_LOCKED_BUFFERS} per call"
            )
            raise HgcmLimitError(msg)

    def _too_many_pending(self, function: int) -> HgcmLimitError:
        return HgcmLimitError(
            f"{self.service} function {function}: client {self.client_id} already has "
            f"{self.pending} calls pending; "
            f"the host accepts {self.max_pending} at once (a limit of {self.max_pending + 1}"
            " per client counts the new call too)"
        )


@final
class PreparedCall:
    """A call :meth:`HgcmChannel.prepare` checked and encoded, for its ``call_prepared``.

    Attributes:
        channel: the channel that prepared it, the only one that makes it.
        request: the prepared ioctl.
        lingers_when_cancelled: as for :meth:`HgcmChannel.call`.
    """

    __slots__ = ("channel", "lingers_when_cancelled", "request")

    def __init__(
        self, channel: HgcmChannel, request: PreparedHgcmCall, *, lingers_when_cancelled: bool
    ) -> None:
        self.channel = channel
        self.request = request
        self.lingers_when_cancelled = lingers_when_cancelled

    @property
    def function(self) -> int:
        """The service's function number."""
        return self.request.call.function

    @property
    def params(self) -> tuple[HgcmParam, ...]:
        """The parameters as the caller gave them."""
        return self.request.call.params

    def with_param(self, index: int, param: HgcmParam) -> PreparedCall:
        """The same call with parameter ``index`` replaced, prepared on the same channel."""
        params = list(self.params)
        params[index] = param
        return self.channel.prepare_with(
            self.function,
            tuple(params),
            lingers_when_cancelled=self.lingers_when_cancelled,
            timeout_ms=self.request.call.timeout_ms,
        )


@asynccontextmanager
async def open_hgcm_channel(
    device: Device, service: str, *, host_call_limit: int | None = None
) -> AsyncIterator[HgcmChannel]:
    """Connect to ``service`` on a session of its own, yield the channel, then disconnect.

    Args:
        device: the open device.
        service: the host service's name, e.g. ``VBoxGuestPropSvc``.
        host_call_limit: the service's ``acMaxCallsPerClient``; known services are looked
            up in :data:`HOST_CALL_LIMITS`.

    Raises:
        ValueError: the service is unknown and no ``host_call_limit`` was given, or it is
            below 2 (no call would fit).
        VBoxStatusError: the host refused the connection (``VERR_HGCM_SERVICE_NOT_FOUND``).
    """
    limit = HOST_CALL_LIMITS.get(service) if host_call_limit is None else host_call_limit
    if limit is None:
        msg = f"HGCM service {service!r}: its per-client call limit is unknown; pass it"
        raise ValueError(msg)
    if limit < 2:
        msg = f"HGCM service {service!r}: a per-client call limit of {limit} admits no call"
        raise ValueError(msg)
    async with device.open_hgcm_client(service) as client:
        yield HgcmChannel(client, limit)
