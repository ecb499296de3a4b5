"""Abandoned calls are told apart by what they ask for (``agent.abandons.call_kind``).

Every VMMDev request of one size shares an ioctl code (``GetHostTime`` and ``GetSessionId``
are both 32 bytes): one of them answered must not end the other's run of abandoned calls,
nor one of them abandoned hide the other's. The in-process simulated host on trio's
autojump clock; a request the host holds for 10 hours is abandoned by its caller's timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import structlog.testing
import trio

from agent.abandons import call_kind
from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.protocol import GetHostTime, GetSessionId, RequestType

if TYPE_CHECKING:
    from collections.abc import MutableMapping, Sequence

HELD_S: Final = 10 * 3600
GIVE_UP_S: Final = 5


def _abandon_lines(logs: Sequence[MutableMapping[str, Any]]) -> list[tuple[str, str, int]]:
    return [
        (line["event"], line["log_level"], line["kind"])
        for line in logs
        if line["event"] in {"ioctl_abandoned", "ioctl_answered_again"}
    ]


async def test_one_request_answered_does_not_end_anothers_run(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A host time the host never answers, tried three times while session ids come back
    between: one warning, two debug lines, and no ``ioctl_answered_again`` (the session id
    of the same code ended the run each time, so every try warned and 'answered again')."""
    del autojump_clock
    host = SimulatedHost(personality="mainline")
    with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(SimOpener(host)) as device:
                host.set_delay(RequestType.GET_HOST_TIME, HELD_S)
                for _ in range(3):
                    with trio.move_on_after(GIVE_UP_S):
                        await device.request(GetHostTime())
                    await device.request(GetSessionId())
            nursery.cancel_scope.cancel()
    host_time = RequestType.GET_HOST_TIME
    assert _abandon_lines(logs) == [
        ("ioctl_abandoned", "warning", host_time),
        ("ioctl_abandoned", "debug", host_time),
        ("ioctl_abandoned", "debug", host_time),
    ]


async def test_another_request_abandoned_is_a_warning_of_its_own(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A session id abandoned while host times are: a warning of its own (it was a debug
    line, the second of the code's run)."""
    del autojump_clock
    host = SimulatedHost(personality="mainline")
    with trio.fail_after(3600), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            async with open_device(SimOpener(host)) as device:
                host.set_delay(RequestType.GET_HOST_TIME, HELD_S)
                with trio.move_on_after(GIVE_UP_S):
                    await device.request(GetHostTime())
                host.set_delay(RequestType.GET_SESSION_ID, HELD_S)
                with trio.move_on_after(GIVE_UP_S):
                    await device.request(GetSessionId())
            nursery.cancel_scope.cancel()
    assert _abandon_lines(logs) == [
        ("ioctl_abandoned", "warning", RequestType.GET_HOST_TIME),
        ("ioctl_abandoned", "warning", RequestType.GET_SESSION_ID),
    ]


def test_the_kind_of_a_call_is_its_request() -> None:
    """Two requests of one code are two kinds; a call without a request type is its code."""
    host_time = GetHostTime().encode()
    session_id = GetSessionId().encode()
    assert host_time.code == session_id.code
    assert call_kind(host_time.code, host_time.buffer) == (
        host_time.code,
        RequestType.GET_HOST_TIME,
    )
    assert call_kind(session_id.code, session_id.buffer)[1] == RequestType.GET_SESSION_ID
    assert call_kind(0xC0185600, bytearray(24)) == (0xC0185600, 0)
