"""Property tests: decoding survives any reply, and well-formed replies round-trip.

Rules of this test module:

- Requests come from ``tests/strategies.py``; every concrete request class has one.
- A fuzzed reply may decode, or raise ``RemoteProtocolError`` or ``VBoxStatusError``
  (``HgcmCallError`` included); any other exception fails the test.
- Replies are fuzzed four ways: arbitrary bytes of the same length, of any length, a valid
  header with an arbitrary body, and a well-formed echo reply with some bytes changed.
- The round trip uses the test-only echo driver in ``_echo.py``.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.protocol import messages
from agent.protocol.errors import RemoteProtocolError, VBoxStatusError
from agent.protocol.messages import HgcmCall, HgcmCallError, IoctlCall, Request
from tests.protocol import _echo
from tests.strategies import REQUEST_STRATEGIES, requests

FAST = settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
NAMES = sorted(REQUEST_STRATEGIES)


def _concrete_requests() -> set[str]:
    found: set[str] = set()
    pending: list[type[Any]] = [Request]
    while pending:
        klass = pending.pop()
        children = klass.__subclasses__()
        pending.extend(children)
        if not children and klass.__module__ == messages.__name__:
            found.add(klass.__name__)
    return found


def _with_buffer(call: IoctlCall[Any], buffer: bytes | bytearray) -> IoctlCall[Any]:
    return IoctlCall(call.code, bytearray(buffer), call.request, call.user_buffers)


def _decode_tolerantly(call: IoctlCall[Any]) -> None:
    with contextlib.suppress(RemoteProtocolError, VBoxStatusError):
        call.request.decode(call)


class TestStrategies:
    """``tests/strategies.py``."""

    def test_every_request_class_has_a_strategy(self) -> None:
        """Each concrete request class of ``messages`` has an entry in the table."""
        assert set(REQUEST_STRATEGIES) == _concrete_requests()

    @FAST
    @given(request=requests())
    def test_strategies_draw_encodable_requests(self, request: Request[Any]) -> None:
        """Every drawn request encodes without error."""
        assert request.encode().buffer


class TestFuzzDecode:
    """``decode`` raises only protocol and status errors, whatever the reply holds."""

    @pytest.mark.parametrize("name", NAMES)
    @FAST
    @given(data=st.data())
    def test_same_length_garbage(self, name: str, data: st.DataObject) -> None:
        """Arbitrary bytes of the buffer's length decode or raise a known error."""
        call = data.draw(REQUEST_STRATEGIES[name]).encode()
        size = len(call.buffer)
        garbage = data.draw(st.binary(min_size=size, max_size=size))
        _decode_tolerantly(_with_buffer(call, garbage))

    @pytest.mark.parametrize("name", NAMES)
    @FAST
    @given(data=st.data())
    def test_any_length_garbage(self, name: str, data: st.DataObject) -> None:
        """Arbitrary bytes of any length decode or raise a known error."""
        call = data.draw(REQUEST_STRATEGIES[name]).encode()
        garbage = data.draw(st.binary(max_size=len(call.buffer) + 64))
        _decode_tolerantly(_with_buffer(call, garbage))

    @pytest.mark.parametrize("name", NAMES)
    @FAST
    @given(data=st.data())
    def test_valid_header_random_body(self, name: str, data: st.DataObject) -> None:
        """The encoded header with any ``rc`` and an arbitrary body decodes or raises."""
        call = data.draw(REQUEST_STRATEGIES[name]).encode()
        body_size = len(call.buffer) - 24
        body = data.draw(st.binary(min_size=body_size, max_size=body_size))
        rc = data.draw(st.sampled_from([0, 1, -1, -2900]) | st.integers(-(2**31), 2**31 - 1))
        reply = bytearray(call.buffer[:24]) + body
        _echo.set_rc(reply, rc)
        _decode_tolerantly(_with_buffer(call, reply))

    @pytest.mark.parametrize("name", NAMES)
    @FAST
    @given(data=st.data())
    def test_mutated_echo_reply(self, name: str, data: st.DataObject) -> None:
        """A well-formed reply with a few bytes changed decodes or raises a known error."""
        call = data.draw(REQUEST_STRATEGIES[name]).encode()
        _echo.answer(call)
        size = len(call.buffer)
        positions = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=4))
        for position in positions:
            call.buffer[position] = data.draw(st.integers(0, 255))
        _decode_tolerantly(call)


class TestRoundTrip:
    """The echo driver's replies decode to what it meant."""

    @pytest.mark.parametrize("name", NAMES)
    @FAST
    @given(data=st.data())
    def test_echo_reply_decodes_to_expected_value(self, name: str, data: st.DataObject) -> None:
        """A reply built from the request's own fields decodes to the expected value."""
        call = data.draw(REQUEST_STRATEGIES[name]).encode()
        expected = _echo.answer(call)
        assert call.request.decode(call) == expected

    @FAST
    @given(call_request=REQUEST_STRATEGIES["HgcmCall"], status=st.integers(-(2**31), -1))
    def test_failed_hgcm_call_carries_the_reply(self, call_request: HgcmCall, status: int) -> None:
        """A failing service status raises ``HgcmCallError`` holding the decoded parameters."""
        call = call_request.encode()
        expected = _echo.answer(call, status=status)
        with pytest.raises(HgcmCallError) as info:
            call_request.decode(call)
        assert info.value.reply == expected
        assert info.value.rc == status

    @FAST
    @given(
        request=st.sampled_from(NAMES).flatmap(lambda name: REQUEST_STRATEGIES[name]),
        status=st.integers(-(2**31), -1),
    )
    def test_failing_status_raises_status_error(self, request: Request[Any], status: int) -> None:
        """A well-formed reply with ``rc < 0`` raises ``VBoxStatusError`` with that rc."""
        call = request.encode()
        _echo.answer(call)
        struct.pack_into("<i", call.buffer, 12, status)
        with pytest.raises(VBoxStatusError) as info:
            request.decode(call)
        assert info.value.rc == status
