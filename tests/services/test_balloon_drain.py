"""The owned balloon's drain: what a refusal costs it.

Virtual time (``autojump_clock``) drives every wait; each test is bounded by
``trio.fail_after`` on that clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from agent.protocol import RequestType
from agent.protocol.status import VERR_NO_MEMORY
from agent.services.balloon._chunks import Chunk
from tests.services.balloon_support import HandoverWrapper, SimChunks, running_balloon

if TYPE_CHECKING:
    import pytest

    from agent.protocol import Submission
    from agent.services.balloon._handover import Handover

CHUNKS = 200


class RecordDeflates(HandoverWrapper):
    """Every deflate the walker asks for goes to ``deflates`` (the chunk's address), refused
    or not."""

    def __init__(self, handover: Handover) -> None:
        super().__init__(handover)
        self.deflates: list[int] = []

    async def deflate(self, chunk: Chunk, submission: Submission) -> None:
        self.deflates.append(chunk.address)
        await super().deflate(chunk, submission)


async def test_one_refusal_costs_one_retry_and_nothing_more(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """The host refuses the drain's first deflate once: every other chunk goes back, newest
    first, then that one, each asked for once more; and no chunk is looked for among the
    others (the old drain compared each later chunk with every one below it: quadratic)."""
    compared = 0
    equal = Chunk.__eq__

    def counted(self: Chunk, other: object) -> bool:
        nonlocal compared
        compared += 1
        return equal(self, other)

    monkeypatch.setattr(Chunk, "__eq__", counted)
    chunks = SimChunks()
    with trio.fail_after(60):
        async with running_balloon(
            personality="passthrough", allocator=chunks, drain_s=10.0
        ) as run:
            run.host.set_balloon_target(CHUNKS)
            await run.settle(CHUNKS)
            walker = run.walker
            newest_first = [chunk.address for chunk in reversed(walker.held)]
            walker.handover = recorder = RecordDeflates(walker.handover)
            run.host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY)
            compared = 0
        assert (run.host_chunks, chunks.live) == (0, {})
    assert recorder.deflates == [*newest_first, newest_first[0]]
    assert compared == 0
