"""``Session``: the per-descriptor protocol state, driven without any I/O.

Rules of this test module:

- Replies come from the test-only echo driver (``_echo.py``), so each test reads as
  "encode, let the driver answer, decode".
- A rule breach must raise ``LocalProtocolError`` from ``encode``, before anything is sent.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pytest

from agent.protocol.constants import HGCM_CLIENTS_PER_SESSION
from agent.protocol.errors import LocalProtocolError, VBoxStatusError
from agent.protocol.messages import (
    ChangeFilterMask,
    DriverVersion,
    DriverVersionInfo,
    EventsReceived,
    HgcmCall,
    HgcmConnect,
    HgcmConnected,
    HgcmDisconnect,
    HgcmU32,
    InterruptAllWaits,
    Request,
    WaitForEvents,
)
from agent.protocol.session import Session
from tests.protocol import _echo

R = TypeVar("R")


def roundtrip(session: Session, request: Request[R], *, status: int = 0) -> R:
    """Encode through the session, let the echo driver answer, decode through the session."""
    call = session.encode(request)
    _echo.answer(call, status=status)
    return session.decode(call)


def connect(session: Session, service: str) -> int:
    """Connect ``service`` (its client id is its length + 1) and return the id."""
    reply = roundtrip(session, HgcmConnect(service))
    assert isinstance(reply, HgcmConnected)
    return reply.client_id


@pytest.fixture(name="session")
def fixture_session() -> Session:
    """A fresh session."""
    return Session()


class TestInterrupt:
    """INTERRUPT_ALL_WAIT_FOR_EVENTS is sticky."""

    def test_fresh_session_waits(self, session: Session) -> None:
        """A session that was never interrupted encodes and decodes waits."""
        assert not session.interrupted
        assert roundtrip(session, WaitForEvents(0x40)) == EventsReceived(0x40)

    def test_interrupted_session_refuses_waits(self, session: Session) -> None:
        """After an interrupt, encoding a wait raises ``LocalProtocolError``."""
        roundtrip(session, InterruptAllWaits())
        assert session.interrupted
        with pytest.raises(LocalProtocolError, match="interrupted"):
            session.encode(WaitForEvents(0x40))

    def test_interrupted_session_still_does_other_requests(self, session: Session) -> None:
        """An interrupt only forbids waits."""
        roundtrip(session, InterruptAllWaits())
        roundtrip(session, ChangeFilterMask(0x40, 0))
        assert session.filter_mask == 0x40

    def test_failed_interrupt_reply_still_counts(self, session: Session) -> None:
        """An interrupt whose reply is a failure still marks the session interrupted."""
        with pytest.raises(VBoxStatusError):
            roundtrip(session, InterruptAllWaits(), status=-1)
        assert session.interrupted

    def test_interrupt_lost_in_transport_counts(self, session: Session) -> None:
        """``call_failed`` on an interrupt marks the session interrupted."""
        session.call_failed(session.encode(InterruptAllWaits()))
        with pytest.raises(LocalProtocolError):
            session.encode(WaitForEvents(1))

    def test_interrupt_encoded_but_not_decoded_does_not_count(self, session: Session) -> None:
        """Encoding an interrupt alone changes nothing."""
        session.encode(InterruptAllWaits())
        assert not session.interrupted


class TestHgcmClients:
    """HGCM client bookkeeping."""

    def test_connect_records_the_client(self, session: Session) -> None:
        """A successful connect adds the client id."""
        client_id = connect(session, "VBoxGuestPropSvc")
        assert session.hgcm_clients == frozenset({client_id})

    def test_call_to_unknown_client_is_refused(self, session: Session) -> None:
        """Calling a client this session did not connect raises ``LocalProtocolError``."""
        with pytest.raises(LocalProtocolError, match="not connected"):
            session.encode(HgcmCall(42, 1))

    def test_disconnect_of_unknown_client_is_refused(self, session: Session) -> None:
        """Disconnecting a client this session did not connect raises ``LocalProtocolError``."""
        with pytest.raises(LocalProtocolError, match="not connected"):
            session.encode(HgcmDisconnect(42))

    def test_call_to_connected_client_goes_through(self, session: Session) -> None:
        """A connected client can be called."""
        client_id = connect(session, "svc")
        reply = roundtrip(session, HgcmCall(client_id, 1, (HgcmU32(1),)))
        assert reply.status == 0

    def test_disconnect_forgets_the_client(self, session: Session) -> None:
        """After a successful disconnect the client can no longer be called."""
        client_id = connect(session, "svc")
        roundtrip(session, HgcmDisconnect(client_id))
        assert session.hgcm_clients == frozenset()
        with pytest.raises(LocalProtocolError):
            session.encode(HgcmCall(client_id, 1))

    def test_failed_disconnect_keeps_the_client(self, session: Session) -> None:
        """A disconnect the host refused leaves the client connected."""
        client_id = connect(session, "svc")
        with pytest.raises(VBoxStatusError):
            roundtrip(session, HgcmDisconnect(client_id), status=-2905)
        assert client_id in session.hgcm_clients

    def test_failed_connect_adds_nothing(self, session: Session) -> None:
        """A connect the host refused records no client."""
        with pytest.raises(VBoxStatusError):
            roundtrip(session, HgcmConnect("missing"), status=-2900)
        assert session.hgcm_clients == frozenset()

    def test_transport_failure_keeps_the_state(self, session: Session) -> None:
        """``call_failed`` on a connect or disconnect changes nothing confirmed."""
        client_id = connect(session, "svc")
        session.call_failed(session.encode(HgcmConnect("other")))
        session.call_failed(session.encode(HgcmDisconnect(client_id)))
        assert session.hgcm_clients == frozenset({client_id})
        assert not session.interrupted

    def test_sixty_four_clients_is_the_limit(self, session: Session) -> None:
        """The 65th connect raises ``LocalProtocolError``; a disconnect frees a slot."""
        ids = [connect(session, "s" * length) for length in range(1, HGCM_CLIENTS_PER_SESSION + 1)]
        assert len(session.hgcm_clients) == HGCM_CLIENTS_PER_SESSION
        with pytest.raises(LocalProtocolError, match="64"):
            session.encode(HgcmConnect("one too many"))
        roundtrip(session, HgcmDisconnect(ids[0]))
        session.encode(HgcmConnect("one too many"))

    def test_connects_in_flight_count_against_the_limit(self, session: Session) -> None:
        """64 connects sent and not answered hold every slot (the driver takes one before it
        asks the host): the 65th raises; each answer, a client or a refusal, and each
        transport failure gives its place back."""
        calls = [session.encode(HgcmConnect("s" * length)) for length in range(1, 65)]
        with pytest.raises(LocalProtocolError, match="64 HGCM clients, 64 of them connecting"):
            session.encode(HgcmConnect("one too many"))
        _echo.answer(calls[0])
        session.decode(calls[0])
        _echo.answer(calls[1], status=-2900)
        with pytest.raises(VBoxStatusError):
            session.decode(calls[1])
        session.call_failed(calls[2])
        extra = [session.encode(HgcmConnect("more")) for _ in range(2)]
        with pytest.raises(LocalProtocolError, match="64 HGCM clients, 63 of them connecting"):
            session.encode(HgcmConnect("one too many"))
        session.call_failed(extra[0])
        session.encode(HgcmConnect("the last"))
        assert len(session.hgcm_clients) == 1

    def test_hgcm_clients_is_a_snapshot(self, session: Session) -> None:
        """The returned set does not change with the session."""
        snapshot = session.hgcm_clients
        client_id = connect(session, "svc")
        assert session.hgcm_clients == {client_id}
        assert snapshot == frozenset()


class TestFilterMask:
    """The session's event filter mask."""

    def test_or_and_not_masks_accumulate(self, session: Session) -> None:
        """Each confirmed change ORs in ``or_mask`` and then clears ``not_mask``."""
        roundtrip(session, ChangeFilterMask(0x41, 0))
        roundtrip(session, ChangeFilterMask(0x2, 0x1))
        assert session.filter_mask == 0x42
        roundtrip(session, ChangeFilterMask(0x1, 0x1))
        assert session.filter_mask == 0x42

    def test_refused_change_keeps_the_mask(self, session: Session) -> None:
        """A change the driver refused leaves the mask alone."""
        roundtrip(session, ChangeFilterMask(0x40, 0))
        with pytest.raises(VBoxStatusError):
            roundtrip(session, ChangeFilterMask(0x2, 0), status=-2)
        assert session.filter_mask == 0x40

    def test_lost_change_keeps_the_mask(self, session: Session) -> None:
        """A change the transport failed leaves the mask alone."""
        session.call_failed(session.encode(ChangeFilterMask(0x40, 0)))
        assert session.filter_mask == 0


class TestDriverVersion:
    """The negotiated driver version."""

    def test_version_is_recorded(self, session: Session) -> None:
        """A successful version exchange is kept on the session."""
        assert session.driver_version is None
        reply = roundtrip(session, DriverVersionInfo())
        assert session.driver_version == reply == DriverVersion(0x10000, 0x10000, 0)

    def test_requests_pass_through_unchanged(self, session: Session) -> None:
        """``Session.encode`` returns exactly what the request encodes."""
        request: Request[Any] = WaitForEvents(0x7FF, 10)
        assert bytes(session.encode(request).buffer) == bytes(request.encode().buffer)
